"""Python-level overrides for operators whose eager forward-mode AD is wrong.

``linearize`` runs on PyTorch's eager forward-mode AD. Where that engine
silently drops a tangent that ``torch.func.jvp`` honours, the override below
routes the call, *only while the current thread is tracing and only when the
affected argument carries a tangent*, to PyTorch's own decomposition of the
operator into differentiable operations. Everything else goes straight to
PyTorch. The overrides are installed and removed with the custom-Function
hooks (see ``_custom_function.function_patch``).

Found by the per-argument OpInfo sweep (``tests/opinfo_harness.py``, "each").
``scaled_dot_product_attention`` (to PyTorch's math implementation), 2-D
``grid_sample`` (to PyTorch's decomposition), ``embedding_bag`` and ``cdist`` (rebuilt
from differentiable operations) are routed when a tangent is present: the kernels they
would run have no forward-AD formula (torch.func.jvp fails on them too). For the same
reason ``torch.backends.mha.get_fastpath_enabled()`` answers False in a tracing thread,
so that ``nn.MultiheadAttention`` and ``nn.TransformerEncoder(Layer)`` in eval mode take
their composite path instead of the fused inference kernels; where ``nn.TransformerEncoder``
would have converted its input to a nested tensor, the composite path reproduces what that
conversion computes (each sequence's unpadded prefix, zeros at the padded positions).

Losses whose forward-AD formula drops the tangent of a weight or target (torch.func.jvp
gives the same wrong numbers) are routed to PyTorch's decompositions when that argument
carries a tangent: ``nll_loss`` (and ``cross_entropy`` with class indices) with a tangent
on ``weight``, ``binary_cross_entropy`` on ``weight``, ``soft_margin_loss`` on ``target``.
"""

from __future__ import annotations

import sys

import torch
import torch.autograd.forward_ad as fwAD
import torch.backends.mha

from ._forward_ad import has_tangent, unpack_dual
from ._trace import current_tracer, end_direct_phase

__all__ = ["install", "uninstall"]

_originals: dict[str, object] = {}


def _tracing_level(*tensors) -> int | None:
    """The forward-AD level of this thread's trace if one of ``tensors`` carries a tangent
    in it (the call must be rerouted), else None."""
    tracer = current_tracer()
    if tracer is None or tracer.paused_depth:
        return None
    level = tracer.level
    return level if any(has_tangent(t, level) for t in tensors) else None


def _decomposition(op):
    from torch._decomp import decomposition_table

    return decomposition_table[op]


def _bce_with_logits(input, target, weight=None, pos_weight=None, reduction=1):
    original = _originals["binary_cross_entropy_with_logits"]
    if _tracing_level(weight, pos_weight) is not None:
        # Eager forward AD ignores the tangents of weight/pos_weight for this op.
        impl = _decomposition(torch.ops.aten.binary_cross_entropy_with_logits.default)
        return impl(input, target, weight, pos_weight, reduction)
    return original(input, target, weight, pos_weight, reduction)


def _nll_loss_decomposed(input, target, weight, reduction, ignore_index):
    # nll_loss_nd takes nll_loss for 1-2 dimensions and nll_loss2d otherwise (after a
    # reshape that the decomposition, a gather along the class dimension, does not need)
    aten = torch.ops.aten
    op = aten.nll_loss_forward.default if input.dim() <= 2 else aten.nll_loss2d_forward.default
    return _decomposition(op)(input, target, weight, reduction, ignore_index)[0]


def _fits(input, target) -> bool:
    """Class indices ``target`` have the shape nll_loss_nd accepts for ``input`` (if not,
    PyTorch's operator is called, for its error)."""
    return target.shape == (input.shape[:1] + input.shape[2:] if input.dim() > 1 else ())


def _nll_loss_nd(input, target, weight=None, reduction=1, ignore_index=-100):
    original = _originals["nll_loss_nd"]
    if _tracing_level(weight) is None or not _fits(input, target):
        return original(input, target, weight, reduction, ignore_index)
    # Eager forward AD ignores the tangent of weight for nll_loss(2d).
    return _nll_loss_decomposed(input, target, weight, reduction, ignore_index)


def _cross_entropy(input, target, weight=None, reduction=1, ignore_index=-100,
                   label_smoothing=0.0):
    original = _originals["cross_entropy_loss"]
    if (_tracing_level(weight) is None or input.shape == target.shape  # (probabilities)
            or not _fits(input, target) or not 0 <= label_smoothing <= 1):
        return original(input, target, weight, reduction, ignore_index, label_smoothing)
    # Class indices: PyTorch's composite (LossNLL.cpp; no decomposition exists) calls
    # nll_loss_nd from C++, past the override above. The same composite, label smoothing
    # included, with nll_loss decomposed.
    class_dim = 0 if input.dim() == 1 else 1
    logp = torch.log_softmax(input, class_dim)
    nll = _nll_loss_decomposed(logp, target, weight, reduction, ignore_index)
    if label_smoothing == 0:
        return nll
    ignored = target == ignore_index
    shape = [1] * logp.dim()
    shape[class_dim] = weight.shape[0]
    smooth = -(logp * weight.view(shape)).sum(class_dim)
    smooth = smooth.masked_fill(ignored, 0.0)
    if reduction == 1:  # mean: normalized by the weights of the targets, as nll_loss is
        smooth = smooth.sum() / torch.where(ignored, 0, weight[target.masked_fill(ignored, 0)]).sum()
    elif reduction == 2:
        smooth = smooth.sum()
    return (1 - label_smoothing) * nll + smooth * (label_smoothing / input.shape[class_dim])


