"""Batched application without a transform: programs that broadcast a leading batch dim.

``torch.vmap(jvp_fn)(T)`` applies a map to a batch of tangents in one pass: functorch
batches every operation of the program. Around that pass it costs a Python layer of
its own (pytree handling of inputs and outputs, level bookkeeping: ~17 us per call
warm, ~0.1 ms when the call finds the caches cold) and a dispatch through the batching
layer per operation, which the hand-written batched formula (``T * r``) does not pay.

Many linear programs need no batching rule at all. An elementwise operation broadcasts
a new leading dimension by itself when each of its tangent operands has the result's
rank (residuals, of that rank or lower, broadcast under it); a custom Function's node
whose tensor arguments are all tangents batches its own call (``batched_jvp`` or
``batched_vjp``, its vmap rule, or a loop: ``_opaque._OpaqueNode.run``).
:func:`batched_program` generates, for a program made only of such operations,
``runB(K, *stacked)``: the same operations on plain tensors with a leading batch
dimension of size ``K``. ``LinearMap.batched`` runs it, and goes through ``torch.vmap``
for any other program or call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._program import (
    Eqn,
    Program,
    Res,
    Var,
    _assign,
    _callable_for,
    _Namer,
    exec_source,
    is_node,
    program_nodes,
)

__all__ = ["auto_chunk_size", "batched_program", "broadcasts_batch", "chunks_pay_off"]

aten = torch.ops.aten

# Elementwise operators whose result broadcasts a leading batch dimension of a tangent
# operand (TensorIterator ops: right-aligned broadcasting), with the keyword arguments
# they may take here (numbers or dtypes; no dimension arguments).
_BROADCASTING: dict = {
    aten.mul.Tensor: (),
    aten.mul.Scalar: (),
    aten.div.Tensor: ("rounding_mode",),
    aten.div.Scalar: (),
    aten.neg.default: (),
    aten.add.Tensor: ("alpha",),
    aten.sub.Tensor: ("alpha",),
    aten.addcmul.default: ("value",),
    aten.addcdiv.default: ("value",),
    aten.clone.default: (),
    aten.alias.default: (),
    aten._conj.default: (),
    aten.conj_physical.default: (),
    aten._to_copy.default: ("dtype",),
    aten.where.self: (),
    aten.tanh_backward.default: (),
    aten.sigmoid_backward.default: (),
    aten.threshold_backward.default: (),
}
_BROADCASTING_BY_ID = {id(f): (f, frozenset(kw)) for f, kw in _BROADCASTING.items()}


def _eqn_broadcasts(e: Eqn) -> bool:
    """Whether ``e`` computes its batched result from batched operands as it is."""
    if e.mutates or e.poison is not None:
        return False
    if is_node(e.fn):
        # The node batches its own call (run(1, ...)): every tensor argument batched.
        return not e.fn.dirty and not e.kwargs and isinstance(e.outs, (tuple, list)) and all(
            o is None or isinstance(o, Var) for o in e.outs) and not any(
            isinstance(a, (Res, list, tuple, dict, torch.Tensor)) for a in e.args)
    hit = _BROADCASTING_BY_ID.get(id(e.fn))
    if hit is None or hit[0] is not e.fn or not isinstance(e.outs, Var):
        return False
    if not e.kwargs.keys() <= hit[1]:
        return False
    # Each tangent operand of the result's rank: its batch dim lines up with the result's
    # new leading dim. (A residual then has the result's rank or lower: it broadcasts.)
    rank = len(e.outs.shape)
    for a in (*e.args, *e.kwargs.values()):
        if isinstance(a, Var):
            if len(a.shape) != rank:
                return False
        elif isinstance(a, (list, tuple, dict, torch.Tensor)):
            return False
    return True


def elementwise(e: Eqn) -> bool:
    """``e`` is an elementwise aten operation (of ``_BROADCASTING``, operands of its rank):
    its values do not depend on its operands' layouts (a custom-Function node, which
    :func:`_eqn_broadcasts` also accepts, may)."""
    return not is_node(e.fn) and _eqn_broadcasts(e)


def broadcasts_batch(prog: Program) -> bool:
    """Whether every operation of ``prog`` broadcasts a leading batch dimension (see the
    module docstring), so that :func:`batched_program` applies."""
    return not prog.mutated_inputs and all(_eqn_broadcasts(e) for e in prog.eqns)


def _inline_batched_node(nm: _Namer, e: Eqn, args: list[str]) -> list[str] | None:
    """runB's lines for a node whose Function has its own batched call (``batched_jvp``,
    ``batched_vjp``), one result and every tensor argument given: that function called
    directly on the node's ctx, as ``_OpaqueNode.run(1, ...)`` calls it, without the
    node's reshapes and checks; a result that is not one tensor of the expected dtype and
    batched shape goes through the node's own checks (``finish_lean``). None where
    the node's general batched call is needed."""
    node = e.fn
    batched_fn = getattr(node.cls, node.batched_name, None) if node.batched_name else None
    if batched_fn is None or len(e.outs) != 1 or not isinstance(e.outs[0], Var) or \
            len(node.out_meta) != 1 or node.out_meta[0] is None or \
            any(m is not None and not isinstance(a, Var) for m, a in zip(node.in_meta, e.args)):
        return None
    shape, dtype = tuple(node.out_meta[0][0]), node.out_meta[0][1]
    out, n = nm.var(e.outs[0]), nm.glob(node)
    arg_list = ", ".join(args)
    return [
        f"{out} = {nm.glob(batched_fn, 'f')}({n}.ctx, {arg_list})",
        f"if {n}.watch: {n}.refresh()",
        f"if not (type({out}) is _Tensor and {out}.dtype is {nm.glob(dtype)} and "
        f"{out}.shape == (K, {''.join(f'{d}, ' for d in shape)})): "
        f"{out}, = {n}.finish_lean({out}, [{arg_list}], (K,))",
    ]


