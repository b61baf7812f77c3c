"""``LinearMap.batched`` and ``_batch.batched_program``: batched application without
torch.vmap for programs whose operations broadcast a leading batch dimension."""

from __future__ import annotations

import pytest
import torch

import custom_functions as cf
import torch_linearize as tl
from torch_linearize._batch import _BROADCASTING, batched_program, broadcasts_batch
from torch_linearize._program import Eqn, Program, Res, Var, compile_program

aten = torch.ops.aten
D = torch.float64
K = 5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _direct(jvp_fn) -> bool:
    """Whether ``jvp_fn.batched`` takes the direct path (its program broadcasts a batch)."""
    return bool(jvp_fn._batched_run)


def _count_direct(jvp_fn) -> list:
    """A list that grows by one at each call ``jvp_fn.batched`` serves directly."""
    calls: list = []
    jvp_fn.batched(*(torch.zeros(2, *s, dtype=d) for s, d, _ in jvp_fn._metas))  # (builds it)
    run_b = jvp_fn._batched_run
    assert run_b

    def counted(*args):
        calls.append(1)
        return run_b(*args)

    jvp_fn._batched_run = counted
    return calls


def _loop(jvp_fn, *stacked):
    """The reference: one application per batch element, stacked."""
    per = [jvp_fn(*(s[k] for s in stacked)) for k in range(stacked[0].shape[0])]
    if isinstance(per[0], torch.Tensor):
        return torch.stack(per)
    return type(per[0])(torch.stack([p[j] for p in per]) for j in range(len(per[0])))


# ---------------------------------------------------------------- one operation at a time
def _one_op_program(op, t_shape, res_shapes, args_of, kwargs=None, out_dtype=D, dtype=D):
    """A one-equation program ``out = op(*args_of(v, residual refs), **kwargs)``."""
    g = _gen(1)
    residuals = []
    for shape, rdtype in res_shapes:
        if rdtype is torch.bool:
            residuals.append(torch.rand(shape, generator=g) > 0.5)
        else:
            residuals.append(torch.randn(shape, dtype=rdtype, generator=g))
    v = Var(t_shape, dtype)
    probe_args = args_of(torch.ones(t_shape, dtype=dtype), residuals)
    out_shape = op(*probe_args, **(kwargs or {})).shape
    out = Var(out_shape, out_dtype)
    eqn = Eqn(op, tuple(args_of(v, [Res(i) for i in range(len(residuals))])), kwargs or {}, out)
    return Program(inputs=[v], eqns=[eqn], outputs=[out], residuals=residuals)


def _bin(v, r):
    return (v, r[0])


# (operator, tangent shape, residual (shape, dtype)s, argument builder, kwargs, dtype)
_OP_CASES = [
    (aten.mul.Tensor, (3, 4), [((3, 4), D)], _bin, None, D),
    (aten.mul.Tensor, (3, 4), [((4,), D)], _bin, None, D),          # lower-rank residual
    (aten.mul.Tensor, (1, 4), [((3, 4), D)], _bin, None, D),        # tangent broadcast up
    (aten.mul.Tensor, (3, 4), [((), D)], _bin, None, D),            # 0-d residual
    (aten.mul.Tensor, (), [((), D)], _bin, None, D),                # 0-d tangent
    (aten.mul.Scalar, (3, 4), [], lambda v, r: (v, 2.5), None, D),
    (aten.div.Tensor, (3, 4), [((3, 1), D)], _bin, None, D),
    (aten.div.Scalar, (3, 4), [], lambda v, r: (v, -4.0), None, D),
    (aten.neg.default, (3, 4), [], lambda v, r: (v,), None, D),
    (aten.add.Tensor, (3, 4), [], lambda v, r: (v, v), {"alpha": 2}, D),
    (aten.sub.Tensor, (3, 4), [], lambda v, r: (v, v), {"alpha": 0.5}, D),
    (aten.addcmul.default, (3, 4), [((4,), D), ((3, 4), D)],
     lambda v, r: (v, r[0], v), {"value": 0.5}, D),
    (aten.addcdiv.default, (3, 4), [((3, 4), D)], lambda v, r: (v, v, r[0]), {"value": 2.0}, D),
    (aten.clone.default, (3, 4), [], lambda v, r: (v,), None, D),
    (aten.alias.default, (3, 4), [], lambda v, r: (v,), None, D),
    (aten._conj.default, (3, 4), [], lambda v, r: (v,), None, torch.complex128),
    (aten.conj_physical.default, (3, 4), [], lambda v, r: (v,), None, torch.complex128),
    (aten._to_copy.default, (3, 4), [], lambda v, r: (v,), {"dtype": torch.float32}, D),
    (aten.where.self, (3, 4), [((3, 4), torch.bool), ((), D)],
     lambda v, r: (r[0], v, r[1]), None, D),
    (aten.tanh_backward.default, (3, 4), [((3, 4), D)], _bin, None, D),
    (aten.sigmoid_backward.default, (3, 4), [((4,), D)], _bin, None, D),
    (aten.threshold_backward.default, (3, 4), [((3, 4), D)], lambda v, r: (v, r[0], 0.0), None, D),
]


