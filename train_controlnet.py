"""ControlNet-conditioned finetuning with BOFT adapters.

Two ways to add control (--control):
  light       the BOFT paper's recipe: a small zero-initialised control encoder added after the
              UNet's conv_in, trained in full, with BOFT adapters on the UNet's attention.
  controlnet  a diffusers ControlNet copied from the UNet (or --controlnet_model_name_or_path)
              whose copied blocks stay frozen and get BOFT adapters, while its zero convolutions
              and conditioning embedding train in full.

Defaults train on the bundled tiny-world control set (shape mask -> image) with the embedded tiny
model. For real data:

    accelerate launch train_controlnet.py --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \\
        --control controlnet --dataset_name fusing/fill50k --image_column image \\
        --conditioning_image_column conditioning_image --caption_column text --resolution 512 \\
        --learning_rate 1e-5 --train_batch_size 4 --mixed_precision bf16
"""

from __future__ import annotations

import sys
from functools import partial

from boft_diffusion.recipes.control import ControlConfig, train
from boft_diffusion.training.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    return run_cli(partial(ControlConfig.from_flags, description=__doc__), train, argv)


if __name__ == "__main__":
    sys.exit(main())
