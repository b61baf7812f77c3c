"""Tracing: run ``f`` once on forward-AD dual tensors and record the tangent program.

See ``docs/design.md`` ("Tracing") for the full story. In short:

* ``f`` runs once, inside a forward-AD level, on dual tensors whose tangents are
  *placeholder* tensors. PyTorch's own forward-AD formulas then compute tangents
  with ordinary aten operations, which reach :class:`Tracer` (a
  ``TorchDispatchMode``) like any other operation.
* A tensor is *tracked* when it holds a tangent value: a placeholder, or the
  output of an operation with a tracked input. Operations without tracked inputs
  are primal (or residual) work: they run for real, once. Operations with a
  tracked input are recorded as :class:`~torch_linearize._program.Eqn`; their
  untracked tensor arguments become residuals.
* Aliasing and mutation follow eager semantics. Writes into pre-existing buffers
  are made safe by *promotion* (a fresh copy per application) and residuals
  about to be written are snapshotted first (copy-on-write).
"""

from __future__ import annotations

import struct
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode,
    _pop_mode_temporarily,
)
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _forward_ad
from ._errors import LinearizeError, NoForwardADError, NonLinearTangentError
from ._forward_ad import unpack_dual
from ._passes import _POINTWISE_LINEAR, _POINTWISE_LINEAR_BY_ID, _is_real_number
from ._program import Eqn, Res, Var
from ._residuals import STRUCTURAL_ZERO, ResidualTable, ctx_tensors, snapshot_ctx, storage_key
from ._rules import DECLINE, RULES, UNTRACKED_RESULTS

aten = torch.ops.aten
C = torch._C

__all__ = ["Tracer", "current_tracer"]

_ATTR = "_torch_linearize_var"
# On a plain tensor of f during the direct phase: (token, its tangent, the tensor a view
# was taken of, kept alive with it); see Tracer.direct
_DIRECT = "_torch_linearize_tangent"
DIRECT = True  # (off: f runs on forward-AD duals from its first operation, for tests)

# Operations that move tangent *values* into Python: never linear.
_DATA_READS = {
    aten._local_scalar_dense.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten.item.default,
}

# Deterministic factories whose tensor arguments only supply metadata: their outputs
# do not depend on tangent *values*, so they are constants (residuals) even when an
# argument is tracked. Residuals made this way are "suspect": a program that adds
# one to a tangent would be affine, so such programs are checked (J(0) == 0).
_VALUE_INDEPENDENT = {
    "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full",
    "new_empty", "new_empty_strided", "_new_zeros_with_same_feature_meta",
}

_UNINITIALIZED = {"empty_like", "new_empty", "new_empty_strided"}

# Pointwise/reduction operations that are not linear in any tensor argument.
_NONLINEAR = {
    "abs", "acos", "acosh", "angle", "asin", "asinh", "atan", "atan2", "atanh", "ceil", "clamp",
    "clamp_max", "clamp_min", "cos", "cosh", "digamma", "elu", "erf", "erfc", "erfinv",
    "exp", "exp2", "expm1", "floor", "fmax", "fmin", "frac", "gelu", "hardsigmoid", "hardswish",
    "hardtanh", "i0", "igamma", "igammac", "leaky_relu", "lgamma", "log", "log10", "log1p",
    "log2", "log_sigmoid_forward", "logit", "logsumexp", "_log_softmax", "maximum", "minimum",
    "mish", "mvlgamma", "polygamma", "pow", "reciprocal", "relu", "round", "rsqrt",
    "sgn", "sigmoid", "sign", "silu", "sin", "sinc", "sinh", "_softmax", "softplus", "sqrt",
    "tan", "tanh", "trunc", "special_entr", "linalg_vector_norm", "norm", "std", "var",
    "sort", "topk", "max", "min", "amax", "amin", "median", "mode", "kthvalue",
}

# Bilinear operations: recorded only when at most one of these positional
# arguments is tracked; two tracked operands multiply tangents together.
_BILINEAR = {
    "mul": (0, 1), "div": (0, 1), "mm": (0, 1), "bmm": (0, 1), "mv": (0, 1), "matmul": (0, 1),
    "dot": (0, 1), "vdot": (0, 1), "outer": (0, 1), "ger": (0, 1), "addmm": (1, 2),
    "addbmm": (1, 2), "baddbmm": (1, 2), "addmv": (1, 2), "addr": (1, 2), "addcmul": (1, 2),
    "_convolution": (0, 1), "convolution": (0, 1), "kron": (0, 1), "linalg_cross": (0, 1),
    "cross": (0, 1),
}
# Operations linear only in some arguments: a tracked tensor elsewhere is non-linear.
_LINEAR_ONLY_IN = {
    "div": (0,), "addcdiv": (0, 1), "linalg_solve": (1,), "_linalg_solve_ex": (1,), "xlogy": (0,),
}


@dataclass(frozen=True)
class _OpInfo:
    name: str
    write_args: tuple  # ((position, name, is_list), ...)
    fresh_outputs: bool  # outputs never alias inputs -> new storages
    random: bool
    returns_tensor: bool  # False for metadata queries (is_same_size, ...) and data reads
    custom: bool  # an operator outside aten/prims (torch.library custom ops, extensions)
    # Derived once per operator (the checks of every call read only these):
    passthrough: bool = False  # returns no tensor, reads no data, writes nothing: run as is
    data_read: bool = False  # in _DATA_READS
    linalg: bool = False  # linalg kernel: may build complex temporaries (conj keys)
    value_independent: bool = False  # name in _VALUE_INDEPENDENT
    uninitialized: bool = False  # name in _UNINITIALIZED
    nonlinear: bool = False  # (in-place-stripped) name in _NONLINEAR
    bilinear: tuple | None = None  # _BILINEAR positions
    linear_only_in: tuple | None = None  # _LINEAR_ONLY_IN positions
    # (operator-keyed tables, answered once here: OpOverload hashes in Python)
    additive: bool = False  # in _ADDITIVE
    zero_product: bool = False  # in _ZERO_PRODUCTS
    shape_only: bool = False  # in _SHAPE_ONLY
    # what runs the operator: its C++ handle (OpOverload.__call__ is a Python frame that
    # calls it), or the operator itself for anything else a mode may receive
    call: Any = None


# id(operator) -> (operator, info); the operator is kept, so its id stays its own.
_op_infos: dict[int, tuple[Any, _OpInfo]] = {}


def _op_info(func) -> _OpInfo:
    hit = _op_infos.get(id(func))
    if hit is not None and hit[0] is func:
        return hit[1]
    schema = func._schema
    writes = []
    for pos, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            is_list = "[]" in str(a.type) or "List" in str(a.type)
            writes.append((pos if not a.kwarg_only else None, a.name, is_list))
    fresh = all(r.alias_info is None for r in schema.returns)
    random = torch.Tag.nondeterministic_seeded in getattr(func, "tags", ())
    base = schema.name.split("::")[-1]
    returns_tensor = any("Tensor" in str(r.type) for r in schema.returns)
    custom = getattr(func, "namespace", "aten") not in ("aten", "prims", "debugprims", "rngprims")
    nl_base = base[:-1] if base.endswith("_") else base
    info = _OpInfo(
        base, tuple(writes), fresh, random, returns_tensor, custom,
        # (an operator that writes in place is never one: _foreach_mul_ and mutating custom
        # ops return nothing, but their writes must be seen)
        passthrough=not returns_tensor and not writes and func not in _DATA_READS,
        data_read=func in _DATA_READS,
        linalg=func.__name__.startswith(("linalg_", "_linalg")),
        value_independent=base in _VALUE_INDEPENDENT,
        uninitialized=base in _UNINITIALIZED,
        nonlinear=nl_base in _NONLINEAR or nl_base.lstrip("_") in _NONLINEAR,
        bilinear=_BILINEAR.get(nl_base),
        linear_only_in=_LINEAR_ONLY_IN.get(nl_base),
        additive=func in _ADDITIVE,
        zero_product=func in _ZERO_PRODUCTS,
        shape_only=func in _SHAPE_ONLY,
        call=func._op if isinstance(func, torch._ops.OpOverload) else func,
    )
    _op_infos[id(func)] = (func, info)
    return info


