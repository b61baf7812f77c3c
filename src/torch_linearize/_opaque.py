"""Opaque equations: a custom Function's ``jvp`` (and, transposed, its ``backward``).

An opaque node calls user code on the Function's saved context at application
time, with plain tensors. This module gives such nodes the three abilities the
rest of the library needs:

* **batching** -- under ``torch.func.vmap`` the node receives the physical
  batched tensors through :class:`_OpaqueApply`'s ``vmap`` rule (nested vmaps
  add leading batch dimensions) and runs, in order of preference, the
  Function's ``batched_jvp`` / ``batched_vjp`` staticmethod (one call for the
  whole batch; the natural place for a CUDA kernel), ``torch.vmap`` over
  ``jvp``/``backward`` when the Function declares ``generate_vmap_rule = True``,
  or a per-tangent loop (correct, slower). User code always gets plain tensors,
  run with functorch's interpreter stack cleared (so it may call old-style
  Functions, which ``Function.apply`` refuses under a transform);
* **transposition** -- :class:`_OpaqueApply` is an ``autograd.Function`` whose
  backward is the user's ``backward`` on the same ctx (the transpose of
  ``jvp``), so autograd through a linear program works, and
  :mod:`torch_linearize._transpose` can record it as an :class:`OpaqueVjp` node;
* **validation** -- results are checked against the shapes and dtypes recorded
  at linearize time, naming the Function when they do not match.

Contract of ``batched_jvp(ctx, *tangents)``: every tangent is a tensor with one
extra leading batch dimension ``B`` (inputs without a tangent get expanded zeros,
or ``None`` if the Function called ``ctx.set_materialize_grads(False)``;
non-tensor inputs get ``None``); it returns one tensor per differentiable output
with leading dimension ``B`` (``None`` for non-differentiable outputs), exactly
what ``jvp`` would return for each of the ``B`` tangents, stacked. ``ctx`` is
the same (unbatched) context ``jvp`` sees. ``batched_vjp(ctx, *grads)`` is the
same for ``backward``.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch._C._functorch as _ft
import torch.autograd.forward_ad as fwAD
from torch._functorch.pyfunctorch import (
    retrieve_current_functorch_interpreter,
    temporarily_clear_interpreter_stack,
)

from ._errors import LinearizeError, ReleasedError
from ._forward_ad import has_tangent as _carries_tangent
from ._program import type_str

__all__ = ["OpaqueJvp", "OpaqueVjp"]

_Function = torch.autograd.Function


def _has_user_backward(cls: type) -> bool:
    return cls.backward is not _Function.backward or cls.vjp is not _Function.vjp


def _user_backward(cls: type):
    return cls.vjp if cls.vjp is not _Function.vjp else cls.backward


def _requires_grad(args) -> bool:
    # (a loop, not any() over a generator: this runs once per application, often with cold
    # caches, where the generator's frame costs more than the test)
    for a in args:  # noqa: SIM110
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
    return False


_functorch_active = torch._C._are_functorch_transforms_active


class _ShapeOnly(threading.local):
    """Per thread: the nodes (by id) that output zeros of their results' shapes, while an
    autograd graph of a program is built (or its linearity checked), each mapped to that
    build's :class:`RecordingBox`. Per thread, since the same nodes serve every other
    thread's applications of the map meanwhile."""

    def __init__(self) -> None:
        self.nodes: dict[int, RecordingBox] = {}


class RecordingBox:
    """Where the backward of the graph built under one :func:`shape_only` records the
    nodes' transposes (``tracer``; None: they run). Held by each node call's autograd ctx,
    since the autograd engine may run backward on another thread (a device's)."""

    __slots__ = ("tracer",)

    def __init__(self) -> None:
        self.tracer: Any = None


_shape_only = _ShapeOnly()
# How many threads have nodes in shape-only mode: the per-call check reads this first.
_active = [0]
_active_lock = threading.Lock()


@contextmanager
def shape_only(nodes: list) -> Iterator[RecordingBox]:
    """In this thread, ``nodes`` output zeros of their results' shapes (values are
    irrelevant: an autograd graph of the linear program is being built). Yields the box
    through which that graph's backward can record the nodes' transposes."""
    box = RecordingBox()
    mine = {id(n): box for n in nodes if id(n) not in _shape_only.nodes}
    with _active_lock:
        _active[0] += 1
    _shape_only.nodes.update(mine)
    try:
        yield box
    finally:
        for k in mine:
            _shape_only.nodes.pop(k, None)
        with _active_lock:
            _active[0] -= 1


