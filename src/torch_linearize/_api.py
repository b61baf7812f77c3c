"""``linearize``: validate, flatten, trace once, build the linear map."""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._pytree import (
    keystr,
    tree_flatten,
    tree_flatten_with_path,
    tree_map,
    tree_unflatten,
)

from . import _structure_cache, _trace
from ._checks import flatten_primals, flatten_with_path, leaf_specs_of
from ._custom_function import function_patch
from ._errors import LinearizeError, NoForwardADError, NonLinearTangentError, StaleResidualError
from ._forward_ad import materialize_view_tangents, shared_dual_level, unpack_dual
from ._linear_map import LinearMap
from ._passes import simplify
from ._program import (
    Eqn,
    Program,
    Var,
    ZeroOut,
    bind_program,
    check_linear_at_zero,
    dead_code_elimination,
    exact_groups,
    program_factory,
    program_nodes,
)
from ._residuals import ctx_tensors, distinct_storage_bytes, storage_key
from ._structure_cache import (
    Recorder,
    Template,
    cache_get,
    cache_put,
    call_signature,
    first_sighting,
    note_direct_phase,
    replay,
    starts_on_duals,
    structure_key,
)
from ._trace import Tracer, current_tracer

__all__ = ["linearize"]

_API = "linearize(f, *primals)"
_NO_FWAD = re.compile(r"Trying to use forward AD with (\S+) that does not support it")
_HOP = re.compile(r"no rule registered for HigherOrderOperator (\S+) and mode")


