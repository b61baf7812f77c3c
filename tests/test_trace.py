"""Tests for ``torch_linearize/_trace.py``: what the tracer records from forward AD.

Most of the tracer is exercised through ``linearize`` everywhere else; these tests
pin down its handling of forward AD's structural zeros on non-finite primals, where a
zero evaluated as ``0 * x`` would be NaN, the layouts of its shape-only results, and the
scaling chains it folds while tracing (each case against ``torch.func`` in float64 and
float32, where a step must not be folded or its equation must not be released).
"""

import pytest
import torch
from torch.utils._pytree import tree_leaves

import torch_linearize as tl
from helpers import assert_jvp_matches

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


class _ZeroProducts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the products and quotients executed with the number 0 as an operand."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mul, torch.ops.aten.div) and any(
                type(a) in (int, float) and a == 0 for a in args):
            self.n += 1
        return func(*args, **(kwargs or {}))


NUMBER_OPERANDS = {
    "int_times": lambda x: 4 * x[1:-1],
    "times_float": lambda x: x * 2.5,
    "divided_by_int": lambda x: x / 2,
    "float_divided_by": lambda x: 2.5 / x,
    "plus_and_minus": lambda x: (x + 1) - 1.5,
    "polynomial": lambda x: 0.5 * x ** 2 - 3 * x + 1,
}


@pytest.mark.parametrize("name", list(NUMBER_OPERANDS))
def test_number_operands_cost_no_zero_product_kernel(name):
    # forward AD's rule for `c * x` is `x_t * c + 0 * x` with an efficient zero that
    # reaches the tracer as a number: it is an exact zero, and must cost no kernel
    f = NUMBER_OPERANDS[name]
    x = _with_infinities(12, seed=3)
    with _ZeroProducts() as seen:
        y, jvp_fn = tl.linearize(f, x)
    assert seen.n == 0
    torch.testing.assert_close(y, f(x), equal_nan=True)
    g = torch.Generator().manual_seed(4)
    t = torch.randn(12, dtype=D, generator=g)
    want = torch.func.jvp(f, (x,), (t,))[1]
    torch.testing.assert_close(jvp_fn(t), want, equal_nan=True)
    T = torch.randn(3, 12, dtype=D, generator=g)
    got = jvp_fn.batched(T)
    for k in range(3):
        torch.testing.assert_close(got[k], torch.func.jvp(f, (x,), (T[k],))[1], equal_nan=True)
    u = torch.randn_like(y)
    torch.testing.assert_close(jvp_fn.T(u)[0], torch.func.vjp(f, x)[1](u)[0], equal_nan=True)


def test_f_own_products_by_zero_stay_exact_beside_number_operands():
    # The tracer's stand-in for a number's zero tangent must not be taken for a `0 * x`
    # or `0.0 * x` that f computes: those keep NaN at infinities and signed zeros.
    def f(x):
        return 0 * x, 0.0 * x, -0.0 * x, 4 * x, x * 2.5

    x = _with_infinities()
    x[0] = -2.0
    y, jvp_fn = tl.linearize(f, x)
    for a, b in zip(y, f(x)):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(torch.signbit(a), torch.signbit(b))
    t = torch.randn(10, dtype=D)
    for a, b in zip(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1]):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_a_number_zero_kept_as_a_tangent_reads_as_zero():
    # slogdet's formula attaches the efficient zero itself as the sign's tangent (0-d
    # float64, the marker's dtype): read later, as an output or by other operations,
    # it must be zero
    def f(a):
        sign, logabsdet = torch.linalg.slogdet(a)
        return sign, sign * logabsdet, (sign * 2).exp() + logabsdet.sin()

    g = torch.Generator().manual_seed(6)
    a = torch.randn(4, 4, dtype=D, generator=g)
    t = torch.randn(4, 4, dtype=D, generator=g)
    y, jvp_fn = tl.linearize(f, a)
    for p, q in zip(y, f(a)):
        torch.testing.assert_close(p, q)
    for p, q in zip(jvp_fn(t), torch.func.jvp(f, (a,), (t,))[1]):
        torch.testing.assert_close(p, q)


