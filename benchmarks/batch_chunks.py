"""K tangents at once on CPU: one batch, chunks of the batch, or one tangent at a time.

Usage::

    python benchmarks/batch_chunks.py [--malloc pinned|default] [--rounds 40] [--out FILE]

A batched application runs every operation of the linear program on ``K`` times a
tangent's data. On a CPU that has two costs a per-tangent loop does not pay: the
intermediates outgrow the caches (each operation of a multi-operation program then
streams them through memory), and, with glibc's default allocator, every block above
its mmap threshold is a fresh mapping whose pages the kernel faults in on first touch.
For ``bench_batch_transpose``'s workloads (K = 64 float32 tangents) this script times,
interleaved (``common.interleave``):

* the hand-written batched floor (as in ``bench_batch_transpose``);
* ``jvp_fn.batched(T)``: as ``batched`` decides (automatic chunks for the PDE's program,
  see ``_batch.chunks_pay_off``; one batch for the others);
* ``jvp_fn.batched(T, chunk_size=K)``: one batch (``torch.vmap`` for the PDE's slicing
  program, the program on the stacked tangents for the elementwise one);
* ``jvp_fn.batched(T, chunk_size=c)``: chunks of ``c`` tangents, results concatenated;
* ``torch.stack([jvp_fn(t) for t in T])``: one tangent at a time, stacked;
* ``[jvp_fn(t) for t in T]``: one tangent at a time, left as a list (no stacked copy).

Run it once per allocator (``--malloc default`` is what a plain ``python`` process gets);
ratios are to the batched floor in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_batch_transpose as bbt
from common import MALLOC_HELP, choose_malloc, emit_report, machine_line, ratio_report

import torch_linearize

K = 64
FLOOR = "floor, batched (hand-written)"
CHUNKS = (1, 4, 16)


def methods(key: str) -> tuple[str, dict[str, Callable[[int], Any]]]:
    w = bbt.WORKLOADS[key]()
    s = w.floor_setup()
    T = torch.randn(K, *w.x.shape, generator=torch.Generator().manual_seed(7))
    _, jvp_fn = torch_linearize.linearize(w.f, w.x)
    fns: dict[str, Callable[[int], Any]] = {
        FLOOR: lambda i: w.floor_batched(s, T),
        "jvp_fn.batched(T)": lambda i: jvp_fn.batched(T),
        f"jvp_fn.batched(T, chunk_size={K}): one batch": lambda i: jvp_fn.batched(T, chunk_size=K),
    }
    for c in CHUNKS:
        fns[f"jvp_fn.batched(T, chunk_size={c})"] = lambda i, c=c: jvp_fn.batched(T, chunk_size=c)
    fns["torch.stack([jvp_fn(t) for t in T])"] = lambda i: torch.stack([jvp_fn(t) for t in T])
    fns["[jvp_fn(t) for t in T] (a list, not stacked)"] = lambda i: [jvp_fn(t) for t in T]
    want = w.floor_batched(s, T)
    for name, fn in fns.items():
        got = fn(0)
        got = torch.stack(got) if isinstance(got, list) else got
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5,
                                   msg=f"{key}: {name} differs from the floor")
    how = "the program on the stacked tangents" if jvp_fn._batched_run else "torch.vmap"
    chunk = jvp_fn._auto_chunk((T,), 0)
    auto = f"automatic chunks of {chunk}" if chunk else "one batch"
    return f"{w.title} (`batched` runs {how}; `batched(T)`: {auto})", fns


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="pde,elementwise,custom,mlp")
    ap.add_argument("--malloc", choices=("pinned", "default"), default="default",
                    help=MALLOC_HELP)
    ap.add_argument("--out", default="", help="also write the report to this file")
    args = ap.parse_args(argv)
    malloc = choose_malloc(args.malloc)
    torch.set_num_threads(args.threads)
    header = (f"K = {K} tangents at once: {machine_line(args.threads)}, float32, "
              f"{args.rounds} interleaved rounds (`common.interleave`); allocator: {malloc}.")
    text = ratio_report(header, args.only.split(","), methods, args.rounds, FLOOR)
    emit_report(text, args.out, __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
