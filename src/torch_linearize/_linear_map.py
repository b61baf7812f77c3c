"""``LinearMap``: the object ``linearize`` returns (``jvp_fn``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_unflatten

from ._checks import LeafSpec, flatten_tangents
from ._errors import ReleasedError, StaleResidualError
from ._program import Program, Var, format_eqn, type_str

__all__ = ["LinearMap"]

_API = "jvp_fn(*tangents)"


class LinearMap:
    """The Jacobian-vector product of ``f`` at a fixed point, as a reusable linear function.

    Returned by :func:`torch_linearize.linearize`. Calling it with tangents
    structured like the primals returns the tangent of ``f``'s output
    (structured like the output). Applying it runs only the recorded tangent
    operations (and custom Functions' ``jvp``) on residuals computed once.

    Attributes:
        residual_bytes: bytes of the distinct storages allocated during
            ``linearize`` that this map keeps alive.
        external_bytes: bytes of the pre-existing storages it references
            (primals, captured parameters); kept alive, not allocated by it.
    """

    def __init__(
        self,
        program: Program,
        run: Callable[..., tuple],
        in_spec: TreeSpec,
        in_leaves: list[LeafSpec],
        diff_positions: list[int],
        out_spec: TreeSpec,
        stale_watch: list[tuple[torch.Tensor, int, str]],
        residual_bytes: int,
        external_bytes: int,
        opaque_nodes: list[Any],
    ):
        self._program = program
        self._run = run
        self._in_spec = in_spec
        self._in_leaves = in_leaves
        self._diff_positions = diff_positions
        self._out_spec = out_spec
        self._stale_watch = stale_watch
        self._opaque_nodes = opaque_nodes
        self.residual_bytes = residual_bytes
        self.external_bytes = external_bytes
        self._fast = len(in_leaves) == 1 and in_leaves[0].differentiable
        self._released = False

    # ------------------------------------------------------------------ application
    def __call__(self, *tangents: Any) -> Any:
        run = self._run
        if run is None:
            raise ReleasedError(f"{_API}: this linear map was released; call linearize again.")
        if self._fast and len(tangents) == 1 and type(tangents[0]) is torch.Tensor:
            t = tangents[0]
            ls = self._in_leaves[0]
            if t.shape != ls.shape or t.dtype != ls.dtype or t.device != ls.device:
                flatten_tangents(_API, tangents, self._in_spec, self._in_leaves)  # raises
            flat = [t]
        else:
            leaves = flatten_tangents(_API, tangents, self._in_spec, self._in_leaves)
            flat = [leaves[i] for i in self._diff_positions]
        if self._stale_watch:
            self._check_stale()
        return tree_unflatten(list(run(*flat)), self._out_spec)

    def _check_stale(self) -> None:
        for t, version, what in self._stale_watch:
            if t._version != version:
                raise StaleResidualError(
                    f"{_API}: {what} was modified in place after linearize (its version changed "
                    f"from {version} to {t._version}); the linearization no longer matches it. "
                    "Call linearize again at the new point."
                )

    # ------------------------------------------------------------------ memory
    def release(self) -> None:
        """Free the residuals and custom-Function contexts; later calls raise ``ReleasedError``."""
        self._run = None
        self._released = True
        for node in self._opaque_nodes:
            node.release()
        self._opaque_nodes = []
        self._program.residuals = []
        self._program.eqns = []
        self._stale_watch = []
        self.residual_bytes = 0
        self.external_bytes = 0

    @property
    def released(self) -> bool:
        return self._released

    # ------------------------------------------------------------------ introspection
    @property
    def source(self) -> str:
        """The generated Python source of the linear program."""
        return getattr(self._run, "__torch_linearize_source__", "")

    def __repr__(self) -> str:
        if self._released:
            return "LinearMap(<released>)"
        p = self._program
        ins = ", ".join(f"{v}: {type_str(v.shape, v.dtype)}" for v in p.inputs)
        lines = [f"LinearMap(({ins})) {{"]
        for e in p.eqns:
            lines.append("  " + format_eqn(e))
        outs = []
        for o in p.outputs:
            outs.append(repr(o) if isinstance(o, Var) else f"zeros({type_str(o.shape, o.dtype)})")
        lines.append(f"  return ({', '.join(outs)})")
        lines.append("}")
        if p.residuals:
            lines.append("residuals:")
            for i, r in enumerate(p.residuals):
                origin = p.residual_names[i] if i < len(p.residual_names) else ""
                nbytes = r.numel() * r.element_size() if not r._is_zerotensor() else 0
                lines.append(f"  r{i}: {type_str(r.shape, r.dtype)}  {nbytes} B  {origin}".rstrip())
        lines.append(
            f"residual_bytes={self.residual_bytes} (allocated by linearize), "
            f"external_bytes={self.external_bytes} (pre-existing tensors kept alive)"
        )
        return "\n".join(lines)

    @property
    def num_ops(self) -> int:
        """Number of operations in the linear program."""
        return len(self._program.eqns)

