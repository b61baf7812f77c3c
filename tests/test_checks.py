"""Tests for ``torch_linearize/_checks.py``: validation of primals and tangents.

Every bad argument must raise ``ValueError`` naming the API, the pytree path of
the offending leaf, what was expected and what was received. Both ways of
calling a linear map are covered: the fast path (a single tensor primal) and
the general path (pytrees, several primals).
"""

import re

import numpy as np
import pytest
import torch

import torch_linearize as tl

D = torch.float64


def _params():
    return {"w": torch.randn(4, dtype=D), "b": torch.randn(2, dtype=D)}


def _f(p, n):
    return p["w"].sum() * p["b"] * n


@pytest.fixture
def dict_map():
    """A map over (dict of float tensors, integer tensor), with its primals."""
    p, n = _params(), torch.tensor([1, 2])
    _, jvp_fn = tl.linearize(_f, p, n)
    return jvp_fn, p, n


@pytest.fixture
def single_map():
    x = torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(torch.sin, x)
    return jvp_fn, x


# ----------------------------------------------------------------------------- valid calls


def test_valid_dict_tangent_matches_func_jvp(dict_map):
    # The baseline every error test below perturbs: this call must work.
    jvp_fn, p, n = dict_map
    t = _params()
    _, want = torch.func.jvp(lambda p: _f(p, n), (p,), (t,))
    torch.testing.assert_close(jvp_fn(t, None), want)


def test_integer_primal_leaf_accepts_none_or_a_tensor_of_its_shape(dict_map):
    jvp_fn, _, _ = dict_map
    t = _params()
    with_none = jvp_fn(t, None)
    # A tensor for a non-differentiable leaf is accepted (after a shape check) and ignored.
    with_tensor = jvp_fn(t, torch.full((2,), 123.0))
    torch.testing.assert_close(with_none, with_tensor)


def test_only_integer_primals_gives_a_zero_map():
    n = torch.tensor([1, 2, 3])
    y, jvp_fn = tl.linearize(lambda n: n * 2.5, n)
    torch.testing.assert_close(y, n * 2.5)
    out = jvp_fn(None)
    torch.testing.assert_close(out, torch.zeros(3, dtype=y.dtype))


# ----------------------------------------------------------------------------- shape / dtype / device


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (torch.randn(3, dtype=D), r"tangents\[0\]\['w'\] has shape \(3,\), but primals\[0\]\['w'\] has shape \(4,\)"),
        (torch.randn(2, 2, dtype=D), r"tangents\[0\]\['w'\] has shape \(2, 2\), but primals\[0\]\['w'\] has shape \(4,\)"),
        (torch.randn(4, dtype=torch.float32),
         r"tangents\[0\]\['w'\] has dtype torch.float32, but primals\[0\]\['w'\] has dtype torch.float64"),
        (torch.randn(4, dtype=torch.complex128),
         r"tangents\[0\]\['w'\] has dtype torch.complex128, but primals\[0\]\['w'\] has dtype torch.float64"),
        (torch.empty(4, dtype=D, device="meta"),
         r"tangents\[0\]\['w'\] is on device meta, but primals\[0\]\['w'\] is on cpu"),
    ],
    ids=["shape", "rank", "dtype", "complex-dtype", "device"],
)
def test_bad_dict_leaf_names_path_expected_and_got(dict_map, bad, pattern):
    jvp_fn, _, _ = dict_map
    t = _params()
    t["w"] = bad
    with pytest.raises(ValueError, match=r"^jvp_fn\(\*tangents\): " + pattern):
        jvp_fn(t, None)


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (torch.randn(4, dtype=D), r"tangents\[0\] has shape \(4,\), but primals\[0\] has shape \(3,\)"),
        # (would broadcast against the program's residuals: must not reach them)
        (torch.randn(1, dtype=D), r"tangents\[0\] has shape \(1,\), but primals\[0\] has shape \(3,\)"),
        (torch.randn(3, dtype=torch.float32),
         r"tangents\[0\] has dtype torch.float32, but primals\[0\] has dtype torch.float64"),
        (torch.empty(3, dtype=D, device="meta"), r"tangents\[0\] is on device meta, but primals\[0\] is on cpu"),
        (None, r"tangents\[0\] is None, but primals\[0\] is a differentiable torch.float64 tensor"),
        (np.zeros(3), r"tangents\[0\] must be a torch.Tensor, got ndarray"),
        (3.0, r"tangents\[0\] must be a torch.Tensor, got float"),
    ],
    ids=["shape", "broadcastable-shape", "dtype", "device", "none", "ndarray", "float"],
)
def test_bad_single_tangent_fast_path(single_map, bad, pattern):
    jvp_fn, _ = single_map
    with pytest.raises(ValueError, match=pattern):
        jvp_fn(bad)


