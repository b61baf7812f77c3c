"""Batched application, full Jacobians and transposes: torch_linearize vs torch.func (CPU).

Usage::

    python benchmarks/bench_batch_transpose.py [--quick] [--out benchmarks/results/batch_transpose_cpu.md]

On the workloads of ``bench_core.py`` (MLP, elementwise transcendental chain, 2-D
PDE residual, custom ``autograd.Function`` with an expensive forward), in one run:

1. **Batched application** of K (64) tangents at once: ``torch.vmap(jvp_fn)(T)``
   against ``torch.vmap`` of ``torch.func.jvp``, K sequential ``jvp_fn`` calls,
   and the hand-written *batched floor* (the floor's formula applied to the whole
   ``(K, ...)`` batch with precomputed residuals). Target: amortized per-tangent
   cost of ``vmap(jvp_fn)`` <= 1.2x the batched floor.
2. **Full Jacobians** on small versions of the workloads: ``jvp_fn.jacobian()``
   (with and without the ``linearize`` call) against ``torch.func.jacfwd`` and
   ``torch.func.jacrev``.
3. **Transpose** per call: ``jvp_fn.transpose()(u)`` against the ``vjp_fn``
   returned by ``torch.func.vjp`` (reuses saved residuals, no forward) and
   ``torch.func.vjp(f, x)`` followed by one call (forward paid per VJP); plus the
   one-time cost of ``jvp_fn.transpose()``. Target: per call <= 1.2x the call of
   ``torch.func.vjp``'s ``vjp_fn``.

Methods are interleaved, in a shuffled order each round, with
``common.interleave``; every figure is a median of individually timed calls,
float32, ``torch.set_num_threads(2)`` by default, with ``common.ContentionGuard``
holding rounds back while other processes keep the CPUs busy.
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
import torch.nn.functional as F

import torch_linearize

try:  # run as a script (benchmarks/ on sys.path) or as ``python -m benchmarks.bench_batch_transpose``
    import bench_core as core
    from common import (
        ContentionGuard,
        Samples,
        count_kernels,
        elementwise_chain,
        fmt_ms,
        fmt_ratio,
        interleave,
        kernel_list,
        markdown_table,
        pin_malloc,
        short_reason,
        write_report,
    )
except ImportError:  # pragma: no cover
    from benchmarks import bench_core as core
    from benchmarks.common import (
        ContentionGuard,
        Samples,
        count_kernels,
        elementwise_chain,
        fmt_ms,
        fmt_ratio,
        interleave,
        kernel_list,
        markdown_table,
        pin_malloc,
        short_reason,
        write_report,
    )

REL_TOL = 1e-4  # relative max error (|a - ref|_max / |ref|_max), as in bench_core
TARGET = 1.2

TL_VMAP = "torch_linearize: vmap(jvp_fn)"
TL_SEQ = "torch_linearize: K x jvp_fn"
FUNC_VMAP = "torch.func: vmap(jvp(f))"
FLOOR_B = "floor, batched (hand-written)"
FLOOR_SEQ = "floor: K x per-tangent floor"

TL_JAC_ALL = "linearize + jvp_fn.jacobian()"
TL_JAC = "jvp_fn.jacobian() alone"
JACFWD = "torch.func.jacfwd(f)(x)"
JACREV = "torch.func.jacrev(f)(x)"

TL_VJP = "torch_linearize: jvp_fn.T(u)"
FUNC_VJP_CALL = "torch.func.vjp's vjp_fn(u)"
FUNC_VJP_FULL = "torch.func.vjp(f, x) + vjp_fn(u)"
FLOOR_T = "floor: hand-written transpose"
TL_TRANSPOSE = "jvp_fn.transpose() (one time)"
TL_LINEARIZE = "linearize(f, x) (for scale)"
FUNC_VJP_SETUP = "torch.func.vjp(f, x) (no call)"


# --------------------------------------------------------------------------- custom Functions
class NewtonCubicVmap(core.NewtonCubic):
    """bench_core's NewtonCubic with ``generate_vmap_rule = True`` (torch.func can vmap it)."""

    generate_vmap_rule = True


class NewtonCubicBatched(NewtonCubicVmap):
    """... and a ``batched_jvp`` (one call for a whole batch of tangents): what
    torch_linearize calls under ``vmap``. ``backward`` is inherited (one multiply)."""

    @staticmethod
    def batched_jvp(ctx: Any, t: torch.Tensor, _: Any) -> torch.Tensor:
        (d,) = ctx.saved_tensors
        return t * d  # t: (B, n), d: (n,)


