"""Test oracles shared by the test modules.

* :func:`assert_jvp_matches` compares ``linearize`` with ``torch.func.jvp`` (and
  eager ``torch.autograd.forward_ad``) for several random tangents, in float64.
* :func:`central_difference` is an independent numerical reference.
* :class:`OpCounter` counts the aten operations that run while it is active.
* :func:`mutating_programs` (hypothesis) draws random programs with views and in-place
  writes; :func:`check_random_program` holds one to every oracle.
"""

from __future__ import annotations

import collections

import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import strategies as st
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


# ----------------------------------------------------------------- random programs
_VIEWS = [
    lambda v: v, lambda v: v[1:], lambda v: v.t(), lambda v: v[:, ::2], lambda v: v.diagonal(),
    lambda v: v.reshape(-1)[2:10].view(2, 4), lambda v: v.unsqueeze(0).expand(2, *v.shape)[1],
    lambda v: v.transpose(0, 1)[1:3],
]
_INPLACE = [
    lambda a, b: a.mul_(1.5), lambda a, b: a.add_(b), lambda a, b: a.sub_(b, alpha=0.5),
    lambda a, b: a.addcmul_(b, b.detach()), lambda a, b: a.copy_(b), lambda a, b: a.sin_(),
    lambda a, b: a.clamp_(-1, 1), lambda a, b: a.div_(2.0), lambda a, b: a.zero_(),
    lambda a, b: a.mul_(b), lambda a, b: a.exp_(), lambda a, b: a.lerp_(b, 0.3),
    lambda a, b: a.masked_fill_(a.detach() > 0, 0.0), lambda a, b: a.addcdiv_(b, b.detach().abs() + 1),
    lambda a, b: a.__setitem__(0, b[0] * 2) if a.dim() else a.mul_(3),
]
_MIX = [torch.add, torch.mul, torch.sub, lambda p, q: torch.addcmul(p, p, q)]


def _viewable(v: torch.Tensor) -> bool:
    """Every view of ``_VIEWS`` applies to ``v``."""
    return v.dim() == 2 and min(v.shape) >= 3


class MutatingProgram:
    """A random function of two (4, 4) tensors: pointwise ops (``unary``), views, in-place
    writes (into values, views of them, f's own inputs, and fresh clones through a view),
    reductions and, as kind ``F``, the callables ``functions`` (custom Functions). Every
    value may alias another; a write through a view changes its base and other views."""

    def __init__(self, steps, unary, functions=()):
        self.steps, self.unary, self.functions = steps, unary, functions

    def __repr__(self):  # what hypothesis prints for a failing example
        return f"MutatingProgram({self.steps!r})"

    def __call__(self, x, y):
        vals = [x, y]
        for kind, i, j, k in self.steps:
            a, b = vals[i % len(vals)], vals[j % len(vals)]
            if kind == "u":
                vals.append(self.unary[k % len(self.unary)](a))
            elif kind == "v" and _viewable(a):
                vals.append(_VIEWS[k % len(_VIEWS)](a))
            elif kind == "w" and a.shape == b.shape and 0 not in a.stride():
                # a write into an existing value (maybe a view, maybe read by earlier
                # operations as a residual); the operand is a fresh value, so that it
                # never overlaps what is written
                _INPLACE[k % len(_INPLACE)](a, b * 1.0)
            elif kind == "W" and _viewable(a) and a.shape == b.shape:
                # a write through a view of a fresh clone; the clone is the new value
                c, view = a.clone(), _VIEWS[k % len(_VIEWS)]
                _INPLACE[k % len(_INPLACE)](view(c), view(b) * 1.0)
                vals.append(c)
            elif kind == "b" and a.shape == b.shape:
                vals.append(_MIX[k % len(_MIX)](a, b))
            elif kind == "c":
                vals.append(a.clone() if k % 2 else a.contiguous())
            elif kind == "r" and a.dim():
                vals.append([lambda v: v.sum(0), lambda v: v.cumsum(-1),
                             lambda v: v.mean() * torch.ones_like(v)][k % 3](a))
            elif kind == "F" and self.functions:
                out = self.functions[k % len(self.functions)](a, b)
                if out is not None:
                    vals.append(out)
        return tuple(vals[-3:])


