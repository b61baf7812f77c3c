"""Test oracles shared by the test modules.

* :func:`assert_jvp_matches` compares ``linearize`` with ``torch.func.jvp`` (and
  eager ``torch.autograd.forward_ad``) for several random tangents, in float64.
* :func:`central_difference` is an independent numerical reference.
* :class:`OpCounter` counts the aten operations that run while it is active.
"""

from __future__ import annotations

import collections

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

import torch_linearize as tl


def rand_like_tree(tree, gen=None):
    def one(x):
        if not isinstance(x, torch.Tensor) or not (x.is_floating_point() or x.is_complex()):
            return None
        return torch.randn(x.shape, dtype=x.dtype, generator=gen)

    return tree_map(one, tree)


def eager_jvp(f, primals, tangents):
    """Reference JVP with eager dual tensors."""
    flat_p, spec = tree_flatten(primals)
    flat_t, _ = tree_flatten(tangents)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(flat_p, flat_t)]
        out = f(*tree_unflatten(duals, spec))
        flat_o, ospec = tree_flatten(out)
        ys = [fwAD.unpack_dual(o).primal.clone() for o in flat_o]
        ts = [
            torch.zeros_like(o) if fwAD.unpack_dual(o).tangent is None
            else fwAD.unpack_dual(o).tangent.clone()
            for o in flat_o
        ]
    return tree_unflatten(ys, ospec), tree_unflatten(ts, ospec)


def central_difference(f, primals, tangents, eps=1e-6):
    """(f(x + eps t) - f(x - eps t)) / (2 eps), leaf by leaf."""
    plus = tree_map(lambda p, t: p + eps * t, primals, tangents)
    minus = tree_map(lambda p, t: p - eps * t, primals, tangents)
    return tree_map(lambda a, b: (a - b) / (2 * eps), f(*plus), f(*minus))


def assert_jvp_matches(f, *primals, n_tangents=3, reference="func", rtol=1e-7, atol=1e-9, seed=0):
    """linearize(f) must reproduce f's output and the reference JVP for random tangents."""
    gen = torch.Generator().manual_seed(seed)
    y, jvp_fn = tl.linearize(f, *primals)
    torch.testing.assert_close(y, f(*primals), rtol=rtol, atol=atol)
    for _ in range(n_tangents):
        tangents = tuple(rand_like_tree(p, gen) for p in primals)
        got = jvp_fn(*tangents)
        if reference == "func":
            _, want = torch.func.jvp(f, primals, tangents)
        elif reference == "eager":
            _, want = eager_jvp(f, primals, tangents)
        else:
            want = central_difference(f, primals, tangents)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    return y, jvp_fn


class OpCounter(TorchDispatchMode):
    """Counts aten operations (by overload packet name) executed while active."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
