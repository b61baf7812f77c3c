"""Tests for ``torch_linearize/_transpose.py``: ``jvp_fn.transpose()`` (VJPs without re-running f)."""

import collections

import pytest
import torch
import torch.nn.functional as F

import custom_functions as cf
import torch_linearize as tl
from helpers import OpCounter, eager_jvp, rand_like_tree

D = torch.float64


def _dot(a, b):
    la, _ = torch.utils._pytree.tree_flatten(a)
    lb, _ = torch.utils._pytree.tree_flatten(b)
    return sum(float((x.conj() * y).real.sum()) for x, y in zip(la, lb) if x is not None)


def assert_transpose_matches(f, *primals, n=3, seed=0, ref_f=None):
    """vjp_fn equals torch.func.vjp of ``ref_f`` (default f) and passes the dot-product test."""
    gen = torch.Generator().manual_seed(seed)
    y, jvp_fn = tl.linearize(f, *primals)
    vjp_fn = jvp_fn.transpose()
    _, ref = torch.func.vjp(ref_f or f, *primals)
    for _ in range(n):
        u = rand_like_tree(y, gen)
        got = vjp_fn(u)
        assert isinstance(got, tuple) and len(got) == len(primals)
        torch.testing.assert_close(got, ref(u))
        # dot-product test: <J t, u> == <t, J^T u>
        t = tuple(rand_like_tree(p, gen) for p in primals)
        assert abs(_dot(jvp_fn(*t), u) - _dot(t, got)) < 1e-9 * max(1.0, abs(_dot(t, got)))
    return jvp_fn, vjp_fn


def test_mlp_with_dict_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 5, dtype=D)
    assert_transpose_matches(lambda p: torch.func.functional_call(model, p, (x,)), params)


def test_multiple_primals_and_pytree_outputs():
    a, b = torch.randn(3, 4, dtype=D), torch.randn(4, dtype=D)
    assert_transpose_matches(lambda a, b: {"m": a @ b, "s": [torch.sin(a).sum(0) * b]}, a, b)


def test_views_in_place_and_indexing():
    x = torch.randn(5, 4, dtype=D)

    def f(x):
        y = x.clone()
        y[1:].mul_(x[:-1].exp())
        buf = torch.zeros(7, 4, dtype=D)
        buf.index_add_(0, torch.tensor([0, 3, 6, 3, 1]), y)
        return buf.t().cumsum(0), F.softmax(x, dim=1)

    assert_transpose_matches(f, x)


@pytest.mark.parametrize("write", [
    lambda x, y: x.copy_(x * 3.0),
    lambda x, y: x.mul_(1.5),
    lambda x, y: x[1:].add_(y[1:]),
    lambda x, y: x.t().sin_(),
], ids=["copy_", "mul_", "slice_add_", "transposed_sin_"])
def test_function_that_writes_its_input(write):
    # The tangent program writes its input in place; the transposition runs it on a
    # copy of its (leaf) placeholder, as jvp_fn runs on a copy of the caller's tangent.
    def f(x, y):
        write(x, y)
        return x * 2, y

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 4, dtype=D, generator=gen), torch.randn(4, 4, dtype=D, generator=gen)
    out, jvp_fn = tl.linearize(f, x.clone(), y.clone())
    assert jvp_fn._program.mutated_inputs == {0}
    ref = lambda a, b: f(a.clone(), b.clone())  # (torch.func.vjp makes its primals leaves)
    u = rand_like_tree(out, gen)
    torch.testing.assert_close(jvp_fn.transpose()(u), torch.func.vjp(ref, x, y)[1](u))
    t = rand_like_tree((x, y), gen)
    t0 = tuple(v.clone() for v in t)
    torch.testing.assert_close(jvp_fn(*t), torch.func.jvp(ref, (x, y), t)[1])
    assert all(torch.equal(a, b) for a, b in zip(t, t0))


