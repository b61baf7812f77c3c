"""A hand-written C++ kernel as a ``torch.library.custom_op`` with a JVP rule.

SiLU, ``y = x * sigmoid(x)``, as two C++ kernels that work on raw data pointers
(compiled on first run with ``torch.utils.cpp_extension.load_inline``, ~20 s):

* ``silu_kernel``: the forward;
* ``silu_tangent_kernel``: ``t * silu'(x)`` for a batch of ``B`` tangents in one call.

Each is wrapped as a custom op with a batching rule (``register_vmap``); the
forward op gets ``torch_linearize.register_jvp`` (rule: the tangent op) and
``register_autograd`` (the same op: ``silu'`` is diagonal). ``linearize`` then runs
the forward kernel once, the tangent kernel once per tangent, once for a whole
``vmap``-ed batch, and the transpose through the backward formula.

Run: ``python examples/custom_kernel_cpp.py``
"""

import torch
from torch import Tensor
from torch.utils.cpp_extension import load_inline

import torch_linearize as tl

CPP = r"""
#include <cmath>
#include <cstdint>

static int64_t launches = 0;

void silu_kernel(int64_t out, int64_t x, int64_t n) {
  double* o = reinterpret_cast<double*>(out);
  const double* xs = reinterpret_cast<const double*>(x);
  for (int64_t i = 0; i < n; ++i) o[i] = xs[i] / (1.0 + std::exp(-xs[i]));
}

// out[b, i] = t[b, i] * silu'(x[i]),  silu'(x) = s (1 + x (1 - s)),  s = sigmoid(x)
void silu_tangent_kernel(int64_t out, int64_t x, int64_t t, int64_t n, int64_t batch) {
  ++launches;
  double* o = reinterpret_cast<double*>(out);
  const double* xs = reinterpret_cast<const double*>(x);
  const double* ts = reinterpret_cast<const double*>(t);
  for (int64_t i = 0; i < n; ++i) {
    const double s = 1.0 / (1.0 + std::exp(-xs[i]));
    const double d = s * (1.0 + xs[i] * (1.0 - s));
    for (int64_t b = 0; b < batch; ++b) o[b * n + i] = ts[b * n + i] * d;
  }
}

int64_t tangent_launches() { return launches; }
"""

ext = load_inline(name="torch_linearize_example_silu", cpp_sources=[CPP],
                  functions=["silu_kernel", "silu_tangent_kernel", "tangent_launches"],
                  extra_cflags=["-O2"])


@torch.library.custom_op("example_cpp::silu", mutates_args=())
def silu(x: Tensor) -> Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    ext.silu_kernel(out.data_ptr(), x.data_ptr(), x.numel())
    return out


@torch.library.custom_op("example_cpp::silu_tangent", mutates_args=())
def silu_tangent(x: Tensor, t: Tensor) -> Tensor:
    """t * silu'(x); t is x.shape or (B, *x.shape): one kernel call either way."""
    x, t = x.contiguous(), t.contiguous()
    out = torch.empty_like(t)
    ext.silu_tangent_kernel(out.data_ptr(), x.data_ptr(), t.data_ptr(), x.numel(),
                            t.numel() // x.numel())
    return out


@silu.register_fake
def _(x):
    return torch.empty_like(x)


@silu_tangent.register_fake
def _(x, t):
    return torch.empty_like(t)


@silu.register_vmap
def _(info, in_dims, x):  # elementwise: a batch is just more elements
    return silu(x), in_dims[0]


@silu_tangent.register_vmap
def _(info, in_dims, x, t):
    x_dim, t_dim = in_dims
    t = t.movedim(t_dim, 0) if t_dim is not None else t.expand(info.batch_size, *t.shape)
    if x_dim is not None:  # a batch of points too: treat every element independently
        x = x.movedim(x_dim, 0).expand_as(t)
        return silu_tangent(x.reshape(-1), t.reshape(-1)).view(t.shape), 0
    return silu_tangent(x, t), 0


def save_x(ctx, inputs, output):
    ctx.save_for_forward(inputs[0])
    ctx.save_for_backward(inputs[0])


def silu_jvp(ctx, t):
    (x,) = ctx.saved_tensors
    return silu_tangent(x, t)


def silu_backward(ctx, g):
    (x,) = ctx.saved_tensors
    return silu_tangent(x, g)


silu.register_autograd(silu_backward, setup_context=save_x)
tl.register_jvp(silu, silu_jvp, setup_context=save_x)


def main():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(8, 8, dtype=torch.float64, generator=gen)
    x = torch.randn(4, 8, dtype=torch.float64, generator=gen)

    def f(x):
        return silu(x @ W).sum(1)

    z = x @ W
    s = torch.sigmoid(z)
    dsilu = s * (1 + z * (1 - s))  # analytic derivative of SiLU at z

    y, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(y, (z * s).sum(1))
    t = torch.randn(4, 8, dtype=torch.float64, generator=gen)
    n0 = ext.tangent_launches()
    torch.testing.assert_close(jvp_fn(t), (dsilu * (t @ W)).sum(1))
    print(f"J t matches the analytic derivative; tangent kernel calls: {ext.tangent_launches() - n0}")

    T = torch.randn(64, 4, 8, dtype=torch.float64, generator=gen)
    n0 = ext.tangent_launches()
    torch.testing.assert_close(torch.vmap(jvp_fn)(T), (dsilu * (T @ W)).sum(2))
    print(f"64 tangents with vmap: tangent kernel calls: {ext.tangent_launches() - n0}")
    assert ext.tangent_launches() - n0 == 1

    u = torch.randn(4, dtype=torch.float64, generator=gen)
    (g,) = jvp_fn.transpose()(u)
    torch.testing.assert_close(g, (u[:, None] * dsilu) @ W.T)
    print("transpose (register_autograd) matches the analytic gradient")

    _, dy = torch.func.jvp(f, (x,), (t,))  # the rule calls a custom op, so torch.func works too
    torch.testing.assert_close(dy, jvp_fn(t))
    print("torch.func.jvp agrees (it re-runs the forward kernel for every tangent)")


if __name__ == "__main__":
    main()