def linearize(func: Callable, *primals: Any, has_aux: bool = False) -> tuple:
    """Evaluate ``func`` once at ``primals`` and return its Jacobian-vector product as a function.

    ``y, jvp_fn = linearize(f, *primals)`` is equivalent to
    ``y = f(*primals)`` and ``jvp_fn = lambda *t: torch.func.jvp(f, primals, t)[1]``,
    but ``f`` runs exactly once: ``jvp_fn`` replays only the tangent (linear)
    operations on residuals computed during that single run. For a custom
    ``torch.autograd.Function``, ``forward``/``setup_context`` run once here and
    each ``jvp_fn`` call runs only its ``jvp`` (with plain tensors, so it may call
    any kernel).

    Args:
        func: a function of tensors (pytrees of tensors are fine, e.g. a dict of
            parameters for ``torch.func.functional_call``) returning a pytree of
            tensors; with ``has_aux=True`` it returns ``(output, aux)``.
        *primals: the point to linearize at. Integer/bool tensors are treated as
            constants (their tangent is ``None``).
        has_aux: ``func`` returns ``(output, aux)``; ``aux`` is returned as is
            (detached) and not differentiated.

    Returns:
        ``(output, jvp_fn)``, or ``(output, jvp_fn, aux)`` with ``has_aux``.
        ``output`` is ``func(*primals)``, detached. ``jvp_fn(*tangents)`` takes
        tangents structured like ``primals`` and returns the output tangent
        structured like ``output`` (zeros where the output does not depend on the
        inputs). ``jvp_fn`` is a :class:`LinearMap`.

    Cost: one evaluation of ``func`` with forward-mode AD (about one
    ``torch.func.jvp`` call) plus tracing overhead; each application costs only
    the tangent operations. Linearizing a structure seen before (the same ``func``
    with the same shapes and dtypes at a new point, as in a Newton loop) reuses its
    simplified program and generated code from the third call on (the second records
    the passes' decisions), after re-checking on the new values the facts its
    simplification relied on.

    Example:
        >>> x = torch.randn(3)
        >>> y, jvp_fn = linearize(torch.sin, x)
        >>> torch.allclose(jvp_fn(torch.ones(3)), torch.cos(x))
        True
    """
    if not callable(func):
        raise TypeError(f"{_API}: f must be callable, got {type(func).__name__}.")
    _refuse_differentiating_transform()
    if torch.is_inference_mode_enabled():
        # forward AD records nothing in inference mode (the map would be silently zero);
        # torch.func.jvp works there, and so does linearize: f runs outside it
        with torch.inference_mode(False):
            return linearize(func, *primals, has_aux=has_aux)
    if not torch._C._is_fwd_grad_enabled():
        # Nor with forward AD switched off, as PyTorch does inside every custom Function's
        # forward: linearize asks for derivatives explicitly (as torch.func.jvp, which
        # works there), so f runs with it on
        with fwAD._set_fwd_grad_enabled(True):
            return linearize(func, *primals, has_aux=has_aux)
    flat, in_spec, leaf_specs = flatten_primals(_API, primals)
    for leaf, ls in zip(flat, leaf_specs):
        if _is_functorch_wrapped(leaf):
            raise LinearizeError(_functorch_message(f"primals{ls.path} is"))
    outer = current_tracer()
    if outer is not None and outer.direct:
        outer.to_dual()  # (what this call's f captures from the outer f carries its tangent)
    if outer is not None and outer.level is not None:
        for leaf, ls in zip(flat, leaf_specs):
            with outer.paused():
                carries = unpack_dual(leaf, level=outer.level).tangent is not None
            if carries:
                raise LinearizeError(
                    f"{_API}: called inside a function that is itself being linearized, on "
                    f"primals{ls.path}, which carries the outer tangent. Nested forward-mode AD "
                    "(forward-over-forward) is not supported by PyTorch's eager forward AD; "
                    "linearize the composition once, or pass .detach()ed primals if the inner "
                    "linearization should not be differentiated."
                )

    # Primals and their placeholder tangents (ones: a traced value is then a coefficient),
    # made before the tracer's dispatch mode is on.
    prepared = []
    for leaf, ls in zip(flat, leaf_specs):
        p = leaf.detach()
        if not ls.differentiable:
            prepared.append((p, None))
            continue
        if torch._debug_has_internal_overlap(p) == 1 or p.is_inference():
            p = p.clone()  # (forward AD cannot give an inference tensor a tangent)
        prepared.append((p, torch.ones_like(p, memory_format=torch.preserve_format)))

    signature = call_signature(func, flat)
    with shared_dual_level() as level, function_patch():
        tracer = Tracer(level)
        changed: list[int] = []
        try:
            with tracer.activate():
                duals, layouts = [], []
                # The direct phase (Tracer.direct_input): f starts on plain tensors where
                # every differentiable primal is a plain compact real floating tensor and
                # no other linearize encloses this one
                direct = _trace.DIRECT and outer is None and all(
                    ph is None or _trace.direct_primal_ok(p) for p, ph in prepared) \
                    and not starts_on_duals(signature)
                for p, ph in prepared:
                    if ph is None:
                        duals.append(p)
                        continue
                    tracer.add_input(ph)
                    layouts.append((tuple(ph.stride()), ph.storage_offset()))
                    if direct:
                        tracer.direct_input(p, ph)
                        duals.append(p)
                    else:
                        duals.append(fwAD.make_dual(p, ph, level=level))
                args = tree_unflatten(duals, in_spec)
                try:
                    with _eager_stance():
                        out = func(*args)
                except (NotImplementedError, RuntimeError) as e:
                    m = _NO_FWAD.search(str(e))
                    if m is None:
                        hop = _HOP.search(str(e))
                        if hop is not None:
                            raise LinearizeError(
                                f"{_API}: f calls the higher-order operator {hop.group(1)} "
                                "(torch.cond, torch.while_loop, ... : graph-capture control flow), "
                                "which linearize cannot trace. f runs eagerly, once: write the "
                                "control flow in Python (if pred: ... else: ...), or call the branch "
                                "functions directly."
                            ) from e
                        raise
                    if "out= function" in str(e):
                        raise NoForwardADError(
                            f"{_API}: operator {m.group(1)} is an out= variant, which PyTorch's "
                            "forward-mode AD does not support. Call the out-of-place form and use "
                            "its result (y = torch.sin(x) rather than torch.sin(x, out=y)), or copy "
                            "it into the buffer (y.copy_(torch.sin(x)))."
                        ) from e
                    raise NoForwardADError(
                        f"{_API}: operator {m.group(1)} has no forward-mode AD formula in PyTorch, "
                        "so it cannot be linearized. Wrap that computation in a custom "
                        "torch.autograd.Function with a jvp staticmethod (linearize calls it with "
                        "plain tensors), or register a rule for a custom op with "
                        "torch_linearize.register_jvp."
                    ) from e
                aux = None
                if has_aux:
                    if not (isinstance(out, (tuple, list)) and len(out) == 2):
                        raise ValueError(
                            f"{_API} with has_aux=True: f must return a pair (output, aux), got "
                            f"{type(out).__name__}."
                        )
                    out, aux = out
                if any(isinstance(o, torch.Tensor) and _is_functorch_wrapped(o)
                       for o in tree_flatten(out)[0]):
                    raise LinearizeError(_functorch_message("f's output depends on"))
                # (an output viewing a buffer f later wrote with tangent data gets its
                # tangent when first read: here, where the tracer records it)
                if not tracer.direct:
                    materialize_view_tangents(tree_flatten(out)[0], level)
            tracer.retire_markers()  # (before tangents are read outside the mode)
            # (outside the dispatch mode: reading the outputs records nothing)
            outputs, y_flat, out_spec = _collect_outputs(tracer, out)
            if has_aux:
                for kp, a in tree_flatten_with_path(aux)[0]:
                    if isinstance(a, torch.Tensor):
                        _refuse_tangent_dependent(tracer, a, f"aux{keystr(kp)}")
                aux = tree_map(lambda a: _primal(a, level, tracer), aux)
        finally:
            tracer.strip_direct()
            tracer.finish_chains()
            changed = tracer.residuals.end_trace()

    prog = Program(
        inputs=tracer.inputs,
        eqns=tracer.eqns,
        outputs=outputs,
        residuals=tracer.residuals.tensors,
        input_layouts=layouts,
        mutated_inputs=set(tracer.mutated_inputs),
        residual_names=tracer.residuals.origin,
    )
    exact_groups(prog)  # (storages, not addresses: the passes and the cache key read them)
    # A structure seen before (a Newton loop re-linearizing at a new point) reuses its
    # simplified program and code if the passes' value-based decisions come out the same
    # on the new residuals (_structure_cache); otherwise the passes run, and record from
    # the second call of the same function at the same shapes on.
    if direct:  # (wasted: the phase ended before any rule ran)
        note_direct_phase(signature, not tracer.direct and not tracer.direct_rules)
    keyed = None if not _structure_cache.ENABLED or first_sighting(
        signature) else structure_key(
            prog, tracer.trace_values, tracer.suspect_residuals)
    raw_nodes = program_nodes(prog) if keyed is not None else []
    tpl = cache_get(keyed[0]) if keyed is not None else None
    final = replay(tpl, prog.residuals, tracer.trace_values, keyed[1]) if tpl is not None else None
    traced = list(prog.residuals)
    if final is not None:
        used = tpl.used
        _raise_if_stale(prog, used, changed, flat, leaf_specs)
        raw, prog = prog, tpl.program(final, tracer.residuals.origin, raw_nodes)
        new = [r for k, r in zip(tpl.res_slots, final) if k >= tpl.n_traced]
        make, src = tpl.make, tpl.src
        if _structure_cache.VERIFY:
            _verify_hit(raw, prog, tracer.trace_values)
    else:
        dead_code_elimination(prog)  # raises for live non-linear (poisoned) values
        used = set(prog.used_residuals())
        _raise_if_stale(prog, used, changed, flat, leaf_specs)
        rec = None if keyed is None else Recorder(
            traced, {v.id: i for i, v in enumerate(keyed[1])})
        new = _run_passes(prog, tracer.trace_values, rec)
        make, src = program_factory(prog)
        if rec is not None and rec.ok:
            slots = [rec.slot_of(r) for r in prog.residuals]
            if None not in slots:
                cache_put(keyed[0], Template(prog, rec, len(traced), used, slots, make, src,
                                             raw_nodes))
    tracer.trace_values = {}
    suspect = bool(used & tracer.suspect_residuals)
    # Coefficients computed by the passes are new storage; a coefficient that *is* a
    # traced residual (x * w folds to coefficients w and x) is not.
    ours: set = set()  # (storages only the map holds: the passes' own coefficients)
    if new:
        traced_storages = {storage_key(r) for r in traced}
        for r in new:
            k = storage_key(r)
            if k not in traced_storages:
                tracer.note_created(r)
                ours.add(k)
    live_nodes = {id(e.fn) for e in prog.eqns}
    opaque = [n for n in tracer.opaque_nodes if id(n) in live_nodes]
    for n in tracer.opaque_nodes:
        if id(n) not in live_nodes:
            n.release()
    # What a live custom Function's ctx holds is read at application time, like a residual:
    # writes the tracer saw were copied-on-write; any other write makes it stale.
    ctx_read = [(n, t) for n in opaque for t in ctx_tensors(n.ctx, readable_only=True)]
    for n, t in ctx_read:
        hit = tracer.ctx_versions.get(id(t))
        if hit is not None and hit[0] is t and t._version != hit[1]:
            raise _stale_during_f(_describe_ctx_tensor(n))

    kept = list(prog.residuals) + [t for n in opaque for t in ctx_tensors(n.ctx)]
    created = tracer.created
    residual_bytes = distinct_storage_bytes(kept, only=created)
    external_bytes = distinct_storage_bytes(kept, exclude=created)

    # Tensors the map reads by reference may be modified in place after linearize: the
    # primals, captured tensors, outputs and aux, and any tensor f made and kept somewhere
    # (a global, a module attribute); watch their versions so that a map that would
    # silently change raises instead. Only the passes' own coefficients are out of reach.
    # (A map that only holds coefficients computed from them, e.g. after folding, stays
    # the linearization at the original point and keeps working.)
    watch = []
    paths = _primal_paths(flat, leaf_specs)
    for i, r in enumerate(prog.residuals):
        if r._is_zerotensor() or r.device.type == "meta":
            continue
        k = storage_key(r)
        if k is not None and k not in ours:
            watch.append((r, r._version, _describe_residual(prog, i, flat, leaf_specs, paths)))
    watched = {id(w[0]) for w in watch}
    # A tensor only a ctx holds may be written by the Function's own jvp/backward (a
    # workspace, `torch.mul(c, dx, out=ctx.buf)`): its entry is a list, which the node
    # brings up to date after each call of the user's code (_OpaqueNode.refresh), so
    # that only writes from outside count as stale.
    ctx_entries: dict[int, list] = {}
    for n, t in ctx_read:
        k = storage_key(t)
        if k is None or t.device.type == "meta":
            continue
        entry = ctx_entries.get(id(t))
        if entry is None and id(t) not in watched:
            watched.add(id(t))
            entry = ctx_entries[id(t)] = [t, t._version, _describe_ctx_tensor(n)]
            watch.append(entry)
        if entry is not None and not any(e is entry for e in n.watch):
            n.watch.append(entry)

    run = bind_program(make, src, prog.residuals, program_nodes(prog))
    if suspect:
        check_linear_at_zero(prog, run, opaque, _API)
    y = tree_unflatten(y_flat, out_spec)
    jvp_fn = LinearMap(
        prog, run, api="jvp_fn(*tangents)", arg_name="tangents", ref_name="primals",
        in_spec=in_spec, in_leaves=leaf_specs, out_spec=out_spec,
        out_leaves=leaf_specs_of(y), stale_watch=watch, residual_bytes=residual_bytes,
        external_bytes=external_bytes, opaque_nodes=opaque, created=set(created),
    )
    return (y, jvp_fn, aux) if has_aux else (y, jvp_fn)


