"""Tests for ``torch_linearize/_api.py``: the ``linearize`` entry point."""

import functools

import pytest
import torch
import torch.nn.functional as F

import torch_linearize as tl
from helpers import OpCounter, assert_jvp_matches, central_difference, eager_jvp, rand_like_tree

D = torch.float64


def test_elementwise_chain_matches_func_jvp_and_finite_differences():
    x = torch.randn(7, dtype=D)

    def f(x):
        return torch.sin(torch.exp(torch.tanh(x)))

    _, jvp_fn = assert_jvp_matches(f, x)
    t = torch.randn(7, dtype=D)
    torch.testing.assert_close(jvp_fn(t), central_difference(f, (x,), (t,)), rtol=1e-6, atol=1e-8)


def test_multiple_primals_and_tuple_output():
    a, b = torch.randn(3, 4, dtype=D), torch.randn(4, 5, dtype=D)
    assert_jvp_matches(lambda a, b: (a @ b, (a.sum(), torch.cos(b))), a, b)


def test_dict_of_parameters_with_functional_call():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(5, 4, dtype=D)

    def f(p):
        return torch.func.functional_call(model, p, (x,))

    y, jvp_fn = assert_jvp_matches(f, params)
    assert y.shape == (5, 3)


def test_dict_output_structure_is_preserved():
    x = torch.randn(3, dtype=D)
    y, jvp_fn = tl.linearize(lambda x: {"s": x.sin(), "c": [x.cos(), x * 2]}, x)
    out = jvp_fn(torch.ones(3, dtype=D))
    assert set(out) == {"s", "c"} and isinstance(out["c"], list)
    torch.testing.assert_close(out["c"][1], 2 * torch.ones(3, dtype=D))


def test_output_independent_of_input_gets_zeros():
    x = torch.randn(3, dtype=D)
    c = torch.randn(2, dtype=D)
    y, jvp_fn = tl.linearize(lambda x: (x * 2, c.exp(), torch.arange(3)), x)
    dy = jvp_fn(torch.ones(3, dtype=D))
    torch.testing.assert_close(dy[1], torch.zeros(2, dtype=D))
    assert dy[2].dtype == torch.int64 and not dy[2].any()
    dy[1].add_(1)  # the zero outputs are fresh tensors: mutating one changes nothing later
    torch.testing.assert_close(jvp_fn(torch.ones(3, dtype=D))[1], torch.zeros(2, dtype=D))


def test_has_aux():
    x = torch.randn(3, dtype=D)
    y, jvp_fn, aux = tl.linearize(lambda x: (x.sin(), {"norm": x.norm(), "tag": "hi"}), x,
                                  has_aux=True)
    torch.testing.assert_close(aux["norm"], x.norm())
    assert aux["tag"] == "hi" and not aux["norm"].requires_grad
    torch.testing.assert_close(jvp_fn(torch.ones(3, dtype=D)), x.cos())


def test_has_aux_requires_pair():
    with pytest.raises(ValueError, match="has_aux=True"):
        tl.linearize(lambda x: x, torch.randn(2), has_aux=True)


def test_output_is_detached_and_equals_f():
    x = torch.randn(4, dtype=D, requires_grad=True)
    w = torch.randn(4, dtype=D, requires_grad=True)
    y, jvp_fn = tl.linearize(lambda x: (x * w).exp(), x)
    assert not y.requires_grad and y.grad_fn is None
    torch.testing.assert_close(y, (x * w).exp().detach())
    assert not jvp_fn(torch.ones(4, dtype=D)).requires_grad


def test_f_runs_exactly_once():
    calls = []

    def f(x):
        calls.append(1)
        return x.sin()

    _, jvp_fn = tl.linearize(f, torch.randn(3))
    for _ in range(4):
        jvp_fn(torch.randn(3))
    assert len(calls) == 1


