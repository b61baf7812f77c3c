"""Shared helpers for the benchmark scripts: interleaved timing, memory accounting, tables.

The machines these run on are small and shared, so every comparison here is made
by *interleaving* the methods being compared (round-robin, with the order rotated
each round) and reporting medians of many individual timings.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "Samples",
    "closure_tensor_bytes",
    "fmt_ms",
    "fmt_ratio",
    "interleave",
    "markdown_table",
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


def time_ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn()`` once; return (elapsed milliseconds, its result)."""
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def interleave(
    methods: dict[str, Callable[[int], Any]],
    rounds: int,
    inner: int = 1,
    on_error: Callable[[str, BaseException], None] | None = None,
    warmup: int = 1,
) -> dict[str, Samples]:
    """Time ``methods`` round-robin and return each one's samples (ms).

    Each round visits every method once, in an order rotated by one each round,
    and times ``inner`` consecutive calls of it individually; a method is called
    as ``fn(i)`` with a running call index (to pick a tangent, say). The
    garbage collector is run between rounds and disabled while timing. The first
    ``warmup`` rounds are run but not recorded. A method that raises is dropped from later rounds and reported through
    ``on_error``.
    """
    names = list(methods)
    out = {n: Samples() for n in names}
    dead: set[str] = set()
    was_enabled = gc.isenabled()
    try:
        for r in range(warmup + rounds):
            gc.collect()
            gc.disable()
            k = r % len(names) if names else 0
            for name in names[k:] + names[:k]:
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
                    if r >= warmup:
                        out[name].add(ms)
            if was_enabled:
                gc.enable()
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
