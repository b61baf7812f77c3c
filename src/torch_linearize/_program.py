"""The linear program: a tiny SSA IR of tangent operations, its passes and its code generator.

A :class:`Program` is what ``linearize`` records: a list of :class:`Eqn` (one per
tangent operation, in eager order) over :class:`Var` (tangent values) and
:class:`Res` (residuals: tensors computed once at linearize time). It is
deliberately close to a jaxpr: an interpreter is a loop over equations.

Programs execute with eager semantics (in-place operations and views are
replayed in order on fresh buffers), so passes must respect aliasing. Every
``Var`` records the storage it lived in at trace time (``group``); a mutation
keeps alive every earlier equation whose buffer is read afterwards.

:func:`compile_program` turns a program into a plain Python function (no
``torch.fx`` interpreter, no ``nn.Module`` call overhead), with residuals bound
as closure cells.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

__all__ = ["Eqn", "Program", "Res", "Var", "ZeroOut", "compile_program", "dead_code_elimination"]

_var_ids = itertools.count()


class Var:
    """A tangent value: the output of an equation or a program input."""

    # lazy: the value is a lazily conjugated or negated view (conj/neg bit set), which
    # a copy resolves and some consumers (view_as_real) refuse
    __slots__ = ("device", "dtype", "group", "id", "lazy", "shape", "stride")

    def __init__(self, shape, dtype, stride=None, group=None, device=None, lazy=False):
        self.id = next(_var_ids)
        self.shape = tuple(shape)
        self.dtype = dtype
        self.stride = stride
        self.group = group
        self.device = device
        self.lazy = lazy

    @classmethod
    def like(cls, t: torch.Tensor, group=None) -> Var:
        try:
            stride = tuple(t.stride())
        except RuntimeError:  # sparse / nested layouts have no strides
            stride = None
        return cls(t.shape, t.dtype, stride, group, t.device, t.is_conj() or t.is_neg())

    def __repr__(self) -> str:
        return f"v{self.id}"


class Res:
    """A reference to residual slot ``index`` of the program's residual table."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"r{self.index}"

    def __eq__(self, other):
        return isinstance(other, Res) and other.index == self.index

    def __hash__(self):
        return hash(("Res", self.index))