def test_every_broadcasting_operator_is_covered():
    assert {c[0] for c in _OP_CASES} == set(_BROADCASTING)


@pytest.mark.parametrize("case", _OP_CASES, ids=lambda c: str(c[0]))
def test_each_operator_batched_equals_a_loop_over_the_program(case):
    op, t_shape, res_shapes, args_of, kwargs, dtype = case
    out_dtype = (kwargs or {}).get("dtype", dtype)
    prog = _one_op_program(op, t_shape, res_shapes, args_of, kwargs, out_dtype, dtype)
    run_b = batched_program(prog)
    assert run_b is not None
    T = torch.randn((K, *t_shape), dtype=dtype, generator=_gen(2))
    (got,) = run_b(K, T)
    run = compile_program(prog)
    want = torch.stack([run(T[k])[0] for k in range(K)])
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("t_shape,r_shape", [((4,), (3, 4)), ((3, 1, 4), (2, 1, 1, 4))])
def test_a_residual_of_higher_rank_than_the_tangent_is_not_batched_directly(t_shape, r_shape):
    # (T (K, 4) * r (3, 4) would broadcast K against 3): torch.vmap's batching rule instead
    prog = _one_op_program(aten.mul.Tensor, t_shape, [(r_shape, D)], _bin)
    assert not broadcasts_batch(prog) and batched_program(prog) is None

    r = torch.randn(r_shape, dtype=D, generator=_gen(3))
    _, jvp_fn = tl.linearize(lambda x: x.sin() * r, torch.randn(t_shape, dtype=D))
    T = torch.randn((K, *t_shape), dtype=D, generator=_gen(4))
    assert not _direct(jvp_fn) or jvp_fn.batched(T) is not None
    torch.testing.assert_close(jvp_fn.batched(T), _loop(jvp_fn, T))
    assert not _direct(jvp_fn)


def test_operations_with_dimension_arguments_or_in_place_writes_are_not_batched_directly():
    v, out = Var((3, 4), D), Var((3,), D)
    prog = Program(inputs=[v], eqns=[Eqn(aten.sum.dim_IntList, (v, [1]), {}, out)],
                   outputs=[out], residuals=[])
    assert batched_program(prog) is None
    w = Var((3, 4), D)
    prog = Program(inputs=[v], eqns=[Eqn(aten.mul_.Tensor, (v, 2.0), {}, w, mutates=(v,))],
                   outputs=[w], residuals=[], mutated_inputs={0})
    assert batched_program(prog) is None


# ---------------------------------------------------------------- through linearize
def _elementwise(x, y):
    return (x.sin() * y.exp() + x.tanh() / 3, (x * y).sigmoid())


def _stencil(x, y):
    return x[1:] - x[:-1] + y.sum(0)


@pytest.mark.parametrize("f,direct", [(_elementwise, True), (_stencil, False)],
                         ids=["elementwise", "stencil"])
