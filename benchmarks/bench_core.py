"""Core CPU benchmark: ``torch_linearize.linearize`` against the ways PyTorch offers today.

Usage::

    python benchmarks/bench_core.py [--quick] [--out benchmarks/results/core_cpu.md]

For each workload (MLP, elementwise transcendental chain, 2-D PDE residual,
custom ``autograd.Function`` with an expensive forward) it compares, in one run:

* ``floor``: a hand-written JVP on precomputed residuals (the best one can do
  without fusing kernels);
* ``torch_linearize.linearize``;
* ``torch.func.linearize``;
* the double-vjp trick (vjp of the vjp);
* ``torch.func.jvp`` and eager ``torch.autograd.forward_ad`` (both re-run the
  forward for every tangent; no setup).

Methods are interleaved round-robin (order rotated every round) and every
figure is a median of individually timed calls, float32, on
``torch.set_num_threads(2)`` by default. Totals for K tangents are computed from
the medians (setup + K x apply), not measured.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import torch_linearize

try:  # run as a script (benchmarks/ on sys.path) or as ``python -m benchmarks.bench_core``
    from common import (
        ContentionGuard,
        Samples,
        closure_tensor_bytes,
        fmt_ms,
        fmt_ratio,
        interleave,
        markdown_table,
        short_reason,
        storage_bytes,
        time_ms,
    )
except ImportError:  # pragma: no cover
    from benchmarks.common import (
        ContentionGuard,
        Samples,
        closure_tensor_bytes,
        fmt_ms,
        fmt_ratio,
        interleave,
        markdown_table,
        short_reason,
        storage_bytes,
        time_ms,
    )

MiB = 1024 * 1024
KS = (1, 8, 64)
REL_TOL = 1e-4


# --------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    """One function to linearize, with its hand-written floor JVP."""

    key: str
    title: str
    f: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    floor_setup: Callable[[], Any]
    floor_apply: Callable[[Any, torch.Tensor], torch.Tensor]
    floor_residuals: Callable[[Any], list[torch.Tensor]]
    existing: list[torch.Tensor] = field(default_factory=list)
    target_apply: bool = True  # issue-2 target "apply <= 1.5x floor" applies


def make_mlp() -> Workload:
    g = torch.Generator().manual_seed(0)
    n = 512
    Ws = [torch.randn(n, n, generator=g) / math.sqrt(n) for _ in range(4)]
    bs = [0.1 * torch.randn(n, generator=g) for _ in range(4)]
    x = torch.randn(256, n, generator=g)

    def f(x: torch.Tensor) -> torch.Tensor:
        for W, b in zip(Ws, bs):
            x = torch.tanh(F.linear(x, W, b))
        return x

    def floor_setup() -> list[torch.Tensor]:
        a, hs = x, []
        for W, b in zip(Ws, bs):
            a = torch.tanh(F.linear(a, W, b))
            hs.append(1 - a * a)
        return hs

    def floor_apply(hs: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        for W, h in zip(Ws, hs):
            t = (t @ W.T) * h
        return t

    return Workload("mlp", "MLP 4x tanh(x W^T + b), x 256x512, W 512x512", f, x,
                    floor_setup, floor_apply, lambda hs: hs, [x, *Ws, *bs])


def make_elementwise() -> Workload:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1_000_000, generator=g)

    def f(x: torch.Tensor) -> torch.Tensor:
        x = torch.sin(x)
        x = torch.exp(x)
        x = torch.tanh(x)
        x = torch.cos(x)
        x = torch.sigmoid(x)
        x = torch.log1p(x)
        x = torch.erf(x)
        return torch.atan(x)

    def floor_setup() -> torch.Tensor:
        # the folded derivative, computed once (one jvp with a ones tangent)
        return torch.func.jvp(f, (x,), (torch.ones_like(x),))[1]

    return Workload("elementwise", "elementwise chain of 8 transcendental ops, 1e6", f, x,
                    floor_setup, lambda r, t: t * r, lambda r: [r], [x], target_apply=False)


def _lap(u: torch.Tensor) -> torch.Tensor:
    return u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1]


def make_pde() -> Workload:
    g = torch.Generator().manual_seed(2)
    u = torch.randn(512, 512, generator=g)

    def f(u: torch.Tensor) -> torch.Tensor:
        return _lap(u) - u[1:-1, 1:-1] ** 3

    def floor_setup() -> torch.Tensor:
        return 3 * u[1:-1, 1:-1] ** 2

    def floor_apply(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _lap(t) - r * t[1:-1, 1:-1]

    return Workload("pde", "2-D PDE residual lap(u) - u^3, 512x512, slicing stencil", f, u,
                    floor_setup, floor_apply, lambda r: [r], [u])


class NewtonCubic(torch.autograd.Function):
    """y with y^3 + y = x, elementwise, by a fixed number of Newton steps (expensive forward).

    dy/dx = 1 / (3 y^2 + 1) is saved once; jvp and backward are one multiply.
    """

    @staticmethod
    def forward(x: torch.Tensor, iters: int) -> torch.Tensor:
        y = x / 2
        for _ in range(iters):
            y = y - (y * y * y + y - x) / (3 * y * y + 1)
        return y

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        d = 1 / (3 * output * output + 1)
        ctx.save_for_forward(d)
        ctx.save_for_backward(d)

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor, _: Any) -> torch.Tensor:
        (d,) = ctx.saved_tensors
        return t * d

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (d,) = ctx.saved_tensors
        return g * d, None


def make_custom() -> Workload:
    g = torch.Generator().manual_seed(3)
    x = 3 * torch.randn(1_000_000, generator=g)
    iters = 16

    def f(x: torch.Tensor) -> torch.Tensor:
        return NewtonCubic.apply(x, iters)

    def floor_setup() -> torch.Tensor:
        y = NewtonCubic.forward(x, iters)
        return 1 / (3 * y * y + 1)

    return Workload("custom", f"custom Function: {iters} Newton steps forward, jvp = 1 mul, 1e6",
                    f, x, floor_setup, lambda d, t: t * d, lambda d: [d], [x])


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "mlp": make_mlp,
    "elementwise": make_elementwise,
    "pde": make_pde,
    "custom": make_custom,
}


# --------------------------------------------------------------------------- methods
@dataclass
class Method:
    """How one approach sets up (once) and applies (per tangent) the JVP."""

    name: str
    setup: Callable[[Workload], Any] | None  # None: nothing to set up (re-runs f per tangent)
    apply: Callable[[Workload, Any, torch.Tensor], torch.Tensor]
    residual_bytes: Callable[[Workload, Any], int | None] = lambda wl, s: None


def _fwad_apply(wl: Workload, _: Any, t: torch.Tensor) -> torch.Tensor:
    with fwAD.dual_level():
        out = wl.f(fwAD.make_dual(wl.x, t))
        return fwAD.unpack_dual(out).tangent


def _double_vjp_setup(wl: Workload) -> Callable:
    y, vjp_fn = torch.func.vjp(wl.f, wl.x)
    _, vjp2 = torch.func.vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(y))
    return vjp2


FLOOR = "floor (hand-written)"
TL = "torch_linearize.linearize"
FUNC_JVP = "torch.func.jvp"

METHODS: list[Method] = [
    Method(FLOOR, lambda wl: wl.floor_setup(), lambda wl, s, t: wl.floor_apply(s, t),
           lambda wl, s: storage_bytes(wl.floor_residuals(s), wl.existing)),
    Method(TL, lambda wl: torch_linearize.linearize(wl.f, wl.x)[1], lambda wl, s, t: s(t),
           lambda wl, s: s.residual_bytes),
    Method("torch.func.linearize", lambda wl: torch.func.linearize(wl.f, wl.x)[1],
           lambda wl, s, t: s(t), lambda wl, s: closure_tensor_bytes(s, wl.existing)),
    Method("double-vjp", _double_vjp_setup, lambda wl, s, t: s(t)[0]),
    Method(FUNC_JVP, None, lambda wl, s, t: torch.func.jvp(wl.f, (wl.x,), (t,))[1]),
    Method("forward_ad (eager)", None, _fwad_apply),
]


# --------------------------------------------------------------------------- running
@dataclass
class Config:
    setup_rounds: int
    apply_rounds: int
    inner: int
    n_tangents: int = 4


@dataclass
class MethodResult:
    name: str
    failed: str | None = None
    cold_setup: float | None = None
    setup: Samples | None = None
    apply: Samples = field(default_factory=Samples)
    residual_bytes: int | None = None
    rel_err: float | None = None


@dataclass
class WorkloadResult:
    wl: Workload
    primal: Samples
    one_jvp: Samples  # one torch.func.jvp call, timed inside the setup rounds
    methods: dict[str, MethodResult]
    y_ok: bool | None = None


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (a - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def run_workload(wl: Workload, cfg: Config, log: Callable[[str], None],
                 guard: ContentionGuard | None = None) -> WorkloadResult:
    """Check every method once, then time setups and applications interleaved."""
    f, x = wl.f, wl.x
    if guard is not None:
        guard.wait_idle()
    for _ in range(2):
        f(x)
    g = torch.Generator().manual_seed(123)
    tangents = [torch.randn(x.shape, generator=g) for _ in range(cfg.n_tangents)]
    ref = torch.func.jvp(f, (x,), (tangents[0],))[1]

    results = {m.name: MethodResult(m.name) for m in METHODS}
    states: dict[str, Any] = {}
    y_ok = None
    # cold setup + correctness, once per method
    for m in METHODS:
        r = results[m.name]
        try:
            if m.setup is not None:
                r.cold_setup, states[m.name] = time_ms(lambda m=m: m.setup(wl))
            else:
                states[m.name] = None
            out = m.apply(wl, states[m.name], tangents[0])
            r.rel_err = _rel_err(out, ref)
            if not r.rel_err <= REL_TOL:
                r.failed = f"wrong result (rel. max error {r.rel_err:.1e})"
        except Exception as e:
            r.failed = short_reason(e)
        if r.failed:
            states.pop(m.name, None)
            continue
        r.residual_bytes = m.residual_bytes(wl, states[m.name])
        if m.name == TL:
            y = torch_linearize.linearize(f, x)[0]
            y_ok = torch.allclose(y, f(x), rtol=1e-5, atol=1e-6)
    live = [m for m in METHODS if results[m.name].failed is None]

    def mark_failed(name: str, e: BaseException) -> None:
        results[name].failed = short_reason(e)

    # setup times (one torch.func.jvp call interleaved as the yardstick)
    setup_fns: dict[str, Callable[[int], Any]] = {
        m.name: (lambda i, m=m: m.setup(wl)) for m in live if m.setup is not None
    }
    setup_fns["__one_jvp__"] = lambda i: torch.func.jvp(f, (x,), (tangents[i % len(tangents)],))
    log(f"  [{wl.key}] timing setup ({cfg.setup_rounds} rounds)")
    setup_samples = interleave(setup_fns, cfg.setup_rounds, 1, mark_failed, guard=guard)
    for m in live:
        if m.setup is not None:
            results[m.name].setup = setup_samples[m.name]

    # per-tangent application (the primal is timed alongside, for scale)
    apply_fns: dict[str, Callable[[int], Any]] = {
        m.name: (lambda i, m=m: m.apply(wl, states[m.name], tangents[i % len(tangents)]))
        for m in live if results[m.name].failed is None
    }
    apply_fns["__primal__"] = lambda i: f(x)
    log(f"  [{wl.key}] timing apply ({cfg.apply_rounds} rounds x {cfg.inner} calls)")
    apply_samples = interleave(apply_fns, cfg.apply_rounds, cfg.inner, mark_failed,
                               guard=guard)
    for m in live:
        if m.name in apply_samples:
            results[m.name].apply = apply_samples[m.name]
    return WorkloadResult(wl, apply_samples["__primal__"], setup_samples["__one_jvp__"],
                          results, y_ok)


# --------------------------------------------------------------------------- reporting
HEADERS = ["workload", "method", "1st setup", "setup", "setup/jvp", "apply", "IQR",
           "apply/floor", "K=1", "K=8", "K=64", "resid. MiB", "resid./floor"]


def _setup_median(r: MethodResult) -> float:
    return r.setup.median if r.setup is not None else 0.0


def table_rows(res: WorkloadResult) -> list[list[str]]:
    floor = res.methods[FLOOR]
    floor_apply = floor.apply.median if not floor.failed else float("nan")
    floor_bytes = floor.residual_bytes if not floor.failed else None
    one_jvp = res.one_jvp.median
    rows = [[res.wl.key, "(primal f(x), for scale)", "", "", "", fmt_ms(res.primal.median),
             f"{res.primal.spread:.0%}", fmt_ratio(res.primal.median / floor_apply),
             "", "", "", "", ""]]
    for m in METHODS:
        r = res.methods[m.name]
        if r.failed:
            rows.append([res.wl.key, m.name, "", "", "", f"fails: {r.failed}", "", "", "", "",
                         "", "", ""])
            continue
        setup = _setup_median(r)
        apply = r.apply.median
        has_setup = m.setup is not None
        if r.residual_bytes is None:
            mem, mem_ratio = "n/a", "n/a"
        else:
            mem = f"{r.residual_bytes / MiB:.2f}"
            mem_ratio = fmt_ratio(r.residual_bytes / floor_bytes) if floor_bytes else "n/a"
        rows.append([
            res.wl.key,
            m.name,
            fmt_ms(r.cold_setup) if has_setup else "0",
            fmt_ms(setup) if has_setup else "0",
            fmt_ratio(setup / one_jvp) if has_setup else "-",
            fmt_ms(apply),
            f"{r.apply.spread:.0%}",
            fmt_ratio(apply / floor_apply),
            *(fmt_ms(setup + k * apply) for k in KS),
            mem,
            mem_ratio,
        ])
    return rows


def targets(results: list[WorkloadResult]) -> list[str]:
    """The issue-2 targets for torch_linearize.linearize, with MET / NOT MET."""
    lines = []

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    for res in results:
        tl = res.methods[TL]
        floor = res.methods[FLOOR]
        k = res.wl.key
        if tl.failed or floor.failed:
            lines.append(f"- {k}: cannot check targets (linearize: {tl.failed}, floor: {floor.failed})")
            continue
        ra = tl.apply.median / floor.apply.median
        rs = _setup_median(tl) / res.one_jvp.median
        rm = tl.residual_bytes / floor.residual_bytes if floor.residual_bytes else float("nan")
        if res.wl.target_apply:
            lines.append(f"- {k}: apply <= 1.5x floor: {ra:.2f}x -> {verdict(ra <= 1.5)}")
        else:
            lines.append(f"- {k}: apply vs floor (not an issue-2 target): {ra:.2f}x")
        lines.append(f"- {k}: setup <= 2x one torch.func.jvp: {rs:.2f}x -> {verdict(rs <= 2)}")
        lines.append(f"- {k}: residual memory <= 2x floor: {rm:.2f}x -> {verdict(rm <= 2)}")
    return lines


def correctness_lines(results: list[WorkloadResult]) -> list[str]:
    lines = []
    for res in results:
        parts = []
        for m in METHODS:
            r = res.methods[m.name]
            if r.rel_err is not None and not r.failed:
                parts.append(f"{m.name} ok ({r.rel_err:.0e})")
            else:
                parts.append(f"{m.name} FAILS ({r.failed})")
        y = {None: "n/a", True: "ok", False: "MISMATCH"}[res.y_ok]
        lines.append(f"- {res.wl.key}: " + "; ".join(parts) + f"; linearize's y == f(x): {y}")
    return lines


def render(results: list[WorkloadResult], cfg: Config, args: argparse.Namespace,
           elapsed: float) -> str:
    rows = [row for res in results for row in table_rows(res)]
    out = [
        "# Core CPU benchmark: torch_linearize.linearize vs PyTorch",
        "",
        f"Generated by `python benchmarks/bench_core.py{' --quick' if args.quick else ''}` on "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: torch {torch.__version__}, "
        f"torch_linearize {torch_linearize.__version__} ({_source_state()}{'; ' + args.label if args.label else ''}), Python {platform.python_version()}, "
        f"{platform.machine()} with {os.cpu_count()} logical CPUs, "
        f"torch.set_num_threads({args.threads}), float32. Run took {elapsed:.0f} s "
        f"({cfg.setup_rounds} setup rounds; {cfg.apply_rounds} apply rounds x {cfg.inner} calls; "
        "one extra warm-up round each, not recorded). 1-minute load average "
        f"{args.load[0]:.2f} before the run, {args.load[1]:.2f} after it (this process included); "
        f"{args.guard_summary}.",
        "",
        "Workloads:",
        *(f"- `{res.wl.key}`: {res.wl.title}" for res in results),
        "",
        "All times in ms, medians of individually timed calls; methods interleaved round-robin.",
        "",
        markdown_table(HEADERS, rows),
        "",
        "Columns:",
        "- `1st setup`: the first setup call in this process for this workload (includes one-time "
        "costs: tracing caches, code generation, imports).",
        "- `setup`: median of later setup calls: the `linearize` call for torch_linearize and "
        "torch.func.linearize, both `torch.func.vjp` calls for double-vjp, and computing the "
        "precomputed residuals (primal included) for the floor. torch.func.jvp and forward_ad "
        "have no setup (0): they re-run f for every tangent.",
        "- `setup/jvp`: setup divided by one `torch.func.jvp` call timed in the same "
        "interleaved rounds (median: " + ", ".join(
            f"{r.wl.key} {fmt_ms(r.one_jvp.median)}" for r in results) + ").",
        "- `apply`: one tangent applied (median); `IQR`: interquartile range of those timings "
        "relative to the median (the noise).",
        "- `K=1/8/64`: setup + K x apply for K sequential tangents, **computed from the medians**, "
        "not measured.",
        "- `resid. MiB`: residual storage kept alive. torch_linearize: `jvp_fn.residual_bytes`; "
        "floor: its precomputed tensors; torch.func.linearize: distinct tensor storages "
        "reachable from the returned function's closure (the constant-folded GraphModule), "
        "excluding primals and weights; n/a where not measured.",
        "",
        "Correctness (relative max error vs torch.func.jvp, tolerance "
        f"{REL_TOL:.0e}, one random tangent):",
        *correctness_lines(results),
        "",
        "Issue-2 targets for torch_linearize.linearize:",
        *targets(results),
        "",
    ]
    return "\n".join(out)


def _source_state() -> str:
    """Which torch_linearize was benchmarked: this checkout's commit (noting uncommitted
    changes under src/), or the directory it was imported from if outside the checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mod_dir = os.path.dirname(os.path.abspath(torch_linearize.__file__))
    if not mod_dir.startswith(os.path.join(root, "src") + os.sep):
        return f"imported from {mod_dir}"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=root, check=True,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {head}" + (" plus uncommitted changes in src/" if dirty else "")


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (about a minute)")
    p.add_argument("--out", default="benchmarks/results/core_cpu.md",
                   help="markdown file to write (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    p.add_argument("--label", default="",
                   help="free text describing the torch_linearize build, put in the header")
    p.add_argument("--no-guard", action="store_true",
                   help="do not wait for other processes to go quiet between timed rounds")
    p.add_argument("--only", default="", help="comma-separated workloads: " + ",".join(WORKLOADS))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    # torch.func.linearize's constant folding warns about get_attr nodes; not our concern here
    warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
    torch.manual_seed(0)
    cfg = Config(3, 6, 2) if args.quick else Config(11, 31, 3)
    keys = [k for k in args.only.split(",") if k] or list(WORKLOADS)
    for k in keys:
        if k not in WORKLOADS:
            p.error(f"--only: unknown workload {k!r}; choose from {', '.join(WORKLOADS)}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    load_before = _loadavg()
    if load_before > 0.75 * (os.cpu_count() or 1):
        log(f"warning: the 1-minute load average is {load_before:.1f} before starting; "
            "other processes will distort the timings")
    guard = None if args.no_guard else ContentionGuard(budget_s=20 if args.quick else 240)
    t0 = time.perf_counter()
    results = []
    for k in keys:
        log(f"workload {k}")
        results.append(run_workload(WORKLOADS[k](), cfg, log, guard))
    args.load = (load_before, _loadavg())
    args.guard_summary = guard.summary() if guard is not None else "contention guard off"
    text = render(results, cfg, args, time.perf_counter() - t0)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