ZERO_D_CONSTANTS = {
    # 0-d tensors without a tangent, of the dtypes of Python numbers (int64, float64):
    # their efficient-zero tangent reaches the tracer as a tensor, not a number
    "times_float64": lambda x, c, k: x * c,
    "where_float64": lambda x, c, k: torch.where(x > 0, x, c),
    "maximum_float64": lambda x, c, k: torch.maximum(x, c),
    "times_int64": lambda x, c, k: x * k,
    "plus_int64": lambda x, c, k: (x + k) * c,
    "lerp_to_constant": lambda x, c, k: torch.lerp(x, c.expand_as(x), 0.3),
}


@pytest.mark.parametrize("name", list(ZERO_D_CONSTANTS))
def test_zero_d_constants_of_number_dtypes_have_zero_tangents(name):
    op = ZERO_D_CONSTANTS[name]
    c, k = torch.tensor(0.75, dtype=D), torch.tensor(3)

    def f(x):
        return op(x, c, k)

    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, dtype=D, generator=g)
    t = torch.randn(7, dtype=D, generator=g)
    y, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(y, f(x))
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1])
    u = torch.randn_like(y)
    torch.testing.assert_close(jvp_fn.T(u)[0], torch.func.vjp(f, x)[1](u)[0])


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


# ----------------------------------------------------------------------------------
# Pointwise tangent arithmetic recorded without being computed (_pointwise_shape_only)


def _layouts(shape, gen):
    """Views with the given shape and many layouts: contiguous, sliced (gaps between rows),
    transposed and permuted, expanded (stride 0), strided steps, channels-last."""
    n = len(shape)
    out = {"contiguous": torch.randn(shape, dtype=D, generator=gen)}
    big = torch.randn([s + 2 for s in shape], dtype=D, generator=gen)
    out["sliced"] = big[tuple(slice(1, s + 1) for s in shape)]
    out["stepped"] = torch.randn([2 * s for s in shape], dtype=D, generator=gen)[
        tuple(slice(None, None, 2) for _ in shape)]
    if n >= 2:
        out["transposed"] = torch.randn(shape[::-1], dtype=D, generator=gen).permute(
            *range(n - 1, -1, -1))
        out["last_two_swapped"] = torch.randn(
            (*shape[:-2], shape[-1], shape[-2]), dtype=D, generator=gen).transpose(-1, -2)
        out["row_expanded"] = torch.randn(shape[-1], dtype=D, generator=gen).expand(shape)
        out["column_expanded"] = torch.randn(
            (*shape[:-1], 1), dtype=D, generator=gen).expand(shape)
    if n == 4:
        out["channels_last"] = torch.randn(shape, dtype=D, generator=gen).contiguous(
            memory_format=torch.channels_last)
    out["zero_expanded"] = torch.zeros((), dtype=D).expand(shape)
    return out


def _operand_sets(gen):
    """(name, args, kwargs) for the pointwise operators, over layouts and broadcasts."""
    aten = torch.ops.aten
    for shape in ((6, 5), (3, 4, 5), (2, 3, 4, 5), (7,), (6, 1), (1, 5), ()):
        views = _layouts(shape, gen) if shape else {"0-d": torch.randn((), dtype=D, generator=gen)}
        extra = {"row": torch.randn(shape[-1:], dtype=D, generator=gen)} if shape else {}
        if len(shape) >= 2:
            extra["col"] = torch.randn((*shape[:-1], 1), dtype=D, generator=gen)
            extra["f32"] = torch.randn(shape, dtype=torch.float32, generator=gen)
        operands = {**views, **extra, "scalar0d": torch.randn((), dtype=D, generator=gen)}
        names = list(views)
        for a in names:
            x = views[a]
            yield f"neg {shape} {a}", aten.neg.default, (x,), {}
            yield f"mul.Scalar {shape} {a}", aten.mul.Scalar, (x, 3.0), {}
            yield f"div.Scalar {shape} {a}", aten.div.Scalar, (x, 4), {}
            yield f"mul number {shape} {a}", aten.mul.Tensor, (x, 2.5), {}
            for b, y in operands.items():
                for fn in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor):
                    yield f"{fn} {shape} {a} {b}", fn, (x, y), {}
                    yield f"{fn} {shape} {b} {a}", fn, (y, x), {}
                yield f"add alpha {shape} {a} {b}", aten.add.Tensor, (x, y), {"alpha": -2}
            yield f"add complex alpha {shape} {a}", aten.add.Tensor, (x, x), {"alpha": 1j}


