"""Tests for ``torch_linearize/_errors.py``: the error paths of ``linearize`` and ``LinearMap``.

* non-linear uses of tangents raise ``NonLinearTangentError`` naming the op,
  but only when the non-linear value reaches an output (poison is deferred);
* operators without a forward-AD formula raise ``NoForwardADError``;
* an exception inside ``f`` leaves no global state behind;
* ``linearize`` inside a user's ``dual_level`` / inside another ``linearize``;
* ``ReleasedError`` and ``StaleResidualError``.

Inside ``f``, ``unpack_dual(x).tangent`` is the only way user code can touch a
tangent directly; the tests use it to build deliberately non-linear programs.
"""

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

import custom_functions as cf
import torch_linearize as tl
from helpers import eager_jvp

D = torch.float64


def tangent(x):
    """The tangent that ``linearize`` attached to primal ``x`` inside ``f``."""
    t = fwAD.unpack_dual(x).tangent
    assert t is not None
    return t


def assert_clean_global_state():
    assert fwAD._current_level == -1
    assert _get_current_dispatch_mode() is None
    assert "apply" not in torch.autograd.function._SingleLevelFunction.__dict__
    # the call overrides are uninstalled (PyTorch's own functions are back)
    from torch_linearize import _overrides

    assert not _overrides._originals
    for (ns, name), fn in _overrides._OVERRIDES.items():
        assert getattr(ns, name) is not fn, name
    # A following linearize works and is correct ...
    x = torch.randn(4, dtype=D)
    t = torch.randn(4, dtype=D)
    y, jvp_fn = tl.linearize(lambda x: x.sin() * x, x)
    ry, rt = torch.func.jvp(lambda x: x.sin() * x, (x,), (t,))
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(jvp_fn(t), rt)
    # ... and so does the user's own forward AD.
    with fwAD.dual_level():
        d = fwAD.make_dual(x, t)
        torch.testing.assert_close(fwAD.unpack_dual(d.exp()).tangent, x.exp() * t)
    assert fwAD._current_level == -1


# ----------------------------------------------------------------------------- hierarchy


def test_error_classes_subclass_the_builtin_a_torch_user_expects():
    for cls in (tl.NonLinearTangentError, tl.NoForwardADError, tl.ReleasedError, tl.StaleResidualError):
        assert issubclass(cls, tl.LinearizeError)
    assert issubclass(tl.LinearizeError, RuntimeError)
    assert issubclass(tl.NoForwardADError, NotImplementedError)


# ----------------------------------------------------------------------------- non-linear tangents


NON_LINEAR = {
    "item": (lambda x: x * tangent(x).sum().item(), r"_local_scalar_dense.*\.item\(\)"),
    "float": (lambda x: x * float(tangent(x)[0]), r"_local_scalar_dense"),
    "branch": (lambda x: x * 2 if tangent(x).sum() > 0 else x, r"_local_scalar_dense"),
    "equal": (lambda x: x * 2 if torch.equal(tangent(x), tangent(x)) else x, r"aten\.equal"),
    "t*t": (lambda x: x * (tangent(x) * tangent(x)), r"aten\.mul\.Tensor multiplies two tangent-dependent"),
    "t@t": (lambda x: x * (tangent(x) @ tangent(x)), r"aten\.(dot|mm|matmul)\S* multiplies two"),
    "sin(t)": (lambda x: x * torch.sin(tangent(x)), r"aten\.sin\.default is not linear"),
    "exp(t)": (lambda x: x * tangent(x).exp(), r"aten\.exp\.default is not linear"),
    "abs(t)": (lambda x: x * tangent(x).abs(), r"aten\.abs\.default is not linear"),
    "t>0": (lambda x: x * (tangent(x) > 0), r"aten\.gt\.Scalar produced a torch\.bool tensor"),
    "where(t>0)": (lambda x: torch.where(tangent(x) > 0, x, 2 * x), r"aten\.gt\.Scalar"),
    "long(t)": (lambda x: x * tangent(x).long(), r"aten\._to_copy\.default produced a torch\.int64"),
    "nonzero": (lambda x: x[tangent(x).nonzero()], r"aten\.nonzero"),
    "rand_like": (lambda x: x * torch.rand_like(tangent(x)), r"random operation aten\.rand_like"),
    "bernoulli": (lambda x: x * torch.bernoulli(tangent(x) * 0.5), r"random operation aten\.bernoulli"),
    "div-by-t": (lambda x: x / tangent(x), r"aten\.div\.Tensor"),
}


