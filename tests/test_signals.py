"""Signal handlers and listen() (SPEC §6).

Signals are SIGUSR1/SIGUSR2/SIGTERM sent to this process (never SIGINT); every
test restores the dispositions it changed. Waits are handshakes on events with
a bound, never sleeps.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest

import mproc
from mproc import _signals

WAIT = 10.0


@pytest.fixture(autouse=True)
def _restore_handlers() -> Iterator[None]:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    before.update({sig: signal.getsignal(sig) for sig in _signals.SHUTDOWN_SIGNALS})
    yield
    _signals._reset()
    after = {sig: signal.getsignal(sig) for sig in before}
    assert after == before, "a signal disposition was left changed"


def deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)


class Recorder:
    """A handler that records what it got and signals each call."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.threads: list[str] = []
        self.called = threading.Event()

    def __call__(self, signum: int) -> None:
        self.calls.append(signum)
        self.threads.append(threading.current_thread().name)
        self.called.set()

    def wait(self) -> None:
        assert self.called.wait(WAIT), "the handler did not run"
        self.called.clear()


class Listener(threading.Thread):
    """listen() in a thread; remembers what it returned and what was done by then."""

    def __init__(self, done_by_then: Optional[Callable[[], bool]] = None) -> None:
        super().__init__(daemon=True)
        self.result: Optional[int] = None
        self.done_by_then = done_by_then
        self.was_done: Optional[bool] = None
        self.returned = threading.Event()

    def run(self) -> None:
        self.result = mproc.listen(timeout=WAIT)
        if self.done_by_then is not None:
            self.was_done = self.done_by_then()
        self.returned.set()

    def finish(self) -> int:
        self.join(WAIT)
        assert not self.is_alive(), "listen() did not return"
        assert self.result is not None, "listen() timed out"
        return self.result


def start_listeners(count: int, **kw: Any) -> list[Listener]:
    listeners = [Listener(**kw) for _ in range(count)]
    for t in listeners:
        t.start()
    assert _signals._wait_listeners(count, WAIT), "the listeners did not start"
    return listeners


# --- handlers -----------------------------------------------------------------


def test_handler_gets_the_signal_number_without_anyone_listening() -> None:
    rec = Recorder()
    mproc.add_sig_handler(rec, signal.SIGUSR1)
    deliver(signal.SIGUSR1)
    rec.wait()
    assert rec.calls == [signal.SIGUSR1]
    # Handlers may block, so they do not run in the main thread's signal handler.
    assert rec.threads == ["mproc-signals"]


def test_one_handler_for_several_signals() -> None:
    rec = Recorder()
    mproc.add_sig_handler(rec, signal.SIGUSR1, signal.SIGUSR2)
    deliver(signal.SIGUSR1)
    rec.wait()
    deliver(signal.SIGUSR2)
    rec.wait()
    assert rec.calls == [signal.SIGUSR1, signal.SIGUSR2]


def test_handlers_run_in_registration_order_once_per_delivery() -> None:
    order: list[str] = []
    last = Recorder()
    mproc.add_sig_handler(lambda s: order.append("a"), signal.SIGUSR1)
    mproc.add_sig_handler(lambda s: order.append("b"), signal.SIGUSR1)
    mproc.add_sig_handler(last, signal.SIGUSR1)
    for _ in range(3):
        deliver(signal.SIGUSR1)
        last.wait()
    assert order == ["a", "b"] * 3
    assert last.calls == [signal.SIGUSR1] * 3


def test_failing_handler_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="mproc")

    def broken(signum: int) -> None:
        raise RuntimeError("handler exploded")

    after = Recorder()
    mproc.add_sig_handler(broken, signal.SIGUSR1)
    mproc.add_sig_handler(after, signal.SIGUSR1)
    deliver(signal.SIGUSR1)
    after.wait()
    assert after.calls == [signal.SIGUSR1]
    [record] = [r for r in caplog.records if r.name == "mproc"]
    assert record.levelno == logging.ERROR
    assert "broken" in record.getMessage() and "SIGUSR1" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert "handler exploded" in caplog.text


def test_sys_exit_in_a_handler_is_logged_with_a_hint_and_dispatch_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="mproc")
    mproc.add_sig_handler(lambda s: sys.exit(3), signal.SIGUSR1)
    rec = Recorder()
    mproc.add_sig_handler(rec, signal.SIGUSR2)
    deliver(signal.SIGUSR1)
    deliver(signal.SIGUSR2)
    rec.wait()
    assert "sys.exit()" in caplog.text and "os._exit()" in caplog.text


# --- listen() -----------------------------------------------------------------


