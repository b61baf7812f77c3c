"""Tests for ``torch_linearize/_custom_function.py``: custom autograd.Functions."""

import gc
import threading
import weakref

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import custom_functions as cf
import torch_linearize as tl
from helpers import (
    central_difference,
    check_random_program,
    eager_jvp,
    mutating_programs,
    rand_like_tree,
)

D = torch.float64


@pytest.fixture(autouse=True)
def _reset_counts():
    cf.reset()
    yield


def test_forum_example_counts_and_values():
    x, a, b, c = (torch.tensor(v, dtype=D) for v in (2.0, 3.0, 4.0, 5.0))
    y, jvp_fn = tl.linearize(cf.Forum.apply, x, a, b, c)
    assert cf.CALLS == {"Forum.forward": 1, "Forum.setup_context": 1}
    torch.testing.assert_close(y, cf.Forum.ref(x, a, b, c))
    gen = torch.Generator().manual_seed(0)
    for k in range(1, 6):
        ts = [torch.randn((), dtype=D, generator=gen) for _ in range(4)]
        _, want = torch.func.jvp(cf.Forum.ref, (x, a, b, c), tuple(ts))
        torch.testing.assert_close(jvp_fn(*ts), want)
        assert cf.CALLS["Forum.jvp"] == k
    assert cf.CALLS["Forum.forward"] == 1 and cf.CALLS["Forum.setup_context"] == 1
    assert cf.CALLS["Forum.backward"] == 0


def test_forum_example_fails_under_torch_func_linearize():
    # The motivating failure: torch.func.linearize cannot trace the .item() calls.
    x, a, b, c = (torch.tensor(v, dtype=D) for v in (2.0, 3.0, 4.0, 5.0))
    with pytest.raises(Exception):  # noqa: B017 - any failure demonstrates the point
        torch.func.linearize(cf.Forum.apply, x, a, b, c)


def test_numpy_function_matches_eager_forward_ad():
    x = torch.randn(5, dtype=D)
    y, jvp_fn = tl.linearize(lambda x: cf.NumpyCube.apply(x).sin(), x)
    t = torch.randn(5, dtype=D)
    assert cf.CALLS["NumpyCube.forward"] == 1
    ry, rt = eager_jvp(lambda x: cf.NumpyCube.apply(x).sin(), (x,), (t,))
    cf.reset()
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(jvp_fn(t), rt)
    torch.testing.assert_close(jvp_fn(t), 3 * x**2 * t * x.pow(3).cos())
    assert cf.CALLS["NumpyCube.forward"] == 0 and cf.CALLS["NumpyCube.jvp"] == 2


def test_saved_tensors_semantics_match_eager():
    # With only save_for_backward, eager forward AD shows () in jvp; we must too.
    seen = {}

    class OnlyBackwardSaves(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 2

        @staticmethod
        def jvp(ctx, t):
            seen.setdefault("jvp", []).append(ctx.saved_tensors)
            return t * 2

    x = torch.randn(3, dtype=D)
    eager_jvp(OnlyBackwardSaves.apply, (x,), (torch.ones(3, dtype=D),))
    _, jvp_fn = tl.linearize(OnlyBackwardSaves.apply, x)
    jvp_fn(torch.ones(3, dtype=D))
    assert seen["jvp"][0] == () and seen["jvp"][1] == ()


def test_ctypes_kernel_on_raw_data_pointers():
    x = torch.randn(6, dtype=D)
    y, jvp_fn = tl.linearize(lambda x: cf.CtypesScale.apply(x, 2.5) ** 2, x)
    t = torch.randn(6, dtype=D)
    torch.testing.assert_close(jvp_fn(t), 2 * (2.5 * x) * 2.5 * t)
    torch.testing.assert_close(y, (2.5 * x) ** 2)
    assert cf.CALLS["CtypesScale.forward"] == 1 and cf.CALLS["CtypesScale.jvp"] == 1


def test_saved_tensors_follow_the_phase_across_interleaved_jvp_and_vjp():
    # jvp sees what save_for_forward received, backward what save_for_backward received,
    # however the two alternate
    x = torch.randn(4, dtype=D)
    t = torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(cf.TwoSaves.apply, x)
    vjp_fn = jvp_fn.transpose()
    for _ in range(2):
        torch.testing.assert_close(jvp_fn(t), t * x.exp())
        torch.testing.assert_close(vjp_fn(t)[0], t * 2 * x.exp())
        torch.testing.assert_close(torch.vmap(jvp_fn)(torch.stack([t, t])), (t * x.exp()).expand(2, 4))


def test_jvp_and_backward_see_their_own_saved_tensors_at_the_same_time():
    # jvp and backward each get their phase's view of one ctx (shared attributes, own
    # saved_tensors), so neither depends on which ran last: here the transpose runs
    # *inside* the user's jvp, before jvp reads ctx.saved_tensors (as another thread
    # could between the two), and an attribute set in one is seen by the other.
    x, t = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: cf.TwoSaves.apply(x.sin()), x)
    vjp_fn = jvp_fn.transpose()
    want_jvp = t * x.sin().exp() * x.cos()
    want_vjp = t * 2 * x.sin().exp() * x.cos()
    for call in (jvp_fn, jvp_fn._call):  # the one-tensor entry and the general path
        cf.TwoSaves.HOOK.append(lambda: vjp_fn(t)[0])
        torch.testing.assert_close(call(t) if call is jvp_fn else call((t,)), want_jvp)
        node = jvp_fn._opaque_nodes[0]
        torch.testing.assert_close(node.ctx.seen, want_vjp)
    assert node.ctx.calls == 2  # set by backward, read through jvp's view


