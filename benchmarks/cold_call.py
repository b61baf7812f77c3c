"""What one application costs over the hand-written formula when the caches are cold.

Usage::

    python benchmarks/cold_call.py [--rounds 300] [--only custom,elementwise] [--out FILE]

``bench_core.py`` interleaves heavy methods, so the first call of each round finds the
interpreter's and PyTorch's binding code evicted from the caches; so does a Krylov
solver's application between orthogonalizations. Here every timed call comes right after
the workload's primal ``f(x)`` (which evicts them), and each row is the median over rounds
of the *paired* difference ``time(row) - time(floor)`` within one round, in microseconds:
the cost of the layers around the kernels, which on these 1e6-element workloads are the
floor's own. The floor's formula on the map's own residual tensor (equal values, another
buffer) shows how much of a difference is where the two residual buffers live. Rows for
the custom Function peel the layers: the user's ``jvp`` called
directly on the saved ctx, the opaque node, the map. With ``--anatomy``, more custom rows
replicate the lean path's steps one at a time on top of a bare call of the user's
``jvp`` (two frames, as the map has): each of the checks an application makes (the
tangent's shape, dtype, device, ``requires_grad``; functorch and forward AD; the
result's shape and strides), added alone. They show what each costs cold (one C entry
point of PyTorch's bindings each, mostly); the map runs them all.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_core
from common import emit_report, markdown_table, pin_malloc

import torch_linearize as tl


def _anatomy(node: Any, jvp: Callable, ctx: object) -> dict[str, Callable]:
    """A bare call of the user's ``jvp`` (two frames deep, as in the map), then the same
    with one of the lean path's checks added, each alone (see the module docstring)."""
    import torch.autograd.forward_ad as fwAD

    functorch = torch._C._are_functorch_transforms_active
    shape, dtype, stride = node._lean[2], node._lean[3], node._lean[4]

    def bare(t):
        return jvp(ctx, t, None)

    def before(check: Callable[[torch.Tensor], bool]) -> Callable:
        def call(t):
            if check(t):
                raise AssertionError
            return jvp(ctx, t, None)
        return call

    def after(check: Callable[[torch.Tensor], bool]) -> Callable:
        def call(t):
            o = jvp(ctx, t, None)
            if check(o):
                raise AssertionError
            return o
        return call

    return {
        "anatomy: user's jvp, two frames deep": lambda t: bare(t),
        "anatomy: + the tangent's shape": before(lambda t: t.shape != shape),
        "anatomy: + the tangent's dtype": before(lambda t: t.dtype is not dtype),
        "anatomy: + the tangent's device (is_cpu)": before(lambda t: not t.is_cpu),
        "anatomy: + requires_grad": before(lambda t: t.requires_grad),
        "anatomy: + functorch transforms active": before(lambda t: functorch()),
        "anatomy: + forward-AD level": before(lambda t: fwAD._current_level >= 0),
        "anatomy: + the result's shape": after(lambda o: o.shape != shape),
        "anatomy: + the result's strides": after(lambda o: o.stride() != stride),
        "anatomy: + the result's is_contiguous()": after(lambda o: not o.is_contiguous()),
    }


def _methods(name: str, anatomy: bool = False
             ) -> tuple[Callable[[], object], dict[str, Callable], torch.Size]:
    w = bench_core.WORKLOADS[name]()
    _, jvp_fn = tl.linearize(w.f, w.x)
    r = w.floor_setup()
    methods: dict[str, Callable] = {
        "floor (hand-written formula)": lambda t: w.floor_apply(r, t),
        "floor, timed again (null control)": lambda t: w.floor_apply(r, t),
    }
    if w.own_residual is not None:
        own = w.own_residual(jvp_fn)
        methods["floor's formula on the map's residual buffer"] = lambda t: w.floor_apply(own, t)
    if name == "custom":
        node = jvp_fn._opaque_nodes[0]
        ctx, jvp = node.ctx, bench_core.NewtonCubic.jvp
        methods["the user's jvp on the saved ctx"] = lambda t: jvp(ctx, t, None)
        methods["the opaque node"] = lambda t: node(t, None)
        if anatomy:
            methods.update(_anatomy(node, jvp, ctx))
    methods["jvp_fn(t)"] = jvp_fn
    return (lambda: w.f(w.x)), methods, w.x.shape


def measure(name: str, rounds: int, anatomy: bool = False) -> list[list[str]]:
    primal, methods, shape = _methods(name, anatomy)
    g = torch.Generator().manual_seed(0)
    tangents = [torch.randn(shape, generator=g) for _ in range(4)]
    diffs: dict[str, list[float]] = {k: [] for k in methods}
    absolute: list[float] = []
    rng = random.Random(0)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(rounds):
            order = list(methods)
            rng.shuffle(order)
            row = {}
            for k in order:
                primal()
                t = tangents[i % 4]
                t0 = time.perf_counter()
                out = methods[k](t)
                row[k] = time.perf_counter() - t0
                del out
            floor = row["floor (hand-written formula)"]
            absolute.append(floor)
            for k in methods:
                diffs[k].append((row[k] - floor) * 1e6)
    finally:
        if enabled:
            gc.enable()
    rows = [[name, "floor (absolute)", f"{statistics.median(absolute) * 1e6:.0f}"]]
    for k, d in diffs.items():
        if k.startswith("floor (hand"):
            continue
        q = statistics.quantiles(d, n=4)
        rows.append([name, k, f"{statistics.median(d):+.1f} [{q[0]:+.0f} .. {q[2]:+.0f}]"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="custom,elementwise",
                    help="comma-separated bench_core workloads")
    ap.add_argument("--anatomy", action="store_true",
                    help="custom: also time replicas of the lean path's check groups")
    ap.add_argument("--out", default="", help="also write the report to this file")
    args = ap.parse_args(argv)
    malloc = pin_malloc()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.only.split(","):
        rows += measure(name, args.rounds, args.anatomy)
    text = "\n".join([
        f"Cold-call overhead: torch {torch.__version__}, {platform.machine()} with "
        f"{os.cpu_count()} logical CPUs, torch.set_num_threads({args.threads}), {args.rounds} "
        f"rounds, each call right after the primal f(x); allocator: {malloc}.",
        "",
        "Median over rounds of time(row) - time(floor) in the same round, in us "
        "[quartiles]; the floor's own median in us.",
        "",
        markdown_table(["workload", "call", "us over the floor"], rows),
    ])
    emit_report(text, args.out, __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
