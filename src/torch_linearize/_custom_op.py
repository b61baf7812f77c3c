"""``register_jvp``: forward-mode rules for ``torch.library.custom_op`` operators.

``torch.library.custom_op`` ops have ``register_autograd`` (reverse mode) and
``register_vmap`` but no way to register a forward-mode rule: in eager forward
AD and under ``torch.func.jvp`` they silently produce no (zero) tangent, and
``torch.func.grad``/``jacrev`` reject them. :func:`register_jvp` fixes that.

How it works. A ``CustomOpDef`` routes autograd through an "Autograd" dispatcher
kernel made by ``torch._library.autograd.make_autograd_impl``, which wraps the
op in a generated ``autograd.Function`` only when an input requires grad.
``register_jvp`` registers a replacement Autograd kernel (on a
``torch.library.Library`` fragment kept alive here) that routes the call through
a generated, setup_context-style ``autograd.Function`` whenever an input
requires grad **or carries a forward-mode tangent** at the current
``torch.autograd.forward_ad`` level (which also covers ``torch.func.jvp``):

* ``forward`` runs the op's kernel below autograd (so it runs exactly once);
* ``setup_context`` calls the op's ``register_autograd`` setup_context and the
  jvp ``setup_context`` (read at call time, so ``register_autograd`` may come
  later);
* ``jvp`` calls the rule with one tangent per positional schema input (``None``
  for inputs without a tangent, including trailing ones the dispatcher dropped
  because they equal their defaults), checks the structure, shapes and dtypes
  of what it returns, and, outside ``linearize``, turns ``None`` for a
  differentiable output into zeros (PyTorch's forward AD rejects ``None``);
* ``backward`` calls the op's registered backward (with materialized zero
  gradients, as ``register_autograd`` promises) or raises PyTorch's "no
  autograd formula" error;
* ``generate_vmap_rule = True``: batched tangents are handled by vmapping the
  rule, so a tangent kernel that is itself a custom op with ``register_vmap``
  runs once per batch.

Under :func:`torch_linearize.linearize` the generated Function is intercepted
like any custom Function: the op's kernel runs once, the rule runs once per
tangent on the saved context with plain tensors (so it may launch raw C++/CUDA/
Triton kernels), and the transpose calls the registered backward.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import _C
from torch._functorch.utils import enable_single_level_autograd_function
from torch._library import utils as _lib_utils
from torch._library.custom_ops import CustomOpDef

from ._custom_function import LinearizeCtx
from ._forward_ad import has_tangent

__all__ = ["register_jvp"]

_lock = threading.Lock()
# qualname -> (Library holding our Autograd kernel, the CustomOpDef, the generated Function)
_REGISTRY: dict[str, tuple[Any, CustomOpDef, type]] = {}


class _Meta:
    """The trailing non-tensor argument of the generated Function: keyword-only op args."""

    __slots__ = ("kwargs", "modes")

    def __init__(self, kwargs: dict, modes: tuple[bool, bool] | None = None):
        self.kwargs = kwargs
        # (inside torch.func transforms: the grad and forward-grad modes the op was called
        # under, which forward restores for the levels below, see forward)
        self.modes = modes

    def __repr__(self) -> str:
        return f"<register_jvp metadata kwargs={self.kwargs!r}>"


def _resolve(op: Any) -> CustomOpDef:
    if isinstance(op, CustomOpDef):
        return op
    if isinstance(op, torch._ops.OpOverloadPacket):
        op = op._qualified_op_name
    elif isinstance(op, torch._ops.OpOverload):
        op = op._name
    if not isinstance(op, str):
        raise TypeError(
            f"register_jvp: expected an operator made by torch.library.custom_op (the returned "
            f"object, or its qualified name 'namespace::name'), got {type(op).__name__}."
        )
    if "::" not in op:
        raise ValueError(
            f"register_jvp: {op!r} is not a qualified operator name; expected 'namespace::name'."
        )
    opdef = torch._library.custom_ops.OPDEFS.get(op)
    if opdef is None:
        raise ValueError(
            f"register_jvp: {op!r} is not an operator created with torch.library.custom_op. "
            "register_jvp attaches a forward-mode rule to custom_op operators only (for a "
            "hand-written autograd.Function, define its jvp staticmethod instead)."
        )
    return opdef


def _check_schema(qualname: str, schema: Any) -> None:
    # (out= variants write their out arguments, so they are mutable schemas too)
    if schema.is_mutable:
        raise ValueError(
            f"register_jvp: {qualname} mutates its arguments (schema {schema}); forward-mode "
            "rules, like register_autograd formulas, need a functional operator."
        )
    if any(_lib_utils.is_tensorlist_like_type(a.type)
           for a in (*schema.arguments, *schema.returns)):
        raise NotImplementedError(
            f"register_jvp: {qualname} has Tensor[] arguments or returns (schema {schema}); "
            "only Tensor / Tensor? arguments and Tensor returns are supported."
        )
    if len(schema.returns) == 0:
        raise ValueError(f"register_jvp: {qualname} returns nothing, so it has no tangent.")


def _differentiable(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _any_requires_grad(args: tuple) -> bool:
    fast = getattr(_C, "_any_requires_grad", None)  # what PyTorch's own kernel uses (C++)
    if fast is not None:
        return fast(*args)
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _any_forward_tangent(args: tuple) -> bool:
    level = fwAD._current_level
    if level < 0 or not _C._is_fwd_grad_enabled():
        return False
    return any(has_tangent(a, level) for a in args)


def _make_function(opdef: CustomOpDef, jvp: Callable, jvp_setup: Callable | None) -> type:
    op = opdef._opoverload
    qualname = opdef._qualname
    schema = op._schema
    single = len(schema.returns) == 1
    kwonly = _lib_utils.has_kwarg_only_args(schema)
    n_inputs = sum(not a.kwarg_only for a in schema.arguments)

    def call_setup(fn: Callable, ctx: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if kwonly:
            fn(ctx=ctx, inputs=args, keyword_only_inputs=kwargs, output=output)
        else:
            fn(ctx=ctx, inputs=args, output=output)

    def forward(*args):
        meta = args[-1]
        # Below autograd, so the op's kernel runs as-is (and only once).
        if meta.modes is None:
            with _C._AutoDispatchBelowAutograd():
                return op(*args[:-1], **meta.kwargs)
        # Applied at one torch.func level (see _make_autograd_kernel): below it the op
        # reaches the enclosing levels (an outer grad, a jvp, linearize's forward AD),
        # whose own autograd kernels must see it to differentiate through it; but
        # Function.apply runs forward with grad and forward grad off, which would hide
        # the op from them (hessian then misses the (3x^2)^2 exp(x^3) term of
        # exp(x^3)). Restore the caller's modes for them.
        grad, fwd = meta.modes
        with torch.set_grad_enabled(grad), fwAD._set_fwd_grad_enabled(fwd), \
                _C._AutoDispatchBelowAutograd():
            return op(*args[:-1], **meta.kwargs)

    def setup_context(ctx, inputs, output):
        meta = inputs[-1]
        outs = (output,) if single else tuple(output)
        ctx._tl_op_outputs = tuple((tuple(o.shape), o.dtype, o.device) for o in outs)
        ctx.set_materialize_grads(False)  # jvp sees None for inputs without a tangent
        autograd_setup = opdef._setup_context_fn
        if autograd_setup is None and jvp_setup is None:
            return
        # Like PyTorch: re-insert arguments the dispatcher dropped because they equal defaults.
        args, kwargs = _lib_utils.fill_defaults(schema, inputs[:-1], meta.kwargs)
        if autograd_setup is not None:
            call_setup(autograd_setup, ctx, args, kwargs, output)
        if jvp_setup is not None and jvp_setup is not autograd_setup:
            call_setup(jvp_setup, ctx, args, kwargs, output)

    def jvp_(ctx, *tangents):
        # (drop _Meta's; the dispatcher drops trailing arguments equal to their defaults:
        # the rule gets None for those, one tangent per positional input in every path)
        tangents = tangents[:-1]
        if len(tangents) < n_inputs:
            tangents += (None,) * (n_inputs - len(tangents))
        outputs = ctx._tl_op_outputs
        result = _check_jvp_result(qualname, single, outputs, jvp(ctx, *tangents))
        if isinstance(ctx, LinearizeCtx):
            return result  # linearize takes None as a zero tangent
        # PyTorch's forward AD (eager, torch.func) asserts on None for a differentiable output.
        if single:
            return _zero_if_none(result, outputs[0])
        return tuple(_zero_if_none(t, o) for t, o in zip(result, outputs))

    def backward(ctx, *grads):
        backward_fn = opdef._backward_fn
        if backward_fn is None:
            raise RuntimeError(
                f"Trying to backward through {op} but no autograd formula was registered. "
                "Please use register_autograd to add one."
            )
        # register_autograd promises materialized gradients; ours are off for the jvp's sake.
        grads = tuple(
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            for g, (shape, dtype, device) in zip(grads, ctx._tl_op_outputs)
        )
        prev = ctx.needs_input_grad
        try:
            ctx.needs_input_grad = prev[:-1]
            result = backward_fn(ctx, *grads)
        finally:
            ctx.needs_input_grad = prev
        if isinstance(result, tuple):
            return (*result, None)
        return result, None

    name = f"JvpFor_{opdef._namespace}_{opdef._name}"
    cls = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "jvp": staticmethod(jvp_),
        "backward": staticmethod(backward),
        "generate_vmap_rule": True,
        "__doc__": f"autograd.Function generated by torch_linearize.register_jvp for {qualname}.",
    })
    cls.__qualname__ = qualname  # names the op in linearize's errors and LinearMap repr
    return cls


def _zero_if_none(tangent: Any, output: tuple) -> Any:
    shape, dtype, device = output
    if tangent is None and _differentiable(dtype):
        return torch.zeros(shape, dtype=dtype, device=device)
    return tangent


def _check_jvp_result(qualname: str, single: bool, outputs: tuple, result: Any) -> Any:
    n = len(outputs)
    if single:
        if isinstance(result, (tuple, list)):
            raise RuntimeError(
                f"register_jvp({qualname}): the jvp rule returned a {type(result).__name__} of "
                f"{len(result)}; the op returns one Tensor, so the rule must return one Tensor "
                "(or None)."
            )
        results = (result,)
    else:
        if not isinstance(result, (tuple, list)) or len(result) != n:
            got = (f"a {type(result).__name__} of {len(result)}"
                   if isinstance(result, (tuple, list)) else type(result).__name__)
            raise RuntimeError(
                f"register_jvp({qualname}): the jvp rule returned {got}; the op returns {n} "
                f"Tensors, so the rule must return a tuple of {n} (Tensor or None each)."
            )
        results = tuple(result)
    for j, (t, (shape, dtype, _)) in enumerate(zip(results, outputs)):
        if t is None:
            continue
        where = "" if single else f" at position {j}"
        if not isinstance(t, torch.Tensor):
            raise RuntimeError(
                f"register_jvp({qualname}): the jvp rule returned {type(t).__name__}{where}; "
                "expected a Tensor or None."
            )
        if not _differentiable(dtype):
            raise RuntimeError(
                f"register_jvp({qualname}): the jvp rule returned a tangent{where} for an output "
                f"of dtype {dtype}, which is not differentiable; return None there."
            )
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise RuntimeError(
                f"register_jvp({qualname}): the jvp rule returned a tangent{where} of shape "
                f"{tuple(t.shape)} and dtype {t.dtype}; the output has shape {shape} and dtype "
                f"{dtype}."
            )
    return results[0] if single else results


def _function_base_apply(cls: type, *args: Any) -> Any:
    # PyTorch's C++ Function.apply at the current functorch layer; this is how functorch
    # applies its own per-layer Functions (torch._functorch.autograd_function).
    with enable_single_level_autograd_function():
        return super(torch.autograd.function._SingleLevelFunction, cls).apply(*args)


def _make_autograd_kernel(opdef: CustomOpDef, fn_cls: type) -> Callable:
    op = opdef._opoverload

    def autograd_kernel(keyset, *args, **keyword_only_args):
        if (_C.is_grad_enabled() and _any_requires_grad(args)) or _any_forward_tangent(args):
            if _C._are_functorch_transforms_active():
                # We are already inside a functorch layer (this kernel runs on its wrappers,
                # like any aten op's autograd kernel), so apply the Function at this level
                # directly; Function.apply would re-dispatch a custom_function_call that
                # has no kernel below the layer's front key.
                return _function_base_apply(fn_cls, *args, _Meta(
                    keyword_only_args, (_C.is_grad_enabled(), _C._is_fwd_grad_enabled())))
            return fn_cls.apply(*args, _Meta(keyword_only_args))
        with _C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & _C._after_autograd_keyset, *args, **keyword_only_args)

    return autograd_kernel


def register_jvp(
    op: CustomOpDef | str,
    jvp: Callable,
    *,
    setup_context: Callable | None = None,
) -> None:
    """Register a forward-mode (JVP) rule for a ``torch.library.custom_op`` operator.

    Mirrors ``torch.library.register_autograd(op, backward, *, setup_context=None)``:

    * ``setup_context(ctx, inputs, output)`` (or ``setup_context(ctx, inputs,
      keyword_only_inputs, output)`` for ops with keyword-only arguments) runs
      once, after the op's kernel; it saves what the rule needs on ``ctx``
      (tensors with ``ctx.save_for_forward`` or as attributes);
    * ``jvp(ctx, *input_tangents)`` gets one tangent per positional input of
      the schema (``None`` for non-tensor inputs, inputs without a tangent and
      arguments left at their defaults) and returns the output tangent(s) with
      the op's output structure (a Tensor, or a tuple with one Tensor or
      ``None`` per output; ``None`` is a zero tangent in every transform).
      Inside ``jvp``, ``ctx.saved_tensors`` is what ``save_for_forward``
      received.

    Afterwards the op supports ``torch_linearize.linearize`` (kernel once, rule
    per tangent on the saved ``ctx`` with plain tensors, so the rule may call
    raw kernels), eager ``torch.autograd.forward_ad``, ``torch.func.jvp`` /
    ``jacfwd`` (the rule must then be PyTorch code or custom ops), and, with
    ``register_autograd``, ``torch.func.grad`` / transposition. Batched
    tangents vmap the rule, so a tangent kernel wrapped as a custom op with
    ``register_vmap`` runs once per batch. ``register_autograd`` may be called
    before or after ``register_jvp``. Calling ``register_jvp`` again replaces
    the rule.

    Args:
        op: the object returned by ``torch.library.custom_op`` or its qualified
            name ``"namespace::name"``.
        jvp: ``jvp(ctx, *input_tangents) -> output tangent(s)``.
        setup_context: optional ``setup_context(ctx, inputs, output)``; if it is
            the same function as the op's ``register_autograd`` setup_context it
            runs once.

    Example:
        >>> @torch.library.custom_op("mylib::cube", mutates_args=())
        ... def cube(x: torch.Tensor) -> torch.Tensor:
        ...     return x**3
        >>> def setup_context(ctx, inputs, output):
        ...     ctx.save_for_forward(inputs[0])
        >>> def cube_jvp(ctx, t):
        ...     (x,) = ctx.saved_tensors
        ...     return 3 * x**2 * t
        >>> torch_linearize.register_jvp(cube, cube_jvp, setup_context=setup_context)
        >>> y, jvp_fn = torch_linearize.linearize(cube, torch.tensor([2.0]))
        >>> jvp_fn(torch.tensor([1.0]))
        tensor([12.])
    """
    opdef = _resolve(op)
    if not callable(jvp):
        raise TypeError(f"register_jvp({opdef._qualname}): jvp must be callable, got "
                        f"{type(jvp).__name__}.")
    if setup_context is not None and not callable(setup_context):
        raise TypeError(f"register_jvp({opdef._qualname}): setup_context must be callable or "
                        f"None, got {type(setup_context).__name__}.")
    _check_schema(opdef._qualname, opdef._opoverload._schema)
    fn_cls = _make_function(opdef, jvp, setup_context)
    kernel = _make_autograd_kernel(opdef, fn_cls)
    with _lock:
        old = _REGISTRY.pop(opdef._qualname, None)
        if old is not None:
            old[0]._destroy()
        with warnings.catch_warnings():
            # Replacing the op's Autograd kernel is the point; PyTorch warns about overrides.
            warnings.filterwarnings("ignore", message=".*[Oo]verrid.*previously registered kernel")
            warnings.filterwarnings("ignore", message="Warning only once for all operators")
            lib = torch.library.Library(opdef._namespace, "FRAGMENT")
            # allow_override: torch 2.11 refuses by default (2.13 allows it by default)
            lib.impl(opdef._name, kernel, "Autograd", with_keyset=True, allow_override=True)
        _REGISTRY[opdef._qualname] = (lib, opdef, fn_cls)