def test_pointwise_shape_only_layout_is_the_kernels(monkeypatch):
    # The premise of recording pointwise tangent arithmetic without computing it: where
    # _pointwise_shape_only answers, its shape, dtype and strides are the kernel's.
    from torch_linearize import _trace

    monkeypatch.setattr(_trace, "_SHAPE_ONLY_MIN_NUMEL", 0)
    gen = torch.Generator().manual_seed(0)
    taken = declined = 0
    for name, fn, args, kwargs in _operand_sets(gen):
        got = _trace._pointwise_shape_only(args, kwargs)
        if got is None:
            declined += 1
            continue
        taken += 1
        ref = fn(*args, **kwargs)
        assert (got.shape, got.dtype, got.device, got.stride()) == \
            (ref.shape, ref.dtype, ref.device, ref.stride()), name
    # Both answers occur: row-major operands are common, the rest runs the kernel.
    assert taken > 500 and declined > 500, (taken, declined)


def _stencil(u):
    lap = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1]
    return lap - u[1:-1, 1:-1] ** 3


def _mlp(x, w1, b1, w2):
    h = torch.relu(x @ w1 + b1)
    return torch.tanh(h @ w2 / 3) * 2 - h.sum(-1, keepdim=True)


def _broadcasts(x, w1, b1, w2):
    y = x.t()[:80, :80] * b1[:80] - x[:80, :80].mean(0) * 0.5
    return (y / (1 + w1[:80, :80] ** 2) + y.t()).exp()


SHAPE_ONLY_CASES = {
    "stencil": (_stencil, lambda g: (torch.randn(80, 90, dtype=D, generator=g),)),
    "mlp": (_mlp, lambda g: (torch.randn(64, 96, dtype=D, generator=g),
                             torch.randn(96, 128, dtype=D, generator=g) / 10,
                             torch.randn(128, dtype=D, generator=g),
                             torch.randn(128, 64, dtype=D, generator=g) / 10)),
    "broadcasts": (_broadcasts, lambda g: (torch.randn(128, 96, dtype=D, generator=g),
                                           torch.randn(96, 128, dtype=D, generator=g),
                                           torch.randn(128, dtype=D, generator=g),
                                           torch.randn(1, dtype=D, generator=g))),
}


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "duals"])
@pytest.mark.parametrize("name", list(SHAPE_ONLY_CASES))
def test_pointwise_tangent_arithmetic_is_recorded_without_being_computed(name, direct,
                                                                          monkeypatch):
    from torch_linearize import _trace

    monkeypatch.setattr(_trace, "DIRECT", direct)
    f, make = SHAPE_ONLY_CASES[name]
    primals = make(torch.Generator().manual_seed(0))
    taken = []
    real = _trace._pointwise_shape_only

    def counting(args, kwargs):
        out = real(args, kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(_trace, "_pointwise_shape_only", counting)
    y, jvp_fn = tl.linearize(f, *primals)
    # the path under test was taken (the rules of the direct phase write fewer pointwise
    # tangent operations than forward AD's formulas)
    assert sum(taken) >= (1 if direct else 2), taken
    torch.testing.assert_close(y, f(*primals))
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        t = tuple(torch.randn(p.shape, dtype=D, generator=gen) for p in primals)
        torch.testing.assert_close(jvp_fn(*t), torch.func.jvp(f, primals, t)[1])
    t = tuple(torch.randn(3, *p.shape, dtype=D, generator=gen) for p in primals)
    got = torch.vmap(jvp_fn)(*t)
    for k in range(3):
        torch.testing.assert_close(got[k], torch.func.jvp(f, primals, tuple(a[k] for a in t))[1])
    ct = torch.randn(y.shape, dtype=D, generator=gen)
    for got_ct, ref_ct in zip(jvp_fn.transpose()(ct), torch.func.vjp(f, *primals)[1](ct)):
        torch.testing.assert_close(got_ct, ref_ct)


def test_tangents_rooted_at_an_input_are_still_computed_for_folding(monkeypatch):
    # An elementwise chain from an input: its traced tangent *is* the folded coefficient
    # (placeholders are ones), so the tracer computes it and folding reuses it. (Traced on
    # forward-AD duals: `/ 3`'s formula ends the chain there, and the passes fold the rest;
    # in the direct phase the whole chain is folded while traced, as the next test checks.)
    from torch_linearize import _passes, _trace

    monkeypatch.setattr(_trace, "DIRECT", False)

    used = []
    real = _passes._traced_coefficient

    def spy(*a):
        out = real(*a)
        used.append(out is not None)
        return out

    monkeypatch.setattr(_passes, "_traced_coefficient", spy)
    x = torch.randn(128, 64, dtype=D, generator=torch.Generator().manual_seed(0))

    def f(x):
        return torch.tanh(torch.sin(x) * 2) / 3

    y, jvp_fn = tl.linearize(f, x)
    assert any(used)
    t = torch.randn_like(x)
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1])


