"""Shared validation: pytree structure, leaf types and tangent/primal agreement.

Every message names the API, the leaf (by pytree path), what was expected and
what was received.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import (
    SequenceKey,
    TreeSpec,
    keystr,
    tree_flatten,
    tree_flatten_with_path,
    tree_structure,
)

__all__ = [
    "LeafSpec", "flatten_primals", "flatten_tangents", "flatten_with_path", "is_differentiable_dtype",
    "leaf_specs_of",
]


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


_LEAF_SPEC = tree_structure(0)
_tuple_specs: dict[int, tuple[TreeSpec, list[str]]] = {}


def flatten_with_path(tree: Any) -> tuple[list[tuple[Any, Any]], TreeSpec]:
    """``tree_flatten_with_path(tree)``, without the generic walk for the common cases:
    a plain tensor, or a tuple of plain tensors (``linearize(f, x, y)``'s primals)."""
    if type(tree) is torch.Tensor:
        return [((), tree)], _LEAF_SPEC
    if type(tree) is tuple and all(type(x) is torch.Tensor for x in tree):
        n = len(tree)
        spec = _tuple_specs.get(n)
        if spec is None:
            spec = _tuple_specs[n] = tree_structure((0,) * n)
        return [((SequenceKey(i),), x) for i, x in enumerate(tree)], spec
    return tree_flatten_with_path(tree)


def flatten_primals(api: str, primals: tuple) -> tuple[list[torch.Tensor], TreeSpec, list[LeafSpec]]:
    """Flatten ``primals`` (the positional arguments), checking that every leaf is a tensor."""
    with_path, spec = flatten_with_path(primals)
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


def leaf_specs_of(tree: Any) -> list[LeafSpec]:
    """LeafSpecs (path relative to ``tree``) for every tensor leaf of ``tree``."""
    return [
        LeafSpec(keystr(kp), tuple(x.shape), x.dtype, x.device, is_differentiable_dtype(x.dtype))
        for kp, x in flatten_with_path(tree)[0]
    ]


def flatten_tangents(api: str, tangents: tuple, spec: TreeSpec, leaf_specs: list[LeafSpec],
                     arg: str = "tangents", ref: str = "primals") -> list:
    """Flatten ``tangents`` and check them leaf by leaf against ``leaf_specs``.

    Leaves with a non-differentiable dtype (integers, bool) take ``None`` (or a
    tensor of the right shape, which is ignored). ``arg``/``ref`` name the two
    trees in messages (e.g. "tangents"/"primals", "cotangents"/"output").
    """
    leaves, tspec = tree_flatten(tangents, is_leaf=_is_none)
    if tspec != spec and not _same_up_to_tuple_types(tspec, spec):
        raise ValueError(
            f"{api}: {arg} must have the same pytree structure as {ref}; "
            f"{_structure_difference(tangents, spec, arg, ref)}"
        )
    for t, ls in zip(leaves, leaf_specs):
        problem = _leaf_problem(api, arg, ref, ls, t)
        if problem is not None:
            raise ValueError(problem)
    return leaves


def _leaf_problem(api: str, arg: str, ref: str, ls: LeafSpec, t: Any) -> str | None:
    """What is wrong with tangent leaf ``t`` against ``ls``, or None. Names are formatted
    only on failure: a map is applied many times, often to pytrees of many leaves."""
    if t is None:
        if not ls.differentiable:
            return None
        return (f"{api}: {arg}{ls.path} is None, but {ref}{ls.path} is a differentiable "
                f"{ls.dtype} tensor; pass a tensor (use torch.zeros_like for a zero tangent).")
    if not isinstance(t, torch.Tensor):
        return f"{api}: {arg}{ls.path} must be a torch.Tensor, got {type(t).__name__}."
    if tuple(t.shape) != ls.shape:
        return (f"{api}: {arg}{ls.path} has shape {tuple(t.shape)}, but {ref}{ls.path} has "
                f"shape {ls.shape}.")
    if ls.differentiable and t.dtype != ls.dtype:
        return (f"{api}: {arg}{ls.path} has dtype {t.dtype}, but {ref}{ls.path} has dtype "
                f"{ls.dtype}; {arg} must have the same dtype.")
    if t.device != ls.device:
        return f"{api}: {arg}{ls.path} is on device {t.device}, but {ref}{ls.path} is on {ls.device}."
    if t.layout != torch.strided:
        return (f"{api}: {arg}{ls.path} has layout {t.layout}, but {arg} must be strided "
                f"(dense) tensors, as {ref}{ls.path} is; convert it with .to_dense().")
    return None


def _children(spec: TreeSpec) -> list:
    children = getattr(spec, "children", None)
    return list(children()) if callable(children) else list(spec.children_specs)


def _is_tuple_like(t) -> bool:
    return isinstance(t, type) and issubclass(t, tuple)


def _same_up_to_tuple_types(a: TreeSpec, b: TreeSpec) -> bool:
    """Equal structures where a namedtuple/structseq (e.g. torch.return_types) may be a tuple."""
    if a.is_leaf() or b.is_leaf():
        return a.is_leaf() and b.is_leaf()
    if a.type != b.type:
        if not (_is_tuple_like(a.type) and _is_tuple_like(b.type)):
            return False
    elif a.context != b.context:
        return False
    ca, cb = _children(a), _children(b)
    return len(ca) == len(cb) and all(_same_up_to_tuple_types(x, y) for x, y in zip(ca, cb))


def _structure_difference(tangents: tuple, spec: TreeSpec, arg: str, ref: str) -> str:
    """Name the first leaf paths where ``tangents`` and ``spec`` differ."""
    want = [keystr(kp) for kp, _ in tree_flatten_with_path(spec.unflatten([0] * spec.num_leaves))[0]]
    got = [keystr(kp) for kp, _ in tree_flatten_with_path(tangents, is_leaf=_is_none)[0]]
    missing = [p for p in want if p not in set(got)]
    extra = [p for p in got if p not in set(want)]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(arg + p for p in missing[:3])}"
                     f"{' ...' if len(missing) > 3 else ''} (present in {ref})")
    if extra:
        parts.append(f"unexpected {', '.join(arg + p for p in extra[:3])}"
                     f"{' ...' if len(extra) > 3 else ''} (not in {ref})")
    if not parts:  # same paths, different container types (e.g. list vs tuple)
        parts.append(f"same leaves but different containers: expected {spec}, got "
                     f"{tree_flatten(tangents, is_leaf=_is_none)[1]}")
    return "; ".join(parts) + "."
