"""Structured states: a tuple / list / dict (nested) of tensors sharing the batch, iterated as one state.

Every comparison is against the same problem posed on one concatenated tensor: a structured f here is the
concatenated map with its input concatenated (leaves' (B, -1) views in order) and its output split, so the
loop sees bit-identical flat iterates and every result must be *exactly* equal (torch.equal, NaN-aware for
traces), not just close. Each test's docstring names the realistic bug it catches.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fixedpoint as fp
from fixedpoint.testing import linear_deq  # noqa: F401  (the package's problems import cleanly beside this one)

F64 = torch.float64
B = 5
SHAPES = ((3,), (2, 2))  # z1 (B, 3), z2 (B, 2, 2): D = 7


def split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 7) -> (z1 (B, 3), z2 (B, 2, 2)): views, in the concatenation's order."""
    return z[:, :3], z[:, 3:].reshape(-1, 2, 2)


def join(t) -> torch.Tensor:
    """(z1, z2) -> (B, 7)."""
    return torch.cat([t[0], t[1].reshape(t[1].shape[0], -1)], dim=1)


def problem(dtype=F64, seed=0, requires_grad=False):
    """z = tanh(s_b W z + x) on (B, 7), the per-sample scales s_b mixed so statuses and step counts differ
    (the last sample, s = 2.5, is not a contraction); W and x are returned for gradients."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(7, 7, generator=g, dtype=F64) / 7**0.5).to(dtype).requires_grad_(requires_grad)
    x = torch.randn(B, 7, generator=g, dtype=F64).to(dtype).requires_grad_(requires_grad)
    scale = torch.tensor([0.2, 0.5, 0.8, 0.9, 2.5], dtype=dtype)[:, None]
    return w, x, scale


def maps(w, x, scale, record=None):
    """The concatenated map and the same map on (z1, z2); both record their flat input when ``record`` is a list."""

    def f_cat(z):
        if record is not None:
            record.append(z.detach().clone())
        return torch.tanh(scale * (z @ w.T) + x)

    def f_tuple(t):
        assert isinstance(t, tuple) and [tuple(leaf.shape[1:]) for leaf in t] == list(SHAPES)
        return split(f_cat(join(t)))

    return f_cat, f_tuple


def assert_same_solution(flat: fp.Solution, structured: fp.Solution) -> None:
    assert isinstance(structured.x, tuple) and isinstance(structured.fx, tuple)
    assert torch.equal(join(structured.x), flat.x) and torch.equal(join(structured.fx), flat.fx)
    for name in ("residual", "nsteps", "status"):
        assert torch.equal(getattr(structured, name), getattr(flat, name)), name
    torch.testing.assert_close(structured.trace, flat.trace, rtol=0, atol=0, equal_nan=True)
    assert structured.nfev == flat.nfev


SOLVERS = {
    "picard": partial(fp.picard, beta=0.8),
    "anderson": partial(fp.anderson, m=3),
    "broyden": partial(fp.broyden, m=4),
    "newton": partial(fp.newton, krylov_dim=5),
    "solve(Anderson)": partial(fp.solve, fp._solvers.Anderson(m=3)),
}


@pytest.mark.parametrize("name", SOLVERS)
def test_tuple_state_iterates_exactly_as_its_concatenation(name):
    """Catches: the flat order differing between x0 and f's output (leaves swapped or flattened in another
    order), a per-leaf residual or stop (norms over one leaf), or a copy that changes the iterates: every
    iterate f sees, x, fx, residual, trace, nsteps, status and nfev must equal the concatenated solve's."""
    w, x, scale = problem()
    seen_flat, seen_tuple = [], []
    f_cat, _ = maps(w, x, scale, seen_flat)
    _, f_tuple = maps(w, x, scale, seen_tuple)
    z0 = torch.randn(B, 7, generator=torch.Generator().manual_seed(1), dtype=F64)
    options = {"tol": 1e-10, "max_iter": 30}
    flat = SOLVERS[name](f_cat, z0, **options)
    structured = SOLVERS[name](f_tuple, split(z0.clone()), **options)
    assert_same_solution(flat, structured)
    assert [tuple(leaf.shape) for leaf in structured.x] == [(B, *s) for s in SHAPES]
    assert structured.nsteps.unique().numel() > 1  # per-sample stopping was exercised
    assert len(seen_tuple) == len(seen_flat) and all(map(torch.equal, seen_tuple, seen_flat))


