"""Custom ``torch.autograd.Function``: run ``forward`` once, call ``jvp`` per application.

While a trace is active in the current thread, ``torch.autograd.Function.apply``
is routed through :func:`apply_function` (the patch is installed for the
duration of any trace, reference-counted, thread-safe, and removed in
``finally``; other threads and non-tracing calls go straight to PyTorch).

For a Function whose inputs carry tangents we

1. run ``forward`` (and ``setup_context``) exactly once, on plain primal
   tensors, with a context object of our own (:class:`LinearizeCtx`) that
   implements PyTorch's ctx API. The ctx lives exactly as long as the linear
   map, independently of PyTorch's autograd graph;
2. record one opaque equation (:class:`OpaqueJvp`) that calls ``cls.jvp(ctx,
   *tangents)`` with plain tensors at application time, so ``jvp`` may read
   data pointers, call numpy, C++/CUDA/Triton kernels;
3. give every differentiable output a placeholder tangent so that the rest of
   ``f`` is traced as usual; an output that is (a view of) an input carrying a
   tangent gets the same view of that input's tangent instead, as eager forward AD
   requires of ``jvp``, so that writes through either reach the other.

Inside ``torch.func`` transforms (e.g. ``linearize(torch.func.grad(f), x)``)
custom Functions keep PyTorch's own semantics (``jvp`` runs at trace time and
must be written in PyTorch operations), because those transforms need to
differentiate through them.
"""

from __future__ import annotations

import inspect
import operator
import threading
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd.function import FunctionCtx
from torch.utils._pytree import tree_flatten

from . import _overrides
from ._errors import LinearizeError, NoForwardADError
from ._forward_ad import materialize_view_tangents, unpack_dual
from ._opaque import OpaqueJvp
from ._program import Eqn, Var
from ._residuals import ctx_tensors
from ._trace import Tracer, current_tracer

__all__ = ["LinearizeCtx", "function_patch", "trace_jvp"]

_Function = torch.autograd.Function
_SingleLevel = torch.autograd.function._SingleLevelFunction
_BackwardCFunction = torch.autograd.function.BackwardCFunction
_TRACE_JVP_ATTR = "_torch_linearize_trace_jvp"
_patch_lock = threading.Lock()
_patch_users = 0
_original_apply_jvp = _BackwardCFunction.__dict__["apply_jvp"]


def _base_apply(cls, args, kwargs):
    """PyTorch's C++ ``Function.apply`` (what ``super().apply`` reaches without our patch)."""
    return super(_SingleLevel, cls).apply(*args, **kwargs)