_grad_enabled = torch.is_grad_enabled


def _has_forward_grad(args) -> bool:
    """An argument carries a forward-AD tangent (the map is applied inside eager forward
    AD, or inside linearize: the node's own JVP is the node, see _OpaqueApply.jvp)."""
    level = fwAD._current_level
    for a in args:
        try:
            if _carries_tangent(a, level):
                return True
        except RuntimeError:
            # (a tensor of functorch's batching unpack_dual has no rule for: hessian's
            # jacfwd over jacrev; the general path, _OpaqueApply, unwraps it level by level)
            return True
    return False


def _plain(args) -> bool:
    """No argument is a functorch-wrapped tensor (batched, grad-tracking, ...)."""
    for a in args:
        if isinstance(a, torch.Tensor) and _ft.is_functorch_wrapped_tensor(a):
            return False
    return True


def _needs_autograd_wrapper(args) -> bool:
    if _functorch_active():
        return True
    return _grad_enabled() and _requires_grad(args)


def unwrap_innermost_vmap(args) -> tuple[int, int, list] | None:
    """``(level, batch size, arguments)`` for a call made directly under a vmap: the
    innermost transform is a vmap, and its batched tensor arguments wrap plain tensors
    (no other transform in between) that do not require grad. Batched arguments come
    back as those plain tensors with the batch dim first, unbatched tensors expanded to
    the batch, anything else as is; None where the call is not such a call."""
    if _ft.peek_interpreter_stack() is None:
        return None
    interp = retrieve_current_functorch_interpreter()
    if interp.key() != _ft.TransformType.Vmap:
        return None
    level, size = interp.level(), interp.batch_size()
    moved: list[Any] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if _ft.maybe_get_level(a) == level:
                value, bdim = _ft._unwrap_batched(a, level)
                if _ft.is_functorch_wrapped_tensor(value) or value.requires_grad:
                    return None
                a = value.movedim(bdim, 0) if bdim else value
            elif _ft.is_functorch_wrapped_tensor(a) or a.requires_grad:
                return None
            else:
                a = a.expand(size, *a.shape)
        moved.append(a)
    return level, size, moved