def _binary_cross_entropy(input, target, weight=None, reduction=1):
    original = _originals["binary_cross_entropy"]
    if _tracing_level(weight) is not None:
        # Eager forward AD ignores the tangent of weight (and fails if input or target has
        # one too).
        impl = _decomposition(torch.ops.aten.binary_cross_entropy.default)
        return impl(input, target, weight, reduction)
    return original(input, target, weight, reduction)


def _soft_margin_loss(input, target, reduction=1):
    original = _originals["soft_margin_loss"]
    if _tracing_level(target) is not None:
        # Eager forward AD ignores the tangent of target (and fails if input has one too).
        return _decomposition(torch.ops.aten.soft_margin_loss.default)(input, target, reduction)
    return original(input, target, reduction)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    original = _originals["scaled_dot_product_attention"]
    if _tracing_level(query, key, value, attn_mask) is not None:
        # The fused kernels SDPA selects (flash attention on CPU, flash/efficient on CUDA)
        # have no forward-AD formula (torch.func.jvp fails on them too); PyTorch's math
        # implementation is made of differentiable operations.
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # (as the public operator does before choosing a kernel: False -> -inf)
            attn_mask = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
                attn_mask.logical_not(), float("-inf"))
        return torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
            enable_gqa=enable_gqa)[0]
    return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                    enable_gqa=enable_gqa)


def _grid_sampler(input, grid, interpolation_mode, padding_mode, align_corners):
    original = _originals["grid_sampler"]
    if input.dim() == 4 and _tracing_level(input, grid) is not None:
        # grid_sampler_2d has no forward-AD formula; PyTorch's decomposition of it (the
        # one Inductor uses) is made of differentiable operations.
        impl = _decomposition(torch.ops.aten.grid_sampler_2d.default)
        return impl(input, grid, interpolation_mode, padding_mode, align_corners)
    return original(input, grid, interpolation_mode, padding_mode, align_corners)


def _embedding_bag(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                   per_sample_weights=None, include_last_offset=False, padding_idx=None):
    original = _originals["embedding_bag"]
    args = (scale_grad_by_freq, mode, sparse)
    level = _tracing_level(weight, per_sample_weights)
    if level is None:
        return original(weight, indices, offsets, *args, per_sample_weights, include_last_offset,
                        padding_idx)
    # _embedding_bag has no forward-AD formula (torch.func.jvp fails on it too). The
    # kernel, on the primal values, gives the bags; the result is then rebuilt from
    # differentiable operations: linear in weight and in per_sample_weights.
    psw0 = None if per_sample_weights is None else unpack_dual(per_sample_weights, level).primal
    primal, offset2bag, bag_size, max_indices = original(
        unpack_dual(weight, level).primal, indices, offsets, *args, psw0, include_last_offset,
        padding_idx)
    if mode == 2:  # max: the rows the kernel picked, feature by feature
        picked = weight.gather(0, max_indices.clamp_min(0))
        result = torch.where((bag_size > 0).unsqueeze(-1), picked, 0.0)
    else:
        rows = weight.index_select(0, indices)
        if per_sample_weights is not None:
            rows = rows * per_sample_weights.unsqueeze(-1)
        if padding_idx is not None:
            pad = padding_idx + weight.shape[0] if padding_idx < 0 else padding_idx
            rows = torch.where((indices != pad).unsqueeze(-1), rows, 0.0)
        result = rows.new_zeros(primal.shape).index_add(0, offset2bag, rows)
        if mode == 1:
            result = result / bag_size.clamp_min(1).to(result.dtype).unsqueeze(-1)
    return result, offset2bag, bag_size, max_indices


