"""``LinearMap``: the object ``linearize`` returns (``jvp_fn``), and its transpose."""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch._functorch.pyfunctorch import (
    retrieve_current_functorch_interpreter,
    temporarily_clear_interpreter_stack,
)
from torch.utils._pytree import (
    TreeSpec,
    _broadcast_to_and_flatten,
    tree_flatten,
    tree_map,
    tree_unflatten,
)

from ._checks import LeafSpec, _children, _is_none, flatten_tangents
from ._errors import LinearizeError, ReleasedError, StaleResidualError
from ._opaque import unwrap_innermost_vmap
from ._program import Program, Var, format_eqn, type_str

__all__ = ["LinearMap"]

_ft = torch._C._functorch
_Tensor = torch.Tensor


def _loop_over_vmap_batch(run: Callable[..., tuple], flat: list) -> tuple | None:
    """Fallback for ``vmap(linear_map)`` when an operation of the program has no batching rule.

    Unwraps the inputs of the innermost vmap level, runs the program once per
    batch element and re-wraps the stacked results. Returns None when no input
    is batched (the error was not a batching problem).
    """
    levels = [_ft.maybe_get_level(x) for x in flat
              if isinstance(x, torch.Tensor) and _ft.is_batchedtensor(x)]
    if not levels:
        return None
    level = max(levels)
    unwrapped, size = [], None
    for x in flat:
        if isinstance(x, torch.Tensor) and _ft.is_batchedtensor(x) and _ft.maybe_get_level(x) == level:
            t, bdim = _ft._unwrap_batched(x, level)
            t = t.movedim(bdim, 0)
            size = t.shape[0]
            unwrapped.append((t, True))
        else:
            unwrapped.append((x, False))
    # Run at the level below this vmap, so that what runs per element (custom Function
    # nodes batch their arguments themselves under a vmap) sees plain tensors.
    interp = retrieve_current_functorch_interpreter()
    lower = interp.lower() if interp is not None and interp.level() == level else nullcontext()
    with lower:
        per = [run(*[t[b] if batched else t for t, batched in unwrapped]) for b in range(size)]
    return tuple(_ft._add_batch_dim(torch.stack([p[j] for p in per]), 0, level)
                 for j in range(len(per[0])))


_grad_enabled = torch.is_grad_enabled
_STRIDED = torch.strided
_functorch_active = torch._C._are_functorch_transforms_active
_fwAD = torch.autograd.forward_ad


def _needs_grad(flat) -> bool:
    """A tangent requires grad (under torch.func.grad/vjp too: functorch marks the
    tensors it differentiates)."""
    return any(t.requires_grad for t in flat)


class _ThroughTranspose(torch.autograd.Function):
    """Reverse mode through a linear map: one application of its transpose.

    Not autograd's graph of the recorded operations: besides building a graph per call,
    that graph saves values some operations need for *other* inputs (tanh_backward keeps
    its incoming tangent), which a later in-place operation of the program may overwrite,
    making autograd refuse a valid program.
    """

    generate_vmap_rule = True  # (vmap of grad: forward and backward are programs)

    @staticmethod
    def forward(lm, run, *flat):
        try:
            return tuple(run(*flat))
        except RuntimeError as e:  # (under vmap of grad: an op without a batching rule)
            return _after_failure(e, run, list(flat))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.lm, ctx.run = inputs[0], inputs[1]

    @staticmethod
    def jvp(ctx, _lm, _run, *tangents):
        # forward mode through a linear map is the map itself
        lm = ctx.lm
        flat = [t if t is not None else torch.zeros(ls.shape, dtype=ls.dtype, device=ls.device)
                for t, ls in zip(tangents, (lm._in_leaves[i] for i in lm._diff_positions))]
        # (an integer or bool output is not differentiable: autograd wants None there)
        return tuple(o if lm._out_leaves[k].differentiable else None
                     for o, k in zip(ctx.run(*flat), lm._out_positions))

    @staticmethod
    def backward(ctx, *grads):
        lm = ctx.lm
        cots = []
        for g, k in zip(grads, lm._out_positions):
            ls = lm._out_leaves[k]
            if ls.differentiable:
                cots.append(g if g is not None else
                            torch.zeros(ls.shape, dtype=ls.dtype, device=ls.device))
        t = lm.transpose()
        # one gradient per input of forward: lm's differentiable tangents, which are t's
        # differentiable outputs (t's program also returns zeros for integer outputs)
        outs = t._run_flat(cots)
        return (None, None, *(o for o, k in zip(outs, t._out_positions)
                              if t._out_leaves[k].differentiable))


