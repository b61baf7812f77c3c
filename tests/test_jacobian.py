"""Tests for ``torch_linearize/_jacobian.py``: ``jvp_fn.jacobian()`` vs ``torch.func.jacfwd``."""

import pytest
import torch

import custom_functions as cf
import torch_linearize as tl

D = torch.float64


def test_single_input_single_output():
    x = torch.randn(3, 4, dtype=D)
    f = lambda x: torch.tanh(x @ x.T).cumsum(0)
    _, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(jvp_fn.jacobian(), torch.func.jacfwd(f)(x))


def test_multiple_inputs_and_pytree_output_layout():
    x, w = torch.randn(3, 2, dtype=D), torch.randn(2, dtype=D)
    f = lambda x, w: {"a": (x @ w).sin(), "b": x.sum() * w}
    _, jvp_fn = tl.linearize(f, x, w)
    got = jvp_fn.jacobian()
    want = torch.func.jacfwd(f, argnums=(0, 1))(x, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(jvp_fn.jacobian(argnums=1), torch.func.jacfwd(f, argnums=1)(x, w))
    torch.testing.assert_close(jvp_fn.jacobian(argnums=(1,)), torch.func.jacfwd(f, argnums=(1,))(x, w))


def test_dict_input():
    p = {"a": torch.randn(2, dtype=D), "b": torch.randn(3, dtype=D)}
    f = lambda p: p["a"].outer(p["b"]).exp()
    _, jvp_fn = tl.linearize(f, p)
    torch.testing.assert_close(jvp_fn.jacobian(), torch.func.jacfwd(f)(p))


@pytest.mark.parametrize("chunk_size", [1, 2, 5, None])
def test_chunk_size_gives_the_same_jacobian(chunk_size):
    x = torch.randn(7, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: x.softmax(0), x)
    torch.testing.assert_close(jvp_fn.jacobian(chunk_size=chunk_size),
                               torch.func.jacfwd(lambda x: x.softmax(0))(x))


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_chunks_of_a_multi_output_map_with_an_output_without_tangent(chunk_size):
    # Two top-level tensors (the batched() path), argnums selecting one (the other gets
    # zero tangents), an output independent of the inputs (no tangent: zeros).
    x, w = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    f = lambda x, w: ((x.sin() * w).cumsum(0), torch.ones(2, dtype=D), x @ w)
    _, jvp_fn = tl.linearize(f, x, w)
    for argnums in (0, 1, (0, 1)):
        torch.testing.assert_close(jvp_fn.jacobian(argnums=argnums, chunk_size=chunk_size),
                                   torch.func.jacfwd(f, argnums=argnums)(x, w))


def test_elementwise_jacobian_runs_on_the_stacked_basis_without_vmap(monkeypatch):
    x = torch.randn(6, dtype=D)
    f = lambda x: x.exp().sin() * 3
    _, jvp_fn = tl.linearize(f, x)
    want = torch.func.jacfwd(f)(x)

    def no_vmap(*args, **kwargs):
        raise AssertionError("torch.vmap was called")

    monkeypatch.setattr(torch, "vmap", no_vmap)
    monkeypatch.setattr(torch.func, "vmap", no_vmap)
    torch.testing.assert_close(jvp_fn.jacobian(), want)
    torch.testing.assert_close(jvp_fn.jacobian(chunk_size=4), want)


def test_custom_function_jacobian_batched_through_the_loop():
    x = torch.randn(4, dtype=D)
    cf.reset()
    _, jvp_fn = tl.linearize(lambda x: cf.NumpyCube.apply(x).sin(), x)
    torch.testing.assert_close(jvp_fn.jacobian(), torch.diag(3 * x**2 * (x**3).cos()))
    assert cf.CALLS["NumpyCube.forward"] == 1 and cf.CALLS["NumpyCube.jvp"] == 4


def test_jacobian_of_transpose_is_the_transposed_jacobian():
    x = torch.randn(3, dtype=D)
    f = lambda x: torch.stack([x.prod(), x.sum(), (x**2).sum(), x[0]])
    _, jvp_fn = tl.linearize(f, x)
    jac_t = jvp_fn.transpose().jacobian()  # tuple over primals, shape in + out
    torch.testing.assert_close(jac_t[0], torch.func.jacrev(f)(x).T)


def test_bad_arguments():
    _, jvp_fn = tl.linearize(lambda x, y: x * y, torch.randn(2), torch.randn(2))
    with pytest.raises(ValueError, match="argnums 2 is out of range for 2"):
        jvp_fn.jacobian(argnums=2)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        jvp_fn.jacobian(chunk_size=0)
    with pytest.raises(ValueError, match="argnums must be an int or a non-empty tuple"):
        jvp_fn.jacobian(argnums=())


@pytest.mark.parametrize("argnums", [None, 0, 1, (0, 1)])
def test_zero_dimensional_inputs_and_outputs(argnums):
    """0-d input and 0-d output (the forum example's shape): the block reshape was called
    with no sizes at all (a TypeError until stop 21)."""
    a = torch.tensor(0.3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)

    def f(a, b):
        return torch.sin(a) * 2, (a * b).sum(), a * b

    _, jvp_fn = tl.linearize(f, a, b)
    want = torch.func.jacfwd(f, argnums=(0, 1) if argnums is None else argnums)(a, b)
    torch.testing.assert_close(jvp_fn.jacobian(argnums=argnums), want)
    _, single = tl.linearize(torch.sin, a)
    torch.testing.assert_close(single.jacobian(), torch.func.jacfwd(torch.sin)(a))