@dataclass(frozen=True)
class ZeroOut:
    """An output whose tangent is identically zero (it does not depend on the inputs)."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device


@dataclass
class Eqn:
    """One tangent operation ``outs = fn(*args, **kwargs)``.

    ``args``/``kwargs`` are pytrees whose leaves are :class:`Var`, :class:`Res` or
    Python literals. ``outs`` mirrors the structure ``fn`` returns, with a
    :class:`Var` for every tensor. ``mutates`` lists the Vars whose buffers ``fn``
    writes in place.
    """

    fn: Callable
    args: tuple
    kwargs: dict
    outs: Any
    mutates: tuple = ()
    name: str = ""
    poison: str | None = None  # set when the operation is not linear in its tangent inputs

    def _leaves(self) -> list:
        # Cached: the passes ask for every equation's inputs many times. ``args`` and
        # ``kwargs`` are only ever replaced (never mutated), so identity validates it.
        c = self.__dict__.get("_leaf_cache")
        if c is not None and c[0] is self.args and c[1] is self.kwargs:
            return c[2]
        out: list = []
        for x in self.args:
            if isinstance(x, (list, tuple)):
                out.extend(x)
            else:
                out.append(x)
        if self.kwargs:
            for x in self.kwargs.values():
                if isinstance(x, (list, tuple)):
                    out.extend(x)
                else:
                    out.append(x)
        self.__dict__["_leaf_cache"] = (self.args, self.kwargs, out)
        return out

    def in_vars(self) -> list[Var]:
        c = self.__dict__.get("_var_cache")
        if c is not None and c[0] is self.args and c[1] is self.kwargs:
            return c[2]
        out = [x for x in self._leaves() if isinstance(x, Var)]
        self.__dict__["_var_cache"] = (self.args, self.kwargs, out)
        return out

    def in_res(self) -> list[Res]:
        return [x for x in self._leaves() if isinstance(x, Res)]

    def out_vars(self) -> list[Var]:
        o = self.outs
        if isinstance(o, Var):
            return [o]
        if isinstance(o, (list, tuple)) and all(not isinstance(x, (list, tuple, dict)) for x in o):
            return [x for x in o if isinstance(x, Var)]
        leaves, _ = tree_flatten(o)
        return [x for x in leaves if isinstance(x, Var)]


@dataclass
class Program:
    """A recorded linear program: ``outputs = program(*inputs)`` given ``residuals``."""

    inputs: list[Var]
    eqns: list[Eqn]
    outputs: list[Var | ZeroOut]
    residuals: list[torch.Tensor]
    input_layouts: list[tuple] = field(default_factory=list)  # (stride, storage_offset) per input
    mutated_inputs: set[int] = field(default_factory=set)
    residual_names: list[str] = field(default_factory=list)
    # Trace-time tangent values of the outputs (by Var id), while simplifying: the inputs'
    # tangent placeholders are ones, so the value of a one-input pointwise region is its
    # coefficient, already computed by the trace (see _passes._traced_coefficient).
    trace_values: dict = field(default_factory=dict)
    # While simplifying a program seen for the first time: the _structure_cache.Recorder
    # that logs the passes' tensor work and value-based decisions (None: not recorded).
    recorder: Any = None

    def used_residuals(self) -> list[int]:
        seen: dict[int, None] = {}
        for e in self.eqns:
            for r in e.in_res():
                seen[r.index] = None
        return list(seen)

    def prune_residuals(self) -> None:
        """Renumber residuals so that only the ones the equations use are kept."""
        used = self.used_residuals()
        remap = {old: new for new, old in enumerate(used)}

        def sub(x):
            return Res(remap[x.index]) if isinstance(x, Res) else x

        def sub_arg(x):
            return type(x)(sub(y) for y in x) if isinstance(x, (list, tuple)) else sub(x)

        if any(old != new for old, new in remap.items()):
            for e in self.eqns:
                if not e.in_res():
                    continue  # (nothing to renumber: keep its argument objects)
                e.args = tuple(sub_arg(a) for a in e.args)
                e.kwargs = {k: sub_arg(v) for k, v in e.kwargs.items()}
        self.residuals = [self.residuals[i] for i in used]
        if self.residual_names:
            self.residual_names = [self.residual_names[i] for i in used]


class Storage:
    """A storage group after :func:`exact_groups`: one storage of the trace (not an
    address, which storages that never coexisted may share)."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def __repr__(self) -> str:
        return f"storage{self.n}"


def exact_groups(prog: Program) -> None:
    """Replace the Vars' groups (trace-time storage addresses) by storages.

    The allocator gives a freed storage's address to a later tensor, so one address may
    name storages that never coexisted; the passes, which read a shared group as "may
    alias", then declined rewrites depending on where the allocator put each tangent, and
    the structure cache saw different keys for one program. A Var made at an address
    whose last storage is still read at or after that point (by this equation, say, as
    a view's base or an in-place write's target, or later) is that storage; otherwise it
    is a new one. Inputs' storages live throughout (they are the caller's). Run once, on
    the raw trace: after the passes remove equations, fewer reads keep storages live.
    """
    n = len(prog.eqns)
    last: dict[int, int] = {}
    for p, e in enumerate(prog.eqns):
        for v in e.in_vars():
            last[v.id] = p
    for o in prog.outputs:
        if isinstance(o, Var):
            last[o.id] = n
    current: dict[Any, list] = {}  # address -> [storage, read until]
    numbers = itertools.count()

    def assign(v: Var, at: int, until: float) -> None:
        g = v.group
        if g is None:
            return
        cur = current.get(g)
        if cur is not None and cur[1] >= at:
            cur[1] = max(cur[1], until)
        else:
            cur = current[g] = [Storage(next(numbers)), until]
        v.group = cur[0]

    for v in prog.inputs:
        assign(v, -1, math.inf)
    for p, e in enumerate(prog.eqns):
        for v in e.out_vars():
            assign(v, p, last.get(v.id, p))


