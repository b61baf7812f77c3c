"""Hand-written Triton kernels wrapped as ``torch.library`` custom ops with a JVP rule.

Mish, ``y = x * tanh(softplus(x))``, as two Triton kernels:

* ``_mish_fwd_kernel``: the forward;
* ``_mish_tangent_kernel``: ``t * mish'(x)``, recomputing ``mish'(x)`` from the saved
  ``x`` (so only ``x`` is kept), for one tangent or a batch of tangents in one launch.

and three custom ops (namespace ``tl_triton``):

* ``mish(x)``: the forward kernel; ``register_jvp`` rule = the ``mish_tangent`` op,
  ``register_autograd`` backward = the same op (``mish'`` is diagonal), and a
  ``register_vmap`` batching rule. Works with ``torch_linearize.linearize``,
  ``torch.func.jvp``/``jacfwd``/``vmap``, eager forward AD and reverse mode.
* ``mish_tangent(x, t)``: the tangent kernel, ``t`` of shape ``x.shape`` or
  ``(B, *x.shape)``; its ``register_vmap`` rule makes a batch of ``B`` tangents one launch.
* ``mish_raw(x)``: the same forward, but its ``register_jvp`` rule launches the Triton
  tangent kernel *directly* (no custom-op wrapper). ``linearize`` and eager forward AD
  call the rule with plain tensors, so it works; ``torch.func.jvp`` hands the rule
  functorch wrappers without storage, so the launch fails.

Run ``python examples/triton_kernels.py`` on a CUDA machine (or on CPU with
``TRITON_INTERPRET=1``): it checks the ops against a float64 PyTorch reference.
"""

from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl
from torch import Tensor

import torch_linearize

__all__ = ["LAUNCHES", "mish", "mish_derivative_reference", "mish_raw", "mish_reference",
           "mish_tangent"]

BLOCK = 1024
LAUNCHES: collections.Counter = collections.Counter()  # kernel launches, by kernel


@triton.jit
def _mish_parts(x):
    # n = e^x (e^x + 2): tanh(softplus(x)) = n / (n + 2), sech^2(softplus(x)) = 4 (n + 1) / (n + 2)^2
    # (no cancellation); x is clamped at 20, where tanh(softplus(x)) == 1 in float32 and float64
    # to ~1e-17, so n cannot overflow.
    e = tl.exp(tl.minimum(x, 20.0))
    n = e * (e + 2.0)
    tsp = n / (n + 2.0)
    sech2 = 4.0 * (n + 1.0) / ((n + 2.0) * (n + 2.0))
    sigmoid = e / (1.0 + e)
    return tsp, sech2, sigmoid


@triton.jit
def _mish_fwd_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tsp, _, _ = _mish_parts(x)
    tl.store(y_ptr + offs, x * tsp, mask=mask)


@triton.jit
def _mish_tangent_kernel(x_ptr, t_ptr, out_ptr, n_x, n_total, BLOCK: tl.constexpr):
    # out[b, i] = t[b, i] * mish'(x[i]) for a batch of tangents laid out (B, n_x).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_total
    x = tl.load(x_ptr + offs % n_x, mask=mask, other=0.0)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0)
    tsp, sech2, sigmoid = _mish_parts(x)
    tl.store(out_ptr + offs, t * (tsp + x * sech2 * sigmoid), mask=mask)


def launch_mish_forward(x: Tensor) -> Tensor:
    """Raw launch of the forward kernel on a real (contiguous) tensor."""
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    _mish_fwd_kernel[(triton.cdiv(n, BLOCK),)](x, y, n, BLOCK=BLOCK)
    LAUNCHES["mish_fwd"] += 1  # counted once launched
    return y


def launch_mish_tangent(x: Tensor, t: Tensor) -> Tensor:
    """Raw launch of the tangent kernel: ``t`` is ``x.shape`` or ``(B, *x.shape)``."""
    if t.shape[t.dim() - x.dim():] != x.shape or t.dtype != x.dtype:
        raise ValueError(f"mish_tangent: t {tuple(t.shape)} {t.dtype} does not end with "
                         f"x's shape {tuple(x.shape)} {x.dtype}")
    x, t = x.contiguous(), t.contiguous()
    out = torch.empty_like(t)
    _mish_tangent_kernel[(triton.cdiv(t.numel(), BLOCK),)](x, t, out, x.numel(), t.numel(),
                                                           BLOCK=BLOCK)
    LAUNCHES["mish_tangent"] += 1  # counted once launched
    return out


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("tl_triton::mish_tangent", mutates_args=())
def mish_tangent(x: Tensor, t: Tensor) -> Tensor:
    """``t * mish'(x)``; ``t`` may carry one leading batch dimension (one launch)."""
    return launch_mish_tangent(x, t)


