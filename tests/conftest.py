"""Shared pytest configuration.

Options:
    --opinfo-full   run every OpInfo sample in float64, float32 and complex128
                    (default: a representative subset, see tests/test_opinfo.py).
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


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
