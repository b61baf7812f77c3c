"""Tests for ``torch_linearize/_passes.py``: program simplification.

Every rewrite is checked against ``torch.func.jvp`` (the OpInfo sweep does so for
all operators); here, unit cases for each pass and property-based tests on random
chains of operations (hypothesis).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_linearize as tl
from helpers import OpCounter, check_random_program, eager_jvp, mutating_programs

D = torch.float64


def _check(f, *primals, n=2):
    y, jvp_fn = tl.linearize(f, *primals)
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        ts = tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)
        torch.testing.assert_close(jvp_fn(*ts), torch.func.jvp(f, primals, ts)[1])
    return jvp_fn


def test_elementwise_chain_folds_into_one_multiplication():
    x = torch.randn(50, dtype=D)
    f = lambda x: torch.atan(torch.erf(torch.log1p(torch.sigmoid(torch.cos(torch.tanh(torch.exp(torch.sin(x))))))))
    jvp_fn = _check(f, x)
    assert jvp_fn.num_ops == 1
    t = torch.randn(50, dtype=D)
    with OpCounter() as c:
        jvp_fn(t)
    assert dict(c.counts) == {"mul": 1}
    assert jvp_fn.residual_bytes == x.numel() * x.element_size()


@pytest.mark.parametrize("n_ops", [2, 3])
def test_short_chains_fold_too(n_ops):
    # t * a * b is one multiplication by (a * b): folding pays from two scalings on.
    x = torch.randn(40, dtype=D)
    ops = [torch.sin, torch.exp, torch.tanh][:n_ops]

    def f(x):
        for op in ops:
            x = op(x)
        return x

    jvp_fn = _check(f, x)
    assert jvp_fn.num_ops == 1
    assert jvp_fn.residual_bytes == x.numel() * x.element_size()


def test_scalings_are_not_distributed_over_cancelling_sums():
    # (t - mean(t)) * 2681.1 * 1.3 over a dimension of size 1: exactly 0 as traced.
    # Folded as t*c - mean(t)*c it would be a rounding error of t*c (layer_norm of one
    # element hit this).
    x = torch.randn(64, 1)

    def f(x):
        return (x - x.mean(-1, keepdim=True)) * 2681.1 * 1.3

    _, jvp_fn = tl.linearize(f, x)
    t = torch.randn(64, 1)
    ref = torch.func.jvp(f, (x,), (t,))[1]
    assert torch.equal(ref, torch.zeros_like(ref))
    assert torch.equal(jvp_fn(t), ref)


@pytest.mark.parametrize("select", ["where", "masked_fill", "relu", "hardtanh"])
def test_selections_are_not_folded_into_products(select):
    # A selection returns an exact 0 at unselected positions; a product with a zero
    # coefficient would give NaN there for a non-finite incoming tangent.
    x = torch.linspace(-3, 3, 12, dtype=D)
    mask = x > 0
    ops = {
        "where": lambda v: torch.where(mask, v, 0.0),
        "masked_fill": lambda v: v.masked_fill(~mask, 0.0),
        "relu": lambda v: torch.relu(v - x.detach()),  # selects where v > x (v = sin-chain)
        "hardtanh": lambda v: F.hardtanh(3 * v),
    }

    def f(x):
        return ops[select](x.sin() * 2.5).exp() * 1.5

    _, jvp_fn = tl.linearize(f, x)
    t = torch.randn(12, dtype=D)
    t[~mask] = float("inf")
    ref = torch.func.jvp(f, (x,), (t,))[1]
    torch.testing.assert_close(jvp_fn(t), ref, equal_nan=True)
    u = torch.randn_like(ref)
    torch.testing.assert_close(jvp_fn.T(u)[0], torch.func.vjp(f, x)[1](u)[0], equal_nan=True)


def test_linear_combination_of_several_tangent_values():
    # 5-point stencil plus a pointwise term: 4 additions and one fused multiply-add.
    u = torch.randn(12, 12, dtype=D)

    def pde(u):
        lap = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1]
        return lap - u[1:-1, 1:-1] ** 3

    jvp_fn = _check(pde, u)
    t = torch.randn(12, 12, dtype=D)
    with OpCounter() as c:
        jvp_fn(t)
    arithmetic = {k: v for k, v in c.counts.items() if k not in ("slice",)}
    assert arithmetic == {"add": 3, "addcmul": 1}, c.counts


def test_coefficients_keep_their_broadcast_shape():
    # mul by a row vector: the folded coefficient must stay (1, 64), not (32, 64).
    x = torch.randn(32, 64, dtype=D)
    row = torch.randn(1, 64, dtype=D)
    jvp_fn = _check(lambda x: (x * row).sin() * row, x)
    assert jvp_fn.residual_bytes <= (32 * 64 + 64) * 8


def test_constant_coefficients_become_scalars():
    x = torch.randn(10, dtype=D)
    jvp_fn = _check(lambda x: (3 * x - x / 2) * 4, x)
    assert jvp_fn.num_ops == 1 and jvp_fn.residual_bytes == 0 and jvp_fn.external_bytes == 0


def test_zero_coefficients_keep_ieee_nan_propagation():
    # x * 0 is NaN where the tangent of x is NaN; folding must not drop the term.
    f = lambda x, y: x * 0.0 + y * 2
    x, y = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(f, x, y)
    tx = torch.tensor([1.0, float("nan"), float("inf"), 2.0], dtype=D)
    ty = torch.randn(4, dtype=D)
    torch.testing.assert_close(jvp_fn(tx, ty), torch.func.jvp(f, (x, y), (tx, ty))[1],
                               equal_nan=True)


def test_shared_intermediate_coefficients_are_not_overwritten():
    # a's coefficient feeds two products; in-place updates must not corrupt either.
    r1, r2, r3 = (torch.randn(30, dtype=D) for _ in range(3))

    def f(x):
        a = x.sin()
        b = (a * r1).exp() * r2
        c = (a * r1).cos() * r3
        return b + c, a * r2

    jvp_fn = _check(f, torch.randn(30, dtype=D), n=3)
    assert jvp_fn.num_ops <= 3


def test_common_subexpressions_are_shared():
    x = torch.randn(6, 6, dtype=D)
    jvp_fn = _check(lambda x: x[1:, :].sum(0) @ x[1:, :].T, x)
    slices = [e for e in jvp_fn._program.eqns if "slice" in str(e.fn)]
    assert len(slices) == len({(e.args[1:]) for e in slices})


def test_identity_operations_are_removed():
    x = torch.randn(4, 5, dtype=D)
    w = torch.randn(5, 3, dtype=D)
    b = torch.randn(3, dtype=D)
    jvp_fn = _check(lambda x: F.linear(x, w.T, b), x)  # bias/ZeroTensor terms vanish
    assert {str(e.fn) for e in jvp_fn._program.eqns} <= {"aten.mm.default", "aten.t.default"}


@pytest.mark.parametrize("f", [
    lambda x: torch.cat([x[:1] - 1.0, x[1:-1].sin(), x[-1:] + 2]),
    lambda x: torch.stack([x[0] - 3, 2 - x[-1]]),
], ids=["shifted-ends", "shifted-scalars"])
def test_adding_a_number_leaves_no_operation(f):
    """The tangent of ``u - 1.0`` is recorded as ``t - 0.0`` (forward AD's formula with
    the number's zero tangent): until stop 22 only a zero *residual* made ``add``/``sub``
    an identity, so boundary conditions (``u[0] - a``) each kept a subtraction."""
    x = torch.randn(6, dtype=D)
    jvp_fn = _check(f, x)
    subs = [e for e in jvp_fn._program.eqns if e.fn in (torch.ops.aten.sub.Tensor,
                                                        torch.ops.aten.add.Tensor)]
    assert all(not isinstance(e.args[1], (int, float)) for e in subs), str(jvp_fn)


def test_in_place_updates_block_unsafe_rewrites():
    x = torch.randn(8, dtype=D)

    def f(x):
        y = x.exp()
        z = y * 2
        z.mul_(x.sin())  # in-place on a tangent-carrying value
        return z + y

    _check(f, x)


def test_output_never_aliases_the_callers_tangent():
    x = torch.randn(5, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: (x * 1.0).clone(), x)
    t = torch.randn(5, dtype=D)
    out = jvp_fn(t)
    torch.testing.assert_close(out, t)
    out.add_(1)
    assert not torch.equal(out, t)


def _ops(jvp_fn):
    return [str(e.fn) for e in jvp_fn._program.eqns]


def test_clone_emitted_by_folding_is_removed_in_the_next_round():
    # (b * 2) * 0.5 folds to b itself, emitted as clone(b); the second round of
    # simplify (which runs identities only for such clones) must remove it.
    x = torch.randn(6, dtype=D)
    jvp_fn = _check(lambda x: torch.cumsum(torch.cumsum(x, 0) * 2 * 0.5, 0), x)
    assert _ops(jvp_fn) == ["aten.cumsum.default"] * 2


def test_equal_folded_regions_are_shared_in_the_next_round():
    # Two regions fold to the same mul(b, 6.0): the second round's CSE (run only on
    # what folding emitted) must share it, and then the cumsums of the two.
    x = torch.randn(6, dtype=D)

    def f(x):
        b = torch.cumsum(x, 0)
        return torch.cumsum(b * 3 * 2, 0) - torch.cumsum(b * 2 * 3, 0).flip(0)

    jvp_fn = _check(f, x)
    assert sorted(_ops(jvp_fn)).count("aten.cumsum.default") == 2
    assert _ops(jvp_fn).count("aten.mul.Scalar") == 1


def test_folded_regions_fold_again_in_the_next_round():
    # u = b1 * r1 + b2 * r2 folds to mul + addcmul; (u * w1) * w2 cannot join that
    # region (an inexact scaling of a sum of two tangent values), but once u is an
    # addcmul it is a base of its own and the second round folds u * (w1 * w2).
    x = torch.randn(7, dtype=D)
    w1, w2 = torch.randn(7, dtype=D), torch.randn(7, dtype=D)

    def f(x):
        u = torch.sin(torch.cumsum(x, 0)) + torch.cos(torch.cumsum(x.flip(0), 0))
        return u * w1 * w2

    jvp_fn = _check(f, x)
    assert _ops(jvp_fn).count("aten.mul.Tensor") == 2  # b1 * r1 and u * (w1 * w2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                   torch.complex64, torch.int64, torch.bool])
def test_zero_residual_check_matches_any(dtype):
    # x + r is removed only if r is zero everywhere; the check (aminmax for real floating
    # dtypes) must agree with `not r.any()`: NaN and inf are nonzero, -0.0 is zero.
    from torch_linearize._passes import _all_zero

    specials = [float("nan"), float("inf"), -float("inf"), -0.0, 1e-30, 1.0, -2.0]
    for n in (1, 5, 100, 4099):
        z = torch.zeros(n, dtype=dtype)
        assert _all_zero(z) and _all_zero(z[::2])
        for pos in {0, n // 2, n - 1}:
            for v in specials:
                t = torch.zeros(n, dtype=dtype)
                try:
                    t[pos] = v
                except RuntimeError:
                    continue
                assert _all_zero(t) == (not bool(t.any())), (n, pos, v)


def test_accuracy_guard_keeps_cancelling_sums_unfolded():
    x = torch.randn(20, dtype=D)

    def f(x):  # tangent 1e8 t - (1e8 - 1) t: reassociation changes the rounding
        return x * 1e8 - x * (1e8 - 1)

    jvp_fn = _check(f, x)
    t = torch.randn(20, dtype=D)
    traced = t * 1e8 - t * (1e8 - 1)
    torch.testing.assert_close(jvp_fn(t), traced, rtol=0, atol=0)


def _probe_calls(monkeypatch):
    from torch_linearize import _passes

    calls = []
    real = _passes._folding_is_accurate

    def spy(*a):
        calls.append(real(*a))
        return calls[-1]

    monkeypatch.setattr(_passes, "_folding_is_accurate", spy)
    return calls


def test_accuracy_guard_keeps_cancelling_tensor_coefficients_unfolded(monkeypatch):
    # As above with residual coefficients of opposite signs (the probe decides).
    calls = _probe_calls(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    c = 1e8 + torch.rand(19, dtype=D, generator=gen)
    x = torch.randn(20, dtype=D, generator=gen)

    def f(x):  # (a view as the base: its coefficients are computed, not traced)
        return x[1:] * c - x[1:] * (c - 1)

    jvp_fn = _check(f, x)
    assert calls == [False]
    t = torch.randn(20, dtype=D, generator=gen)
    torch.testing.assert_close(jvp_fn(t), t[1:] * c - t[1:] * (c - 1), rtol=0, atol=0)


def test_same_sign_coefficients_fold_without_the_probe(monkeypatch):
    # A stencil minus u^3: the centre's coefficient is -4 - 3u^2 (both parts <= 0), and
    # the other bases enter with exact unit coefficients: nothing can cancel.
    calls = _probe_calls(monkeypatch)
    u = torch.randn(12, 14, dtype=D, generator=torch.Generator().manual_seed(0))

    def f(u):
        c = u[1:-1, 1:-1]
        return u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * c - c ** 3

    jvp_fn = _check(f, u)
    assert calls == []
    with OpCounter() as counts:
        jvp_fn(torch.randn_like(u))
    assert counts.counts["addcmul"] == 1 and counts.counts["mul"] == 0


def test_mixed_sign_tensor_coefficients_are_probed(monkeypatch):
    # sin and cos of one input change sign: the sum of the two paths may cancel.
    calls = _probe_calls(monkeypatch)
    x = torch.linspace(-3, 3, 50, dtype=D)

    def f(x):
        return x[1:] * torch.sin(x[1:].detach()) + x[1:] * torch.cos(x[1:].detach())

    _check(f, x)
    assert len(calls) == 1


@pytest.mark.parametrize("f", [
    lambda x: torch.view_as_real(x.conj().clone()),
    lambda x: torch.view_as_real(x.conj() + torch.zeros((), dtype=x.dtype)),
    lambda x: torch.view_as_real(x.conj().clone() * 1.0),
    lambda x: torch.view_as_real(x.t().conj().t().clone()),
], ids=["clone", "add_zero", "scaled", "views"])
def test_copies_of_lazily_conjugated_values_are_not_identities(f):
    # conj() is a lazy view (conj bit); a clone or sum resolves it, and view_as_real
    # refuses an unresolved one. Removing such a copy as an identity (or folding it away)
    # left view_as_real a conjugate view at application time.
    x = torch.randn(3, 4, dtype=torch.complex128)
    _check(f, x)


def test_passes_preserve_transpose_and_vmap():
    x = torch.randn(6, dtype=D)
    f = lambda x: torch.tanh(x).exp() * 3 - x.sin()
    _, jvp_fn = tl.linearize(f, x)
    u = torch.randn(6, dtype=D)
    torch.testing.assert_close(jvp_fn.T(u)[0], torch.func.vjp(f, x)[1](u)[0])
    ts = torch.randn(4, 6, dtype=D)
    torch.testing.assert_close(torch.vmap(jvp_fn)(ts),
                               torch.stack([torch.func.jvp(f, (x,), (t,))[1] for t in ts]))


# ----------------------------------------------------------------------------- property tests

_UNARY = [
    torch.sin, torch.exp, torch.tanh, torch.sigmoid, torch.relu, torch.abs, torch.neg,
    lambda v: v * 2.5, lambda v: v / 3.0, lambda v: v.clamp(-0.5, 0.5), F.gelu, F.silu,
    lambda v: torch.where(v > 0, v, 0.1 * v), F.softplus, torch.atan,
]
_BINARY = [torch.add, torch.sub, torch.mul, lambda a, b: a * 0.5 + b.exp()]
_SHAPE = [
    lambda v: v.t(), lambda v: v[1:], lambda v: v.flip(0), lambda v: v.cumsum(0),
    lambda v: v.sum(0, keepdim=True).expand_as(v) if v.dim() else v, lambda v: v.roll(1, 0),
]


@st.composite
def programs(draw):
    """A random function of two (4, 4) tensors built from the operation lists above."""
    steps = draw(st.lists(st.tuples(st.sampled_from(["u", "b", "s"]), st.integers(0, 100),
                                    st.integers(0, 100), st.integers(0, 100)),
                          min_size=1, max_size=12))

    def f(x, y):
        vals = [x, y]
        for kind, i, j, k in steps:
            a, b = vals[i % len(vals)], vals[j % len(vals)]
            if kind == "u":
                v = _UNARY[k % len(_UNARY)](a)
            elif kind == "b":
                v = _BINARY[k % len(_BINARY)](a, b) if a.shape == b.shape else a * 1.5
            else:
                v = _SHAPE[k % len(_SHAPE)](a)
                if v.shape != a.shape:
                    v = torch.cat([v, a[: a.shape[0] - v.shape[0]]]) if v.dim() else v
            vals.append(v)
        return vals[-1] + vals[-2 if len(vals) > 2 else -1].sum() * 0.1

    return f


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), st.integers(0, 2**31 - 1))
def test_random_programs_match_func_jvp_vjp_and_vmap(f, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, dtype=D, generator=gen)
    y = torch.randn(4, 4, dtype=D, generator=gen)
    # (exp of exp can overflow: a NaN where the reference has one is agreement)
    out, jvp_fn = tl.linearize(f, x, y)
    torch.testing.assert_close(out, f(x, y), equal_nan=True)
    tx, ty = torch.randn(4, 4, dtype=D, generator=gen), torch.randn(4, 4, dtype=D, generator=gen)
    torch.testing.assert_close(jvp_fn(tx, ty), torch.func.jvp(f, (x, y), (tx, ty))[1],
                               equal_nan=True)
    u = torch.randn(out.shape, dtype=D, generator=gen)
    got = jvp_fn.transpose()(u)
    want = torch.func.vjp(f, x, y)[1](u)
    torch.testing.assert_close(got, want, equal_nan=True)
    batch = torch.randn(3, 4, 4, dtype=D, generator=gen)
    torch.testing.assert_close(torch.vmap(jvp_fn, in_dims=(0, None))(batch, ty),
                               torch.stack([jvp_fn(b, ty) for b in batch]), equal_nan=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutating_programs(_UNARY), st.integers(0, 2**31 - 1))
def test_random_programs_with_views_and_inplace_writes(f, seed):
    # Views and in-place writes: every value may alias another, and a write through one
    # view changes its base and every other view of it (eager semantics, which linearize
    # and torch.func both follow). This drives the tracer's mutation rules (copy-on-write
    # of residuals, promotion of buffers, input protection) and the passes' handling of
    # mutated groups together.
    check_random_program(f, seed, reference="func")


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex128])
def test_folding_other_dtypes(dtype):
    x = torch.randn(30, dtype=dtype)
    f = lambda x: torch.exp(torch.sin(x)) * 2 - x.tanh()
    y, jvp_fn = tl.linearize(f, x)
    t = torch.randn(30, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1], **tol)
    assert jvp_fn.num_ops == 1


def test_row_major_operands_give_contiguous_results():
    # The premise of the folding layout fast path (_passes._all_contiguous_like): pointwise
    # results of row-major operands of one shape (slices, steps, size-1 dims) and 0-d
    # tensors are allocated contiguous by TensorIterator.
    from torch_linearize._passes import _row_major

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(12, 14, 16, dtype=D)
    views = [base[1:6, 2:8, 3:10], base[:10:2, 1:13:2, ::2][:5, :6, :7], base[3:8, 5:11, 9:16],
             torch.randn(5, 6, 7, dtype=D), base[2:7, 3:9, 4:11].clone()]
    zero_d = torch.tensor(1.5, dtype=D)
    for trial in range(50):
        idx = torch.randint(len(views), (3,), generator=gen).tolist()
        a, b, c = (views[i] for i in idx)
        assert all(_row_major(v.shape, v.stride()) for v in (a, b, c))
        for r in (a * b, torch.addcmul(a, b, c), torch.add(a, b, alpha=2.5), a * zero_d,
                  a.clone(), torch.addcmul(a, b, zero_d)):
            assert r.is_contiguous(), (trial, idx)
    # and a layout that is not row-major is rejected
    assert not _row_major((5, 6), base[0, :5, :6].t().stride())


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 1, 7), (1,), (4, 0, 3)])
def test_probe_coordinates_match_unravel_index(shape):
    from torch_linearize._passes import _unravel

    n = 1
    for d in shape:
        n *= d
    idx = torch.randint(n, (50,)) if n else torch.arange(0)
    ours, ref = _unravel(idx, shape), torch.unravel_index(idx, shape)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_cse_tells_signed_zeros_apart():
    # 0.0 == -0.0 in Python, but t * -0.0 and t * 0.0 differ in the sign of zero.
    def f(x):
        return torch.stack([x * -0.0, x * 0.0, x * -0.0])

    x = torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(f, x)
    t = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=D)
    got, want = jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1]
    assert torch.equal(got.signbit(), want.signbit())
    muls = [e for e in jvp_fn._program.eqns if e.fn is torch.ops.aten.mul.Tensor]
    assert len(muls) == 2  # the repeated x * -0.0 is still shared


# ------------------------------------------------ primals that are views of larger tensors
@pytest.mark.parametrize("view", [lambda b: b[2], lambda b: b[2:5], lambda b: b[:, 1],
                                  lambda b: b[2:5, 1:3]])
def test_a_view_primal_does_not_make_each_application_touch_its_base(view):
    """Forward AD gives a primal that views a larger tensor a tangent buffer the size of
    that tensor's storage; until stop 21 every application allocated and zeroed it (3000x
    slower for a row of a 2000x1000 matrix). A contiguous view's buffer is now a clone."""
    base = torch.randn(20, 10, dtype=torch.float64)
    p = view(base)
    f = lambda a: a.sin() * a
    y, jvp_fn = tl.linearize(f, p)
    for _ in range(2):
        t = torch.randn(p.shape, dtype=torch.float64)
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (p,), (t,))[1])
        torch.testing.assert_close(jvp_fn.T(t)[0], torch.func.vjp(f, p)[1](t)[0])
    T = torch.randn(4, *p.shape, dtype=torch.float64)
    torch.testing.assert_close(jvp_fn.batched(T), torch.stack([jvp_fn(t) for t in T]))
    if p.is_contiguous():
        assert not any(e.name == "fresh_zeros" for e in jvp_fn._program.eqns), str(jvp_fn)
        assert len(jvp_fn._program.eqns) == 1  # (the folded chain: one product)


