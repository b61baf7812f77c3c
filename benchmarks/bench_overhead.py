"""Per-application overhead on small (scalar-sized) problems, where Python dominates.

    python benchmarks/bench_overhead.py [--calls 20000] [--out FILE]

The forum example is four scalars. For such problems the cost of applying a
linearization is interpreter overhead, so this script compares, per call (median
of interleaved batches of calls, microseconds):

* the hand-written floor: the JVP formula with precomputed residuals, in PyTorch ops;
* ``jvp_fn(*t)`` from ``torch_linearize.linearize`` (same tensors);
* ``torch.func.jvp(f, primals, t)`` (re-runs f every call);
* ``jvp_fn`` of ``torch.func.linearize``;
* one bare ``torch.mul`` of two such tensors (the unit of work).

Workloads: the forum quadratic ``a x^2 + b x + c`` (four 0-d float64 tensors, plain
PyTorch and as a custom autograd.Function), and an 8-op elementwise chain on 16 float32
elements (folded into one multiply by linearize).

A second table times the setup on the same workloads: ``linearize`` (a structure seen
before, as in a Newton loop; and a structure's first linearization, passes and code
generation included) against one ``torch.func.jvp`` call. On problems this small both
are interpreter work, and ``linearize``'s tracer pays a Python round trip for every
operation forward AD dispatches (design.md, "What tracing costs").
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import torch_linearize as tl

try:  # run as a script (benchmarks/ on sys.path) or as ``python -m benchmarks.bench_overhead``
    from common import elementwise_chain, emit_report
except ImportError:  # pragma: no cover
    from benchmarks.common import elementwise_chain, emit_report


class Quadratic(torch.autograd.Function):
    """y = a x^2 + b x + c with a hand-written jvp (the forum's custom Function)."""

    @staticmethod
    def forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return a * x * x + b * x + c

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, a, b, _ = inputs
        ctx.save_for_forward(2 * a * x + b, x * x, x)

    @staticmethod
    def jvp(ctx: Any, dx, da, db, dc) -> torch.Tensor:
        d, x2, x = ctx.saved_tensors
        return d * dx + x2 * da + x * db + dc


def quadratic(x, a, b, c):
    return a * x**2 + b * x + c


def _workloads() -> list[tuple[str, Callable, tuple, Callable[[], Callable]]]:
    p = tuple(torch.tensor(v, dtype=torch.float64) for v in (2.0, 3.0, 4.0, 5.0))
    x = torch.linspace(-1, 1, 16)

    def quad_floor() -> Callable:
        xx, a, b, _ = p
        d, x2 = 2 * a * xx + b, xx * xx
        return lambda dx, da, db, dc: d * dx + x2 * da + xx * db + dc

    def chain_floor() -> Callable:
        r = torch.func.jvp(elementwise_chain, (x,), (torch.ones_like(x),))[1]
        return lambda t: t * r

    return [
        ("forum quadratic, 4 scalars (plain PyTorch)", quadratic, p, quad_floor),
        ("forum quadratic, 4 scalars (custom Function)", Quadratic.apply, p, quad_floor),
        ("elementwise chain, 8 ops, 16 elements", elementwise_chain, (x,), chain_floor),
    ]


def _tangents(primals: tuple) -> tuple:
    """One seeded random tangent per primal (the same for every workload run)."""
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)


def _methods(f, primals, t, floor, jvp_fn, func_lin) -> dict[str, Callable[[], Any]]:
    a, b = t[0], primals[0]
    return {
        "floor": lambda: floor(*t),
        "tl": lambda: jvp_fn(*t),
        "func.jvp": lambda: torch.func.jvp(f, primals, t),
        "func.linearize": lambda: func_lin(*t),
        "mul": lambda: torch.mul(a, b),
    }


def _time(fns: dict[str, Callable[[], Any]], calls: int, batch: int = 100) -> dict[str, float]:
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(calls // batch, 1)):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            per[k].append((time.perf_counter() - t0) / batch * 1e6)
    return {k: statistics.median(v) for k, v in per.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000, help="calls per method and workload")
    ap.add_argument("--setup-calls", type=int, default=1000,
                    help="linearize calls per method and workload for the setup table")
    ap.add_argument("--out", default="", help="also write the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lines = [
        f"Per-call time in microseconds (median over batches of 100 calls, methods interleaved), "
        f"torch {torch.__version__}, 1 thread.",
        "",
        "| workload | floor | linearize's jvp_fn | jvp_fn - floor | torch.func.jvp | "
        "torch.func.linearize's jvp_fn | bare mul | ops in jvp_fn |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, f, primals, make_floor in _workloads():
        t = _tangents(primals)
        _, jvp_fn = tl.linearize(f, *primals)
        _, func_lin = torch.func.linearize(f, *primals)
        floor = make_floor()
        ref = torch.func.jvp(f, primals, t)[1]
        for got in (jvp_fn(*t), floor(*t), func_lin(*t)):
            torch.testing.assert_close(got, ref)
        med = _time(_methods(f, primals, t, floor, jvp_fn, func_lin), args.calls)
        lines.append(
            f"| {name} | {med['floor']:.1f} | {med['tl']:.1f} | {med['tl'] - med['floor']:+.1f} | "
            f"{med['func.jvp']:.1f} | {med['func.linearize']:.1f} | {med['mul']:.1f} | "
            f"{jvp_fn.num_ops} |"
        )
    lines += [
        "",
        "Setup, microseconds per call (median over batches of 20 calls, methods interleaved), "
        "and the ratio to one torch.func.jvp call.",
        "",
        "| workload | torch.func.jvp | linearize (structure seen before) | ratio | "
        "linearize (new structure) | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    from torch_linearize._structure_cache import as_new_structure

    for name, f, primals, _ in _workloads():
        t = _tangents(primals)

        def new(f=f, primals=primals):
            with as_new_structure():
                return tl.linearize(f, *primals)

        for _ in range(3):
            tl.linearize(f, *primals)
        med = _time({"jvp": lambda f=f, primals=primals, t=t: torch.func.jvp(f, primals, t),
                     "seen": lambda f=f, primals=primals: tl.linearize(f, *primals),
                     "new": new}, args.setup_calls, batch=20)
        lines.append(f"| {name} | {med['jvp']:.0f} | {med['seen']:.0f} | "
                     f"{med['seen'] / med['jvp']:.2f}x | {med['new']:.0f} | "
                     f"{med['new'] / med['jvp']:.2f}x |")
    text = "\n".join(lines)
    emit_report(text, args.out, __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