@pytest.mark.parametrize("case", list(NON_LINEAR))
def test_non_linear_use_of_tangent_raises_naming_the_op(case):
    f, pattern = NON_LINEAR[case]
    x = torch.randn(3, dtype=D)
    with pytest.raises(tl.NonLinearTangentError, match=pattern):
        tl.linearize(f, x)
    assert_clean_global_state()


def test_non_linear_value_as_output_tangent_raises():
    # A quadratic tangent installed directly as the output's tangent.
    def f(x):
        return fwAD.make_dual(fwAD.unpack_dual(x).primal * 1, tangent(x) * tangent(x))

    with pytest.raises(tl.NonLinearTangentError, match="multiplies two tangent-dependent"):
        tl.linearize(f, torch.randn(3, dtype=D))


def test_non_linear_values_not_reaching_the_output_do_not_raise():
    # Poison is deferred: a non-linear value that is computed and dropped is harmless.
    x = torch.randn(5, dtype=D)

    def f(x):
        t = tangent(x)
        _ = t * t
        _ = torch.sin(t)
        _ = torch.rand_like(t)
        _ = t > 0
        _ = t.long()
        unused_out = x * t.exp()  # poisoned tangent inside a dual that is then dropped
        del unused_out
        return x.sin() * x

    y, jvp_fn = tl.linearize(f, x)
    g = lambda x: x.sin() * x
    torch.testing.assert_close(y, g(x))
    for _ in range(2):
        t = torch.randn(5, dtype=D)
        torch.testing.assert_close(jvp_fn(t), torch.func.jvp(g, (x,), (t,))[1])
    # The poisoned equations were eliminated from the program.
    program = repr(jvp_fn)
    for op in ("aten.sin", "aten.exp", "rand_like", "aten.gt", "_to_copy"):
        assert op not in program, program


def test_poison_reaching_one_of_several_outputs_raises():
    def f(x):
        return x.sin(), x * torch.sin(tangent(x))

    with pytest.raises(tl.NonLinearTangentError, match=r"aten\.sin\.default is not linear"):
        tl.linearize(f, torch.randn(3, dtype=D))


def test_tangent_flowing_into_the_primal_output_raises():
    x = torch.randn(3, dtype=D)
    with pytest.raises(tl.LinearizeError):
        tl.linearize(lambda x: x + tangent(x), x)


# ----------------------------------------------------------------------------- no forward-AD formula


@pytest.mark.parametrize(
    "f, op",
    [
        (lambda x: F.ctc_loss(F.log_softmax(x.view(3, 1, 2), -1), torch.tensor([[1]]),
                              torch.tensor([3]), torch.tensor([1])), "ctc_loss"),
        (lambda x: F.multi_margin_loss(x.view(2, 3), torch.tensor([1, 0])), "multi_margin_loss"),
    ],
    ids=["ctc_loss", "multi_margin_loss"],
)
def test_op_without_forward_ad_formula(f, op):
    x = torch.randn(6, dtype=D)
    # The reference: PyTorch's eager forward AD really has no formula for it.
    with pytest.raises(RuntimeError, match="does not support it"):
        eager_jvp(f, (x,), (torch.ones(6, dtype=D),))
    with pytest.raises(tl.NoForwardADError, match=rf"operator \S*{op}\S* has no forward-mode AD") as info:
        tl.linearize(f, x)
    msg = str(info.value)
    assert "custom torch.autograd.Function" in msg and "jvp" in msg
    assert isinstance(info.value, NotImplementedError)
    assert info.value.__cause__ is not None  # the original PyTorch error is chained
    assert_clean_global_state()


def test_out_variant_raises_with_the_out_of_place_advice():
    x, t = torch.randn(5, dtype=D), torch.randn(5, dtype=D)

    def f(x):
        y = torch.empty(5, dtype=D)
        torch.sin(x, out=y)
        return y * 2

    with pytest.raises(tl.NoForwardADError, match=r"sin_out is an out= variant.*out-of-place"):
        tl.linearize(f, x)
    assert_clean_global_state()

    def g(x):  # the advice: compute out of place, copy into the buffer
        y = torch.empty(5, dtype=D)
        y.copy_(torch.sin(x))
        return y * 2

    _, jvp_fn = tl.linearize(g, x)
    torch.testing.assert_close(jvp_fn(t), 2 * torch.cos(x) * t)


