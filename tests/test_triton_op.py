"""Triton kernels (forward + tangent) as custom ops with ``register_jvp``, on a CUDA GPU.

The kernels and ops live in ``examples/triton_kernels.py`` (shared with
``benchmarks/gpu.py``). Skipped unless Triton is importable and either a CUDA GPU
is available or ``TRITON_INTERPRET=1`` is set (Triton's interpreter then runs the
same kernels on CPU tensors, slowly). References are plain PyTorch in float64.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import torch_linearize as tl

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False; set TRITON_INTERPRET=1 "
                "to run the Triton kernels on CPU instead)", allow_module_level=True)
try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"Triton is not importable ({e})", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
import triton_kernels as tk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = torch.float64
F = torch.float32


@pytest.fixture(autouse=True)
def _reset_launches():
    tk.LAUNCHES.clear()
    yield


def _data(n=5000, dtype=F, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(n, generator=gen, dtype=D)
    x[:4] = torch.tensor([-100.0, -25.0, 25.0, 100.0], dtype=D)  # saturated tails
    t = torch.randn(n, generator=gen, dtype=D)
    return x.to(DEVICE, dtype), t.to(DEVICE, dtype)


def _ref_jvp(f_ref, x, t):
    """float64 PyTorch reference: (f(x), J t)."""
    return torch.func.jvp(f_ref, (x.double(),), (t.double(),))


@pytest.mark.parametrize("dtype, tol", [(F, 2e-6), (D, 1e-12)])
def test_kernels_match_float64_reference(dtype, tol):
    x, t = _data(dtype=dtype)
    x64 = x.double()
    torch.testing.assert_close(tk.mish(x).double(), tk.mish_reference(x64), rtol=tol, atol=tol)
    T = torch.stack([t, 2 * t, -t])
    want = tk.mish_derivative_reference(x64) * T.double()
    torch.testing.assert_close(tk.mish_tangent(x, T).double(), want, rtol=tol, atol=tol)
    # the closed-form derivative agrees with PyTorch's autograd of the reference
    _, jt = _ref_jvp(tk.mish_reference, x, t)
    torch.testing.assert_close(tk.mish_derivative_reference(x64) * t.double(), jt)


def test_linearize_runs_forward_kernel_once_tangent_kernel_per_tangent():
    x, _ = _data()
    w = torch.linspace(0.5, 1.5, x.numel(), device=DEVICE)

    def f(x):
        return tk.mish(tk.mish(x) * w)

    def ref(x):
        return tk.mish_reference(tk.mish_reference(x) * w.double())

    y, jvp_fn = tl.linearize(f, x)
    assert dict(tk.LAUNCHES) == {"mish_fwd": 2}
    torch.testing.assert_close(y.double(), ref(x.double()), rtol=1e-5, atol=1e-5)
    for k in range(1, 4):
        _, t = _data(seed=k)
        _, want = _ref_jvp(ref, x, t)
        torch.testing.assert_close(jvp_fn(t).double(), want, rtol=1e-5, atol=1e-5)
        assert {"mish_fwd": 2, "mish_tangent": 2 * k} == tk.LAUNCHES


def test_raw_triton_launch_in_rule_linearize_yes_torch_func_jvp_no():
    x, t = _data()
    _, want = _ref_jvp(tk.mish_reference, x, t)
    with pytest.raises(Exception) as info:
        torch.func.jvp(tk.mish_raw, (x,), (t,))
    assert not isinstance(info.value, AssertionError)
    assert "mish_tangent" not in tk.LAUNCHES  # the forward ran, the tangent launch did not
    fwAD_t = _eager_tangent(tk.mish_raw, x, t)  # eager forward AD: plain tensors, works
    torch.testing.assert_close(fwAD_t.double(), want, rtol=1e-5, atol=1e-5)
    _, jvp_fn = tl.linearize(tk.mish_raw, x)
    torch.testing.assert_close(jvp_fn(t).double(), want, rtol=1e-5, atol=1e-5)
    # the wrapped tangent kernel works under torch.func.jvp too
    _, ft = torch.func.jvp(tk.mish, (x,), (t,))
    torch.testing.assert_close(ft.double(), want, rtol=1e-5, atol=1e-5)


def _eager_tangent(f, x, t):
    with fwAD.dual_level():
        return fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent.clone()


def test_vmap_of_linear_map_is_one_tangent_launch():
    x, _ = _data(n=3000)
    T = torch.randn(16, x.numel(), device=DEVICE)
    want = tk.mish_derivative_reference(x.double()) * T.double()
    _, jvp_fn = tl.linearize(tk.mish, x)
    tk.LAUNCHES.clear()
    torch.testing.assert_close(torch.vmap(jvp_fn)(T).double(), want, rtol=1e-5, atol=1e-5)
    assert dict(tk.LAUNCHES) == {"mish_tangent": 1}
    _, raw_fn = tl.linearize(tk.mish_raw, x)  # raw launch in the rule: per-tangent loop
    tk.LAUNCHES.clear()
    torch.testing.assert_close(torch.vmap(raw_fn)(T).double(), want, rtol=1e-5, atol=1e-5)
    assert dict(tk.LAUNCHES) == {"mish_tangent": 16}


def test_transpose_and_reverse_mode():
    x, _ = _data(n=2000)
    u = torch.randn(2000, device=DEVICE)
    _, jvp_fn = tl.linearize(lambda x: tk.mish(x) * 2, x)
    (g,) = jvp_fn.transpose()(u)
    want = 2 * tk.mish_derivative_reference(x.double()) * u.double()
    torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-5)
    xr = x.clone().requires_grad_()
    (g2,) = torch.autograd.grad(tk.mish(xr), xr, u)
    torch.testing.assert_close(g2.double(), want / 2, rtol=1e-5, atol=1e-5)
