"""Triton kernels for the solver's inner loop, each beside a launcher with its PyTorch twin's signature.

Each kernel makes one pass over the data it needs: the residual epilogue
reads (x, f(x)) once and writes g; Picard's damped step reads (x, f(x)) once;
the Anderson write stores the new pair in the ring buffer and computes the
new Gram row in the same pass; one program per sample then absorbs that row
and solves for the next mixing weights; the mixing step reads the history
once; Broyden's two applies share one pass for their coefficients and one for
the combination (with the update's dot products). Per-sample sums are split over
chunks of the feature dimension (grid (B, chunks)) into fp32 partials that
torch adds up, so results are deterministic. fp32, fp16 and bf16 storage;
fp32 arithmetic.
Runs on CUDA, and on CPU under TRITON_INTERPRET=1 (slowly: tests use tiny shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from .groups import AndersonState, BroydenApplies, BroydenState, BroydenStep, LoopBuffers, Pair, StopRule, evolve

__all__ = [
    "LAUNCH_SETTINGS",
    "LaunchSetting",
    "anderson_absorb",
    "anderson_residual_write",
    "anderson_mix",
    "anderson_write",
    "best_update",
    "bookkeep",
    "broyden_combine",
    "broyden_dots",
    "broyden_finish",
    "launch_setting",
    "picard_step",
    "residual",
]

READS_UNWRITTEN_SLOTS = True  # Anderson's kernels read all m ring slots: a fresh history is zero-filled


@dataclass(frozen=True)
class LaunchSetting:
    """How one kernel is launched for one element size."""

    nbytes: int  # bytes each program moves per inner step: a row's block, or an (m, block) tile, all rows together
    warps: int = 4  # warps per program (Triton's default)
    max_steps: int = 4  # inner steps per program along D, at most (the reductions; the others take one)
    stages: int = 1  # inner steps whose loads are in flight at once (tl.range's num_stages; 1: no pipelining)

    def __post_init__(self) -> None:
        for name in ("nbytes", "warps", "max_steps", "stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LaunchSetting: {name} must be a positive int, got {value!r}")
        for name in ("nbytes", "warps"):  # tiles of power-of-2 elements; warps per program
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"LaunchSetting: {name} must be a power of 2, got {value}")


# Per kernel, per element size in bytes (2: bf16 and fp16; 4: fp32). Sizes are in bytes so that every dtype compiles to
# the same access widths (16-byte vectors; benchmarks/codegen_audit.py). The reductions' settings are the best of
# benchmarks/gpu_tune.py's sweeps at FPDM-XL/2 size and at B*D = 1e8, on an H100 and an H200 (docs/kernels.md):
# bf16 and fp32 want different tiles and warps, and the history write with the residual fused in gains most
# from software pipelining (stages: its (m, block) tiles go through shared memory by cp.async). max_steps only
# matters at large D: at FPDM-XL/2 size MIN_PROGRAMS already cuts the steps to 4 or fewer.
LAUNCH_SETTINGS: dict[str, dict[int, LaunchSetting]] = {
    # one step per program, no reduction: picard_step, anderson_mix, best_update, broyden_finish
    "stream": {2: LaunchSetting(4096), 4: LaunchSetting(4096)},
    "residual": {2: LaunchSetting(16384), 4: LaunchSetting(4096)},
    "anderson_write": {2: LaunchSetting(32768, warps=8, stages=3), 4: LaunchSetting(32768, warps=8)},
    # the history write with the residual pass fused in (Anderson's iteration)
    "anderson_residual_write": {2: LaunchSetting(32768, warps=8, stages=3), 4: LaunchSetting(65536, stages=2)},
    "broyden_dots": {2: LaunchSetting(4096, warps=8), 4: LaunchSetting(16384)},
    # a row's block: combine walks the n history rows in each step
    "broyden_combine": {2: LaunchSetting(2048, warps=8), 4: LaunchSetting(2048)},
}
# Fused multiply-add contraction on, explicitly, in every launch: what every GPU run measured (triton 3.6's
# default). Triton 3.9 warns when a kernel leaves it unset, and 3.10 turns the default off.
COMPILE_OPTIONS = {"enable_fp_fusion": True}
MIN_PROGRAMS = 1024  # enough programs to keep every SM's memory pipes busy (H100: 132 SMs)
MAX_FEATURES = 2**31 - 2**24  # per sample: offsets within a sample are 32-bit (the margin: a chunk's overrun)


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints, in plain Python: triton.cdiv is a constexpr function, a few us per host
    call, and the launchers made up to 6 calls per launch."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1), in plain Python like _cdiv."""
    return 1 << (n - 1).bit_length()


def launch_setting(kernel: str, itemsize: int) -> LaunchSetting:
    """The launch setting of ``kernel`` (a key of LAUNCH_SETTINGS) for elements of ``itemsize`` bytes (2 or 4)."""
    return LAUNCH_SETTINGS[kernel][itemsize]


def _block(dim: int, itemsize: int, nbytes: int, slots: int = 1) -> int:
    """Elements of D per inner step: ``nbytes`` shared by ``slots`` rows of ``itemsize`` bytes."""
    if dim > MAX_FEATURES:
        raise ValueError(f"triton kernels take at most {MAX_FEATURES} features per sample, got {dim}; use impl='torch'")
    elements = nbytes // (itemsize * slots)
    return min(max(64, elements), _next_pow2(max(dim, 16)))


