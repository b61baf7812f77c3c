"""Tests for ``torch_linearize/_residuals.py``: what a linear map keeps in memory.

* ``residual_bytes`` counts the distinct storages allocated during
  ``linearize`` that the map keeps alive; ``external_bytes`` the pre-existing
  ones (primals, captured parameters). Exact byte counts on small cases.
* Each residual is stored once and never cloned (it shares storage with the
  tensor the trace computed).
* Residuals are freed with the map (``del``) or by ``release()``; custom
  Function ctx tensors too. Tensors the tangent program does not need are not
  kept at all.

Storages are tracked with ``StorageWeakRef`` so the tests see real frees.
"""

import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import torch_linearize as tl

D = torch.float64
ITEM = torch.empty((), dtype=D).element_size()


def nbytes(t):
    return t.numel() * t.element_size()


def residual_slots_used(jvp_fn):
    """How many times each residual slot is read by the program's equations."""
    counts = {}
    for e in jvp_fn._program.eqns:
        for r in e.in_res():
            counts[r.index] = counts.get(r.index, 0) + 1
    return counts


def storage_refs(tensors):
    return [StorageWeakRef(t.untyped_storage()) for t in tensors]


def assert_matches_func_jvp(f, x, jvp_fn, n=2):
    for _ in range(n):
        t = torch.randn(x.shape, dtype=x.dtype)
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1])


# ----------------------------------------------------------------------------- byte counts


def test_exp_keeps_exactly_its_output_without_a_clone():
    x = torch.randn(5, 7, dtype=D)
    y, jvp_fn = tl.linearize(torch.exp, x)
    assert jvp_fn.residual_bytes == x.numel() * ITEM == 280
    assert jvp_fn.external_bytes == 0
    (r,) = jvp_fn._program.residuals
    # No clone: the residual is y's own storage.
    assert r.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    torch.testing.assert_close(r, x.exp())
    assert_matches_func_jvp(torch.exp, x, jvp_fn)


def test_captured_pre_existing_tensor_is_external_and_not_cloned():
    x, w = torch.randn(5, 7, dtype=D), torch.randn(5, 7, dtype=D)
    f = lambda x: x * w
    _, jvp_fn = tl.linearize(f, x)
    assert jvp_fn.residual_bytes == 0
    assert jvp_fn.external_bytes == nbytes(w)
    (r,) = jvp_fn._program.residuals
    assert r.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    assert_matches_func_jvp(f, x, jvp_fn)


def test_primal_residual_is_external():
    x, w = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(lambda x, w: x * w, x, w)
    assert jvp_fn.residual_bytes == 0
    assert jvp_fn.external_bytes == nbytes(x) + nbytes(w)
    ptrs = {r.untyped_storage().data_ptr() for r in jvp_fn._program.residuals}
    assert ptrs == {x.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()}


@pytest.fixture
def no_simplify(monkeypatch):
    """Keep the program as traced (no folding/CSE, none while tracing either), to test
    residual bookkeeping itself."""
    monkeypatch.setattr(tl._api, "simplify", lambda prog: None)
    monkeypatch.setattr(tl._trace, "FOLD_CHAINS", False)


def test_intermediate_used_by_two_tangent_ops_is_stored_once(no_simplify):
    # e = exp(x) is read by exp's tangent (t * e) and by mul's tangent (t * e).
    x = torch.randn(3, 4, dtype=D)
    seen = []

    def f(x):
        e = x.exp()
        seen.append(e)
        return e * x

    _, jvp_fn = tl.linearize(f, x)
    res = jvp_fn._program.residuals
    e_ptr = seen[0].untyped_storage().data_ptr()
    e_slots = [i for i, r in enumerate(res) if r.untyped_storage().data_ptr() == e_ptr]
    assert len(e_slots) == 1
    assert residual_slots_used(jvp_fn)[e_slots[0]] == 2
    assert len(res) == 2  # e and x
    assert jvp_fn.residual_bytes == nbytes(x)  # e, once
    assert jvp_fn.external_bytes == nbytes(x)  # x
    assert_matches_func_jvp(lambda x: x.exp() * x, x, jvp_fn)


