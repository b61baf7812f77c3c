"""Tests for ``torch_linearize/_compile.py``: compiled (fused) programs and CUDA graphs."""

import pytest
import torch
from torch._dynamo.utils import counters

import custom_functions as cf
import torch_linearize as tl
from helpers import eager_jvp

D = torch.float64


def chain(x):
    return torch.sin(torch.exp(torch.tanh(x))) * x.roll(1) + x.cumsum(0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield


def test_compiled_map_matches_and_reuses_compiled_code_across_points():
    x1, x2 = torch.randn(64, dtype=D), torch.randn(64, dtype=D)
    t = torch.randn(64, dtype=D)
    _, jvp1 = tl.linearize(chain, x1)
    c1 = jvp1.compile(backend="aot_eager")
    assert c1.is_compiled and not jvp1.is_compiled
    torch.testing.assert_close(c1(t), torch.func.jvp(chain, (x1,), (t,))[1])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    # A new linearization point with the same shapes: residuals are arguments, so the
    # compiled code is reused (no new graph), and results follow the new point.
    _, jvp2 = tl.linearize(chain, x2)
    c2 = jvp2.compile(backend="aot_eager")
    torch.testing.assert_close(c2(t), torch.func.jvp(chain, (x2,), (t,))[1])
    assert counters["stats"]["unique_graphs"] == graphs


def test_point_dependent_scalar_coefficients_do_not_recompile():
    # Folding turns the constant coefficient sum(sin(x)) * ones into a Python number; the
    # compiled segment must take it as an argument, not a literal, or each point compiles
    # a new graph.
    def f(x):
        return torch.sin(x).sum() * torch.ones_like(x) * x

    t = torch.randn(100, dtype=D)
    graphs = []
    for seed in range(3):
        x = torch.randn(100, dtype=D, generator=torch.Generator().manual_seed(seed))
        _, jvp_fn = tl.linearize(f, x)
        assert any(e.fn is torch.ops.aten.mul.Scalar or "alpha" in e.kwargs
                   for e in jvp_fn._program.eqns), "expected a folded scalar coefficient"
        c = jvp_fn.compile(backend="aot_eager")
        torch.testing.assert_close(c(t), torch.func.jvp(f, (x,), (t,))[1])
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[2] == graphs[0], graphs


def test_compiled_map_under_vmap_and_jacobian():
    x = torch.randn(16, dtype=D)
    _, jvp_fn = tl.linearize(chain, x)
    c = jvp_fn.compile(backend="aot_eager")
    ts = torch.randn(5, 16, dtype=D)
    want = torch.stack([torch.func.jvp(chain, (x,), (t,))[1] for t in ts])
    torch.testing.assert_close(torch.vmap(c)(ts), want)
    torch.testing.assert_close(c.jacobian(), torch.func.jacfwd(chain)(x))
    torch.testing.assert_close(c(ts[0]), want[0])  # and still compiled outside vmap


def test_custom_function_nodes_stay_opaque_between_compiled_segments():
    cf.reset()
    x = torch.randn(5, dtype=D)

    def f(x):
        return cf.NumpyCube.apply(x.sin() * 2).exp() + x

    _, jvp_fn = tl.linearize(f, x)
    compiled = jvp_fn.compile(backend="aot_eager")
    names = [e.name for e in compiled._driver.eqns]
    assert "NumpyCube.jvp" in names and any(n.startswith("compiled_segment") for n in names)
    t = torch.randn(5, dtype=D)
    torch.testing.assert_close(compiled(t), jvp_fn(t))
    assert cf.CALLS["NumpyCube.forward"] == 1 and cf.CALLS["NumpyCube.jvp"] == 2


def test_compiled_map_keeps_transpose_memory_and_validation():
    x = torch.randn(6, dtype=D)
    _, jvp_fn = tl.linearize(chain, x)
    compiled = jvp_fn.compile(backend="aot_eager")
    assert compiled.residual_bytes == jvp_fn.residual_bytes
    u = torch.randn(6, dtype=D)
    torch.testing.assert_close(compiled.transpose()(u), torch.func.vjp(chain, x)[1](u))
    with pytest.raises(ValueError, match=r"tangents\[0\] has shape \(5,\)"):
        compiled(torch.randn(5, dtype=D))
    jvp_fn.release()
    with pytest.raises(tl.ReleasedError):
        jvp_fn.compile()


def test_inductor_fuses_the_elementwise_program():
    # The real thing, once: Inductor generates one fused kernel for the pointwise program.
    x = torch.randn(4096)
    f = lambda x: torch.atan(torch.erf(torch.sigmoid(torch.cos(x)))) * x.flip(0)
    _, jvp_fn = tl.linearize(f, x)
    compiled = jvp_fn.compile()
    t = torch.randn(4096)
    torch.testing.assert_close(compiled(t), torch.func.jvp(f, (x,), (t,))[1], rtol=1e-5, atol=1e-6)
    assert counters["inductor"]["pattern_matcher_count"] >= 0  # Inductor ran
    assert counters["stats"]["unique_graphs"] == 1


def test_cuda_graph_requires_cuda():
    _, jvp_fn = tl.linearize(torch.sin, torch.randn(3))
    if torch.cuda.is_available():
        pytest.skip("CUDA is available; see test_cuda_graph_replays_on_gpu")
    with pytest.raises(tl.LinearizeError, match="CUDA is not available"):
        jvp_fn.cuda_graph()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_on_gpu():
    x = torch.randn(1000, device="cuda")
    _, jvp_fn = tl.linearize(chain, x)
    graphed = jvp_fn.cuda_graph()
    for _ in range(3):
        t = torch.randn(1000, device="cuda")
        torch.testing.assert_close(graphed(t), jvp_fn(t))


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_linearize_of_a_torch_compiled_function(backend):
    # Dynamo tried to compile the tracer's dispatch mode and failed inside it; under
    # linearize, compiled functions (and modules) run eagerly, so their ops are traced.
    f = lambda x: torch.sin(x) * x.exp()
    m = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh()).double()
    x, t = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    for fn, ref in ((torch.compile(f, backend=backend), f), (torch.compile(m, backend=backend), m)):
        fn(x)  # compiled once, outside
        y, jvp_fn = tl.linearize(fn, x)
        torch.testing.assert_close(y, ref(x))
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(ref, (x,), (t,))[1])