def test_batched_equals_vmap_and_forward_ad(f, direct):
    g = _gen(5)
    x, y = torch.randn(6, 3, dtype=D, generator=g), torch.randn(6, 3, dtype=D, generator=g)
    _, jvp_fn = tl.linearize(f, x, y)
    TX, TY = torch.randn(K, 6, 3, dtype=D, generator=g), torch.randn(K, 6, 3, dtype=D, generator=g)
    calls = _count_direct(jvp_fn) if direct else []
    got = jvp_fn.batched(TX, TY)
    assert _direct(jvp_fn) is direct and len(calls) == direct
    torch.testing.assert_close(got, torch.vmap(jvp_fn)(TX, TY), rtol=0, atol=0)
    for k in range(K):
        _, want = torch.func.jvp(f, (x, y), (TX[k], TY[k]))
        torch.testing.assert_close(tuple(o[k] for o in got) if isinstance(got, tuple) else got[k],
                                   want)


def test_in_dims_and_out_dims_move_the_batch_dimension():
    g = _gen(6)
    x = torch.randn(4, 3, dtype=D, generator=g)
    _, jvp_fn = tl.linearize(lambda x: x.exp() * x.cos(), x)
    T = torch.randn(4, K, 3, dtype=D, generator=g)  # batch in dimension 1
    direct = _count_direct(jvp_fn)
    cases = [(1, 0), (1, 2), (-2, -1), (1, -3)]
    for in_dims, out_dims in cases:
        got = jvp_fn.batched(T, in_dims=in_dims, out_dims=out_dims)
        want = torch.vmap(jvp_fn, in_dims=in_dims, out_dims=out_dims)(T)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(direct) == len(cases)


def test_what_the_direct_path_does_not_take_goes_through_vmap():
    g = _gen(7)
    x, y = torch.randn(4, dtype=D, generator=g), torch.randn(4, dtype=D, generator=g)
    _, jvp_fn = tl.linearize(lambda x, y: x.sin() * y, x, y)
    TX, TY = torch.randn(K, 4, dtype=D, generator=g), torch.randn(K, 4, dtype=D, generator=g)
    want = _loop(jvp_fn, TX, TY)
    # one tangent unbatched (in_dims with None)
    torch.testing.assert_close(jvp_fn.batched(TX, TY[0], in_dims=(0, None)),
                               _loop(jvp_fn, TX, TY[:1].expand(K, 4)))
    torch.testing.assert_close(jvp_fn.batched(TX, TY, chunk_size=2), want)  # (direct, chunked)
    # tangents that require grad: reverse mode through the batched map (its transpose)
    TXg = TX.clone().requires_grad_()
    out = jvp_fn.batched(TXg, TY)
    (gx,) = torch.autograd.grad(out.sum(), TXg)
    torch.testing.assert_close(gx, jvp_fn.transpose()(torch.ones(4, dtype=D))[0].expand(K, 4))
    # under a functorch transform: vmap of batched (the inner one goes through torch.vmap)
    TT = torch.stack([TX, 2 * TX])
    got = torch.vmap(lambda t: jvp_fn.batched(t, TY))(TT)
    torch.testing.assert_close(got, torch.stack([want, _loop(jvp_fn, 2 * TX, TY)]))
    # under eager forward AD (dual tangents): the map's own forward derivative is itself
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        d = fwAD.make_dual(TX, TY)
        p, t = fwAD.unpack_dual(jvp_fn.batched(d, TY))
    torch.testing.assert_close(p, want)
    torch.testing.assert_close(t, _loop(jvp_fn, TY, torch.zeros_like(TY)))


def test_wrong_batches_are_refused_as_torch_vmap_refuses_them():
    x = torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(lambda x, y: x.sin() * y, x, x.clone())
    with pytest.raises(ValueError, match="same size"):
        jvp_fn.batched(torch.randn(3, 4, dtype=D), torch.randn(2, 4, dtype=D))
    with pytest.raises(ValueError, match="shape"):
        jvp_fn.batched(torch.randn(3, 5, dtype=D), torch.randn(3, 5, dtype=D))
    with pytest.raises(ValueError, match="dtype"):
        jvp_fn.batched(torch.randn(3, 4), torch.randn(3, 4))


