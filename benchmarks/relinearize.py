"""Re-linearizing at a new point (a Newton loop): ``linearize`` with and without reuse.

    python benchmarks/relinearize.py [--rounds 300] [--threads 2] [--out FILE]

A Newton or Gauss-Newton iteration linearizes the same function at a new point every
step. From the function's third linearization at the same shapes on (the second
records), ``linearize`` reuses its simplified program and generated code after re-checking the recorded decisions on the new values
(``torch_linearize/_structure_cache.py``); only the trace runs again. Interleaved
rounds time, each at a fresh point:

* ``linearize``, structure reused (what every Newton step after the second pays);
* ``linearize`` as a structure's first linearization (``as_new_structure()``: the
  passes and code generation run, nothing is reused or recorded);
* one ``torch.func.jvp`` call at the same point (the yardstick).

Workloads: the forum quadratic ``a x^2 + b x + c`` on four 0-d float64 tensors; the
8-op elementwise chain on 16 elements; bench_core's 2-D PDE residual at 64x64 and
512x512; bench_core's MLP; the PDE at 128x128 with its cubic term as a custom
``autograd.Function`` (reused with the new trace's ctx). Medians in microseconds.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_core
from common import elementwise_chain, emit_report, interleave, markdown_table

import torch_linearize as tl
from torch_linearize._structure_cache import as_new_structure, stats


def _quadratic(x, a, b, c):
    return a * x**2 + b * x + c


class _Cube(torch.autograd.Function):
    """u**3 as a custom Function (its jvp reads the ctx the trace saved)."""

    @staticmethod
    def forward(u: torch.Tensor) -> torch.Tensor:
        return u**3

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        d = 3 * inputs[0] ** 2
        ctx.save_for_forward(d)
        ctx.save_for_backward(d)

    @staticmethod
    def jvp(ctx, t: torch.Tensor) -> torch.Tensor:
        return t * ctx.saved_tensors[0]

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g * ctx.saved_tensors[0]


def _pde_custom(u: torch.Tensor) -> torch.Tensor:
    """bench_core's PDE residual with its cubic term as a custom Function."""
    c = u[1:-1, 1:-1]
    return bench_core._lap(u) - _Cube.apply(c) + 0.1 * torch.tanh(c)


def _workloads() -> list[tuple[str, Callable, list[tuple[torch.Tensor, ...]]]]:
    g = torch.Generator().manual_seed(0)
    n_points = 16

    def points(make: Callable[[], tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
        return [make() for _ in range(n_points)]

    d = torch.float64
    small_pde = bench_core.make_pde()
    big_pde, mlp = bench_core.make_pde(), bench_core.make_mlp()
    return [
        ("forum quadratic, 4 scalars", _quadratic,
         points(lambda: tuple(torch.randn((), dtype=d, generator=g) for _ in range(4)))),
        ("elementwise chain, 16 elements", elementwise_chain,
         points(lambda: (torch.randn(16, generator=g),))),
        ("PDE residual, 64x64", small_pde.f, points(lambda: (torch.randn(64, 64, generator=g),))),
        ("PDE residual, 512x512", big_pde.f,
         points(lambda: (torch.randn(512, 512, generator=g),))),
        ("MLP 4x tanh, 256x512", mlp.f, points(lambda: (torch.randn(256, 512, generator=g),))),
        ("PDE with a custom Function, 128x128", _pde_custom,
         points(lambda: (torch.randn(128, 128, generator=g),))),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="", help="also write the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, f, pts in _workloads():
        tangents = [tuple(torch.randn_like(p) for p in pt) for pt in pts]

        def new_structure(i: int, f=f, pts=pts) -> object:
            with as_new_structure():
                return tl.linearize(f, *pts[i % len(pts)])

        for pt in pts[:2]:  # the structure's first and second (recording) linearizations
            tl.linearize(f, *pt)
        hits0 = stats["hits"]
        samples = interleave({
            "reused": lambda i, f=f, pts=pts: tl.linearize(f, *pts[i % len(pts)]),
            "new": new_structure,
            "jvp": lambda i, f=f, pts=pts, ts=tangents: torch.func.jvp(f, pts[i % len(pts)], ts[i % len(pts)]),
        }, args.rounds, warmup=10)
        hits = stats["hits"] - hits0
        med = {k: s.median * 1e3 for k, s in samples.items()}  # (ms -> µs)
        rows.append([name, f"{med['jvp']:.0f}", f"{med['new']:.0f}",
                     f"{med['new'] / med['jvp']:.2f}x", f"{med['reused']:.0f}",
                     f"{med['reused'] / med['jvp']:.2f}x", f"{med['reused'] / med['new']:.2f}x",
                     f"{hits} / {args.rounds + 10}"])
    headers = ["workload", "torch.func.jvp µs", "linearize, new structure µs", "/ jvp",
               "linearize, reused µs", "/ jvp", "reused / new", "reuses / calls"]
    text = "\n".join([
        f"Re-linearizing at a new point every call: torch {torch.__version__}, "
        f"{os.cpu_count()} logical CPUs, torch.set_num_threads({args.threads}), "
        f"{args.rounds} interleaved rounds (+10 warm-up), medians.",
        "",
        markdown_table(headers, rows),
        "",
        "`reuses / calls`: the reused-structure calls that replayed the recorded program "
        "(the rest ran the passes because a recorded decision came out differently at that "
        "point).",
    ])
    emit_report(text, args.out, __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