class _Doubled(torch.autograd.Function):
    """Saves an intermediate only (nothing the map must version-check)."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(2 * inputs[0])
        ctx.save_for_backward(2 * inputs[0])

    @staticmethod
    def jvp(ctx, t):
        return t * ctx.saved_tensors[0]

    @staticmethod
    def backward(ctx, g):
        return g * ctx.saved_tensors[0]


def test_a_map_of_custom_function_nodes_only_compiles_to_itself(monkeypatch):
    # No aten segment to fuse: compile() hands back the map itself (another handle),
    # lean one-tensor entry included, without calling torch.compile.
    x, t = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    _, jvp_fn = tl.linearize(_Doubled.apply, x)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile called"))
    c = jvp_fn.compile()
    assert not c.is_compiled and c._fast1 is not None and c._fast1 is jvp_fn._fast1
    torch.testing.assert_close(c(t), 2 * x * t)
    torch.testing.assert_close(torch.vmap(c)(torch.stack([t, -t])), torch.stack([2 * x * t, -2 * x * t]))
    torch.testing.assert_close(c.transpose()(t)[0], 2 * x * t)
    jvp_fn.release()
    with pytest.raises(tl.ReleasedError):
        c(t)


def test_releasing_one_handle_releases_every_handle_that_shares_the_map():
    """A map, its compile() copies and its copy.copy handles share residuals, program
    and custom-Function contexts. Until stop 22 releasing the copy (never called: nothing
    compiled) emptied them under the original, which still reported released == False
    and failed with KeyError, NameError or ReleasedError from a node. Releasing any
    handle now releases all of them: each says so and raises ReleasedError."""
    import copy

    x, t = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    plain = lambda x: x.sin() * x.exp()
    custom = lambda x: cf.SinCosPair.apply(x)[0] * x  # (a custom Function node)
    only_custom = lambda x: cf.SinCosPair.apply(x)[0]  # (compile() copies the map)
    for f in (plain, custom, only_custom):
        for which in range(3):
            _, jvp_fn = tl.linearize(f, x)
            handles = [jvp_fn, jvp_fn.compile(), copy.copy(jvp_fn)]
            nodes = list(jvp_fn._opaque_nodes)
            torch.testing.assert_close(handles[2](t), eager_jvp(f, (x,), (t,))[1])
            handles[which].release()
            for h in handles:
                assert h.released and h.residual_bytes == 0
                for use in (lambda h=h: h(t), lambda h=h: h.T(t), lambda h=h: h.jacobian(),
                            lambda h=h: h.batched(t[None])):
                    with pytest.raises(tl.ReleasedError):
                        use()
            assert all(n.ctx is None for n in nodes)
            handles[which].release()  # (a second release is a no-op)


def test_segments_with_one_source_but_different_operators_are_compiled_apart():
    """A segment's source names operators, dtypes and complex numbers as globals (f0,
    c1, ...). Until stop 22 compiled segments were cached by source alone: a.mean(0)'s
    compiled map ran the sum of an a.sum(0) map compiled before it (f0(v0, [0]) both),
    a float16 cast came out float64 and a complex factor was the earlier map's; with
    one code object for both sources, dynamo then ran one's frame with the other's
    globals (NameError)."""
    x = torch.randn(3, 4, dtype=D)
    cases = [
        [lambda a: a.sum(0), lambda a: a.mean(0)],
        [lambda a: a.double().sin(), lambda a: a.half().exp()],
        [lambda a: a * (1 + 2j), lambda a: a * (3 - 4j)],
    ]
    for fs in cases:
        for f in fs:
            _, jvp_fn = tl.linearize(f, x)
            t = torch.randn(3, 4, dtype=D)
            got, want = jvp_fn.compile(backend="eager")(t), jvp_fn(t)
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want)


def test_a_lazily_negated_tangent_through_an_inductor_segment():
    """Inductor reads a graph input's data without its neg bit (plain torch.compile of
    c * t gives -c * t for t = torch._neg_view(base)): until stop 22 a compiled map
    returned -J t for such a tangent, silently. Segments resolve the bit first."""
    x = torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(torch.sin, x)
    compiled = jvp_fn.compile()
    base = torch.randn(4, dtype=D)
    t = torch._neg_view(base)
    assert t.is_neg()
    torch.testing.assert_close(compiled(t), -x.cos() * base)
    torch.testing.assert_close(compiled(-base), -x.cos() * base)


def test_a_map_rebuilt_by_its_transpose_is_released_with_its_compile_copy():
    """A transpose rebuilds the map it transposes from that map's state when the caller
    dropped it: another handle on the same residuals, released with the others."""
    x, t = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: x.sin() * x, x)
    vjp_fn = jvp_fn.T
    del jvp_fn
    rebuilt = vjp_fn.T
    torch.testing.assert_close(rebuilt(t), (x.cos() * x + x.sin()) * t)
    rebuilt.compile(backend="eager").release()
    assert rebuilt.released
    with pytest.raises(tl.ReleasedError):
        rebuilt(t)
