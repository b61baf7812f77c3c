"""Tests for ``torch_linearize/_forward_ad.py``: the shared forward-AD level, and threads.

PyTorch has one global forward-AD level and refuses nested levels, so
concurrent ``linearize`` calls share one reference-counted level. These tests
check the reference counting directly and run ``linearize`` from several
threads at once (a ``threading.Barrier`` inside ``f`` makes the traces
overlap), comparing every result with ``torch.func.jvp``.
"""

import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import _get_current_dispatch_mode

import custom_functions as cf
import torch_linearize as tl
from torch_linearize import _custom_function, _forward_ad
from torch_linearize._forward_ad import shared_dual_level

D = torch.float64
TIMEOUT = 60


def assert_idle():
    assert fwAD._current_level == -1
    assert _forward_ad._users == 0 and _forward_ad._level is None
    assert _custom_function._patch_users == 0
    assert "apply" not in torch.autograd.function._SingleLevelFunction.__dict__
    assert _get_current_dispatch_mode() is None


# ----------------------------------------------------------------------------- shared_dual_level


def test_enters_and_exits_a_level():
    assert_idle()
    with shared_dual_level() as level:
        assert level == fwAD._current_level and level >= 0
        # The level is a real forward-AD level.
        x = torch.randn(3, dtype=D)
        d = fwAD.make_dual(x, torch.ones(3, dtype=D), level=level)
        torch.testing.assert_close(fwAD.unpack_dual(d.exp(), level=level).tangent, x.exp())
    assert_idle()


def test_reentry_shares_the_level_and_the_last_user_exits_it():
    with shared_dual_level() as a:
        with shared_dual_level() as b:
            assert a == b
            assert _forward_ad._users == 2
        assert fwAD._current_level == a  # still held by the outer user
        assert _forward_ad._users == 1
    assert_idle()


def test_exits_on_exception():
    with pytest.raises(KeyError), shared_dual_level():
        raise KeyError("boom")
    assert_idle()


def test_refuses_to_join_a_users_dual_level():
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match="cannot run inside an active"), shared_dual_level():
            pass  # pragma: no cover
        assert fwAD._current_level == 0 and _forward_ad._users == 0
    assert_idle()


def test_level_is_held_until_the_last_thread_leaves():
    entered = threading.Barrier(2, timeout=TIMEOUT)
    first_left = threading.Event()
    seen = {}
    errors = []

    def first():
        try:
            with shared_dual_level() as level:
                seen["first"] = level
                entered.wait()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            first_left.set()

    def second():
        try:
            with shared_dual_level() as level:
                seen["second"] = level
                entered.wait()
                assert first_left.wait(TIMEOUT)
                # The first thread has left; the level must still be ours.
                seen["current_after_first_left"] = fwAD._current_level
                seen["users_after_first_left"] = _forward_ad._users
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT)
    assert not errors, errors
    assert seen["first"] == seen["second"] == seen["current_after_first_left"]
    assert seen["users_after_first_left"] == 1
    assert_idle()


# ----------------------------------------------------------------------------- linearize in threads


def _make_f(i, barrier):
    def f(x, w):
        barrier.wait()  # every thread is inside its trace
        h = torch.tanh(x * (i + 1)) @ w
        barrier.wait()  # ... and has recorded some equations
        return {"h": h.exp(), "s": (x.sin() * w.sum(0)).cumsum(0)}

    return f


def _ref_f(i):
    def f(x, w):
        h = torch.tanh(x * (i + 1)) @ w
        return {"h": h.exp(), "s": (x.sin() * w.sum(0)).cumsum(0)}

    return f