class _OpaqueNode:
    """Shared machinery of :class:`OpaqueJvp` and :class:`OpaqueVjp`.

    ``in_meta[i]``: ``(shape, dtype, device)`` for tensor argument ``i`` (zeros are
    materialized from it), ``None`` for a non-tensor position.
    ``out_meta[j]``: ``(shape, dtype, stride, device)`` for result ``j``, ``None``
    where the result must be ``None``.
    """

    phase = ""
    batched_name = ""

    def __init__(self, cls: type, ctx: Any, in_meta: list, out_meta: list,
                 dirty: dict[int, int], single_output: bool):
        self.cls = cls
        self.ctx = ctx
        self.in_meta = in_meta
        self.out_meta = out_meta
        self.dirty = dirty  # result index -> argument index modified in place
        self.single_output = single_output
        self._zeros: dict[int, torch.Tensor] = {}
        self._zero_versions: dict[int, int] = {}
        # OpaqueJvp: a weak reference to its transposed node; OpaqueVjp: the node it transposes
        self._transposed: Any = None
        # The stale-watch entries ([tensor, version, what]) of tensors only the ctx holds,
        # shared with the transposed node: brought up to date after each call of the
        # user's code (refresh), whose own writes (a workspace) are not stale.
        self.watch: list[list] = []
        # The lean unbatched call (see __call__): the positions whose None tangent must be
        # materialized (such a call takes the general path), the user function, and the
        # one result's shape, dtype and stride.
        self._lean = None
        if not dirty and len(out_meta) == 1 and out_meta[0] is not None:
            shape, dtype, stride, _ = out_meta[0]
            self._lean = (
                [i for i, m in enumerate(in_meta) if m is not None], self.user_fn(),
                tuple(shape), dtype, None if stride is None else tuple(stride),
            )

    @property
    def shape_only(self) -> bool:
        """Whether this node outputs zeros of its results' shapes, in this thread
        (:func:`shape_only`)."""
        return id(self) in _shape_only.nodes if _active[0] else False

    # ---------------------------------------------------------------- entry point
    def __call__(self, *args):
        ctx = self.ctx
        if ctx is None:
            raise ReleasedError(f"{self.display_name}: the linear map was released.")
        lean = self._lean
        if lean is not None and not _functorch_active() and fwAD._current_level < 0 and \
                not (_active[0] and self.shape_only):
            # The per-tangent call with plain tensors, in as few steps (frames, lookups) as
            # possible, since a call between other heavy work pays each in cache misses:
            # what run(0, args) does when no transform or autograd is involved, every
            # tensor tangent is given and the one result is as expected.
            grad = _grad_enabled()
            for i in lean[0]:
                a = args[i]
                if a is None or (grad and a.requires_grad):
                    break
            else:
                o = lean[1](ctx, *args)
                if self.watch:
                    self.refresh()
                if type(o) is torch.Tensor and o.dtype is lean[3] and o.shape == lean[2] and \
                        (lean[4] is None or o.stride() == lean[4]):
                    return (o,)
                return self.finish_lean(o, args)
        wrap = _needs_autograd_wrapper(args) or (
            fwAD._current_level >= 0 and _has_forward_grad(args))
        if wrap:
            out = self._run_under_one_vmap(args)
            if out is not None:
                return out
            return _OpaqueApply.apply(self, 0, *args)
        return self.run(0, args)

    def refresh(self) -> None:
        """After the user's code ran: its writes into tensors only the ctx holds are its
        own (see ``watch``)."""
        for e in self.watch:
            e[1] = e[0]._version

    def finish_lean(self, o: Any, args, batch: tuple = ()) -> tuple:
        """The lean call's result ``o`` when it is not one tensor of the expected dtype,
        shape and layout: normalized and checked as :meth:`run` does. Called by the
        generated ``run1``, which inlines the lean call (see ``_program._inline_node``),
        and, with ``batch = (K,)``, by ``_batch``'s ``runB``, which calls the Function's
        batched call directly on ``K`` stacked tangents."""
        args = list(args)
        return tuple(self._check(j, r, args, batch) for j, r in enumerate(self._as_tuple(o)))

    def _run_under_one_vmap(self, args) -> tuple | None:
        """The common ``vmap(jvp_fn)`` case, batched directly; None where it does not apply.

        Applies when the innermost transform is a vmap whose batched arguments wrap plain
        tensors (no other transform in between, nothing requiring grad or carrying a
        forward-AD tangent) and the node does not write its arguments in place. It does
        what :class:`_OpaqueApply`'s vmap rule does (move the batch dim first, ``run`` with
        one batch dim, re-wrap the results) without the ``autograd.Function`` round trip,
        which costs ~0.2 ms per call.
        """
        if self.dirty or (fwAD._current_level >= 0 and _has_forward_grad(args)):
            return None  # (dual tangents: _OpaqueApply's jvp, the node itself, carries them)
        unwrapped = unwrap_innermost_vmap(args)
        if unwrapped is None:
            return None
        level, _, moved = unwrapped
        outs = self.run(1, moved)
        return tuple(None if o is None else _ft._add_batch_dim(o, 0, level) for o in outs)

    def structure(self) -> tuple:
        """What the generated code and the passes depend on, without the ctx (a
        re-linearization with an equal structure reuses the program with its own nodes,
        see ``_structure_cache``)."""
        return (type(self), self.cls, tuple(self.in_meta), tuple(self.out_meta),
                tuple(sorted(self.dirty.items())), self.single_output,
                tuple(getattr(self, "fwd_out_tensors", ())),
                tuple(getattr(self, "has_tangent", ())))

    @property
    def display_name(self) -> str:
        return f"{self.cls.__qualname__}.{self.phase}"

    def user_fn(self):
        raise NotImplementedError

    def release(self) -> None:
        self.ctx = None
        self._zeros.clear()
        self._transposed = None
        self.watch = []  # (a transpose built before keeps the shared list)

    # ---------------------------------------------------------------- execution
    def _zero(self, i: int) -> torch.Tensor:
        """A zero argument for position ``i``; cached, re-zeroed if user code wrote into it."""
        z = self._zeros.get(i)
        if z is None:
            shape, dtype, device = self.in_meta[i]
            z = torch.zeros(shape, dtype=dtype, device=device)
            self._zeros[i] = z
            self._zero_versions[i] = z._version
        elif z._version != self._zero_versions[i]:
            z.zero_()
            self._zero_versions[i] = z._version
        return z

    def _materialize(self) -> bool:
        return bool(getattr(self.ctx, "materialize_grads", True))

    def _invoke(self, args: list) -> tuple:
        """Call the user function once on unbatched arguments; normalized tuple result."""
        ctx = self.ctx
        if fwAD._current_level < 0:  # no forward-AD level: nothing to disable
            out = self.user_fn()(ctx, *args)
        else:
            with fwAD._set_fwd_grad_enabled(False):
                out = self.user_fn()(ctx, *args)
        if self.watch:
            self.refresh()
        return self._as_tuple(out)

    def _as_tuple(self, out) -> tuple:
        n = len(self.out_meta)
        if not isinstance(out, (tuple, list)):
            out = (out,)
        out = tuple(out)
        # backward may return trailing Nones beyond the number of inputs, like PyTorch allows.
        if len(out) > n and all(o is None for o in out[n:]):
            out = out[:n]
        if len(out) != n:
            raise LinearizeError(
                f"{self.display_name} returned {len(out)} value(s); expected {n} "
                f"(one per {'output' if self.phase == 'jvp' else 'input'} of forward, None where "
                "there is nothing to return)."
            )
        return out

    def _check(self, j: int, o: Any, args: list, batch: tuple) -> Any:
        meta = self.out_meta[j]
        if meta is None:
            if o is not None and self.phase == "jvp":
                raise LinearizeError(
                    f"{self.display_name} returned a tangent at position {j}, but that output of "
                    "forward is not a differentiable tensor. Return None there."
                )
            return None
        shape, dtype, stride, device = meta
        full = (*batch, *shape)
        if o is None:
            return torch.zeros(full, dtype=dtype, device=device)
        if not isinstance(o, torch.Tensor):
            raise LinearizeError(f"{self.display_name} returned {type(o).__name__} at position {j}; "
                                 "expected a tensor or None.")
        if tuple(o.shape) != full or o.dtype != dtype:
            raise LinearizeError(
                f"{self.display_name} returned {type_str(o.shape, o.dtype)} at position {j}; "
                f"expected {type_str(full, dtype)}."
            )
        if j in self.dirty:
            i = self.dirty[j]
            if o is not args[i]:
                raise LinearizeError(
                    f"{self.display_name}: forward modifies input {i} in place (mark_dirty), so jvp "
                    "must modify that input's tangent in place and return it as-is."
                )
        elif not batch and stride is not None and o.stride() != stride:
            o = torch.empty_strided(shape, stride, dtype=dtype, device=o.device).copy_(o)
        return o

    def run(self, nbatch: int, args) -> tuple:
        """Apply the node; the leading ``nbatch`` dimensions of tensor arguments are batch dims."""
        if _ft.peek_interpreter_stack() is None:
            return self._run(nbatch, list(args))
        if _plain(args):
            # Plain tensors under functorch transforms: a vmap's batch unwrapped (see
            # _run_under_one_vmap, LinearMap's runB) with the vmap still on functorch's
            # stack, where Function.apply requires setup_context, so user code calling an
            # old-style Function (forward(ctx, ...)) would fail. No transform sees plain
            # tensors: the user code runs with the stack cleared, as eager code would.
            with temporarily_clear_interpreter_stack():
                return self._run(nbatch, list(args))
        # Tensors of a transform (the jvp or backward rule of _OpaqueApply inside an
        # enclosing one, jacfwd say): through _OpaqueApply, whose rules unwrap them level
        # by level down to a call on plain tensors (above).
        return _OpaqueApply.apply(self, nbatch, *args)

    def _run(self, nbatch: int, args: list) -> tuple:
        if self.shape_only:  # building an autograd graph: values are irrelevant (linear map)
            # (an argument written in place is returned itself, as _OpaqueApply marks it dirty)
            batch = _batch_shape(args, nbatch)
            return tuple(args[self.dirty[j]] if j in self.dirty else None if m is None else
                         torch.zeros((*batch, *m[0]), dtype=m[1], device=m[3])
                         for j, m in enumerate(self.out_meta))
        materialize = self._materialize()
        if nbatch == 0:
            if materialize:
                for i, meta in enumerate(self.in_meta):
                    if args[i] is None and meta is not None:
                        args[i] = self._zero(i)
            out = self._invoke(args)
            return tuple(self._check(j, o, args, ()) for j, o in enumerate(out))
        return self._run_batched(nbatch, args, materialize)

    def _run_batched(self, nbatch: int, args: list, materialize: bool) -> tuple:
        batch = _batch_shape(args, nbatch)
        b = math.prod(batch)
        flat: list[Any] = []
        for i, a in enumerate(args):
            meta = self.in_meta[i]
            if isinstance(a, torch.Tensor):
                flat.append(a.reshape(b, *a.shape[nbatch:]))
            elif a is None and meta is not None and materialize:
                flat.append(self._zero(i).expand(b, *meta[0]))
            else:
                flat.append(a)
        batched_fn = getattr(self.cls, self.batched_name, None)
        if batched_fn is not None:
            if fwAD._current_level < 0:  # no forward-AD level: nothing to disable
                out = self._as_tuple(batched_fn(self.ctx, *flat))
            else:
                with fwAD._set_fwd_grad_enabled(False):
                    out = self._as_tuple(batched_fn(self.ctx, *flat))
            if self.watch:
                self.refresh()
        else:
            out = None
            if getattr(self.cls, "generate_vmap_rule", False) and not self.dirty:
                in_dims = tuple(0 if isinstance(a, torch.Tensor) else None for a in flat)
                # (torch.vmap returns tensors only: None stays None where forward's output
                # is not differentiable, and is a zero tangent where it is)
                out_dims = tuple(None if m is None else 0 for m in self.out_meta)

                def call(*xs):
                    res = self._invoke(list(xs))
                    return tuple(
                        self._check(j, o, list(xs), ()) if m is None else
                        torch.zeros(m[0], dtype=m[1], device=m[3]) if o is None else o
                        for j, (o, m) in enumerate(zip(res, self.out_meta)))

                try:
                    out = self._as_tuple(torch.vmap(call, in_dims=in_dims, out_dims=out_dims)(*flat))
                except LinearizeError:
                    raise
                except (RuntimeError, ValueError):
                    out = None  # user code that vmap cannot batch (e.g. a raw kernel): loop
        if out is None:  # per-tangent loop: correct for any user code, one call per batch element
            per = []
            for k in range(b):
                sl = [a[k] if isinstance(a, torch.Tensor) else a for a in flat]
                res = self._invoke(sl)
                per.append(tuple(self._check(j, o, sl, ()) for j, o in enumerate(res)))
            out = tuple(
                None if self.out_meta[j] is None
                else (flat[self.dirty[j]] if j in self.dirty else torch.stack([p[j] for p in per]))
                for j in range(len(self.out_meta))
            )
        result = []
        for j, o in enumerate(out):
            o = self._check(j, o, flat, (b,)) if not (j in self.dirty and o is flat[self.dirty[j]]) else o
            result.append(None if o is None else o.reshape(*batch, *o.shape[1:]))
        return tuple(result)

    # ---------------------------------------------------------------- transposition
    def transposed(self) -> _OpaqueNode:
        raise NotImplementedError

    def record_transpose(self, grads: tuple, tracer: Any) -> tuple:
        """Record this node's transpose into ``tracer``; return placeholder cotangents."""
        from ._program import Eqn

        node = self.transposed()
        syms = [None if g is None else tracer.symbolic(g, node.display_name) for g in grads]
        outs, results = [], []
        with tracer.paused():
            for meta in node.out_meta:
                if meta is None:
                    outs.append(None)
                    results.append(None)
                    continue
                shape, dtype, stride, device = meta
                ph = torch.ones(shape, dtype=dtype, device=device)
                if stride is not None and ph.stride() != stride:
                    ph = torch.empty_strided(shape, stride, dtype=dtype, device=device).fill_(1)
                outs.append(tracer.new_var(ph))
                results.append(ph)
        tracer.opaque_nodes.append(node)
        tracer.emit(Eqn(node, tuple(syms), {}, tuple(outs), name=node.display_name))
        return tuple(results)