def test_apply_runs_no_primal_kernels():
    x = torch.randn(100, dtype=D)
    t = torch.randn(100, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: torch.sin(torch.exp(torch.tanh(x))), x)
    with OpCounter() as c:
        jvp_fn(t)
    assert not {"sin", "exp", "tanh", "cos"} & set(c.counts), c.counts
    assert sum(c.counts.values()) <= 3  # tanh_backward and two multiplications


def test_integer_primal_leaves_are_constants():
    x = torch.randn(4, dtype=D)
    idx = torch.tensor([0, 2])
    y, jvp_fn = tl.linearize(lambda x, i: x[i] * 3, x, idx)
    torch.testing.assert_close(jvp_fn(torch.ones(4, dtype=D), None), torch.full((2,), 3.0, dtype=D))


def test_random_ops_share_the_draw():
    x = torch.randn(1000, dtype=D)

    def f(x):
        return F.dropout(x, p=0.5, training=True) * 2

    torch.manual_seed(7)
    y, jvp_fn = tl.linearize(f, x)
    t = torch.randn(1000, dtype=D)
    # The mask of y's draw: kept elements are x * 2 / 0.5.
    kept = y != 0
    torch.testing.assert_close(jvp_fn(t), torch.where(kept, t * 4, torch.zeros_like(t)))
    torch.manual_seed(7)
    ry, rt = torch.func.jvp(f, (x,), (t,))
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(jvp_fn(t), rt)


def test_in_place_and_views_inside_f():
    x = torch.randn(4, 5, dtype=D)

    def f(x):
        y = x.clone()
        y[1:].mul_(x[:-1].exp())
        z = y.t()
        z[0].add_(1.0)
        buf = torch.zeros(6, 5, dtype=D)
        buf[1:5] = y.sin()
        buf.index_add_(0, torch.tensor([0, 5]), x[:2] * 3)
        return buf.cumsum(0), y

    assert_jvp_matches(f, x)


@pytest.mark.parametrize("view", [
    lambda v: v[1:], lambda v: v.t(), lambda v: v[:, ::2], lambda v: v.diagonal(),
    lambda v: v.reshape(-1)[2:10].view(2, 4), lambda v: v.unsqueeze(0).expand(2, *v.shape)[1],
], ids=["slice", "t", "strided", "diagonal", "reshape-view", "expand-select"])
@pytest.mark.parametrize("write", ["add_", "copy_", "setitem"])
def test_output_viewing_a_buffer_written_with_tangent_data_later(view, write):
    # The output is a view of a buffer that had no tangent when the view was taken;
    # a later in-place write gives the buffer one, and forward AD derives the view's
    # tangent from it lazily, when the output is read (found by fuzzing: linearize
    # refused it as an affine map).
    c = torch.randn(4, 4, dtype=D)

    def f(x):
        buf = c.sin()
        out = view(buf)
        if write == "add_":
            buf.add_(x * x)
        elif write == "copy_":
            buf.copy_(x.exp())
        else:
            buf[1:3] = x[:2] * 3
        return out, buf

    assert_jvp_matches(f, torch.randn(4, 4, dtype=D))
    assert_jvp_matches(lambda x: f(x)[0], torch.randn(4, 4, dtype=D))


def test_jvp_fn_never_mutates_the_callers_tangent():
    x = torch.randn(5, dtype=D)

    def f(x):
        y = x.view(5)
        y.mul_(2)  # in place on the primal's view: the tangent is scaled in place too
        return y.sin()

    y, jvp_fn = tl.linearize(f, x.clone())
    t = torch.randn(5, dtype=D)
    t_before = t.clone()
    out1 = jvp_fn(t)
    out2 = jvp_fn(t)
    torch.testing.assert_close(t, t_before)
    torch.testing.assert_close(out1, out2)
    _, ref = torch.func.jvp(f, (x.clone(),), (t_before,))
    torch.testing.assert_close(out1, ref)