# Forward AD's "efficient zero" tensors are *structural* zeros (0 * nan = 0). PyTorch
# implements their arithmetic with Python meta code (dozens of dispatches per op) and
# some kernels even crash on them under a dispatch mode (mul.Scalar segfaults in 2.13).
# So the tracer evaluates operations on them itself:
# * operations whose result is zero when the zero argument is zero (products): a new
#   structural zero of the result's shape and dtype (computed on the meta device);
# * anything else (sums, copies, ...): the zero is replaced by an expanded 0-d zero (no
#   memory) and the operation runs normally; the ``x + 0`` this leaves in the program
#   is removed by the passes.
_ZERO_PRODUCTS = {
    aten.mul.Tensor: (0, 1), aten.mul.Scalar: (0,), aten.div.Tensor: (0,),
    aten.div.Scalar: (0,), aten.mm.default: (0, 1), aten.mv.default: (0, 1),
    aten.bmm.default: (0, 1), aten.matmul.default: (0, 1), aten.dot.default: (0, 1),
    aten.outer.default: (0, 1), aten.neg.default: (0,), aten.sum.default: (0,),
    aten.sum.dim_IntList: (0,), aten.mean.dim: (0,), aten.cumsum.default: (0,),
    aten.conj_physical.default: (0,), aten._conj.default: (0,), aten.clone.default: (0,),
    aten.expand.default: (0,), aten.view.default: (0,), aten._unsafe_view.default: (0,),
    aten.reshape.default: (0,), aten.permute.default: (0,), aten.t.default: (0,),
    aten.transpose.int: (0,), aten.squeeze.dim: (0,), aten.unsqueeze.default: (0,),
    aten.squeeze.default: (0,), aten.squeeze.dims: (0,), aten.sub.Tensor: (),
    aten.add.Tensor: (),
}


def _tensor_args(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (b for b in a if isinstance(b, torch.Tensor))


_ZERO_ATTR = STRUCTURAL_ZERO


def _structural_zero(size, dtype=None, layout=None, device=None, pin_memory=None):
    """Stands in for forward AD's ``_efficientzerotensor``: a zero that costs no memory
    (an expanded 0-d tensor), marked so that products with it stay exact zeros."""
    z = torch.zeros((), dtype=dtype, device=device).expand(tuple(size))
    z.__dict__[_ZERO_ATTR] = True
    return z


# A 0-d efficient zero that PyTorch marks as a wrapped number (the tangent of a Python
# scalar operand: `4 * x`, `x / 4`, `lerp(a, b, 0.3)`) reaches __torch_dispatch__ as
# the Python number 0, so `0 * x` is evaluated: NaN where x is infinite, and forward
# AD's exact zero becomes a NaN constant added to the tangent. (Since stop 25 this is
# the path of complex and bool numbers only: int64 and float64 ones get a marker, see
# _MARKER_INT, and their products cost no kernel.) The tracer marks results
# of products by a literal zero (or by such a result) and, where one is *added to a
# tracked tangent* (the only place forward AD combines them), uses a structural zero.
# Primal uses keep the computed value.
_ZERO_PRODUCT_ATTR = "_torch_linearize_zero_product"
_ADDITIVE = {  # additive operators -> positions whose zero-product operand is dropped
    aten.add.Tensor: (0, 1), aten.sub.Tensor: (0, 1), aten.add_.Tensor: (1,),
    aten.sub_.Tensor: (1,), aten.addcmul.default: (0,), aten.addcdiv.default: (0,),
    aten.addcmul_.default: (), aten.addcdiv_.default: (),
}


# Matrix products of a tangent are recorded without being computed: their values at
# trace time (the placeholder tangents are ones) are never read -- the program is
# applied later to real tangents, and folding only reuses traced values of pointwise
# regions that start at an input -- and they cost as much as the primal's own
# products. Their results are uninitialised contiguous tensors of the right shape (these
# structured kernels always return contiguous outputs; tests/test_trace.py checks it).
def _mm_shape(args):
    return (args[0].shape[0], args[1].shape[1])


_SHAPE_ONLY = {
    aten.mm.default: _mm_shape,
    aten.addmm.default: lambda args: (args[1].shape[0], args[2].shape[1]),
    aten.bmm.default: lambda args: (args[0].shape[0], args[0].shape[1], args[1].shape[2]),
    aten.baddbmm.default: lambda args: (args[1].shape[0], args[1].shape[1], args[2].shape[2]),
    aten.mv.default: lambda args: (args[0].shape[0],),
}


def _plain_operand_like(args) -> torch.Tensor | None:
    """The first tensor among ``args`` if every tensor there is a plain strided one (no
    conjugate or negative bit, no efficient zero, no functorch wrapper) of its dtype and
    device, else None: the operands whose result layout the shape-only paths predict."""
    like = None
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.layout != torch.strided or a.is_conj() or a.is_neg() or a._is_zerotensor() \
                    or torch._C._functorch.is_functorch_wrapped_tensor(a):
                return None
            if like is None:
                like = a
            elif a.dtype != like.dtype or a.device != like.device:
                return None
    return like


def _shape_only_result(func, args, kwargs):
    """An uninitialised contiguous tensor shaped like ``func(*args)``, or None where that is
    not certain."""
    if kwargs and any(k not in ("beta", "alpha") for k in kwargs):
        return None
    like = _plain_operand_like(args)
    if like is None:
        return None
    return torch.empty(_SHAPE_ONLY[func](args), dtype=like.dtype, device=like.device)


# Pointwise tangent arithmetic is recorded without being computed too, except where its
# value may be read: a tangent's trace-time value is read only by folding, and only for
# a pointwise-linear region that starts at a program input (its traced value there is
# the region's coefficient, the input placeholders being ones). The tracer keeps the
# set of such *valued* Vars (inputs, and pointwise-linear results of valued Vars); every
# other pointwise result above a size threshold is an uninitialised tensor laid out as
# the TensorIterator kernel would lay it out, where that layout is certain (row-major
# operands; tests/test_trace.py checks it against the kernels). Uninitialised, not
# zeros: its memory is never touched (no page faults for fresh memory, no memset).
_POINTWISE_SHAPE_ONLY_IDS = frozenset(id(f) for f in (
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar,
    aten.div.Scalar, aten.neg.default))
_SHAPE_ONLY_MIN_NUMEL = 4096  # below it, running the kernel costs less than deciding

# Scaling chains are folded while tracing. A value computed from one input tangent ``b``
# by pointwise scalings only (``t * r``, ``t / r``, ``-t``, ``tanh_backward(t, y)``, ...:
# one tangent operand, residuals of the full shape or numbers beside it) is ``b * C``,
# and its traced value *is* ``C`` (the placeholders are ones): the equation the folding
# pass would emit for it (``_passes._traced_coefficient``). The tracer records that
# equation at once, so the chain's earlier steps are read by nothing; when forward AD
# drops an earlier step's tangent (the dual it belonged to died) and nothing else read
# it, its equation and the coefficient it held are released during the trace. The
# trace then holds one coefficient per live chain, as eager forward AD holds one
# tangent, instead of every residual of the chain until the passes run.
_CHAIN_STEPS = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
                aten.neg.default, aten.tanh_backward.default, aten.sigmoid_backward.default)
# (operator id -> positions of its tangent operand: the folding pass's own table)
_CHAIN_STEP_IDS = {id(f): _POINTWISE_LINEAR[f] for f in _CHAIN_STEPS}
# (not float16: a chain's product can leave its range, 65504 down to 6e-5, where the
# step-by-step tangent does not; see _passes._NARROW_RANGE)
_CHAIN_DTYPES = frozenset({torch.bfloat16, torch.float32, torch.float64})
FOLD_CHAINS = True  # (off: the program exactly as forward AD computed it, for tests)
# (off: a custom Function's forward and setup_context run under the dispatch mode, as
# before stop 19; see Tracer.outside)
PRIMAL_CODE_OUTSIDE = True


def _pointwise_shape_only(args, kwargs) -> torch.Tensor | None:
    """An uninitialised tensor with the shape, dtype, device and strides of a pointwise
    ``func(*args, **kwargs)`` (one of ``_POINTWISE_SHAPE_ONLY_IDS``), or None where that
    is not certain (then the kernel runs).

    Certain here: operands of one real floating dtype and device (Python ints and floats
    beside them), a broadcast shape with no size-1 dimension, and every operand *row-major*
    (its non-zero strides, broadcast dimensions counting as 0, strictly decrease from the
    outermost dimension in). TensorIterator then keeps the dimension order and allocates
    a contiguous output (its stride-sorting never swaps a pair of dimensions), and none of
    its fast paths (all contiguous, all channels-last, all dense with equal strides)
    gives anything else for such operands.
    """
    if kwargs and (len(kwargs) != 1 or not _is_real_number(kwargs.get("alpha"))):
        return None
    if any(not _is_real_number(a) for a in args if not isinstance(a, torch.Tensor)):
        return None
    like = _plain_operand_like(args)
    if like is None or not like.is_floating_point():
        return None
    shape = like.shape
    for a in args:
        if isinstance(a, torch.Tensor) and a.shape != shape:
            try:
                shape = torch.broadcast_shapes(shape, a.shape)
            except RuntimeError:
                return None
    numel = 1
    for n in shape:
        if n == 1:
            return None
        numel *= n
    if numel < _SHAPE_ONLY_MIN_NUMEL:
        return None
    for a in args:
        if isinstance(a, torch.Tensor):
            prev = None
            for n, st in zip(a.shape, a.stride()):
                if n == 1 or st == 0:
                    continue  # broadcast (stride 0 in TensorIterator): never decides an order
                if prev is not None and st >= prev:
                    return None
                prev = st
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _zero_operand(a) -> bool:
    """A literal zero or a marked zero product."""
    if isinstance(a, torch.Tensor):
        return _ZERO_PRODUCT_ATTR in a.__dict__
    return isinstance(a, (int, float, complex)) and a == 0