@pytest.mark.parametrize("fn", [
    lambda v: cf.NumpyCube.apply(v), lambda v: cf.CtypesScale.apply(v, 1.7),
    lambda v: cf.TwoSaves.apply(v.contiguous()),
], ids=["numpy", "raw pointers", "setup_context"])
def test_input_viewing_a_buffer_written_with_tangent_data_later(fn):
    # The Function's input is a view of a buffer that had no tangent when the view was
    # taken; a later in-place write gives the buffer one, and forward AD derives the
    # view's tangent from it lazily, when first read. Read while the tracer was paused
    # (where the Function's inputs are unpacked), it was taken for a constant: the map
    # was silently wrong (found by fuzzing the one-tensor entry).
    c = torch.randn(4, 4, dtype=D)

    def f(x):
        buf = c.sin()
        view = buf[1:]
        buf.add_(x * x)
        return fn(view)

    x, t = torch.randn(4, 4, dtype=D), torch.randn(4, 4, dtype=D)
    _, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(jvp_fn(t), eager_jvp(f, (x,), (t,))[1])


def test_multiple_outputs_non_tensor_and_non_differentiable_outputs():
    x = torch.randn(4, dtype=D)

    def f(x):
        s, c, idx, tag, marker = cf.SinCosPair.apply(x)
        assert tag == "a-string" and idx.dtype == torch.int64
        return s * c, marker, idx

    y, jvp_fn = tl.linearize(f, x)
    t = torch.randn(4, dtype=D)
    dy = jvp_fn(t)
    torch.testing.assert_close(dy[0], t * torch.cos(2 * x))
    torch.testing.assert_close(dy[1], torch.zeros(4, dtype=D))  # marked non-differentiable
    assert not dy[2].any()
    torch.testing.assert_close(y[1], x)


def test_mark_dirty_in_place_function_matches_eager():
    x = torch.randn(4, dtype=D)

    def f(x):
        y = x.clone()
        z = cf.ScaleInPlace.apply(y, 3.0)
        assert z is y
        return z.exp()

    t = torch.randn(4, dtype=D)
    ry, rt = eager_jvp(f, (x,), (t,))
    y, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(y, ry)
    t_copy = t.clone()
    torch.testing.assert_close(jvp_fn(t), rt)
    torch.testing.assert_close(jvp_fn(t), rt)  # replay does not accumulate in-place scaling
    torch.testing.assert_close(t, t_copy)


def test_mark_dirty_on_the_primal_input_does_not_mutate_callers_tangent():
    x = torch.randn(4, dtype=D)
    y, jvp_fn = tl.linearize(lambda x: cf.ScaleInPlace.apply(x, 2.0), x.clone())
    t = torch.randn(4, dtype=D)
    t0 = t.clone()
    torch.testing.assert_close(jvp_fn(t), 2 * t0)
    torch.testing.assert_close(t, t0)


def test_ctx_tensor_written_later_in_f_is_copied_first():
    # WeightedSum saves (x, w) for its jvp. Eager forward AD calls jvp at once; linearize
    # calls it at every application, after f wrote into w: the ctx keeps w's old contents.
    x = torch.randn(3, 4, dtype=D)

    def f(x):
        w = torch.sin(x.detach()) + 2
        z = cf.WeightedSum.apply(x, w)
        w.masked_fill_(w > 2.5, 0.0)
        x.mul_(3)  # (the input, also saved)
        return z * 1.0, x

    gen = torch.Generator().manual_seed(0)
    y, jvp_fn = tl.linearize(f, x.clone())
    for _ in range(2):
        t = torch.randn(3, 4, dtype=D, generator=gen)
        # (eager forward AD writes the tangent of an input f writes: give it a copy)
        torch.testing.assert_close(jvp_fn(t), eager_jvp(f, (x.clone(),), (t.clone(),))[1])
    u = rand_like_tree(y, gen)
    (g,) = jvp_fn.transpose()(u)
    t = torch.randn(3, 4, dtype=D, generator=gen)
    want = eager_jvp(f, (x.clone(),), (t.clone(),))[1]
    torch.testing.assert_close((g * t).sum(), sum((a * b).sum() for a, b in zip(u, want)))


def test_ctx_tensor_written_where_linearize_cannot_see_raises():
    x, w = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)

    def g(x):
        v = w * 1.0
        z = cf.WeightedSum.apply(x, v)
        v.numpy()[...] = 0.0  # a write through numpy: no dispatched operation...
        torch.autograd.graph.increment_version(v)  # ...that says so, as kernels should
        return z

    with pytest.raises(tl.StaleResidualError, match="custom Function WeightedSum keeps on its ctx"):
        tl.linearize(g, x)


def test_ctx_tensor_the_user_can_reach_is_watched_after_linearize():
    x, w = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: cf.WeightedSum.apply(x, w), x)
    t = torch.randn(3, 4, dtype=D)
    torch.testing.assert_close(jvp_fn(t), (t * w).sum(-1))
    w.mul_(2)  # the map would silently follow w: it raises, as for any residual
    with pytest.raises(tl.StaleResidualError, match="WeightedSum keeps on its ctx"):
        jvp_fn(t)


def test_mark_dirty_function_transposes_and_vmaps():
    def f(x, y):
        w = x * y
        z = cf.ScaleInPlace.apply(w.t(), 0.5)  # in place into a view of w
        return z * w, cf.ScaleInPlace.apply(y, 1.3)  # and into the input y

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 4, dtype=D, generator=gen), torch.randn(4, 4, dtype=D, generator=gen)
    out, jvp_fn = tl.linearize(f, x.clone(), y.clone())
    # (reverse mode itself refuses f: ScaleInPlace writes w, which `z * w` saves)
    u, t = rand_like_tree(out, gen), rand_like_tree((x, y), gen)
    want = eager_jvp(f, (x.clone(), y.clone()), tuple(v.clone() for v in t))[1]
    torch.testing.assert_close(jvp_fn(*t), want)
    gx, gy = jvp_fn.transpose()(u)
    torch.testing.assert_close((gx * t[0]).sum() + (gy * t[1]).sum(),
                               sum((a * b).sum() for a, b in zip(u, want)))
    tx, ty = torch.randn(3, 4, 4, dtype=D, generator=gen), torch.randn(4, 4, dtype=D, generator=gen)
    got = torch.vmap(jvp_fn, in_dims=(0, None))(tx, ty)
    for k in range(3):
        torch.testing.assert_close(tuple(v[k] for v in got), jvp_fn(tx[k], ty))