def test_primal_used_twice_is_stored_once(no_simplify):
    x = torch.randn(6, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: x * x, x)
    assert len(jvp_fn._program.residuals) == 1
    assert residual_slots_used(jvp_fn) == {0: 2}
    assert jvp_fn.external_bytes == nbytes(x) and jvp_fn.residual_bytes == 0


def test_two_residual_views_of_one_storage_are_counted_once(no_simplify):
    # exp's tangent reads all of e, mul's tangent reads the view e[:3]: one storage.
    x = torch.randn(10, dtype=D)

    def f(x):
        e = x.exp()
        return e[:3] * x[:3]

    _, jvp_fn = tl.linearize(f, x)
    res = jvp_fn._program.residuals
    assert len(res) == 3  # e, e[:3], x[:3]
    assert jvp_fn.residual_bytes == nbytes(x)  # e's storage, once
    assert jvp_fn.external_bytes == nbytes(x)  # x's storage (through the view x[:3])
    assert_matches_func_jvp(f, x, jvp_fn)


def test_views_of_a_primal_count_its_storage_once():
    x = torch.randn(8, dtype=D)
    f = lambda x: x[::2] * x[1::2]
    _, jvp_fn = tl.linearize(f, x)
    assert len(jvp_fn._program.residuals) == 2
    assert jvp_fn.residual_bytes == 0 and jvp_fn.external_bytes == nbytes(x)
    assert_matches_func_jvp(f, x, jvp_fn)


def test_primal_view_keeps_its_whole_storage_alive_and_says_so():
    big = torch.randn(100, dtype=D)
    x = big[10:16]
    f = lambda x: torch.outer(x, x)  # (its tangent reads x itself)
    _, jvp_fn = tl.linearize(f, x)
    assert jvp_fn.external_bytes == nbytes(big)
    assert_matches_func_jvp(f, x, jvp_fn)
    # x * x folds to one coefficient (2x, allocated): big is not kept (since stop 21, when
    # the tangent buffer forward AD lays out over big's storage collapses to a clone)
    _, folded = tl.linearize(lambda x: x * x, x)
    assert folded.external_bytes == 0 and folded.residual_bytes == nbytes(x)


def test_distinct_intermediates_add_up():
    x = torch.randn(6, 5, dtype=D)
    # cos(x) and cos(cumsum(sin(x))): the cumsum between them keeps them apart (a plain
    # pointwise chain would fold into one coefficient)
    f = lambda x: torch.cumsum(x.sin(), 0).sin()
    _, jvp_fn = tl.linearize(f, x)
    assert jvp_fn.residual_bytes == 2 * nbytes(x)
    assert jvp_fn.external_bytes == 0
    assert_matches_func_jvp(f, x, jvp_fn)


def test_module_parameters_only_those_the_tangent_needs():
    # d(Wx + b) = W dx: the weight is kept (external), the bias is not.
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 7).double()
    x = torch.randn(6, 5, dtype=D)
    _, jvp_fn = tl.linearize(lin, x)
    assert jvp_fn.residual_bytes == 0
    assert jvp_fn.external_bytes == nbytes(lin.weight)
    bias_ptr = lin.bias.untyped_storage().data_ptr()
    assert all(r.untyped_storage().data_ptr() != bias_ptr for r in jvp_fn._program.residuals)
    assert_matches_func_jvp(lin, x, jvp_fn)


# ----------------------------------------------------------------------------- not kept


def test_intermediate_of_primal_work_only_is_not_kept():
    # exp(x.detach()) only feeds the primal value s = sum(...); the map needs cos(x) and s.
    x = torch.randn(6, 5, dtype=D)
    seen = []

    def f(x):
        e = x.detach().exp()
        seen.append(e)
        return x.sin() * e.sum()

    _, jvp_fn = tl.linearize(f, x)
    assert jvp_fn.residual_bytes == nbytes(x)  # cos(x) * s, folded into one coefficient
    (ref,) = storage_refs(seen)
    seen.clear()
    gc.collect()
    assert ref.expired()  # e was not kept alive by the map
    assert_matches_func_jvp(lambda x: x.sin() * x.detach().exp().sum(), x, jvp_fn)