# ----------------------------------------------------------------- scaling chains
def _chain(x):
    for op in (torch.sin, torch.exp, torch.tanh, torch.cos, torch.sigmoid, torch.log1p,
               torch.erf, torch.atan):
        x = op(x)
    return x


def _live_slots_peak(monkeypatch):
    """Record the most residual slots holding data at any capture during a trace."""
    from torch_linearize._residuals import ResidualTable

    peak = [0]
    capture = ResidualTable.capture

    def counting(self, t, origin=""):
        idx = capture(self, t, origin)
        peak[0] = max(peak[0], sum(1 for r in self.tensors if r.numel()))
        return idx

    monkeypatch.setattr(ResidualTable, "capture", counting)
    return peak


@pytest.mark.parametrize("fold", [True, False])
def test_a_scaling_chain_is_folded_while_traced_and_its_dead_steps_released(monkeypatch, fold):
    monkeypatch.setattr(tl._trace, "FOLD_CHAINS", fold)
    monkeypatch.setattr(tl._api, "simplify", lambda prog: None)  # (what the tracer gives)
    peak = _live_slots_peak(monkeypatch)
    x = torch.randn(50, dtype=D)
    _, jvp_fn = assert_jvp_matches(_chain, x)
    got_t = jvp_fn.T(torch.ones(50, dtype=D))
    torch.testing.assert_close(got_t if isinstance(got_t, tuple) else (got_t,),
                               torch.func.vjp(_chain, x)[1](torch.ones(50, dtype=D)))
    if fold:
        # one coefficient for the whole chain; the trace never held more than the
        # coefficient of the live step, the step before it and its residual
        assert jvp_fn.num_ops == 1 and len(jvp_fn._program.used_residuals()) == 1
        assert jvp_fn.residual_bytes == x.numel() * x.element_size()
        assert peak[0] <= 3
    else:  # (as forward AD computed it: every step and residual, all held to the end)
        assert jvp_fn.num_ops >= 8 and peak[0] >= 8


_W = torch.randn(4, dtype=D, generator=torch.Generator().manual_seed(3))
_P = torch.randn(3, 4, dtype=D, generator=torch.Generator().manual_seed(4))  # (cast below)
_KEPT: list = []