def batched_program(prog: Program) -> Callable[..., tuple] | None:
    """``runB(K, *stacked_inputs) -> tuple(stacked_outputs)`` for ``prog``, or None when
    an operation of it does not broadcast a batch dimension (:func:`broadcasts_batch`).

    Inputs are plain tensors of shape ``(K, *input_shape)``; outputs have shape
    ``(K, *output_shape)``. No layout is imposed (elementwise operations accept any).
    """
    if not broadcasts_batch(prog):
        return None
    nm = _Namer()
    params = [f"r{i}" for i in range(len(prog.residuals))]
    for k, node in enumerate(program_nodes(prog)):
        nm.bind(node, f"n{k}")
        params.append(f"n{k}")
    lines = [f"def _makeB({', '.join(params)}):",
             f"    def runB(K, {', '.join(nm.var(v) for v in prog.inputs)}):"]
    for e in prog.eqns:
        if is_node(e.fn):
            args = [nm.lit(a) for a in e.args]
            inline = _inline_batched_node(nm, e, args)
            if inline is not None:
                lines.extend("        " + line for line in inline)
                continue
            call = f"{nm.glob(e.fn)}.run(1, [{', '.join(args)}])"
        else:
            f = nm.glob(_callable_for(e.fn, e.args, e.kwargs), "f")
            args = [nm.lit(a) for a in e.args] + [f"{k}={nm.lit(v)}" for k, v in e.kwargs.items()]
            call = f"{f}({', '.join(args)})"
        lines.extend("        " + line for line in _assign(nm, e.outs, call))
    rets = []
    for o in prog.outputs:
        if isinstance(o, Var):
            rets.append(nm.var(o))
        else:
            rets.append(f"torch.zeros((K, *{nm.lit(tuple(o.shape))}), dtype={nm.glob(o.dtype)}, "
                        f"device={nm.glob(o.device)})")
    lines.append("        return (" + "".join(r + ", " for r in rets) + ")")
    lines.append("    return runB")
    src = "\n".join(lines)
    make = exec_source(src, nm.globals, "<torch_linearize batched program>").pop("_makeB")
    run_b = make(*prog.residuals, *program_nodes(prog))
    run_b.__torch_linearize_source__ = src  # type: ignore[attr-defined]
    return run_b


# ------------------------------------------------------------------ automatic chunks (CPU)
# A batch of K tangents makes every intermediate K times a tangent's size. On a CPU,
# once that outgrows the caches, each operation streams its operands through memory,
# and glibc's default allocator serves such blocks as fresh mappings whose pages are
# faulted in on first touch; chunks of a few tangents keep the intermediates in cache
# and reuse their blocks, at the price of one copy of the outputs (the concatenation).
# Measured with ``benchmarks/batch_chunks.py`` (K=64 float32, 2 threads; results in
# benchmarks/results/batch_chunks_cpu_*.md): the 512x512 PDE stencil (4 arithmetic
# operations over views) runs 1.6x faster in chunks of 2 tangents with a caching allocator
# and 3.2x with glibc's default; single-operation programs (elementwise, custom Function)
# run 1.5-2.3x slower in chunks (the copy is all the extra work). Matrix products are left
# whole: on the MLP chunks made no difference with a caching allocator (1.25x faster with
# glibc's default), and one large product parallelizes over many cores at least as well.
AUTO_MIN_BATCH_BYTES = 8 << 20  # below this a whole batch stays cache- and heap-friendly
AUTO_CHUNK_BYTES = 2 << 20  # the tangent bytes one chunk aims at
_MIN_ARITHMETIC_OPS = 3  # intermediates must outweigh the concatenation's copy
# (the products a program can hold: matmul, linear, einsum and tensordot decompose into
# these before the tracer sees them)
_MATMUL_NAMES = frozenset({"mm", "bmm", "addmm", "addbmm", "baddbmm", "mv", "addmv", "dot",
                           "vdot", "_addmm_activation"})


def chunks_pay_off(prog: Program) -> bool:
    """Whether batches of ``prog`` on a CPU run faster in chunks (see above): its tangents
    live on the CPU and it has at least three operations that write new tangent data
    (views do not) and no matrix product or convolution (one large product is as fast as
    several smaller ones, or faster)."""
    if not prog.inputs or any(getattr(v.device, "type", None) != "cpu" for v in prog.inputs):
        return False
    arithmetic = 0
    for e in prog.eqns:
        fn = e.fn
        if is_node(fn):
            arithmetic += 1
            continue
        name = getattr(fn, "_opname", "")
        if name in _MATMUL_NAMES or "conv" in name:
            return False
        if not getattr(fn, "is_view", False):
            arithmetic += 1
    return arithmetic >= _MIN_ARITHMETIC_OPS


def auto_chunk_size(size: int, tangent_bytes: int) -> int | None:
    """The chunk size for a batch of ``size`` tangents of ``tangent_bytes`` bytes each (all
    inputs together), for a program where :func:`chunks_pay_off`; None: one batch."""
    if size * tangent_bytes <= AUTO_MIN_BATCH_BYTES:
        return None
    chunk = max(1, AUTO_CHUNK_BYTES // max(tangent_bytes, 1))
    return chunk if chunk < size else None
