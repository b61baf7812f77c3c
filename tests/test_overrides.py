"""Tests for ``torch_linearize/_overrides.py``: calls routed to differentiable forms."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_linearize as tl
from helpers import central_difference

D = torch.float64


def _masks():
    keep = torch.ones(5, 5, dtype=torch.bool).tril()
    row = keep.clone()
    row[0] = False  # a fully masked row
    return keep, row


@pytest.mark.parametrize("case", ["causal", "float_mask_scale", "bool_mask", "masked_row", "gqa"])
def test_scaled_dot_product_attention(case):
    # The kernel SDPA selects on CPU (flash attention) has no forward-AD formula, so eager
    # forward AD and torch.func.jvp fail on it; while tracing, a call with a tangent runs
    # PyTorch's math implementation. Checked against finite differences and against
    # torch.func.vjp for the transpose.
    keep, row = _masks()
    fns = {
        "causal": lambda x: F.scaled_dot_product_attention(x, x.flip(-1), 2 * x, is_causal=True),
        "float_mask_scale": lambda x: F.scaled_dot_product_attention(
            x, x.flip(-1), 2 * x, attn_mask=torch.linspace(-1, 1, 25, dtype=D).view(5, 5),
            scale=0.3),
        "bool_mask": lambda x: F.scaled_dot_product_attention(x, x, x, attn_mask=keep),
        "masked_row": lambda x: F.scaled_dot_product_attention(x, 2 * x, x, attn_mask=row),
        "gqa": lambda x: F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True),
    }
    f = fns[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 5, 8, dtype=D, generator=gen)
    with pytest.raises(RuntimeError, match="forward AD"):
        torch.func.jvp(f, (x,), (x,))  # (what PyTorch does)
    y, jvp_fn = tl.linearize(f, x)
    torch.testing.assert_close(y, f(x))
    t = torch.randn(x.shape, dtype=D, generator=gen)
    torch.testing.assert_close(jvp_fn(t), central_difference(f, (x,), (t,)), rtol=1e-6, atol=1e-7)
    u = torch.randn(y.shape, dtype=D, generator=gen)
    torch.testing.assert_close(jvp_fn.transpose()(u)[0], torch.func.vjp(f, x)[1](u)[0])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_encoder_layer(mode):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double()
    getattr(layer, mode)()
    x = torch.randn(2, 5, 8, dtype=D)
    y, jvp_fn = tl.linearize(layer, x)
    torch.testing.assert_close(y, layer(x))
    t = torch.randn_like(x)
    torch.testing.assert_close(jvp_fn(t), central_difference(layer, (x,), (t,)), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("module", ["encoder_layer", "encoder", "mha"])
@pytest.mark.parametrize("how", ["frozen", "no_grad"])
def test_transformer_fast_path_is_off_while_tracing(module, how):
    # In eval mode with parameters that do not require grad (a frozen model, or under
    # torch.no_grad()), these modules select fused inference kernels without a forward-AD
    # formula (torch.func.jvp fails there): while tracing they take their composite path.
    torch.manual_seed(0)
    mods = {
        "encoder_layer": lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0,
                                                            batch_first=True),
        "encoder": lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
            enable_nested_tensor=False),
        "mha": lambda: nn.MultiheadAttention(8, 2, batch_first=True),
    }
    m = mods[module]().double().eval().requires_grad_(how != "frozen")
    f = (lambda x: m(x, x, x)[0]) if module == "mha" else m
    x, t = torch.randn(2, 5, 8, dtype=D), torch.randn(2, 5, 8, dtype=D)
    ctx = torch.no_grad() if how == "no_grad" else torch.enable_grad()
    with ctx:
        with pytest.raises(NotImplementedError, match="forward AD"):
            torch.func.jvp(f, (x,), (t,))  # (what PyTorch does: the fused kernel)
        y, jvp_fn = tl.linearize(f, x)
        torch.testing.assert_close(y, f(x))
        assert torch.backends.mha.get_fastpath_enabled()  # (outside the trace: as it was)
    torch.testing.assert_close(jvp_fn(t), central_difference(f, (x,), (t,)), rtol=1e-6,
                               atol=1e-7)


def test_sdpa_without_tangents_is_not_rerouted(monkeypatch):
    calls = []
    math = torch.ops.aten._scaled_dot_product_attention_math

    class Spy:
        def __call__(self, *a, **k):
            calls.append(1)
            return math(*a, **k)

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_attention_math", Spy())
    q = torch.randn(1, 1, 4, 8, dtype=D)
    x = torch.randn(3, dtype=D)
    tl.linearize(lambda x: x * F.scaled_dot_product_attention(q, q, q).sum(), x)  # constant
    assert calls == []
    tl.linearize(lambda q: F.scaled_dot_product_attention(q, q, q), q)
    assert calls == [1]


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_grid_sample(mode, padding_mode, align_corners):
    # grid_sampler_2d has no forward-AD formula (torch.func.jvp fails on it); with a
    # tangent on the input or the grid it runs PyTorch's decomposition.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 7, dtype=D, generator=gen)
    g = torch.rand(2, 4, 5, 2, dtype=D, generator=gen) * 2.2 - 1.1  # (some outside)
    f = lambda x, g: F.grid_sample(x, g, mode=mode, padding_mode=padding_mode,
                                   align_corners=align_corners)
    y, jvp_fn = tl.linearize(f, x, g)
    torch.testing.assert_close(y, f(x, g))
    t = (torch.randn(x.shape, dtype=D, generator=gen), torch.randn(g.shape, dtype=D, generator=gen))
    torch.testing.assert_close(jvp_fn(*t), central_difference(f, (x, g), t), rtol=1e-5, atol=1e-6)
    u = torch.randn(y.shape, dtype=D, generator=gen)
    torch.testing.assert_close(jvp_fn.transpose()(u), torch.func.vjp(f, x, g)[1](u))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 4])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_embedding_bag(mode, padding_idx, include_last_offset):
    # _embedding_bag has no forward-AD formula (torch.func.jvp fails on it); with a tangent
    # on the weight (or per-sample weights) the result is rebuilt from differentiable
    # operations on the kernel's bags. Bags: 4 entries, an empty one, 2, 3.
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 3, dtype=D, generator=gen)
    idx = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9, 0])
    offsets = torch.tensor([0, 4, 4, 6, 9] if include_last_offset else [0, 4, 4, 6])
    kw = dict(mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset)
    if mode == "sum":
        f = lambda w, p: F.embedding_bag(idx, w, offsets, per_sample_weights=p, **kw)
        primals = (w, torch.rand(9, dtype=D, generator=gen))
    else:
        f = lambda w: F.embedding_bag(idx, w, offsets, **kw)
        primals = (w,)
    with pytest.raises(RuntimeError, match="forward AD"):
        torch.func.jvp(f, primals, primals)
    y, jvp_fn = tl.linearize(f, *primals)
    torch.testing.assert_close(y, f(*primals))
    t = tuple(torch.randn(p.shape, dtype=D, generator=gen) for p in primals)
    torch.testing.assert_close(jvp_fn(*t), central_difference(f, primals, t), rtol=1e-6, atol=1e-7)
    u = torch.randn(y.shape, dtype=D, generator=gen)
    torch.testing.assert_close(jvp_fn.transpose()(u), torch.func.vjp(f, *primals)[1](u))


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 0.5, float("inf")])
@pytest.mark.parametrize("compute_mode", ["use_mm_for_euclid_dist_if_necessary",
                                          "use_mm_for_euclid_dist",
                                          "donot_use_mm_for_euclid_dist"])
def test_cdist(p, compute_mode):
    # _cdist_forward and _euclidean_dist have no forward-AD formula (torch.func.jvp fails
    # on them); with a tangent the distances come from differentiable operations, by the
    # kernel's own method. Broadcast batch dimensions; 30 rows takes the product form.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 1, 30, 4, dtype=D, generator=gen)
    b = torch.randn(3, 6, 4, dtype=D, generator=gen)
    f = lambda a, b: torch.cdist(a, b, p=p, compute_mode=compute_mode)
    y, jvp_fn = tl.linearize(f, a, b)
    torch.testing.assert_close(y, f(a, b))
    t = (torch.randn(a.shape, dtype=D, generator=gen), torch.randn(b.shape, dtype=D, generator=gen))
    jt = jvp_fn(*t)
    if p >= 1:  # (p < 1: |d_i|^(p-1) is too steep near small components for differences)
        torch.testing.assert_close(jt, central_difference(f, (a, b), t), rtol=1e-5, atol=1e-6)
    u = torch.randn(y.shape, dtype=D, generator=gen)
    ga, gb = torch.func.vjp(f, a, b)[1](u)
    torch.testing.assert_close(jvp_fn.transpose()(u), (ga, gb))
    # <u, J t> against cdist's own backward
    torch.testing.assert_close((u * jt).sum(), (ga * t[0]).sum() + (gb * t[1]).sum())


@pytest.mark.parametrize("compute_mode", ["use_mm_for_euclid_dist", "donot_use_mm_for_euclid_dist"])
def test_cdist_zero_distances(compute_mode):
    # cdist(x, x): zero on the diagonal, where the distance has no derivative; cdist's
    # backward gives 0 there (a plain sqrt would give inf and NaN).
    x = torch.randn(6, 3, dtype=D)
    f = lambda x: torch.cdist(x, x, compute_mode=compute_mode)
    _, jvp_fn = tl.linearize(f, x)
    assert torch.isfinite(jvp_fn(torch.randn_like(x))).all()
    u = torch.randn(6, 6, dtype=D)
    torch.testing.assert_close(jvp_fn.transpose()(u)[0], torch.func.vjp(f, x)[1](u)[0])


def _loss_cases():
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=D, generator=gen)
    x, w = r(4, 5), torch.rand(5, dtype=D, generator=gen) + 0.5
    idx = torch.tensor([0, -100, 4, 1])  # (one ignored)
    x4, idx4 = r(2, 5, 3, 3), torch.randint(0, 5, (2, 3, 3), generator=gen)
    idx4[0, 0, 0] = -100
    p, q = torch.sigmoid(r(4, 5)), torch.rand(4, 5, dtype=D, generator=gen)
    # name -> (f(*primals, reduction), primals); the last primal is the weight or target
    return {
        "nll_loss": (lambda x, w, red: F.nll_loss(x, idx, weight=w, reduction=red), (x, w)),
        "nll_loss_1d": (lambda x, w, red: F.nll_loss(x, idx[2], weight=w, reduction=red),
                        (x[0], w)),
        "nll_loss_3d": (lambda x, w, red: F.nll_loss(x, idx4[:, 0], weight=w, reduction=red),
                        (x4[:, :, 0], w)),
        "nll_loss_4d": (lambda x, w, red: F.nll_loss(x, idx4, weight=w, reduction=red),
                        (x4, w)),
        "cross_entropy": (lambda x, w, red: F.cross_entropy(x, idx, weight=w, reduction=red),
                          (x, w)),
        "cross_entropy_smoothing": (lambda x, w, red: F.cross_entropy(
            x, idx, weight=w, reduction=red, label_smoothing=0.2), (x, w)),
        "cross_entropy_4d_smoothing": (lambda x, w, red: F.cross_entropy(
            x, idx4, weight=w, reduction=red, label_smoothing=0.2), (x4, w)),
        "cross_entropy_1d_smoothing": (lambda x, w, red: F.cross_entropy(
            x, idx[3], weight=w, reduction=red, label_smoothing=0.3), (x[0], w)),
        "binary_cross_entropy": (lambda p, w, red: F.binary_cross_entropy(
            p, q, weight=w, reduction=red), (p, w)),
        "binary_cross_entropy_target": (lambda p, q, w, red: F.binary_cross_entropy(
            p, q, weight=w, reduction=red), (p, q, w)),
        "soft_margin_loss": (lambda x, y, red: F.soft_margin_loss(x, y, reduction=red),
                             (x, r(4, 5))),
    }


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("primals", ["all", "last"])
@pytest.mark.parametrize("case", list(_loss_cases()))
def test_loss_tangent_on_weight_or_target(case, primals, reduction):
    # PyTorch's forward-AD formulas for these losses drop the tangent of the weight (nll_loss,
    # and cross_entropy with class indices, binary_cross_entropy) or of the target
    # (soft_margin_loss), and fail when the input has one too (torch.func.jvp alike): with
    # such a tangent the call runs PyTorch's decomposition.
    loss, every = _loss_cases()[case]
    if primals == "all":
        f, args = (lambda *a: loss(*a, reduction)), every
    else:
        f, args = (lambda last: loss(*every[:-1], last, reduction)), every[-1:]
    y, jvp_fn = tl.linearize(f, *args)
    torch.testing.assert_close(y, f(*args))
    gen = torch.Generator().manual_seed(1)
    t = tuple(torch.randn(a.shape, dtype=D, generator=gen) for a in args)
    jt = jvp_fn(*t)
    torch.testing.assert_close(jt, central_difference(f, args, t), rtol=1e-6, atol=1e-7)
    u = torch.randn(y.shape, dtype=D, generator=gen)
    ut = jvp_fn.T(u)
    torch.testing.assert_close(sum((a * b).sum() for a, b in zip(ut, t)), (u * jt).sum())


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("mask", ["bool", "float", "unchecked_not_left_aligned",
                                  "checked_not_left_aligned"])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("how", ["frozen", "no_grad"])
def test_transformer_encoder_nested_path(mask, norm, how):
    # In eval mode with a key padding mask, nn.TransformerEncoder converts its input to a
    # nested tensor of each sequence's first n positions (n: its unpadded count) and pads
    # the result with zeros (before its norm). While tracing the layers take their
    # composite path (no forward-AD formula for the fused kernels); the result is that of
    # eager, zeros included.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    m = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8) if norm else None)
    m = m.double().eval().requires_grad_(how != "frozen")
    kpm = torch.arange(5) >= torch.tensor([3, 5, 1]).unsqueeze(-1)  # (left-aligned)
    if mask == "float":
        kpm = torch.zeros(kpm.shape, dtype=D).masked_fill(kpm, float("-inf"))
    elif mask.endswith("not_left_aligned"):
        # checked: eager takes the composite path; unchecked: keeps each sequence's first n
        kpm = kpm.roll(1, -1)
        m.mask_check = mask == "checked_not_left_aligned"
    f = lambda x: m(x, src_key_padding_mask=kpm)
    x, t = torch.randn(3, 5, 8, dtype=D), torch.randn(3, 5, 8, dtype=D)
    ctx = torch.no_grad() if how == "no_grad" else torch.enable_grad()
    with ctx:
        y, jvp_fn = tl.linearize(f, x)
        torch.testing.assert_close(y, f(x))
        assert torch.backends.mha.get_fastpath_enabled()
        fd = central_difference(f, (x,), (t,))  # (of eager on the nested path)
    jt = jvp_fn(t)
    torch.testing.assert_close(jt, fd, rtol=1e-6, atol=1e-7)
    u = torch.randn(y.shape, dtype=D)
    torch.testing.assert_close((jvp_fn.T(u)[0] * t).sum(), (u * jt).sum())


def test_losses_without_tangent_on_weight_or_target_are_not_rerouted(monkeypatch):
    from torch_linearize import _overrides

    calls = []
    decomposition = _overrides._decomposition
    monkeypatch.setattr(_overrides, "_decomposition", lambda op: calls.append(op) or decomposition(op))
    x, w = torch.randn(4, 5, dtype=D), torch.rand(5, dtype=D)
    idx = torch.tensor([0, 3, 4, 1])
    tl.linearize(lambda x: F.cross_entropy(x, idx, weight=w, label_smoothing=0.1), x)
    tl.linearize(lambda x: F.binary_cross_entropy(x.sigmoid(), w.expand(4, 5), weight=w), x)
    tl.linearize(lambda x: F.soft_margin_loss(x, w.expand(4, 5)), x)
    assert calls == []
    tl.linearize(lambda w: F.nll_loss(x, idx, weight=w), w)
    assert calls == [torch.ops.aten.nll_loss_forward.default]
