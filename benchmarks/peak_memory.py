"""Peak memory of one linearization, next to ``torch.func.jvp`` and ``torch.func.linearize``.

    python benchmarks/peak_memory.py [--scale 10] [--repeats 5] [--out FILE]

A map's *residual* memory (what it keeps) is reported by ``bench_core``; this measures
what the linearization *needs while it runs*. Each (workload, method) pair runs in
fresh processes with glibc's default allocator (freed large blocks go back to the
system, so the resident set follows live memory): the workload's inputs are made, every
module imported, and the method run once at bench_core's size (a tenth or less of the
measured one: one-time initialisation is not counted); then it runs once on the
measured inputs, and the rise of the peak resident set size (``ru_maxrss``) over the
resident set just before is reported, the median over ``--repeats`` processes, with its
ratio to ``torch.func.jvp``'s (one JVP with a tangent: eager forward AD's working set).

Methods: ``torch.func.jvp``; ``torch.func.linearize``; ``torch_linearize.linearize``;
and the same with scaling chains not folded while tracing (``_trace.FOLD_CHAINS =
False``: every residual of the chain held until the passes run, as before stop 18).
Workloads: bench_core's elementwise chain, PDE residual and MLP with ``--scale`` times
their elements (the MLP: its batch), so that the peaks stand well above the noise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("torch.func.jvp", "torch.func.linearize", "linearize",
           "linearize, chains not folded while tracing")
WORKLOADS = ("elementwise", "pde", "mlp")


def _child(workload: str, method: str, scale: int) -> None:
    import torch

    sys.path.insert(0, HERE)
    import bench_core

    import torch_linearize as tl
    import torch_linearize._trace as trace

    torch.set_num_threads(2)
    w = getattr(bench_core, f"make_{workload}")()
    f, small = w.f, w.x
    if workload == "pde":
        n = round(small.shape[0] * scale ** 0.5)
        x = torch.randn(n, n)
    else:  # (the elementwise chain's vector; the MLP's batch)
        x = torch.randn(small.shape[0] * scale, *small.shape[1:])
    if method == "linearize, chains not folded while tracing":
        trace.FOLD_CHAINS = False
    run = {
        "torch.func.jvp": lambda x: torch.func.jvp(f, (x,), (torch.randn_like(x),)),
        "torch.func.linearize": lambda x: torch.func.linearize(f, x),
        "linearize": lambda x: tl.linearize(f, x),
        "linearize, chains not folded while tracing": lambda x: tl.linearize(f, x),
    }[method]
    run(small)  # (first-call initialisation, at a tenth of the size: not counted)
    gc.collect()
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as fh:  # the resident set now (after the warm-up's peak)
        before = int(fh.read().split()[1]) * page // 1024
    out = run(x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    print(json.dumps({"kib": peak - before, "numel": x.numel(),
                      "bytes": x.numel() * x.element_size()}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=10,
                    help="elements of the elementwise and PDE inputs, times bench_core's")
    ap.add_argument("--repeats", type=int, default=5, help="processes per method (median)")
    ap.add_argument("--out", default="", help="also write the table to this file")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], args.scale)
        return 0
    sys.path.insert(0, HERE)
    from common import emit_report, machine_line

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    lines = [
        f"Peak memory of one linearization: {machine_line(2)}; each method once in a fresh "
        f"process, {args.repeats} processes each (interleaved), glibc's default allocator; "
        "the median rise of the peak resident set over the process just before the call "
        "(MiB), and its ratio to torch.func.jvp's.",
        "",
        "| workload | input MiB | method | peak rise MiB | min-max MiB | / torch.func.jvp |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for wl in WORKLOADS:
        runs: dict[str, list] = {m: [] for m in METHODS}
        for _ in range(args.repeats):  # (methods interleaved, each in a fresh process)
            for m in METHODS:
                r = subprocess.run([sys.executable, __file__, "--scale", str(args.scale),
                                    "--child", wl, m], capture_output=True, text=True,
                                   env=env, check=True)
                runs[m].append(json.loads(r.stdout.strip().splitlines()[-1]))
        got = {m: dict(v[0], kib=statistics.median(r["kib"] for r in v),
                       lo=min(r["kib"] for r in v), hi=max(r["kib"] for r in v))
               for m, v in runs.items()}
        ref = got["torch.func.jvp"]["kib"]
        for m in METHODS:
            g = got[m]
            lines.append(f"| {wl} | {g['bytes'] / 2**20:.0f} | {m} | {g['kib'] / 1024:.0f} | "
                         f"{g['lo'] / 1024:.0f}-{g['hi'] / 1024:.0f} | {g['kib'] / ref:.2f}x |")
    emit_report("\n".join(lines), args.out, __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
