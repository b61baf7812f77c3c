"""Where a batch of K tangents spends its time beyond the hand-written batched formula.

Usage::

    python benchmarks/vmap_layer.py [--rounds 150] [--only elementwise,custom] [--out FILE]

For ``bench_batch_transpose``'s elementwise and custom workloads (64 tangents of 1e6
float32; their hand-written batched floor is ``T * r``), interleaved like every benchmark
here (``common.interleave``: a shuffled order each round, so each call follows another
method's 256 MB batch, which evicts the caches), the rows peel the layers of a batched
application:

* ``torch.vmap`` of the identity: the Python layer of ``torch.vmap`` alone (its pytree
  handling and level bookkeeping; absolute time, no kernel runs);
* ``vmap(floor)``: the hand-written per-tangent formula under ``torch.vmap``;
* the map inside a vmap level without ``torch.vmap``'s layer
  (``_vmap_increment_nesting`` + ``_add_batch_dim``, as ``torch.vmap`` does after its
  Python layer);
* ``vmap(jvp_fn)`` and ``jvp_fn.batched(T)`` (which runs these programs directly on the
  stacked tangents, no transform);
* the floor's formula on the map's own residual tensor (equal values, another buffer):
  how much of a difference is where the residual lives rather than the code around it
  (see ``noise_floor.py``).

Ratios are to the batched floor timed in the same rounds; the floor timed again is the
null control.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch._C._functorch import (
    _add_batch_dim,
    _remove_batch_dim,
    _vmap_decrement_nesting,
    _vmap_increment_nesting,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_batch_transpose as bbt
from common import emit_report, machine_line, pin_malloc, ratio_report, ratio_row

import torch_linearize

K = 64
FLOOR = "floor, batched (`T * r`)"  # (both workloads' batched floor is this formula)


def _in_level(fn: Callable, T: torch.Tensor) -> Any:
    """``fn`` on ``T`` batched along dim 0 inside a vmap level, without torch.vmap's layer."""
    level = _vmap_increment_nesting(T.shape[0], "error")
    try:
        return _remove_batch_dim(fn(_add_batch_dim(T, 0, level)), level, T.shape[0], 0)
    finally:
        _vmap_decrement_nesting()


def _own_residual(jvp_fn) -> torch.Tensor:
    """The one residual tensor the map multiplies by: its program's, or the one its custom
    Function saved for ``jvp`` (the same values as the floor's ``r``, another buffer)."""
    prog = jvp_fn._program
    if prog.residuals:
        (r,) = prog.residuals
        return r
    (node,) = [e.fn for e in prog.eqns]
    (r,) = node.ctx.saved_tensors
    return r


def methods(key: str) -> tuple[str, dict[str, Callable[[int], Any]], torch.Tensor]:
    w = bbt.WORKLOADS[key]()
    r = w.floor_setup()
    T = torch.randn(K, *w.x.shape, generator=torch.Generator().manual_seed(7))
    _, jvp_fn = torch_linearize.linearize(w.f, w.x)
    vmap_floor = torch.vmap(lambda t: w.floor_apply(r, t))
    vmap_id = torch.vmap(lambda t: t)
    vmap_map = torch.vmap(jvp_fn)
    own = _own_residual(jvp_fn)
    fns: dict[str, Callable[[int], Any]] = {
        FLOOR: lambda i: w.floor_batched(r, T),
        "floor, batched, timed again (null control)": lambda i: w.floor_batched(r, T),
        "floor on the map's own residual buffer": lambda i: T * own,
        "torch.vmap of the identity (no kernel)": lambda i: vmap_id(T),
        "vmap(floor)": lambda i: vmap_floor(T),
        "jvp_fn inside a vmap level, no torch.vmap layer": lambda i: _in_level(jvp_fn, T),
        "vmap(jvp_fn)": lambda i: vmap_map(T),
        "jvp_fn.batched(T)": lambda i: jvp_fn.batched(T),
    }
    want = w.floor_batched(r, T)
    for name, fn in fns.items():
        if "identity" not in name:
            torch.testing.assert_close(fn(0), want, rtol=1e-4, atol=1e-6,
                                       msg=f"{key}: {name} differs from the floor")
    return w.title, fns, T


def _row(key: str, name: str, s: Any, ref: Any, digits: int) -> list[str]:
    """A report row; the identity's (no kernel) as a share of the floor, not a ratio."""
    if "identity" in name:
        return [key, name, f"{s.median:.3f}", f"{s.spread:.0%}",
                f"({s.median / ref.median:.1%} of the floor)", ""]
    return ratio_row(key, name, s, ref, digits)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="elementwise,custom")
    ap.add_argument("--out", default="", help="also write the report to this file")
    args = ap.parse_args(argv)
    malloc = pin_malloc()
    torch.set_num_threads(args.threads)
    header = (f"Batched application, layer by layer: {machine_line(args.threads)}, "
              f"{args.rounds} interleaved rounds (`common.interleave`), K = {K}; "
              f"allocator: {malloc}.")
    text = ratio_report(header, args.only.split(","), lambda key: methods(key)[:2],
                        args.rounds, FLOOR, digits=3, row=_row)
    emit_report(text, args.out, __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
