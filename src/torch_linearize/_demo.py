"""``python -m torch_linearize demo``: the forum example side by side, then a timing table.

Part 1 replays the PyTorch-forum question "Is there any way to compute multiple
jvps without repeatedly computing function value?": a custom
``autograd.Function`` (``.item()`` calls included) is pushed through K = 5
tangents with each approach, counting how often ``forward``, ``setup_context``
and ``jvp`` run, and the results are checked against the analytic derivative.

Part 2 times K sequential tangents (default 32) through ``torch.func.jvp`` and
through ``linearize`` on a few workloads, interleaving the two and reporting
medians measured in this run.
"""

from __future__ import annotations

import argparse
import collections
import gc
import math
import os
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from ._api import linearize

__all__ = ["add_parser", "forum_call_counts", "main", "run_demo", "time_workloads"]

CALLS: collections.Counter = collections.Counter()


# --------------------------------------------------------------------------- part 1: forum
class ForumTest(torch.autograd.Function):
    """The forum's ``Test`` Function, counting calls instead of printing.

    ``y = a x^2 + b x + c``; ``setup_context`` and ``jvp`` read scalars with ``.item()``
    (standing in for a hand-written kernel that needs raw values).
    """

    @staticmethod
    def forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        CALLS["forward"] += 1
        return a * x**2 + b * x + c

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        CALLS["setup_context"] += 1
        x, a, b, _ = inputs
        ctx.saved_vars = (x.item(), a.item(), b.item())

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        CALLS["backward"] += 1
        x, a, b = ctx.saved_vars
        g = grad_y.item()
        grads = ((2 * a * x + b) * g, x**2 * g, x * g, g)
        return tuple(torch.tensor(v, dtype=torch.float32) for v in grads)

    @staticmethod
    def jvp(ctx: Any, dx: torch.Tensor, da: torch.Tensor, db: torch.Tensor,
            dc: torch.Tensor) -> torch.Tensor:
        CALLS["jvp"] += 1
        x, a, b = ctx.saved_vars
        d = (2 * a * x + b) * dx.item() + x**2 * da.item() + x * db.item() + dc.item()
        return torch.tensor(d, dtype=torch.float32)


class ForumTestTensorOps(torch.autograd.Function):
    """The same maths as :class:`ForumTest` with tensor ops only (no ``.item()``).

    Used only if ``torch.func.jvp`` rejects :class:`ForumTest` on this PyTorch version.
    """

    @staticmethod
    def forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        CALLS["forward"] += 1
        return a * x**2 + b * x + c

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        CALLS["setup_context"] += 1
        x, a, b, _ = inputs
        ctx.save_for_forward(x, a, b)

    @staticmethod
    def jvp(ctx: Any, dx: torch.Tensor, da: torch.Tensor, db: torch.Tensor,
            dc: torch.Tensor) -> torch.Tensor:
        CALLS["jvp"] += 1
        x, a, b = ctx.saved_tensors
        return (2 * a * x + b) * dx + x**2 * da + x * db + dc


def _forum_primals() -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(v, dtype=torch.float32) for v in (2.0, 3.0, 4.0, 5.0))


def _analytic(p: Sequence[float], t: Sequence[float]) -> float:
    x, a, b, _ = p
    dx, da, db, dc = t
    return (2 * a * x + b) * dx + x**2 * da + x * db + dc


@dataclass
class CountRow:
    """Call counts and results of one approach on the forum example."""

    method: str
    counts: collections.Counter
    results: list[float] | None
    error: str | None = None
    note: str = ""


def _short(e: BaseException, limit: int = 72) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _count(method: str, body: Callable[[], list[float]], note: str = "") -> CountRow:
    CALLS.clear()
    try:
        results = body()
        return CountRow(method, collections.Counter(CALLS), results, note=note)
    except Exception as e:
        return CountRow(method, collections.Counter(CALLS), None, _short(e, 300), note)