_ACTIVATIONS = {
    "softplus": F.softplus, "elu": F.elu, "selu": F.selu, "celu": F.celu, "mish": F.mish,
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "logsigmoid": F.logsigmoid, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "hardswish": F.hardswish, "softshrink": F.softshrink, "leaky_relu": F.leaky_relu,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(_ACTIVATIONS))
def test_activation_helpers_transpose_without_overflow(name, dtype):
    # After a matmul the activation's forward-AD helper (softplus_backward, elu_backward,
    # ...) stays in the program unfolded. PyTorch's decompositions of softplus/elu compute
    # exp(x) in the branch their `where` masks off; transposing them leaked 0 * inf = NaN
    # into the cotangent at large pre-activations. Each helper is g * c(x) elementwise,
    # hence its own transpose, and is transposed as itself.
    act = _ACTIVATIONS[name]
    x = torch.tensor([[-1000.0, -30.0, -1.0, 0.5, 30.0, 95.0, 800.0]], dtype=dtype)
    w = torch.eye(7, dtype=dtype) + 0.01
    f = lambda x: act(x @ w)
    _, jvp_fn = tl.linearize(f, x)
    u = torch.randn(1, 7, dtype=dtype, generator=torch.Generator().manual_seed(0))
    got = jvp_fn.transpose()(u)[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.func.vjp(f, x)[1](u)[0])


def test_self_adjoint_helper_sums_over_broadcast_dimensions():
    from torch_linearize._transpose import differentiable_impl

    aten = torch.ops.aten
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(3, 4, dtype=D, generator=gen)
    for op in (aten.tanh_backward.default, aten.sigmoid_backward.default):
        g = torch.randn(4, dtype=D, generator=gen, requires_grad=True)
        u = torch.randn(3, 4, dtype=D, generator=gen)
        out = differentiable_impl(op)(g, y)
        torch.testing.assert_close(out, op(g.detach(), y))
        (got,) = torch.autograd.grad(out, g, u)
        torch.testing.assert_close(got, (u * op(torch.ones(3, 4, dtype=D), y)).sum(0))


def test_complex_function():
    x = torch.randn(4, dtype=torch.complex128)
    assert_transpose_matches(lambda x: (x.exp() * x.conj(), x.abs()), x)


def test_integer_output_takes_none_cotangent():
    x = torch.randn(5, dtype=D)
    y, jvp_fn = tl.linearize(lambda x: (x.sin(), x.argmax()), x)
    vjp_fn = jvp_fn.T
    u = torch.randn(5, dtype=D)
    (g,) = vjp_fn((u, None))
    torch.testing.assert_close(g, u * x.cos())


def test_integer_primal_gets_none_cotangent():
    x = torch.randn(4, dtype=D)
    idx = torch.tensor([0, 2])
    y, jvp_fn = tl.linearize(lambda x, i: x[i] * 3, x, idx)
    gx, gi = jvp_fn.transpose()(torch.ones(2, dtype=D))
    assert gi is None
    torch.testing.assert_close(gx, torch.tensor([3.0, 0, 3, 0], dtype=D))


def test_transpose_does_not_evaluate_f_or_primal_ops():
    x = torch.randn(50, dtype=D)
    calls = []

    def f(x):
        calls.append(1)
        return torch.sin(torch.exp(torch.tanh(x)))

    y, jvp_fn = tl.linearize(f, x)
    vjp_fn = jvp_fn.transpose()
    u = torch.randn(50, dtype=D)
    with OpCounter() as c:
        vjp_fn(u)
    assert len(calls) == 1
    assert not {"sin", "exp", "tanh", "cos"} & set(c.counts), c.counts


def test_transpose_is_cached_and_involutive():
    x = torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(torch.sin, x)
    vjp_fn = jvp_fn.transpose()
    assert jvp_fn.transpose() is vjp_fn and jvp_fn.T is vjp_fn
    assert vjp_fn.transpose() is jvp_fn


def test_custom_function_transposes_through_backward_on_same_ctx():
    cf.reset()
    x = torch.randn(5, dtype=D)
    # (torch.func.vjp cannot run this old-style Function; the reference is the same maths.)
    jvp_fn, vjp_fn = assert_transpose_matches(lambda x: cf.NumpyCube.apply(x).sin(), x,
                                              ref_f=lambda x: (x**3).sin())
    assert cf.CALLS["NumpyCube.forward"] == 1  # the single linearize
    assert cf.CALLS["NumpyCube.backward"] == 3  # once per vjp application