def test_a_view_primal_read_at_an_absolute_storage_offset_keeps_its_buffer():
    base = torch.randn(20, 10, dtype=torch.float64)
    p = base[2]

    def f(a):
        return a.as_strided((3,), (2,), a.storage_offset() + 1) * 2 + a[:3]

    y, jvp_fn = tl.linearize(f, p)
    for _ in range(2):
        t = torch.randn(p.shape, dtype=torch.float64)
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (p,), (t,))[1])


def test_outputs_the_passes_merge_stay_distinct_tensors():
    """``y`` and ``y.clone()`` (or ``2 * x`` and ``x * 2``) have one tangent after CSE; until
    stop 21 jvp_fn returned one tensor for both, so writing into one result in place
    silently changed the other. The same object returned twice may stay one."""
    x, t = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)

    def f(x):
        y = x.sin()
        return y, y.clone(), x * 2, 2 * x, y

    _, jvp_fn = tl.linearize(f, x)
    want = torch.func.jvp(f, (x,), (t,))[1]
    got = jvp_fn(t)
    assert got[0] is not got[1] and got[2] is not got[3]
    got[0].mul_(0)
    got[2].mul_(0)
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[3], want[3])
    for k in range(2):  # (the re-linearized structure: the cached program)
        _, again = tl.linearize(f, x + k)
        out = again(t)
        assert out[0] is not out[1] and out[2] is not out[3]


