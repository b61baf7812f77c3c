"""Shared pytest configuration.

Options:
    --opinfo-full   run every OpInfo sample in float64, float32 and complex128
                    (default: a representative subset, see tests/test_opinfo.py).
    --shape-only-min-numel N
                    record pointwise tangent arithmetic without computing it from N
                    elements on (default: the library's threshold; 0 runs every test
                    through that path, see torch_linearize._trace._pointwise_shape_only).
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


def pytest_configure(config):
    n = config.getoption("--shape-only-min-numel")
    if n is not None:
        import torch_linearize._trace as trace

        trace._SHAPE_ONLY_MIN_NUMEL = n


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