def dead_code_elimination(prog: Program) -> None:
    """Drop equations whose results never reach an output.

    Aliasing-aware: an equation that writes in place into a buffer (storage group)
    that a live equation reads later is kept, and so is everything it reads.
    """
    live_vars: set[int] = set()
    needed_groups: set = set()
    for o in prog.outputs:
        if isinstance(o, Var):
            live_vars.add(o.id)
            if o.group is not None:
                needed_groups.add(o.group)
    kept: list[Eqn] = []
    poisoned = None
    for e in reversed(prog.eqns):
        o = e.outs
        if type(o) is Var:  # (the common case, without building lists)
            outs: Any = (o,)
            live = o.id in live_vars
        else:
            outs = e.out_vars()
            live = any(v.id in live_vars for v in outs)
        if not live and e.mutates:
            live = any(m.group is not None and m.group in needed_groups for m in e.mutates)
        if not live:
            continue
        kept.append(e)
        for x in e._leaves():
            if isinstance(x, Var):
                live_vars.add(x.id)
                if x.group is not None:
                    needed_groups.add(x.group)
        for v in outs:
            if v.group is not None:
                needed_groups.add(v.group)
        if e.poison is not None:
            poisoned = e
    kept.reverse()
    prog.eqns = kept
    if poisoned is not None:
        for e in kept:  # the first one in program order
            if e.poison is not None:
                from ._errors import NonLinearTangentError

                raise NonLinearTangentError(e.poison)


# --------------------------------------------------------------------------- printing


def op_name(fn: Callable) -> str:
    if isinstance(fn, torch._ops.OpOverload):
        return str(fn)  # e.g. "aten.mul.Tensor"
    name = getattr(fn, "display_name", None)
    if name:
        return name
    if fn is operator.getitem:
        return "getitem"
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


_DTYPE_ABBR = {
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
    torch.float64: "f64",
    torch.complex64: "c64",
    torch.complex128: "c128",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "bool",
}


def type_str(shape, dtype) -> str:
    d = _DTYPE_ABBR.get(dtype, str(dtype).replace("torch.", ""))
    return f"{d}[{', '.join(str(s) for s in shape)}]"


def _fmt_literal(x) -> str:
    if isinstance(x, (Var, Res)):
        return repr(x)
    if isinstance(x, (list, tuple)):
        inner = ", ".join(_fmt_literal(y) for y in x)
        return f"[{inner}]" if isinstance(x, list) else f"({inner}{',' if len(x) == 1 else ''})"
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return repr(x)


def format_eqn(e: Eqn) -> str:
    outs = e.out_vars()
    lhs = ", ".join(f"{v}: {type_str(v.shape, v.dtype)}" for v in outs) or "_"
    args = [_fmt_literal(a) for a in e.args]
    args += [f"{k}={_fmt_literal(v)}" for k, v in e.kwargs.items()]
    return f"{lhs} = {e.name or op_name(e.fn)}({', '.join(args)})"


# --------------------------------------------------------------------------- codegen


def _relayout(t: torch.Tensor, stride: tuple) -> torch.Tensor:
    """A copy of ``t`` with the strides (and zero storage offset) the program was traced with
    (always a new tensor: the program may write it in place)."""
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        # Under vmap/grad transforms layouts are per-example and logical: a fresh
        # contiguous copy is what the traced placeholders (contiguous) looked like.
        # (Not .contiguous(): an example that is contiguous already comes back as the
        # caller's own batch, which an input written in place would then overwrite.)
        return t.clone(memory_format=torch.contiguous_format)
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


class _Namer:
    def __init__(self):
        self.globals: dict[str, Any] = {
            "torch": torch,
            "_relayout": _relayout,
            "_Tensor": torch.Tensor,
            "_STRIDED": torch.strided,
            "_grad_enabled": torch.is_grad_enabled,
            "_functorch_active": torch._C._are_functorch_transforms_active,
            "_fwAD": torch.autograd.forward_ad,
            "_inf": math.inf,
            "_nan": math.nan,
        }
        self._ids: dict[int, str] = {}
        self.globbed: list[str] = []  # (the names glob() gave, in order)
        self._keep: list[Any] = []
        self._vars: dict[int, str] = {}
        self._tmp = 0

    def var(self, v: Var) -> str:
        """Program-local names (v0, v1, ... in order of definition), so that the same
        program structure always produces the same source and hits the code cache."""
        name = self._vars.get(v.id)
        if name is None:
            name = f"v{len(self._vars)}"
            self._vars[v.id] = name
        return name

    def tmp(self) -> str:
        self._tmp += 1
        return f"_o{self._tmp}"

    def bind(self, obj, name: str) -> None:
        """Refer to ``obj`` as ``name`` (a parameter of ``_make``), not as a global."""
        self._ids[id(obj)] = name
        self._keep.append(obj)

    def glob(self, obj, prefix="c") -> str:
        key = id(obj)
        name = self._ids.get(key)
        if name is None:
            name = f"{prefix}{len(self._ids)}"
            self._ids[key] = name
            self.globals[name] = obj
            self.globbed.append(name)
            self._keep.append(obj)
        return name

    def lit(self, x) -> str:
        if isinstance(x, Var):
            return self.var(x)
        if isinstance(x, Res):
            return f"r{x.index}"
        if x is None or isinstance(x, (bool, int, str)):
            return repr(x)
        if isinstance(x, float):
            if math.isnan(x):
                return "_nan"
            if math.isinf(x):
                return "_inf" if x > 0 else "(-_inf)"
            return repr(x)
        if isinstance(x, list):
            return "[" + ", ".join(self.lit(y) for y in x) + "]"
        if isinstance(x, tuple):
            return "(" + "".join(self.lit(y) + ", " for y in x) + ")"
        return self.glob(x)