# --------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    """One function with its hand-written floors (batched JVP and transpose)."""

    key: str
    title: str
    f: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    floor_setup: Callable[[], Any]  # precomputed residuals
    floor_batched: Callable[[Any, torch.Tensor], torch.Tensor]  # (K, *x.shape) -> (K, *y.shape)
    floor_apply: Callable[[Any, torch.Tensor], torch.Tensor]  # one tangent
    floor_transpose: Callable[[Any, torch.Tensor], torch.Tensor]  # one cotangent
    # further batched floors (name -> batched formula), shown as extra rows
    extra_floors: dict[str, Callable[[Any, torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    target_note: str = ""


def _mlp(batch: int, width: int, layers: int = 4, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    Ws = [torch.randn(width, width, generator=g) / math.sqrt(width) for _ in range(layers)]
    bs = [0.1 * torch.randn(width, generator=g) for _ in range(layers)]
    x = torch.randn(batch, width, generator=g)

    def f(x: torch.Tensor) -> torch.Tensor:
        for W, b in zip(Ws, bs):
            x = torch.tanh(F.linear(x, W, b))
        return x

    return f, x, Ws, bs


def make_mlp() -> Workload:
    base = core.make_mlp()  # the same function, point and weights as bench_core
    Ws = base.existing[1:5]  # existing = [x, *Ws, *bs]

    def floor_setup() -> list[torch.Tensor]:
        return base.floor_setup()

    def floor_batched(hs: list[torch.Tensor], T: torch.Tensor) -> torch.Tensor:
        for W, h in zip(Ws, hs):  # (K, 256, 512) @ (512, 512), * (256, 512) broadcast
            T = (T @ W.T) * h
        return T

    def floor_transpose(hs: list[torch.Tensor], u: torch.Tensor) -> torch.Tensor:
        for W, h in zip(reversed(Ws), reversed(hs)):
            u = (u * h) @ W
        return u

    return Workload("mlp", "MLP 4x tanh(x W^T + b), x 256x512, W 512x512, w.r.t. x", base.f,
                    base.x, floor_setup, floor_batched, base.floor_apply, floor_transpose)


def _elementwise_factors(x: torch.Tensor) -> list[torch.Tensor]:
    """The eight per-op derivative factors of the chain (what an unfused JVP multiplies by)."""
    s = torch.sin(x)
    e = torch.exp(s)
    th = torch.tanh(e)
    c = torch.cos(th)
    sg = torch.sigmoid(c)
    l1 = torch.log1p(sg)
    er = torch.erf(l1)
    return [torch.cos(x), e, 1 - th * th, -torch.sin(th), sg * (1 - sg), 1 / (1 + sg),
            (2 / math.sqrt(math.pi)) * torch.exp(-l1 * l1), 1 / (1 + er * er)]


def make_elementwise() -> Workload:
    base = core.make_elementwise()
    x = base.x

    def floor_setup() -> tuple[torch.Tensor, list[torch.Tensor]]:
        return base.floor_setup(), _elementwise_factors(x)

    def unfolded(s: Any, T: torch.Tensor) -> torch.Tensor:
        for c in s[1]:
            T = T * c
        return T

    return Workload(
        "elementwise", "elementwise chain of 8 transcendental ops, 1e6 (K=64 batch: 64x1e6)",
        base.f, x, floor_setup,
        floor_batched=lambda s, T: T * s[0],
        floor_apply=lambda s, t: t * s[0],
        floor_transpose=lambda s, u: u * s[0],
        extra_floors={"floor, batched, unfolded (8 muls)": unfolded},
        target_note=("the floor folds the 8-op chain into one multiply; an op-by-op JVP "
                     "(torch.func) makes 8 passes over the batch, so bench_core exempts this "
                     "workload from its per-tangent apply target. For reference, the unfolded "
                     "floor (8 muls)"),
    )


def _lap_b(u: torch.Tensor) -> torch.Tensor:
    """bench_core's 5-point Laplacian on the last two dims (works with leading batch dims)."""
    return (u[..., :-2, 1:-1] + u[..., 2:, 1:-1] + u[..., 1:-1, :-2] + u[..., 1:-1, 2:]
            - 4 * u[..., 1:-1, 1:-1])


def _pde_transpose(r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n0, n1 = w.shape[-2] + 2, w.shape[-1] + 2
    g = w.new_zeros(*w.shape[:-2], n0, n1)
    g[..., :-2, 1:-1] += w
    g[..., 2:, 1:-1] += w
    g[..., 1:-1, :-2] += w
    g[..., 1:-1, 2:] += w
    g[..., 1:-1, 1:-1] -= (4 + r) * w
    return g


def make_pde() -> Workload:
    base = core.make_pde()
    return Workload(
        "pde", "2-D PDE residual lap(u) - u^3, 512x512, slicing stencil", base.f, base.x,
        base.floor_setup,
        floor_batched=lambda r, T: _lap_b(T) - r * T[..., 1:-1, 1:-1],
        floor_apply=base.floor_apply,
        floor_transpose=_pde_transpose,
    )


def make_custom() -> Workload:
    base = core.make_custom()
    iters = 16

    def f(x: torch.Tensor) -> torch.Tensor:
        return NewtonCubicBatched.apply(x, iters)

    return Workload(
        "custom", f"custom Function: {iters} Newton steps forward, jvp = 1 mul, 1e6; "
        "`batched_jvp`, `backward` and `generate_vmap_rule = True` (needed by torch.func.vmap)",
        f, base.x, base.floor_setup,
        floor_batched=lambda d, T: T * d,
        floor_apply=lambda d, t: t * d,
        floor_transpose=lambda d, u: u * d,
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "mlp": make_mlp,
    "elementwise": make_elementwise,
    "pde": make_pde,
    "custom": make_custom,
}


@dataclass
class SmallWorkload:
    key: str
    title: str
    f: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor


def small_workloads() -> list[SmallWorkload]:
    """Small versions of the workloads, for full Jacobians."""
    f_mlp, x_mlp, _, _ = _mlp(8, 64)
    g = torch.Generator().manual_seed(11)
    x_el = torch.randn(4096, generator=g)
    u = torch.randn(32, 32, generator=g)
    x_c = 3 * torch.randn(4096, generator=g)
    return [
        SmallWorkload("mlp", "MLP 4x tanh, x 8x64, W 64x64: J 512x512", f_mlp, x_mlp),
        SmallWorkload("elementwise", "elementwise chain, 4096: J 4096x4096 (diagonal)",
                      elementwise_chain, x_el),
        SmallWorkload("pde", "PDE residual 32x32: J 900x1024",
                      lambda u: core._lap(u) - u[1:-1, 1:-1] ** 3, u),
        SmallWorkload("custom", "custom Function (batched_jvp), 4096: J 4096x4096 (diagonal)",
                      lambda x: NewtonCubicBatched.apply(x, 16), x_c),
    ]


# --------------------------------------------------------------------------- helpers
@dataclass
class Row:
    name: str
    samples: Samples | None = None
    failed: str | None = None
    rel_err: float | None = None
    note: str = ""
    faults: int | None = None  # minor page faults of one (warm) call

    @property
    def median(self) -> float:
        if self.failed or self.samples is None or not len(self.samples):
            return float("nan")
        return self.samples.median

    @property
    def spread(self) -> str:
        if self.failed or self.samples is None or len(self.samples) < 4:
            return ""
        return f"{self.samples.spread:.0%}"


def _minor_faults() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on this platform
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _count_faults(fn: Callable[[], Any]) -> int | None:
    """Minor page faults (first touches of freshly mapped memory) during one call of ``fn``."""
    f0 = _minor_faults()
    out = fn()
    f1 = _minor_faults()
    del out
    return None if f0 is None or f1 is None else f1 - f0


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (a - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def _check_and_time(methods: dict[str, Callable[[int], Any]], ref: torch.Tensor | None,
                    to_tensor: Callable[[Any], torch.Tensor], rounds: int, inner: int,
                    guard: ContentionGuard | None, log: Callable[[str], None],
                    label: str, unchecked: frozenset[str] | set[str] = frozenset(),
                    warmup: int = 1, faults: bool = False) -> dict[str, Row]:
    """Run every method once (correctness vs ``ref``), then time the survivors interleaved
    (``warmup`` unrecorded rounds first; the check call already warmed every method up).
    With ``faults``, count the page faults of one more call of each method afterwards."""
    rows = {n: Row(n) for n in methods}
    for name, fn in methods.items():
        try:
            out = to_tensor(fn(0))
            if ref is not None and name not in unchecked:
                rows[name].rel_err = _rel_err(out, ref)
                if not rows[name].rel_err <= REL_TOL:
                    rows[name].failed = f"wrong result (rel. max error {rows[name].rel_err:.1e})"
            del out
        except Exception as e:
            rows[name].failed = short_reason(e)
    live = {n: fn for n, fn in methods.items() if rows[n].failed is None}

    def mark_failed(name: str, e: BaseException) -> None:
        rows[name].failed = short_reason(e)

    log(f"  {label}: {len(live)} methods, {rounds} rounds x {inner}")
    samples = interleave(live, rounds, inner, mark_failed, guard=guard, warmup=warmup)
    for n in live:
        rows[n].samples = samples[n]
    if faults:
        for n, fn in live.items():
            if rows[n].failed is None:
                rows[n].faults = _count_faults(lambda fn=fn: fn(0))
    return rows


# --------------------------------------------------------------------------- section 1: batching
@dataclass
class BatchResult:
    wl: Workload
    k: int
    rows: dict[str, Row]
    primal: Row
    ops: str = ""  # size of torch_linearize's programs
    kernels: dict[str, Any] = field(default_factory=dict)  # method -> Counter of aten kernels


def run_batch(wl: Workload, cfg: Config, log: Callable[[str], None],
              guard: ContentionGuard | None) -> BatchResult:
    f, x, K = wl.f, wl.x, cfg.k
    if guard is not None:
        guard.wait_idle()
    g = torch.Generator().manual_seed(123)
    T = torch.randn(K, *x.shape, generator=g)
    # reference: K separate torch.func.jvp calls (the definition), stacked
    ref = torch.stack([torch.func.jvp(f, (x,), (T[i],))[1] for i in range(K)])
    s = wl.floor_setup()
    _, jvp_fn = torch_linearize.linearize(f, x)
    vmapped = torch.vmap(jvp_fn)
    func_vmapped = torch.vmap(lambda t: torch.func.jvp(f, (x,), (t,))[1])

    methods: dict[str, Callable[[int], Any]] = {
        FLOOR_B: lambda i: wl.floor_batched(s, T),
        **{name: (lambda i, fl=fl: fl(s, T)) for name, fl in wl.extra_floors.items()},
        FLOOR_SEQ: lambda i: [wl.floor_apply(s, T[j]) for j in range(K)],
        TL_VMAP: lambda i: vmapped(T),
        TL_SEQ: lambda i: [jvp_fn(T[j]) for j in range(K)],
        FUNC_VMAP: lambda i: func_vmapped(T),
    }
    if wl.key == "custom":
        # the same Function without batched_jvp: torch_linearize falls back to torch.vmap(jvp)
        # (generate_vmap_rule) or to a per-tangent loop (bench_core's NewtonCubic as is)
        iters = 16
        for cls, name in ((NewtonCubicVmap, "torch_linearize: vmap(jvp_fn), no batched_jvp "
                           "(vmap of jvp)"),
                          (core.NewtonCubic, "torch_linearize: vmap(jvp_fn), plain NewtonCubic "
                           "(per-tangent loop)")):
            _, jf = torch_linearize.linearize(lambda x, cls=cls: cls.apply(x, iters), x)
            vmapped_fallback = torch.vmap(jf)
            methods[name] = lambda i, v=vmapped_fallback: v(T)
        func_vmapped_plain = torch.vmap(lambda t: torch.func.jvp(
            lambda x: core.NewtonCubic.apply(x, iters), (x,), (t,))[1])
        methods["torch.func: vmap(jvp(f)), plain NewtonCubic"] = lambda i: func_vmapped_plain(T)

    def to_tensor(out: Any) -> torch.Tensor:
        return torch.stack(out) if isinstance(out, list) else out

    methods["__primal__"] = lambda i: f(x)
    rows = _check_and_time(methods, ref, to_tensor, cfg.batch_rounds, 1, guard, log,
                           f"[{wl.key}] batched K={K}", unchecked={"__primal__"},
                           warmup=cfg.warmup, faults=True)
    primal = rows.pop("__primal__")
    ops = f"{jvp_fn.num_ops} op(s), transpose {jvp_fn.transpose().num_ops} op(s)"
    kernels = {FLOOR_B: count_kernels(lambda: wl.floor_batched(s, T)),
               TL_VMAP: count_kernels(lambda: vmapped(T))}
    return BatchResult(wl, K, rows, primal, ops, kernels)


# --------------------------------------------------------------------------- section 2: Jacobians
@dataclass
class JacResult:
    wl: SmallWorkload
    rows: dict[str, Row]
    allclose: dict[str, bool]
    jacrev_vs_jacfwd: float


def run_jacobian(wl: SmallWorkload, cfg: Config, log: Callable[[str], None],
                 guard: ContentionGuard | None) -> JacResult:
    f, x = wl.f, wl.x
    if guard is not None:
        guard.wait_idle()
    ref = torch.func.jacfwd(f)(x)
    _, jvp_fn = torch_linearize.linearize(f, x)
    methods: dict[str, Callable[[int], Any]] = {
        TL_JAC_ALL: lambda i: torch_linearize.linearize(f, x)[1].jacobian(),
        TL_JAC: lambda i: jvp_fn.jacobian(),
        JACFWD: lambda i: torch.func.jacfwd(f)(x),
        JACREV: lambda i: torch.func.jacrev(f)(x),
    }
    rows = _check_and_time(methods, ref, lambda o: o, cfg.jac_rounds, cfg.jac_inner, guard, log,
                           f"[{wl.key}] jacobian", warmup=cfg.warmup)
    allclose = {}
    for name, fn in methods.items():
        try:
            allclose[name] = bool(torch.allclose(fn(0), ref, rtol=1e-4, atol=1e-5))
        except Exception:
            allclose[name] = False
    return JacResult(wl, rows, allclose, _rel_err(torch.func.jacrev(f)(x), ref))


# --------------------------------------------------------------------------- section 3: transpose
@dataclass
class TransposeResult:
    wl: Workload
    rows: dict[str, Row]
    setup_rows: dict[str, Row]


def run_transpose(wl: Workload, cfg: Config, log: Callable[[str], None],
                  guard: ContentionGuard | None) -> TransposeResult:
    f, x = wl.f, wl.x
    if guard is not None:
        guard.wait_idle()
    y, jvp_fn = torch_linearize.linearize(f, x)
    g = torch.Generator().manual_seed(7)
    us = [torch.randn(y.shape, generator=g) for _ in range(4)]
    _, func_vjp = torch.func.vjp(f, x)
    ref = func_vjp(us[0])[0]
    vjp_fn = jvp_fn.transpose()
    s = wl.floor_setup()

    methods: dict[str, Callable[[int], Any]] = {
        TL_VJP: lambda i: vjp_fn(us[i % 4]),
        FUNC_VJP_CALL: lambda i: func_vjp(us[i % 4]),
        FUNC_VJP_FULL: lambda i: torch.func.vjp(f, x)[1](us[i % 4]),
        FLOOR_T: lambda i: wl.floor_transpose(s, us[i % 4]),
    }

    def first(o: Any) -> torch.Tensor:
        return o[0] if isinstance(o, tuple) else o

    rows = _check_and_time(methods, ref, first, cfg.t_rounds, cfg.t_inner, guard, log,
                           f"[{wl.key}] transpose per call", warmup=cfg.warmup)

    # one-time transpose() cost: on fresh maps (transpose() is cached per map). A pool of
    # maps covers warm-up, timed and possibly re-run rounds; each is dropped after use.
    n_pool = cfg.warmup + 2 * cfg.ts_rounds + 1  # warm-up, timed and re-run rounds; + check
    pool = [torch_linearize.linearize(f, x)[1] for _ in range(n_pool)]

    def transpose_fresh(i: int) -> Any:
        return pool.pop().transpose() if pool else None

    setup = {
        TL_TRANSPOSE: transpose_fresh,
        TL_LINEARIZE: lambda i: torch_linearize.linearize(f, x),
        FUNC_VJP_SETUP: lambda i: torch.func.vjp(f, x),
    }
    setup_rows = {n: Row(n) for n in setup}
    log(f"  [{wl.key}] transpose setup: {cfg.ts_rounds} rounds")
    samples = interleave(setup, cfg.ts_rounds, 1,
                         lambda n, e: setattr(setup_rows[n], "failed", short_reason(e)),
                         guard=guard, warmup=cfg.warmup)
    for n in setup:
        if setup_rows[n].failed is None:
            setup_rows[n].samples = samples[n]
    if not pool and setup_rows[TL_TRANSPOSE].samples is not None:
        setup_rows[TL_TRANSPOSE].note = "(pool of fresh maps ran out; some samples invalid)"
    pool.clear()
    return TransposeResult(wl, rows, setup_rows)


# --------------------------------------------------------------------------- reporting
@dataclass
class Config:
    k: int
    batch_rounds: int
    jac_rounds: int
    jac_inner: int
    t_rounds: int
    t_inner: int
    ts_rounds: int
    warmup: int = 1  # unrecorded interleaved rounds (besides the correctness-check call)


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def batch_table(results: list[BatchResult]) -> str:
    headers = ["workload", "method", "batch of K (ms)", "IQR", "per tangent (ms)",
               "/ batched floor", "/ K x jvp_fn", "/ torch.func vmap", "page faults"]
    rows = []
    for res in results:
        floor = res.rows[FLOOR_B].median / res.k
        seq = res.rows[TL_SEQ].median / res.k
        fv = res.rows[FUNC_VMAP].median / res.k
        rows.append([res.wl.key, "(primal f(x): one call, for scale)", "", res.primal.spread,
                     fmt_ms(res.primal.median), "", "", "",
                     "" if res.primal.faults is None else str(res.primal.faults)])
        for name, r in res.rows.items():
            if r.failed:
                rows.append([res.wl.key, name, "fails (see Correctness)", "", "", "", "", "", ""])
                continue
            per = r.median / res.k
            rows.append([res.wl.key, name, fmt_ms(r.median), r.spread, fmt_ms(per),
                         fmt_ratio(per / floor), fmt_ratio(per / seq), fmt_ratio(per / fv),
                         "" if r.faults is None else str(r.faults)])
    return markdown_table(headers, rows)


def jac_table(results: list[JacResult]) -> str:
    headers = ["workload", "method", "time (ms)", "IQR", "/ jacfwd", "/ jacrev", "allclose",
               "rel. err"]
    rows = []
    for res in results:
        fwd = res.rows[JACFWD].median
        rev = res.rows[JACREV].median
        for name, r in res.rows.items():
            if r.failed:
                rows.append([res.wl.key, name, "fails (see Correctness)", "", "", "", "", ""])
                continue
            rows.append([res.wl.key, name, fmt_ms(r.median), r.spread, fmt_ratio(r.median / fwd),
                         fmt_ratio(r.median / rev), "yes" if res.allclose.get(name) else "NO",
                         f"{r.rel_err:.0e}" if r.rel_err is not None else ""])
    return markdown_table(headers, rows)


def transpose_table(results: list[TransposeResult]) -> str:
    headers = ["workload", "method", "time (ms)", "IQR", "/ func vjp_fn", "/ floor"]
    rows = []
    for res in results:
        call = res.rows[FUNC_VJP_CALL].median
        floor = res.rows[FLOOR_T].median
        for name, r in res.rows.items():
            if r.failed:
                rows.append([res.wl.key, name, "fails (see Correctness)", "", "", ""])
                continue
            rows.append([res.wl.key, name, fmt_ms(r.median), r.spread, fmt_ratio(r.median / call),
                         fmt_ratio(r.median / floor)])
        for name, r in res.setup_rows.items():
            if r.failed:
                rows.append([res.wl.key, name, "fails (see Correctness)", "", "", ""])
                continue
            rows.append([res.wl.key, name + (" " + r.note if r.note else ""), fmt_ms(r.median),
                         r.spread, fmt_ratio(r.median / call), ""])
    return markdown_table(headers, rows)


def target_lines(batch: list[BatchResult], trans: list[TransposeResult]) -> list[str]:
    lines = []
    for res in batch:
        tl, fl = res.rows[TL_VMAP], res.rows[FLOOR_B]
        k = res.wl.key
        if tl.failed or fl.failed:
            lines.append(f"- {k}: batched <= {TARGET}x batched floor: cannot check "
                         f"(vmap(jvp_fn): {tl.failed}, floor: {fl.failed})")
            continue
        r = tl.median / fl.median
        line = (f"- {k}: batched vmap(jvp_fn) per tangent <= {TARGET}x batched floor: "
                f"{fmt_ms(tl.median / res.k)} vs {fmt_ms(fl.median / res.k)} ms = {r:.2f}x "
                f"-> {_verdict(r <= TARGET)}")
        if res.kernels:
            mine, floors = res.kernels[TL_VMAP], res.kernels[FLOOR_B]
            line += (f"; kernels: vmap(jvp_fn) {kernel_list(mine)}, floor {kernel_list(floors)}"
                     f" ({'the same' if mine == floors else 'different'}; IQR {tl.spread} / "
                     f"{fl.spread})")
        if res.wl.target_note:
            line += f" ({res.wl.target_note}"
            for name in res.wl.extra_floors:
                er = res.rows[name]
                if not er.failed:
                    line += (f": {fmt_ms(er.median / res.k)} ms per tangent, vmap(jvp_fn) / it "
                             f"= {tl.median / er.median:.2f}x")
            line += ")"
        lines.append(line)
    for res in trans:
        tl, fc = res.rows[TL_VJP], res.rows[FUNC_VJP_CALL]
        k = res.wl.key
        if tl.failed or fc.failed:
            lines.append(f"- {k}: transpose per call <= {TARGET}x torch.func vjp_fn: cannot check "
                         f"(jvp_fn.T: {tl.failed}, torch.func: {fc.failed})")
            continue
        r = tl.median / fc.median
        lines.append(f"- {k}: transpose per call <= {TARGET}x torch.func.vjp's vjp_fn call: "
                     f"{fmt_ms(tl.median)} vs {fmt_ms(fc.median)} ms = {r:.2f}x "
                     f"-> {_verdict(r <= TARGET)}")
    return lines


def correctness_lines(batch: list[BatchResult], jac: list[JacResult],
                      trans: list[TransposeResult]) -> list[str]:
    def part(r: Row) -> str:
        if r.failed:
            return f"{r.name} FAILS ({r.failed})"
        return f"{r.name} ok ({r.rel_err:.0e})" if r.rel_err is not None else f"{r.name} n/a"

    lines = []
    for res in batch:
        lines.append(f"- batched {res.wl.key} (vs K stacked torch.func.jvp calls): "
                     + "; ".join(part(r) for r in res.rows.values()))
    for res in jac:
        lines.append(f"- jacobian {res.wl.key} (vs jacfwd; allclose rtol 1e-4, atol 1e-5): "
                     + "; ".join(part(r) + (", allclose" if res.allclose.get(r.name) else
                                            ", NOT allclose") for r in res.rows.values())
                     + f"; jacrev vs jacfwd rel. err {res.jacrev_vs_jacfwd:.0e}")
    for res in trans:
        lines.append(f"- transpose {res.wl.key} (vs torch.func.vjp's vjp_fn): "
                     + "; ".join(part(r) for r in res.rows.values()))
    return lines


def all_ok(batch: list[BatchResult], jac: list[JacResult], trans: list[TransposeResult]) -> bool:
    """Every method that ran agrees with the reference (failing to run is reported separately)."""
    for rows in [r.rows for r in batch] + [r.rows for r in jac] + [r.rows for r in trans]:
        for r in rows.values():
            if r.failed and r.failed.startswith("wrong"):
                return False
    return all(all(res.allclose.values()) for res in jac)


def render(batch: list[BatchResult], jac: list[JacResult], trans: list[TransposeResult],
           cfg: Config, args: argparse.Namespace, elapsed: float) -> str:
    out = [
        "# Batching, Jacobians and transposes: torch_linearize vs torch.func (CPU)",
        "",
        f"Generated by `python benchmarks/bench_batch_transpose.py{' --quick' if args.quick else ''}`"
        f" on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: torch {torch.__version__}, "
        f"torch_linearize {torch_linearize.__version__} ({core._source_state()}), Python "
        f"{platform.python_version()}, {platform.machine()} with {os.cpu_count()} logical CPUs, "
        f"torch.set_num_threads({args.threads}), float32. Run took {elapsed:.0f} s "
        f"(batched: {cfg.batch_rounds} rounds; Jacobians: {cfg.jac_rounds} rounds x "
        f"{cfg.jac_inner} calls; transpose: {cfg.t_rounds} rounds x {cfg.t_inner} calls, "
        f"transpose() setup {cfg.ts_rounds} rounds; "
        + (f"{cfg.warmup} extra warm-up round(s) each, not recorded; " if cfg.warmup else "")
        + "each method also ran once for the correctness check before timing). "
        f"1-minute load average {args.load[0]:.2f} before the run, {args.load[1]:.2f} after it "
        f"(this process included); {args.guard_summary}. Allocator: {args.malloc_desc}.",
        "",
        "All times in ms, medians of individually timed calls; methods interleaved, in a shuffled order each round "
        "(`common.interleave`); `IQR`: interquartile range relative to the median (the noise).",
        "",
    ]
    if batch:
        out += [
        "## 1. Batched application (K tangents at once)",
        "",
        f"K = {cfg.k} tangents, `T` of shape `(K, *x.shape)`. Workloads (as in bench_core; "
        "in brackets the size of torch_linearize's recorded linear programs after its passes):",
        *(f"- `{r.wl.key}`: {r.wl.title} [{r.ops}]" for r in batch),
        "",
        "The elementwise workload keeps bench_core's 1e6 elements also for the batch "
        f"(K x 1e6 float32 = {cfg.k * 4e6 / 2**20:.0f} MiB per batched tensor; memory was not "
        "an issue on this machine, so it was not reduced to 1e5).",
        "",
        batch_table(batch),
        "",
        "- `batch of K`: one call producing all K outputs; `per tangent` = batch / K (amortized). "
        "`K x jvp_fn` / `K x per-tangent floor` are K sequential calls timed as one sample.",
        "- `floor, batched`: the hand-written JVP formula with precomputed residuals applied to "
        "the whole `(K, ...)` batch by broadcasting (MLP `(T @ W.T) * h` per layer; "
        "elementwise `T * r` with the folded derivative `r`; PDE `lap(T) - 3u^2 * T` on the last "
        "two dims; custom `T * d`).",
        "- `torch.func: vmap(jvp(f))`: `torch.vmap(lambda t: torch.func.jvp(f, (x,), (t,))[1])(T)`"
        " (the forward runs once per batch, unbatched, alongside the batched tangents).",
        "- `page faults`: minor page faults during one more (warm) call after timing "
        "(`getrusage`). With glibc's default policy, batched outputs and intermediates of tens "
        "to hundreds of MiB are above malloc's mmap threshold, so such an allocation is often "
        "a fresh mapping whose 4 KiB pages the kernel faults in and zeroes on first touch "
        "(256 MiB = 65 536 faults, ~40 ms), depending on the process's allocation history: "
        "timings became bimodal and method ratios a matter of luck. This run's allocator "
        "setting is in the header; with `pinned`, warm calls should show ~0 faults.",
        "",
        ]
    if jac:
        out += [
        "## 2. Full Jacobians (small sizes)",
        "",
        "Workloads:",
        *(f"- `{r.wl.key}`: {r.wl.title}" for r in jac),
        "",
        jac_table(jac),
        "",
        "- `linearize + jvp_fn.jacobian()`: both calls timed together (what one pays starting "
        "from f); `jvp_fn.jacobian() alone`: on a map linearized beforehand. `allclose`: "
        "`torch.allclose(J, jacfwd, rtol=1e-4, atol=1e-5)`; `rel. err`: relative max error vs "
        "jacfwd.",
        "",
        ]
    if trans:
        out += [
        "## 3. Transpose (VJP) per call",
        "",
        "Workloads: the full-size ones of section 1 (cotangent `u` shaped like `f(x)`).",
        "",
        transpose_table(trans),
        "",
        "- `torch_linearize: jvp_fn.T(u)`: `vjp_fn = jvp_fn.transpose()` made once; one call. "
        "`torch.func.vjp's vjp_fn(u)`: `_, vjp_fn = torch.func.vjp(f, x)` made once; one call "
        "(reuses its saved residuals). `torch.func.vjp(f, x) + vjp_fn(u)`: the forward paid "
        "for every VJP. `floor`: a hand-written transpose with precomputed residuals.",
        "- `jvp_fn.transpose() (one time)`: the first `transpose()` call on a fresh map "
        "(recording and compiling the transposed program; afterwards it is cached). "
        "`linearize(f, x)` and `torch.func.vjp(f, x) (no call)` are timed in the same rounds for "
        "scale. The `/ func vjp_fn` column gives these as multiples of one vjp_fn call.",
        "",
        ]
    out += [
        "## Correctness",
        "",
        f"Relative max error vs the reference, tolerance {REL_TOL:.0e} "
        "(every method is checked once, before timing):",
        *correctness_lines(batch, jac, trans),
        "",
        "All methods agree with their references: "
        + ("yes" if all_ok(batch, jac, trans) else "NO (see above)"),
        "",
        "## Targets",
        "",
        *(target_lines(batch, trans) or ["(none in the selected sections)"]),
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (under a minute)")
    p.add_argument("--out", default="benchmarks/results/batch_transpose_cpu.md",
                   help="markdown file to write (default: %(default)s; '' for none)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    p.add_argument("--k", type=int, default=64, help="tangents per batch (default: 64)")
    p.add_argument("--no-guard", action="store_true",
                   help="do not wait for other processes to go quiet between timed rounds")
    p.add_argument("--only", default="", help="comma-separated workloads: " + ",".join(WORKLOADS))
    p.add_argument("--sections", default="batch,jacobian,transpose",
                   help="comma-separated subset of: batch, jacobian, transpose (default: all)")
    p.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                   help="pinned (default): glibc keeps and reuses freed memory, so no timed call "
                        "pays page faults for fresh mappings; default: glibc's own policy "
                        "(large blocks are fresh mmaps; timings become allocation-history "
                        "dependent)")
    args = p.parse_args(argv)
    args.malloc_desc = pin_malloc() if args.malloc == "pinned" else "glibc defaults (--malloc default)"

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
    torch.manual_seed(0)
    if args.quick:
        cfg = Config(args.k, batch_rounds=3, jac_rounds=3, jac_inner=1, t_rounds=4, t_inner=3,
                     ts_rounds=3, warmup=0)
    else:
        cfg = Config(args.k, batch_rounds=11, jac_rounds=9, jac_inner=3, t_rounds=15, t_inner=5,
                     ts_rounds=9)
    keys = [k for k in args.only.split(",") if k] or list(WORKLOADS)
    for k in keys:
        if k not in WORKLOADS:
            p.error(f"--only: unknown workload {k!r}; choose from {', '.join(WORKLOADS)}")
    sections = {x for x in args.sections.split(",") if x}
    if not sections or not sections <= {"batch", "jacobian", "transpose"}:
        p.error("--sections: choose from batch, jacobian, transpose")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    load_before = core._loadavg()
    if load_before > 0.75 * (os.cpu_count() or 1):
        log(f"warning: the 1-minute load average is {load_before:.1f} before starting; "
            "other processes will distort the timings")
    guard = None if args.no_guard else ContentionGuard(budget_s=15 if args.quick else 60)
    t0 = time.perf_counter()
    batch, jac, trans = [], [], []
    for k in keys if sections & {"batch", "transpose"} else ():
        log(f"workload {k}")
        wl = WORKLOADS[k]()
        for _ in range(2):
            wl.f(wl.x)
        if "batch" in sections:
            batch.append(run_batch(wl, cfg, log, guard))
            log(f"  ({time.perf_counter() - t0:.0f} s)")
        if "transpose" in sections:
            trans.append(run_transpose(wl, cfg, log, guard))
            log(f"  ({time.perf_counter() - t0:.0f} s)")
        del wl
    for swl in small_workloads() if "jacobian" in sections else ():
        if swl.key in keys:
            jac.append(run_jacobian(swl, cfg, log, guard))
            log(f"  ({time.perf_counter() - t0:.0f} s)")
    args.load = (load_before, core._loadavg())
    args.guard_summary = guard.summary() if guard is not None else "contention guard off"
    text = render(batch, jac, trans, cfg, args, time.perf_counter() - t0)
    print(text)
    if args.out:
        write_report(text, args.out, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
