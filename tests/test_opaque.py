"""Tests for ``torch_linearize/_opaque.py``: batching and transposing custom-Function nodes."""

import collections

import pytest
import torch

import custom_functions as cf
import torch_linearize as tl
from helpers import central_difference, eager_jvp, rand_like_tree

D = torch.float64
CALLS = collections.Counter()


def make_scale(batched_jvp=False, generate=False, batched_vjp=False):
    """y = x * w with w saved; optional batched rules and vmap support."""
    attrs = {}

    def forward(x, w):
        return x * w

    def setup_context(ctx, inputs, output):
        ctx.x, ctx.w = inputs

    def jvp(ctx, tx, tw):
        CALLS["jvp"] += 1
        assert not torch._C._functorch.is_batchedtensor(tx) or generate
        return tx * ctx.w + ctx.x * tw

    def backward(ctx, g):
        CALLS["backward"] += 1
        return g * ctx.w, g * ctx.x

    attrs.update(forward=staticmethod(forward), setup_context=staticmethod(setup_context),
                 jvp=staticmethod(jvp), backward=staticmethod(backward))
    if batched_jvp:
        def bjvp(ctx, tx, tw):
            CALLS["batched_jvp"] += 1
            assert tx.dim() == ctx.x.dim() + 1 and tw.dim() == ctx.w.dim() + 1
            return tx * ctx.w + ctx.x * tw

        attrs["batched_jvp"] = staticmethod(bjvp)
    if batched_vjp:
        def bvjp(ctx, g):
            CALLS["batched_vjp"] += 1
            return g * ctx.w, g * ctx.x

        attrs["batched_vjp"] = staticmethod(bvjp)
    if generate:
        attrs["generate_vmap_rule"] = True
    return type("Scale", (torch.autograd.Function,), attrs)


def ref(x, w):
    return (x * w).sin()


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    yield


@pytest.mark.parametrize("kind", ["batched_jvp", "generate_vmap_rule", "loop"])
def test_vmap_over_custom_function(kind):
    Fn = make_scale(batched_jvp=kind == "batched_jvp", generate=kind == "generate_vmap_rule")
    x, w = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(lambda x, w: Fn.apply(x, w).sin(), x, w)
    tx, tw = torch.randn(5, 3, dtype=D), torch.randn(5, 3, dtype=D)
    got = torch.vmap(jvp_fn)(tx, tw)
    want = torch.vmap(lambda a, b: torch.func.jvp(ref, (x, w), (a, b))[1])(tx, tw)
    torch.testing.assert_close(got, want)
    expected = {"batched_jvp": {"batched_jvp": 1}, "generate_vmap_rule": {"jvp": 1},
                "loop": {"jvp": 5}}[kind]
    assert dict(CALLS) == expected


