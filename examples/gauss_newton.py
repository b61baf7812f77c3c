"""Gauss-Newton with J v and J^T u from one linearization per step.

Fits y = p0 * exp(p1 * t) + p2 to noisy data. Each step evaluates the model once
(``linearize``), takes the transpose without re-evaluating it, and solves the
normal equations (J^T J) d = -J^T r matrix-free with conjugate gradients.

Run: ``python examples/gauss_newton.py``
"""

import torch

import torch_linearize as tl


def conjugate_gradient(apply_a, b, iters=50, tol=1e-12):
    """Solve A x = b for symmetric positive definite A given as a function."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    for _ in range(iters):
        ap = apply_a(p)
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        if rr_new.sqrt() < tol:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def main():
    torch.manual_seed(0)
    t_obs = torch.linspace(0, 1, 100, dtype=torch.float64)
    true = torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)

    def model(p):
        return p[0] * torch.exp(p[1] * t_obs) + p[2]

    y_obs = model(true) + 0.01 * torch.randn(100, dtype=torch.float64)

    def residual(p):
        return model(p) - y_obs

    p = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    for step in range(8):
        # one model evaluation; from the third step on, linearize also reuses the
        # simplified program of the earlier steps (the structure is the same)
        r, J = tl.linearize(residual, p)
        JT = J.transpose()  # no re-evaluation
        d = conjugate_gradient(lambda v, J=J, JT=JT: JT(J(v))[0], -JT(r)[0])
        p = p + d
        print(f"step {step}: |r| = {r.norm():.6f}, p = {p.tolist()}")
    print("true parameters:", true.tolist())
    assert torch.allclose(p, true, atol=0.05), p


if __name__ == "__main__":
    main()
