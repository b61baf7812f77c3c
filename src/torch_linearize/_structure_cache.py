"""Re-linearizing a function with the same structure: reuse the simplified program.

A Newton or Gauss-Newton loop linearizes the same function at a new point every
iteration. The trace must run again (it computes the residuals at the new point),
but the passes (``_passes.simplify``), residual pruning and code generation depend
on the traced program's *structure* and on a few facts about residual *values*.

* :func:`structure_key` describes a traced program canonically: every equation's
  operator, argument structure and literals, every tangent value's shape, dtype,
  strides, storage group (numbered in order of appearance where the program writes
  in place; otherwise only whether it is an input's) and conj/neg state,
  every residual's metadata, and which outputs carry a traced value. Two traces
  with equal keys are the same program up to residual values.
* The first time a function is linearized at given shapes (its
  :func:`call_signature`), the passes just run: no key is computed (most functions
  are linearized once). From the second time on the key is computed; the first time
  a key has no template, a :class:`Recorder` logs, in order, every
  tensor operation they apply to residuals (the folded coefficients are such
  operations) and every *decision* they take from values (a residual is all zeros,
  a coefficient has one sign, a folded region is as accurate as the traced one, a
  coefficient is a constant), with its outcome.
* On a later trace with the same key, :func:`replay` runs the logged operations on
  the new residuals and re-evaluates every decision; if each gives the outcome it
  gave before, the passes would take the same path, so the cached program (and its
  generated code) is used with the replayed residuals. If any differs, the passes
  run in full and the entry is replaced.

Custom-Function (and custom-op) nodes are keyed by their structure
(``_OpaqueNode.structure``: Function, argument and result metadata), not by their ctx:
a template keeps each node as its number among the raw trace's nodes, and a reuse binds
the new trace's nodes there, as code-factory parameters. The environment variable
``TORCH_LINEARIZE_STRUCTURE_CACHE`` turns reuse off (``0``) or checks every reuse
against the passes (``verify``). A template holds no tensors and no ctx (only the
program's structure, operators and literals), so the cache keeps no memory alive.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch

from ._program import Program, Res, Var, is_node
from ._residuals import STRUCTURAL_ZERO

__all__ = ["Recorder", "Template", "as_new_structure", "cache_get", "cache_put",
           "call_signature", "first_sighting", "replay", "structure_key"]

_ENV = os.environ.get("TORCH_LINEARIZE_STRUCTURE_CACHE", "1").strip().lower()
# TORCH_LINEARIZE_STRUCTURE_CACHE=0 turns reuse off (every linearize runs the passes);
# =verify checks every reuse against a full run of the passes (AssertionError if they
# differ). Read at import.
ENABLED = _ENV not in ("0", "off", "false", "no")
_PLAIN = frozenset({int, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                    torch.memory_format})
_MAX_ENTRIES = 128
# When true (tests: ``pytest --verify-structure-cache``), every cache hit is checked
# against a full run of the passes on the same trace.
VERIFY = _ENV == "verify"
# Counts since import (or cache_clear): reused programs, structures recorded, and reuses
# refused because a decision came out differently on the new values.
stats = {"hits": 0, "recorded": 0, "refused": 0}


class _Uncacheable(Exception):
    pass


def structure_key(prog: Program, trace_values: dict, suspect: set[int]) -> tuple | None:
    """A hashable description of ``prog`` up to residual values, and the Vars in canonical
    order; None for a program that is not cached (opaque nodes, unusual literals)."""
    vnum: dict[int, int] = {}
    order: list[Var] = []
    # Storage groups matter to the passes through in-place writes (which buffers a write
    # reaches) and, without any, only as "is one of the inputs' buffers": a freed buffer's
    # address can be reused by a later one, so their full pattern varies between traces.
    mutating = any(e.mutates for e in prog.eqns)
    groups: dict[Any, int] = {}
    if not mutating:
        groups = {v.group: 0 for v in prog.inputs if v.group is not None}

    def define(v: Var) -> tuple:
        vnum[v.id] = len(order)
        order.append(v)
        g = v.group
        if g is not None:
            g = groups.setdefault(g, len(groups)) if mutating else g in groups
        return (v.shape, v.dtype, v.stride, g, v.device, v.lazy)

    # Encoding: a Var is its canonical number (an int >= 0) where it was seen before and
    # its metadata (a tuple starting with its shape) where it is defined; a residual slot
    # is -1 - index; a literal is (type, value), floats by their exact hex form (so 1, 1.0
    # and True differ, and 0.0 and -0.0).
    def ref(x) -> Any:
        t = type(x)
        if t is Var:
            n = vget(x.id)
            return define(x) if n is None else n
        if t is Res:
            return -1 - x.index
        if t is int:
            return (int, x)
        if t is tuple or t is list:
            return (t, *[ref(y) for y in x])
        if t is float:
            return (float, x.hex())
        if t is complex:
            return (complex, x.real.hex(), x.imag.hex())
        if t in _PLAIN:
            return (t, x)
        raise _Uncacheable

    def outs(o) -> Any:
        t = type(o)
        if t is Var:
            return define(o)
        if t is tuple or t is list:
            return (t, *[outs(y) for y in o])
        return ref(o)

    vget = vnum.get  # (read by ref)
    # (ref and outs call themselves: each is a reference cycle through its own closure
    # cell; clearing the cells on return leaves no garbage for the cyclic collector)
    try:
        OpOverload = torch._ops.OpOverload
        nodes: dict[int, int] = {}  # id(custom-Function node) -> number, by first appearance
        try:
            parts: list = [tuple([define(v) for v in prog.inputs])]
            for e in prog.eqns:
                fn = e.fn
                if type(fn) is not OpOverload:
                    if not is_node(fn):
                        return None
                    # A node by its structure (not its ctx, which each trace has its own of)
                    # and its number: the template calls the new trace's node of that number.
                    k = nodes.setdefault(id(fn), len(nodes))
                    fn = ("node", k, fn.structure())
                a = []
                for x in e.args:
                    t = type(x)
                    if t is Var:
                        n = vget(x.id)
                        a.append(define(x) if n is None else n)
                    elif t is Res:
                        a.append(-1 - x.index)
                    else:
                        a.append(ref(x))
                kw, o = e.kwargs, e.outs
                parts.append((fn, tuple(a), ref(tuple(kw.items())) if kw else (),
                              define(o) if type(o) is Var else outs(o),
                              ref(e.mutates) if e.mutates else (), e.name, e.poison))
            parts.append(tuple([ref(o) if type(o) is Var else (o.shape, o.dtype, o.device)
                                for o in prog.outputs]))
        except _Uncacheable:
            return None
        res = []
        for r in prog.residuals:
            if r.layout != torch.strided:
                return None
            res.append((type(r), r.shape, r.stride(), r.storage_offset(), r.dtype, r.device,
                        r._is_zerotensor(), r.is_conj(), r.is_neg(), r.requires_grad,
                        STRUCTURAL_ZERO in r.__dict__))
        parts.append(tuple(res))
        tv = []
        for vid, t in trace_values.items():
            n = vnum.get(vid)
            if n is None:
                return None
            tv.append((n, t.shape, t.stride(), t.dtype))
        parts.append(tuple(tv))
        parts.append(tuple(prog.input_layouts))
        parts.append(tuple(sorted(prog.mutated_inputs)))
        parts.append(tuple(sorted(suspect)))
        return tuple(parts), order
    finally:
        ref = outs = define = None


class _Slot:
    """A reference to a value of the log (a residual, or the result of a logged op)."""

    __slots__ = ("k",)

    def __init__(self, k: int):
        self.k = k


class ResidualList(list):
    """A copy of a program's residual list passed to a decision (``Recorder.decide``):
    logged as a prefix of one slot list kept per source list, not residual by residual
    (a program with n residuals and n decisions on them, a time stepper's folds, would
    log n^2 slots)."""

    __slots__ = ("source",)

    def __init__(self, source: list):
        super().__init__(source)
        self.source = source


class _Prefix:
    """The first ``n`` residual slots of a shared slot list (a logged ResidualList)."""

    __slots__ = ("n", "slots")

    def __init__(self, slots: list[int], n: int):
        self.slots, self.n = slots, n


_OP, _DECIDE, _TRACED = 0, 1, 2


class Recorder:
    """Logs the passes' tensor operations on residuals and their value-based decisions."""

    def __init__(self, residuals: list[torch.Tensor], var_index: dict[int, int]):
        self.slots: dict[int, tuple[int, torch.Tensor]] = {
            id(r): (i, r) for i, r in enumerate(residuals)}
        self.n = len(residuals)
        self.log: list[tuple] = []
        self.ok = True
        self.var_index = var_index
        self._prefix_of: tuple[list, list[int]] | None = None  # (source list, its slots)

    def _new(self, t: torch.Tensor) -> int:
        k = self.n
        self.n += 1
        self.slots[id(t)] = (k, t)
        return k

    def _spec(self, x):
        if type(x) is ResidualList:
            return self._prefix(x)
        if isinstance(x, torch.Tensor):
            hit = self.slots.get(id(x))
            if hit is None or hit[1] is not x:
                self.ok = False  # a tensor of unknown origin: this program is not cached
                return None
            return _Slot(hit[0])
        if isinstance(x, (list, tuple)):
            return type(x)(self._spec(y) for y in x)
        if isinstance(x, dict):
            return {k: self._spec(v) for k, v in x.items()}
        return x

    def _prefix(self, x: ResidualList) -> _Prefix | None:
        """Slots of ``x``'s source list, extended for what was appended since last time
        (the source only grows while the passes run)."""
        cached = self._prefix_of
        if cached is None or cached[0] is not x.source or len(cached[1]) > len(x):
            cached = self._prefix_of = (x.source, [])
        slots = cached[1]
        for r in x[len(slots):]:
            hit = self.slots.get(id(r))
            if hit is None or hit[1] is not r:
                self.ok = False
                return None
            slots.append(hit[0])
        return _Prefix(slots, len(x))

    def slot_of(self, t: torch.Tensor) -> int | None:
        hit = self.slots.get(id(t))
        return hit[0] if hit is not None and hit[1] is t else None

    def op(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, logged."""
        out = fn(*args, **kwargs)
        if self.ok:
            a, kw = self._spec(args), self._spec(kwargs)
            if isinstance(out, torch.Tensor):
                self.log.append((_OP, fn, a, kw, torch.is_grad_enabled(), self._new(out)))
            else:
                self.ok = False
        return out

    def decide(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` (a decision taken from tensor values), logged with its outcome."""
        result = fn(*args)
        if self.ok:
            self.log.append((_DECIDE, fn, self._spec(args), result))
        return result

    def traced(self, vid: int, t: torch.Tensor) -> torch.Tensor:
        """``t``, the traced tangent value of Var ``vid``, used as a coefficient."""
        n = self.var_index.get(vid)
        if n is None:
            self.ok = False
        elif self.ok:
            self.log.append((_TRACED, n, self._new(t)))
        return t


class _NodeEqn:
    """A template's custom-Function equation without its node: the node's number among
    the raw trace's nodes, bound to a new trace's node by :meth:`bind`."""

    __slots__ = ("eqn", "k")

    def __init__(self, eqn, k: int):
        self.eqn = dataclasses.replace(eqn, fn=None)
        self.k = k

    def bind(self, raw_nodes: list):
        return dataclasses.replace(self.eqn, fn=raw_nodes[self.k])


class Template:
    """What a traced structure simplifies to: the program, its code, and how to get its
    residuals (slots of the log) from a new trace's."""

    __slots__ = ("eqns", "input_layouts", "inputs", "log", "make", "mutated_inputs", "n_slots",
                 "n_traced", "outputs", "res_names", "res_slots", "src", "used")

    def __init__(self, prog: Program, rec: Recorder, n_traced: int, used: list[int],
                 res_slots: list[int], make: Callable, src: str, raw_nodes: list):
        # custom-Function nodes (which hold their trace's ctx) are kept as their number
        # among the raw trace's nodes; program() substitutes a new trace's
        number = {id(n): k for k, n in enumerate(raw_nodes)}
        self.eqns = tuple(e if not is_node(e.fn) else _NodeEqn(e, number[id(e.fn)])
                          for e in prog.eqns)
        self.inputs = list(prog.inputs)
        self.outputs = list(prog.outputs)
        self.input_layouts = list(prog.input_layouts)
        self.mutated_inputs = frozenset(prog.mutated_inputs)
        self.res_slots = res_slots
        self.res_names = list(prog.residual_names)
        self.log = tuple(rec.log)
        self.n_slots = rec.n
        self.n_traced = n_traced
        self.used = used
        self.make = make
        self.src = src

    def program(self, residuals: list[torch.Tensor], names: list[str], raw_nodes: list
                ) -> Program:
        """A fresh Program (the equations are shared: nothing mutates them after
        linearize) with the new trace's residuals and custom-Function nodes."""
        res_names = [names[k] if k < self.n_traced and k < len(names) else n
                     for k, n in zip(self.res_slots, self.res_names)] if self.res_names else []
        eqns = [e if type(e) is not _NodeEqn else e.bind(raw_nodes) for e in self.eqns]
        return Program(inputs=list(self.inputs), eqns=eqns, outputs=list(self.outputs),
                       residuals=residuals, input_layouts=list(self.input_layouts),
                       mutated_inputs=set(self.mutated_inputs), residual_names=res_names)


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if a == b:
        return True
    return a != a and b != b  # (NaN)


def _filled(x: Any, vals: list) -> Any:
    """``x`` with every slot reference replaced by its value in ``vals``. (A module-level
    function: a recursive closure would be a reference cycle holding ``vals``, so a
    replayed map's residuals would outlive the map until the garbage collector ran.)"""
    t = type(x)
    if t is _Slot:
        return vals[x.k]
    if t is _Prefix:
        return [vals[k] for k in x.slots[:x.n]]
    if t is tuple or t is list:
        return t(_filled(y, vals) for y in x)
    if t is dict:
        return {k: _filled(v, vals) for k, v in x.items()}
    return x


class _ReplayMemo(threading.local):
    memo: dict | None = None


_replay_memo = _ReplayMemo()


def replay_memo() -> dict | None:
    """While :func:`replay` runs (in this thread), a dict its decisions may share values
    in (the accuracy probes' region values: the same residuals for all of them)."""
    return _replay_memo.memo


def replay(tpl: Template, residuals: list[torch.Tensor], trace_values: dict,
           order: list[Var]) -> list[torch.Tensor] | None:
    """The template's residuals computed from a new trace's, or None if a decision comes
    out differently (the passes must run)."""
    if len(residuals) != tpl.n_traced:
        return None
    _replay_memo.memo = {}
    try:
        return _replay(tpl, residuals, trace_values, order)
    finally:
        _replay_memo.memo = None


def _replay(tpl: Template, residuals: list[torch.Tensor], trace_values: dict,
            order: list[Var]) -> list[torch.Tensor] | None:
    vals: list = list(residuals) + [None] * (tpl.n_slots - tpl.n_traced)
    try:
        for entry in tpl.log:
            kind = entry[0]
            if kind == _OP:
                _, fn, a, kw, grad, k = entry
                with torch.set_grad_enabled(grad):
                    vals[k] = fn(*_filled(a, vals), **_filled(kw, vals))
            elif kind == _DECIDE:
                _, fn, a, expected = entry
                if not _same(fn(*_filled(a, vals)), expected):
                    stats["refused"] += 1
                    return None
            else:
                _, n, k = entry
                t = trace_values.get(order[n].id)
                if t is None:
                    return None
                vals[k] = t.detach()
    except (RuntimeError, ValueError, TypeError, IndexError):
        stats["refused"] += 1
        return None
    stats["hits"] += 1
    return [vals[k] for k in tpl.res_slots]


_cache: OrderedDict[tuple, Template] = OrderedDict()
_seen: OrderedDict[tuple, None] = OrderedDict()  # call signatures met (first_sighting)
_on_duals: OrderedDict[tuple, None] = OrderedDict()  # see starts_on_duals
_local = threading.local()


@contextmanager
def as_new_structure() -> Iterator[None]:
    """While active (in this thread), every structure is treated as met for the first
    time, and the cache is left as it is: what a first linearization costs (benchmarks)."""
    _local.new = True
    try:
        yield
    finally:
        _local.new = False


def call_signature(func: Any, leaves: list) -> tuple:
    """What a call looks like before it is traced: the function's code (its object for
    callables without one) and the primals' shapes, dtypes and devices. Cheap; only
    gates :func:`structure_key` (equal signatures need not mean equal structures)."""
    code = getattr(func, "__code__", None)
    return (id(func) if code is None else id(code),
            tuple([(t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t)
                   for t in leaves]))


def first_sighting(key: tuple) -> bool:
    """True the first time ``key`` (a :func:`call_signature`) is met: the passes then run
    without even computing the structure key (most functions are linearized once at a
    given shape); False from the second time on."""
    if getattr(_local, "new", False):
        return True
    if key in _seen:
        return False
    _seen[key] = None
    _evict(_seen, 4 * _MAX_ENTRIES)
    return True


def starts_on_duals(key: tuple) -> bool:
    """Whether the last trace of call signature ``key`` left the direct phase before any
    rule ran (its f calls a custom Function or an operator without a rule first): the
    next one then starts on duals, not paying for the switch (``Tracer.to_dual``). Not
    inside :func:`as_new_structure` (a first trace knows nothing)."""
    return not getattr(_local, "new", False) and key in _on_duals


def note_direct_phase(key: tuple, wasted: bool) -> None:
    """Record how the trace of ``key`` went: ``wasted``, its direct phase ended before
    any rule ran."""
    if wasted:
        _on_duals[key] = None
        _evict(_on_duals, 4 * _MAX_ENTRIES)
    else:
        _on_duals.pop(key, None)


def _evict(lru: OrderedDict, limit: int) -> None:
    """Drop the least recently used entries beyond ``limit``."""
    while len(lru) > limit:
        with suppress(KeyError):  # (another thread emptied it)
            lru.popitem(last=False)


def cache_get(key: tuple) -> Template | None:
    tpl = _cache.get(key)
    if tpl is not None:
        with suppress(KeyError):  # (another thread evicted it)
            _cache.move_to_end(key)
    return tpl


def cache_put(key: tuple, tpl: Template) -> None:
    stats["recorded"] += 1
    _cache[key] = tpl
    _evict(_cache, _MAX_ENTRIES)


def cache_clear() -> None:
    _cache.clear()
    _seen.clear()
    for k in stats:
        stats[k] = 0
