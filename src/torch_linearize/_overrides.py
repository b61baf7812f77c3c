"""Python-level overrides for operators whose eager forward-mode AD is wrong.

``linearize`` runs on PyTorch's eager forward-mode AD. Where that engine
silently drops a tangent that ``torch.func.jvp`` honours, the override below
routes the call, *only while the current thread is tracing and only when the
affected argument carries a tangent*, to PyTorch's own decomposition of the
operator into differentiable operations. Everything else goes straight to
PyTorch. The overrides are installed and removed with the custom-Function
hooks (see ``_custom_function.function_patch``).

Found by the per-argument OpInfo sweep (``tests/opinfo_harness.py``, "each").
"""

from __future__ import annotations

import torch

from ._forward_ad import unpack_dual
from ._trace import current_tracer

__all__ = ["install", "uninstall"]

_originals: dict[str, object] = {}


def _has_tangent(t, level) -> bool:
    return isinstance(t, torch.Tensor) and unpack_dual(t, level=level).tangent is not None


def _bce_with_logits(input, target, weight=None, pos_weight=None, reduction=1):
    original = _originals["binary_cross_entropy_with_logits"]
    tracer = current_tracer()
    if tracer is not None and not tracer.paused_depth and (
        _has_tangent(weight, tracer.level) or _has_tangent(pos_weight, tracer.level)
    ):
        # Eager forward AD ignores the tangents of weight/pos_weight for this op.
        from torch._decomp import decomposition_table

        impl = decomposition_table[torch.ops.aten.binary_cross_entropy_with_logits.default]
        return impl(input, target, weight, pos_weight, reduction)
    return original(input, target, weight, pos_weight, reduction)


_OVERRIDES = {"binary_cross_entropy_with_logits": _bce_with_logits}


def install() -> None:
    for name, fn in _OVERRIDES.items():
        _originals[name] = getattr(torch, name)
        setattr(torch, name, fn)


def uninstall() -> None:
    for name in _OVERRIDES:
        setattr(torch, name, _originals.pop(name))
