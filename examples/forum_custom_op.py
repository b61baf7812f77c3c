"""The forum example, way 2 of 3: a ``torch.library.custom_op`` with ``register_jvp``.

PyTorch's recommended wrapper for a kernel is ``torch.library.custom_op`` (it works
with ``torch.compile`` and has ``register_autograd``/``register_vmap``), but it has no
forward-mode rule: without one, forward AD silently gives a zero tangent.
``torch_linearize.register_jvp`` adds it. Afterwards ``linearize`` runs the kernel
once and the rule once per tangent, ``register_autograd`` gives the transpose, and
``torch.func.jvp`` / eager forward AD work too (they re-run the kernel per tangent).

Run: ``python examples/forum_custom_op.py``
"""

import collections

import torch
from torch import Tensor

import torch_linearize as tl

CALLS = collections.Counter()


@torch.library.custom_op("forum::quadratic", mutates_args=())
def quadratic(x: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """The "kernel": reads raw scalars, like a hand-written kernel would."""
    CALLS["kernel"] += 1
    x, a, b, c = x.item(), a.item(), b.item(), c.item()
    return torch.tensor(a * x**2 + b * x + c, dtype=torch.float64)


@quadratic.register_fake
def _(x, a, b, c):
    return torch.empty((), dtype=torch.float64)


def setup_context(ctx, inputs, output):
    CALLS["setup_context"] += 1
    x, a, b, _ = inputs
    ctx.save_for_forward(x, a, b)  # for the jvp rule
    ctx.save_for_backward(x, a, b)  # for the backward formula


def quadratic_jvp(ctx, dx, da, db, dc):
    CALLS["jvp"] += 1
    x, a, b = ctx.saved_tensors
    # None means "no tangent for this input" (e.g. a constant)
    terms = [(2 * a * x + b, dx), (x**2, da), (x, db), (1.0, dc)]
    return sum(k * t for k, t in terms if t is not None)


def quadratic_backward(ctx, g):
    x, a, b = ctx.saved_tensors
    return g * (2 * a * x + b), g * x**2, g * x, g


quadratic.register_autograd(quadratic_backward, setup_context=setup_context)
tl.register_jvp(quadratic, quadratic_jvp, setup_context=setup_context)  # setup runs once


def analytic_jvp(p, t):
    x, a, b, _ = p
    dx, da, db, dc = t
    return (2 * a * x + b) * dx + x**2 * da + x * db + dc


def main():
    primals = tuple(torch.tensor(v, dtype=torch.float64) for v in (2.0, 3.0, 4.0, 5.0))
    y, jvp_fn = tl.linearize(quadratic, *primals)
    print(f"y = {y.item()} (expected 25)")
    assert y.item() == 25.0
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        t = tuple(torch.randn((), dtype=torch.float64, generator=gen) for _ in range(4))
        dy, want = jvp_fn(*t), analytic_jvp(primals, t)
        print(f"J t = {dy.item():+.6f}   analytic {want.item():+.6f}")
        torch.testing.assert_close(dy, want)
    print(f"linearize calls: {dict(CALLS)}")
    assert CALLS == {"kernel": 1, "setup_context": 1, "jvp": 5}

    grads = jvp_fn.transpose()(torch.tensor(1.0, dtype=torch.float64))
    print(f"gradient (transpose, via register_autograd): {[g.item() for g in grads]}")
    assert [g.item() for g in grads] == [16.0, 4.0, 2.0, 1.0]

    CALLS.clear()
    _, dy = torch.func.jvp(quadratic, primals, t)  # works now, but re-runs the kernel
    torch.testing.assert_close(dy, analytic_jvp(primals, t))
    print(f"torch.func.jvp, one tangent: {dy.item():+.6f}, calls {dict(CALLS)}")


if __name__ == "__main__":
    main()
