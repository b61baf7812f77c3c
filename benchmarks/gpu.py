"""GPU check and benchmark: Triton custom ops with ``register_jvp``, K=16 tangents, CUDA graphs.

Usage::

    python benchmarks/gpu.py                 # on a CUDA machine (about 2-3 minutes on an H100)
    python benchmarks/gpu.py --cpu-smoke     # tiny CPU version of every section but Triton
    TRITON_INTERPRET=1 python benchmarks/gpu.py --cpu-smoke   # ... and Triton, interpreted

Writes ``benchmarks/results/gpu_<card>.md`` (``--out`` to change), rewritten after
every section, so a run that is cut short still leaves what it measured.

Section A (Triton check). Mish as a Triton forward kernel and a Triton tangent
kernel (``examples/triton_kernels.py``), wrapped as ``torch.library`` custom ops
with ``torch_linearize.register_jvp``. ``mish_raw``'s rule launches the tangent
kernel directly; ``mish``'s rule calls it through a custom op. Checks, on real
data against a float64 PyTorch reference: ``linearize`` (kernel once, tangent
kernel per tangent), ``torch.func.jvp`` (fails on the raw launch: functorch hands
the rule tensors without storage; works with the wrapped kernel), eager forward
AD, ``torch.func.linearize``, ``vmap`` of the linear map (one launch for 16
tangents with the wrapped kernel), the transpose.

Section B (benchmark). K=16 sequential tangents at one point for an elementwise
chain (64M float32), an MLP (4 layers, 4096x4096 weights) and the Triton op:
``torch_linearize.linearize`` + K applications (eager, ``jvp_fn.compile()`` and
``jvp_fn.cuda_graph()``) vs ``torch.func.jvp`` x K vs eager ``forward_ad`` x K vs
``torch.func.linearize`` + K vs a hand-written floor (JVP on precomputed
residuals). Times are CUDA-event medians over interleaved rounds (host
``perf_counter`` on CPU).

Section C (small problems, CUDA graphs). The forum example written with tensor
ops (four 0-d tensors) and a 1000-element elementwise chain: per-application
time of the plain linear map, ``compile()``, ``cuda_graph()`` replay (with and
without output clone, and the bare ``graph.replay()``) against one bare kernel
launch (``torch.mul`` of two 1000-element tensors).

Section D (targets of the issue "Performance: linear programs at the hand-written
floor", GPU): elementwise-chain apply <= 1.2x the bandwidth floor (one fused
multiply reading tangent and residual and writing the output, at the bandwidth
measured with a large device copy); MLP apply <= 1.05x the primal's matmul time;
small-problem apply with CUDA graphs <= 2x a bare kernel launch.

Every check and every method runs in its own try/except: failures are reported
in the results file, never abort the run. Rows that need CUDA say "n/a (no CUDA)"
in a CPU run.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))  # this checkout's torch_linearize
sys.path.insert(0, os.path.join(REPO, "examples"))  # triton_kernels

import torch  # noqa: E402
import torch.autograd.forward_ad as fwAD  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import torch_linearize as tl  # noqa: E402

K = 16
TIME_BUDGET_S = 200.0  # no new section-B workload starts after this (whole run < 5 min)
SMALL_BUDGET_S = 260.0  # section C is skipped after this


# --------------------------------------------------------------------------- plumbing
class Report:
    """Markdown lines, rewritten to ``path`` (and echoed) after every section."""

    def __init__(self, path: str):
        self.path = path
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.lines.append(line)

    def flush(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write("\n".join(self.lines) + "\n")
        os.replace(tmp, self.path)


def short_error(e: BaseException, n: int = 160) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = msg.replace("|", "/")
    return f"{type(e).__name__}: {msg[:n]}"


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


class Clock:
    """CUDA events on a GPU (stream-ordered, so host-bound gaps count), perf_counter on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def card_slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return slug.removeprefix("nvidia_") or "unknown"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        # A copy of a working tree (the device machine's) can be newer than its HEAD.
        return (out.stdout.strip() or "unknown") + (" + uncommitted changes" if dirty else "")
    except Exception:
        return "unknown"