def _batch_shape(args, nbatch: int) -> tuple:
    for a in args:
        if isinstance(a, torch.Tensor):
            return tuple(a.shape[:nbatch])
    return ()


class OpaqueJvp(_OpaqueNode):
    """Calls ``cls.jvp(ctx, *tangents)``; arguments: one per forward input.

    ``fwd_out_tensors[j]``: ``(shape, dtype, device)`` of forward output ``j`` if it is
    a tensor (differentiable or not), else ``None``; ``has_tangent[i]``: whether
    forward input ``i`` carries a tangent. Both describe the transpose.
    """

    phase = "jvp"
    batched_name = "batched_jvp"

    def __init__(self, cls, ctx, in_meta, out_meta, dirty, single_output,
                 fwd_out_tensors: list, has_tangent: list):
        super().__init__(cls, ctx, in_meta, out_meta, dirty, single_output)
        self.fwd_out_tensors = fwd_out_tensors
        self.has_tangent = has_tangent

    def user_fn(self):
        return self.cls.jvp

    def transposed(self) -> OpaqueVjp:
        node = self._transposed
        if node is not None:
            node = node()  # (held weakly: the transposed node holds this one)
        if node is None:
            if not _has_user_backward(self.cls):
                raise LinearizeError(
                    f"transpose(): custom autograd.Function {self.cls.__qualname__} has no backward "
                    "(or vjp) staticmethod, so its jvp cannot be transposed. Implement backward."
                )
            # backward gets a gradient for every tensor output (zeros for non-differentiable
            # ones, as in PyTorch) and returns one per input; only inputs that carry a
            # tangent have a cotangent.
            out_meta = [
                (m[0], m[1], None, m[2]) if m is not None and self.has_tangent[i] else None
                for i, m in enumerate(self.in_meta)
            ]
            # (backward sees the ctx that jvp's views: the same attributes, its own phase)
            ctx = self.ctx
            if ctx is None:
                raise ReleasedError(f"{self.display_name}: the linear map was released.")
            ctx = getattr(ctx, "_tl_base", None) or ctx
            node = OpaqueVjp(self.cls, ctx, list(self.fwd_out_tensors), out_meta, {}, False)
            node.watch = self.watch
            # The transposed node needs this one (transposing a transposed map); this one
            # only caches it, weakly: both strong would be a reference cycle through the
            # ctx, whose saved tensors would outlive both maps until the cyclic GC ran.
            node._transposed = self
            self._transposed = weakref.ref(node)
        return node