_aten = torch.ops.aten
# The hottest operators of linear programs, by id, with their Python bindings: the same
# overload on the same arguments (positional tensors or numbers; these kwargs only), but
# called unboxed, through the argument parser every eager `torch.mul` uses: 0.85 against
# 1.3 us warm, and ~5 us less when the call finds the caches cold. (The dict keeps the
# operators alive, so their ids stay theirs.)
_UNBOXED: dict[int, tuple[Any, Callable, frozenset]] = {
    id(op): (op, fn, frozenset(kw)) for op, fn, kw in (
        (_aten.mul.Tensor, torch.mul, ()),
        (_aten.add.Tensor, torch.add, ("alpha",)),
        (_aten.sub.Tensor, torch.sub, ("alpha",)),
        (_aten.div.Tensor, torch.div, ()),
        (_aten.neg.default, torch.neg, ()),
        (_aten.addcmul.default, torch.addcmul, ("value",)),
        (_aten.mm.default, torch.mm, ()),
    )
}


def _callable_for(fn: Callable, args: tuple = (), kwargs: dict | None = None) -> Callable:
    """What the generated code calls for an equation ``fn(*args, **kwargs)``."""
    if not isinstance(fn, torch._ops.OpOverload):
        return fn
    hit = _UNBOXED.get(id(fn))
    if hit is not None and hit[0] is fn and args and isinstance(args[0], (Var, Res)) and \
            (not kwargs or kwargs.keys() <= hit[2]):
        return hit[1]  # (the first argument is a tensor: the binding picks this overload)
    # OpOverload.__call__ is a thin Python wrapper around the bound C++ operator.
    return getattr(fn, "_op", fn)


_code_cache: dict[str, Any] = {}  # program source -> code object (re-linearizing reuses it)


_offset_ops: dict[int, tuple[Any, bool]] = {}  # id(fn) -> (fn, answer)


def _takes_storage_offset(fn: Any) -> bool:
    """Whether ``fn`` reads an absolute storage offset (``as_strided``, ``set_``...)."""
    hit = _offset_ops.get(id(fn))
    if hit is not None and hit[0] is fn:
        return hit[1]
    schema = getattr(fn, "_schema", None)
    answer = schema is not None and any(a.name == "storage_offset" for a in schema.arguments)
    if not isinstance(fn, torch._ops.OpOverload):
        return answer  # (opaque nodes hold a ctx: never cached)
    if len(_offset_ops) > 4096:
        _offset_ops.clear()
    _offset_ops[id(fn)] = (fn, answer)  # (holding the operator keeps its id its own)
    return answer


def _layout_free_inputs(prog: Program) -> set[int]:
    """The inputs whose layout the program's results do not depend on: all of them when
    every operation is an elementwise aten operation (no views, no custom-Function node,
    whose kernel may assume the traced layout, no in-place write); none otherwise. A
    tangent laid out unlike the primal (a transposed or channels-last primal, a
    contiguous tangent) then runs as it is, without a copy into the traced layout."""
    from ._batch import elementwise

    if not prog.eqns or not all(elementwise(e) for e in prog.eqns):
        return set()
    return set(range(len(prog.inputs)))


def offset_sensitive(prog: Program) -> bool:
    """Whether an input's storage offset can change the program's result.

    View ops (slice, select, ...) take offsets *relative* to their input, so a tangent
    that is a view into a larger buffer (``T[k]`` of a stacked batch) runs as is; only
    ops that take an absolute offset see where the traced placeholder (offset 0) began.
    """
    return any(_takes_storage_offset(e.fn) for e in prog.eqns)


