"""Transposition: record the backward pass of a linear program as a new linear program.

A linear program ``y = A t`` has a constant Jacobian ``A``, so the vector-Jacobian
product of the program *at any point* is ``A^T u``. We therefore:

1. run the program once on placeholder inputs that require grad (custom
   Function nodes only produce correctly shaped zeros here: their values do not
   matter), which builds PyTorch's autograd graph of the program;
2. run ``torch.autograd.grad`` on it with placeholder cotangents, under a
   :class:`~torch_linearize._trace.Tracer`. PyTorch's own backward formulas
   (the transposes of every aten operation) reach the tracer like any other
   operation: those that touch the cotangent are recorded, the rest (for
   example ``W.t()``) are computed once and become residuals. Custom Function
   nodes record an :class:`~torch_linearize._opaque.OpaqueVjp` that calls the
   Function's ``backward`` on the same ctx at application time;
3. simplify and compile the recording exactly like a forward program.

The result is an ordinary :class:`LinearMap`, so it can be applied, batched with
``vmap``, printed, and transposed back (to the original map).
"""

from __future__ import annotations

import functools

import torch
from torch.utils._pytree import tree_structure

from ._errors import LinearizeError
from ._linear_map import LinearMap
from ._opaque import shape_only
from ._passes import simplify
from ._program import (
    Program,
    Res,
    Var,
    ZeroOut,
    check_linear_at_zero,
    compile_program,
    dead_code_elimination,
    exact_groups,
    interpret,
)
from ._residuals import ctx_tensors, distinct_storage_bytes
from ._trace import Tracer, _op_info

__all__ = ["differentiable_impl", "transpose_map"]

aten = torch.ops.aten


def _zero_but_nan(g: torch.Tensor) -> bool:
    """Whether ``g`` holds only zeros and NaNs (the products of zero cotangents with
    infinite residuals)."""
    if not (g.is_floating_point() or g.is_complex()):
        return False
    return not bool(torch.where(torch.isnan(g), 0, g).any())


def _glu_jvp(glu, x, dx, dim):
    # Same maths as PyTorch's glu_jvp kernel, written with differentiable operations.
    n = x.size(dim) // 2
    sig_b = torch.sigmoid(x.narrow(dim, n, n))
    return dx.narrow(dim, 0, n) * sig_b + glu * (1 - sig_b) * dx.narrow(dim, n, n)


def _view_dtype(x, dtype):
    # x.view(dtype) between a complex dtype and its real one (the tracer reads a buffer
    # written through z.real as complex): autograd calls that view non-differentiable,
    # view_as_real / view_as_complex are the same views, differentiable
    if x.is_complex() and dtype == x.dtype.to_real():
        return torch.view_as_real(x).flatten(-2)
    if dtype.is_complex and not x.is_complex() and dtype.to_real() == x.dtype:
        return torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return x.view(dtype)


# Forward-AD helper operations without a backward formula, and their differentiable forms.
_LOCAL_DECOMPOSITIONS = {aten.glu_jvp.default: _glu_jvp, aten.view.dtype: _view_dtype}

# Pointwise helpers that forward-AD formulas apply to the incoming tangent (their first
# argument; every other tensor argument is a residual): each is ``g * c(x)`` elementwise,
# a diagonal Jacobian, so for real dtypes the operator is its own transpose. (Transposing
# PyTorch's decompositions instead differentiates through their ``where``: the branch
# masked off computes exp(x) for softplus or elu at large x, and 0 * inf = NaN leaks
# into the cotangent.)
_SELF_ADJOINT = frozenset({
    aten.tanh_backward.default, aten.sigmoid_backward.default,
    aten.leaky_relu_backward.default, aten.gelu_backward.default, aten.silu_backward.default,
    aten.softplus_backward.default, aten.mish_backward.default, aten.elu_backward.default,
    aten.hardswish_backward.default, aten.hardsigmoid_backward.default,
    aten.hardtanh_backward.default, aten.threshold_backward.default,
    aten.softshrink_backward.default, aten.hardshrink_backward.default,
    aten.log_sigmoid_backward.default, aten.logit_backward.default,
    aten.rrelu_with_noise_backward.default,
})


class _SelfAdjoint(torch.autograd.Function):
    """``fn(g, *rest)`` whose vector-Jacobian product in ``g`` is ``fn(u, *rest)`` (summed
    over the dimensions ``g`` was broadcast along)."""

    @staticmethod
    def forward(fn, g, *rest):
        return fn(g, *rest)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.fn, ctx.rest, ctx.g_shape = inputs[0], inputs[2:], inputs[1].shape

    @staticmethod
    def backward(ctx, u):
        gi = ctx.fn(u, *ctx.rest)
        if gi.shape != ctx.g_shape:
            gi = gi.sum_to_size(ctx.g_shape)
        return (None, gi, *([None] * len(ctx.rest)))


def _self_adjoint(fn, fallback):
    def impl(g, *rest, **kwargs):
        if not isinstance(g, torch.Tensor) or g.is_complex() or any(
                isinstance(r, torch.Tensor) and (r.requires_grad or r.is_complex()) for r in rest):
            return fallback(g, *rest, **kwargs)
        return _SelfAdjoint.apply(functools.partial(fn, **kwargs) if kwargs else fn, g, *rest)

    return impl


