"""DreamBooth subject finetuning with BOFT adapters.

Defaults train the embedded tiny Stable Diffusion on the bundled sample subject in a few minutes
on a laptop CPU. Point --pretrained_model_name_or_path at a real checkpoint for real use:

    accelerate launch train_dreambooth.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" \\
        --with_prior_preservation --class_data_dir class_dog/ --class_prompt "a photo of dog" \\
        --resolution 512 --learning_rate 3e-5 --max_train_steps 2000 --mixed_precision bf16
"""

from __future__ import annotations

import argparse
import sys

from boft_diffusion.dreambooth import TEXT_ENCODER_TARGETS, UNET_TARGETS, run
from boft_diffusion.training import TrainingError, add_boft_args, add_model_args, add_training_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    group = parser.add_argument_group("subject and prior")
    group.add_argument("--instance_data_dir", default=None,
                       help="Images of the subject (default: the bundled striped star, examples/sks_star).")
    group.add_argument("--instance_prompt", default="a photo of sks star")
    group.add_argument("--class_data_dir", default=None, help="Class images; generated with the base model if short.")
    group.add_argument("--class_prompt", default=None, help='e.g. "a photo of star".')
    group.add_argument("--with_prior_preservation", action="store_true")
    group.add_argument("--prior_loss_weight", type=float, default=1.0)
    group.add_argument("--num_class_images", type=int, default=50)
    group.add_argument("--sample_batch_size", type=int, default=8, help="Batch size for class image generation.")
    group.add_argument("--center_crop", action="store_true", help="Centre crop instead of random crop.")
    group.add_argument("--random_flip", action="store_true")
    group.add_argument("--train_text_encoder", action="store_true", help="Also put BOFT adapters on the text encoder.")
    group.add_argument("--text_encoder_target_modules", nargs="+", default=list(TEXT_ENCODER_TARGETS))
    group.add_argument("--save_merged", action="store_true",
                       help="Also export a full diffusers pipeline with the adapter merged, in output_dir/merged.")
    add_training_args(parser, default_output_dir="outputs/dreambooth", default_steps=300)
    add_boft_args(parser, UNET_TARGETS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (TrainingError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