def _raise_if_stale(prog: Program, used: set[int], changed: list[int], flat: list,
                    leaf_specs: list) -> None:
    stale = sorted(used & set(changed))
    if stale:
        raise _stale_during_f(_describe_residual(prog, stale[0], flat, leaf_specs))


def _stale_during_f(what: str) -> StaleResidualError:
    return StaleResidualError(
        f"{_API}: {what} was modified in place later during f by code linearize cannot see "
        "(e.g. through numpy or a raw data pointer, or by a custom Function's forward or "
        "setup_context writing a tensor that is not one of its inputs: they run outside "
        "linearize's tracer). Clone it before modifying it."
    )


def _run_passes(prog: Program, trace_values: dict, rec: Recorder | None = None) -> list:
    """Simplify ``prog`` (dead code already eliminated) and prune its residuals; returns the
    residuals the passes created (coefficients). ``trace_values``: the outputs' traced
    tangents (the inputs' placeholders are ones); ``rec`` records the passes' value work."""
    n_traced = len(prog.residuals)  # (the passes append their coefficients)
    prog.trace_values, prog.recorder = trace_values, rec
    try:
        simplify(prog)
    finally:
        prog.trace_values, prog.recorder = {}, None
    new = prog.residuals[n_traced:]
    prog.prune_residuals()
    return new


