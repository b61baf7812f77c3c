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

import math
from typing import Any

import torch

from ._program import Eqn, Program, Res, Var, _takes_storage_offset
from ._residuals import STRUCTURAL_ZERO
from ._structure_cache import ResidualList, replay_memo

aten = torch.ops.aten

__all__ = ["common_subexpressions", "fold_pointwise", "forward_identities", "simplify"]


def _mutated_groups(prog: Program) -> set:
    groups = set()
    for e in prog.eqns:
        for m in e.mutates:
            groups.add(m.group)
    return groups


def _op(prog: Program, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``: tensor work on residuals (logged when the program's
    structure is being recorded for re-linearization, see ``_structure_cache``)."""
    rec = prog.recorder
    return fn(*args, **kwargs) if rec is None else rec.op(fn, *args, **kwargs)


def _decide(prog: Program, fn, *args):
    """``fn(*args)``: a decision taken from residual values (logged with its outcome when
    recording: a re-linearization re-evaluates it before reusing the program)."""
    rec = prog.recorder
    return fn(*args) if rec is None else rec.decide(fn, *args)


def _is_zero_residual(prog: Program, r: Res, cache: dict[int, bool]) -> bool:
    z = cache.get(r.index)
    if z is None:
        z = cache[r.index] = _decide(prog, _is_zero_tensor, prog.residuals[r.index])
    return z


def _is_zero_tensor(t: torch.Tensor) -> bool:
    if t._is_zerotensor():
        return True
    if t.device.type == "meta" or t.layout != torch.strided:
        return False
    if STRUCTURAL_ZERO in t.__dict__:
        return True
    if t.numel() > 64 and t.is_contiguous() and bool(t.reshape(-1)[:: t.numel() // 64].any()):
        return False  # a nonzero among a strided sample: no full pass needed
    return t.numel() == 0 or _all_zero(t)


_AMINMAX_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


def _distinct(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its broadcast (stride-0) dimensions: the same set of elements, read
    once each (an expanded 0-d zero is one element, not 260 000)."""
    stride = t.stride()
    if 0 not in stride or t.numel() == 0:
        return t
    return t.as_strided([1 if s == 0 else n for n, s in zip(t.shape, stride)], stride)


def _distinct_numel(t: torch.Tensor) -> int:
    """The number of elements of :func:`_distinct` ``(t)``."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n


def _all_zero(t: torch.Tensor) -> bool:
    """Every element of ``t`` is zero (NaN is not). For real floating tensors the
    minimum, then the maximum only if the minimum is 0 (``amin`` runs about twice as
    fast as ``aminmax`` and 10x as fast as ``any`` on CPU): both ends are 0 exactly
    when all elements are, and a NaN propagates into them."""
    t = _distinct(t)
    if t.dtype in _AMINMAX_DTYPES:
        return torch.amin(t).item() == 0 and torch.amax(t).item() == 0
    return not bool(t.any())


# The operators _identity_candidate can match (by id: the tuple keeps them alive).
_IDENTITY_FNS = (aten.add.Tensor, aten.sub.Tensor, aten._to_copy.default, aten.clone.default,
                 aten.expand.default, aten.view.default, aten._unsafe_view.default,
                 aten.reshape.default, aten.alias.default, aten.detach.default)
_IDENTITY_FN_IDS = frozenset(id(f) for f in _IDENTITY_FNS)


def _identity_source(prog: Program, e: Eqn, zero_cache: dict[int, bool]) -> Var | None:
    """If ``e`` returns its (single) tangent input unchanged, that input Var."""
    out = e.outs
    if id(e.fn) not in _IDENTITY_FN_IDS or not isinstance(out, Var) or e.poison is not None \
            or e.mutates:
        return None
    src = _identity_candidate(prog, e, zero_cache)
    # The replacement must have the same layout: later views may depend on strides. And
    # a copy or sum resolves a lazily conjugated/negated source, a view does not.
    if src is None or src.stride != out.stride or (src.lazy and not out.lazy):
        return None
    return src


def _identity_candidate(prog: Program, e: Eqn, zero_cache: dict[int, bool]) -> Var | None:
    out = e.outs
    fn, a, kw = e.fn, e.args, e.kwargs
    x = a[0] if a else None
    if fn in (aten.add.Tensor, aten.sub.Tensor) and len(a) == 2 and kw.get("alpha", 1) == 1:
        for var, other, ok in ((a[0], a[1], True), (a[1], a[0], fn is aten.add.Tensor)):
            if (ok and isinstance(var, Var) and var.shape == out.shape
                    and var.dtype == out.dtype and _is_zero_literal(prog, other, zero_cache)):
                return var  # (x + 0, x - 0: a zero residual or a zero number)
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
    return _rewrite_walk(prog, identities=True, cse=False)[0]


# --------------------------------------------------------------------------- pointwise folding

# Elementwise operations that are linear (over C, so complex works) in the arguments at
# the given positions; every other tensor argument must be a residual. A chain or DAG
# of them that depends on one tangent value ``b`` computes ``C * b`` for a coefficient
# ``C`` that is its value at ``b = 1``: the whole region becomes one multiplication.
# Selections (where, masked_fill, threshold_backward, hardtanh_backward, ...) are not
# here: they return an exact 0 where a product with a zero coefficient gives NaN for a
# non-finite incoming value (masked attention and masked reductions rely on that, and
# their transposes receive NaN cotangents from NaN residuals).
_POINTWISE_LINEAR: dict = {
    aten.mul.Tensor: (0, 1),
    aten.mul.Scalar: (0,),
    aten.div.Tensor: (0,),
    aten.div.Scalar: (0,),
    aten.neg.default: (0,),
    aten.add.Tensor: (0, 1),
    aten.sub.Tensor: (0, 1),
    aten.clone.default: (0,),
    aten.alias.default: (0,),
    aten.tanh_backward.default: (0,),
    aten.sigmoid_backward.default: (0,),
    aten.leaky_relu_backward.default: (0,),
    aten.gelu_backward.default: (0,),
    aten.silu_backward.default: (0,),
    aten.softplus_backward.default: (0,),
    aten.mish_backward.default: (0,),
    aten.elu_backward.default: (0,),
    # conjugation is anti-linear: tracked as a parity per base (value = sum C * conj(b))
    aten._conj.default: (0,),
    aten.conj_physical.default: (0,),
}
# (by id, for the per-equation lookup: the dict above keeps the operators alive)
_POINTWISE_LINEAR_BY_ID = {id(f): pos for f, pos in _POINTWISE_LINEAR.items()}
_CONJUGATING = {aten._conj.default, aten.conj_physical.default}
# Arguments (by position) that are added to the tangent: they must be zero for linearity.
_ADDITIVE = {aten.add.Tensor: (0, 1), aten.sub.Tensor: (0, 1)}
# The same tables by id, for per-equation lookups (an OpOverload hashes in Python; the
# tables keep the operators alive, so their ids stay theirs).
_CONJUGATING_IDS = frozenset(id(f) for f in _CONJUGATING)
_ADDITIVE_BY_ID = {id(f): pos for f, pos in _ADDITIVE.items()}


def _is_zero_literal(prog: Program, x, cache: dict[int, bool]) -> bool:
    if isinstance(x, Res):
        return _is_zero_residual(prog, x, cache)
    return isinstance(x, (int, float, complex)) and not isinstance(x, bool) and x == 0


def fold_pointwise(prog: Program, emitted_out: list[Eqn] | None = None) -> int:
    """Rewrite pointwise-linear regions as a few fused multiply-adds.

    A value computed from tangent values ``b_1..b_k`` (all of the same shape) by the
    operations of ``_POINTWISE_LINEAR`` only is ``sum_i C_i * b_i`` with
    coefficients ``C_i`` (its value at ``b_i = 1``, the others 0), computed once
    here. Emitted as ``b_1 * C_1``, then ``addcmul``/``add`` per further term; a
    unit coefficient costs no multiplication, a constant one is a Python scalar.
    Coefficients are evaluated with 0-d ones, so they keep the (broadcast) shape
    of the residuals they come from; a region is rewritten only if that lowers its
    operation count and does not grow the stored coefficients.

    Returns the number of values rewritten (dead equations are left to DCE); the
    equations it emitted are appended to ``emitted_out`` if given.
    """
    mutated = _mutated_groups(prog)
    zero_cache: dict[int, bool] = {}
    # var id -> (base var id -> parity (1: conjugated), number of ops, residual elements read)
    info: dict[int, tuple[dict, int, int]] = {}
    bases: dict[int, Var] = {}
    producer: dict[int, Eqn] = {}
    for e in prog.eqns:
        out = e.outs
        pos = _POINTWISE_LINEAR_BY_ID.get(id(e.fn))
        if pos is None or not isinstance(out, Var) or e.mutates or e.poison is not None:
            continue
        if out.group in mutated or any(isinstance(v, (Var, list, tuple)) for v in e.kwargs.values()):
            continue
        ok, bs, ops, res = True, {}, 1, 0
        for i, a in enumerate(e.args):
            if isinstance(a, Var):
                if i not in pos or a.shape != out.shape or a.dtype != out.dtype or a.group in mutated:
                    ok = False
                    break
                if a.id in info:
                    b, n, r = info[a.id]
                    if len(b) > 1 and not _exact_on_sums(e, i):
                        # Scaling a combination of several tangent values, (b1 - b2) * c,
                        # would be distributed as b1*c - b2*c: when b1 == b2 (mean(t) of
                        # one element, or any relation the program implies) the traced
                        # value is exactly 0 but the folded one is a rounding error of
                        # b1*c. Only exact scalings (powers of two, signs) cross a sum.
                        ok = False
                        break
                    ops += n
                    res += r
                else:
                    b = {a.id: 0}
                    bases[a.id] = a
                for bid, par in b.items():
                    if bs.setdefault(bid, par) != par:
                        ok = False  # would need both b and conj(b)
                if not ok:
                    break
            elif isinstance(a, Res):
                if i in _ADDITIVE_BY_ID.get(id(e.fn), ()) and \
                        not _is_zero_literal(prog, a, zero_cache):
                    ok = False  # a constant added to a tangent: not linear
                    break
                res += prog.residuals[a.index].numel()
            elif isinstance(a, (list, tuple)) or (
                    i in _ADDITIVE_BY_ID.get(id(e.fn), ()) and
                    not _is_zero_literal(prog, a, zero_cache)):
                ok = False
                break
        if ok and bs:
            if id(e.fn) in _CONJUGATING_IDS:
                bs = {bid: 1 - par for bid, par in bs.items()}
            info[out.id] = (bs, ops, res)
            producer[out.id] = e

    if not info:
        return 0
    # Exits: region values used by something outside the region, or returned.
    external: set[int] = set()
    uses: dict[int, int] = {}
    for e in prog.eqns:
        in_region = isinstance(e.outs, Var) and e.outs.id in info
        for v in e.in_vars():
            uses[v.id] = uses.get(v.id, 0) + 1
            if not in_region and v.id in info:
                external.add(v.id)
    external |= {o.id for o in prog.outputs if isinstance(o, Var) and o.id in info}

    rewrites: dict[int, list[Eqn]] = {}
    for o in prog.outputs:
        if isinstance(o, Var):
            uses[o.id] = uses.get(o.id, 0) + 1
    memo: dict[int, dict] = {}
    owned: set[int] = set()
    mixed = _MixedSigns(prog.recorder)
    probed: dict = {}  # (the accuracy probes' region values, shared between exits)
    position = {v: k for k, v in enumerate(producer)}  # producer is in program order
    for vid in sorted(external):
        bset, ops, res_elems = info[vid]
        if ops < 2 or ops <= len(bset) - 1:
            continue  # folded, it would still need one operation per further base
        out = producer[vid].outs
        coeffs = _traced_coefficient(prog, producer, bset, vid)
        # Without cancellation inside a coefficient the folded sum is as accurate as
        # the traced one (see _MixedSigns); otherwise probe it.
        exact_terms = coeffs is None
        if coeffs is None:
            coeffs = _region_coefficients(prog, producer, position, vid, memo, owned, uses, mixed)
        if coeffs is not None:
            terms = [(bases[bid], coeffs.get(bid, 0), bset[bid]) for bid in sorted(bset)]
            if not _representable(terms, out.dtype):
                continue
            plan = _plan_terms(prog, terms, out)
            # one operation per term except an unscaled first one, plus conjugations
            n_ops = sum(1 for _, kind, _ in plan if kind != "first") + sum(
                1 for (_, par), _, _ in plan if par)
            stored = sum(c.numel() for _, kind, c in plan if isinstance(c, torch.Tensor))
            if (n_ops < ops and stored <= max(res_elems, 1) and (
                    (exact_terms and vid not in mixed.vars and len(terms) <= _FEW_TERMS)
                    or _accurate(prog, producer, bases, bset, vid, terms, probed))):
                emitted = _emit_terms(prog, plan, out)
                if _keeps_layout(prog, emitted, out):
                    rewrites[vid] = emitted
    if not rewrites:
        return 0
    new = []
    for e in prog.eqns:
        if isinstance(e.outs, Var) and e.outs.id in rewrites:
            new.extend(rewrites[e.outs.id])
        else:
            new.append(e)
    prog.eqns = new
    if emitted_out is not None:
        for eqns in rewrites.values():
            emitted_out.extend(eqns)
    return len(rewrites)


# float16 spans 6e-5 .. 65504 (normal numbers): a folded coefficient, the product of
# a chain's scalings (loss scaling: x * 256 ... * 256), leaves that range where each
# step of the traced program stays inside it (t * 256 * 256 with t = 1e-3), and the
# folded map would give inf or 0 (or lose digits to subnormals) where torch.func.jvp
# does not. Its tensor coefficients, computed in float16, are never folded; a number
# (computed in Python's double precision) is, within the range checked below.
_NARROW_RANGE = frozenset({torch.float16, torch.complex32})
# the precision a kernel multiplies a tensor of each dtype by a Python number in
_OPMATH = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
           torch.complex32: torch.float32, torch.complex64: torch.float32,
           torch.complex128: torch.float64}


def _representable(terms, dtype: torch.dtype) -> bool:
    """Whether a region of ``dtype`` may be folded into these ``(base, coefficient,
    parity)`` terms without leaving the dtype's range: a number coefficient must be zero
    or a finite normal number of the precision the kernels multiply in (``1e40``, the
    folded ``(x * 1e20) * 1e20``, is inf in float32 where ``t * 1e20 * 1e20`` need not
    be); a tensor coefficient must not be float16 (``_NARROW_RANGE``). Tensor
    coefficients of wider dtypes are products of the traced program's own factors and
    overflow only where those factors are beyond 1e19 (float32; docs/design.md,
    "Folding")."""
    narrow = dtype in _NARROW_RANGE
    info = None
    for _, c, _ in terms:
        if isinstance(c, torch.Tensor):
            if narrow:
                return False
            continue
        if c == 0:
            continue
        if info is None:
            info = torch.finfo(_OPMATH.get(dtype, dtype)) if dtype.is_floating_point or \
                dtype.is_complex else None
            if info is None:
                return True
        m = abs(c)
        if not (info.tiny <= m <= info.max):  # (False for NaN)
            return False
    return True


def _exact_scale(x) -> bool:
    """Multiplying by ``x`` is exact in floating point (0, a signed power of two, +-1j)."""
    if not _is_number(x):
        return False
    if isinstance(x, complex):
        return x in (1, -1, 1j, -1j, 0)
    if x == 0:
        return True
    if not math.isfinite(x):
        return False
    return math.frexp(abs(x))[0] == 0.5


_EXACT_ON_SUMS = {aten.neg.default, aten.clone.default, aten.alias.default, aten._conj.default,
                  aten.conj_physical.default}
_EXACT_ON_SUMS_IDS = frozenset(id(f) for f in _EXACT_ON_SUMS)


def _exact_on_sums(e: Eqn, i: int) -> bool:
    """Whether ``e`` applied to argument ``i`` involves no inexact scaling of it."""
    fn = e.fn
    if id(fn) in _EXACT_ON_SUMS_IDS:
        return True
    if fn in (aten.add.Tensor, aten.sub.Tensor):
        return i == 0 or _exact_scale(e.kwargs.get("alpha", 1))
    if fn in (aten.mul.Tensor, aten.mul.Scalar):
        other = e.args[1 - i] if len(e.args) == 2 else None
        return _exact_scale(other)
    if fn in (aten.div.Tensor, aten.div.Scalar):
        other = e.args[1] if len(e.args) == 2 else None
        return _exact_scale(other) and other != 0
    return False


def _same_layout(shape, a, b) -> bool:
    """Strides ``a`` and ``b`` describe the same layout of ``shape`` (size-1 dims ignored)."""
    return all(x == y for n, x, y in zip(shape, a, b) if n != 1)


def _contiguous_strides(shape) -> tuple:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _row_major(shape, stride) -> bool:
    """Strides non-increasing over the dimensions of size > 1 (row-major order, gaps allowed)."""
    last = None
    for n, st in zip(shape, stride):
        if n == 1:
            continue
        if last is not None and st > last:
            return False
        last = st
    return True


def _all_contiguous_like(prog: Program, eqns: list[Eqn], out: Var) -> bool:
    """Fast path of :func:`_keeps_layout`: the output is contiguous and every operand is
    a row-major tensor of the output's shape (slices included) or 0-d/a number. Then
    TensorIterator keeps the dimension order and allocates a contiguous result."""
    shape = tuple(out.shape)
    if not _same_layout(shape, tuple(out.stride), _contiguous_strides(shape)):
        return False
    for e in eqns:
        for a in (*e.args, *e.kwargs.values()):
            if isinstance(a, Var):
                if tuple(a.shape) != shape or a.stride is None or not _row_major(shape, a.stride):
                    return False
            elif isinstance(a, Res):
                r = prog.residuals[a.index]
                if r.dim() and (tuple(r.shape) != shape or not _row_major(shape, r.stride())):
                    return False
            elif isinstance(a, (list, tuple)):
                return False
    return True


def _keeps_layout(prog: Program, eqns: list[Eqn], out: Var) -> bool:
    """Whether the folded equations produce ``out`` with its traced strides.

    The result layout of a pointwise op follows its inputs' layouts, so a folded
    ``b * C`` can come out, e.g., transposed where the traced chain came out
    contiguous; later views depend on the traced strides. Evaluated on the meta
    device; the intermediate Vars get the strides found.
    """
    if len(out.shape) < 2:
        return True
    if out.stride is None:
        return False
    if _all_contiguous_like(prog, eqns, out):
        return True
    meta: dict[int, torch.Tensor] = {}

    def m(a):
        if isinstance(a, Var):
            t = meta.get(a.id)
            if t is None:
                t = torch.empty_strided(a.shape, a.stride, dtype=a.dtype, device="meta")
            return t
        if isinstance(a, Res):
            r = prog.residuals[a.index]
            return torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device="meta")
        return a

    try:
        for e in eqns:
            r = e.fn(*[m(a) for a in e.args], **e.kwargs)
            meta[e.outs.id] = r
            if e.outs is not out:
                e.outs.stride = tuple(r.stride())
    except Exception:  # an op without a meta kernel: keep the traced program
        return False
    r = meta.get(out.id)
    return r is not None and _same_layout(out.shape, tuple(r.stride()), tuple(out.stride))


def _is_number(c) -> bool:
    return isinstance(c, (int, float, complex)) and not isinstance(c, bool)


def _traced_coefficient(prog, producer, bset, vid) -> dict | None:
    """The coefficient of a one-input region, as computed by the trace itself.

    Tangent placeholders of the program inputs are ones, so the traced value of a
    region whose only base is an input *is* its coefficient (same operations, same
    order, times 1). Used when it has the region's full shape (the 0-d evaluation
    would not give a smaller, broadcast one); saves recomputing
    a product of full-size residuals.
    """
    if len(bset) != 1 or not prog.trace_values:
        return None
    (bid, parity), = bset.items()
    value = prog.trace_values.get(vid)
    if parity or value is None or not any(v.id == bid for v in prog.inputs):
        return None
    out = producer[vid].outs
    if value is None or tuple(value.shape) != tuple(out.shape) or value.dtype != out.dtype:
        return None
    shape: tuple = ()
    stack, seen = [vid], set()
    while stack:  # the broadcast shape of the region's residuals
        v = stack.pop()
        e = producer.get(v)
        if e is None or v in seen:
            continue
        seen.add(v)
        for a in e.args:
            if isinstance(a, Var):
                stack.append(a.id)
            elif isinstance(a, Res):
                shape = torch.broadcast_shapes(shape, prog.residuals[a.index].shape)
    if tuple(shape) != tuple(out.shape):
        return None
    value = value.detach()
    if prog.recorder is not None:
        prog.recorder.traced(vid, value)
    return {bid: value}


def _region_coefficients(prog, producer, position, vid, memo, owned, uses, mixed=None):
    """Coefficients ``{base id: C_b}`` of region value ``vid`` (value = sum_b C_b * b).

    One pass over the region in program order. A coefficient is a Python number
    (exact; it stands for a 0-d tensor of the value's dtype) while only numbers
    meet it, so sums of unit-scaled bases (stencils, residual connections) cost no
    tensor work; otherwise a tensor, computed by the operation itself with the
    coefficient in place of the tangent (0-d, so it keeps the broadcast shape of
    the residuals). Products of coefficients this pass allocated, read by nothing
    else, are updated in place. ``memo`` caches coefficients across exits of one
    fold; ``owned`` holds ids of tensors this pass allocated and may overwrite.
    Returns None if an operation cannot be evaluated on a 0-d coefficient.
    """
    need: list[int] = []
    stack, seen = [vid], set()
    while stack:
        v = stack.pop()
        if v in seen or v in memo or v not in producer:
            continue
        seen.add(v)
        need.append(v)
        stack.extend(a.id for a in producer[v].args if isinstance(a, Var))
    order = sorted(need, key=position.__getitem__)
    try:
        with torch.no_grad():
            for v in order:
                e = producer[v]
                arg_coeffs = [None if not isinstance(a, Var) else
                              memo.get(a.id, {a.id: 1}) for a in e.args]
                memo[v] = _eqn_coefficients(prog, e, arg_coeffs, owned, uses, mixed)
    except RuntimeError:  # an op that does not broadcast a 0-d coefficient
        return None
    return memo[vid]


_NUMBER_TYPES = frozenset({int, float, complex})  # exactly (subclasses take the general path)


def _is_real_number(x) -> bool:
    return type(x) in (int, float)


_FEW_TERMS = 16  # more terms than this: the probe also checks their summation order


class _MixedSigns:
    """Which region values may have lost accuracy in their coefficients.

    Folding rewrites ``b*c1 + b*c2`` (two paths from one base ``b``) as
    ``b*(c1 + c2)``. Where ``c1`` and ``c2`` have one sign everywhere that is exact up
    to a rounding of the result's own size; where they may have opposite signs the
    sum can cancel, and the traced and folded values differ by roundings of the
    (larger) parts, so :func:`_folding_is_accurate` probes such regions. Products,
    quotients and sums of *different* bases never cancel inside a coefficient.
    ``vars``: ids of values with such a combination at or upstream of them.
    """

    def __init__(self, recorder=None):
        self.vars: set[int] = set()
        self._signs: dict[int, tuple] = {}  # id(tensor) -> (tensor, version, sign)
        self._rec = recorder

    def sign(self, c) -> int | None:
        """+1: every element >= 0; -1: every element <= 0; 0: all zero; None: mixed,
        NaN, complex or unknown."""
        if isinstance(c, (bool, complex)):
            return None
        if isinstance(c, (int, float)):
            return None if c != c else (c > 0) - (c < 0)
        if not isinstance(c, torch.Tensor) or c.is_complex() or c.numel() == 0 or \
                _distinct_numel(c) == 1:
            # (one distinct element: the probe decides instead. A scalar problem's
            # coefficients change sign from point to point; the probe's verdict does not,
            # so a re-linearization can reuse the program, see _structure_cache.)
            return None
        hit = self._signs.get(id(c))
        if hit is not None and hit[0] is c and hit[1] == c._version:
            return hit[2]
        sign = _sign_of(c) if self._rec is None else self._rec.decide(_sign_of, c)
        self._signs[id(c)] = (c, c._version, sign)
        return sign

    def same_direction(self, x, y, flip: bool) -> bool:
        """Whether ``x`` and ``(-1 if flip else 1) * y`` never have opposite signs."""
        sx = self.sign(x)
        if sx == 0:
            return True
        sy = self.sign(y)
        if sy == 0:
            return True
        if sx is None or sy is None:
            return False
        return sx == (-sy if flip else sy)


def _sign_of(c: torch.Tensor) -> int | None:
    """:meth:`_MixedSigns.sign` of a real, non-empty tensor."""
    d = _distinct(c)
    fast = d.dtype in _AMINMAX_DTYPES
    lo = float(torch.amin(d) if fast else d.min())
    if lo != lo:
        return None  # NaN (the minimum propagates it)
    if lo > 0:
        return 1  # (one reduction: the common case of a positive coefficient)
    hi = float(torch.amax(d) if fast else d.max())
    return 0 if lo == hi == 0 else 1 if lo >= 0 else -1 if hi <= 0 else None


def _eqn_coefficients(prog, e: Eqn, arg_coeffs: list, owned: set[int], uses: dict,
                      mixed: _MixedSigns | None = None) -> dict:
    var_pos = [i for i, c in enumerate(arg_coeffs) if c is not None]
    if mixed is not None and any(
            isinstance(a, Var) and a.id in mixed.vars for a in e.args):
        mixed.vars.add(e.outs.id)
        mixed = None  # (already marked)
    bids: dict[int, None] = {}
    for i in var_pos:
        bids.update(dict.fromkeys(arg_coeffs[i]))
    out: dict = {}
    fn = e.fn
    add_sub = fn is aten.add.Tensor or fn is aten.sub.Tensor
    if add_sub:  # sums of number coefficients (stencils): _number_rule's formula inline
        alpha = e.kwargs.get("alpha", 1)
        c0 = arg_coeffs[0] if arg_coeffs and arg_coeffs[0] is not None else None
        c1 = arg_coeffs[1] if len(arg_coeffs) > 1 and arg_coeffs[1] is not None else None
        add = fn is aten.add.Tensor
    for bid in bids:
        if add_sub:
            x = c0.get(bid, 0) if c0 is not None else 0
            y = c1.get(bid, 0) if c1 is not None else 0
            if mixed is not None and c0 is not None and c1 is not None and bid in c0 and \
                    bid in c1 and (not _is_real_number(alpha) or not mixed.same_direction(
                        x, y, (not add) != (alpha < 0))):
                mixed.vars.add(e.outs.id)
                mixed = None
            if type(x) in _NUMBER_TYPES and type(y) in _NUMBER_TYPES:
                try:
                    out[bid] = x + alpha * y if add else x - alpha * y
                    continue
                except ArithmeticError:
                    pass  # (as below: the tensor rule)
        vals = {i: arg_coeffs[i].get(bid, 0) for i in var_pos}
        try:
            c = _number_rule(e, vals)
        except ArithmeticError:  # Python raises where IEEE gives inf/nan: use tensors
            c = NotImplemented
        if c is NotImplemented:
            c = _tensor_rule(prog, e, vals, owned, uses)
        out[bid] = c
    return out


def _literal(e: Eqn, i: int):
    """Non-Var argument ``i`` as a Python number, or None (residual, absent, non-number)."""
    if i >= len(e.args):
        return None
    a = e.args[i]
    return a if _is_number(a) else None


def _number_rule(e: Eqn, vals: dict):
    """The coefficient when every coefficient involved is a Python number (else NotImplemented).

    Non-Var arguments of additive positions are zero (checked when the region was
    built), so they contribute nothing.
    """
    if not all(_is_number(c) for c in vals.values()):
        return _zero_shortcut(e, vals)
    fn = e.fn
    x, y = vals.get(0, 0), vals.get(1, 0)
    if fn is aten.add.Tensor:
        return x + e.kwargs.get("alpha", 1) * y
    if fn is aten.sub.Tensor:
        return x - e.kwargs.get("alpha", 1) * y
    if fn is aten.neg.default:
        return -x
    if fn in (aten.clone.default, aten.alias.default):
        return x
    if id(fn) in _CONJUGATING_IDS:
        return x.conjugate() if isinstance(x, complex) else x
    if fn in (aten.mul.Scalar, aten.mul.Tensor, aten.div.Scalar, aten.div.Tensor):
        other = _literal(e, 1) if 0 in vals else _literal(e, 0)
        if other is None or (fn in (aten.div.Scalar, aten.div.Tensor) and (1 in vals or other == 0)):
            return NotImplemented  # (x / 0 follows IEEE in the tensor rule)
        c = vals[0] if 0 in vals else vals[1]
        return c * other if fn in (aten.mul.Scalar, aten.mul.Tensor) else c / other
    return NotImplemented


def _zero_shortcut(e: Eqn, vals: dict):
    """``C + 0``, ``0 + C``, ``C - 0``: reuse the tensor coefficient (no allocation)."""
    if e.fn not in (aten.add.Tensor, aten.sub.Tensor) or len(vals) != 2:
        return NotImplemented
    x, y = vals[0], vals[1]
    alpha = e.kwargs.get("alpha", 1)
    if _is_number(y) and y == 0 and isinstance(x, torch.Tensor):
        return x
    if _is_number(x) and x == 0 and isinstance(y, torch.Tensor) and alpha == 1 and \
            e.fn is aten.add.Tensor:
        return y
    return NotImplemented


def _tensor_rule(prog, e: Eqn, vals: dict, owned: set[int], uses: dict):
    fn = e.fn
    if fn is aten.mul.Tensor and list(vals) == [0] and not e.kwargs and _is_number(vals[0]) \
            and vals[0] == 1 and len(e.args) == 2 and isinstance(e.args[1], Res):
        r = prog.residuals[e.args[1].index]
        if r.dtype == e.args[0].dtype and r.dim() > 0:
            return r  # C * r with C == 1: the residual itself (as below, before any tensor work)
    args = []
    for i, a in enumerate(e.args):
        if i in vals:
            c = vals[i]
            args.append(_op(prog, torch.full, (), c, dtype=a.dtype, device=a.device)
                        if _is_number(c) else c)
        elif isinstance(a, Res):
            args.append(prog.residuals[a.index])
        else:
            args.append(a)
    if fn in (aten.mul.Tensor, aten.div.Tensor) and list(vals) == [0] and not e.kwargs:
        c, r = args[0], args[1]
        if isinstance(r, torch.Tensor):
            # C * r with C == 1: the residual itself (no copy); never overwritten.
            if fn is aten.mul.Tensor and _is_number(vals[0]) and vals[0] == 1 and \
                    r.dtype == e.args[0].dtype and r.dim() > 0:
                return r
            # C (ours, read by nothing else) *= r: no new allocation.
            if id(c) in owned and uses.get(e.args[0].id, 0) == 1 and \
                    torch.result_type(c, r) == c.dtype and \
                    torch.broadcast_shapes(c.shape, r.shape) == c.shape:
                return _op(prog, torch.Tensor.mul_ if fn is aten.mul.Tensor else torch.Tensor.div_,
                           c, r)
    elif fn is aten.mul.Tensor and list(vals) == [1] and isinstance(args[0], torch.Tensor) and \
            _is_number(vals[1]) and vals[1] == 1 and args[0].dtype == e.args[1].dtype and \
            args[0].dim() > 0 and not e.kwargs:
        return args[0]
    result = _op(prog, fn, *args, **e.kwargs)
    if isinstance(result, torch.Tensor):
        for c in vals.values():  # the result may alias an input (clone/alias are not views,
            if result is c:       # but be safe): then neither may be overwritten
                owned.discard(id(c))
                return result
        owned.add(id(result))
    return result


_probes: dict[tuple, tuple] = {}


def _probe(shape: tuple, numel: int, n_bases: int, device) -> tuple:
    """Sampled positions (flat and per dimension) and random base values for
    :func:`_folding_is_accurate`; deterministic (seed 0), so cached per shape. The
    last entry caches the base values converted to each dtype asked for."""
    key = (shape, n_bases, str(device))
    hit = _probes.get(key)
    if hit is not None:
        return hit
    gen = torch.Generator().manual_seed(0)
    k = min(numel, 1024)
    idx = torch.randint(numel, (k,), generator=gen) if numel > k else torch.arange(numel)
    # Uniform in [-1, 1): any spread of signs and magnitudes exposes cancellation (and
    # CPU float64 ``rand`` is several times cheaper than ``randn``).
    xs = (torch.rand(n_bases, k, generator=gen, dtype=torch.float64) * 2 - 1).to(device)
    idx = idx.to(device)
    coords = tuple(c.to(device) for c in _unravel(idx.cpu(), shape)) if shape else ()
    if len(_probes) > 256:
        _probes.clear()
    _probes[key] = (idx, coords, xs, {})
    return _probes[key]


def _unravel(idx: torch.Tensor, shape: tuple) -> list[torch.Tensor]:
    """``torch.unravel_index(idx, shape)`` (row-major coordinates of flat positions),
    without its first-call import of sympy (about 0.4 s)."""
    if idx.numel() == 0:
        return [idx.clone() for _ in shape]
    coords, rem = [], idx
    for n in reversed(shape):
        coords.append(rem % n)
        rem = rem // n
    return coords[::-1]


def _probe_values(xs: torch.Tensor, converted: dict, dtype) -> list:
    """The probe's base values in ``dtype`` (read only; cached with the probe)."""
    v = converted.get(dtype)
    if v is None:
        v = converted[dtype] = [x.to(dtype) if not dtype.is_complex else
                                torch.complex(x, x.flip(0)).to(dtype) for x in xs]
    return v


def _accurate(prog: Program, producer, bases, bset, vid, terms, probed: dict) -> bool:
    """:func:`_folding_is_accurate` on the program's residuals; when recording, a decision
    over a snapshot of the region (later passes replace equations' arguments). ``probed``:
    the region values the probes of one ``fold_pointwise`` computed (see there) and,
    under ``"frozen"``, its snapshot of the equations."""
    rec = prog.recorder
    if rec is None:
        return _folding_is_accurate(prog.residuals, producer, bases, bset, vid, terms, probed)
    # (one snapshot per fold_pointwise call, shared by its exits: their regions overlap,
    # and nothing changes an equation until the rewrites are applied)
    region = probed.setdefault("frozen", {})
    stack = [vid]
    while stack:
        v = stack.pop()
        e = producer.get(v)
        if e is None or v in region:
            continue
        region[v] = _FrozenEqn(e.fn, e.args, e.kwargs, e.outs)
        stack.extend(a.id for a in e.args if isinstance(a, Var))
    shape = [(b, None if isinstance(c, torch.Tensor) else c, par) for b, c, par in terms]
    coeffs = [c for _, c, _ in terms if isinstance(c, torch.Tensor)]

    now = [probed]  # (shared only while deciding here: a replay has other residuals)

    def check(residuals: list, coeffs: list) -> bool:
        it = iter(coeffs)
        ts = [(b, next(it) if c is None else c, par) for b, c, par in shape]
        shared = now[0] if now[0] is not None else replay_memo()
        return _folding_is_accurate(residuals, region, bases, bset, vid, ts, shared)

    try:
        return rec.decide(check, ResidualList(prog.residuals), coeffs)
    finally:
        now[0] = None


class _FrozenEqn:
    """The parts of an equation a region evaluation reads, as they were."""

    __slots__ = ("args", "fn", "kwargs", "outs")

    def __init__(self, fn, args, kwargs, outs):
        self.fn, self.args, self.kwargs, self.outs = fn, args, kwargs, outs


def _folding_is_accurate(residuals: list, producer, bases, bset, vid, terms,
                         probed: dict | None = None) -> bool:
    """Reassociating sums can lose precision (cancellation); check on random inputs.

    The region is evaluated as traced and as the folded sum of terms on random
    base values; the rewrite is kept only if they agree to a few ulps of the
    result's scale. ``probed`` keeps the region values computed for earlier exits with
    the same probe (the same bases, shape and dtypes: the probe is deterministic), so a
    chain of n exits (a time stepper's states) costs n evaluations, not n^2/2.
    """
    if len(terms) == 1 and not _has_additive(producer, vid):
        return True  # a pure product: a few roundings, no cancellation
    # The region is elementwise: probing a random subset of positions suffices.
    shape = next(iter(bases[b] for b in bset)).shape
    numel = 1
    for d in shape:
        numel *= d
    device = next(iter(bases[b] for b in bset)).device
    idx, coords, xs, converted = _probe(tuple(shape), numel, len(bset), device)
    k = idx.numel()
    vals = {}
    for i, bid in enumerate(bset):  # (row i for base i)
        vals[bid] = _probe_values(xs, converted, bases[bid].dtype)[i]

    def gather(r: torch.Tensor) -> torch.Tensor:
        # The k sampled positions of r broadcast to `shape`, without expanding r.
        if r.dim() == 0:
            return r
        if r.shape == shape and not r.is_complex():
            return torch.take(r, idx)  # (row-major flat positions: the same values)
        lead = len(shape) - r.dim()
        index = tuple(coords[lead + j] if n != 1 else 0 for j, n in enumerate(r.shape))
        g = r[index]
        return g if g.dim() else g.expand(k)

    cache = {} if probed is None else probed.setdefault(
        (tuple(shape), str(device), tuple((b, bases[b].dtype) for b in bset)), {})
    traced = _region_eval(residuals, producer, vid, vals, gather, cache)
    if traced is None:
        return False
    # sum(c * v for the terms), without the multiplications by an exact 1 and the
    # leading 0 + (the same values: the base values are finite).
    folded = None
    for b, c, par in terms:
        v = vals[b.id].conj() if par else vals[b.id]
        if not (type(c) in (int, float) and c == 1 and not v.is_complex()):
            v = (c if _is_number(c) else gather(c)) * v
        folded = v if folded is None else folded + v
    if folded is None:
        folded = 0
    scale = float(traced.abs().max()) if traced.numel() else 0.0
    # (max propagates NaN: a finite scale means every element is finite)
    if not math.isfinite(scale) or scale == 0.0:
        return bool(torch.equal(torch.isfinite(traced), torch.isfinite(folded)))
    eps = torch.finfo(traced.dtype).eps if (traced.is_floating_point() or traced.is_complex()) else 0
    return float((traced - folded).abs().max()) <= 64 * eps * scale


def _has_additive(producer, vid) -> bool:
    seen, stack = set(), [vid]
    while stack:
        v = stack.pop()
        e = producer.get(v)
        if e is None or v in seen:
            continue
        seen.add(v)
        if id(e.fn) in _ADDITIVE_BY_ID:
            return True
        stack.extend(a.id for a in e.args if isinstance(a, Var))
    return False


def _region_eval(residuals: list, producer, vid, base_values: dict[int, torch.Tensor], gather,
                 cache: dict | None = None):
    """Evaluate a region on (flat, subsampled) base values; residuals go through ``gather``;
    ``cache``: values already computed on the same base values (var id -> value)."""
    env = (residuals, producer, base_values, gather, {} if cache is None else cache)
    try:
        with torch.no_grad():
            return _region_value(producer[vid].outs, env)
    except RuntimeError:
        return None


def _region_value(v: Var, env: tuple) -> torch.Tensor:
    """:func:`_region_eval`'s value of ``v``, memoized in ``env``'s cache. (Module-level:
    a recursive closure would be a reference cycle holding the probe's tensors.)"""
    residuals, producer, base_values, gather, cache = env
    if v.id not in cache:
        e = producer.get(v.id)
        if e is None:
            cache[v.id] = base_values[v.id]
        else:
            args = [_region_value(a, env) if isinstance(a, Var) else
                    gather(residuals[a.index]) if isinstance(a, Res) else a
                    for a in e.args]
            cache[v.id] = e.fn(*args, **e.kwargs)
    return cache[v.id]


def _constant_value(c: torch.Tensor):
    """The single value of a tensor whose elements are all equal, else None (one pass)."""
    if c.numel() == 0:
        return None
    c = _distinct(c)
    if c.is_complex():
        re, im = _constant_value(c.real), _constant_value(c.imag)
        return None if re is None or im is None else complex(re, im)
    if c.dtype == torch.bool:
        c = c.to(torch.uint8)
    if c.numel() > 64:  # most coefficients vary: reject from a strided sample first
        flat = c.reshape(-1) if c.is_contiguous() else None
        if flat is not None:
            a, b = flat[:2].tolist()
            if a != b:  # (or NaN): not constant, whatever the rest holds
                return None
            sample = flat[:: max(1, flat.numel() // 64)]
            if not bool((sample == sample[0]).all()):
                return None
    lo, hi = torch.aminmax(c)
    if bool(lo != hi) or not bool(torch.isfinite(lo)) if c.is_floating_point() else bool(lo != hi):
        return None
    return lo.item()


def _plan_terms(prog: Program, terms, out: Var):
    """Order terms (unit coefficients first) and classify each coefficient."""
    plan = []
    for b, c, par in terms:
        b = (b, par)
        # A coefficient of one distinct element stays a tensor, its expansion dropped
        # (broadcasting restores it): such coefficients are "constant" at every point
        # (all of a scalar problem's are), and baking their values in would tie the
        # program to this point (see _structure_cache).
        if _is_number(c):
            value = c
        elif _distinct_numel(c) == 1:
            value = None
            if c.numel() > 1:
                c = _op(prog, _distinct, c)
        else:
            value = _decide(prog, _constant_value, c)
        if value is None:
            kind, coef = "scaled", c
        elif value == 1:
            kind, coef = "unit", None
        elif value == 0:
            # Kept, not dropped: 0 * b is NaN where b is not finite (a NaN/inf residual
            # upstream, or a non-finite tangent), as in the traced program.
            kind, coef = "scalar", 0.0
        elif not isinstance(value, complex) and (_is_number(c) or c.is_floating_point()):
            kind, coef = "scalar", float(value)
        else:
            kind, coef = "scaled", c if isinstance(c, torch.Tensor) else \
                _op(prog, torch.full, (), c, dtype=out.dtype, device=out.device)
        plan.append((b, kind, coef))
    plan.sort(key=lambda p: p[1] != "unit")
    if plan:
        b, kind, coef = plan[0]
        plan[0] = (b, "first" if kind == "unit" else "first-scaled", coef)
    return plan


def _residual_index(prog: Program) -> dict[int, int]:
    """id(residual) -> its first slot, kept up to date as the passes append residuals
    (a scan per folded term was n^2 on a program with n folds)."""
    res = prog.residuals
    cached = prog.__dict__.get("_residual_index")
    if cached is None or cached[0] is not res or cached[1] > len(res):
        cached = prog.__dict__["_residual_index"] = [res, 0, {}]
    index = cached[2]
    for i in range(cached[1], len(res)):
        index.setdefault(id(res[i]), i)
    cached[1] = len(res)
    return index


def _emit_terms(prog: Program, plan, out: Var) -> list[Eqn]:
    eqns: list[Eqn] = []
    if not plan:  # the value is identically zero
        return [Eqn(aten.zeros.default, (list(out.shape),),
                    {"dtype": out.dtype, "device": out.device}, out)]

    def res(c):
        i = _residual_index(prog).get(id(c))
        if i is not None and prog.residuals[i] is c:  # a traced residual used as is
            return Res(i)
        prog.residuals.append(_op(prog, torch.Tensor.contiguous, c))
        if prog.residual_names:
            prog.residual_names.append("folded pointwise coefficient")
        return Res(len(prog.residuals) - 1)

    def new_var():
        return Var(out.shape, out.dtype, out.stride, group=None, device=out.device)

    acc = None
    for i, ((b, par), kind, coef) in enumerate(plan):
        if par:  # an anti-linear term: conjugate the base first
            cb = Var(b.shape, b.dtype, b.stride, group=b.group, device=b.device, lazy=True)
            eqns.append(Eqn(aten._conj.default, (b,), {}, cb))
            b = cb
        last = i == len(plan) - 1
        dst = out if last else new_var()
        if kind == "first":
            if last:
                eqns.append(Eqn(aten.clone.default, (b,), {}, dst))
            acc = b if not last else dst
            continue
        if kind == "first-scaled":
            c = coef if isinstance(coef, float) else res(coef)
            fn = aten.mul.Scalar if isinstance(coef, float) else aten.mul.Tensor
            eqns.append(Eqn(fn, (b, c), {}, dst))
        elif kind == "unit":
            eqns.append(Eqn(aten.add.Tensor, (acc, b), {}, dst))
        elif kind == "scalar":
            eqns.append(Eqn(aten.add.Tensor, (acc, b), {"alpha": coef}, dst))
        else:
            eqns.append(Eqn(aten.addcmul.default, (acc, b, res(coef)), {}, dst))
        acc = dst
    for e in eqns:
        e.outs.group = e.outs.group if e.outs is out else None
    return eqns


# --------------------------------------------------------------------------- CSE


_NAN_KEY = ("nan",)
# Literal types keyed as (type, value) without further checks (hashable, compared by value).
_PLAIN_LITERALS = frozenset({int, float, bool, complex, str, type(None), torch.dtype,
                             torch.device, torch.layout, torch.memory_format})


def _key_of(x):
    """A hashable key for an argument pytree: equal exactly when the arguments are the same
    Vars (a bare int: their id), residual slots, list/tuple structure and literals of the
    same type and bits (so 1, 1.0 and True differ, 0.0 and -0.0 differ; NaN equals NaN)."""
    t = type(x)
    if t is Var:
        return x.id
    if t is Res:  # (compares and hashes by slot)
        return x
    if t is tuple or t is list:
        return (t, *[_key_of(y) for y in x])
    if t in _PLAIN_LITERALS:
        if t is float:  # float.hex tells -0.0 from 0.0 (== does not) and is exact
            return (t, x.hex())
        if t is complex:
            return (t, x.real.hex(), x.imag.hex())
        return (t, x)
    if isinstance(x, Var):
        return ("v", x.id)
    if isinstance(x, Res):
        return ("r", x.index)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, *(_key_of(y) for y in x))
    if isinstance(x, float) and x != x:
        return _NAN_KEY
    try:
        hash(x)
    except TypeError:
        return ("id", id(x))
    return ("l", type(x).__name__, x)


def _cse_key(e: Eqn) -> tuple:
    """``(fn, args key, kwargs key)``; cached on the equation while its arguments stay the
    same objects (passes replace ``args``/``kwargs``, never mutate them), so a later
    round keys the equations it did not touch for free."""
    c = e.__dict__.get("_cse_key")
    if c is not None and c[0] is e.args and c[1] is e.kwargs:
        return c[2]
    kw = e.kwargs
    # (the operator by id: the equation holds it; an OpOverload hashes in Python)
    k = (id(e.fn), _key_of(e.args), _key_of(tuple(sorted(kw.items()))) if kw else ())
    e.__dict__["_cse_key"] = (e.args, kw, k)
    return k


_deterministic: dict = {}  # id(OpOverload) -> (it, not tagged nondeterministic_seeded)


def _deterministic_op(fn) -> bool:
    hit = _deterministic.get(id(fn))
    if hit is not None and hit[0] is fn:
        return hit[1]
    d = torch.Tag.nondeterministic_seeded not in fn.tags
    _deterministic[id(fn)] = (fn, d)  # (holding the operator keeps its id its own)
    return d


def common_subexpressions(prog: Program) -> int:
    """Reuse the result of an identical earlier pure operation (same op, same arguments)."""
    return _rewrite_walk(prog, identities=False, cse=True)[1]


def _rewrite_walk(prog: Program, identities: bool = True, cse: bool = True) -> tuple[int, int]:
    """:func:`forward_identities` and :func:`common_subexpressions` in one walk.

    Returns (identities removed, duplicates removed). Equivalent to running the two
    passes one after the other: an equation is first tested as an identity (on
    arguments renamed by both), then looked up as a duplicate. A duplicate is
    renamed to an earlier equal value of the same shape and strides (and, being the
    same operation on the same arguments, dtype and storage), so renaming it first
    changes no identity decision.
    """
    mutated = _mutated_groups(prog)
    if identities:
        input_groups = {v.group for v in prog.inputs}
        outputs = {id(o) for o in prog.outputs if isinstance(o, Var)}
        zero_cache: dict[int, bool] = {}
        # Groups read by an operation taking an absolute storage offset (as_strided):
        # a copy's result there cannot become its source, which may begin elsewhere in
        # a larger storage (x[1:].clone().as_strided(..., offset) reads the copy's own).
        absolute = _offset_readers(prog)
    seen: dict[tuple, Var] = {}
    rename: dict[int, Var] = {}
    kept: list[Eqn] = []
    n_ident = n_cse = 0
    OpOverload = torch._ops.OpOverload

    for e in prog.eqns:
        if rename:  # (unchanged args keep their identity: Eqn caches its leaves)
            e.args = tuple(_renamed(a, rename) for a in e.args)
            e.kwargs = {k: _renamed(v, rename) for k, v in e.kwargs.items()}
        out = e.outs
        if identities:
            src = _identity_source(prog, e, zero_cache)
            if src is not None and out.group != src.group and out.group in absolute:
                src = None
            if src is not None and out.group not in mutated and src.group not in mutated:
                if id(out) in outputs and src.group in input_groups:
                    # Never hand the caller's own tangent back as an output: a copy
                    # (still cheaper than the original op, and no residual).
                    if e.fn is not aten.clone.default:
                        e = Eqn(aten.clone.default, (src,), {}, out, name="")
                        n_ident += 1
                else:
                    rename[out.id] = src
                    n_ident += 1
                    continue
        if cse and isinstance(out, Var) and not e.mutates and e.poison is None \
                and isinstance(e.fn, OpOverload) and out.group not in mutated \
                and _deterministic_op(e.fn):
            pure = True
            if mutated:
                for v in e.in_vars():
                    if v.group in mutated:
                        pure = False
                        break
            if pure:
                k = _cse_key(e)
                prev = seen.get(k)
                if prev is not None and prev.shape == out.shape and prev.stride == out.stride:
                    rename[out.id] = prev
                    n_cse += 1
                    continue
                seen[k] = out
        kept.append(e)
    prog.eqns = kept
    if rename:
        prog.outputs = [_renamed(o, rename) if isinstance(o, Var) else o for o in prog.outputs]
    return n_ident, n_cse


def _renamed(x: Any, rename: dict) -> Any:
    """``x`` with Vars replaced per ``rename`` (Var id -> Var). (Module-level: a recursive
    closure is a reference cycle, garbage for the cyclic collector after every call.)"""
    if isinstance(x, Var):
        return rename.get(x.id, x)
    if isinstance(x, (list, tuple)):
        return type(x)(_renamed(y, rename) for y in x)
    return x


def _offset_readers(prog: Program) -> dict:
    """Group -> the number of operations taking an absolute storage offset (``as_strided``,
    ``set_``, ...) that read a Var of it."""
    readers: dict = {}
    for e in prog.eqns:
        if _takes_storage_offset(e.fn):
            for g in {v.group for v in e.in_vars()}:
                readers[g] = readers.get(g, 0) + 1
    return readers


def functionalize_copies(prog: Program) -> int:
    """``b2 = copy_(b, r)`` -> ``b2`` renamed to ``r``, where nothing reads ``b``'s storage
    after the copy but through ``b2``.

    Forward AD writes an in-place operation's tangent back with ``copy_``
    (``copy_(b, op(clone(b)))``), so a function written with ``mul_``/``add_`` leaves a
    program three times as long as its out-of-place form, whose buffers are written in
    place, which keeps identities and folding away. Renaming the copy's result to ``r``
    is exact where, after the copy, no Var of ``b``'s storage is read but ``b2`` (and
    what later operations make of it), ``r`` is read by the copy only, no other Var of
    ``r``'s storage is read either (later writes into ``b2`` then write ``r``'s storage,
    which nothing else reads), both have one layout, and no operation reads an absolute
    storage offset of either storage (``b2`` and ``r`` may begin at different offsets).
    Groups are storages, not addresses (``_program.exact_groups``), so after a rename
    the Vars of ``b``'s group made after the copy (its result, views of it, writes into
    it) are ``r``'s storage. Returns the number of copies removed.
    """
    eqns = prog.eqns
    reads: dict[int, list[int]] = {}
    members: dict[Any, list[Var]] = {}  # group -> its Vars
    produced: dict[int, int] = {}  # var id -> position of its equation (inputs: -1)
    absolute = _offset_readers(prog)
    for v in prog.inputs:
        members.setdefault(v.group, []).append(v)
        produced[v.id] = -1
    for k, e in enumerate(eqns):
        for v in e.in_vars():
            reads.setdefault(v.id, []).append(k)
        for v in e.out_vars():
            members.setdefault(v.group, []).append(v)
            produced[v.id] = k
    n = len(eqns)
    for o in prog.outputs:
        if isinstance(o, Var):
            reads.setdefault(o.id, []).append(n)
    fixed = {v.group for v in prog.inputs}

    def read_after(group, k: int, skip) -> bool:
        for w in members.get(group, ()):
            if w not in skip and produced.get(w.id, -1) <= k and \
                    any(p > k for p in reads.get(w.id, ())):
                return True
        return False

    rename: dict[int, Var] = {}
    dead: set[int] = set()
    for k, e in enumerate(eqns):
        if rename:
            e.args = tuple(_renamed(a, rename) for a in e.args)
            e.kwargs = {kk: _renamed(v, rename) for kk, v in e.kwargs.items()}
            if e.mutates:
                e.mutates = tuple(rename.get(m.id, m) for m in e.mutates)
        if e.fn is not aten.copy_.default or len(e.args) != 2 or e.kwargs or \
                not isinstance(e.outs, Var) or e.poison is not None:
            continue
        dst, src = e.args
        out = e.outs
        if not (isinstance(dst, Var) and isinstance(src, Var)):
            continue
        g, gs = dst.group, src.group
        if g is None or gs is None or g == gs or g in fixed or gs in fixed \
                or g in absolute or gs in absolute:
            continue
        if (src.shape != dst.shape or src.dtype != dst.dtype or src.stride != dst.stride
                or src.device != dst.device or src.lazy or out.lazy):
            continue
        if reads.get(src.id) != [k] or read_after(g, k, (out,)) or read_after(gs, k, (src,)):
            continue
        if any(produced.get(w.id, -1) > k for w in members[gs]):
            continue  # (r's storage seen again after the copy: not through what it read)
        dead.add(id(e))
        rename[out.id] = src
        # Groups are storages (exact_groups): what b's storage holds after the copy is the
        # copy's result, its views and later writes into it, which are now r's storage.
        moved = [w for w in members[g] if produced.get(w.id, -1) > k]
        for w in moved:
            w.group = gs
        members[g] = [w for w in members[g] if produced.get(w.id, -1) <= k and w is not out]
        members[gs] = members[gs] + moved
        reads[src.id] = reads.get(out.id, [])
    if not dead:
        return 0
    prog.eqns = [e for e in eqns if id(e) not in dead]
    prog.outputs = [_renamed(o, rename) if isinstance(o, Var) else o for o in prog.outputs]
    return len(dead)


def _elementwise_but_buffers(prog: Program) -> bool:
    """Every operation of ``prog`` is elementwise (``_batch``'s broadcasting table, or a
    ``clone``), except the promoted buffers' ``fresh_zeros``/``as_strided``/``copy_``."""
    from ._batch import elementwise

    roots: set[int] = set()
    views: set[int] = set()
    for e in prog.eqns:
        first = e.args[0] if e.args else None
        if e.name in ("fresh_zeros", "fresh_copy"):
            roots.update(v.id for v in e.out_vars())
            continue
        if e.fn is aten.as_strided.default and isinstance(first, Var) and first.id in roots:
            views.update(v.id for v in e.out_vars())
            continue
        if e.fn is aten.copy_.default and isinstance(first, Var) and first.id in views:
            continue
        if e.fn is aten.clone.default and not e.mutates:
            continue
        if not elementwise(e):
            return False
    return True


def collapse_fresh_copies(prog: Program) -> int:
    """``buf = zeros(n); view = as_strided(buf, ...); copy_(view, src)`` -> ``clone(src)``.

    Forward AD sets a tangent that needs a different layout (e.g. a conjugate view)
    by copying it into a fresh buffer; the tracer records that as a promoted buffer.
    When the buffer is only that copy, it is a plain clone, whose result is free of
    in-place aliasing and can take part in folding. The view may be part of the buffer
    (a primal that is a row of a larger tensor gets a tangent buffer the size of that
    tensor's storage): where no operation reads an absolute storage offset of it, the
    rest of the buffer is never seen, and a contiguous view is a contiguous clone.
    """
    # Every alias of a promoted buffer is made from its root Var, so "the root has one
    # use (the full view) and the view one use (the copy)" means nothing else sees it.
    uses: dict[int, int] = {}
    for e in prog.eqns:
        for v in e.in_vars():
            uses[v.id] = uses.get(v.id, 0) + 1
    for o in prog.outputs:
        if isinstance(o, Var):
            uses[o.id] = uses.get(o.id, 0) + 1
    by_out = {e.outs.id: e for e in prog.eqns if isinstance(e.outs, Var)}
    absolute = _offset_readers(prog)  # (the view below is one such reader)
    rewrites: dict[int, Eqn] = {}
    dead: set[int] = set()
    layout_free: bool | None = None  # (computed when first needed, see below)
    for e in prog.eqns:
        if e.fn is not aten.copy_.default or len(e.args) != 2 or not isinstance(e.outs, Var):
            continue
        view, src = e.args
        if not (isinstance(view, Var) and isinstance(src, Var)) or uses.get(view.id) != 1:
            continue
        ve = by_out.get(view.id)
        if ve is None or ve.fn is not aten.as_strided.default or len(ve.args) != 4:
            continue
        root, shape, stride, offset = ve.args
        if not isinstance(root, Var) or uses.get(root.id) != 1:
            continue
        re_ = by_out.get(root.id)
        if re_ is None or re_.name != "fresh_zeros":
            continue
        numel = 1
        for d in shape:
            numel *= d
        contiguous = tuple(torch.empty(tuple(shape), device="meta").stride())
        if tuple(src.shape) != tuple(shape) or src.dtype != view.dtype:
            continue
        if tuple(stride) != contiguous:
            # A strided view (a primal that is a column of a matrix): a contiguous clone
            # has other strides than the traced ones, which only a program of elementwise
            # operations (besides such buffers) cannot tell apart.
            if layout_free is None:
                layout_free = _elementwise_but_buffers(prog)
            if not layout_free:
                continue
        if (tuple(root.shape) != (numel,) or offset != 0) and absolute.get(root.group, 0) > 1:
            continue  # (another operation reads where in the buffer the view began)
        # The clone's result keeps the buffer's group: later views of it (and in-place
        # writes through them) must still be seen as aliasing it.
        rewrites[id(e)] = Eqn(aten.clone.default, (src,), {"memory_format": torch.contiguous_format},
                              e.outs)
        dead.update((id(ve), id(re_)))
    if not rewrites:
        return 0
    prog.eqns = [rewrites.get(id(e), e) for e in prog.eqns if id(e) not in dead]
    return len(rewrites)


def simplify(prog: Program) -> None:
    """Run all passes to a fixed point (at most four rounds).

    Gives the program the full rounds would (``collapse_fresh_copies``,
    ``forward_identities``, ``common_subexpressions``, ``fold_pointwise``, dead-code
    elimination, repeated while any of them changes something), but after the first
    round runs a pass only if what changed since it last ran can give it work:

    * ``collapse_fresh_copies`` only matches the tracer's ``fresh_zeros`` buffers,
      which no pass creates: without one it is skipped altogether.
    * An identity is an equation of its own (``x + zero residual``, a same-layout
      copy or view) whose status no other rewrite changes (renames keep shape,
      dtype, strides and storage); new candidates are a ``clone`` that folding
      emitted (a region that is just its base) or one that collapsing made.
    * The identity/CSE walk leaves no duplicates behind (renames are applied as it
      goes); new ones need new equations (folding's), removed ones (DCE) or renames.
    * Folding is deterministic: it is re-run only if the program changed since.
    """
    from ._program import dead_code_elimination

    before = [o.id if isinstance(o, Var) else None for o in prog.outputs]
    _simplify(prog, dead_code_elimination)
    _keep_outputs_distinct(prog, before)


def _keep_outputs_distinct(prog: Program, before: list) -> None:
    """Outputs that were different values before the passes stay different tensors: where
    the passes merged two (``y`` and ``y.clone()``, ``2 * x`` and ``x * 2``), the later
    output is a copy, so that writing into one result in place leaves the other alone
    (as ``torch.func.jvp``'s results)."""
    first: dict[int, int] = {}  # var id after -> var id before, of the first output
    for k, (o, was) in enumerate(zip(prog.outputs, before)):
        if not isinstance(o, Var) or was is None:
            continue
        seen = first.setdefault(o.id, was)
        if seen != was:
            copy = Var(o.shape, o.dtype, o.stride, group=None, device=o.device)
            prog.eqns.append(Eqn(aten.clone.default, (o,), {}, copy))
            prog.outputs[k] = copy


def _simplify(prog: Program, dead_code_elimination) -> None:
    # Only the tracer names a buffer "fresh_zeros" (no pass makes one).
    fresh = any(e.name == "fresh_zeros" for e in prog.eqns)
    copies = any(e.fn is aten.copy_.default for e in prog.eqns)
    walk_ident = walk_cse = run_fold = True
    for rnd in range(4):
        collapsed = collapse_fresh_copies(prog) if fresh else 0
        if copies:
            collapsed += functionalize_copies(prog)
        if collapsed:  # a new clone, and a buffer no longer written in place
            walk_ident = walk_cse = run_fold = True
        renamed = 0
        if walk_ident or walk_cse:
            renamed = sum(_rewrite_walk(prog, identities=walk_ident, cse=walk_cse))
        emitted: list[Eqn] = []
        folded = fold_pointwise(prog, emitted) if run_fold or renamed else 0
        if rnd and not (collapsed or renamed or folded):
            break  # nothing changed: the program is the last round's (DCE included)
        n = len(prog.eqns)
        dead_code_elimination(prog)
        if not (collapsed or renamed or folded):
            break
        removed = len(prog.eqns) != n
        walk_ident = any(e.fn is aten.clone.default for e in emitted)
        walk_cse = walk_ident or bool(folded) or removed
        run_fold = bool(folded) or removed