def test_non_contiguous_primal_and_tangent_layouts():
    base = torch.randn(6, 4, dtype=D)
    x = base.t()  # non-contiguous primal
    f = functools.partial(torch.nn.functional.softmax, dim=0)
    y, jvp_fn = tl.linearize(f, x)
    for t in (torch.randn(4, 6, dtype=D), torch.randn(6, 4, dtype=D).t(),
              torch.randn(10, 6, dtype=D)[3:7]):
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t.contiguous(),))[1])


def test_tangent_views_into_a_batch_run_without_a_copy():
    # T[k] of a stacked batch has the traced strides but a storage offset: view ops take
    # relative offsets, so the map runs on it directly (an extra copy doubled the memory
    # traffic of the folded elementwise chain on the GPU).
    x = torch.randn(1000, dtype=D)

    def f(v):
        return torch.sin(torch.exp(v)) * v

    _, jvp_fn = tl.linearize(f, x)
    T = torch.randn(3, 1000, dtype=D)
    for k in range(3):
        with OpCounter() as c:
            out = jvp_fn(T[k])
        assert "copy_" not in c.counts and "clone" not in c.counts, c.counts
        torch.testing.assert_close(out, torch.func.jvp(f, (x,), (T[k].clone(),))[1])


@pytest.mark.parametrize("op", ["as_strided", "as_strided_scatter"])
def test_absolute_storage_offsets_still_see_the_traced_layout(op):
    # as_strided takes an *absolute* storage offset: applied to an input, it must see the
    # tangent where the traced placeholder began (offset 0), so offset views are copied.
    x = torch.randn(40, dtype=D)

    def f(v):
        if op == "as_strided":
            return torch.sin(v).as_strided((10,), (2,), 3) * v.as_strided((10,), (3,), 5)
        return torch.as_strided_scatter(v.sin(), v[:10] * 2, (10,), (1,), 4)

    _, jvp_fn = tl.linearize(f, x)
    T = torch.randn(3, 40, dtype=D)
    for k in range(3):
        torch.testing.assert_close(jvp_fn(T[k]), torch.func.jvp(f, (x,), (T[k].clone(),))[1])


def test_expanded_primal():
    # torch.func.jvp itself rejects primals with internal overlap; linearize accepts them.
    x = torch.randn(3, 1, dtype=D).expand(3, 4)

    def f(x):
        return (x * x.exp()).sum(1)

    y, jvp_fn = tl.linearize(f, x)
    t = torch.randn(3, 4, dtype=D)
    ry, rt = torch.func.jvp(f, (x.contiguous(),), (t,))
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(jvp_fn(t), rt)


def test_complex_primal():
    x = torch.randn(4, dtype=torch.complex128)
    assert_jvp_matches(lambda x: (x.exp() * x.conj()).abs() + x.real, x)


def test_many_applications_are_consistent():
    x = torch.randn(8, dtype=D)
    y, jvp_fn = tl.linearize(lambda x: torch.tanh(x).cumprod(0), x)
    ts = [torch.randn(8, dtype=D) for _ in range(5)]
    first = [jvp_fn(t) for t in ts]
    second = [jvp_fn(t) for t in ts]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    # linearity: J(a t1 + b t2) = a J t1 + b J t2
    torch.testing.assert_close(jvp_fn(2 * ts[0] - 3 * ts[1]), 2 * first[0] - 3 * first[1])


def test_hvp_via_func_grad_inside_f():
    x = torch.randn(5, dtype=D)

    def loss(x):
        return (x.sin() * x.exp()).sum() + (x @ x) ** 2

    g, hvp = tl.linearize(torch.func.grad(loss), x)
    hess = torch.func.hessian(loss)(x)
    v = torch.randn(5, dtype=D)
    torch.testing.assert_close(g, torch.func.grad(loss)(x))
    torch.testing.assert_close(hvp(v), hess @ v)


