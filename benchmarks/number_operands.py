"""A measured lead and a measured dead end: Python numbers as operands (``4 * x``).

    python benchmarks/number_operands.py [--rounds 150] [--out FILE]

Python's ``4 * x`` calls ``mul.Tensor`` with the number wrapped in a 0-d tensor. Forward
AD treats that as an operand without a tangent and runs its formula on an "efficient
zero": ``t * 4 + 0 * x``. Under linearize's dispatch mode that is 7 dispatches (and a
full-size ``0 * x`` kernel, and an ``x + 0`` equation for the passes) where
``mul.Scalar`` (formula ``t * 4``) takes 2; ``x / 2`` is 15 against 2.

Rows, in ratios to one ``torch.func.jvp`` of the workload's ``f`` timed in the same
interleaved rounds (``common.interleave``), each a structure's first linearization:

* ``linearize(f)``: as shipped.
* ``linearize(f), Scalar overloads in f``: the PDE's ``f`` with ``4 * u`` written as
  ``aten.mul.Scalar(u, 4)``: the lead, what a tracer that routes numbers to the Scalar
  overloads would save (a rule table would do so by construction).
* ``linearize(f), operators patched``: one way to route them without changing ``f``:
  ``torch.Tensor.__mul__``, ``__rmul__``, ``__truediv__``, ``__add__``, ``__radd__``,
  ``__sub__`` and the in-place forms replaced, for the duration of each linearize call,
  by functions calling the Scalar overload for a floating tensor and an int/float. It is
  what ``_custom_function.function_patch`` would install with its hooks. The dead end:
  assigning a type's attributes costs ~7 us per name and resets CPython's caches for
  the type's attribute lookups, and from Python 3.13 a class modified about 1000 times
  is never cached again: every method call on every tensor of the process would stay
  slower after some 50 linearize calls. The script's last table shows it on whatever
  Python runs it: method calls on a small class before and after 1100 modifications
  (3.11.7: 76 / 57 ns, 3.12.1: 67 / 50 ns, 3.13.0: 58 / 120 ns on the Xeon).
* ``linearize(f), function mode``: the other way, a ``TorchFunctionMode`` active while
  ``f`` runs that calls the Scalar overload for ``Tensor.mul``/``div``/``add``/``sub``
  (what ``x * 4`` reaches a mode as) and their in-place forms, with the tracer's own
  code run with torch-function handling off (``torch._C.DisableTorchFunction`` around
  ``Tracer.__torch_dispatch__``, patched here) so that only ``f``'s calls pay the
  mode's round trip. Per-thread, and no type is modified; it saved 0.03x and 0.18x of
  the PDE's first linearization in two runs (the file below, and an ad-hoc one). The
  dead end: PyTorch's own modules branch on ``torch.overrides.has_torch_function``,
  which any such mode makes true, so ``f`` no
  longer runs as it does in eager. ``nn.TransformerEncoder`` in eval mode with a padding
  mask skips its nested-tensor path and returns no zeros at the padded positions: 13
  tests of ``tests/test_overrides.py`` fail with it (stop 24), and any user code that
  checks ``has_torch_function`` would change its path the same way. (Both route
  ``x - c`` to ``add.Scalar(x, -c)``, the same IEEE operation: ``sub.Scalar``'s
  forward-AD formula returns the input's tangent itself, which the tracer has to copy,
  docs/design.md section 2.)

Result on the 2-CPU Xeon (stop 24, glibc's default allocator), in ratios to one
torch.func.jvp, in three runs before the function-mode row existed: PDE 1.52 / 1.54 /
1.58x as shipped, 1.35 / 1.42 / 1.43x with the Scalar overload, 1.42 / 1.47 / 1.50x
patched; the elementwise chain (no numbers) 1.43 / 1.42 / 1.45x as shipped, 1.40 / 1.43
/ 1.45x patched; the MLP 0.63 / 0.67 / 0.65x, 0.65 / 0.69 / 0.66x. A fourth run, with
it: ``benchmarks/results/number_operands_cpu.md``. The saving is real (about 0.1x of
the PDE's first linearization) and belongs to the next tracer (a rule for ``mul.Tensor``
with a number operand is ``t * c``); neither a patch nor a mode is how to get it. See
docs/design.md, "What tracing costs, and the next tracer".
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_core
from common import emit_report, interleave

import torch_linearize as tl
from torch_linearize._structure_cache import as_new_structure
from torch_linearize._trace import Tracer

aten = torch.ops.aten
_MISSING = object()
_OPERATORS = {
    "__mul__": aten.mul.Scalar, "__rmul__": aten.mul.Scalar, "__add__": aten.add.Scalar,
    "__radd__": aten.add.Scalar, "__sub__": aten.sub.Scalar, "__truediv__": aten.div.Scalar,
    "__imul__": aten.mul_.Scalar, "__iadd__": aten.add_.Scalar, "__isub__": aten.sub_.Scalar,
    "__itruediv__": aten.div_.Scalar,
}


class PatchedOperators:
    """``torch.Tensor``'s arithmetic operators routed to the Scalar overloads for an
    int/float operand of a strided floating tensor, while the context is active."""

    def __enter__(self):
        self.saved = {}
        for name, op in _OPERATORS.items():
            self.saved[name] = torch.Tensor.__dict__.get(name, _MISSING)
            setattr(torch.Tensor, name, self._make(getattr(torch.Tensor, name), op._op))
        return self

    def __exit__(self, *exc):
        for name, saved in self.saved.items():
            if saved is _MISSING:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved)
        return False

    @staticmethod
    def _make(original, call):
        def operator(self, other):
            if type(other) in (int, float) and type(self) is torch.Tensor and \
                    self.layout is torch.strided and self.is_floating_point():
                return call(self, other)
            return original(self, other)

        return operator


_BASE = torch._C.TensorBase
_MODE_REWRITES = {
    _BASE.mul: (aten.mul.Scalar._op, False), _BASE.div: (aten.div.Scalar._op, False),
    _BASE.add: (aten.add.Scalar._op, False), _BASE.sub: (aten.add.Scalar._op, True),
    _BASE.mul_: (aten.mul_.Scalar._op, False), _BASE.div_: (aten.div_.Scalar._op, False),
    _BASE.add_: (aten.add_.Scalar._op, False), _BASE.sub_: (aten.add_.Scalar._op, True),
}


class NumberMode(TorchFunctionMode):
    """The Scalar overloads for tensor-number arithmetic, as a ``TorchFunctionMode``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        hit = _MODE_REWRITES.get(func)
        if hit is not None and not kwargs and len(args) == 2:
            x, c = args
            if type(c) in (int, float) and type(x) is torch.Tensor and \
                    x.layout is torch.strided and x.is_floating_point() and \
                    torch._C._len_torch_function_stack() == 0:
                return hit[0](x, -c if hit[1] else c)  # (x - c as x + (-c): exact)
        return func(*args, **(kwargs or {}))


