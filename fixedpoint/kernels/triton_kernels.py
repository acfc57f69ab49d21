"""Triton kernels for the solver's inner loop, each beside a launcher with its PyTorch twin's signature.

Each kernel makes one pass over the data it needs: the residual epilogue
reads (x, f(x)) once and writes g; the Anderson write stores the new pair in
the ring buffer and computes the new Gram row in the same pass; the mixing
step reads the history once. Per-sample sums are split over chunks of the
feature dimension (grid (B, chunks)) into fp32 partials that torch adds up,
so results are deterministic. fp32, fp16 and bf16 storage; fp32 arithmetic.
Runs on CUDA, and on CPU under TRITON_INTERPRET=1 (slowly: tests use tiny shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["residual", "anderson_write", "anderson_mix"]

BLOCK = 1024  # elements per inner step
CHUNK_BLOCKS = 16  # inner steps per program along D


def _grid_chunks(dim: int) -> tuple[int, int]:
    block = min(BLOCK, triton.next_power_of_2(max(dim, 16)))
    chunk = block * CHUNK_BLOCKS
    return block, triton.cdiv(dim, chunk)


def _check(name: str, *tensors: Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the feature dimension must be contiguous (stride 1), got strides {t.stride()}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: triton kernels take fp32, fp16 or bf16, got {t.dtype}")


@triton.jit
def _residual_kernel(x_ptr, fx_ptr, g_ptr, out_ptr, D, sx, sf, sg, n_chunks,
                     BLOCK: tl.constexpr, STEPS: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    c = tl.program_id(1)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(STEPS):
        idx = (c * STEPS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < D
        x = tl.load(x_ptr + b * sx + idx, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(fx_ptr + b * sf + idx, mask=mask, other=0.0).to(tl.float32)
        g = (f - x).to(g_ptr.dtype.element_ty)
        tl.store(g_ptr + b * sg + idx, g, mask=mask)
        gf = g.to(tl.float32)
        acc_g += gf * gf
        acc_f += f * f
    tl.store(out_ptr + (b * n_chunks + c) * 2, tl.sum(acc_g, axis=0))
    tl.store(out_ptr + (b * n_chunks + c) * 2 + 1, tl.sum(acc_f, axis=0))


def residual(x: Tensor, fx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Triton twin of reference.residual."""
    _check("residual", x, fx)
    batch, dim = x.shape
    g = torch.empty_like(x)
    block, chunks = _grid_chunks(dim)
    partials = torch.empty(batch, chunks, 2, dtype=torch.float32, device=x.device)
    _residual_kernel[(batch, chunks)](x, fx, g, partials, dim, x.stride(0), fx.stride(0), g.stride(0), chunks,
                                      BLOCK=block, STEPS=CHUNK_BLOCKS)  # fmt: skip
    sums = partials.sum(dim=1)
    return g, sums[:, 0], sums[:, 1]


@triton.jit
def _anderson_write_kernel(F_ptr, G_ptr, fx_ptr, g_ptr, out_ptr, D, slot, sFb, sFm, sGb, sGm, sf, sg, n_chunks,
                           M: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    c = tl.program_id(1)
    for j in tl.static_range(M):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(STEPS):
            idx = (c * STEPS + i) * BLOCK + tl.arange(0, BLOCK)
            mask = idx < D
            g = tl.load(g_ptr + b * sg + idx, mask=mask, other=0.0)
            if j == slot:  # the new pair: store it, and its Gram entry is g . g
                f = tl.load(fx_ptr + b * sf + idx, mask=mask, other=0.0)
                tl.store(F_ptr + b * sFb + j * sFm + idx, f.to(F_ptr.dtype.element_ty), mask=mask)
                tl.store(G_ptr + b * sGb + j * sGm + idx, g.to(G_ptr.dtype.element_ty), mask=mask)
                h = g.to(G_ptr.dtype.element_ty).to(tl.float32)
            else:
                h = tl.load(G_ptr + b * sGb + j * sGm + idx, mask=mask, other=0.0).to(tl.float32)
            acc += h * g.to(tl.float32)
        tl.store(out_ptr + (b * n_chunks + c) * M + j, tl.sum(acc, axis=0))


def anderson_write(F: Tensor, G: Tensor, slot: int, fx: Tensor, g: Tensor) -> Tensor:
    """Triton twin of reference.anderson_write."""
    _check("anderson_write", F, G, fx, g)
    batch, m, dim = F.shape
    block, chunks = _grid_chunks(dim)
    partials = torch.empty(batch, chunks, m, dtype=torch.float32, device=F.device)
    _anderson_write_kernel[(batch, chunks)](
        F, G, fx, g, partials, dim, slot, F.stride(0), F.stride(1), G.stride(0), G.stride(1), fx.stride(0),
        g.stride(0), chunks, M=m, BLOCK=block, STEPS=CHUNK_BLOCKS,
    )  # fmt: skip
    return partials.sum(dim=1)


@triton.jit
def _anderson_mix_kernel(F_ptr, G_ptr, a_ptr, frozen_ptr, active_ptr, out_ptr, D, beta_m1, sFb, sFm, sGb, sGm,
                         sfz, so, M: tl.constexpr, BLOCK: tl.constexpr, USE_G: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    c = tl.program_id(1)
    idx = c * BLOCK + tl.arange(0, BLOCK)
    mask = idx < D
    active = tl.load(active_ptr + b)
    if active != 0:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(M):
            a = tl.load(a_ptr + b * M + j)
            acc += a * tl.load(F_ptr + b * sFb + j * sFm + idx, mask=mask, other=0.0).to(tl.float32)
            if USE_G:
                gj = tl.load(G_ptr + b * sGb + j * sGm + idx, mask=mask, other=0.0).to(tl.float32)
                acc += (beta_m1 * a) * gj
        tl.store(out_ptr + b * so + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # a stopped sample keeps its iterate
        tl.store(out_ptr + b * so + idx, tl.load(frozen_ptr + b * sfz + idx, mask=mask, other=0.0), mask=mask)


def anderson_mix(
    F: Tensor, G: Tensor, alpha: Tensor, beta: float, frozen: Tensor | None, active: Tensor | None
) -> Tensor:
    """Triton twin of reference.anderson_mix."""
    batch, m, dim = F.shape
    if frozen is None:
        frozen, active = F[:, 0], torch.ones(batch, dtype=torch.bool, device=F.device)
    _check("anderson_mix", F, G, frozen)
    out = torch.empty(batch, dim, dtype=F.dtype, device=F.device)
    block = min(BLOCK, triton.next_power_of_2(max(dim, 16)))
    alpha32 = alpha.to(torch.float32).contiguous()
    _anderson_mix_kernel[(batch, triton.cdiv(dim, block))](
        F, G, alpha32, frozen, active.to(torch.int8).contiguous(), out, dim, float(beta - 1.0), F.stride(0),
        F.stride(1), G.stride(0), G.stride(1), frozen.stride(0), out.stride(0), M=m, BLOCK=block,
        USE_G=beta != 1.0,
    )  # fmt: skip
    return out
