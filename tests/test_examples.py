"""The scripts in ``examples/`` and ``benchmarks/gpu.py --cpu-smoke`` run to completion.

Each runs in a fresh interpreter (as a user would run it) with this checkout's
``src`` first on ``PYTHONPATH``. The examples check their own results against
analytic derivatives and exit non-zero if a check fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], tmp_path, timeout: float = 600, **env_extra) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(REPO, "src"), *filter(None, [env.get("PYTHONPATH")])])
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")  # hermetic C++ builds
    env.update(env_extra)
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}"
    return out


@pytest.mark.parametrize("script, expect", [
    ("forum_custom_function.py", "calls: {'forward': 1, 'setup_context': 1, 'jvp': 5}"),
    ("forum_custom_op.py", "linearize calls: {'kernel': 1, 'setup_context': 1, 'jvp': 5}"),
    ("forum_pure_pytorch.py", "gradient (transpose): [16.0, 4.0, 2.0, 1.0]"),
    ("custom_kernel_cpp.py", "64 tangents with vmap: tangent kernel calls: 1"),
])
def test_example_runs(script, expect, tmp_path):
    out = _run([os.path.join("examples", script)], tmp_path)
    assert expect in out, out[-4000:]


def _triton_runnable() -> str:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs a CUDA GPU (or TRITON_INTERPRET=1)"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not importable ({e})"
    return ""


@pytest.mark.skipif(bool(_triton_runnable()), reason=_triton_runnable() or "runnable")
def test_triton_example_runs(tmp_path):
    out = _run([os.path.join("examples", "triton_kernels.py")], tmp_path)
    assert "fails as expected" in out, out[-4000:]


def test_gpu_benchmark_cpu_smoke(tmp_path):
    results = tmp_path / "gpu_smoke.md"
    _run([os.path.join("benchmarks", "gpu.py"), "--cpu-smoke", "--out", str(results)], tmp_path)
    text = results.read_text()
    for key in ("elementwise", "mlp"):
        assert f"### `{key}`" in text, text
    for method in ("floor (hand-written)", "torch_linearize.linearize", "torch.func.linearize",
                   "torch.func.jvp", "forward_ad (eager)", "linearize + vmap"):
        assert text.count(f"| {method}") >= 2, (method, text)
    for bad in ("**ERROR**", "**FAILED**", "**failed**", "**above tolerance**"):
        assert bad not in text, text
    assert "Run took" in text
