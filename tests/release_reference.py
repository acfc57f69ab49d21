"""The released DiT and FPDM forward passes restated plainly, with their published parameter names.

Written from facebookresearch/DiT's and the FPDM release's ``models.py`` (timm's PatchEmbed, Attention and
Mlp; adaLN-Zero blocks; the FPDM release's ``_forward_fixed_point``), apart from ``fpdm.models``: the tests'
reference for loading those checkpoints. Attention is written out (softmax(q k^T / sqrt(d)) v), GELU is the
tanh approximation everywhere, as in the release.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def pos_embed(dim: int, grid: int) -> Tensor:
    """MAE's get_2d_sincos_pos_embed as DiT calls it: (1, grid*grid, dim), float32."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([axis(dim // 2, gw), axis(dim // 2, gh)], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)


def _block_shapes(d: int, mlp: int) -> dict[str, tuple[int, ...]]:
    return {
        "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "mlp.fc1.weight": (mlp, d), "mlp.fc1.bias": (mlp,), "mlp.fc2.weight": (d, mlp), "mlp.fc2.bias": (d,),
        "adaLN_modulation.1.weight": (6 * d, d), "adaLN_modulation.1.bias": (6 * d,),
    }  # fmt: skip


def release_state_dict(
    kind: str, *, hidden: int = 64, depth: int = 3, pre: int = 1, post: int = 1, patch: int = 2, channels: int = 4,
    input_size: int = 8, classes: int = 10, null_row: bool = True, learn_sigma: bool = True, seed: int = 0,
    std: float = 0.05,
) -> dict[str, Tensor]:  # fmt: skip
    """Random weights under the published names: kind "dit" (official DiT) or "fpdm" (the FPDM release)."""
    gen = torch.Generator().manual_seed(seed)
    d, out = hidden, channels * (2 if learn_sigma else 1)
    shapes: dict[str, tuple[int, ...]] = {
        "x_embedder.proj.weight": (d, channels, patch, patch), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + int(null_row), d),
    }  # fmt: skip
    names = [f"blocks.{i}" for i in range(depth)] if kind == "dit" else [
        *(f"blocks_pre.{i}" for i in range(pre)), "block_fixed_point", *(f"blocks_post.{i}" for i in range(post))]
    for name in names:
        shapes.update({f"{name}.{k}": v for k, v in _block_shapes(d, 4 * d).items()})
    if kind == "fpdm":
        shapes.update({
            "block_pre_projection.weight": (d, d), "block_pre_projection.bias": (d,),
            "block_fixed_point_projection_fc1.weight": (2 * d, 2 * d),
            "block_fixed_point_projection_fc1.bias": (2 * d,),
            "block_fixed_point_projection_fc2.weight": (d, 2 * d), "block_fixed_point_projection_fc2.bias": (d,),
        })  # fmt: skip
    shapes.update({
        "final_layer.linear.weight": (patch * patch * out, d), "final_layer.linear.bias": (patch * patch * out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    })  # fmt: skip
    state = {k: torch.randn(v, generator=gen) * std for k, v in shapes.items()}
    state["pos_embed"] = pos_embed(d, input_size // patch)
    return state


def _linear(x: Tensor, sd: dict, name: str) -> Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _block(x: Tensor, c: Tensor, sd: dict, name: str, heads: int) -> Tensor:
    shift1, scale1, gate1, shift2, scale2, gate2 = _linear(F.silu(c), sd, f"{name}.adaLN_modulation.1").chunk(6, 1)
    n, t, d = x.shape
    h = _modulate(_layer_norm(x), shift1, scale1)
    q, k, v = _linear(h, sd, f"{name}.attn.qkv").reshape(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1) @ v  # (N, heads, T, d/heads)
    x = x + gate1.unsqueeze(1) * _linear(attn.transpose(1, 2).reshape(n, t, d), sd, f"{name}.attn.proj")
    h = _modulate(_layer_norm(x), shift2, scale2)
    mlp = _linear(F.gelu(_linear(h, sd, f"{name}.mlp.fc1"), approximate="tanh"), sd, f"{name}.mlp.fc2")
    return x + gate2.unsqueeze(1) * mlp


def release_forward(
    sd: dict[str, Tensor], x: Tensor, t: Tensor, y: Tensor, *, heads: int, pre_post_timestep: bool = False,
    iters: int = 26,
) -> Tensor:  # fmt: skip
    """The released forward (eval mode): DiT's ``_forward_dit`` or FPDM's ``_forward_fixed_point`` with
    ``iters`` iterations from the pre blocks' output (no reuse)."""
    w = sd["x_embedder.proj.weight"]
    p = w.shape[-1]
    tokens = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    t_emb = _linear(F.silu(_linear(t_freq, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    y_emb = sd["y_embedder.embedding_table.weight"][y]
    c = t_emb + y_emb
    if "block_fixed_point.attn.qkv.weight" not in sd:  # DiT
        i = 0
        while f"blocks.{i}.attn.qkv.weight" in sd:
            tokens = _block(tokens, c, sd, f"blocks.{i}", heads)
            i += 1
        c_final = c
    else:  # FPDM
        c_pp = c if pre_post_timestep else y_emb
        i = 0
        while f"blocks_pre.{i}.attn.qkv.weight" in sd:
            tokens = _block(tokens, c_pp, sd, f"blocks_pre.{i}", heads)
            i += 1
        injection = _linear(tokens, sd, "block_pre_projection")
        z = tokens
        for _ in range(iters):
            h = torch.cat([z, injection], dim=-1)
            h = _linear(F.gelu(_linear(h, sd, "block_fixed_point_projection_fc1"), approximate="tanh"), sd,
                        "block_fixed_point_projection_fc2")  # fmt: skip
            z = _block(h, c, sd, "block_fixed_point", heads)
        tokens, i = z, 0
        while f"blocks_post.{i}.attn.qkv.weight" in sd:
            tokens = _block(tokens, c_pp, sd, f"blocks_post.{i}", heads)
            i += 1
        c_final = c_pp
    shift, scale = _linear(F.silu(c_final), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = _linear(_modulate(_layer_norm(tokens), shift, scale), sd, "final_layer.linear")  # (N, T, p*p*C)
    n, grid = out.shape[0], int(out.shape[1] ** 0.5)
    channels = out.shape[-1] // (p * p)
    out = out.reshape(n, grid, grid, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(n, channels, grid * p, grid * p)
