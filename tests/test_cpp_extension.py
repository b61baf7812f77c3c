"""A custom Function whose forward and jvp are C++ kernels called through raw data pointers.

The extension is compiled once per module with ``torch.utils.cpp_extension.load_inline``
(gcc, about 20-60 s) into a temporary build directory. Its kernels take ``int64_t``
addresses and cast them to ``double*``, so they can only run on tensors that own
real memory: ``linearize`` must call ``forward`` once and ``jvp`` once per
application with plain tensors, whereas ``torch.func.jvp`` (which hands the
Function functorch wrappers without storage) cannot run it at all.
"""

import collections

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import torch_linearize as tl
from helpers import central_difference, eager_jvp

D = torch.float64

CPP_SOURCE = r"""
#include <cstdint>
#include <vector>

static int64_t n_cube = 0;
static int64_t n_cube_jvp = 0;

// out[i] = in[i]^3
void cube_kernel(int64_t out_ptr, int64_t in_ptr, int64_t n) {
  ++n_cube;
  double* out = reinterpret_cast<double*>(out_ptr);
  const double* in = reinterpret_cast<const double*>(in_ptr);
  for (int64_t i = 0; i < n; ++i) out[i] = in[i] * in[i] * in[i];
}

// out[i] = 3 x[i]^2 t[i]
void cube_jvp_kernel(int64_t out_ptr, int64_t x_ptr, int64_t t_ptr, int64_t n) {
  ++n_cube_jvp;
  double* out = reinterpret_cast<double*>(out_ptr);
  const double* x = reinterpret_cast<const double*>(x_ptr);
  const double* t = reinterpret_cast<const double*>(t_ptr);
  for (int64_t i = 0; i < n; ++i) out[i] = 3.0 * x[i] * x[i] * t[i];
}

std::vector<int64_t> kernel_calls() { return {n_cube, n_cube_jvp}; }
"""


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    from torch.utils.cpp_extension import load_inline

    build = tmp_path_factory.mktemp("torch_linearize_cpp_ext")
    return load_inline(
        name="torch_linearize_test_rawptr",
        cpp_sources=[CPP_SOURCE],
        functions=["cube_kernel", "cube_jvp_kernel", "kernel_calls"],
        build_directory=str(build),
        extra_cflags=["-O2"],
        verbose=False,
    )


CALLS: collections.Counter = collections.Counter()


def _check(t: torch.Tensor) -> torch.Tensor:
    assert t.dtype == D and t.device.type == "cpu", (t.dtype, t.device)
    return t.contiguous()


@pytest.fixture
def CppCube(ext):
    """y = x**3 (C++ kernel); jvp = 3 x**2 t (another C++ kernel, from the saved x)."""
    CALLS.clear()

    class CppCube(torch.autograd.Function):
        @staticmethod
        def forward(x):
            CALLS["forward"] += 1
            x = _check(x)
            out = torch.empty_like(x)
            ext.cube_kernel(out.data_ptr(), x.data_ptr(), x.numel())
            return out

        @staticmethod
        def setup_context(ctx, inputs, output):
            CALLS["setup_context"] += 1
            ctx.save_for_forward(inputs[0])

        @staticmethod
        def jvp(ctx, t):
            CALLS["jvp"] += 1
            (x,) = ctx.saved_tensors
            x, t = _check(x), _check(t)
            out = torch.empty_like(x)
            ext.cube_jvp_kernel(out.data_ptr(), x.data_ptr(), t.data_ptr(), x.numel())
            return out

    return CppCube


def _kernel_calls(ext):
    return tuple(ext.kernel_calls())


def test_kernels_work_on_plain_tensors(ext):
    x, t = torch.randn(7, dtype=D), torch.randn(7, dtype=D)
    out = torch.empty_like(x)
    ext.cube_kernel(out.data_ptr(), x.data_ptr(), x.numel())
    torch.testing.assert_close(out, x**3)
    ext.cube_jvp_kernel(out.data_ptr(), x.data_ptr(), t.data_ptr(), x.numel())
    torch.testing.assert_close(out, 3 * x**2 * t)


def test_linearize_runs_forward_once_and_jvp_per_application(ext, CppCube):
    x = torch.randn(4, 5, dtype=D)
    w = torch.randn(5, dtype=D)

    def f(x):
        return CppCube.apply(x).sin() * w

    def ref(x):  # the same maths in pure PyTorch
        return (x**3).sin() * w

    k0 = _kernel_calls(ext)
    y, jvp_fn = tl.linearize(f, x)
    assert CALLS == {"forward": 1, "setup_context": 1}
    assert _kernel_calls(ext) == (k0[0] + 1, k0[1])
    torch.testing.assert_close(y, ref(x))
    gen = torch.Generator().manual_seed(0)
    for k in range(1, 4):
        t = torch.randn(4, 5, dtype=D, generator=gen)
        _, want = torch.func.jvp(ref, (x,), (t,))
        torch.testing.assert_close(jvp_fn(t), want)
        assert CALLS["jvp"] == k and CALLS["forward"] == 1
        assert _kernel_calls(ext) == (k0[0] + 1, k0[1] + k)
    torch.testing.assert_close(jvp_fn(t), central_difference(ref, (x,), (t,)), rtol=1e-6, atol=1e-8)


def test_linearize_matches_eager_forward_ad(CppCube):
    # Eager dual tensors own real memory, so eager forward AD can run the kernels too.
    x, t = torch.randn(6, dtype=D), torch.randn(6, dtype=D)
    f = lambda x: CppCube.apply(x * 2).exp()
    ry, rt = eager_jvp(f, (x,), (t,))
    y, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(jvp_fn(t), rt)


def test_two_calls_and_non_contiguous_layouts(CppCube):
    base = torch.randn(5, 3, dtype=D)
    x = base.t()  # non-contiguous primal

    def f(x):
        return CppCube.apply(CppCube.apply(x) * 0.5)

    def ref(x):
        return (x**3 * 0.5) ** 3

    y, jvp_fn = tl.linearize(f, x)
    assert CALLS["forward"] == 2 and CALLS["jvp"] == 0
    torch.testing.assert_close(y, ref(x))
    t = torch.randn(5, 3, dtype=D).t()  # non-contiguous tangent
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(ref, (x,), (t.contiguous(),))[1])
    assert CALLS["forward"] == 2 and CALLS["jvp"] == 2


def test_jvp_fn_does_not_modify_the_callers_tangent(CppCube):
    x, t = torch.randn(8, dtype=D), torch.randn(8, dtype=D)
    t0 = t.clone()
    _, jvp_fn = tl.linearize(CppCube.apply, x)
    out = jvp_fn(t)
    torch.testing.assert_close(t, t0)
    torch.testing.assert_close(out, 3 * x**2 * t0)


def test_torch_func_jvp_cannot_run_it(CppCube):
    x, t = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    with pytest.raises(RuntimeError, match="data pointer"):
        torch.func.jvp(CppCube.apply, (x,), (t,))
    # ... while linearize can, and leaves nothing behind.
    _, jvp_fn = tl.linearize(CppCube.apply, x)
    torch.testing.assert_close(jvp_fn(t), 3 * x**2 * t)
    assert fwAD._current_level == -1