def forum_call_counts(k: int = 5, seed: int = 0) -> tuple[list[CountRow], torch.Tensor]:
    """Push ``k`` tangents through the forum Function with each approach; count the calls.

    Args:
        k: number of tangents (the forum used 5).
        seed: seed for the random tangents.

    Returns:
        ``(rows, tangents)``: one :class:`CountRow` per approach (torch.func.jvp,
        eager forward_ad, torch.func.linearize, torch_linearize.linearize, plus a
        tensor-op variant for torch.func.jvp if the original fails there), and the
        ``(k, 4)`` tangents used.
    """
    primals = _forum_primals()
    tangents = torch.randn(k, 4, generator=torch.Generator().manual_seed(seed))

    def func_jvp(fn: type[torch.autograd.Function]) -> Callable[[], list[float]]:
        def body() -> list[float]:
            return [torch.func.jvp(fn.apply, primals, tuple(t))[1].item() for t in tangents]
        return body

    def forward_ad() -> list[float]:
        out = []
        for t in tangents:
            with fwAD.dual_level():
                y = ForumTest.apply(*(fwAD.make_dual(p, d) for p, d in zip(primals, t)))
                out.append(fwAD.unpack_dual(y).tangent.item())
        return out

    def func_linearize() -> list[float]:
        _, jvp_fn = torch.func.linearize(ForumTest.apply, *primals)
        return [jvp_fn(*t).item() for t in tangents]

    def tl_linearize() -> list[float]:
        _, jvp_fn = linearize(ForumTest.apply, *primals)
        return [jvp_fn(*t).item() for t in tangents]

    rows = [_count(f"torch.func.jvp, {k} calls", func_jvp(ForumTest),
                   "re-runs forward for every tangent")]
    if rows[0].error is not None:
        rows.append(_count(f"torch.func.jvp, {k} calls (tensor-op variant*)",
                           func_jvp(ForumTestTensorOps), "same maths without .item()"))
    rows += [
        _count(f"torch.autograd.forward_ad, {k} calls", forward_ad,
               "re-runs forward for every tangent"),
        _count(f"torch.func.linearize + {k} applies", func_linearize,
               "traces f with make_fx"),
        _count(f"torch_linearize.linearize + {k} applies", tl_linearize,
               "forward once, jvp per tangent"),
    ]
    return rows, tangents


# --------------------------------------------------------------------------- part 2: timing
class NewtonCubic(torch.autograd.Function):
    """Elementwise y with y^3 + y = x by Newton's method: expensive forward, jvp = 1 multiply."""

    @staticmethod
    def forward(x: torch.Tensor, iters: int) -> torch.Tensor:
        y = x / 2
        for _ in range(iters):
            y = y - (y * y * y + y - x) / (3 * y * y + 1)
        return y

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_forward(1 / (3 * output * output + 1))

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor, _: Any) -> torch.Tensor:
        (d,) = ctx.saved_tensors
        return t * d


@dataclass
class Workload:
    """A function and the point to linearize it at."""

    name: str
    f: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor


def default_workloads() -> list[Workload]:
    """Elementwise transcendental chain, MLP and an expensive custom Function (CPU, float32)."""
    g = torch.Generator().manual_seed(0)

    def chain(x: torch.Tensor) -> torch.Tensor:
        x = torch.sin(x)
        x = torch.exp(x)
        x = torch.tanh(x)
        x = torch.cos(x)
        x = torch.sigmoid(x)
        x = torch.log1p(x)
        x = torch.erf(x)
        return torch.atan(x)

    n = 512
    Ws = [torch.randn(n, n, generator=g) / math.sqrt(n) for _ in range(4)]
    bs = [0.1 * torch.randn(n, generator=g) for _ in range(4)]

    def mlp(x: torch.Tensor) -> torch.Tensor:
        for W, b in zip(Ws, bs):
            x = torch.tanh(F.linear(x, W, b))
        return x

    def newton(x: torch.Tensor) -> torch.Tensor:
        return NewtonCubic.apply(x, 16)

    return [
        Workload("elementwise chain, 8 ops, 1e6", chain, torch.randn(1_000_000, generator=g)),
        Workload("MLP 4 x tanh, 256x512", mlp, torch.randn(256, n, generator=g)),
        Workload("custom Function, 16 Newton steps, 1e6", newton,
                 3 * torch.randn(1_000_000, generator=g)),
    ]


@dataclass
class TimingRow:
    """Medians (ms) for one workload: K tangents through each approach."""

    name: str
    primal: float
    func_jvp_total: float
    lin_total: float
    lin_setup: float
    lin_apply: float
    max_abs_diff: float
    error: str | None = None


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _run_func_jvp(f: Callable, x: torch.Tensor, tangents: list[torch.Tensor], k: int) -> None:
    for i in range(k):
        torch.func.jvp(f, (x,), (tangents[i % len(tangents)],))


