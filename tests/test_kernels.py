"""Fused Triton kernels against their PyTorch twins (CPU: TRITON_INTERPRET=1, tiny shapes), and their use."""

import os
from functools import partial

import pytest
import torch
from problems import transient_growth

import fixedpoint
from fixedpoint import Status
from fixedpoint.kernels import host, reference, resolve
from fixedpoint.kernels.groups import (
    BroydenApplies,
    BroydenStep,
    LoopBuffers,
    Pair,
    StopRule,
)
from fixedpoint.testing import anderson_state as _anderson  # the state over (F, G), other buffers zero
from fixedpoint.testing import broyden_state as _broyden
from fixedpoint.testing import loop_buffers

triton_kernels = pytest.importorskip("fixedpoint.kernels.triton_kernels", reason="triton is not installed")
on_cpu_interpreter = not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if on_cpu_interpreter and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULPS = {torch.float32: 1e-6, torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7}  # relative: 1-2 ulp


def _close(a, b, dtype, scale=1.0):
    torch.testing.assert_close(a.float(), b.float(), rtol=ULPS[dtype], atol=ULPS[dtype] * scale)


def _step(g, dx, x=None, gnorm=None) -> BroydenStep:
    """The evaluated step as Broyden's dots and combine read it (g, dx; x and gnorm only for finish)."""
    return BroydenStep(x, g, gnorm, dx)


def _best(best_x, best_fx) -> LoopBuffers:
    """The loop's buffers as best_update reads them: only best_x, best_fx."""
    return loop_buffers(best_x=best_x, best_fx=best_fx)


def _padded(t, pad: int):
    """A copy of t on DEVICE whose rows are stored pad elements apart beyond their length (clone() compacts)."""
    out = torch.zeros(*t.shape[:-1], t.shape[-1] + pad, dtype=t.dtype, device=DEVICE)[..., : t.shape[-1]]
    return out.copy_(t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 37, 130])  # masked tails: not multiples of the block