def test_released_and_stale_maps_raise():
    x = torch.randn(4, dtype=D)
    w = torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: x * w, x)  # (w itself is the residual)
    T = torch.randn(K, 4, dtype=D)
    torch.testing.assert_close(jvp_fn.batched(T), T * w)
    w.mul_(2)
    with pytest.raises(tl.StaleResidualError, match="modified in place"):
        jvp_fn.batched(T)
    jvp_fn.release()
    with pytest.raises(tl.ReleasedError, match=r"\.batched\(\)"):
        jvp_fn.batched(T)
    assert jvp_fn._batched_run is None  # (its residuals freed with the map's)


def test_outputs_without_tangent_dependence_and_non_differentiable_outputs():
    x = torch.randn(4, dtype=D)
    c = torch.randn(4, dtype=D)

    def f(x):
        return {"y": x.exp(), "zero": c * 2, "index": x.argmax()}

    _, jvp_fn = tl.linearize(f, x)
    T = torch.randn(K, 4, dtype=D)
    got = jvp_fn.batched(T)
    assert _direct(jvp_fn)
    want = torch.vmap(jvp_fn)(T)
    assert got.keys() == want.keys()
    torch.testing.assert_close(got["y"], want["y"])
    torch.testing.assert_close(got["zero"], torch.zeros(K, 4, dtype=D))
    one = jvp_fn(T[0])["index"]  # (what the map gives a non-differentiable output)
    if one is None:
        assert got["index"] is None and want["index"] is None
    else:
        torch.testing.assert_close(got["index"], want["index"])
        torch.testing.assert_close(got["index"][0], one)


def test_transposed_and_compiled_maps():
    g = _gen(8)
    x = torch.randn(6, dtype=D, generator=g)
    _, jvp_fn = tl.linearize(lambda x: (x.sin() * 2).exp(), x)
    U = torch.randn(K, 6, dtype=D, generator=g)
    vjp_fn = jvp_fn.transpose()
    got = vjp_fn.batched(U)
    assert _direct(vjp_fn)
    torch.testing.assert_close(got, torch.vmap(vjp_fn)(U))
    torch.testing.assert_close(got[0], torch.stack([torch.func.vjp(
        lambda x: (x.sin() * 2).exp(), x)[1](U[k])[0] for k in range(K)]))
    compiled = jvp_fn.compile()
    torch.testing.assert_close(compiled.batched(U), torch.vmap(jvp_fn)(U), rtol=0, atol=0)


# ---------------------------------------------------------------- custom Functions
_CATALOGUE = [
    ("NumpyCube", lambda x: cf.NumpyCube.apply(x), lambda x: cf.NumpyCube.ref(x)),
    ("CtypesScale", lambda x: cf.CtypesScale.apply(x, 1.5), lambda x: cf.CtypesScale.ref(x, 1.5)),
    ("TwoSaves", lambda x: cf.TwoSaves.apply(x), torch.exp),
]


@pytest.mark.parametrize("case", _CATALOGUE, ids=lambda c: c[0])
def test_custom_functions_batch_their_own_call(case):
    # numpy and raw-pointer jvps (no vmap rule: the node loops), a Function saving twice
    _, fn, ref = case
    g = _gen(9)
    x = torch.randn(5, dtype=D, generator=g)
    _, jvp_fn = tl.linearize(lambda x: fn(x.sin()) * 2, x)
    T = torch.randn(K, 5, dtype=D, generator=g)
    calls = _count_direct(jvp_fn)
    got = jvp_fn.batched(T)
    assert len(calls) == 1
    for k in range(K):
        torch.testing.assert_close(got[k], torch.func.jvp(lambda x: ref(x.sin()) * 2,
                                                         (x,), (T[k],))[1])


