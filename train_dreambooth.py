"""DreamBooth subject finetuning with BOFT adapters.

Defaults train the embedded tiny Stable Diffusion on the bundled sample subject in a few minutes
on a laptop CPU. Point --pretrained_model_name_or_path at a real checkpoint for real use:

    accelerate launch train_dreambooth.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" \\
        --with_prior_preservation --class_data_dir class_dog/ --class_prompt "a photo of dog" \\
        --resolution 512 --learning_rate 3e-5 --max_train_steps 2000 --mixed_precision bf16
"""

from __future__ import annotations

import sys
from functools import partial

from boft_diffusion.recipes.dreambooth import DreamBoothConfig, train
from boft_diffusion.training.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    return run_cli(partial(DreamBoothConfig.from_flags, description=__doc__), train, argv)


if __name__ == "__main__":
    sys.exit(main())