def test_custom_function_setup_context_style_with_non_tensor_input():
    x = torch.randn(4, dtype=D)
    assert_transpose_matches(lambda x: cf.CtypesScale.apply(x, 1.5) ** 2, x)


def test_forum_function_transpose():
    x, a, b, c = (torch.tensor(v, dtype=D) for v in (2.0, 3.0, 4.0, 5.0))
    cf.reset()
    y, jvp_fn = tl.linearize(cf.Forum.apply, x, a, b, c)
    vjp_fn = jvp_fn.transpose()
    g = vjp_fn(torch.tensor(1.0, dtype=D))
    _, ref = torch.func.vjp(cf.Forum.ref, x, a, b, c)
    torch.testing.assert_close(g, ref(torch.tensor(1.0, dtype=D)))
    assert cf.CALLS["Forum.forward"] == 1 and cf.CALLS["Forum.backward"] == 1
    assert cf.CALLS["Forum.jvp"] == 0


def test_function_without_backward_cannot_be_transposed():
    class OnlyJvp(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def jvp(ctx, t):
            return t * 2

    _, jvp_fn = tl.linearize(lambda x: OnlyJvp.apply(x).sin(), torch.randn(3))
    with pytest.raises(tl.LinearizeError, match="OnlyJvp has no backward"):
        jvp_fn.transpose()


def test_reverse_mode_through_the_linear_map_is_its_transpose():
    x = torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: cf.NumpyCube.apply(x) * x.exp(), x)
    t = torch.randn(4, dtype=D, requires_grad=True)
    u = torch.randn(4, dtype=D)
    (g,) = torch.autograd.grad(jvp_fn(t), t, u)
    torch.testing.assert_close(g, jvp_fn.transpose()(u)[0])


def test_reverse_mode_through_a_program_that_overwrites_what_autograd_would_save():
    # The tangent program reads h's tangent (tanh_backward, whose autograd node saves that
    # incoming tangent) and then scales it in place. Autograd over the recorded operations
    # refused this ("modified by an inplace operation"); the map's reverse mode is one
    # application of its transpose.
    def f(x):
        h = x * 1.0
        y = torch.tanh(h)
        h.mul_(2.0)
        return y, h

    x = torch.randn(4, 4, dtype=D)
    _, jvp_fn = tl.linearize(f, x)
    t = torch.randn(4, 4, dtype=D, requires_grad=True)
    out = jvp_fn(t)
    assert type(out[0].grad_fn).__name__ == "_ThroughTransposeBackward"
    u = rand_like_tree(out, torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad(out, t, u)
    torch.testing.assert_close(g, jvp_fn.transpose()(u)[0])
    torch.testing.assert_close(g, torch.func.vjp(f, x.clone())[1](u)[0])


def test_functorch_reverse_mode_through_the_linear_map():
    # The same under torch.func: vjp, jacrev, vmap of vjp, and grad of grad (the
    # transpose is built outside the functorch transforms, in their backward pass).
    def f(x):
        h = x * 1.0
        y = torch.tanh(h)
        h.mul_(2.0)
        return y * h

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, dtype=D, generator=gen)
    _, jvp_fn = tl.linearize(f, x)
    t, u = torch.randn(3, 3, dtype=D, generator=gen), torch.randn(3, 3, dtype=D, generator=gen)
    want = torch.func.vjp(f, x.clone())[1](u)[0]
    torch.testing.assert_close(torch.func.vjp(jvp_fn, t)[1](u)[0], want)
    torch.testing.assert_close(torch.func.jacrev(jvp_fn)(t), torch.func.jacrev(f)(x.clone()))
    us = torch.randn(4, 3, 3, dtype=D, generator=gen)
    got = torch.vmap(torch.func.vjp(jvp_fn, t)[1])(us)[0]
    for k in range(4):
        torch.testing.assert_close(got[k], jvp_fn.transpose()(us[k])[0])
    g = torch.func.grad(lambda a: (jvp_fn(a) * u).sum())
    torch.testing.assert_close(g(t), want)
    s = torch.randn(3, 3, dtype=D, generator=gen)
    torch.testing.assert_close(torch.func.jvp(g, (t,), (s,))[1], torch.zeros_like(s))


