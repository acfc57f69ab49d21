"""Structured states: a tuple / list / dict (nested) of tensors solved as one flat (B, D) tensor.

A multi-resolution DEQ iterates several tensors of different shapes that share the batch dimension.
:class:`Layout` records where each leaf lives in the flat state (its leaves' (B, -1) views concatenated in
``torch.utils._pytree`` order), :class:`FlatMap` is f on the flat state, and :func:`flat_problem` turns a
structured problem into a flat one. The solvers, the loop and the backward modes only ever see tensors:
norms, stopping and statuses are per sample over all leaves together.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._pytree import (
    TreeSpec,
    keystr,
    tree_flatten,
    tree_flatten_with_path,
    tree_leaves,
    tree_map_only,
    tree_unflatten,
)

if TYPE_CHECKING:
    from ._solve import Solution

__all__ = ["FlatMap", "Layout", "State", "detach", "flat_problem", "is_structure", "leaves"]

STRUCTURES = (tuple, list, dict)  # containers a state may be (namedtuples and OrderedDicts included)
State = Tensor | tuple | list | dict  # a tensor (B, ...), or a nested tuple / list / dict of them


def is_structure(x: object) -> bool:
    """Whether x is a container a structured state may be (not a tensor)."""
    return isinstance(x, STRUCTURES)


def leaves(x: Any) -> list[Any]:
    """The leaves of a state (a tensor is its own one leaf)."""
    return [x] if isinstance(x, Tensor) else tree_leaves(x)


def detach(x: Any) -> Any:
    """The state with every tensor detached."""
    return x.detach() if isinstance(x, Tensor) else tree_map_only(Tensor, Tensor.detach, x)


def _describe(value: object) -> str:
    """A leaf for an error message: a tensor by shape, dtype and device, anything else by a short repr."""
    if isinstance(value, Tensor):
        return f"tensor of shape {tuple(value.shape)}, {value.dtype} on {value.device}"
    return f"{type(value).__name__} {reprlib.repr(value)}"


@dataclass(frozen=True)
class Layout:
    """Where each leaf of a structured state lives in its flat (B, D) form: columns
    ``[offset, offset + size)`` viewed as the leaf's shape, leaves in pytree order."""

    spec: TreeSpec
    paths: tuple[str, ...]  # each leaf's path, e.g. "[1]" or "['a'][0]"
    shapes: tuple[torch.Size, ...]  # each leaf's shape (B, ...)
    sizes: tuple[int, ...]  # each leaf's features per sample
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, tree: Any, name: str) -> Layout:
        """The layout of ``tree``, checked: a non-empty structure of floating-point tensors with one dtype,
        one device and one batch size (a TypeError or ValueError naming ``name`` + the leaf's path and value)."""
        pairs, spec = tree_flatten_with_path(tree)
        if not pairs:
            raise ValueError(f"{name} is an empty structure ({type(tree).__name__} without tensors): give at least one")
        paths = tuple(keystr(path) for path, _ in pairs)
        first, first_path = pairs[0][1], f"{name}{paths[0]}"
        for path, (_, leaf) in zip(paths, pairs):
            where = f"{name}{path}"
            if not isinstance(leaf, Tensor):
                raise TypeError(f"{where} must be a floating-point torch.Tensor (a state is a tensor or a tuple / list "
                                f"/ dict of tensors), got {_describe(leaf)}")  # fmt: skip
            if not leaf.is_floating_point():
                raise TypeError(f"{where} must be a floating-point tensor, got {_describe(leaf)}")
            if leaf.ndim < 1 or leaf.shape[0] == 0 or leaf.numel() == 0:
                raise ValueError(f"{where} must have a non-empty leading batch dimension, got {_describe(leaf)}")
            if not isinstance(first, Tensor) or leaf is first:
                continue
            if leaf.dtype != first.dtype:
                raise TypeError(f"{where} is a {_describe(leaf)}, {first_path} is {first.dtype}: every leaf must "
                                f"have one dtype")  # fmt: skip
            if leaf.device != first.device:
                raise ValueError(f"{where} is a {_describe(leaf)}, {first_path} is on {first.device}: every leaf "
                                 f"must be on one device")  # fmt: skip
            if leaf.shape[0] != first.shape[0]:
                raise ValueError(f"{where} is a {_describe(leaf)}, {first_path} has batch size {first.shape[0]}: "
                                 f"every leaf must have the same batch size (first dimension)")  # fmt: skip
        leaves = [leaf for _, leaf in pairs]
        sizes = tuple(leaf[0].numel() for leaf in leaves)
        return cls(spec, paths, tuple(leaf.shape for leaf in leaves), sizes, first.dtype, first.device)

    def stand_in(self) -> Tensor:
        """A (B, D) tensor of the flat state's dtype and device without storage (a broadcast scalar): what the
        kernel choice reads (``kernels.resolve``), without a copy of the state."""
        return torch.empty((), dtype=self.dtype, device=self.device).expand(self.shapes[0][0], sum(self.sizes))

    def flatten(self, tree: Any) -> Tensor:
        """The leaves of ``tree`` (this layout's structure) as one (B, D) tensor: a differentiable copy."""
        return torch.cat([leaf.reshape(leaf.shape[0], -1) for leaf in tree_leaves(tree)], dim=1)  # (B, D)

    def unflatten(self, flat: Tensor) -> Any:
        """The structure whose leaves are views of ``flat`` (B, D) (differentiable, no copy)."""
        columns = flat.split(self.sizes, dim=1)  # (B, size) each
        return tree_unflatten([c.view(shape) for c, shape in zip(columns, self.shapes)], self.spec)

    def flatten_output(self, out: Any) -> Tensor:
        """f's output as (B, D), checked against this layout: the same structure, each leaf a floating-point
        tensor of its input leaf's shape on the state's device (any floating dtype: autocast may lower it).
        One pytree pass (f's output is flattened on every call)."""
        leaves, spec = tree_flatten(out)
        if spec != self.spec:
            raise ValueError(
                f"f must return the structure of its input state, {self.spec}, got {spec} (a dict's keys in the "
                f"same order)"
            )
        for path, shape, leaf in zip(self.paths, self.shapes, leaves):
            if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
                raise TypeError(f"f's output{path} must be a floating-point tensor, got {_describe(leaf)}")
            if leaf.shape != shape:
                raise ValueError(f"f changed the shape of the state's leaf {path}: input {tuple(shape)}, "
                                 f"output {tuple(leaf.shape)}; f must map each leaf to its own shape")  # fmt: skip
            if leaf.device != self.device:
                raise ValueError(f"f's output{path} is on {leaf.device}, the state is on {self.device}; f must "
                                 f"keep the device")  # fmt: skip
        return torch.cat([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], dim=1)  # (B, D)

    def solution(self, sol: Solution) -> Solution:
        """``sol`` of the flat problem with x and fx in this structure (views; the other fields as they are)."""
        values = {field.name: getattr(sol, field.name) for field in fields(sol)}
        return type(sol)(**{**values, "x": self.unflatten(sol.x), "fx": self.unflatten(sol.fx)})


class FlatMap:
    """f on the flat state: ``(B, D), *args -> (B, D)``, calling ``f(structure, *args)`` on views of its input
    and concatenating the checked output (one copy per call; the loop needs its own buffer anyway)."""

    def __init__(self, f: Callable[..., Any], layout: Layout):
        self.f, self.layout = f, layout

    def __call__(self, z: Tensor, *args: Any) -> Tensor:
        return self.layout.flatten_output(self.f(self.layout.unflatten(z), *args))


def flat_problem(f: Callable[..., Any], z: Any, name: str) -> tuple[FlatMap, Tensor, Layout]:
    """A structured problem (f, z) as a flat one: f on (B, D), z's leaves concatenated (keeping their graph),
    and the layout that maps results back."""
    layout = Layout.of(z, name)
    return FlatMap(f, layout), layout.flatten(z), layout