@pytest.mark.parametrize("f,vjp_is_transpose", [
    (lambda x: x.exp()[1:].clone().as_strided((2, 4), (4, 1), 4), True),
    (lambda x: (x.exp()[1:] + 0).as_strided((2, 3), (4, 1), 1), True),
    # (``.to(float64)`` of a float64 view is the view itself, and the as_strided at offset
    # 2 reads storage before that view begins; torch.func's VJP of it (as_strided_backward)
    # keeps only the part inside the view, so it is no transpose of torch.func's own JVP)
    (lambda x: x.exp()[1:].to(torch.float64).as_strided((2, 2), (1, 4), 2) * 3, False),
], ids=["clone", "plus-zero", "to-copy"])
def test_a_copy_read_at_an_absolute_offset_is_not_replaced_by_its_source(f, vjp_is_transpose):
    """A copy of a view (offset 4 in its storage) has offset 0 in its own: until stop 21
    the identity pass renamed it to the view, and the as_strided that read the copy read
    the view's storage instead (silently wrong, an error of ~4)."""
    x = torch.randn(4, 4, dtype=torch.float64)
    _, jvp_fn = tl.linearize(f, x)
    for _ in range(2):
        t = torch.randn(4, 4, dtype=torch.float64)
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1])
        u = torch.randn_like(jvp_fn(t))
        # (the transpose is the adjoint of the JVP: <J t, u> = <t, J^T u>)
        torch.testing.assert_close((jvp_fn(t) * u).sum(), (t * jvp_fn.T(u)[0]).sum())
        if vjp_is_transpose:
            torch.testing.assert_close(jvp_fn.T(u)[0], torch.func.vjp(f, x)[1](u)[0])