def test_residual_kernel_equals_twin(dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    x, fx = (torch.randn(3, dim, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    g1, g2 = torch.empty_like(x), torch.empty_like(x)
    gsq1, fsq1 = triton_kernels.residual(x, fx, g1)
    gsq2, fsq2 = reference.residual(x, fx, g2)
    _close(g1, g2, dtype, scale=4)
    # squared norms from g rounded to its dtype: within a few ulp of g, relative
    torch.testing.assert_close(gsq1, gsq2, rtol=4 * ULPS[dtype] + 1e-6, atol=1e-6)
    torch.testing.assert_close(fsq1, fsq2, rtol=1e-5, atol=1e-6)
    # without a buffer nothing is written and the sums are the same
    for module, gsq in ((triton_kernels, gsq1), (reference, gsq2)):
        torch.testing.assert_close(module.residual(x, fx, None)[0], gsq, rtol=0, atol=0)


def test_residual_kernel_writes_g_into_a_history_slot():
    gen = torch.Generator().manual_seed(2)
    x, fx = (torch.randn(3, 40, generator=gen).to(DEVICE) for _ in range(2))
    histories = [torch.randn(3, 4, 40, generator=gen).to(DEVICE) for _ in range(2)]
    histories.append(histories[0].clone())
    sums = [module.residual(x, fx, H[:, 2]) for module, H in zip((triton_kernels, reference), histories)]
    torch.testing.assert_close(sums[0], sums[1])
    assert torch.equal(histories[0], histories[1].where(torch.arange(4, device=DEVICE)[:, None] == 2, histories[2]))
    torch.testing.assert_close(histories[0][:, 2], fx - x)
    with pytest.raises(ValueError, match="g_out must have x's dtype"):
        triton_kernels.residual(x, fx, torch.empty_like(x, dtype=torch.float16))


def test_residual_kernel_flags_nonfinite_through_the_sums():
    x = torch.zeros(2, 5, device=DEVICE)
    fx = torch.ones(2, 5, device=DEVICE)
    fx[1, 3] = float("nan")
    gsq, fsq = triton_kernels.residual(x, fx, None)
    assert torch.isfinite(gsq[0] + fsq[0]) and not torch.isfinite(gsq[1] + fsq[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slot", [0, 2])
def test_anderson_write_kernel_equals_twin(dtype, slot):
    gen = torch.Generator().manual_seed(slot)
    F, G = (torch.randn(2, 3, 21, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    fx, g = (torch.randn(2, 21, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    F2, G2 = F.clone(), G.clone()
    row1 = triton_kernels.anderson_write(_anderson(F, G, slot), fx, g)
    row2 = reference.anderson_write(_anderson(F2, G2, slot), fx, g)
    assert torch.equal(F, F2) and torch.equal(G, G2)  # the ring buffer holds exactly the new pair
    torch.testing.assert_close(row1, row2, rtol=1e-5, atol=1e-4)
    # g already in its slot (the residual pass wrote it there): the same row, nothing copied
    G[:, slot] = g.flip(1)
    G2 = G.clone()
    row1 = triton_kernels.anderson_write(_anderson(F, G, slot), fx, G[:, slot])
    row2 = reference.anderson_write(_anderson(F2, G2, slot), fx, G2[:, slot])
    assert torch.equal(G, G2) and torch.equal(G[:, slot], g.flip(1))
    torch.testing.assert_close(row1, row2, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slot", [0, 2])
@pytest.mark.parametrize("dim", [21, 300])  # masked tails; 300: several chunks
def test_anderson_residual_write_kernel_equals_twin(dtype, slot, dim):
    """The residual pass fused into the history write: the same slots, norms and Gram row as the two apart."""
    gen = torch.Generator().manual_seed(slot + dim)
    F, G = (torch.randn(2, 3, dim, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    x, fx = (torch.randn(2, dim, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    F2, G2, F3, G3 = F.clone(), G.clone(), F.clone(), G.clone()
    gsq1, fsq1, row1 = triton_kernels.anderson_residual_write(_anderson(F, G, slot), x, fx)
    gsq2, fsq2, row2 = reference.anderson_residual_write(_anderson(F2, G2, slot), x, fx)
    g = torch.empty_like(x)
    gsq3, fsq3 = reference.residual(x, fx, g)  # the two passes apart
    row3 = reference.anderson_write(_anderson(F3, G3, slot), fx, g)
    assert torch.equal(F, F2) and torch.equal(F, F3) and torch.equal(G2, G3)
    _close(G, G2, dtype, scale=4)  # g = f(x) - x rounded once: equal up to fp32 vs torch rounding order
    for gsq, fsq, row in ((gsq1, fsq1, row1), (gsq3, fsq3, row3)):
        torch.testing.assert_close(gsq, gsq2, rtol=4 * ULPS[dtype] + 1e-6, atol=1e-6)
        torch.testing.assert_close(fsq, fsq2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(row, row2, rtol=4 * ULPS[dtype] + 1e-5, atol=1e-4)
    torch.testing.assert_close(row2[:, slot], gsq2.to(row2.dtype), rtol=1e-5, atol=1e-6)  # its own entry: g . g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_anderson_mix_kernel_equals_twin_and_freezes(dtype, beta):
    gen = torch.Generator().manual_seed(7)
    F, G = (torch.randn(3, 4, 19, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    alpha = torch.softmax(torch.randn(3, 4, generator=gen), dim=1).to(DEVICE)
    frozen = torch.randn(3, 19, generator=gen).to(dtype).to(DEVICE)
    active = torch.tensor([True, False, True], device=DEVICE)
    out1 = triton_kernels.anderson_mix(_anderson(F, G, alpha=alpha), beta, frozen, active)
    out2 = reference.anderson_mix(_anderson(F, G, alpha=alpha), beta, frozen, active)
    _close(out1, out2, dtype, scale=4)
    assert torch.equal(out1[1], frozen[1])  # a stopped sample keeps its iterate, bit for bit
    all_active = triton_kernels.anderson_mix(_anderson(F, G, alpha=alpha), beta, None, None)
    _close(all_active, reference.anderson_mix(_anderson(F, G, alpha=alpha), beta, None, None), dtype, scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_freezing_kernels_with_every_sample_active_read_no_mask(dtype):
    """With frozen=None the launchers pass the iterate in place of the mask (ALL_ACTIVE: never read). Zeros
    there would freeze every sample of a kernel that read it anyway; the start z0 = 0 is the common case."""
    gen = torch.Generator().manual_seed(11)
    x, fx = torch.zeros(3, 37).to(dtype).to(DEVICE), torch.randn(3, 37, generator=gen).to(dtype).to(DEVICE)
    stepped = triton_kernels.picard_step(x, fx, 0.5, None, None)
    _close(stepped, reference.picard_step(x, fx, 0.5, None, None), dtype, scale=4)
    assert stepped.abs().min() > 0  # moved: nothing was frozen at x = 0
    F = torch.randn(3, 4, 37, generator=gen).to(dtype).to(DEVICE)
    F[:, 0] = 0  # the slot that stands in for frozen and active
    alpha = torch.tensor([[0.0, 0.5, 0.25, 0.25]] * 3, device=DEVICE)
    mixed = triton_kernels.anderson_mix(_anderson(F, F, alpha=alpha), 1.0, None, None)
    _close(mixed, reference.anderson_mix(_anderson(F, F, alpha=alpha), 1.0, None, None), dtype, scale=4)
    assert mixed.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_freezing_kernels_take_a_strided_bool_mask(dtype):
    """A bool mask is viewed as int8 (no conversion launch); a strided one is made contiguous first."""
    gen = torch.Generator().manual_seed(12)
    x, fx, frozen = (torch.randn(3, 29, generator=gen).to(dtype).to(DEVICE) for _ in range(3))
    active = torch.tensor([[True, False], [False, True], [True, True]], device=DEVICE)[:, 0]  # stride 2
    assert not active.is_contiguous()
    stepped = triton_kernels.picard_step(x, fx, 0.6, frozen, active)
    _close(stepped, reference.picard_step(x, fx, 0.6, frozen, active), dtype, scale=4)
    assert torch.equal(stepped[1], frozen[1]) and not torch.equal(stepped[0], frozen[0])
    F = torch.randn(3, 2, 29, generator=gen).to(dtype).to(DEVICE)
    alpha = torch.tensor([[0.3, 0.7]] * 3, device=DEVICE)
    mixed = triton_kernels.anderson_mix(_anderson(F, F, alpha=alpha), 1.0, frozen, active)
    _close(mixed, reference.anderson_mix(_anderson(F, F, alpha=alpha), 1.0, frozen, active), dtype, scale=4)
    assert torch.equal(mixed[1], frozen[1]) and not torch.equal(mixed[0], frozen[0])


def test_launch_sizing_helpers_equal_tritons():
    """The launchers' plain-int cdiv and next power of 2 (triton's cost host time) give triton's values."""
    import triton

    for n in [*range(1, 300), 2**20 - 1, 2**20, 2**20 + 1, 2**31 - 1]:
        assert triton_kernels._next_pow2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 7, 64, 1024):
            assert triton_kernels._cdiv(n, d) == triton.cdiv(n, d), (n, d)


BAD_SETTINGS = [  # (field, value): a tile of 3000 bytes is not a power-of-2 number of elements
    ("nbytes", 3000), ("nbytes", 0), ("nbytes", 4096.0), ("nbytes", True), ("warps", 6), ("max_steps", 0),
    ("stages", 0),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), BAD_SETTINGS)
def test_a_launch_setting_rejects_what_cannot_compile(field, value):
    with pytest.raises(ValueError, match=f"LaunchSetting: {field} must be"):
        triton_kernels.LaunchSetting(**{"nbytes": 4096, field: value})


def test_batch_strided_inputs_work_and_feature_strided_are_rejected():
    x = torch.randn(6, 9, device=DEVICE)[::2]  # batch stride 18: fine
    fx = torch.randn(3, 9, device=DEVICE)
    g1, g2 = torch.empty(6, 9, device=DEVICE)[::2], torch.empty(3, 9, device=DEVICE)
    for a, b in zip(triton_kernels.residual(x, fx, g1), reference.residual(x, fx, g2)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(g1, g2)
    with pytest.raises(ValueError, match="feature dimension must be contiguous"):
        triton_kernels.residual(torch.randn(9, 3, device=DEVICE).T, fx, None)


def test_aligned_sizes_divide_by_the_widest_vector_that_fits():
    assert triton_kernels._aligned(2, 3125000, 3125000) == (8, [390625, 390625])  # bf16: 8 per 16 bytes
    assert triton_kernels._aligned(4, 3125000, 3125000) == (4, [781250, 781250])
    assert triton_kernels._aligned(2, 300, 302) == (2, [150, 151])  # the row stride decides too
    assert triton_kernels._aligned(2, 601, 601) == (1, [601, 601])
    assert triton_kernels._aligned(2, 8, 2**31) == (1, [8, 2**31])  # 32-bit products could overflow


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("dim", "pad"), [(40, 0), (44, 0), (42, 0), (40, 2), (40, 1)])  # vec 8, 4, 2; strides
def test_streaming_kernels_equal_twins_at_every_row_alignment(dtype, dim, pad):
    """Sizes passed divided by their vector width (see _aligned) and multiplied back in the kernel: rows of
    D = 40, 44, 42 elements, and every tensor but x with rows padded to a stride of D + pad (x's own
    stride alone would give a wider vector than the others allow), give the twins' values."""
    gen = torch.Generator().manual_seed(dim + pad)

    def rows(*shape, pad=pad):  # (..., dim) views of (..., dim + pad) storage
        return torch.randn(*shape[:-1], dim + pad, generator=gen).to(dtype).to(DEVICE)[..., :dim]

    x = rows(3, dim, pad=0)
    fx, g, dx, hg, frozen = (rows(3, dim) for _ in range(5))
    F, G, U, V = (rows(3, 4, dim) for _ in range(4))
    active = torch.tensor([True, False, True], device=DEVICE)
    alpha = torch.softmax(torch.randn(3, 4, generator=gen), dim=1).to(DEVICE)
    g_out, g_want = rows(3, dim), torch.empty(3, dim, dtype=dtype, device=DEVICE)
    for a, b in zip(triton_kernels.residual(x, fx, g_out), reference.residual(x, fx, g_want)):
        torch.testing.assert_close(a, b, rtol=4 * ULPS[dtype] + 1e-5, atol=1e-4)
    _close(g_out, g_want, dtype, scale=8)
    stepped = [k.picard_step(x, fx, 0.6, frozen, active) for k in (triton_kernels, reference)]
    _close(*stepped, dtype)
    mixed = [k.anderson_mix(_anderson(F, G, alpha=alpha), 0.6, frozen, active) for k in (triton_kernels, reference)]
    _close(*mixed, dtype, scale=4)
    F2, G2 = F.clone(), G.clone()
    got, want = (
        k.anderson_residual_write(_anderson(*h, 1), x, fx) for k, h in ((triton_kernels, (F, G)), (reference, (F2, G2)))
    )
    assert torch.equal(F, F2)
    _close(G, G2, dtype, scale=8)  # g = f - x rounded to storage (the interpreter truncates bf16)
    for a, b in zip(got, want):  # norms and the Gram row read that g: 1 ulp each, summed over 40
        torch.testing.assert_close(a, b, rtol=4 * ULPS[dtype] + 1e-5, atol=1e-3 + 4 * ULPS[dtype])
    coeff = triton_kernels.broyden_dots(_broyden(U, V, 3), _step(g, dx))
    torch.testing.assert_close(coeff, reference.broyden_dots(_broyden(U, V, 3), _step(g, dx)), rtol=1e-5, atol=1e-3)
    alive = torch.ones(U.shape[:2], dtype=torch.bool, device=U.device)
    got, want = (
        k.broyden_combine(_broyden(U, V, 3, alive, hg=hg), _step(g, dx), coeff) for k in (triton_kernels, reference)
    )
    _close(got[0], want[0], dtype, scale=8)
    _close(got[1], want[1], dtype, scale=8)
    torch.testing.assert_close(got[2], want[2], rtol=8 * ULPS[dtype] + 1e-5, atol=8 * ULPS[dtype] * dim)  # reads hg


def test_anderson_triton_gives_the_same_solve_as_torch():
    torch.manual_seed(0)
    w = torch.randn(12, 12)
    w = (0.8 * w / torch.linalg.matrix_norm(w, ord=2)).to(DEVICE)
    b = torch.randn(4, 12, device=DEVICE)
    calls = [0]

    def f(z):  # sample 3 turns NaN on the 5th call: the freezing path runs too
        calls[0] += 1
        out = torch.tanh(z @ w.T + b)
        if calls[0] >= 5:
            out = out.clone()
            out[3] = float("nan")
        return out

    runs = {}
    for impl in ("torch", "triton"):
        calls[0] = 0
        runs[impl] = fixedpoint.anderson(f, torch.zeros(4, 12, device=DEVICE), tol=1e-5, m=3, impl=impl)
    a, t = runs["torch"], runs["triton"]
    assert a.nsteps.tolist() == t.nsteps.tolist() and a.status.tolist() == t.status.tolist()
    assert t.statuses()[3] == Status.NONFINITE and (t.status[:3] == Status.CONVERGED).all()
    torch.testing.assert_close(t.x, a.x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t.trace, a.trace, rtol=1e-4, atol=1e-7, equal_nan=True)


def test_impl_choices_and_errors():
    x64 = torch.zeros(2, 3, dtype=torch.float64)
    assert resolve("auto", x64) is host and resolve("torch", torch.zeros(2, 3)) is reference
    if not torch.cuda.is_available():
        assert resolve("auto", torch.zeros(2, 3)) is host  # auto never picks the CPU interpreter
    with pytest.raises(ValueError, match="impl must be one of 'auto', 'torch', 'triton', got 'cuda'"):
        fixedpoint.anderson(lambda z: z, torch.zeros(2, 3), impl="cuda")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors of fp32/fp16/bf16.*torch.float64"):
        fixedpoint.anderson(lambda z: 0.5 * z, x64, impl="triton")


def test_samples_past_32_bit_offsets_are_refused_or_left_to_torch():
    """Offsets within a sample are 32-bit in the kernels: a bigger sample is a clear error for the launchers and
    impl='triton', and PyTorch for impl='auto' (meta and expanded tensors: nothing allocated)."""
    limit = triton_kernels.MAX_FEATURES
    with pytest.raises(ValueError, match=f"at most {limit} features per sample, got {limit + 1}; use impl='torch'"):
        triton_kernels.residual(*(torch.empty(2, limit + 1, device="meta") for _ in range(2)), None)
    too_big = torch.zeros((), device=DEVICE).expand(2, limit + 1)
    with pytest.raises(ValueError, match=f"impl='triton' takes at most {limit} features per sample, got {limit + 1}"):
        resolve("triton", too_big)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (auto never picks Triton on a CPU)")
def test_auto_leaves_samples_past_32_bit_offsets_to_torch():
    limit = triton_kernels.MAX_FEATURES
    too_big = torch.zeros((), device="cuda").expand(2, limit + 1)  # no storage behind it
    assert resolve("auto", too_big) is reference and resolve("auto", too_big[:, :limit]) is triton_kernels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_on_gpu_at_real_sizes(dtype):
    """Every kernel against its twin at FPDM-XL/2 sizes (32 x 256 x 1152), relative to the result's size."""
    dim = 256 * 1152

    def rand(*shape):
        return torch.randn(*shape, device="cuda").to(dtype)

    def rel(a, b):
        a, b = a.float(), b.float()
        return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))

    x, fx, g, dx, hg = (rand(32, dim) for _ in range(5))
    F, G, U, V = (rand(32, 5, dim) for _ in range(4))
    alpha = torch.softmax(torch.randn(32, 5, device="cuda"), dim=1)
    active = torch.rand(32, device="cuda") < 0.5
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    g1, g2 = torch.empty_like(x), torch.empty_like(x)
    for a, b in zip([g1, *triton_kernels.residual(x, fx, g1)], [g2, *reference.residual(x, fx, g2)]):
        assert rel(a, b) < tol
    assert rel(triton_kernels.picard_step(x, fx, 0.7, g, active), reference.picard_step(x, fx, 0.7, g, active)) < tol
    F2, G2 = F.clone(), G.clone()
    row = triton_kernels.anderson_write(_anderson(F, G, 3), fx, g)
    assert (
        rel(row, reference.anderson_write(_anderson(F2, G2, 3), fx, g)) < 1e-5
        and torch.equal(F, F2)
        and torch.equal(G, G2)
    )
    F3, G3 = F.clone(), G.clone()
    fused = triton_kernels.anderson_residual_write(_anderson(F, G, 1), x, fx)
    for a, b in zip(fused, reference.anderson_residual_write(_anderson(F3, G3, 1), x, fx)):
        assert rel(a, b) < (1e-5 if dtype == torch.float32 else 1e-3)
    assert torch.equal(F, F3) and rel(G, G3) < tol
    mix = triton_kernels.anderson_mix(_anderson(F, G, alpha=alpha), 0.5, x, active)
    assert rel(mix, reference.anderson_mix(_anderson(F, G, alpha=alpha), 0.5, x, active)) < tol
    coeff = triton_kernels.broyden_dots(_broyden(U, V, 4), _step(g, dx))
    assert rel(coeff, reference.broyden_dots(_broyden(U, V, 4), _step(g, dx))) < 1e-5
    alive = torch.rand(U.shape[:2], device=U.device) < 0.7
    for a, b in zip(
        *(k.broyden_combine(_broyden(U, V, 4, alive, hg=hg), _step(g, dx), coeff) for k in (triton_kernels, reference))
    ):
        assert rel(a, b) < tol
    sums = torch.rand(32, 4, device="cuda") + 0.1
    gnorm_old = torch.rand(32, device="cuda") + 0.5
    gnorm = gnorm_old * torch.where(active, 1.0, 500.0)  # half the samples blow up
    outs = []
    for module in (triton_kernels, reference):
        U2, V2 = U.clone(), V.clone()
        alive, restarts = (
            torch.ones(32, 5, dtype=torch.bool, device="cuda"),
            torch.zeros(32, dtype=torch.long, device="cuda"),
        )
        state = _broyden(U2, V2, 2, alive, restarts=restarts, x=fx, g=dx, gnorm=gnorm_old, hg=hg)
        out = module.broyden_finish(state, _step(g, hg, x, gnorm), BroydenApplies(g, dx, sums), growth=100.0)
        outs.append([out.x, out.g, out.gnorm, out.hg, out.next_x, U2, alive, restarts])
    for a, b in zip(*outs):
        assert rel(a, b) < tol
    bx, bf, bx2, bf2 = x.clone(), fx.clone(), x.clone(), fx.clone()
    take = torch.randint(0, 3, (32,), device="cuda", dtype=torch.int8)
    triton_kernels.best_update(_best(bx, bf), Pair(g, dx), Pair(hg, x), take)
    reference.best_update(_best(bx2, bf2), Pair(g, dx), Pair(hg, x), take)
    assert torch.equal(bx, bx2) and torch.equal(bf, bf2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_picard_step_kernel_equals_twin_and_freezes(dtype, beta):
    gen = torch.Generator().manual_seed(3)
    x, fx, frozen = (torch.randn(3, 41, generator=gen).to(dtype).to(DEVICE) for _ in range(3))
    active = torch.tensor([False, True, True], device=DEVICE)
    out = triton_kernels.picard_step(x, fx, beta, frozen, active)
    _close(out, reference.picard_step(x, fx, beta, frozen, active), dtype, scale=4)
    assert torch.equal(out[0], frozen[0])
    _close(
        triton_kernels.picard_step(x, fx, beta, None, None), reference.picard_step(x, fx, beta, None, None), dtype, 4
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 3])  # n = 0: H = -I, the first Broyden update
def test_broyden_kernels_equal_twins(dtype, n):
    gen = torch.Generator().manual_seed(n)
    U, V = (torch.randn(2, 4, 29, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    g, dx, hg = (torch.randn(2, 29, generator=gen).to(dtype).to(DEVICE) for _ in range(3))
    coeff = triton_kernels.broyden_dots(_broyden(U, V, n), _step(g, dx))
    torch.testing.assert_close(coeff, reference.broyden_dots(_broyden(U, V, n), _step(g, dx)), rtol=1e-5, atol=1e-4)
    assert coeff.shape == (2, 2, n)
    alive = torch.tensor([[True, False, True, True], [True, True, True, False]], device=DEVICE)  # dead terms
    h1, v1, sums1 = triton_kernels.broyden_combine(_broyden(U, V, n, alive, hg=hg), _step(g, dx), coeff)
    h2, v2, sums2 = reference.broyden_combine(_broyden(U, V, n, alive, hg=hg), _step(g, dx), coeff)
    _close(h1, h2, dtype, scale=8)
    _close(v1, v2, dtype, scale=8)
    # H g = -g + sum_j coeff_j u_j over the live terms only
    live = torch.einsum("bj,bjd->bd", coeff[:, 0].double() * alive[:, :n], U[:, :n].double())
    _close(h1, (live - g.double()).to(dtype), dtype, scale=8)
    # the sums read h and v rounded to storage: a 1-ulp difference there moves them by ~1 ulp, relative
    torch.testing.assert_close(sums1, sums2, rtol=8 * ULPS[dtype] + 1e-5, atol=8 * ULPS[dtype] * 29)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("min_programs", [1, 10**6])  # 2 inner steps per program; 1 step, more chunks
def test_streaming_kernels_over_several_steps_and_chunks(monkeypatch, dtype, min_programs):
    """The launch sizes shrunk so each reduction walks D in several inner steps and chunks with a masked tail
    (at these tiny shapes the defaults cover D in one step): every partial sum still adds up to the twin's."""
    # 64 fp32 or 128 bf16 elements per step, of one row or of each of 4 history slots; 2 pipelining stages (a
    # no-op in the interpreter)
    row = triton_kernels.LaunchSetting(64 * 4, max_steps=2, stages=2)
    tile = triton_kernels.LaunchSetting(64 * 4 * 4, max_steps=2, stages=2)
    rows = ("stream", "residual", "broyden_combine")
    small = {k: dict.fromkeys((2, 4), row if k in rows else tile) for k in triton_kernels.LAUNCH_SETTINGS}
    monkeypatch.setattr(triton_kernels, "LAUNCH_SETTINGS", small)
    monkeypatch.setattr(triton_kernels, "MIN_PROGRAMS", min_programs)
    dim = 601  # fp32: 10 steps of 64, the last one masked
    itemsize = torch.empty((), dtype=dtype).element_size()
    tiled = [("anderson_write", 4), ("anderson_residual_write", 4), ("broyden_dots", 4)]
    for kernel, slots in [("residual", 1), ("broyden_combine", 1), *tiled]:
        _, block, steps, chunks = triton_kernels._grid(kernel, 2, dim, itemsize, slots)
        assert block == 64 * 4 // itemsize, (kernel, block)
        assert chunks > 1 and (steps == 2 if min_programs == 1 else steps == 1), (kernel, block, steps, chunks)
    gen = torch.Generator().manual_seed(dim)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    x, fx, g, dx, hg = (rand(2, dim) for _ in range(5))
    F, G, U, V = (rand(2, 4, dim) for _ in range(4))
    got, want = triton_kernels.residual(x, fx, None), reference.residual(x, fx, None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=4 * ULPS[dtype] + 1e-5, atol=1e-4)
    F2, G2 = F.clone(), G.clone()
    got, want = (
        k.anderson_residual_write(_anderson(*h, 1), x, fx) for k, h in ((triton_kernels, (F, G)), (reference, (F2, G2)))
    )
    assert torch.equal(F, F2)
    _close(G, G2, dtype, scale=8)  # g written in every inner step (the interpreter truncates bf16)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=4 * ULPS[dtype] + 1e-5, atol=1e-3)
    coeff = triton_kernels.broyden_dots(_broyden(U, V, 3), _step(g, dx))
    torch.testing.assert_close(coeff, reference.broyden_dots(_broyden(U, V, 3), _step(g, dx)), rtol=1e-5, atol=1e-3)
    alive = torch.ones(U.shape[:2], dtype=torch.bool, device=U.device)
    got, want = (
        k.broyden_combine(_broyden(U, V, 3, alive, hg=hg), _step(g, dx), coeff) for k in (triton_kernels, reference)
    )
    _close(got[0], want[0], dtype, scale=8)
    _close(got[1], want[1], dtype, scale=8)
    torch.testing.assert_close(got[2], want[2], rtol=8 * ULPS[dtype] + 1e-5, atol=8 * ULPS[dtype] * dim)


def _contraction(dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen)
    return (0.8 * w / torch.linalg.matrix_norm(w, ord=2)).to(DEVICE), torch.randn(4, dim, generator=gen).to(DEVICE)


@pytest.mark.parametrize("solver", ["picard", "broyden"])
def test_picard_and_broyden_triton_give_the_same_solve_as_torch(solver):
    w, b = _contraction(10)
    f = lambda z: torch.tanh(z @ w.T + b)  # noqa: E731
    solve = getattr(fixedpoint, solver)
    runs = {
        impl: solve(f, torch.zeros(4, 10, device=DEVICE), tol=1e-5, max_iter=60, impl=impl)
        for impl in ("torch", "triton")
    }
    a, t = runs["torch"], runs["triton"]
    assert a.nsteps.tolist() == t.nsteps.tolist() and (t.status == Status.CONVERGED).all()
    torch.testing.assert_close(t.x, a.x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("graph_mode", [False, True])  # trace row from the device counter, stop at max_iter
@pytest.mark.parametrize("batch", [37, 1500])  # 1500: the kernel walks the batch in two blocks
def test_bookkeep_kernel_equals_twin(relative, graph_mode, batch):
    gen = torch.Generator().manual_seed(int(relative) + 2 * int(graph_mode))
    gsq, fsq = torch.rand(batch, generator=gen), torch.rand(batch, generator=gen) + 0.5
    gsq[3], gsq[5], gsq[6], fsq[6] = float("nan"), float("inf"), 0.0, 0.0  # NaN, Inf, a zero residual and image
    gnorm0 = torch.rand(batch, generator=gen)
    gnorm0[7] = 1e-9  # diverged
    status = torch.randint(0, 4, (batch,), generator=gen)
    status[:20] = Status.MAX_ITER
    active = status == Status.MAX_ITER
    active[1] = False
    best = torch.rand(batch, generator=gen)
    best[9] = float("nan")  # a NaN start: any finite residual improves on it
    pending = torch.rand(batch, generator=gen) < 0.5
    nsteps = torch.randint(0, 5, (batch,), generator=gen)
    trace = torch.full((6, batch), float("nan"))
    done = torch.tensor(5 if graph_mode else 0)
    results = []
    for module in (triton_kernels, reference):
        st, be, pe, ns, tr, dn = state = [t.clone().to(DEVICE) for t in (status, best, pending, nsteps, trace, done)]
        g, f, g0, act = (t.to(DEVICE) for t in (gsq, fsq, gnorm0, active))
        row = None if graph_mode else 2
        loop = LoopBuffers(g0, st, be, pe, ns, tr, dn, best_x=None, best_fx=None)
        out = module.bookkeep(g, f, act, loop, StopRule(0.3, 5, relative, divergence=50.0), row)
        results.append(list(out) + state)
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0, equal_nan=True)
    # the lazy best copy, against its definition
    _, new_active, take, counts = results[1][:4]
    improved = (results[1][5] != best.to(DEVICE)) & ~torch.isnan(results[1][5])
    assert int(counts[1]) == int((take != 0).sum()) > 0
    expected = torch.where(improved & ~new_active, 1, torch.where(pending.to(DEVICE) & ~improved, 2, 0))
    assert torch.equal(take, expected.to(torch.int8)) and set(take.tolist()) == {0, 1, 2}
    assert torch.equal(results[1][6], improved & new_active)
    assert reference.NONFINITE == Status.NONFINITE and reference.DIVERGED == Status.DIVERGED
    assert reference.MAX_ITER == Status.MAX_ITER and reference.CONVERGED == Status.CONVERGED


@pytest.mark.parametrize("m", [1, 3, 5])
def test_anderson_mixing_weights_kernel_equals_twin(m):
    """The weights the absorb kernel computes after its bookkeeping (rewriting the newest slot's row with itself
    here, so the Gram matrices stay as built): equal to the twin's LAPACK-free solve, with its restarts."""
    gen = torch.Generator().manual_seed(m)
    batch = 6
    residuals = torch.randn(batch, m, 40, generator=gen, dtype=torch.float64)
    residuals[3, -1] = residuals[3, 0] * (1 + 1e-3)  # nearly dependent: coefficients ~1e3, a restart
    gram = (residuals @ residuals.transpose(1, 2)).float()
    gram[4, 0, 0] = float("nan")  # a non-finite sample restarts too
    valid = torch.rand(batch, m, generator=gen) < 0.8
    valid[:, 0] = valid[3] = True
    newest = torch.zeros(batch, m, dtype=torch.bool)
    newest[:, -1] = True
    results = []
    for module in (triton_kernels, reference):
        v, r = valid.clone().to(DEVICE), torch.arange(batch).to(DEVICE)
        g, n, kept = gram.clone().to(DEVICE), newest.clone().to(DEVICE), torch.ones(batch, device=DEVICE)
        state = _anderson(torch.zeros(batch, m, 1, device=DEVICE), None, m - 1, gram=g, row=g[:, m - 1].clone(),
                          valid=v, newest=n, kept_gnorm=kept, restarts=r)  # fmt: skip
        alpha = module.anderson_absorb(state, kept, growth=None, ridge=1e-6, max_coeff=50.0, graph_safe=True)
        assert torch.equal(g.nan_to_num(), gram.to(DEVICE).nan_to_num()) and torch.equal(n, newest.to(DEVICE))
        results.append((alpha, v, r))
    (a1, v1, r1), (a2, v2, r2) = results
    torch.testing.assert_close(a1, a2, rtol=1e-5, atol=1e-6)
    assert torch.equal(v1, v2) and torch.equal(r1, r2)
    torch.testing.assert_close(a1.sum(dim=1), torch.ones(batch, device=DEVICE))
    if m > 1:
        assert (r1 - torch.arange(batch, device=DEVICE))[[3, 4]].tolist() == [1, 1]  # the two restarts
        assert torch.equal(a1[4], newest[4].float().to(DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("dim", "pad"), [(23, 0), (40, 0), (40, 2)])  # vector widths 1 and 8; padded rows
def test_best_update_kernel_equals_twin(dtype, dim, pad):
    gen = torch.Generator().manual_seed(11)
    bx, bf, x, fx, px, pf = (_padded(torch.randn(3, dim, generator=gen).to(dtype), pad) for _ in range(6))
    x = x.contiguous()  # x compact, the others padded: the vector width must suit every stride, not x's
    take = torch.tensor([0, 1, 2], dtype=torch.int8, device=DEVICE)  # keep, the new pair, the previous pair
    bx2, bf2 = bx.clone(), bf.clone()
    expected_x, expected_fx = torch.stack([bx[0], x[1], px[2]]), torch.stack([bf[0], fx[1], pf[2]])
    triton_kernels.best_update(_best(bx, bf), Pair(x, fx), Pair(px, pf), take)
    reference.best_update(_best(bx2, bf2), Pair(x, fx), Pair(px, pf), take)
    for got in ((bx, bf), (bx2, bf2)):
        assert torch.equal(got[0], expected_x) and torch.equal(got[1], expected_fx)


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
def test_sync_free_loop_with_triton_equals_torch(solver):
    """check_every > 1: the in-place best update and the masked loop, on both kernel sets."""
    w, b = _contraction(10, seed=1)
    f = lambda z: torch.tanh(z @ w.T + b)  # noqa: E731
    solve = getattr(fixedpoint, solver)
    x0 = torch.zeros(4, 10, device=DEVICE)
    runs = {impl: solve(f, x0, tol=1e-5, max_iter=60, check_every=3, impl=impl) for impl in ("torch", "triton")}
    reference_run = solve(f, x0, tol=1e-5, max_iter=60)
    for run in runs.values():
        assert run.nsteps.tolist() == reference_run.nsteps.tolist()
        assert run.status.tolist() == reference_run.status.tolist()
        torch.testing.assert_close(run.x, reference_run.x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("check_every", [1, 3])
def test_triton_loop_keeps_the_best_iterate_when_the_residual_rises(check_every):
    f64, x0, _ = transient_growth(device=DEVICE)
    f = lambda z: f64(z.double()).float()  # noqa: E731
    runs = [
        fixedpoint.picard(f, x0.float(), tol=1e-30, max_iter=9, stop="abs", check_every=check_every, impl=i)
        for i in ("triton", "torch")
    ]
    assert torch.equal(runs[0].x, runs[1].x) and torch.equal(runs[0].nsteps, runs[1].nsteps)
    torch.testing.assert_close(runs[0].residual, runs[1].residual)


@pytest.mark.parametrize("growth", [None, 10.0])
def test_anderson_absorb_kernel_equals_twin(growth):
    gen = torch.Generator().manual_seed(5)
    batch, m, slot = 5, 3, 1
    gram = torch.randn(batch, m, m, generator=gen)
    row = torch.randn(batch, m, generator=gen)
    valid = torch.rand(batch, m, generator=gen) < 0.7
    newest = torch.zeros(batch, m, dtype=torch.bool)
    newest[:, 0] = True
    kept = torch.rand(batch, generator=gen) + 0.5
    gnorm = kept * torch.tensor([0.5, 20.0, 1.0, float("nan"), 11.0])  # samples 1, 3 (NaN) and 4 blow up
    restarts = torch.arange(batch)
    gram = gram @ gram.transpose(1, 2) + torch.eye(m)  # positive definite: weights to compare
    row = gram[:, 0] * 0.9
    results, weights = [], []
    for module in (triton_kernels, reference):
        bufs = [t.clone().to(DEVICE) for t in (gram, valid, newest, kept, restarts)]
        gram_b, valid_b, newest_b, kept_b, restarts_b = bufs
        state = _anderson(torch.zeros(batch, m, 1, device=DEVICE), None, slot, gram=gram_b, row=row.to(DEVICE),
                          valid=valid_b, newest=newest_b, kept_gnorm=kept_b, restarts=restarts_b)  # fmt: skip
        alpha = module.anderson_absorb(
            state, gnorm.to(DEVICE), growth=growth, ridge=1e-6, max_coeff=1e4, graph_safe=True
        )
        results.append(bufs)
        weights.append(alpha)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights[0].sum(dim=1), torch.ones(batch, device=DEVICE))
    gram_out, valid_out, newest_out, _, restarts_out = results[0]
    torch.testing.assert_close(gram_out[:, slot], row.to(DEVICE))
    torch.testing.assert_close(gram_out[:, :, slot], row.to(DEVICE))
    blown = [1, 3, 4] if growth else []
    assert (restarts_out.cpu() - torch.arange(batch)).nonzero().flatten().tolist() == blown
    assert [bool(valid_out[i, slot]) for i in range(batch)] == [i not in blown for i in range(batch)]
    assert [int(newest_out[i].float().argmax()) for i in range(batch)] == [
        0 if i in blown else slot for i in range(batch)
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("dim", "pad"), [(29, 0), (40, 0), (40, 2)])  # vector widths 1 and 8; padded U, V rows
def test_broyden_finish_kernel_equals_twin(dtype, dim, pad):
    gen = torch.Generator().manual_seed(8)
    batch, m, slot = 4, 3, 1
    U, V = (torch.randn(batch, m, dim, generator=gen).to(dtype) for _ in range(2))
    x, x_old, g, g_old, dx, h_g, v, hg_old = (torch.randn(batch, dim, generator=gen).to(dtype) for _ in range(8))
    sums = torch.randn(batch, 4, generator=gen).abs() + 0.1
    sums[2, 0] = 1e-20  # a negligible denominator: no update term (ok = False)
    gnorm_old = torch.rand(batch, generator=gen) + 0.5
    gnorm = gnorm_old * torch.tensor([0.5, 200.0, 1.0, 1.0])  # sample 1 blew up
    alive = torch.ones(batch, m, dtype=torch.bool)
    results = []
    for module in (triton_kernels, reference):
        bufs = [_padded(U, pad), _padded(V, pad)] + [t.clone().to(DEVICE) for t in (alive, torch.arange(batch))]
        xd, xo, gd, go, dxd, hd, vd, ho, sd, nd, no = (
            t.to(DEVICE) for t in (x, x_old, g, g_old, dx, h_g, v, hg_old, sums, gnorm, gnorm_old)
        )
        state = _broyden(bufs[0], bufs[1], slot, bufs[2], restarts=bufs[3], x=xo, g=go, gnorm=no, hg=ho)
        out = module.broyden_finish(state, _step(gd, dxd, xd, nd), BroydenApplies(hd, vd, sd), growth=100.0)
        assert out.count == slot + 1
        results.append([out.x, out.g, out.gnorm, out.hg, out.next_x] + bufs)
    (x1, g1, n1, hg1, s1, U1, V1, a1, r1), (x2, g2, n2, hg2, s2, U2, V2, a2, r2) = results
    for a, b in ((x1, x2), (g1, g2), (V1, V2)):
        assert torch.equal(a, b)
    for a, b in ((hg1, hg2), (U1, U2)):
        _close(a, b, dtype, scale=8)
    # the next iterate x - H g, each from its own H g as stored (the interpreter truncates to bf16: 1 ulp)
    assert torch.equal(s2, (x2.to(torch.float64) - hg2.to(torch.float64)).to(dtype))
    _close(s1, (x1.to(torch.float64) - hg1.to(torch.float64)).to(dtype), dtype)
    torch.testing.assert_close(n1, n2)
    assert torch.equal(a1, a2) and torch.equal(r1, r2)
    assert a1[1].tolist() == [False] * m and not a1[2, slot] and a1[0, slot]  # blown: all dead; not ok: slot dead
    assert torch.equal(x1[1], x_old[1].to(DEVICE)) and torch.equal(hg1[1], -g_old[1].to(DEVICE))


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
def test_column_major_maps_and_starts_work_with_triton(solver):
    """f returning a transposed (column-major) tensor and a column-major x0 meet the kernels' row layout."""
    w, b = _contraction(10, seed=2)
    f = lambda z: (w @ z.T).T * 0.5 + b  # noqa: E731 - strides (1, B)
    x0 = torch.zeros(10, 4, device=DEVICE).T  # (4, 10), strides (1, 4)
    solve = getattr(fixedpoint, solver)
    runs = [solve(f, x0, tol=1e-5, max_iter=60, impl=impl) for impl in ("torch", "triton")]
    assert runs[1].converged.all() and runs[0].nsteps.tolist() == runs[1].nsteps.tolist()
    torch.testing.assert_close(runs[1].x, runs[0].x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_broyden_is_scale_invariant_at_large_scales(impl):
    """The update's skip test must not overflow in fp32 (||dx|| ||H dg|| ~ 1e32 here): same steps at any scale."""
    w, b = _contraction(8, seed=3)
    steps = []
    for scale in (1.0, 1e16):
        f = lambda z, scale=scale: z @ w.T + scale * b  # noqa: E731
        sol = fixedpoint.broyden(f, torch.zeros(4, 8, device=DEVICE), tol=1e-5, impl=impl)
        assert sol.converged.all()
        steps.append(sol.nsteps.tolist())
    assert steps[0] == steps[1]


def _record_launches(monkeypatch) -> dict:
    """Replace every Triton kernel with a recorder: kernel name -> (grid, launch keywords) of its last launch."""
    launches = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.__setitem__(self.name, (grid, kwargs))

    for name in dir(triton_kernels):
        if name.startswith("_") and name.endswith("_kernel"):
            monkeypatch.setattr(triton_kernels, name, Recorder(name))
    return launches


def _launch_every_feature_kernel(batch: int, dim: int, dtype: torch.dtype) -> None:
    """Call each launcher that walks D once, on meta tensors (nothing allocated, nothing run)."""

    def new(*shape, dtype=dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    x, F, U = new(batch, dim), new(batch, 3, dim), new(batch, 3, dim)
    active = torch.ones(batch, dtype=torch.bool, device="meta")
    triton_kernels.residual(x, x, x)
    triton_kernels.picard_step(x, x, 0.5, x, active)
    triton_kernels.best_update(_best(x, x), Pair(x, x), Pair(x, x), torch.ones(batch, dtype=torch.int8, device="meta"))
    triton_kernels.anderson_write(_anderson(F, F, 1), x, x)
    triton_kernels.anderson_residual_write(_anderson(F, F, 1), x, x)
    triton_kernels.anderson_mix(_anderson(F, F, alpha=new(batch, 3, dtype=torch.float32)), 0.5, x, active)
    triton_kernels.broyden_dots(_broyden(U, U, 2), _step(x, x))
    alive = torch.ones(batch, 3, dtype=torch.bool, device="meta")
    triton_kernels.broyden_combine(_broyden(U, U, 2, alive, hg=x), _step(x, x), new(batch, 2, 2, dtype=torch.float32))
    stats = new(batch, dtype=torch.float32)
    alive, restarts = new(batch, 3, dtype=torch.int8), new(batch, dtype=torch.int64)
    state = _broyden(U, U, 0, alive, restarts=restarts, x=x, g=x, gnorm=stats, hg=x)
    applies = BroydenApplies(x, x, new(batch, 4, dtype=torch.float32))
    triton_kernels.broyden_finish(state, _step(x, x, x, stats), applies, growth=100.0)


def test_launch_grids_stay_within_cuda_limits(monkeypatch):
    """A grid's second and third axes stop at 65535 programs: every kernel runs on a 1-D grid of B * chunks, so
    one sample of 67M+ elements (a 406^3 volume) launches. Grids recorded, nothing run (meta tensors)."""
    launches = _record_launches(monkeypatch)
    _launch_every_feature_kernel(2, 65535 * 1024 + 1, torch.float16)
    assert len(launches) == 8
    for name, (grid, _) in launches.items():
        assert len(grid) == 1 and grid[0] < 2**31, (name, grid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_each_launcher_takes_its_kernels_setting_for_its_element_size(monkeypatch, dtype):
    """LAUNCH_SETTINGS holds one setting per kernel and element size: give each a different one and check that
    every launch gets its own tile (elements per step), warps, inner steps and pipelining stages."""
    launches = _record_launches(monkeypatch)
    setting = triton_kernels.LaunchSetting
    settings = {
        kernel: {size: setting(256 * 2**k * size, warps=[1, 2, 4, 8][k % 4], max_steps=2 + size, stages=k + 1)
                 for size in (2, 4)}
        for k, kernel in enumerate(triton_kernels.LAUNCH_SETTINGS)
    }  # fmt: skip
    monkeypatch.setattr(triton_kernels, "LAUNCH_SETTINGS", settings)
    monkeypatch.setattr(triton_kernels, "MIN_PROGRAMS", 1)  # every reduction takes its max_steps
    itemsize = torch.empty((), dtype=dtype).element_size()
    _launch_every_feature_kernel(1, 2**24, dtype)
    kernels = {  # Triton kernel: (its LAUNCH_SETTINGS key, history slots per tile)
        "_residual_kernel": ("residual", 1),
        "_picard_step_kernel": ("stream", 1),
        "_best_update_kernel": ("stream", 1),
        "_anderson_write_kernel": ("anderson_residual_write", 4),  # the last launch: the fused write
        "_anderson_mix_kernel": ("stream", 1),
        "_broyden_dots_kernel": ("broyden_dots", 4),
        "_broyden_combine_kernel": ("broyden_combine", 1),
        "_broyden_finish_kernel": ("stream", 1),
    }
    assert set(launches) == set(kernels)
    for name, (kernel, slots) in kernels.items():
        setting = settings[kernel][itemsize]
        _, kwargs = launches[name]
        assert kwargs["BLOCK"] == setting.nbytes // (itemsize * slots), name
        assert kwargs["num_warps"] == setting.warps, name
        if "STEPS" in kwargs:  # the reductions
            assert (kwargs["STEPS"], kwargs["STAGES"]) == (setting.max_steps, setting.stages), name
    history = torch.empty(1, 3, 2**24, dtype=dtype, device="meta")
    row = torch.empty(1, 2**24, dtype=dtype, device="meta")
    triton_kernels.anderson_write(_anderson(history, history, 1), row, row)  # the start's write, without the residual
    _, kwargs = launches["_anderson_write_kernel"]
    assert kwargs["BLOCK"] == settings["anderson_write"][itemsize].nbytes // (itemsize * 4)
    assert kwargs["num_warps"] == settings["anderson_write"][itemsize].warps


def test_every_launch_pins_fma_contraction(monkeypatch):
    """Every kernel is launched with enable_fp_fusion given (triton 3.9 warns when it is unset and 3.10 flips
    its default): the three solvers run, each kernel wrapped to record its launch keywords."""
    launched = {}

    class Recording:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.setdefault(self.name, []).append(kwargs.get("enable_fp_fusion"))
                return self.kernel[grid](*args, **kwargs)

            return launch

    kernels = [name for name in dir(triton_kernels) if name.startswith("_") and name.endswith("_kernel")]
    for name in kernels:
        monkeypatch.setattr(triton_kernels, name, Recording(name, getattr(triton_kernels, name)))
    f, x0 = (lambda z: torch.tanh(0.5 * z + 1.0)), torch.zeros(3, 8, device=DEVICE)
    for solve in (fixedpoint.picard, fixedpoint.anderson, fixedpoint.broyden):
        solve(f, x0, tol=1e-30, max_iter=12, divergence=None, impl="triton")
    fixedpoint.picard(f, x0, tol=1e-30, max_iter=3, divergence=None, impl="triton", beta=0.5)  # the damped step
    assert sorted(launched) == sorted(kernels)
    assert all(flags == [True] * len(flags) for flags in launched.values()), launched


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
def test_per_sample_beta_gives_the_twins_solve(solver):
    """beta="auto", a beta per sample, reaches the kernels folded into what they are given (Picard's step: the
    damped image with beta 1; Anderson's mixing: images x_i + beta g_i; Broyden: beta (f(x) - x)), so the
    Triton kernels take the twins' steps: the same iterates to rounding over 6 iterations, for samples with
    betas from 0.2 to 0.9 and one frozen from the start (its fixed point). Catches: a per-sample beta
    dropped on the Triton path (the unscaled image mixed, a scalar beta of 1 where the twin damps)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(16, 16, generator=gen)
    w = 0.6 * w / torch.linalg.matrix_norm(w, ord=2)
    b = torch.randn(5, 16, generator=gen) * torch.tensor([[0.2], [0.3], [0.4], [0.6], [0.0]])  # sample 4: f(0) = 0

    def f(z):
        return torch.tanh(z @ w.T.to(z.device)) + b.to(z.device)

    x0 = torch.zeros(5, 16)
    solve = partial(getattr(fixedpoint, solver), f, tol=1e-30, max_iter=6, beta="auto")
    twin, kernels = solve(x0, impl="torch"), solve(x0.to(DEVICE), impl="triton")
    assert twin.converged.tolist() == kernels.converged.tolist() == [False] * 4 + [True]
    torch.testing.assert_close(kernels.x.cpu(), twin.x, rtol=1e-4, atol=1e-5)  # Anderson: fp32 vs fp64 weights
    torch.testing.assert_close(kernels.trace.cpu(), twin.trace, rtol=1e-3, atol=1e-4, equal_nan=True)