def test_higher_order_control_flow_raises_with_the_python_advice():
    # torch.cond inside f: PyTorch's dispatch has no rule for it under a mode (eager
    # forward AD silently drops the tangent there). The error names it and the fix.
    x, t = torch.randn(4, dtype=D), torch.randn(4, dtype=D)

    def f(x):
        return torch.cond(x.sum() > 0, torch.sin, torch.cos, (x,))

    with pytest.raises(tl.LinearizeError, match=r"higher-order operator cond .* write the "
                                                r"control flow in Python"):
        tl.linearize(f, x)
    assert_clean_global_state()
    _, jvp_fn = tl.linearize(lambda x: torch.sin(x) if x.sum() > 0 else torch.cos(x), x)
    want = torch.cos(x) * t if x.sum() > 0 else -torch.sin(x) * t
    torch.testing.assert_close(jvp_fn(t), want)


def test_op_without_formula_on_untracked_values_is_fine():
    # cdist on tensors that carry no tangent is primal work: no forward AD needed.
    x = torch.randn(6, dtype=D)
    c = torch.randn(3, 2, dtype=D)

    def f(x):
        return x * torch.cdist(c, c * 2).sum()

    _, jvp_fn = tl.linearize(f, x)
    t = torch.randn(6, dtype=D)
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1])


# ----------------------------------------------------------------------------- exceptions inside f


def _raise_plain(x):
    x.exp()
    raise KeyError("boom")


def _raise_in_custom_function(x):
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(x):
            raise KeyError("boom")

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def jvp(ctx, t):
            return t

    return cf.NumpyCube.apply(x) + Boom.apply(x)


def _raise_after_thread_join(x):
    import threading

    th = threading.Thread(target=lambda: None)
    th.start()
    th.join()
    raise KeyError("boom")


@pytest.mark.parametrize(
    "f, exc",
    [
        (_raise_plain, KeyError),
        (_raise_in_custom_function, KeyError),
        (lambda x: x * tangent(x).sum().item(), tl.NonLinearTangentError),  # raised during dispatch
        (lambda x: x * tangent(x).sin(), tl.NonLinearTangentError),  # raised after the trace (DCE)
        (lambda x: F.multi_margin_loss(x.view(2, 2), torch.tensor([1, 0])), tl.NoForwardADError),
        (lambda x: x.view(7, 7), RuntimeError),  # a PyTorch error
        (_raise_after_thread_join, KeyError),
    ],
    ids=["plain", "custom-function", "item", "poison", "no-formula", "torch-error", "thread"],
)
def test_exception_inside_f_leaves_no_global_state(f, exc):
    with pytest.raises(exc):
        tl.linearize(f, torch.randn(4, dtype=D))
    assert_clean_global_state()


def test_exception_with_has_aux_misuse_leaves_no_global_state():
    with pytest.raises(ValueError, match="has_aux=True"):
        tl.linearize(lambda x: x, torch.randn(2, dtype=D), has_aux=True)
    assert_clean_global_state()


def test_failed_linearize_does_not_break_an_existing_map():
    x = torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(torch.tanh, x)
    with pytest.raises(KeyError):
        tl.linearize(_raise_plain, x)
    t = torch.randn(4, dtype=D)
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(torch.tanh, (x,), (t,))[1])


# ----------------------------------------------------------------------------- dual_level / nesting


def test_linearize_inside_user_dual_level_raises_clearly():
    x = torch.randn(3, dtype=D)
    with fwAD.dual_level():
        d = fwAD.make_dual(x, torch.ones(3, dtype=D))
        with pytest.raises(RuntimeError, match=r"cannot run inside an active "
                                               r"torch\.autograd\.forward_ad\.dual_level\(\)"):
            tl.linearize(torch.sin, x)
        # The user's level is untouched and still works.
        assert fwAD._current_level == 0
        torch.testing.assert_close(fwAD.unpack_dual(d.sin()).tangent, x.cos())
    assert_clean_global_state()