@contextmanager
def tracer_without_torch_function():
    """``Tracer.__torch_dispatch__`` run with torch-function handling off."""
    original = Tracer.__torch_dispatch__

    def dispatch(self, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunction():
            return original(self, func, types, args, kwargs)

    Tracer.__torch_dispatch__ = dispatch
    try:
        yield
    finally:
        Tracer.__torch_dispatch__ = original


def pde_scalar(u: torch.Tensor) -> torch.Tensor:
    """bench_core's PDE with ``4 * u[...]`` as ``aten.mul.Scalar(u[...], 4)``."""
    lap = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - aten.mul.Scalar(u[1:-1, 1:-1], 4)
    return lap - u[1:-1, 1:-1] ** 3


def _methods(w: bench_core.Workload, pde: bool) -> dict:
    f, x, t = w.f, w.x, torch.randn_like(w.x)

    def new(fn=f):
        with as_new_structure():
            tl.linearize(fn, x)

    def patched():
        # (as the library would: installed with, and only for, each trace)
        with as_new_structure(), PatchedOperators():
            tl.linearize(f, x)

    def under_mode(x):
        with NumberMode():
            return f(x)

    def function_mode():
        with tracer_without_torch_function():
            new(under_mode)

    methods = {
        "torch.func.jvp": lambda i: torch.func.jvp(f, (x,), (t,)),
        "linearize(f)": lambda i: new(),
        "linearize(f), operators patched": lambda i: patched(),
        "linearize(f), function mode": lambda i: function_mode(),
    }
    if pde:
        torch.testing.assert_close(pde_scalar(x), f(x), rtol=0, atol=0)
        methods["linearize(f), Scalar overloads in f"] = lambda i: new(pde_scalar)
    return methods


def type_cache_rows() -> list[str]:
    """Method calls on a class before and after 1100 modifications of it (ns per call)."""

    class Base:
        def meth(self):
            return 1

    class Modified(Base):
        pass

    obj = Modified()

    def per_call() -> float:
        t0 = time.perf_counter()
        for _ in range(1_000_000):
            obj.meth()
        return (time.perf_counter() - t0) * 1e3  # (ns per call: 1e9 / 1e6)

    before = min(per_call() for _ in range(3))
    for _ in range(1100):  # (what 55 linearize calls patching 10 operators would do)
        Modified.__mul__ = lambda self, other: None
        del Modified.__mul__
        obj.meth()
    after = min(per_call() for _ in range(3))
    return ["", f"Python {sys.version.split()[0]}: a method call on a class, {before:.0f} ns; "
            f"after 1100 modifications of the class, {after:.0f} ns ({after / before:.2f}x)."]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--out", default="", help="also write the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    lines = [
        f"Numbers as operands: torch {torch.__version__}, {os.cpu_count()} logical CPUs, "
        f"{args.rounds} rounds (common.interleave), medians; each linearize a structure's "
        "first linearization (`as_new_structure`).",
        "",
        "| workload | method | ms | / torch.func.jvp |",
        "| --- | --- | ---: | ---: |",
    ]
    for make in (bench_core.make_pde, bench_core.make_elementwise, bench_core.make_mlp):
        w = make()
        med = {k: s.median for k, s in interleave(_methods(w, make is bench_core.make_pde),
                                                    args.rounds, warmup=10).items()}
        ref = med["torch.func.jvp"]
        for k, v in med.items():
            lines.append(f"| {w.key} | {k} | {v:.3g} | {v / ref:.2f}x |")
    lines += type_cache_rows()
    emit_report("\n".join(lines), args.out, __file__, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
