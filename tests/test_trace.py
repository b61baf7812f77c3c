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


MATMULS = {
    "mm": lambda x, w, b: torch.tanh(x @ w),
    "addmm": lambda x, w, b: torch.tanh(torch.addmm(b, x, w, beta=0.5, alpha=2.0)),
    "linear": lambda x, w, b: torch.nn.functional.linear(x, w.t(), b).sin(),
    "bmm": lambda x, w, b: torch.bmm(x.unsqueeze(0).expand(3, -1, -1), w.expand(3, -1, -1)),
    "baddbmm": lambda x, w, b: torch.baddbmm(b.expand(3, 5, -1), x.expand(3, -1, -1),
                                             w.expand(3, -1, -1)),
    "mv": lambda x, w, b: torch.mv(w.t(), x[0]).exp(),
    "transposed": lambda x, w, b: (x.t().contiguous().t() @ w.t().contiguous().t()).cos(),
}


@pytest.mark.parametrize("name", list(MATMULS))
def test_tangent_matmuls_are_recorded_without_being_computed(name):
    from helpers import OpCounter

    f = MATMULS[name]
    x, w, b = torch.randn(5, 4, dtype=D), torch.randn(4, 6, dtype=D), torch.randn(6, dtype=D)
    with OpCounter() as traced:
        y, jvp_fn = tl.linearize(f, x, w, b)
    with OpCounter() as primal:
        f(x, w, b)
    products = ("mm", "addmm", "bmm", "baddbmm", "mv")
    # Each product runs once for the primal; its tangent products are only recorded.
    assert sum(traced.counts[k] for k in products) == sum(primal.counts[k] for k in products)
    torch.testing.assert_close(y, f(x, w, b))
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        t = tuple(torch.randn(p.shape, dtype=D, generator=gen) for p in (x, w, b))
        torch.testing.assert_close(jvp_fn(*t), torch.func.jvp(f, (x, w, b), t)[1])
    # Transposes and batches see the same program.
    t = torch.randn(3, *x.shape, dtype=D), torch.randn(3, *w.shape, dtype=D), \
        torch.randn(3, *b.shape, dtype=D)
    got = torch.vmap(jvp_fn)(*t)
    for k in range(3):
        torch.testing.assert_close(got[k], torch.func.jvp(f, (x, w, b), tuple(a[k] for a in t))[1])


def test_matmul_kernels_return_contiguous_results():
    # The premise of recording tangent products without computing them: the traced
    # result (contiguous zeros) has the layout the real kernel gives at apply time.
    import itertools

    aten = torch.ops.aten
    for m, k, p, ta, tb in itertools.product((0, 1, 3), (1, 4), (1, 5), (False, True), (False, True)):
        a = torch.randn(k, m, dtype=D).t() if ta else torch.randn(m, k, dtype=D)
        b = torch.randn(p, k, dtype=D).t() if tb else torch.randn(k, p, dtype=D)
        outs = [aten.mm.default(a, b), aten.addmm.default(torch.randn(p, dtype=D), a, b),
                aten.bmm.default(a.expand(2, m, k), b.expand(2, k, p)),
                aten.baddbmm.default(torch.randn(m, p, dtype=D), a.expand(2, m, k), b.expand(2, k, p)),
                aten.mv.default(a, torch.randn(k, dtype=D))]
        for o in outs:
            assert o.stride() == torch.empty(o.shape).stride(), (m, k, p, ta, tb, o.shape, o.stride())
