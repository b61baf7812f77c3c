"""Tests for ``torch_linearize/_structure_cache.py``: re-linearizing a structure seen before.

A structure's first linearization runs the passes, the second records them, later ones
reuse the program where the recorded decisions hold. Every reuse is checked against ``torch.func`` at the new point; the property test runs
in the verification mode (each reuse compared with a full run of the passes on the
same trace), which ``pytest --verify-structure-cache`` turns on for the whole suite.
"""

import gc
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_linearize as tl
import torch_linearize._structure_cache as sc
from custom_functions import CtypesScale, NumpyCube
from helpers import check_random_program, eager_jvp, mutating_programs

D = torch.float64


@pytest.fixture
def verify(monkeypatch):
    monkeypatch.setattr(sc, "VERIFY", True)


def _pde(u):
    lap = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1]
    return lap - u[1:-1, 1:-1] ** 3


def _assert_map(f, primals, jvp_fn, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ts = tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)
    want = torch.func.jvp(f, primals, ts)[1]
    torch.testing.assert_close(jvp_fn(*ts), want)
    u = torch.randn(want.shape, dtype=want.dtype, generator=gen)
    got = jvp_fn.T(u)
    torch.testing.assert_close(got if isinstance(got, tuple) else (got,),
                               torch.func.vjp(f, *primals)[1](u))


def _twice(f, *primals):
    """Linearize ``f`` twice: its structure is then recorded."""
    for _ in range(2):
        tl.linearize(f, *primals)


def test_newton_loop_reuses_the_simplified_program(verify):
    points = [torch.randn(12, 12, dtype=D) for _ in range(5)]
    maps = []
    for u in points:
        y, jvp_fn = tl.linearize(_pde, u)
        torch.testing.assert_close(y, _pde(u))
        _assert_map(_pde, (u,), jvp_fn)
        maps.append(jvp_fn)
    # the first runs the passes, the second records them, the others reuse the program
    assert sc.stats == {"hits": 3, "recorded": 1, "refused": 0}
    assert len({m.source for m in maps}) == 1
    assert all(m._program.eqns == maps[1]._program.eqns for m in maps[2:])
    # every map stays the linearization at its own point
    for u, m in zip(points, maps):
        _assert_map(_pde, (u,), m, seed=1)


def _bratu(u):
    r = torch.empty_like(u)
    r[1:-1] = (u[:-2] - 2 * u[1:-1] + u[2:]) * 49**2 + torch.exp(u[1:-1])
    r[0] = u[0]
    r[-1] = u[-1]
    return r


def test_a_newton_loop_whose_residual_writes_in_place_reuses_the_program(verify):
    """Keys number the storages a mutating program writes. Until stop 22 those were
    trace-time addresses, which the allocator reuses differently from one trace to the
    next: the Bratu residual (boundary rows written through slices) recorded a new
    template at almost every Newton step (0 hits in 6 steps) and never reused one."""
    u = torch.zeros(50, dtype=D)
    keep = []
    for step in range(6):
        keep.append(torch.empty(step * 37 + 1, dtype=D))  # (moves the allocator around)
        r, jvp_fn = tl.linearize(_bratu, u)
        _assert_map(_bratu, (u,), jvp_fn)
        u = u - torch.linalg.solve(jvp_fn.jacobian(), r)
    assert sc.stats == {"hits": 4, "recorded": 1, "refused": 0}


def test_a_scalar_newton_loop_reuses_at_every_point(verify):
    # The forum's quadratic on four 0-d tensors at random points: one-element coefficients
    # stay tensors (not baked-in constants) and their cancellation is judged by the probe
    # (not by signs, which change from point to point), so every point reuses the program.
    def quad(x, a, b, c):
        return a * x**2 + b * x + c

    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        p = tuple(torch.randn((), dtype=D, generator=gen) for _ in range(4))
        _, jvp_fn = tl.linearize(quad, *p)
        _assert_map(quad, p, jvp_fn)
    assert sc.stats == {"hits": 10, "recorded": 1, "refused": 0}


