"""Catalogue of custom ``torch.autograd.Function`` cases.

Axes covered (each case says which):
    style     {forward(ctx, ...), forward(...) + setup_context}
    saves     {input, output, intermediate, non-tensor attribute, nothing}
    via       {save_for_forward, save_for_backward, ctx attributes}
    marks     {mark_dirty, mark_non_differentiable, set_materialize_grads(False)}
    io        {non-tensor inputs, non-tensor outputs, multiple outputs}
    opaque    {.item(), numpy, ctypes on raw data pointers}

Every case counts calls of forward / setup_context / jvp / backward in ``CALLS``
so tests can check that ``linearize`` runs forward once and jvp per tangent.
Each has a pure-PyTorch reference ``ref`` with the same maths.
"""

from __future__ import annotations

import collections
import ctypes

import torch

CALLS: collections.Counter = collections.Counter()


def reset():
    CALLS.clear()


class Forum(torch.autograd.Function):
    """The forum thread's Function: scalars read with .item(); style=setup_context, opaque."""

    @staticmethod
    def forward(x, a, b, c):
        CALLS["Forum.forward"] += 1
        x, a, b, c = x.item(), a.item(), b.item(), c.item()
        return torch.tensor(a * x**2 + b * x + c, dtype=torch.float64)

    @staticmethod
    def setup_context(ctx, inputs, output):
        CALLS["Forum.setup_context"] += 1
        x, a, b, _ = inputs
        ctx.x, ctx.a, ctx.b = x.item(), a.item(), b.item()

    @staticmethod
    def jvp(ctx, dx, da, db, dc):
        CALLS["Forum.jvp"] += 1
        x, a, b = ctx.x, ctx.a, ctx.b
        d = (2 * a * x + b) * dx.item() + x**2 * da.item() + x * db.item() + dc.item()
        return torch.tensor(d, dtype=torch.float64)

    @staticmethod
    def backward(ctx, g):
        CALLS["Forum.backward"] += 1
        x, a, b = ctx.x, ctx.a, ctx.b
        return g * (2 * a * x + b), g * x**2, g * x, g

    @staticmethod
    def ref(x, a, b, c):
        return a * x**2 + b * x + c


class NumpyCube(torch.autograd.Function):
    """style=forward(ctx); saves input via save_for_forward and an intermediate attribute; numpy."""

    @staticmethod
    def forward(ctx, x):
        CALLS["NumpyCube.forward"] += 1
        xn = x.detach().cpu().numpy()
        ctx.save_for_forward(x)
        ctx.save_for_backward(x)
        ctx.three_x2 = torch.from_numpy(3 * xn**2)
        return torch.from_numpy(xn**3)

    @staticmethod
    def jvp(ctx, t):
        CALLS["NumpyCube.jvp"] += 1
        (x,) = ctx.saved_tensors  # saved_for_forward in jvp
        assert isinstance(x, torch.Tensor)
        return torch.from_numpy(ctx.three_x2.numpy() * t.numpy())

    @staticmethod
    def backward(ctx, g):
        CALLS["NumpyCube.backward"] += 1
        (x,) = ctx.saved_tensors  # saved_for_backward in backward
        return g * 3 * x**2

    @staticmethod
    def ref(x):
        return x**3


