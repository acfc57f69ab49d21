"""FPDM vs DiT of the same width: parameters, training memory, training speed.

Parameters and memory at the paper's sizes (256px ImageNet latents: 32x32x4,
patch 2, 1000 classes) are computed on PyTorch's meta device, so XL costs
nothing to measure: memory = weights + gradients + AdamW state (16 bytes per
parameter, fp32) + the bytes autograd saves for backward in one training
step (counted with saved_tensors_hooks), batch 32 per GPU as in DiT's
recipe. FPDM's S-JFB saves activations only for its n_g gradient iterations:
reported for the mean draw of the paper's range U{1..12} (n_g = 6.5, as the
average of n_g = 6 and 7) and for the worst case (12). Speed is measured for
real on this machine at the tiny size.
"""

from __future__ import annotations

import time

import pytest
import torch

from fpdm.diffusion import Diffusion
from fpdm.models import create_model

PARAMS = "parameters: FPDM vs DiT at the same width (256px latents, patch 2)"
MEMORY = "training memory per GPU, GB (batch 32, fp32, 256px latents, patch 2; weights+grads+AdamW+saved activations)"
SPEED = "training steps/s on this CPU (digits 8x8, patch 2, batch 64)"


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def bench_parameters(benchmark, report, size):
    with torch.device("meta"):
        dit, fpdm = create_model(f"DiT-{size}/2"), create_model(f"FPDM-{size}/2")
    benchmark.pedantic(lambda: None, rounds=1)
    n_dit, n_fpdm = _count(dit), _count(fpdm)
    report.add(PARAMS, size=size, dit_M=n_dit / 1e6, fpdm_M=n_fpdm / 1e6, fewer=f"{100 * (1 - n_fpdm / n_dit):.1f}%")


def _saved_bytes(model, batch: int, grad_iters: tuple[int, int] | None = None) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    if grad_iters is not None:
        model.config.no_grad_iters, model.config.grad_iters = (0, 0), grad_iters
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    y = torch.zeros(batch, dtype=torch.long, device="meta")
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, t, y)
    return total[0]


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def bench_training_memory(benchmark, report, size):
    batch = 32
    with torch.device("meta"):
        dit, fpdm = (
            create_model(f"DiT-{size}/2", class_dropout_prob=0.0),
            create_model(f"FPDM-{size}/2", class_dropout_prob=0.0),
        )
    benchmark.pedantic(lambda: None, rounds=1)
    state = lambda m: 16 * _count(m)  # noqa: E731 (weights, grads, Adam m and v in fp32)
    dit_plain = state(dit) + _saved_bytes(dit, batch)
    dit.grad_checkpointing = True
    dit_ckpt = state(dit) + _saved_bytes(dit, batch)
    fpdm_mean = state(fpdm) + (_saved_bytes(fpdm, batch, (6, 6)) + _saved_bytes(fpdm, batch, (7, 7))) / 2
    fpdm_worst = state(fpdm) + _saved_bytes(fpdm, batch, (12, 12))
    gb = 2**30
    report.add(
        MEMORY, size=size, dit=dit_plain / gb, dit_checkpointed=dit_ckpt / gb, fpdm_sjfb_mean=fpdm_mean / gb,
        fpdm_sjfb_worst=fpdm_worst / gb, fpdm_vs_dit=f"{fpdm_mean / dit_plain:.2f}x",
        fpdm_vs_dit_checkpointed=f"{fpdm_mean / dit_ckpt:.2f}x",
    )  # fmt: skip


@pytest.mark.parametrize("name", ["DiT-T/2", "FPDM-T/2"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def bench_training_speed(benchmark, report, name, checkpointing):
    if checkpointing and name.startswith("FPDM"):
        pytest.skip("FPDM's memory saving is S-JFB itself; checkpointing applies to DiT")
    torch.manual_seed(0)
    model = create_model(name, input_size=8, in_channels=1, num_classes=10)
    model.grad_checkpointing = checkpointing
    model.generator = torch.Generator().manual_seed(0)
    diffusion = Diffusion.create(learn_sigma=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))

    def step():
        t = torch.randint(0, 1000, (64,))
        loss = diffusion.training_losses(model, x, t, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    steps = 15
    start = time.perf_counter()
    benchmark.pedantic(lambda: [step() for _ in range(steps)], rounds=1, iterations=1)
    speed = steps / (time.perf_counter() - start)
    report.add(
        SPEED,
        model=name,
        activation_checkpointing=checkpointing,
        steps_per_s=speed,
        blocks=f"{model.config.depth} blocks" if name.startswith("DiT") else "1+fp+1, S-JFB (0..10, 1..12)",
    )
