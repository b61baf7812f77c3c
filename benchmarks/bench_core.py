"""Core CPU benchmark: ``torch_linearize.linearize`` against the ways PyTorch offers today.

Usage::

    python benchmarks/bench_core.py [--quick] [--out benchmarks/results/core_cpu.md]
                                    [--plot benchmarks/results/core_cpu.png]
    python -m torch_linearize bench [--quick] [--out ...] [--plot ...]   # the same

For each workload (MLP, elementwise transcendental chain, 2-D PDE residual,
custom ``autograd.Function`` with an expensive forward) it compares, in one run:

* ``floor``: a hand-written JVP on precomputed residuals (the best one can do
  without fusing kernels);
* ``torch_linearize.linearize``, and the same map through ``jvp_fn.compile()``
  (``torch.compile``, Inductor) with its one-time compile cost and the cost of
  re-linearizing at a new point (no recompile: checked with dynamo's
  ``unique_graphs`` counter); ``linearize``'s setup both for a structure seen
  before (its simplified program reused) and as a structure's first linearization;
* ``torch.func.linearize``;
* the double-vjp trick (vjp of the vjp);
* ``torch.func.jvp`` and eager ``torch.autograd.forward_ad`` (both re-run the
  forward for every tangent; no setup);
* K = 64 tangents at once: ``torch.vmap(jvp_fn)`` and ``jvp_fn.batched(T)`` against
  the hand-written *batched* floor (the floor's formula on the ``(64, ...)`` batch; definitions
  imported from ``bench_batch_transpose.py``).

Methods are interleaved, in a shuffled order each round, and every
figure is a median of individually timed calls, float32, on
``torch.set_num_threads(2)`` by default. Totals for K tangents are computed from
the medians (setup + K x apply), not measured. Results go to a markdown file and
a matplotlib figure (``--plot``), and are checked against the targets of the
issues "Performance: linear programs at the hand-written floor" and issue 2.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import torch_linearize
from torch_linearize._structure_cache import as_new_structure

try:  # run as a script (benchmarks/ on sys.path) or as ``python -m benchmarks.bench_core``
    from common import (
        ContentionGuard,
        Samples,
        closure_tensor_bytes,
        count_kernels,
        elementwise_chain,
        fmt_ms,
        fmt_ratio,
        interleave,
        kernel_list,
        markdown_table,
        paired_ratio_ci,
        pin_malloc,
        ratio_ci,
        short_reason,
        storage_bytes,
        time_ms,
        write_report,
    )
except ImportError:  # pragma: no cover
    from benchmarks.common import (
        ContentionGuard,
        Samples,
        closure_tensor_bytes,
        count_kernels,
        elementwise_chain,
        fmt_ms,
        fmt_ratio,
        interleave,
        kernel_list,
        markdown_table,
        paired_ratio_ci,
        pin_malloc,
        ratio_ci,
        short_reason,
        storage_bytes,
        time_ms,
        write_report,
    )

MiB = 1024 * 1024
KS = (1, 8, 64)
K_BATCH = 64
REL_TOL = 1e-4
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")

# Targets of the issue "Performance: linear programs at the hand-written floor" (CPU) ...
T_APPLY, T_SETUP, T_MEM, T_BATCH = 1.10, 1.5, 1.2, 1.0
# ... and of issue 2.
T2_APPLY, T2_SETUP, T2_MEM = 1.5, 2.0, 2.0


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
    # Where the floor's formula is one multiply by a residual the map also holds (equal
    # values, its own buffer): that tensor of the map. The floor's formula is then timed
    # on it too, a control for where the two residual buffers happen to live.
    own_residual: Callable[[Any], torch.Tensor] | None = None


def _single_residual(jvp_fn: Any) -> torch.Tensor:
    """The one residual of a map whose program is one ``mul`` by it."""
    (r,) = jvp_fn._program.residuals
    return r


def _saved_for_jvp(jvp_fn: Any) -> torch.Tensor:
    """The one tensor the map's one custom Function saved for its ``jvp``."""
    (node,) = jvp_fn._opaque_nodes
    (d,) = node.ctx.saved_tensors
    return d


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

    f = elementwise_chain

    def floor_setup() -> torch.Tensor:
        # the folded derivative, computed once (one jvp with a ones tangent)
        return torch.func.jvp(f, (x,), (torch.ones_like(x),))[1]

    return Workload("elementwise", "elementwise chain of 8 transcendental ops, 1e6", f, x,
                    floor_setup, lambda r, t: t * r, lambda r: [r], [x], target_apply=False,
                    own_residual=_single_residual)


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
                    f, x, floor_setup, lambda d, t: t * d, lambda d: [d], [x],
                    own_residual=_saved_for_jvp)


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


def _new_structure_setup(wl: Workload) -> Any:
    """``linearize`` as if its program's structure were met for the first time: the passes
    and code generation run (see torch_linearize._structure_cache)."""
    with as_new_structure():
        return torch_linearize.linearize(wl.f, wl.x)[1]


def _compiled_setup(wl: Workload) -> Any:
    """``linearize`` then ``jvp_fn.compile()`` (Inductor). Compilation happens at the first
    call; later setups of the same function with the same shapes reuse the compiled code."""
    return torch_linearize.linearize(wl.f, wl.x)[1].compile()


FLOOR = "floor (hand-written)"
TL = "torch_linearize.linearize"
TLC = "torch_linearize + compile"
FUNC_LIN = "torch.func.linearize"
FUNC_JVP = "torch.func.jvp"

METHODS: list[Method] = [
    Method(FLOOR, lambda wl: wl.floor_setup(), lambda wl, s, t: wl.floor_apply(s, t),
           lambda wl, s: storage_bytes(wl.floor_residuals(s), wl.existing)),
    Method(TL, lambda wl: torch_linearize.linearize(wl.f, wl.x)[1], lambda wl, s, t: s(t),
           lambda wl, s: s.residual_bytes),
    Method(TLC, _compiled_setup, lambda wl, s, t: s(t), lambda wl, s: s.residual_bytes),
    Method(FUNC_LIN, lambda wl: torch.func.linearize(wl.f, wl.x)[1],
           lambda wl, s, t: s(t), lambda wl, s: closure_tensor_bytes(s, wl.existing)),
    Method("double-vjp", _double_vjp_setup, lambda wl, s, t: s(t)[0]),
    Method(FUNC_JVP, None, lambda wl, s, t: torch.func.jvp(wl.f, (wl.x,), (t,))[1]),
    Method("forward_ad (eager)", None, _fwad_apply),
]

