"""Tests for ``torch_linearize/_trace.py``: what the tracer records from forward AD.

Most of the tracer is exercised through ``linearize`` everywhere else; these tests
pin down its handling of forward AD's structural zeros on non-finite primals, where a
zero evaluated as ``0 * x`` would be NaN.
"""

import pytest
import torch

import torch_linearize as tl

D = torch.float64
NONFINITE = {4: float("inf"), 6: -float("inf")}


def _with_infinities(n=10, seed=0):
    x = torch.randn(n, dtype=D, generator=torch.Generator().manual_seed(seed))
    for i, v in NONFINITE.items():
        x[i] = v
    return x


CASES = {
    # A Python-scalar operand's tangent is a 0-d zero that reaches the tracer as the
    # number 0: forward AD's `other_t * self` must stay an exact zero, not 0 * inf.
    "scalar_times_view": lambda x: 4 * x[1:],
    "view_times_scalar": lambda x: x[1:] * 4,
    "scalar_times": lambda x: 4 * x,
    "divided_by_scalar": lambda x: x / 4,
    "strided_view_divided": lambda x: x[::2] / 4,
    "shift_then_scale": lambda x: (x + 4) * 2,
    "lerp_scalar_weight": lambda x: x.lerp(x * 2, 0.3),
    "addcmul_scalar_value": lambda x: torch.addcmul(x, x, x, value=0.5),
    "times_literal_zero": lambda x: x * 0,
}


@pytest.mark.parametrize("name", list(CASES))
def test_scalar_operands_of_infinite_primals_keep_exact_zero_tangent_terms(name):
    f = CASES[name]
    x = _with_infinities()
    y, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(y, f(x), equal_nan=True)
    for seed in range(2):
        t = torch.randn(10, dtype=D, generator=torch.Generator().manual_seed(10 + seed))
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1], equal_nan=True)


def test_masked_attention_scores_have_finite_tangents():
    # -inf masks are the common source of infinite primals: scaling the masked scores by
    # 1/sqrt(d) must not turn the masked positions' tangents (exact zeros) into NaN.
    scores = torch.randn(4, 6, dtype=D)
    mask = torch.zeros(4, 6, dtype=D)
    mask[:, 3:] = -float("inf")

    def attention(s):
        return torch.softmax((s + mask) / 8.0, dim=-1) * 3

    _, jvp_fn = tl.linearize(attention, scores)
    t = torch.randn(4, 6, dtype=D)
    out = jvp_fn(t)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.func.jvp(attention, (scores,), (t,))[1])


def test_primal_uses_of_zero_products_keep_their_ieee_value():
    # `0 * x` computed by f itself is a primal value: NaN at infinities, as in eager.
    def f(x):
        z = 0 * x  # NaN where x is infinite
        return z + x.sin(), (z * 2).exp()

    x = _with_infinities()
    y, jvp_fn = tl.linearize(f, x)
    want_y = f(x)
    for a, b in zip(y, want_y):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert y[0].isnan()[list(NONFINITE)].all()
    t = torch.randn(10, dtype=D)
    for a, b in zip(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1]):
        torch.testing.assert_close(a, b, equal_nan=True)