def test_integer_leaf_tangent_shape_is_still_checked(dict_map):
    jvp_fn, _, _ = dict_map
    with pytest.raises(ValueError, match=r"tangents\[1\] has shape \(3,\), but primals\[1\] has shape \(2,\)"):
        jvp_fn(_params(), torch.zeros(3))


def test_integer_leaf_tangent_device_is_checked(dict_map):
    jvp_fn, _, _ = dict_map
    with pytest.raises(ValueError, match=r"tangents\[1\] is on device meta, but primals\[1\] is on cpu"):
        jvp_fn(_params(), torch.zeros(2, device="meta"))


def test_nested_list_path_is_named():
    p = [torch.randn(2, dtype=D), (torch.randn(3, dtype=D), {"k": torch.randn(5, dtype=D)})]
    _, jvp_fn = tl.linearize(lambda p: p[0].sum() + p[1][0].sum() + p[1][1]["k"].sum(), p)
    t = [torch.randn(2, dtype=D), (torch.randn(3, dtype=D), {"k": torch.randn(6, dtype=D)})]
    with pytest.raises(ValueError, match=re.escape("tangents[0][1][1]['k'] has shape (6,), but "
                                                   "primals[0][1][1]['k'] has shape (5,)")):
        jvp_fn(t)


# ----------------------------------------------------------------------------- None and non-tensor leaves


def test_none_tangent_for_float_leaf(dict_map):
    jvp_fn, _, _ = dict_map
    t = _params()
    t["b"] = None
    with pytest.raises(ValueError, match=r"tangents\[0\]\['b'\] is None, but primals\[0\]\['b'\] is a "
                                         r"differentiable torch.float64 tensor.*zeros_like"):
        jvp_fn(t, None)


@pytest.mark.parametrize("leaf, tname", [(1.0, "float"), (np.ones(4), "ndarray"), ([1.0] * 4, None)])
def test_non_tensor_tangent_leaf(dict_map, leaf, tname):
    jvp_fn, _, _ = dict_map
    t = _params()
    t["w"] = leaf
    if tname is None:
        # A list is a pytree node, so it changes the structure instead.
        with pytest.raises(ValueError, match="same pytree structure"):
            jvp_fn(t, None)
    else:
        with pytest.raises(ValueError, match=rf"tangents\[0\]\['w'\] must be a torch.Tensor, got {tname}"):
            jvp_fn(t, None)


@pytest.mark.parametrize(
    "primals, pattern",
    [
        ((torch.randn(3), 2.0), r"primals\[1\] is float \(2.0\)"),
        ((torch.randn(3).numpy(),), r"primals\[0\] is ndarray"),
        (({"a": torch.randn(3), "name": "hi"},), r"primals\[0\]\['name'\] is str \('hi'\)"),
        ((torch.randn(3), None), r"primals\[1\] is NoneType"),
    ],
    ids=["float", "ndarray", "str-in-dict", "none"],
)
def test_non_tensor_primal_leaf(primals, pattern):
    with pytest.raises(ValueError, match=r"^linearize\(f, \*primals\): every leaf of primals must be a "
                                         r"torch.Tensor, but " + pattern + r".*closing over"):
        tl.linearize(lambda *a: a[0], *primals)


def test_no_primals():
    with pytest.raises(ValueError, match=r"expected at least one tensor in primals, got \(\)"):
        tl.linearize(lambda: torch.ones(2))


def test_sparse_primal_is_rejected_naming_layout():
    with pytest.raises(ValueError, match=r"primals\[0\] has layout torch.sparse_coo; only strided"):
        tl.linearize(lambda a: a, torch.eye(3).to_sparse())