CHAIN_CASES = {
    # where a step must not be folded, or its equation must not be released
    "input_written_between_steps": lambda x: (lambda y: (x.mul_(3), torch.exp(y) * _P.to(x.dtype))[1])(
        torch.sin(x)),
    "step_is_also_an_output": lambda x: (lambda a: (torch.tanh(torch.exp(a)), a))(torch.sin(x)),
    "step_read_twice": lambda x: (lambda a: torch.exp(a) * a)(torch.sin(x)),
    "step_written_in_place": lambda x: (lambda a: torch.exp(a.mul_(2)) * _P.to(x.dtype))(torch.sin(x) * _P.to(x.dtype)),
    "step_viewed": lambda x: (lambda a: torch.exp(a)[1:] + a[:-1])(torch.sin(x) * _P.to(x.dtype)),
    "broadcast_residual": lambda x: torch.exp(torch.sin(x) * _W.to(x.dtype)),
    "numbers_only": lambda x: x * 2 * 3 / 5,
    "two_chains_summed": lambda x: torch.sin(x) * _P.to(x.dtype) - torch.cos(x) * _P.to(x.dtype),
    "steps_kept_alive": lambda x: (_KEPT.append(torch.sin(x)), torch.exp(_KEPT[-1]))[1],
    "two_inputs": lambda x: torch.sin(x) * torch.exp(x.detach() * 2 + torch.cos(x)),
    "transposed_input": lambda x: torch.exp(torch.sin(x.t().contiguous().t())),
    "chain_then_reduction": lambda x: torch.exp(torch.sin(x) * _P.to(x.dtype)).sum(0),
}


@pytest.mark.parametrize("name", list(CHAIN_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scaling_chains_folded_while_traced_match_torch_func(name, dtype):
    f = CHAIN_CASES[name]
    x = torch.randn(3, 4, dtype=D, generator=torch.Generator().manual_seed(1)).to(dtype)
    tol = {} if dtype == D else {"rtol": 1e-5, "atol": 1e-6}
    t = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    u_seed = torch.Generator().manual_seed(5)
    # (f may write its argument, and torch.func.jvp then its tangent: each call gets copies)
    y, jvp_fn = tl.linearize(f, x.clone())
    y_ref, want = torch.func.jvp(f, (x.clone(),), (t.clone(),))
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(jvp_fn(t), want, **tol)
    # the transpose against <u, J e_k> for every basis tangent e_k (forward mode: f writes
    # tensors autograd would have saved)
    us = [torch.randn(a.shape, dtype=dtype, generator=u_seed) for a in tree_leaves(y_ref)]
    u = us[0] if isinstance(y_ref, torch.Tensor) else type(y_ref)(us)
    want_t = torch.zeros(x.numel(), dtype=dtype)
    for k in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=dtype)
        e[k] = 1
        col = tree_leaves(torch.func.jvp(f, (x.clone(),), (e.view(x.shape),))[1])
        want_t[k] = sum((c * w).sum() for c, w in zip(col, us))
    got = jvp_fn.T(u)
    torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, want_t.view(x.shape),
                               **tol)


def test_a_chain_over_python_numbers_stores_no_coefficient():
    x = torch.randn(5, dtype=D)
    _, jvp_fn = tl.linearize(CHAIN_CASES["numbers_only"], x)
    assert jvp_fn.residual_bytes == 0


def test_a_chain_relinearized_at_new_points_reuses_its_program():
    import torch_linearize._structure_cache as sc

    for seed in range(4):
        x = torch.randn(40, dtype=D, generator=torch.Generator().manual_seed(seed))
        assert_jvp_matches(_chain, x, n_tangents=2)
    assert sc.stats["hits"] == 2


def test_a_step_whose_result_is_not_laid_out_like_its_base_is_recorded_as_it_is(monkeypatch):
    # A chain step must produce a contiguous result to be folded; a kernel that returns
    # another layout (forced here: every mul returns a column-major result) makes the
    # tracer record the step as an ordinary equation, with the result it computed.
    info = tl._trace._op_info(torch.ops.aten.mul.Tensor)
    call = info.call

    def column_major(*args, **kwargs):
        r = call(*args, **kwargs)
        return r.t().contiguous().t() if isinstance(r, torch.Tensor) and r.dim() == 2 else r

    recorded_with_result = []
    record = tl._trace.Tracer._record

    def spy(self, func, args, kwargs, info, out=None):
        if out is not None:
            recorded_with_result.append(func)
        return record(self, func, args, kwargs, info, out)

    monkeypatch.setattr(tl._trace.Tracer, "_record", spy)
    f = CHAIN_CASES["chain_then_reduction"]
    x = torch.randn(3, 4, dtype=D)
    object.__setattr__(info, "call", column_major)
    try:
        _, jvp_fn = tl.linearize(f, x)
    finally:
        object.__setattr__(info, "call", call)
    assert recorded_with_result == [torch.ops.aten.mul.Tensor]
    t = torch.randn(3, 4, dtype=D)
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1])


