"""The core guarantees on a CUDA device (skipped without one).

Run on the GPU machine with ``pytest tests/test_cuda.py``. ``TL_TEST_DEVICE=cpu``
runs the same tests on the CPU (how the module's own logic is checked on machines
without a GPU); the CUDA-only checks (allocator accounting, CuPy kernels, CUDA
graphs, Inductor) skip there.

Every check compares with an independent float64 reference on the same device:
``torch.func.jvp``/``torch.func.vjp``, eager ``forward_ad`` or, for the raw-kernel
Function, the formula itself.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.nn.functional as F

import opinfo_harness as h
import torch_linearize as tl

DEVICE = os.environ.get("TL_TEST_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (or TL_TEST_DEVICE=cpu)", allow_module_level=True)

D = torch.float64
ON_CUDA = DEVICE == "cuda"
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="CUDA-only check")


def _randn(*shape, dtype=D, seed=None):
    g = None if seed is None else torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, dtype=dtype, device=DEVICE, generator=g)


def mlp(params, x):
    for w, b in params:
        x = torch.tanh(x @ w + b)
    return x


def chain(x):
    return torch.sin(torch.exp(torch.tanh(x))) * torch.sigmoid(x) + torch.log1p(x * x)


def pde(u):
    lap = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1]
    return lap - u[1:-1, 1:-1] ** 3 + torch.exp(-u[1:-1, 1:-1])


def _workloads():
    params = [(_randn(32, 32, seed=i) / 6, _randn(32, seed=10 + i)) for i in range(4)]
    return {
        "mlp": (lambda x: mlp(params, x), _randn(8, 32, seed=1)),
        "elementwise": (chain, _randn(10_000, seed=2)),
        "pde": (pde, _randn(66, 66, seed=3)),
    }


@pytest.mark.parametrize("name", ["mlp", "elementwise", "pde"])
def test_workloads_match_torch_func_jvp_on_device(name):
    f, x = _workloads()[name]
    y, jvp_fn = tl.linearize(f, x)
    assert y.device == x.device
    torch.testing.assert_close(y, f(x))
    for seed in range(3):
        t = _randn(*x.shape, seed=100 + seed)
        out = jvp_fn(t)
        assert out.device == x.device
        torch.testing.assert_close(out, torch.func.jvp(f, (x,), (t,))[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "elementwise", "pde"])
def test_relinearizing_reuses_the_program_on_device(name, monkeypatch):
    # A structure's third and later linearizations replay the recorded passes on device
    # (verification mode: each reuse is compared with a full run of the passes).
    import torch_linearize._structure_cache as sc

    monkeypatch.setattr(sc, "VERIFY", True)
    sc.cache_clear()
    f, x = _workloads()[name]
    for k in range(4):
        xk = x * (1 + 0.1 * k)
        t = _randn(*x.shape, seed=20 + k)
        _, jvp_fn = tl.linearize(f, xk)
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (xk,), (t,))[1])
    assert sc.stats["hits"] == 2


def test_apply_runs_no_primal_kernel_on_device():
    from helpers import OpCounter

    x = _randn(1000, seed=4)
    _, jvp_fn = tl.linearize(lambda v: torch.sin(torch.exp(torch.tanh(v))), x)
    t = _randn(1000, seed=5)
    with OpCounter() as c:
        jvp_fn(t)
    ran = {str(k) for k in c.counts}
    assert not any(n in k for k in ran for n in ("sin", "exp", "tanh", "cos")), ran


@pytest.mark.parametrize("name", ["mlp", "elementwise", "pde"])
def test_batched_and_transposed_maps_on_device(name):
    f, x = _workloads()[name]
    y, jvp_fn = tl.linearize(f, x)
    ts = torch.stack([_randn(*x.shape, seed=200 + k) for k in range(4)])
    batched = torch.vmap(jvp_fn)(ts)
    for k in range(4):
        torch.testing.assert_close(batched[k], torch.func.jvp(f, (x,), (ts[k],))[1],
                                   rtol=1e-10, atol=1e-12)
    # (the elementwise map runs its program directly on the stacked tangents)
    torch.testing.assert_close(jvp_fn.batched(ts), batched, rtol=1e-12, atol=1e-14)
    assert bool(jvp_fn._batched_run) == (name == "elementwise")
    ct = _randn(*y.shape, seed=300)
    (got,) = jvp_fn.transpose()(ct)
    (want,) = torch.func.vjp(f, x)[1](ct)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_jacobian_on_device():
    f, x = _workloads()["mlp"]
    x = x[:2, :8].contiguous()
    params = [(_randn(8, 8, seed=i), _randn(8, seed=20 + i)) for i in range(2)]

    def g(v):
        return mlp(params, v)

    _, jvp_fn = tl.linearize(g, x)
    torch.testing.assert_close(jvp_fn.jacobian(), torch.func.jacfwd(g)(x))


def test_random_ops_share_the_draw_on_device():
    x = _randn(4096, seed=6)

    def f(v):
        return F.dropout(torch.sin(v), p=0.5, training=True) * v

    torch.manual_seed(7)
    y, jvp_fn = tl.linearize(f, x)
    t = _randn(4096, seed=8)
    torch.manual_seed(7)
    y_ref, t_ref = torch.func.jvp(f, (x,), (t,))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(jvp_fn(t), t_ref)
    assert (y == 0).any() and (y != 0).any()  # a real mask was drawn


class _DeviceScale(torch.autograd.Function):
    """Opaque: forward and jvp read scalars with .item() and run a torch op on the device."""

    calls = {"forward": 0, "setup_context": 0, "jvp": 0}

    @staticmethod
    def forward(x, s):
        _DeviceScale.calls["forward"] += 1
        k = float(s.item())
        return torch.sin(x) * k

    @staticmethod
    def setup_context(ctx, inputs, output):
        _DeviceScale.calls["setup_context"] += 1
        x, s = inputs
        ctx.k = float(s.item())
        ctx.save_for_forward(x)

    @staticmethod
    def jvp(ctx, dx, ds):
        _DeviceScale.calls["jvp"] += 1
        (x,) = ctx.saved_tensors
        out = torch.cos(x) * ctx.k * dx
        if ds is not None:
            out = out + torch.sin(x) * ds.item()
        return out

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError


def test_custom_function_runs_forward_once_and_jvp_per_tangent_on_device():
    x, s = _randn(512, seed=9), torch.tensor(1.5, dtype=D, device=DEVICE)
    for k in _DeviceScale.calls:
        _DeviceScale.calls[k] = 0
    y, jvp_fn = tl.linearize(lambda a, b: _DeviceScale.apply(a, b) + a, x, s)
    assert _DeviceScale.calls == {"forward": 1, "setup_context": 1, "jvp": 0}
    for seed in range(3):
        tx, ts = _randn(512, seed=10 + seed), _randn((), seed=20 + seed)
        want = torch.cos(x) * 1.5 * tx + torch.sin(x) * ts + tx
        torch.testing.assert_close(jvp_fn(tx, ts), want)
    assert _DeviceScale.calls == {"forward": 1, "setup_context": 1, "jvp": 3}
    torch.testing.assert_close(y, torch.sin(x) * 1.5 + x)


class _DeviceNewton(torch.autograd.Function):
    """y with y^3 + y = x by Newton steps (many small device operations); saves dy/dx."""

    modes: list = []

    @staticmethod
    def forward(x):
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        _DeviceNewton.modes.append(_get_current_dispatch_mode())
        y = x / 2
        for _ in range(8):
            y = y - (y * y * y + y - x) / (3 * y * y + 1)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(1 / (3 * output * output + 1))

    @staticmethod
    def jvp(ctx, t):
        (d,) = ctx.saved_tensors
        return t * d

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError


def test_custom_function_forward_runs_outside_the_tracer_on_device():
    # forward computes primal values only: it runs at eager speed, outside the tracer's
    # dispatch mode; what it saves is counted as the map's own memory (and nothing else is)
    x = _randn(1 << 18, seed=15)
    _DeviceNewton.modes.clear()
    if ON_CUDA:
        torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated() if ON_CUDA else 0
    y, jvp_fn = tl.linearize(_DeviceNewton.apply, x)
    assert _DeviceNewton.modes == [None]
    torch.testing.assert_close(y ** 3 + y, x)
    t = _randn(1 << 18, seed=16)
    torch.testing.assert_close(jvp_fn(t), t / (3 * y * y + 1))
    assert jvp_fn.residual_bytes == x.numel() * x.element_size()  # d
    if ON_CUDA:
        del y
        gc.collect()
        held = torch.cuda.memory_allocated() - base
        assert abs(held - jvp_fn.residual_bytes) <= 1 << 16, (held, jvp_fn.residual_bytes)


class _DeviceSin(torch.autograd.Function):
    """One tensor in, one out, a lean jvp: what the one-tensor entry calls inline."""

    jvps = 0

    @staticmethod
    def forward(x):
        return torch.sin(x) * 1.5

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, dx):
        _DeviceSin.jvps += 1
        (x,) = ctx.saved_tensors
        return torch.cos(x) * 1.5 * dx

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError


def test_one_tensor_entry_calls_a_custom_functions_jvp_inline_on_device(monkeypatch):
    from torch_linearize._opaque import _OpaqueNode
    from torch_linearize._program import _inlined_nodes

    x = _randn(4, 256, seed=40)

    def f(v):  # an intermediate feeds the Function: nothing the user can reach to watch
        return _DeviceSin.apply(torch.exp(v * 0.1)).cos()

    _, jvp_fn = tl.linearize(f, x)
    prog = jvp_fn._program
    nodes = {k for k, e in enumerate(prog.eqns) if not isinstance(e.fn, torch._ops.OpOverload)}
    assert nodes and _inlined_nodes(prog) == nodes and jvp_fn._fast1 is not None
    with monkeypatch.context() as m:  # the generated code calls jvp itself, not the node
        m.setattr(_OpaqueNode, "__call__", lambda *a: pytest.fail("node called"))
        for seed in range(3):
            t = _randn(4, 256, seed=41 + seed)
            _DeviceSin.jvps = 0
            out = jvp_fn(t)
            assert _DeviceSin.jvps == 1 and out.device == x.device
            u = torch.exp(x * 0.1)
            want = -torch.sin(torch.sin(u) * 1.5) * torch.cos(u) * 1.5 * u * 0.1 * t
            torch.testing.assert_close(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaled_dot_product_attention_on_device(dtype):
    # On CUDA, SDPA picks a fused kernel (efficient attention for float32) without a
    # forward-AD formula; while tracing, a call with a tangent runs the math
    # implementation. Checked against float64 torch.func.jvp/vjp of the math form.
    def attn(q):
        return F.scaled_dot_product_attention(q, q.flip(-1), 2 * q, is_causal=True)

    def attn_math(q):
        return torch.ops.aten._scaled_dot_product_attention_math(
            q, q.flip(-1), 2 * q, is_causal=True)[0]

    x = _randn(2, 4, 64, 32, seed=45)
    t, ct = _randn(2, 4, 64, 32, seed=46), _randn(2, 4, 64, 32, seed=47)
    tol = {"rtol": 2e-4, "atol": 2e-4} if dtype == torch.float32 else {}
    y, jvp_fn = tl.linearize(attn, x.to(dtype))
    torch.testing.assert_close(y.double(), attn_math(x), **tol)
    torch.testing.assert_close(jvp_fn(t.to(dtype)).double(),
                               torch.func.jvp(attn_math, (x,), (t,))[1], **tol)
    (got,) = jvp_fn.transpose()(ct.to(dtype))
    torch.testing.assert_close(got.double(), torch.func.vjp(attn_math, x)[1](ct)[0], **tol)


def test_large_batches_on_device_run_as_one_batch():
    # batched's automatic chunking is a CPU rule (cache-sized pieces for a memory-bound
    # program); on CUDA the whole batch is one launch per op.
    f, x = _workloads()["pde"]
    _, jvp_fn = tl.linearize(f, x)
    ts = _randn(256, *x.shape, seed=500)  # 8.9 MB
    chunk = jvp_fn._auto_chunk((ts,), 0)
    assert (chunk is None) if ON_CUDA else (0 < chunk < 256), chunk
    want = torch.func.vmap(lambda t: torch.func.jvp(f, (x,), (t,))[1])(ts)
    torch.testing.assert_close(jvp_fn.batched(ts), want, rtol=1e-10, atol=1e-12)


def _cupy():
    cp = pytest.importorskip("cupy")
    return cp


_SCALE_SRC = r"""
extern "C" __global__ void scale_sin(const double* x, double* y, double k, long long n, int deriv) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = k * (deriv ? cos(x[i]) : sin(x[i]));
}
extern "C" __global__ void mul(const double* a, const double* b, double* y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a[i] * b[i];
}
"""


@needs_cuda
def test_hand_written_cuda_kernel_in_forward_and_jvp():
    """A raw CUDA kernel (CuPy RawKernel on torch's data pointers) in forward and jvp.

    ``torch.func.jvp`` cannot run it ("Cannot access data pointer"); linearize calls the
    Function's jvp with plain tensors, so it works, and matches the formula.
    """
    cp = _cupy()
    mod = cp.RawModule(code=_SCALE_SRC)
    scale_sin, mul = mod.get_function("scale_sin"), mod.get_function("mul")

    def launch(kernel, *args, n):
        stream = cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        with stream:
            kernel(((n + 255) // 256,), (256,), args)

    class RawSin(torch.autograd.Function):
        @staticmethod
        def forward(x, k: float):
            x = x.contiguous()
            y = torch.empty_like(x)
            launch(scale_sin, x.data_ptr(), y.data_ptr(), cp.float64(k), cp.int64(x.numel()),
                   cp.int32(0), n=x.numel())
            return y

        @staticmethod
        def setup_context(ctx, inputs, output):
            x, k = inputs
            x = x.contiguous()
            ctx.k = k
            d = torch.empty_like(x)  # k cos(x), computed once by the raw kernel
            launch(scale_sin, x.data_ptr(), d.data_ptr(), cp.float64(k), cp.int64(x.numel()),
                   cp.int32(1), n=x.numel())
            ctx.save_for_forward(d)

        @staticmethod
        def jvp(ctx, t, _):
            (d,) = ctx.saved_tensors
            t = t.contiguous()
            out = torch.empty_like(t)
            launch(mul, d.data_ptr(), t.data_ptr(), out.data_ptr(), cp.int64(t.numel()),
                   n=t.numel())
            return out

        @staticmethod
        def backward(ctx, g):
            raise NotImplementedError

    x = _randn(100_003, seed=11)
    y, jvp_fn = tl.linearize(lambda v: RawSin.apply(v, 2.0) * v, x)
    torch.testing.assert_close(y, 2.0 * torch.sin(x) * x)
    t = _randn(100_003, seed=12)
    want = torch.func.jvp(lambda v: 2.0 * torch.sin(v) * v, (x,), (t,))[1]
    torch.testing.assert_close(jvp_fn(t), want)
    with pytest.raises(Exception, match="data pointer"):
        torch.func.jvp(lambda v: RawSin.apply(v, 2.0) * v, (x,), (t,))


@needs_cuda
def test_residual_bytes_match_the_allocator_and_release_frees_them():
    torch.cuda.synchronize()
    x = _randn(1 << 20, seed=13)  # 8 MiB
    gc.collect()
    base = torch.cuda.memory_allocated()
    y, jvp_fn = tl.linearize(lambda v: torch.sin(v) * torch.exp(v), x)
    del y
    gc.collect()
    held = torch.cuda.memory_allocated() - base
    assert jvp_fn.residual_bytes > 0
    # Everything the map holds on the device is what it reports (allocator rounding aside).
    assert abs(held - jvp_fn.residual_bytes) <= 1 << 16, (held, jvp_fn.residual_bytes)
    assert jvp_fn.residual_bytes <= 2 * x.numel() * x.element_size()
    jvp_fn.release()
    gc.collect()
    assert torch.cuda.memory_allocated() - base <= 1 << 16
    with pytest.raises(tl.ReleasedError):
        jvp_fn(x)


@needs_cuda
def test_cuda_graph_replay_matches_for_new_tangents():
    f, x = _workloads()["pde"]
    _, jvp_fn = tl.linearize(f, x)
    graphed = jvp_fn.cuda_graph()
    for seed in range(3):
        t = _randn(*x.shape, seed=400 + seed)
        torch.testing.assert_close(graphed(t), torch.func.jvp(f, (x,), (t,))[1])


@needs_cuda
def test_cuda_graph_with_several_and_nested_inputs_and_outputs():
    # Several inputs: one fused _foreach_copy_ into the static buffers; pytree in/out.
    a, b, c = (torch.tensor(v, dtype=D, device=DEVICE) for v in (2.0, 3.0, 5.0))
    x = _randn(7, seed=15)

    def f(p, x):
        return {"y": p["a"] * x**2 + p["b"] * x + p["c"], "s": (x * p["a"]).sum()}

    p = {"a": a, "b": b, "c": c}
    _, jvp_fn = tl.linearize(f, p, x)
    for clone in (True, False):
        graphed = jvp_fn.cuda_graph(clone_outputs=clone)
        results = []
        for seed in range(3):
            tp = {k: _randn((), seed=50 + 3 * seed + i) for i, k in enumerate("abc")}
            tx = _randn(7, seed=60 + seed)
            got = graphed(tp, tx)
            want = torch.func.jvp(f, (p, x), (tp, tx))[1]
            torch.testing.assert_close(got, want)
            results.append((got["y"], want["y"]))
        # Cloned outputs survive later calls; static ones are overwritten by them.
        first_got, first_want = results[0]
        if clone:
            torch.testing.assert_close(first_got, first_want)
        else:
            assert first_got.data_ptr() == results[-1][0].data_ptr()


@needs_cuda
def test_cuda_graph_validates_tangents_and_watches_the_point():
    x = _randn(100, seed=16)
    primal = x.clone()
    # v[:50].sum() * v keeps the primal itself as a residual, watched for in-place changes
    _, jvp_fn = tl.linearize(lambda v: torch.sin(v) * v + v[:50].sum() * v, primal)
    graphed = jvp_fn.cuda_graph()
    graphed(_randn(100, seed=17))
    with pytest.raises(ValueError, match="shape"):
        graphed(_randn(99, seed=18))
    with pytest.raises(ValueError, match="dtype"):
        graphed(_randn(100, dtype=torch.float32, seed=19))
    primal.add_(1.0)  # the point changed in place: the residuals no longer match it
    with pytest.raises(tl.StaleResidualError):
        graphed(_randn(100, seed=20))
    jvp_fn.release()
    with pytest.raises(tl.ReleasedError):
        graphed(_randn(100, seed=21))


@needs_cuda
def test_inductor_compiled_map_on_device_reuses_code_across_points():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    t = _randn(4096, dtype=torch.float32, seed=14)
    graphs = []
    for seed in range(3):
        x = _randn(4096, dtype=torch.float32, seed=30 + seed)
        _, jvp_fn = tl.linearize(chain, x)
        c = jvp_fn.compile()  # Inductor: Triton kernels on the GPU
        torch.testing.assert_close(c(t), torch.func.jvp(chain, (x,), (t,))[1],
                                   rtol=1e-5, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs


# A representative OpInfo subset on the device (the full sweep on any device:
# ``python tests/opinfo_harness.py --device cuda``).
_OPINFO_SUBSET = (
    "sin", "exp", "tanh", "sigmoid", "mul", "div.no_rounding_mode", "add", "matmul", "nn.functional.conv2d",
    "nn.functional.layer_norm", "softmax", "log_softmax", "cumsum", "sum", "mean", "var",
    "linalg.solve", "linalg.eigh", "nn.functional.dropout", "index_select", "gather",
    "nn.functional.max_pool2d", "roll", "where", "nn.functional.gelu", "max_pool2d_with_indices_backward",
    "nn.functional.cross_entropy", "nn.functional.interpolate.bilinear", "logsumexp",
    "nn.functional.embedding", "linalg.svd",
)
_OPS = [op for op in h.forward_ad_ops() if h.op_full_name(op) in _OPINFO_SUBSET]


@pytest.mark.parametrize("op", [pytest.param(op, id=h.op_full_name(op)) for op in _OPS])
def test_opinfo_subset_on_device(op):
    name = h.op_full_name(op)
    failures, checked = h.check_op(op, ((torch.float64, 4), (torch.float32, 2)),
                                   ("jvp", "vmap", "transpose"), DEVICE)
    if checked == 0:
        pytest.skip(f"{name}: no sample the reference can run on {DEVICE}")
    assert not failures, "\n".join(failures[:3])


def test_opinfo_subset_names_real_ops():
    missing = set(_OPINFO_SUBSET) - {h.op_full_name(op) for op in _OPS}
    assert not missing, f"not OpInfos with forward AD in this torch: {sorted(missing)}"