def _run_linearize(f: Callable, x: torch.Tensor, tangents: list[torch.Tensor],
                   k: int) -> tuple[float, float]:
    """One linearize + k applications; returns (setup ms, ms per application)."""
    t0 = time.perf_counter()
    _, jvp_fn = linearize(f, x)
    setup = _ms(t0)
    t1 = time.perf_counter()
    for i in range(k):
        jvp_fn(tangents[i % len(tangents)])
    return setup, _ms(t1) / k


def time_workloads(workloads: Sequence[Workload], k: int = 32, repeats: int = 5) -> list[TimingRow]:
    """Time ``k`` sequential tangents through ``torch.func.jvp`` and through ``linearize``.

    For each workload the two approaches run alternately (which goes first alternates
    too), ``repeats`` times after one unrecorded warm-up; each figure is a median.
    ``linearize``'s total includes the ``linearize`` call itself.
    """
    rows = []
    for wl in workloads:
        f, x = wl.f, wl.x
        g = torch.Generator().manual_seed(1)
        tangents = [torch.randn(x.shape, generator=g) for _ in range(min(k, 4))]
        try:
            ref = torch.func.jvp(f, (x,), (tangents[0],))[1]
            _, jvp_fn = linearize(f, x)
            diff = (jvp_fn(tangents[0]) - ref).abs().max().item()
            del jvp_fn
        except Exception as e:
            rows.append(TimingRow(wl.name, *([math.nan] * 6), error=_short(e)))
            continue

        samples: dict[str, list[float]] = collections.defaultdict(list)
        for r in range(repeats + 1):
            gc.collect()
            order = ["jvp", "lin", "primal"] if r % 2 else ["lin", "jvp", "primal"]
            for which in order:
                t0 = time.perf_counter()
                if which == "jvp":
                    _run_func_jvp(f, x, tangents, k)
                elif which == "lin":
                    setup, apply = _run_linearize(f, x, tangents, k)
                else:
                    f(x)
                total = _ms(t0)
                if r == 0:
                    continue  # warm-up
                samples[which].append(total)
                if which == "lin":
                    samples["setup"].append(setup)
                    samples["apply"].append(apply)
        med = {key: statistics.median(v) for key, v in samples.items()}
        rows.append(TimingRow(wl.name, med["primal"], med["jvp"], med["lin"], med["setup"],
                              med["apply"], diff))
    return rows