def test_f_not_callable():
    with pytest.raises(TypeError, match="f must be callable, got int"):
        tl.linearize(3, torch.randn(2))


def test_non_tensor_output_is_named():
    with pytest.raises(ValueError, match=r"output\[1\]\['n'\] is int.*has_aux=True"):
        tl.linearize(lambda x: (x, {"n": 3}), torch.randn(2))


# ----------------------------------------------------------------------------- pytree structure


def test_wrong_number_of_tangents(single_map):
    jvp_fn, x = single_map
    with pytest.raises(ValueError, match=r"same pytree structure as primals; unexpected tangents\[1\]"):
        jvp_fn(x, x)
    with pytest.raises(ValueError, match=r"same pytree structure as primals; missing tangents\[0\]"):
        jvp_fn()


@pytest.mark.parametrize(
    "tangents",
    [
        lambda: ({"w": torch.randn(4, dtype=D)}, None),  # missing key
        lambda: ({**_params(), "c": torch.randn(1, dtype=D)}, None),  # extra key
        lambda: ([torch.randn(4, dtype=D), torch.randn(2, dtype=D)], None),  # list for dict
        lambda: (_params(),),  # missing positional argument
    ],
    ids=["missing-key", "extra-key", "list-for-dict", "missing-arg"],
)
def test_structure_mismatch_says_expected_and_got(dict_map, tangents):
    jvp_fn, _, _ = dict_map
    with pytest.raises(ValueError, match=r"same pytree structure as primals; (missing|unexpected) tangents"):
        jvp_fn(*tangents())


def test_structure_mismatch_names_the_path_where_it_differs():
    x = torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(lambda x, p: x.sum() * p["w"].sum() + p["b"], x, _params())
    with pytest.raises(ValueError) as info:
        jvp_fn(torch.randn(3, dtype=D), {"w": torch.randn(4, dtype=D)})
    msg = str(info.value)
    assert "tangents[1]" in msg and "'b'" in msg, msg


@pytest.mark.parametrize("f", [lambda a: a.sin() * 2, lambda a: a.sum(0), torch.tanh,
                               lambda a: a], ids=["scaled", "sum", "tanh", "identity"])
def test_sparse_tangents_and_cotangents_are_rejected_naming_layout(f):
    """Until stop 22 a sparse tangent passed the checks: some maps returned a sparse
    result, others failed inside PyTorch (copy_ between dense and sparse, no sparse
    tanh_backward) with nothing naming the tangent."""
    x = torch.randn(4, 5, dtype=torch.float64)
    y, jvp_fn = tl.linearize(f, x)
    sparse = torch.randn(4, 5, dtype=torch.float64).to_sparse()
    with pytest.raises(ValueError, match=r"tangents\[0\] has layout torch.sparse_coo.*strided"):
        jvp_fn(sparse)
    with pytest.raises(ValueError, match=r"has layout torch.sparse_coo.*strided"):
        jvp_fn.T(torch.randn_like(y).to_sparse())
    with pytest.raises(ValueError, match=r"has layout torch.sparse_coo.*strided"):
        jvp_fn.batched(torch.stack([sparse.to_dense()] * 2).to_sparse())


def test_a_bare_tensor_for_a_one_leaf_dict_primal_is_refused():
    """Until stop 22 a primal argument that is a container of one tensor counted as a
    top-level tensor on the fast path: jvp_fn(W_t, x_t) was accepted for primals
    ({"weight": W}, x) (torch.func.jvp refuses it)."""
    W, x = torch.randn(2, 2, dtype=D), torch.randn(2, dtype=D)
    _, jvp_fn = tl.linearize(lambda p, x: p["weight"] @ x, {"weight": W}, x)
    with pytest.raises(ValueError, match=r"missing tangents\[0\]\['weight'\]"):
        jvp_fn(torch.ones(2, 2, dtype=D), torch.ones(2, dtype=D))
    t = ({"weight": torch.randn(2, 2, dtype=D)}, torch.randn(2, dtype=D))
    torch.testing.assert_close(jvp_fn(*t), t[0]["weight"] @ x + W @ t[1])


def test_linearize_inside_a_dual_level_raises_a_linearize_error():
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(tl.LinearizeError, match="dual_level"):
        tl.linearize(torch.sin, torch.randn(3, dtype=D))