# ------------------------------------------------------- in-place writes made functional
def _scaled_in_place(u):
    r = u.clone()
    r.mul_(2)
    r.add_(u.sin())
    r.sub_(u)
    return r


def _scaled_out_of_place(u):
    return u * 2 + u.sin() - u


def test_in_place_writes_that_nothing_else_sees_become_the_out_of_place_program():
    """Forward AD writes an in-place operation's tangent back with copy_ (clone, op,
    copy_): until stop 21 the map of _scaled_in_place ran 10 operations where that of the
    same function written out of place runs one (9-14x slower per application)."""
    u = torch.randn(30, 20, dtype=torch.float64)
    _, in_place = tl.linearize(_scaled_in_place, u)
    _, out_of_place = tl.linearize(_scaled_out_of_place, u)
    assert len(in_place._program.eqns) == len(out_of_place._program.eqns) == 1, str(in_place)
    for _ in range(2):
        t = torch.randn_like(u)
        torch.testing.assert_close(in_place(t), torch.func.jvp(_scaled_in_place, (u,), (t,))[1])
        torch.testing.assert_close(in_place.T(t)[0], torch.func.vjp(_scaled_in_place, u)[1](t)[0])


@pytest.mark.parametrize("f", [
    # the buffer read after the write through an older view of it
    lambda x: (lambda y: (y.mul_(2), y.view(-1)[3:9].sum() + y)[1])(x * 1.5),
    # a view taken before, read after
    lambda x: (lambda y, v: (y.add_(x.sin()), v * 2 + y.sum())[1])(*(lambda y: (y, y[1:]))(x * 1.5)),
    # the written value read again after the copy
    lambda x: (lambda y, z: (y.copy_(z), y + z)[1])(x * 1.5, x.exp()),
    # partial writes (slices) and a later write into the written value
    lambda x: (lambda y: (y[:2].mul_(3), y.mul_(x.cos()), y[::2].add_(x[1::2]), y)[3])(x.clone()),
    # an absolute storage offset read after the write
    lambda x: (lambda y: (y.mul_(x[1:].cos()), y.as_strided((2, 2), (1, 3), 1))[1])(x[1:].clone()),
], ids=["old-view-read-after", "view-read-after", "source-read-again", "slices", "as-strided"])
def test_in_place_writes_others_see_are_kept(f):
    x = torch.randn(4, 3, dtype=torch.float64)
    _, jvp_fn = tl.linearize(f, x)
    for _ in range(2):
        t = torch.randn_like(x)
        torch.testing.assert_close(jvp_fn(t), eager_jvp(f, (x,), (t,))[1])
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1])
        y = jvp_fn(t)
        u = torch.randn_like(y)
        torch.testing.assert_close(jvp_fn.T(u)[0], torch.func.vjp(f, x)[1](u)[0])
    T = torch.randn(3, *x.shape, dtype=torch.float64)
    torch.testing.assert_close(torch.vmap(jvp_fn)(T), torch.stack([jvp_fn(t) for t in T]))


