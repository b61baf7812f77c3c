"""A process-wide, reference-counted forward-AD level.

PyTorch keeps a single global stack of forward-AD levels and refuses nested
levels, so two threads that each called ``torch.autograd.forward_ad.dual_level()``
at the same time would collide. ``linearize`` therefore shares one level between
all concurrent traces: the first trace enters it, the last one out exits it.
Tangents are attached per tensor, so traces in different threads never see each
other's duals.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD

from ._errors import LinearizeError

_lock = threading.Lock()
_users = 0
_level: int | None = None
# PyTorch's own unpack_dual (the tracer patches the public name while it runs: see
# _overrides), and a hook the tracer sets: called with each tensor whose tangent is read
# here, it ends a trace's direct phase if that tensor is tracked in it (its tangent is
# then a forward-AD tangent)
_fw_unpack_dual = fwAD.unpack_dual
tangent_read_hook = None


@contextmanager
def shared_dual_level() -> Iterator[int]:
    """Enter (or join) the shared forward-AD level; exit it when the last user leaves."""
    global _users, _level
    with _lock:
        if _users == 0:
            if fwAD._current_level != -1:
                raise LinearizeError(
                    "linearize(f, *primals): cannot run inside an active "
                    "torch.autograd.forward_ad.dual_level() (PyTorch supports one forward-AD "
                    "level at a time). Call linearize outside the dual_level block."
                )
            _level = fwAD.enter_dual_level()
        _users += 1
        level = _level
    assert level is not None
    try:
        yield level
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                fwAD.exit_dual_level(level=level)
                _level = None


def unpack_dual(t: torch.Tensor, level: int) -> fwAD.UnpackedDualTensor:
    """``forward_ad.unpack_dual``, also for inference tensors: they cannot carry a tangent,
    and PyTorch's own unpack_dual fails on them outside inference mode."""
    if tangent_read_hook is not None:
        tangent_read_hook(t)
    if t.is_inference():
        return fwAD.UnpackedDualTensor(t, None)
    return _fw_unpack_dual(t, level=level)


def has_tangent(t: object, level: int) -> bool:
    """``t`` is a tensor carrying a forward-AD tangent at ``level``."""
    return isinstance(t, torch.Tensor) and unpack_dual(t, level=level).tangent is not None


def materialize_view_tangents(values, level: int) -> None:
    """Read the tangent of every view among ``values``. Forward AD gives a view the
    tangent its base acquired after the view was taken (a buffer written in place with
    tangent data) lazily, as a view of the base's tangent, when it is first read: read
    while the tracer records, that derivation becomes part of the program. Callers that
    then read tangents with the tracer paused (custom-Function inputs) or outside it
    (outputs) find it recorded."""
    for t in values:
        if isinstance(t, torch.Tensor) and t._is_view():
            unpack_dual(t, level=level)