def _is_zero_product(func, args) -> bool:
    """Whether ``func(*args)`` is zero because an operand in a zero position is zero."""
    pos = _ZERO_PRODUCTS[func]
    if not pos:  # sums: every operand zero
        return len(args) >= 2 and _zero_operand(args[0]) and _zero_operand(args[1])
    return any(p < len(args) and _zero_operand(args[p]) for p in pos)


def _is_zero(a) -> bool:
    return isinstance(a, torch.Tensor) and (a._is_zerotensor() or _ZERO_ATTR in a.__dict__)


def _has_zero(args) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor):
            if _is_zero(a):
                return True
        elif isinstance(a, (list, tuple)):
            for b in a:
                if _is_zero(b):
                    return True
    return False


def _plain_zero(a):
    """A structural zero as an ordinary zero operand (for sums, copies, ...)."""
    if isinstance(a, torch.Tensor) and (a._is_zerotensor() or _MARKER_ATTR in a.__dict__):
        return torch.zeros((), dtype=a.dtype, device=a.device).expand(a.shape)
    if isinstance(a, (list, tuple)) and any(isinstance(b, torch.Tensor) for b in a):
        return type(a)(_plain_zero(b) for b in a)
    return a


# The efficient-zero tangent of a Python number operand (`4 * x`, `x / 2.5`, `x + 1`)
# is a 0-d tensor that PyTorch marks as a wrapped number, and a wrapped number reaches
# __torch_dispatch__ as a Python number: the tangent rule `0 * x` then looks like a
# `0 * x` that f computes, whose value must be exact (NaN at infinities, -0.0), so it was
# evaluated (a full-size kernel) and only its use in a sum with a tangent dropped. For
# the dtypes of wrapped numbers (int64, float64) the tracer's _efficientzerotensor
# instead holds a marker value no program writes (an int64 near the minimum; a NaN with
# a payload of its own, which Python floats keep bit for bit), and an operation given
# that number treats it as the exact zero it stands for: a product by it is a
# structural zero, computed by no kernel; anywhere else it is the number 0. Given as a
# tensor (a 0-d constant that is no wrapped number), it is a structural zero whose
# memory holds the marker, so it is never an operand as it is (_plain_zero).
_MARKER_INT = -(2 ** 63) + 0x5EED
_MARKER_FLOAT_BITS = struct.pack("<Q", 0x7FF8_0000_5EED_0001)
_MARKER_FLOAT = struct.unpack("<d", _MARKER_FLOAT_BITS)[0]
_MARKER_VALUES = {torch.int64: _MARKER_INT, torch.float64: _MARKER_FLOAT}
_MARKER_ATTR = "_torch_linearize_zero_marker"


def _is_marker(a) -> bool:
    t = type(a)
    if t is int:
        return a == _MARKER_INT
    return t is float and a != a and struct.pack("<d", a) == _MARKER_FLOAT_BITS


def _marker_zero(size, dtype=None, layout=None, device=None, pin_memory=None):
    """``_efficientzerotensor`` of a wrapped number's shape and dtype as a marker (see
    above), or None where it cannot be one (then a structural zero as usual)."""
    value = _MARKER_VALUES.get(dtype)
    if value is None or len(size) != 0 or layout not in (None, _STRIDED) or pin_memory or \
            (device is not None and torch.device(device).type != "cpu"):
        return None
    z = torch.full((), value, dtype=dtype)
    z.__dict__[_ZERO_ATTR] = True
    z.__dict__[_MARKER_ATTR] = True
    return z


def _unmark(x):
    """``x`` (an argument, or a list of them) with marker numbers replaced by 0 of their
    type; ``x`` itself if it holds none."""
    if isinstance(x, (list, tuple)):
        if not any(_is_marker(b) for b in x):
            return x
        return type(x)(type(b)(0) if _is_marker(b) else b for b in x)
    return type(x)(0) if _is_marker(x) else x


def _to_meta(a):
    if isinstance(a, torch.Tensor):
        return torch.empty_strided(a.shape, a.stride() if not a._is_zerotensor() else
                                   torch.empty(a.shape, device="meta").stride(),
                                   dtype=a.dtype, device="meta")
    if isinstance(a, (list, tuple)):
        return type(a)(_to_meta(b) for b in a)
    return a


def _zero_result(func, args, kwargs, device) -> torch.Tensor | None:
    """A structural zero shaped like ``func(*args, **kwargs)`` (evaluated on meta
    tensors), on ``device``; None where that evaluation fails or gives no tensor."""
    try:
        meta = func(*[_to_meta(a) for a in args], **{k: _to_meta(v) for k, v in kwargs.items()})
    except Exception:
        return None
    if not isinstance(meta, torch.Tensor):
        return None
    return _structural_zero(meta.shape, dtype=meta.dtype, device=device)


_local = threading.local()


def current_tracer() -> Tracer | None:
    """The tracer of the ``linearize`` call running in this thread, if any."""
    return getattr(_local, "tracer", None)


def direct_primal_ok(p: torch.Tensor) -> bool:
    """A differentiable primal a trace may start in the direct phase with: a plain
    contiguous tensor of a real floating dtype that is all of its storage (a view of a
    larger tensor gets its tangent laid out over that storage by forward AD)."""
    return (type(p) is torch.Tensor and p.layout == torch.strided and p.dtype in _REAL_FLOATING
            and not p._is_view() and p.storage_offset() == 0 and p.is_contiguous()
            and p.untyped_storage().nbytes() == p.numel() * p.element_size()
            and not p.requires_grad)


def end_direct_phase(t: Any = None) -> None:
    """End this thread's trace's direct phase (``Tracer.to_dual``) before code that reads
    forward-AD tangents runs: if ``t`` is given, only where ``t`` is tracked in it."""
    tracer = getattr(_local, "tracer", None)
    if tracer is not None and tracer.direct and (
            t is None or (isinstance(t, torch.Tensor) and tracer.direct_tangent(t) is not None)):
        tracer.to_dual()


_forward_ad.tangent_read_hook = end_direct_phase


_EFFICIENT_ZERO = aten._efficientzerotensor.default
_COPY = aten.copy_.default
_CLONE = aten.clone.default
_UNTRACKED = object()

_CONJ_NEG_KEYS = C.DispatchKeySet(C.DispatchKey.Conjugate) | C.DispatchKeySet(C.DispatchKey.Negative)


# Size and storage queries that forward AD makes for every tangent it sets (two per
# operation): they read no tensor data and no dispatch key changes their answer.
# (Matched by id: the tuple keeps the operators alive, so their ids stay theirs.)
_SHAPE_QUERIES = (aten.is_same_size.default, aten._has_same_storage_numel.default)
_SHAPE_QUERY_IDS = frozenset(id(f) for f in _SHAPE_QUERIES)
_IS_SAME_SIZE = aten.is_same_size.default
_HAS_SAME_STORAGE_NUMEL = aten._has_same_storage_numel.default
# (marks a tangent forward AD attached to a dual as it is: see Tracer._tangent_fits)
_ATTACHED = "_torch_linearize_attached_tangent"
_STRIDED = torch.strided
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_NO_DISPATCH = torch._C._DisableTorchDispatch
_AUTOGRAD_KEYS = C.DispatchKeySet(C.DispatchKey.ADInplaceOrView)
for _k in (C.DispatchKey.AutogradCPU, C.DispatchKey.AutogradCUDA, C.DispatchKey.AutogradOther,
           C.DispatchKey.AutogradMeta):
    _AUTOGRAD_KEYS = _AUTOGRAD_KEYS | C.DispatchKeySet(_k)
_FUNCTORCH_KEYS = C.DispatchKeySet(C.DispatchKey.FuncTorchDynamicLayerFrontMode) | \
    C.DispatchKeySet(C.DispatchKey.FuncTorchDynamicLayerBackMode)
_REAL_FLOATING = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_make_dual = torch._VF._make_dual
_set_versions = torch._C._autograd._unsafe_set_version_counter
_in_functorch = torch._C._functorch.peek_interpreter_stack


def _enclosing_tangent_error(func) -> LinearizeError:
    return LinearizeError(
        f"linearize: {func} in a nested linearize (one called while another linearize traces: "
        "inside its f, or inside a custom Function's forward there) reads the enclosing "
        "linearization's tangent, carried by a tensor captured from the enclosing function. "
        "Nested forward-mode AD (forward-over-forward) is not supported by PyTorch's eager "
        "forward AD: pass such tensors .detach()ed to treat them as constants, or linearize "
        "the composition once."
    )


def _needs_conj_keys(info: _OpInfo, args, kwargs) -> bool:
    """Complex operands, or a linear-algebra kernel (may make complex temporaries)."""
    if info.linalg:
        return True
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.is_complex():
                return True
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor) and b.is_complex():
                    return True
    if kwargs:
        for v in kwargs.values():
            if isinstance(v, torch.Tensor) and v.is_complex():
                return True
    return False