def _in_place_program(x_g, y_g, w_g):
    """The raw trace of _scaled_in_place, with the storage groups (trace-time addresses)
    of three fresh tangents chosen: each may reuse the address of one that died before."""
    from torch_linearize._program import Eqn, Program, Res, Var

    aten = torch.ops.aten
    s, d = (30, 20), torch.float64

    def var(group):
        return Var(s, d, (20, 1), group=group)

    u = torch.randn(s, dtype=d)
    t = var("input")
    a, b, c, dd, e = (var(g) for g in "ABCDE")
    groups = {"new": None, "B": "B", "C": "C", "D": "D", "E": "E"}
    x = var(groups.get(x_g, "X"))
    y = var(x.group if y_g == "X" else groups.get(y_g, "Y"))
    w_group = {"X": x.group, "Y": y.group}.get(w_g, groups.get(w_g, "W"))
    v5, v9, v10, w, v12 = var("A"), var("A"), var("Z"), var(w_group), var("A")
    eqns = [
        Eqn(aten.clone.default, (t,), {}, a),
        Eqn(aten.clone.default, (a,), {}, b),
        Eqn(aten.mul.Tensor, (b, 2), {}, c),
        Eqn(aten.add.Tensor, (Res(0), c), {}, dd),
        Eqn(aten.copy_.default, (a, dd), {}, v5, mutates=(a,)),
        Eqn(aten.mul.Tensor, (t, Res(1)), {}, x),
        Eqn(aten.clone.default, (v5,), {}, e),
        Eqn(aten.add.Tensor, (e, x), {}, y),
        Eqn(aten.copy_.default, (v5, y), {}, v9, mutates=(v5,)),
        Eqn(aten.clone.default, (v9,), {}, v10),
        Eqn(aten.sub.Tensor, (v10, t), {}, w),
        Eqn(aten.copy_.default, (v9, w), {}, v12, mutates=(v9,)),
    ]
    for v in (x, y, w):
        if v.group is None:
            v.group = object()
    residuals = [torch.zeros(()).to(d).expand(s), u.cos()]
    return Program(inputs=[t], eqns=eqns, outputs=[v12], residuals=residuals,
                   input_layouts=[((20, 1), 0)])