def _same_meta(program: Any, meta: tuple) -> bool:
    """Whether ``program``'s one input is described by ``meta`` (shape, dtype, device)."""
    inputs = getattr(program, "inputs", None)
    if not inputs or len(inputs) != 1:
        return False
    v = inputs[0]
    return (tuple(v.shape), v.dtype, v.device) == (tuple(meta[0]), meta[1], meta[2])


def _after_failure(e: RuntimeError, run: Callable[..., tuple], flat: list) -> tuple:
    """The program's outputs after ``run(*flat)`` raised ``e``: under vmap, an operation
    without a batching rule is run element by element; anything else re-raises ``e``."""
    if not isinstance(e, LinearizeError):
        outs = _loop_over_vmap_batch(run, flat)
        if outs is not None:
            return outs
    raise e


def _batch_size(tangents: tuple, in_dims: int) -> float:
    """The batch size of ``batched``'s tangents along ``in_dims`` (its first tensor leaf;
    infinity when there is none or the dim is out of range: torch.vmap then reports it)."""
    for t in tree_flatten(tangents)[0]:
        if isinstance(t, torch.Tensor):
            return t.shape[in_dims] if -t.dim() <= in_dims < t.dim() else math.inf
    return math.inf


class LinearMap:
    """A linear function of tensors recorded by :func:`torch_linearize.linearize`.

    ``jvp_fn = linearize(f, *primals)[1]`` maps tangents (structured like
    ``primals``) to the tangent of ``f``'s output (structured like the output).
    ``jvp_fn.transpose()`` maps cotangents (structured like the output) to
    cotangents for the primals (a tuple with one entry per primal), like the
    ``vjp_fn`` of ``torch.func.vjp``. Both only run recorded linear operations
    (and custom Functions' ``jvp``/``backward``) on residuals computed once.

    Works under ``torch.func.vmap`` (the whole batch goes through the program
    once), under autograd (reverse mode through the map gives its transpose),
    and with :meth:`jacobian`.

    Attributes:
        residual_bytes: bytes of the distinct storages allocated during
            ``linearize`` (or ``transpose``) that this map keeps alive. What a custom
            Function's ``forward``/``setup_context`` saves counts here unless it is in
            the storage of one of the Function's inputs (they run unobserved, so a
            global tensor they save is counted too; it is still watched for changes).
        external_bytes: bytes of pre-existing storages it references
            (primals, captured parameters): kept alive, not allocated by it.
    """

    def __init__(
        self,
        program: Program,
        run: Callable[..., tuple],
        *,
        api: str,
        arg_name: str,
        ref_name: str,
        in_spec: TreeSpec,
        in_leaves: list[LeafSpec],
        out_spec: TreeSpec,
        out_leaves: list[LeafSpec | None],
        stale_watch: list[tuple[torch.Tensor, int, str]],
        residual_bytes: int,
        external_bytes: int,
        opaque_nodes: list[Any],
        created: set[int],
        source_program: Program | None = None,
        eager_run: Callable[..., tuple] | None = None,
    ):
        # ``_program``: the linear program (what transposition and printing use);
        # ``_driver``: what ``_run`` executes (the same, or its compiled form).
        self._program = source_program if source_program is not None else program
        self._driver = program
        self._run = run
        # Compiled maps: the eager program, used under functorch transforms (vmap,
        # jacobian), which torch.compile'd code cannot run inside.
        self._eager_run = eager_run
        self._api = api
        # A name, as functions have: torch.vmap names its function in error messages it
        # formats on every call, and falls back to repr(), which prints the whole program.
        self.__name__ = api.split("(", 1)[0]
        self._arg_name = arg_name
        self._ref_name = ref_name
        self._in_spec = in_spec
        self._in_leaves = in_leaves
        self._diff_positions = [i for i, ls in enumerate(in_leaves) if ls.differentiable]
        self._out_spec = out_spec
        self._out_leaves = out_leaves
        # Program outputs cover the differentiable output leaves; others are None.
        self._out_positions = [i for i, ls in enumerate(out_leaves) if ls is not None]
        self._n_out = len(out_leaves)
        self._stale_watch = stale_watch
        self._opaque_nodes = opaque_nodes
        self._created = created
        self.residual_bytes = residual_bytes
        self.external_bytes = external_bytes
        # Fast paths (the common shapes of a call), checked leaf by leaf without pytree:
        # all tangents are top-level positional tensors; the output is one tensor.
        self._flat_args = (
            in_spec.type is tuple and in_spec.num_leaves == in_spec.num_children
            and all(c.is_leaf() for c in _children(in_spec))
            and all(ls.differentiable for ls in in_leaves)
        )
        self._metas = [(ls.shape, ls.dtype, ls.device) for ls in in_leaves]
        self._single_out = out_spec.num_leaves == 1 and out_spec.is_leaf() and \
            len(self._out_positions) == 1
        # The leanest path, for the commonest map (one tensor in, one tensor out, eager):
        # the program's generated one-tensor entry (see compile_program's run1), else
        # None (the watched versions are compared first). A call made between other heavy
        # work finds the interpreter's caches cold, and then every attribute and frame of
        # the general path costs ~0.1-1 us instead of ~20 ns (measured: 8-20 us per call
        # on the CPU benchmarks' 1e6-element maps).
        run1 = getattr(run, "entry1", None)
        self._fast1 = (
            run1
            if run1 is not None and self._flat_args and len(self._metas) == 1
            and self._single_out and eager_run is None
            and _same_meta(program, self._metas[0]) else None
        )
        self._released = False
        # A map: its transpose (held). A transpose: a weak reference to the map it
        # transposes, and that map's state to rebuild it from (see transpose()).
        self._transposed: LinearMap | weakref.ReferenceType | None = None
        self._origin_state: dict | None = None
        # batched()'s direct program: None until first needed, False where none applies
        self._batched_run: Callable[..., tuple] | bool | None = None
        # whether batches run faster in chunks (_batch.chunks_pay_off): None until needed
        self._chunk_rule: bool | None = None
        self._lock = threading.Lock()
        # The handles sharing this map's residuals, program and custom-Function contexts
        # (a map and its compile() copies, weakly): release() releases them all.
        self._share = [weakref.ref(self)]

    # ------------------------------------------------------------------ application
    def __call__(self, *args: Any) -> Any:
        fast = self._fast1
        if fast is not None and len(args) == 1:
            for t, version, _ in self._stale_watch:
                if t._version != version:
                    break  # the general path names the modified tensor
            else:
                try:
                    out = fast(args[0])  # NotImplemented: the tangent needs the general checks
                except RuntimeError as e:
                    return _after_failure(e, self._run, [args[0]])[0]
                if out is not NotImplemented:
                    return out
        return self._call(args)

    def _call(self, args: tuple) -> Any:
        run = self._run
        if run is None:
            raise self._released_error()
        if self._eager_run is not None and _ft.maybe_current_level() is not None:
            run = self._eager_run
        flat = self._tangents(args)
        if self._stale_watch:
            self._check_stale()
        # (the fast path of _tangents returns args itself: no tangent requires grad)
        if flat is not args and _grad_enabled() and _needs_grad(flat):
            outs = _ThroughTranspose.apply(self, run, *flat)
        else:
            outs = self._under_one_vmap(flat) if _functorch_active() else None
            if outs is None:
                try:
                    outs = run(*flat)
                except RuntimeError as e:
                    outs = _after_failure(e, run, flat)
        if self._single_out:
            return outs[0]
        return self._structured(outs)

    def _structured(self, outs) -> Any:
        """The program's outputs as ``f``'s output structure (None where a leaf has none)."""
        if self._single_out:
            return outs[0]
        if len(self._out_positions) != self._n_out:
            full: list[Any] = [None] * self._n_out
            for pos, val in zip(self._out_positions, outs):
                full[pos] = val
            outs = full
        return tree_unflatten(list(outs), self._out_spec)

    def _batched_program(self) -> Callable[..., tuple] | bool:
        """``_batch.batched_program`` of this map, built on first use (False: none)."""
        run_b = self._batched_run
        if run_b is None:
            from ._batch import batched_program

            run_b = self._batched_run = batched_program(self._program) or False
        return run_b

    def _under_one_vmap(self, flat) -> tuple | None:
        """``vmap(jvp_fn)`` of a program that broadcasts a batch dim (see :meth:`batched`):
        the physical batch run through ``runB``, not op by op through functorch's
        batching rules; None where it does not apply.

        Applies when the innermost transform is a vmap whose batched tangents wrap plain
        tensors (no other transform in between, nothing requiring grad, no forward-AD
        level), as custom-Function nodes do for their own call
        (``_OpaqueNode._run_under_one_vmap``): batch dims moved first, tangents the vmap
        does not batch expanded (``_opaque.unwrap_innermost_vmap``), results re-wrapped at
        the vmap's level."""
        if _fwAD._current_level >= 0 or not all(isinstance(t, torch.Tensor) for t in flat):
            return None
        unwrapped = unwrap_innermost_vmap(flat)
        if unwrapped is None:
            return None
        run_b = self._batched_program()
        if not run_b:
            return None
        level, size, stacked = unwrapped
        # (plain tensors: run with functorch's stack cleared, as a custom Function's
        # batched_jvp would be in eager code; Function.apply under a transform refuses
        # old-style Functions it may call)
        with temporarily_clear_interpreter_stack():
            outs = run_b(size, *stacked)
        return tuple(_ft._add_batch_dim(o, 0, level) for o in outs)

    def _run_flat(self, flat: list) -> tuple:
        """The program on validated flat tangents (reverse mode through it: its transpose)."""
        run = self._run
        if run is None:
            raise self._released_error()
        if _grad_enabled() and _needs_grad(flat):
            return _ThroughTranspose.apply(self, run, *flat)
        return run(*flat)

    def batched(self, *tangents: Any, in_dims: Any = 0, out_dims: Any = 0,
                chunk_size: int | None = None) -> Any:
        """The map applied to a batch of tangents: ``torch.vmap(jvp_fn, in_dims, out_dims,
        chunk_size=chunk_size)(*tangents)``, with the same arguments and results.

        Faster where it can be: when every operation of the program broadcasts a
        leading batch dimension (elementwise operations, custom Functions, which batch
        their own call) and the tangents are plain tensors with integer ``in_dims``, the
        program runs directly on the stacked tangents, with no ``torch.vmap`` layer
        (with ``chunk_size``, once per chunk). Any other program or call goes through
        ``torch.vmap``.

        ``chunk_size=None`` on a CPU: a program with three or more arithmetic
        operations and no matrix product (a stencil, say) runs a batch of over 8 MiB of
        tangents in chunks of about 2 MiB of tangents, whose intermediates stay in cache;
        the results are the same. On 64 tangents of a 512x512 stencil that is 1.6-3.2x
        faster with glibc's default allocator (two machines), and with an allocator that
        keeps freed memory 1.6x faster on an AMD EPYC but 1.3x slower on an Intel Xeon
        whose 300 MiB cache holds the whole batch (``benchmarks/batch_chunks.py``).
        ``chunk_size=K`` or more runs one batch (no split, no concatenation).
        """
        if self._run is None:
            raise self._released_error(".batched()")
        if type(in_dims) is int and any(t is None for t in tree_flatten(
                tangents, is_leaf=_is_none)[0]):
            # None tangents (an integer primal's, an integer output's cotangent) are not
            # batched: torch.vmap would refuse in_dims=0 for them
            in_dims = tree_map(lambda x, d=in_dims: None if x is None else d, tangents,
                               is_leaf=_is_none)
        if type(in_dims) is int and self._flat_args and len(tangents) == len(self._metas):
            for i, (t, (shape, _, _)) in enumerate(zip(tangents, self._metas)):
                if isinstance(t, _Tensor) and t.dim() != len(shape) + 1:
                    raise ValueError(
                        f"{self._method('.batched(...)')}: {self._arg_name}[{i}] "
                        f"has shape {tuple(t.shape)}, but a batch of them needs one more "
                        f"dimension than {self._ref_name}[{i}]'s {tuple(shape)}, the batch "
                        f"dimension (in_dims={in_dims}): e.g. shape "
                        f"({', '.join(['K', *map(str, shape)])}) with in_dims=0.")
        if chunk_size is None and type(in_dims) is int:
            chunk_size = self._auto_chunk(tangents, in_dims)
        if (chunk_size is None or (type(chunk_size) is int and chunk_size > 0)) and \
                type(in_dims) is int and type(out_dims) is int:
            run_b = self._batched_program()
            if run_b and self._flat_args and len(tangents) == len(self._metas) and \
                    not _functorch_active() and _fwAD._current_level < 0:
                out = self._run_stacked(run_b, tangents, in_dims, out_dims, chunk_size)
                if out is not NotImplemented:
                    return out
        if type(chunk_size) is int and chunk_size > 0 and type(in_dims) is int and \
                chunk_size >= _batch_size(tangents, in_dims):
            # one chunk is no chunking: torch.vmap's chunked path would still split and
            # concatenate (a copy of every result)
            chunk_size = None
        if len(self._out_positions) != self._n_out:
            return self._vmap_present(tangents, in_dims, out_dims, chunk_size)
        if type(out_dims) is int and out_dims != 0:
            # torch.vmap mishandles an output that does not depend on the tangents (a zero
            # tangent, unbatched) with out_dims != 0: it fails to expand it, or returns a
            # tensor of a garbage shape; batch first, then move the batch dimension
            out = torch.vmap(self, in_dims=in_dims, chunk_size=chunk_size)(*tangents)
            return tree_map(lambda o: o.movedim(0, out_dims) if isinstance(o, _Tensor) else o,
                            out)
        return torch.vmap(self, in_dims=in_dims, out_dims=out_dims,
                          chunk_size=chunk_size)(*tangents)

    def _vmap_present(self, tangents: tuple, in_dims: Any, out_dims: Any,
                      chunk_size: int | None) -> Any:
        """``batched`` through ``torch.vmap`` for a map whose result has None leaves (a
        transpose's cotangent of an integer primal), which torch.vmap refuses as outputs:
        the tensor leaves are batched, the None leaves put back."""
        pos = self._out_positions
        if type(out_dims) is int:
            dims: list = [out_dims] * len(pos)
        else:
            every = _broadcast_to_and_flatten(out_dims, self._out_spec)
            if every is None:
                raise ValueError(
                    f"{self._method('.batched()')}: out_dims {out_dims!r} does not match the "
                    f"structure of the map's result ({self._out_spec}).")
            dims = [every[k] for k in pos]

        outs = torch.vmap(lambda *ts: self._present(self(*ts)), in_dims=in_dims, out_dims=tuple(
            None if d is None else 0 for d in dims), chunk_size=chunk_size)(*tangents)
        return self._structured([o.movedim(0, d) if d else o for o, d in zip(outs, dims)])

    def _present(self, result: Any) -> tuple:
        """The leaves of a result structured like ``f``'s output that the program computes
        (``_out_positions``: not the None ones), the inverse of :meth:`_structured`."""
        leaves = tree_flatten(result, is_leaf=_is_none)[0]
        return tuple(leaves[k] for k in self._out_positions)

    def _auto_chunk(self, tangents: tuple, in_dims: int) -> int | None:
        """``batched``'s chunk size when the caller gives none: chunks of a few tangents
        for CPU programs whose batches run faster that way (``_batch.chunks_pay_off``,
        ``auto_chunk_size``); None (one batch) otherwise."""
        rule = self._chunk_rule
        if rule is None:
            from ._batch import chunks_pay_off

            rule = self._chunk_rule = chunks_pay_off(self._program)
        if not rule:
            return None
        size, nbytes = None, 0
        for t in tangents:
            if type(t) is not _Tensor or not -t.dim() <= in_dims < t.dim():
                return None
            k = t.shape[in_dims]
            if size is None:
                size = k
            if k != size or not k:
                return None  # (torch.vmap reports it)
            nbytes += t.numel() // k * t.element_size()
        if size is None:
            return None
        from ._batch import auto_chunk_size

        return auto_chunk_size(size, nbytes)

    def _run_stacked(self, run_b: Callable, tangents: tuple, in_dims: int, out_dims: int,
                     chunk_size: int | None = None) -> Any:
        """``batched``'s direct path; NotImplemented when a tangent is not a plain tensor
        of the expected shape (with one batch dim), dtype and device, the batch sizes
        differ, or one requires grad (torch.vmap then checks, or records, the call).
        With ``chunk_size``, ``run_b`` runs on consecutive chunks of the batch (views) and
        the results are concatenated, as ``torch.vmap(chunk_size=...)`` does."""
        stacked, size = [], None
        grad = _grad_enabled()
        for t, (shape, dtype, device) in zip(tangents, self._metas):
            if type(t) is not _Tensor or t.dim() != len(shape) + 1 or \
                    not -t.dim() <= in_dims < t.dim():
                return NotImplemented
            if in_dims % t.dim():
                t = t.movedim(in_dims, 0)
            if t.shape[1:] != shape or t.dtype != dtype or t.device != device or \
                    t.layout is not _STRIDED or (grad and t.requires_grad) or \
                    (size is not None and t.shape[0] != size):
                return NotImplemented
            size = t.shape[0]
            stacked.append(t)
        if not size:
            return NotImplemented  # (an empty batch: as torch.vmap handles it)
        if self._stale_watch:
            self._check_stale()
        if chunk_size is None or chunk_size >= size:
            outs = run_b(size, *stacked)
        else:
            parts = [run_b(min(chunk_size, size - s), *[t[s:s + chunk_size] for t in stacked])
                     for s in range(0, size, chunk_size)]
            outs = [torch.cat(col) for col in zip(*parts)]
        if out_dims:
            outs = [o.movedim(0, out_dims) for o in outs]
        return self._structured(outs)

    def _released_error(self, method: str = "") -> ReleasedError:
        """The error every use of a released map raises (``method``: which use)."""
        return ReleasedError(
            f"{self._method(method) if method else self._api}: this linear map was released; "
            "call linearize again.")

    def _method(self, method: str) -> str:
        """How errors name one of the map's methods: ``jvp_fn.batched()``, not
        ``jvp_fn(*tangents).batched()`` (``_api`` names a call of the map itself)."""
        return self._api[:self._api.index("(")] + method

    def _tangents(self, args: tuple) -> Any:
        """The differentiable tangent leaves of ``args``, validated against the primals.

        Fast path: top-level positional tensors that do not require grad, checked leaf
        by leaf without pytree (``args`` itself is returned); anything else (or a
        mismatch, to name it) goes through ``_flatten``, which raises a ``ValueError``
        naming the leaf."""
        if self._flat_args and len(args) == len(self._metas):
            for t, (shape, dtype, device) in zip(args, self._metas):
                if type(t) is not torch.Tensor or t.shape != shape or t.dtype != dtype or \
                        t.device != device or t.requires_grad or t.layout is not _STRIDED:
                    break
            else:
                return args
        leaves = self._flatten(args)
        return [leaves[i] for i in self._diff_positions]

    def _flatten(self, args: tuple) -> list:
        return flatten_tangents(self._api, args, self._in_spec, self._in_leaves,
                                arg=self._arg_name, ref=self._ref_name)

    def _check_stale(self) -> None:
        for t, version, what in self._stale_watch:
            if t._version != version:
                raise StaleResidualError(
                    f"{self._api}: {what} was modified in place after linearize (its version "
                    f"changed from {version} to {t._version}); the linearization no longer matches "
                    "it. Call linearize again at the new point."
                )

    # ------------------------------------------------------------------ transformations
    def transpose(self) -> LinearMap:
        """The transpose (adjoint for real dtypes) of this map, as another ``LinearMap``.

        For ``jvp_fn`` from ``linearize(f, *primals)``, ``vjp_fn = jvp_fn.transpose()``
        takes one argument structured like ``f``'s output and returns a tuple of
        cotangents, one per primal, equal to ``torch.func.vjp(f, *primals)[1]``,
        without evaluating ``f`` again. Built-in operations are transposed by
        recording PyTorch's own backward formulas for the recorded linear program;
        custom Functions through their ``backward`` (or ``vjp``) on the same ctx.
        The result is cached; ``vjp_fn.transpose()`` is ``jvp_fn``. (This map holds its
        transpose; the transpose refers back weakly, so the two make no reference cycle.)

        Cost: one application of this map plus one backward pass, once.
        """
        if self._run is None:
            raise self._released_error(".transpose()")
        with self._lock:
            t = self._transposed
            if type(t) is weakref.ReferenceType:  # this map is a transpose
                t = t()
                if t is None:
                    t = self._rebuild_origin()
                return t
            if t is None:
                from ._transpose import transpose_map

                # (built outside any functorch transform: reverse mode through a map
                # under torch.func.grad/vjp builds it in the backward pass)
                with temporarily_clear_interpreter_stack():
                    t = transpose_map(self)
                # A map holds its transpose; the transpose refers back weakly and holds a
                # snapshot of the map's state to rebuild it from. (Both holding each
                # other would be a reference cycle: the residuals of both would outlive
                # them until the cyclic garbage collector ran, in a Newton loop often a
                # full collection later.)
                t._transposed = weakref.ref(self)
                t._origin_state = self._state()
                self._transposed = t
            return t

    def _state(self) -> dict:
        """This map's attributes, less its links to a transpose and its lock."""
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_transposed", "_origin_state", "_lock")}

    def _rebuild_origin(self) -> LinearMap:
        """The map this transpose transposes, which the caller dropped: the same state in a
        new object, holding this transpose again."""
        state = self._origin_state
        if state is None:
            raise ReleasedError(f"{self._method('.transpose()')}: the map this one transposes was "
                                "released; call linearize again.")
        origin = object.__new__(LinearMap)
        origin.__dict__.update(state)
        origin._lock = threading.Lock()
        origin._origin_state = None
        origin._transposed = self
        self._transposed = weakref.ref(origin)
        origin._share.append(weakref.ref(origin))  # (another handle on the shared state)
        return origin

    def compile(self, **compile_kwargs: Any) -> LinearMap:
        """A copy of this map whose aten operations run through ``torch.compile``.

        The program is split at custom-Function nodes (which stay opaque and run
        eagerly); each run of aten operations becomes one compiled, fused segment.
        Residuals are passed to the compiled code as arguments, so linearizing the
        same function again at a new point with the same shapes reuses the compiled
        code without recompiling. Compilation happens on the first call.
        ``compile_kwargs`` go to ``torch.compile`` (default ``fullgraph=True,
        dynamic=False``; e.g. ``mode="max-autotune"``). The copy shares this map's
        residuals and custom-Function contexts: :meth:`release` of either releases both.
        """
        if self._run is None:
            raise self._released_error(".compile()")
        from ._compile import compile_map

        other = compile_map(self, **compile_kwargs)
        if other._share is not self._share:  # (a new map; a copy.copy is registered)
            with self._lock:
                other._share = self._share
                self._share.append(weakref.ref(other))
        return other

    def cuda_graph(self, clone_outputs: bool = True):
        """Capture one application in a CUDA graph; calls replay it (CUDA tensors only).

        For small problems dominated by kernel-launch and Python overhead. The first
        call captures (after a few warm-up runs); later calls copy the tangents into
        static buffers and replay. Outputs are cloned unless ``clone_outputs=False``
        (then they are static buffers overwritten by the next call). Custom
        Functions' ``jvp`` must be capturable (no ``.item()`` or host copies).
        """
        if self._run is None:
            raise self._released_error(".cuda_graph()")
        from ._compile import cuda_graph_map

        return cuda_graph_map(self, clone_outputs)

    @property
    def T(self) -> LinearMap:
        """Shorthand for :meth:`transpose`."""
        return self.transpose()

    def jacobian(self, argnums: int | tuple[int, ...] | None = None,
                 chunk_size: int | None = None) -> Any:
        """The full Jacobian, in ``torch.func.jacfwd``'s layout.

        Built from batched applications (:meth:`batched`) of this map to basis
        tangents; ``f`` is not evaluated again. ``argnums`` selects positional arguments like ``jacfwd``
        (default: all of them, or just the one if there is one). ``chunk_size``
        bounds how many basis tangents go through the map at once (memory).

        Returns, for each output leaf, the Jacobian with respect to the selected
        argument(s): shape ``out.shape + in.shape`` per (output leaf, input leaf),
        nested like ``jacfwd(f, argnums=argnums)(*primals)``; None for an input leaf
        without a tangent (an integer or bool primal, which ``jacfwd`` refuses), and
        for an output leaf without one (a transpose's cotangent of such a primal).
        """
        if self._run is None:
            raise self._released_error(".jacobian()")
        from ._jacobian import jacobian

        return jacobian(self, argnums, chunk_size)

    # ------------------------------------------------------------------ memory
    def release(self) -> None:
        """Free the residuals and custom-Function contexts; later calls raise ``ReleasedError``.

        A map and its :meth:`compile` copies share them: releasing one releases all. A
        transpose built before is a map of its own (its program and residuals, and the
        custom-Function contexts its nodes read): it keeps working, and keeps those,
        until it is released too."""
        for ref in list(self._share):  # (every handle is there, this one included)
            h = ref()
            if h is not None:
                h._release_handle()

    def _release_handle(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._fast1 = None
        self._run = None
        self._batched_run = None
        self._eager_run = None
        self._driver = None
        for node in self._opaque_nodes:
            node.release()
        self._opaque_nodes = []
        other = self._transposed
        if type(other) is weakref.ReferenceType:  # a transpose: its map builds a new one
            other = other()
            if other is not None and other._transposed is self:
                other._transposed = None
        elif other is not None:  # a map: its transpose can no longer rebuild it
            other._origin_state = None
        self._program.residuals = []
        self._program.eqns = []
        self._stale_watch = []
        self._transposed = None
        self._origin_state = None
        self.residual_bytes = 0
        self.external_bytes = 0

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self._released

    # ------------------------------------------------------------------ introspection
    @property
    def source(self) -> str:
        """The generated Python source of the linear program."""
        return getattr(self._run, "__torch_linearize_source__", "")

    @property
    def is_compiled(self) -> bool:
        """Whether this map runs compiled segments (see :meth:`compile`)."""
        return self._driver is not self._program

    @property
    def num_ops(self) -> int:
        """Number of operations in the linear program."""
        return len(self._program.eqns)

    def __copy__(self) -> LinearMap:
        """Another handle on the same map (the same residuals and program; releasing one
        releases both)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._lock = threading.Lock()
        with self._lock:
            self._share.append(weakref.ref(new))
        return new

    def __reduce_ex__(self, protocol):
        # (also what copy.deepcopy would use: refuse with a message, not a lock's error)
        raise TypeError(
            f"{self._api}: a LinearMap cannot be pickled or deep-copied: it holds generated "
            "code, residual tensors by reference and custom-Function contexts. Call linearize "
            "again where the map is needed (copy.copy gives another handle on the same map)."
        )

    def __repr__(self) -> str:
        if self._released:
            return "LinearMap(<released>)"
        p = self._program
        ins = ", ".join(f"{v}: {type_str(v.shape, v.dtype)}" for v in p.inputs)
        lines = [f"LinearMap(({ins})){' [compiled]' if self.is_compiled else ''} {{"]
        for e in p.eqns:
            lines.append("  " + format_eqn(e))
        outs = []
        for o in p.outputs:
            outs.append(repr(o) if isinstance(o, Var) else f"zeros({type_str(o.shape, o.dtype)})")
        lines.append(f"  return ({', '.join(outs)})")
        lines.append("}")
        if p.residuals:
            lines.append("residuals:")
            for i, r in enumerate(p.residuals):
                origin = p.residual_names[i] if i < len(p.residual_names) else ""
                nbytes = r.numel() * r.element_size() if not r._is_zerotensor() else 0
                lines.append(f"  r{i}: {type_str(r.shape, r.dtype)}  {nbytes} B  {origin}".rstrip())
        lines.append(
            f"residual_bytes={self.residual_bytes} (allocated by linearize), "
            f"external_bytes={self.external_bytes} (pre-existing tensors kept alive)"
        )
        return "\n".join(lines)