def _aligned(itemsize: int, *sizes: int) -> tuple[int, list[int]]:
    """(vec, sizes // vec): the most elements per 16-byte vector that divide D and every row stride.

    Triton marks an integer argument as aligned only when it divides by 16, so D = 3125000 (a multiple of 8)
    gave bf16 2-byte loads. The launchers pass sizes // vec and each kernel multiplies back by the constexpr
    VEC: the compiler then knows every row starts on a 16-byte boundary and every mask is constant over a
    vector. Sizes of 2**31 or more keep vec = 1 (the product is computed in the argument's 32-bit type).
    """
    vec = 16 // itemsize
    while vec > 1 and any(size % vec or size >= 2**31 for size in sizes):
        vec //= 2
    return vec, [size // vec for size in sizes]


def _grid(kernel: str, batch: int, dim: int, itemsize: int, slots: int = 1) -> tuple[LaunchSetting, int, int, int]:
    """(setting, block, steps, chunks) of ``kernel``'s reduction over D in ``block``-element steps: long chunks
    (at most the setting's max_steps: fewer partials) unless that starves the GPU."""
    setting = launch_setting(kernel, itemsize)
    block = _block(dim, itemsize, setting.nbytes, slots)
    steps = setting.max_steps
    while steps > 1 and batch * _cdiv(dim, block * steps) < MIN_PROGRAMS:
        steps //= 2
    return setting, block, steps, _cdiv(dim, block * steps)


def _stream_grid(dim: int, itemsize: int) -> tuple[LaunchSetting, int, int]:
    """(setting, block, chunks) of the kernels that make one step per program."""
    setting = launch_setting("stream", itemsize)
    block = _block(dim, itemsize, setting.nbytes)
    return setting, block, _cdiv(dim, block)


def _check(name: str, *tensors: Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the feature dimension must be contiguous (stride 1), got strides {t.stride()}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: triton kernels take fp32, fp16 or bf16, got {t.dtype}")


@triton.jit
def _sample_and_chunk(n_chunks):
    """(sample, chunk) of this program on a 1-D grid of B * n_chunks programs (a grid's second axis stops at
    65535); the sample as int64: offsets such as B * m * D may pass 2**31."""
    pid = tl.program_id(0)  # < 2**31 programs
    return (pid // n_chunks).to(tl.int64), pid % n_chunks


@triton.jit
def _residual_kernel(x_ptr, fx_ptr, g_ptr, out_ptr, D, sx, sf, sg, n_chunks, plane, BLOCK: tl.constexpr,
                     STEPS: tl.constexpr, STAGES: tl.constexpr, WRITE_G: tl.constexpr,
                     VEC: tl.constexpr):  # fmt: skip
    D, sx, sf, sg = D * VEC, sx * VEC, sf * VEC, sg * VEC  # multiples of VEC (see _aligned)
    b, c = _sample_and_chunk(n_chunks)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(STEPS, num_stages=STAGES):
        idx = (c * STEPS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < D
        x = tl.load(x_ptr + b * sx + idx, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(fx_ptr + b * sf + idx, mask=mask, other=0.0).to(tl.float32)
        g = (f - x).to(x_ptr.dtype.element_ty)  # the norm of g as stored (g's dtype is x's)
        if WRITE_G:
            tl.store(g_ptr + b * sg + idx, g, mask=mask)
        gf = g.to(tl.float32)
        acc_g += gf * gf
        acc_f += f * f
    tl.store(out_ptr + b * n_chunks + c, tl.sum(acc_g, axis=0))  # partials (2, B, chunks)
    tl.store(out_ptr + plane + b * n_chunks + c, tl.sum(acc_f, axis=0))


def residual(x: Tensor, fx: Tensor, g_out: Tensor | None) -> tuple[Tensor, Tensor]:
    """Triton twin of reference.residual."""
    _check("residual", x, fx, *([] if g_out is None else [g_out]))
    if g_out is not None and g_out.dtype != x.dtype:
        raise ValueError(f"residual: g_out must have x's dtype {x.dtype}, got {g_out.dtype}")
    batch, dim = x.shape
    setting, block, steps, chunks = _grid("residual", batch, dim, x.element_size())
    partials = torch.empty(2, batch, chunks, dtype=torch.float32, device=x.device)
    g = x if g_out is None else g_out  # never written when None
    vec, sizes = _aligned(x.element_size(), dim, x.stride(0), fx.stride(0), g.stride(0))
    _residual_kernel[(batch * chunks,)](
        x, fx, g, partials, *sizes, chunks, batch * chunks, BLOCK=block, STEPS=steps,
        STAGES=setting.stages, WRITE_G=g_out is not None, VEC=vec, num_warps=setting.warps, **COMPILE_OPTIONS,
    )  # fmt: skip
    gsq, fsq = partials.sum(dim=2)  # contiguous (B,) each
    return gsq, fsq


@triton.jit
def _anderson_write_kernel(F_ptr, G_ptr, fx_ptr, src_ptr, xk_ptr, fk_ptr, out_ptr, D, slot, sFb, sFm, sGb, sGm, sf,
                           ss, sxk, sfk, n_chunks, B, width, M: tl.constexpr, MP: tl.constexpr, BLOCK: tl.constexpr,
                           STEPS: tl.constexpr, STAGES: tl.constexpr, STORE_G: tl.constexpr,
                           FROM_X: tl.constexpr, DIFF: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    # Each step loads the whole (m, BLOCK) history tile at once (many bytes in flight) and g once.
    # src is g; with FROM_X it is x: g = f(x) - x is formed here (the residual pass fused in), stored in
    # the slot, and ||g||^2, ||f(x)||^2 are summed too. Partials (chunks, width): per chunk, every sample's
    # Gram row (B * M), then with FROM_X every sample's ||g||^2 (B) and ||f(x)||^2 (B); one torch sum over
    # chunks gives all three, contiguous.
    # DIFF (with FROM_X; a low-precision history in difference form): the slot gets g - g_kept and
    # f(x) - f_kept (the kept pair xk, fk), the Gram row is that of the stored difference, and each
    # sample's projections G g follow its Gram row ((B, 2, M) in all).
    D, sFb, sFm, sGb, sGm, sf, ss = D * VEC, sFb * VEC, sFm * VEC, sGb * VEC, sGm * VEC, sf * VEC, ss * VEC
    sxk, sfk = sxk * VEC, sfk * VEC
    b, c = _sample_and_chunk(n_chunks)
    j = tl.arange(0, MP)[:, None].to(tl.int64)  # (MP, 1) history slots (64-bit: m * D may pass 2**31)
    acc = tl.zeros([MP, BLOCK], dtype=tl.float32)
    acc_p = tl.zeros([MP, BLOCK], dtype=tl.float32)  # DIFF: G g
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(STEPS, num_stages=STAGES):
        idx = (c * STEPS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < D
        src = tl.load(src_ptr + b * ss + idx, mask=mask, other=0.0)
        f = tl.load(fx_ptr + b * sf + idx, mask=mask, other=0.0)
        if DIFF:  # x, f(x) and the kept pair in fp32 (x's dtype): g unrounded
            g = f.to(tl.float32) - src.to(tl.float32)
            fk = tl.load(fk_ptr + b * sfk + idx, mask=mask, other=0.0).to(tl.float32)
            gk = fk - tl.load(xk_ptr + b * sxk + idx, mask=mask, other=0.0).to(tl.float32)
            stored = (g - gk).to(G_ptr.dtype.element_ty)
            f_stored = (f.to(tl.float32) - fk).to(F_ptr.dtype.element_ty)
            acc_g += g * g
            acc_f += f.to(tl.float32) * f.to(tl.float32)
            dg = stored.to(tl.float32)
        elif FROM_X:
            stored = (f.to(tl.float32) - src.to(tl.float32)).to(G_ptr.dtype.element_ty)
            f_stored = f.to(F_ptr.dtype.element_ty)
            g = stored.to(tl.float32)
            acc_g += g * g
            acc_f += f.to(tl.float32) * f.to(tl.float32)
            dg = g
        else:
            stored = src.to(G_ptr.dtype.element_ty)
            f_stored = f.to(F_ptr.dtype.element_ty)
            g = src.to(tl.float32)
            dg = g
        tl.store(F_ptr + b * sFb + tl.cast(slot, tl.int64) * sFm + idx, f_stored, mask=mask)
        if STORE_G:  # else g is that slot already
            tl.store(G_ptr + b * sGb + tl.cast(slot, tl.int64) * sGm + idx, stored, mask=mask)
        others = (j < M) & (j != slot) & mask[None, :]  # the new slot is not read back: its entry is g . g
        h = tl.load(G_ptr + b * sGb + j * sGm + idx[None, :], mask=others, other=0.0).to(tl.float32)
        h = tl.where(j == slot, stored.to(tl.float32)[None, :], h)
        acc += h * dg[None, :]
        if DIFF:
            acc_p += h * g[None, :]
    row = tl.arange(0, MP)
    out = out_ptr + tl.cast(c, tl.int64) * width  # this chunk's partials (64-bit: chunks * width may pass 2**31)
    if DIFF:  # (B, 2, M): each sample's Gram row, then its projections
        tl.store(out + b * 2 * M + row, tl.sum(acc, axis=1), mask=row < M)
        tl.store(out + b * 2 * M + M + row, tl.sum(acc_p, axis=1), mask=row < M)
        rows = 2 * B * M
    else:
        tl.store(out + b * M + row, tl.sum(acc, axis=1), mask=row < M)
        rows = B * M
    if FROM_X:
        tl.store(out + rows + b, tl.sum(acc_g, axis=0))
        tl.store(out + rows + B + b, tl.sum(acc_f, axis=0))


def _launch_anderson_write(
    F: Tensor, G: Tensor, slot: int, fx: Tensor, src: Tensor, from_x: bool, kept: Pair | None = None
) -> Tensor:
    """The history write's launch: its partials summed over chunks, (B * m [+ B * m] [+ 2B],): every sample's
    Gram row, with ``kept`` (the difference form) every sample's projections, then with ``from_x`` every sample's
    ||g||^2 and ||f(x)||^2 (one torch launch for all of them)."""
    batch, m, dim = F.shape
    mp = _next_pow2(m)
    kernel = "anderson_residual_write" if from_x else "anderson_write"
    setting, block, steps, chunks = _grid(kernel, batch, dim, F.element_size(), mp)
    width = batch * ((2 if kept is not None else 1) * m + (2 if from_x else 0))
    partials = torch.empty(chunks, width, dtype=torch.float32, device=F.device)
    xk, fk = kept if kept is not None else (src, fx)  # never read without kept
    sizes = (dim, *F.stride()[:2], *G.stride()[:2], fx.stride(0), src.stride(0), xk.stride(0), fk.stride(0))
    vec, (D, *strides) = _aligned(F.element_size(), *sizes)
    _anderson_write_kernel[(batch * chunks,)](
        F, G, fx, src, xk, fk, partials, D, slot, *strides, chunks, batch, width, M=m, MP=mp, BLOCK=block,
        STEPS=steps, STAGES=setting.stages, STORE_G=from_x or not reference.is_slot(G, slot, src), FROM_X=from_x,
        DIFF=kept is not None, VEC=vec, num_warps=setting.warps, **COMPILE_OPTIONS,
    )  # fmt: skip
    return partials.sum(dim=0)


def anderson_write(state: AndersonState, fx: Tensor, g: Tensor) -> Tensor:
    """Triton twin of reference.anderson_write."""
    F, G = state.F, state.G
    _check("anderson_write", F, G, fx, g)
    return _launch_anderson_write(F, G, state.slot, fx, g, from_x=False).view(F.shape[0], F.shape[1])


def anderson_residual_write(state: AndersonState, x: Tensor, fx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Triton twin of reference.anderson_residual_write."""
    F, G = state.F, state.G
    _check("anderson_residual_write", F, G, x, fx)
    batch, m, _ = F.shape
    if state.relative:
        _check("anderson_residual_write", state.x_kept, state.f_kept)
        sums = _launch_anderson_write(F, G, state.slot, fx, x, from_x=True, kept=Pair(state.x_kept, state.f_kept))
        rows = 2 * batch * m
        return sums[rows : rows + batch], sums[rows + batch :], sums[:rows].view(batch, 2, m)
    if G.dtype != x.dtype:
        raise ValueError(f"anderson_residual_write: G must have x's dtype {x.dtype}, got {G.dtype}")
    sums = _launch_anderson_write(F, G, state.slot, fx, x, from_x=True)
    return sums[batch * m : batch * (m + 1)], sums[batch * (m + 1) :], sums[: batch * m].view(batch, m)


@triton.jit
def _anderson_mix_kernel(F_ptr, G_ptr, a_ptr, frozen_ptr, active_ptr, xk_ptr, fk_ptr, xn_ptr, fn_ptr, took_ptr,
                         out_ptr, D, beta_m1, sFb, sFm, sGb, sGm, sfz, so, sk, sn, n_chunks, M: tl.constexpr,
                         BLOCK: tl.constexpr, USE_G: tl.constexpr, ALL_ACTIVE: tl.constexpr, DIFF: tl.constexpr,
                         VEC: tl.constexpr):  # fmt: skip
    # DIFF (difference form): the kept pair (xk, fk) first takes the last evaluated one (xn, fn) where ``took``,
    # and the sums start from f_kept + (beta - 1) g_kept. The kept pair's rows and the new pair's: strides sk, sn.
    D, sFb, sFm, sGb, sGm, sfz, so = D * VEC, sFb * VEC, sFm * VEC, sGb * VEC, sGm * VEC, sfz * VEC, so * VEC
    sk, sn = sk * VEC, sn * VEC
    b, c = _sample_and_chunk(n_chunks)
    idx = c * BLOCK + tl.arange(0, BLOCK)
    mask = idx < D
    active = 1
    if not ALL_ACTIVE:  # else frozen and active are never read
        active = tl.load(active_ptr + b)
    if active != 0:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        if DIFF:
            if tl.load(took_ptr + b) != 0:  # the new pair is the kept one from now on
                xk = tl.load(xn_ptr + b * sn + idx, mask=mask, other=0.0)
                fk = tl.load(fn_ptr + b * sn + idx, mask=mask, other=0.0)
                tl.store(xk_ptr + b * sk + idx, xk, mask=mask)
                tl.store(fk_ptr + b * sk + idx, fk, mask=mask)
            else:
                xk = tl.load(xk_ptr + b * sk + idx, mask=mask, other=0.0)
                fk = tl.load(fk_ptr + b * sk + idx, mask=mask, other=0.0)
            fk32 = fk.to(tl.float32)
            acc = fk32 + beta_m1 * (fk32 - xk.to(tl.float32))
        for j in tl.static_range(M):
            a = tl.load(a_ptr + b * M + j)
            acc += a * tl.load(F_ptr + b * sFb + tl.cast(j, tl.int64) * sFm + idx, mask=mask, other=0.0).to(tl.float32)
            if USE_G:
                gj = tl.load(G_ptr + b * sGb + tl.cast(j, tl.int64) * sGm + idx, mask=mask, other=0.0).to(tl.float32)
                acc += (beta_m1 * a) * gj
        tl.store(out_ptr + b * so + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # a stopped sample keeps its iterate
        tl.store(out_ptr + b * so + idx, tl.load(frozen_ptr + b * sfz + idx, mask=mask, other=0.0), mask=mask)


def anderson_mix(state: AndersonState, beta: float, frozen: Tensor | None, active: Tensor | None) -> Tensor:
    """Triton twin of reference.anderson_mix."""
    F, G, alpha = state.F, state.G, state.alpha
    batch, m, dim = F.shape
    xk, fk, xn, fn = (state.x_kept, state.f_kept, state.x_new, state.f_new) if state.relative else (F[:, 0],) * 4
    took = state.took.view(torch.int8) if state.relative else alpha  # never read unless relative
    frozen, active8, all_active = _frozen_and_active(frozen, active, xk if state.relative else F[:, 0])
    _check("anderson_mix", F, G, frozen, xk, fk, xn, fn)
    if state.relative and (xk.stride(0) != fk.stride(0) or xn.stride(0) != fn.stride(0)):
        raise ValueError("anderson_mix: the kept pair's rows (and the new pair's) must have one stride")
    out = torch.empty(batch, dim, dtype=xk.dtype if state.relative else F.dtype, device=F.device)
    setting, block, chunks = _stream_grid(dim, F.element_size())
    alpha32 = alpha.to(torch.float32).contiguous()
    sizes = (dim, *F.stride()[:2], *G.stride()[:2], frozen.stride(0), dim, xk.stride(0), xn.stride(0))
    vec, (D, *strides) = _aligned(F.element_size(), *sizes)
    _anderson_mix_kernel[(batch * chunks,)](
        F, G, alpha32, frozen, active8, xk, fk, xn, fn, took, out, D, float(beta - 1.0), *strides, chunks, M=m,
        BLOCK=block, USE_G=beta != 1.0, ALL_ACTIVE=all_active, DIFF=state.relative, VEC=vec,
        num_warps=setting.warps, **COMPILE_OPTIONS,
    )  # fmt: skip
    return out


def _frozen_and_active(frozen: Tensor | None, active: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(frozen, active as int8, every sample active?) for a freezing kernel. With every sample active (frozen
    None) ``like`` stands in for both (the kernel reads neither): nothing is allocated or launched."""
    if frozen is None:
        return like, like, True
    active8 = active.view(torch.int8) if active.dtype == torch.bool else active.to(torch.int8)  # a bool is a byte
    return frozen, active8.contiguous(), False


@triton.jit
def _picard_step_kernel(x_ptr, fx_ptr, frozen_ptr, active_ptr, out_ptr, D, beta, sx, sf, sfz, so, n_chunks,
                        BLOCK: tl.constexpr, DAMPED: tl.constexpr, ALL_ACTIVE: tl.constexpr,
                        VEC: tl.constexpr):  # fmt: skip
    D, sx, sf, sfz, so = D * VEC, sx * VEC, sf * VEC, sfz * VEC, so * VEC
    b, c = _sample_and_chunk(n_chunks)
    idx = c * BLOCK + tl.arange(0, BLOCK)
    mask = idx < D
    active = 1
    if not ALL_ACTIVE:  # else frozen and active are never read
        active = tl.load(active_ptr + b)
    if active != 0:
        if DAMPED:
            x = tl.load(x_ptr + b * sx + idx, mask=mask, other=0.0).to(tl.float32)
            f = tl.load(fx_ptr + b * sf + idx, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + b * so + idx, (x + beta * (f - x)).to(out_ptr.dtype.element_ty), mask=mask)
        else:  # x <- f(x): a copy (x is not read)
            tl.store(out_ptr + b * so + idx, tl.load(fx_ptr + b * sf + idx, mask=mask, other=0.0), mask=mask)
    else:  # a stopped sample keeps its iterate
        tl.store(out_ptr + b * so + idx, tl.load(frozen_ptr + b * sfz + idx, mask=mask, other=0.0), mask=mask)


def picard_step(x: Tensor, fx: Tensor, beta: float, frozen: Tensor | None, active: Tensor | None) -> Tensor:
    """Triton twin of reference.picard_step."""
    if beta == 1.0 and frozen is None:  # x <- f(x) for every sample: nothing to launch
        return fx
    frozen, active8, all_active = _frozen_and_active(frozen, active, x)
    _check("picard_step", x, fx, frozen)
    batch, dim = x.shape
    out = torch.empty(batch, dim, dtype=x.dtype, device=x.device)
    setting, block, chunks = _stream_grid(dim, x.element_size())
    vec, (D, *strides) = _aligned(x.element_size(), dim, x.stride(0), fx.stride(0), frozen.stride(0), dim)
    _picard_step_kernel[(batch * chunks,)](
        x, fx, frozen, active8, out, D, float(beta), *strides, chunks, BLOCK=block, DAMPED=beta != 1.0,
        ALL_ACTIVE=all_active, VEC=vec, num_warps=setting.warps, **COMPILE_OPTIONS,
    )  # fmt: skip
    return out


@triton.jit
def _broyden_dots_kernel(U_ptr, V_ptr, g_ptr, dx_ptr, out_ptr, D, n, sUb, sUm, sVb, sVm, sg, sdx, n_chunks,
                         MP: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr, STAGES: tl.constexpr,
                         VEC: tl.constexpr):  # fmt: skip
    # (MP, BLOCK) tiles of U and V per step; slots >= n are masked (never read).
    D, sUb, sUm, sVb, sVm, sg, sdx = D * VEC, sUb * VEC, sUm * VEC, sVb * VEC, sVm * VEC, sg * VEC, sdx * VEC
    b, c = _sample_and_chunk(n_chunks)
    j = tl.arange(0, MP)[:, None].to(tl.int64)  # 64-bit: m * D may pass 2**31
    acc_v = tl.zeros([MP, BLOCK], dtype=tl.float32)
    acc_u = tl.zeros([MP, BLOCK], dtype=tl.float32)
    for i in tl.range(STEPS, num_stages=STAGES):
        idx = (c * STEPS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < D
        used = (j < n) & mask[None, :]
        g = tl.load(g_ptr + b * sg + idx, mask=mask, other=0.0).to(tl.float32)
        dx = tl.load(dx_ptr + b * sdx + idx, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V_ptr + b * sVb + j * sVm + idx[None, :], mask=used, other=0.0).to(tl.float32)
        u = tl.load(U_ptr + b * sUb + j * sUm + idx[None, :], mask=used, other=0.0).to(tl.float32)
        acc_v += v * g[None, :]
        acc_u += u * dx[None, :]
    row = tl.arange(0, MP)
    out = out_ptr + (b * n_chunks + c) * 2 * n
    tl.store(out + row, tl.sum(acc_v, axis=1), mask=row < n)
    tl.store(out + n + row, tl.sum(acc_u, axis=1), mask=row < n)


def broyden_dots(state: BroydenState, new: BroydenStep) -> Tensor:
    """Triton twin of reference.broyden_dots."""
    U, V, n, g, dx = state.U, state.V, state.count, new.g, new.dx
    _check("broyden_dots", U, V, g, dx)
    batch, m, dim = U.shape
    mp = _next_pow2(m)
    setting, block, steps, chunks = _grid("broyden_dots", batch, dim, U.element_size(), mp)
    partials = torch.empty(batch, chunks, 2, n, dtype=torch.float32, device=U.device)
    if n:
        sizes = (dim, *U.stride()[:2], *V.stride()[:2], g.stride(0), dx.stride(0))
        vec, (D, *strides) = _aligned(U.element_size(), *sizes)
        _broyden_dots_kernel[(batch * chunks,)](
            U, V, g, dx, partials, D, n, *strides, chunks, MP=mp, BLOCK=block, STEPS=steps,
            STAGES=setting.stages, VEC=vec, num_warps=setting.warps, **COMPILE_OPTIONS,
        )  # fmt: skip
    return partials.sum(dim=1)


@triton.jit
def _broyden_combine_kernel(U_ptr, V_ptr, c_ptr, alive_ptr, g_ptr, dx_ptr, hg_ptr, hgo_ptr, v_ptr, out_ptr, D, n,
                            s_alive, sUb, sUm, sVb, sVm, sg, sdx, shg, shgo, sv, n_chunks,
                            BLOCK: tl.constexpr, STEPS: tl.constexpr, STAGES: tl.constexpr, NORMS: tl.constexpr,
                            VEC: tl.constexpr):  # fmt: skip
    # NORMS (a narrower history): 6 sums per sample, also ||v||^2 and ||dx - (h_g - hg)||^2 (reference.balance)
    D, sUb, sUm, sVb, sVm = D * VEC, sUb * VEC, sUm * VEC, sVb * VEC, sVm * VEC
    sg, sdx, shg, shgo, sv = sg * VEC, sdx * VEC, shg * VEC, shgo * VEC, sv * VEC
    b, c = _sample_and_chunk(n_chunks)
    acc = tl.zeros([BLOCK], dtype=tl.float32)  # dx . (h_g - hg)
    acc_dx = tl.zeros([BLOCK], dtype=tl.float32)
    acc_h = tl.zeros([BLOCK], dtype=tl.float32)
    acc_vg = tl.zeros([BLOCK], dtype=tl.float32)
    acc_vv = tl.zeros([BLOCK], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.range(STEPS, num_stages=STAGES):
        idx = (c * STEPS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < D
        g = tl.load(g_ptr + b * sg + idx, mask=mask, other=0.0).to(tl.float32)
        dx = tl.load(dx_ptr + b * sdx + idx, mask=mask, other=0.0).to(tl.float32)
        h = -g
        v = -dx
        for j in range(n):
            term = tl.load(alive_ptr + b * s_alive + j).to(tl.float32)  # 0 for a term no longer in H
            h += (
                tl.load(c_ptr + (b * 2) * n + j)
                * term
                * tl.load(U_ptr + b * sUb + tl.cast(j, tl.int64) * sUm + idx, mask=mask, other=0.0).to(tl.float32)
            )
            v += (
                tl.load(c_ptr + (b * 2 + 1) * n + j)
                * term
                * tl.load(V_ptr + b * sVb + tl.cast(j, tl.int64) * sVm + idx, mask=mask, other=0.0).to(tl.float32)
            )
        h = h.to(hg_ptr.dtype.element_ty)
        v = v.to(v_ptr.dtype.element_ty)
        tl.store(hg_ptr + b * shg + idx, h, mask=mask)
        tl.store(v_ptr + b * sv + idx, v, mask=mask)
        h_dg = h.to(tl.float32) - tl.load(hgo_ptr + b * shgo + idx, mask=mask, other=0.0).to(tl.float32)
        acc += dx * h_dg
        acc_dx += dx * dx
        acc_h += h_dg * h_dg
        acc_vg += v.to(tl.float32) * g
        if NORMS:
            acc_vv += v.to(tl.float32) * v.to(tl.float32)
            acc_r += (dx - h_dg) * (dx - h_dg)
    out = out_ptr + (b * n_chunks + c) * (6 if NORMS else 4)
    tl.store(out, tl.sum(acc, axis=0))
    tl.store(out + 1, tl.sum(acc_dx, axis=0))
    tl.store(out + 2, tl.sum(acc_h, axis=0))
    tl.store(out + 3, tl.sum(acc_vg, axis=0))
    if NORMS:
        tl.store(out + 4, tl.sum(acc_vv, axis=0))
        tl.store(out + 5, tl.sum(acc_r, axis=0))


def broyden_combine(state: BroydenState, new: BroydenStep, coeff: Tensor) -> BroydenApplies:
    """Triton twin of reference.broyden_combine."""
    U, V, n, alive, hg, g, dx = state.U, state.V, state.count, state.alive, state.hg, new.g, new.dx
    _check("broyden_combine", U, V, g, dx, hg)
    batch, _, dim = U.shape
    setting, block, steps, chunks = _grid("broyden_combine", batch, dim, U.element_size())
    h_g, v = torch.empty_like(g), torch.empty_like(g)
    norms = U.dtype != g.dtype  # a narrower history: the norms of its balanced terms too
    partials = torch.empty(batch, chunks, 6 if norms else 4, dtype=torch.float32, device=U.device)
    coeff32 = coeff.to(torch.float32).contiguous()
    sizes = (dim, *U.stride()[:2], *V.stride()[:2], *(t.stride(0) for t in (g, dx, h_g, hg, v)))
    vec, (D, *strides) = _aligned(U.element_size(), *sizes)
    if alive.stride(1) != 1:
        raise ValueError(f"broyden_combine: alive's rows must be contiguous, got strides {alive.stride()}")
    _broyden_combine_kernel[(batch * chunks,)](
        U, V, coeff32, alive.view(torch.int8), g, dx, h_g, hg, v, partials, D, n, alive.stride(0), *strides, chunks,
        BLOCK=block, STEPS=steps,
        STAGES=setting.stages, NORMS=norms, VEC=vec, num_warps=setting.warps, **COMPILE_OPTIONS,
    )  # fmt: skip
    return BroydenApplies(h_g, v, partials.sum(dim=1))


@triton.jit
def _bookkeep_kernel(gsq_ptr, fsq_ptr, g0_ptr, status_ptr, active_ptr, best_ptr, pending_ptr, nsteps_ptr, trace_ptr,
                     done_ptr, gnorm_ptr, new_active_ptr, take_ptr, counts_ptr, B, row, max_iter, tol, divergence,
                     rel_floor, RELATIVE: tl.constexpr, USE_DONE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # One program walks the batch: B is small, and the counts come out without atomics.
    if USE_DONE:
        done = tl.load(done_ptr)
        row = tl.minimum(done, max_iter)
    n_active = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    n_copies = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    for start in range(0, B, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < B
        gnorm = tl.sqrt_rn(tl.load(gsq_ptr + idx, mask=mask, other=0.0))  # IEEE-rounded, as torch
        fnorm = tl.sqrt_rn(tl.load(fsq_ptr + idx, mask=mask, other=0.0))
        g0 = tl.load(g0_ptr + idx, mask=mask, other=1.0)  # masked lanes: no inf * 0 with divergence = inf
        if RELATIVE:
            floor = rel_floor * g0
            scale = tl.where(floor > fnorm, floor, fnorm)  # reference.REL_FLOOR: NaN-safe, as the twin
            res = tl.div_rn(gnorm, tl.maximum(scale, 1.1754943508222875e-38))
        else:
            res = gnorm
        total = gnorm + fnorm
        finite = (total == total) & (total < float("inf"))  # not NaN, not +inf (norms are >= 0)
        now = tl.where(gnorm > divergence * g0, 2, 1)
        now = tl.where(finite, tl.where(res <= tol, 0, now), 3)
        active = tl.load(active_ptr + idx, mask=mask, other=0) != 0
        best = tl.load(best_ptr + idx, mask=mask, other=0.0)
        improved = active & finite & ((res >= best) == 0)  # also true where best is NaN
        status = tl.where(active, now.to(tl.int64), tl.load(status_ptr + idx, mask=mask, other=0))
        tl.store(status_ptr + idx, status, mask=mask)
        tl.store(best_ptr + idx, tl.where(improved, res, best), mask=mask)
        tl.store(nsteps_ptr + idx, tl.load(nsteps_ptr + idx, mask=mask, other=0) + active.to(tl.int64), mask=mask)
        tl.store(trace_ptr + row * B + idx, tl.where(active, res, float("nan")), mask=mask)
        new_active = status == 1
        if USE_DONE:
            new_active = new_active & (done + 1 < max_iter)
        tl.store(gnorm_ptr + idx, gnorm, mask=mask)
        tl.store(new_active_ptr + idx, new_active.to(tl.uint8), mask=mask)
        pending = tl.load(pending_ptr + idx, mask=mask, other=0) != 0
        take = tl.where(improved & (new_active == 0), 1, tl.where(pending & (improved == 0), 2, 0))
        tl.store(take_ptr + idx, take.to(tl.int8), mask=mask)  # reference.TAKE_NEW, TAKE_PREV, KEEP
        tl.store(pending_ptr + idx, (improved & new_active).to(tl.uint8), mask=mask)
        n_active += tl.sum((new_active & mask).to(tl.int32), axis=0)
        n_copies += tl.sum(((take != 0) & mask).to(tl.int32), axis=0)
    tl.store(counts_ptr, n_active.to(tl.int64))
    tl.store(counts_ptr + 1, n_copies.to(tl.int64))
    if USE_DONE:
        tl.store(done_ptr, done + 1)


def bookkeep(
    gsq: Tensor, fsq: Tensor, active: Tensor, loop: LoopBuffers, rule: StopRule, row: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton twin of reference.bookkeep (fp32 statistics, contiguous (B,) vectors and trace rows)."""
    gnorm0, status, best_res, pending, nsteps, trace, done = (
        loop.gnorm0, loop.status, loop.best_res, loop.pending, loop.nsteps, loop.trace, loop.done
    )
    batch = gsq.shape[0]
    for name, t in {"gsq": gsq, "fsq": fsq, "gnorm0": gnorm0, "best_res": best_res, "trace": trace}.items():
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"bookkeep: {name} must be contiguous fp32, got {t.dtype} with strides {t.stride()}")
    gnorm = torch.empty_like(gsq)
    new_active = torch.empty(batch, dtype=torch.bool, device=gsq.device)
    take = torch.empty(batch, dtype=torch.int8, device=gsq.device)
    counts = torch.empty(2, dtype=torch.int64, device=gsq.device)
    block = min(1024, _next_pow2(max(batch, 16)))
    _bookkeep_kernel[(1,)](
        gsq, fsq, gnorm0, status, active.view(torch.uint8), best_res, pending.view(torch.uint8), nsteps, trace, done,
        gnorm, new_active.view(torch.uint8), take, counts, batch, 0 if row is None else row, rule.max_iter,
        float(rule.tol), float(rule.divergence), reference.REL_FLOOR, RELATIVE=bool(rule.relative),
        USE_DONE=row is None, BLOCK=block, **COMPILE_OPTIONS,
    )  # fmt: skip
    return gnorm, new_active, take, counts


@triton.jit
def _best_update_kernel(bx_ptr, bf_ptr, x_ptr, fx_ptr, px_ptr, pf_ptr, take_ptr, D, sbx, sbf, sx, sf, spx, spf,
                        n_chunks, BLOCK: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    D, sbx, sbf, sx, sf, spx, spf = D * VEC, sbx * VEC, sbf * VEC, sx * VEC, sf * VEC, spx * VEC, spf * VEC
    b, c = _sample_and_chunk(n_chunks)
    take = tl.load(take_ptr + b)
    idx = c * BLOCK + tl.arange(0, BLOCK)
    mask = idx < D
    if take == 1:  # the new pair (other samples: nothing read, nothing written)
        tl.store(bx_ptr + b * sbx + idx, tl.load(x_ptr + b * sx + idx, mask=mask), mask=mask)
        tl.store(bf_ptr + b * sbf + idx, tl.load(fx_ptr + b * sf + idx, mask=mask), mask=mask)
    elif take == 2:  # the previous pair
        tl.store(bx_ptr + b * sbx + idx, tl.load(px_ptr + b * spx + idx, mask=mask), mask=mask)
        tl.store(bf_ptr + b * sbf + idx, tl.load(pf_ptr + b * spf + idx, mask=mask), mask=mask)


def best_update(loop: LoopBuffers, new: Pair, prev: Pair, take: Tensor) -> None:
    """Triton twin of reference.best_update."""
    pairs = (loop.best_x, loop.best_fx, *new, *prev)
    _check("best_update", *pairs)
    x = new.x
    batch, dim = x.shape
    setting, block, chunks = _stream_grid(dim, x.element_size())
    vec, (D, *strides) = _aligned(x.element_size(), dim, *(t.stride(0) for t in pairs))
    _best_update_kernel[(batch * chunks,)](
        *pairs, take, D, *strides, chunks, BLOCK=block, VEC=vec, num_warps=setting.warps, **COMPILE_OPTIONS,
    )  # fmt: skip


@triton.jit
def _mixing_weights(gram, valid, newest, proj, ridge, max_coeff, M: tl.constexpr, MP: tl.constexpr,
                    DIFF: tl.constexpr):  # fmt: skip
    """One sample's Anderson weights from its (MP, MP) fp32 Gram tile: scale to unit diagonal, add the ridge,
    solve by elimination in fp64 registers (SPD: no pivoting), normalise. Returns (alpha, ill): a sample whose
    weights are not finite or too large is ill and gets alpha = newest (pass none with DIFF).
    DIFF (difference form): the right-hand side is the projections ``proj`` (MP,), and the weights are
    -gamma, not normalised, their size 1 + 2 ||gamma||_1 (reference.anderson_coefficients)."""
    i = tl.arange(0, MP)
    rows, cols = i[:, None], i[None, :]
    gram = gram.to(tl.float64)
    diag = tl.sum(tl.where(rows == cols, gram, 0.0), axis=1)
    scale = tl.where(valid, 1.0 / tl.sqrt(tl.maximum(diag, 1e-300)), 0.0)
    a = scale[:, None] * gram * scale[None, :]
    a = tl.where(rows == cols, a + tl.where(valid, ridge, 1.0)[:, None], a)  # unused (and padded) slots: 1
    rhs = scale * proj.to(tl.float64) if DIFF else scale
    for k in tl.static_range(M - 1):  # forward elimination
        pivot_row = tl.sum(tl.where(rows == k, a, 0.0), axis=0)  # (MP,) over columns
        pivot = tl.sum(tl.where(i == k, pivot_row, 0.0), axis=0)
        factor = tl.where(i > k, tl.sum(tl.where(cols == k, a, 0.0), axis=1) / pivot, 0.0)  # (MP,) over rows
        a -= factor[:, None] * pivot_row[None, :]
        rhs -= factor * tl.sum(tl.where(i == k, rhs, 0.0), axis=0)
    y = tl.zeros([MP], dtype=tl.float64)
    for kk in tl.static_range(M):  # back substitution
        k = M - 1 - kk
        row = tl.sum(tl.where(rows == k, a, 0.0), axis=0)
        akk = tl.sum(tl.where(i == k, row, 0.0), axis=0)
        rest = tl.sum(tl.where(i > k, row * y, 0.0), axis=0)
        y = tl.where(i == k, (tl.sum(tl.where(i == k, rhs, 0.0), axis=0) - rest) / akk, y)
    w = scale * y
    if DIFF:
        alpha = (-w).to(tl.float32)
        size = 1 + 2 * tl.sum(tl.abs(alpha), axis=0)
    else:
        alpha = (w / tl.sum(w, axis=0)).to(tl.float32)
        size = tl.sum(tl.abs(alpha), axis=0)
    ill = (size != size) | (size > max_coeff)  # NaN (inf - inf, 0 / 0) or too large; +inf > max_coeff
    return tl.where(ill, tl.where(newest, 1.0, 0.0), alpha), ill


@triton.jit
def _anderson_absorb_kernel(gram_ptr, row_ptr, valid_ptr, newest_ptr, kept_ptr, gnorm_ptr, restarts_ptr, alpha_ptr,
                            took_ptr, slot, growth, ridge, max_coeff, M: tl.constexpr, MP: tl.constexpr,
                            USE_GROWTH: tl.constexpr, DIFF: tl.constexpr):  # fmt: skip
    # One program per sample: the new pair's Gram row and column, the history's validity, the newest slot and
    # the blow-up restart; then the next mixing weights from the updated Gram matrix, still in registers.
    # DIFF (difference form): rows (B, 2, M), the Gram row then the projections; a restart keeps no slot
    # (the newest pair is the kept one, outside the history), and ``took`` says whether the new pair is kept.
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B * m * D may pass 2**31
    i = tl.arange(0, MP)
    rows, cols = i[:, None], i[None, :]
    inside = i < M
    kept = tl.load(kept_ptr + b)
    gnorm = tl.load(gnorm_ptr + b)
    blown = ((gnorm <= growth * kept) == 0) if USE_GROWTH else gnorm < 0.0  # else never (NaN < 0 is False)
    valid = tl.load(valid_ptr + b * M + i, mask=inside, other=0) != 0
    newest = tl.load(newest_ptr + b * M + i, mask=inside, other=0) != 0
    none = i < 0  # DIFF: no slot survives a restart (the newest pair is the kept one, outside the history)
    if DIFF:
        row = tl.load(row_ptr + b * 2 * M + i, mask=inside, other=0.0)
        proj = tl.load(row_ptr + b * 2 * M + M + i, mask=inside, other=0.0)
        tl.store(took_ptr + b, (blown == 0).to(tl.int8))
    else:
        row = tl.load(row_ptr + b * M + i, mask=inside, other=0.0)
        proj = row  # not read
    valid = valid & ((blown == 0) | (none if DIFF else newest))
    gram = tl.load(gram_ptr + b * M * M + rows * M + cols, mask=(rows < M) & (cols < M), other=0.0)
    gram = tl.where(rows == slot, row[None, :], gram)
    gram = tl.where(cols == slot, row[:, None], gram)
    tl.store(gram_ptr + b * M * M + slot * M + i, row, mask=inside)
    tl.store(gram_ptr + b * M * M + i * M + slot, row, mask=inside)
    valid = tl.where(i == slot, blown == 0, valid)
    newest = tl.where(blown, newest, i == slot)
    keep = none if DIFF else newest
    alpha, ill = _mixing_weights(gram, valid, keep, proj, ridge, max_coeff, M, MP, DIFF)
    tl.store(alpha_ptr + b * M + i, alpha, mask=inside)
    tl.store(valid_ptr + b * M + i, (valid & ((ill == 0) | keep)).to(tl.int8), mask=inside)
    tl.store(newest_ptr + b * M + i, newest.to(tl.int8), mask=inside)
    tl.store(kept_ptr + b, tl.where(blown, kept, gnorm))
    tl.store(restarts_ptr + b, tl.load(restarts_ptr + b) + blown.to(tl.int64) + ill.to(tl.int64))


def anderson_absorb(
    state: AndersonState, gnorm: Tensor, *, growth: float | None, ridge: float, max_coeff: float, graph_safe: bool
) -> Tensor:
    """Triton twin of reference.anderson_absorb (fp32 Gram matrix and norms, contiguous buffers; always graph
    safe): one launch for the history's bookkeeping and the next mixing weights."""
    gram, row, valid, newest, kept_gnorm, restarts = (
        state.gram, state.row, state.valid, state.newest, state.kept_gnorm, state.restarts
    )
    batch, m, _ = gram.shape
    for name, t in {"gram": gram, "row": row, "kept_gnorm": kept_gnorm, "gnorm": gnorm}.items():
        if t.dtype != torch.float32:
            raise ValueError(f"anderson_absorb: {name} must be fp32, got {t.dtype}")
    for name, t in {"gram": gram, "row": row, "valid": valid, "newest": newest, "restarts": restarts}.items():
        if not t.is_contiguous():
            raise ValueError(f"anderson_absorb: {name} must be contiguous, got strides {t.stride()}")
    alpha = torch.empty(batch, m, dtype=torch.float32, device=gram.device)
    took = state.took.view(torch.int8) if state.relative else valid.view(torch.int8)  # never written unless relative
    _anderson_absorb_kernel[(batch,)](
        gram, row, valid.view(torch.int8), newest.view(torch.int8), kept_gnorm, gnorm, restarts, alpha, took,
        state.slot, float(growth if growth is not None else 0.0), float(ridge), float(max_coeff), M=m,
        MP=_next_pow2(max(m, 2)), USE_GROWTH=growth is not None, DIFF=state.relative, **COMPILE_OPTIONS,
    )  # fmt: skip
    return alpha


@triton.jit
def _broyden_finish_kernel(U_ptr, V_ptr, x_ptr, xo_ptr, g_ptr, go_ptr, dx_ptr, hg_ptr, v_ptr, hgo_ptr, sums_ptr,
                           gn_ptr, gno_ptr, alive_ptr, restarts_ptr, x_out, g_out, gn_out, hg_out, step_out, D, slot,
                           growth, s_sums,
                           sUb, sUm, sVb, sVm, n_chunks, M: tl.constexpr, MP: tl.constexpr,
                           BLOCK: tl.constexpr, BALANCE: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    # BALANCE (a history narrower than the iterate): the term is stored as (s u, v / s), reference.balance
    D, sUb, sUm, sVb, sVm = D * VEC, sUb * VEC, sUm * VEC, sVb * VEC, sVm * VEC  # the vectors: contiguous rows of D
    b, c = _sample_and_chunk(n_chunks)
    denom = tl.load(sums_ptr + b * s_sums)
    dx_sq = tl.load(sums_ptr + b * s_sums + 1)
    h_dg_sq = tl.load(sums_ptr + b * s_sums + 2)
    v_g = tl.load(sums_ptr + b * s_sums + 3)
    finite = (denom == denom) & (tl.abs(denom) < float("inf"))
    ok = finite & (tl.abs(denom) > 1e-12 * tl.sqrt_rn(dx_sq) * tl.sqrt_rn(h_dg_sq))  # no fp32 overflow
    gnorm = tl.load(gn_ptr + b)
    gnorm_old = tl.load(gno_ptr + b)
    blown = (gnorm <= growth * gnorm_old) == 0
    idx = c * BLOCK + tl.arange(0, BLOCK)
    mask = idx < D
    row = b * D + idx
    dx = tl.load(dx_ptr + row, mask=mask, other=0.0).to(tl.float32)
    h_g = tl.load(hg_ptr + row, mask=mask, other=0.0).to(tl.float32)
    u = tl.div_rn(dx - (h_g - tl.load(hgo_ptr + row, mask=mask, other=0.0).to(tl.float32)), tl.where(ok, denom, 1.0))
    v = tl.load(v_ptr + row, mask=mask, other=0.0)
    if BALANCE:
        v_norm = tl.sqrt_rn(tl.load(sums_ptr + b * s_sums + 4))
        r_sq = tl.load(sums_ptr + b * s_sums + 5)
        s = tl.sqrt_rn(tl.div_rn(v_norm * tl.abs(denom), tl.sqrt_rn(tl.where(r_sq > 0, r_sq, 1.0))))
        s = tl.where(ok & (r_sq > 0) & (s > 0) & (s < float("inf")), s, 1.0)
        tl.store(U_ptr + b * sUb + tl.cast(slot, tl.int64) * sUm + idx, (u * s).to(U_ptr.dtype.element_ty), mask=mask)
        v_stored = tl.div_rn(v.to(tl.float32), s).to(V_ptr.dtype.element_ty)
    else:
        tl.store(U_ptr + b * sUb + tl.cast(slot, tl.int64) * sUm + idx, u.to(U_ptr.dtype.element_ty), mask=mask)
        v_stored = v
    tl.store(V_ptr + b * sVb + tl.cast(slot, tl.int64) * sVm + idx, v_stored, mask=mask)
    g_old = tl.load(go_ptr + row, mask=mask, other=0.0)
    if blown:  # stay at the old iterate with H = -I
        x_keep = tl.load(xo_ptr + row, mask=mask, other=0.0)
        tl.store(g_out + row, g_old, mask=mask)
        hg = (-g_old.to(tl.float32)).to(hg_out.dtype.element_ty)  # fp32 math
    else:
        x_keep = tl.load(x_ptr + row, mask=mask, other=0.0)
        tl.store(g_out + row, tl.load(g_ptr + row, mask=mask, other=0.0), mask=mask)
        hg = (h_g + tl.where(ok, v_g, 0.0) * u).to(hg_out.dtype.element_ty)
    tl.store(x_out + row, x_keep, mask=mask)
    tl.store(hg_out + row, hg, mask=mask)
    step = x_keep.to(tl.float32) - hg.to(tl.float32)  # the next iterate x - H g, from H g as stored
    tl.store(step_out + row, step.to(step_out.dtype.element_ty), mask=mask)
    if c == 0:  # the per-sample part, once
        j = tl.arange(0, MP)
        alive = tl.load(alive_ptr + b * M + j, mask=j < M, other=0) != 0
        alive = tl.where(j == slot, ok & (blown == 0), alive & (blown == 0))
        tl.store(alive_ptr + b * M + j, alive.to(tl.int8), mask=j < M)
        tl.store(restarts_ptr + b, tl.load(restarts_ptr + b) + blown.to(tl.int64))
        tl.store(gn_out + b, tl.where(blown, gnorm_old, gnorm))


def broyden_finish(state: BroydenState, new: BroydenStep, applies: BroydenApplies, *, growth: float) -> BroydenState:
    """Triton twin of reference.broyden_finish (contiguous (B, D) vectors, fp32 sums and norms)."""
    x, g, gnorm, dx = new
    h_g, v, sums = applies
    U, V, slot, alive, restarts = state.U, state.V, state.count, state.alive, state.restarts
    x_old, g_old, hg_old, gnorm_old = state.x, state.g, state.hg, state.gnorm
    _check("broyden_finish", U, V, x, x_old, g, g_old, dx, h_g, v, hg_old)
    vectors = {"x": x, "x_old": x_old, "g": g, "g_old": g_old, "dx": dx, "h_g": h_g, "v": v, "hg_old": hg_old}
    for name, t in vectors.items():
        if not t.is_contiguous():
            raise ValueError(f"broyden_finish: {name} must be contiguous, got strides {t.stride()}")
    for name, t in {"sums": sums, "gnorm": gnorm, "gnorm_old": gnorm_old}.items():
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"broyden_finish: {name} must be contiguous fp32, got {t.dtype}, strides {t.stride()}")
    if U.dtype != x.dtype and sums.shape[1] != 6:
        raise ValueError(f"broyden_finish: a history narrower than x needs 6 sums per sample, got {sums.shape[1]}")
    batch, m, dim = U.shape
    x_new, g_new, hg_new, step = torch.empty_like(x), torch.empty_like(g), torch.empty_like(g), torch.empty_like(x)
    gnorm_new = torch.empty_like(gnorm)
    setting, block, chunks = _stream_grid(dim, x.element_size())
    vec, (D, *strides) = _aligned(x.element_size(), dim, *U.stride()[:2], *V.stride()[:2])
    _broyden_finish_kernel[(batch * chunks,)](
        U, V, x, x_old, g, g_old, dx, h_g, v, hg_old, sums, gnorm, gnorm_old, alive.view(torch.int8), restarts,
        x_new, g_new, gnorm_new, hg_new, step, D, slot, float(growth), sums.shape[1], *strides, chunks, M=m,
        MP=_next_pow2(max(m, 2)), BLOCK=block, BALANCE=U.dtype != x.dtype, VEC=vec, num_warps=setting.warps,
        **COMPILE_OPTIONS,
    )  # fmt: skip
    return evolve(state, x=x_new, g=g_new, gnorm=gnorm_new, hg=hg_new, next_x=step, count=slot + 1)
