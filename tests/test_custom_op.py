"""Tests for ``torch_linearize/_custom_op.py``: ``register_jvp`` on ``torch.library.custom_op``.

Part 1 uses pure-PyTorch ops whose bodies count their calls (so "kernel once,
rule per tangent" is checked by counting). Part 2 wraps C++ kernels built with
``torch.utils.cpp_extension.load_inline`` (raw data pointers, compiled once for
the module) as custom ops: a forward kernel and a separate tangent kernel that
handles a whole batch of tangents in one launch; the C++ side counts launches.

References are independent of the code under test: ``torch.func.jvp`` /
``torch.func.vjp`` of the same maths written in plain PyTorch, central
differences, and closed-form derivatives, all in float64.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

import torch_linearize as tl
from helpers import central_difference, eager_jvp

D = torch.float64
CALLS: collections.Counter = collections.Counter()


@pytest.fixture(autouse=True)
def _reset_calls():
    CALLS.clear()
    yield


def _expand_bdim(info, x, d):
    return x.movedim(d, 0) if d is not None else x.expand(info.batch_size, *x.shape)


# ----------------------------------------------------------------------------- pure-PyTorch ops
# y = sin(x) * w ; the tangent rule calls another custom op (with a batching rule) for the
# sin part, like a hand-written tangent kernel would be called.
@torch.library.custom_op("tl_test_op::sinmul", mutates_args=())
def sinmul(x: Tensor, w: Tensor) -> Tensor:
    CALLS["sinmul"] += 1
    return torch.sin(x) * w


@sinmul.register_fake
def _(x, w):
    return torch.empty_like(x)


@torch.library.custom_op("tl_test_op::cos_scale", mutates_args=())
def cos_scale(x: Tensor, w: Tensor, t: Tensor) -> Tensor:
    """t * cos(x) * w; t may carry extra leading (batch) dimensions: one launch for all."""
    CALLS["cos_scale"] += 1
    return t * (torch.cos(x) * w)


@cos_scale.register_fake
def _(x, w, t):
    return torch.empty_like(t)


@cos_scale.register_vmap
def _(info, in_dims, x, w, t):
    CALLS["cos_scale.vmap"] += 1
    if in_dims[0] is not None or in_dims[1] is not None:  # not needed by these tests
        x, w = _expand_bdim(info, x, in_dims[0]), _expand_bdim(info, w, in_dims[1])
    return cos_scale(x, w, _expand_bdim(info, t, in_dims[2])), 0


def sinmul_setup(ctx, inputs, output):
    CALLS["sinmul.setup_context"] += 1
    ctx.save_for_forward(*inputs)


def sinmul_jvp(ctx, tx, tw):
    CALLS["sinmul.jvp"] += 1
    x, w = ctx.saved_tensors
    out = None
    if tx is not None:
        out = cos_scale(x, w, tx)
    if tw is not None:
        out = torch.sin(x) * tw if out is None else out + torch.sin(x) * tw
    return out


def sinmul_backward_setup(ctx, inputs, output):
    CALLS["sinmul.backward_setup"] += 1
    ctx.save_for_backward(*inputs)


def sinmul_backward(ctx, g):
    CALLS["sinmul.backward"] += 1
    x, w = ctx.saved_tensors
    return g * torch.cos(x) * w, g * torch.sin(x)


tl.register_jvp(sinmul, sinmul_jvp, setup_context=sinmul_setup)
sinmul.register_autograd(sinmul_backward, setup_context=sinmul_backward_setup)


def sinmul_ref(x, w):
    return torch.sin(x) * w


def test_linearize_runs_kernel_once_and_rule_per_tangent():
    x, w = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)

    def f(x, w):
        return sinmul(x.exp(), w).tanh()

    def ref(x, w):
        return sinmul_ref(x.exp(), w).tanh()

    y, jvp_fn = tl.linearize(f, x, w)
    assert CALLS == {"sinmul": 1, "sinmul.setup_context": 1, "sinmul.backward_setup": 1}
    torch.testing.assert_close(y, ref(x, w))
    gen = torch.Generator().manual_seed(0)
    for k in range(1, 4):
        tx, tw = torch.randn(3, 4, dtype=D, generator=gen), torch.randn(3, 4, dtype=D, generator=gen)
        _, want = torch.func.jvp(ref, (x, w), (tx, tw))
        torch.testing.assert_close(jvp_fn(tx, tw), want)
        assert CALLS["sinmul.jvp"] == k and CALLS["cos_scale"] == k
    assert CALLS["sinmul"] == 1 and CALLS["sinmul.setup_context"] == 1
    torch.testing.assert_close(jvp_fn(tx, tw), central_difference(ref, (x, w), (tx, tw)),
                               rtol=1e-6, atol=1e-8)


def test_rule_gets_none_for_inputs_without_tangent():
    seen = []

    @torch.library.custom_op("tl_test_op::scale_by", mutates_args=())
    def scale_by(x: Tensor, w: Tensor) -> Tensor:
        return x * w

    def jvp(ctx, tx, tw):
        seen.append((tx is None, tw is None))
        return tx * ctx.w

    def setup(ctx, inputs, output):
        ctx.w = inputs[1]

    tl.register_jvp(scale_by, jvp, setup_context=setup)
    x, w, t = (torch.randn(5, dtype=D) for _ in range(3))
    _, jvp_fn = tl.linearize(lambda x: scale_by(x, w), x)  # w is a constant
    torch.testing.assert_close(jvp_fn(t), t * w)
    _, rt = eager_jvp(lambda x: scale_by(x, w), (x,), (t,))
    torch.testing.assert_close(rt, t * w)
    _, ft = torch.func.jvp(lambda x: scale_by(x, w), (x,), (t,))
    torch.testing.assert_close(ft, t * w)
    assert seen == [(False, True)] * 3


def test_eager_forward_ad_and_torch_func_jvp_match_reference():
    x, w, tx, tw = (torch.randn(6, dtype=D) for _ in range(4))
    want = tx * torch.cos(x) * w + torch.sin(x) * tw
    y, t = eager_jvp(sinmul, (x, w), (tx, tw))
    torch.testing.assert_close(y, sinmul_ref(x, w))
    torch.testing.assert_close(t, want)
    y, t = torch.func.jvp(sinmul, (x, w), (tx, tw))
    torch.testing.assert_close(t, want)
    torch.testing.assert_close(torch.func.jacfwd(sinmul)(x, w), torch.diag(torch.cos(x) * w))


def test_without_register_jvp_pytorch_drops_the_tangent():
    # The problem register_jvp solves: PyTorch gives a custom op no tangent (zero), silently.
    @torch.library.custom_op("tl_test_op::plain_sin", mutates_args=())
    def plain_sin(x: Tensor) -> Tensor:
        return torch.sin(x)

    x, t = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    assert eager_jvp(plain_sin, (x,), (t,))[1].abs().max() == 0
    assert torch.func.jvp(plain_sin, (x,), (t,))[1].abs().max() == 0
    tl.register_jvp(plain_sin, lambda ctx, tx: tx * torch.cos(ctx.x),
                    setup_context=lambda ctx, inputs, output: setattr(ctx, "x", inputs[0]))
    torch.testing.assert_close(eager_jvp(plain_sin, (x,), (t,))[1], t * torch.cos(x))
    torch.testing.assert_close(torch.func.jvp(plain_sin, (x,), (t,))[1], t * torch.cos(x))


def test_linearize_of_custom_op_without_rule_raises_then_works_with_one():
    @torch.library.custom_op("tl_test_op::no_rule", mutates_args=())
    def no_rule(x: Tensor) -> Tensor:
        return torch.sin(x)

    x, t = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    with pytest.raises(tl.NoForwardADError, match=r"no_rule.*register_jvp"):
        tl.linearize(no_rule, x)
    tl.linearize(lambda x: no_rule(x.detach()), x)  # no tangent reaches it: fine
    tl.register_jvp(no_rule, lambda ctx, t: t * torch.cos(ctx.x),
                    setup_context=lambda ctx, inputs, output: setattr(ctx, "x", inputs[0]))
    torch.testing.assert_close(tl.linearize(no_rule, x)[1](t), t * torch.cos(x))


@torch.library.custom_op("tl_test_op::twice_into", mutates_args=("out",))
def twice_into(x: Tensor, out: Tensor) -> None:
    out.copy_(2 * x)


@torch.library.custom_op("tl_test_op::fill7", mutates_args=("out",))
def fill7(out: Tensor) -> None:
    out.fill_(7.0)


def test_a_mutating_custom_op_that_returns_nothing_is_seen():
    """An operator that writes in place and returns nothing: until stop 21 the tracer took
    it for a metadata query and ran it unseen (a silently zero map where the tangent of
    its input was dropped; a misleading StaleResidualError where it wrote a residual)."""
    x, t = torch.randn(4, dtype=D), torch.randn(4, dtype=D)

    def dropped(x):
        out = torch.zeros(4, dtype=D)
        twice_into(x, out)
        return out

    with pytest.raises(tl.NoForwardADError, match="twice_into.*register_jvp"):
        tl.linearize(dropped, x)

    def writes_a_residual(x):
        w = torch.outer(x, x).detach().exp()
        y = w @ x  # (w is read by y's tangent)
        fill7(w)  # no tangent reaches it: a primal write, w is copied before it
        return y

    y, jvp_fn = tl.linearize(writes_a_residual, x)
    _, want = eager_jvp(writes_a_residual, (x,), (t,))
    torch.testing.assert_close(jvp_fn(t), want)
    torch.testing.assert_close(jvp_fn(t), torch.outer(x, x).exp() @ t)


def test_reverse_mode_and_torch_func_transforms_use_register_autograd():
    x, w = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    # plain autograd
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(sinmul(xr, w).sum(), xr)
    torch.testing.assert_close(g, torch.cos(x) * w)
    # torch.func.grad / jacrev (PyTorch's own custom-op autograd rejects these transforms)
    torch.testing.assert_close(torch.func.grad(lambda x: sinmul(x, w).sum())(x), torch.cos(x) * w)
    torch.testing.assert_close(torch.func.jacrev(sinmul)(x, w), torch.diag(torch.cos(x) * w))
    # forward-over-reverse Hessian-vector product: jvp of grad
    t = torch.randn(5, dtype=D)
    _, hvp = torch.func.jvp(torch.func.grad(lambda x: sinmul(x, w).sum()), (x,), (t,))
    torch.testing.assert_close(hvp, -torch.sin(x) * w * t)
    H = torch.func.hessian(lambda x: sinmul(x, w).sum())(x)
    torch.testing.assert_close(H, torch.diag(-torch.sin(x) * w))
    # ... and linearize of the gradient: Hessian-vector products
    _, hvp_fn = tl.linearize(torch.func.grad(lambda x: sinmul(x, w).sum()), x)
    torch.testing.assert_close(hvp_fn(t), -torch.sin(x) * w * t)


def test_backward_gets_zero_filled_gradients_for_unused_outputs():
    seen = []

    @torch.library.custom_op("tl_test_op::sin_cos", mutates_args=())
    def sin_cos(x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.sin(x), torch.cos(x)

    def setup(ctx, inputs, output):
        ctx.x = inputs[0]

    def backward(ctx, gs, gc):
        seen.append((gs, gc))
        return gs * torch.cos(ctx.x) - gc * torch.sin(ctx.x)

    tl.register_jvp(sin_cos, lambda ctx, t: (t * torch.cos(ctx.x), -t * torch.sin(ctx.x)),
                    setup_context=setup)
    sin_cos.register_autograd(backward, setup_context=setup)
    x, u = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: sin_cos(x)[0] * 2, x)
    (g,) = jvp_fn.transpose()(u)
    torch.testing.assert_close(g, 2 * u * torch.cos(x))
    assert isinstance(seen[-1][1], Tensor) and seen[-1][1].abs().max() == 0
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(sin_cos(xr)[1], xr, u)
    torch.testing.assert_close(g, -u * torch.sin(x))
    assert isinstance(seen[-1][0], Tensor) and seen[-1][0].abs().max() == 0


def test_transpose_uses_register_autograd():
    x, w = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)

    def f(x, w):
        return sinmul(x, w).sum(0) * 2

    def ref(x, w):
        return sinmul_ref(x, w).sum(0) * 2

    _, jvp_fn = tl.linearize(f, x, w)
    vjp_fn = jvp_fn.transpose()
    _, ref_vjp = torch.func.vjp(ref, x, w)
    u = torch.randn(4, dtype=D)
    n0 = CALLS["sinmul.backward"]
    torch.testing.assert_close(vjp_fn(u), ref_vjp(u))
    assert CALLS["sinmul.backward"] == n0 + 1 and CALLS["sinmul"] == 1


def test_register_autograd_after_register_jvp_and_shared_setup_context():
    count = collections.Counter()

    @torch.library.custom_op("tl_test_op::square", mutates_args=())
    def square(x: Tensor) -> Tensor:
        return x * x

    def setup(ctx, inputs, output):
        count["setup"] += 1
        ctx.x = inputs[0]

    tl.register_jvp(square, lambda ctx, t: 2 * ctx.x * t, setup_context=setup)
    x, t = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(square, x)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        jvp_fn.transpose()(t)
    square.register_autograd(lambda ctx, g: 2 * ctx.x * g, setup_context=setup)  # later, same fn
    count.clear()
    _, jvp_fn = tl.linearize(square, x)
    assert count["setup"] == 1  # the shared setup_context ran once
    torch.testing.assert_close(jvp_fn(t), 2 * x * t)
    torch.testing.assert_close(jvp_fn.transpose()(t), (2 * x * t,))


def test_vmap_of_linear_map_batches_the_tangent_op():
    x, w = torch.randn(7, dtype=D), torch.randn(7, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: sinmul(x, w), x)
    T = torch.randn(16, 7, dtype=D)
    got = torch.vmap(jvp_fn)(T)
    torch.testing.assert_close(got, T * torch.cos(x) * w)
    # the jvp rule was vmapped once: one launch of the tangent op for all 16 tangents
    assert CALLS["sinmul.jvp"] == 1 and CALLS["cos_scale"] == 1 and CALLS["cos_scale.vmap"] == 1
    assert CALLS["sinmul"] == 1
    # the Jacobian goes through the same batched path
    torch.testing.assert_close(jvp_fn.jacobian(), torch.diag(torch.cos(x) * w))


def test_multiple_outputs_non_tensor_and_keyword_only_arguments():
    seen = []

    @torch.library.custom_op("tl_test_op::affine3", mutates_args=())
    def affine3(x: Tensor, w: Tensor, s: float, *, shift: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
        CALLS["affine3"] += 1
        return x * w * s + shift, torch.sin(x), (x > 0).long()

    def setup(ctx, inputs, keyword_only_inputs, output):
        ctx.s, ctx.shift = inputs[2], keyword_only_inputs["shift"]
        ctx.save_for_forward(inputs[0], inputs[1])

    def jvp(ctx, tx, tw, ts):
        seen.append((ts, ctx.shift))
        x, w = ctx.saved_tensors
        a = tx * w * ctx.s if tx is not None else torch.zeros_like(x)
        if tw is not None:
            a = a + x * tw * ctx.s
        return a, (None if tx is None else tx * torch.cos(x)), None

    tl.register_jvp(affine3, jvp, setup_context=setup)

    def ref(x, w):
        return x * w * 2.5 + 3.0, torch.sin(x)

    x, w = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    y, jvp_fn = tl.linearize(lambda x, w: affine3(x, w, 2.5, shift=3.0)[:2], x, w)
    torch.testing.assert_close(y, ref(x, w))
    tx, tw = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    torch.testing.assert_close(jvp_fn(tx, tw), torch.func.jvp(ref, (x, w), (tx, tw))[1])
    assert CALLS["affine3"] == 1 and seen == [(None, 3.0)]
    # integer output: no tangent; default keyword argument filled in for setup_context
    _, t = eager_jvp(lambda x: affine3(x, w, 2.5), (x,), (tx,))
    torch.testing.assert_close(t[0], tx * w * 2.5)
    assert seen[-1] == (None, 0.5)
    _, t = torch.func.jvp(lambda x: affine3(x, w, 2.5)[1], (x,), (tx,))
    torch.testing.assert_close(t, tx * torch.cos(x))


def test_reregistering_replaces_the_rule():
    @torch.library.custom_op("tl_test_op::twice", mutates_args=())
    def twice(x: Tensor) -> Tensor:
        return 2 * x

    x, t = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    tl.register_jvp("tl_test_op::twice", lambda ctx, t: 3 * t)  # wrong on purpose
    torch.testing.assert_close(tl.linearize(twice, x)[1](t), 3 * t)
    tl.register_jvp(twice, lambda ctx, t: 2 * t)
    torch.testing.assert_close(tl.linearize(twice, x)[1](t), 2 * t)
    torch.testing.assert_close(eager_jvp(twice, (x,), (t,))[1], 2 * t)


def test_registration_errors():
    with pytest.raises(TypeError, match=r"torch\.library\.custom_op"):
        tl.register_jvp(torch.sin, lambda ctx, t: t)
    with pytest.raises(ValueError, match=r"namespace::name"):
        tl.register_jvp("sin", lambda ctx, t: t)
    with pytest.raises(ValueError, match=r"not an operator created with torch\.library\.custom_op"):
        tl.register_jvp("aten::sin", lambda ctx, t: t)
    with pytest.raises(ValueError, match="not an operator created"):
        tl.register_jvp("tl_test_op::does_not_exist", lambda ctx, t: t)
    with pytest.raises(TypeError, match="jvp must be callable"):
        tl.register_jvp(sinmul, None)
    with pytest.raises(TypeError, match="setup_context must be callable"):
        tl.register_jvp(sinmul, sinmul_jvp, setup_context=3)

    @torch.library.custom_op("tl_test_op::add_inplace", mutates_args=("x",))
    def add_inplace(x: Tensor, y: Tensor) -> None:
        x.add_(y)

    with pytest.raises(ValueError, match="mutates its arguments"):
        tl.register_jvp(add_inplace, lambda ctx, tx, ty: None)

    @torch.library.custom_op("tl_test_op::split2", mutates_args=())
    def split2(x: Tensor) -> list[Tensor]:
        return [x.clone(), x.clone()]

    with pytest.raises(NotImplementedError, match=r"Tensor\[\]"):
        tl.register_jvp(split2, lambda ctx, t: [t, t])


@pytest.mark.parametrize("bad, match", [
    (lambda t: (t, t), r"returned a tuple of 2; the op returns one Tensor"),
    (lambda t: t[:2], r"shape \(2,\) and dtype torch.float64; the output has shape \(3,\)"),
    (lambda t: t.float(), r"dtype torch.float32; the output has shape \(3,\) and dtype torch.float64"),
    (lambda t: 3.0, r"returned float; expected a Tensor or None"),
])
def test_bad_rule_results_name_the_op(bad, match):
    @torch.library.custom_op("tl_test_op::bad_rule", mutates_args=())
    def bad_rule(x: Tensor) -> Tensor:
        return x.clone()

    tl.register_jvp(bad_rule, lambda ctx, t: bad(t))
    x, t = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(bad_rule, x)
    with pytest.raises(RuntimeError, match=r"register_jvp\(tl_test_op::bad_rule\): .*" + match):
        jvp_fn(t)
    with pytest.raises(RuntimeError, match=r"tl_test_op::bad_rule"):
        eager_jvp(bad_rule, (x,), (t,))


def test_bad_rule_structure_for_multiple_outputs():
    @torch.library.custom_op("tl_test_op::two_out", mutates_args=())
    def two_out(x: Tensor) -> tuple[Tensor, Tensor]:
        return x.clone(), x.clone()

    tl.register_jvp(two_out, lambda ctx, t: t)
    with pytest.raises(RuntimeError, match=r"returned Tensor; the op returns 2 Tensors"):
        eager_jvp(two_out, (torch.randn(2, dtype=D),), (torch.randn(2, dtype=D),))


def test_torch_compile_still_works_for_training():
    x, w = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    result = torch.library.opcheck(sinmul, (x.clone().requires_grad_(), w))
    assert set(result.values()) == {"SUCCESS"}, result
    compiled = torch.compile(lambda x, w: sinmul(x, w).sum(), backend="aot_eager", fullgraph=True)
    xr = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (g,) = torch.autograd.grad(compiled(xr, w), xr)
    torch.testing.assert_close(g, torch.cos(x) * w)


# ----------------------------------------------------------------------------- None results, defaults
def _check_every_path(f, ref, primals, tangents):
    """f's JVP through linearize (one and batched tangents), eager forward AD,
    torch.func.jvp, vmap of it and jacfwd equals torch.func.jvp of the pure-PyTorch ref."""
    _, want = torch.func.jvp(ref, primals, tangents)
    torch.testing.assert_close(eager_jvp(f, primals, tangents)[1], want)
    torch.testing.assert_close(torch.func.jvp(f, primals, tangents)[1], want)
    _, jvp_fn = tl.linearize(f, *primals)
    torch.testing.assert_close(jvp_fn(*tangents), want)
    gen = torch.Generator().manual_seed(1)
    T = tuple(torch.randn(3, *t.shape, dtype=D, generator=gen) for t in tangents)
    want_b = torch.vmap(lambda *t: torch.func.jvp(ref, primals, t)[1])(*T)
    torch.testing.assert_close(torch.vmap(lambda *t: torch.func.jvp(f, primals, t)[1])(*T), want_b)
    torch.testing.assert_close(torch.vmap(jvp_fn)(*T), want_b)
    argnums = tuple(range(len(primals)))
    torch.testing.assert_close(torch.func.jacfwd(f, argnums)(*primals),
                               torch.func.jacfwd(ref, argnums)(*primals))


@torch.library.custom_op("tl_test_op::floor_mul", mutates_args=())
def floor_mul(x: Tensor, s: Tensor) -> Tensor:
    return x * torch.floor(s)


@torch.library.custom_op("tl_test_op::floor_split", mutates_args=())
def floor_split(x: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return x * torch.floor(s), 2 * torch.floor(s), (s > 0).long()


def _floor_setup(ctx, inputs, output):
    ctx.save_for_forward(inputs[1])


def _floor_tangent(ctx, tx):
    return None if tx is None else tx * torch.floor(ctx.saved_tensors[0])


# (floor has derivative zero: a rule returning None for a tangent of s alone is exact)
tl.register_jvp(floor_mul, lambda ctx, tx, ts: _floor_tangent(ctx, tx), setup_context=_floor_setup)
tl.register_jvp(floor_split, lambda ctx, tx, ts: (_floor_tangent(ctx, tx), None, None),
                setup_context=_floor_setup)


_FLOOR_OPS = {
    "one": (floor_mul, lambda x, s: x * torch.floor(s)),
    "several": (lambda x, s: floor_split(x, s)[:2],
                lambda x, s: (x * torch.floor(s), 2 * torch.floor(s))),
}


@pytest.mark.parametrize("outputs", ["one", "several"])
@pytest.mark.parametrize("which", ["s", "x", "xs"])
def test_rule_returning_none_is_a_zero_tangent_everywhere(outputs, which):
    """None from the rule (documented as zero) reached PyTorch's forward AD, whose
    Function machinery asserted (eager forward AD, torch.func.jvp, jacfwd)."""
    op, ref = _FLOOR_OPS[outputs]
    gen = torch.Generator().manual_seed(0)
    x, s, tx, ts = (torch.randn(4, dtype=D, generator=gen) * 3 for _ in range(4))
    if which == "s":
        _check_every_path(lambda s: op(x, s), lambda s: ref(x, s), (s,), (ts,))
    elif which == "x":
        _check_every_path(lambda x: op(x, s), lambda x: ref(x, s), (x,), (tx,))
    else:
        _check_every_path(op, ref, (x, s), (tx, ts))
    if outputs == "several":  # the integer output keeps no tangent
        with fwAD.dual_level():
            out = floor_split(x, fwAD.make_dual(s, ts))
            assert fwAD.unpack_dual(out[2]).tangent is None


def test_rule_gets_a_tangent_for_every_input_left_at_its_default():
    """The dispatcher drops trailing arguments equal to their defaults; setup_context got
    them back but the rule got fewer tangents (TypeError for a rule with one per input)."""
    seen = []

    @torch.library.custom_op("tl_test_op::powk", mutates_args=())
    def powk(x: Tensor, k: int = 2, w: Tensor | None = None, *, c: float = 1.0) -> Tensor:
        return c * x**k * (1 if w is None else w)

    def setup(ctx, inputs, keyword_only_inputs, output):
        x, ctx.k, w = inputs
        ctx.c, ctx.has_w = keyword_only_inputs["c"], w is not None
        ctx.save_for_forward(x, *([w] if w is not None else []))

    def jvp(ctx, tx, tk, tw):
        seen.append(tk)
        x, *w = ctx.saved_tensors
        w = w[0] if ctx.has_w else 1
        out = None if tx is None else ctx.c * ctx.k * x ** (ctx.k - 1) * w * tx
        if tw is not None:
            out = ctx.c * x**ctx.k * tw if out is None else out + ctx.c * x**ctx.k * tw
        return out

    tl.register_jvp(powk, jvp, setup_context=setup)
    gen = torch.Generator().manual_seed(0)
    x, w, tx, tw = (torch.randn(5, dtype=D, generator=gen) for _ in range(4))
    _check_every_path(powk, lambda x: x**2, (x,), (tx,))
    _check_every_path(lambda x: powk(x, 3), lambda x: x**3, (x,), (tx,))
    _check_every_path(lambda x: powk(x, c=0.5), lambda x: 0.5 * x**2, (x,), (tx,))
    _check_every_path(lambda x, w: powk(x, 2, w, c=0.5), lambda x, w: 0.5 * x**2 * w,
                      (x, w), (tx, tw))
    _check_every_path(lambda w: powk(x, 3, w), lambda w: x**3 * w, (w,), (tw,))
    assert seen and all(tk is None for tk in seen)


# ----------------------------------------------------------------------------- C++ kernels
CPP_SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <vector>

static int64_t n_fwd = 0;
static int64_t n_tangent = 0;

// out[i] = x[i] * exp(-x[i]^2 / 2)
void bump_kernel(int64_t out_ptr, int64_t x_ptr, int64_t n) {
  ++n_fwd;
  double* out = reinterpret_cast<double*>(out_ptr);
  const double* x = reinterpret_cast<const double*>(x_ptr);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * std::exp(-0.5 * x[i] * x[i]);
}

// For each of `batch` tangents t_b (each n long): out_b[i] = (1 - x[i]^2) exp(-x[i]^2/2) t_b[i].
// One launch handles the whole batch.
void bump_tangent_kernel(int64_t out_ptr, int64_t x_ptr, int64_t t_ptr, int64_t n, int64_t batch) {
  ++n_tangent;
  double* out = reinterpret_cast<double*>(out_ptr);
  const double* x = reinterpret_cast<const double*>(x_ptr);
  const double* t = reinterpret_cast<const double*>(t_ptr);
  for (int64_t i = 0; i < n; ++i) {
    const double d = (1.0 - x[i] * x[i]) * std::exp(-0.5 * x[i] * x[i]);
    for (int64_t b = 0; b < batch; ++b) out[b * n + i] = d * t[b * n + i];
  }
}

std::vector<int64_t> launches() { return {n_fwd, n_tangent}; }
"""