def test_discarded_tangent_work_keeps_no_residual():
    # exp(x) is computed with a tangent but dropped: dead-code elimination removes it.
    x = torch.randn(6, 5, dtype=D)
    seen = []

    def f(x):
        seen.append(x.exp())
        return x.sin()

    _, jvp_fn = tl.linearize(f, x)
    assert jvp_fn.residual_bytes == nbytes(x)  # cos(x) only
    assert len(jvp_fn._program.residuals) == 1
    (ref,) = storage_refs([fwd.detach() for fwd in seen])
    seen.clear()
    gc.collect()
    assert ref.expired()


def test_large_constant_intermediate_is_not_kept():
    x = torch.randn(4, dtype=D)
    seen = []

    def f(x):
        big = torch.randn(64, 128, dtype=D).exp()  # independent of x
        seen.append(big)
        return x.sin() * big.mean()

    _, jvp_fn = tl.linearize(f, x)
    assert jvp_fn.residual_bytes == nbytes(x)  # cos(x) * mean, folded
    (ref,) = storage_refs(seen)
    seen.clear()
    gc.collect()
    assert ref.expired()


# ----------------------------------------------------------------------------- freeing


def _residual_refs(jvp_fn):
    refs = storage_refs(jvp_fn._program.residuals)
    assert refs and not any(r.expired() for r in refs)
    return refs


def test_residuals_are_freed_with_the_map(no_simplify):
    x = torch.randn(17, 3, dtype=D)  # a distinctive shape
    _, jvp_fn = tl.linearize(lambda x: x.sin() * x.tanh(), x)
    # cos(x), tanh(x), sin(x): all allocated by linearize, none of them is x or y.
    assert jvp_fn.external_bytes == 0 and jvp_fn.residual_bytes == 3 * nbytes(x)
    refs = _residual_refs(jvp_fn)
    jvp_fn(torch.randn(17, 3, dtype=D))  # applying it creates no lasting reference
    del jvp_fn
    gc.collect()
    assert all(r.expired() for r in refs)


def test_residual_for_exp_lives_while_y_does():
    # The residual *is* y: freeing the map leaves y to the caller, and nothing is copied.
    x = torch.randn(19, 2, dtype=D)
    y, jvp_fn = tl.linearize(torch.exp, x)
    (ref,) = _residual_refs(jvp_fn)
    del jvp_fn
    gc.collect()
    assert not ref.expired()
    del y
    gc.collect()
    assert ref.expired()


def test_release_frees_residuals_and_zeroes_the_counts():
    x = torch.randn(23, 3, dtype=D)
    y, jvp_fn = tl.linearize(lambda x: x.sin().cumprod(0), x)
    del y  # cumprod's tangent reads its output: free the caller's reference too
    assert jvp_fn.residual_bytes > 0
    refs = _residual_refs(jvp_fn)
    jvp_fn.release()
    gc.collect()
    assert all(r.expired() for r in refs)
    assert jvp_fn.residual_bytes == 0 and jvp_fn.external_bytes == 0
    with pytest.raises(tl.ReleasedError):
        jvp_fn(torch.randn(23, 3, dtype=D))


class _SavesForForward(torch.autograd.Function):
    """y = x**3; jvp = 3x^2 t, from a derivative computed in setup_context."""

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_forward(3 * x**2, x)  # one new storage, one pre-existing
        ctx.ones = torch.ones_like(x)  # a ctx attribute: one more new storage

    @staticmethod
    def jvp(ctx, t):
        d, x = ctx.saved_tensors
        assert x.shape == t.shape
        return d * t * ctx.ones