def _nan_to_zero(t: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def _transposable_impl(lm: LinearMap, nodes):
    """Per-equation implementations used to build the autograd graph being transposed.

    Besides :func:`differentiable_impl`, one convention matters: forward-AD
    formulas sometimes multiply or divide by residuals that are not finite (a zero
    divisor on the diagonal for ``linalg.eigh``, NaN for fully masked rows of a
    softmax) and then mask those entries (``zero_``, ``where``, ``masked_fill``).
    The forward program is fine, but its transpose would compute ``0 * inf = NaN``.
    If the forward program returns finite values for a random input, every
    non-finite entry is masked, so we may replace such factors by 0 (``0 * inf := 0``)
    when transposing; the transpose then matches the masked forward map.
    """
    prog = lm._program
    bad: dict[int, torch.Tensor] = {}  # residual index -> sanitized factor
    for i, r in enumerate(prog.residuals):
        if not (r.is_floating_point() or r.is_complex()) or r._is_zerotensor() or r.device.type == "meta":
            continue
        if not bool(torch.isfinite(r).all()) or bool((r == 0).any()):
            bad[i] = r
    masked = False
    if bad:
        gen = torch.Generator(device="cpu").manual_seed(0)
        probe = []
        for k, v in enumerate(prog.inputs):
            x = torch.randn(v.shape, generator=gen, dtype=v.dtype if not v.dtype.is_complex
                            else torch.float64).to(v.dtype).to(v.device)
            probe.append(x if not prog.input_layouts else
                         torch.empty_strided(v.shape, prog.input_layouts[k][0], dtype=v.dtype,
                                             device=v.device).copy_(x))
        with shape_only(nodes), torch.no_grad():
            outs = lm._run(*probe)
        masked = all(bool(torch.isfinite(o).all()) for o in outs if isinstance(o, torch.Tensor))
    cache: dict[tuple[int, str], torch.Tensor] = {}

    def factor(idx: int, recip: bool) -> torch.Tensor:
        key = (idx, "recip" if recip else "mul")
        f = cache.get(key)
        if f is None:
            r = prog.residuals[idx]
            f = _nan_to_zero(torch.reciprocal(r) if recip else r)
            cache[key] = f
        return f

    mul_ops = {aten.mul.Tensor: torch.mul, aten.mul_.Tensor: torch.Tensor.mul_}
    div_ops = {aten.div.Tensor: torch.mul, aten.div_.Tensor: torch.Tensor.mul_}

    def impl(e):
        if masked and len(e.args) == 2 and not e.kwargs:
            a, b = e.args
            if e.fn in mul_ops:
                for x, r in ((a, b), (b, a)):
                    if isinstance(r, Res) and r.index in bad and not torch.isfinite(bad[r.index]).all():
                        f, other_first = factor(r.index, False), x is a
                        op = mul_ops[e.fn]
                        return (lambda u, _v, f=f, op=op: op(u, f)) if other_first else \
                            (lambda _v, u, f=f: torch.mul(f, u))
            if e.fn in div_ops and isinstance(b, Res) and b.index in bad:
                f, op = factor(b.index, True), div_ops[e.fn]
                return lambda u, _v, f=f, op=op: op(u, f)
        return _graph_kept(e.fn, differentiable_impl(e.fn))

    return impl


def _graph_kept(op, fn):
    """``fn``, refusing to cut the autograd graph: an operation PyTorch calls
    non-differentiable would silently drop its part of the transpose."""
    if not isinstance(op, torch._ops.OpOverload) or _op_info(op).value_independent:
        return fn  # (custom-Function nodes: zeros of the right shape here, by design;
        # factories such as new_zeros read no values)

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        if isinstance(out, torch.Tensor) and not out.requires_grad and \
                (out.is_floating_point() or out.is_complex()) and any(
                    isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            # A decomposition may read an argument for its shape only (the derivative in
            # it is zero); the operator itself says whether autograd cuts the graph.
            try:
                cut = fn is op or not op(*args, **kwargs).requires_grad
            except Exception:
                cut = False
            if cut:
                raise LinearizeError(
                    f"transpose: the linear program applies {op}, which PyTorch's autograd "
                    "treats as not differentiable, so its transpose cannot be recorded.")
        return out

    return run


def differentiable_impl(fn):
    """An implementation of ``fn`` that autograd can differentiate (for transposition).

    Forward-AD formulas use helper operations (``*_backward``, ``*_jvp``) some of
    which have no derivative formula of their own; PyTorch's decompositions express
    them with basic, differentiable operations. The decomposed form also lets the
    transposed program precompute more (e.g. ``1 - y*y`` for ``tanh_backward``).
    """
    local = _LOCAL_DECOMPOSITIONS.get(fn)
    if local is not None:
        return local
    if isinstance(fn, torch._ops.OpOverload):
        name = fn._schema.name
        if name.endswith(("_backward", "_backward_data", "_jvp")):
            from torch._decomp import decomposition_table

            decomposed = decomposition_table.get(fn, fn)
            return _self_adjoint(fn, decomposed) if fn in _SELF_ADJOINT else decomposed
    return fn


def _placeholder(shape, dtype, device, stride=None) -> torch.Tensor:
    if stride is None:
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.empty_strided(shape, stride, dtype=dtype, device=device).fill_(1)


def transpose_map(lm: LinearMap) -> LinearMap:
    """Build the transpose of ``lm`` (see the module docstring)."""
    prog = lm._program
    nodes = list(lm._opaque_nodes)

    # 1. The autograd graph of the program.
    ins = []
    for v, layout in zip(prog.inputs, prog.input_layouts or [None] * len(prog.inputs)):
        stride = layout[0] if layout else None
        ins.append(_placeholder(v.shape, v.dtype, v.device, stride).requires_grad_())
    impl = _transposable_impl(lm, nodes)
    with shape_only(nodes) as box, torch.inference_mode(False), torch.enable_grad():
        # inputs the program writes in place run on copies (as compile_program's run
        # does): autograd refuses in-place writes into a leaf
        outs = interpret(prog, [x.clone() if k in prog.mutated_inputs else x
                                for k, x in enumerate(ins)], impl)

    # 2. Record the backward pass. Program inputs of the transpose: one cotangent per
    # differentiable output leaf of the forward map.
    tracer = Tracer(level=None)
    out_leaves = lm._out_leaves
    targets, grad_outputs = [], []
    cot_vars = []
    for k, ls in enumerate(out_leaves):
        if not ls.differentiable:
            continue
        ph = _placeholder(ls.shape, ls.dtype, ls.device)
        cot_vars.append(tracer.add_input(ph))
        o = outs[lm._out_positions.index(k)]
        if isinstance(prog.outputs[lm._out_positions.index(k)], Var) and o.requires_grad:
            targets.append(o)
            grad_outputs.append(ph)
    box.tracer = tracer  # (the nodes' backward records their transposes into it)
    try:
        with tracer.activate():
            if targets:
                grads = torch.autograd.grad(targets, ins, grad_outputs=grad_outputs,
                                            allow_unused=True, materialize_grads=False)
            else:
                grads = (None,) * len(ins)
            with tracer.paused():
                outputs = []
                for v, g in zip(prog.inputs, grads):
                    sym = None if g is None else tracer.lookup(g)
                    if sym is not None:
                        outputs.append(sym)
                    elif g is None or not bool(g.any()) or _zero_but_nan(g):
                        # (NaN where it is not zero: 0 * inf, the zero cotangent of a value
                        # overwritten in place meeting an infinite residual in mul's
                        # backward. The value's derivative is zero; torch.func.vjp's NaN
                        # there is the NaN placement of docs/design.md section 8)
                        outputs.append(ZeroOut(v.shape, v.dtype, v.device))
                    else:
                        raise LinearizeError(
                            "transpose(): a cotangent does not depend on the output cotangents "
                            "but is not zero; the recorded program is not linear."
                        )
    finally:
        box.tracer = None
        changed = tracer.residuals.end_trace()

    tprog = Program(
        inputs=tracer.inputs,
        eqns=tracer.eqns,
        outputs=outputs,
        residuals=tracer.residuals.tensors,
        input_layouts=[(tuple(v.stride), 0) for v in cot_vars],
        mutated_inputs=set(tracer.mutated_inputs),
        residual_names=tracer.residuals.origin,
    )
    dead_code_elimination(tprog)
    if set(tprog.used_residuals()) & set(changed):
        raise LinearizeError("transpose(): a residual was modified during transposition.")
    suspect = bool(set(tprog.used_residuals()) & tracer.suspect_residuals)
    n_traced = len(tprog.residuals)
    exact_groups(tprog)
    simplify(tprog)
    for r in tprog.residuals[n_traced:]:  # coefficients computed by the passes
        tracer.note_created(r)
    tprog.prune_residuals()
    live = {id(e.fn) for e in tprog.eqns}
    vjp_nodes = [n for n in tracer.opaque_nodes if id(n) in live]

    created = lm._created | tracer.created
    kept = list(tprog.residuals) + [t for n in vjp_nodes for t in ctx_tensors(n.ctx)]
    run = compile_program(tprog)
    if suspect:
        check_linear_at_zero(tprog, run, vjp_nodes, "transpose()")

    # Input structure: one argument shaped like f's output; output: one cotangent per
    # primal (None for non-differentiable leaves), in a tuple like torch.func.vjp.
    return LinearMap(
        tprog, run, api="vjp_fn(cotangents)", arg_name="cotangents", ref_name="output",
        in_spec=tree_structure((lm._out_spec.unflatten([0] * len(out_leaves)),)),
        in_leaves=list(out_leaves),
        out_spec=lm._in_spec,
        out_leaves=[ls if ls.differentiable else None for ls in lm._in_leaves],
        stale_watch=lm._stale_watch,
        residual_bytes=distinct_storage_bytes(kept, only=created),
        external_bytes=distinct_storage_bytes(kept, exclude=created),
        opaque_nodes=vjp_nodes,
        created=created,
    )

