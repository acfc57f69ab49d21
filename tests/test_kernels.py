"""Fused Triton kernels against their PyTorch twins (CPU: TRITON_INTERPRET=1, tiny shapes), and their use."""

import os

import pytest
import torch

import fixedpoint
from fixedpoint import Status
from fixedpoint.kernels import reference, resolve

triton_kernels = pytest.importorskip("fixedpoint.kernels.triton_kernels", reason="triton is not installed")
on_cpu_interpreter = not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if on_cpu_interpreter and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULPS = {torch.float32: 1e-6, torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7}  # relative: 1-2 ulp


def _close(a, b, dtype, scale=1.0):
    torch.testing.assert_close(a.float(), b.float(), rtol=ULPS[dtype], atol=ULPS[dtype] * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 37, 130])  # masked tails: not multiples of the block
def test_residual_kernel_equals_twin(dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    x, fx = (torch.randn(3, dim, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    g1, gsq1, fsq1 = triton_kernels.residual(x, fx)
    g2, gsq2, fsq2 = reference.residual(x, fx)
    _close(g1, g2, dtype, scale=4)
    # squared norms from g rounded to its dtype: within a few ulp of g, relative
    torch.testing.assert_close(gsq1, gsq2, rtol=4 * ULPS[dtype] + 1e-6, atol=1e-6)
    torch.testing.assert_close(fsq1, fsq2, rtol=1e-5, atol=1e-6)


def test_residual_kernel_flags_nonfinite_through_the_sums():
    x = torch.zeros(2, 5, device=DEVICE)
    fx = torch.ones(2, 5, device=DEVICE)
    fx[1, 3] = float("nan")
    _, gsq, fsq = triton_kernels.residual(x, fx)
    assert torch.isfinite(gsq[0] + fsq[0]) and not torch.isfinite(gsq[1] + fsq[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slot", [0, 2])
def test_anderson_write_kernel_equals_twin(dtype, slot):
    gen = torch.Generator().manual_seed(slot)
    F, G = (torch.randn(2, 3, 21, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    fx, g = (torch.randn(2, 21, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    F2, G2 = F.clone(), G.clone()
    row1 = triton_kernels.anderson_write(F, G, slot, fx, g)
    row2 = reference.anderson_write(F2, G2, slot, fx, g)
    assert torch.equal(F, F2) and torch.equal(G, G2)  # the ring buffer holds exactly the new pair
    torch.testing.assert_close(row1, row2, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_anderson_mix_kernel_equals_twin_and_freezes(dtype, beta):
    gen = torch.Generator().manual_seed(7)
    F, G = (torch.randn(3, 4, 19, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    alpha = torch.softmax(torch.randn(3, 4, generator=gen), dim=1).to(DEVICE)
    frozen = torch.randn(3, 19, generator=gen).to(dtype).to(DEVICE)
    active = torch.tensor([True, False, True], device=DEVICE)
    out1 = triton_kernels.anderson_mix(F, G, alpha, beta, frozen, active)
    out2 = reference.anderson_mix(F, G, alpha, beta, frozen, active)
    _close(out1, out2, dtype, scale=4)
    assert torch.equal(out1[1], frozen[1])  # a stopped sample keeps its iterate, bit for bit
    all_active = triton_kernels.anderson_mix(F, G, alpha, beta, None, None)
    _close(all_active, reference.anderson_mix(F, G, alpha, beta, None, None), dtype, scale=4)


def test_batch_strided_inputs_work_and_feature_strided_are_rejected():
    x = torch.randn(6, 9, device=DEVICE)[::2]  # batch stride 18: fine
    fx = torch.randn(3, 9, device=DEVICE)
    for a, b in zip(triton_kernels.residual(x, fx), reference.residual(x, fx)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="feature dimension must be contiguous"):
        triton_kernels.residual(torch.randn(9, 3, device=DEVICE).T, fx)


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
    assert resolve("auto", x64) is reference and resolve("torch", torch.zeros(2, 3)) is reference
    if not torch.cuda.is_available():
        assert resolve("auto", torch.zeros(2, 3)) is reference  # auto never picks the CPU interpreter
    with pytest.raises(ValueError, match="impl must be one of 'auto', 'torch', 'triton', got 'cuda'"):
        fixedpoint.anderson(lambda z: z, torch.zeros(2, 3), impl="cuda")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors of fp32/fp16/bf16.*torch.float64"):
        fixedpoint.anderson(lambda z: 0.5 * z, x64, impl="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_on_gpu_at_real_sizes(dtype):
    x, fx = (torch.randn(32, 256 * 1152, device="cuda").to(dtype) for _ in range(2))
    for a, b in zip(triton_kernels.residual(x, fx), reference.residual(x, fx)):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
