#!/usr/bin/env python
"""Which butterfly depths m can Hugging Face PEFT read from our adapter files, on this device?

For m in --depths: adapt a small random-weight UNet with our BOFT (block size 4, attention and
ResNet convs), save it, load the folder with ``peft.PeftModel.from_pretrained`` and compare the
UNet outputs. PEFT's m > 1 needs a CUDA extension compiled at run time; without it PEFT falls back
to m = 1 and refuses the file. Prints one JSON line per depth.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boft_diffusion as bd  # noqa: E402
from boft_diffusion.tiny.toy import toy_unet_config  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]


def make_unet(device: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**toy_unet_config()).to(device).eval()


def check(depth: int, device: str) -> dict:
    import peft

    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, 8, 8, generator=gen).to(device), torch.tensor([10, 500], device=device),
              torch.randn(2, 5, 32, generator=gen).to(device))
    unet = make_unet(device)
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, n_butterfly_factor=depth, target_modules=TARGETS))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    unet.eval()
    with torch.no_grad():
        ours = unet(*inputs[:2], encoder_hidden_states=inputs[2]).sample
    folder = Path(tempfile.mkdtemp()) / "adapter"
    bd.save_adapter(unet, folder)
    t = time.time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.PeftModel.from_pretrained(make_unet(device), str(folder)).eval()
            with torch.no_grad():
                theirs = model(*inputs[:2], encoder_hidden_states=inputs[2]).sample
    except Exception as err:  # noqa: BLE001 - the point is to record PEFT's answer
        return {"m": depth, "device": device, "loads": False, "error": f"{type(err).__name__}: {err}"[:300]}
    return {"m": depth, "device": device, "loads": True, "max_abs_diff": float((theirs - ours).abs().max()),
            "load_seconds": round(time.time() - t, 1), "peft": peft.__version__}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args(argv)
    for depth in args.depths:
        print(json.dumps(check(depth, args.device)), flush=True)


if __name__ == "__main__":
    main()
