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


def test_a_transpose_with_an_integer_primal_batches_and_has_a_jacobian():
    """J.T's result has None for an integer primal's cotangent, which torch.vmap refuses
    as an output: until stop 22 J.T.batched(U) and J.T.jacobian() raised (unless the
    program was elementwise and took the direct batched path)."""
    x, idx = torch.randn(4, 5, dtype=D), torch.tensor([1, 3])
    f = lambda a, i: a[i] * 2 + a[i].sin()  # (a gather: not the elementwise direct path)
    _, jvp_fn = tl.linearize(f, x, idx)
    U = torch.randn(3, 2, 5, dtype=D)
    got = jvp_fn.T.batched(U)
    assert got[1] is None
    _, vjp = torch.func.vjp(lambda a: f(a, idx), x)
    want = torch.stack([vjp(u)[0] for u in U])
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(jvp_fn.T.batched(U.movedim(0, 2), in_dims=2, out_dims=1)[0],
                               want.movedim(0, 1))
    jac = jvp_fn.T.jacobian()
    assert jac[1] is None
    torch.testing.assert_close(jac[0], torch.func.jacrev(f)(x, idx).permute(2, 3, 0, 1))


@pytest.mark.parametrize("f", [torch.imag, torch.abs, torch.conj_physical, torch.sin],
                         ids=["imag", "abs", "conj", "sin"])
def test_a_complex_input_is_refused_not_given_a_real_direction_jacobian(f):
    """Until stop 22 the basis tangents were real: for a complex input the result held
    the derivative along the real direction only (all zeros for z.imag), silently."""
    z = torch.randn(3, dtype=torch.complex128)
    _, jvp_fn = tl.linearize(f, z)
    with pytest.raises(ValueError, match=r"tangents\[0\] is complex.*real-linear"):
        jvp_fn.jacobian()
    # a real input with a complex output is fine: column i is J e_i
    x = torch.randn(3, dtype=D)
    g = lambda x: torch.polar(x.exp(), x)
    cols = [torch.func.jvp(g, (x,), (e,))[1] for e in torch.eye(3, dtype=D)]
    torch.testing.assert_close(tl.linearize(g, x)[1].jacobian(), torch.stack(cols, -1))


def test_a_transpose_with_an_integer_primal_and_an_integer_output():
    """The transpose then has a non-differentiable input (the integer output's cotangent)
    and a None result (the integer primal's cotangent): until stop 22 its jacobian() went
    through torch.vmap, which refused the None, and batched() needed in_dims spelt out
    for the None cotangent."""
    x, n = torch.randn(3, dtype=D), torch.tensor([1, 2, 3])
    f = lambda x, n: ((x * n).sin(), n + 1)
    _, jvp_fn = tl.linearize(f, x, n)
    want = torch.func.jacrev(lambda x: f(x, n)[0])(x)  # d out0 / d x
    (block, none_in), none = jvp_fn.T.jacobian()
    assert none is None and none_in is None  # (no cotangent of n, no tangent for n + 1's)
    torch.testing.assert_close(block, want.T)
    U = torch.randn(4, 3, dtype=D)
    got, none = jvp_fn.T.batched((U, None))
    assert none is None
    torch.testing.assert_close(got, U @ want)


def test_an_integer_primal_has_no_jacobian_block():
    """Integer primals are constants whose tangent is None; until stop 22 jacobian() gave
    them a zero block of the output's dtype (jacfwd refuses them, the transpose gives
    None). Their block is None now; the float primal's is jacfwd's."""
    x, n = torch.randn(3, dtype=D), torch.tensor([0, 2])
    f = lambda x, n: (x[n] * 2).sin()
    _, jvp_fn = tl.linearize(f, x, n)
    jx, jn = jvp_fn.jacobian()
    assert jn is None
    torch.testing.assert_close(jx, torch.func.jacfwd(f)(x, n))
    assert jvp_fn.jacobian(argnums=1) is None