@mish_tangent.register_fake
def _(x, t):
    return torch.empty_like(t)


@mish_tangent.register_vmap
def _(info, in_dims, x, t):
    x_dim, t_dim = in_dims
    t = t.movedim(t_dim, 0) if t_dim is not None else t.expand(info.batch_size, *t.shape)
    if x_dim is not None:  # a batch of points as well: every element is independent
        x = x.movedim(x_dim, 0).expand_as(t)
        return mish_tangent(x.reshape(-1), t.reshape(-1)).view(t.shape), 0
    return mish_tangent(x, t), 0


@torch.library.custom_op("tl_triton::mish", mutates_args=())
def mish(x: Tensor) -> Tensor:
    """Mish through the Triton forward kernel."""
    return launch_mish_forward(x)


@mish.register_fake
def _(x):
    return torch.empty_like(x)


@mish.register_vmap
def _(info, in_dims, x):  # elementwise: a batch is just more elements
    return mish(x), in_dims[0]


def _save_x(ctx, inputs, output):
    ctx.save_for_forward(inputs[0])
    ctx.save_for_backward(inputs[0])


def _mish_jvp(ctx, t):
    (x,) = ctx.saved_tensors
    return mish_tangent(x, t)


def _mish_backward(ctx, g):
    (x,) = ctx.saved_tensors
    return mish_tangent(x, g)  # mish' is diagonal: the transpose is the same kernel


mish.register_autograd(_mish_backward, setup_context=_save_x)
torch_linearize.register_jvp(mish, _mish_jvp, setup_context=_save_x)


@torch.library.custom_op("tl_triton::mish_raw", mutates_args=())
def mish_raw(x: Tensor) -> Tensor:
    """Mish whose JVP rule launches the Triton tangent kernel directly."""
    return launch_mish_forward(x)


@mish_raw.register_fake
def _(x):
    return torch.empty_like(x)


def _mish_raw_jvp(ctx, t):
    (x,) = ctx.saved_tensors
    return launch_mish_tangent(x, t)  # a raw launch: needs real tensors


mish_raw.register_autograd(_mish_backward, setup_context=_save_x)
torch_linearize.register_jvp(mish_raw, _mish_raw_jvp, setup_context=_save_x)


# ----------------------------------------------------------------------------- references
def mish_reference(x: Tensor) -> Tensor:
    """Mish in plain PyTorch (use float64 for a reference)."""
    return x * torch.tanh(torch.nn.functional.softplus(x))


def mish_derivative_reference(x: Tensor) -> Tensor:
    """mish'(x) in closed form, plain PyTorch."""
    sp = torch.nn.functional.softplus(x)
    return torch.tanh(sp) + x * torch.sigmoid(x) / torch.cosh(sp) ** 2


def _main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu needs TRITON_INTERPRET=1
    x = torch.linspace(-30, 30, 4001, device=device, dtype=torch.float32)
    t = torch.randn_like(x)
    x64, t64 = x.double(), t.double()
    y, jvp_fn = torch_linearize.linearize(lambda x: mish_raw(mish(x)), x)
    want_y = mish_reference(mish_reference(x64))
    _, want_t = torch.func.jvp(lambda x: mish_reference(mish_reference(x)), (x64,), (t64,))
    err_y = ((y.double() - want_y).abs().max() / want_y.abs().max()).item()
    err_t = ((jvp_fn(t).double() - want_t).abs().max() / want_t.abs().max()).item()
    print(f"device {device}: forward rel. error {err_y:.1e}, tangent rel. error {err_t:.1e} "
          "(float32 Triton vs float64 PyTorch)")
    assert err_y < 1e-5 and err_t < 1e-5
    try:
        torch.func.jvp(mish_raw, (x,), (t,))
        print("torch.func.jvp(mish_raw): ran (unexpected)")
    except Exception as e:
        print(f"torch.func.jvp(mish_raw) fails as expected: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:120]}")
    print(f"kernel launches: {dict(LAUNCHES)}")


if __name__ == "__main__":
    _main()