class OpaqueVjp(_OpaqueNode):
    """Calls ``cls.backward(ctx, *grads)``; arguments: one per forward output."""

    phase = "backward"
    batched_name = "batched_vjp"

    def user_fn(self):
        return _user_backward(self.cls)

    def transposed(self) -> OpaqueJvp:
        assert self._transposed is not None
        return self._transposed  # type: ignore[return-value]


class _OpaqueApply(_Function):
    """Autograd/vmap entry for an opaque node: ``outs = node.run(nbatch, args)``."""

    @staticmethod
    def forward(node, nbatch, *args):
        return node.run(nbatch, args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.node = inputs[0]
        ctx.nbatch = inputs[1]
        ctx.set_materialize_grads(False)
        node = inputs[0]
        if node.dirty:
            ctx.mark_dirty(*[inputs[2 + i] for i in node.dirty.values()])
        ctx.box = _shape_only.nodes.get(id(node)) if _active[0] else None

    @staticmethod
    def jvp(ctx, _node, _nbatch, *tangents):
        # The node is linear: its JVP at any point is the node applied to the tangents.
        # (Under an outer linearize, this is what the tracer records, as an opaque node.)
        return ctx.node.run(ctx.nbatch, tangents)

    @staticmethod
    def backward(ctx, *grads):
        node = ctx.node
        tracer = ctx.box.tracer if ctx.box is not None else None
        if tracer is not None:
            cots = node.record_transpose(grads, tracer)
        else:
            cots = node.transposed().run(ctx.nbatch, grads)
        return (None, None, *cots)

    @staticmethod
    def vmap(info, in_dims, node, nbatch, *args):
        moved = []
        for a, d in zip(args, in_dims[2:]):
            if isinstance(a, torch.Tensor):
                a = a.movedim(d, 0) if d is not None else a.expand(info.batch_size, *a.shape)
            moved.append(a)
        outs = _OpaqueApply.apply(node, nbatch + 1, *moved)
        return outs, tuple(None if o is None else 0 for o in outs)