def _verify_hit(raw: Program, hit: Program, trace_values: dict) -> None:
    """The verification mode of the structure cache: the passes run on the same trace
    must give the program and residuals the cache gave."""
    dead_code_elimination(raw)
    _run_passes(raw, trace_values)
    want, got = structure_key(raw, {}, set()), structure_key(hit, {}, set())
    if want is None or got is None or want[0] != got[0]:
        raise AssertionError("structure cache: the cached program differs from the passes' "
                             f"result:\n{want and want[0]}\n{got and got[0]}")
    for a, b in zip(raw.residuals, hit.residuals):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True,
                                   msg="structure cache: a replayed residual differs")


_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


_DIFFERENTIATING = {torch._C._functorch.TransformType.Grad: "grad (grad, vjp, jacrev)",
                    torch._C._functorch.TransformType.Jvp: "jvp (jvp, jacfwd, hessian)"}


def _refuse_differentiating_transform() -> None:
    """``linearize`` called inside ``torch.func.grad``/``jvp`` (or what builds on them):
    every result inside such a transform is the transform's tensor, and its ``jvp`` level
    is PyTorch's eager forward-AD level, so the trace would fail with a misleading reason
    (a "transformed tensor" f never saw, an "active dual_level" the user never opened).
    Under ``vmap`` alone it works."""
    stack = torch._C._functorch.get_interpreter_stack()
    for interp in stack or ():
        kind = _DIFFERENTIATING.get(interp.key())
        if kind is not None:
            raise LinearizeError(
                f"{_API}: cannot run inside a differentiating torch.func transform: {kind} is "
                f"active (level {interp.level()}). linearize runs on PyTorch's eager forward-mode "
                "AD, which does not compose with it. Call linearize outside the transform and "
                "transform its linear map instead (torch.func.grad, jacrev, jvp and vmap of "
                "jvp_fn or jvp_fn.T work), or use torch.func.jvp inside the transform.")