def load_triton_kernels(device: str) -> tuple[Any, str]:
    """(module, '') or (None, why not)."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return None, "no CUDA GPU (set TRITON_INTERPRET=1 to run the Triton kernels on CPU)"
    try:
        import triton_kernels
    except Exception as e:
        return None, f"cannot import Triton / examples/triton_kernels.py ({short_error(e)})"
    return triton_kernels, ""


# --------------------------------------------------------------------------- section A
def triton_check(rep: Report, device: str, n: int) -> None:
    rep.add("", "## A. Triton kernels as custom ops with `register_jvp`", "")
    tk, why = load_triton_kernels(device)
    if tk is None:
        rep.add(f"Skipped: {why}.")
        return
    import triton

    rep.add(f"Mish `y = x tanh(softplus(x))`: Triton forward kernel and Triton tangent kernel "
            f"(`examples/triton_kernels.py`), float32, n = {n:,} (x = 3 randn plus +-25, "
            "+-100), on " + device + f", Triton {triton.__version__}. "
            "`f(x) = mish_raw(mish(x) * w)`: `mish_raw`'s JVP rule launches the Triton tangent "
            "kernel directly, `mish`'s rule calls it through the `mish_tangent` custom op. "
            "Reference: the same maths in float64 PyTorch (`torch.func.jvp`). Errors are "
            "max|a - ref| / max|ref|.", "",
            "| check | result | detail |", "| --- | --- | --- |")

    gen = torch.Generator().manual_seed(0)
    x64 = 3 * torch.randn(n, generator=gen, dtype=torch.float64)
    x64[:4] = torch.tensor([-100.0, -25.0, 25.0, 100.0], dtype=torch.float64)
    w64 = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    T64 = torch.randn(K, n, generator=gen, dtype=torch.float64)
    x64, w64, T64 = x64.to(device), w64.to(device), T64.to(device)
    x, w, T = x64.float(), w64.float(), T64.float()

    def f(x):
        return tk.mish_raw(tk.mish(x) * w)

    def f_clean(x):
        return tk.mish(tk.mish(x) * w)

    def f_ref(x):
        return tk.mish_reference(tk.mish_reference(x) * w64)

    y_ref = f_ref(x64)
    J_ref = torch.func.vmap(lambda t: torch.func.jvp(f_ref, (x64,), (t,))[1])(T64[:4])
    tol = 1e-5

    def row(name: str, fn: Callable[[], str]) -> None:
        try:
            detail = fn()
            rep.add(f"| {name} | ok | {detail} |")
        except AssertionError as e:
            rep.add(f"| {name} | **FAILED** | {e} |")
        except Exception as e:
            rep.add(f"| {name} | **ERROR** | {short_error(e)} |")
            traceback.print_exc()

    def check(err: float, what: str) -> str:
        assert err < tol, f"{what}: relative error {err:.1e} >= {tol:g}"
        return f"{what}: rel. error {err:.1e}"

    def fwd_check() -> str:
        return check(rel_err(tk.mish(x), tk.mish_reference(x64)), "mish(x) vs float64")

    row("forward kernel", fwd_check)
    state: dict[str, Any] = {}

    def lin_check() -> str:
        tk.LAUNCHES.clear()
        y, jvp_fn = tl.linearize(f, x)
        launches_setup = dict(tk.LAUNCHES)
        assert launches_setup == {"mish_fwd": 2}, f"linearize launched {launches_setup}"
        errs = [rel_err(jvp_fn(T[k]), J_ref[k]) for k in range(4)]
        assert tk.LAUNCHES["mish_tangent"] == 8, f"launches {dict(tk.LAUNCHES)}"
        state["jvp_fn"] = jvp_fn
        return (check(rel_err(y, y_ref), "y") + "; " + check(max(errs), "J t, 4 tangents")
                + f"; launches: forward {launches_setup['mish_fwd']} (once per op), "
                "tangent 2 per application")

    row("`linearize(f)`, raw Triton launch in the rule", lin_check)

    def func_jvp_raw() -> str:
        try:
            _, out = torch.func.jvp(f, (x,), (T[0],))
        except Exception as e:
            return f"fails, as expected: `{short_error(e)}`"
        raise AssertionError(f"torch.func.jvp ran the raw launch (rel. error "
                             f"{rel_err(out, J_ref[0]):.1e}); expected it to fail")

    row("`torch.func.jvp(f)`, raw launch", func_jvp_raw)

    def func_lin_raw() -> str:
        try:
            _, lf = torch.func.linearize(f, x)
            out = lf(T[0])
        except Exception as e:
            return f"fails: `{short_error(e)}`"
        return f"ran; rel. error {rel_err(out, J_ref[0]):.1e}"

    row("`torch.func.linearize(f)`, raw launch", func_lin_raw)

    def fwad_raw() -> str:
        with fwAD.dual_level():
            out = fwAD.unpack_dual(f(fwAD.make_dual(x, T[0]))).tangent
        return check(rel_err(out, J_ref[0]), "eager forward AD calls the rule with real tensors")

    row("eager `forward_ad`, raw launch", fwad_raw)

    def func_jvp_clean() -> str:
        _, out = torch.func.jvp(f_clean, (x,), (T[0],))
        return check(rel_err(out, J_ref[0]), "tangent kernel wrapped as a custom op")

    row("`torch.func.jvp(f_clean)`", func_jvp_clean)

    def vmap_clean() -> str:
        _, jvp_fn = tl.linearize(f_clean, x)
        tk.LAUNCHES.clear()
        out = torch.vmap(jvp_fn)(T)
        got = dict(tk.LAUNCHES)
        assert got == {"mish_tangent": 2}, f"launches {got}"
        return (check(rel_err(out[:4], J_ref), f"vmap over {K} tangents")
                + f"; tangent launches: {got['mish_tangent']} (one per op for all {K})")

    row("`vmap(jvp_fn)`, wrapped tangent kernel", vmap_clean)

    def vmap_raw() -> str:
        jvp_fn = state.get("jvp_fn") or tl.linearize(f, x)[1]
        tk.LAUNCHES.clear()
        out = torch.vmap(jvp_fn)(T)
        got = dict(tk.LAUNCHES).get("mish_tangent", 0)
        assert got == K + 1, f"expected {K + 1} tangent launches, got {got}"
        return (check(rel_err(out[:4], J_ref), f"vmap over {K} tangents")
                + f"; tangent launches: {got} ({K} for `mish_raw`, whose rule vmap cannot batch: "
                "linearize loops; 1 for `mish`)")

    row("`vmap(jvp_fn)`, raw launch in the rule", vmap_raw)

    def transpose() -> str:
        jvp_fn = state.get("jvp_fn") or tl.linearize(f, x)[1]
        u64 = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        u64 = u64.to(device)
        (g,) = jvp_fn.transpose()(u64.float())
        (g_ref,) = torch.func.vjp(f_ref, x64)[1](u64)
        return check(rel_err(g, g_ref), "J^T u via register_autograd")

    row("`jvp_fn.transpose()`", transpose)
    state.clear()


# --------------------------------------------------------------------------- section B
@dataclass
class Workload:
    key: str
    title: str
    f: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    ref: Callable[[], tuple[Callable, torch.Tensor]]  # -> (float64 f, float64 x)
    floor_setup: Callable[[], Any]
    floor_apply: Callable[[Any, torch.Tensor], torch.Tensor]
    tol: float = 1e-4
    # reference operations timed after the methods (name -> fn), e.g. the primal's matmuls
    refs: dict[str, Callable[[], Any]] = field(default_factory=dict)


def make_elementwise(device: str, n: int) -> Workload:
    x = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)

    def f(x):
        x = torch.sin(x)
        x = torch.exp(x)
        x = torch.tanh(x)
        x = torch.cos(x)
        x = torch.sigmoid(x)
        x = torch.log1p(x)
        x = torch.erf(x)
        return torch.atan(x)

    def floor_setup():  # the folded derivative (one jvp with a ones tangent)
        return torch.func.jvp(f, (x,), (torch.ones_like(x),))[1]

    # The batched row multiplies K stacked tangents by the residual broadcast over them;
    # these two references time that multiply alone, and the same product computed as K
    # contiguous multiplies into one output (every operand contiguous: CUDA's vectorised
    # elementwise path), to test why the batched row is slower per tangent than K
    # single applications (allocated at their first call, freed with the workload).
    held: dict[str, torch.Tensor] = {}

    def stacked() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not held:
            held["r"] = floor_setup()
            held["T"] = torch.randn(K, n, device=device)
            held["out"] = torch.empty_like(held["T"])
        return held["T"], held["r"], held["out"]

    def broadcast():
        T, r, _ = stacked()
        return T * r

    def rows():
        T, r, out = stacked()
        for k in range(K):
            torch.mul(T[k], r, out=out[k])
        return out

    return Workload("elementwise", f"elementwise chain of 8 transcendental ops, n = {n:,}", f, x,
                    lambda: (f, x.double()), floor_setup, lambda r, t: t * r,
                    refs={REF_BROADCAST: broadcast, REF_ROWS: rows})


def make_mlp(device: str, width: int, batch: int) -> Workload:
    g = torch.Generator().manual_seed(0)
    Ws = [(torch.randn(width, width, generator=g) / math.sqrt(width)).to(device) for _ in range(4)]
    bs = [(0.1 * torch.randn(width, generator=g)).to(device) for _ in range(4)]
    x = torch.randn(batch, width, generator=g).to(device)

    def mlp(Ws, bs):
        def f(x):
            for W, b in zip(Ws, bs):
                x = torch.tanh(F.linear(x, W, b))
            return x
        return f

    f = mlp(Ws, bs)

    def floor_setup():
        a, hs = x, []
        for W, b in zip(Ws, bs):
            a = torch.tanh(F.linear(a, W, b))
            hs.append(1 - a * a)
        return hs

    def floor_apply(hs, t):
        for W, h in zip(Ws, hs):
            t = (t @ W.T) * h
        return t

    def ref():
        return mlp([W.double() for W in Ws], [b.double() for b in bs]), x.double()

    with torch.no_grad():  # the primal's layer inputs, for timing its matmuls alone
        acts = [x]
        for W, b in zip(Ws[:-1], bs[:-1]):
            acts.append(torch.tanh(F.linear(acts[-1], W, b)))

    def primal_matmuls():
        return [torch.mm(a, W.t()) for a, W in zip(acts, Ws)]

    return Workload("mlp", f"MLP 4x tanh(x W^T + b), W {width}x{width}, x {batch}x{width}", f, x,
                    ref, floor_setup, floor_apply, tol=1e-3,
                    refs={PRIMAL_MM: primal_matmuls})


def make_triton(device: str, n: int, tk: Any) -> Workload:
    x = (3 * torch.randn(n, generator=torch.Generator().manual_seed(2))).to(device)

    def f(x):
        return tk.mish(tk.mish(x))

    def floor_setup():  # residual: mish(x); x itself is the other one
        return tk.mish(x)

    def floor_apply(m, t):
        return tk.mish_tangent(m, tk.mish_tangent(x, t))

    def ref():
        return (lambda x: tk.mish_reference(tk.mish_reference(x))), x.double()

    return Workload("triton", f"Triton custom op: mish(mish(x)), n = {n:,}", f, x, ref,
                    floor_setup, floor_apply)


@dataclass
class Method:
    name: str
    setup: Callable[[Workload], Any] | None
    apply: Callable[[Workload, Any, torch.Tensor], torch.Tensor]
    batched: bool = False  # one call with all K tangents stacked
    cuda_only: bool = False  # "n/a (no CUDA)" on a CPU run


def _fwad(wl: Workload, _: Any, t: torch.Tensor) -> torch.Tensor:
    with fwAD.dual_level():
        return fwAD.unpack_dual(wl.f(fwAD.make_dual(wl.x, t))).tangent


FLOOR = "floor (hand-written)"
TL = "torch_linearize.linearize"
TL_COMPILE = "linearize + compile"
TL_GRAPH = "linearize + cuda_graph"
PRIMAL_MM = "primal matmuls (4 x a @ W^T)"
REF_BROADCAST = f"T * r: {K} stacked tangents times the residual, one broadcasting multiply"
REF_ROWS = f"the same as {K} contiguous multiplies into one output, torch.mul(T[k], r, out=out[k])"
NO_CUDA = "n/a (no CUDA)"
METHODS = [
    Method(FLOOR, lambda wl: wl.floor_setup(), lambda wl, s, t: wl.floor_apply(s, t)),
    Method(TL, lambda wl: tl.linearize(wl.f, wl.x)[1], lambda wl, s, t: s(t)),
    # compiles in the warm-up round; later rounds reuse the compiled code (no recompile)
    Method(TL_COMPILE, lambda wl: tl.linearize(wl.f, wl.x)[1].compile(), lambda wl, s, t: s(t)),
    # captures at the first application of every round (3 warm-up runs + capture)
    Method(TL_GRAPH, lambda wl: tl.linearize(wl.f, wl.x)[1].cuda_graph(), lambda wl, s, t: s(t),
           cuda_only=True),
    Method("torch.func.linearize", lambda wl: torch.func.linearize(wl.f, wl.x)[1],
           lambda wl, s, t: s(t)),
    Method("torch.func.jvp", None, lambda wl, s, t: torch.func.jvp(wl.f, (wl.x,), (t,))[1]),
    Method("forward_ad (eager)", None, _fwad),
    Method(f"linearize + vmap ({K} at once)", lambda wl: tl.linearize(wl.f, wl.x)[1],
           lambda wl, s, T: torch.vmap(s)(T), batched=True),
    Method(f"linearize + batched ({K} at once)", lambda wl: tl.linearize(wl.f, wl.x)[1],
           lambda wl, s, T: s.batched(T), batched=True),
]


@dataclass
class Result:
    setup: list[float] = field(default_factory=list)
    apply: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    err: float | None = None
    failed: str = ""
    skipped: str = ""  # not applicable here (CUDA-only row on CPU)
    first_total: float | None = None  # the warm-up round: compilation, capture, caches


def run_once(m: Method, wl: Workload, T: torch.Tensor, clock: Clock) -> tuple[float, list, float,
                                                                                torch.Tensor]:
    marks = [clock.mark()]
    state = m.setup(wl) if m.setup is not None else None
    marks.append(clock.mark())
    if m.batched:
        first = m.apply(wl, state, T)[0]
        marks.append(clock.mark())
    else:
        first = None
        for k in range(K):
            out = m.apply(wl, state, T[k])
            marks.append(clock.mark())
            if k == 0:
                first = out
            del out
    clock.sync()
    times = [clock.ms(a, b) for a, b in itertools.pairwise(marks)]
    del state
    apply = [times[1] / K] * K if m.batched else times[1:]
    return times[0], apply, sum(times), first


def bench_workload(wl: Workload, reps: int, clock: Clock, device: str) -> dict[str, Result]:
    T = torch.randn(K, *wl.x.shape, device=device,
                    generator=torch.Generator(device).manual_seed(3))
    f64, x64 = wl.ref()
    want = torch.func.jvp(f64, (x64,), (T[0].double(),))[1]
    del f64, x64
    results = {m.name: Result() for m in METHODS}
    for m in METHODS:
        if m.cuda_only and device != "cuda":
            results[m.name].skipped = NO_CUDA
    for r in range(reps + 1):  # round 0: warm-up (caches, Triton compilation), not recorded
        order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]
        for m in order:
            res = results[m.name]
            if res.failed or res.skipped:
                continue
            try:
                setup, apply, total, first = run_once(m, wl, T, clock)
            except Exception as e:
                res.failed = short_error(e)
                traceback.print_exc()
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            if r == 0:
                res.err = rel_err(first, want)
                res.first_total = total
            else:
                res.setup.append(setup)
                res.apply.extend(apply)
                res.total.append(total)
            del first
    return results


def fmt(v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def bench_table(rep: Report, wl: Workload, results: dict[str, Result]) -> None:
    floor = results[FLOOR]
    floor_total = statistics.median(floor.total) if floor.total else float("nan")
    rep.add("", f"### `{wl.key}`: {wl.title}", "",
            "| method | setup ms | apply ms | K=16 total ms | total / floor | 1st round ms | "
            "rel. error vs float64 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for m in METHODS:
        r = results[m.name]
        if r.skipped:
            rep.add(f"| {m.name} | - | - | - | - | - | {r.skipped} |")
            continue
        if r.failed:
            rep.add(f"| {m.name} | - | - | - | - | - | **failed**: {r.failed} |")
            continue
        if not r.total:
            rep.add(f"| {m.name} | - | - | - | - | - | no timed rounds |")
            continue
        setup = statistics.median(r.setup) if m.setup is not None else 0.0
        apply = statistics.median(r.apply)
        total = statistics.median(r.total)
        err = "n/a" if r.err is None else f"{r.err:.1e}"
        if r.err is not None and not r.err < wl.tol:
            err += " **above tolerance**"
        first = fmt(r.first_total) if r.first_total is not None else "n/a"
        rep.add(f"| {m.name} | {fmt(setup)} | {fmt(apply)} | {fmt(total)} | "
                f"{total / floor_total:.2f}x | {first} | {err} |")


def median_ms(fn: Callable[[], Any], clock: Clock, reps: int) -> float:
    """Median over ``reps`` individually timed calls of ``fn`` (after one warm-up call),
    each started on an idle device."""
    fn()
    times = []
    for _ in range(reps):
        clock.sync()
        a = clock.mark()
        fn()
        b = clock.mark()
        clock.sync()
        times.append(clock.ms(a, b))
    return statistics.median(times)


@dataclass
class BenchSummary:
    """What section D needs from one section-B workload."""

    results: dict[str, Result]
    numel: int
    element_size: int
    refs: dict[str, float] = field(default_factory=dict)  # reference timings (ms)


def benchmark(rep: Report, device: str, smoke: bool, reps: int,
              start: float) -> dict[str, BenchSummary]:
    clock = Clock(device == "cuda")
    summary: dict[str, BenchSummary] = {}
    rep.add("", f"## B. K={K} sequential tangents at one point", "",
            f"Each round runs every method once, interleaved (order rotated each round): setup "
            f"(if any) then {K} tangents one after another (all but the batched row). `setup`, "
            f"`apply` (one tangent) and `K=16 total` (setup + {K} applications, measured as one "
            f"span; the batched row's `apply` is its one call divided by {K}) are medians over "
            f"{reps} rounds after a warm-up round; "
            + ("CUDA events." if device == "cuda" else "host perf_counter (CPU smoke run).")
            + " `floor`: a hand-written JVP on precomputed residuals. The error column compares "
            "the first tangent's result with `torch.func.jvp` of the same function in float64 "
            "(tolerance 1e-4, MLP 1e-3; a miss is flagged in bold). `linearize + compile`: "
            "`jvp_fn.compile()` (Inductor); it compiles in the warm-up round and later rounds "
            "reuse the compiled code. `linearize + cuda_graph`: `jvp_fn.cuda_graph()`, captured "
            "at the first application of every round (3 warm-up runs + capture, inside `apply`'s "
            "first sample and the total); each call copies the tangent into the static input "
            "and clones the output. `1st round ms`: the warm-up round's total (Inductor / "
            "Triton compilation, capture, caches).")
    tk, why = load_triton_kernels(device)
    if smoke:
        makers = [lambda: make_elementwise(device, 1 << 12), lambda: make_mlp(device, 64, 32)]
        if tk is not None:
            makers.append(lambda: make_triton(device, 1 << 12, tk))
    else:
        makers = [lambda: make_elementwise(device, 1 << 26), lambda: make_mlp(device, 4096, 2048)]
        if tk is not None:
            makers.append(lambda: make_triton(device, 1 << 26, tk))
    if tk is None:
        rep.add("", f"Triton workload skipped: {why}.")
    for make in makers:
        if time.perf_counter() - start > TIME_BUDGET_S:
            rep.add("", f"(time budget of {TIME_BUDGET_S:.0f} s reached: remaining workloads "
                    "skipped)")
            break
        t0 = time.perf_counter()
        wl = None
        try:
            wl = make()
            results = bench_workload(wl, reps, clock, device)
            bench_table(rep, wl, results)
            refs = {}
            for name, fn in wl.refs.items():
                try:
                    refs[name] = median_ms(fn, clock, reps)
                    rep.add("", f"Reference: {name}: {fmt(refs[name])} ms (median of {reps}).")
                except Exception as e:
                    rep.add("", f"Reference: {name}: **ERROR** {short_error(e)}")
            if REF_BROADCAST in refs and REF_ROWS in refs:
                rep.add("", f"Broadcast / rows: {refs[REF_BROADCAST] / refs[REF_ROWS]:.2f}x "
                        "(above 1: the broadcast operand costs the vectorised path; a batched "
                        "map could then run its stacked multiply row by row).")
            summary[wl.key] = BenchSummary(results, wl.x.numel(), wl.x.element_size(), refs)
            rep.add("", f"({time.perf_counter() - t0:.1f} s)")
        except Exception as e:
            name = wl.key if wl is not None else "workload"
            rep.add("", f"### {name}: **ERROR** {short_error(e)}")
            traceback.print_exc()
        finally:
            del wl
            if device == "cuda":
                torch.cuda.empty_cache()
        rep.flush()
    return summary


# --------------------------------------------------------------------------- section C
SMALL_N = 1000
BARE = "bare kernel launch: torch.mul(a, b), 1000 elements"
S_PLAIN = "linearize (plain)"
S_COMPILE = "linearize + compile"
S_GRAPH = "linearize + cuda_graph"
S_GRAPH_NOCLONE = "linearize + cuda_graph(clone_outputs=False)"
S_REPLAY = "graph.replay() alone (no input copy, no output clone)"
S_FUNC_JVP = "torch.func.jvp (for scale)"


def small_problems(device: str) -> list[tuple[str, Callable, tuple, tuple]]:
    """(title, f, primals, tangents) of the small functions."""
    g = torch.Generator().manual_seed(4)

    def forum(x, a, b, c):  # the forum's Test Function, written with tensor ops
        return a * x**2 + b * x + c

    def chain(x):
        x = torch.sin(x)
        x = torch.exp(x)
        x = torch.tanh(x)
        x = torch.cos(x)
        x = torch.sigmoid(x)
        x = torch.log1p(x)
        x = torch.erf(x)
        return torch.atan(x)

    forum_p = tuple(torch.tensor(v, device=device) for v in (2.0, 3.0, 4.0, 5.0))
    forum_t = tuple(torch.randn((), generator=g).to(device) for _ in range(4))
    x = torch.randn(SMALL_N, generator=g).to(device)
    t = torch.randn(SMALL_N, generator=g).to(device)
    return [
        ("forum example with tensor ops, `a x^2 + b x + c` on four 0-d tensors", forum, forum_p,
         forum_t),
        (f"elementwise chain of 8 transcendental ops, n = {SMALL_N}", chain, (x,), (t,)),
    ]


def per_call_ms(methods: dict[str, Callable[[], Any]], clock: Clock, rounds: int, calls: int,
                on_error: Callable[[str, BaseException], None]) -> dict[str, list[float]]:
    """Per-call time of each method: ``calls`` back-to-back calls between two marks (device
    idle at the start; CUDA events, so a host-bound stream counts its gaps), divided by
    ``calls``; one sample per round, methods interleaved (order rotated), one warm-up round.
    A method that raises is reported through ``on_error`` and dropped."""
    names = list(methods)
    out: dict[str, list[float]] = {n: [] for n in names}
    dead: set[str] = set()
    for r in range(rounds + 1):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if name in dead:
                continue
            fn = methods[name]
            try:
                clock.sync()
                a = clock.mark()
                for _ in range(calls):
                    fn()
                b = clock.mark()
                clock.sync()
            except Exception as e:
                dead.add(name)
                out[name] = []
                on_error(name, e)
                continue
            if r:
                out[name].append(clock.ms(a, b) / calls)
    return out


def small_section(rep: Report, device: str, smoke: bool) -> dict[str, dict[str, float]]:
    """Section C; returns {problem: {method: median ms per call}}."""
    cuda = device == "cuda"
    clock = Clock(cuda)
    rounds, calls = (3, 10) if smoke else (20, 50)
    rep.add("", "## C. Small problems: CUDA graphs", "",
            f"Per-application time, median over {rounds} interleaved rounds of {calls} "
            "back-to-back calls each (device idle at the start of a round; "
            + ("CUDA events around the calls, so a host-bound stream's gaps count" if cuda else
               "host perf_counter, CPU smoke run")
            + "). Rows: the plain linear map; `compile()`; `cuda_graph()` replay (each call "
            "copies the tangents into the graph's static inputs, replays, clones the outputs; "
            "or returns the static outputs with `clone_outputs=False`); the captured graph's "
            "`replay()` alone (the floor of what a graph can do); one bare kernel launch "
            f"(`torch.mul` of two {SMALL_N}-element tensors) as the unit.", "")
    a = torch.randn(SMALL_N, device=device)
    b = torch.randn(SMALL_N, device=device)
    out: dict[str, dict[str, float]] = {}
    for title, f, primals, tangents in small_problems(device):
        rep.add(f"### {title}", "", "| method | per call (us) | / bare launch | note |",
                "| --- | ---: | ---: | --- |")
        methods: dict[str, Callable[[], Any]] = {BARE: lambda: torch.mul(a, b)}
        notes: dict[str, str] = {}
        try:
            want = torch.func.jvp(f, primals, tangents)[1]
            _, jvp_fn = tl.linearize(f, *primals)
            methods[S_PLAIN] = lambda jvp_fn=jvp_fn, t=tangents: jvp_fn(*t)
            notes[S_PLAIN] = f"{jvp_fn.num_ops} op(s) in the program"
            try:
                compiled = jvp_fn.compile()
                err = rel_err(compiled(*tangents), want)
                methods[S_COMPILE] = lambda c=compiled, t=tangents: c(*t)
                notes[S_COMPILE] = f"rel. error {err:.0e}"
            except Exception as e:
                notes[S_COMPILE] = f"**failed**: {short_error(e)}"
            if cuda:
                for name, clone in ((S_GRAPH, True), (S_GRAPH_NOCLONE, False)):
                    try:
                        g = jvp_fn.cuda_graph(clone_outputs=clone)
                        err = rel_err(g(*tangents), want)
                        methods[name] = lambda g=g, t=tangents: g(*t)
                        notes[name] = f"rel. error {err:.0e}"
                        graph = getattr(g, "_graph", None)
                        if clone and graph is not None:
                            methods[S_REPLAY] = graph.replay
                    except Exception as e:
                        notes[name] = f"**failed**: {short_error(e)}"
                        traceback.print_exc()
            else:
                notes[S_GRAPH] = notes[S_GRAPH_NOCLONE] = notes[S_REPLAY] = NO_CUDA
            methods[S_FUNC_JVP] = (
                lambda f=f, p=primals, t=tangents: torch.func.jvp(f, p, t)[1])
        except Exception as e:
            rep.add(f"| (setup) | - | - | **ERROR** {short_error(e)} |")
            traceback.print_exc()

        def failed(name: str, e: BaseException, notes: dict[str, str] = notes) -> None:
            notes[name] = f"**failed**: {short_error(e)}"
            traceback.print_exc()

        times = per_call_ms(methods, clock, rounds, calls, failed)
        med = {n: statistics.median(v) for n, v in times.items() if v}
        bare = med.get(BARE, float("nan"))
        for name in (BARE, S_PLAIN, S_COMPILE, S_GRAPH, S_GRAPH_NOCLONE, S_REPLAY, S_FUNC_JVP):
            if name in med:
                rep.add(f"| {name} | {fmt(med[name] * 1e3)} | {med[name] / bare:.2f}x | "
                        f"{notes.get(name, '')} |")
            elif name in notes:
                rep.add(f"| {name} | - | - | {notes[name]} |")
        rep.add("")
        out[title] = med
        rep.flush()
    return out


# --------------------------------------------------------------------------- section D
def copy_bandwidth(device: str, clock: Clock, smoke: bool) -> tuple[float, int]:
    """(bytes per ms read + written by a large device copy, bytes copied)."""
    n = (1 << 22) if smoke else (1 << 28)  # 1 GiB of float32 on the GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), clock, 10)
    nbytes = n * src.element_size()
    return 2 * nbytes / ms, nbytes


def targets_section(rep: Report, device: str, smoke: bool, bench: dict[str, BenchSummary],
                    small: dict[str, dict[str, float]]) -> None:
    cuda = device == "cuda"
    clock = Clock(cuda)
    rep.add("", "## D. GPU targets (issue \"Performance: linear programs at the hand-written "
            "floor\")", "")
    if not cuda:
        rep.add("CPU smoke run: the verdicts below exercise the code only; the targets are "
                "GPU targets.", "")

    def verdict(ok: bool) -> str:
        return "MET" if ok else "**NOT MET**"

    def best(res: dict[str, Result]) -> tuple[str, float, str]:
        """(text with each eager/compiled/graph apply median, best median, best name)."""
        parts, best_v, best_n = [], float("inf"), ""
        for name in (TL, TL_COMPILE, TL_GRAPH):
            r = res.get(name)
            if r is None or r.skipped or r.failed or not r.apply:
                why = "not run" if r is None else (r.skipped or r.failed or "no timed rounds")
                parts.append(f"{name}: {why}")
                continue
            v = statistics.median(r.apply)
            parts.append(f"{name} {fmt(v)} ms")
            if v < best_v:
                best_v, best_n = v, name
        return "; ".join(parts), best_v, best_n

    # elementwise vs the bandwidth floor
    try:
        bw, nbytes = copy_bandwidth(device, clock, smoke)
        rep.add(f"- Device bandwidth from a {nbytes / 2**30:.2g} GiB copy (read + write): "
                f"{bw / 1e6:.0f} GB/s.")
        el = bench.get("elementwise")
        if el is None:
            rep.add("- elementwise apply <= 1.2x bandwidth floor: not measured (section B did not "
                    "run it).")
        else:
            floor_ms = 3 * el.numel * el.element_size / bw
            text, v, name = best(el.results)
            ok = v <= 1.2 * floor_ms
            rep.add(f"- elementwise-chain apply <= 1.2x the bandwidth floor (one fused multiply: "
                    f"read tangent + residual, write output: {fmt(3 * el.numel * el.element_size / 2**20)}"
                    f" MiB at {bw / 1e6:.0f} GB/s = {fmt(floor_ms)} ms): {text}; best "
                    f"{v / floor_ms:.2f}x ({name}) -> {verdict(ok)}")
    except Exception as e:
        rep.add(f"- elementwise target: **ERROR** {short_error(e)}")
        traceback.print_exc()

    # MLP vs the primal's matmuls
    mlp = bench.get("mlp")
    if mlp is None or PRIMAL_MM not in mlp.refs:
        rep.add("- MLP apply <= 1.05x the primal's matmul time: not measured.")
    else:
        mm = mlp.refs[PRIMAL_MM]
        text, v, name = best(mlp.results)
        rep.add(f"- MLP apply <= 1.05x the primal's matmul time ({PRIMAL_MM}: {fmt(mm)} ms): "
                f"{text}; best {v / mm:.2f}x ({name}) -> {verdict(v <= 1.05 * mm)}")

    # small problems: CUDA graphs vs a bare launch
    if not small:
        rep.add("- small-problem apply with CUDA graphs <= 2x a bare kernel launch: not measured.")
    for title, med in small.items():
        bare = med.get(BARE)
        graph = [(n, med[n]) for n in (S_GRAPH, S_GRAPH_NOCLONE) if n in med]
        if bare is None or not graph:
            rep.add(f"- {title}: apply with CUDA graphs <= 2x a bare kernel launch: "
                    + (NO_CUDA if not cuda else "not measured") + ".")
            continue
        parts = "; ".join(f"{n} {fmt(v * 1e3)} us = {v / bare:.2f}x" for n, v in graph)
        v = min(v for _, v in graph)
        rep.add(f"- {title}: apply with CUDA graphs <= 2x a bare kernel launch "
                f"({fmt(bare * 1e3)} us): {parts} -> {verdict(v <= 2 * bare)}")
    rep.flush()


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny sizes on CPU (also used automatically when CUDA is unavailable)")
    ap.add_argument("--out", default=None, help="results file (default: "
                    "benchmarks/results/gpu_<card>.md, gpu_cpu_smoke.md for --cpu-smoke)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 10; 2 smoke)")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    smoke = not cuda
    device = "cuda" if cuda else "cpu"
    card = torch.cuda.get_device_name() if cuda else "cpu (smoke run)"
    out = args.out or os.path.join(REPO, "benchmarks", "results",
                                   f"gpu_{card_slug(card)}.md" if cuda else "gpu_cpu_smoke.md")
    reps = args.reps if args.reps is not None else (2 if smoke else 10)
    if smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))

    warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")  # func.linearize
    rep = Report(out)
    try:
        import triton
        triton_v = triton.__version__
    except Exception:
        triton_v = "not importable"
    env = (f"torch {torch.__version__} (CUDA {torch.version.cuda}), Triton {triton_v}, "
           f"torch_linearize {tl.__version__} (commit {git_commit()}), Python "
           f"{platform.python_version()}")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env += (f"; device: **{card}** ({props.total_memory / 2**30:.0f} GiB, "
                f"{props.multi_processor_count} SMs); TF32 matmul "
                f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
    else:
        env += "; device: CPU (smoke run: tiny sizes, timings meaningless)"
    rep.add(f"# GPU check and benchmark: {card}", "",
            f"Generated by `python benchmarks/gpu.py{' --cpu-smoke' if args.cpu_smoke else ''}` "
            f"on {datetime.datetime.now():%Y-%m-%d %H:%M}: {env}.")
    rep.flush()

    found: dict[str, Any] = {"B": {}, "C": {}}

    def run_c() -> dict:
        if time.perf_counter() - start > SMALL_BUDGET_S:
            rep.add("", "## C. Small problems: CUDA graphs", "",
                    f"Skipped: time budget of {SMALL_BUDGET_S:.0f} s reached.")
            return {}
        return small_section(rep, device, smoke)

    for name, section in [
        ("A", lambda: triton_check(rep, device, 1 << 12 if smoke else 1 << 22)),
        ("B", lambda: benchmark(rep, device, smoke, reps, start)),
        ("C", run_c),
        ("D", lambda: targets_section(rep, device, smoke, found["B"], found["C"])),
    ]:
        try:
            got = section()
            if name in found and got is not None:
                found[name] = got
        except Exception as e:
            rep.add("", f"Section {name}: **ERROR** {short_error(e)}")
            traceback.print_exc()
        if device == "cuda":
            torch.cuda.empty_cache()
        rep.flush()

    rep.add("", f"Run took {time.perf_counter() - start:.0f} s.")
    rep.flush()
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