@pytest.mark.parametrize("transform", ["vmap", "grad", "jacrev"])
@pytest.mark.parametrize("where", ["primal", "captured"])
def test_linearize_inside_a_torch_func_transform_of_its_inputs_raises_clearly(transform, where):
    # Eager forward AD does not compose with torch.func: before, a transformed primal or a
    # transformed tensor captured by f gave "Batching rule not implemented" or a
    # misleading "affine rather than linear" error.
    x, t = torch.randn(5, dtype=D), torch.randn(5, dtype=D)

    def inner(c):
        if where == "primal":
            _, jvp_fn = tl.linearize(torch.sin, c)
        else:
            _, jvp_fn = tl.linearize(lambda x: torch.sin(x) * c, x)
        return jvp_fn(t).sum()

    run = {"vmap": torch.vmap(inner), "grad": torch.func.grad(inner),
           "jacrev": torch.func.jacrev(inner)}[transform]
    what = r"primals\[0\] is" if where == "primal" else "f's output depends on"
    what += r" a tensor being transformed by a torch\.func transform"
    if transform != "vmap":  # (refused on entry: a differentiating transform is active)
        what = r"cannot run inside a differentiating torch\.func transform: grad"
    with pytest.raises(tl.LinearizeError, match=what + r".* Call linearize outside the "
                                                       r"transform"):
        run(torch.randn(3, 5, dtype=D) if transform == "vmap" else x)
    assert_clean_global_state()


def test_linearize_inside_vmap_over_tangents_only_works():
    # The composition that is supported: the primals are plain, torch.vmap maps the
    # tangents (as torch.vmap(jvp_fn) outside would).
    x, ts = torch.randn(5, dtype=D), torch.randn(3, 5, dtype=D)
    out = torch.vmap(lambda t: tl.linearize(torch.sin, x)[1](t))(ts)
    torch.testing.assert_close(out, torch.cos(x) * ts)


def test_nested_linearize_on_tangent_carrying_input_raises():
    def f(x):
        y, _ = tl.linearize(torch.sin, x)
        return y * 2

    with pytest.raises(RuntimeError, match="linearize"):
        tl.linearize(f, torch.randn(3, dtype=D))


@pytest.mark.parametrize("where", ["f", "custom Function forward"])
def test_nested_linearize_reading_a_captured_outer_tangent_raises(where):
    # A linearize inside f (or inside a custom Function's forward there) whose function
    # captures a tensor carrying the outer tangent: forward-over-forward. It was a
    # misleading "reads the value of a tangent-dependent tensor" error inside f, and a
    # silently wrong map and output inside a Function's forward.
    x, t, c = (torch.randn(4, dtype=D) for _ in range(3))
    box = {}

    class Inner(torch.autograd.Function):
        @staticmethod
        def forward(c):
            _, j = tl.linearize(lambda y: y * box["w"], c)
            return j(torch.ones_like(c))

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def jvp(ctx, tc):
            return torch.zeros_like(tc)

    def inner(c):
        if where == "f":
            _, j = tl.linearize(lambda y: y * box["w"], c)
            return j(torch.ones_like(c))
        return Inner.apply(c)

    def f(x, detach=False):
        box["w"] = (x * 2).detach() if detach else x * 2
        return inner(c) * x

    with pytest.raises(tl.LinearizeError, match=r"aten\.mul\.Tensor in a nested linearize .* "
                       r"reads the enclosing linearization's tangent.*\.detach\(\)ed"):
        tl.linearize(f, x)
    assert_clean_global_state()
    y, jvp_fn = tl.linearize(lambda x: f(x, detach=True), x)  # w a constant inside
    torch.testing.assert_close(y, 2 * x * x)
    torch.testing.assert_close(jvp_fn(t), 2 * x * t)


def test_nested_linearize_leaves_no_global_state():
    # Whatever nesting does, the global state is restored afterwards.
    def f(x):
        y, _ = tl.linearize(torch.sin, x)
        return y * x

    with contextlib.suppress(RuntimeError):
        tl.linearize(f, torch.randn(3, dtype=D))
    assert_clean_global_state()