@pytest.mark.parametrize("n_threads", [2, 4])
def test_concurrent_linearize_is_correct(n_threads):
    barrier = threading.Barrier(n_threads, timeout=TIMEOUT)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(5, 3, dtype=D, generator=gen) for _ in range(n_threads)]
    ws = [torch.randn(3, 3, dtype=D, generator=gen) for _ in range(n_threads)]
    ts = [(torch.randn(5, 3, dtype=D, generator=gen), torch.randn(3, 3, dtype=D, generator=gen))
          for _ in range(n_threads)]
    results = [None] * n_threads
    levels = [None] * n_threads
    errors = []

    def worker(i):
        try:
            f = _make_f(i, barrier)

            def spy(x, w):
                levels[i] = fwAD._current_level
                return f(x, w)

            y, jvp_fn = tl.linearize(spy, xs[i], ws[i])
            results[i] = (y, jvp_fn, jvp_fn(*ts[i]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT)
    assert not errors, errors
    assert len(set(levels)) == 1 and levels[0] >= 0  # one shared level
    assert_idle()
    for i in range(n_threads):
        y, jvp_fn, out = results[i]
        ry, rt = torch.func.jvp(_ref_f(i), (xs[i], ws[i]), ts[i])
        torch.testing.assert_close(y, ry)
        torch.testing.assert_close(out, rt)
        # The maps stay valid after every thread has finished, and are independent.
        t2 = (torch.randn(5, 3, dtype=D, generator=gen), torch.randn(3, 3, dtype=D, generator=gen))
        torch.testing.assert_close(jvp_fn(*t2), torch.func.jvp(_ref_f(i), (xs[i], ws[i]), t2)[1])


def test_concurrent_linearize_with_one_failing_thread():
    n = 3
    everyone_tracing = threading.Barrier(n, timeout=TIMEOUT)
    good_ones = threading.Barrier(n - 1, timeout=TIMEOUT)
    failed = threading.Event()
    x = torch.randn(4, dtype=D)
    outcome = [None] * n

    def good(x):
        everyone_tracing.wait()
        y = x.sin()
        assert failed.wait(TIMEOUT)  # the failing trace has ended while this one is live
        good_ones.wait()
        return y * x

    def bad(x):
        everyone_tracing.wait()
        x.exp()
        raise KeyError("boom")

    def worker(i):
        try:
            outcome[i] = tl.linearize(bad if i == 1 else good, x)
        except Exception as e:
            outcome[i] = e
        finally:
            if i == 1:
                failed.set()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT)
    assert isinstance(outcome[1], KeyError)
    t = torch.randn(4, dtype=D)
    _, want = torch.func.jvp(lambda x: x.sin() * x, (x,), (t,))
    for i in (0, 2):
        assert isinstance(outcome[i], tuple), outcome[i]
        y, jvp_fn = outcome[i]
        torch.testing.assert_close(y, x.sin() * x)
        torch.testing.assert_close(jvp_fn(t), want)
    assert_idle()


def test_concurrent_custom_functions_run_forward_once_per_thread():
    cf.reset()
    n = 4
    barrier = threading.Barrier(n, timeout=TIMEOUT)
    xs = [torch.randn(3, dtype=D) for _ in range(n)]
    results = [None] * n
    errors = []

    def f(x):
        barrier.wait()
        y = cf.NumpyCube.apply(x)
        barrier.wait()  # every thread has called the Function while all traces are live
        return y.sin()

    def worker(i):
        try:
            results[i] = tl.linearize(f, xs[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT)
    assert not errors, errors
    assert cf.CALLS["NumpyCube.forward"] == n and cf.CALLS["NumpyCube.jvp"] == 0
    assert_idle()
    for i in range(n):
        t = torch.randn(3, dtype=D)
        _, want = torch.func.jvp(lambda x: (x**3).sin(), (xs[i],), (t,))
        torch.testing.assert_close(results[i][1](t), want)
    assert cf.CALLS["NumpyCube.jvp"] == n and cf.CALLS["NumpyCube.forward"] == n


def test_tracing_thread_does_not_leak_tangents_into_another_thread():
    # While thread A traces, thread B runs ordinary PyTorch code (no dual level of its
    # own): B's results carry no tangent and are not recorded by A.
    started = threading.Event()
    done = threading.Event()
    b_results = []

    def f(x):
        started.set()
        assert done.wait(TIMEOUT)
        return x.exp()

    def other():
        assert started.wait(TIMEOUT)
        try:
            a = torch.randn(3, dtype=D)
            b = a.exp()
            b_results.append((fwAD.unpack_dual(b).tangent, torch.allclose(b, a.exp())))
        finally:
            done.set()

    th = threading.Thread(target=other)
    th.start()
    x = torch.randn(3, dtype=D)
    _, jvp_fn = tl.linearize(f, x)
    th.join(TIMEOUT)
    assert b_results == [(None, True)]
    assert jvp_fn.num_ops == 1  # only exp's tangent op; nothing from thread B
    t = torch.randn(3, dtype=D)
    torch.testing.assert_close(jvp_fn(t), x.exp() * t)
