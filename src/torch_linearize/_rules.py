"""The rule table: tangent equations written directly for common operators.

While ``f`` runs in the tracer's *direct* phase (``docs/design.md``, "The direct phase"),
its tensors are plain: no forward-AD dual carries a tangent. An operation with a tracked
argument reaches the tracer once, below autograd; if this table has a rule for it, the
rule runs the primal operation and writes the tangent equations itself, by calling the
tracer's recording path (``Tracer.tangent_op``) directly. Each rule writes the formula
PyTorch's forward AD would run for that operator (``tools/autograd/derivatives.yaml``),
term for term, so the recorded program is the one the dual-tensor trace records; what
is saved is forward AD's machinery around it (three to five Python round trips through
the dispatch mode per operation: the tangent operations, the size and storage queries
of ``set_fw_grad``).

A rule declines (returns :data:`DECLINE`) before it runs anything where its operator's
case is not covered (a dtype it does not handle, an untracked operand whose zero tangent
would need materializing, ...). The tracer then leaves the direct phase for good: it
gives every live tracked tensor its tangent as a forward-AD dual and runs the operation
with autograd, as every later one (``Tracer.to_dual``).

Rules see only plain strided tensors of real floating dtypes as tracked operands (the
tracer checks that before it asks); an untracked operand may be anything PyTorch
accepts there (a Python number, an integer index tensor, a tensor of another dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

aten = torch.ops.aten

__all__ = ["DECLINE", "RULES", "UNTRACKED_RESULTS"]

DECLINE = object()

Rule = Callable[[Any, Any, tuple, dict, tuple], Any]
RULES: dict[Any, Rule] = {}

# Operators whose results never carry a tangent (integer or boolean results, or
# forward AD gives none): run as primal operations, their results untracked.
UNTRACKED_RESULTS = frozenset({
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor,
    aten.lt.Scalar, aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar,
    aten.ge.Tensor, aten.ge.Scalar, aten.isnan.default, aten.isinf.default,
    aten.isfinite.default, aten.argmax.default, aten.argmin.default, aten.detach.default,
    aten.logical_not.default, aten.signbit.default,
})


def _only_first(tans: tuple) -> bool:
    return all(t is None for t in tans[1:]) and not any(
        isinstance(t, list) for t in tans[1:])


# ---------------------------------------------------------------------------- linear in arg 0
# Operators linear in their first argument, whose forward-AD formula is the operator
# itself applied to the tangent with the same other arguments ("auto_linear" and the
# views). Views keep their input alive with their entry (its base must be given its
# tangent if the trace leaves the direct phase: see Tracer.to_dual).
_LINEAR0 = (
    aten.alias.default, aten.clone.default, aten.diagonal.default, aten.expand.default,
    aten.permute.default, aten.select.int, aten.slice.Tensor, aten.squeeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.t.default, aten.transpose.int,
    aten.unsqueeze.default, aten.view.default, aten._unsafe_view.default,
    aten.unfold.default, aten.neg.default, aten.sum.default, aten.sum.dim_IntList,
    aten.mean.default, aten.mean.dim, aten.split.Tensor, aten.split_with_sizes.default,
    aten.unbind.int, aten.flip.default, aten.roll.default, aten.repeat.default,
    aten.index_select.default, aten.narrow.default, aten._reshape_alias.default,
    aten.cumsum.default,
)


def _linear0(tr, func, args, kwargs, tans):
    if not _only_first(tans):
        return DECLINE
    if kwargs.get("dtype") is not None and not kwargs["dtype"].is_floating_point:
        return DECLINE
    out = tr.primal_op(func, args, kwargs)
    tan = tr.tangent_op(func, (tans[0], *args[1:]), kwargs)
    tr.bind_result(out, tan, args[0] if func.is_view else None)
    return out


for _f in _LINEAR0:
    RULES[_f] = _linear0


def _to_copy(tr, func, args, kwargs, tans):
    dtype = kwargs.get("dtype")
    if dtype is not None and not dtype.is_floating_point:
        return DECLINE  # (integer: no tangent; complex: not handled here)
    return _linear0(tr, func, args, kwargs, tans)


RULES[aten._to_copy.default] = _to_copy


# ---------------------------------------------------------------------------- sums
def _add_sub(tr, func, args, kwargs, tans):
    # add.Tensor: self_t + maybe_multiply(other_t, alpha); sub.Tensor: self_t - ...
    if len(args) != 2:
        return DECLINE
    ta, tb = tans
    alpha = kwargs.get("alpha", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return DECLINE
    out = tr.primal_op(func, args, kwargs)
    if ta is not None and tb is not None:
        tan = tr.tangent_op(func, (ta, tb), kwargs)
    elif ta is not None:
        tan = ta
    else:
        scale = -alpha if func is aten.sub.Tensor else alpha
        tan = tb if scale == 1 else tr.tangent_op(aten.neg.default, (tb,), {}) if scale == -1 \
            else tr.tangent_op(aten.mul.Tensor, (tb, scale), {})
    tr.bind_result(out, tr.conform(tan, out))
    return out


RULES[aten.add.Tensor] = _add_sub
RULES[aten.sub.Tensor] = _add_sub


def _add_sub_scalar(tr, func, args, kwargs, tans):
    # add.Scalar / sub.Scalar: self_t
    out = tr.primal_op(func, args, kwargs)
    tr.bind_result(out, tr.conform(tans[0], out))
    return out


RULES[aten.add.Scalar] = _add_sub_scalar
RULES[aten.sub.Scalar] = _add_sub_scalar


# ---------------------------------------------------------------------------- products
def _mul(tr, func, args, kwargs, tans):
    # mul.Tensor: other_t * self_p + self_t * other_p
    if kwargs or len(args) != 2:
        return DECLINE
    a, b = args
    ta, tb = tans
    out = tr.primal_op(func, args, kwargs)
    if tb is None:
        tan = tr.tangent_op(func, (ta, b), {})
    elif ta is None:
        tan = tr.tangent_op(func, (tb, a), {})
    else:
        tan = tr.tangent_op(aten.add.Tensor, (tr.tangent_op(func, (tb, a), {}),
                                              tr.tangent_op(func, (ta, b), {})), {})
    tr.bind_result(out, tr.conform(tan, out))
    return out


RULES[aten.mul.Tensor] = _mul


def _scale_scalar(tr, func, args, kwargs, tans):
    # mul.Scalar: self_t * other; div.Scalar: self_t / other
    if kwargs or len(args) != 2:
        return DECLINE
    out = tr.primal_op(func, args, kwargs)
    tr.bind_result(out, tr.conform(tr.tangent_op(func, (tans[0], args[1]), {}), out))
    return out


RULES[aten.mul.Scalar] = _scale_scalar
RULES[aten.div.Scalar] = _scale_scalar


def _div(tr, func, args, kwargs, tans):
    # div.Tensor: (self_t - other_t * result) / other_p
    if kwargs or len(args) != 2:
        return DECLINE
    b = args[1]
    ta, tb = tans
    out = tr.primal_op(func, args, kwargs)
    if tb is None:
        tan = tr.tangent_op(func, (ta, b), {})
    else:
        prod = tr.tangent_op(aten.mul.Tensor, (tb, out), {})
        num = tr.tangent_op(aten.neg.default, (prod,), {}) if ta is None else \
            tr.tangent_op(aten.sub.Tensor, (ta, prod), {})
        tan = tr.tangent_op(func, (num, b), {})
    tr.bind_result(out, tr.conform(tan, out))
    return out


RULES[aten.div.Tensor] = _div


def _sum(tr, terms: list) -> Any:
    """The tangent ``terms[0] + terms[1]`` (one term: itself)."""
    return terms[0] if len(terms) == 1 else tr.tangent_op(aten.add.Tensor, tuple(terms), {})


def _matmul_like(tr, func, args, kwargs, tans):
    # mm / bmm: self_t @ other_p + self_p @ other_t
    if kwargs:
        return DECLINE
    a, b = args
    ta, tb = tans
    out = tr.primal_op(func, args, kwargs)
    terms = []
    if ta is not None:
        terms.append(tr.tangent_op(func, (ta, b), {}))
    if tb is not None:
        terms.append(tr.tangent_op(func, (a, tb), {}))
    tan = _sum(tr, terms)
    tr.bind_result(out, tr.conform(tan, out))
    return out


RULES[aten.mm.default] = _matmul_like
RULES[aten.bmm.default] = _matmul_like
RULES[aten.mv.default] = _matmul_like


def _addmm(tr, func, args, kwargs, tans):
    # addmm: maybe_multiply(self_t, beta) + maybe_multiply(mat1_t.mm(mat2_p), alpha)
    #        + maybe_multiply(mat1_p.mm(mat2_t), alpha)
    if len(args) != 3 or tans[0] is not None:
        return DECLINE  # (a tracked bias broadcasts: left to forward AD)
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in (beta, alpha)):
        return DECLINE
    _, m1, m2 = args
    t1, t2 = tans[1], tans[2]
    out = tr.primal_op(func, args, kwargs)
    terms = []
    if t1 is not None:
        terms.append(tr.tangent_op(aten.mm.default, (t1, m2), {}))
    if t2 is not None:
        terms.append(tr.tangent_op(aten.mm.default, (m1, t2), {}))
    if alpha != 1:
        terms = [tr.tangent_op(aten.mul.Tensor, (t, alpha), {}) for t in terms]
    tan = _sum(tr, terms)
    tr.bind_result(out, tr.conform(tan, out))
    return out


RULES[aten.addmm.default] = _addmm


# ---------------------------------------------------------------------------- pointwise
def _pointwise(coefficient: Callable, *, divide: bool = False, backward: Any = None) -> Rule:
    """A unary pointwise operator whose tangent is ``t * c`` (``t / c`` with ``divide``;
    ``backward(t, c)`` with ``backward``), ``c`` computed from the input and the result
    as forward AD computes it."""

    def rule(tr, func, args, kwargs, tans):
        if kwargs or len(args) != 1:
            return DECLINE
        x = args[0]
        out = tr.primal_op(func, args, kwargs)
        c = coefficient(tr, x, out)
        if backward is not None:
            tan = tr.tangent_op(backward, (tans[0], c), {})
        else:
            tan = tr.tangent_op(aten.div.Tensor if divide else aten.mul.Tensor, (tans[0], c), {})
        tr.bind_result(out, tr.conform(tan, out))
        return out

    return rule


def _p(tr, func, *args):
    return tr.primal_op(func, args, {})


# (formulas: derivatives.yaml, "auto_element_wise": the backward formula with grad := t)
RULES[aten.exp.default] = _pointwise(lambda tr, x, y: y)
RULES[aten.sin.default] = _pointwise(lambda tr, x, y: _p(tr, aten.cos.default, x))
RULES[aten.cos.default] = _pointwise(
    lambda tr, x, y: _p(tr, aten.neg.default, _p(tr, aten.sin.default, x)))
RULES[aten.tanh.default] = _pointwise(lambda tr, x, y: y, backward=aten.tanh_backward.default)
RULES[aten.sigmoid.default] = _pointwise(lambda tr, x, y: y,
                                         backward=aten.sigmoid_backward.default)
RULES[aten.log.default] = _pointwise(lambda tr, x, y: x, divide=True)
RULES[aten.log1p.default] = _pointwise(lambda tr, x, y: _p(tr, aten.add.Tensor, x, 1),
                                       divide=True)
RULES[aten.sqrt.default] = _pointwise(lambda tr, x, y: _p(tr, aten.mul.Tensor, y, 2),
                                      divide=True)
RULES[aten.atan.default] = _pointwise(
    lambda tr, x, y: _p(tr, aten.add.Tensor, _p(tr, aten.mul.Tensor, x, x), 1), divide=True)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
RULES[aten.erf.default] = _pointwise(lambda tr, x, y: _p(
    tr, aten.mul.Tensor, _p(tr, aten.exp.default, _p(tr, aten.neg.default, _p(
        tr, aten.pow.Tensor_Scalar, x, 2))), _TWO_OVER_SQRT_PI))


def _relu(tr, func, args, kwargs, tans):
    # relu: threshold_backward(self_t, result, 0)
    if kwargs or len(args) != 1:
        return DECLINE
    out = tr.primal_op(func, args, kwargs)
    tan = tr.tangent_op(aten.threshold_backward.default, (tans[0], out, 0), {})
    tr.bind_result(out, tr.conform(tan, out))
    return out


RULES[aten.relu.default] = _relu


def _pow_scalar(tr, func, args, kwargs, tans):
    # pow.Tensor_Scalar: pow_backward(self_t, self, exponent) =
    #   self_t * (exponent * self.pow(exponent - 1)) (exponent as a double)
    if kwargs or len(args) != 2:
        return DECLINE
    x, e = args
    if isinstance(e, bool) or not isinstance(e, (int, float)) or e == 0:
        return DECLINE
    e = float(e)
    out = tr.primal_op(func, args, kwargs)
    c = _p(tr, aten.mul.Scalar, _p(tr, aten.pow.Tensor_Scalar, x, e - 1.0), e)
    tan = tr.tangent_op(aten.mul.Tensor, (tans[0], c), {})
    tr.bind_result(out, tr.conform(tan, out))
    return out


RULES[aten.pow.Tensor_Scalar] = _pow_scalar


# ---------------------------------------------------------------------------- lists
def _cat_stack(tr, func, args, kwargs, tans):
    # cat / stack: the same operator on the tangents (every tensor tracked)
    if kwargs or not isinstance(tans[0], list) or any(t is None for t in tans[0]) \
            or any(t is not None for t in tans[1:]):
        return DECLINE
    out = tr.primal_op(func, args, kwargs)
    tan = tr.tangent_op(func, (tans[0], *args[1:]), {})
    tr.bind_result(out, tr.conform(tan, out))
    return out


RULES[aten.cat.default] = _cat_stack
RULES[aten.stack.default] = _cat_stack