class _BatchedCube(torch.autograd.Function):
    calls: list = []

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(3 * inputs[0] ** 2)
        ctx.save_for_backward(3 * inputs[0] ** 2)

    @staticmethod
    def _scaled(name, ctx, t):
        """Every derivative here is ``t * 3x^2`` (saved for both phases); logs the call."""
        _BatchedCube.calls.append((name, tuple(t.shape)))
        return t * ctx.saved_tensors[0]

    @staticmethod
    def backward(ctx, g):
        return _BatchedCube._scaled("backward", ctx, g)

    @staticmethod
    def batched_vjp(ctx, g):
        return _BatchedCube._scaled("batched_vjp", ctx, g)

    @staticmethod
    def jvp(ctx, t):
        return _BatchedCube._scaled("jvp", ctx, t)

    @staticmethod
    def batched_jvp(ctx, t):
        return _BatchedCube._scaled("batched_jvp", ctx, t)


def test_a_custom_functions_batched_jvp_runs_once_per_batch():
    x = torch.randn(5, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: _BatchedCube.apply(x).exp(), x)
    T = torch.randn(K, 5, dtype=D)
    direct = _count_direct(jvp_fn)
    _BatchedCube.calls.clear()
    got = jvp_fn.batched(T)
    assert _BatchedCube.calls == [("batched_jvp", (K, 5))] and len(direct) == 1
    torch.testing.assert_close(got, (x ** 3).exp() * 3 * x ** 2 * T)


@pytest.mark.parametrize("chunk_size", [1, 2, 4, K, 100])
def test_chunks_run_directly_one_call_per_chunk(chunk_size):
    x, y = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    f = lambda x, y: (_BatchedCube.apply(x).exp() * y, x.sin())
    _, jvp_fn = tl.linearize(f, x, y)
    TX, TY = torch.randn(K, 5, dtype=D), torch.randn(5, K, dtype=D)
    direct = _count_direct(jvp_fn)
    _BatchedCube.calls.clear()
    got = jvp_fn.batched(TX, TY, in_dims=(0, 1), out_dims=1, chunk_size=chunk_size)
    sizes = [min(chunk_size, K - s) for s in range(0, K, chunk_size)]
    assert len(direct) == len(sizes)
    assert _BatchedCube.calls == [("batched_jvp", (k, 5)) for k in sizes]
    want = torch.vmap(jvp_fn, in_dims=(0, 1), out_dims=1, chunk_size=chunk_size)(TX, TY)
    for g, w in zip(got, want):
        assert g.shape == w.shape == (5, K)
        torch.testing.assert_close(g, w)
    for g, w in zip(got, _loop(jvp_fn, TX, TY.T)):
        torch.testing.assert_close(g, w.T)


@pytest.mark.parametrize("batch", [K, 0])
@pytest.mark.parametrize("program", ["direct", "through torch.vmap"])
@pytest.mark.parametrize("chunk_size", [0, -1, True, 1.5])
def test_bad_chunk_sizes_are_refused_as_torch_vmap_refuses_them(chunk_size, program, batch):
    f = (lambda x: x.sin()) if program == "direct" else (lambda x: x[1:] * x[:-1].cos())
    _, jvp_fn = tl.linearize(f, torch.randn(3, dtype=D))
    T = torch.randn(batch, 3, dtype=D)
    with pytest.raises(Exception) as want:
        torch.vmap(jvp_fn, chunk_size=chunk_size)(T)
    with pytest.raises(type(want.value)):
        jvp_fn.batched(T, chunk_size=chunk_size)


def test_a_custom_functions_batched_vjp_runs_once_per_batch_of_the_transpose():
    x = torch.randn(5, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: _BatchedCube.apply(x.sin()), x)
    vjp_fn = jvp_fn.transpose()
    U = torch.randn(K, 5, dtype=D)
    direct = _count_direct(vjp_fn)
    _BatchedCube.calls.clear()
    (got,) = vjp_fn.batched(U)
    assert _BatchedCube.calls == [("batched_vjp", (K, 5))] and len(direct) == 1
    torch.testing.assert_close(got, U * 3 * x.sin() ** 2 * x.cos())


