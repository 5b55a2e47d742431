"""Trains the tiny UNet's BOFT adapter three steps under torch FSDP2 (``fully_shard``) on the gloo backend:
run by tests/test_fsdp.py as two CPU processes (torchrun), each on half of one global batch. Writes the
mean loss of each step and the full (gathered) adapter, on rank 0 only, to ``--output_dir``."""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

import boft_diffusion as bd
from boft_diffusion.core.adapters import boft_layers
from conftest import make_tiny_unet, unet_inputs

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]
STEPS = 3


def adapted_unet():
    unet = make_tiny_unet().requires_grad_(False)
    bd.apply_boft(unet, bd.BOFTConfig(block_size=4, n_butterfly_factor=2, target_modules=TARGETS, dropout=0.0))
    return unet.train()


def train(unet, rank: int = 0, world: int = 1) -> list[float]:
    """Steps of AdamW on this process's share of a batch of 4; the mean loss of each step.

    eps 1e-4 rather than 1e-8: Adam's first step moves an entry by about lr whatever its gradient's
    size, so an entry whose gradient is rounding noise (its sign set by the order of the two
    processes' sum) would move by +-lr and differ between the runs by 2 lr; with eps above the
    noise it barely moves in either."""
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=0.01, eps=1e-4)
    sample, timestep, context = unet_inputs(batch=2)
    sample, timestep, context = (torch.cat([t, t.flip(0)]) for t in (sample, timestep, context))
    share = slice(rank * 4 // world, (rank + 1) * 4 // world)
    losses = []
    for _ in range(STEPS):
        out = unet(sample[share], timestep[share], encoder_hidden_states=context[share]).sample
        loss = out.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def adapter_tensors(unet) -> dict[str, torch.Tensor]:
    """Every adapter tensor in full (an FSDP2 parameter is a DTensor holding one shard)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in unet.named_parameters() if p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    unet = adapted_unet()
    for _, layer in boft_layers(unet):  # each adapted layer its own FSDP unit, as auto-wrap policies do
        fully_shard(layer)
    fully_shard(unet)
    losses = train(unet, rank, world)
    tensors = adapter_tensors(unet)
    if rank == 0:
        folder = Path(args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / "adapter.safetensors")
        (folder / "losses.json").write_text(json.dumps(losses))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
