"""DiT (Peebles & Xie) and FPDM (Bai & Melas-Kyriazi): one model file, a dataclass config, a registry.

The models know only ``forward(x, t, y)``: x (N, C, H, W) noisy images or
latents, t (N,) integer timesteps, y (N,) class labels (``num_classes`` is the
null label for classifier-free guidance). Schedules, losses and samplers live
in ``fpdm.diffusion`` and take the model as a callable.

FPDM keeps ``pre_depth`` explicit blocks in front and ``post_depth`` behind;
everything in between is one weight-tied fixed-point layer, a
``fixedpoint.FixedPoint`` (``model.fixed_point``): stochastic Jacobian-free
backprop in training, any solver in eval (``model.eval_solver``, or
``model(x, t, y, solver=...)`` for one call), optionally from a warm start.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

import fixedpoint
from fixedpoint import FixedPoint, GradInfo, Solution

__all__ = [
    "ModelConfig", "DiT", "FPDM", "MODEL_SIZES", "LEGACY_FIELDS", "create_model", "model_config", "build_model",
    "model_names",
    "fixed_iterations", "plain_iterations",
]  # fmt: skip


# ----------------------------------------------------------------------------- config and registry


@dataclass
class ModelConfig:
    """Everything that defines a model's architecture (saved in checkpoints)."""

    kind: str = "fpdm"  # "dit" or "fpdm"
    input_size: int = 32  # H = W of the input (latent) images
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28  # DiT blocks (DiT only)
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance
    learn_sigma: bool = True  # predict the variance too (2x output channels)
    pre_depth: int = 1  # FPDM: explicit blocks before the fixed-point layer
    post_depth: int = 1  # FPDM: explicit blocks after it
    timestep_in_pre_post: bool = False  # FPDM: condition pre/post blocks on the timestep too
    no_grad_iters: tuple[int, int] = (0, 10)  # FPDM S-JFB: iterations without gradient, inclusive range
    grad_iters: tuple[int, int] = (1, 12)  # FPDM S-JFB: iterations with gradient
    eval_iters: int = 12  # FPDM: default calls of the fixed-point block in eval (plain iteration)
    projection_gelu: str = "tanh"  # FPDM: the projection's GELU, "tanh" (the release) or "none" (exact)
    final_conditioning: str = "outer"  # FPDM: final layer sees "outer" (as pre/post blocks: the release) or "full"
    null_class: bool = True  # an extra class-embedding row for guidance (DiT trained without label dropout: none)
    eval_iterate: str = "last"  # FPDM eval with n calls: "last" f^n(z0) (the release) or "best" (fixedpoint's picard)

    @classmethod
    def from_dict(cls, saved: dict) -> ModelConfig:
        """A config as saved in a checkpoint; fields it predates take the values it was trained with
        (``LEGACY_FIELDS``), so an old checkpoint computes what it computed. Unknown fields are a ValueError."""
        if not isinstance(saved, dict):
            raise ValueError(f"a model config must be a dict, got {type(saved).__name__}")
        unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown model config field(s) {', '.join(map(str, unknown))}")
        return cls(**{**LEGACY_FIELDS, **saved})

    def __post_init__(self) -> None:
        self.no_grad_iters = tuple(self.no_grad_iters)
        self.grad_iters = tuple(self.grad_iters)
        checks = {
            "kind": self.kind in ("dit", "fpdm"),
            "input_size": self.input_size >= 1,
            "patch_size": self.patch_size >= 1 and self.input_size % self.patch_size == 0,
            "in_channels": self.in_channels >= 1,
            "hidden_size": self.hidden_size >= 1 and self.hidden_size % max(self.num_heads, 1) == 0,
            "num_heads": self.num_heads >= 1,
            "depth": self.depth >= 1,
            "num_classes": self.num_classes >= 1,
            "pre_depth": self.pre_depth >= 0,
            "post_depth": self.post_depth >= 0,
            "eval_iters": self.eval_iters >= 1,
            "projection_gelu": self.projection_gelu in ("tanh", "none"),
            "final_conditioning": self.final_conditioning in ("outer", "full"),
            "eval_iterate": self.eval_iterate in ("last", "best"),
            "class_dropout_prob": 0 <= self.class_dropout_prob < 1
            and (self.null_class or self.class_dropout_prob == 0),
        }
        for name, ok in checks.items():
            if not ok:
                detail = f" (input_size {self.input_size})" if name == "patch_size" else ""
                detail = f" (num_heads {self.num_heads})" if name == "hidden_size" else detail
                no_null = name == "class_dropout_prob" and not self.null_class
                detail = " (no null class to drop labels to)" if no_null else detail
                raise ValueError(f"invalid model config: {name}={getattr(self, name)!r}{detail}")
        for name in ("no_grad_iters", "grad_iters"):
            lo, hi = getattr(self, name)
            if not (0 <= lo <= hi) or (name == "grad_iters" and lo < 1):
                raise ValueError(f"invalid model config: {name}={getattr(self, name)!r}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def num_parameters(self) -> int:
        """Trainable parameters of the model this config builds (closed form: no model is built)."""
        d, h, p = self.hidden_size, int(self.hidden_size * self.mlp_ratio), self.patch_size
        block = 10 * d * d + 2 * d * h + 11 * d + h  # qkv, proj, MLP, adaLN (6D)
        embed = self.in_channels * p * p * d + d + (256 * d + d + d * d + d) + (self.num_classes + self.null_class) * d
        final = 2 * d * d + 2 * d + (d + 1) * p * p * self.out_channels
        if self.kind == "dit":
            return embed + self.depth * block + final
        fixed_point = (d * d + d) + (4 * d * d + 2 * d) + (2 * d * d + d)  # injection, projection
        return embed + (self.pre_depth + 1 + self.post_depth) * block + fixed_point + final


# Fields added after checkpoints were written, with the behaviour those checkpoints were trained with.
LEGACY_FIELDS = {"projection_gelu": "none", "final_conditioning": "full", "eval_iterate": "best"}

# DiT's sizes (Peebles & Xie, Table 1) and a tiny one for CPU demos: (hidden, depth, heads)
MODEL_SIZES = {"XL": (1152, 28, 16), "L": (1024, 24, 16), "B": (768, 12, 12), "S": (384, 12, 6), "T": (128, 4, 4)}
PATCH_SIZES = (2, 4, 8)


def model_names() -> list[str]:
    """Every name ``create_model`` accepts, e.g. 'DiT-XL/2', 'FPDM-S/4', 'FPDM-T/2'."""
    return [f"{kind}-{size}/{p}" for kind in ("DiT", "FPDM") for size in MODEL_SIZES for p in PATCH_SIZES]


def create_model(name: str, **overrides) -> DiT | FPDM:
    """Build a named model, e.g. ``create_model("FPDM-XL/2", input_size=32, num_classes=1000)``.

    Overrides are ModelConfig fields; an unknown name or field is a ValueError listing the valid ones.
    """
    return build_model(model_config(name, **overrides))


def model_config(name: str, **overrides) -> ModelConfig:
    """The config ``create_model(name, **overrides)`` builds (checked, nothing allocated)."""
    if name not in model_names():
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(model_names())}")
    kind, rest = name.split("-", 1)
    size, patch = rest.split("/")
    hidden, depth, heads = MODEL_SIZES[size]
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model config field(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    base = dict(kind=kind.lower(), hidden_size=hidden, depth=depth, num_heads=heads, patch_size=int(patch))
    return ModelConfig(**{**base, **overrides})


def build_model(config: ModelConfig) -> DiT | FPDM:
    """The model a config describes (how checkpoints are loaded)."""
    return FPDM(config) if config.kind == "fpdm" else DiT(config)


def fixed_iterations(n: int, solver: Callable[..., Solution] | None = None, **options) -> Callable:
    """An eval solver making exactly ``n`` calls of the fixed-point block (for budgets and the paper's setting).

    With no ``solver``: the release's plain iteration, z_n = f^n(z_0), its last iterate (``plain_iterations``).
    With a fixedpoint solver: the shared loop calls f once at the start and once per iteration, so this is
    ``max_iter = n - 1`` with a tolerance no residual reaches; n = 1 is one call.
    The loop need not ask the device after every iteration whether to go on
    (``check_every = n - 1``: no host sync per iteration on GPUs), so the n calls are
    made even when every sample stops sooner (a NaN, an exact fixed point; only a
    start where all have stopped makes one call). Newton adds its Jacobian-vector
    products to the n.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {n!r}")
    if solver is None:
        if options:
            raise TypeError(f"plain iteration takes no options, got {', '.join(sorted(options))}")
        return partial(plain_iterations, n=n)
    if n == 1:
        return partial(plain_iterations, n=1)
    return partial(solver, **{"max_iter": n - 1, "tol": 1e-30, "divergence": None, "check_every": n - 1, **options})


def plain_iterations(f: Callable[..., Tensor], x0: Tensor, *, n: int, args: tuple | None = None) -> Solution:
    """The release's fixed-point layer: n calls of f from x0; ``fx`` = f^n(x0) and ``x`` = f^(n-1)(x0).

    No stopping and no best iterate: what the paper's code computes. The residual is the last pair's
    relative one; ``nsteps`` is n - 1 (the shared loop's count for n calls) and the status MAX_ITER."""
    x, fx = x0, f(x0, *(args or ()))
    for _ in range(n - 1):
        x, fx = fx, f(fx, *(args or ()))
    batch = x0.shape[0]
    res = (fx - x).flatten(1).float().norm(dim=1) / fx.flatten(1).float().norm(dim=1).clamp_min(1e-30)  # (B,)
    nsteps = torch.full((batch,), n - 1, dtype=torch.long, device=x0.device)
    status = torch.full_like(nsteps, fixedpoint.Status.MAX_ITER)
    return Solution(x, fx, res, nsteps, status, res.new_empty(0, batch), nfev=n)


# ----------------------------------------------------------------------------- building blocks


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation: x (N, T, D), shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the timestep, then an MLP (as in DiT)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """(N,) -> (N, dim) sinusoidal timestep features."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        features = self.features(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(features)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row: the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, null_class: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes + int(null_class), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, y: Tensor) -> Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, self.num_classes, y)
        return self.embedding(y)  # (N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = (
            self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        )  # (N, h, T, d/h)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning: identity at initialisation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (grid*grid, dim), as in MAE and DiT."""
    coords = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # w first

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(dim // 2, coords[0]), one_axis(dim // 2, coords[1])], axis=1)


# ----------------------------------------------------------------------------- DiT


class DiT(nn.Module):
    """Diffusion transformer: patchify, embed, adaLN-Zero blocks, final layer, unpatchify."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.x_embedder = nn.Conv2d(config.in_channels, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob, config.null_class)
        grid = config.input_size // config.patch_size
        pos = torch.from_numpy(sincos_pos_embed_2d(d, grid)).float().unsqueeze(0).to(self.x_embedder.weight.device)
        self.register_buffer("pos_embed", pos, persistent=False)  # (1, T, D), fixed
        self.build_body()
        self.final_layer = FinalLayer(d, config.patch_size, config.out_channels)
        self.initialize_weights()

    grad_checkpointing: bool = False  # recompute each block in backward instead of keeping its activations

    def run_block(self, block: DiTBlock, tokens: Tensor, c: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, tokens, c, use_reentrant=False)
        return block(tokens, c)

    def block(self) -> DiTBlock:
        return DiTBlock(self.config.hidden_size, self.config.num_heads, self.config.mlp_ratio)

    def build_body(self) -> None:
        self.blocks = nn.ModuleList([self.block() for _ in range(self.config.depth)])

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, zeroed adaLN modulations and output layer."""

        def basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for module in self.modules():
            if isinstance(module, (DiTBlock, FinalLayer)):
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def embed(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens (N, T, D), timestep embedding (N, D), class embedding (N, D)."""
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        return tokens, self.t_embedder(t), self.y_embedder(y)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.config.out_channels, self.config.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def body(
        self, tokens: Tensor, t_emb: Tensor, y_emb: Tensor, z0: Tensor | None, solver: Callable | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:  # fmt: skip
        """The blocks: (N, T, D) -> (N, T, D); the fixed-point layer's options (FPDM's) are ignored."""
        c = t_emb + y_emb
        for block in self.blocks:
            tokens = self.run_block(block, tokens, c)
        return tokens

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        z0: Tensor | None = None,
        solver: Callable[..., Solution] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """x (N, C, H, W), t (N,), y (N,) -> (N, C_out, H, W). The keywords are FPDM's fixed-point layer's, for
        this call: ``z0`` its warm start, ``solver`` its eval solver, ``generator`` the source of its S-JFB
        draws in training (reproducible runs); a DiT ignores them."""
        tokens, t_emb, y_emb = self.embed(x, t, y)
        tokens = self.body(tokens, t_emb, y_emb, z0, solver, generator)
        return self.unpatchify(self.final_layer(tokens, self.final_condition(t_emb, y_emb)))

    def final_condition(self, t_emb: Tensor, y_emb: Tensor) -> Tensor:
        """The final layer's conditioning (N, D): timestep + class."""
        return t_emb + y_emb

    @property
    def block_evaluations(self) -> int:
        """Blocks evaluated by the last forward (compute unit for DiT vs FPDM comparisons)."""
        return self.config.depth


# ----------------------------------------------------------------------------- FPDM


class _WeakMethod:
    """``getattr(model, name)`` called through a weak reference: the fixed-point layer's map and backward
    without a model -> layer -> model cycle (a dropped model is freed at once, GPU memory included, not at
    the next garbage collection). A deepcopy of the model rebinds it to the copy; pickling keeps the model."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model, self.name = weakref.ref(model), name
        self.__signature__ = inspect.signature(getattr(model, name))  # what FixedPoint reads (its keywords)

    def __call__(self, *args, **kwargs):
        return getattr(self.model(), self.name)(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> _WeakMethod:
        model = self.model()
        return _WeakMethod(memo.get(id(model), model), self.name)  # the model's copy, made before its layer's

    def __reduce__(self):
        return _WeakMethod, (self.model(), self.name)


@dataclass
class FixedPointState:
    """What the last FPDM forward did in its fixed-point layer."""

    z: Tensor  # (N, T, D) the fixed point reached (detached), a warm start for the next timestep
    calls: int  # calls of the fixed-point block
    solution: Solution | None = None  # eval: the solver's Solution
    info: GradInfo = field(default_factory=GradInfo)  # training: the S-JFB draws


class FPDM(DiT):
    """DiT whose middle blocks are one implicit fixed-point layer (Bai & Melas-Kyriazi, CVPR 2024)."""

    def build_body(self) -> None:
        cfg, d = self.config, self.config.hidden_size
        self.blocks_pre = nn.ModuleList([self.block() for _ in range(cfg.pre_depth)])
        self.injection = nn.Linear(d, d)
        gelu = nn.GELU(approximate=cfg.projection_gelu)
        self.projection = nn.Sequential(nn.Linear(2 * d, 2 * d), gelu, nn.Linear(2 * d, d))
        self.block_fixed_point = self.block()
        self.blocks_post = nn.ModuleList([self.block() for _ in range(cfg.post_depth)])
        # the layer: the map as a method of the model (its weights stay the model's: state_dict keys unchanged,
        # and a deepcopy's layer calls the copy's), no training solve (S-JFB iterates from z0), the release's
        # plain iteration in eval; half_tol=0: the solver's tolerance is the caller's in half precision too
        self.fixed_point = FixedPoint(
            _WeakMethod(self, "_layer_map"), solver=None, backward=_WeakMethod(self, "_stochastic_jfb"),
            eval_solver=fixed_iterations(cfg.eval_iters, self.picard_solver), half_tol=0,
        )  # fmt: skip
        self.generator: torch.Generator | None = None  # S-JFB draws when forward gets none (the argument is better)
        self.last_fixed_point: FixedPointState | None = None

    @property
    def eval_solver(self) -> Callable[..., Solution]:
        """The fixed-point layer's eval solver (``self.fixed_point.eval_solver``), called as
        ``solver(f, z0, args=(x_inj, c))`` with f the block's map (``fixed_point_map``); settable. For one call:
        ``model(x, t, y, solver=...)``."""
        return self.fixed_point.eval_solver

    @eval_solver.setter
    def eval_solver(self, solver: Callable[..., Solution]) -> None:
        if not callable(solver):
            raise TypeError(f"eval_solver must be a solver function, got {type(solver).__name__}")
        self.fixed_point.eval_solver = solver

    def _stochastic_jfb(
        self, f: Callable[[Tensor], Tensor], z0: Tensor, *, generator: torch.Generator | None = None,
        info: GradInfo | None = None,
    ) -> Tensor:  # fmt: skip
        """The layer's training backward: ``fixedpoint.stochastic_jfb`` with the config's iteration ranges
        (read at each call)."""
        cfg = self.config
        return fixedpoint.stochastic_jfb(
            f, z0, no_grad=cfg.no_grad_iters, with_grad=cfg.grad_iters, generator=generator, info=info
        )

    @property
    def picard_solver(self) -> Callable[..., Solution] | None:
        """What plain iteration with a fixed number of calls means for this model (``fixed_iterations``'s
        solver): None, the release's last iterate, or fixedpoint's picard (its best iterate) for checkpoints
        from before the release's was the default (``eval_iterate="best"``)."""
        return fixedpoint.picard if self.config.eval_iterate == "best" else None

    def fixed_point_map(self, z: Tensor, x_inj: Tensor, c: Tensor) -> Tensor:
        """One iteration: z <- Block(Linear(GELU(Linear(concat[z, x_inj]))), c); all (N, T, D)."""
        return self.block_fixed_point(self.projection(torch.cat([z, x_inj], dim=-1)), c)

    def _layer_map(self, z: Tensor, x_inj: Tensor, c: Tensor) -> Tensor:
        """The layer's f: ``self.fixed_point_map``, looked up at each call, so that one set on the instance (a
        compiled map, a spy) is the one solved."""
        return self.fixed_point_map(z, x_inj, c)

    def outer_condition(self, t_emb: Tensor, y_emb: Tensor) -> Tensor:
        """The pre/post blocks' conditioning (N, D): the class alone unless ``timestep_in_pre_post``."""
        return t_emb + y_emb if self.config.timestep_in_pre_post else y_emb

    def final_condition(self, t_emb: Tensor, y_emb: Tensor) -> Tensor:
        """As the post blocks (the release), or timestep + class with ``final_conditioning="full"``."""
        if self.config.final_conditioning == "full":
            return t_emb + y_emb
        return self.outer_condition(t_emb, y_emb)

    def body(
        self, tokens: Tensor, t_emb: Tensor, y_emb: Tensor, z0: Tensor | None, solver: Callable | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:  # fmt: skip
        """The blocks: pre, the fixed-point layer (``self.fixed_point``: S-JFB in training, drawing from
        ``generator``, default ``self.generator``; in eval ``solver``, default ``self.eval_solver``; from
        ``z0`` or the pre blocks' tokens), post."""
        c_full = t_emb + y_emb
        c_outer = self.outer_condition(t_emb, y_emb)
        for block in self.blocks_pre:
            tokens = self.run_block(block, tokens, c_outer)
        x_inj = self.injection(tokens)  # (N, T, D), computed once
        start = (tokens if z0 is None else z0.to(tokens.dtype)).detach()
        generator = self.generator if generator is None else generator
        backward = None if generator is None else partial(self._stochastic_jfb, generator=generator)
        # the block and its changing inputs apart (the solver's args)
        z = self.fixed_point(x_inj, c_full, z0=start, eval_solver=solver, backward=backward)  # (N, T, D)
        self.last_fixed_point = self._layer_state(z)
        for block in self.blocks_post:
            z = self.run_block(block, z, c_outer)
        return z

    def _layer_state(self, z: Tensor) -> FixedPointState:
        """What the fixed-point layer's last call did: its Solution in eval, its S-JFB draws in training."""
        solution, info = self.fixed_point.last_solution, self.fixed_point.last_info
        if solution is None:  # training: no solve ran, S-JFB drew its iterations
            return FixedPointState(z.detach(), info.no_grad_steps + info.grad_steps, None, info)
        return FixedPointState(z.detach(), solution.nfev, solution)

    @property
    def block_evaluations(self) -> int:
        """Blocks evaluated by the last forward: pre + post + calls of the fixed-point block."""
        calls = self.last_fixed_point.calls if self.last_fixed_point is not None else 0
        return self.config.pre_depth + self.config.post_depth + calls
