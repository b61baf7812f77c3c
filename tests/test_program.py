"""Tests for ``torch_linearize/_program.py``: what the generated code calls."""

import pytest
import torch

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
