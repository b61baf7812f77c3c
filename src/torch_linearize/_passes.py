"""Program simplification passes (each ``Program -> None``, in place).

Run after dead-code elimination, before code generation:

* :func:`forward_identities` removes operations that return their tangent
  input unchanged: ``x + 0`` (a residual that is identically zero, as forward-AD
  formulas produce for inputs without tangents), ``_to_copy``/``clone`` to the
  same dtype/device/layout, ``expand``/``view`` to the same shape, ``alias``.

A rewrite that makes two values share a buffer is applied only when neither
buffer is written in place anywhere in the program, so eager aliasing semantics
are preserved, and never when it would return (an alias of) a caller's input
tangent as an output.
"""

from __future__ import annotations

import torch

from ._program import Eqn, Program, Res, Var

aten = torch.ops.aten

__all__ = ["forward_identities"]


def _mutated_groups(prog: Program) -> set:
    groups = set()
    for e in prog.eqns:
        for m in e.mutates:
            groups.add(m.group)
    return groups


def _is_zero_residual(prog: Program, r: Res, cache: dict[int, bool]) -> bool:
    z = cache.get(r.index)
    if z is None:
        t = prog.residuals[r.index]
        if t._is_zerotensor():
            z = True
        elif t.device.type == "meta" or t.layout != torch.strided:
            z = False
        else:
            z = t.numel() == 0 or not bool(t.any())
        cache[r.index] = z
    return z


def _identity_source(prog: Program, e: Eqn, zero_cache: dict[int, bool]) -> Var | None:
    """If ``e`` returns its (single) tangent input unchanged, that input Var."""
    out = e.outs
    if not isinstance(out, Var) or e.poison is not None or e.mutates:
        return None
    src = _identity_candidate(prog, e, zero_cache)
    # The replacement must have the same layout: later views may depend on strides.
    return src if src is not None and src.stride == out.stride else None


def _identity_candidate(prog: Program, e: Eqn, zero_cache: dict[int, bool]) -> Var | None:
    out = e.outs
    fn, a, kw = e.fn, e.args, e.kwargs
    x = a[0] if a else None
    if fn in (aten.add.Tensor, aten.sub.Tensor) and len(a) == 2 and kw.get("alpha", 1) == 1:
        for var, other, ok in ((a[0], a[1], True), (a[1], a[0], fn is aten.add.Tensor)):
            if (ok and isinstance(var, Var) and isinstance(other, Res)
                    and var.shape == out.shape and var.dtype == out.dtype
                    and _is_zero_residual(prog, other, zero_cache)):
                return var
        return None
    if not isinstance(x, Var) or x.shape != out.shape or x.dtype != out.dtype:
        return None
    if fn is aten._to_copy.default and len(a) == 1:
        if kw.get("layout", torch.strided) != torch.strided or kw.get("non_blocking", False):
            return None
        if kw.get("memory_format") not in (None, torch.preserve_format):
            return None
        if "dtype" in kw and kw["dtype"] != x.dtype:
            return None
        return x
    if fn is aten.clone.default and kw.get("memory_format") in (None, torch.preserve_format):
        return x
    if fn in (aten.expand.default, aten.view.default, aten._unsafe_view.default,
              aten.reshape.default) and list(a[1]) == list(x.shape):
        return x
    if fn in (aten.alias.default, aten.detach.default):
        return x
    return None


def forward_identities(prog: Program) -> int:
    """Remove identity operations; returns how many were removed."""
    mutated = _mutated_groups(prog)
    input_groups = {v.group for v in prog.inputs}
    outputs = {id(o) for o in prog.outputs if isinstance(o, Var)}
    rename: dict[int, Var] = {}
    zero_cache: dict[int, bool] = {}
    kept: list[Eqn] = []

    def sub(x):
        if isinstance(x, Var):
            return rename.get(x.id, x)
        if isinstance(x, (list, tuple)):
            return type(x)(sub(y) for y in x)
        return x

    removed = 0
    for e in prog.eqns:
        e.args = tuple(sub(a) for a in e.args)
        e.kwargs = {k: sub(v) for k, v in e.kwargs.items()}
        src = _identity_source(prog, e, zero_cache)
        if src is not None:
            out = e.outs
            if out.group not in mutated and src.group not in mutated:
                if id(out) in outputs and src.group in input_groups:
                    # Never hand the caller's own tangent back as an output: a copy
                    # (still cheaper than the original op, and no residual).
                    if e.fn is not aten.clone.default:
                        e = Eqn(aten.clone.default, (src,), {}, out, name="")
                        removed += 1
                else:
                    rename[out.id] = src
                    removed += 1
                    continue
        kept.append(e)
    prog.eqns = kept
    prog.outputs = [sub(o) if isinstance(o, Var) else o for o in prog.outputs]
    return removed