def _bump_ref(x):
    return x * torch.exp(-0.5 * x * x)


def _bump_derivative(x):
    return (1 - x * x) * torch.exp(-0.5 * x * x)


def _cpu_f64(t: Tensor) -> Tensor:
    # raw pointers need real, contiguous float64 CPU memory
    assert t.dtype == D and t.device.type == "cpu", (t.dtype, t.device)
    return t.contiguous()


class CppOps:
    """The C++ kernels wrapped as custom ops, with JVP and batching rules."""

    def __init__(self, ext):
        self.ext = ext

        @torch.library.custom_op("tl_test_cpp::bump", mutates_args=())
        def bump(x: Tensor) -> Tensor:
            x = _cpu_f64(x)
            out = torch.empty_like(x)
            ext.bump_kernel(out.data_ptr(), x.data_ptr(), x.numel())
            return out

        @bump.register_fake
        def _(x):
            return torch.empty_like(x)

        @bump.register_vmap
        def _(info, in_dims, x):  # elementwise: the batch dimension is just more elements
            return bump(x), in_dims[0]

        @torch.library.custom_op("tl_test_cpp::bump_tangent", mutates_args=())
        def bump_tangent(x: Tensor, t: Tensor) -> Tensor:
            """bump'(x) * t, for t of shape x.shape or (B, *x.shape): one kernel launch."""
            x, t = _cpu_f64(x), _cpu_f64(t)
            batch = t.numel() // max(x.numel(), 1)
            assert t.shape[t.dim() - x.dim():] == x.shape and batch * x.numel() == t.numel()
            out = torch.empty_like(t)
            ext.bump_tangent_kernel(out.data_ptr(), x.data_ptr(), t.data_ptr(), x.numel(), batch)
            return out

        @bump_tangent.register_fake
        def _(x, t):
            return torch.empty_like(t)

        @bump_tangent.register_vmap
        def _(info, in_dims, x, t):
            CALLS["bump_tangent.vmap"] += 1
            xd, td = in_dims
            if xd is not None:  # a batch of points: broadcast t and treat everything as flat
                x = x.movedim(xd, 0)
                return bump_tangent(x.reshape(-1), _expand_bdim(info, t, td).reshape(-1)).view(
                    x.shape), 0
            return bump_tangent(x, _expand_bdim(info, t, td)), 0

        def setup(ctx, inputs, output):
            CALLS["bump.setup_context"] += 1
            ctx.save_for_forward(inputs[0])
            ctx.save_for_backward(inputs[0])

        def jvp(ctx, t):  # the clean rule: the tangent kernel is itself a custom op
            CALLS["bump.jvp"] += 1
            (x,) = ctx.saved_tensors
            return bump_tangent(x, t)

        def backward(ctx, g):  # bump' is diagonal: the transpose is the same kernel
            (x,) = ctx.saved_tensors
            return bump_tangent(x, g)

        tl.register_jvp(bump, jvp, setup_context=setup)
        bump.register_autograd(backward, setup_context=setup)

        # The same kernel with a rule that launches the tangent kernel directly (raw pointers).
        @torch.library.custom_op("tl_test_cpp::bump_raw", mutates_args=())
        def bump_raw(x: Tensor) -> Tensor:
            return bump(x)

        @bump_raw.register_fake
        def _(x):
            return torch.empty_like(x)

        def raw_jvp(ctx, t):
            CALLS["bump_raw.jvp"] += 1
            x, t = _cpu_f64(ctx.x), _cpu_f64(t)
            out = torch.empty_like(t)
            ext.bump_tangent_kernel(out.data_ptr(), x.data_ptr(), t.data_ptr(), x.numel(), 1)
            return out

        tl.register_jvp(bump_raw, raw_jvp,
                        setup_context=lambda ctx, inputs, output: setattr(ctx, "x", inputs[0]))
        self.bump, self.bump_tangent, self.bump_raw = bump, bump_tangent, bump_raw

    def launches(self) -> tuple[int, int]:
        return tuple(self.ext.launches())