# batched rows (K_BATCH tangents in one call)
B_FLOOR = "floor, batched (hand-written)"
B_FLOOR_AGAIN = "floor, batched, timed again (null control)"
B_VMAP = "vmap(jvp_fn)"
B_BATCHED = "jvp_fn.batched(T)"
B_VMAP_C = "vmap(jvp_fn.compile())"
# re-linearization rows
R_LIN = "linearize"
R_LIN_CALL = "linearize + 1st call"
R_LIN_COMPILE = "linearize + compile() + 1st call"


# --------------------------------------------------------------------------- running
@dataclass
class Config:
    setup_rounds: int
    apply_rounds: int
    inner: int
    relin_rounds: int
    batch_rounds: int
    n_tangents: int = 4


@dataclass
class MethodResult:
    name: str
    failed: str | None = None
    cold_setup: float | None = None
    first_apply: float | None = None  # the first application after the cold setup
    setup: Samples | None = None
    apply: Samples = field(default_factory=Samples)
    residual_bytes: int | None = None
    rel_err: float | None = None


@dataclass
class CompileResult:
    """``jvp_fn.compile()``: one-time cost and re-linearization at new points."""

    segments: int | None = None  # compiled segments in the driver program
    new_graphs: int | None = None  # dynamo unique_graphs added by the first call
    relin: dict[str, Samples] = field(default_factory=dict)
    relin_failed: dict[str, str] = field(default_factory=dict)
    graphs_before: int | None = None  # unique_graphs before / after the re-linearize rounds
    graphs_after: int | None = None


@dataclass
class BatchRow:
    name: str
    samples: Samples | None = None
    failed: str | None = None
    rel_err: float | None = None

    @property
    def median(self) -> float:
        if self.failed or self.samples is None or not len(self.samples):
            return float("nan")
        return self.samples.median


