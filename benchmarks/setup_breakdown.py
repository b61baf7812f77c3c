"""Where ``linearize``'s setup time goes, next to one ``torch.func.jvp`` call.

    python benchmarks/setup_breakdown.py [--malloc pinned|default] [--rounds 150] [--out FILE]

For each bench_core workload, interleaved rounds time: the primal ``f(x)``; one
``torch.func.jvp``; eager forward AD (make_dual + f + unpack_dual); the same under a
pass-through ``TorchDispatchMode`` (the price of any Python dispatch mode), and under one
that keeps every result alive until the trace ends (the price of the working set a
trace holds: its residuals); ``linearize``
with the simplification passes switched off; ``linearize`` as its structure's first
linearization (passes and code generation run); and ``linearize`` of a structure seen
before (the simplified program reused: ``_structure_cache``). The differences between
consecutive rows are: the dispatch-mode price, our tracing, our passes, what reuse saves.
A row beside them traces a new structure on forward-AD duals from its first operation
(``_trace.DIRECT = False``: the tracer before stop 26, without the direct phase and its
rule table), another without folding scaling chains while tracing
(``_trace.FOLD_CHAINS = False``: the tracer before stop 18, every residual of a chain
held until the passes run). On the custom-Function workload, another traces a new
structure with the Function's ``forward`` and ``setup_context`` run under the dispatch
mode (``_trace.PRIMAL_CODE_OUTSIDE = False``: the tracer before stop 19; since then they
run outside it, see ``Tracer.outside``). The *custom, constant input* workload applies
the same Function to a tensor without a tangent, ``x * NewtonCubic(c)``: forward AD calls
no ``jvp`` there, and its ``forward`` has run outside the mode since stop 20 (the same
row switches that off).

One more row bounds a different tracer, one that would not run forward AD at all (JAX's
design: a table of tangent rules, forward AD only for operations without a rule): ``f``
on plain tensors under a dispatch mode that records one equation per operation with a
tracked input and spends one more evaluation of that operation as the stand-in for
computing its derivative coefficients. It runs none of forward AD's tangent operations or
size queries. That stand-in is more than a linear operation needs, but less than a
transcendental one does: its coefficient takes one to four kernels (``erf``:
``exp(-x**2) * 2/sqrt(pi)``) and folding a chain one product per step, about the
kernels forward AD runs. On the elementwise chain the bound is optimistic (compare the
*kernels* column); on the MLP and the PDE, made of linear operations and products, it
is not.
Medians in ms; *kernels*: the aten operations that touch data in one call of the step
(``common.count_kernels``: views and metadata queries left out), counted once, untimed.

A second table splits a structure's first linearization into its stages: the stage
functions are wrapped with a timer while ``--stage-calls`` first linearizations run back
to back (after warm-up; the garbage collector off), and each stage's time per
linearization is a median over them
(the passes, ``_api._run_passes``, shown with their parts: the identity/CSE walks, the
folds, and inside the folds the regions' coefficients). *trace and the rest* is the
whole call less its timed stages: tracing ``f`` under forward AD and the dispatch mode,
and the bookkeeping around it. The wrappers add about a microsecond per call. Each
timed linearization alternates with one right after ``gc.collect()`` (its total only):
a cold call, whose Python runs slower for the caches the collector evicted, as the
first call of every interleaved round of the table above and of ``bench_core.py`` does.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_core
from common import MALLOC_HELP, choose_malloc, count_kernels, emit_report, interleave

import torch_linearize as tl
import torch_linearize._api as _api
import torch_linearize._passes as _passes
import torch_linearize._trace as trace
from torch_linearize._structure_cache import as_new_structure


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Keeping(TorchDispatchMode):
    """Pass-through, keeping every result alive until the trace ends (as a map's
    unsimplified program keeps its residuals): the price of the larger working set."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.kept.append(out)
        return out


