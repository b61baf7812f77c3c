"""``python -m torch_linearize bench``: the core CPU benchmark, from a source checkout.

The benchmark (``benchmarks/bench_core.py``, with its helpers in
``benchmarks/common.py`` and batched floors in ``benchmarks/bench_batch_transpose.py``)
ships with the source repository, not with the installed package. This command
looks for it next to the package (``src/torch_linearize/../../benchmarks``, which is
where it is in a checkout installed with ``pip install -e .``) and runs its
``main`` with the options given here; without a checkout it prints where to get it.

Usage::

    python -m torch_linearize bench [--quick] [--out FILE.md] [--plot FILE.png]
                                    [--threads N] [--only mlp,pde] [--no-guard]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["add_parser", "bench_script", "load_bench_core", "main"]

MODULE_NAME = "bench_core"  # the name bench_batch_transpose.py imports it by


def bench_script() -> Path | None:
    """The checkout's ``benchmarks/bench_core.py`` next to this package, or None."""
    path = Path(__file__).resolve().parent.parent.parent / "benchmarks" / "bench_core.py"
    return path if path.is_file() else None


def load_bench_core(path: Path) -> ModuleType:
    """Import ``path`` as the module ``bench_core``, with its directory on ``sys.path``
    (for ``common`` and ``bench_batch_transpose``, which import it under that name)."""
    loaded = sys.modules.get(MODULE_NAME)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path:
        return loaded
    bench_dir = str(path.parent)
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(MODULE_NAME, None)
        raise
    return module


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The ``bench_core.py`` command line for the options given to ``bench``."""
    argv: list[str] = []
    if args.quick:
        argv.append("--quick")
    for option in ("out", "plot", "threads", "only", "malloc"):
        value = getattr(args, option)
        if value is not None:
            argv += [f"--{option}", str(value)]
    if args.no_guard:
        argv.append("--no-guard")
    return argv


def main(args: argparse.Namespace) -> int:
    """Entry point for the ``bench`` subcommand; returns the process exit status."""
    path = bench_script()
    if path is None:
        print(
            "python -m torch_linearize bench: the benchmark ships with the source repository, "
            "not with the installed package (looked for benchmarks/bench_core.py next to "
            f"{Path(__file__).resolve().parent}).\n"
            "Clone the torch-linearize repository, install it with `pip install -e '.[bench]'` "
            "and run `python -m torch_linearize bench` (or `python benchmarks/bench_core.py`) "
            "there.",
            file=sys.stderr,
        )
        return 2
    module = load_bench_core(path)
    return int(module.main(_forwarded(args)) or 0)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand on ``subparsers`` (from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "bench",
        help="the core CPU benchmark (benchmarks/bench_core.py; needs the source checkout)",
        description="Runs benchmarks/bench_core.py from the source checkout this package was "
        "installed from: linearize (eager and jvp_fn.compile()), torch.func.linearize, "
        "double-vjp, torch.func.jvp and forward AD against a hand-written floor on four CPU "
        "workloads, K=64 batches through vmap, the issue's targets, a markdown report and a "
        "figure. Defaults are bench_core.py's (report and figure under "
        "benchmarks/results/ of the checkout).",
    )
    p.add_argument("--quick", action="store_true", help="fewer repeats (about two minutes)")
    p.add_argument("--out", default=None, help="markdown report to write ('' for none; default: "
                   "benchmarks/results/core_cpu.md in the checkout)")
    p.add_argument("--plot", default=None, help="figure to write, PNG ('' for none; default: "
                   "benchmarks/results/core_cpu.png in the checkout)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: bench_core.py's, 2)")
    p.add_argument("--only", default=None, help="comma-separated workloads (default: all)")
    p.add_argument("--malloc", choices=("default", "pinned"), default=None,
                   help="glibc allocator policy (default: bench_core.py's, the process's own; "
                   "pinned keeps freed memory, as the README's tables were measured)")
    p.add_argument("--no-guard", action="store_true",
                   help="do not wait for other processes to go quiet between timed rounds")
    p.set_defaults(func=main)
    return p