def test_vmap_falls_back_to_a_loop_below_the_vmap_level():
    # y's tangent is not batched, but the program writes x's (batched) tangent into it:
    # vmap refuses that in-place write and linearize runs the batch element by element,
    # with the custom Function node seeing plain tensors there (not re-batched ones).
    def f(x, y):
        y.sub_(cf.CtypesScale.apply(x, 1.7), alpha=0.5)
        return cf.CtypesScale.apply(y, 2.0)

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 4, dtype=D, generator=gen), torch.randn(4, 4, dtype=D, generator=gen)
    _, jvp_fn = tl.linearize(f, x.clone(), y.clone())
    tx, ty = torch.randn(3, 4, 4, dtype=D, generator=gen), torch.randn(4, 4, dtype=D, generator=gen)
    got = torch.vmap(jvp_fn, in_dims=(0, None))(tx, ty)
    for k in range(3):
        torch.testing.assert_close(got[k], 2.0 * (ty - 0.5 * 1.7 * tx[k]))


def test_materialize_grads_false_passes_none_and_needs_input_grad():
    x, w = torch.randn(3, 4, dtype=D), torch.randn(4, dtype=D)
    # Only x is a primal: w's tangent is None in jvp (materialize_grads=False).
    y, jvp_fn = tl.linearize(lambda x: cf.WeightedSum.apply(x, w), x)
    t = torch.randn(3, 4, dtype=D)
    torch.testing.assert_close(jvp_fn(t), (t * w).sum(-1))
    assert cf.CALLS["WeightedSum.jvp.tw_is_none=True"] == 1
    # needs_input_grad marks the inputs that carry a tangent (documented choice).
    _, jvp_fn2 = tl.linearize(cf.WeightedSum.apply, x, w)
    tw = torch.randn(4, dtype=D)
    torch.testing.assert_close(jvp_fn2(t, tw), (t * w).sum(-1) + (x * tw).sum(-1))
    assert cf.CALLS["WeightedSum.jvp.tw_is_none=False"] == 1


def test_needs_input_grad_reports_tangent_carrying_inputs():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(x, w, k):
            return x * w * k

        @staticmethod
        def setup_context(ctx, inputs, output):
            seen.append(ctx.needs_input_grad)
            ctx.w, ctx.k = inputs[1], inputs[2]

        @staticmethod
        def jvp(ctx, tx, tw, tk):
            return tx * ctx.w * ctx.k

    w = torch.randn(3, dtype=D)
    tl.linearize(lambda x: Probe.apply(x, w, 2.0), torch.randn(3, dtype=D))
    assert seen == [(True, False, False)]


def test_same_function_used_several_times_has_separate_ctx():
    x = torch.randn(5, dtype=D)

    def f(x):
        a = cf.NumpyCube.apply(x)
        b = cf.NumpyCube.apply(a * 0.5)
        return a + b

    t = torch.randn(5, dtype=D)
    y, jvp_fn = tl.linearize(f, x)
    ref = torch.func.jvp(lambda x: x**3 + (0.5 * x**3) ** 3, (x,), (t,))
    torch.testing.assert_close(y, ref[0])
    torch.testing.assert_close(jvp_fn(t), ref[1])
    assert cf.CALLS["NumpyCube.forward"] == 2 and cf.CALLS["NumpyCube.jvp"] == 2


def test_nested_functions():
    x = torch.randn(4, dtype=D)
    y, jvp_fn = tl.linearize(cf.Outer.apply, x)
    t = torch.randn(4, dtype=D)
    torch.testing.assert_close(y, x**3 + 1)
    torch.testing.assert_close(jvp_fn(t), 3 * x**2 * t)
    assert cf.CALLS["Outer.forward"] == 1 and cf.CALLS["NumpyCube.forward"] == 1
    # Outer.jvp calls CtypesScale.apply on plain tensors: its forward, not its jvp.
    assert cf.CALLS["Outer.jvp"] == 1 and cf.CALLS["CtypesScale.forward"] == 1


def test_function_without_jvp_raises_naming_it():
    with pytest.raises(tl.NoForwardADError, match="NoJvp"):
        tl.linearize(cf.NoJvp.apply, torch.randn(3))


def test_jvp_with_wrong_shape_raises_at_apply():
    _, jvp_fn = tl.linearize(cf.WrongShapeJvp.apply, torch.randn(3))
    with pytest.raises(tl.LinearizeError, match=r"WrongShapeJvp.jvp returned f32\[\] at position 0; expected f32\[3\]"):
        jvp_fn(torch.randn(3))