def test_hvp_via_autograd_grad_create_graph_inside_f():
    x = torch.randn(5, dtype=D)

    def loss(x):
        return (x.cos() * x).sum() ** 2

    def grad(x):
        with torch.enable_grad():
            x = x.requires_grad_()
            (g,) = torch.autograd.grad(loss(x), x, create_graph=True)
        return g

    g, hvp = tl.linearize(grad, x)
    v = torch.randn(5, dtype=D)
    torch.testing.assert_close(hvp(v), torch.func.hessian(loss)(x) @ v)


def test_vmap_inside_f():
    x = torch.randn(4, 3, dtype=D)
    w = torch.randn(3, dtype=D)
    assert_jvp_matches(lambda x: torch.vmap(lambda r: (r * w).sin().sum())(x), x)


def test_random_tangent_tree_helper_is_used_correctly():
    p = {"a": torch.randn(2, dtype=D), "b": [torch.randn(3, dtype=D)]}
    t = rand_like_tree(p)
    y, jvp_fn = tl.linearize(lambda p: p["a"].sum() * p["b"][0], p)
    _, ref = torch.func.jvp(lambda p: p["a"].sum() * p["b"][0], (p,), (t,))
    torch.testing.assert_close(jvp_fn(t), ref)


def test_inference_mode_and_inference_tensors():
    # Forward AD records nothing in inference mode and cannot give an inference tensor a
    # tangent: the map was silently zero. torch.func.jvp works there; so does linearize.
    import custom_functions as cf

    x, t = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    with torch.inference_mode():
        xi = torch.randn(5, dtype=D)
        w = torch.randn(5, 5, dtype=D)
        v = torch.randn(5, dtype=D)
        _, jvp_fn = tl.linearize(torch.sin, x)  # called inside inference mode
        torch.testing.assert_close(jvp_fn(t), torch.cos(x) * t)
    _, jvp_fn = tl.linearize(torch.sin, xi)  # an inference tensor as the primal
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(torch.sin, (xi,), (t,))[1])
    f = lambda x: torch.sin(x @ w)  # an inference tensor captured as a residual
    _, jvp_fn = tl.linearize(f, x)
    want = torch.cos(x @ w) * (t @ w)
    torch.testing.assert_close(jvp_fn(t), want)
    with torch.inference_mode():
        w.mul_(2)  # (no version counter to watch: linearize kept a copy)
    torch.testing.assert_close(jvp_fn(t), want)
    xs = torch.randn(3, 5, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: cf.WeightedSum.apply(x, v.expand(3, 5)), xs)  # in a ctx
    ts = torch.randn(3, 5, dtype=D)
    torch.testing.assert_close(jvp_fn(ts), (ts * v).sum(-1))
    y, jvp_fn, aux = tl.linearize(lambda x: (torch.sin(x), w), x, has_aux=True)
    torch.testing.assert_close(aux, w)


def test_forward_ad_switched_off_and_inside_a_custom_functions_forward():
    # PyTorch switches forward AD off inside every custom Function's forward; forward AD
    # then records nothing and the map was silently zero. torch.func.jvp works there, and
    # so does linearize: inside such a forward, called eagerly or itself linearized.
    import torch.autograd.forward_ad as fwAD

    x, c, t = (torch.randn(5, dtype=D) for _ in range(3))
    with fwAD._set_fwd_grad_enabled(False):
        _, jvp_fn = tl.linearize(torch.sin, x)
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(torch.sin, (x,), (t,))[1])
        assert not torch._C._is_fwd_grad_enabled()  # (left as it was)

    class Slope(torch.autograd.Function):  # forward: cos(c), from a linearization of sin
        @staticmethod
        def forward(c):
            _, j = tl.linearize(torch.sin, c)
            return j(torch.ones_like(c))

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def jvp(ctx, s):
            return torch.zeros_like(s)

    torch.testing.assert_close(Slope.apply(c), torch.cos(c))
    _, jvp_fn = tl.linearize(lambda x: x * Slope.apply(c), x)
    torch.testing.assert_close(jvp_fn(t), t * torch.cos(c))