def test_listen_returns_only_after_every_handler_finished() -> None:
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow(signum: int) -> None:
        entered.set()
        release.wait(WAIT)
        finished.set()

    mproc.add_sig_handler_shutdown(slow)
    [listener] = start_listeners(1, done_by_then=finished.is_set)
    deliver(signal.SIGTERM)
    assert entered.wait(WAIT)
    assert not listener.returned.wait(0.2), "listen() returned while a handler was running"
    release.set()
    assert listener.finish() == signal.SIGTERM
    assert listener.was_done is True


def test_two_listeners_both_return_and_each_handler_runs_once() -> None:
    rec = Recorder()
    mproc.add_sig_handler_shutdown(rec)
    listeners = start_listeners(2, done_by_then=rec.called.is_set)
    deliver(signal.SIGTERM)
    assert [t.finish() for t in listeners] == [signal.SIGTERM, signal.SIGTERM]
    assert [t.was_done for t in listeners] == [True, True]
    assert rec.calls == [signal.SIGTERM]


def test_listen_in_the_main_thread_with_the_signal_sent_by_another_process(spawner: Any) -> None:
    rec = Recorder()
    mproc.add_sig_handler_shutdown(rec)
    killer = spawner.popen(
        [sys.executable, "-c", f"import os; os.kill({os.getpid()}, {int(signal.SIGTERM)})"]
    )
    assert mproc.listen(timeout=WAIT) == signal.SIGTERM
    assert rec.calls == [signal.SIGTERM]
    assert killer.wait(timeout=WAIT) == 0


def test_listen_in_the_main_thread_sees_a_signal_the_kernel_gave_another_thread() -> None:
    # Python only flags the main thread then; listen() must still wake up for it.
    rec = Recorder()
    mproc.add_sig_handler_shutdown(rec)

    def kill_myself() -> None:
        if _signals._wait_listeners(1, WAIT):
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    helper = threading.Thread(target=kill_myself)
    helper.start()
    try:
        assert mproc.listen(timeout=WAIT) == signal.SIGTERM
    finally:
        helper.join(WAIT)
    assert rec.calls == [signal.SIGTERM]


def test_other_signals_are_handled_while_listen_keeps_waiting() -> None:
    usr1, term = Recorder(), Recorder()
    mproc.add_sig_handler(usr1, signal.SIGUSR1)
    mproc.add_sig_handler_shutdown(term)
    [listener] = start_listeners(1, done_by_then=term.called.is_set)
    deliver(signal.SIGUSR1)
    usr1.wait()
    deliver(signal.SIGUSR1)
    usr1.wait()
    assert not listener.returned.is_set()
    deliver(signal.SIGTERM)
    assert listener.finish() == signal.SIGTERM
    assert listener.was_done is True
    assert usr1.calls == [signal.SIGUSR1, signal.SIGUSR1]
    assert term.calls == [signal.SIGTERM]


def test_listen_times_out_with_none() -> None:
    rec = Recorder()
    mproc.add_sig_handler_shutdown(rec)
    assert mproc.listen(timeout=0.05) is None
    assert mproc.listen(timeout=0) is None
    assert rec.calls == []


def test_a_shutdown_handled_before_listen_is_returned_by_the_next_listen() -> None:
    rec = Recorder()
    mproc.add_sig_handler_shutdown(rec)
    deliver(signal.SIGTERM)
    rec.wait()
    assert mproc.listen(timeout=WAIT) == signal.SIGTERM
    assert mproc.listen(timeout=0.05) is None, "the early shutdown was returned twice"


def test_shutdown_without_handlers_still_ends_listen() -> None:
    mproc.add_sig_handler_shutdown()
    [listener] = start_listeners(1)
    deliver(signal.SIGTERM)
    assert listener.finish() == signal.SIGTERM


def test_listen_from_a_handler_is_refused() -> None:
    errors: list[BaseException] = []
    rec = Recorder()

    def nested(signum: int) -> None:
        try:
            mproc.listen(timeout=WAIT)
        except RuntimeError as err:
            errors.append(err)

    mproc.add_sig_handler_shutdown()
    mproc.add_sig_handler(nested, signal.SIGUSR1)
    mproc.add_sig_handler(rec, signal.SIGUSR1)
    deliver(signal.SIGUSR1)
    rec.wait()
    assert len(errors) == 1
    assert "signal handler" in str(errors[0])


# --- misuse -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, 3, "handler"])
def test_non_callable_handler_is_a_type_error(bad: Any) -> None:
    with pytest.raises(TypeError, match="callable") as info:
        mproc.add_sig_handler(bad, signal.SIGUSR1)
    assert repr(bad) in str(info.value)
    with pytest.raises(TypeError, match=r"add_sig_handler_shutdown.*callable"):
        mproc.add_sig_handler_shutdown(print, bad)
    assert signal.getsignal(signal.SIGTERM) is not _signals._on_signal