def test_ctx_lives_exactly_as_long_as_the_map():
    ctxs = []

    class Keep(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctxs.append(weakref.ref(ctx))
            ctx.save_for_forward(inputs[0])

        @staticmethod
        def jvp(ctx, t):
            (x,) = ctx.saved_tensors
            return t * 2 + 0 * x

    _, jvp_fn = tl.linearize(lambda x: Keep.apply(x).sin(), torch.randn(3))
    gc.collect()
    assert ctxs[0]() is not None
    torch.testing.assert_close(jvp_fn(torch.ones(3)).shape, torch.Size([3]))
    del jvp_fn
    gc.collect()
    assert ctxs[0]() is None


def test_closure_parameters_requiring_grad_keep_opaque_path():
    w = torch.randn(4, dtype=D, requires_grad=True)
    x = torch.randn(4, dtype=D)
    y, jvp_fn = tl.linearize(lambda x: cf.NumpyCube.apply(x * w), x)
    t = torch.randn(4, dtype=D)
    torch.testing.assert_close(jvp_fn(t), 3 * (x * w.detach()) ** 2 * w.detach() * t)
    assert cf.CALLS["NumpyCube.jvp"] == 1


def test_reverse_mode_through_opaque_function_inside_f_raises():
    def grad_of(x):
        with torch.enable_grad():
            x = x.requires_grad_()
            (g,) = torch.autograd.grad(cf.NumpyCube.apply(x).sum(), x, create_graph=True)
        return g

    with pytest.raises(tl.LinearizeError, match="trace_jvp"):
        tl.linearize(grad_of, torch.randn(3, dtype=D))


def test_trace_jvp_supports_forward_over_reverse():
    Cube = tl.trace_jvp(type("TracedCube", (cf.Cube,), {}))

    def grad_of(x):
        with torch.enable_grad():
            x = x.requires_grad_()
            (g,) = torch.autograd.grad((Cube.apply(x) * x.sin()).sum(), x, create_graph=True)
        return g

    x = torch.randn(4, dtype=D)
    g, hvp = tl.linearize(grad_of, x)
    hess = torch.func.hessian(lambda x: (x**3 * x.sin()).sum())(x)
    v = torch.randn(4, dtype=D)
    torch.testing.assert_close(hvp(v), hess @ v)


def test_trace_jvp_detects_opaque_jvp():
    @tl.trace_jvp
    class Opaque(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def jvp(ctx, t):
            return torch.from_numpy(t.numpy() * 2)

    with pytest.raises(tl.LinearizeError, match="Opaque.jvp ran at trace time"):
        tl.linearize(Opaque.apply, torch.randn(3))


def test_function_bound_before_linearize_is_intercepted():
    cube = cf.NumpyCube.apply  # bound method created before any patch exists
    _, jvp_fn = tl.linearize(lambda x: cube(x), torch.randn(3, dtype=D))
    assert cf.CALLS["NumpyCube.jvp"] == 0
    jvp_fn(torch.randn(3, dtype=D))
    assert cf.CALLS["NumpyCube.jvp"] == 1


def test_trace_jvp_rejects_non_functions():
    with pytest.raises(TypeError, match="torch.autograd.Function subclass"):
        tl.trace_jvp(int)


def test_function_inside_torch_func_grad_follows_torch_func_rules():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x**2

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.save_for_forward(inputs[0])

        @staticmethod
        def jvp(ctx, t):
            (x,) = ctx.saved_tensors
            return 2 * x * t

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    def loss(x):
        return (Square.apply(x) * x).sum()

    x = torch.randn(3, dtype=D)
    _, hvp = tl.linearize(torch.func.grad(loss), x)
    v = torch.randn(3, dtype=D)
    torch.testing.assert_close(hvp(v), torch.func.hessian(lambda x: (x**3).sum())(x) @ v)


def test_function_patch_is_removed_after_linearize_and_on_error():
    single = torch.autograd.function._SingleLevelFunction
    backward_cls = torch.autograd.function.BackwardCFunction
    apply_jvp = backward_cls.__dict__["apply_jvp"]
    tl.linearize(cf.NumpyCube.apply, torch.randn(2, dtype=D))
    assert "apply" not in single.__dict__ and backward_cls.__dict__["apply_jvp"] is apply_jvp

    def boom(x):
        cf.NumpyCube.apply(x)
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        tl.linearize(boom, torch.randn(2, dtype=D))
    assert "apply" not in single.__dict__ and backward_cls.__dict__["apply_jvp"] is apply_jvp
    # Functions still work normally outside linearize, including forward AD.
    with fwAD.dual_level():
        d = fwAD.make_dual(torch.ones(2, dtype=D), torch.ones(2, dtype=D))
        assert fwAD.unpack_dual(cf.NumpyCube.apply(d)).tangent is not None


def test_functions_in_other_threads_are_not_intercepted():
    stop = threading.Event()
    errors = []

    def worker():
        try:
            while not stop.is_set():
                x = torch.randn(3, dtype=D, requires_grad=True)
                cf.NumpyCube.apply(x).sum().backward()
                assert torch.allclose(x.grad, 3 * x.detach() ** 2)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    th = threading.Thread(target=worker)
    th.start()
    try:
        for _ in range(20):
            _, jvp_fn = tl.linearize(cf.NumpyCube.apply, torch.randn(3, dtype=D))
            jvp_fn(torch.randn(3, dtype=D))
    finally:
        stop.set()
        th.join()
    assert not errors, errors


# ----------------------------------------------------------------------------- property test
def _weighted(a, b, detach):
    if a.dim() != 2 or a.shape != b.shape:
        return None
    return cf.WeightedSum.apply(a, b.detach() if detach else b).unsqueeze(-1) * a


_FUNCTIONS = [
    lambda a, b: cf.NumpyCube.apply(a),
    lambda a, b: cf.CtypesScale.apply(a, 1.7),
    lambda a, b: cf.SinCosPair.apply(a)[0],
    lambda a, b: cf.SinCosPair.apply(a)[1] * b if a.shape == b.shape else None,
    lambda a, b: cf.ScaleInPlace.apply(a, 1.3) if 0 not in a.stride() else None,  # mark_dirty
    lambda a, b: cf.ScaleInPlace.apply(a * 1.0, 0.7),
    lambda a, b: _weighted(a, b, detach=False),
    lambda a, b: _weighted(a, b, detach=True),  # materialize_grads=False: jvp sees None
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutating_programs([torch.sin, torch.exp, torch.tanh, lambda v: v * 2.5, F.softplus],
                         _FUNCTIONS), st.integers(0, 2**31 - 1))
def test_random_programs_with_custom_functions(f, seed):
    # Custom Functions (numpy, raw pointers, several outputs, mark_dirty, None tangents)
    # inside random programs with views and in-place writes. Their ctx tensors are read
    # when the map is applied, not when f runs (as in eager forward AD), so a later write
    # into one must not reach them; mark_dirty nodes must transpose and vmap. The
    # reference is eager forward AD (NumpyCube and ScaleInPlace use forward(ctx, ...),
    # which torch.func does not take).
    check_random_program(f, seed, reference="eager")


# ----------------------------------------------------------------------------------------
# forward and setup_context run outside the tracer's dispatch mode where that is safe


class _Spy(torch.autograd.Function):
    """Records the innermost dispatch mode its forward and setup_context run under; saves
    a fresh coefficient (``d``), or, with ``keep``, a tensor from outside (``keep[0]``)."""

    modes: list = []
    keep: list = []

    @staticmethod
    def forward(x):
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        _Spy.modes.append(_get_current_dispatch_mode())
        return torch.tanh(x) * 2.0

    @staticmethod
    def setup_context(ctx, inputs, output):
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        _Spy.modes.append(_get_current_dispatch_mode())
        ctx.save_for_forward(_Spy.keep[0] if _Spy.keep else 2.0 - output * output / 2.0)

    @staticmethod
    def jvp(ctx, t):
        (d,) = ctx.saved_tensors
        return t * d


class _Ident(torch.autograd.Function):
    """forward returns its input as is: the output is not a new tensor."""

    @staticmethod
    def forward(x):
        return x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def jvp(ctx, t):
        return t


@pytest.fixture
def spy():
    _Spy.modes, _Spy.keep = [], []
    yield _Spy
    _Spy.modes, _Spy.keep = [], []


@pytest.fixture(params=[True, False], ids=["outside", "under-the-mode"])
def outside(request, monkeypatch):
    monkeypatch.setattr(tl._trace, "PRIMAL_CODE_OUTSIDE", request.param)
    return request.param


def test_forward_runs_outside_the_dispatch_mode_unless_an_input_is_guarded(spy, outside):
    x, w = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    y, jvp_fn = tl.linearize(lambda x: spy.apply(torch.sin(x)), x)
    if outside:
        assert spy.modes == [None, None]  # (no mode at all: f was entered without one)
    else:
        assert all(isinstance(m, tl._trace.Tracer) for m in spy.modes) and len(spy.modes) == 2
    t = torch.randn(5, dtype=D)
    torch.testing.assert_close(y, torch.tanh(torch.sin(x)) * 2)
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(
        lambda x: torch.tanh(torch.sin(x)) * 2, (x,), (t,))[1])
    assert jvp_fn.residual_bytes == 2 * 5 * 8 and jvp_fn.external_bytes == 0  # cos(x), d

    # An input that is a residual of the program (a write to it must be copied first,
    # which only the mode sees happen): forward runs under the mode.
    spy.modes.clear()

    def g(x, w):
        a = torch.exp(x)
        return a * w, spy.apply(a)  # a: the residual of a * w's tangent

    _, jvp_fn = tl.linearize(g, x, w)
    assert all(isinstance(m, tl._trace.Tracer) for m in spy.modes) and len(spy.modes) == 2
    s = torch.randn(5, dtype=D)
    want = torch.func.jvp(lambda x, w: (torch.exp(x) * w, torch.tanh(torch.exp(x)) * 2),
                          (x, w), (t, s))[1]
    torch.testing.assert_close(jvp_fn(t, s), want)


def test_forward_sees_a_mode_that_f_entered(spy, outside):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func is torch.ops.aten.tanh.default
            return func(*args, **(kwargs or {}))

    def f(x):
        with Count():
            return spy.apply(x)

    x, t = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    _, jvp_fn = tl.linearize(f, x)
    assert Count.n == 1 and all(isinstance(m, Count) for m in spy.modes)
    torch.testing.assert_close(jvp_fn(t), t * (2 - 2 * torch.tanh(x) ** 2))


def test_forward_returning_its_input_leaves_it_watched(outside):
    # The output of _Ident *is* w: the map reads it (x's tangent times y), and must raise
    # when w changes after linearize, as for any pre-existing tensor.
    x, w = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    y, jvp_fn = tl.linearize(lambda x, w: x * _Ident.apply(w), x, w)
    t, s = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    torch.testing.assert_close(jvp_fn(t, s), t * w + x * s)
    assert jvp_fn.residual_bytes == 0 and jvp_fn.external_bytes == 2 * 4 * 8  # x and w
    w.mul_(2)
    with pytest.raises(tl.StaleResidualError, match=r"primals\[1\] was modified"):
        jvp_fn(t, s)


def test_a_tensor_from_outside_saved_by_setup_context_is_watched(spy, outside):
    w = torch.rand(5, dtype=D) + 1
    spy.keep.append(w)  # saved on the ctx: pre-existing, not allocated by linearize
    x, t = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    _, jvp_fn = tl.linearize(spy.apply, x)
    torch.testing.assert_close(jvp_fn(t), t * w)
    w.add_(1)
    with pytest.raises(tl.StaleResidualError, match="_Spy keeps on its ctx"):
        jvp_fn(t)


def test_forward_writing_a_guarded_input_in_place_matches_eager(outside):
    # ScaleInPlace (mark_dirty) scales a tensor that the program also reads as a residual:
    # the residual must keep its value from before the write.
    x = torch.randn(4, dtype=D)

    def f(x):
        a = torch.cos(x)
        b = a * x  # a: a residual
        return cf.ScaleInPlace.apply(a, 3.0) + b

    t = torch.randn(4, dtype=D)
    ry, rt = eager_jvp(f, (x,), (t,))
    y, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(jvp_fn(t), rt)


class _WritesGlobal(torch.autograd.Function):
    target: list = []

    @staticmethod
    def forward(x):
        _WritesGlobal.target[0].mul_(2)  # a tensor that is not an input
        return x * 1.0

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def jvp(ctx, t):
        return t


def test_forward_writing_a_residual_that_is_not_its_input(outside):
    g = torch.randn(4, dtype=D)
    _WritesGlobal.target[:] = [g]
    x, t = torch.randn(4, dtype=D), torch.randn(4, dtype=D)

    def f(x):
        return x * g + _WritesGlobal.apply(x)  # g: a residual, then written by forward

    g0 = g.clone()
    try:
        if outside:  # the write is not seen as it happens: the end-of-trace check raises
            with pytest.raises(tl.StaleResidualError, match="custom Function's forward"):
                tl.linearize(f, x)
        else:  # seen by the mode: the residual was copied first
            _, jvp_fn = tl.linearize(f, x)
            torch.testing.assert_close(jvp_fn(t), t * g0 + t)
    finally:
        _WritesGlobal.target.clear()


def test_function_without_tangent_inputs_runs_outside_the_mode(spy, outside):
    # A custom Function applied to tangent-free values (forward AD calls no jvp): its
    # forward and setup_context are primal code, run like those of a Function with
    # tangent inputs. Its output, read by the map as a residual, is watched.
    x, t, c = (torch.randn(5, dtype=D) for _ in range(3))

    def f(x):
        s = spy.apply(torch.cos(c))
        return x * s, s

    (y, s), jvp_fn = tl.linearize(f, x)
    if outside:
        assert spy.modes == [None, None]
    else:
        assert all(isinstance(m, tl._trace.Tracer) for m in spy.modes) and len(spy.modes) == 2
    want = torch.tanh(torch.cos(c)) * 2
    torch.testing.assert_close(s, want)
    out_t, s_t = jvp_fn(t)
    torch.testing.assert_close(out_t, torch.func.jvp(lambda x: x * want, (x,), (t,))[1])
    torch.testing.assert_close(s_t, torch.zeros(5, dtype=D))
    assert jvp_fn.residual_bytes == 5 * 8 and jvp_fn.external_bytes == 0  # s
    s.mul_(2)  # the caller's output is the residual the map reads
    with pytest.raises(tl.StaleResidualError):
        jvp_fn(t)


def test_function_without_tangent_inputs_on_a_residual_runs_under_the_mode(spy, outside):
    x, t, c = (torch.randn(5, dtype=D) for _ in range(3))

    def f(x):
        a = torch.exp(c)
        return x * a + spy.apply(a)  # a: a residual (a write to it must be seen)

    _, jvp_fn = tl.linearize(f, x)
    assert all(isinstance(m, tl._trace.Tracer) for m in spy.modes) and len(spy.modes) == 2
    torch.testing.assert_close(jvp_fn(t), t * torch.exp(c))


@pytest.mark.parametrize("guarded", [False, True], ids=["fresh", "residual"])
def test_function_without_tangent_inputs_writing_in_place(outside, guarded):
    # ScaleInPlace (mark_dirty) on a tangent-free buffer: outside the mode when the buffer
    # is fresh (the write's bookkeeping after the fact); under it when the program reads
    # the buffer as a residual (the residual keeps its value from before the write).
    x, t, c = (torch.randn(4, dtype=D) for _ in range(3))

    def f(x):
        a = c.clone()
        b = x * a if guarded else x * 0.5
        return x * cf.ScaleInPlace.apply(a, 3.0) + b

    ry, rt = eager_jvp(f, (x,), (t,))
    y, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(jvp_fn(t), rt)


def test_implicit_layer_whose_forward_and_jvp_use_linearize():
    # y(x) solves y + tanh(y)/2 = x by Newton steps whose derivative comes from linearize,
    # inside the Function's forward (PyTorch switches forward AD off there) and inside its
    # jvp (run when the outer map is applied). Before stop 20 the inner maps were silently
    # zero there: the Newton step divided by 0.
    def g(y, x):
        return y + 0.5 * torch.tanh(y) - x

    class Solve(torch.autograd.Function):
        @staticmethod
        def forward(x):
            y = x.clone()
            for _ in range(30):
                r, jy = tl.linearize(lambda y: g(y, x), y)
                y = y - r / jy(torch.ones_like(y))  # (elementwise: the Jacobian's diagonal)
            return y

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_forward(output)
            ctx.x = inputs[0]

        @staticmethod
        def jvp(ctx, tx):
            (y,) = ctx.saved_tensors
            _, jy = tl.linearize(lambda y: g(y, ctx.x), y)
            return tx / jy(torch.ones_like(y))

    x, t = torch.randn(6, dtype=D), torch.randn(6, dtype=D)
    y, jvp_fn = tl.linearize(lambda x: Solve.apply(x) ** 2, x)
    s = Solve.apply(x)
    torch.testing.assert_close(g(s, x), torch.zeros(6, dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(y, s ** 2)
    torch.testing.assert_close(jvp_fn(t), 2 * s * t / (1 + 0.5 / torch.cosh(s) ** 2))


def test_activation_checkpointing_inside_f():
    # Non-reentrant checkpointing is plain PyTorch code to forward AD: it linearizes. The
    # reentrant one is a custom Function without a jvp (eager forward AD refuses it too):
    # the error says which flag to use.
    from torch.utils.checkpoint import checkpoint

    x, t = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    block = lambda a: torch.sin(a) * a
    _, jvp_fn = tl.linearize(lambda x: checkpoint(block, x, use_reentrant=False), x)
    torch.testing.assert_close(jvp_fn(t), eager_jvp(block, (x,), (t,))[1])
    with pytest.raises(tl.NoForwardADError, match="use_reentrant=False"):
        tl.linearize(lambda x: checkpoint(block, x, use_reentrant=True), x)


class _TailView(torch.autograd.Function):
    """forward returns a view of its input (offset 1): forward AD lays the output's tangent
    out like the input's storage, a copy the program makes after the node's jvp."""

    @staticmethod
    def forward(x):
        return x[1:]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.n = inputs[0].shape[0]

    @staticmethod
    def jvp(ctx, tx):
        return tx[1:]

    @staticmethod
    def backward(ctx, g):
        return torch.cat([g.new_zeros(ctx.n - g.shape[0]), g])


@pytest.mark.parametrize("use", ["as-is", "scaled", "written-in-place"])
def test_function_returning_a_view_of_its_input(use):
    # The copy that lays the output's tangent out was recorded before the node's equation,
    # so the generated code read the node's result before computing it (NameError).
    def f(x):
        if use == "as-is":
            return _TailView.apply(x)
        if use == "scaled":
            return _TailView.apply(x) * 2
        return _TailView.apply(x.clone()).mul_(2)

    def ref(x):
        y = x[1:]
        return y if use == "as-is" else y * 2

    x, t = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    y, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(jvp_fn(t), eager_jvp(f, (x,), (t,))[1])
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(ref, (x,), (t,))[1])
    ts = torch.randn(3, 5, dtype=D)
    torch.testing.assert_close(torch.vmap(jvp_fn)(ts), torch.vmap(
        lambda s: torch.func.jvp(ref, (x,), (s,))[1])(ts))
    u = torch.randn(4, dtype=D)
    torch.testing.assert_close(jvp_fn.T(u)[0], torch.func.vjp(ref, x)[1](u)[0])


class _Rows(torch.autograd.Function):
    """forward returns a view of its input (rows 1:), old style; jvp the same view."""

    @staticmethod
    def forward(ctx, a):
        ctx.n = a.shape[0]
        return a[1:]

    @staticmethod
    def jvp(ctx, ta):
        return ta[1:]

    @staticmethod
    def backward(ctx, g):
        return torch.cat([g.new_zeros(ctx.n - g.shape[0], *g.shape[1:]), g])


class _AsIs(torch.autograd.Function):
    """forward returns its input as is (eager: a view of it); jvp a view of its tangent."""

    @staticmethod
    def forward(a):
        return a

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def jvp(ctx, ta):
        return ta.view_as(ta)

    @staticmethod
    def backward(ctx, g):
        return g


class _ViewAndSin(torch.autograd.Function):
    """Two outputs: a view of the input (transposed rows :2) and sin of it."""

    @staticmethod
    def forward(a):
        return a[:2].t(), a.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[0])
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def jvp(ctx, ta):
        (a,) = ctx.saved_tensors
        return ta[:2].t(), ta * a.cos()

    @staticmethod
    def backward(ctx, gv, gs):
        (a,) = ctx.saved_tensors
        g = gs * a.cos()
        return torch.cat([g[:2] + gv.t(), g[2:]])


class _ScaleAndView(torch.autograd.Function):
    """Doubles its input in place (mark_dirty) and returns it with a view of it."""

    @staticmethod
    def forward(ctx, a):
        a.mul_(2)
        ctx.mark_dirty(a)
        return a, a[1:]

    @staticmethod
    def jvp(ctx, ta):
        ta.mul_(2)
        return ta, ta[1:]

    @staticmethod
    def backward(ctx, ga, gv):
        g = ga.clone()
        g[1:] += gv
        return 2 * g


def _write_view_read_base(x):
    y = x.exp()
    _Rows.apply(y).mul_(2)
    return y


def _write_base_read_view(x):
    y = x.exp()
    v = _Rows.apply(y)
    y.mul_(3)
    return v * 1.0


def _as_is_write_base_read_view(x):
    y = x.sin()
    v = _AsIs.apply(y)
    y.mul_(3)
    return v


def _as_is_write_view_read_base(x):
    y = x.sin()
    _AsIs.apply(y).mul_(2)
    return y.cos() + y


def _view_of_the_primal_input(x):
    _Rows.apply(x).mul_(2)
    return x


def _two_outputs(x):
    y = x * 3
    v, s = _ViewAndSin.apply(y)
    v.add_(s[:2].t())
    return y, s


def _dirty_and_a_view(x):
    y = x.exp()
    a, v = _ScaleAndView.apply(y)
    v.mul_(3)
    return a.sin(), y


@pytest.mark.parametrize("f", [
    _write_view_read_base, _write_base_read_view, _as_is_write_base_read_view,
    _as_is_write_view_read_base, _view_of_the_primal_input, _two_outputs, _dirty_and_a_view,
], ids=lambda f: f.__name__.strip("_"))
def test_output_viewing_an_input_shares_its_tangent(f):
    # An opaque Function's output that is a view of an input (or the input as is) got a
    # fresh tangent: an in-place write through the output did not reach the input's
    # tangent, nor one through the input the output's (silently wrong maps, errors 1-30).
    # Eager forward AD makes jvp return the view of the input's tangent: the tangents
    # alias. The output's tangent is now that view of the input's tangent.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, dtype=D, generator=gen)
    ts = torch.randn(3, 4, 4, dtype=D, generator=gen)
    y, jvp_fn = tl.linearize(f, x.clone())
    torch.testing.assert_close(y, f(x.clone()))
    got = [jvp_fn(t) for t in ts]
    for t, g in zip(ts, got):
        torch.testing.assert_close(g, eager_jvp(f, (x.clone(),), (t.clone(),))[1])
        torch.testing.assert_close(g, central_difference(f, (x,), (t,)), rtol=1e-6, atol=1e-6)
    stacked = _tree_stack(got)
    torch.testing.assert_close(torch.vmap(jvp_fn)(ts), stacked)
    torch.testing.assert_close(jvp_fn.batched(ts), stacked)
    # the transpose: <T(u), t> == <u, jvp(t)>, one cotangent at a time and under vmap
    us = [rand_like_tree(y, gen) for _ in range(3)]
    cots = [jvp_fn.T(u)[0] for u in us]
    for u, c in zip(us, cots):
        for t, g in zip(ts, got):
            torch.testing.assert_close((c * t).sum(), _inner(u, g))
    torch.testing.assert_close(torch.vmap(jvp_fn.T)(_tree_stack(us))[0], torch.stack(cots))


def _tree_stack(trees):
    return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *trees)