class Cube(torch.autograd.Function):
    """x^3 in differentiable PyTorch code (its jvp and backward too), vmappable: for
    second order and transforms over maps (tests subclass it for trace_jvp)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[0])
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def jvp(ctx, dx):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * dx

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


_libc = ctypes.CDLL(None)


class CtypesScale(torch.autograd.Function):
    """Opaque kernel through raw data pointers (memcpy), non-tensor input; style=setup_context."""

    @staticmethod
    def forward(x, k: float):
        CALLS["CtypesScale.forward"] += 1
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # row-major, like src
        src = (x * k).contiguous()
        _libc.memcpy(ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(src.data_ptr()),
                     ctypes.c_size_t(src.numel() * src.element_size()))
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.k = inputs[1]

    @staticmethod
    def jvp(ctx, t, _):
        CALLS["CtypesScale.jvp"] += 1
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)  # row-major, like src
        src = (t * ctx.k).contiguous()
        _libc.memcpy(ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(src.data_ptr()),
                     ctypes.c_size_t(src.numel() * src.element_size()))
        return out

    @staticmethod
    def backward(ctx, g):
        return g * ctx.k, None

    @staticmethod
    def ref(x, k):
        return x * k


class SinCosPair(torch.autograd.Function):
    """Multiple outputs + a non-tensor output + a non-differentiable (marked) output."""

    @staticmethod
    def forward(ctx, x):
        CALLS["SinCosPair.forward"] += 1
        idx = torch.argsort(x)
        marker = x.detach().clone()
        ctx.mark_non_differentiable(idx, marker)
        ctx.save_for_forward(x)
        ctx.save_for_backward(x)
        return x.sin(), x.cos(), idx, "a-string", marker

    @staticmethod
    def jvp(ctx, t):
        CALLS["SinCosPair.jvp"] += 1
        (x,) = ctx.saved_tensors
        return t * x.cos(), -t * x.sin(), None, None, None

    @staticmethod
    def backward(ctx, gs, gc, _gi, _gs, _gm):
        (x,) = ctx.saved_tensors
        return gs * x.cos() - gc * x.sin()


class ScaleInPlace(torch.autograd.Function):
    """mark_dirty: forward modifies its input in place and returns it."""

    @staticmethod
    def forward(ctx, x, k: float):
        CALLS["ScaleInPlace.forward"] += 1
        x.mul_(k)
        ctx.mark_dirty(x)
        ctx.k = k
        return x

    @staticmethod
    def jvp(ctx, t, _):
        CALLS["ScaleInPlace.jvp"] += 1
        t.mul_(ctx.k)
        return t

    @staticmethod
    def backward(ctx, g):
        return g * ctx.k, None


class WeightedSum(torch.autograd.Function):
    """set_materialize_grads(False): jvp sees None for inputs without a tangent."""

    @staticmethod
    def forward(x, w):
        CALLS["WeightedSum.forward"] += 1
        return (x * w).sum(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(x, w)
        ctx.save_for_backward(x, w)
        ctx.seen_needs = ctx.needs_input_grad

    @staticmethod
    def jvp(ctx, tx, tw):
        CALLS["WeightedSum.jvp"] += 1
        CALLS[f"WeightedSum.jvp.tw_is_none={tw is None}"] += 1
        x, w = ctx.saved_tensors
        out = 0
        if tx is not None:
            out = out + (tx * w).sum(-1)
        if tw is not None:
            out = out + (x * tw).sum(-1)
        return out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = g[..., None] * w if ctx.needs_input_grad[0] else None
        gw = g[..., None] * x if ctx.needs_input_grad[1] else None
        return gx, gw


class Outer(torch.autograd.Function):
    """A Function whose forward and jvp call another Function (nested)."""

    @staticmethod
    def forward(x):
        CALLS["Outer.forward"] += 1
        return NumpyCube.apply(x) + 1

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, t):
        CALLS["Outer.jvp"] += 1
        (x,) = ctx.saved_tensors
        return CtypesScale.apply(3 * x**2 * t, 1.0)

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError


class TwoSaves(torch.autograd.Function):
    """exp(x); style=setup_context; saves different tensors for jvp (save_for_forward:
    the output) and backward (save_for_backward: twice the output, a deliberately wrong
    factor that tells the two apart, so backward is not exp's derivative). ``HOOK``: a
    callable popped and called inside jvp before it reads ctx.saved_tensors (its result
    lands in ``ctx.seen``); backward counts its calls in ``ctx.calls``."""

    HOOK: list = []

    @staticmethod
    def forward(x):
        CALLS["TwoSaves.forward"] += 1
        return x.exp()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(output)
        ctx.save_for_backward(2 * output)

    @staticmethod
    def jvp(ctx, t):
        CALLS["TwoSaves.jvp"] += 1
        if TwoSaves.HOOK:
            ctx.seen = TwoSaves.HOOK.pop()()
        (s,) = ctx.saved_tensors
        return t * s

    @staticmethod
    def backward(ctx, g):
        CALLS["TwoSaves.backward"] += 1
        (s,) = ctx.saved_tensors
        ctx.calls = getattr(ctx, "calls", 0) + 1
        return g * s


class NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * 2


class WrongShapeJvp(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def jvp(ctx, t):
        return t.sum()