def test_custom_function_ctx_tensors_are_counted_and_freed():
    x = torch.randn(11, 13, dtype=D)
    _, jvp_fn = tl.linearize(_SavesForForward.apply, x)
    assert jvp_fn.residual_bytes == 2 * nbytes(x)  # 3x^2 and ones
    assert jvp_fn.external_bytes == nbytes(x)  # x itself
    ctx = jvp_fn._opaque_nodes[0].ctx
    d, saved_x = ctx.saved_for_forward
    refs = storage_refs([d, ctx.ones])
    assert saved_x.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # not cloned
    del ctx, d, saved_x
    t = torch.randn(11, 13, dtype=D)
    torch.testing.assert_close(jvp_fn(t), 3 * x**2 * t)
    del jvp_fn
    gc.collect()
    assert all(r.expired() for r in refs)


def test_custom_function_ctx_tensors_are_freed_by_release():
    x = torch.randn(11, 13, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: _SavesForForward.apply(x).sin(), x)
    assert jvp_fn.residual_bytes == 3 * nbytes(x)  # 3x^2, ones, cos(x**3)
    ctx = jvp_fn._opaque_nodes[0].ctx
    refs = storage_refs([ctx.saved_for_forward[0], ctx.ones])
    del ctx
    jvp_fn.release()
    gc.collect()
    assert all(r.expired() for r in refs)


# ----------------------------------------------------------------------------- copy-on-write


def test_residual_written_in_place_later_in_f_is_snapshotted():
    x = torch.randn(3, 4, dtype=D)

    def f(x):
        e = x.exp()
        y = e * x
        e.zero_()  # e is a residual of both tangent ops; the program must see the old value
        return y

    y, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(y, x.exp() * x)
    assert_matches_func_jvp(lambda x: x.exp() * x, x, jvp_fn, n=3)


def test_captured_tensor_written_in_place_later_in_f_is_snapshotted():
    x = torch.randn(3, 4, dtype=D)
    w = torch.randn(3, 4, dtype=D)
    w0 = w.clone()

    def f(x):
        y = x * w
        w.mul_(2)
        return y

    _, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(w, 2 * w0)  # f's own write happened
    t = torch.randn(3, 4, dtype=D)
    torch.testing.assert_close(jvp_fn(t), t * w0)


def test_copy_on_write_snapshot_is_counted_as_allocated(no_simplify):
    x = torch.randn(3, 4, dtype=D)

    def f(x):
        e = x.exp()
        y = e * x
        e.zero_()
        return y

    # Repeated so that an allocator reusing a freed storage address cannot make it pass by luck.
    for _ in range(5):
        _, jvp_fn = tl.linearize(f, x)
        assert (jvp_fn.residual_bytes, jvp_fn.external_bytes) == (nbytes(x), nbytes(x))


def test_folded_pointwise_chain_keeps_one_allocated_coefficient():
    # exp(x) * x: the tangent t * (e + e x) folds into one stored coefficient.
    x = torch.randn(7, 5, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: x.exp() * x, x)
    assert jvp_fn.num_ops == 1 and len(jvp_fn._program.residuals) == 1
    assert (jvp_fn.residual_bytes, jvp_fn.external_bytes) == (nbytes(x), 0)
    assert_matches_func_jvp(lambda x: x.exp() * x, x, jvp_fn)
    refs = _residual_refs(jvp_fn)
    del jvp_fn
    gc.collect()
    assert all(r.expired() for r in refs)


def test_a_slot_is_freed_by_releasing_its_last_capture():
    from torch_linearize._residuals import ResidualTable

    table = ResidualTable()
    a, b = torch.randn(5, dtype=D), torch.randn(5, dtype=D)
    i = table.capture(a)
    assert table.capture(a) == i and table.capture(a[:]) == i  # (by identity, by layout)
    j = table.capture(b)
    assert not table.release(i) and not table.release(i)
    assert table.tensors[i] is a  # two of its three captures released: still held
    assert table.release(i)
    assert table.tensors[i].numel() == 0 and table.tensors[j] is b
    # the storage is no longer pinned by the table; a new capture of it is a new slot
    ref = StorageWeakRef(a.untyped_storage())
    k = table.capture(a)
    assert k not in (i, j) and table.tensors[k] is a
    assert table.release(k)
    del a
    gc.collect()
    assert ref.expired()