# run1 (see compile_program) repeats the body for programs up to this long; longer ones
# call run (their own run time dwarfs a frame, and compiling the body twice costs time at
# every linearize that misses the code cache).
_ENTRY1_MAX_EQNS = 64
_CPU = torch.device("cpu")


def compile_program(prog: Program) -> Callable[..., tuple]:
    """Generate a Python function ``run(*inputs) -> tuple(outputs)`` for ``prog``.

    Residuals are bound as closure cells; inputs whose strides differ from the
    layout the program was traced with (or whose storage offset differs, when an op
    of the program takes an absolute offset) are copied into that layout first, and
    inputs the program mutates in place are copied so the caller's tensors are
    never written.
    """
    make, src = program_factory(prog)
    return bind_program(make, src, prog.residuals, program_nodes(prog))


def bind_program(make: Callable, src: str, residuals: list, nodes: list) -> Callable[..., tuple]:
    """``run`` for residuals ``residuals`` and custom-Function nodes ``nodes`` (in
    :func:`program_nodes` order) from :func:`program_factory`'s ``make``."""
    run, run1 = make(*residuals, *nodes)
    run.__torch_linearize_source__ = src  # type: ignore[attr-defined]
    run.entry1 = run1  # type: ignore[attr-defined]
    return run


def is_node(fn: Any) -> bool:
    """Whether ``fn`` is a custom-Function node (``_opaque._OpaqueNode``)."""
    return not isinstance(fn, torch._ops.OpOverload) and hasattr(type(fn), "finish_lean")


def program_nodes(prog: Program) -> list:
    """The program's custom-Function nodes, each once, in order of first appearance: the
    trailing parameters of :func:`program_factory`'s ``make``."""
    seen: dict[int, Any] = {}
    for e in prog.eqns:
        if is_node(e.fn) and id(e.fn) not in seen:
            seen[id(e.fn)] = e.fn
    return list(seen.values())


def _inlined_nodes(prog: Program) -> set[int]:
    """Indices of the custom-Function equations that ``run1`` calls inline: nodes with a
    lean call (``_opaque._OpaqueNode._lean``: one result, no in-place write) whose tensor
    arguments are inputs, residuals or values computed without any node's result (a
    node's result may require grad, which the node's own checks route to autograd), in
    one-input, one-output programs short enough for ``run1`` to repeat the body."""
    if len(prog.inputs) != 1 or len(prog.outputs) != 1 or len(prog.eqns) > _ENTRY1_MAX_EQNS:
        return set()
    nodes = [is_node(e.fn) for e in prog.eqns]
    if not any(nodes):
        return set()
    inlined: set[int] = set()
    tainted: set[int] = set()  # Vars computed from a node's result
    for n, e in enumerate(prog.eqns):
        node = nodes[n]
        lean = e.fn._lean if node else None
        if lean is not None and not e.kwargs and isinstance(e.outs, (tuple, list)) and \
                len(e.outs) == 1 and isinstance(e.outs[0], Var) and all(
                    isinstance(e.args[i], Res)
                    or (isinstance(e.args[i], Var) and e.args[i].id not in tainted)
                    for i in lean[0]):
            inlined.add(n)
        if node or (tainted and any(v.id in tainted for v in e.in_vars())):
            tainted.update(v.id for v in e.out_vars())
    return inlined


def _assign(nm: _Namer, outs: Any, call: str) -> list[str]:
    """Lines that run ``call`` and bind the equation's outputs ``outs``."""
    if isinstance(outs, Var):
        return [f"{nm.var(outs)} = {call}"]
    if isinstance(outs, (tuple, list)) and all(
        isinstance(o, Var) or not isinstance(o, (tuple, list, dict)) for o in outs
    ):
        if any(isinstance(o, Var) for o in outs):
            names = ", ".join(nm.var(o) if isinstance(o, Var) else "_" for o in outs)
            return [f"{names}, = {call}" if len(outs) == 1 else f"{names} = {call}"]
        return [call]
    if outs is None or not tree_flatten(outs)[0]:
        return [call]
    # nested structure: flatten at run time
    leaves = tree_flatten(outs)[0]
    flat = nm.glob(tree_flatten, "f")
    tmp = nm.tmp()
    lines = [f"{tmp} = {flat}({call})[0]"]
    for i, o in enumerate(leaves):
        if isinstance(o, Var):
            lines.append(f"{nm.var(o)} = {tmp}[{i}]")
    return lines


