"""A measured dead end: tracing rule-covered operations above autograd.

    python benchmarks/function_mode_fastpath.py [--size 16] [--rounds 7]

``linearize`` traces under forward AD and a Python dispatch mode, paying the mode's
round trip for every primal operation, every tangent operation and forward AD's size
queries. One way to skip some of them: a ``TorchFunctionMode`` above autograd that, for
a functional operation with a tangent rule (here ``a + b`` of dual tensors), computes
the primal with the dispatch mode excluded, makes the output's tangent itself (here an
uninitialised tensor: what recording the rule's equation would leave), and rebuilds the
dual with ``make_dual``. This script times one such operation against eager forward AD,
with and without a pass-through dispatch mode, all in the same rounds (medians of
per-round medians, microseconds per operation). Result on the 2-CPU Xeon (stop 21): the
fast path costs what eager forward AD under the mode costs (25.6 against 23-25 us at
16x16): it replaces Python round trips with as many others (``_unpack_dual`` per
operand, the excluded primal call, ``make_dual``). See docs/design.md, "What tracing
costs, and the next tracer".
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

C = torch._C
_PY_KEYS = C.DispatchKeySet(C.DispatchKey.Python) | C.DispatchKeySet(C.DispatchKey.PythonTLSSnapshot)


class PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class RuleFastPath(TorchFunctionMode):
    """``a + b`` of duals: primal without the dispatch mode, tangent made directly."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__add__ and not kwargs:
            a, b = args
            pa, _ = torch._VF._unpack_dual(a, self.level)
            pb, _ = torch._VF._unpack_dual(b, self.level)
            with C._ExcludeDispatchKeyGuard(_PY_KEYS):
                p = pa + pb
                t = torch.empty_like(p)  # (the rule's recorded equation stands for it)
                return torch._make_dual(p, t, self.level)
        return func(*args, **(kwargs or {}))


def _time(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ops", type=int, default=10, help="operations per timed call")
    args = ap.parse_args()
    torch.set_num_threads(2)
    n = args.size
    x, y = torch.randn(n, n), torch.randn(n, n)
    with fwAD.dual_level() as level:
        a = fwAD.make_dual(x, torch.ones_like(x))
        b = fwAD.make_dual(y, torch.ones_like(y))

        def plain():
            for _ in range(args.ops):
                x + y

        def eager():
            for _ in range(args.ops):
                a + b

        def eager_mode():
            with PassThrough():
                for _ in range(args.ops):
                    a + b

        def fast_path():
            with PassThrough(), RuleFastPath(level):
                for _ in range(args.ops):
                    a + b

        methods = {"plain tensors (no AD)": plain, "eager forward AD": eager,
                   "eager forward AD + pass-through dispatch mode": eager_mode,
                   "function-mode fast path (+ the dispatch mode)": fast_path}
        samples: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(args.rounds):
            for k, fn in methods.items():
                samples[k].append(_time(fn, 200) / args.ops * 1e6)
    print(f"a + b of {n}x{n} float32 duals, us per operation (median of {args.rounds} rounds)")
    print("| method | us/op |\n| --- | ---: |")
    for k, v in samples.items():
        print(f"| {k} | {statistics.median(v):.1f} |")


if __name__ == "__main__":
    main()