def test_a_batched_jvp_returning_none_gives_zeros():
    class NoneJvp(_BatchedCube):
        @staticmethod
        def batched_jvp(ctx, t):
            return None

    x = torch.randn(5, dtype=D)
    T = torch.randn(K, 5, dtype=D)
    for f, want in [(lambda x: NoneJvp.apply(x), torch.zeros(K, 5, dtype=D)),
                    (lambda x: NoneJvp.apply(x) + x, T)]:  # (the Function's part is zero)
        _, jvp_fn = tl.linearize(f, x)
        direct = _count_direct(jvp_fn)
        got = jvp_fn.batched(T)
        assert got.shape == (K, 5) and len(direct) == 1
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("wrong", [lambda t: t[:, :2], lambda t: t[:1], lambda t: t.float()],
                         ids=["sample shape", "batch size", "dtype"])
def test_results_of_a_batched_jvp_are_checked(wrong):
    class Wrong(_BatchedCube):
        @staticmethod
        def batched_jvp(ctx, t):
            return wrong(t)

    x = torch.randn(5, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: Wrong.apply(x), x)
    with pytest.raises(tl.LinearizeError, match=r"Wrong\.jvp returned .*expected"):
        jvp_fn.batched(torch.randn(K, 5, dtype=D))


def test_pytree_tangents_go_through_vmap():
    g = _gen(10)
    params = {"w": torch.randn(4, dtype=D, generator=g), "b": torch.randn(4, dtype=D, generator=g)}
    _, jvp_fn = tl.linearize(lambda p: (p["w"].sin() * p["b"]).exp(), params)
    T = {"w": torch.randn(K, 4, dtype=D, generator=g), "b": torch.randn(K, 4, dtype=D, generator=g)}
    got = jvp_fn.batched(T)
    for k in range(K):
        torch.testing.assert_close(got[k], jvp_fn({"w": T["w"][k], "b": T["b"][k]}))
    with pytest.raises(ValueError, match="tangent"):
        jvp_fn.batched({"w": T["w"]})  # (a missing leaf: named by the map's own checks)


# ---------------------------------------------------------------- under torch.vmap
def test_vmap_of_a_custom_function_program_runs_the_batched_program():
    # (torch.vmap(jvp_fn) of such a program: the physical batch through runB, once)
    g = _gen(11)
    x, y = torch.randn(5, dtype=D, generator=g), torch.randn(5, dtype=D, generator=g)

    def f(x, y):
        return _BatchedCube.apply(x) * 2 + _BatchedCube.apply(y.sin())

    _, jvp_fn = tl.linearize(f, x, y)
    TX, TY = torch.randn(K, 5, dtype=D, generator=g), torch.randn(K, 5, dtype=D, generator=g)
    direct = _count_direct(jvp_fn)
    _BatchedCube.calls.clear()
    got = torch.vmap(jvp_fn)(TX, TY)
    assert len(direct) == 1 and _BatchedCube.calls == [("batched_jvp", (K, 5))] * 2
    torch.testing.assert_close(got, _loop(jvp_fn, TX, TY))
    # a tangent the vmap does not batch (expanded), a batch dim not in front
    got = torch.vmap(jvp_fn, in_dims=(1, None))(TX.T, TY[0])
    assert len(direct) == 2
    torch.testing.assert_close(got, _loop(jvp_fn, TX, TY[:1].expand(K, 5)))


def test_vmap_of_a_custom_function_program_under_other_transforms():
    # nested vmaps, grad of vmap, vmap inside forward AD: the general path, same values
    import torch.autograd.forward_ad as fwAD

    g = _gen(12)
    x = torch.randn(5, dtype=D, generator=g)
    _, jvp_fn = tl.linearize(lambda x: _BatchedCube.apply(x.sin()), x)
    T = torch.randn(K, 5, dtype=D, generator=g)
    want = _loop(jvp_fn, T)
    direct = _count_direct(jvp_fn)
    TT = torch.stack([T, 3 * T])
    torch.testing.assert_close(torch.vmap(torch.vmap(jvp_fn))(TT), torch.stack([want, 3 * want]))
    s = torch.tensor(2.0, dtype=D)
    gs = torch.func.grad(lambda s: torch.vmap(jvp_fn)(s * T).sum())(s)
    torch.testing.assert_close(gs, want.sum())
    with fwAD.dual_level():
        p, t = fwAD.unpack_dual(torch.vmap(jvp_fn)(fwAD.make_dual(T, 2 * T)))
    torch.testing.assert_close(p, want)
    torch.testing.assert_close(t, 2 * want)
    assert not direct  # (none of these took the direct path)


