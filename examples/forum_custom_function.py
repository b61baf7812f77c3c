"""The forum example, way 1 of 3: a custom ``torch.autograd.Function``.

``y = a x^2 + b x + c`` computed by a "kernel" that reads raw scalars (``.item()``,
standing in for a hand-written CUDA kernel). ``linearize`` runs ``forward`` and
``setup_context`` once and only ``jvp`` per tangent; ``torch.func.linearize``
cannot trace the ``.item()`` calls at all.

Run: ``python examples/forum_custom_function.py``
"""

import collections

import torch

import torch_linearize as tl

CALLS = collections.Counter()


class Quadratic(torch.autograd.Function):
    @staticmethod
    def forward(x, a, b, c):
        CALLS["forward"] += 1
        x, a, b, c = x.item(), a.item(), b.item(), c.item()
        return torch.tensor(a * x**2 + b * x + c, dtype=torch.float64)

    @staticmethod
    def setup_context(ctx, inputs, output):
        CALLS["setup_context"] += 1
        x, a, b, _ = inputs
        ctx.x, ctx.a, ctx.b = x.item(), a.item(), b.item()

    @staticmethod
    def jvp(ctx, dx, da, db, dc):  # any kernel works here: called with plain tensors
        CALLS["jvp"] += 1
        x, a, b = ctx.x, ctx.a, ctx.b
        d = (2 * a * x + b) * dx.item() + x**2 * da.item() + x * db.item() + dc.item()
        return torch.tensor(d, dtype=torch.float64)

    @staticmethod
    def backward(ctx, g):  # used by jvp_fn.transpose()
        x, a, b = ctx.x, ctx.a, ctx.b
        return g * (2 * a * x + b), g * x**2, g * x, g


def analytic_jvp(p, t):
    x, a, b, _ = p
    dx, da, db, dc = t
    return (2 * a * x + b) * dx + x**2 * da + x * db + dc


def main():
    primals = tuple(torch.tensor(v, dtype=torch.float64) for v in (2.0, 3.0, 4.0, 5.0))
    y, jvp_fn = tl.linearize(Quadratic.apply, *primals)
    print(f"y = {y.item()} (expected 3*4 + 4*2 + 5 = 25)")
    assert y.item() == 25.0
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        t = tuple(torch.randn((), dtype=torch.float64, generator=gen) for _ in range(4))
        dy, want = jvp_fn(*t), analytic_jvp(primals, t)
        print(f"J t = {dy.item():+.6f}   analytic {want.item():+.6f}")
        torch.testing.assert_close(dy, want)
    print(f"calls: {dict(CALLS)}")
    assert CALLS == {"forward": 1, "setup_context": 1, "jvp": 5}
    grads = jvp_fn.transpose()(torch.tensor(1.0, dtype=torch.float64))
    print(f"gradient (transpose): {[g.item() for g in grads]} (expected [16, 4, 2, 1])")
    assert [g.item() for g in grads] == [16.0, 4.0, 2.0, 1.0]
    try:
        torch.func.linearize(Quadratic.apply, *primals)
        print("torch.func.linearize: ran")
    except Exception as e:
        print(f"torch.func.linearize fails: {type(e).__name__}: {str(e).splitlines()[0][:90]}")


if __name__ == "__main__":
    main()