@pytest.mark.parametrize("x_g,y_g,w_g", [
    ("new", "new", "new"), ("D", "new", "D"), ("new", "D", "new"), ("B", "C", "X"),
    ("C", "D", "Y"), ("D", "B", "E"), ("new", "C", "D"), ("B", "D", "Y"),
])
def test_copies_become_renames_wherever_the_allocator_put_the_tangents(x_g, y_g, w_g):
    """The tracer's groups are trace-time storage addresses, and a tangent allocated
    after another died may get its address. Until stop 22 the passes read a shared address
    as a shared storage (functionalize_copies moved such unrelated tensors along with a
    copy's aliases), so whether _scaled_in_place's map ran 1 or 8 operations depended on
    the allocator (a third of the runs in one process). exact_groups now turns addresses
    into storages before the passes run."""
    import copy

    from torch_linearize._passes import simplify
    from torch_linearize._program import exact_groups, interpret

    prog = _in_place_program(x_g, y_g, w_g)
    raw = copy.deepcopy(prog)
    exact_groups(prog)
    simplify(prog)
    assert [e.fn for e in prog.eqns] == [torch.ops.aten.mul.Tensor], [str(e) for e in prog.eqns]
    for _ in range(2):
        t = torch.randn(30, 20, dtype=torch.float64)
        torch.testing.assert_close(interpret(prog, [t])[0], interpret(raw, [t.clone()])[0])


