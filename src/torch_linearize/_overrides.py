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
their composite path instead of the fused inference kernels.
"""

from __future__ import annotations

import torch
import torch.backends.mha

from ._forward_ad import has_tangent, unpack_dual
from ._trace import current_tracer

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


def _bce_with_logits(input, target, weight=None, pos_weight=None, reduction=1):
    original = _originals["binary_cross_entropy_with_logits"]
    if _tracing_level(weight, pos_weight) is not None:
        # Eager forward AD ignores the tangents of weight/pos_weight for this op.
        from torch._decomp import decomposition_table

        impl = decomposition_table[torch.ops.aten.binary_cross_entropy_with_logits.default]
        return impl(input, target, weight, pos_weight, reduction)
    return original(input, target, weight, pos_weight, reduction)


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
        from torch._decomp import decomposition_table

        impl = decomposition_table[torch.ops.aten.grid_sampler_2d.default]
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


# (namespace, attribute) -> override; the attribute is looked up at call time by callers
# (torch.nn.functional's own multi_head_attention_forward included)
def _mha_fastpath_enabled() -> bool:
    tracer = current_tracer()
    if tracer is not None and not tracer.paused_depth:
        # The fused inference kernels that nn.MultiheadAttention and nn.TransformerEncoder(Layer)
        # select in eval mode (_native_multi_head_attention, _transformer_encoder_layer_fwd)
        # have no forward-AD formula (torch.func.jvp fails on them too): while this thread
        # traces, the modules take their composite path, made of differentiable operations.
        return False
    return _originals["get_fastpath_enabled"]()


_OVERRIDES = {
    (torch, "binary_cross_entropy_with_logits"): _bce_with_logits,
    (torch.nn.functional, "scaled_dot_product_attention"): _sdpa,
    (torch, "grid_sampler"): _grid_sampler,
    (torch, "embedding_bag"): _embedding_bag,
    (torch, "cdist"): _cdist,
    (torch.backends.mha, "get_fastpath_enabled"): _mha_fastpath_enabled,
}


def install() -> None:
    for (ns, name), fn in _OVERRIDES.items():
        _originals[name] = getattr(ns, name)
        setattr(ns, name, fn)


def uninstall() -> None:
    for ns, name in _OVERRIDES:
        setattr(ns, name, _originals.pop(name))