def test_the_bench_command_forwards_its_options_to_bench_core():
    import argparse

    from torch_linearize import _bench_cli

    parser = argparse.ArgumentParser()
    _bench_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--quick", "--malloc", "pinned", "--only", "pde",
                              "--out", ""])
    assert _bench_cli._forwarded(args) == ["--quick", "--out", "", "--only", "pde",
                                           "--malloc", "pinned"]
    assert _bench_cli._forwarded(parser.parse_args(["bench"])) == []
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--malloc", "jemalloc"])


def test_bench_core_calls_a_k64_ratio_a_tie_only_for_the_floors_kernels_and_no_measurable_gap():
    import collections
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_core as bc
    from common import Samples, count_kernels

    def samples(values):
        s = Samples()
        for v in values:
            s.add(v)
        return s

    floor = [10.0 + 0.3 * ((i * 7) % 5) for i in range(31)]  # noisy rounds
    a = torch.randn(4, 8)
    same = count_kernels(lambda: a * a[0], shapes=True)
    assert same == collections.Counter({"mul[4x8, 8]": 1})
    other = count_kernels(lambda: a.t() * a.t()[0:1], shapes=True)
    assert other != same  # the same operation on another layout is another kernel

    def batch(mine, kernels):
        return bc.BatchResult("t", {bc.B_FLOOR: bc.BatchRow(bc.B_FLOOR, samples=samples(floor)),
                                    bc.B_BATCHED: bc.BatchRow(bc.B_BATCHED, samples=samples(mine))},
                              kernels={bc.B_FLOOR: same, bc.B_BATCHED: kernels})

    wobble = [f * (1.004 if i % 2 else 0.998) for i, f in enumerate(floor)]
    assert bc._tie(batch(wobble, same), bc.B_BATCHED) is not None
    assert bc._tie(batch(wobble, other), bc.B_BATCHED) is None  # other kernels: no tie
    slower = [f * (1.03 + 0.002 * (i % 3)) for i, f in enumerate(floor)]
    assert bc._tie(batch(slower, same), bc.B_BATCHED) is None  # a measurable gap: no tie


# ------------------------------------------- primals that are strided views of larger tensors
@pytest.mark.parametrize("view", [lambda b: b[:, 1], lambda b: b.diagonal(),
                                  lambda b: b[:10].T, lambda b: b[2:7, 1:4]],
                         ids=["column", "diagonal", "transposed-rows", "block"])
@pytest.mark.parametrize("elementwise", [True, False], ids=["elementwise", "outer"])
def test_a_strided_view_primal(view, elementwise):
    """Forward AD lays a view primal's tangent out over its whole storage; until stop 21 a
    column of a 4000x4000 matrix cost 38 ms per application (64 MB allocated and zeroed)
    and kept the matrix alive. An elementwise program now clones the view's tangent
    instead (the passes); f itself still runs on the caller's view (eager semantics)."""
    base = torch.randn(40, 30, dtype=torch.float64)
    x = view(base)
    if elementwise:
        f = lambda x: torch.sin(x) * x + x.exp() / 3
    else:
        f = lambda x: torch.outer(x.reshape(-1), x.reshape(-1).sin())
    y, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(y, f(x))
    for _ in range(2):
        t, u = torch.randn(x.shape, dtype=torch.float64), torch.randn(y.shape, dtype=torch.float64)
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1])
        torch.testing.assert_close(jvp_fn.T(u)[0], torch.func.vjp(f, x)[1](u)[0])
    T = torch.randn(3, *x.shape, dtype=torch.float64)
    torch.testing.assert_close(jvp_fn.batched(T), torch.stack([jvp_fn(t) for t in T]))
    if elementwise:
        assert len(jvp_fn._program.eqns) == 1, str(jvp_fn)  # (one folded product)
        assert jvp_fn.external_bytes == 0  # (base is not kept alive)