def test_nested_dict_and_list_states_round_trip():
    """Catches: dict / list / nested containers rebuilt as another container or in another key order, leaves
    returned flat or with a lost trailing shape, or args not reaching a structured f."""
    g = torch.Generator().manual_seed(2)
    leaves = [torch.randn(B, *s, generator=g, dtype=F64) for s in ((3,), (2, 2), (1, 2, 1))]
    state = {"a": leaves[0], "b": [leaves[1], (leaves[2],)]}
    sizes = [3, 4, 2]
    w = torch.randn(9, 9, generator=g, dtype=F64) * 0.1

    def to_flat(s):
        return torch.cat([s["a"], s["b"][0].reshape(B, -1), s["b"][1][0].reshape(B, -1)], dim=1)

    def f_flat(z, bias):
        return torch.tanh(z @ w.T + bias)

    def f_nested(s, bias):
        assert isinstance(s, dict) and list(s) == ["a", "b"] and isinstance(s["b"], list)
        assert isinstance(s["b"][1], tuple)
        a, b0, b1 = f_flat(to_flat(s), bias).split(sizes, dim=1)
        return {"a": a, "b": [b0.reshape(B, 2, 2), (b1.reshape(B, 1, 2, 1),)]}

    bias = torch.randn(B, 9, generator=g, dtype=F64)
    flat = fp.anderson(f_flat, to_flat(state), args=(bias,), tol=1e-10)
    nested = fp.anderson(f_nested, state, args=(bias,), tol=1e-10)
    assert isinstance(nested.x, dict) and isinstance(nested.x["b"], list) and isinstance(nested.x["b"][1], tuple)
    assert [t.shape for t in (nested.x["a"], nested.x["b"][0], nested.x["b"][1][0])] == [t.shape for t in leaves]
    assert torch.equal(to_flat(nested.x), flat.x) and torch.equal(to_flat(nested.fx), flat.fx)
    assert torch.equal(nested.status, flat.status) and torch.equal(nested.nsteps, flat.nsteps)
    assert all(torch.equal(a, b) for a, b in zip(leaves, (state["a"], state["b"][0], state["b"][1][0])))


# ----------------------------------------------------------------------------- gradients


def _solved(f, z0):
    return fp.anderson(f, z0, tol=1e-14, max_iter=300, m=5).x


# mode(f, z0, z_star): jfb and phantom start at a fixed point computed once (their gradient holds it fixed);
# implicit solves inside (its IFT gradient is the derivative of the solution); stochastic_jfb draws no no-grad
# steps (those are detached from the inputs: gradcheck would see them)
MODES = {
    "jfb": lambda f, z0, z_star: fp.jfb(f, z_star),
    "phantom": lambda f, z0, z_star: fp.phantom(f, z_star, k=3, damping=0.6),
    "implicit": lambda f, z0, z_star: fp.implicit(f, _solved(f, z0), tol=1e-12, max_iter=300),
    "unrolled": lambda f, z0, z_star: fp.unrolled(f, z0, steps=4, damping=0.7),
    "stochastic_jfb": lambda f, z0, z_star: fp.stochastic_jfb(
        f, z0, no_grad=(0, 0), with_grad=(1, 3), generator=torch.Generator().manual_seed(3)
    ),
}


@pytest.mark.parametrize("mode", MODES)
def test_backward_modes_on_a_tuple_state_have_the_concatenated_gradient(mode):
    """Catches: a backward mode that detaches a leaf (no gradient to one branch's inputs), drops the graph
    through the concatenation (unrolled's z0), or differentiates the flat copy instead of f: float64
    gradcheck of the structured mode, and its gradient exactly equal to the concatenated one's."""
    w, x, _ = problem(requires_grad=True)
    scale = torch.tensor([0.2, 0.5, 0.8, 0.9, 0.6], dtype=F64)[:, None]  # contractive: implicit's IFT holds
    z1 = torch.randn(B, 3, dtype=F64, requires_grad=True)
    z2 = torch.randn(B, 2, 2, dtype=F64, requires_grad=True)
    z_star = _solved(maps(w.detach(), x.detach(), scale)[0], join((z1, z2)).detach())

    def structured(w, x, z1, z2):
        _, f_tuple = maps(w, x, scale)
        return join(MODES[mode](f_tuple, (z1, z2), split(z_star)))

    def concatenated(w, x, z1, z2):
        f_cat, _ = maps(w, x, scale)
        return MODES[mode](f_cat, join((z1, z2)), z_star)

    inputs = (w, x, z1, z2)
    # stochastic_jfb detaches x0 by design (no gradient to the start): gradcheck it on w and x only
    checked = (w, x, z1.detach(), z2.detach()) if mode == "stochastic_jfb" else inputs
    # implicit re-solves per perturbation: gradcheck's fast mode (random projections of the Jacobian) there
    assert torch.autograd.gradcheck(structured, checked, atol=1e-6, fast_mode=mode == "implicit")
    weight = torch.randn(B, 7, dtype=F64)
    grads_s = torch.autograd.grad((structured(*inputs) * weight).sum(), inputs, allow_unused=True)
    grads_c = torch.autograd.grad((concatenated(*inputs) * weight).sum(), inputs, allow_unused=True)
    for name, a, b in zip(("w", "x", "z1", "z2"), grads_s, grads_c):
        assert (a is None) == (b is None), name
        assert a is None or torch.equal(a, b), name
    reaches_z0 = mode == "unrolled"  # the only mode whose result depends on the start through a graph
    assert (grads_s[2] is not None) == reaches_z0 and (grads_s[3] is not None) == reaches_z0


