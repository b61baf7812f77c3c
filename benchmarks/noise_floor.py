"""How finely this machine can compare two per-tangent applications: the noise floor.

Usage::

    python benchmarks/noise_floor.py [--rounds 150] [--out benchmarks/results/noise_floor_cpu.md]

Times the *same* operation, ``t * r`` on 1e6 float32 elements (the elementwise and
custom workloads' apply, and their hand-written floor), on eight copies of one
residual ``r``: identical values, identical layout, different buffers. Interleaved like
every benchmark here (``common.interleave``: a shuffled order each round, 3 calls each),
with a 32 MiB in-place multiply between them that evicts the caches, as the heavier
methods of ``bench_core.py`` do. Every row should read 1.00x; how far the rows spread
is the resolution of an apply/floor ratio of calls this size on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

try:
    from common import emit_report, interleave, markdown_table, pin_malloc, ratio_ci
except ImportError:  # pragma: no cover
    from benchmarks.common import emit_report, interleave, markdown_table, pin_malloc, ratio_ci

N = 1_000_000
COPIES = 8


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="", help="also write the report to this file")
    args = ap.parse_args(argv)
    malloc = pin_malloc()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    r = torch.rand(N, generator=g) + 0.5
    copies = [r.clone() for _ in range(COPIES)]
    tangents = [torch.randn(N, generator=g) for _ in range(4)]
    evict = torch.randn(8 * N, generator=g)
    fns = {f"t * copy {k}": (lambda i, c=c: tangents[i % 4] * c) for k, c in enumerate(copies)}
    fns["(cache eviction: 32 MiB in-place multiply)"] = lambda i: evict.mul_(1.0)
    samples = interleave(fns, args.rounds, 3)
    ref = samples["t * copy 0"]
    rows, ratios = [], []
    for name, s in samples.items():
        if name.startswith("("):
            continue
        lo, hi = ratio_ci(s, ref)
        ratios.append(s.median / ref.median)
        rows.append([name, f"{s.median * 1e3:.1f}", f"{s.spread:.0%}",
                     f"{s.median / ref.median:.3f}x", f"{lo:.2f}-{hi:.2f}"])
    text = "\n".join([
        f"Noise floor: torch {torch.__version__}, {platform.machine()} with {os.cpu_count()} "
        f"logical CPUs, torch.set_num_threads({args.threads}), {args.rounds} rounds x 3 calls "
        f"(`common.interleave`); allocator: {malloc}.",
        "",
        f"The same multiply `t * r` ({N:,} float32) on {COPIES} copies of one residual; every "
        "row should be 1.00x.",
        "",
        markdown_table(["operation", "median (us)", "IQR", "/ copy 0", "95% CI"], rows),
        "",
        f"Spread of identical calls: {min(ratios):.3f}x to {max(ratios):.3f}x "
        f"({(max(ratios) - min(ratios)) * 100:.0f} points).",
    ])
    emit_report(text, args.out, __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
