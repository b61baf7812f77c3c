"""The direct phase (``_trace.Tracer.direct_input``) and its rule table (``_rules.py``).

Every rule is checked against torch.func in float64 (JVP and VJP), on a function that
stays in the direct phase from start to end; the switch to forward-AD duals
(``Tracer.to_dual``) is checked where it matters: views taken before it, tangents two
tensors share, writes, custom Functions, code that reads tangents itself, transforms.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import custom_functions as cf
import torch_linearize as tl
from torch_linearize import _rules, _trace

D = torch.float64


@pytest.fixture
def switches(monkeypatch):
    """The number of traces that left the direct phase, appended to as they do."""
    calls: list[int] = []
    real = _trace.Tracer.to_dual

    def spy(self):
        if self.direct:
            calls.append(1)
        return real(self)

    monkeypatch.setattr(_trace.Tracer, "to_dual", spy)
    return calls


def _check(f, *primals, atol=None, rtol=None):
    """``linearize(f)`` against torch.func: value, two JVPs, one VJP."""
    y, jvp_fn = tl.linearize(f, *primals)
    tol = {} if atol is None else {"atol": atol, "rtol": rtol}
    torch.testing.assert_close(y, f(*primals), **tol)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        t = tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)
        torch.testing.assert_close(jvp_fn(*t), torch.func.jvp(f, primals, t)[1], **tol)
    out = y if isinstance(y, tuple) else (y,)
    ct = tuple(torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in out)
    ct = ct if isinstance(y, tuple) else ct[0]
    torch.testing.assert_close(jvp_fn.transpose()(ct), torch.func.vjp(f, *primals)[1](ct),
                               **tol)
    return jvp_fn


def _x(*shape, positive=False, seed=0):
    x = torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))
    return x.abs() + 0.5 if positive else x


aten = torch.ops.aten
W = _x(4, 5, seed=7)

# (name, f of one (4, 5) tensor, input is positive): every rule of the table
ONE_INPUT = [
    ("slice", lambda x: x[1:3, ::2] * 1.5, False),
    ("select", lambda x: x[1] * x[2], False),
    ("transpose", lambda x: x.transpose(0, 1) @ W, False),
    ("t", lambda x: x.t().sin(), False),
    ("permute", lambda x: x.reshape(2, 2, 5).permute(2, 0, 1).exp(), False),
    ("unsqueeze-squeeze", lambda x: x.unsqueeze(1).squeeze(1).squeeze() * 2, False),
    ("squeeze-dims", lambda x: x[:, :1].squeeze((1,)).cos(), False),
    ("expand", lambda x: x[:, :1].expand(4, 5) * W, False),
    ("view", lambda x: x.view(20).tanh(), False),
    ("alias", lambda x: aten.alias(x) * 3, False),
    ("diagonal", lambda x: x.diagonal().sigmoid(), False),
    ("unfold", lambda x: x.unfold(1, 2, 1).sum(-1), False),
    ("split", lambda x: torch.stack(x.split(2)) * 2, False),
    ("split-sizes", lambda x: torch.cat(x.split([1, 3])).exp(), False),
    ("unbind", lambda x: torch.stack(x.unbind(1)[::2]), False),
    ("narrow", lambda x: x.narrow(1, 1, 3) / 2, False),
    ("clone", lambda x: x.clone().sin(), False),
    ("neg", lambda x: -x * W, False),
    ("sum", lambda x: x.sum() * x, False),
    ("sum-dim", lambda x: x.sum(0, keepdim=True) * x, False),
    ("mean", lambda x: x.mean() + x.mean(1).sum(), False),
    ("flip-roll-repeat", lambda x: x.flip(0).roll(1, 1).repeat(2, 1), False),
    ("index-select", lambda x: x.index_select(1, torch.tensor([0, 4, 4])), False),
    ("cumsum", lambda x: x.cumsum(1) * W, False),
    ("to-float32", lambda x: x.to(torch.float32).sin(), False),
    ("add-both", lambda x: x + x.sin(), False),
    ("add-number-alpha", lambda x: torch.add(x, W, alpha=-2.5) + 1, False),
    ("add-tracked-second", lambda x: W + x.exp(), False),
    ("add-alpha-tracked-second", lambda x: torch.add(W, x, alpha=3), False),
    ("add-broadcast-tracked", lambda x: x[:1] + W, False),
    ("sub-both-alpha", lambda x: torch.sub(x, x.cos(), alpha=0.5), False),
    ("sub-tracked-second", lambda x: W - x.exp(), False),
    ("sub-alpha-tracked-second", lambda x: torch.sub(W, x, alpha=-2), False),
    ("sub-number", lambda x: x - 3, False),
    ("mul-both", lambda x: x * x.sin(), False),
    ("mul-numbers", lambda x: 4 * x * 2.5, False),
    ("mul-tracked-second", lambda x: W * x, False),
    ("mul-broadcast", lambda x: x[:, :1] * W, False),
    ("mul-div-scalar", lambda x: aten.div.Scalar(aten.mul.Scalar(x, 3.0), 7), False),
    ("add-sub-scalar", lambda x: aten.sub.Scalar(aten.add.Scalar(x, 3.0), 7) * x, False),
    ("div-by-untracked", lambda x: x / (W.abs() + 1), False),
    ("div-by-tracked", lambda x: W / x, True),
    ("div-both", lambda x: x.sin() / x, True),
    ("exp", torch.exp, False),
    ("sin-cos", lambda x: torch.cos(torch.sin(x)), False),
    ("tanh-sigmoid", lambda x: torch.sigmoid(torch.tanh(x)), False),
    ("log", torch.log, True),
    ("log1p", torch.log1p, True),
    ("sqrt", torch.sqrt, True),
    ("atan-erf", lambda x: torch.erf(torch.atan(x)), False),
    ("relu", lambda x: torch.relu(x) * W, False),
    ("pow", lambda x: x ** 3 + x ** 2 - x ** -1.5 + x ** 0.5, True),
    ("mm", lambda x: x @ W.t() @ x, False),
    ("matmul-3d", lambda x: x.view(2, 2, 5) @ W.t(), False),
    ("mv", lambda x: x.t() @ x[:, 1], False),
    ("bmm", lambda x: torch.bmm(x.view(2, 2, 5), x.view(2, 5, 2)), False),
    ("linear", lambda x: F.linear(x, W, W[:, 0]), False),
    ("addmm-alpha-beta", lambda x: torch.addmm(W[:, :4], x, x.t(), beta=2, alpha=0.5), False),
    ("addmm-tracked-second", lambda x: torch.addmm(W[0, :4], W, x.t()), False),
    ("cat-stack", lambda x: torch.cat([x, x.sin()], 1) + torch.stack([x, x]).sum(0).repeat(1, 2),
     False),
    ("comparison-mask", lambda x: (x > 0).to(D) * x, False),
    ("item-of-a-primal", lambda x: x * x.sum().item(), False),
    ("zeros-like", lambda x: torch.zeros_like(x) + x.exp(), False),
    ("detach", lambda x: x.detach() * x, False),
    ("stencil", lambda u: u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:]
     - 4 * u[1:-1, 1:-1] - u[1:-1, 1:-1] ** 3, False),
]


@pytest.mark.parametrize("name,f,positive", ONE_INPUT, ids=[c[0] for c in ONE_INPUT])
def test_each_rule_matches_torch_func_and_stays_direct(name, f, positive, switches):
    x = _x(4, 5, positive=positive)
    _check(f, x)
    assert not switches, "the trace left the direct phase"


def test_every_rule_is_exercised():
    """The cases above reach every operator of the table (a rule without a case is a
    rule nothing checks)."""
    seen = set()

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        for _, f, positive in ONE_INPUT:
            f(_x(4, 5, positive=positive))
    missing = {str(op) for op in _rules.RULES if op not in seen}
    # (reached only through decompositions that the Python operators above do not take)
    missing -= {"aten.narrow.default", "aten._reshape_alias.default", "aten.repeat.default"}
    assert not missing, missing


def test_two_inputs_and_a_tuple_output(switches):
    a, b = _x(3, 4), _x(4, 2, seed=1)
    _check(lambda a, b: (a @ b, (a.sum(0) * b[:, 0]).exp()), a, b)
    assert not switches


def test_a_chain_is_folded_while_traced(switches):
    x = _x(128, 64)
    jvp_fn = _check(lambda x: torch.tanh(torch.sin(x) * 2) / 3, x)
    (eqn,) = jvp_fn._program.eqns  # (one multiplication by the folded coefficient)
    assert eqn.fn is aten.mul.Tensor
    assert not switches


def test_the_direct_phase_dispatches_once_per_operation(monkeypatch):
    """The point of the direct phase: the PDE stencil's trace reaches the dispatch mode once
    per operation of f, where on duals it is reached by every tangent operation and every
    size and storage query too (86 round trips)."""
    counts = []
    real = _trace.Tracer.__torch_dispatch__

    def counting(self, func, types, args=(), kwargs=None):
        counts[-1] += 1
        return real(self, func, types, args, kwargs)

    monkeypatch.setattr(_trace.Tracer, "__torch_dispatch__", counting)
    f = ONE_INPUT[-1][1]
    u = _x(16, 16)
    for direct in (True, False):
        monkeypatch.setattr(_trace, "DIRECT", direct)
        counts.append(0)
        tl.linearize(f, u)
    direct_calls, dual_calls = counts
    assert direct_calls <= 20 and dual_calls > 3 * direct_calls, counts


# ------------------------------------------------------------------------- leaving the phase
def _leaves_the_phase(f, *primals, switches):
    _check(f, *primals)
    assert switches, "expected the trace to leave the direct phase"


def test_an_operator_without_a_rule_ends_the_phase(switches):
    _leaves_the_phase(lambda x: torch.where(x > 0, x.sin() * 2, x[0]).softmax(1), _x(4, 5),
                      switches=switches)


def test_a_view_operator_without_a_rule_ends_the_phase(switches):
    _leaves_the_phase(lambda x: x.exp().as_strided((2, 2), (1, 5), 3) * x[0, :2], _x(4, 5),
                      switches=switches)


def test_views_taken_before_the_switch_see_writes_after_it(switches):
    def f(x):
        y = x * 2
        v = y[1:]  # (a view taken while direct)
        y.mul_(W)  # (no rule: the trace switches; the write reaches v)
        return v * 1, y.sin()

    _leaves_the_phase(f, _x(4, 5), switches=switches)


def test_a_tangent_two_tensors_share_is_not_written_through_one_of_them(switches):
    def f(x):
        a = x + 1  # (its tangent is x's own)
        a.mul_(x.detach())  # (a's tangent is written: x's must not change)
        return a, x * 1

    _leaves_the_phase(f, _x(4, 5), switches=switches)


def test_a_write_into_the_input_after_direct_operations(switches):
    def f(x):
        y = x.exp()
        x.mul_(y.detach())
        return x + y

    x = _x(4, 5)
    y, jvp_fn = tl.linearize(f, x.clone())
    assert switches and jvp_fn._program.mutated_inputs == {0}
    torch.testing.assert_close(y, f(x.clone()))
    t = _x(4, 5, seed=3)
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(lambda v: f(v.clone()), (x,), (t,))[1])


def test_the_switch_leaves_version_counters_as_eager_code_does(switches):
    x = _x(4, 5)
    kept = {}

    def f(x):
        kept["y"] = y = x.sin()
        return torch.where(y > 0, y, x)  # (no rule: the switch gives x and y duals)

    before = x._version
    tl.linearize(f, x)
    assert switches and x._version == before and kept["y"]._version == 0


def test_a_custom_function_ends_the_phase(switches):
    x = _x(4, 5)
    _, jvp_fn = tl.linearize(lambda x: cf.Cube.apply(x.sin()) * 3, x)
    t = _x(4, 5, seed=3)
    torch.testing.assert_close(jvp_fn(t), 9 * x.sin() ** 2 * x.cos() * t)
    assert switches


def test_code_in_f_that_reads_tangents_ends_the_phase(switches):
    seen = {}

    def f(x):
        y = x * 2
        seen["tangent"] = fwAD.unpack_dual(y).tangent is not None
        return y.sin()

    tl.linearize(f, _x(4, 5))
    assert switches and seen["tangent"]
    _check(f, _x(4, 5))


def test_a_transform_inside_f():
    # (functorch's batching and grad rules run f's operations on f's own tensors: the
    # direct phase sees them as any operation)
    _check(lambda x: torch.vmap(torch.sin)(x.exp()) * 2, _x(4, 5))
    _check(lambda x: torch.func.grad(lambda v: (v.sin() ** 2).sum())(x * 2), _x(4, 5))


def test_a_nested_linearize_ends_the_outer_phase(switches):
    def f(x):
        w = x * 2
        _, j = tl.linearize(lambda y: y * w.detach(), x.detach())
        return j(torch.ones_like(x)) * x + w  # (= 2 x.detach() * x + 2 x)

    x, t = _x(4, 5), _x(4, 5, seed=3)
    y, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(y, 2 * x * x + 2 * x)
    torch.testing.assert_close(jvp_fn(t), (2 * x + 2) * t)
    assert switches


def test_no_tensor_keeps_the_phases_bookkeeping(switches):
    """Tangents held on f's tensors during the direct phase are dropped when the trace
    ends, also where f keeps the tensor (a global) or raises."""
    kept = {}

    def f(x):
        kept["y"] = y = x.exp()
        return y * 2

    tl.linearize(f, _x(4, 5))
    assert _trace._DIRECT not in kept["y"].__dict__

    def g(x):
        kept["z"] = x.exp()
        raise ValueError("inside f")

    with pytest.raises(ValueError, match="inside f"):
        tl.linearize(g, _x(4, 5))
    assert _trace._DIRECT not in kept["z"].__dict__ and not switches


@pytest.mark.parametrize("primal", [
    lambda: _x(6, 5)[1:],  # (a view of a larger tensor)
    lambda: _x(5, 4).t(),  # (not contiguous)
    lambda: _x(4, 5).to(torch.complex128),  # (complex)
], ids=["offset-view", "transposed", "complex"])
def test_primals_the_phase_does_not_start_with(primal, switches):
    x = primal()
    assert not _trace.direct_primal_ok(x.detach())
    y, jvp_fn = tl.linearize(lambda x: x * 2 + x.sin(), x)
    t = torch.randn_like(x)
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(lambda x: x * 2 + x.sin(), (x,), (t,))[1])
    assert not switches  # (traced on duals from the start: nothing to switch)


def test_a_function_whose_phase_ends_at_once_is_traced_on_duals_next_time(switches):
    """A direct phase that ends before any rule ran (f calls a custom Function first) is
    pure cost; the next linearization of the same function at the same shapes starts on
    duals (``_structure_cache.starts_on_duals``), and one whose phase was useful keeps it."""

    def f(x):
        return cf.Cube.apply(x).sin()

    def g(x):
        return cf.Cube.apply(x.exp())

    for fn, ref in ((f, lambda x, t: (x ** 3).cos() * 3 * x ** 2 * t),
                    (g, lambda x, t: 3 * x.exp() ** 3 * t)):
        for call in range(3):
            x, t = _x(4, 5, seed=call), _x(4, 5, seed=9)
            _, jvp_fn = tl.linearize(fn, x)
            torch.testing.assert_close(jvp_fn(t), ref(x, t))
        # f: a switch on the first call only; g: its phase traced exp, so it is kept
        assert len(switches) == (1 if fn is f else 4), (fn, switches)