@pytest.mark.parametrize("case", ["base-read", "stride", "reshape-copies", "captured-diagonal"])
def test_f_sees_a_strided_view_primal_as_eager_code_does(case):
    """A strided view primal is traced as the caller's view itself (this stop first traced a
    compact copy: f lost its aliasing with the base, its strides and offsets)."""
    start = torch.ones(6, 8, dtype=torch.float64) + torch.rand(6, 8, dtype=torch.float64)
    base = start.clone()
    if case == "base-read":
        def f(x):
            x.mul_(2)
            return x * base.sum()
    elif case == "stride":
        def f(x):
            return x.as_strided((4,), (9,), x.storage_offset()).sin() * x.stride(0)
    elif case == "reshape-copies":
        def f(x):
            x.reshape(-1)[:2].mul_(3)  # (reshape copies a strided view: x is not written)
            return x * 1
    else:
        def f(x):
            return x * base.diagonal()[:4].sum()

    def view(b):
        return b[1:3, 1:4] if case == "reshape-copies" else b[1:5, 1]

    y, jvp_fn = tl.linearize(f, view(base))
    after = base.clone()
    base.copy_(start)  # (the reference, eager forward AD, from the same starting point)
    t = torch.randn(view(base).shape, dtype=torch.float64)
    ref_y, ref_t = eager_jvp(f, (view(base),), (t.clone(),))
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(jvp_fn(t), ref_t)
    torch.testing.assert_close(after, base)  # (f's writes reached the caller's tensor alike)


def test_what_f_writes_into_a_strided_view_primal_reaches_the_callers_tensor():
    def f(x):
        x.mul_(2)
        return x.sin()

    base = torch.randn(6, 4, dtype=torch.float64)
    eager_base = base.clone()
    want_y = f(eager_base[:, 1])
    y, jvp_fn = tl.linearize(f, base[:, 1])
    torch.testing.assert_close(base, eager_base)  # (column 1 doubled, as eager f did)
    torch.testing.assert_close(y, want_y)
    t = torch.randn(6, dtype=torch.float64)
    # (eager forward AD doubles the tangent with the primal; torch.func.jvp does not)
    _, want = eager_jvp(f, (base[:, 1].clone() / 2,), (t.clone(),))  # (it writes t)
    torch.testing.assert_close(jvp_fn(t), want)


def test_concurrent_traces_leave_torch_compile_as_they_found_it():
    """A trace runs torch.compile'd functions eagerly (the compiler's stance, which is
    process-wide). Until stop 21 each trace set and restored it on its own: two threads
    whose traces overlapped first-in-first-out (A enters, B enters, A leaves, B leaves)
    left the process in "force_eager", every compiled function silently eager from then
    on."""
    import threading

    import torch._dynamo.eval_frame as eval_frame

    compiled = torch.compile(lambda x: x.sin() * 2, backend="eager")
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    results: dict[str, tuple] = {}

    def f_a(x):
        a_in.set()
        b_in.wait(timeout=30)  # (B's trace has begun: A leaves first)
        return compiled(x)

    def f_b(x):
        b_in.set()
        a_done.wait(timeout=30)
        return compiled(x)

    def run(name, f):
        x = torch.randn(3, dtype=D)
        _, jvp_fn = tl.linearize(f, x)
        results[name] = (jvp_fn(torch.ones(3, dtype=D)), 2 * x.cos())
        if name == "a":
            a_done.set()

    before = eval_frame._stance.stance
    a = threading.Thread(target=run, args=("a", f_a))
    b = threading.Thread(target=run, args=("b", f_b))
    a.start()
    assert a_in.wait(timeout=30)
    b.start()
    for t in (a, b):
        t.join(timeout=60)
    assert set(results) == {"a", "b"}
    for got, want in results.values():
        torch.testing.assert_close(got, want)
    assert eval_frame._stance.stance == before == "default"