def test_an_expanded_scalar_coefficient_is_stored_once_and_reused(verify):
    # x * s.expand(n) with s = sum(sin(x)): the coefficient of t is one value broadcast;
    # it stays one stored element (not a full-size copy, not a baked-in number).
    def f(x):
        return x * torch.sin(x).sum().expand(x.shape[0])

    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(1000, dtype=D, generator=gen)
        _, jvp_fn = tl.linearize(f, x)
        _assert_map(f, (x,), jvp_fn)
        # cos(x) and the one-element coefficient (x itself is external)
        assert jvp_fn.residual_bytes == 8 * 1000 + 8
    assert sc.stats == {"hits": 2, "recorded": 1, "refused": 0}


def test_same_structure_different_functions_and_captured_tensors(verify):
    # The key is the traced structure, not the function: tensors f captures are residuals,
    # replayed from the new trace. (A function's first call at given shapes computes no
    # key; its second finds the program another function recorded.)
    w1, w2 = torch.randn(6, dtype=D), torch.randn(6, dtype=D)
    x = torch.randn(6, dtype=D)
    f1 = lambda x: torch.sin(x) * w1
    f2 = lambda x: torch.sin(x) * w2
    _twice(f1, x)
    _, j1 = tl.linearize(f1, torch.randn(6, dtype=D))
    tl.linearize(f2, x)
    _, j2 = tl.linearize(f2, x)
    assert sc.stats == {"hits": 2, "recorded": 1, "refused": 0}
    _assert_map(f2, (x,), j2)


def test_literals_shapes_and_dtypes_are_part_of_the_structure():
    x = torch.randn(5, dtype=D)
    # (the literal scales the input's tangent itself: a step the program keeps)
    cases = [lambda x: torch.sin(x) + x * 2.0, lambda x: torch.sin(x) + x * 3.0,
             lambda x: torch.sin(x) + x * 2]
    for f in cases:
        for p in (x, x[:4], x.float()):
            for _ in range(2):  # (recorded at the second)
                _, jvp_fn = tl.linearize(f, p)
                gen = torch.Generator().manual_seed(0)
                t = torch.randn(p.shape, dtype=p.dtype, generator=gen)
                torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (p,), (t,))[1])
    # 2.0 and 2 differ as literals (int vs float); nothing was reused
    assert sc.stats == {"hits": 0, "recorded": 9, "refused": 0}


def test_a_constant_coefficient_is_rechecked():
    # d/dx (sin(x) * x) = cos(x) x + sin(x): 0 everywhere at x = 0, folded as a scalar 0.
    f = lambda x: torch.sin(x) * x
    zero = torch.zeros(8, dtype=D)
    _twice(f, zero)
    _, j0 = tl.linearize(f, zero)
    x = torch.randn(8, dtype=D)
    _, j1 = tl.linearize(f, x)
    assert sc.stats == {"hits": 1, "recorded": 2, "refused": 1}
    _assert_map(f, (zero,), j0)
    _assert_map(f, (x,), j1)
    # the scalar coefficient was not reused: it would give 0 here
    assert j1(torch.ones(8, dtype=D)).abs().max() > 0


def test_a_sign_decision_is_rechecked(verify):
    # b*p + b*q (b = cumsum(t), not an input: its coefficients are computed, not read from
    # the trace): with p, q of one sign the fold needs no accuracy probe; mixed signs do.
    def make(p, q):
        def f(x):
            b = x.cumsum(0)
            return b * p + b * q
        return f

    x = torch.randn(6, dtype=D)
    p, q = torch.rand(6, dtype=D) + 1, torch.rand(6, dtype=D) + 1
    _twice(make(p, q), x)
    _, j0 = tl.linearize(make(p, q), x)
    q2 = torch.linspace(-1, 1, 6, dtype=D)
    _, j1 = tl.linearize(make(p, q2), x)
    assert sc.stats["refused"] == 1
    _assert_map(make(p, q), (x,), j0)
    _assert_map(make(p, q2), (x,), j1)


