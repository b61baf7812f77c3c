"""GPU check and benchmark: Triton custom ops with ``register_jvp``, and K=16 tangents.

Usage::

    python benchmarks/gpu.py                 # on a CUDA machine (about 1-2 minutes on an H100)
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
``torch_linearize.linearize`` + K applications vs ``torch.func.jvp`` x K vs eager
``forward_ad`` x K vs ``torch.func.linearize`` + K vs a hand-written floor (JVP on
precomputed residuals). Times are CUDA-event medians over interleaved rounds
(host ``perf_counter`` on CPU).

Every check and every method runs in its own try/except: failures are reported
in the results file, never abort the run.
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
TIME_BUDGET_S = 240.0  # no new section starts after this (the whole run must stay < 5 min)


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
        return out.stdout.strip() or "unknown"
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

    return Workload("elementwise", f"elementwise chain of 8 transcendental ops, n = {n:,}", f, x,
                    lambda: (f, x.double()), floor_setup, lambda r, t: t * r)


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

    return Workload("mlp", f"MLP 4x tanh(x W^T + b), W {width}x{width}, x {batch}x{width}", f, x,
                    ref, floor_setup, floor_apply, tol=1e-3)


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


def _fwad(wl: Workload, _: Any, t: torch.Tensor) -> torch.Tensor:
    with fwAD.dual_level():
        return fwAD.unpack_dual(wl.f(fwAD.make_dual(wl.x, t))).tangent


FLOOR = "floor (hand-written)"
METHODS = [
    Method(FLOOR, lambda wl: wl.floor_setup(), lambda wl, s, t: wl.floor_apply(s, t)),
    Method("torch_linearize.linearize", lambda wl: tl.linearize(wl.f, wl.x)[1],
           lambda wl, s, t: s(t)),
    Method("torch.func.linearize", lambda wl: torch.func.linearize(wl.f, wl.x)[1],
           lambda wl, s, t: s(t)),
    Method("torch.func.jvp", None, lambda wl, s, t: torch.func.jvp(wl.f, (wl.x,), (t,))[1]),
    Method("forward_ad (eager)", None, _fwad),
    Method(f"linearize + vmap ({K} at once)", lambda wl: tl.linearize(wl.f, wl.x)[1],
           lambda wl, s, T: torch.vmap(s)(T), batched=True),
]


@dataclass
class Result:
    setup: list[float] = field(default_factory=list)
    apply: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    err: float | None = None
    failed: str = ""


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
    for r in range(reps + 1):  # round 0: warm-up (caches, Triton compilation), not recorded
        order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]
        for m in order:
            res = results[m.name]
            if res.failed:
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
            "| method | setup ms | apply ms | K=16 total ms | total / floor | rel. error vs "
            "float64 |",
            "| --- | ---: | ---: | ---: | ---: | --- |")
    for m in METHODS:
        r = results[m.name]
        if r.failed:
            rep.add(f"| {m.name} | - | - | - | - | **failed**: {r.failed} |")
            continue
        if not r.total:
            rep.add(f"| {m.name} | - | - | - | - | no timed rounds |")
            continue
        setup = statistics.median(r.setup) if m.setup is not None else 0.0
        apply = statistics.median(r.apply)
        total = statistics.median(r.total)
        err = "n/a" if r.err is None else f"{r.err:.1e}"
        if r.err is not None and not r.err < wl.tol:
            err += " **above tolerance**"
        rep.add(f"| {m.name} | {fmt(setup)} | {fmt(apply)} | {fmt(total)} | "
                f"{total / floor_total:.2f}x | {err} |")


def benchmark(rep: Report, device: str, smoke: bool, reps: int, start: float) -> None:
    clock = Clock(device == "cuda")
    rep.add("", f"## B. K={K} sequential tangents at one point", "",
            f"Each round runs every method once, interleaved (order rotated each round): setup "
            f"(if any) then {K} tangents one after another (all but the batched row). `setup`, "
            f"`apply` (one tangent) and `K=16 total` (setup + {K} applications, measured as one "
            f"span; the batched row's `apply` is its one call divided by {K}) are medians over "
            f"{reps} rounds after a warm-up round; "
            + ("CUDA events." if device == "cuda" else "host perf_counter (CPU smoke run).")
            + " `floor`: a hand-written JVP on precomputed residuals. The error column compares "
            "the first tangent's result with `torch.func.jvp` of the same function in float64 "
            "(tolerance 1e-4, MLP 1e-3; a miss is flagged in bold).")
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

    for name, section in [
        ("A", lambda: triton_check(rep, device, 1 << 12 if smoke else 1 << 22)),
        ("B", lambda: benchmark(rep, device, smoke, reps, start)),
    ]:
        try:
            section()
        except Exception as e:
            rep.add("", f"Section {name}: **ERROR** {short_error(e)}")
            traceback.print_exc()
        rep.flush()

    rep.add("", f"Run took {time.perf_counter() - start:.0f} s.")
    rep.flush()
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