# --------------------------------------------------------------------------- output
def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """Plain-text table; ``align`` has one letter per column, ``l`` or ``r`` (default: ``lrr...r``)."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if align[i] == "l" else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return 0.0


def _fmt(v: float) -> str:
    if v != v:
        return "n/a"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def run_demo(k: int = 32, repeats: int = 5, print_fn: Callable[[str], None] = print) -> bool:
    """Run both parts of the demo, printing as it goes.

    Args:
        k: tangents per timing run in part 2.
        repeats: timed repetitions per workload in part 2 (medians are reported).
        print_fn: where output lines go.

    Returns:
        True if every check passed (linearize's call counts are 1 / 1 / K and its
        results match the analytic derivative and torch.func.jvp).
    """
    ok = True
    k_forum = 5

    def note(text: str) -> None:
        print_fn(textwrap.fill(text, width=100, initial_indent="   ", subsequent_indent="   "))

    print_fn(f"torch_linearize demo  (torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, float32, CPU)")
    load = _loadavg()
    if load > 0.75 * (os.cpu_count() or 1):
        print_fn(f"(the 1-minute load average is {load:.1f} on {os.cpu_count()} CPUs: other "
                 "processes are busy, so the timings in part 2 will be noisy)")
    print_fn("")
    print_fn("1. The forum example: y = Test.apply(x, a, b, c) = a*x^2 + b*x + c at "
             "x=2, a=3, b=4, c=5,")
    print_fn(f"   {k_forum} random tangents (dx, da, db, dc), the same as in the thread's reply "
             "(seed 0).")
    print_fn("   Test reads scalars with .item() in setup_context and in jvp.")
    print_fn("")
    rows, tangents = forum_call_counts(k_forum)
    failed = [r for r in rows if r.error]
    print_fn(_table(
        ["approach", "forward", "setup_context", "jvp", "outcome"],
        [[r.method, str(r.counts["forward"]), str(r.counts["setup_context"]),
          str(r.counts["jvp"]), f"fails [{failed.index(r) + 1}]" if r.error else r.note]
         for r in rows],
        align="lrrrl",
    ))
    for i, r in enumerate(failed, 1):
        print_fn(textwrap.fill(f"[{i}] {r.method.split(',')[0].split(' + ')[0]}: {r.error}",
                               width=100, initial_indent="   ", subsequent_indent="       "))
    if any("tensor-op variant" in r.method for r in rows):
        note("* torch.func.jvp rejects the forum's Function on this PyTorch version; the "
             "tensor-op variant computes the same maths with tensor operations instead of .item().")
    elif rows[0].error is None:
        note("torch.func.jvp accepts the forum's .item() calls on this PyTorch version, but "
             "re-runs forward (and setup_context twice) for every tangent.")
    if failed:
        note("Counts for a failing approach are the calls made before it failed.")

    lin = rows[-1]
    expect = {"forward": 1, "setup_context": 1, "jvp": k_forum}
    got = {key: lin.counts[key] for key in expect}
    counts_ok = lin.error is None and got == expect
    ok &= counts_ok
    verdict = ("as expected: forward and setup_context once, jvp once per tangent" if counts_ok
               else f"UNEXPECTED, wanted {expect}")
    note(f"Check: linearize call counts {got}, {verdict}.")
    print_fn("")

    p = [v.item() for v in _forum_primals()]
    analytic = [_analytic(p, t.tolist()) for t in tangents]
    ref_row = next((r for r in rows if r.method.startswith("torch.func.jvp") and not r.error), None)
    headers = ["k", "dx", "da", "db", "dc", "analytic dy", "linearize", "torch.func.jvp", "match"]
    vrows = []
    for i, t in enumerate(tangents.tolist()):
        got_v = lin.results[i] if lin.results else math.nan
        ref_v = ref_row.results[i] if ref_row and ref_row.results else math.nan
        match = math.isclose(got_v, analytic[i], rel_tol=1e-5, abs_tol=1e-5)
        ok &= match
        vrows.append([str(i), *(f"{v:+.4f}" for v in t), f"{analytic[i]:+.4f}",
                      f"{got_v:+.4f}", f"{ref_v:+.4f}", "yes" if match else "NO"])
    note("Check against the analytic derivative at this point:")
    print_fn("   dy = (2ax + b) dx + x^2 da + x db + dc = 16 dx + 4 da + 2 db + dc")
    print_fn(_table(headers, vrows))
    print_fn("")

    print_fn(f"2. Time for K = {k} sequential tangents (ms; median of {repeats} interleaved runs "
             "after one warm-up).")
    note(f"func.jvp x{k} = {k} torch.func.jvp calls; linearize+{k} = one linearize call "
         f"+ {k} applications of jvp_fn; f(x) = one plain forward, for scale.")
    print_fn("")
    trows = time_workloads(default_workloads(), k=k, repeats=repeats)
    out = []
    for r in trows:
        if r.error:
            ok = False
            out.append([r.name, "", "", f"fails: {r.error}", "", "", "", ""])
            continue
        out.append([r.name, _fmt(r.primal), _fmt(r.func_jvp_total), _fmt(r.lin_total),
                    _fmt(r.lin_setup), _fmt(r.lin_apply), f"{r.func_jvp_total / r.lin_total:.1f}x",
                    f"{r.max_abs_diff:.1e}"])
    print_fn(_table(["workload", "f(x)", f"func.jvp x{k}", f"linearize+{k}", "of which setup",
                     "apply (each)", "speed-up", "max |diff|"], out))
    note("speed-up = torch.func.jvp total / linearize total, measured in this run; "
         "max |diff| = linearize vs torch.func.jvp on one tangent.")
    print_fn("")
    print_fn("All checks passed." if ok else "SOME CHECKS FAILED (see above).")
    return ok


def main(args: argparse.Namespace) -> int:
    """Entry point for the ``demo`` subcommand; returns the process exit status."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return 0 if run_demo(k=args.k, repeats=args.repeats) else 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``demo`` subcommand on ``subparsers`` (from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "demo",
        help="the forum example (call counts, values) and a K-tangent timing table",
        description="Runs the PyTorch-forum example (a custom autograd.Function, K = 5 "
        "tangents) through torch.func.jvp, forward_ad, torch.func.linearize and "
        "torch_linearize.linearize, counting forward / setup_context / jvp calls and checking "
        "the values against the analytic derivative; then times K sequential tangents "
        "through torch.func.jvp and linearize on a few workloads (medians, same run).",
    )
    p.add_argument("--k", type=int, default=32, help="tangents per timing run (default: 32)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repetitions per workload; medians are reported (default: 5)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads (default: leave PyTorch's default)")
    p.set_defaults(func=main)
    return p
