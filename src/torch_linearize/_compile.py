"""Fused execution of linear programs: ``torch.compile`` segments and CUDA graphs.

``LinearMap.compile()`` splits the program at custom-Function nodes (they stay
opaque and run eagerly) and hands each maximal run of aten operations to
``torch.compile`` (Inductor by default), so elementwise tangent work runs fused.
Residuals are *arguments* of the compiled segments, never constants baked into
them, and a segment's source is canonical (program-local names): re-linearizing
the same function at a new point with the same shapes reuses the compiled code
without recompiling (dynamo caches compiled graphs per code object and guards on
input metadata, not values).

``LinearMap.cuda_graph()`` captures one application in a CUDA graph and replays
it, for small problems dominated by kernel-launch overhead.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import torch

from ._errors import LinearizeError
from ._program import Eqn, Program, Res, Var, compile_program, segment_source

__all__ = ["compile_map", "cuda_graph_map"]

aten = torch.ops.aten

_lock = threading.Lock()
# (segment source, compile options, the source's globals) -> compiled callable
_compiled: dict[tuple, Callable] = {}


def _is_opaque(e: Eqn) -> bool:
    return not isinstance(e.fn, torch._ops.OpOverload)


def _lift_scalars(prog: Program, extra: list[torch.Tensor]) -> list[Eqn]:
    """Pass floating-point coefficients to compiled segments as 0-d tensor arguments.

    Folding turns point-dependent scalar coefficients into Python numbers
    (``mul.Scalar(t, c)``, ``add.Tensor(a, t, alpha=c)``). As literals they would be
    part of a segment's source, so every new linearization point would compile a new
    graph; as (0-d) residual arguments the compiled code is shared. A 0-d tensor of
    the base's dtype gives the same result dtype as the Python number.
    """
    base = len(prog.residuals)

    def lift(value: float, like: Var) -> Res:
        extra.append(torch.tensor(value, dtype=like.dtype, device=like.device))
        return Res(base + len(extra) - 1)

    out: list[Eqn] = []
    for e in prog.eqns:
        if e.fn is aten.mul.Scalar and isinstance(e.args[1], float) and \
                isinstance(e.args[0], Var) and (e.args[0].dtype.is_floating_point
                                                or e.args[0].dtype.is_complex):
            e = Eqn(aten.mul.Tensor, (e.args[0], lift(e.args[1], e.args[0])), {}, e.outs,
                    e.mutates, e.name, e.poison)
        elif e.fn is aten.add.Tensor and isinstance(e.kwargs.get("alpha"), float) and \
                len(e.kwargs) == 1 and isinstance(e.args[1], Var) and \
                (e.args[1].dtype.is_floating_point or e.args[1].dtype.is_complex):
            e = Eqn(aten.addcmul.default, (e.args[0], e.args[1], lift(e.kwargs["alpha"], e.args[1])),
                    {}, e.outs, e.mutates, e.name, e.poison)
        out.append(e)
    return out


def _segments(eqns: list[Eqn]) -> list[tuple[bool, list[Eqn]]]:
    segs: list[tuple[bool, list[Eqn]]] = []
    for e in eqns:
        opaque = _is_opaque(e)
        if segs and segs[-1][0] == opaque and not opaque:
            segs[-1][1].append(e)
        else:
            segs.append((opaque, [e]))
    return segs


class _SegmentCall:
    """Calls a compiled segment; shows up as one operation in the driver program."""

    def __init__(self, fn: Callable, n_ops: int):
        self.fn = fn
        self.display_name = f"compiled_segment[{n_ops} ops]"

    def __call__(self, *args):
        # Inductor reads a tensor's data without its lazy negation or conjugation (a
        # torch._neg_view of a real tangent came back as -J t until stop 22; plain
        # torch.compile does the same), so such arguments are resolved first.
        if any(type(a) is torch.Tensor and (a.is_neg() or a.is_conj()) for a in args):
            args = tuple(a.resolve_conj().resolve_neg() if type(a) is torch.Tensor else a
                         for a in args)
        return self.fn(*args)


def compile_map(lm, **compile_kwargs: Any):
    """A ``LinearMap`` running ``lm``'s program with fused (compiled) segments."""
    from ._linear_map import LinearMap

    prog = lm._program
    options = tuple(sorted((k, repr(v)) for k, v in compile_kwargs.items()))
    kwargs = {"fullgraph": True, "dynamic": False, **compile_kwargs}

    # Which values each segment must hand on: used later, or returned.
    later_uses: list[set[int]] = []
    lifted: list[torch.Tensor] = []
    segs = _segments(_lift_scalars(prog, lifted))
    if all(opaque for opaque, _ in segs):
        # Nothing to compile (only custom-Function nodes): the map itself, lean entry
        # included, as another handle.
        return copy.copy(lm)
    needed_after: set[int] = {o.id for o in prog.outputs if isinstance(o, Var)}
    for _opaque, eqns in reversed(segs):
        later_uses.append(set(needed_after))
        for e in eqns:
            needed_after |= {v.id for v in e.in_vars()}
    later_uses.reverse()

    driver_eqns: list[Eqn] = []
    for (opaque, eqns), after in zip(segs, later_uses):
        if opaque:
            driver_eqns.extend(eqns)
            continue
        defined = {v.id for e in eqns for v in e.out_vars()}
        inputs: list[Var] = []
        seen: set[int] = set()
        for e in eqns:
            for v in e.in_vars():
                if v.id not in defined and v.id not in seen:
                    inputs.append(v)
                    seen.add(v.id)
        outputs = [v for e in eqns for v in e.out_vars() if v.id in after]
        res = sorted({r.index for e in eqns for r in e.in_res()})
        src, fn = segment_source(eqns, inputs, outputs, res)
        # (the source names operators, dtypes, devices and complex numbers as globals,
        # f0, c1, ...: two segments with one text may call different ones)
        key = (src, options, fn.__torch_linearize_globals__)
        with _lock:
            compiled = _compiled.get(key)
            if compiled is None:
                compiled = torch.compile(fn, **kwargs)
                _compiled[key] = compiled
        call = _SegmentCall(compiled, len(eqns))
        args = (*inputs, *[Res(i) for i in res])
        driver_eqns.append(Eqn(call, args, {}, tuple(outputs), name=call.display_name))

    driver = Program(
        inputs=prog.inputs, eqns=driver_eqns, outputs=prog.outputs,
        residuals=[*prog.residuals, *lifted],
        input_layouts=prog.input_layouts, mutated_inputs=prog.mutated_inputs,
        residual_names=prog.residual_names,
    )
    run = compile_program(driver)
    return LinearMap(
        driver, run, api=lm._api, arg_name=lm._arg_name, ref_name=lm._ref_name,
        in_spec=lm._in_spec, in_leaves=lm._in_leaves, out_spec=lm._out_spec,
        out_leaves=lm._out_leaves, stale_watch=lm._stale_watch,
        residual_bytes=lm.residual_bytes, external_bytes=lm.external_bytes,
        opaque_nodes=lm._opaque_nodes, created=lm._created, source_program=prog,
        eager_run=lm._run,
    )