def _trajectory(n):
    def f(u):
        us = [u]
        for _ in range(n):  # (u cos u: mixed-sign coefficients, which the probes check)
            us.append(us[-1] + 0.3 * us[-1] * us[-1].cos())
        return torch.stack(us)
    return f


def test_a_trajectorys_accuracy_probes_cost_linear_work(monkeypatch):
    """Every state of an explicit time stepper is a folded region's exit, and each region
    reaches back to the first state. Until stop 22 each exit's accuracy probe evaluated
    its whole region again, and recording logged the whole residual list per decision:
    n^2 work (400 steps: 1.8 s to linearize against 0.15 s for torch.func.jvp). The
    probes of one pass (or one replay) now share region values, and a decision logs the
    residual list as a prefix of one slot list."""
    import torch_linearize._passes as P
    import torch_linearize._structure_cache as sc

    counts: dict = {}
    real, real_spec = P._region_value, sc.Recorder._spec

    def counting(v, env):
        counts[key] = counts.get(key, 0) + 1
        return real(v, env)

    def counting_spec(self, x):
        counts[key] = counts.get(key, 0) + 1
        return real_spec(self, x)

    monkeypatch.setattr(P, "_region_value", counting)
    monkeypatch.setattr(sc.Recorder, "_spec", counting_spec)
    u = torch.rand(8, dtype=D) * 4 - 2
    for n in (40, 80):
        sc.cache_clear()
        f = _trajectory(n)
        for phase in ("first", "recorded", "replayed"):
            key = (n, phase)
            _check(f, u)
    assert sc.stats["hits"] == 1
    for phase in ("first", "recorded", "replayed"):
        assert counts[(80, phase)] < 3 * counts[(40, phase)], counts