def _inline_node(nm: _Namer, e: Eqn, f: str, args: list[str], checks: list[str]) -> list[str]:
    """run1's lines for a custom-Function node ``f``: the user's function called directly
    on the node's ctx (the phase's own view of it, see ``LinearizeCtx.jvp_view``), as the
    node's own lean path calls it (``_OpaqueNode.__call__``), without the node's frame
    and checks. ``checks`` gets run1's entry conditions for it
    (released map; a transform or forward AD active: the node's general path). A result
    that is not one tensor of the traced dtype, shape and strides goes through the node's
    own normalization and checks (``finish_lean``)."""
    _, fn, shape, dtype, stride = e.fn._lean
    out = nm.var(e.outs[0])
    if not checks:
        checks.append("_functorch_active()")
        checks.append("_fwAD._current_level >= 0")
    checks.append(f"{f}.ctx is None")
    ok = f"type({out}) is _Tensor and {out}.dtype is {nm.glob(dtype)} and " \
         f"{out}.shape == {nm.lit(shape)}"
    if stride is not None:
        ok += f" and {out}.stride() == {nm.lit(stride)}"
    return [
        f"{out} = {nm.glob(fn, 'f')}({f}.ctx, {', '.join(args)})",
        f"if {f}.watch: {f}.refresh()",
        f"if not ({ok}): {out}, = {f}.finish_lean({out}, [{', '.join(args)}])",
    ]


def program_factory(prog: Program) -> tuple[Callable, str]:
    """``(make, source)``: ``make(*residuals, *nodes)`` returns ``(run, run1)`` for
    ``prog``'s structure (the same for any residuals of the same slots and any
    custom-Function nodes of the same structure, in :func:`program_nodes` order)."""
    nm = _Namer()
    lines: list[str] = []
    nres = len(prog.residuals)
    params = [f"r{i}" for i in range(nres)]
    for k, node in enumerate(program_nodes(prog)):
        nm.bind(node, f"n{k}")
        params.append(f"n{k}")
    in_params = ", ".join(nm.var(v) for v in prog.inputs)
    lines.append(f"def _make({', '.join(params)}):")
    lines.append(f"    def run({in_params}):")
    body: list[str] = []  # run's body
    body1: list[str] = []  # run1's body: the same, with custom-Function calls inlined
    node_checks: list[str] = []  # run1's entry conditions for its inlined calls
    inlined = _inlined_nodes(prog)
    check_offsets = offset_sensitive(prog)
    layout_free = _layout_free_inputs(prog)
    for k, v in enumerate(prog.inputs):
        stride, offset = prog.input_layouts[k] if prog.input_layouts else (None, 0)
        name = nm.var(v)
        if v.dtype.is_complex:
            # a lazily conjugated (or negated) tangent is resolved, as torch.func does:
            # some operations (view_as_real) refuse one
            body.append(f"if {name}.is_conj() or {name}.is_neg(): "
                        f"{name} = {name}.resolve_conj().resolve_neg()")
        if k in layout_free:
            pass  # (elementwise operations only: any layout gives the same values)
        elif stride is not None:
            s = nm.lit(tuple(stride))
            cond = f"{name}.stride() != {s}"
            if check_offsets:
                cond += f" or {name}.storage_offset() != {offset}"
            body.append(f"if {cond}: {name} = _relayout({name}, {s})")
            if k in prog.mutated_inputs:
                body.append(f"else: {name} = _relayout({name}, {s})")
        elif k in prog.mutated_inputs:
            body.append(f"{name} = {name}.clone()")
    body1.extend(body)
    for n, e in enumerate(prog.eqns):
        f = nm.glob(_callable_for(e.fn, e.args, e.kwargs), "f")
        args = [nm.lit(a) for a in e.args] + [f"{k}={nm.lit(v)}" for k, v in e.kwargs.items()]
        call = f"{f}({', '.join(args)})"
        line = _assign(nm, e.outs, call)
        body.extend(line)
        if n in inlined:
            body1.extend(_inline_node(nm, e, f, args, node_checks))
        else:
            body1.extend(line)
    rets = []
    for o in prog.outputs:
        if isinstance(o, Var):
            rets.append(nm.var(o))
        else:
            shape = nm.lit(tuple(o.shape))
            rets.append(f"torch.zeros({shape}, dtype={nm.glob(o.dtype)}, device={nm.glob(o.device)})")
    lines.extend("        " + b for b in body)
    lines.append("        return (" + "".join(r + ", " for r in rets) + ")")
    if len(prog.inputs) == 1 and len(rets) == 1:
        # run1(t): the one-tensor call in one frame, for LinearMap's commonest call. It
        # checks what LinearMap checks (type, shape, dtype, device, layout, and that no gradient
        # is to be recorded; NotImplemented when any differs), then runs the same body
        # and returns the one output itself. (A call made between other heavy work pays
        # every frame and lookup in cache misses.)
        v = prog.inputs[0]
        name = nm.var(v)
        dev = f"not {name}.is_cpu" if v.device == _CPU else f"{name}.device != {nm.glob(v.device)}"
        lines.append(f"    def run1({name}):")
        lines.append(f"        if type({name}) is not _Tensor or {name}.shape != {nm.lit(v.shape)} or "
                     f"{name}.dtype is not {nm.glob(v.dtype)} or {dev} or {name}.layout is not _STRIDED or "
                     f"({name}.requires_grad and _grad_enabled())"
                     + "".join(" or " + c for c in node_checks) + ": return NotImplemented")
        if len(prog.eqns) <= _ENTRY1_MAX_EQNS:
            lines.extend("        " + b for b in body1)
            lines.append(f"        return {rets[0]}")
        else:
            lines.append(f"        return run({name})[0]")
        lines.append("    return run, run1")
    else:
        lines.append("    return run, None")
    src = "\n".join(lines)
    return exec_source(src, nm.globals, "<torch_linearize program>").pop("_make"), src