def test_double_backward_through_the_linear_map():
    # d/du <J^T u, s> = J s: the transpose's own reverse mode is the map again.
    x = torch.randn(5, dtype=D)
    f = lambda x: torch.sin(x) * x.cumsum(0)
    _, jvp_fn = tl.linearize(f, x)
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(5, dtype=D, generator=gen, requires_grad=True)
    u = torch.randn(5, dtype=D, generator=gen, requires_grad=True)
    s = torch.randn(5, dtype=D, generator=gen)
    (g,) = torch.autograd.grad(jvp_fn(t), t, u, create_graph=True)
    (h,) = torch.autograd.grad(g, u, s)
    torch.testing.assert_close(h, torch.func.jvp(f, (x,), (s,))[1])


def test_vmap_over_transpose():
    x = torch.randn(3, 4, dtype=D)
    f = lambda x: torch.tanh(x @ x.T).sum(0)
    _, jvp_fn = tl.linearize(f, x)
    us = torch.randn(6, 3, dtype=D)
    got = torch.vmap(jvp_fn.transpose())(us)[0]
    _, ref = torch.func.vjp(f, x)
    torch.testing.assert_close(got, torch.stack([ref(u)[0] for u in us]))


def test_cotangent_validation_names_the_output_leaf():
    x = torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: {"a": x.sin(), "b": x[:2]}, x)
    vjp_fn = jvp_fn.transpose()
    with pytest.raises(ValueError, match=r"cotangents\['b'\] has shape \(3,\), but output\['b'\] has shape \(2,\)"):
        vjp_fn({"a": torch.ones(3, dtype=D), "b": torch.ones(3, dtype=D)})
    with pytest.raises(ValueError, match=r"missing cotangents\[0\]\['b'\]"):
        vjp_fn({"a": torch.ones(3, dtype=D)})


def test_masked_non_finite_residuals_transpose_to_zero_not_nan():
    # linalg.eigh's forward-AD formula divides by eigenvalue differences (0 on the
    # diagonal) and then zeroes the diagonal; the transpose must not produce 0/0.
    # PyTorch's own reverse formula for eigh differs from the transpose of its forward
    # formula (they agree only on symmetric directions), so the reference is the transpose
    # of torch.func.jacfwd's Jacobian.
    torch.manual_seed(0)
    a = torch.randn(4, 4, dtype=D)
    a = a + a.T

    def f(a):
        return torch.linalg.eigh(a)[1]

    _, jvp_fn = tl.linearize(f, a)
    u = torch.randn(4, 4, dtype=D)
    (g,) = jvp_fn.transpose()(u)
    assert torch.isfinite(g).all()
    jac = torch.func.jacfwd(f)(a).reshape(16, 16)
    torch.testing.assert_close(g, (jac.T @ u.reshape(16)).reshape(4, 4))


def test_release_of_one_map_keeps_the_other_usable():
    x = torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: cf.NumpyCube.apply(x), x)
    vjp_fn = jvp_fn.transpose()
    jvp_fn.release()
    torch.testing.assert_close(vjp_fn(torch.ones(3, dtype=D))[0], 3 * x**2)
    with pytest.raises(tl.ReleasedError):
        jvp_fn(torch.ones(3, dtype=D))


def test_gauss_newton_step_from_one_linearization():
    """The README's worked example: J v and J^T u from one linearize, CG on J^T J."""
    torch.manual_seed(0)
    t_obs = torch.linspace(0, 1, 40, dtype=D)
    true = torch.tensor([1.5, -2.0, 0.7], dtype=D)

    def model(p):
        return p[0] * torch.exp(p[1] * t_obs) + p[2]

    y_obs = model(true) + 0.01 * torch.randn(40, dtype=D)

    def residual(p):
        return model(p) - y_obs

    p = torch.tensor([1.0, -1.0, 0.0], dtype=D)
    calls = collections.Counter()
    for _ in range(8):
        r, J = tl.linearize(residual, p)
        JT = J.transpose()
        b = -JT(r)[0]
        # CG on (J^T J) d = -J^T r, matrix-free.
        d = torch.zeros(3, dtype=D)
        res = b.clone()
        q = res.clone()
        for _ in range(3):
            Aq = JT(J(q))[0]
            calls["matvec"] += 1
            alpha = (res @ res) / (q @ Aq)
            d = d + alpha * q
            new = res - alpha * Aq
            if new.norm() < 1e-14:
                break
            q = new + (new @ new) / (res @ res) * q
            res = new
        # Same step as the dense normal equations.
        Jd = torch.func.jacfwd(residual)(p)
        torch.testing.assert_close(d, torch.linalg.solve(Jd.T @ Jd, -Jd.T @ r), rtol=1e-6, atol=1e-9)
        p = p + d
    torch.testing.assert_close(p, true, atol=0.05, rtol=0.05)
    assert calls["matvec"] > 0


