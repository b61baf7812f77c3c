"""Tests for ``torch_linearize/_linear_map.py``: the ``LinearMap`` object itself."""

import gc
import weakref

import pytest
import torch

import custom_functions as cf
import torch_linearize as tl
from torch_linearize._linear_map import LinearMap

D = torch.float64


def test_maps_have_names_and_vmap_never_prints_the_program(monkeypatch):
    # torch.vmap formats its function's name on every call and falls back to repr(),
    # which prints the whole program: a name keeps that off each application
    x = torch.randn(5, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: x.sin() * x, x)
    vjp_fn = jvp_fn.transpose()
    assert (jvp_fn.__name__, vjp_fn.__name__) == ("jvp_fn", "vjp_fn")

    def no_repr(self):
        raise AssertionError("repr() of the map was called")

    monkeypatch.setattr(LinearMap, "__repr__", no_repr)
    T = torch.randn(3, 5, dtype=D)
    torch.testing.assert_close(torch.vmap(jvp_fn)(T), T * (x.cos() * x + x.sin()))
    torch.testing.assert_close(torch.vmap(vjp_fn)(T)[0], T * (x.cos() * x + x.sin()))
    with pytest.raises(ValueError, match=r"vmap\(jvp_fn, in_dims=5"):
        torch.vmap(jvp_fn, in_dims=5)(T)  # vmap's own messages name the map


def test_pickle_and_deepcopy_refuse_with_a_message_copy_shares():
    import copy
    import pickle

    x = torch.randn(5, dtype=torch.float64)
    _, jvp_fn = tl.linearize(lambda x: torch.sin(x) * x, x)
    for dump in (pickle.dumps, copy.deepcopy):
        with pytest.raises(TypeError, match="cannot be pickled or deep-copied"):
            dump(jvp_fn)
    alias = copy.copy(jvp_fn)
    t = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(alias(t), jvp_fn(t))
    torch.testing.assert_close(alias.transpose()(t), jvp_fn.transpose()(t))


def _stencil(u):
    lap = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1]
    return lap - u[1:-1, 1:-1] ** 3


_GC_CASES = {
    "stencil": _stencil,
    "custom Function": lambda x: cf.NumpyCube.apply(x.sin()).cos(),
    "fold checked by a probe": lambda x: (x.sin() * x).exp()[1:] * 2,
}


@pytest.mark.parametrize("case", list(_GC_CASES))
def test_maps_free_their_tensors_without_the_cyclic_garbage_collector(case):
    # A Newton loop holds each linearization (and its transpose) for a whole solve; by
    # then it sits in the oldest GC generation, so a tensor kept by a reference cycle
    # stays until a full collection. Every tensor must go when the last map goes:
    # residuals, ctx tensors, intermediates of applications, transposes, batches.
    x = torch.randn(8, 8, dtype=torch.float64)
    f = _GC_CASES[case]
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(3):  # first sighting, recorded structure, replayed structure
            # (tensors that exist already are not this iteration's: torch.compile'd code
            # of earlier tests, say, may let go of a cycle of fake tensors meanwhile)
            gc.collect()
            old = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
            y, jvp_fn = tl.linearize(f, x)
            vjp_fn = jvp_fn.transpose()
            vjp_fn(y)
            jvp_fn(x)
            jvp_fn.batched(torch.randn(3, 8, 8, dtype=torch.float64))
            torch.vmap(jvp_fn)(torch.randn(3, 8, 8, dtype=torch.float64))
            jvp_fn.jacobian(chunk_size=20)
            assert vjp_fn.transpose() is jvp_fn
            del y, jvp_fn, vjp_fn
            tensors = [weakref.ref(o) for o in gc.get_objects()
                       if isinstance(o, torch.Tensor) and id(o) not in old]
            gc.collect()
            freed = [r for r in tensors if r() is None]
            assert not freed, f"{len(freed)} tensor(s) were only freed by the cyclic collector"
    finally:
        if was_enabled:
            gc.enable()


