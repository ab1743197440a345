"""Request/reply (SPEC §10): call(), Msg.reply()/reply_error()/is_call, serve().

Callees run the code in ``call_peers`` in forked children (``kids``); every
wait is bounded, and nothing synchronises with sleeps.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
from typing import Any

import call_peers as peers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailbox_peers import Kids

import mproc
from mproc import _mailbox
from mproc import _runtime as rt

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-specific checks"),
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),
]

WAIT = peers.WAIT


def stop(pid: int) -> None:
    with pytest.raises(mproc.StopServing):
        mproc.call(pid, ("stop", None), "rpc", timeout=WAIT)


def remove_stale() -> None:
    """A callee killed or os._exit()ed leaves its socket file; mproc removes it when found."""
    rt.remove_stale(rt.runtime())


def assert_nothing_queued() -> None:
    receiver = _mailbox._state.receiver
    assert receiver is not None
    assert receiver.depths() == {}
    assert receiver.calls == {}
    with pytest.raises(mproc.ReceiveTimeout):
        mproc.receive("", timeout=0)
    with pytest.raises(mproc.ReceiveTimeout):
        mproc.receive("rpc", timeout=0)


# ---------------------------------------------------------------- the happy path


def test_call_returns_the_reply(kids: Kids) -> None:
    p = kids.start(peers.serve)
    assert mproc.call(p.pid, ("double", 21), "rpc", timeout=WAIT) == 42
    assert mproc.call(p.pid, ("echo", {"a": [1, 2]}), "rpc", timeout=WAIT) == {"a": [1, 2]}
    f = mproc.call(p.pid, ("lambda", None), "rpc", timeout=WAIT)
    assert f() == 1
    stop(p.pid)
    assert kids.finish(p) == 0
    assert_nothing_queued()


def test_call_with_no_timeout_waits_for_the_reply(kids: Kids) -> None:
    p = kids.start(peers.serve)
    assert mproc.call(p.pid, ("pid", None), "rpc") == p.pid
    stop(p.pid)
    assert kids.finish(p) == 0


def test_call_in_the_default_group_to_self_served_by_a_thread() -> None:
    t = threading.Thread(target=mproc.serve, args=(peers.handler,), kwargs={"timeout": WAIT})
    t.start()
    try:
        assert mproc.call(os.getpid(), ("double", 5), timeout=WAIT) == 10
    finally:
        with pytest.raises(mproc.StopServing):
            mproc.call(os.getpid(), ("stop", None), timeout=WAIT)
        t.join(WAIT)
    assert not t.is_alive()


def test_the_callee_sees_an_ordinary_msg_that_is_a_call(kids: Kids) -> None:
    p = kids.start(peers.check_reply_errors, os.getpid())
    mproc.send(p.pid, "plain", "rpc", timeout=WAIT)
    assert mproc.call(p.pid, "call", "rpc", timeout=WAIT) == "first"
    results = mproc.receive("report", timeout=WAIT).data
    assert results[0] is False  # a plain message is not a call
    assert results[1][0] == "plain" and "send()" in results[1][1]
    assert results[2] is True  # a call, not answered yet
    assert results[3] is False  # answered: nobody waits any more
    assert results[4][0] == "twice" and "answered already" in results[4][1]
    assert results[5][0] == "type" and "str" in results[5][1]
    assert kids.finish(p) == 0


def test_msg_of_a_call_is_still_a_frozen_equal_dataclass() -> None:
    t = threading.Thread(target=lambda: mproc.call(os.getpid(), 1, "q", timeout=WAIT))
    t.start()
    msg = mproc.receive("q", timeout=WAIT)
    try:
        assert msg.is_call
        assert msg == mproc.Msg(msg.sender_pid, msg.receiver_pid, "q", 1)
        assert "reply" not in repr(msg)
        with pytest.raises(AttributeError):
            msg.data = 2  # type: ignore[misc]
    finally:
        msg.reply(None)
        t.join(WAIT)


# ---------------------------------------------------------------- errors come back


def test_the_callees_exception_is_reraised_with_the_remote_traceback(kids: Kids) -> None:
    p = kids.start(peers.serve)
    with pytest.raises(KeyError) as info:
        mproc.call(p.pid, ("raise", KeyError("nope")), "rpc", timeout=WAIT)
    cause = info.value.__cause__
    assert cause is not None
    assert "Traceback" in str(cause) and "handler" in str(cause) and "KeyError" in str(cause)
    assert info.value.args == ("nope",)
    stop(p.pid)
    assert kids.finish(p) == 0


def test_an_exception_class_the_caller_cannot_import_comes_by_value(kids: Kids) -> None:
    # cloudpickle carries a class that is not importable by value.
    p = kids.start(peers.serve)
    with pytest.raises(Exception) as info:
        mproc.call(p.pid, ("raise_local", "detail"), "rpc", timeout=WAIT)
    assert type(info.value).__name__ == "LocalError"
    assert info.value.args == ("detail",)
    assert "raise LocalError" in str(info.value.__cause__)
    stop(p.pid)
    assert kids.finish(p) == 0


def test_an_exception_that_does_not_unpickle_is_a_remote_error(kids: Kids) -> None:
    p = kids.start(peers.serve)
    with pytest.raises(mproc.RemoteError) as info:
        mproc.call(p.pid, ("raise_unpicklable", None), "rpc", timeout=WAIT)
    err = info.value
    assert err.type_name == "call_peers.Unpicklable"
    assert "3" in str(err) and str(p.pid) in str(err)
    assert "raise Unpicklable(1, 2)" in err.traceback
    assert err.traceback == str(err.__cause__)
    again = pickle.loads(pickle.dumps(err))
    assert (again.type_name, again.traceback, again.pid) == (err.type_name, err.traceback, p.pid)
    stop(p.pid)
    assert kids.finish(p) == 0


def test_a_result_that_does_not_pickle_comes_back_as_message_error(kids: Kids) -> None:
    p = kids.start(peers.serve)
    with pytest.raises(mproc.MessageError) as info:
        mproc.call(p.pid, ("unpicklable_result", None), "rpc", timeout=WAIT)
    assert "lock" in str(info.value).lower()
    assert mproc.call(p.pid, ("double", 2), "rpc", timeout=WAIT) == 4  # still serving
    stop(p.pid)
    assert kids.finish(p) == 0


def test_an_unpicklable_request_raises_in_the_caller_and_sends_nothing(kids: Kids) -> None:
    p = kids.start(peers.serve)
    with pytest.raises(mproc.MessageError):
        mproc.call(p.pid, ("echo", threading.Lock()), "rpc", timeout=WAIT)
    assert mproc.call(p.pid, ("double", 1), "rpc", timeout=WAIT) == 2
    stop(p.pid)
    assert kids.finish(p) == 0
    assert_nothing_queued()


def test_a_request_the_callee_cannot_unpickle_fails_the_call(
    spawner: Any, runtime_dir: str, tmp_path: Any
) -> None:
    # The class lives in a module only the caller can import.
    (tmp_path / "only_here.py").write_text("class Thing:\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import only_here  # type: ignore[import-not-found]

        code = (
            "import mproc\n"
            "def h(data):\n"
            "    return 'handled'\n"
            f"mproc.serve(h, 'rpc', timeout={WAIT})\n"
        )
        p = spawner.popen([sys.executable, "-c", code])
        with pytest.raises(mproc.MessageError) as info:
            mproc.call(p.pid, only_here.Thing(), "rpc", timeout=WAIT)
        assert "only_here" in str(info.value)
        assert mproc.call(p.pid, "plain", "rpc", timeout=WAIT) == "handled"
        p.terminate()
        assert p.wait(WAIT) == -signal.SIGTERM
        remove_stale()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("only_here", None)


# ---------------------------------------------------------------- timeouts, late replies


def test_call_timeout_is_a_receive_timeout_and_the_late_reply_is_dropped(kids: Kids) -> None:
    p = kids.start(peers.reply_late, os.getpid())
    started = time.monotonic()
    with pytest.raises(mproc.CallTimeout) as info:
        mproc.call(p.pid, "first", "rpc", timeout=0.2)
    assert time.monotonic() - started < WAIT
    assert isinstance(info.value, mproc.ReceiveTimeout)
    assert isinstance(info.value, TimeoutError)
    assert info.value.pid == p.pid and info.value.group == "rpc"
    mproc.send(p.pid, "go", "go", timeout=WAIT)
    assert mproc.receive("done", timeout=WAIT).data == "replied"
    # The late reply reached us before "done" (one connection, in order) and
    # vanished: the next call gets its own reply, nothing is queued anywhere.
    assert mproc.call(p.pid, ("double", 4), "rpc", timeout=WAIT) == 8
    assert_nothing_queued()
    stop(p.pid)
    assert kids.finish(p) == 0


def test_a_call_to_a_group_nobody_serves_times_out(kids: Kids) -> None:
    p = kids.start(peers.serve)
    with pytest.raises(mproc.CallTimeout):
        mproc.call(p.pid, ("double", 1), "nobody", timeout=0.1)
    stop(p.pid)
    assert kids.finish(p) == 0


# ---------------------------------------------------------------- the callee dies


def test_callee_died_when_it_exits_without_replying(kids: Kids) -> None:
    p = kids.start(peers.die_without_reply, 3)
    started = time.monotonic()
    with pytest.raises(mproc.CalleeDied) as info:
        mproc.call(p.pid, "x", "rpc")  # no timeout: only the death ends it
    assert time.monotonic() - started < WAIT
    assert isinstance(info.value, mproc.MailboxGone)
    assert info.value.pid == p.pid
    assert kids.finish(p) == 3
    remove_stale()
    assert_nothing_queued()


def test_callee_killed_with_many_calls_pending_fails_them_all(kids: Kids) -> None:
    n = 6
    p = kids.start(peers.die_after_n, n)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            mproc.call(p.pid, "x", "rpc", timeout=WAIT * 3)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 4)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == n and all(isinstance(e, mproc.CalleeDied) for e in errors), errors
    assert kids.finish(p) == -signal.SIGKILL
    remove_stale()


def test_a_reply_sent_right_before_the_callee_exits_is_never_lost(kids: Kids) -> None:
    for i in range(15):
        p = kids.start(peers.reply_then_die, i)
        assert mproc.call(p.pid, "x", "rpc", timeout=WAIT) == i
        assert kids.finish(p) == 0
    remove_stale()


def test_call_to_a_pid_that_does_not_exist(spawner: Any) -> None:
    p = spawner.popen(["true"])
    p.wait(WAIT)
    with pytest.raises(mproc.NoSuchProcess):
        mproc.call(p.pid, "x", timeout=WAIT)


# ---------------------------------------------------------------- many callers


def test_many_threads_calling_at_once_each_get_their_own_reply(kids: Kids) -> None:
    p = kids.start(peers.serve)
    results: dict[int, list[Any]] = {}

    def caller(k: int) -> None:
        results[k] = [mproc.call(p.pid, ("echo", (k, i)), "rpc", timeout=WAIT) for i in range(40)]

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 3)
    assert not any(t.is_alive() for t in threads)
    for k in range(8):
        assert results[k] == [(k, i) for i in range(40)]
    stop(p.pid)
    assert kids.finish(p) == 0
    assert_nothing_queued()


def test_call_reply_matching_under_threads_property(kids: Kids) -> None:
    p = kids.start(peers.serve)

    values = st.integers() | st.text(max_size=5)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.lists(values, max_size=6), min_size=1, max_size=5))
    def check(plan: list[list[Any]]) -> None:
        got: dict[int, list[Any]] = {}

        def caller(k: int) -> None:
            got[k] = [mproc.call(p.pid, ("echo", (k, v)), "rpc", timeout=WAIT) for v in plan[k]]

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(len(plan))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert got == {k: [(k, v) for v in vals] for k, vals in enumerate(plan)}

    check()
    stop(p.pid)
    assert kids.finish(p) == 0
    assert_nothing_queued()


def test_replies_never_enter_group_queues_even_with_receivers_waiting(kids: Kids) -> None:
    p = kids.start(peers.serve)
    got: list[Any] = []
    # A receive() of the default group waits meanwhile: replies must not reach it.
    waiter = threading.Thread(
        target=lambda: got.append(mproc.receive("", timeout=WAIT).data), daemon=True
    )
    waiter.start()
    for i in range(20):
        assert mproc.call(p.pid, ("double", i), "rpc", timeout=WAIT) == 2 * i
    mproc.send(os.getpid(), "the only message", timeout=WAIT)
    waiter.join(WAIT)
    assert got == ["the only message"]
    stop(p.pid)
    assert kids.finish(p) == 0
    assert_nothing_queued()


def test_a_forwarded_msg_can_be_answered_by_another_process(kids: Kids) -> None:
    worker = kids.start(peers.reply_to_forwarded)
    front = kids.start(peers.forward_to, worker.pid)
    assert mproc.call(front.pid, "job", "rpc", timeout=WAIT) == ("from", worker.pid)
    assert kids.finish(worker) == 0
    assert kids.finish(front) == 0


# ---------------------------------------------------------------- serve()


def test_serve_returns_after_its_timeout_with_no_message() -> None:
    started = time.monotonic()
    mproc.serve(lambda data: data, "idle", timeout=0.05)
    assert time.monotonic() - started < WAIT


def test_serve_hands_plain_messages_to_the_handler_and_survives_their_errors(
    kids: Kids,
) -> None:
    p = kids.start(peers.serve_and_report, os.getpid())
    for item in ["a", "boom", "b"]:
        mproc.send(p.pid, item, "rpc", timeout=WAIT)
    assert mproc.call(p.pid, ("double", 3), "rpc", timeout=WAIT) == 6
    mproc.send(p.pid, "report", "rpc", timeout=WAIT)
    assert mproc.receive("report", timeout=WAIT).data == ["a", "boom", "b"]
    assert kids.finish(p) == 0


def test_stop_serving_from_a_call_reaches_the_caller_and_ends_serve(kids: Kids) -> None:
    p = kids.start(peers.serve)
    with pytest.raises(mproc.StopServing) as info:
        mproc.call(p.pid, ("stop", None), "rpc", timeout=WAIT)
    assert "asked to stop" in str(info.value)
    assert kids.finish(p) == 0


# ---------------------------------------------------------------- bad input, interrupts


@pytest.mark.parametrize("target", [0, -1, True, None, 1.5, b"x"])
def test_call_rejects_bad_targets(target: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        mproc.call(target, "x", timeout=0.1)


@pytest.mark.parametrize(
    "kwargs", [{"timeout": -1}, {"timeout": float("nan")}, {"timeout": "1"}, {"group": 3}]
)
def test_call_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)):
        mproc.call(os.getpid(), "x", **kwargs)


def test_serve_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError):
        mproc.serve("not callable", timeout=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mproc.serve(print, 3, timeout=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        mproc.serve(print, timeout=-1)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="signal-exact finally clauses need 3.11")
def test_an_interrupted_call_propagates_and_its_reply_is_dropped(kids: Kids) -> None:
    p = kids.start(peers.reply_late, os.getpid())
    old = signal.signal(signal.SIGUSR1, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            mproc.call(p.pid, "first", "rpc", timeout=WAIT)
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
    mproc.send(p.pid, "go", "go", timeout=WAIT)
    assert mproc.receive("done", timeout=WAIT).data == "replied"
    assert mproc.call(p.pid, ("double", 5), "rpc", timeout=WAIT) == 10
    assert_nothing_queued()
    stop(p.pid)
    assert kids.finish(p) == 0


# ---------------------------------------------------------------- by registered name


def test_send_and_call_by_name(kids: Kids) -> None:
    p = kids.start(peers.hold_name_and_serve, "calc")
    assert mproc.call("calc", ("double", 8), "rpc", timeout=WAIT) == 16  # waits for the name
    assert mproc.whereis("calc") == p.pid
    assert mproc.call("calc", ("pid", None), "rpc", timeout=WAIT) == p.pid
    stop(p.pid)
    assert kids.finish(p) == 0
    assert mproc.whereis("calc") is None  # released at exit


def test_send_by_name_reaches_the_holder(kids: Kids) -> None:
    p = kids.start(peers.hold_name_and_receive, "inbox", os.getpid())
    mproc.send("inbox", "hello", timeout=WAIT)
    assert mproc.receive("report", timeout=WAIT).data == (p.pid, "hello")
    assert kids.finish(p) == 0


def test_a_send_to_a_name_nobody_holds_waits_for_it(kids: Kids) -> None:
    r, w = os.pipe()
    try:
        p = kids.start(peers.hold_name_and_serve, "later", r)
        done: list[Any] = []
        t = threading.Thread(
            target=lambda: done.append(mproc.call("later", ("double", 1), "rpc", timeout=WAIT))
        )
        t.start()
        os.write(w, b"g")  # only now may the child register the name
        t.join(WAIT)
        assert done == [2]
        stop(p.pid)
        assert kids.finish(p) == 0
    finally:
        os.close(r)
        os.close(w)


def test_a_name_nobody_takes_is_name_not_found_after_the_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(mproc.NameNotFound) as info:
        mproc.send("nobody-here", 1, timeout=0.1)
    assert time.monotonic() - started < WAIT
    assert isinstance(info.value, mproc.MailboxNotFound)
    assert "nobody-here" in str(info.value)
    with pytest.raises(mproc.NameNotFound):
        mproc.call("nobody-here", 1, timeout=0.1)


def test_send_by_name_follows_the_name_to_its_next_holder(kids: Kids) -> None:
    first = kids.start(peers.hold_name_and_serve, "svc")
    assert mproc.call("svc", ("pid", None), "rpc", timeout=WAIT) == first.pid
    kids.kill(first)  # SIGKILL: no clean-up, the link file stays behind
    second = kids.start(peers.hold_name_and_serve, "svc")
    # The connection to the first holder is cached; the name leads to the second.
    assert mproc.call("svc", ("pid", None), "rpc", timeout=WAIT) == second.pid
    stop(second.pid)
    assert kids.finish(second) == 0
    remove_stale()


def test_close_mailbox_releases_the_names_of_this_process(runtime_dir: str) -> None:
    mproc.register("mine")
    assert mproc.whereis("mine") == os.getpid()
    mproc.close_mailbox()
    assert mproc.whereis("mine") is None
    assert not [f for f in os.listdir(os.path.join(runtime_dir, "names")) if "mine" in f]


@pytest.mark.parametrize("bad", ["", "a/b", "nul\0", "x" * 201])
def test_send_and_call_reject_bad_names(bad: str) -> None:
    with pytest.raises(ValueError):
        mproc.send(bad, 1, timeout=0.1)
    with pytest.raises(ValueError):
        mproc.call(bad, 1, timeout=0.1)
