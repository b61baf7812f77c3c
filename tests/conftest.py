"""Shared pytest configuration.

Options:
    --opinfo-full   run every OpInfo sample in float64, float32 and complex128
                    (default: a representative subset, see tests/test_opinfo.py).
    --shape-only-min-numel N
                    record pointwise tangent arithmetic without computing it from N
                    elements on (default: the library's threshold; 0 runs every test
                    through that path, see torch_linearize._trace._pointwise_shape_only).
    --verify-structure-cache
                    check every reuse of a simplified program (re-linearizing a structure
                    seen before) against a full run of the passes on the same trace.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption(
        "--opinfo-full",
        action="store_true",
        default=False,
        help="run every OpInfo sample in float64, float32 and complex128",
    )
    parser.addoption("--shape-only-min-numel", type=int, default=None,
                     help="size threshold for shape-only pointwise tangent arithmetic")
    parser.addoption("--verify-structure-cache", action="store_true", default=False,
                     help="check every structure-cache hit against the full passes")


def pytest_configure(config):
    n = config.getoption("--shape-only-min-numel")
    if n is not None:
        import torch_linearize._trace as trace

        trace._SHAPE_ONLY_MIN_NUMEL = n
    if config.getoption("--verify-structure-cache"):
        import torch_linearize._structure_cache as structure_cache

        structure_cache.VERIFY = True


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_structure_cache():
    """Each test starts with no simplified programs cached (some replace passes with spies
    or no-ops; a program cached by another test would bypass them)."""
    import torch_linearize._structure_cache as structure_cache

    structure_cache.cache_clear()
    yield