def _functorch_message(what: str) -> str:
    return (f"{_API}: {what} a tensor being transformed by a torch.func transform (vmap, grad, "
            "jacrev, jacfwd, ...) that encloses the call. linearize runs on PyTorch's eager "
            "forward-mode AD, which does not compose with torch.func's transforms. Call "
            "linearize outside the transform and transform its linear map instead "
            "(torch.vmap(jvp_fn), jvp_fn.batched(T), jvp_fn.T), or use torch.func.jvp inside "
            "the transform.")


_stance_lock = threading.Lock()
_stance_users = 0
_stance_restore: Any = None  # the set_stance context that the last user leaving exits


@contextmanager
def _eager_stance() -> Iterator[None]:
    """Compiled functions (torch.compile) inside f run eagerly while it is traced, so that
    the tracer sees their operations (Dynamo would otherwise try to compile the tracer's
    dispatch mode, and fail). Dynamo is only consulted if it was imported: a compiled
    function cannot exist before.

    The stance is process-wide, so concurrent traces share it, reference-counted: the
    first sets it, the last restores what was there before. (Each trace setting and
    restoring its own, as until stop 21, interleaved across threads and could leave
    the process in "force_eager": every torch.compile'd function silently eager.)"""
    global _stance_users, _stance_restore
    if "torch._dynamo" not in sys.modules:
        yield
        return
    with _stance_lock:
        if _stance_users == 0:
            stance = torch.compiler.set_stance("force_eager")
            stance.__enter__()
            _stance_restore = stance
        _stance_users += 1
    try:
        yield
    finally:
        with _stance_lock:
            _stance_users -= 1
            if _stance_users == 0:
                stance, _stance_restore = _stance_restore, None
                stance.__exit__(None, None, None)