def test_a_transpose_outliving_its_map_rebuilds_it_without_transposing_again(monkeypatch):
    import torch_linearize._transpose as T

    x = torch.randn(5, dtype=torch.float64)
    f = lambda x: (x.sin() * x).cumsum(0)
    _, jvp_fn = tl.linearize(f, x)
    calls = []
    real = T.transpose_map
    monkeypatch.setattr(T, "transpose_map", lambda lm: calls.append(1) or real(lm))
    u, t = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    want_vjp, want_jvp = torch.func.vjp(f, x)[1](u), torch.func.jvp(f, (x,), (t,))[1]
    for _ in range(3):
        torch.testing.assert_close(jvp_fn.T(u), want_vjp)  # (a map holds its transpose)
    assert len(calls) == 1
    vjp_fn = jvp_fn.T
    assert vjp_fn.transpose() is jvp_fn
    ref = weakref.ref(jvp_fn)
    del jvp_fn
    assert ref() is None  # (a transpose refers to its map weakly ...)
    jvp_fn = vjp_fn.T  # (... and rebuilds it from its state)
    torch.testing.assert_close(jvp_fn(t), want_jvp)
    assert jvp_fn.T is vjp_fn and vjp_fn.T is jvp_fn and len(calls) == 1
    # a released transpose: its map builds a new one
    vjp_fn.release()
    with pytest.raises(tl.ReleasedError):
        vjp_fn(u)
    vjp_fn = jvp_fn.T
    torch.testing.assert_close(vjp_fn(u), want_vjp)
    assert len(calls) == 2
    # a released map: its transpose cannot rebuild it
    jvp_fn.release()
    del jvp_fn
    with pytest.raises(tl.ReleasedError, match="the map this one transposes was released"):
        vjp_fn.transpose()


def test_a_lazily_conjugated_complex_tangent_is_resolved():
    """A tangent with the conjugate (or negative) bit set: torch.func resolves it; until
    stop 21 the map passed it on and view_as_real refused it."""
    z = torch.randn(3, dtype=torch.complex128)
    f = lambda a: torch.view_as_real(a) * 2
    _, jvp_fn = tl.linearize(f, z)
    for t in (torch.randn(3, dtype=torch.complex128).conj(),
              torch._neg_view(torch.randn(3, dtype=torch.complex128))):
        want = torch.func.jvp(f, (z,), (t,))[1]
        torch.testing.assert_close(jvp_fn(t), want)
        torch.testing.assert_close(torch.vmap(jvp_fn)(t[None])[0], want)
        torch.testing.assert_close(jvp_fn.batched(t[None])[0], want)


def test_errors_name_the_method_not_a_call_of_the_map():
    # A method's errors name it as the caller wrote it (jvp_fn.batched(), vjp_fn.transpose()),
    # not as a call of the map (jvp_fn(*tangents).batched()).
    x = torch.randn(3, dtype=torch.float64)
    _, jvp_fn = tl.linearize(lambda x, n: x * n, x, torch.tensor(2))
    vjp_fn = jvp_fn.transpose()  # (its result has a None leaf: the integer primal's)
    with pytest.raises(ValueError, match=r"^vjp_fn\.batched\(\): out_dims \(0, 1, 2\)"):
        vjp_fn.batched(torch.randn(2, 3, dtype=torch.float64), out_dims=(0, 1, 2))
    jvp_fn.release()
    for use, name in [(lambda: jvp_fn.batched(torch.randn(2, 3)), r"jvp_fn\.batched\(\)"),
                      (lambda: jvp_fn.transpose(), r"jvp_fn\.transpose\(\)"),
                      (lambda: jvp_fn.jacobian(), r"jvp_fn\.jacobian\(\)"),
                      (lambda: jvp_fn(x, None), r"jvp_fn\(\*tangents\)")]:
        with pytest.raises(tl.ReleasedError, match=f"^{name}: this linear map was released"):
            use()
    vjp_fn.release()
    with pytest.raises(tl.ReleasedError, match=r"^vjp_fn\.jacobian\(\): this linear map"):
        vjp_fn.jacobian()