@pytest.mark.parametrize("fold_chains", [False, True])
def test_an_accuracy_decision_is_rechecked(monkeypatch, fold_chains):
    # At the second point the two paths nearly cancel: folded as t*(c*p + c*q) the result
    # would differ from the traced one by a rounding of c*p (1e8 times the result), so the
    # accuracy probe keeps the sum of the two terms. Traced as forward AD computes them, the terms are
    # t*c*p and t*c*q: what torch.func computes, to the last bit. With scaling chains
    # folded while tracing they are t*(c*p) and t*(c*q): each within a rounding of the
    # traced term, and the JVP within a few roundings of the terms of the exact one, as
    # torch.func's is.
    monkeypatch.setattr(tl._trace, "FOLD_CHAINS", fold_chains)

    def make(p, q):
        return lambda x: torch.sin(x) * p + torch.sin(x) * q

    x = torch.randn(64, dtype=D)
    p = torch.linspace(-1, 1, 64, dtype=D)
    _twice(make(p, 2 * p), x)
    _, j0 = tl.linearize(make(p, 2 * p), x)
    big, minus_big = 1e8 + p, torch.full((64,), -1e8, dtype=D)
    f1 = make(big, minus_big)
    _, j1 = tl.linearize(f1, x)
    assert sc.stats["refused"] == 1
    _assert_map(make(p, 2 * p), (x,), j0)
    t = torch.randn(64, dtype=D)
    want = torch.func.jvp(f1, (x,), (t,))[1]
    if not fold_chains:
        torch.testing.assert_close(j1(t), want, rtol=1e-12, atol=0)
    exact = t * torch.cos(x) * (big + minus_big)  # (big + minus_big is exact: Sterbenz)
    ulp_of_terms = (t * torch.cos(x) * big).abs() * torch.finfo(D).eps
    assert ((want - exact).abs() <= 4 * ulp_of_terms).all()  # (torch.func's accuracy)
    assert ((j1(t) - exact).abs() <= 4 * ulp_of_terms).all()
    assert j0.num_ops < j1.num_ops


def test_the_cache_keeps_no_tensors_alive():
    x = torch.randn(16, dtype=D)

    def f(x):
        return torch.exp(torch.sin(x))

    _twice(f, x)
    _, jvp_fn = tl.linearize(f, x)
    refs = [weakref.ref(r) for r in jvp_fn._program.residuals]
    assert refs and sc.stats["recorded"] == 1 and sc.stats["hits"] == 1
    del jvp_fn
    gc.collect()
    assert all(r() is None for r in refs)


def test_programs_with_custom_functions_reuse_the_program_with_their_own_nodes(verify):
    # A custom-Function node is part of the structure by its Function and metadata, not
    # its ctx: a reuse binds the new trace's nodes (their own ctx) into the cached
    # program and code, every earlier map keeps its own, and the cache keeps none.
    def f(x):
        y = CtypesScale.apply(x.sin() * 2 + x.cos(), 1.5)
        return NumpyCube.apply(y * x.exp()).tanh() + x

    points = [torch.randn(6, dtype=D, generator=torch.Generator().manual_seed(k))
              for k in range(5)]
    maps = [tl.linearize(f, x)[1] for x in points]
    # (from the third call on each reuses, unless a recorded decision comes out
    # differently at that point: then the passes run)
    assert sc.stats["hits"] >= 2 and sc.stats["hits"] + sc.stats["refused"] == 3
    t, u = torch.randn(6, dtype=D), torch.randn(6, dtype=D)
    for x, jvp_fn in zip(points, maps):  # (after all five linearizations)
        want = eager_jvp(f, (x,), (t,))[1]
        torch.testing.assert_close(jvp_fn(t), want)
        torch.testing.assert_close(torch.vmap(jvp_fn)(torch.stack([t, -t])), torch.stack([want, -want]))
        (g,) = jvp_fn.transpose()(u)
        torch.testing.assert_close((g * t).sum(), (u * want).sum())  # the dot-product test
    nodes = [{id(n) for n in m._opaque_nodes} for m in maps]
    assert all(len(n) == 2 for n in nodes) and len(set().union(*nodes)) == 10
    # the cache keeps no node, no ctx (a reused map's ctx dies with the map)
    hits = sc.stats["hits"]
    jvp_fn = tl.linearize(f, points[-1])[1]  # (the point last seen: its decisions hold)
    assert sc.stats["hits"] == hits + 1
    ctx = weakref.ref(jvp_fn._opaque_nodes[0].ctx)
    del jvp_fn
    gc.collect()
    assert ctx() is None