# --- folded coefficients stay inside the dtype's range -----------------------------------
# Folding replaces t * a * b by t * (a * b); where a * b leaves the dtype's range and the
# step-by-step product does not, the folded map would give inf or 0 (or subnormal digits)
# where torch.func.jvp gives the right number.

@pytest.mark.parametrize("case", ["overflow", "underflow", "subnormal"])
def test_float16_chains_are_not_folded_out_of_range(case):
    x = {"overflow": torch.zeros(3), "underflow": torch.zeros(3),
         "subnormal": torch.ones(3)}[case].half()
    t = torch.full((3,), {"overflow": 1e-3, "underflow": 1e4, "subnormal": 1e3}[case]).half()
    f = {"overflow": lambda x: torch.sin(x * 256) * 256,  # (loss scaling) 65536 > 65504
         "underflow": lambda x: torch.exp(x * 1e-4) * 1e-4,  # 1e-8 flushes to 0
         "subnormal": lambda x: (x / 1000).sin() / 1000}[case]  # ~1e-6: 3 digits lost
    y, jvp_fn = tl.linearize(f, x)
    want = torch.func.jvp(f, (x,), (t,))[1]
    exact = torch.func.jvp(f, (x.double(),), (t.double(),))[1]
    assert torch.isfinite(want).all() and (want != 0).all()
    for got in (jvp_fn(t), jvp_fn.batched(t[None])[0], jvp_fn.T(t)[0]):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=0)
        torch.testing.assert_close(got.double(), exact, rtol=2e-3, atol=0)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.bfloat16, 1e20),
                                         (torch.float64, 1e160)])
def test_number_coefficients_beyond_the_range_are_not_folded(dtype, scale):
    # (x * s) * s folds to one number, s^2, which is inf in the dtype (in the float32 the
    # kernels multiply bfloat16 by); t * s * s is finite for a small t
    x = torch.ones(3, dtype=dtype)
    t = torch.full((3,), 1 / (10 * scale), dtype=dtype)
    f = lambda x: (x * scale) * scale
    y, jvp_fn = tl.linearize(f, x)
    want = torch.func.jvp(f, (x,), (t,))[1]
    assert torch.isfinite(want).all()
    torch.testing.assert_close(jvp_fn(t), want)
    torch.testing.assert_close(jvp_fn.T(t)[0], torch.func.vjp(f, x)[1](t)[0])


def test_number_coefficients_inside_the_range_still_fold():
    from torch_linearize._passes import _representable

    x = torch.randn(5, dtype=torch.float32)
    jvp_fn = _check(lambda x: (x * 1e10) * 1e10, x)
    assert jvp_fn.num_ops == 1  # one t * 1e20
    assert _representable([(None, 1e20, 0), (None, 0, 0)], torch.float32)
    assert not _representable([(None, 1e39, 0)], torch.float32)
    assert not _representable([(None, 1e-39, 0)], torch.float32)  # subnormal
    assert not _representable([(None, float("nan"), 0)], torch.float64)
    assert _representable([(None, 1e39, 0)], torch.float64)
    assert _representable([(None, 1e5, 0)], torch.float16)  # (multiplied in float32)
    assert not _representable([(None, torch.ones(2, dtype=torch.float16), 0)], torch.float16)
