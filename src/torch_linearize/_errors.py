"""Exceptions raised by torch_linearize.

Every error names what was wrong and what was expected. Bad arguments (a tangent of
the wrong shape, dtype, device or structure) raise plain ``ValueError``/``TypeError``;
what cannot be linearized or applied raises a :class:`LinearizeError`, a
``RuntimeError`` (what ``torch.func`` raises there), so ``except RuntimeError`` clauses
written for ``torch.func`` keep working.
"""

from __future__ import annotations

__all__ = [
    "LinearizeError",
    "NonLinearTangentError",
    "NoForwardADError",
    "ReleasedError",
    "StaleResidualError",
]


class LinearizeError(RuntimeError):
    """Base class for errors raised while linearizing or applying a linear map."""


class NonLinearTangentError(LinearizeError):
    """A tangent was used in a way that is not linear.

    Raised at ``linearize`` time when the traced program reads tangent values
    into Python (``.item()``, ``bool()``, ``torch.equal``), branches on them,
    turns them into integers/booleans, draws random numbers from them, or
    multiplies two tangent-dependent values together.
    """


class NoForwardADError(LinearizeError, NotImplementedError):
    """An operator used by ``f`` has no forward-mode AD formula in PyTorch."""


class ReleasedError(LinearizeError):
    """A linear map was used after :meth:`LinearMap.release`."""


class StaleResidualError(LinearizeError):
    """A tensor the linear map depends on was modified in place after ``linearize``."""
