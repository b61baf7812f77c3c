"""Tests for ``torch_linearize/_program.py``: what the generated code calls."""

import pytest
import torch

import custom_functions as cf
import torch_linearize as tl
from torch_linearize._program import Res, Var, _callable_for

aten = torch.ops.aten
D = torch.float64


def test_hot_operators_on_a_tensor_call_their_python_binding():
    v = Var((3,), D)
    assert _callable_for(aten.mul.Tensor, (v, Res(0))) is torch.mul
    assert _callable_for(aten.add.Tensor, (v, v), {"alpha": 2}) is torch.add
    assert _callable_for(aten.addcmul.default, (Res(0), v, v), {"value": 0.5}) is torch.addcmul
    # a number first (the binding would resolve another way), an unknown keyword, another
    # overload, or an operator outside the table: the operator itself
    assert _callable_for(aten.mul.Tensor, (2.0, v)) is aten.mul.Tensor._op
    assert _callable_for(aten.add.Tensor, (v, v), {"out": None}) is aten.add.Tensor._op
    assert _callable_for(aten.div.Tensor_mode, (v, v), {"rounding_mode": "floor"}) \
        is aten.div.Tensor_mode._op
    assert _callable_for(aten.sin.default, (v,)) is aten.sin.default._op
    assert _callable_for(len) is len


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128])
def test_programs_of_hot_operators_match_func_jvp(dtype):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, dtype=dtype, generator=g)
    x = torch.randn(4, 4, dtype=dtype, generator=g)

    def f(x):  # mm, mul by tensors and numbers, add/sub with alpha, div, neg, addcmul
        y = (x @ A) * x.sin() - 3 * x
        y = torch.add(y, x.exp(), alpha=0.5) / (2 + x.cos())
        return torch.addcmul(-y, x, x.tanh(), value=0.25)

    t = torch.randn(4, 4, dtype=dtype, generator=g)
    _, jvp_fn = tl.linearize(f, x)
    called = list(jvp_fn._run.__globals__.values())
    assert any(c is torch.mm for c in called) and any(c is torch.addcmul for c in called)
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1])
    torch.testing.assert_close(torch.vmap(jvp_fn)(torch.stack([t, 2 * t])),
                               torch.stack([jvp_fn(t), jvp_fn(2 * t)]))


@pytest.mark.parametrize("n_ops", [3, 200])  # run1 repeats the body / calls run
def test_one_tensor_entry_matches_run_and_defers_other_tangents(n_ops):
    from torch_linearize._program import _ENTRY1_MAX_EQNS

    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, dtype=D, generator=g)

    def f(x):
        for k in range(n_ops):
            x = x.sin() if k % 2 else x * 1.5
        return x

    _, jvp_fn = tl.linearize(f, x)
    run1 = jvp_fn._run.entry1
    assert "def run1" in jvp_fn.source
    assert (jvp_fn.num_ops > _ENTRY1_MAX_EQNS) == ("return run(v0)[0]" in jvp_fn.source)
    t = torch.randn(5, 3, dtype=D, generator=g)
    ref = torch.func.jvp(f, (x,), (t,))[1]
    torch.testing.assert_close(run1(t), ref)
    torch.testing.assert_close(jvp_fn(t), ref)
    torch.testing.assert_close(jvp_fn(t.t().contiguous().t()), ref)  # relayout in run1
    # whatever the general checks must see: run1 declines, and jvp_fn names the problem
    for bad, what in [(t.float(), "float32"), (t[:4], r"\(4, 3\)"), (t.tolist(), "pytree structure"),
                      (t.to("meta"), "meta")]:
        assert run1(bad) is NotImplemented
        with pytest.raises((TypeError, ValueError), match=what):
            jvp_fn(bad)


