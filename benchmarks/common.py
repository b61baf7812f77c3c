"""Shared helpers for the benchmark scripts: interleaved timing, memory accounting, tables.

The machines these run on are small and shared, so every comparison here is made
by *interleaving* the methods being compared (each round in a freshly shuffled order,
seeded) and reporting medians of many individual timings.
"""

from __future__ import annotations

import collections
import gc
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "ContentionGuard",
    "Samples",
    "closure_tensor_bytes",
    "count_kernels",
    "kernel_list",
    "fmt_ms",
    "fmt_ratio",
    "interleave",
    "markdown_table",
    "paired_ratio_ci",
    "ratio_ci",
    "short_reason",
    "storage_bytes",
    "storage_key",
    "time_ms",
]


class Samples:
    """Timings (ms) of one method, with the summary statistics the reports use."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def add(self, ms: float) -> None:
        self.values.append(ms)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.1 = 10 %)."""
        v = self.values
        if len(v) < 4:
            return float("nan")
        q = statistics.quantiles(v, n=4)
        return (q[2] - q[0]) / q[1] if q[1] > 0 else float("nan")

    def __len__(self) -> int:
        return len(self.values)


def ratio_ci(num: Samples, den: Samples, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of ``num.median / den.median`` (each sample set resampled
    independently, ``reps`` times, seeded): how far the ratio could move on a re-run."""
    import numpy as np

    a, b = np.asarray(num.values, dtype=float), np.asarray(den.values, dtype=float)
    if len(a) < 4 or len(b) < 4:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    ma = np.median(rng.choice(a, size=(reps, len(a))), axis=1)
    mb = np.median(rng.choice(b, size=(reps, len(b))), axis=1)
    lo, hi = np.quantile(ma / mb, [0.025, 0.975])
    return float(lo), float(hi)


def paired_ratio_ci(num: Samples, den: Samples, reps: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """(median, 95 % bootstrap interval) of the per-round ratios ``num[i] / den[i]``, for
    samples taken in the same :func:`interleave` rounds (one call each per round): each
    round's machine state divides out, so this resolves a smaller difference than
    :func:`ratio_ci`. NaNs where the sample sets are not paired (different lengths)."""
    import numpy as np

    a, b = np.asarray(num.values, dtype=float), np.asarray(den.values, dtype=float)
    if len(a) != len(b) or len(a) < 4:
        return float("nan"), float("nan"), float("nan")
    r = a / b
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(r, size=(reps, len(r))), axis=1)
    lo, hi = np.quantile(meds, [0.025, 0.975])
    return float(np.median(r)), float(lo), float(hi)


RATIO_HEADERS = ["workload", "method", "ms (median)", "IQR", "/ batched floor", "95% CI"]


def ratio_row(key: str, name: str, s: Samples, ref: Samples, digits: int) -> list[str]:
    """A report row under :data:`RATIO_HEADERS`: ``s``'s median (ms) and spread, and its
    ratio to ``ref``'s median with the 95 % bootstrap interval (:func:`ratio_ci`)."""
    lo, hi = ratio_ci(s, ref)
    return [key, name, f"{s.median:.{digits}f}", f"{s.spread:.0%}",
            f"{s.median / ref.median:.{digits}f}x", f"{lo:.{digits}f}-{hi:.{digits}f}"]


def ratio_report(header: str, keys: list[str],
                 methods: Callable[[str], tuple[str, dict[str, Callable[[int], Any]]]],
                 rounds: int, floor: str, digits: int = 2,
                 row: Callable[..., list[str]] = ratio_row) -> str:
    """A benchmark report of several workloads: for each key, ``methods(key)`` gives its
    title and methods, timed in ``rounds`` interleaved rounds; each method's row (``row``,
    :func:`ratio_row`'s arguments) reads its median against the method named ``floor``."""
    rows, titles = [], []
    for key in keys:
        title, fns = methods(key)
        titles.append(f"- `{key}`: {title}")
        samples = interleave(fns, rounds, 1)
        ref = samples[floor]
        rows.extend(row(key, name, s, ref, digits) for name, s in samples.items())
    return "\n".join([header, "", *titles, "", markdown_table(RATIO_HEADERS, rows)])


def machine_line(threads: int) -> str:
    """torch's version, the machine and the thread count, for a report's header."""
    return (f"torch {torch.__version__}, {platform.machine()} with {os.cpu_count()} logical "
            f"CPUs, torch.set_num_threads({threads})")


def time_ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn()`` once; return (elapsed milliseconds, its result)."""
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


class ContentionGuard:
    """Waits while *other* processes keep the CPUs busy, and counts how often they did.

    On a small shared machine a second CPU-bound process makes PyTorch's worker
    threads wait on each other for whole scheduler slices, inflating timings by
    10-100x. Before every timed round the guard samples ``/proc/stat`` for
    ``sample_s`` seconds while this process sleeps (subtracting this process's own
    CPU time), and if other processes used more than ``threshold`` of the CPUs it
    waits until they stop. After ``budget_s`` seconds of waiting in total it stops
    waiting and checking (a run on a machine that stays busy still ends). Not on
    Linux: it does nothing.
    """

    def __init__(self, threshold: float = 0.15, sample_s: float = 0.2,
                 budget_s: float = 120.0) -> None:
        self.threshold = threshold
        self.sample_s = sample_s
        self.budget_s = budget_s
        self.waited_s = 0.0
        self.busy_checks = 0
        self.checks = 0
        self.redone_rounds = 0
        self.enabled = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")

    @staticmethod
    def _snapshot() -> tuple[int, int, int]:
        with open("/proc/stat") as fh:
            cpu = [int(v) for v in fh.readline().split()[1:]]
        with open("/proc/self/stat") as fh:
            own = fh.read().rsplit(")", 1)[1].split()
        total = sum(cpu[:8])
        idle = cpu[3] + cpu[4]
        return total, total - idle, int(own[11]) + int(own[12])  # utime + stime

    def others_busy(self) -> float:
        """Fraction of all CPUs used by other processes over the next ``sample_s`` seconds."""
        if not self.enabled:
            return 0.0
        t1, b1, o1 = self._snapshot()
        time.sleep(self.sample_s)
        t2, b2, o2 = self._snapshot()
        if t2 <= t1:
            return 0.0
        return max(0.0, ((b2 - b1) - (o2 - o1)) / (t2 - t1))

    def is_busy(self) -> bool:
        """Sample once; True if other processes are busy (counted)."""
        self.checks += 1
        busy = self.others_busy() > self.threshold
        self.busy_checks += busy
        return busy

    def wait_idle(self) -> None:
        """Return once other processes are quiet (or the waiting budget is spent)."""
        while self.waited_s < self.budget_s and self.is_busy():
            time.sleep(0.5)
            self.waited_s += 0.5 + self.sample_s

    @property
    def exhausted(self) -> bool:
        """The waiting budget is spent: rounds are no longer held back or re-run."""
        return self.waited_s >= self.budget_s

    def summary(self) -> str:
        if not self.enabled:
            return "contention guard unavailable on this platform"
        return (f"other processes were busy at {self.busy_checks} of {self.checks} checks; "
                f"waited {self.waited_s:.0f} s for them; re-ran {self.redone_rounds} rounds"
                + ("; waiting budget exhausted, later rounds kept as measured"
                   if self.exhausted else ""))


def interleave(
    methods: dict[str, Callable[[int], Any]],
    rounds: int,
    inner: int = 1,
    on_error: Callable[[str, BaseException], None] | None = None,
    warmup: int = 1,
    guard: ContentionGuard | None = None,
) -> dict[str, Samples]:
    """Time ``methods`` round-robin and return each one's samples (ms).

    Each round visits every method once, in a freshly shuffled order (seeded, so
    runs repeat it; a fixed or rotated order would always give a method the same
    predecessor, whose cache and allocator footprint it then inherits), and times
    ``inner`` consecutive calls of it individually; a method is called
    as ``fn(i)`` with a running call index (to pick a tangent, say). The garbage
    collector is run between rounds and disabled while timing. The first
    ``warmup`` rounds are run but not recorded. With a ``guard``, each round starts
    only once other processes are quiet, and a round after which they are busy is
    discarded and run again (at most ``rounds`` times in all). A method that raises
    is dropped from later rounds and reported through ``on_error``.
    """
    names = list(methods)
    rng = random.Random(0)
    out = {n: Samples() for n in names}
    dead: set[str] = set()
    was_enabled = gc.isenabled()
    redo_budget = rounds
    r = 0
    try:
        if guard is not None:
            guard.wait_idle()
        while r < warmup + rounds:
            gc.collect()
            gc.disable()
            order = list(names)
            rng.shuffle(order)
            got: dict[str, list[float]] = {n: [] for n in names}
            for name in order:
                if name in dead:
                    continue
                fn = methods[name]
                for i in range(inner):
                    try:
                        ms, res = time_ms(lambda fn=fn, i=i, r=r: fn(r * inner + i))
                    except Exception as e:
                        dead.add(name)
                        if on_error is not None:
                            on_error(name, e)
                        break
                    del res
                    got[name].append(ms)
            if was_enabled:
                gc.enable()
            if guard is not None and not guard.exhausted and guard.is_busy():
                guard.wait_idle()
                if redo_budget > 0 and not guard.exhausted:
                    redo_budget -= 1
                    guard.redone_rounds += 1
                    continue
            if r >= warmup:
                for name, values in got.items():
                    for v in values:
                        out[name].add(v)
            r += 1
    finally:
        if was_enabled:
            gc.enable()
    return out


def storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    """Identify a tensor's storage (device, data pointer); None if it has none."""
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return (str(t.device), s.data_ptr())


def storage_bytes(tensors: Iterable[torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages of ``tensors``, not counting those of ``exclude``."""
    skip = {storage_key(t) for t in exclude}
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        k = storage_key(t)
        if k is None or k in skip or k in seen:
            continue
        seen[k] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _tensors_in(obj: Any, seen: set[int], depth: int = 0) -> Iterable[torch.Tensor]:
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        for m in obj.modules():
            yield from m.parameters(recurse=False)
            yield from m.buffers(recurse=False)
            for v in vars(m).values():
                if isinstance(v, torch.Tensor):
                    yield v
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors_in(v, seen, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, seen, depth + 1)
    elif callable(obj) and getattr(obj, "__closure__", None):
        for cell in obj.__closure__:
            try:
                v = cell.cell_contents
            except ValueError:  # empty cell
                continue
            yield from _tensors_in(v, seen, depth + 1)


def closure_tensor_bytes(fn: Callable, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of tensors reachable from ``fn``'s closure (and nn.Modules in it), minus ``exclude``.

    Used to estimate what ``torch.func.linearize``'s returned function keeps alive:
    its closure holds a constant-folded ``fx.GraphModule`` whose folded residuals
    are attributes/parameters.
    """
    return storage_bytes(_tensors_in(fn, set()), exclude)


_METADATA_OPS = {"detach", "alias", "is_same_size", "_has_same_storage_numel", "lift_fresh",
                 "_to_copy_meta",
                 # allocations that write nothing (uninitialised or storage-less)
                 "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
                 "_efficientzerotensor"}


def count_kernels(fn: Callable[[], Any], shapes: bool = False) -> collections.Counter:
    """The aten operations that touch tensor data during one call of ``fn`` (by name;
    views, metadata queries and allocations that write nothing left out), as the dispatcher sees them below any
    ``torch.vmap``: what two methods run, compared kernel for kernel. With ``shapes``, each
    is named with its tensor operands' shapes and strides (``mul[64x1000000, 1000000]``,
    a stride tuple added where the layout is not contiguous), so that two methods count
    the same only if they run the same kernels on the same layouts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: collections.Counter = collections.Counter()

    def layout(t: torch.Tensor) -> str:
        s = "x".join(map(str, t.shape)) or "0-d"
        return s if t.is_contiguous() else f"{s} strides {tuple(t.stride())}"

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not func.is_view and name not in _METADATA_OPS:
                if shapes:
                    flat = [b for a in (*args, *(kwargs or {}).values())
                            for b in (a if isinstance(a, (list, tuple)) else (a,))]
                    ops = [layout(a) for a in flat if isinstance(a, torch.Tensor)]
                    name = f"{name}[{', '.join(ops)}]"
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return counts


def kernel_list(counts: collections.Counter) -> str:
    """``count_kernels``' result as text: ``3xadd + addcmul`` (``none`` if empty)."""
    return " + ".join(f"{n}x{name}" if n > 1 else name
                      for name, n in sorted(counts.items())) or "none"


def short_reason(e: BaseException, limit: int = 70) -> str:
    """One line describing an exception, for a table cell."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fmt_ms(v: float | None) -> str:
    """Milliseconds with 3 significant-ish digits."""
    if v is None or v != v:
        return "n/a"
    if v == 0:
        return "0"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_ratio(v: float | None) -> str:
    if v is None or v != v:
        return "n/a"
    return f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with columns padded so it also reads well as plain text."""
    cols = len(headers)
    widths = [len(h) for h in headers]
    for row in rows:
        for i in range(cols):
            widths[i] = max(widths[i], len(row[i]))

    def line(cells: Sequence[str]) -> str:
        parts = []
        for i, c in enumerate(cells):
            # left-align the first two columns (names), right-align numbers
            parts.append(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]))
        return "| " + " | ".join(parts) + " |"

    sep = "| " + " | ".join(
        ("-" * widths[i]) if i < 2 else ("-" * (widths[i] - 1) + ":") for i in range(cols)
    ) + " |"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


MALLOC_HELP = ("default: glibc's own policy, as a plain process has it (or the MALLOC_* "
               "tunables set in the environment); pinned: freed memory is reused (see "
               "common.pin_malloc)")


def choose_malloc(choice: str) -> str:
    """Apply a benchmark's ``--malloc`` choice (``pinned`` or ``default``) and describe the
    allocator for its report."""
    if choice == "pinned":
        return pin_malloc()
    tunables = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    if tunables:
        return f"glibc with the environment's tunables {', '.join(tunables)}"
    return "glibc defaults (large blocks are fresh mmaps, faulted in on first touch)"


def pin_malloc() -> str:
    """Make glibc malloc keep and reuse freed memory (no ``mmap`` per large block, no trimming).

    By default glibc serves every block above its mmap threshold (at most 32 MiB) with a
    fresh ``mmap`` and returns it to the OS on ``free``; the kernel then faults in and zeroes
    every 4 KiB page on first touch, so a 256 MiB batched result costs ~40 ms of system time
    *on some calls*: whether a block is served from a freed heap chunk or from a new mapping
    depends on the allocation history of the whole process. That made batched timings
    bimodal (IQR of several 100 %) and ratios between methods depend on luck. With
    ``M_MMAP_MAX = 0`` and a 2 GiB ``M_TRIM_THRESHOLD`` every method reuses warm memory, as
    with a caching allocator (jemalloc, tcmalloc, PyTorch's CUDA allocator).
    Returns a description for the report.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "glibc defaults (mallopt unavailable)"
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "glibc defaults (mallopt failed)"
    return ("glibc malloc pinned with mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB): freed "
            "memory is reused, never unmapped (see `--malloc`)")


def emit_report(text: str, out: str, script: str, argv: list[str] | None) -> None:
    """Print a report and, with ``out``, also write it there, headed by the command that
    made it (``script``: the benchmark's ``__file__``; ``argv``: its arguments, None for
    the command line's; glibc ``MALLOC_*`` tunables set in the environment included)."""
    print(text)
    if out:
        args = argv if argv is not None else sys.argv[1:]
        env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
        cmd = " ".join([*env, "python", f"benchmarks/{os.path.basename(script)}", *args])
        write_report(f"Generated by `{cmd}`.\n\n{text}\n", out, print)


def write_report(text: str, path: str, log: Callable[[str], None]) -> None:
    """Write a benchmark report (creating its folder) and log where it went."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    log(f"wrote {path}")


def elementwise_chain(x: torch.Tensor) -> torch.Tensor:
    """The benchmarks' elementwise workload: 8 transcendental operations in a row."""
    x = torch.sin(x)
    x = torch.exp(x)
    x = torch.tanh(x)
    x = torch.cos(x)
    x = torch.sigmoid(x)
    x = torch.log1p(x)
    x = torch.erf(x)
    return torch.atan(x)