def test_linear_map_from_outside_applied_inside_f():
    # A map built before f runs is just a linear function of its input.
    x0 = torch.randn(3, dtype=D)
    _, inner = tl.linearize(torch.sin, x0)

    def f(x):
        return inner(x) * 2

    x = torch.randn(3, dtype=D)
    y, jvp_fn = tl.linearize(f, x)
    t = torch.randn(3, dtype=D)
    torch.testing.assert_close(y, 2 * x0.cos() * x)
    torch.testing.assert_close(jvp_fn(t), 2 * x0.cos() * t)


# ----------------------------------------------------------------------------- released maps


def test_released_map_raises_and_reprs():
    x = torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(torch.exp, x)
    assert not jvp_fn.released and "residuals:" in repr(jvp_fn)
    jvp_fn.release()
    assert jvp_fn.released
    assert repr(jvp_fn) == "LinearMap(<released>)"
    with pytest.raises(tl.ReleasedError, match="released; call linearize again"):
        jvp_fn(torch.ones(3, dtype=D))
    jvp_fn.release()  # idempotent
    with pytest.raises(tl.ReleasedError):
        jvp_fn(torch.ones(3, dtype=D))


def test_released_map_with_custom_function_raises():
    cf.reset()
    x = torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(cf.NumpyCube.apply, x)
    jvp_fn.release()
    with pytest.raises(tl.ReleasedError):
        jvp_fn(torch.ones(3, dtype=D))
    assert cf.CALLS["NumpyCube.jvp"] == 0


# ----------------------------------------------------------------------------- stale residuals


def test_mutating_a_primal_the_program_reads_raises_naming_it():
    x, w = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(lambda x, w: x * w, x, w)
    t = (torch.randn(3, dtype=D), torch.randn(3, dtype=D))
    jvp_fn(*t)  # fine before the mutation
    x.add_(1)
    with pytest.raises(tl.StaleResidualError, match=r"primals\[0\] was modified in place after linearize"):
        jvp_fn(*t)


def test_mutating_a_dict_primal_names_its_path():
    # outer() is not pointwise, so the map reads both primals by reference.
    p = {"w": torch.randn(3, dtype=D), "b": torch.randn(3, dtype=D)}
    _, jvp_fn = tl.linearize(lambda p: torch.outer(p["w"], p["b"]) + p["b"].exp(), p)
    p["w"].mul_(2)
    with pytest.raises(tl.StaleResidualError, match=r"primals\[0\]\['w'\] was modified in place.*"
                                                    r"from 0 to 1"):
        jvp_fn({"w": torch.ones(3, dtype=D), "b": torch.ones(3, dtype=D)})


def test_mutating_a_view_of_the_primal_is_detected():
    x = torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: torch.outer(x, x), x)
    x[1:].zero_()
    with pytest.raises(tl.StaleResidualError, match=r"primals\[0\]"):
        jvp_fn(torch.ones(4, dtype=D))


_KEPT: dict = {}


def test_mutating_a_tensor_f_made_and_kept_raises():
    """A tensor f creates is the map's residual; if f also keeps it (a global, a module
    attribute) the caller can change it after linearize. Until stop 22 only primals,
    captured tensors, outputs and aux were watched, and such a change silently changed
    the map (x * w with w scaled 100x gave 100x the JVP)."""
    def f(x):
        w = torch.arange(1.0, 5.0, dtype=D)
        _KEPT["w"] = w
        return (x * w).cumsum(0)

    x = torch.randn(4, dtype=D)
    _, jvp_fn = tl.linearize(f, x)
    kept = _KEPT.pop("w")
    t = torch.randn(4, dtype=D)
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x,), (t,))[1])
    kept[1:].mul_(100)
    with pytest.raises(tl.StaleResidualError, match=r"residual r0.*modified in place after"):
        jvp_fn(t)
    with pytest.raises(tl.StaleResidualError):
        jvp_fn.T(t)


def test_mutating_a_captured_tensor_raises():
    x, w = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(lambda x: x * w, x)
    w.add_(1)
    with pytest.raises(tl.StaleResidualError, match="modified in place after linearize"):
        jvp_fn(torch.ones(3, dtype=D))


@pytest.mark.parametrize("f", [lambda x: torch.outer(x, x), lambda x: torch.outer(x.exp(), x)],
                         ids=["outer(x,x)", "outer(exp,x)"])
