"""Tests for ``torch_linearize/_linear_map.py``: the ``LinearMap`` object itself."""

import pytest
import torch

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