def test_no_signal_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"at least one signal.*SIGUSR1"):
        mproc.add_sig_handler(print)


@pytest.mark.parametrize("bad", ["SIGUSR1", 10.0, True, None])
def test_signal_that_is_not_an_int_is_a_type_error(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"add_sig_handler.*signal number") as info:
        mproc.add_sig_handler(print, signal.SIGUSR2, bad)
    assert repr(bad) in str(info.value)
    # Nothing was registered, not even the valid signal before it.
    assert signal.getsignal(signal.SIGUSR2) is not _signals._on_signal


@pytest.mark.parametrize("bad", [0, -1, 100_000])
def test_invalid_signal_number_is_a_value_error(bad: int) -> None:
    with pytest.raises(ValueError, match=f"{bad} is not a valid signal"):
        mproc.add_sig_handler(print, bad)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_uncatchable_signal_is_a_value_error(sig: signal.Signals) -> None:
    with pytest.raises(ValueError, match=f"{sig.name} cannot be caught"):
        mproc.add_sig_handler(print, sig)


def test_listen_without_a_shutdown_handler_is_a_value_error() -> None:
    mproc.add_sig_handler(print, signal.SIGUSR1)
    with pytest.raises(ValueError, match=r"never return.*add_sig_handler_shutdown\(\)"):
        mproc.listen(timeout=WAIT)


def test_negative_timeout_is_a_value_error() -> None:
    mproc.add_sig_handler_shutdown()
    with pytest.raises(ValueError, match=r"listen\(\): timeout must be >= 0 seconds, got -1"):
        mproc.listen(timeout=-1)
    with pytest.raises(ValueError, match=r"listen\(\): timeout .*NaN"):
        mproc.listen(timeout=float("nan"))
    with pytest.raises(TypeError, match=r"listen\(\): timeout"):
        mproc.listen(timeout=True)  # type: ignore[arg-type]


def test_first_registration_outside_the_main_thread_says_to_use_the_main_thread() -> None:
    mproc.add_sig_handler(print, signal.SIGUSR1)
    rec = Recorder()
    errors: list[BaseException] = []

    def register() -> None:
        try:
            mproc.add_sig_handler(print, signal.SIGUSR2)
        except ValueError as err:
            errors.append(err)
        # A signal the main thread registered already takes more handlers.
        mproc.add_sig_handler(rec, signal.SIGUSR1)

    t = threading.Thread(target=register, name="worker-7")
    t.start()
    t.join(WAIT)
    assert len(errors) == 1
    message = str(errors[0])
    assert "SIGUSR2" in message and "main thread" in message and "worker-7" in message
    assert isinstance(errors[0].__cause__, ValueError)
    deliver(signal.SIGUSR1)
    rec.wait()


# --- lifecycle ----------------------------------------------------------------


def test_reset_restores_the_original_dispositions() -> None:
    original = signal.getsignal(signal.SIGUSR1)
    mproc.add_sig_handler(print, signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) is _signals._on_signal
    _signals._reset()
    assert signal.getsignal(signal.SIGUSR1) == original


def test_a_forked_child_gets_the_original_dispositions_back() -> None:
    original = signal.getsignal(signal.SIGTERM)
    mproc.add_sig_handler_shutdown(print)
    r, w = os.pipe()
    with warnings.catch_warnings():
        # 3.12+ warns about fork with threads running (ours): the child only reports.
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:
        try:
            os.close(r)
            restored = signal.getsignal(signal.SIGTERM) == original
            os.write(w, b"restored" if restored else b"still ours")
        finally:
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], WAIT)
        assert ready, "the forked child did not report"
        report = os.read(r, 100)
    finally:
        os.close(r)
        _, status = os.waitpid(child, 0)
    assert report == b"restored"
    assert os.waitstatus_to_exitcode(status) == 0
    assert signal.getsignal(signal.SIGTERM) is _signals._on_signal


CHILD = textwrap.dedent(
    """
    import sys
    import mproc

    def on_shutdown(signum):
        print(f"handled {signum}", flush=True)

    mproc.add_sig_handler_shutdown(on_shutdown)
    print("ready", flush=True)
    got = mproc.listen(timeout=30)
    print(f"listen returned {got}", flush=True)
    sys.exit(0 if got is not None else 3)
    """
)


def test_end_to_end_a_child_handles_sigterm_and_exits_cleanly(spawner: Any) -> None:
    child = spawner.popen(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([child.stdout], [], [], WAIT)
    assert ready, "the child did not start"
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=WAIT)
    term = int(signal.SIGTERM)
    assert out == f"handled {term}\nlisten returned {term}\n"
    assert err == ""
    assert child.returncode == 0