def _describe_ctx_tensor(node: Any) -> str:
    return (f"a tensor that custom Function {node.cls.__qualname__} keeps on its ctx (read by "
            "its jvp and backward)")


def _primal(a: Any, level: int, tracer: Tracer) -> Any:
    if isinstance(a, torch.Tensor):
        if tracer.direct:
            return a.detach()
        return unpack_dual(a, level=level).primal.detach()
    return a


def _refuse_tangent_dependent(tracer: Tracer, value: torch.Tensor, what: str) -> None:
    """Raise if a *primal* result (an output or aux value) was computed from tangent data."""
    v = tracer.lookup(value)
    if v is None:
        return
    why = tracer.poisoned.get(v.id)
    if why is not None:
        raise NonLinearTangentError(why)
    producer = next((e for e in reversed(tracer.eqns) if v in e.out_vars()), None)
    by = f" (computed by {e_name(producer)})" if producer is not None else ""
    raise NonLinearTangentError(
        f"{_API}: the value of {what} depends on tangent data{by}: f read a tangent (e.g. with "
        "torch.autograd.forward_ad.unpack_dual) and used it in the primal computation. The "
        "value of f must not depend on the tangents."
    )


def e_name(e) -> str:
    return e.name or str(e.fn)


def _collect_outputs(tracer: Tracer, out: Any) -> tuple[list, list, Any]:
    with_path, out_spec = flatten_with_path(out)
    outputs: list[Var | ZeroOut] = []
    y_flat = []
    for kp, o in with_path:
        if not isinstance(o, torch.Tensor):
            raise ValueError(
                f"{_API}: f must return a pytree of tensors, but output{keystr(kp)} is "
                f"{type(o).__name__}. Return non-tensors through has_aux=True."
            )
        _refuse_tangent_dependent(tracer, o, f"output{keystr(kp)}")
        if tracer.direct:
            primal, tangent = o, tracer.direct_tangent(o)
        else:
            primal, tangent = unpack_dual(o, level=tracer.level)
        tan = tracer.tangent_of(o, tangent)
        if isinstance(tan, Var) and tan.dtype != o.dtype:
            # Eager forward AD can leave a tangent in a narrower dtype than its output
            # (type promotion with constant operands); torch.func.jvp casts it.
            cast = Var(tan.shape, o.dtype, tan.stride, device=tan.device)
            tracer.emit(Eqn(torch.ops.aten._to_copy.default, (tan,), {"dtype": o.dtype}, cast))
            tan = cast
        if isinstance(tan, Var):
            outputs.append(tan)
            if tan.id in tracer.valued:  # (other tangents were not computed)
                tracer.trace_values[tan.id] = tangent
        elif tan is None or tan._is_zerotensor() or not bool(tan.any()):
            outputs.append(ZeroOut(tuple(o.shape), o.dtype, o.device))
        else:
            raise LinearizeError(
                f"{_API}: the tangent of output{keystr(kp)} does not depend on the input tangents "
                "but is not zero, so f is not differentiable at this point in a way linearize can "
                "represent (an affine rather than linear tangent)."
            )
        y_flat.append(primal.detach())
    return outputs, y_flat, out_spec


def _primal_paths(primals: list, leaf_specs) -> dict:
    paths: dict = {}
    for p, ls in zip(primals, leaf_specs):
        if isinstance(p, torch.Tensor):
            paths.setdefault(storage_key(p), ls.path)
    return paths


def _describe_residual(prog: Program, i: int, primals: list, leaf_specs,
                       paths: dict | None = None) -> str:
    """How an error names residual ``i``: the primal it is (``paths``: storage key -> path
    of the first primal there, made once per map; the primals are searched otherwise)."""
    r = prog.residuals[i]
    k = storage_key(r)
    if paths is None:
        paths = _primal_paths(primals, leaf_specs)
    if k in paths:
        return f"primals{paths[k]}"
    origin = prog.residual_names[i] if i < len(prog.residual_names) else ""
    return f"a tensor saved for the tangent program (residual r{i}, read by {origin})"
