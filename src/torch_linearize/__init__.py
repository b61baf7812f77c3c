"""torch-linearize: evaluate a PyTorch function once, apply its JVP many times.

Public API:

* :func:`linearize` -- ``y, jvp_fn = linearize(f, *primals)``.
* :class:`LinearMap` -- the type of ``jvp_fn``.
* :func:`trace_jvp` -- opt a custom Function into PyTorch's own forward-AD tracing.
* :func:`register_jvp` -- give a ``torch.library.custom_op`` operator a forward-mode
  (JVP) rule, for ``linearize``, ``torch.func.jvp`` and eager forward AD.
* Errors: :class:`NonLinearTangentError`, :class:`NoForwardADError`,
  :class:`ReleasedError`, :class:`StaleResidualError` (all :class:`LinearizeError`).
"""

from ._api import linearize
from ._custom_function import trace_jvp
from ._custom_op import register_jvp
from ._errors import (
    LinearizeError,
    NoForwardADError,
    NonLinearTangentError,
    ReleasedError,
    StaleResidualError,
)
from ._linear_map import LinearMap

__all__ = [
    "LinearMap",
    "LinearizeError",
    "NoForwardADError",
    "NonLinearTangentError",
    "ReleasedError",
    "StaleResidualError",
    "linearize",
    "register_jvp",
    "trace_jvp",
]

__version__ = "0.1.0"