class _RuleBound(TorchDispatchMode):
    """The rule-table tracer's bound (see the module docstring)."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.tracked = {id(x)}
        self.keep: list = [x]
        self.eqns: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tracked = self.tracked
        ins = [a for a in args if isinstance(a, torch.Tensor) and id(a) in tracked]
        if ins and isinstance(out, torch.Tensor):
            res = [a for a in args if isinstance(a, torch.Tensor) and id(a) not in tracked]
            if not func.is_view:
                res.append(func(*args, **kwargs))  # (the derivative coefficients' stand-in)
            self.eqns.append((func, [id(a) for a in ins], res, out.shape, out.dtype))
            tracked.add(id(out))
            self.keep.append(out)
        return out


def make_custom_constant() -> bench_core.Workload:
    """bench_core's custom workload with its Function applied to a tangent-free tensor:
    ``x * NewtonCubic(c)``, ``c`` a constant (forward AD calls no jvp)."""
    w = bench_core.make_custom()
    c = w.x.clone() / 2

    def f(x: torch.Tensor) -> torch.Tensor:
        return x * bench_core.NewtonCubic.apply(c, 16)

    w.f = f
    return w


def _methods(f: Callable, x: torch.Tensor, custom: bool) -> dict[str, Callable[[], object]]:
    t = torch.randn_like(x)

    def eager() -> None:
        with fwAD.dual_level():
            fwAD.unpack_dual(f(fwAD.make_dual(x, torch.ones_like(x))))

    def eager_mode() -> None:
        with fwAD.dual_level(), _PassThrough():
            fwAD.unpack_dual(f(fwAD.make_dual(x, torch.ones_like(x))))

    def eager_mode_keeping() -> None:
        with fwAD.dual_level(), _Keeping():
            fwAD.unpack_dual(f(fwAD.make_dual(x, torch.ones_like(x))))

    def no_passes() -> None:
        simplify = _api.simplify
        _api.simplify = lambda prog: None
        try:
            with as_new_structure():  # (neither reuses nor records a program)
                tl.linearize(f, x)
        finally:
            _api.simplify = simplify

    def new_structure() -> None:
        with as_new_structure():
            tl.linearize(f, x)

    def new_structure_without(flag: str) -> Callable[[], None]:
        """``new_structure`` with the tracer switch ``_trace.<flag>`` off (the old tracer)."""

        def run() -> None:
            setattr(trace, flag, False)
            try:
                new_structure()
            finally:
                setattr(trace, flag, True)

        return run

    def rule_bound() -> None:
        with _RuleBound(x):
            f(x)

    if custom:  # (the Function's forward is opaque to any tracer: no bound to draw)
        rule_bound = None  # type: ignore[assignment]

    return {
        "primal f(x)": lambda: f(x),
        "torch.func.jvp": lambda: torch.func.jvp(f, (x,), (t,)),
        "eager forward AD": eager,
        "eager forward AD + pass-through dispatch mode": eager_mode,
        "the same, keeping every result alive": eager_mode_keeping,
        "linearize without simplification passes": no_passes,
        "linearize, new structure": new_structure,
        "the same, traced on forward-AD duals from the start": new_structure_without("DIRECT"),
        "the same, scaling chains not folded while tracing": new_structure_without("FOLD_CHAINS"),
        **({"the same, the Function's forward run under the dispatch mode":
            new_structure_without("PRIMAL_CODE_OUTSIDE")} if custom else {}),
        "linearize, structure reused": lambda: tl.linearize(f, x),
        **({"bound: a rule-table tracer (no forward AD)": rule_bound} if rule_bound else {}),
    }


# (module, function name, label): the stages of a first linearization, outermost first;
# labels starting with two spaces are parts of the passes
STAGES = [
    (_api, "dead_code_elimination", "dead-code elimination before the passes"),
    (_api, "_run_passes", "simplification passes"),
    (_passes, "_rewrite_walk", "  identity and common-subexpression walks"),
    (_passes, "fold_pointwise", "  pointwise folds"),
    (_passes, "_region_coefficients", "    of which the regions' coefficients"),
    (_api, "program_factory", "code generation"),
]


@contextmanager
def _stage_timer(spent: dict[str, float]):
    """Wrap the STAGES functions; each call adds its seconds to ``spent[label]``."""
    saved = []
    for mod, name, label in STAGES:
        fn = getattr(mod, name)
        saved.append((mod, name, fn))

        def timed(*a, _fn=fn, _label=label, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - t0

        setattr(mod, name, timed)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def stage_rows(name: str, f: Callable, x: torch.Tensor, calls: int, jvp_ms: float) -> list[str]:
    """Rows of the stages table for one workload: median ms per first linearization."""
    per_call: dict[str, list[float]] = {}
    totals: list[float] = []
    cold: list[float] = []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(calls + 10):
            spent: dict[str, float] = {}
            with _stage_timer(spent), as_new_structure():
                t0 = time.perf_counter()
                tl.linearize(f, x)
                total = time.perf_counter() - t0
            gc.collect()  # a cold call: the first after a collection (stages not split)
            with as_new_structure():
                t0 = time.perf_counter()
                tl.linearize(f, x)
                cold_total = time.perf_counter() - t0
            if i < 10:  # (warm-up)
                continue
            cold.append(cold_total)
            totals.append(total)
            top = sum(v for k, v in spent.items() if not k.startswith(" "))
            spent["trace and the rest"] = total - top
            for label, v in spent.items():
                per_call.setdefault(label, []).append(v)
    finally:
        if was_enabled:
            gc.enable()
    rows = []
    order = ["trace and the rest"] + [label for _, _, label in STAGES]
    for label in order:
        if label not in per_call:
            continue
        ms = statistics.median(per_call[label]) * 1e3
        rows.append(f"| {name} | {label} | {ms:.3g} | {ms / jvp_ms:.2f}x |")
    ms = statistics.median(totals) * 1e3
    rows.append(f"| {name} | **the whole first linearization** | {ms:.3g} | {ms / jvp_ms:.2f}x |")
    ms = statistics.median(cold) * 1e3
    rows.append(f"| {name} | the same, right after a garbage collection | {ms:.3g} | "
                f"{ms / jvp_ms:.2f}x |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--malloc", choices=("pinned", "default"), default="default",
                    help=MALLOC_HELP)
    ap.add_argument("--stage-calls", type=int, default=200,
                    help="first linearizations timed per workload for the stages table")
    ap.add_argument("--out", default="", help="also write the table to this file")
    args = ap.parse_args(argv)
    malloc = choose_malloc(args.malloc)
    torch.set_num_threads(2)
    lines = [
        f"Setup breakdown: torch {torch.__version__}, {os.cpu_count()} logical CPUs, "
        f"{args.rounds} rounds after 20 warm-up rounds, methods in a shuffled order each round "
        "(common.interleave: garbage collected between rounds, off while timing), medians in ms; "
        f"allocator: {malloc}.",
        "",
        "| workload | step | ms | / torch.func.jvp | kernels |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    stages = [
        "",
        f"A structure's first linearization by stage ({args.stage_calls} linearizations per "
        "workload, back to back after 10 warm-up ones, garbage collector off; median ms "
        "per linearization; ratios to "
        "the table's torch.func.jvp median):",
        "",
        "| workload | stage | ms | / torch.func.jvp |",
        "| --- | --- | ---: | ---: |",
    ]
    for make in (bench_core.make_mlp, bench_core.make_elementwise, bench_core.make_pde,
                 bench_core.make_custom, make_custom_constant):
        w = make()
        methods = _methods(w.f, w.x, custom=make in (bench_core.make_custom, make_custom_constant))
        samples = interleave({k: (lambda i, fn=fn: fn()) for k, fn in methods.items()},
                             args.rounds, warmup=20)
        med = {k: s.median for k, s in samples.items()}
        ref = med["torch.func.jvp"]
        name = make.__name__.removeprefix("make_").replace("_", ", ").replace(
            "constant", "constant input")
        for k, v in med.items():
            kernels = sum(count_kernels(methods[k]).values())
            lines.append(f"| {name} | {k} | {v:.3g} | {v / ref:.2f}x | {kernels} |")
        if args.stage_calls > 0:
            stages.extend(stage_rows(name, w.f, w.x, args.stage_calls, ref))
    text = "\n".join(lines + (stages if args.stage_calls > 0 else []))
    emit_report(text, args.out, __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