def _bind_keywords(cls, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """An old-style Function's ``apply(x, scale=3.0)``: PyTorch's apply passes keyword
    arguments to ``forward(ctx, ...)`` as the positional inputs they name (``jvp`` then
    gets a tangent, None, for ``scale``); bound the same way here, so the call takes the
    per-tangent path as a positional one does. (Keywords the signature cannot bind are
    left to PyTorch.)"""
    try:
        bound = inspect.signature(cls.forward).bind(None, *args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    return tuple(bound.args[1:]), dict(bound.kwargs)


def _refuse_nested_tangents(tracer: Tracer, name: str, i: int, a: Any) -> None:
    """A tensor inside a list/tuple/dict argument is no input of the Function to
    PyTorch: its ``jvp`` gets no tangent for it, which would silently drop the tangent."""
    for leaf in tree_flatten(a)[0]:
        if isinstance(leaf, torch.Tensor) and (leaf.is_floating_point() or leaf.is_complex()):
            t = unpack_dual(leaf, level=tracer.level).tangent
            if t is not None and not t._is_zerotensor():
                raise NoForwardADError(
                    f"linearize: custom autograd.Function {name} got a tensor that carries a "
                    f"tangent inside its argument {i} (a {type(a).__name__}). PyTorch passes "
                    "jvp tangents for tensor arguments only, so this tangent would be silently "
                    "dropped. Pass the tensor as an argument of its own.")


def _patched_apply(cls, *args, **kwargs):
    # ``Function.apply`` (Python) binds default arguments and then calls
    # ``super().apply``, which resolves to this classmethod while a patch is
    # installed; so even ``MyFunction.apply`` references bound before linearize
    # was called come through here.
    tracer = current_tracer()
    if tracer is not None and tracer.direct and not tracer.paused_depth:
        tracer.to_dual()  # (a Function's inputs carry their tangents as duals)
    if tracer is None or tracer.paused_depth or getattr(cls, _TRACE_JVP_ATTR, False):
        return _base_apply(cls, args, kwargs)
    return apply_function(tracer, cls, args, kwargs)


def _patched_apply_jvp(self, *tangents):
    # PyTorch's own forward AD calls a Function's jvp through here (the native
    # path: @trace_jvp Functions, Functions inside torch.func transforms). Check
    # that the result was computed from the tangents with operations we saw.
    out = _original_apply_jvp(self, *tangents)
    tracer = current_tracer()
    if tracer is not None and not tracer.paused_depth:
        _check_native_jvp_result(tracer, self._forward_cls, tangents, out)
    return out


class function_patch:
    """Context manager: route custom Functions through the tracer while any trace runs.

    Installs (reference-counted, thread-safe) ``_SingleLevelFunction.apply`` and
    ``BackwardCFunction.apply_jvp`` hooks, removed when the last trace ends. Calls
    from threads that are not tracing go straight to PyTorch.
    """

    def __enter__(self):
        global _patch_users
        with _patch_lock:
            if _patch_users == 0:
                _SingleLevel.apply = classmethod(_patched_apply)
                _BackwardCFunction.apply_jvp = _patched_apply_jvp
                _overrides.install()
            _patch_users += 1
        return self

    def __exit__(self, *exc):
        global _patch_users
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                del _SingleLevel.apply
                _BackwardCFunction.apply_jvp = _original_apply_jvp
                _overrides.uninstall()
        return False


def _check_native_jvp_result(tracer: Tracer, cls: type, tangents: tuple, out: Any) -> None:
    if not any(isinstance(t, torch.Tensor) and tracer.lookup(t) is not None for t in tangents):
        return
    outs = out if isinstance(out, tuple) else (out,)
    for j, o in enumerate(outs):
        if not isinstance(o, torch.Tensor) or tracer.lookup(o) is not None or o._is_zerotensor():
            continue
        with tracer.paused():
            zero = o.numel() == 0 or not bool(o.any())
        if not zero:
            raise LinearizeError(
                f"linearize: {cls.__qualname__}.jvp ran at trace time (PyTorch's own forward AD: "
                "the Function is decorated with @trace_jvp or runs inside a torch.func transform) "
                f"and returned tangent {j} without computing it from the input tangents with "
                "PyTorch operations (e.g. through numpy or raw data pointers). Such a jvp can only "
                "be called opaquely: remove @trace_jvp / call linearize outside torch.func."
            )


def trace_jvp(cls: type) -> type:
    """Class decorator: let ``linearize`` trace this Function with PyTorch's own forward AD.

    By default ``linearize`` treats a custom ``torch.autograd.Function`` as opaque:
    ``forward`` runs once and ``jvp`` runs per tangent, on plain tensors. A Function
    decorated with ``@trace_jvp`` is instead run the way eager forward-mode AD runs
    it: ``forward`` and ``jvp`` run once at ``linearize`` time (with placeholder
    tangents) and the PyTorch operations of ``jvp`` are recorded into the linear
    program. Use it when reverse-mode autograd must run through the Function
    inside the linearized function (forward-over-reverse, e.g. Hessian-vector
    products with ``torch.autograd.grad(..., create_graph=True)``). ``jvp`` (and
    ``backward``) must then be written in differentiable PyTorch operations.

    Example:
        >>> @trace_jvp
        ... class Square(torch.autograd.Function):
        ...     ...
    """
    if not (isinstance(cls, type) and issubclass(cls, _Function)):
        raise TypeError(
            f"trace_jvp: expected a torch.autograd.Function subclass, got {cls!r}."
        )
    setattr(cls, _TRACE_JVP_ATTR, True)
    return cls


def _uses_setup_context(cls) -> bool:
    return cls.setup_context is not _Function.setup_context


def _has_jvp(cls) -> bool:
    return cls.jvp is not _Function.jvp


class LinearizeCtx(FunctionCtx):
    """The ``ctx`` a custom Function sees under ``linearize``.

    It implements the public ctx API (``save_for_backward``, ``save_for_forward``,
    ``saved_tensors``, ``mark_dirty``, ``mark_non_differentiable``,
    ``set_materialize_grads``, ``needs_input_grad``, arbitrary attributes) with
    PyTorch's forward-mode semantics: inside ``jvp``, ``saved_tensors`` returns
    what was given to ``save_for_forward`` (``()`` if nothing was); inside
    ``backward`` it returns what was given to ``save_for_backward``.

    ``needs_input_grad[i]`` is True when input ``i`` carries a tangent (the
    linearization depends on it), so that one ctx serves both ``jvp`` and
    ``backward`` (the transpose).

    ``forward``/``setup_context`` and ``backward`` see this object; ``jvp`` sees its
    :meth:`jvp_view`, which shares its attribute dict (what one sets, the other reads)
    and has its own phase, so a map and its transpose may run in different threads at
    once without switching one shared phase back and forth.
    """

    # Per object (the attribute dict is shared with the jvp view): the phase, what
    # saved_tensors returns in it, and, for the jvp view, the ctx it views.
    __slots__ = ("_tl_base", "_tl_phase", "_tl_saved")

    def __init__(self, function: type, needs_input_grad: tuple[bool, ...]):
        self.needs_input_grad = needs_input_grad
        self.materialize_grads = True
        self.metadata: dict = {}
        self._forward_cls = function
        self._tl_phase = "forward"
        self._tl_saved: tuple = ()
        self._tl_base: LinearizeCtx | None = None

    def _tl_enter(self, phase: str) -> None:
        """Switch this object to ``phase`` ("forward", "jvp" or "backward"): what its
        saved_tensors returns."""
        self._tl_phase = phase
        key = "saved_for_forward" if phase == "jvp" else "to_save"
        saved = self.__dict__.get(key)
        self._tl_saved = tuple(saved) if saved is not None else ()

    def _tl_refresh(self) -> None:
        """Re-read the saved tensors (after they were replaced in the shared dict), for
        this object and the ctx it views."""
        self._tl_enter(self._tl_phase)
        if self._tl_base is not None:
            self._tl_base._tl_refresh()

    def jvp_view(self) -> LinearizeCtx:
        """The ctx ``jvp`` gets: the same attributes (one shared dict), in phase "jvp"."""
        view = object.__new__(type(self))
        view.__dict__ = self.__dict__
        view._tl_base = self
        view._tl_enter("jvp")
        return view

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        super().save_for_backward(*tensors)
        self._tl_refresh()

    def save_for_forward(self, *tensors: torch.Tensor) -> None:
        super().save_for_forward(*tensors)
        self._tl_refresh()

    # A C-level getter (no Python frame): jvp reads this once per application, often with
    # cold caches. _tl_enter keeps it current.
    saved_tensors = property(
        operator.attrgetter("_tl_saved"),
        doc="What save_for_forward received inside jvp; save_for_backward's otherwise.")

    @property
    def saved_variables(self) -> tuple:  # deprecated alias kept by PyTorch
        return self.saved_tensors

    def __repr__(self) -> str:
        return f"<LinearizeCtx of {self._forward_cls.__qualname__}>"


class _ReverseGuard(torch.autograd.Function):
    """Connects opaque outputs to inputs that require grad; refuses backward during a trace."""

    @staticmethod
    def forward(ctx, name, n_out, *tensors):
        ctx.name = name
        ctx.n_in = len(tensors) - n_out
        return tuple(t.view_as(t) for t in tensors[len(tensors) - n_out:])

    @staticmethod
    def backward(ctx, *grads):
        raise LinearizeError(
            f"linearize: reverse-mode autograd ran through custom Function {ctx.name} inside the "
            "linearized function (forward-over-reverse, e.g. a Hessian-vector product). "
            "linearize runs custom Functions opaquely (forward once, jvp per tangent), so it cannot "
            "differentiate their backward. Decorate the Function with @torch_linearize.trace_jvp "
            "(its jvp and backward must then be PyTorch code), or use torch.func.grad inside f."
        )


def _alias_outputs(outs: tuple, diff_idx: list[int], primal_index: dict[int, int],
                   tangent_syms: list[Any]) -> dict[int, int]:
    """Output index -> input index, for each differentiable output that ``forward``
    returned as a view of (or as) an input whose tangent is traced.

    Eager forward AD requires ``jvp`` to return, for such an output, the matching view
    of that input's tangent: the output's tangent is given by the view alone and aliases
    the input's (an in-place write through either changes both). A view with internal
    overlap (``expand``) cannot carry a tangent and keeps the node's result on a copy.
    """
    aliases: dict[int, int] = {}
    for j in diff_idx:
        o = outs[j]
        i = primal_index.get(id(o))
        if i is None and o._is_view():
            i = primal_index.get(id(o._base))
        if i is not None and isinstance(tangent_syms[i], Var) and \
                torch._debug_has_internal_overlap(o) != 1:
            aliases[j] = i
    return aliases


def apply_function(tracer: Tracer, cls: type, args: tuple, kwargs: dict) -> Any:
    """``cls.apply(*args, **kwargs)`` while ``tracer`` records."""
    # Function.apply has already bound default arguments for setup_context-style Functions.
    if kwargs and not _uses_setup_context(cls):
        args, kwargs = _bind_keywords(cls, args, kwargs)
    if torch._C._are_functorch_transforms_active() or kwargs:
        return _base_apply(cls, args, kwargs)

    name = cls.__qualname__
    primals: list[Any] = []
    tangent_syms: list[Any] = []
    has_tangent = False
    # (an input viewing a buffer f wrote with tangent data after taking the view gets its
    # tangent when first read: here, while the tracer records, not in the paused block)
    materialize_view_tangents(args, tracer.level)
    any_fw_grad = False  # (a zero tangent included: PyTorch would then still call jvp)
    with tracer.paused():
        for a in args:
            if isinstance(a, torch.Tensor):
                p, t = unpack_dual(a, level=tracer.level)
                any_fw_grad = any_fw_grad or t is not None
                sym = None
                if t is not None and not t._is_zerotensor():
                    sym = tracer.lookup(t)
                    if sym is None:  # a constant (untracked) tangent
                        sym = tracer.capture(t, f"{name} input tangent")
                has_tangent = has_tangent or sym is not None
                primals.append(p.detach())
                tangent_syms.append(sym)
            else:
                if isinstance(a, (list, tuple, dict)):
                    _refuse_nested_tangents(tracer, name, len(primals), a)
                primals.append(a)
                tangent_syms.append(None)
    if not has_tangent:
        if any_fw_grad:
            return _base_apply(cls, args, kwargs)
        # No input carries a tangent: PyTorch's apply runs forward (forward AD off) and
        # no jvp; the outputs carry no tangent. Primal code only: outside the mode where
        # safe, as for the forward of a Function with tangent inputs (below).
        with tracer.outside(args) as untraced:
            out = _base_apply(cls, args, kwargs)
        if untraced:
            tracer.adopt([o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)], args)
        return out
    if not _has_jvp(cls):
        if cls.__module__ == "torch.utils.checkpoint":  # (CheckpointFunction: PyTorch's own)
            raise NoForwardADError(
                f"linearize: torch.utils.checkpoint.checkpoint(..., use_reentrant=True) runs "
                f"{name}, which has no forward-mode (jvp) rule. Use use_reentrant=False, whose "
                "checkpointing forward AD (and linearize) goes through."
            )
        raise NoForwardADError(
            f"linearize: custom autograd.Function {name} receives tangent inputs but does not "
            "implement the staticmethod jvp(ctx, *tangents). Add a jvp (it may call any kernel: "
            "linearize calls it with plain tensors)."
        )
    reverse_live = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    )
    needs = tuple(s is not None for s in tangent_syms)
    ctx = LinearizeCtx(cls, needs)
    # (forward and setup_context compute primal values only: outside the dispatch mode
    # where that is safe, at eager speed; see Tracer.outside)
    # (original view tracking: an output viewing an input replays its view ops on that
    # input's tangent, see _alias_outputs, rather than an absolute as_strided)
    with torch.no_grad(), fwAD._set_fwd_grad_enabled(False), \
            torch.autograd._force_original_view_tracking(True), \
            tracer.outside(primals) as untraced:
        if _uses_setup_context(cls):
            out = cls.forward(*primals)
            cls.setup_context(ctx, tuple(primals), out)
        else:
            out = cls.forward(ctx, *primals)
    if untraced:
        made = list(ctx_tensors(ctx)) + [o for o in tree_flatten(out)[0]
                                         if isinstance(o, torch.Tensor)]
        tracer.adopt(made, primals)
    ctx._tl_enter("backward")

    single = not isinstance(out, tuple)
    outs = (out,) if single else out
    non_diff = {id(t) for t in (ctx.__dict__.get("non_differentiable") or ())}
    dirty_in = {id(t) for t in (ctx.__dict__.get("dirty_tensors") or ())}
    primal_index = {id(p): i for i, p in enumerate(primals) if isinstance(p, torch.Tensor)}
    for t in ctx.__dict__.get("dirty_tensors") or ():
        torch.autograd.graph.increment_version(t)

    metas: list[tuple | None] = []
    dirty: dict[int, int] = {}
    for j, o in enumerate(outs):
        if (not isinstance(o, torch.Tensor) or id(o) in non_diff
                or not (o.is_floating_point() or o.is_complex())):
            metas.append(None)
            continue
        if id(o) in dirty_in:
            i = primal_index.get(id(o))
            if i is None:
                raise LinearizeError(
                    f"linearize: {name} passed a tensor to ctx.mark_dirty() that it did not return "
                    "as-is; only inputs modified in place and returned may be marked dirty."
                )
            if tangent_syms[i] is None:
                raise NotImplementedError(
                    f"linearize: {name} modifies input {i} in place (mark_dirty) but that input "
                    "carries no tangent while other inputs do; this case is not supported."
                )
            dirty[j] = i
        metas.append((tuple(o.shape), o.dtype, tuple(o.stride()), o.device))

    in_meta = [(tuple(p.shape), p.dtype, p.device) if isinstance(p, torch.Tensor) else None
               for p in primals]
    fwd_out_tensors = [(tuple(o.shape), o.dtype, o.device) if isinstance(o, torch.Tensor) else None
                       for o in outs]
    node = OpaqueJvp(cls, ctx.jvp_view(), in_meta, metas, dirty, single, fwd_out_tensors,
                     [s is not None for s in tangent_syms])
    tracer.opaque_nodes.append(node)
    tracer.protect_ctx(node)

    results: list[Any] = list(outs)
    diff_idx = [j for j, m in enumerate(metas) if m is not None and j not in dirty]
    aliases = _alias_outputs(outs, diff_idx, primal_index, tangent_syms)
    if reverse_live and diff_idx:
        req = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        with tracer.paused(), torch.enable_grad(), fwAD._set_fwd_grad_enabled(False):
            guarded = _ReverseGuard.apply(name, len(diff_idx), *req, *[outs[j] for j in diff_idx])
        for j, g in zip(diff_idx, guarded):
            results[j] = g

    out_vars: list[Var | None] = [None] * len(outs)
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for j in diff_idx:
        if j in aliases:
            continue  # (its tangent is a view of the input's, taken below: not the node's)
        with tracer.paused():
            primal = results[j]
            if torch._debug_has_internal_overlap(primal) == 1:
                primal = primal.clone()  # forward AD cannot attach a tangent to overlapping memory
            placeholder = torch.ones_like(primal, memory_format=torch.preserve_format)
            out_vars[j] = tracer.new_var(placeholder)
            if primal is not results[j]:
                tracer.note_created(primal)
        pending.append((j, primal, placeholder))

    mutated = []
    dirty_tangents = {}
    for j, i in dirty.items():
        tangent = unpack_dual(args[i], level=tracer.level).tangent
        tracer.before_write(tangent, True, node.display_name)
        v_in = tracer.lookup(tangent)
        mutated.append(v_in)
        out_vars[j] = Var.like(tangent, group=v_in.group)
        dirty_tangents[j] = tangent
        results[j] = args[i]
    tracer.emit(Eqn(node, tuple(tangent_syms), {}, tuple(out_vars), mutates=tuple(mutated),
                    name=node.display_name))
    for j, tangent in dirty_tangents.items():
        tracer.bind(tangent, out_vars[j])
    # The view of the input's tangent is recorded (after any in-place write of the node:
    # it views the written tangent), and is the output's tangent itself: laid out like
    # the output, make_dual keeps it, so the two tangents share their buffer as in eager.
    for j, i in aliases.items():
        tangent = unpack_dual(args[i], level=tracer.level).tangent
        o = outs[j]
        view = tangent.view_as(tangent) if o is primals[i] else o._view_func(tangent)
        results[j] = fwAD.make_dual(results[j], view, level=tracer.level)
    # make_dual runs with the tracer recording, after the node's equation: a layout fix-up
    # it performs on a placeholder (an output viewing an input's storage gets its tangent
    # copied into a buffer laid out like that storage) reads the node's result.
    for j, primal, placeholder in pending:
        results[j] = fwAD.make_dual(primal, placeholder, level=tracer.level)
    return results[0] if single else tuple(results)