@pytest.fixture(scope="module")
def cpp(tmp_path_factory):
    from torch.utils.cpp_extension import load_inline

    build = tmp_path_factory.mktemp("torch_linearize_custom_op_ext")
    ext = load_inline(
        name="torch_linearize_test_custom_op",
        cpp_sources=[CPP_SOURCE],
        functions=["bump_kernel", "bump_tangent_kernel", "launches"],
        build_directory=str(build),
        extra_cflags=["-O2"],
        verbose=False,
    )
    return CppOps(ext)


def test_cpp_kernels_match_closed_form(cpp):
    x, t = torch.randn(9, dtype=D), torch.randn(4, 9, dtype=D)
    torch.testing.assert_close(cpp.bump(x), _bump_ref(x))
    torch.testing.assert_close(cpp.bump_tangent(x, t), _bump_derivative(x) * t)


def test_cpp_linearize_kernel_once_tangent_kernel_per_application(cpp):
    x = torch.randn(4, 5, dtype=D)
    w = torch.randn(5, dtype=D)

    def f(x):
        return torch.sin(cpp.bump(x * w))

    def ref(x):
        return torch.sin(_bump_ref(x * w))

    k0 = cpp.launches()
    y, jvp_fn = tl.linearize(f, x)
    assert cpp.launches() == (k0[0] + 1, k0[1])
    assert CALLS == {"bump.setup_context": 1}
    torch.testing.assert_close(y, ref(x))
    gen = torch.Generator().manual_seed(1)
    for k in range(1, 4):
        t = torch.randn(4, 5, dtype=D, generator=gen)
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(ref, (x,), (t,))[1])
        assert cpp.launches() == (k0[0] + 1, k0[1] + k) and CALLS["bump.jvp"] == k
    torch.testing.assert_close(jvp_fn(t), central_difference(ref, (x,), (t,)), rtol=1e-6, atol=1e-8)