def _inner(u, v):
    flat_u, flat_v = torch.utils._pytree.tree_leaves(u), torch.utils._pytree.tree_leaves(v)
    return sum((a * b).sum() for a, b in zip(flat_u, flat_v))


# --- a Function's own workspace ------------------------------------------------------------
# A raw kernel's jvp/backward often writes a buffer forward allocated and kept on ctx.
# Those writes are the Function's own: only writes from outside make the map stale.

class _Workspace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_forward(x.cos())
        ctx.save_for_backward(x.cos())
        ctx.buf = torch.empty_like(x)  # the tangent kernel's workspace
        ctx.w = w  # a tensor the caller keeps (not an input with a tangent)
        return x.sin() * w

    @staticmethod
    def jvp(ctx, dx, dw):
        c, = ctx.saved_tensors
        torch.mul(c, dx, out=ctx.buf)  # the kernel writes its workspace
        ctx.buf.mul_(ctx.w)
        return ctx.buf.clone()

    @staticmethod
    def backward(ctx, g):
        c, = ctx.saved_tensors
        torch.mul(c, g, out=ctx.buf)
        ctx.buf.mul_(ctx.w)
        return ctx.buf.clone(), None


@pytest.mark.parametrize("route", ["call", "two_inputs", "vmap", "batched", "transpose",
                                   "compile"])