def test_mutating_a_single_primal_that_is_a_residual_raises(f):
    # outer() is not pointwise, so the program reads x by reference (pointwise uses
    # are folded into coefficients computed once, which stay valid).
    x = torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(f, x)
    x.add_(1)
    with pytest.raises(tl.StaleResidualError, match=r"primals\[0\]"):
        jvp_fn(torch.ones(3, dtype=D))


@pytest.mark.parametrize("f", [torch.exp, lambda x: x * torch.arange(3.0, dtype=D), lambda x: x * x],
                         ids=["exp", "x*w", "x*x-folded"])
def test_mutating_a_primal_the_program_does_not_read_is_harmless(f):
    # exp keeps y, x*w keeps w: x itself is not a residual, so the map stays valid.
    x = torch.randn(3, dtype=D)
    x0 = x.clone()
    _, jvp_fn = tl.linearize(f, x)
    x.add_(1)
    t = torch.randn(3, dtype=D)
    torch.testing.assert_close(jvp_fn(t), torch.func.jvp(f, (x0,), (t,))[1])


def test_mutating_y_when_y_is_the_residual_raises():
    x = torch.randn(3, dtype=D)
    y, jvp_fn = tl.linearize(torch.exp, x)
    t = torch.randn(3, dtype=D)
    torch.testing.assert_close(jvp_fn(t), x.exp() * t)
    y.add_(1)
    with pytest.raises(tl.StaleResidualError, match="modified in place after linearize"):
        jvp_fn(t)


def test_mutating_aux_that_is_a_residual_raises():
    x = torch.randn(3, dtype=D)

    def f(x):
        e = x.exp()
        return torch.outer(e, x), e  # the map reads e (the aux tensor itself) in outer(e, t)

    _, jvp_fn, aux = tl.linearize(f, x, has_aux=True)
    aux.zero_()
    with pytest.raises(tl.StaleResidualError):
        jvp_fn(torch.ones(3, dtype=D))


def test_out_of_band_write_during_f_raises_at_linearize():
    # A residual written during f by code the tracer cannot see (numpy), with the version
    # counter bumped as PyTorch asks (increment_version): the map would be wrong.
    w = torch.randn(3, dtype=D)

    def f(x):
        y = x * w
        w.numpy()[:] = 0
        torch.autograd.graph.increment_version(w)
        return y

    with pytest.raises(tl.StaleResidualError, match=r"modified in place later during f.*Clone it"):
        tl.linearize(f, torch.randn(3, dtype=D))
    assert_clean_global_state()


def test_out_of_band_write_to_a_primal_during_f_names_it():
    def f(x, w):
        y = x * w
        w.numpy()[:] = 0
        torch.autograd.graph.increment_version(w)
        return y

    with pytest.raises(tl.StaleResidualError, match=r"primals\[1\]"):
        tl.linearize(f, torch.randn(3, dtype=D), torch.randn(3, dtype=D))


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd", "jvp", "hessian"])
def test_linearize_inside_a_differentiating_transform_names_it(transform):
    # Plain primals made outside the transform: the refusal used to blame a "transformed
    # tensor" (grad, jacrev) or a user's dual_level() (jacfwd, jvp), neither of them true
    x0 = torch.randn(3, dtype=torch.float64)
    g = lambda t: tl.linearize(torch.sin, x0)[1](t).sum()
    v = torch.randn(3, dtype=torch.float64)
    call = {"grad": lambda: torch.func.grad(g)(v), "jacrev": lambda: torch.func.jacrev(g)(v),
            "jacfwd": lambda: torch.func.jacfwd(g)(v),
            "jvp": lambda: torch.func.jvp(g, (v,), (v,)),
            "hessian": lambda: torch.func.hessian(g)(v)}[transform]
    kind = "grad" if transform in ("grad", "jacrev") else "jvp"
    with pytest.raises(tl.LinearizeError, match=rf"inside a differentiating torch.func "
                                                rf"transform: {kind} \("):
        call()
    # under vmap alone it works
    _, jvp_fn = tl.linearize(torch.sin, x0)
    vs = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.vmap(lambda t: tl.linearize(torch.sin, x0)[1](t))(vs),
                               torch.vmap(jvp_fn)(vs))
