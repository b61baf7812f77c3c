"""Conformance: PyTorch's OpInfo database through ``linearize`` vs ``torch.func.jvp``.

Every OpInfo with ``supports_forward_ad`` is a check (see ``opinfo_harness.py``).
By default each op runs its first 8 float64 samples and first 3 float32 and
complex128 samples (about a minute); ``pytest --opinfo-full`` runs every sample
in all three dtypes. Known failures are listed, with reasons, in
``opinfo_harness.XFAIL``: each failing sample of such an op must match the
recorded signature, and every other sample must pass.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import opinfo_harness as h
import torch_linearize as tl

OPS = h.forward_ad_ops()


def _params():
    return [pytest.param(op, id=h.op_full_name(op)) for op in OPS]


@pytest.mark.parametrize("op", _params())
def test_opinfo_jvp(op, request):
    full = request.config.getoption("--opinfo-full")
    plan = [(torch.float64, None if full else 8), (torch.float32, None if full else 3),
            (torch.complex128, None if full else 3)]
    name = h.op_full_name(op)
    failures, checked = h.check_op(op, plan, ("jvp", "vmap", "transpose", "each"))
    if checked == 0:
        pytest.skip(f"{name}: no sample the reference can run on CPU")
    assert not failures, "\n".join(failures[:3])


def test_xfail_entries_name_real_ops():
    names = {h.op_full_name(op) for op in OPS}
    for (name, _dtype), (reason, signature) in h.XFAIL.items():
        assert name in names, name
        assert reason and signature


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_upstream_conj_views_inside_dispatch_mode_handlers():
    """Documents the PyTorch behaviour that linearize's tracer works around.

    ``__torch_dispatch__`` runs with the Conjugate/Negative dispatch keys excluded, so
    kernels that build conjugate views internally (complex ``linalg_pinv``) compute
    garbage under any dispatch mode, even a pass-through one. If this test fails,
    PyTorch changed that and ``_trace._needs_conj_keys`` can go.
    """
    torch.manual_seed(0)
    a = torch.randn(3, 3, dtype=torch.complex128)
    atol = torch.tensor(0.0, dtype=torch.float64)
    rtol = torch.tensor(1e-15, dtype=torch.float64)
    plain = torch.ops.aten.linalg_pinv.atol_rtol_tensor(a, atol=atol, rtol=rtol)
    with _PassThrough():
        moded = torch.ops.aten.linalg_pinv.atol_rtol_tensor(a, atol=atol, rtol=rtol)
    eye = torch.eye(3, dtype=a.dtype)
    assert torch.allclose(a @ plain, eye)
    assert not torch.allclose(a @ moded, eye), "upstream behaviour changed"


@pytest.mark.parametrize("fn", [torch.linalg.pinv, lambda a: torch.linalg.lstsq(a, a.sin()).solution])
def test_complex_pinv_and_lstsq_are_right_despite_it(fn):
    torch.manual_seed(0)
    a = torch.randn(4, 3, dtype=torch.complex128)
    y, jvp_fn = tl.linearize(fn, a)
    torch.testing.assert_close(y, fn(a))
    t = torch.randn_like(a)
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(fn, (a,), (t,))[1])
    u = torch.randn_like(y)
    torch.testing.assert_close(jvp_fn.T(u)[0], torch.func.vjp(fn, a)[1](u)[0])


def test_upstream_vmap_roll_of_scalars():
    """Documents the PyTorch vmap bug behind the roll XFAIL entries (drop them when it fails)."""
    got = torch.vmap(lambda t: torch.roll(t, 10))(torch.arange(3.0))
    assert not torch.equal(got, torch.arange(3.0)), "upstream bug fixed: drop the roll XFAIL entries"