def test_a_functions_writes_into_its_own_workspace_are_not_stale(route):
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(4, 3, dtype=torch.float64)
    f = (lambda x: _Workspace.apply(x, w)) if route != "two_inputs" else \
        (lambda x, y: _Workspace.apply(x, w) + y)
    primals = (x,) if route != "two_inputs" else (x, x.clone())
    _, jvp_fn = tl.linearize(f, *primals)
    want = lambda t: x.cos() * w * t
    for _ in range(3):  # (the second application found the workspace "modified")
        t = torch.randn(4, 3, dtype=torch.float64)
        if route == "call":
            got, ref = jvp_fn(t), want(t)
        elif route == "two_inputs":
            got, ref = jvp_fn(t, t), want(t) + t
        elif route == "vmap":
            ts = torch.randn(2, 4, 3, dtype=torch.float64)
            got, ref = torch.vmap(jvp_fn)(ts), torch.stack([want(s) for s in ts])
        elif route == "batched":
            ts = torch.randn(2, 4, 3, dtype=torch.float64)
            got, ref = jvp_fn.batched(ts), torch.stack([want(s) for s in ts])
        elif route == "transpose":
            got, ref = jvp_fn.T(t)[0], want(t)
        else:
            got, ref = jvp_fn.compile()(t), want(t)
        torch.testing.assert_close(got, ref)
    w.add_(1)  # a write from outside into a tensor the ctx holds: stale
    with pytest.raises(tl.StaleResidualError, match="modified in place"):
        jvp_fn(*primals)