def _cdist(x1, x2, p=2.0, compute_mode="use_mm_for_euclid_dist_if_necessary"):
    original = _originals["cdist"]
    if _tracing_level(x1, x2) is None:
        return original(x1, x2, p, compute_mode)
    # _cdist_forward and _euclidean_dist have no forward-AD formula (torch.func.jvp fails
    # on them too): the same distances from differentiable operations, by the method the
    # kernel would use (the matrix-product form for p = 2 where it would take it).
    mm = p == 2 and (compute_mode == "use_mm_for_euclid_dist" or (
        compute_mode == "use_mm_for_euclid_dist_if_necessary"
        and (x1.shape[-2] > 25 or x2.shape[-2] > 25)))
    if not mm:
        return torch.linalg.vector_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), ord=p, dim=-1)
    # the kernel's arithmetic: one product of [-2 x1, |x1|^2, 1] and [x2, 1, |x2|^2]
    batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    x1 = x1.expand(*batch, *x1.shape[-2:])
    x2 = x2.expand(*batch, *x2.shape[-2:])
    n1 = x1.pow(2).sum(-1, keepdim=True)
    n2 = x2.pow(2).sum(-1, keepdim=True)
    sq = torch.cat([x1 * -2, n1, torch.ones_like(n1)], -1) @ \
        torch.cat([x2, torch.ones_like(n2), n2], -1).mT
    sq = sq.clamp_min(0)
    # sqrt with a zero derivative at zero distance (as cdist's backward has), not inf
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, 1).sqrt(), 0.0)


def _tracing() -> bool:
    tracer = current_tracer()
    return tracer is not None and not tracer.paused_depth


def _called_from_encoder_forward() -> bool:
    # (the caller of our caller is nn.TransformerEncoder.forward itself)
    return sys._getframe(2).f_code is _originals["forward"].__code__


# (namespace, attribute) -> override; the attribute is looked up at call time by callers
# (torch.nn.functional's own multi_head_attention_forward included)
def _mha_fastpath_enabled() -> bool:
    if _tracing() and not _called_from_encoder_forward():
        # The fused inference kernels that nn.MultiheadAttention and nn.TransformerEncoder(Layer)
        # select in eval mode (_native_multi_head_attention, _transformer_encoder_layer_fwd)
        # have no forward-AD formula (torch.func.jvp fails on them too): while this thread
        # traces, the modules take their composite path, made of differentiable operations.
        # nn.TransformerEncoder sees the real setting: it decides on its nested-tensor path
        # as in eager, and _encoder_forward takes over if it does.
        return False
    return _originals["get_fastpath_enabled"]()


class _NestedPath(Exception):
    """nn.TransformerEncoder.forward, tracing, is about to convert its input to a nested
    tensor; ``args[0]``: the mask of the positions it keeps."""


def _nested_tensor_from_mask(t, mask, *args, **kwargs):
    if _tracing() and _called_from_encoder_forward():
        raise _NestedPath(mask)
    return _originals["_nested_tensor_from_mask"](t, mask, *args, **kwargs)


def _encoder_forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
    try:
        return _originals["forward"](self, src, mask, src_key_padding_mask, is_causal)
    except _NestedPath as e:
        keep = e.args[0]
    # Eager runs the layers' fused kernels (which ignore is_causal) on a nested tensor of
    # each sequence's first n positions, n its count of kept ones (the mask is left-aligned
    # unless mask_check is off), and pads the result with zeros, before the final norm. The
    # same on the composite path: the other positions are masked as keys, then zeroed.
    padded = torch.arange(src.shape[1], device=src.device) >= keep.sum(1, keepdim=True)
    output = src
    for mod in self.layers:
        output = mod(output, src_key_padding_mask=padded)
    output = output.masked_fill(padded.unsqueeze(-1), 0.0)
    return output if self.norm is None else self.norm(output)


def _unpack_dual(tensor, *, level=None):
    # f's own code reading a forward-AD tangent: the trace leaves its direct phase first
    end_direct_phase(tensor)
    return _originals["unpack_dual"](tensor, level=level)


def _make_dual(tensor, tangent, *, level=None):
    end_direct_phase()
    return _originals["make_dual"](tensor, tangent, level=level)


_OVERRIDES = {
    (fwAD, "unpack_dual"): _unpack_dual,
    (fwAD, "make_dual"): _make_dual,
    (torch, "binary_cross_entropy_with_logits"): _bce_with_logits,
    (torch._C._nn, "nll_loss_nd"): _nll_loss_nd,
    (torch._C._nn, "cross_entropy_loss"): _cross_entropy,
    (torch._C._nn, "binary_cross_entropy"): _binary_cross_entropy,
    (torch._C._nn, "soft_margin_loss"): _soft_margin_loss,
    (torch.nn.functional, "scaled_dot_product_attention"): _sdpa,
    (torch, "grid_sampler"): _grid_sampler,
    (torch, "embedding_bag"): _embedding_bag,
    (torch, "cdist"): _cdist,
    (torch.backends.mha, "get_fastpath_enabled"): _mha_fastpath_enabled,
    (torch, "_nested_tensor_from_mask"): _nested_tensor_from_mask,
    (torch.nn.TransformerEncoder, "forward"): _encoder_forward,
}


def install() -> None:
    for (ns, name), fn in _OVERRIDES.items():
        _originals[name] = getattr(ns, name)
        setattr(ns, name, fn)


def uninstall() -> None:
    for ns, name in _OVERRIDES:
        setattr(ns, name, _originals.pop(name))
