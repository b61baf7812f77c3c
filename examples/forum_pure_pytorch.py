"""The forum example, way 3 of 3: plain PyTorch, no custom code.

When ``f`` is ordinary PyTorch, ``linearize`` needs nothing else: it evaluates ``f``
once and keeps only the tangent operations (multiplications by residuals such as
``2 x`` and ``x**2``, and additions), printed below as the linear program.

Run: ``python examples/forum_pure_pytorch.py``
"""

import torch

import torch_linearize as tl


def quadratic(x, a, b, c):
    return a * x**2 + b * x + c


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
    T = torch.randn(100, 4, dtype=torch.float64, generator=gen)
    batched = torch.vmap(jvp_fn)(*T.unbind(1))  # 100 tangents in one pass
    torch.testing.assert_close(batched, analytic_jvp(primals, T.unbind(1)))
    grads = jvp_fn.transpose()(torch.tensor(1.0, dtype=torch.float64))
    print(f"gradient (transpose): {[g.item() for g in grads]} (expected [16, 4, 2, 1])")
    assert [g.item() for g in grads] == [16.0, 4.0, 2.0, 1.0]
    print(jvp_fn)


if __name__ == "__main__":
    main()