def globals_key(nm: _Namer) -> tuple:
    """What generated code's own globals (``f0``, ``c1``, ...: the operators, dtypes,
    devices and numbers ``nm.glob`` named) are, as a hashable key: two programs with one
    source may call different operators (``f0(v0, [0])`` is ``sum`` in one and ``mean``
    in the other)."""
    parts = []
    for name in nm.globbed:
        v = nm.globals[name]
        if isinstance(v, (float, complex)):
            parts.append((name, type(v), repr(v)))  # (-0.0 is not 0.0; nan is nan)
            continue
        try:
            hash(v)
        except TypeError:
            parts.append((name, "id", id(v)))  # (kept alive by whoever caches the code)
            continue
        parts.append((name, type(v), v))
    return tuple(parts)


def exec_source(src: str, globals_: dict, filename: str, key: Any = None) -> dict:
    """Run generated source ``src`` in a copy of ``globals_`` and return that namespace;
    the compiled code is cached by ``key`` (default: the source; re-linearizing a
    structure reuses it). Callers ``pop`` the function they want: a function defined at
    the top of the source is in the namespace that is its ``__globals__``, a reference
    cycle."""
    key = src if key is None else key
    code = _code_cache.get(key)
    if code is None:
        code = compile(src, filename, "exec")
        if len(_code_cache) > 256:
            _code_cache.clear()
        _code_cache[key] = code
    glb = dict(globals_)
    exec(code, glb)
    return glb



def _segment_literal(x: Any, nm: _Namer, res_names: dict) -> str:
    """:func:`segment_source`'s source text for argument ``x`` (residuals by their
    parameter names). (Module-level: a recursive closure is a reference cycle.)"""
    if isinstance(x, Res):
        return res_names[x.index]
    if isinstance(x, (list, tuple)):
        inner = [_segment_literal(y, nm, res_names) for y in x]
        return "[" + ", ".join(inner) + "]" if isinstance(x, list) else \
            "(" + "".join(i + ", " for i in inner) + ")"
    return nm.lit(x)


