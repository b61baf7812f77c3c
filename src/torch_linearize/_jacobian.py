"""Full Jacobians from a linear map, in ``torch.func.jacfwd``'s layout."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._checks import _children, _is_none

__all__ = ["jacobian"]


def _normalize_argnums(argnums, n_args: int, api: str) -> tuple[tuple[int, ...], bool]:
    """Return (argument indices, whether the result is wrapped in a tuple over them)."""
    if argnums is None:
        return tuple(range(n_args)), n_args != 1
    single = isinstance(argnums, int)
    nums = (argnums,) if single else tuple(argnums)
    if not nums or not all(isinstance(a, int) for a in nums):
        raise ValueError(f"{api}: argnums must be an int or a non-empty tuple of ints, got {argnums!r}.")
    out = []
    for a in nums:
        if not -n_args <= a < n_args:
            raise ValueError(f"{api}: argnums {a} is out of range for {n_args} positional argument(s).")
        out.append(a % n_args)
    return tuple(out), not single


def _concat(parts: list) -> Any:
    """Batched results of consecutive chunks joined along the batch dim (None stays None)."""
    flats = [tree_flatten(p)[0] for p in parts]
    spec = tree_flatten(parts[0])[1]
    joined = [None if col[0] is None else torch.cat(col) for col in zip(*flats)]
    return tree_unflatten(joined, spec)


def jacobian(lm, argnums=None, chunk_size: int | None = None) -> Any:
    """See :meth:`LinearMap.jacobian`."""
    api = "jvp_fn.jacobian()"
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{api}: chunk_size must be a positive int or None, got {chunk_size!r}.")
    n_args = lm._in_spec.num_children
    nums, wrap = _normalize_argnums(argnums, n_args, api)

    # Which flat leaves belong to which positional argument.
    children = _children(lm._in_spec)
    counts = [c.num_leaves for c in children]
    starts = [sum(counts[:i]) for i in range(n_args)]
    leaves = lm._in_leaves
    selected = [i for a in nums for i in range(starts[a], starts[a] + counts[a])
                if leaves[i].differentiable]
    for i in selected:
        if leaves[i].dtype.is_complex:
            raise ValueError(
                f"{api}: {lm._arg_name}{leaves[i].path} is complex ({leaves[i].dtype}). The map "
                "of a complex input is only real-linear in general (complex-linear only where "
                "f is holomorphic), so no complex matrix represents it; torch.func.jacfwd "
                "refuses complex inputs too. Take the Jacobian with respect to the real and "
                "imaginary parts instead (torch.view_as_real / torch.view_as_complex around f)."
            )
    sizes = [int(torch.Size(leaves[i].shape).numel()) for i in selected]
    total = sum(sizes)
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]

    zeros = [None if not ls.differentiable else torch.zeros(ls.shape, dtype=ls.dtype, device=ls.device)
             for ls in leaves]
    sel_pos = {i: k for k, i in enumerate(selected)}

    def apply_basis(row: torch.Tensor):
        flat = []
        for i, ls in enumerate(leaves):
            k = sel_pos.get(i)
            if k is None:
                flat.append(zeros[i])
            else:
                flat.append(row[offsets[k]:offsets[k] + sizes[k]].reshape(ls.shape).to(ls.dtype))
        args = tree_unflatten(flat, lm._in_spec)
        return lm(*args)

    def apply_rows(rows: torch.Tensor):
        # Every tangent a top-level tensor: the batch goes through lm.batched, which runs
        # an elementwise or custom-Function program directly on the stacked tangents.
        k = rows.shape[0]
        args = []
        for i, ls in enumerate(leaves):
            j = sel_pos.get(i)
            if j is None:
                args.append(torch.zeros((k, *ls.shape), dtype=ls.dtype, device=ls.device))
            else:
                block = rows[:, offsets[j]:offsets[j] + sizes[j]]
                args.append(block.reshape(k, *ls.shape).to(ls.dtype))
        return lm.batched(*args)

    device = leaves[selected[0]].device if selected else torch.device("cpu")
    real = torch.float64 if any(leaves[i].dtype in (torch.float64, torch.complex128)
                                for i in selected) else torch.float32
    basis = torch.eye(total, dtype=real, device=device)
    if not total:
        out = None
    elif lm._flat_args:
        step = chunk_size or total
        parts = [apply_rows(basis[s:s + step]) for s in range(0, total, step)]
        out = parts[0] if len(parts) == 1 else _concat(parts)
    else:
        # (only the leaves with a tangent go through vmap, which refuses None results: a
        # transpose's cotangent of an integer primal)
        got = torch.func.vmap(lambda row: lm._present(apply_basis(row)),
                              chunk_size=chunk_size)(basis)
        out = lm._structured(got)

    # (None leaves kept: an output without a tangent, e.g. a transpose's cotangent of an
    # integer primal, is None in the map's result and stays None here)
    out_flat = tree_flatten(out, is_leaf=_is_none)[0] if out is not None else []
    per_output: list[Any] = []
    for j, ls_out in enumerate(lm._out_leaves):
        if ls_out is None:
            per_output.append(None)
            continue
        oshape = ls_out.shape
        blocks = []
        for a in nums:
            arg_blocks = []
            for i in range(starts[a], starts[a] + counts[a]):
                ls_in = leaves[i]
                if i in sel_pos and out is not None and out_flat[j] is not None:
                    k = sel_pos[i]
                    block = out_flat[j][offsets[k]:offsets[k] + sizes[k]]  # (n_in, *out)
                    block = block.reshape((*ls_in.shape, *oshape))
                    nd_in = len(ls_in.shape)
                    block = block.permute((*range(nd_in, nd_in + len(oshape)), *range(nd_in)))
                elif not ls_in.differentiable:
                    block = None  # (an integer or bool primal: no tangent, no derivative)
                else:
                    block = torch.zeros((*oshape, *ls_in.shape), dtype=ls_out.dtype,
                                        device=ls_in.device)
                arg_blocks.append(block)
            blocks.append(tree_unflatten(arg_blocks, children[a]))
        per_output.append(tuple(blocks) if wrap else blocks[0])
    return tree_unflatten(per_output, lm._out_spec)