def test_one_tensor_entry_keeps_autograd_and_vmap():
    x = torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: x.exp() * 3, x)
    t = torch.randn(4, dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(jvp_fn(t).sum(), t)
    torch.testing.assert_close(g, 3 * x.exp())
    T = torch.randn(6, 4, dtype=D)
    torch.testing.assert_close(torch.vmap(jvp_fn)(T), 3 * x.exp() * T)


def test_one_tensor_entry_checks_the_device_off_cpu():
    # (the generated check compares devices when the program's input is not on the CPU;
    # meta tensors exercise that branch on any machine)
    from torch_linearize._program import Eqn, Program, compile_program

    v, out = Var((4,), D, (1,), device=torch.device("meta")), Var((4,), D, (1,))
    prog = Program(inputs=[v], eqns=[Eqn(aten.mul.Tensor, (v, Res(0)), {}, out)],
                   outputs=[out], residuals=[torch.empty(4, dtype=D, device="meta")],
                   input_layouts=[((1,), 0)])
    run1 = compile_program(prog).entry1
    assert "device !=" in compile_program(prog).__torch_linearize_source__
    r = run1(torch.empty(4, dtype=D, device="meta"))
    assert r.device.type == "meta" and r.shape == (4,)
    assert run1(torch.empty(4, dtype=D)) is NotImplemented


# ------------------------------------------- run1 calls custom Functions' jvp inline
def test_one_tensor_entry_calls_a_custom_functions_jvp_inline(monkeypatch):
    from torch_linearize._opaque import _OpaqueNode

    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, 4, dtype=D, generator=g), torch.randn(3, 4, dtype=D, generator=g)

    def f(x):  # (no residual the user can reach: nothing to version-check)
        return cf.TwoSaves.apply(x.sin()).cos()

    _, jvp_fn = tl.linearize(f, x)
    assert jvp_fn._fast1 is jvp_fn._run.entry1
    _, vjp_ref = torch.func.vjp(f, x)
    ref = torch.func.jvp(f, (x,), (t,))[1]
    # the user's jvp called from run1 itself
    assert any(v is cf.TwoSaves.jvp for v in jvp_fn._run.__globals__.values())
    with monkeypatch.context() as m:  # ... not through the node
        m.setattr(_OpaqueNode, "__call__", lambda *a: pytest.fail("node called"))
        torch.testing.assert_close(jvp_fn(t), ref)
    # alternating with the transpose (the ctx's other phase) keeps both right
    vjp_fn = jvp_fn.transpose()
    for _ in range(2):
        torch.testing.assert_close(vjp_fn(t)[0], vjp_ref(t)[0])
        torch.testing.assert_close(jvp_fn(t), ref)
    # transforms and forward AD take the node's general path (batched, dual-aware)
    T = torch.stack([t, 2 * t])
    torch.testing.assert_close(torch.vmap(jvp_fn)(T), torch.stack([ref, 2 * ref]))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(t, t)
        out = torch.autograd.forward_ad.unpack_dual(jvp_fn(dual))
        torch.testing.assert_close(out.primal, ref)
        torch.testing.assert_close(out.tangent, ref)
    # a released map's entry declines (the general path names the release)
    run1 = jvp_fn._run.entry1
    jvp_fn.release()
    assert run1(t) is NotImplemented
    with pytest.raises(tl.ReleasedError):
        jvp_fn(t)


_W = torch.tensor(1.5, dtype=D, requires_grad=True)


class _GradScale(torch.autograd.Function):
    """jvp multiplies by a ctx attribute that requires grad: its result requires grad."""

    @staticmethod
    def forward(x):
        return x * _W.detach()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.w = _W

    @staticmethod
    def jvp(ctx, t):
        return t * ctx.w

    @staticmethod
    def backward(ctx, g):
        return g * ctx.w.detach()


def test_only_nodes_fed_by_no_node_result_are_inlined():
    # A node's result can require grad (here through a ctx attribute), which a later
    # node's own checks route to autograd: run1 inlines only the nodes upstream of
    # every node result.
    from torch_linearize._program import _inlined_nodes

    x, t = torch.randn(4, dtype=D), torch.randn(4, dtype=D)

    def f(x):
        return cf.TwoSaves.apply(_GradScale.apply(x).cos() + x)

    _, jvp_fn = tl.linearize(f, x)
    prog = jvp_fn._program
    nodes = [k for k, e in enumerate(prog.eqns) if not isinstance(e.fn, torch._ops.OpOverload)]
    assert len(nodes) == 2
    assert _inlined_nodes(prog) == {nodes[0]}
    with torch.no_grad():
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1])


_INLINE_CASES = {  # (f, which nodes run1 inlines: "all", "first", "none")
    "numpy": (lambda x: cf.NumpyCube.apply(x.exp()), "all"),
    "raw pointers": (lambda x: cf.CtypesScale.apply(x.exp(), 1.7), "all"),
    "two tangents": (lambda x: cf.WeightedSum.apply(x.exp(), x.cos())[:, None] * x.sin(), "all"),
    "nested Function in jvp": (lambda x: cf.Outer.apply(x.exp()), "all"),
    "node after aten ops": (lambda x: cf.CtypesScale.apply(x.exp() * 2 + x.sin(), 0.5).sin(),
                            "all"),
    "two outputs": (lambda x: cf.SinCosPair.apply(x.exp())[0], "none"),
    "a None tangent": (lambda x: cf.WeightedSum.apply(x.exp(), x.cos().detach()), "none"),
    "node after node": (lambda x: cf.CtypesScale.apply(cf.NumpyCube.apply(x.exp()), 2.0),
                        "first"),
}


