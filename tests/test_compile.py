"""torch.compile of adapted models: whole graphs (fullgraph=True fails on any break), eager's numbers."""

import copy

import pytest
import torch
from torch import nn

import boft_diffusion as bd
from conftest import make_tiny_unet, randomize_adapter, unet_inputs

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2"]


class ConvNet(nn.Module):
    """Every kind of adapted layer: a 3x3 conv (rotated weight), a 1x1 conv and Linears (rotated input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.proj = nn.Linear(8, 16)
        self.out = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(torch.relu(self.conv(x)))
        return self.out(torch.relu(self.proj(x.flatten(2).transpose(1, 2))))


def adapted(model, targets, **config):
    bd.apply_boft(model, bd.BOFTConfig(**{"block_size": 4, "n_butterfly_factor": 2, "target_modules": targets, **config}))
    randomize_adapter(model)
    return model


def train_step(model, optimizer, run):
    loss = run(model).square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach(), grads


def compare_training_and_inference(eager, compiled, run, tolerance):
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (eager, compiled)]
    for _ in range(2):  # the second step runs on updated parameters: nothing was frozen into the graph
        (loss_e, grads_e), (loss_c, grads_c) = (train_step(m, o, run) for m, o in zip((eager, compiled), optimizers, strict=True))
        assert torch.allclose(loss_c, loss_e, **tolerance)
        for a, b in zip(grads_c, grads_e, strict=True):
            assert torch.allclose(a, b, **tolerance)
    for model in (eager, compiled):
        model.eval()
    with torch.no_grad():
        for change in (lambda m: None, lambda m: bd.set_adapter_strength(m, 0.5)):
            for model in (eager, compiled):
                change(model)
            assert torch.allclose(run(compiled), run(eager), **tolerance)


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_conv_net_equals_eager(backend):
    torch.manual_seed(0)
    eager = adapted(ConvNet(), ["conv", "mix", "proj", "out"]).train()
    compiled = bd.compile_adapted(copy.deepcopy(eager), backend=backend, fullgraph=True)
    x = torch.randn(2, 8, 6, 6)
    compare_training_and_inference(eager, compiled, lambda m: m(x), dict(rtol=1e-4, atol=1e-6))


@pytest.mark.slow
def test_adapted_unet_compiles_as_one_graph_and_matches_eager():
    eager = adapted(make_tiny_unet(), TARGETS).train()
    compiled = bd.compile_adapted(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    sample, timestep, context = unet_inputs()
    compare_training_and_inference(
        eager, compiled, lambda m: m(sample, timestep, encoder_hidden_states=context).sample, dict(rtol=1e-5, atol=1e-6)
    )


def test_compiled_training_fold_equals_eager():
    torch.manual_seed(0)
    eager = adapted(ConvNet(), ["conv", "mix", "proj", "out"]).train()
    bd.set_training_fold(eager, "fold")
    compiled = bd.compile_adapted(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 8, 6, 6)
    compare_training_and_inference(eager, compiled, lambda m: m(x), dict(rtol=1e-4, atol=1e-6))


def test_aot_eager_trains_the_same_adapter_as_eager_with_adamw():
    """What --compile --compile_backend aot_eager does in the trainer: AdamW steps on a compiled forward end
    at eager's adapter (AdamW's first step divides by |grad|, so any gradient error shows at full size)."""
    torch.manual_seed(0)
    eager = adapted(ConvNet(), ["conv", "mix", "proj", "out"]).train()
    compiled = bd.compile_adapted(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 8, 6, 6)
    for model in (eager, compiled):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for _ in range(3):
            train_step(model, optimizer, lambda m: m(x))
    trained = [(n, p) for n, p in eager.named_parameters() if p.requires_grad]
    assert trained
    for (name, a), b in zip(trained, (p for p in compiled.parameters() if p.requires_grad), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.slow
def test_inductor_backward_on_the_cpu_is_wrong_without_any_adapter():
    """Why --compile refuses inductor for training on the CPU (torch 2.13, issue #36): with no adapter at all,
    training the tiny UNet's own attention weights, inductor's forward matches eager but its gradients of
    the mid block's attention are off by 100% (other blocks' match to 1e-6). aot_eager runs eager's
    kernels and matches. When this test fails, torch has fixed it: lift the refusal
    (training.trainer.check_compile_backend). About 4 minutes on a 2-core CPU, most of it compiling."""
    eager = make_tiny_unet().requires_grad_(False)
    for name, param in eager.named_parameters():
        if any(key in name for key in ("to_q.", "to_k.", "to_v.", "to_out.0.")) and name.endswith("weight"):
            param.requires_grad_(True)
    eager.train()
    compiled = copy.deepcopy(eager)
    compiled.forward = torch.compile(compiled.forward, backend="inductor")
    sample, timestep, context = unet_inputs()
    losses, grads = [], []
    for model in (eager, compiled):
        loss = model(sample, timestep, encoder_hidden_states=context).sample.square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    error = {n: ((grads[0][n] - grads[1][n]).norm() / grads[0][n].norm()).item() for n in grads[0]}
    assert all(error[n] < 1e-4 for n in error if n.startswith("up_blocks"))
    assert all(error[n] > 0.5 for n in error if n.startswith("mid_block")), error