def test_in_place_update_of_a_fresh_buffer_survives_simplification():
    # Regression: QR's backward writes into an `empty` buffer, then halves its diagonal
    # in place through a view before reading the whole buffer. The in-place write must
    # stay in the program whatever the (uninitialized) buffer contained.
    torch.manual_seed(0)
    a = torch.randn(5, 2, dtype=D)
    f = lambda a: torch.linalg.qr(a)
    _, ref = torch.func.vjp(f, a)
    for _ in range(10):
        y, jvp_fn = tl.linearize(f, a)
        u = torch.utils._pytree.tree_map(torch.randn_like, y)  # keeps the return_types class
        torch.testing.assert_close(jvp_fn.transpose()(u), ref(u))
        # A plain tuple for the named tuple is accepted too (torch.func.vjp refuses it).
        torch.testing.assert_close(jvp_fn.transpose()(tuple(u)), ref(u))


# ------------------------------------------- one buffer written as complex and read as real
def _real_parts_written(x):
    z = torch.zeros(4, dtype=torch.complex128)
    z.real.copy_(x)
    z.imag.copy_(x.exp())
    return torch.view_as_real(z * z)


def _complex_view_written(x):
    z = torch.zeros(4, 2, dtype=torch.float64)
    torch.view_as_complex(z).add_(x * 1j)
    return z.sum(1) * z[:, 1]


@pytest.mark.parametrize("f", [_real_parts_written, _complex_view_written])
def test_a_buffer_written_through_views_of_two_dtypes(f):
    """A buffer receiving tangent data through a real and a complex view of it: until
    stop 21 linearize raised NotImplementedError (eager forward AD handles it)."""
    x = torch.randn(4, dtype=torch.float64)
    y, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(y, f(x))
    for _ in range(2):
        t, ct = torch.randn_like(x), torch.randn_like(y)
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1])
        torch.testing.assert_close(jvp_fn.T(ct)[0], torch.func.vjp(f, x)[1](ct)[0])
    T = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.vmap(jvp_fn)(T), torch.stack([jvp_fn(t) for t in T]))


def test_an_operation_autograd_calls_not_differentiable_is_refused_not_dropped(monkeypatch):
    """Without its differentiable form, ``view(dtype)`` cuts the autograd graph the
    transpose is recorded from: that part of the transpose would be silently zero."""
    from torch_linearize import _transpose

    monkeypatch.delitem(_transpose._LOCAL_DECOMPOSITIONS, torch.ops.aten.view.dtype)
    _, jvp_fn = tl.linearize(_real_parts_written, torch.randn(4, dtype=torch.float64))
    with pytest.raises(tl.LinearizeError, match=r"view\.dtype.*not differentiable"):
        jvp_fn.transpose()


def test_reverse_mode_through_a_map_with_an_integer_output():
    """Until stop 22 autograd through J.T (and jacfwd of jacrev through J) failed when f
    also returned an integer tensor: the map's program returns zeros for it, which went
    back to autograd as an extra gradient (and as a tangent of an integer output)."""
    x = torch.randn(4, dtype=D)
    f = lambda a: (a.sin() * 2, a.argmax())
    _, jvp_fn = tl.linearize(f, x)
    u = torch.randn(4, dtype=D, requires_grad=True)
    g, = jvp_fn.T((u, None))
    w = torch.randn(4, dtype=D)
    got, = torch.autograd.grad((g * w).sum(), u)
    torch.testing.assert_close(got, 2 * x.cos() * w)  # J is diag(2 cos x): J^T = J
    t = torch.randn(4, dtype=D)
    H = torch.func.jacfwd(torch.func.jacrev(lambda t: (jvp_fn(t)[0] ** 2).sum()))(t)
    torch.testing.assert_close(H, torch.diag(8 * x.cos() ** 2))