# ----------------------------------------------------------------------------- FixedPoint: a 2-resolution DEQ


class MDEQCell(nn.Module):
    """Two branches, (B, 4, 4, 4) and (B, 8, 2, 2), each updated from both (a stride-2 conv down, a 1x1 conv and
    nearest upsampling up) plus the input's injection; weights scaled down so the map contracts."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.down, self.up = nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.Conv2d(8, 4, 1)
        self.inject = nn.Conv2d(4, 8, 1)
        with torch.no_grad():
            for conv in (self.c1, self.c2, self.down, self.up):
                conv.weight.mul_(0.3)

    def forward(self, z, x):
        z1, z2 = z
        n1 = torch.tanh(self.c1(z1) + F.interpolate(self.up(z2), scale_factor=2.0) + x)
        n2 = torch.tanh(self.c2(z2) + self.down(z1) + self.inject(F.avg_pool2d(x, 2)))
        return n1, n2


def _flat_cell(cell: MDEQCell):
    """The same cell on one concatenated (B, 96) state."""

    def f(z, x):
        n1, n2 = cell((z[:, :64].reshape(-1, 4, 4, 4), z[:, 64:].reshape(-1, 8, 2, 2)), x)
        return torch.cat([n1.flatten(1), n2.flatten(1)], dim=1)

    return f


@pytest.mark.parametrize("backward", ["jfb", "implicit"])
def test_fixedpoint_trains_a_two_resolution_deq_as_its_concatenation(backward):
    """Catches: FixedPoint flattening or checking only the first branch (a shape error, or the second branch
    never solved), its output not in the start's structure, or gradients missing a branch's parameters: one
    training step of a 2-resolution MDEQ cell gives the concatenated layer's output, gradients and update."""
    torch.manual_seed(0)
    cell = MDEQCell().double()
    modes = {"jfb": fp.jfb, "implicit": partial(fp.implicit, tol=1e-10)}
    solver = partial(fp.anderson, tol=1e-8, max_iter=60)
    x = torch.randn(3, 4, 4, 4, dtype=F64)
    target = torch.randn(3, dtype=F64)
    layers = {
        "structured": FixedPointPair(cell, solver, modes[backward], structured=True),
        "concatenated": FixedPointPair(copy.deepcopy(cell), solver, modes[backward], structured=False),
    }
    results = {name: pair.step(x, target) for name, pair in layers.items()}
    (out_s, grads_s, params_s), (out_c, grads_c, params_c) = results["structured"], results["concatenated"]
    assert isinstance(out_s, tuple) and [t.shape for t in out_s] == [(3, 4, 4, 4), (3, 8, 2, 2)]
    assert torch.equal(torch.cat([t.flatten(1) for t in out_s], 1), out_c)
    assert layers["structured"].layer.last_solution.converged.all()
    for name in grads_s:
        assert grads_s[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_s[name], grads_c[name], rtol=1e-12, atol=1e-14, msg=name)
        torch.testing.assert_close(params_s[name], params_c[name], rtol=1e-12, atol=1e-14, msg=name)


class FixedPointPair:
    """A FixedPoint over the cell (a structured start, from ``z0=``) or over its concatenated twin, with a head
    on both branches, trained one SGD step."""

    def __init__(self, cell, solver, backward, *, structured: bool):
        self.cell, self.structured = cell, structured
        if structured:
            start = lambda x: (x.new_zeros(x.shape[0], 4, 4, 4), x.new_zeros(x.shape[0], 8, 2, 2))  # noqa: E731
            self.layer = fp.FixedPoint(cell, solver=solver, backward=backward, z0=start)
        else:
            self.layer = fp.FixedPoint(_flat_cell(cell), solver=solver, backward=backward, state_shape=(96,))
        self.optimizer = torch.optim.SGD(cell.parameters(), lr=0.1)

    def step(self, x, target):
        out = self.layer(x)
        z1, z2 = out if self.structured else (out[:, :64].reshape(-1, 4, 4, 4), out[:, 64:].reshape(-1, 8, 2, 2))
        loss = ((z1.mean((1, 2, 3)) + z2.pow(2).mean((1, 2, 3)) - target) ** 2).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in self.cell.named_parameters()}
        self.optimizer.step()
        return out, grads, {n: p.detach().clone() for n, p in self.cell.named_parameters()}