def test_aux_and_error_messages_on_a_reused_program():
    def f(x):
        return torch.exp(x) * x, x.sum()

    for _ in range(3):
        x = torch.randn(4, dtype=D)
        y, jvp_fn, aux = tl.linearize(f, x, has_aux=True)
        torch.testing.assert_close(aux, x.sum())
        _assert_map(lambda x: f(x)[0], (x,), jvp_fn)
    assert sc.stats["hits"] == 1
    # a residual the user can reach is watched on the reused program too, and named
    w = torch.randn(4, dtype=D)
    for _ in range(3):
        _, jvp_fn = tl.linearize(lambda x: x * w, x)
    assert sc.stats["hits"] == 2
    w.mul_(2)
    with pytest.raises(tl.StaleResidualError, match="residual"):
        jvp_fn(x)


def test_a_write_the_tracer_cannot_see_is_caught_on_a_reused_program():
    # numpy writes a residual during f (bumping its version as PyTorch asks): the same
    # structure as before, so the program would be reused, but the residual is stale.
    write = [False]
    w = torch.randn(3, dtype=D)

    def f(x):
        y = x * w
        if write[0]:
            w.numpy()[:] = 0
            torch.autograd.graph.increment_version(w)
        return y

    x = torch.randn(3, dtype=D)
    _twice(f, x)
    write[0] = True
    with pytest.raises(tl.StaleResidualError, match="modified in place later during f"):
        tl.linearize(f, x)
    assert sc.stats["hits"] == 1


_UNARY = [torch.sin, torch.exp, torch.tanh, torch.relu, torch.abs, lambda v: v * 2.5,
          lambda v: v.clamp(-0.5, 0.5), torch.atan, lambda v: torch.where(v > 0, v, 0.1 * v)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutating_programs(_UNARY), st.integers(0, 2**31 - 1))
def test_random_programs_relinearized_at_new_points(f, seed):
    # The same random program (views, in-place writes, aliasing) at four points: the
    # third and fourth reuse the second's program wherever its decisions hold, and each
    # reuse is compared with a full run of the passes (verification mode).
    sc.cache_clear()
    old = sc.VERIFY
    sc.VERIFY = True
    try:
        for k in range(4):
            check_random_program(f, seed + k)
    finally:
        sc.VERIFY = old


def test_threads_relinearizing_one_structure(verify):
    # Several threads linearize the same structure at their own points at once: the
    # cache is shared, the recorded program and the replayed residuals are not. (The
    # references are computed first: torch.func.jvp and forward AD share PyTorch's one
    # global forward-AD level, which linearize holds while tracing.)
    import threading

    gen = torch.Generator().manual_seed(0)
    work_items = []
    for _ in range(4):
        items = []
        for _ in range(6):
            u, t = torch.randn(10, 10, dtype=D, generator=gen), torch.randn(10, 10, dtype=D,
                                                                            generator=gen)
            items.append((u, t, torch.func.jvp(_pde, (u,), (t,))[1]))
        work_items.append(items)
    errors: list = []

    def work(items) -> None:
        try:
            for u, t, want in items:
                _, jvp_fn = tl.linearize(_pde, u)
                torch.testing.assert_close(jvp_fn(t), want)
        except Exception as e:  # (re-raised in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(items,)) for items in work_items]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert sc.stats["hits"] >= 12


@pytest.mark.parametrize("value, hits, verify", [("0", 0, False), ("verify", 2, True),
                                                 ("1", 2, False)])
def test_environment_variable(value, hits, verify):
    # TORCH_LINEARIZE_STRUCTURE_CACHE=0 turns reuse off; =verify checks every reuse.
    import os
    import subprocess
    import sys

    code = (
        "import torch, torch_linearize as tl, torch_linearize._structure_cache as sc\n"
        "f = lambda x: torch.sin(x) * torch.exp(x)\n"
        "for k in range(4):\n"
        "    x = torch.randn(8, dtype=torch.float64)\n"
        "    t = torch.randn(8, dtype=torch.float64)\n"
        "    torch.testing.assert_close(tl.linearize(f, x)[1](t),\n"
        "                               torch.func.jvp(f, (x,), (t,))[1])\n"
        "print(sc.stats['hits'], sc.VERIFY)\n"
    )
    env = dict(os.environ, TORCH_LINEARIZE_STRUCTURE_CACHE=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(hits), str(verify)]