def mutating_programs(unary, functions=()):
    """Hypothesis strategy of :class:`MutatingProgram` (kind ``F`` only with ``functions``)."""
    kinds = "uvwWbcr" + ("FF" if functions else "")
    step = st.tuples(st.sampled_from(kinds), st.integers(0, 100), st.integers(0, 100),
                     st.integers(0, 100))
    return st.builds(lambda steps: MutatingProgram(steps, unary, functions),
                     st.lists(step, min_size=1, max_size=10))


def check_random_program(f, seed: int, reference: str = "func") -> None:
    """Hold ``linearize(f, x, y)`` to every oracle: the output; the JVP (applied twice: a
    residual written by the first application would change the second) against
    ``torch.func.jvp`` or eager forward AD (``reference``); the transpose by the
    dot-product test; ``vmap`` against a loop; callers' tangents left unwritten.
    f may write its inputs: each consumer gets its own copies."""
    d = torch.float64
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, dtype=d, generator=gen)
    y = torch.randn(4, 4, dtype=d, generator=gen)
    out, jvp_fn = tl.linearize(f, x.clone(), y.clone())
    torch.testing.assert_close(out, f(x.clone(), y.clone()))
    tx, ty = torch.randn(4, 4, dtype=d, generator=gen), torch.randn(4, 4, dtype=d, generator=gen)
    tx0, ty0 = tx.clone(), ty.clone()
    # (torch.func.jvp writes the tangents of inputs that f writes: give it copies)
    if reference == "func":
        want = torch.func.jvp(f, (x.clone(), y.clone()), (tx.clone(), ty.clone()))[1]
    else:
        want = eager_jvp(f, (x.clone(), y.clone()), (tx.clone(), ty.clone()))[1]
    finite = all(bool(torch.isfinite(w).all()) for w in want)
    for _ in range(2):
        torch.testing.assert_close(jvp_fn(tx, ty), want, equal_nan=not finite)
    if not finite:  # (exp of exp of ... overflowed: no dot products to compare)
        return
    # transpose: <u, J t> = <J^T u, t> (torch.func.vjp itself refuses some of these
    # programs: a value its backward needs is modified in place)
    u = tuple(torch.randn(o.shape, dtype=d, generator=gen) for o in out)
    gx, gy = jvp_fn.transpose()(u)
    torch.testing.assert_close(sum((a * b).sum() for a, b in zip(u, want)),
                               (gx * tx).sum() + (gy * ty).sum())
    batch = torch.randn(3, 4, 4, dtype=d, generator=gen)
    got = torch.vmap(jvp_fn, in_dims=(0, None))(batch, ty)
    for k in range(3):
        torch.testing.assert_close(tuple(g[k] for g in got), jvp_fn(batch[k], ty))
    # LinearMap.batched: both tangents batched (the direct path where the program
    # broadcasts a batch dim, torch.vmap otherwise), against a loop
    batch_y = torch.randn(3, 4, 4, dtype=d, generator=gen)
    got = jvp_fn.batched(batch, batch_y)
    for k in range(3):
        torch.testing.assert_close(tuple(g[k] for g in got), jvp_fn(batch[k], batch_y[k]))
    # jacobian() in chunks (the last one short), against applications to basis tangents
    jac = jvp_fn.jacobian(chunk_size=5)
    zero = torch.zeros(4, 4, dtype=d)
    for i in (0, 7, 15):
        e = torch.zeros(16, dtype=d)
        e[i] = 1
        cols = (jvp_fn(e.view(4, 4), zero), jvp_fn(zero, e.view(4, 4)))
        for arg, col in enumerate(cols):
            for j, c in enumerate(col):
                torch.testing.assert_close(jac[j][arg].flatten(-2)[..., i], c, equal_nan=True)
    assert torch.equal(tx, tx0) and torch.equal(ty, ty0)
    # The one-tensor entry (one input, one output: LinearMap's lean path, custom
    # Functions' jvp called inline by the generated code), applied twice.
    def g(x):
        return f(x, y.clone())[-1]

    _, jvp1 = tl.linearize(g, x.clone())
    if reference == "func":
        want1 = torch.func.jvp(g, (x.clone(),), (tx.clone(),))[1]
    else:
        want1 = eager_jvp(g, (x.clone(),), (tx.clone(),))[1]
    for _ in range(2):
        torch.testing.assert_close(jvp1(tx), want1, equal_nan=True)
    assert torch.equal(tx, tx0)