def segment_source(eqns: list[Eqn], inputs: list[Var], outputs: list[Var],
                   residual_indices: list[int]) -> tuple[str, Callable]:
    """A standalone function ``seg(*inputs, *residuals) -> tuple(outputs)`` for ``eqns``.

    Residuals are arguments (nothing is baked in), names are local and canonical,
    and code objects are cached by source, so the same segment structure always
    yields the same code object (what ``torch.compile`` caches on). Operators are
    called as OpOverloads, which dynamo understands.
    """
    nm = _Namer()
    res_names = {i: f"r{k}" for k, i in enumerate(residual_indices)}

    def lit(x):
        return _segment_literal(x, nm, res_names)

    params = [nm.var(v) for v in inputs] + [res_names[i] for i in residual_indices]
    body = []
    for e in eqns:
        f = nm.glob(e.fn, "f")
        args = [lit(a) for a in e.args] + [f"{k}={lit(v)}" for k, v in e.kwargs.items()]
        call = f"{f}({', '.join(args)})"
        outs = e.outs
        if isinstance(outs, Var):
            body.append(f"{nm.var(outs)} = {call}")
        elif isinstance(outs, (tuple, list)) and any(isinstance(o, Var) for o in outs):
            names = ", ".join(nm.var(o) if isinstance(o, Var) else "_" for o in outs)
            body.append(f"{names}, = {call}" if len(outs) == 1 else f"{names} = {call}")
        else:
            body.append(call)
    body.append("return (" + "".join(nm.var(o) + ", " for o in outputs) + ")")
    src = "def seg(" + ", ".join(params) + "):\n" + "\n".join("    " + b for b in body)
    # One code object per source *and* globals: torch.compile caches compiled frames on
    # the code object, and a frame compiled with one segment's globals must not run with
    # another's (until stop 22 a.mean(0)'s compiled map ran an earlier a.sum(0) map's sum).
    gkey = globals_key(nm)
    fn = exec_source(src, nm.globals, "<torch_linearize segment>", key=(src, gkey)).pop("seg")
    fn.__torch_linearize_source__ = src  # type: ignore[attr-defined]
    fn.__torch_linearize_globals__ = gkey  # type: ignore[attr-defined]
    return src, fn


def _value(a: Any, env: dict, res: list) -> Any:
    """:func:`interpret`'s value of argument ``a``. (Module-level: a recursive closure
    would be a reference cycle holding ``env``, so the intermediate values would outlive
    the call until the cyclic garbage collector ran.)"""
    if isinstance(a, Var):
        return env[a.id]
    if isinstance(a, Res):
        return res[a.index]
    if isinstance(a, (list, tuple)):
        return type(a)(_value(b, env, res) for b in a)
    return a


def interpret(prog: Program, inputs: list, impl: Callable[[Eqn], Callable] | None = None) -> tuple:
    """Run ``prog`` equation by equation (``impl(eqn)`` may substitute implementations).

    Slower than :func:`compile_program`; used where operations must be swapped,
    e.g. for decompositions that autograd can differentiate when transposing.
    """
    env: dict[int, Any] = {v.id: x for v, x in zip(prog.inputs, inputs)}
    res = prog.residuals
    for e in prog.eqns:
        fn = impl(e) if impl is not None else e.fn
        out = fn(*[_value(a, env, res) for a in e.args],
                 **{k: _value(v, env, res) for k, v in e.kwargs.items()})
        if isinstance(e.outs, Var):
            env[e.outs.id] = out
        else:
            for v, o in zip(tree_flatten(e.outs)[0], tree_flatten(out)[0]):
                if isinstance(v, Var):
                    env[v.id] = o
    return tuple(
        env[o.id] if isinstance(o, Var) else torch.zeros(o.shape, dtype=o.dtype, device=o.device)
        for o in prog.outputs
    )


def check_linear_at_zero(prog: Program, run: Callable[..., tuple], nodes, what: str) -> None:
    """Raise if the program maps zero inputs to a non-zero output (it is affine, not linear).

    Custom-Function nodes output zeros during the check (``shape_only``); their
    own linearity is their author's contract.
    """
    from ._errors import NonLinearTangentError
    from ._opaque import shape_only

    zeros = []
    for k, v in enumerate(prog.inputs):
        stride = prog.input_layouts[k][0] if prog.input_layouts else None
        z = (torch.zeros(v.shape, dtype=v.dtype, device=v.device) if stride is None else
             torch.empty_strided(v.shape, stride, dtype=v.dtype, device=v.device).zero_())
        zeros.append(z)
    with shape_only(nodes), torch.no_grad():
        outs = run(*zeros)
    for k, o in enumerate(outs):
        # Only finite non-zeros are evidence of an added constant (0 * inf residuals
        # give NaN without any constant).
        if isinstance(o, torch.Tensor) and o.numel() and bool(torch.any((o != 0) & o.isfinite())):
            raise NonLinearTangentError(
                f"{what}: the recorded tangent program is affine, not linear: with zero tangents "
                f"it returns a non-zero output {k}. A constant was added to a tangent-dependent "
                "value (for example tangent + torch.ones_like(tangent))."
            )