def test_fixedpoint_forward_takes_a_structured_start_and_eval_returns_it():
    """Catches: forward(..., z0=(a, b)) rejected or flattened, or eval mode returning the flat fx."""
    cell = MDEQCell().double().eval()
    layer = fp.FixedPoint(cell)
    x = torch.randn(2, 4, 4, 4, dtype=F64)
    z0 = (torch.zeros(2, 4, 4, 4, dtype=F64), torch.zeros(2, 8, 2, 2, dtype=F64))
    with torch.no_grad():
        out = layer(x, z0=z0)
    assert isinstance(out, tuple) and out[1].shape == (2, 8, 2, 2)
    assert layer.last_solution.converged.all()


# ----------------------------------------------------------------------------- errors


def _leaf(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize(
    ("state", "error", "words"),
    [
        ((_leaf(4, 3), _leaf(5, 2)), ValueError, ["x0[1]", "batch size", "(5, 2)"]),
        ((_leaf(4, 3), {"b": _leaf(4, 2, dtype=F64)}), TypeError, ["x0[1]['b']", "torch.float64", "one dtype"]),
        ((_leaf(4, 3), _leaf(4, 2, device="meta")), ValueError, ["x0[1]", "meta", "one device"]),
        ((_leaf(4, 3), 1.5), TypeError, ["x0[1]", "float 1.5"]),
        ((_leaf(4, 3), [None]), TypeError, ["x0[1][0]", "NoneType None"]),
        ({"a": _leaf(4, 3), "b": _leaf(4, 2, dtype=torch.long)}, TypeError, ["x0['b']", "torch.int64"]),
        ((), ValueError, ["empty structure"]),
        ({"a": []}, ValueError, ["empty structure"]),
        ((_leaf(4, 3), _leaf(4, 0)), ValueError, ["x0[1]", "non-empty"]),
    ],
)
def test_bad_structured_states_are_errors_naming_the_leaf(state, error, words):
    """Catches: a mismatched leaf silently broadcast, cast or moved (or a crash deep in torch.cat): the error
    names the leaf's path and what it is."""
    with pytest.raises(error) as caught:
        fp.picard(lambda z: z, state)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_bad_outputs_of_a_structured_f_are_errors_naming_the_leaf():
    """Catches: f's structured output accepted with a changed leaf shape or another structure (a wrong flat
    length, or values landing in the wrong branch), an in-place edit of a leaf going unnoticed, and backward
    modes accepting mismatched leaves."""
    z = (torch.zeros(4, 3), torch.zeros(4, 2, 2))
    with pytest.raises(ValueError, match=r"leaf \[1\]: input \(4, 2, 2\), output \(4, 4\)"):
        fp.anderson(lambda t: (t[0], t[1].reshape(4, 4)), z)
    with pytest.raises(ValueError, match="must return the structure of its input"):
        fp.anderson(lambda t: [t[0], t[1]], z)
    with pytest.raises(ValueError, match="modified its input in place"):
        fp.picard(lambda t: (t[0].mul_(0.5), t[1]), z)
    with pytest.raises(TypeError, match=r"z\[1\].*one dtype"):
        fp.jfb(lambda t: t, (z[0], z[1].double()))
    with pytest.raises(TypeError, match=r"x0 must be a torch.Tensor or a tuple / list / dict"):
        fp.picard(lambda t: t, {1, 2})


def test_a_structured_solution_prints_its_leaves():
    """Catches: Solution.__repr__ reading x.shape, which a tuple state does not have (an AttributeError)."""
    sol = fp.picard(lambda z: (0.5 * z[0], 0.5 * z[1]), (torch.ones(2, 3), torch.ones(2, 1, 2)))
    assert repr(sol).startswith("Solution(x=tuple of 2 [(2, 3), (2, 1, 2)] torch.float32, status={'CONVERGED': 2}")


def test_a_structured_state_gets_the_kernels_its_flat_form_would():
    """Catches: the solver functions choosing the pure PyTorch kernels for any structure (the CPU host path, and
    Triton on CUDA, lost whatever impl says), or a stand-in that copies the state."""
    from fixedpoint import _solvers, _tree, kernels

    state = (torch.zeros(4, 3), torch.zeros(4, 2, 2))
    stand_in = _tree.Layout.of(state, "x0").stand_in()
    assert stand_in.shape == (4, 7) and stand_in.untyped_storage().nbytes() == stand_in.element_size()
    assert _solvers._kernels("auto", state) is kernels.resolve("auto", torch.zeros(4, 7))
    assert _solvers._kernels("torch", state) is kernels.reference
    assert _solvers._kernels("auto", (torch.zeros(4, 3), torch.zeros(5, 2))) is kernels.reference  # left to solve()
