"""Shared validation: pytree structure, leaf types and tangent/primal agreement.

Every message names the API, the leaf (by pytree path), what was expected and
what was received.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, keystr, tree_flatten, tree_flatten_with_path

__all__ = ["LeafSpec", "flatten_primals", "flatten_tangents", "is_differentiable_dtype"]


def is_differentiable_dtype(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _is_none(x: Any) -> bool:
    return x is None


@dataclass(frozen=True)
class LeafSpec:
    """What a tangent leaf must look like: the primal's path, shape, dtype and device."""

    path: str
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    differentiable: bool


def _path(prefix: str, kp) -> str:
    return prefix + keystr(kp)


def flatten_primals(api: str, primals: tuple) -> tuple[list[torch.Tensor], TreeSpec, list[LeafSpec]]:
    """Flatten ``primals`` (the positional arguments), checking that every leaf is a tensor."""
    with_path, spec = tree_flatten_with_path(primals)
    leaves, specs = [], []
    for kp, leaf in with_path:
        path = _path("primals", kp)
        if not isinstance(leaf, torch.Tensor):
            raise ValueError(
                f"{api}: every leaf of primals must be a torch.Tensor, but {path} is "
                f"{type(leaf).__name__} ({leaf!r:.60}). Pass non-tensor arguments by closing over "
                "them (e.g. functools.partial or a lambda)."
            )
        if leaf.layout != torch.strided:
            raise ValueError(f"{api}: {path} has layout {leaf.layout}; only strided tensors are supported.")
        leaves.append(leaf)
        specs.append(LeafSpec(path.replace("primals", "", 1), tuple(leaf.shape), leaf.dtype,
                              leaf.device, is_differentiable_dtype(leaf.dtype)))
    if not leaves:
        raise ValueError(f"{api}: expected at least one tensor in primals, got {primals!r:.80}.")
    return leaves, spec, specs


def flatten_tangents(api: str, tangents: tuple, spec: TreeSpec, leaf_specs: list[LeafSpec]) -> list:
    """Flatten ``tangents`` and check them leaf by leaf against the primals.

    Leaves of primals with a non-differentiable dtype (integers, bool) take ``None``
    (or a tensor, which is ignored after its shape is checked).
    """
    leaves, tspec = tree_flatten(tangents, is_leaf=_is_none)
    if tspec != spec:
        raise ValueError(
            f"{api}: tangents must have the same pytree structure as primals. "
            f"Expected {len(leaf_specs)} leaves structured as {spec}, got {len(leaves)} leaves "
            f"structured as {tspec}."
        )
    for t, ls in zip(leaves, leaf_specs):
        name = f"tangents{ls.path}"
        if t is None:
            if ls.differentiable:
                raise ValueError(
                    f"{api}: {name} is None, but primals{ls.path} is a differentiable "
                    f"{ls.dtype} tensor; pass a tensor (use torch.zeros_like for a zero tangent)."
                )
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{api}: {name} must be a torch.Tensor, got {type(t).__name__}.")
        if tuple(t.shape) != ls.shape:
            raise ValueError(
                f"{api}: {name} has shape {tuple(t.shape)}, but primals{ls.path} has shape {ls.shape}."
            )
        if ls.differentiable and t.dtype != ls.dtype:
            raise ValueError(
                f"{api}: {name} has dtype {t.dtype}, but primals{ls.path} has dtype {ls.dtype}; "
                "tangents must have the primal's dtype."
            )
        if t.device != ls.device:
            raise ValueError(
                f"{api}: {name} is on device {t.device}, but primals{ls.path} is on {ls.device}."
            )
    return leaves