class _ScaleOldStyle(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x, scale=2.0):
        ctx.scale = scale
        return torch.from_numpy(x.numpy() * scale)  # opaque to any tracer

    @staticmethod
    def jvp(ctx, dx, dscale=None):
        _ScaleOldStyle.calls += 1
        return torch.from_numpy(dx.numpy() * ctx.scale)


@pytest.mark.parametrize("call", ["positional", "keyword", "default"])
def test_old_style_function_called_with_keywords_takes_the_per_tangent_path(call):
    # PyTorch passes apply's keywords to forward(ctx, ...) as the inputs they name;
    # linearize took such calls for forward-AD tracing, which cannot run a numpy jvp
    x = torch.randn(3, dtype=D)
    fn = {"positional": lambda x: _ScaleOldStyle.apply(x, 3.0),
          "keyword": lambda x: _ScaleOldStyle.apply(x, scale=3.0),
          "default": lambda x: _ScaleOldStyle.apply(x)}[call]
    scale = 2.0 if call == "default" else 3.0
    _ScaleOldStyle.calls = 0
    y, jvp_fn = tl.linearize(fn, x)
    torch.testing.assert_close(y, x * scale)
    assert _ScaleOldStyle.calls == 0
    for _ in range(2):
        t = torch.randn(3, dtype=D)
        torch.testing.assert_close(jvp_fn(t), t * scale)
    assert _ScaleOldStyle.calls == 2


class _ListArg(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lst):
        ctx.w = lst[0]
        return x * lst[0]

    @staticmethod
    def jvp(ctx, dx, dlst):  # no tangent for lst[0]: PyTorch passes None
        return dx * ctx.w


@pytest.mark.parametrize("container", [list, tuple, lambda v: {"w": v}])
def test_a_tangent_inside_a_container_argument_is_refused_not_dropped(container):
    x = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    with pytest.raises(tl.NoForwardADError, match=r"_ListArg got a tensor that carries a "
                                                  r"tangent inside its argument 1"):
        tl.linearize(lambda x: _ListArg.apply(x, container([x]) if container is not list
                                              else [x]), x)
    # a constant inside the container is fine
    w = torch.tensor([4.0, 5.0, 6.0], dtype=D)
    fn = (lambda x: _ListArg.apply(x, [w])) if container is list else \
        (lambda x: _ListArg.apply(x, (w,)))
    _, jvp_fn = tl.linearize(fn, x)
    torch.testing.assert_close(jvp_fn(torch.ones(3, dtype=D)), w)
