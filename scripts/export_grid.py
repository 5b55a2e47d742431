"""A BOFT adapter against its LoRA export at one rank, same seeds: the grid in docs/export_rank4.png.

    python scripts/export_grid.py outputs/demo/adapter --rank 4 --output docs/export_rank4.png

The LoRA side uses no boft-diffusion code: diffusers' ``load_lora_weights`` on the kohya file and
``load_textual_inversion`` on the identifier file, with "<sks>" in place of "sks" in the prompts.
Rows: for each prompt, the BOFT adapter, then the exported LoRA.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from boft_diffusion import demo
from boft_diffusion.core.images import image_grid
from boft_diffusion.evaluation.sampling import sample
from boft_diffusion.export import export_adapter
from boft_diffusion.exports.layouts import format_report
from boft_diffusion.families.loading import load_pipeline, quiet_progress, tiny_defaults
from boft_diffusion.outputs.read import load_outputs
from boft_diffusion.tiny import world

PROMPTS = [demo.INSTANCE_PROMPT, world.on_background(demo.INSTANCE_PROMPT, "green"), demo.CLASS_PROMPT]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--output", default="docs/export_rank4.png")
    args = parser.parse_args()
    guidance, steps = tiny_defaults()["guidance_scale"], tiny_defaults()["num_inference_steps"]
    with tempfile.TemporaryDirectory() as tmp:
        result = export_adapter(args.adapter_dir, "lora", Path(tmp) / "lora.safetensors", rank=args.rank)
        print(format_report(result.report))
        boft = quiet_progress(load_pipeline("tiny", dtype=torch.float32, device="cpu"))
        load_outputs(boft, args.adapter_dir)
        lora = quiet_progress(load_pipeline("tiny", dtype=torch.float32, device="cpu"))
        lora.load_lora_weights(str(Path(tmp) / "lora.safetensors"))
        words = [path.stem for path in result.paths[1:]]
        for path in result.paths[1:]:
            lora.load_textual_inversion(str(path))
    rows = []
    for prompt in PROMPTS:
        lora_prompt = " ".join(f"<{w}>" if w in words else w for w in prompt.split())
        for pipe, text in ((boft, prompt), (lora, lora_prompt)):
            rows.append(sample(pipe, [text] * args.seeds, 0, steps, guidance))
    width, height = rows[0][0].size
    image_grid(rows).resize((width * args.seeds * 2, height * len(rows) * 2)).save(args.output)
    print(f"grid (rows: BOFT, LoRA rank {args.rank} for each of {PROMPTS}): {args.output}")


if __name__ == "__main__":
    main()