@pytest.mark.parametrize("name", sorted(_INLINE_CASES))
def test_inlined_custom_function_calls_match_eager_forward_ad(name):
    # The catalogue's Functions, fed intermediates (nothing for the map to version-check,
    # so jvp_fn's one-tensor entry runs): run1 calls the nodes it can inline itself and the
    # others through the node; either way jvp runs once per application.
    from helpers import eager_jvp
    from torch_linearize._program import _inlined_nodes

    f, which = _INLINE_CASES[name]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, dtype=D, generator=g)
    _, jvp_fn = tl.linearize(f, x)
    assert jvp_fn._fast1 is not None
    prog = jvp_fn._program
    nodes = [k for k, e in enumerate(prog.eqns) if not isinstance(e.fn, torch._ops.OpOverload)]
    expected = {"all": set(nodes), "first": set(nodes[:1]), "none": set()}[which]
    assert nodes and _inlined_nodes(prog) == expected
    tangents = [torch.randn(3, 4, dtype=D, generator=g) for _ in range(2)]
    tangents.append(torch.randn(4, 3, dtype=D, generator=g).t())  # column-major
    for t in tangents:
        cf.reset()
        out = jvp_fn(t)
        calls = {k: n for k, n in cf.CALLS.items() if k.endswith(".jvp")}
        assert calls and all(n == 1 for n in calls.values()), calls
        torch.testing.assert_close(out, eager_jvp(f, (x,), (t,))[1])
        assert out.is_contiguous()  # the forward output's layout


def test_one_tensor_entry_checks_the_watched_versions_first(monkeypatch):
    # A map that reads a tensor the user can reach (here the primal, which the product's
    # tangent program reads) takes the one-tensor entry after checking that tensor's
    # version, and a modification is reported as on the general path.
    from torch_linearize._opaque import _OpaqueNode

    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(3, 4, dtype=D, generator=g), torch.randn(3, 4, dtype=D, generator=g)

    def f(x):
        return cf.TwoSaves.apply(x) * x

    _, jvp_fn = tl.linearize(f, x)
    assert jvp_fn._stale_watch and jvp_fn._fast1 is jvp_fn._run.entry1
    ref = torch.func.jvp(f, (x,), (t,))[1]
    with monkeypatch.context() as m:  # the inlined call, not the node
        m.setattr(_OpaqueNode, "__call__", lambda *a: pytest.fail("node called"))
        torch.testing.assert_close(jvp_fn(t), ref)
    x.add_(1.0)
    with pytest.raises(tl.StaleResidualError, match="modified in place after linearize"):
        jvp_fn(t)


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "expanded-tangent"])
def test_an_elementwise_program_takes_a_tangent_in_any_layout_without_a_copy(layout):
    """Elementwise operations give the same values in any layout: until stop 21 a tangent
    laid out unlike the primal was first copied into the primal's layout (2x the time of
    the multiply itself for a transposed 512x512 primal)."""
    from helpers import OpCounter

    g = torch.Generator().manual_seed(3)
    if layout == "channels_last":
        x = torch.randn(2, 3, 4, 5, dtype=D, generator=g).to(memory_format=torch.channels_last)
        t = torch.randn(2, 3, 4, 5, dtype=D, generator=g)
    else:
        x = torch.randn(6, 5, dtype=D, generator=g).t()
        t = torch.randn(5, 6, dtype=D, generator=g)
        if layout == "expanded-tangent":
            t = torch.randn(6, dtype=D, generator=g).expand(5, 6)
    f = lambda x: torch.sin(x) * x + x.exp() / 3
    _, jvp_fn = tl.linearize(f, x)
    want = torch.func.jvp(f, (x,), (t,))[1]
    with OpCounter() as ops:
        got = jvp_fn(t)
    torch.testing.assert_close(got, want)
    assert ops.counts["copy_"] == 0 and ops.counts["clone"] == 0, ops.counts
    torch.testing.assert_close(torch.vmap(jvp_fn)(t[None]), want[None])
    u = torch.randn(want.shape, dtype=D, generator=g)
    torch.testing.assert_close(jvp_fn.T(u)[0], torch.func.vjp(f, x)[1](u)[0])
