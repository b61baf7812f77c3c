"""Residuals: tensors computed once at linearize time that the linear program reads.

The table stores each residual once (deduplicated by identity and by exact
view geometry), never clones except to protect a residual from a later
in-place write (copy-on-write), and knows which storages were allocated
during ``linearize`` so that memory can be accounted honestly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "STRUCTURAL_ZERO", "ResidualTable", "ctx_tensors", "distinct_storage_bytes", "snapshot_ctx",
    "storage_key", "storage_nbytes",
]

# The attribute marking the tracer's structural zeros (see _trace._structural_zero).
STRUCTURAL_ZERO = "_torch_linearize_structural_zero"


def storage_key(t: torch.Tensor) -> int | None:
    """Identity of ``t``'s storage (the StorageImpl address), or None if it has none."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def storage_nbytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return 0


def _dedup_storage(t: torch.Tensor) -> int | None:
    """The storage key residuals are deduplicated by (None: ``t`` is not deduplicated)."""
    return storage_key(t) if t.layout == torch.strided and not t._is_zerotensor() else None


def _layout_key(t: torch.Tensor, skey: int) -> tuple:
    return (
        skey,
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
        t.is_conj(),
        t.is_neg(),
    )


class ResidualTable:
    """Residual tensors captured during a trace."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.versions: list[int] = []
        self.origin: list[Any] = []
        self._by_id: dict[int, int] = {}
        self._pin: dict[int, torch.Tensor] = {}  # keeps ids in _by_id valid during the trace
        self.captures: list[int] = []  # how many times each slot was captured
        self._ids: list[list[int]] = []  # the ids in _by_id that map to each slot
        self._empty: dict[tuple, torch.Tensor] = {}  # what freed slots hold, per dtype/device
        self._by_layout: dict[tuple, int] = {}
        self._by_storage: dict[int, list[int]] = {}
        self.copied: list[torch.Tensor] = []  # copies made by capture (allocated here)

    def capture(self, t: torch.Tensor, origin: Any = "") -> int:
        """Return the slot of ``t``, adding it if it is new."""
        idx = self._by_id.get(id(t))
        if idx is not None:
            self.captures[idx] += 1
            return idx
        skey = _dedup_storage(t)
        lkey = None
        if skey is not None and t.device.type != "meta":
            lkey = _layout_key(t, skey)
            idx = self._by_layout.get(lkey)
        if idx is None:
            idx = len(self.tensors)
            # The original object is kept until end_trace(), which swaps in a detached
            # alias (detaching below autograd would not share the version counter).
            if t.is_inference():  # no version counter to guard it by: keep a copy
                t = t.clone()
                self.copied.append(t)
            self.tensors.append(t)
            self.versions.append(t._version)
            self.captures.append(0)
            self._ids.append([])
            self.origin.append(origin)  # an op (stringified lazily) or a description
            if lkey is not None:
                self._by_layout[lkey] = idx
                self._by_storage.setdefault(skey, []).append(idx)
        self._by_id[id(t)] = idx
        self._pin[id(t)] = t
        self._ids[idx].append(id(t))
        self.captures[idx] += 1
        return idx

    def release(self, idx: int) -> bool:
        """Forget one capture of slot ``idx`` (its reader was dropped); the last one frees
        the slot during the trace (it then holds an empty tensor). Returns whether it did."""
        self.captures[idx] -= 1
        if self.captures[idx]:
            return False
        t = self.tensors[idx]
        skey = _dedup_storage(t)
        if skey is not None and t.device.type != "meta":
            self._by_layout.pop(_layout_key(t, skey), None)
            slots = self._by_storage.get(skey)
            if slots is not None and idx in slots:
                slots.remove(idx)
        for k in self._ids[idx]:  # (the objects captured into it, unless copied-on-write)
            if self._by_id.get(k) == idx:
                del self._by_id[k]
                self._pin.pop(k, None)
        self._ids[idx] = []
        empty = self._empty.get((t.dtype, t.device))
        if empty is None:
            empty = self._empty[t.dtype, t.device] = torch.empty(0, dtype=t.dtype, device=t.device)
        self.tensors[idx] = empty
        self.versions[idx] = empty._version
        return True

    def holds(self, skey: int) -> bool:
        """Whether a residual lives in storage ``skey`` (a write to it would be copied first)."""
        return bool(self._by_storage.get(skey))

    def copy_on_write(self, skey: int | None) -> list[torch.Tensor]:
        """Snapshot every residual in storage ``skey`` before that storage is written.

        Returns the new snapshots (allocated by the trace).
        """
        if skey is None:
            return []
        slots = self._by_storage.pop(skey, None)
        if not slots:
            return []
        snaps = []
        for i in slots:
            snap = self.tensors[i].clone()
            self.tensors[i] = snap
            self.versions[i] = snap._version
            snaps.append(snap)
        # Later captures from this storage see the new contents: forget old keys.
        self._by_layout = {k: v for k, v in self._by_layout.items() if k[0] != skey}
        self._by_id = {k: v for k, v in self._by_id.items() if v not in slots}
        self._pin.update((id(s), s) for s in snaps)
        return snaps

    def end_trace(self) -> list[int]:
        """Finish the trace: detach every residual; return slots written since capture.

        A slot is reported when its tensor was written in place after it was
        captured by code the tracer could not see (writes it saw were handled by
        copy-on-write). Afterwards ``versions`` holds the detached aliases'
        versions, for stale checks at application time.
        """
        changed = [i for i, (t, v) in enumerate(zip(self.tensors, self.versions)) if t._version != v]
        self.tensors = [_detach(t) for t in self.tensors]
        self.versions = [t._version for t in self.tensors]
        self._pin.clear()
        self._by_id.clear()
        self._by_layout.clear()
        self._by_storage.clear()
        return changed


def _detach(t: torch.Tensor) -> torch.Tensor:
    """``t.detach()``, still marked if ``t`` is one of the tracer's structural zeros (an
    expanded 0-d zero; the passes then know it is zero without reading it)."""
    d = t.detach()
    if STRUCTURAL_ZERO in t.__dict__:
        d.__dict__[STRUCTURAL_ZERO] = True
    return d


def distinct_storage_bytes(tensors: Iterable[torch.Tensor], only: set[int] | None = None,
                           exclude: set[int] | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors``.

    ``only`` restricts to these storage keys; ``exclude`` skips these.
    """
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t._is_zerotensor():
            continue
        if t.device.type == "meta":
            continue
        k = storage_key(t)
        if k is None or k in seen:
            continue
        if only is not None and k not in only:
            continue
        if exclude is not None and k in exclude:
            continue
        seen.add(k)
        total += storage_nbytes(t)
    return total


