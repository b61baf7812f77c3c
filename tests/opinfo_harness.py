"""Run PyTorch's OpInfo database through ``linearize`` and compare with ``torch.func.jvp``.

Used by ``tests/test_opinfo.py`` and by ``python tests/opinfo_harness.py`` (a
report of the pass figure; see ``--help``).

For each sample of each OpInfo with ``supports_forward_ad``:

* every floating/complex tensor among ``input``/``args``/``kwargs`` (including
  tensors inside lists) becomes a primal;
* the reference is ``torch.func.jvp(f, primals, tangents)`` (eager forward-mode
  AD if ``torch.func`` cannot run the sample); the RNG is re-seeded identically
  before the reference and before ``linearize``;
* ``y`` must equal the reference output and ``jvp_fn(tangents)`` the reference
  tangent, for two different random tangents (so a map that ignored its input
  would fail).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._pytree import tree_flatten, tree_unflatten

import torch_linearize as tl

# Known failures, each with its reason and a signature every failing sample of
# that (op, dtype) must match; all other samples of the op must still pass.
# Keys: (OpInfo full name, dtype). Values: (reason, signature substring).
_UNPOOL = (
    "max_unpool scatters with duplicate indices when pooling windows overlap; which value wins "
    "is nondeterministic in PyTorch, so two runs can disagree."
)
_LOGCUMSUMEXP = (
    "PyTorch's forward-AD formula for complex logcumsumexp overflows on the OpInfo samples with "
    "|x| ~ 1e4 (its residuals exp(x) are inf); the transpose of that formula is NaN there, while "
    "torch.func.vjp uses a different, stable reverse-mode formula. The jvp itself matches."
)
_ROLL = (
    "PyTorch bug: torch.vmap of torch.roll without dims on a 0-dim tensor rolls across the batch "
    "(tests/test_opinfo.py::test_upstream_vmap_roll_of_scalars); vmap(jvp_fn) inherits it."
)
_NAN_INPUT = (
    "Samples with NaN inputs: PyTorch's forward- and reverse-mode formulas for masked "
    "reductions place NaN differently, so no map can match both; jvp_fn matches torch.func.jvp "
    "and its transpose is the transpose of that program."
)
XFAIL: dict[tuple[str, torch.dtype], tuple[str, str]] = {
    ("masked.prod", torch.float32): (_NAN_INPUT, "[nan-input] transpose"),
    ("masked.prod", torch.float64): (_NAN_INPUT, "[nan-input] transpose"),
    ("masked.amin", torch.float32): (_NAN_INPUT, "[nan-input] transpose"),
    ("masked.amin", torch.float64): (_NAN_INPUT, "[nan-input] transpose"),
    ("masked.amax", torch.float32): (_NAN_INPUT, "[nan-input] transpose"),
    ("masked.amax", torch.float64): (_NAN_INPUT, "[nan-input] transpose"),
    ("roll", torch.float64): (_ROLL, "vmap(jvp_fn)"),
    ("roll", torch.float32): (_ROLL, "vmap(jvp_fn)"),
    ("roll", torch.complex128): (_ROLL, "vmap(jvp_fn)"),
    ("logcumsumexp", torch.complex128): (_LOGCUMSUMEXP, "transpose"),
    ("nn.functional.max_unpool1d", torch.float32): (_UNPOOL, "not close"),
    ("nn.functional.max_unpool2d", torch.float32): (_UNPOOL, "not close"),
    ("nn.functional.max_unpool3d", torch.float32): (_UNPOOL, "not close"),
    ("nn.functional.max_unpool1d", torch.float64): (_UNPOOL, "not close"),
    ("nn.functional.max_unpool2d", torch.float64): (_UNPOOL, "not close"),
    ("nn.functional.max_unpool3d", torch.float64): (_UNPOOL, "not close"),
}


def expected_failure(outcome: Outcome, name: str, dtype: torch.dtype) -> bool:
    """Every part of the failure (the full check, the per-input checks) matches XFAIL."""
    if outcome.status not in ("fail", "error"):
        return False
    entry = XFAIL.get((name, dtype))
    if entry is None:
        return False
    return all(entry[1] in part for part in outcome.detail.split("\n[only input"))


def op_full_name(op) -> str:
    return op.name + ("." + op.variant_test_name if op.variant_test_name else "")


def forward_ad_ops():
    from torch.testing._internal.common_methods_invocations import op_db

    return [op for op in op_db if op.supports_forward_ad]


def _is_diff(x) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def sample_function(op, sample, only=None):
    """Return (f, primals) where f(*primals) == op(sample) and primals are the diff tensors.

    ``only``: index (among the differentiable tensors) of the single one to make a
    primal; the others are closed over as constants.
    """
    tree = (sample.input, sample.args, sample.kwargs)
    leaves, spec = tree_flatten(tree)
    idx = [i for i, x in enumerate(leaves) if _is_diff(x)]
    if only is not None:
        idx = [idx[only]]
    primals = tuple(leaves[i].detach() for i in idx)

    def f(*ps):
        new = list(leaves)
        for i, p in zip(idx, ps):
            new[i] = p
        inp, args, kwargs = tree_unflatten(new, spec)
        out = op(inp, *args, **kwargs)
        flat = tree_flatten(out)[0]
        # Only differentiable outputs have tangents; integer outputs (indices) are dropped.
        return tuple(o for o in flat if _is_diff(o))

    return f, primals


def _eager_jvp(f, primals, tangents):
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        out = f(*duals)
        ys, ts = [], []
        for o in out:
            p, t = fwAD.unpack_dual(o)
            ys.append(p.detach().clone())
            ts.append(torch.zeros_like(p) if t is None else t.clone())
    return tuple(ys), tuple(ts)


# OpInfos whose PyTorch forward-AD formula drops the tangent of an argument (torch.func.jvp
# is wrong there; linearize routes them to decompositions, see _overrides.py): their
# reference is a central difference in double precision instead.
_DROPS_A_TANGENT = {
    "nn.functional.nll_loss": "nll_loss drops the tangent of weight",
    "nn.functional.cross_entropy": "cross_entropy (class indices) drops the tangent of weight",
    "nn.functional.linear_cross_entropy": "its cross_entropy drops the tangent of weight",
    "nn.functional.binary_cross_entropy": "binary_cross_entropy drops the tangent of weight",
    "nn.functional.soft_margin_loss": "soft_margin_loss drops the tangent of target",
}


def _difference_jvp(f, primals, tangents, seed, h=1e-5):
    """The fourth-order central difference of f along the tangents, evaluated in double
    precision (error ~1e-11 relative on these losses); y as f gives it."""
    def up(t):
        return t.to(torch.complex128 if t.is_complex() else torch.float64)

    def at(s):
        torch.manual_seed(seed)
        return f(*(up(p) + s * h * up(t) for p, t in zip(primals, tangents)))

    torch.manual_seed(seed)
    y = f(*primals)
    p2, p1, m1, m2 = at(2), at(1), at(-1), at(-2)
    ts = tuple(((8 * (a - b) - (c - d)) / (12 * h)).to(o.dtype)
               for a, b, c, d, o in zip(p1, m1, p2, m2, y))
    return tuple(y), ts


def reference_jvp(f, primals, tangents, seed, name=None):
    if name in _DROPS_A_TANGENT:
        y, t = _difference_jvp(f, primals, tangents, seed)
        return y, t, f"central differences ({_DROPS_A_TANGENT[name]} in torch.func.jvp)"
    torch.manual_seed(seed)
    try:
        y, t = torch.func.jvp(f, primals, tangents)
        return tuple(y), tuple(t), "torch.func.jvp"
    except Exception:
        torch.manual_seed(seed)
        y, t = _eager_jvp(f, primals, tangents)
        return y, t, "forward_ad"


def random_tangent(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if p.is_complex():
        re = torch.randn(p.shape, generator=gen, dtype=p.real.dtype)
        im = torch.randn(p.shape, generator=gen, dtype=p.real.dtype)
        return torch.complex(re, im).to(p.device)
    return torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)


@dataclass
class Outcome:
    op: str
    index: int
    status: str  # "pass", "fail", "error", "skip"
    detail: str = ""


def _tols(dtype, stage="jvp"):
    if dtype in (torch.float32, torch.complex64):
        # Batched kernels and reverse-mode formulas accumulate in another order; float64
        # is the strict oracle.
        return dict(rtol=1e-4, atol=1e-5) if stage == "jvp" else dict(rtol=2e-3, atol=2e-3)
    return dict(rtol=1e-7, atol=1e-9)


def check_sample(op, sample, dtype, seed=0, modes=("jvp",)) -> Outcome:
    """Check one sample. ``modes``: "jvp" (always), "vmap" (a batch of 3 tangents through
    ``torch.vmap(jvp_fn)`` and ``jvp_fn.batched`` vs one ``torch.func.jvp`` per tangent), "transpose"
    (``jvp_fn.transpose()`` vs ``torch.func.vjp``'s vjp_fn, for ops with backward) and
    "each" (when there are several differentiable inputs, also linearize with respect to
    each one alone, the others closed over: catches formulas that drop a tangent)."""
    outcome = _check_one(op, sample, dtype, seed, modes, None)
    if "each" in modes:
        each = check_each(op, sample, dtype, seed)
        if outcome.status in ("pass", "skip") and each.status not in ("pass", "skip"):
            return each
        if outcome.status != "pass" and each.status not in ("pass", "skip"):
            outcome.detail += f"\n{each.detail}"
    return outcome


def check_each(op, sample, dtype, seed=0) -> Outcome:
    """Linearize with respect to each differentiable input alone (others closed over)."""
    n = len(sample_function(op, sample)[1])
    if n < 2:
        return Outcome(op_full_name(op), -1, "skip", "fewer than two differentiable inputs")
    for k in range(n):
        o = _check_one(op, sample, dtype, seed, ("jvp",), k)
        if o.status not in ("pass", "skip"):
            o.detail = f"[only input {k} differentiable] {o.detail}"
            return o
    return Outcome(op_full_name(op), -1, "pass")


def _check_one(op, sample, dtype, seed, modes, only) -> Outcome:
    name = op_full_name(op)
    f, primals = sample_function(op, sample, only)
    if not primals:
        return Outcome(name, -1, "skip", "no differentiable inputs")
    gen = torch.Generator().manual_seed(1234)
    tangents_a = tuple(random_tangent(p, gen) for p in primals)
    tangents_b = tuple(random_tangent(p, gen) for p in primals)
    try:
        ry, rta, how = reference_jvp(f, primals, tangents_a, seed, name)
        _, rtb, _ = reference_jvp(f, primals, tangents_b, seed, name)
    except Exception as e:  # the reference cannot run this sample
        return Outcome(name, -1, "skip", f"reference failed: {type(e).__name__}: {str(e)[:120]}")
    # Samples that mix in lower-precision tensors are compared at that precision.
    low_precision = any(p.dtype in _LOW for p in primals)
    if low_precision:
        dtype = torch.float32 if not any(p.is_complex() for p in primals) else torch.complex64
    tol = _tols(dtype)
    stage = "linearize"
    try:
        torch.manual_seed(seed)
        y, jvp_fn = tl.linearize(f, *primals)
        stage = "apply"
        ta = jvp_fn(*tangents_a)
        tb = jvp_fn(*tangents_b)
        torch.testing.assert_close(tuple(y), ry, equal_nan=True, **tol, msg=lambda m: "output y: " + m)
        # torch.func.jvp sometimes returns a tangent in a wider dtype than its output
        # (e.g. addcmul with a Python scalar); ours must match the output's dtype.
        for yy, tt in zip(y, ta):
            assert tt.dtype == yy.dtype, f"tangent dtype {tt.dtype} != output dtype {yy.dtype}"
        for label, got, want, tans in (("a", ta, rta, tangents_a), ("b", tb, rtb, tangents_b)):
            try:
                torch.testing.assert_close(tuple(got), want, equal_nan=True, check_dtype=False,
                                           **tol, msg=lambda m, label=label: f"tangent {label}: " + m)
            except AssertionError:
                if not (low_precision and _no_worse_than_reference(f, primals, tans, got, want, seed)):
                    raise
        if "vmap" in modes:
            stage = "vmap"
            batch = [tuple(random_tangent(p, gen) for p in primals) for _ in range(3)]
            stacked = tuple(torch.stack([b[i] for b in batch]) for i in range(len(primals)))
            got = torch.vmap(jvp_fn)(*stacked)
            wants = [reference_jvp(f, primals, b, seed, name)[1] for b in batch]
            for k, want in enumerate(wants):
                torch.testing.assert_close(tuple(g[k] for g in got), want, equal_nan=True,
                                           check_dtype=False, **_tols(dtype, "vmap"),
                                           msg=lambda m: "vmap(jvp_fn): " + m)
            stage = "batched"  # (programs that broadcast a batch dim run without torch.vmap)
            got = jvp_fn.batched(*stacked)
            for k, want in enumerate(wants):
                torch.testing.assert_close(tuple(g[k] for g in got), want, equal_nan=True,
                                           check_dtype=False, **_tols(dtype, "vmap"),
                                           msg=lambda m: "jvp_fn.batched: " + m)
        if "transpose" in modes and op.supports_autograd and ry:
            stage = "transpose-reference"
            cots = tuple(random_tangent(o, gen) for o in ry)
            torch.manual_seed(seed)
            _, ref_vjp = torch.func.vjp(f, *primals)
            want = ref_vjp(cots)
            stage = "transpose"
            vjp_fn = jvp_fn.transpose()
            got = vjp_fn(cots)
            try:
                torch.testing.assert_close(tuple(got), tuple(want), equal_nan=True,
                                           **_tols(dtype, "transpose"),
                                           msg=lambda m: "transpose: " + m)
            except AssertionError:
                # Some PyTorch ops have forward- and reverse-mode formulas that are not
                # transposes of each other. Then the honest check is the dot-product test
                # <J t, u> == <t, J^T u> for our pair, and evidence that PyTorch's own pair
                # (torch.func.jvp, torch.func.vjp) fails the same test.
                if not adjoint_explains(f, primals, jvp_fn, vjp_fn, want, cots, gen, seed):
                    raise
                return Outcome(name, -1, "pass", "adjoint: PyTorch's jvp and vjp disagree")
    except AssertionError as e:
        tag = "[nan-input] " if any(bool(p.isnan().any()) for p in primals) else (
            "[nan-jvp] " if any(bool(t.isnan().any()) for t in rta) else "")
        return Outcome(name, -1, "fail", f"{tag}{stage} vs {how}: {str(e)[:400]}")
    except Exception as e:
        if stage == "transpose-reference":
            return Outcome(name, -1, "pass", "transpose reference failed")
        tb_str = traceback.format_exc(limit=-3)
        return Outcome(name, -1, "error", f"{stage}: {type(e).__name__}: {str(e)[:300]}\n{tb_str}")
    return Outcome(name, -1, "pass")


_LOW = (torch.float32, torch.complex64, torch.float16, torch.bfloat16)


def _no_worse_than_reference(f, primals, tangents, got, want, seed) -> bool:
    """Arbiter for lower-precision samples whose result is mostly rounding noise.

    Our simplification passes reassociate sums, so in float32 a result that cancels
    almost to zero (e.g. ``cov``'s derivative with respect to two observation weights,
    exactly 0) differs from PyTorch's by rounding noise of the same size as PyTorch's own
    error. Both are measured against the same computation in float64/complex128 (the
    lower-precision primals and tangents promoted); ours passes if its error is at most
    4x the reference's (and within float32 tolerance of the float64 result's scale).
    """
    def up(t):
        if t.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return t.double()
        return t.to(torch.complex128) if t.dtype == torch.complex64 else t

    try:
        _, exact, _ = reference_jvp(f, tuple(up(p) for p in primals),
                                    tuple(up(t) for t in tangents), seed)
    except Exception:
        return False
    ours = max((float((g.to(e.dtype) - e).abs().max()) for g, e in zip(got, exact) if e.numel()),
               default=0.0)
    theirs = max((float((w.to(e.dtype) - e).abs().max()) for w, e in zip(want, exact) if e.numel()),
                 default=0.0)
    scale = max((float(e.abs().max()) for e in exact if e.numel()), default=0.0)
    return ours <= max(4 * theirs, 1e-4 * scale)


def _dot(a, b) -> float:
    return float(sum((x.conj() * y).real.sum() for x, y in zip(a, b) if x is not None))


def adjoint_explains(f, primals, jvp_fn, vjp_fn, ref_vjp_out, cots, gen, seed) -> bool:
    """Ours is the exact transpose of PyTorch's forward-mode Jacobian, and torch.func.vjp is not.

    For small real samples the forward-mode Jacobian J comes from torch.func.jacfwd,
    so ``vjp_fn(u) == J^T u`` is checked independently of our recording. Otherwise
    (large or complex samples, where the maps are only R-linear) the dot-product
    test Re<J t, u> == Re<t, J* u> must hold for our pair and fail for PyTorch's.
    """
    got = vjp_fn(cots)
    single = any(p.dtype in (torch.float32, torch.complex64) for p in primals)
    tight = 1e-4 if single else 1e-9
    n_in = sum(p.numel() for p in primals)
    n_out = sum(c.numel() for c in cots)
    if not any(p.is_complex() for p in primals) and n_in * n_out <= 250_000:
        def flat_f(*ps):
            return torch.cat([o.reshape(-1) for o in f(*ps)])

        torch.manual_seed(seed)
        jac = torch.func.jacfwd(flat_f, argnums=tuple(range(len(primals))),
                                randomness="same")(*primals)
        u = torch.cat([c.reshape(-1) for c in cots])
        exact = [(j.reshape(n_out, -1).T @ u).reshape(p.shape) for j, p in zip(jac, primals)]

        def close(a, b):
            return all(torch.allclose(x, y, rtol=tight, atol=tight * 1e-3, equal_nan=True)
                       for x, y in zip(a, b) if x is not None)

        return close(got, exact) and not close(ref_vjp_out, exact)
    t = tuple(random_tangent(p, gen) for p in primals)
    ours_l, ours_r = _dot(jvp_fn(*t), cots), _dot(t, got)
    _, ref_jt, _ = reference_jvp(f, primals, t, seed)
    torch_l, torch_r = _dot(ref_jt, cots), _dot(t, ref_vjp_out)
    scale = max(1.0, abs(ours_l), abs(torch_l))
    return abs(ours_l - ours_r) <= tight * scale and abs(torch_l - torch_r) > tight * scale


def samples_for(op, dtype, limit, device="cpu"):
    try:
        it = op.sample_inputs(device, dtype, requires_grad=False)
        out = []
        for i, s in enumerate(it):
            if limit is not None and i >= limit:
                break
            out.append(s)
        return out
    except Exception:
        return []


def check_op(op, plan, modes, device="cpu") -> tuple[list[str], int]:
    """Check ``op`` for each ``(dtype, sample limit)`` of ``plan`` on ``device``.

    Returns (unexpected failures, one line each; number of samples checked). Known
    failures (``XFAIL``) and samples the reference cannot run are not failures.
    """
    failures, checked = [], 0
    name = op_full_name(op)
    for dtype, limit in plan:
        if dtype not in op.supported_dtypes(device):
            continue
        for i, sample in enumerate(samples_for(op, dtype, limit, device)):
            r = check_sample(op, sample, dtype, modes=modes)
            if r.status == "skip":
                continue
            checked += 1
            if r.status != "pass" and not expected_failure(r, name, dtype):
                failures.append(f"{dtype} sample {i}: {r.status}: {r.detail}")
    return failures, checked


def run_sweep(dtypes, limit, ops=None, verbose=False, out=sys.stdout, modes=("jvp",),
              device="cpu", budget_s=None):
    """Check every sample; with ``budget_s``, no new op starts once that many seconds passed."""
    results: list[Outcome] = []
    ops = ops if ops is not None else forward_ad_ops()
    t0 = time.time()
    for op in ops:
        if budget_s is not None and time.time() - t0 > budget_s:
            print(f"time budget of {budget_s:.0f}s reached: stopped before {op_full_name(op)}",
                  file=out)
            break
        for dtype in dtypes:
            if dtype not in op.supported_dtypes(device):
                continue
            for i, s in enumerate(samples_for(op, dtype, limit, device)):
                if os.environ.get("OPINFO_TRACE"):
                    print(f"-> {op_full_name(op)} {dtype} #{i}", file=out, flush=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = check_sample(op, s, dtype, modes=modes)
                r.index = i
                if expected_failure(r, r.op, dtype):
                    r.status = "xfail"
                r.op = f"{r.op}[{str(dtype).replace('torch.', '')}]"
                results.append(r)
                if verbose and r.status in ("fail", "error"):
                    print(f"{r.status.upper()} {r.op} #{i}: {r.detail}", file=out)
    return results, time.time() - t0


def summarize(results):
    counted = [r for r in results if r.status not in ("skip", "xfail")]
    passed = [r for r in counted if r.status == "pass"]
    by_op: dict[str, list[Outcome]] = {}
    for r in counted:
        by_op.setdefault(r.op, []).append(r)
    ops_ok = sum(1 for rs in by_op.values() if all(r.status == "pass" for r in rs))
    return len(passed), len(counted), ops_ok, len(by_op)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=8, help="samples per op and dtype (0 = all)")
    ap.add_argument("--dtypes", default="float64", help="comma list: float64,float32,complex128")
    ap.add_argument("--ops", default="", help="comma list of OpInfo names to restrict to")
    ap.add_argument("--modes", default="jvp,vmap,transpose,each",
                    help="comma list: jvp,vmap,transpose,each")
    ap.add_argument("--device", default="cpu", help="device of the samples (cpu, cuda)")
    ap.add_argument("--skip-until", default="",
                    help="skip the ops listed before this OpInfo name (resume a budgeted sweep)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new ops after this many seconds (partial sweep)")
    ap.add_argument("--shape-only-min-numel", type=int, default=None,
                    help="size from which pointwise tangent arithmetic is recorded without "
                         "being computed (0: every sample takes that path)")
    args = ap.parse_args(argv)
    if args.shape_only_min_numel is not None:
        import torch_linearize._trace as trace

        trace._SHAPE_ONLY_MIN_NUMEL = args.shape_only_min_numel
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    ops = forward_ad_ops()
    if args.ops:
        wanted = set(args.ops.split(","))
        ops = [op for op in ops if op.name in wanted or op_full_name(op) in wanted]
    if args.skip_until:
        names = [op_full_name(op) for op in ops]
        if args.skip_until not in names:
            ap.error(f"--skip-until: no OpInfo named {args.skip_until!r}")
        ops = ops[names.index(args.skip_until):]
    results, secs = run_sweep(dtypes, args.limit or None, ops, verbose=True,
                              modes=tuple(args.modes.split(",")), device=args.device,
                              budget_s=args.budget_s)
    p, n, ok, nops = summarize(results)
    skipped = sum(1 for r in results if r.status == "skip")
    xfailed = sum(1 for r in results if r.status == "xfail")
    total = n + xfailed
    print(f"\nOpInfo sweep ({args.device}, {args.dtypes}, limit={args.limit or 'all'}, checks={args.modes}): "
          f"{p} of {total} samples pass "
          f"({100.0 * p / max(total, 1):.2f}%); {xfailed} known failures (XFAIL, with reasons); "
          f"{n - p} unexpected failures; {ok} of {nops} (op, dtype) pairs pass all counted samples; "
          f"{skipped} samples skipped (the reference itself cannot run them); {secs:.0f}s")
    if xfailed:
        counts: dict[str, int] = {}
        for r in results:
            if r.status == "xfail":
                counts[r.op] = counts.get(r.op, 0) + 1
        print("known failures by op: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0 if p == n else 1  # known failures (XFAIL) do not fail the run


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
