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
A row beside them traces a new structure without folding scaling chains while tracing
(``_trace.FOLD_CHAINS = False``: the tracer before stop 18, every residual of a chain
held until the passes run). On the custom-Function workload, another traces a new
structure with the Function's ``forward`` and ``setup_context`` run under the dispatch
mode (``_trace.PRIMAL_CODE_OUTSIDE = False``: the tracer before stop 19; since then they
run outside it, see ``Tracer.outside``).

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
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_core
from common import MALLOC_HELP, choose_malloc, count_kernels, emit_report, interleave

import torch_linearize as tl
import torch_linearize._api as _api
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
        "the same, scaling chains not folded while tracing": new_structure_without("FOLD_CHAINS"),
        **({"the same, the Function's forward run under the dispatch mode":
            new_structure_without("PRIMAL_CODE_OUTSIDE")} if custom else {}),
        "linearize, structure reused": lambda: tl.linearize(f, x),
        **({"bound: a rule-table tracer (no forward AD)": rule_bound} if rule_bound else {}),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--malloc", choices=("pinned", "default"), default="default",
                    help=MALLOC_HELP)
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
    for make in (bench_core.make_mlp, bench_core.make_elementwise, bench_core.make_pde,
                 bench_core.make_custom):
        w = make()
        methods = _methods(w.f, w.x, custom=make is bench_core.make_custom)
        samples = interleave({k: (lambda i, fn=fn: fn()) for k, fn in methods.items()},
                             args.rounds, warmup=20)
        med = {k: s.median for k, s in samples.items()}
        ref = med["torch.func.jvp"]
        name = make.__name__.removeprefix("make_")
        for k, v in med.items():
            kernels = sum(count_kernels(methods[k]).values())
            lines.append(f"| {name} | {k} | {v:.3g} | {v / ref:.2f}x | {kernels} |")
    text = "\n".join(lines)
    emit_report(text, args.out, __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