def test_cpp_vmap_of_linear_map_is_one_tangent_launch(cpp):
    x = torch.randn(6, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: cpp.bump(x) * 3, x)
    T = torch.randn(8, 6, dtype=D)
    k0 = cpp.launches()
    torch.testing.assert_close(torch.vmap(jvp_fn)(T), 3 * _bump_derivative(x) * T)
    assert cpp.launches() == (k0[0], k0[1] + 1)  # 8 tangents, one launch
    assert CALLS["bump.jvp"] == 1 and CALLS["bump_tangent.vmap"] == 1
    # A rule that launches the raw kernel itself cannot be vmapped: per-tangent loop.
    _, raw_fn = tl.linearize(lambda x: cpp.bump_raw(x) * 3, x)
    k0 = cpp.launches()
    torch.testing.assert_close(torch.vmap(raw_fn)(T), 3 * _bump_derivative(x) * T)
    assert cpp.launches() == (k0[0], k0[1] + 8)


def test_cpp_torch_func_transforms(cpp):
    # The clean rule (tangent kernel as a custom op with register_vmap) works under torch.func.
    x, t = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    d = _bump_derivative(x)
    torch.testing.assert_close(torch.func.jvp(cpp.bump, (x,), (t,))[1], d * t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no slow batching fallback: both ops have vmap rules
        torch.testing.assert_close(torch.func.jacfwd(cpp.bump)(x), torch.diag(d))
        torch.testing.assert_close(torch.vmap(cpp.bump)(x.view(5, 1)), _bump_ref(x).view(5, 1))
    torch.testing.assert_close(torch.func.jacrev(cpp.bump)(x), torch.diag(d))
    torch.testing.assert_close(eager_jvp(cpp.bump, (x,), (t,))[1], d * t)


def test_cpp_raw_kernel_in_rule_linearize_yes_torch_func_jvp_no(cpp):
    x, t = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    want = _bump_derivative(x) * t
    # torch.func.jvp hands the rule functorch wrappers, which have no data pointer.
    with pytest.raises(RuntimeError, match="data pointer"):
        torch.func.jvp(cpp.bump_raw, (x,), (t,))
    # Eager forward AD and linearize call it with plain tensors.
    torch.testing.assert_close(eager_jvp(cpp.bump_raw, (x,), (t,))[1], want)
    y, jvp_fn = tl.linearize(cpp.bump_raw, x)
    torch.testing.assert_close(y, _bump_ref(x))
    torch.testing.assert_close(jvp_fn(t), want)
    assert fwAD._current_level == -1


def test_cpp_transpose(cpp):
    x = torch.randn(3, 4, dtype=D)

    def f(x):
        return cpp.bump(x).sum(1)

    def ref(x):
        return _bump_ref(x).sum(1)

    _, jvp_fn = tl.linearize(f, x)
    u = torch.randn(3, dtype=D)
    torch.testing.assert_close(jvp_fn.transpose()(u), torch.func.vjp(ref, x)[1](u))


@torch.library.custom_op("tl_test_op::cube", mutates_args=())
def _cube(x: Tensor) -> Tensor:
    return x ** 3


@_cube.register_fake
def _(x):
    return torch.empty_like(x)


def _cube_setup(ctx, inputs, output):
    ctx.save_for_forward(inputs[0])
    ctx.save_for_backward(inputs[0])


def _cube_jvp(ctx, t):
    x, = ctx.saved_tensors
    return 3 * x ** 2 * t


def _cube_backward(ctx, g):
    x, = ctx.saved_tensors
    return 3 * x ** 2 * g  # differentiable PyTorch code


tl.register_jvp(_cube, _cube_jvp, setup_context=_cube_setup)
_cube.register_autograd(_cube_backward, setup_context=_cube_setup)


@pytest.mark.parametrize("how", ["hessian", "jvp_of_grad", "linearize_of_grad", "jacrev_of_jacrev"])
def test_second_order_through_the_op_used_non_linearly(how):
    # exp(x^3): the second derivative has a term from the op's output used after it,
    # (3x^2)^2 exp(x^3), which the outer level lost when Function.apply hid the op
    # from it (grad and forward grad off inside forward); sum(x^3) alone hid the bug
    f = lambda x: _cube(x).exp().sum()
    ref = lambda x: (x ** 3).exp().sum()
    x = torch.tensor([0.3, -1.2, 0.8], dtype=D)
    v = torch.tensor([0.5, -1.0, 2.0], dtype=D)
    H = torch.func.hessian(ref)(x)
    if how == "hessian":
        got, want = torch.func.hessian(f)(x), H
    elif how == "jvp_of_grad":
        got, want = torch.func.jvp(torch.func.grad(f), (x,), (v,))[1], H @ v
    elif how == "linearize_of_grad":
        _, hvp = tl.linearize(torch.func.grad(f), x)
        got, want = hvp(v), H @ v
    else:
        got, want = torch.func.jacrev(torch.func.jacrev(f))(x), H
    torch.testing.assert_close(got, want)