class CudaGraphMap:
    """One application of a linear map captured in a CUDA graph and replayed.

    Inputs are copied into static buffers (one fused ``_foreach_copy_`` launch) and
    the captured kernels are replayed; the outputs are the graph's static output
    buffers, cloned unless ``clone_outputs=False`` (then, as with
    ``torch.cuda.make_graphed_callables``, they are overwritten by the next call).
    The map must be CUDA-graph safe: no host synchronisation (``.item()``) and no
    allocation-dependent control flow in custom-Function ``jvp``s. Residuals are the
    linear map's own tensors, so an in-place change of a primal after ``linearize``
    is detected at every call, as for the map itself.
    """

    def __init__(self, lm, clone_outputs: bool = True, warmup: int = 3):
        self._lm = lm
        self._clone = clone_outputs
        self._warmup = warmup
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: list[torch.Tensor] = []  # one per differentiable input leaf
        self._static_out: Any = None
        self._out_list: list[torch.Tensor] = []

    def _capture(self, flat: Any) -> None:
        if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in flat):
            raise LinearizeError(
                "cuda_graph(): every tangent must be a CUDA tensor (CUDA graphs need a GPU)."
            )
        self._static_in = [t.detach().clone() for t in flat]
        lm = self._lm
        leaves: list[Any] = [None] * len(lm._in_leaves)
        for pos, t in zip(lm._diff_positions, self._static_in):
            leaves[pos] = t
        static_args = torch.utils._pytree.tree_unflatten(leaves, lm._in_spec)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self._warmup):
                lm(*static_args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_out = lm(*static_args)
        self._out_list, self._out_spec = torch.utils._pytree.tree_flatten(self._static_out)
        self._graph = graph

    def __call__(self, *args: Any) -> Any:
        lm = self._lm
        if lm._run is None:
            raise lm._released_error()
        flat = lm._tangents(args)  # validated as the map validates them
        if self._graph is None:
            self._capture(flat)
        if lm._stale_watch:
            lm._check_stale()
        static_in = self._static_in
        if len(static_in) == 1:
            static_in[0].copy_(flat[0])
        else:
            torch._foreach_copy_(static_in, list(flat))
        self._graph.replay()
        if not self._clone:
            return self._static_out
        outs = self._out_list
        if len(outs) == 1 and isinstance(outs[0], torch.Tensor):
            fresh = [outs[0].clone()]
        else:
            fresh = [o.clone() if isinstance(o, torch.Tensor) else o for o in outs]
        return torch.utils._pytree.tree_unflatten(fresh, self._out_spec)


def cuda_graph_map(lm, clone_outputs: bool = True) -> CudaGraphMap:
    if not torch.cuda.is_available():
        raise LinearizeError("cuda_graph(): CUDA is not available on this machine.")
    return CudaGraphMap(lm, clone_outputs)
