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
    ("implicit_layer.py", "checks passed"),
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


def test_setup_breakdown_stages_add_up_and_unwrap():
    """``benchmarks/setup_breakdown.py``'s stage table: each stage is timed inside the whole
    call (the passes' parts inside the passes), and the wrapped functions are restored."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import setup_breakdown as sb
    finally:
        sys.path.pop(0)
    before = [getattr(mod, name) for mod, name, _ in sb.STAGES]

    def f(u: torch.Tensor) -> torch.Tensor:  # a stencil and a product: the passes fold it
        return u[2:] + u[:-2] - 2 * u[1:-1] - u[1:-1] ** 3

    rows = sb.stage_rows("t", f, torch.randn(64, dtype=torch.float64), 5, 1.0)
    assert [getattr(mod, name) for mod, name, _ in sb.STAGES] == before
    ms = {r.split(" | ")[1]: float(r.split(" | ")[2]) for r in rows}
    whole = ms.pop("**the whole first linearization**")
    assert ms.pop("the same, right after a garbage collection") > 0
    assert {"trace and the rest", "simplification passes", "  pointwise folds",
            "    of which the regions' coefficients", "code generation"} <= set(ms)
    assert all(v >= 0 for v in ms.values()), ms
    assert ms["    of which the regions' coefficients"] <= ms["  pointwise folds"]
    assert ms["  pointwise folds"] <= ms["simplification passes"]
    top = sum(v for k, v in ms.items() if not k.startswith(" "))
    assert top == pytest.approx(whole, rel=0.5), (top, whole)


def test_overhead_benchmark_runs_and_checks_its_maps(tmp_path):
    """``benchmarks/bench_overhead.py`` checks every map against torch.func.jvp before
    timing it; both tables (per call, setup) come out with a row per workload."""
    results = tmp_path / "overhead.md"
    _run([os.path.join("benchmarks", "bench_overhead.py"), "--calls", "200", "--setup-calls",
          "40", "--out", str(results)], tmp_path)
    text = results.read_text()
    assert text.count("| forum quadratic, 4 scalars (plain PyTorch) |") == 2, text
    assert text.count("| elementwise chain, 8 ops, 16 elements |") == 2, text
    setup = text.split("Setup, microseconds")[1]
    ratios = [float(c.strip()[:-1]) for line in setup.splitlines() if line.startswith("| ")
              and "x |" in line for c in line.split("|")[1:-1] if c.strip().endswith("x")]
    assert len(ratios) == 6 and all(r > 0 for r in ratios), setup


def test_the_custom_ops_guide_snippet_runs(tmp_path):
    """docs/custom_ops.md's first example is complete code (until stop 22 it called an
    undefined kernel and passed setup_context=... to register_autograd)."""
    import re

    with open(os.path.join(REPO, "docs", "custom_ops.md")) as fh:
        code = re.search(r"```python\n(.*?)```", fh.read(), re.S).group(1)
    check = ("\nref = torch.func.jvp(lambda x: (x**3).sin(), (x,), (t,))[1]\n"
             "assert torch.allclose(dy, ref)\n"
             "assert torch.allclose(g, torch.func.vjp(lambda x: (x**3).sin(), x)[1](dy)[0])\n"
             "print('snippet ok')\n")
    script = tmp_path / "snippet.py"
    script.write_text(code + check)
    assert "snippet ok" in _run([str(script)], tmp_path, timeout=300)