# ------------------------------------------------- in-place operators that return nothing
def _foreach_scaled(x):
    b, c = x.exp(), x.sin()
    torch._foreach_mul_([b, c], 3.0)  # (the schema returns nothing)
    torch._foreach_add_([b, c], [c, b])
    return b - c


def _foreach_scaled_once(x):
    b, c = x.exp(), x.sin()
    torch._foreach_mul_([b, c], 3.0)
    return b + c


def _foreach_into_residual(x):
    w = x.detach().exp()
    y = x * w  # (w is read by y's tangent)
    torch._foreach_zero_([w])  # a write the program must not see later
    return y


@pytest.mark.parametrize("f", [_foreach_scaled, _foreach_scaled_once, _foreach_into_residual])
def test_foreach_in_place_operators_are_seen(f):
    """``_foreach_mul_`` and friends return nothing; until stop 21 the tracer took them
    for metadata queries and ran them unseen: residuals they wrote were not copied first,
    so the map was silently wrong (errors of 6-39 on these functions)."""
    x = torch.randn(5, dtype=torch.float64)
    assert_jvp_matches(f, x.clone(), reference="eager")
    assert_jvp_matches(f, x.clone(), reference="func")


def test_a_foreach_write_into_tangent_values_is_refused_by_name():
    from torch_linearize._forward_ad import unpack_dual

    def f(x):
        y = x * 2
        t = unpack_dual(y, level=0).tangent  # (tangent values themselves, by hand)
        if t is not None:
            torch._foreach_mul_([t], 3.0)
        return y

    with pytest.raises(tl.NoForwardADError, match="_foreach_mul_"):
        tl.linearize(f, torch.randn(3, dtype=torch.float64))


# Operators whose eager forward-AD formula hands a result that is no view the input's
# tangent itself (frac, sub.Scalar) or a view of it (the *_copy operators): an in-place
# operation on the result then changed the input's tangent too (torch.func.jvp gives
# those wrong numbers in PyTorch 2.13). The result gets a tangent of its own.
OWN_TANGENT_CASES = {
    "frac": lambda x: torch.frac(x),
    "sub.Scalar": lambda x: torch.ops.aten.sub.Scalar(x, 1.5),
    "view_copy": lambda x: torch.view_copy(x, (-1,)).view(x.shape),
    "alias_copy": lambda x: torch.alias_copy(x),
    "permute_copy": lambda x: torch.permute_copy(x, (1, 0)).t(),
    "view (a view: shares)": lambda x: x.clone().view(-1).view(x.shape),
}


@pytest.mark.parametrize("name", list(OWN_TANGENT_CASES))
def test_a_result_that_is_no_view_gets_a_tangent_of_its_own(name):
    from helpers import central_difference

    op = OWN_TANGENT_CASES[name]

    def f(x):
        y = op(x)
        y.mul_(2)  # (must not change x's tangent)
        return y + x.sin()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, dtype=D, generator=g) + 3  # (frac: away from integers)
    t = torch.randn(4, 5, dtype=D, generator=g)
    t_before = t.clone()
    y, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(y, f(x))
    want = central_difference(f, (x,), (t,))
    torch.testing.assert_close(jvp_fn(t), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(t, t_before)  # (the caller's tangent is left alone)
    T = torch.randn(3, 4, 5, dtype=D, generator=g)
    got = jvp_fn.batched(T)
    for k in range(3):
        torch.testing.assert_close(got[k], central_difference(f, (x,), (T[k],)), rtol=1e-6,
                                   atol=1e-6)
    u = torch.randn(4, 5, dtype=D, generator=g)
    torch.testing.assert_close((jvp_fn.T(u)[0] * t).sum(), (u * want).sum(), rtol=1e-6,
                               atol=1e-6)