@dataclass
class BatchResult:
    """K_BATCH tangents in one call, on bench_batch_transpose's version of the workload."""

    title: str = ""
    rows: dict[str, BatchRow] = field(default_factory=dict)
    skipped: str | None = None
    # method -> Counter of kernels with their operands' shapes (one batched call)
    kernels: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkloadResult:
    wl: Workload
    primal: Samples
    one_jvp: Samples  # one torch.func.jvp call, timed inside the setup rounds
    methods: dict[str, MethodResult]
    y_ok: bool | None = None
    compile: CompileResult = field(default_factory=CompileResult)
    batch: BatchResult = field(default_factory=BatchResult)
    kernels: dict[str, Any] = field(default_factory=dict)  # method -> Counter (one apply)
    # the floor's apply timed a second time, as a method of its own (same call, same
    # residuals): what two identical calls measure as, i.e. the resolution of apply/floor
    null_apply: Samples | None = None
    # the floor's formula on the map's own residual tensor (Workload.own_residual)
    own_apply: Samples | None = None
    null_jvp: Samples | None = None  # torch.func.jvp timed a second time in the setup rounds
    # linearize as the first linearization of its structure (no simplified program reused)
    new_structure: Samples | None = None


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (a - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def unique_graphs() -> int:
    """Graphs compiled by dynamo in this process so far (``counters["stats"]["unique_graphs"]``)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _compiled_segments(jvp_fn: Any) -> int | None:
    """Number of ``torch.compile``d segments a compiled map runs (None if unknown)."""
    try:
        return sum(1 for e in jvp_fn._driver.eqns
                   if str(getattr(e.fn, "display_name", "")).startswith("compiled_segment"))
    except AttributeError:
        return None


def run_workload(wl: Workload, cfg: Config, log: Callable[[str], None],
                 guard: ContentionGuard | None = None) -> WorkloadResult:
    """Check every method once, then time setups and applications interleaved; then the
    re-linearization rounds of the compiled map and the K = 64 batch."""
    f, x = wl.f, wl.x
    if guard is not None:
        guard.wait_idle()
    for _ in range(2):
        f(x)
    g = torch.Generator().manual_seed(123)
    tangents = [torch.randn(x.shape, generator=g) for _ in range(cfg.n_tangents)]
    ref = torch.func.jvp(f, (x,), (tangents[0],))[1]

    results = {m.name: MethodResult(m.name) for m in METHODS}
    comp = CompileResult()
    states: dict[str, Any] = {}
    y_ok = None
    # cold setup + first application + correctness, once per method
    for m in METHODS:
        r = results[m.name]
        try:
            graphs0 = unique_graphs() if m.name == TLC else 0
            if m.setup is not None:
                r.cold_setup, states[m.name] = time_ms(lambda m=m: m.setup(wl))
            else:
                states[m.name] = None
            r.first_apply, out = time_ms(lambda m=m: m.apply(wl, states[m.name], tangents[0]))
            if m.name == TLC:
                comp.new_graphs = unique_graphs() - graphs0
                comp.segments = _compiled_segments(states[m.name])
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
    if TL in setup_fns:  # linearize as for a structure met for the first time
        setup_fns["__tl_new_structure__"] = lambda i: _new_structure_setup(wl)
    setup_fns["__one_jvp__"] = lambda i: torch.func.jvp(f, (x,), (tangents[i % len(tangents)],))
    setup_fns["__one_jvp_again__"] = setup_fns["__one_jvp__"]  # null control
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
    if FLOOR in apply_fns:
        apply_fns["__floor_again__"] = apply_fns[FLOOR]
    if FLOOR in apply_fns and TL in apply_fns and wl.own_residual is not None:
        own = wl.own_residual(states[TL])
        apply_fns["__floor_own__"] = \
            lambda i: wl.floor_apply(own, tangents[i % len(tangents)])
    log(f"  [{wl.key}] timing apply ({cfg.apply_rounds} rounds x {cfg.inner} calls)")
    apply_samples = interleave(apply_fns, cfg.apply_rounds, cfg.inner, mark_failed,
                               guard=guard)
    for m in live:
        if m.name in apply_samples:
            results[m.name].apply = apply_samples[m.name]
    # the kernels one application runs (a noise-free comparison with the floor)
    kernels = {name: count_kernels(lambda name=name: apply_fns[name](0))
               for name in (FLOOR, TL) if name in apply_fns}
    states.clear()

    if results[TLC].failed is None:
        run_relinearize(wl, cfg, tangents[0], comp, log, guard)
    batch = run_batch(wl.key, cfg, log, guard)
    return WorkloadResult(wl, apply_samples["__primal__"], setup_samples["__one_jvp__"],
                          results, y_ok, comp, batch, kernels,
                          apply_samples.get("__floor_again__"),
                          apply_samples.get("__floor_own__"),
                          setup_samples.get("__one_jvp_again__"),
                          setup_samples.get("__tl_new_structure__"))


def run_relinearize(wl: Workload, cfg: Config, t: torch.Tensor, comp: CompileResult,
                    log: Callable[[str], None], guard: ContentionGuard | None) -> None:
    """Linearize again at new points (same shapes), eagerly and compiled, interleaved;
    dynamo's unique_graphs counter must not grow (the compiled code is reused)."""
    n = cfg.relin_rounds + 2
    points = [wl.x * (1 + 1e-3 * (j + 1)) for j in range(n)]  # a new point for every call
    lin = torch_linearize.linearize
    fns: dict[str, Callable[[int], Any]] = {
        R_LIN: lambda i: lin(wl.f, points[i % n])[1],
        R_LIN_CALL: lambda i: lin(wl.f, points[i % n])[1](t),
        R_LIN_COMPILE: lambda i: lin(wl.f, points[i % n])[1].compile()(t),
    }
    log(f"  [{wl.key}] re-linearizing at new points ({cfg.relin_rounds} rounds)")
    comp.graphs_before = unique_graphs()
    comp.relin = interleave(fns, cfg.relin_rounds, 1,
                            lambda name, e: comp.relin_failed.__setitem__(name, short_reason(e)),
                            guard=guard)
    comp.graphs_after = unique_graphs()


def _batch_module() -> tuple[Any, str]:
    """``bench_batch_transpose`` (its batched floors), or (None, why not)."""
    try:
        import bench_batch_transpose as bbt
    except ImportError as first:
        try:
            from benchmarks import bench_batch_transpose as bbt
        except ImportError:
            return None, f"benchmarks/bench_batch_transpose.py not importable ({short_reason(first)})"
        except Exception as e:
            return None, f"benchmarks/bench_batch_transpose.py fails to import ({short_reason(e)})"
    except Exception as e:
        return None, f"benchmarks/bench_batch_transpose.py fails to import ({short_reason(e)})"
    return bbt, ""


def run_batch(key: str, cfg: Config, log: Callable[[str], None],
              guard: ContentionGuard | None) -> BatchResult:
    """K_BATCH tangents at once: ``torch.vmap(jvp_fn)`` vs the hand-written batched floor.

    The workload and its batched floor come from ``bench_batch_transpose.WORKLOADS`` (the
    same functions and points as here, except that its custom Function also defines
    ``batched_jvp``, which is what ``vmap(jvp_fn)`` calls).
    """
    bbt, why = _batch_module()
    make = getattr(bbt, "WORKLOADS", {}).get(key) if bbt is not None else None
    if make is None:
        return BatchResult(skipped=why or f"bench_batch_transpose has no workload {key!r}")
    try:
        bwl = make()
        x = bwl.x
        T = torch.randn(K_BATCH, *x.shape, generator=torch.Generator().manual_seed(7))
        ref = torch.stack([torch.func.jvp(bwl.f, (x,), (T[i],))[1] for i in range(4)])
        s = bwl.floor_setup()
        _, jvp_fn = torch_linearize.linearize(bwl.f, x)
        compiled = jvp_fn.compile()
    except Exception as e:
        return BatchResult(skipped=f"setup failed: {short_reason(e)}")
    fns: dict[str, Callable[[int], Any]] = {
        B_FLOOR: lambda i: bwl.floor_batched(s, T),
        B_FLOOR_AGAIN: lambda i: bwl.floor_batched(s, T),
        B_VMAP: lambda i: torch.vmap(jvp_fn)(T),
        B_BATCHED: lambda i: jvp_fn.batched(T),
        B_VMAP_C: lambda i: torch.vmap(compiled)(T),
    }
    rows = {n: BatchRow(n) for n in fns}
    for name, fn in fns.items():
        try:
            out = fn(0)
            rows[name].rel_err = _rel_err(out[:4], ref)
            if not rows[name].rel_err <= REL_TOL:
                rows[name].failed = f"wrong result (rel. max error {rows[name].rel_err:.1e})"
            del out
        except Exception as e:
            rows[name].failed = short_reason(e, 110)
    live = {n: fn for n, fn in fns.items() if rows[n].failed is None}
    # what one batched call runs, with operand shapes (a noise-free comparison)
    kernels = {n: count_kernels(lambda fn=fn: fn(0), shapes=True)
               for n, fn in live.items() if n in (B_FLOOR, B_VMAP, B_BATCHED)}

    def mark_failed(name: str, e: BaseException) -> None:
        rows[name].failed = short_reason(e, 110)

    log(f"  [{key}] batched K={K_BATCH} ({cfg.batch_rounds} rounds)")
    samples = interleave(live, cfg.batch_rounds, 1, mark_failed, guard=guard)
    for n in live:
        rows[n].samples = samples[n]
    return BatchResult(bwl.title, rows, kernels=kernels)


def inductor_warmup() -> float:
    """Compile and run a trivial function once: Inductor's one-time process start-up
    (imports, C++ toolchain checks, compile workers) in ms, kept out of per-workload costs."""
    fn = torch.compile(lambda a: a * 2.0 + 1.0, fullgraph=True, dynamic=False)
    ms, _ = time_ms(lambda: fn(torch.ones(8)))
    return ms


def scalar_probe(log: Callable[[str], None]) -> str:
    """Does a program whose coefficients include a point-dependent *scalar* recompile?

    ``f(x) = sin(x).sum() * x``: the JVP's ``sum(sin(x)) * t`` term carries the 0-d value
    ``sum(sin(x))``, which the simplification passes fold into a Python float in the
    program. Linearizes and compiles at three points of the same shape.
    """
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x).sum() * x

    log("probe: point-dependent scalar coefficient")
    g = torch.Generator().manual_seed(5)
    t = torch.randn(1000, generator=g)
    try:
        g0 = unique_graphs()
        per_point = []
        for _ in range(3):
            x = torch.randn(1000, generator=g)
            before = unique_graphs()
            torch_linearize.linearize(f, x)[1].compile()(t)
            per_point.append(unique_graphs() - before)
        new = unique_graphs() - g0
    except Exception as e:
        return f"probe failed: {short_reason(e)}"
    verdict = ("no recompile after the first point" if per_point[1:] == [0, 0] else
               "**RECOMPILES at every new point** (the folded scalar is a constant in the "
               "compiled segment's source)")
    return (f"`f(x) = sin(x).sum() * x`, x of 1000 elements, linearized + compiled + applied at 3 "
            f"points: unique_graphs +{new} (per point: {per_point}) -> {verdict}.")


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
        first = r.cold_setup
        if m.name == TLC and first is not None and r.first_apply is not None:
            first += r.first_apply  # includes the first call, where Inductor compiles
        if r.residual_bytes is None:
            mem, mem_ratio = "n/a", "n/a"
        else:
            mem = f"{r.residual_bytes / MiB:.2f}"
            mem_ratio = fmt_ratio(r.residual_bytes / floor_bytes) if floor_bytes else "n/a"
        rows.append([
            res.wl.key,
            m.name,
            fmt_ms(first) if has_setup else "0",
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


def compile_rows(res: WorkloadResult) -> list[list[str]]:
    """One-time compile cost of ``jvp_fn.compile()`` for one workload."""
    r, c = res.methods[TLC], res.compile
    if r.failed or r.first_apply is None:
        return [[res.wl.key, f"fails: {r.failed}", "", "", "", "", "", ""]]
    apply = r.apply.median
    cost = ("0 (no aten segment to compile)" if c.segments == 0
            else fmt_ms(r.first_apply - apply))
    return [[res.wl.key, "n/a" if c.segments is None else str(c.segments),
             fmt_ms(r.cold_setup), fmt_ms(r.first_apply), fmt_ms(apply),
             cost, fmt_ms(_setup_median(res.methods[TL])),
             "n/a" if c.new_graphs is None else str(c.new_graphs)]]


def relin_rows(res: WorkloadResult) -> list[list[str]]:
    """Re-linearizing at new points: eager vs compiled (compiled code reused)."""
    c = res.compile
    if not c.relin:
        return [[res.wl.key, "not run (compile failed)", "", "", "", "", ""]]
    med = {n: (c.relin[n].median if n not in c.relin_failed else float("nan")) for n in c.relin}
    lin, call, comp = med.get(R_LIN), med.get(R_LIN_CALL), med.get(R_LIN_COMPILE)
    new = c.graphs_after - c.graphs_before
    check = "ok: no recompile" if new == 0 else f"**RECOMPILED: {new} new graph(s)**"
    failed = "; ".join(f"{n} fails: {e}" for n, e in c.relin_failed.items())
    return [[res.wl.key, fmt_ms(lin), fmt_ms(call), fmt_ms(comp), fmt_ratio(comp / call),
             f"{c.graphs_before} -> {c.graphs_after}", check + (f" ({failed})" if failed else "")]]


def batch_rows(res: WorkloadResult) -> list[list[str]]:
    b = res.batch
    if b.skipped:
        return [[res.wl.key, f"skipped: {b.skipped}", "", "", "", "", ""]]
    floor = b.rows[B_FLOOR].median
    seq = res.methods[TL].apply.median if not res.methods[TL].failed else float("nan")
    rows = []
    for name, r in b.rows.items():
        if r.failed:
            rows.append([res.wl.key, name, f"fails: {r.failed}", "", "", "", ""])
            continue
        spread = r.samples.spread
        rows.append([res.wl.key, name, fmt_ms(r.median), "" if spread != spread else f"{spread:.0%}",
                     fmt_ms(r.median / K_BATCH), fmt_ratio(r.median / floor),
                     fmt_ratio(r.median / K_BATCH / seq)])
    return rows


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


TIE = "MET (a tie with the floor)"


def _ties(lines: list[str]) -> str:
    n = sum(line.endswith(TIE) for line in lines)
    return f", {n} of them {'a tie' if n == 1 else 'ties'} with the floor" if n else ""


def _tie(b: BatchResult, best: str) -> str | None:
    """Why ``best``'s batched call ties the batched floor, or None.

    A method that runs the floor's very kernels on the same operand shapes and layouts
    (``count_kernels(shapes=True)``) can only differ from it by the Python around them:
    its target "<= the batched floor" is a tie, which a measurement reads as above 1.00x
    about half the time. It is counted a tie when, besides, the median of the per-round
    ratios (``common.paired_ratio_ci``: each round's machine state divides out) has a 95 %
    interval that contains 1.00x, i.e. no difference is measurable. Anything else is
    judged by the ratio alone."""
    mine, floor = b.kernels.get(best), b.kernels.get(B_FLOOR)
    if mine is None or mine != floor:
        return None
    med, lo, hi = paired_ratio_ci(b.rows[best].samples, b.rows[B_FLOOR].samples)
    if not lo <= 1.0 <= hi:
        return None
    return (f"the same kernels on the same layouts, and the per-round ratio's median "
            f"{med:.3f}x has a 95% interval {lo:.3f}-{hi:.3f} that contains 1.00x")


def targets(results: list[WorkloadResult]) -> tuple[list[str], list[str], int, int]:
    """(lines for this issue's CPU targets, lines for issue 2's, met, checked)."""
    new: list[str] = []
    old: list[str] = []
    met = checked = 0

    def add(ok: bool, text: str, issue2: bool = False, verdict: str = "") -> None:
        nonlocal met, checked
        (old if issue2 else new).append(f"{text} -> {verdict or _verdict(ok)}")
        if not issue2:
            met += ok
            checked += 1

    for res in results:
        k = res.wl.key
        tl_r, tlc, floor = res.methods[TL], res.methods[TLC], res.methods[FLOOR]
        if tl_r.failed or floor.failed:
            new.append(f"- {k}: cannot check targets (linearize: {tl_r.failed}, "
                       f"floor: {floor.failed})")
            old.append(new[-1])
            continue
        fa = floor.apply.median
        ra = tl_r.apply.median / fa
        rc = tlc.apply.median / fa if not tlc.failed else float("nan")
        best = min(ra, rc) if rc == rc else ra
        which = "linearize + compile" if rc == rc and rc < ra else "linearize"
        add(best <= T_APPLY,
            f"- {k}: per-tangent apply <= {T_APPLY:.2f}x floor: linearize {ra:.2f}x "
            f"{_ci(tl_r.apply, floor.apply)} ({fmt_ms(tl_r.apply.median)} ms), linearize + compile "
            + (f"{rc:.2f}x {_ci(tlc.apply, floor.apply)} ({fmt_ms(tlc.apply.median)} ms)"
               if rc == rc else f"fails ({tlc.failed})")
            + f", floor {fmt_ms(fa)} ms; best {best:.2f}x ({which})"
            + _null_note("the floor timed again", res.null_apply, floor.apply)
            + _own_note(res, tl_r.apply, floor.apply)
            + _kernel_note(res.kernels.get(TL), res.kernels.get(FLOOR), tl_r.apply, floor.apply))
        setup, jvp1 = _setup_median(tl_r), res.one_jvp.median
        rs = setup / jvp1
        add(rs <= T_SETUP, f"- {k}: `linearize` setup <= {T_SETUP}x one torch.func.jvp call, "
            "structure reused (a later linearization of the same structure, as in a Newton "
            f"loop): {rs:.2f}x {_ci(tl_r.setup, res.one_jvp)} ({fmt_ms(setup)} vs "
            f"{fmt_ms(jvp1)} ms)"
            + _null_note("torch.func.jvp timed again", res.null_jvp, res.one_jvp))
        ns = res.new_structure
        if ns is not None and len(ns):
            rn = ns.median / jvp1
            add(rn <= T_SETUP, f"- {k}: `linearize` setup <= {T_SETUP}x one torch.func.jvp "
                "call, new structure (its first linearization: passes and code generation "
                f"run): {rn:.2f}x {_ci(ns, res.one_jvp)} ({fmt_ms(ns.median)} vs "
                f"{fmt_ms(jvp1)} ms)")
            rs = max(rs, rn)
        fb = floor.residual_bytes
        rm = tl_r.residual_bytes / fb if fb else float("nan")
        add(rm <= T_MEM, f"- {k}: residual memory <= {T_MEM}x floor: {rm:.2f}x "
            f"({tl_r.residual_bytes / MiB:.2f} vs {fb / MiB:.2f} MiB)")
        b = res.batch
        ours = [] if b.skipped else [n for n in (B_VMAP, B_BATCHED)
                                     if n in b.rows and not b.rows[n].failed]
        if b.skipped or not ours or b.rows[B_FLOOR].failed:
            why = b.skipped or b.rows[B_FLOOR].failed or b.rows[B_VMAP].failed
            new.append(f"- {k}: K={K_BATCH} batched <= batched floor: cannot check ({why})")
        else:
            bf = b.rows[B_FLOOR].median
            best = min(ours, key=lambda n: b.rows[n].median)
            v = b.rows[best].median
            again = b.rows.get(B_FLOOR_AGAIN)
            each = ", ".join(
                f"{n} {b.rows[n].median / bf:.3f}x "
                f"{_ci(b.rows[n].samples, b.rows[B_FLOOR].samples)}".rstrip() for n in ours)
            tie = None if v / bf <= T_BATCH else _tie(b, best)
            add(v / bf <= T_BATCH or tie is not None,
                f"- {k}: K={K_BATCH} batched <= batched floor: {each}; best {v / bf:.3f}x "
                f"({best}: {fmt_ms(v)} vs {fmt_ms(bf)} ms per batch; "
                f"{fmt_ms(v / K_BATCH)} vs {fmt_ms(bf / K_BATCH)} ms per tangent)"
                + _null_note("the batched floor timed again",
                             None if again is None or again.failed else again.samples,
                             b.rows[B_FLOOR].samples, digits=3)
                + _batch_kernel_note(b, best)
                + (f"; a tie: {tie}" if tie else ""), verdict=TIE if tie else "")
        if res.wl.target_apply:
            add(ra <= T2_APPLY, f"- {k}: apply <= {T2_APPLY}x floor: {ra:.2f}x", True)
        else:
            old.append(f"- {k}: apply vs floor (not an issue-2 target): {ra:.2f}x")
        add(rs <= T2_SETUP, f"- {k}: setup <= {T2_SETUP:g}x one torch.func.jvp: {rs:.2f}x", True)
        add(rm <= T2_MEM, f"- {k}: residual memory <= {T2_MEM:g}x floor: {rm:.2f}x", True)
    return new, old, met, checked


def _ci(num: Samples | None, den: Samples | None) -> str:
    """`[lo-hi]`: the 95 % bootstrap interval of the ratio of medians (common.ratio_ci)."""
    if num is None or den is None:
        return ""
    lo, hi = ratio_ci(num, den)
    return "" if lo != lo else f"[95% CI {lo:.2f}-{hi:.2f}]"


def _null_note(what: str, again: Samples | None, ref: Samples, digits: int = 2) -> str:
    """`; null control: ...`: an identical call timed as a separate method (the resolution)."""
    if again is None or not len(again):
        return ""
    return (f"; null control ({what}): {again.median / ref.median:.{digits}f}x "
            f"{_ci(again, ref)}").rstrip()


def _own_note(res: WorkloadResult, mine: Samples, floor: Samples) -> str:
    """`; placement control: ...`: the floor's formula on the map's own residual buffer,
    and the map against that (the same multiply by the same tensor: the code around it)."""
    own = res.own_apply
    if own is None or not len(own):
        return ""
    return (f"; placement control (the floor's formula on the map's own residual buffer): "
            f"{own.median / floor.median:.2f}x {_ci(own, floor)}, so linearize / that = "
            f"{mine.median / own.median:.2f}x {_ci(mine, own)}")


def _kernel_note(mine: Any, floor: Any, my_samples: Samples, floor_samples: Samples) -> str:
    """`; kernels: ...`: what one application of each runs (views and metadata left out)."""
    if mine is None or floor is None:
        return ""
    same = "the same kernels" if mine == floor else "different kernels"
    return (f"; kernels: linearize {kernel_list(mine)}, floor {kernel_list(floor)} ({same}; IQR "
            f"{my_samples.spread:.0%} / {floor_samples.spread:.0%})")


def _batch_kernel_note(b: BatchResult, best: str) -> str:
    """`; kernels: ...`: what one batched call of ``best`` and of the floor run, with their
    operands' shapes: where they are the same kernels on the same layouts, the ratio
    measures the code around them and the machine's noise."""
    mine, floor = b.kernels.get(best), b.kernels.get(B_FLOOR)
    if mine is None or floor is None:
        return ""
    if mine == floor:
        return f"; kernels: {best} and the floor run the same ({kernel_list(floor)})"
    return f"; kernels: {best} {kernel_list(mine)}, floor {kernel_list(floor)} (different)"


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
        for name, r in res.batch.rows.items():
            if r.rel_err is not None and not r.failed:
                parts.append(f"{name} K={K_BATCH} ok ({r.rel_err:.0e})")
            else:
                parts.append(f"{name} K={K_BATCH} FAILS ({r.failed})")
        y = {None: "n/a", True: "ok", False: "MISMATCH"}[res.y_ok]
        lines.append(f"- {res.wl.key}: " + "; ".join(parts) + f"; linearize's y == f(x): {y}")
    return lines


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_plot(results: list[WorkloadResult], path: str, title: str) -> str | None:
    """Write the two-panel figure (apply time per tangent, residual memory) to ``path``.

    Returns None on success, else why no figure was written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib is not installed ({e}); `pip install -e '.[bench]'`"

    keys = [r.wl.key for r in results]
    nan = float("nan")

    def apply_ms(res: WorkloadResult, name: str) -> float:
        r = res.methods[name]
        return nan if r.failed else r.apply.median

    def batch_ms(res: WorkloadResult, name: str) -> float:
        r = res.batch.rows.get(name)
        return nan if r is None or r.failed else r.median / K_BATCH

    series: list[tuple[str, list[float], str]] = [
        (m.name, [apply_ms(r, m.name) for r in results], "") for m in METHODS]
    series += [
        (f"{B_FLOOR}, K={K_BATCH}, per tangent", [batch_ms(r, B_FLOOR) for r in results], "//"),
        (f"{B_VMAP}, K={K_BATCH}, per tangent", [batch_ms(r, B_VMAP) for r in results], "//"),
        (f"{B_BATCHED}, K={K_BATCH}, per tangent", [batch_ms(r, B_BATCHED) for r in results],
         "//"),
    ]
    mem_names = [FLOOR, TL, FUNC_LIN]

    def mem_mib(res: WorkloadResult, name: str) -> float:
        r = res.methods[name]
        return nan if r.failed or r.residual_bytes is None else r.residual_bytes / MiB

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 7.5),
                                   gridspec_kw={"width_ratios": [2.4, 1]})
    colors = plt.get_cmap("tab10").colors
    width = 0.84 / len(series)
    for j, (name, values, hatch) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(keys))]
        ax1.bar(xs, [v if v == v else 0 for v in values], width, label=name,
                color=colors[j % len(colors)], hatch=hatch, edgecolor="white", linewidth=0.3)
        for xpos, v in zip(xs, values):
            if v != v:  # failed or not measured: a label at the bottom instead of a bar
                ax1.text(xpos, 0.02, "fails / n/a", rotation=90, ha="center", va="bottom",
                         fontsize=6, transform=ax1.get_xaxis_transform())
    ax1.set_yscale("log")
    ax1.set_xticks(range(len(keys)), keys)
    ax1.set_ylabel("ms per tangent (median, log scale)")
    ax1.set_title("apply: one tangent (batched rows: one K=64 batch / 64)")
    ax1.grid(axis="y", which="both", alpha=0.3)
    ax1.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))

    width = 0.8 / len(mem_names)
    for j, name in enumerate(mem_names):
        vals = [mem_mib(r, name) for r in results]
        xs = [i + (j - (len(mem_names) - 1) / 2) * width for i in range(len(keys))]
        bars = ax2.bar(xs, [v if v == v else 0 for v in vals], width, label=name,
                       color=colors[[m.name for m in METHODS].index(name) % len(colors)])
        ax2.bar_label(bars, labels=[f"{v:.1f}" if v == v else "n/a" for v in vals], fontsize=7)
    ax2.set_xticks(range(len(keys)), keys)
    ax2.set_ylabel("residual memory kept alive (MiB)")
    ax2.set_title("residual memory")
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def render(results: list[WorkloadResult], cfg: Config, args: argparse.Namespace,
           elapsed: float) -> str:
    rows = [row for res in results for row in table_rows(res)]
    new_targets, old_targets, met, checked = targets(results)
    if args.plot_status is None:
        rel = os.path.relpath(os.path.abspath(args.plot),
                              os.path.dirname(os.path.abspath(args.out or args.plot)))
        figure = [f"![per-tangent apply time and residual memory per workload and method]"
                  f"({rel.replace(os.sep, '/')})", "",
                  f"Figure: `{rel}` (left: per-tangent apply time, log scale; right: residual "
                  "memory of floor, torch_linearize.linearize and torch.func.linearize).", ""]
    else:
        figure = [f"(No figure: {args.plot_status}.)", ""]
    out = [
        "# Core CPU benchmark: torch_linearize.linearize vs PyTorch",
        "",
        f"Generated by `{' '.join(['python', 'benchmarks/bench_core.py', *args.argv])}` on "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: torch {torch.__version__}, "
        f"torch_linearize {torch_linearize.__version__} ({_source_state()}"
        f"{'; ' + args.label if args.label else ''}), Python {platform.python_version()}, "
        f"{platform.machine()} ({cpu_model()}) with {os.cpu_count()} logical CPUs, "
        f"torch.set_num_threads({args.threads}), float32. Run took {elapsed:.0f} s "
        f"({cfg.setup_rounds} setup rounds; {cfg.apply_rounds} apply rounds x {cfg.inner} calls; "
        f"{cfg.relin_rounds} re-linearization rounds; {cfg.batch_rounds} batched rounds; "
        "one extra warm-up round each, not recorded). 1-minute load average "
        f"{args.load[0]:.2f} before the run, {args.load[1]:.2f} after it (this process included); "
        f"{args.guard_summary}. Allocator: {args.malloc_desc}.",
        "",
        "Workloads:",
        *(f"- `{res.wl.key}`: {res.wl.title}" for res in results),
        "",
        *figure,
        "All times in ms, medians of individually timed calls; methods interleaved, in a shuffled order each round.",
        "",
        markdown_table(HEADERS, rows),
        "",
        "Columns:",
        "- `1st setup`: the first setup call in this process for this workload (includes one-time "
        "costs: tracing caches, code generation, imports). For `torch_linearize + compile` it "
        "also includes the first application, where Inductor compiles (see the compile table).",
        "- `setup`: median of later setup calls: the `linearize` call for torch_linearize and "
        "torch.func.linearize, `linearize` + `jvp_fn.compile()` for `+ compile` (the compiled "
        "code is reused: no compilation), both `torch.func.vjp` calls for double-vjp, and "
        "computing the precomputed residuals (primal included) for the floor. torch.func.jvp "
        "and forward_ad have no setup (0): they re-run f for every tangent. For torch_linearize "
        "these later calls re-linearize a structure seen before, so they reuse its simplified "
        "program (a function's second linearization at given shapes records the passes, "
        "later ones replay "
        "them; see `_structure_cache.py`); the first linearization of a structure, where the "
        "passes and code generation run, is timed in the same rounds: median " + ", ".join(
            f"{r.wl.key} {fmt_ms(r.new_structure.median)} ms"
            f" ({r.new_structure.median / r.one_jvp.median:.2f}x one torch.func.jvp)"
            for r in results if r.new_structure is not None and len(r.new_structure))
        + ".",
        "- `setup/jvp`: setup divided by one `torch.func.jvp` call timed in the same "
        "interleaved rounds (median: " + ", ".join(
            f"{r.wl.key} {fmt_ms(r.one_jvp.median)}" for r in results) + ").",
        "- `apply`: one tangent applied (median); `IQR`: interquartile range of those timings "
        "relative to the median (the noise).",
        "- `K=1/8/64`: setup + K x apply for K sequential tangents, **computed from the medians**, "
        "not measured.",
        "- `resid. MiB`: residual storage kept alive. torch_linearize: `jvp_fn.residual_bytes` "
        "(the compiled map shares the same residuals); "
        "floor: its precomputed tensors; torch.func.linearize: distinct tensor storages "
        "reachable from the returned function's closure (the constant-folded GraphModule), "
        "excluding primals and weights; n/a where not measured.",
        "",
        "## `jvp_fn.compile()` (torch.compile, Inductor, CPU)",
        "",
        f"Inductor's one-time process start-up (a trivial function compiled first, so that it is "
        f"not charged to the first workload): {fmt_ms(args.inductor_init)} ms. Inductor cache: "
        f"{args.inductor_cache_note}.",
        "",
        markdown_table(["workload", "segments", "1st linearize + compile()", "1st call",
                        "normal call", "compile cost", "(linearize)", "new graphs"],
                       [row for res in results for row in compile_rows(res)]),
        "",
        "- `segments`: `torch.compile`d segments in the map (custom-Function nodes stay "
        "eager; a program without aten operations has none). `1st call`: the first application "
        "of the first compiled map of this workload (Inductor compiles here); `compile cost` = "
        "1st call - normal call (the `apply` median above). `(linearize)`: the `linearize` "
        "setup median, for scale. `new graphs`: dynamo's `unique_graphs` counter increase "
        "during that first call.",
        "",
        "Re-linearizing at a new point with the same shapes (a fresh point for every call), "
        "interleaved:",
        "",
        markdown_table(["workload", R_LIN, R_LIN_CALL, R_LIN_COMPILE, "compiled / eager",
                        "unique_graphs", "recompile check"],
                       [row for res in results for row in relin_rows(res)]),
        "",
        "- `compiled / eager` = (`linearize + compile() + 1st call`) / (`linearize + 1st call`): "
        "~1 means the compiled code was reused. `unique_graphs`: "
        "`torch._dynamo.utils.counters[\"stats\"][\"unique_graphs\"]` before -> after these "
        "rounds (must not grow).",
        f"- Probe (not a workload): {args.probe}",
        "",
        f"## K = {K_BATCH} tangents at once",
        "",
        "Workloads and batched floors from `benchmarks/bench_batch_transpose.py` (the same "
        "functions and points; its custom Function adds a `batched_jvp`, which `vmap(jvp_fn)` "
        f"calls once per batch). `T` has shape `({K_BATCH}, *x.shape)`. "
        "`jvp_fn.batched(T)` is `torch.vmap(jvp_fn)(T)` without torch.vmap's layer where the "
        "program broadcasts a leading batch dim (elementwise operations and custom Functions: "
        "elementwise, custom), torch.vmap otherwise (mlp, pde).",
        "",
        markdown_table(["workload", "method", f"batch of {K_BATCH}", "IQR", "per tangent",
                        "/ batched floor", "per tangent / sequential apply"],
                       [row for res in results for row in batch_rows(res)]),
        "",
        "- `floor, batched`: the hand-written JVP formula with precomputed residuals applied to "
        "the whole batch by broadcasting. `per tangent / sequential apply`: the amortized "
        "per-tangent cost divided by one `torch_linearize.linearize` apply (main table).",
        "",
        "Correctness (relative max error vs torch.func.jvp, tolerance "
        f"{REL_TOL:.0e}, one random tangent; batched rows: the first 4 of the batch):",
        *correctness_lines(results),
        "",
        "## Targets",
        "",
        "Issue \"Performance: linear programs at the hand-written floor\", CPU targets "
        f"({met} of {checked} met{_ties(new_targets)}; apply counts the better of `linearize` and "
        "`linearize + compile`, K=64 the better of `vmap(jvp_fn)` and `jvp_fn.batched(T)`):",
        *new_targets,
        "",
        "Each ratio is a ratio of medians; `[95% CI lo-hi]` is its bootstrap interval (both "
        "sample sets resampled 2000 times), how far it could move on a re-run. The *null "
        "control* is the yardstick itself timed a second time as a separate method in the same "
        "rounds (the floor's apply; one torch.func.jvp call; the batched floor): two identical "
        "calls, so its distance from 1.00x is this machine's resolution for that comparison. "
        "The *placement control* (elementwise, custom: the floor is one multiply by a "
        "residual the map holds too) times the floor's formula on the map's own residual "
        "tensor: equal values, another buffer. Where a 4 MB buffer lives (huge pages, cache "
        "sets) moves a cold 0.1 ms multiply by up to ~25 us, so this row separates that from "
        "the code around the map's multiply (`linearize / that`). "
        "The verdicts use the ratio itself (against the floor's own buffer), not the "
        "interval or the control, with one exception, marked *a tie*: a K=64 method that runs "
        "the batched floor's very kernels on the same operand shapes and layouts can only "
        "differ from it by the Python around them, and reads above 1.00x about half the "
        "time; it counts as met when the median of its per-round ratios to the floor (each "
        "round's machine state divided out) has a 95 % bootstrap interval containing 1.00x.",
        "",
        "Issue-2 targets for torch_linearize.linearize:",
        *old_targets,
        "",
    ]
    return "\n".join(out)


def _source_state() -> str:
    """Which torch_linearize was benchmarked: this checkout's commit (noting uncommitted
    changes under src/), or the directory it was imported from if outside the checkout."""
    import subprocess

    root = REPO_ROOT
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (about two minutes)")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "core_cpu.md"),
                   help="markdown file to write, '' for none (default: "
                   "benchmarks/results/core_cpu.md in this checkout)")
    p.add_argument("--plot", default=os.path.join(RESULTS_DIR, "core_cpu.png"),
                   help="figure to write (matplotlib, PNG), '' for none (default: "
                   "benchmarks/results/core_cpu.png in this checkout)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    p.add_argument("--label", default="",
                   help="free text describing the torch_linearize build, put in the header")
    p.add_argument("--no-guard", action="store_true",
                   help="do not wait for other processes to go quiet between timed rounds")
    p.add_argument("--inductor-cache", choices=("fresh", "default"), default="fresh",
                   help="'fresh' (default): a new, empty Inductor cache directory for this run, "
                   "so compile costs are cold compiles; 'default': the usual cache "
                   "(TORCHINDUCTOR_CACHE_DIR or /tmp/torchinductor_<user>)")
    p.add_argument("--malloc", choices=("default", "pinned"), default="default",
                   help="glibc malloc: defaults, or pinned (reuse freed memory, no per-block mmap; "
                        "see common.pin_malloc)")
    p.add_argument("--only", default="", help="comma-separated workloads: " + ",".join(WORKLOADS))
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # (for the report's header)

    torch.set_num_threads(args.threads)
    # torch.func.linearize's constant folding warns about get_attr nodes; not our concern here
    warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
    torch.manual_seed(0)
    cfg = Config(3, 6, 2, 3, 2) if args.quick else Config(31, 301, 3, 9, 31)
    keys = [k for k in args.only.split(",") if k] or list(WORKLOADS)
    for k in keys:
        if k not in WORKLOADS:
            p.error(f"--only: unknown workload {k!r}; choose from {', '.join(WORKLOADS)}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    args.malloc_desc = "glibc defaults"
    if args.malloc == "pinned":
        args.malloc_desc = pin_malloc()
    load_before = _loadavg()
    if load_before > 0.75 * (os.cpu_count() or 1):
        log(f"warning: the 1-minute load average is {load_before:.1f} before starting; "
            "other processes will distort the timings")
    guard = None if args.no_guard else ContentionGuard(budget_s=20 if args.quick else 240)
    old_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    fresh_cache = None
    if args.inductor_cache == "fresh":
        fresh_cache = tempfile.mkdtemp(prefix="torch_linearize_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh_cache
        args.inductor_cache_note = ("a fresh, empty directory for this run (cold compiles; "
                                    "`--inductor-cache default` to reuse the usual one)")
    else:
        args.inductor_cache_note = (f"the usual directory ({old_cache or 'default'}); "
                                    "compile costs may be cache hits")
    t0 = time.perf_counter()
    try:
        log("Inductor start-up")
        args.inductor_init = inductor_warmup()
        results = []
        for k in keys:
            log(f"workload {k}")
            results.append(run_workload(WORKLOADS[k](), cfg, log, guard))
        args.probe = scalar_probe(log)
    finally:
        if fresh_cache is not None:
            if old_cache is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old_cache
            shutil.rmtree(fresh_cache, ignore_errors=True)
    args.load = (load_before, _loadavg())
    args.guard_summary = guard.summary() if guard is not None else "contention guard off"
    elapsed = time.perf_counter() - t0
    args.plot_status = "not requested (`--plot ''`)"
    if args.plot:
        title = (f"torch_linearize {torch_linearize.__version__} vs PyTorch on CPU: "
                 f"{cpu_model()}, {os.cpu_count()} logical CPUs, {args.threads} threads, "
                 f"torch {torch.__version__}, Python {platform.python_version()}, float32"
                 f"{' (--quick)' if args.quick else ''}, "
                 f"{datetime.datetime.now().strftime('%Y-%m-%d')}")
        try:
            args.plot_status = write_plot(results, args.plot, title)
        except Exception as e:  # a figure problem must not lose the measurements
            args.plot_status = f"plotting failed: {short_reason(e)}"
        if args.plot_status is None:
            log(f"wrote {args.plot}")
        else:
            log(f"no figure: {args.plot_status}")
    text = render(results, cfg, args, elapsed)
    print(text)
    if args.out:
        write_report(text, args.out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