# ---------------------------------------------------------------- automatic chunks (CPU)
def _stencil(u):
    lap = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1]
    return lap - u[1:-1, 1:-1] ** 3


@pytest.fixture
def small_chunks(monkeypatch):
    """Automatic chunking at test sizes: batches over 1000 bytes, chunks of 600 bytes."""
    import torch_linearize._batch as B

    monkeypatch.setattr(B, "AUTO_MIN_BATCH_BYTES", 1000)
    monkeypatch.setattr(B, "AUTO_CHUNK_BYTES", 600)


def _record_vmap_chunks(monkeypatch) -> list:
    seen: list = []
    real = torch.vmap

    def recording(fn, *args, chunk_size=None, **kwargs):
        seen.append(chunk_size)
        return real(fn, *args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(torch, "vmap", recording)
    return seen


def test_a_stencil_batch_runs_in_automatic_chunks(small_chunks, monkeypatch):
    u = torch.randn(6, 6, dtype=D)  # 288 bytes a tangent: chunks of 2, over 3 tangents
    _, jvp_fn = tl.linearize(_stencil, u)
    assert not jvp_fn._batched_program()  # (slices: through torch.vmap)
    T = torch.randn(K, 6, 6, dtype=D)
    want = _loop(jvp_fn, T)
    seen = _record_vmap_chunks(monkeypatch)
    torch.testing.assert_close(jvp_fn.batched(T), want)
    torch.testing.assert_close(jvp_fn.batched(T.movedim(0, 2), in_dims=2, out_dims=1),
                               want.movedim(0, 1), msg="moved batch dims")
    torch.testing.assert_close(jvp_fn.batched(T[:3]), want[:3])
    torch.testing.assert_close(jvp_fn.batched(T, chunk_size=K), want)  # one batch
    torch.testing.assert_close(jvp_fn.batched(T, chunk_size=K + 5), want)
    torch.testing.assert_close(jvp_fn.batched(T, chunk_size=K - 1), want)
    # (a chunk as large as the batch is no chunking: torch.vmap's chunked path would
    # still split the tangents and concatenate the results, a copy of every result)
    assert seen == [2, 2, None, None, None, K - 1]


def test_a_multi_operation_direct_program_runs_in_automatic_chunks(small_chunks):
    x, y, z = (torch.randn(12, dtype=D) for _ in range(3))  # 3 x 96 bytes a tangent: 2 a chunk
    _, jvp_fn = tl.linearize(lambda x, y, z: x * y * z, x, y, z)
    direct = _count_direct(jvp_fn)
    TX, TY, TZ = (torch.randn(K, 12, dtype=D) for _ in range(3))
    got = jvp_fn.batched(TX, TY, TZ)
    assert len(direct) == 3  # chunks of 2, 2, 1
    torch.testing.assert_close(got, _loop(jvp_fn, TX, TY, TZ))


@pytest.mark.parametrize("case", ["one operation", "matrix product"])
def test_programs_whose_chunks_do_not_pay_off_run_one_batch(small_chunks, monkeypatch, case):
    x = torch.randn(6, 6, dtype=D)
    f = (lambda x: x.sin()) if case == "one operation" else (lambda x: (x @ x).sin() @ x + x * 3)
    _, jvp_fn = tl.linearize(f, x)
    T = torch.randn(K, 6, 6, dtype=D)
    is_direct = bool(jvp_fn._batched_program())
    assert is_direct == (case == "one operation")
    direct = _count_direct(jvp_fn) if is_direct else []
    seen = _record_vmap_chunks(monkeypatch)
    torch.testing.assert_close(jvp_fn.batched(T), _loop(jvp_fn, T))
    assert seen == ([] if is_direct else [None]) and len(direct) == (1 if is_direct else 0)


def test_chunks_pay_off_only_for_cpu_programs_with_several_arithmetic_operations():
    from torch_linearize._batch import auto_chunk_size, chunks_pay_off

    _, jvp_fn = tl.linearize(_stencil, torch.randn(6, 6, dtype=D))
    prog = jvp_fn._program
    assert chunks_pay_off(prog)
    prog.inputs[0].device = torch.device("cuda")  # (a GPU program: its batches stay whole)
    assert not chunks_pay_off(prog)
    _, jvp_fn = tl.linearize(lambda x: x[1:] + x[:-1], torch.randn(6, dtype=D))
    assert not chunks_pay_off(jvp_fn._program)  # one addition over two views
    assert auto_chunk_size(64, 1 << 20) == 2 and auto_chunk_size(8, 1 << 20) is None
    assert auto_chunk_size(64, 8 << 20) == 1 and auto_chunk_size(1000, 100) is None


def test_batched_out_dims_with_an_output_that_does_not_depend_on_the_tangents():
    # torch.vmap with out_dims != 0 mishandles an unbatched output (a zero tangent): it
    # fails to expand one of shape (3,), and gives one of shape () a garbage shape.
    # batched() batches first and moves the batch dimension itself.
    x, c = torch.randn(4, dtype=D), torch.randn(3, dtype=D)
    w = torch.randn(4, 2, dtype=D)
    f = lambda x: (torch.sin(x) @ w, c * 2)
    _, jvp_fn = tl.linearize(f, x)
    T = torch.randn(5, 4, dtype=D)
    want = ((torch.cos(x) * T) @ w, torch.zeros(5, 3, dtype=D))
    for out_dims in (1, -1):
        got = jvp_fn.batched(T.t(), in_dims=1, out_dims=out_dims)
        torch.testing.assert_close(got[0], want[0].t())
        torch.testing.assert_close(got[1], want[1].t())
    g = lambda x: (torch.sin(x).sum() * 2, c.sum())
    _, jvp_fn = tl.linearize(g, x)
    with pytest.raises(IndexError, match="out of range"):
        jvp_fn.batched(T, out_dims=1)
    torch.testing.assert_close(jvp_fn.batched(T)[0], 2 * (torch.cos(x) * T).sum(1))


def test_vmap_of_a_map_that_writes_its_input_leaves_the_callers_batch_alone():
    """f writes its (transposed) input in place, so the program writes its tangent input:
    under vmap the copy that protects the caller's tangents was .contiguous(), which
    returns an example that is contiguous already as the caller's own batch (until stop
    21 vmap(jvp_fn) and jvp_fn.batched overwrote it, and the next call was wrong)."""
    def f(x):
        x.mul_(2)
        return x.sin()

    x = torch.randn(4, 5, dtype=torch.float64).T
    T = torch.randn(3, 5, 4, dtype=torch.float64)
    T0 = T.clone()
    _, jvp_fn = tl.linearize(f, x.clone())
    want = torch.stack([jvp_fn(t) for t in T])
    for batched in (torch.vmap(jvp_fn), jvp_fn.batched):
        for _ in range(2):
            torch.testing.assert_close(batched(T), want)
            torch.testing.assert_close(T, T0)


@pytest.mark.parametrize("in_dims", [0, 1])
def test_batched_without_a_batch_dimension_says_so(in_dims):
    # the per-example check named jvp_fn(*tangents) and a shape with the batch dim stripped
    x = torch.randn(4, 3, dtype=torch.float64)
    _, jvp_fn = tl.linearize(torch.sin, x)
    with pytest.raises(ValueError, match=r"jvp_fn\.batched\(\.\.\.\): tangents\[0\] has shape "
                                         r"\(4, 3\), but a batch of them needs one more "
                                         r"dimension than primals\[0\]'s \(4, 3\).*\(K, 4, 3\)"):
        jvp_fn.batched(torch.ones(4, 3, dtype=torch.float64), in_dims=in_dims)
    with pytest.raises(ValueError, match=r"vjp_fn\.batched\(\.\.\.\): cotangents\[0\]"):
        jvp_fn.T.batched(torch.ones(4, 3, dtype=torch.float64))
    torch.testing.assert_close(jvp_fn.batched(torch.ones(2, 4, 3, dtype=torch.float64)),
                               x.cos().expand(2, 4, 3))