class _MultiOut(torch.autograd.Function):
    """Three outputs: sin(x), an int, cos(x); jvp returns None for the int and, when
    ``_MultiOut.drop`` is set, None (a zero tangent) for cos(x)."""

    generate_vmap_rule = True
    drop = False

    @staticmethod
    def forward(x):
        return torch.sin(x), 3, torch.cos(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(output[2], -output[0])

    @staticmethod
    def jvp(ctx, tx):
        CALLS["jvp"] += 1
        c, ms = ctx.saved_tensors
        return tx * c, None, None if _MultiOut.drop else tx * ms


@pytest.mark.parametrize("drop", [False, True], ids=["all-tangents", "a-None-tangent"])
def test_generated_vmap_rule_with_a_non_tensor_output_and_a_none_tangent(drop, monkeypatch):
    # torch.vmap returns tensors only: the generated rule's None outputs (a non-tensor
    # output of forward, a zero tangent) made vmap(jvp_fn) raise a ValueError.
    monkeypatch.setattr(_MultiOut, "drop", drop)
    x, t = torch.randn(4, dtype=D), torch.randn(5, 4, dtype=D)

    def f(x):
        a, n, b = _MultiOut.apply(x)
        return a * n + b

    _, jvp_fn = tl.linearize(f, x)
    want = 3 * torch.cos(x) * t - (0 if drop else torch.sin(x) * t)
    torch.testing.assert_close(torch.vmap(jvp_fn)(t), want)
    torch.testing.assert_close(jvp_fn.batched(t), want)
    assert CALLS["jvp"] == 2  # one batched call each (the rule, not a loop)


def test_nested_vmap_flattens_batch_dims_into_one_batched_call():
    Fn = make_scale(batched_jvp=True)
    x, w = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(lambda x, w: Fn.apply(x, w), x, w)
    tx, tw = torch.randn(4, 2, 3, dtype=D), torch.randn(4, 2, 3, dtype=D)
    got = torch.vmap(torch.vmap(jvp_fn))(tx, tw)
    torch.testing.assert_close(got, tx * w + x * tw)
    assert CALLS["batched_jvp"] == 1


def test_in_dims_none_and_chunk_size():
    Fn = make_scale(batched_jvp=True)
    x, w = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(lambda x, w: Fn.apply(x, w), x, w)
    tx, tw = torch.randn(6, 3, dtype=D), torch.randn(3, dtype=D)
    got = torch.vmap(jvp_fn, in_dims=(0, None), chunk_size=2)(tx, tw)
    torch.testing.assert_close(got, tx * w + x * tw)
    assert CALLS["batched_jvp"] == 3


def test_one_vmap_level_skips_the_autograd_function_round_trip(monkeypatch):
    # vmap(jvp_fn) around plain tensors batches the node directly (batch dim moved first,
    # unbatched arguments expanded); the autograd.Function entry is not used.
    from torch_linearize import _opaque

    def refuse(*args):
        raise AssertionError("took the autograd.Function path")

    Fn = make_scale(batched_jvp=True)
    x, w = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(lambda x, w: Fn.apply(x, w), x, w)
    monkeypatch.setattr(_opaque._OpaqueApply, "apply", refuse)
    tx, tw = torch.randn(3, 5, dtype=D), torch.randn(3, dtype=D)
    got = torch.vmap(jvp_fn, in_dims=(1, None), out_dims=1)(tx, tw)
    torch.testing.assert_close(got, tx * w[:, None] + (x * tw)[:, None])
    assert CALLS["batched_jvp"] == 1


def test_vmap_over_tangents_that_require_grad_keeps_the_autograd_graph():
    Fn = make_scale(batched_jvp=True)
    x, w = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(lambda x, w: Fn.apply(x, w), x, w)
    tx = torch.randn(4, 3, dtype=D, requires_grad=True)
    tw = torch.randn(4, 3, dtype=D)
    out = torch.vmap(jvp_fn)(tx, tw)
    torch.testing.assert_close(out, tx.detach() * w + x * tw)
    (g,) = torch.autograd.grad(out.sum(), tx)
    torch.testing.assert_close(g, w.expand(4, 3))


def test_batched_vjp_for_vmap_over_transpose():
    Fn = make_scale(batched_vjp=True)
    x, w = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(lambda x, w: Fn.apply(x, w).sin(), x, w)
    us = torch.randn(5, 3, dtype=D)
    gx, gw = torch.vmap(jvp_fn.transpose())(us)
    _, ref_vjp = torch.func.vjp(ref, x, w)
    want = [ref_vjp(u) for u in us]
    torch.testing.assert_close(gx, torch.stack([g[0] for g in want]))
    torch.testing.assert_close(gw, torch.stack([g[1] for g in want]))
    assert CALLS["batched_vjp"] == 1 and CALLS["backward"] == 0


def test_loop_fallback_for_opaque_kernels_under_vmap():
    class NumpySquare(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return torch.from_numpy(x.numpy() ** 2)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.x = inputs[0]

        @staticmethod
        def jvp(ctx, t):
            CALLS["jvp"] += 1
            return torch.from_numpy(2 * ctx.x.numpy() * t.numpy())  # needs plain tensors

        @staticmethod
        def backward(ctx, g):
            CALLS["backward"] += 1
            return torch.from_numpy(2 * ctx.x.numpy() * g.numpy())

    x = torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(NumpySquare.apply, x)
    ts = torch.randn(3, 4, dtype=D)
    torch.testing.assert_close(torch.vmap(jvp_fn)(ts), 2 * x * ts)
    torch.testing.assert_close(torch.vmap(jvp_fn.transpose())(ts)[0], 2 * x * ts)
    assert CALLS["jvp"] == 3 and CALLS["backward"] == 3
    # jacfwd reaches the node's jvp rule with its own batched tangents: these go through
    # the node's vmap rule too (before, numpy got a batched tensor and raised)
    jac = torch.diag(2 * x)
    torch.testing.assert_close(torch.func.jacfwd(jvp_fn)(ts[0]), jac)
    torch.testing.assert_close(torch.func.jacfwd(lambda u: jvp_fn.transpose()(u)[0])(ts[0]), jac)


class _Mul(torch.autograd.Function):
    """An old-style Function (forward(ctx, ...), no setup_context): functorch refuses it."""

    @staticmethod
    def forward(ctx, a, b):
        return a * b


class _SquareViaMul(torch.autograd.Function):
    """y = x * x, old style; its jvp and backward call _Mul."""

    @staticmethod
    def forward(ctx, x):
        ctx.x = x
        return x * x

    @staticmethod
    def jvp(ctx, t):
        return _Mul.apply(2 * ctx.x, t)

    @staticmethod
    def backward(ctx, g):
        return _Mul.apply(2 * ctx.x, g)


@pytest.mark.parametrize("f", [
    _SquareViaMul.apply, lambda x: _SquareViaMul.apply(x.sin()) * x,
], ids=["alone", "in-a-program"])
def test_jvp_and_backward_calling_an_old_style_function_under_vmap(f):
    # The per-tangent loop calls jvp / backward on plain tensors, but inside vmap's layer,
    # where Function.apply refuses a Function without setup_context: vmap(jvp_fn) and
    # vmap(jvp_fn.T) raised (jvp_fn.batched did not). The loop now runs with functorch's
    # stack cleared, and the node's jvp/backward rules, reached with a transform's own
    # tensors (jacfwd), go through its vmap rule down to plain tensors.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, dtype=D, generator=gen)
    ts = torch.randn(3, 4, dtype=D, generator=gen)
    _, jvp_fn = tl.linearize(f, x)
    got = [jvp_fn(t) for t in ts]
    for t, g in zip(ts, got):
        torch.testing.assert_close(g, eager_jvp(f, (x,), (t,))[1])
        torch.testing.assert_close(g, central_difference(f, (x,), (t,)), rtol=1e-6, atol=1e-6)
    want = torch.stack(got)
    torch.testing.assert_close(torch.vmap(jvp_fn)(ts), want)
    torch.testing.assert_close(torch.vmap(torch.vmap(jvp_fn))(ts.expand(2, 3, 4)),
                               want.expand(2, 3, 4))
    torch.testing.assert_close(jvp_fn.batched(ts), want)
    vjp_fn = jvp_fn.T
    cots = torch.stack([vjp_fn(u)[0] for u in ts])
    for u, c in zip(ts, cots):  # <T(u), t> == <u, jvp(t)>
        for t, g in zip(ts, got):
            torch.testing.assert_close((c * t).sum(), (u * g).sum())
    torch.testing.assert_close(torch.vmap(vjp_fn)(ts)[0], cots)
    torch.testing.assert_close(vjp_fn.batched(ts)[0], cots)
    jac = torch.stack([jvp_fn(e) for e in torch.eye(4, dtype=D)], dim=1)
    torch.testing.assert_close(torch.func.jacfwd(jvp_fn)(ts[0]), jac)
    torch.testing.assert_close(torch.func.jacrev(jvp_fn)(ts[0]), jac)
    torch.testing.assert_close(torch.func.jacfwd(lambda u: vjp_fn(u)[0])(ts[0]), jac.T)


class _SquareViaMulBatched(_SquareViaMul):
    """The same with batched_jvp / batched_vjp, which call _Mul too."""

    @staticmethod
    def batched_jvp(ctx, t):
        return _Mul.apply(2 * ctx.x, t)

    @staticmethod
    def batched_vjp(ctx, g):
        return _Mul.apply(2 * ctx.x, g)


def test_batched_jvp_calling_an_old_style_function_under_vmap():
    # vmap(jvp_fn) runs an elementwise program's batch directly (LinearMap._under_one_vmap)
    # with the vmap still on functorch's stack: batched_jvp's _Mul.apply raised there.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, dtype=D, generator=gen)
    ts = torch.randn(3, 4, dtype=D, generator=gen)
    _, jvp_fn = tl.linearize(_SquareViaMulBatched.apply, x)
    want = torch.stack([eager_jvp(_SquareViaMulBatched.apply, (x,), (t,))[1] for t in ts])
    torch.testing.assert_close(torch.vmap(jvp_fn)(ts), want)
    torch.testing.assert_close(jvp_fn.batched(ts), want)
    torch.testing.assert_close(torch.vmap(jvp_fn.T)(ts)[0], torch.stack([jvp_fn.T(u)[0] for u in ts]))
    torch.testing.assert_close(torch.vmap(jvp_fn.T)(ts)[0], 2 * x * ts)


def test_mark_dirty_function_under_vmap():
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            x.mul_(2)
            ctx.mark_dirty(x)
            return x

        @staticmethod
        def jvp(ctx, t):
            t.mul_(2)
            return t

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    x = torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: Double.apply(x.clone()).exp(), x)
    ts = torch.randn(4, 3, dtype=D)
    torch.testing.assert_close(torch.vmap(jvp_fn)(ts), 2 * ts * (2 * x).exp())


def test_wrong_batched_jvp_shape_is_reported():
    class Bad(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def jvp(ctx, t):
            return t * 2

        @staticmethod
        def batched_jvp(ctx, t):
            return t.sum(0)  # drops the batch dimension

    _, jvp_fn = tl.linearize(Bad.apply, torch.randn(3))
    with pytest.raises(tl.LinearizeError, match=r"Bad.jvp returned f32\[3\] at position 0; expected f32\[4, 3\]"):
        torch.vmap(jvp_fn)(torch.randn(4, 3))


def test_builtin_op_without_batching_rule_falls_back_to_a_loop():
    x = torch.randn(4, 4, dtype=D)

    def f(x):  # as_strided_scatter has no vmap batching rule in PyTorch
        return torch.as_strided_scatter(x.exp(), x[:2, :2].sin(), (2, 2), (4, 1), 5)

    _, jvp_fn = tl.linearize(f, x)
    ts = torch.randn(3, 4, 4, dtype=D)
    got = torch.vmap(jvp_fn)(ts)
    want = torch.stack([torch.func.jvp(f, (x,), (t,))[1] for t in ts])
    torch.testing.assert_close(got, want)
    # also under vmap of reverse mode through the map (its forward runs under vmap)
    u = torch.randn(4, 4, dtype=D)
    got = torch.vmap(torch.func.grad(lambda t: (jvp_fn(t) * u).sum()))(ts)
    torch.testing.assert_close(got, jvp_fn.transpose()(u)[0].expand(3, 4, 4))


# ----------------------------------------------------------------------------- the unbatched call
def _scaled(jvp_result):
    """``y = 2 x`` for a 3x4 ``x``; ``jvp`` returns ``jvp_result(2 t)`` and counts its calls."""
    calls = []

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def jvp(ctx, t):
            calls.append(1)
            return jvp_result(t * 2)

        @staticmethod
        def backward(ctx, g):
            return g * 2

    return Scaled, calls


@pytest.mark.parametrize("wrap", [
    lambda o: o,                                # the tensor itself
    lambda o: (o,),                             # a 1-tuple
    lambda o: [o],                              # a list
    lambda o: o.t().contiguous().t(),           # column-major: relaid out as the forward output
    lambda o: o.expand(2, 3, 4)[0],             # a view with a storage offset... of 0 (same data)
], ids=["tensor", "tuple", "list", "column-major", "view"])
def test_unbatched_call_normalizes_the_result_and_calls_jvp_once(wrap):
    Scaled, calls = _scaled(wrap)
    x, t = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    _, jvp_fn = tl.linearize(Scaled.apply, x)
    for k in range(1, 4):
        out = jvp_fn(t)
        torch.testing.assert_close(out, 2 * t)
        assert out.stride() == (4, 1)  # the forward output's layout
        assert len(calls) == k  # once per application, however the result was shaped
    (g,) = jvp_fn.transpose()(t)  # the backward path is unaffected
    torch.testing.assert_close(g, 2 * t)


def test_unbatched_call_reports_a_wrong_dtype_naming_the_function():
    Scaled, calls = _scaled(lambda o: o.float())
    _, jvp_fn = tl.linearize(Scaled.apply, torch.randn(3, 4, dtype=D))
    with pytest.raises(tl.LinearizeError, match=r"Scaled.jvp returned f32\[3, 4\] at position 0; "
                                                r"expected f64\[3, 4\]"):
        jvp_fn(torch.randn(3, 4, dtype=D))
    assert len(calls) == 1


def test_unbatched_call_under_autograd_and_forward_ad_takes_the_general_path():
    Scaled, calls = _scaled(lambda o: o)
    x = torch.randn(3, 4, dtype=D)
    _, jvp_fn = tl.linearize(Scaled.apply, x)
    t = torch.randn(3, 4, dtype=D, requires_grad=True)
    out = jvp_fn(t)  # reverse mode through the map: its transpose
    (g,) = torch.autograd.grad(out, t, torch.ones_like(out))
    torch.testing.assert_close(g, torch.full_like(g, 2.0))
    with torch.autograd.forward_ad.dual_level():  # a tangent of the tangent: forward AD off
        dual = torch.autograd.forward_ad.make_dual(t.detach(), torch.ones_like(t))
        res = jvp_fn(dual)
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(res).primal, 2 * t.detach())


def test_an_error_in_jvp_surfaces_once():
    def fail(_):
        raise RuntimeError("user kernel failed")

    Scaled, calls = _scaled(fail)
    _, jvp_fn = tl.linearize(Scaled.apply, torch.randn(3, 4, dtype=D))
    with pytest.raises(RuntimeError, match="user kernel failed"):
        jvp_fn(torch.randn(3, 4, dtype=D))
    assert len(calls) == 1  # not retried


# ------------------------------------------------- maps with custom nodes inside forward AD
_WITH_NODES = {
    "ctypes": lambda x, y: (cf.CtypesScale.apply(x, 1.7), y),
    "numpy": lambda x, y: (cf.NumpyCube.apply(x), y * 2),
    "two_outputs": lambda x, y: (cf.SinCosPair.apply(x)[0] * y, y),
    "materialize_false": lambda x, y: (cf.WeightedSum.apply(x, y), y),
    "mark_dirty": lambda x, y: (cf.ScaleInPlace.apply(x * 1.0, 2.0), y.exp()),
}


@pytest.mark.parametrize("name", sorted(_WITH_NODES))
def test_linearizing_a_map_with_custom_nodes_gives_the_map(name):
    # A custom-Function node inside a map is linear, so its JVP is the node itself. It ran
    # with forward AD switched off, so inside an outer linearize (or eager forward AD) its
    # output carried no tangent: the outer map silently lost that term.
    f = _WITH_NODES[name]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 4, dtype=D, generator=gen), torch.randn(4, 4, dtype=D, generator=gen)
    _, jvp_fn = tl.linearize(f, x.clone(), y.clone())
    t = (torch.randn(4, 4, dtype=D, generator=gen), torch.randn(4, 4, dtype=D, generator=gen))
    s = (torch.randn(4, 4, dtype=D, generator=gen), torch.randn(4, 4, dtype=D, generator=gen))
    out, jvp2 = tl.linearize(jvp_fn, *t)
    torch.testing.assert_close(out, jvp_fn(*t))
    torch.testing.assert_close(jvp2(*s), jvp_fn(*s))
    u = rand_like_tree(out, gen)
    torch.testing.assert_close(jvp2.transpose()(u), jvp_fn.transpose()(u))
    # eager forward AD through the map
    torch.testing.assert_close(eager_jvp(jvp_fn, t, s)[1], jvp_fn(*s))
    # a function that applies the map inside: J^T J (Gauss-Newton)
    gn = lambda a, b: jvp_fn.transpose()(jvp_fn(a, b))
    _, jgn = tl.linearize(gn, *t)
    torch.testing.assert_close(jgn(*s), gn(*s))


def test_func_jvp_through_a_map_with_a_pytorch_custom_node():
    f = _WITH_NODES["two_outputs"]
    x, y = torch.randn(4, 4, dtype=D), torch.randn(4, 4, dtype=D)
    _, jvp_fn = tl.linearize(f, x, y)
    t = (torch.randn(4, 4, dtype=D), torch.randn(4, 4, dtype=D))
    s = (torch.randn(4, 4, dtype=D), torch.randn(4, 4, dtype=D))
    torch.testing.assert_close(torch.func.jvp(jvp_fn, t, s)[1], jvp_fn(*s))


def test_hessian_over_a_map_with_a_custom_function():
    """torch.func.hessian (jacfwd over jacrev) of a loss of the map: until stop 22 the
    node asked unpack_dual about the tangents of jacrev's vmap, which has no batching
    rule for it (RuntimeError); jacrev(jacrev) and jacfwd(grad) worked."""
    x, t = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    _, jvp_fn = tl.linearize(cf.Cube.apply, x)
    loss = lambda t: (jvp_fn(t) ** 2).sum()
    torch.testing.assert_close(torch.func.hessian(loss)(t), torch.diag(2 * (3 * x**2) ** 2))