class Tracer(TorchDispatchMode):
    """Records the tangent part of a forward-AD run into a linear program."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level
        self.token = object()  # identifies this trace on tracked tensors
        self.sizing: tuple | None = None  # the last is_same_size query's operands
        self.eqns: list[Eqn] = []
        self.trace_values: dict[int, torch.Tensor] = {}  # output Var id -> its traced value
        self.residuals = ResidualTable()
        self.inputs: list[Var] = []
        # Storage-keyed maps hold the storage itself, so its address cannot be reused by
        # another storage while the trace runs.
        self.input_storage: dict[int, tuple[Any, int]] = {}
        self.mutated_inputs: set[int] = set()
        self.promoted: dict[int, tuple[Any, Var]] = {}
        self.created: set[int] = set()  # storages allocated by operations during the trace
        self.opaque_nodes: list[Any] = []
        # Custom-Function ctx tensors, protected like residuals: storage -> nodes whose ctx
        # reads it (copy-on-write), and id -> (tensor, version) at recording (stale check).
        self.ctx_storages: dict[int, list[Any]] = {}
        self.ctx_versions: dict[int, tuple[torch.Tensor, int]] = {}
        self.poisoned: dict[int, str] = {}  # Var id -> why its value is not linear
        self.suspect_storages: set[int] = set()  # constants made from tracked metadata
        self.uninitialized: dict[int, Any] = {}  # storages from empty factories, never written
        self.suspect_residuals: set[int] = set()
        self.paused_depth = 0
        self.zero_products = False  # a result was marked _ZERO_PRODUCT_ATTR
        # marker zeros handed out and still alive (see _MARKER_INT): only while one is
        # can a marker number reach the mode (forward AD drops it after its formula)
        self.markers: weakref.WeakSet = weakref.WeakSet()
        self.valued: set[int] = set()  # Var ids whose trace-time value is exact (see above)
        # Scaling chains (see _CHAIN_STEPS): Var id -> (its input base, a full-shape
        # residual is in its chain); releasable steps: Var id -> (equation, the residual
        # slots it reads, weakref to its traced tangent); Var ids whose tangent died
        # (appended by the weakrefs' callbacks, processed by release_dead_steps).
        self.chain: dict[int, tuple[Var, bool]] = {}
        self.chain_steps: dict[int, tuple[Eqn, tuple, Any]] = {}
        self.dead_steps: list[int] = []
        self.released: dict[int, Eqn] = {}  # released equations by id (finish_chains drops them)
        self.written_groups: set[Any] = set()  # storages written in place so far
        # tokens of the linearize calls this one runs inside (set when activated): their
        # tangents must not flow into this trace (forward-over-forward)
        self.enclosing: frozenset = frozenset()
        # The direct phase (see direct_input): f's tensors are plain, their tangents held
        # in _DIRECT entries; weakrefs to every tensor given one, and to those that are no
        # views (given their tangent as duals if the phase ends: to_dual)
        self.direct = False
        self.direct_rules = 0  # operations the rule table traced
        self.direct_bound: list = []
        self.direct_roots: list = []
        self.attaching: tuple | None = None  # (to_dual's tensor and the tangent it attaches)

    # ------------------------------------------------------------------ activation
    @contextmanager
    def activate(self) -> Iterator[Tracer]:
        prev = getattr(_local, "tracer", None)
        if prev is not None:
            self.enclosing = prev.enclosing | {prev.token}
        _local.tracer = self
        try:
            with self:
                yield self
        finally:
            _local.tracer = prev

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run library-internal tensor code without recording it."""
        self.paused_depth += 1
        try:
            yield
        finally:
            self.paused_depth -= 1

    # ------------------------------------------------------------------ primal-only code
    @contextmanager
    def outside(self, inputs: Any) -> Iterator[bool]:
        """Run code that computes primal values only outside this dispatch mode, where safe.

        A custom Function's ``forward`` and ``setup_context`` run once, on plain primals,
        with forward AD off: nothing they do is recorded. Under the mode each of their
        operations would still pay a Python round trip (and run measurably slower on large
        tensors), so they run outside it (yields True) unless (yields False, and they run
        under the mode as any code does):

        * this tracer is not the innermost dispatch mode (another mode entered inside
          ``f`` must keep seeing them), or :data:`PRIMAL_CODE_OUTSIDE` is off;
        * a tensor in ``inputs`` is in a storage the tracer guards against writes (a
          residual or a ctx tensor, copied before a write; a buffer written with tangent
          data; an uninitialized buffer): the mode must see a write to it as it happens.

        A write they make elsewhere into a guarded tensor (a global) is one the tracer
        cannot see, and the stale checks at the end of the trace raise for it. What they
        return or save is classified by :meth:`adopt`.
        """
        tensors = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
        if not PRIMAL_CODE_OUTSIDE or _get_current_dispatch_mode() is not self or any(
                self._guarded(t) for t in tensors):
            yield False
            return
        if self.dead_steps:  # (as the mode would before the first operation allocates)
            self.release_dead_steps()
        versions = [(t, t._version) for t in tensors if not t.is_inference()]
        with _pop_mode_temporarily():
            yield True
        for t, v in versions:
            if t._version != v:
                # written in place: a write's bookkeeping, after the fact (it copies nothing:
                # the storage was not guarded)
                self.before_write(t, False, "a custom Function's forward")

    def _guarded(self, t: torch.Tensor) -> bool:
        k = storage_key(t)
        return (k is None or self.residuals.holds(k) or k in self.ctx_storages
                or k in self.uninitialized or k in self.promoted or k in self.input_storage
                or self.lookup(t) is not None)

    def adopt(self, made: list[torch.Tensor], inputs: Any) -> None:
        """Classify what code run :meth:`outside` the mode returned or saved.

        The mode did not see those tensors allocated. One in an input's storage is not
        new; any other is taken for allocated during the trace (counted in
        ``residual_bytes``; it may also be a pre-existing tensor, a global, and is
        watched for in-place changes after ``linearize`` as every residual is).
        """
        known = {storage_key(t) for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)}
        for t in made:
            k = storage_key(t)
            if k is None or k in known or k in self.created:
                continue
            self.created.add(k)

    # ------------------------------------------------------------------ tracked values
    def new_var(self, t: torch.Tensor) -> Var:
        v = Var.like(t, group=storage_key(t) if t.layout == torch.strided else None)
        t.__dict__[_ATTR] = (self.token, v)
        return v

    def bind(self, t: torch.Tensor, v: Var) -> None:
        t.__dict__[_ATTR] = (self.token, v)

    def lookup(self, t: torch.Tensor) -> Var | None:
        entry = t.__dict__.get(_ATTR)
        if entry is not None and entry[0] is self.token:
            return entry[1]
        if self.promoted:
            k = storage_key(t)
            if k is not None and k in self.promoted:
                return self._alias_of_promoted(t, k)
        return None

    def add_input(self, placeholder: torch.Tensor) -> Var:
        v = self.new_var(placeholder)
        self.inputs.append(v)
        self.valued.add(v.id)
        if FOLD_CHAINS and placeholder.dtype in _CHAIN_DTYPES \
                and placeholder.layout == torch.strided \
                and placeholder.is_contiguous() and v.group is not None:
            self.chain[v.id] = (v, False)
        k = storage_key(placeholder)
        if k is not None:
            self.input_storage[k] = (placeholder.untyped_storage(), len(self.inputs) - 1)
        return v

    def capture(self, t: torch.Tensor, origin: Any = "") -> Res:
        idx = self.residuals.capture(t, origin)
        if self.residuals.copied:
            self.note_created(self.residuals.copied.pop())
        if self.suspect_storages and storage_key(t) in self.suspect_storages:
            self.suspect_residuals.add(idx)
        return Res(idx)

    def symbolic(self, x: Any, origin: str = "") -> Any:
        if isinstance(x, torch.Tensor):
            v = self.lookup(x)
            return v if v is not None else self.capture(x, origin)
        return x

    def emit(self, eqn: Eqn) -> Eqn:
        if self.chain_steps:
            self._mark_read(eqn)
        self.eqns.append(eqn)
        return eqn

    # ------------------------------------------------------------------ scaling chains
    def _mark_read(self, eqn: Eqn) -> None:
        """A chain step read by ``eqn`` is kept (no longer releasable)."""
        steps = self.chain_steps
        for v in (*eqn.in_vars(), *eqn.mutates):
            steps.pop(v.id, None)

    def _chain_step(self, func, args: tuple, kwargs: dict, info: _OpInfo) -> Any:
        """Record ``func(*args)`` if it is a scaling-chain step (see ``_CHAIN_STEPS``) and
        return its result, else return None (nothing done). The equation is ``b * C``, with
        ``C`` the step's traced value, where the chain is longer than one step and holds a
        full-shape residual (the step's own residuals are then not captured at all), else
        the step as it is."""
        pos = _CHAIN_STEP_IDS.get(id(func))
        if pos is None or kwargs:
            return None
        v, full, lookup, chain = None, False, self.lookup, self.chain
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                tracked = lookup(a)
                if tracked is not None:
                    if v is not None or i not in pos:
                        return None
                    v = tracked
                    continue
                if type(a) is not torch.Tensor or a.layout != _STRIDED \
                        or _ZERO_ATTR in a.__dict__ or _is_wrapped(a):
                    return None
                full = True  # (its shape is checked against the result's below)
            elif not _is_real_number(a):
                return None
        link = chain.get(v.id) if v is not None else None
        if link is None:
            return None
        base, base_full = link
        written = self.written_groups
        if base.group in written or v.group in written:
            return None
        shape, dtype = base.shape, base.dtype
        for a in args:
            if isinstance(a, torch.Tensor) and (a.shape != shape or a.dtype != dtype):
                return None
        out = info.call(*args)
        if type(out) is not torch.Tensor or out.shape != shape or out.dtype != dtype \
                or not out.is_contiguous():
            # (not a step after all: recorded as it is, with this result)
            return self._record(func, args, kwargs, info, out)
        var = self.new_var(out)
        self.valued.add(var.id)
        full = full or base_full
        chain[var.id] = (base, full)
        if v is base or not full:  # (folding would not shorten it, or would store more)
            sargs = tuple([self.symbolic(a, func) if isinstance(a, torch.Tensor) else a
                           for a in args])
            eqn = Eqn(func, sargs, {}, var)
            slots = tuple(a.index for a in sargs if type(a) is Res)
        else:
            with _NO_DISPATCH():  # (an alias: the residual must not keep ``out`` alive)
                coefficient = out.detach()
            slot = self.residuals.capture(coefficient, "a scaling chain's coefficient")
            self.note_created(out)
            eqn = Eqn(aten.mul.Tensor, (base, Res(slot)), {}, var)
            slots = (slot,)
        self.emit(eqn)
        dead = self.dead_steps
        self.chain_steps[var.id] = (eqn, slots, weakref.ref(out, lambda _, i=var.id: dead.append(i)))
        return out

    def release_dead_steps(self) -> None:
        """Drop chain steps whose tangent died unread: their equations, and the
        coefficients only they held."""
        dead, steps = self.dead_steps, self.chain_steps
        while dead:
            entry = steps.pop(dead.pop(), None)
            if entry is None:
                continue
            eqn = entry[0]
            self.released[id(eqn)] = eqn  # (keeping it keeps its id its own)
            for slot in entry[1]:
                self.residuals.release(slot)

    def finish_chains(self) -> None:
        """At the end of the trace: release the steps that died, drop released equations."""
        self.release_dead_steps()
        if self.released:
            released = self.released
            self.eqns = [e for e in self.eqns if id(e) not in released]
            self.released = {}
        self.chain_steps.clear()

    def note_created(self, t: torch.Tensor) -> None:
        k = storage_key(t)
        if k is not None:
            self.created.add(k)

    def protect_ctx(self, node: Any) -> None:
        """Guard what a custom Function's ctx holds as residuals are guarded: copy-on-write
        before f writes into it later (jvp reads it only at application time, eager forward
        AD right away), and a version record for the stale check at the end of the trace."""
        held = ctx_tensors(node.ctx, readable_only=True)
        for k in {storage_key(t) for t in held if t.is_inference()}:
            # (an inference tensor has no version counter to guard it by: keep a copy)
            for snap in snapshot_ctx(node.ctx, k):
                self.note_created(snap)
            held = ctx_tensors(node.ctx, readable_only=True)
        for t in held:
            k = storage_key(t)
            if k is not None:
                self.ctx_storages.setdefault(k, []).append(node)
                self.ctx_versions[id(t)] = (t, t._version)

    # ------------------------------------------------------------------ mutation safety
    def before_write(self, t: torch.Tensor, tracked_write: bool, opname: Any,
                     like: Var | None = None) -> None:
        """Called before ``t`` is written in place (``like``: a tracked input of the writer)."""
        k = storage_key(t)
        self.written_groups.add(k)
        for snap in self.residuals.copy_on_write(k):
            self.note_created(snap)
        if self.ctx_storages and k in self.ctx_storages:
            for node in dict.fromkeys(self.ctx_storages.pop(k)):
                for snap in snapshot_ctx(node.ctx, k):
                    self.note_created(snap)
        if not tracked_write:
            self.uninitialized.pop(k, None)
            return
        if self.lookup(t) is None:
            self._promote(t, k, opname, like)
        elif k is not None and k in self.input_storage:
            self.mutated_inputs.add(self.input_storage[k][1])

    def _promote(self, t: torch.Tensor, k: int | None, opname: Any, like: Var | None) -> None:
        """Tangent data is about to be written into a buffer that holds no tangent.

        At application time that buffer must start from its current contents and
        must be fresh every time, so record ``root = clone(snapshot)`` and view
        ``t`` (and, lazily, every other alias of the storage) into ``root``.
        """
        if k is None:
            raise NonLinearTangentError(
                f"linearize: {opname} writes tangent data into a tensor without storage "
                f"({t.layout}); this is not supported."
            )
        with torch.utils._python_dispatch._disable_current_modes():
            nbytes = t.untyped_storage().nbytes()
            item = t.element_size()
            if nbytes % item:
                raise NotImplementedError(
                    f"linearize: {opname} writes tangent data into a buffer whose storage is "
                    f"shared between dtypes; this is not supported."
                )
            flat = torch.empty(0, dtype=t.dtype, device=t.device)
            flat.set_(t.untyped_storage(), 0, (nbytes // item,), (1,))
            snapshot = flat.clone()
        root = Var((nbytes // item,), t.dtype, (1,), group=k, device=t.device)
        with torch.utils._python_dispatch._disable_current_modes():
            # Memory from an empty factory that nothing wrote yet has no meaningful
            # contents (and differs run to run): start from zeros, like any fresh buffer.
            all_zero = k in self.uninitialized or not bool(snapshot.any())
        # The fresh buffer is made with ``new_zeros`` from a tracked value when there is
        # one, so that under vmap it is batched like the data written into it.
        opts = {"dtype": t.dtype, "device": t.device}
        n = [nbytes // item]
        if like is not None:
            zeros = Eqn(aten.new_zeros.default, (like, n), opts, root, name="fresh_zeros")
        else:
            zeros = Eqn(aten.zeros.default, (n,), opts, root, name="fresh_zeros")
        self.emit(zeros)
        if not all_zero:  # start from the buffer's current contents
            filled = Var(root.shape, root.dtype, (1,), group=k, device=t.device)
            self.emit(Eqn(aten.copy_.default, (root, self.capture(snapshot, "buffer snapshot")),
                          {}, filled, mutates=(root,), name="fresh_copy"))
            root = filled
        self.promoted[k] = (t.untyped_storage(), root)
        self._alias_of_promoted(t, k)

    def _alias_of_promoted(self, t: torch.Tensor, k: int) -> Var:
        root = self.promoted[k][1]
        if t.dtype != root.dtype:
            # the buffer seen as another dtype (z.real of a complex buffer, view_as_complex
            # of a real one): the same bytes, read as t's elements (t's geometry counts them)
            if root.stride != (1,) or (root.shape[0] * root.dtype.itemsize) % t.dtype.itemsize:
                raise NotImplementedError(
                    "linearize: a buffer that receives tangent data is viewed with two dtypes "
                    f"({root.dtype} and {t.dtype}) in a way linearize cannot replay.")
            n = root.shape[0] * root.dtype.itemsize // t.dtype.itemsize
            retyped = Var((n,), t.dtype, (1,), group=k, device=t.device)
            self.emit(Eqn(aten.view.dtype, (root, t.dtype), {}, retyped))
            root = retyped
        v = Var.like(t, group=k)
        self.emit(Eqn(aten.as_strided.default,
                      (root, tuple(t.shape), tuple(t.stride()), t.storage_offset()), {}, v))
        self.bind(t, v)
        return v

    # ------------------------------------------------------------------ dispatch
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Nothing is compiled inside this mode; skip the per-call dynamo-disable wrapper.
        return False

    def _any_tracked(self, args, kwargs) -> bool:
        lookup = self.lookup
        for a in args:
            if isinstance(a, torch.Tensor):
                if lookup(a) is not None:
                    return True
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, torch.Tensor) and lookup(b) is not None:
                        return True
        for a in kwargs.values():
            if isinstance(a, torch.Tensor):
                if lookup(a) is not None:
                    return True
            elif isinstance(a, (list, tuple)):
                for b in a:
                    if isinstance(b, torch.Tensor) and lookup(b) is not None:
                        return True
        return False

    def _drop_zero_products(self, func, args) -> tuple[tuple, bool]:
        """Replace untracked zero products added to a tracked tangent by structural zeros."""
        out, dropped = list(args), False
        for p in _ADDITIVE[func]:
            a = args[p] if p < len(args) else None
            if isinstance(a, torch.Tensor) and _ZERO_PRODUCT_ATTR in a.__dict__ and \
                    self.lookup(a) is None:
                out[p] = _structural_zero(a.shape, dtype=a.dtype, device=a.device)
                dropped = True
        return (tuple(out), True) if dropped else (args, False)

    def _scan(self, args, kwargs, func=None) -> tuple[bool, bool]:
        """(a positional argument is a structural zero, an argument is tracked), in one
        pass: ``_has_zero(args)`` and ``_any_tracked(args, kwargs)``. Raises for a tangent
        of an enclosing ``linearize`` (see ``enclosing``)."""
        token, promoted, enclosing = self.token, self.promoted, self.enclosing
        zero = tracked = False
        for a in args:
            if isinstance(a, torch.Tensor):
                items = (a,)
            elif isinstance(a, (list, tuple)):
                items = a
            else:
                continue
            for b in items:
                if not isinstance(b, torch.Tensor):
                    continue
                d = b.__dict__
                if not zero and (_ZERO_ATTR in d or b._is_zerotensor()):
                    zero = True
                if not tracked or enclosing:
                    entry = d.get(_ATTR)
                    if enclosing and entry is not None and entry[0] in enclosing:
                        raise _enclosing_tangent_error(func)
                    if not tracked and ((entry is not None and entry[0] is token) or (
                            promoted and self.lookup(b) is not None)):
                        tracked = True
        if not tracked and kwargs:
            tracked = self._any_tracked((), kwargs)
        return zero, tracked

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if id(func) in _SHAPE_QUERY_IDS:  # (about half of all calls): straight through
            if func is _IS_SAME_SIZE and len(args) == 2 and not kwargs:
                # forward AD asks this once per tangent it sets: answered here, it costs a
                # tenth of the operator call (ATen compares the sizes, as this does)
                a, b = args
                self.sizing = (a, b)  # (see _tangent_fits)
                if type(a) is torch.Tensor and type(b) is torch.Tensor and a.layout is _STRIDED \
                        and b.layout is _STRIDED and not (_is_wrapped(a) or _is_wrapped(b)):
                    return a.shape == b.shape
            elif len(args) == 2 and not kwargs:  # (_has_same_storage_numel)
                return self._tangent_fits(*args)
            return func._op(*args, **kwargs) if kwargs else func._op(*args)
        kwargs = kwargs or {}
        hit = _op_infos.get(id(func))
        info = hit[1] if hit is not None and hit[0] is func else _op_info(func)
        if self.direct:
            out = self._direct(func, args, kwargs, info)
            if out is not _UNTRACKED:
                return out
        elif self.attaching is not None:
            if func is _COPY and args[0] is self.attaching[0]:
                return info.call(*args, **kwargs)  # (to_dual's copy of a tensor onto itself)
            if func is _CLONE and args[0] is self.attaching[1]:
                # (forward AD's formula for that copy clones the tangent: attached as it
                # is instead, as make_dual attaches an input's)
                return args[0]
        if _needs_conj_keys(info, args, kwargs):
            # PyTorch runs __torch_dispatch__ with the Conjugate and Negative keys
            # excluded, so a kernel that builds conjugate views internally (complex
            # linalg_pinv: `V.mH * (1/S)`) silently computes garbage under any dispatch
            # mode. Re-enable them while this operation runs.
            include, exclude = C._dispatch_tls_local_include_set(), C._dispatch_tls_local_exclude_set()
            with C._ForceDispatchKeyGuard(include, exclude - _CONJ_NEG_KEYS):
                return self._dispatch(func, args, kwargs, info)
        return self._dispatch(func, args, kwargs, info)

    # ------------------------------------------------------------------ the direct phase
    def direct_input(self, p: torch.Tensor, placeholder: torch.Tensor) -> None:
        """Give primal ``p`` (plain, passed to f as it is) the input tangent ``placeholder``
        (already an input: add_input), and trace in the direct phase: operations with a
        rule in ``_rules.RULES`` write their tangent equations themselves; the first
        one without (or a Python-level reader of tangents: a custom Function, a custom
        op, ``forward_ad.unpack_dual``) ends the phase (to_dual)."""
        self.direct = True
        self.bind_result(p, placeholder)

    def direct_tangent(self, t: torch.Tensor) -> torch.Tensor | None:
        """During the direct phase: the tangent tensor of ``t`` (None: untracked)."""
        entry = t.__dict__.get(_DIRECT)
        return entry[1] if entry is not None and entry[0] is self.token else None

    def bind_result(self, out: Any, tangent: Any, keep: Any = None) -> None:
        """Record ``tangent`` as the tangent of ``out`` (a tensor, or a list of them with a
        list of tangents); ``keep``: the tensor a view ``out`` was taken of."""
        if isinstance(out, torch.Tensor):
            out.__dict__[_DIRECT] = (self.token, tangent, keep)
            ref = weakref.ref(out)
            self.direct_bound.append(ref)
            if keep is None:
                self.direct_roots.append(ref)
            return
        for o, t in zip(out, tangent):
            self.bind_result(o, t, keep)

    def primal_op(self, func, args: tuple, kwargs: dict) -> Any:
        """Run a primal operation of a rule (no in-place writes: the rules have none)."""
        info = _op_info(func)
        out = info.call(*args, **kwargs)
        if info.fresh_outputs:
            if isinstance(out, torch.Tensor):
                self.note_created(out)
            else:
                for o in out:
                    self.note_created(o)
        return out

    def tangent_op(self, func, args: tuple, kwargs: dict) -> Any:
        """Record (and run, where its value may be read) a tangent operation of a rule."""
        return self._dispatch(func, args, kwargs, _op_info(func))

    def conform(self, tangent: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``tangent`` as the tangent of ``out``: its dtype, shape and strides, as forward
        AD's ``set_fw_grad`` gives it (a copy laid out like ``out`` where it differs)."""
        if tangent.dtype != out.dtype:
            tangent = self.tangent_op(aten._to_copy.default, (tangent,), {"dtype": out.dtype})
        if tangent.shape == out.shape and (tangent.stride() == out.stride() or all(
                a == b or n <= 1 for a, b, n in zip(tangent.stride(), out.stride(), out.shape))):
            return tangent
        z = self.tangent_op(aten._new_zeros_with_same_feature_meta.default, (tangent, out), {})
        self.tangent_op(aten.copy_.default, (z, tangent), {})
        return z

    def _direct(self, func, args, kwargs, info):
        """An operation during the direct phase: ``_UNTRACKED`` if it has no tracked
        argument (the caller runs it as any primal operation), else its result."""
        token, tans = self.token, None
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                entry = a.__dict__.get(_DIRECT)
                if entry is not None and entry[0] is token:
                    if tans is None:
                        tans = [None] * len(args)
                    tans[i] = entry[1]
            elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
                sub = [e[1] if e is not None and e[0] is token else None
                       for e in (b.__dict__.get(_DIRECT) if isinstance(b, torch.Tensor) else None
                                 for b in a)]
                if any(t is not None for t in sub):
                    if tans is None:
                        tans = [None] * len(args)
                    tans[i] = sub
        kw_tracked = bool(kwargs) and any(
            isinstance(a, torch.Tensor) and self.direct_tangent(a) is not None
            for a in kwargs.values())
        if tans is None and not kw_tracked:
            return _UNTRACKED
        if not C._is_fwd_grad_enabled() or torch.is_inference_mode_enabled():
            return _UNTRACKED  # (forward AD gives the result no tangent there)
        if self.paused_depth:
            return info.call(*args, **kwargs)
        if func in UNTRACKED_RESULTS or info.value_independent or info.data_read:
            return _UNTRACKED  # (no tangent: the result is a primal value only)
        rule = RULES.get(func)
        if rule is not None and not kw_tracked and self._plain_operands(args, kwargs):
            if self.dead_steps:  # (before this operation allocates: as eager frees them)
                self.release_dead_steps()
            out = rule(self, func, args, kwargs, tuple(tans))
            if out is not DECLINE:
                self.direct_rules += 1
                return out
        self.to_dual()
        if getattr(func, "is_view", False) or (
                tans is not None and any(isinstance(t, list) for t in tans)
                and not info.name.startswith("_foreach")):
            # (a view: autograd above this call makes the result a view of its input,
            # whose tangent forward AD derives from its base's when first read; a list of
            # tensors: autograd above this call asks whether they carry tangents after the
            # operation, not before, and computes the result's tangent itself)
            return _UNTRACKED
        # (the arguments now carry their tangents: the operation again, with autograd)
        include, exclude = C._dispatch_tls_local_include_set(), C._dispatch_tls_local_exclude_set()
        with C._ForceDispatchKeyGuard(include, exclude - _AUTOGRAD_KEYS), self._pushed():
            written = [t for t in self._written(args, kwargs, info) if not t.is_inference()] \
                if info.write_args else []
            versions = tuple(t._version for t in written)
            out = func(*args, **kwargs)
        if written:
            # (autograd above this call counts the write again when it returns)
            _set_versions(tuple(written), versions)
        return out

    def _plain_operands(self, args, kwargs) -> bool:
        """Every tensor argument a plain strided tensor, the tracked ones of a real floating
        dtype, none recorded by autograd, no functorch transform running."""
        grad = torch.is_grad_enabled()
        for a in _tensor_args(args, kwargs):
            if type(a) is not torch.Tensor or a.layout is not _STRIDED or (
                    grad and a.requires_grad):
                return False
            entry = a.__dict__.get(_DIRECT)
            if entry is not None and a.dtype not in _REAL_FLOATING:
                return False
        return _in_functorch() is None

    @contextmanager
    def _pushed(self) -> Iterator[None]:
        """This mode on the stack (inside ``__torch_dispatch__`` it is popped)."""
        if _get_current_dispatch_mode() is self:
            yield
            return
        with self:
            yield

    def to_dual(self) -> None:
        """End the direct phase: give every live tracked tensor its tangent as a forward-AD
        dual, in place (``t.copy_(make_dual(t, tangent))``: the values are unchanged, the
        version counter is restored), so that f goes on as if traced on duals from the
        start. Views are not given one: forward AD derives a view's tangent from its base's
        when it is first read, which is what the direct phase gave it."""
        if not self.direct:
            return
        self.direct = False
        pairs = []
        for ref in self.direct_roots:
            t = ref()
            if t is None:
                continue
            entry = t.__dict__.get(_DIRECT)
            if entry is not None and entry[0] is self.token and not t._is_view():
                pairs.append((t, entry[1]))
        self.strip_direct()
        # (autograd on, so that forward AD attaches the tangents; functorch's layers off:
        # a transform running inside f must not see the trace's own bookkeeping)
        include, exclude = C._dispatch_tls_local_include_set(), C._dispatch_tls_local_exclude_set()
        with C._ForceDispatchKeyGuard(include - _FUNCTORCH_KEYS,
                                      (exclude - _AUTOGRAD_KEYS) | _FUNCTORCH_KEYS), self._pushed():
            try:
                for t, tangent in pairs:
                    version = t._version
                    with _NO_DISPATCH():
                        alias = t.detach()
                    self.attaching = (t, tangent)
                    with torch.no_grad():  # (t may be a leaf that requires grad)
                        t.copy_(_make_dual(alias, tangent, level=self.level))
                    _set_versions((t,), (version,))
            finally:
                self.attaching = None

    def strip_direct(self) -> None:
        """Remove the direct phase's entries (they hold tangent tensors)."""
        for ref in self.direct_bound:
            t = ref()
            if t is not None:
                t.__dict__.pop(_DIRECT, None)
        self.direct_bound, self.direct_roots = [], []

    def _tangent_fits(self, tangent, primal) -> bool:
        """``_has_same_storage_numel(tangent, primal)``, which forward AD asks (through
        ``has_same_meta``) before it attaches ``tangent`` to ``primal`` as it is; if the
        answer is False it attaches a copy instead.

        Some forward-AD formulas give a result that is no view the input's tangent itself,
        or a view of it: ``torch.frac``, ``sub.Scalar``, the ``*_copy`` operators
        (``view_copy``, ``alias_copy``, ...; eager PyTorch 2.13). An in-place operation
        on that result then also changes the input's tangent: ``y = torch.frac(x);
        y.mul_(2)`` doubles ``x``'s tangent as well, and ``torch.func.jvp`` returns such
        wrong numbers. A tangent about to be attached to a primal that is no view, where
        the tangent is already attached elsewhere or is a view, is answered False here:
        the result gets a tangent of its own, as its primal is storage of its own.
        """
        if _MARKER_ATTR in tangent.__dict__:
            self._retire_marker(tangent)  # (about to outlive its formula: see below)
        attached = _ATTACHED
        sizing, self.sizing = self.sizing, None
        # (forward AD's set_fw_grad asks primal.is_same_size(tangent) just before; other
        # callers, Tensor._view_func comparing a new base with the old one, do not)
        setting = sizing is not None and sizing[0] is primal and sizing[1] is tangent
        if setting and type(tangent) is torch.Tensor and type(primal) is torch.Tensor and \
                not primal._is_view() and self.lookup(tangent) is not None and (
                    tangent._is_view() or tangent.__dict__.get(attached) is self.token):
            return False
        fits = _HAS_SAME_STORAGE_NUMEL._op(tangent, primal)
        if fits and setting and type(tangent) is torch.Tensor and (
                self.attaching is None or primal is self.attaching[0]):
            # (to_dual's make_dual attaches it to a passing alias: not counted)
            tangent.__dict__[attached] = self.token  # (forward AD attaches it as it is)
        return fits

    def _dispatch(self, func, args, kwargs, info: _OpInfo):
        if self.paused_depth:
            return info.call(*args, **kwargs)
        if info.passthrough:
            return info.call(*args, **kwargs)  # metadata query: no tensor data is read
        if self.dead_steps:  # (before this operation allocates: as eager frees them)
            self.release_dead_steps()
        if func is _EFFICIENT_ZERO:
            z = _marker_zero(*args, **kwargs)
            if z is None:
                return _structural_zero(*args, **kwargs)
            self.markers.add(z)
            return z
        if self.markers:
            out = self._unmarked(func, args, kwargs)
            if out is not None:
                if out[0] is not None:
                    return out[0]
                args, kwargs = out[1], out[2]
        if info.write_args:
            for t in self._written(args, kwargs, info):
                if _ZERO_ATTR in t.__dict__:  # about to be written: give it real memory
                    del t.__dict__[_ZERO_ATTR]
                    t.set_(torch.zeros(t.shape, dtype=t.dtype, device=t.device))
        zero, tracked = self._scan(args, kwargs, func)
        if tracked and self.zero_products and info.additive:
            args, dropped = self._drop_zero_products(func, args)
            zero = zero or dropped
        if zero:
            zero = self._zero_tensor_op(func, args, kwargs)
            if zero is not None:
                return zero
            args = tuple(_plain_zero(a) for a in args)
            tracked = self._any_tracked(args, kwargs)
        if info.value_independent:
            out = info.call(*args, **kwargs)
            self.note_created(out)
            if info.uninitialized:
                k = storage_key(out)
                if k is not None:
                    self.uninitialized[k] = out.untyped_storage()
            if tracked:
                k = storage_key(out)
                if k is not None:
                    self.suspect_storages.add(k)
            return out
        if tracked:
            return self._record(func, args, kwargs, info)
        if info.custom:
            self._refuse_dropped_tangents(func, args, kwargs)
        if info.write_args:
            for t in self._written(args, kwargs, info):
                self.before_write(t, False, info.name)
        out = info.call(*args, **kwargs)
        if info.zero_product and isinstance(out, torch.Tensor) and _is_zero_product(func, args):
            out.__dict__[_ZERO_PRODUCT_ATTR] = True
            self.zero_products = True
        if info.fresh_outputs or func is aten.lift_fresh.default:
            if isinstance(out, torch.Tensor):
                self.note_created(out)
            elif isinstance(out, (list, tuple)):
                for o in out:
                    if isinstance(o, torch.Tensor):
                        self.note_created(o)
        return out

    def _refuse_dropped_tangents(self, func, args, kwargs) -> None:
        """A custom operator reached the kernels with inputs that carry tangents.

        PyTorch computed no forward-mode derivative for it (custom ops have none
        unless registered with ``torch_linearize.register_jvp``), so the tangent
        would silently be dropped: refuse instead.
        """

        include, exclude = C._dispatch_tls_local_include_set(), C._dispatch_tls_local_exclude_set()
        with C._ForceDispatchKeyGuard(include, exclude - _AUTOGRAD_KEYS), self.paused():
            for a in _tensor_args(args, kwargs):
                if not (a.is_floating_point() or a.is_complex()):
                    continue
                t = unpack_dual(a, level=self.level).tangent
                if t is not None and not t._is_zerotensor():
                    raise NoForwardADError(
                        f"linearize: custom operator {func} has no forward-mode (JVP) rule, so "
                        "the tangent of its input would be silently dropped. Register one with "
                        "torch_linearize.register_jvp(op, jvp, setup_context=...), or wrap the "
                        "call in a custom torch.autograd.Function with a jvp staticmethod."
                    )

    def _retire_marker(self, z: torch.Tensor) -> None:
        """Make marker zero ``z`` an ordinary structural zero (its memory zero). Forward
        AD keeps a marker beyond the formula that made it only as a tangent it attaches
        (``slogdet``'s sign: the efficient zero itself), and attaching asks
        ``_has_same_storage_numel`` first; what reads tangents outside the mode (the
        outputs, a custom Function's inputs) then reads zeros. A marker number that
        its formula still passes on arrives as 0: the general path, as exact."""
        torch.Tensor.fill_(z, 0)
        del z.__dict__[_MARKER_ATTR]
        self.markers.discard(z)

    def retire_markers(self) -> None:
        """At the end of the trace: every marker still alive becomes a plain zero."""
        for z in list(self.markers):
            self._retire_marker(z)

    def _unmarked(self, func, args, kwargs):
        """None where no argument is a marker number (see _MARKER_INT); else ``(zero,
        args, kwargs)`` with the markers replaced by 0: ``zero`` is the structural-zero
        result where a marker stands in a zero position of a product, else None."""
        hit = [i for i, a in enumerate(args) if _is_marker(a) or (
            isinstance(a, (list, tuple)) and any(_is_marker(b) for b in a))]
        khit = [k for k, v in kwargs.items() if _is_marker(v) or (
            isinstance(v, (list, tuple)) and any(_is_marker(b) for b in v)) or (
            isinstance(v, torch.Tensor) and _MARKER_ATTR in v.__dict__)]
        if not hit and not khit:
            return None
        args = tuple(_unmark(a) for a in args) if hit else args
        # (a marker tensor in a positional argument is a structural zero, _plain_zero
        # gives it zero memory; in a keyword argument, here)
        kwargs = {k: _plain_zero(_unmark(v)) for k, v in kwargs.items()} if khit else kwargs
        pos = _ZERO_PRODUCTS.get(func)
        if pos and any(i in pos and not isinstance(args[i], (list, tuple)) for i in hit):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if len(tensors) == 1 and len(args) == 2 and not kwargs and \
                    func in (aten.mul.Tensor, aten.div.Tensor):
                # (`0 * x`, `0 / x`: forward AD's rule for a number operand; x's shape)
                like = tensors[0]
                return _structural_zero(like.shape, dtype=torch.result_type(*args),
                                        device=like.device), args, kwargs
            if tensors:
                return _zero_result(func, args, kwargs, tensors[0].device), args, kwargs
        return None, args, kwargs

    def _zero_tensor_op(self, func, args, kwargs):
        """The structural-zero result of ``func`` on efficient zeros, or None (see above)."""
        pos = _ZERO_PRODUCTS.get(func)
        if pos is None:
            return None
        zeros = [i for i, a in enumerate(args) if _is_zero(a)]
        if func in (aten.add.Tensor, aten.sub.Tensor):
            if len(zeros) != 2:
                return None  # zero + x is x: run it (with an expanded zero)
        elif not any(i in pos for i in zeros):
            return None  # e.g. x / 0
        return _zero_result(func, args, kwargs, args[zeros[0]].device)

    @staticmethod
    def _written(args, kwargs, info: _OpInfo) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for pos, name, _ in info.write_args:
            a = args[pos] if pos is not None and pos < len(args) else kwargs.get(name)
            if isinstance(a, torch.Tensor):
                out.append(a)
            elif isinstance(a, (list, tuple)):
                out.extend(x for x in a if isinstance(x, torch.Tensor))
        return out

    def _nonlinearity(self, func, info: _OpInfo, args) -> str | None:
        """Why recording ``func`` here would not be linear in the tangent, or None.

        Reading tangent values into Python raises at once (the value escapes).
        Everything else is *poison*: the equation is recorded with the reason and
        the error is raised only if a poisoned value reaches an output of ``f``
        (PyTorch sometimes computes, and then discards, such values itself).
        """
        if info.data_read:
            raise NonLinearTangentError(
                f"linearize: {func} reads the value of a tangent-dependent tensor into Python "
                "(e.g. .item(), bool(), torch.equal). The linearized function must be linear in "
                "its tangents; read only primal values."
            )
        if self.poisoned:
            for a in _tensor_args(args, {}):
                v = self.lookup(a)
                if v is not None and v.id in self.poisoned:
                    return self.poisoned[v.id]
        if info.random:
            return (f"linearize: random operation {func} was applied to a tangent-dependent "
                    "tensor; a linear map cannot draw new random numbers from its input.")
        if info.nonlinear:
            return (f"linearize: {func} is not linear but was applied to a tangent-dependent "
                    "tensor. A tangent can only flow through linear operations.")
        pos = info.bilinear
        if pos is not None:
            n = sum(
                1 for p in pos
                if p < len(args) and isinstance(args[p], torch.Tensor) and self.lookup(args[p]) is not None
            )
            if n > 1:
                return (f"linearize: {func} multiplies two tangent-dependent tensors; the result "
                        "is quadratic, not linear, in the tangent.")
        lin = info.linear_only_in
        if lin is not None:
            for p, a in enumerate(args):
                if p not in lin and isinstance(a, torch.Tensor) and self.lookup(a) is not None:
                    return (f"linearize: {func} is not linear in argument {p}, which depends on "
                            "a tangent.")
        return None

    def _sym(self, x: Any, origin) -> Any:
        if isinstance(x, torch.Tensor):
            return self.symbolic(x, origin)
        if isinstance(x, (list, tuple)):
            return type(x)(self._sym(y, origin) for y in x)
        return x

    def _record(self, func, args, kwargs, info: _OpInfo, out: Any = None):
        """Record ``func(*args, **kwargs)``, which has a tracked argument, and return its
        result (``out``: the result, if it was computed already)."""
        poison = self._nonlinearity(func, info, args)
        if poison is None and out is None and self.chain and not info.write_args:
            step = self._chain_step(func, args, kwargs, info)
            if step is not None:
                return step
        written = self._written(args, kwargs, info) if info.write_args else []
        if written:
            like = next(v for v in (self.lookup(a) for a in _tensor_args(args, kwargs))
                        if v is not None)
            for t in written:
                self.before_write(t, True, func, like)
        written_vars = tuple(self.lookup(t) for t in written) if written else ()
        sym = self._sym
        sargs = tuple([sym(a, func) if isinstance(a, (torch.Tensor, list, tuple)) else a
                       for a in args])
        skwargs = {k: sym(v, func) for k, v in kwargs.items()} if kwargs else {}
        valued = False
        if poison is None and not written:
            if id(func) in _POINTWISE_LINEAR_BY_ID and all(
                    a.id in self.valued for a in sargs if isinstance(a, Var)):
                valued = True  # (see _POINTWISE_SHAPE_ONLY_IDS)
            elif out is not None:
                pass
            elif id(func) in _POINTWISE_SHAPE_ONLY_IDS:
                out = _pointwise_shape_only(args, kwargs)
            elif info.shape_only:
                out = _shape_only_result(func, args, kwargs)
        if out is None:
            out = info.call(*args, **kwargs)
        if isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_complex()):
            # Fast path: one floating output.
            var = self.new_var(out)
            if valued:
                self.valued.add(var.id)
            eqn = Eqn(func, sargs, skwargs, var,
                      mutates=tuple(v for v in written_vars if v is not None) if written else ())
            if poison is not None:
                self._poison(eqn, poison)
            self.emit(eqn)
            return out
        out_flat, out_spec = tree_flatten(out)
        tensors = [o for o in out_flat if isinstance(o, torch.Tensor)]
        if not tensors:
            if written:
                # (an in-place operator that returns nothing, _foreach_mul_ say, applied
                # to tangent values themselves; forward AD never does that, its tangent
                # formulas for those operators write one tensor at a time)
                raise NoForwardADError(
                    f"linearize: {func} writes in place into tangent-carrying tensors and "
                    "returns nothing; linearize cannot record it. Use the per-tensor "
                    "operations (a loop of mul_, add_, ...) on tangents instead.")
            # Metadata queries (is_same_size, ...) return Python values that do not
            # depend on tangent data; data reads were rejected above.
            return out
        all_int = not any(o.is_floating_point() or o.is_complex() for o in tensors)
        if all_int and poison is None:
            poison = (f"linearize: {func} produced a {tensors[0].dtype} tensor from a "
                      "tangent-dependent input. Comparisons, indices and integer casts of tangents "
                      "are not linear.")
        # Integer outputs next to floating ones (pivots, indices, info) depend only on
        # primal values; they stay unbound and are read as residuals if used later.
        out_syms = [
            self.new_var(o) if isinstance(o, torch.Tensor) and (
                all_int or o.is_floating_point() or o.is_complex())
            else None if isinstance(o, torch.Tensor) else o
            for o in out_flat
        ]
        eqn = Eqn(func, sargs, skwargs, tree_unflatten(out_syms, out_spec),
                  mutates=tuple(v for v in written_vars if v is not None))
        if poison is not None:
            self._poison(eqn, poison)
        self.emit(eqn)
        return out

    def _poison(self, eqn: Eqn, why: str) -> None:
        eqn.poison = why
        for v in eqn.out_vars():
            self.poisoned[v.id] = why
        for v in eqn.mutates:
            self.poisoned[v.id] = why

    # ------------------------------------------------------------------ outputs
    _UNPACK = object()

    def tangent_of(self, t: torch.Tensor, tangent: Any = _UNPACK) -> Var | torch.Tensor | None:
        """The tracked tangent of dual tensor ``t`` (a Var), an untracked tangent tensor, or None
        (``tangent``: its tangent, if the caller unpacked it already)."""
        if tangent is Tracer._UNPACK:
            tangent = unpack_dual(t, level=self.level).tangent
        if tangent is None:
            return None
        v = self.lookup(tangent)
        return v if v is not None else tangent

