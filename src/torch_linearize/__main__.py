"""Command line: ``python -m torch_linearize <command> [options]``.

Commands:

* ``demo``: the PyTorch-forum example side by side (call counts, values checked
  against the analytic derivative) and a timing table of K sequential tangents.
* ``bench``: the core CPU benchmark (``benchmarks/bench_core.py``, from the
  source checkout): report, figure and the performance targets.

Each command lives in its own module exposing ``add_parser(subparsers)``, which
registers the subcommand and sets ``func`` (``func(args) -> exit status``).
To add one, append its module's ``add_parser`` to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__, _bench_cli, _demo

COMMANDS: list[Callable[[Any], argparse.ArgumentParser]] = [
    _demo.add_parser,
    _bench_cli.add_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m torch_linearize`` argument parser, with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="python -m torch_linearize",
        description="torch-linearize: evaluate a PyTorch function once, apply its JVP many "
        "times.",
    )
    parser.add_argument("--version", action="version", version=f"torch-linearize {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    for add_parser in COMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