def _custom_chain(x):
    y = cf.NumpyCube.apply(x)
    for _ in range(3):
        y = (y @ _W).sin()
    return y


_W = torch.randn(6, 6, dtype=D, generator=torch.Generator().manual_seed(3)) / 3


def test_a_map_applied_while_another_thread_transposes_it():
    """Building a transpose runs the map's custom-Function nodes in a shape-only mode
    (they output zeros: only the graph matters). Until stop 22 that mode was a flag on the
    shared nodes, so another thread applying the same map meanwhile got zeros for their
    tangents (silently; a probe saw it in 20 of 20 trials). It is now per thread."""
    import threading

    from torch_linearize._opaque import shape_only

    x, t = torch.randn(6, dtype=D), torch.randn(6, dtype=D)
    _, jvp_fn = tl.linearize(_custom_chain, x)
    want = eager_jvp(_custom_chain, (x,), (t,))[1]
    T = torch.randn(3, 6, dtype=D)
    inside, done = threading.Event(), threading.Event()

    def transposing():  # (holds the mode as a transposition in progress would)
        with shape_only(jvp_fn._opaque_nodes):
            inside.set()
            done.wait(30)

    th = threading.Thread(target=transposing)
    th.start()
    try:
        assert inside.wait(30)
        got, got_b = jvp_fn(t), jvp_fn.batched(T)
        got_T = jvp_fn.T(t)[0]
    finally:
        done.set()
        th.join()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_b, torch.stack([eager_jvp(_custom_chain, (x,), (s,))[1]
                                                   for s in T]))
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(got_T, torch.autograd.grad(_custom_chain(xg), xg, t)[0])
    # and a real transposition racing applications
    _, jvp_fn = tl.linearize(_custom_chain, x)
    results, stop = [], threading.Event()

    def applying():
        while not stop.is_set():
            results.append(jvp_fn(t))

    th = threading.Thread(target=applying)
    th.start()
    try:
        jvp_fn.T(t)
    finally:
        stop.set()
        th.join()
    for r in results:
        torch.testing.assert_close(r, want)


def test_overwritten_value_times_an_infinite_residual_transposes_to_zero():
    # x's value is overwritten by copy_; autograd's zero cotangent for it meets the
    # infinite y in mul's backward (0 * inf = NaN), a constant the transpose refused as
    # "not linear". Its derivative is zero; where the map itself has NaN (2 v dv with
    # v = inf, dv = 0) is the documented NaN-placement limitation.
    x = torch.ones(2, 3, dtype=torch.float64)
    y = torch.tensor([float("inf"), 3.0, 4.0], dtype=torch.float64)

    def f(x, y):
        v = x * y
        v.copy_(y)
        return v ** 2

    _, jvp_fn = tl.linearize(f, x, y)
    tx, ty = torch.randn(2, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(jvp_fn(tx, ty), torch.func.jvp(f, (x, y), (tx, ty))[1],
                               equal_nan=True)
    u = torch.randn(2, 3, dtype=torch.float64)
    gx, gy = jvp_fn.T(u)
    assert (gx == 0).all()
    torch.testing.assert_close(gy, torch.func.vjp(f, x, y)[1](u)[1], equal_nan=True)


@pytest.mark.parametrize("what", ["T", "T.jacobian", "T.batched"])
def test_transpose_built_first_inside_inference_mode(what):
    # linearize runs f outside inference mode; building the transpose records it with
    # autograd, which inference mode switched off ("not differentiable" refusal)
    x = torch.randn(3, dtype=torch.float64)
    u = torch.randn(2, 3, dtype=torch.float64)
    vjp = torch.func.vjp(torch.sin, x)[1]
    with torch.inference_mode():
        _, jvp_fn = tl.linearize(torch.sin, x)
        if what == "T":
            got, want = jvp_fn.T(u[0])[0], vjp(u[0])[0]
        elif what == "T.jacobian":
            got, want = jvp_fn.T.jacobian()[0], torch.diag(x.cos())
        else:
            got, want = jvp_fn.T.batched(u)[0], torch.stack([vjp(v)[0] for v in u])
    torch.testing.assert_close(got, want)
