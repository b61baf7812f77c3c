"""An implicit layer whose forward, jvp and backward are built on ``linearize``.

The layer maps ``x`` to the ``y`` that solves ``g(y, x) = y + tanh(A y) / 4 - x = 0``
(``A`` scaled so that ``y -> tanh(A y) / 4`` is a contraction). It is a custom
``autograd.Function``:

* ``forward``: Newton's method. Each step linearizes ``g`` in ``y`` once (``g``
  evaluated once) and solves ``J d = -g`` matrix-free by Richardson iteration,
  ``d <- b - (J - I) d``, applying the linear map a few times.
* ``jvp``: the implicit-function theorem, ``dy = J^{-1} dx`` (``dg/dx = -I``), with
  the same solver on a linearization at the solution.
* ``backward``: ``J^{-T} g``, with the transpose of that linearization (``jvp_fn.T``,
  ``g`` not re-evaluated).

The layer then sits inside a model that is itself linearized; its map and the map's
transpose are checked against central finite differences and the Jacobian.

Run: ``python examples/implicit_layer.py``
"""

import torch

import torch_linearize as tl

D = torch.float64
N = 8
A = torch.randn(N, N, dtype=D, generator=torch.Generator().manual_seed(0))
A = A / torch.linalg.matrix_norm(A, 2)  # spectral norm 1: |J - I| <= 1/4


def g(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y + torch.tanh(A @ y) / 4 - x


def richardson(apply_j, b: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Solve J d = b for J = I + K with |K| < 1, given ``apply_j``: d <- b - K d."""
    d = b.clone()
    for _ in range(iters):
        d = b - (apply_j(d) - d)
    return d


class ImplicitLayer(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        for _ in range(20):
            r, j = tl.linearize(lambda y: g(y, x), y)  # one evaluation of g per step
            y = y + richardson(j, -r)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        _, ctx.j = tl.linearize(lambda y: g(y, x), output)  # J at the solution, reused

    @staticmethod
    def jvp(ctx, dx: torch.Tensor) -> torch.Tensor:
        return richardson(ctx.j, dx)

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> torch.Tensor:
        return richardson(lambda v: ctx.j.T(v)[0], gy)  # u with J^T u = gy


def model(x: torch.Tensor) -> torch.Tensor:
    y = ImplicitLayer.apply(torch.sin(x))
    return y * y.sum()


def main() -> None:
    x = torch.randn(N, dtype=D, generator=torch.Generator().manual_seed(1))
    y = ImplicitLayer.apply(torch.sin(x))
    residual = g(y, torch.sin(x)).abs().max().item()

    _, jvp_fn = tl.linearize(model, x)
    t = torch.randn(N, dtype=D, generator=torch.Generator().manual_seed(2))
    h = 1e-6
    fd = (model(x + h * t) - model(x - h * t)) / (2 * h)
    jvp_err = (jvp_fn(t) - fd).abs().max().item()

    jac = jvp_fn.jacobian()  # N x N, from one batched application
    u = torch.randn(N, dtype=D, generator=torch.Generator().manual_seed(3))
    (vjp,) = jvp_fn.T(u)  # through the layer's backward (the inner map's transpose)
    vjp_err = (vjp - jac.T @ u).abs().max().item()

    print(f"implicit layer: Newton residual {residual:.1e}")
    print(f"model's JVP against central finite differences: max error {jvp_err:.1e}")
    print(f"model's VJP (transpose) against the Jacobian: max error {vjp_err:.1e}")
    ok = residual < 1e-12 and jvp_err < 1e-7 and vjp_err < 1e-12
    print("checks passed" if ok else "CHECKS FAILED")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