def ctx_tensors(ctx: Any, readable_only: bool = False) -> list[torch.Tensor]:
    """Tensors a custom-Function ctx keeps alive (saved tensors and attributes, one level deep).

    ``readable_only``: only those its ``jvp``/``backward`` can read (not PyTorch's own
    bookkeeping of ``mark_dirty``/``mark_non_differentiable``, read once at linearize).
    """
    from torch.utils._pytree import tree_flatten

    found: list[torch.Tensor] = []
    if ctx is None:
        return found
    for name, v in ctx.__dict__.items():
        if readable_only and name in _CTX_BOOKKEEPING:
            continue
        leaves = tree_flatten(v)[0] if isinstance(v, (list, tuple, dict)) else [v]
        found.extend(x for x in leaves if isinstance(x, torch.Tensor))
    return found


# ctx attributes a Function's jvp/backward does not read: PyTorch's mark_dirty and
# mark_non_differentiable records. (LinearizeCtx's own view of the saved tensors is a
# slot, outside the dict, rebuilt from saved_for_forward / to_save.)
_CTX_BOOKKEEPING = frozenset({"dirty_tensors", "non_differentiable"})


def snapshot_ctx(ctx: Any, skey: int) -> list[torch.Tensor]:
    """Copy-on-write for a custom-Function ctx: replace every tensor it can read in storage
    ``skey`` (attributes and saved tensors, one level deep) by a copy, before that storage
    is written in place. Returns the copies."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    snaps: list[torch.Tensor] = []

    def swap(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and storage_key(x) == skey:
            x = x.clone()
            snaps.append(x)
        return x

    for name, v in list(ctx.__dict__.items()):
        if name in _CTX_BOOKKEEPING:
            continue
        if isinstance(v, (list, tuple, dict)):
            leaves, spec = tree_flatten(v)
            new = [swap(x) for x in leaves]
            if any(a is not b for a, b in zip(new, leaves)):
                ctx.__dict__[name] = tree_unflatten(new, spec)
        elif isinstance(v, torch.Tensor):
            ctx.__dict__[name] = swap(v)
    if snaps and hasattr(ctx, "_tl_refresh"):
        ctx._tl_refresh()  # saved_tensors reads the new copies
    return snaps
