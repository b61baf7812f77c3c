"""Setup on long programs: does ``linearize`` scale linearly with the number of steps?

    python benchmarks/long_programs.py [--steps 100 200 400 800] [--rounds 5] [--out FILE]

Time-stepping loops give programs whose length grows with the number of steps, and
passes that look at a program as a whole can cost n^2 there. For each step count n,
interleaved rounds time (median ms, float64, 32 unknowns, one thread):

* ``linearize``, a structure's first linearization (``as_new_structure()``);
* one ``torch.func.jvp`` call (the yardstick, in the same rounds);

on three loops: an explicit Euler step updating its state in place
(``u.add_(u.sin(), alpha=0.01)``: forward AD writes each tangent back with ``copy_``,
which the passes turn into renames), the same out of place, and the out-of-place
states collected with ``torch.stack`` (each state is a folded region's exit: the
accuracy probes of the folds reach back to the first state; ``u + 0.3 u cos u`` has
coefficients of both signs, which are probed). The last column is the ratio's growth
from the previous n: about 1 is linear scaling, about 2 quadratic.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit_report, interleave, machine_line, markdown_table

import torch_linearize as tl
from torch_linearize._structure_cache import as_new_structure


def in_place(n: int):
    def f(u0: torch.Tensor) -> torch.Tensor:
        u = u0.clone()
        for _ in range(n):
            u.add_(u.sin(), alpha=0.01)
        return u
    return f


def out_of_place(n: int):
    def f(u: torch.Tensor) -> torch.Tensor:
        for _ in range(n):
            u = u + 0.01 * u.sin()
        return u
    return f


def trajectory(n: int):
    def f(u: torch.Tensor) -> torch.Tensor:
        us = [u]
        for _ in range(n):
            us.append(us[-1] + 0.3 * us[-1] * us[-1].cos())
        return torch.stack(us)
    return f


LOOPS = {"in-place Euler": in_place, "out-of-place Euler": out_of_place,
         "trajectory (torch.stack)": trajectory}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 200, 400, 800])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(32, generator=g, dtype=torch.float64) * 4 - 2
    t = torch.randn(32, generator=g, dtype=torch.float64)
    rows = []
    for name, make in LOOPS.items():
        previous = None
        for n in args.steps:
            f = make(n)

            def first(_i: int, f=f) -> None:
                with as_new_structure():
                    tl.linearize(f, u)

            def jvp(_i: int, f=f) -> None:
                torch.func.jvp(f, (u,), (t,))

            _, jvp_fn = tl.linearize(f, u)  # (checked once: the map is right)
            torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (u,), (t,))[1])
            s = interleave({"linearize": first, "jvp": jvp}, rounds=args.rounds)
            lin, ref = s["linearize"].median, s["jvp"].median
            ratio = lin / ref
            growth = "" if previous is None else f"{ratio / previous:.2f}"
            previous = ratio
            rows.append([name, str(n), f"{lin:.1f}", f"{ref:.1f}", f"{ratio:.2f}x", growth])
            print(rows[-1], flush=True)
    text = (f"{machine_line(1)}; medians of {args.rounds} interleaved rounds, ms.\n\n"
            + markdown_table(["loop", "steps", "linearize (new structure)", "torch.func.jvp",
                              "ratio", "ratio / previous ratio"], rows))
    emit_report(text, args.out, __file__, argv)


if __name__ == "__main__":
    main()
