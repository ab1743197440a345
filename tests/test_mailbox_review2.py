"""Regression tests from a second adversarial review of the 0.2 mailbox (issue 7).

Each test forces one interleaving or input that breaks a promise of SPEC §5
and fails on the code as reviewed. Waits are bounded; the only polling is of
internal state (as ``mailbox_peers.wait_for``).
"""

from __future__ import annotations

import os
import signal
import sys
from multiprocessing import connection as mpc
from typing import Any

import pytest
from mailbox_peers import WAIT, use_runtime, wait_for

import mproc
from mproc import _mailbox


def _fill_reconnect_send(rundir: str, parent: int, conn: mpc.Connection) -> None:
    """Fill the parent's group "g" until MailboxFull, drop the link, then send once more."""
    use_runtime(rundir)
    n = 0
    try:
        while True:
            mproc.send(parent, n, "g", timeout=0.3)
            n += 1
    except mproc.MailboxFull:
        pass
    mproc.close_mailbox()  # retires this process's links: the next send() reconnects
    conn.send(n)
    if not conn.poll(WAIT):
        return
    conn.recv()
    try:
        mproc.send(parent, "after", "g", timeout=3.0)
        conn.send("ok")
    except Exception as err:
        conn.send(repr(err))


def test_starved_sender_gets_credit_on_its_next_connection(kids: Any, runtime_dir: str) -> None:
    # A sender stopped by a full group is remembered in Group.starved by its
    # *connection* object. When it reconnects, the new connection inherits
    # its credit, but the starved entry names the dead one: once the
    # receiver drains the group, _release_starving skips the dead peer and
    # nobody ever grants the new connection credit. The sender's messages to
    # that group are refused with MailboxFull for ever, with the queue empty.
    mproc.open_mailbox(max_queue=4)
    r = _mailbox._state.receiver
    ours, theirs = mpc.Pipe()
    child = kids.start(_fill_reconnect_send, runtime_dir, os.getpid(), theirs)
    assert ours.poll(WAIT)
    n = ours.recv()
    wait_for(lambda: child.pid not in r.by_pid, "the receiver to see the old connection end")
    assert [mproc.receive("g", timeout=WAIT).data for _ in range(n)] == list(range(n))
    ours.send("go")
    assert ours.poll(WAIT)
    assert ours.recv() == "ok"  # the group is empty: the sender must get through
    assert mproc.receive("g", timeout=WAIT).data == "after"
    assert kids.finish(child) == 0


def _restore_record() -> Any:
    # An object whose restoring fails with a message that differs each time
    # (a request id, a time, an address): common in real exceptions.
    raise LookupError(f"no record for request {os.urandom(4).hex()}")


class _Flaky:
    def __reduce__(self) -> Any:
        return (_restore_record, ())


def test_message_that_never_unpickles_alike_is_consumed() -> None:
    # _unpicklable() retries once and calls it the message's fault only if the
    # second failure has the same type *and text*. A message whose failure
    # text varies is taken for a signal handler's exception every time: it is
    # put back and raised again by every receive(), never as MessageError,
    # and the group is poisoned for good (SPEC: "the next receive() works").
    me = os.getpid()
    mproc.send(me, _Flaky(), "g", timeout=WAIT)
    mproc.send(me, "next", "g", timeout=WAIT)
    seen = []
    for _ in range(3):
        try:
            seen.append(mproc.receive("g", timeout=WAIT).data)
            break
        except Exception as err:
            seen.append(type(err).__name__)
    assert seen == ["MessageError", "next"]


_FLOOD = r"""
import sys, mproc
parent, n = int(sys.argv[1]), 0
try:
    while n < 2000:
        mproc.send(parent, n, "g", timeout=0.5)
        n += 1
except mproc.MailboxFull:
    pass
mproc.send(parent, n, "count", timeout=10)
"""


def _send_then_exec(rundir: str, parent: int, count: int, conn: mpc.Connection) -> None:
    use_runtime(rundir)
    for i in range(count):
        mproc.send(parent, i, "g", timeout=WAIT)
    conn.send("sent")
    if conn.poll(WAIT):
        # The same process (same PID, same start time) now runs another program.
        os.execv(sys.executable, [sys.executable, "-c", _FLOOD, str(parent)])


def test_credit_of_an_earlier_program_with_the_same_pid_is_not_inherited(
    kids: Any, runtime_dir: str
) -> None:
    # The receiver keeps credit per sending PID (Receiver.credit) and hands it
    # to that PID's next connection, re-sending the old limit. A process that
    # exec()s (same PID, same /proc start time; a reused PID does the same)
    # starts its sequence numbers at 0 but is granted the old limit: it may
    # put as many messages into a group nobody receives as the earlier
    # program ever had consumed, far past max_queue + one window.
    max_queue = 4
    mproc.open_mailbox(max_queue=max_queue)
    ours, theirs = mpc.Pipe()
    child = kids.start(_send_then_exec, runtime_dir, os.getpid(), 300, theirs)
    assert [mproc.receive("g", timeout=WAIT).data for _ in range(300)] == list(range(300))
    assert ours.poll(WAIT) and ours.recv() == "sent"
    ours.send("exec")
    held = mproc.receive("count", timeout=30).data
    assert kids.finish(child) == 0
    window = _mailbox._state.receiver.window
    assert held <= max_queue + window, f"a group of max_queue={max_queue} took {held} messages"


def test_signal_handler_can_send_to_its_own_pid_while_receive_waits() -> None:
    # The classic way to wake a loop blocked in receive(): a signal handler
    # sends itself a message. The HELLO of a new connection is now written by
    # the reader (_take_new_peers) -- and the only reader is the thread the
    # handler interrupted (the background one sleeps while a receive() leads).
    # The handler's first send() to itself waits for a HELLO nobody writes and
    # fails with MailboxTimeout; the loop never wakes.
    import signal
    import threading

    from mproc._receiver import Reading

    mproc.open_mailbox()
    r = _mailbox._state.receiver
    failures: list[BaseException] = []

    def handler(signum: int, frame: Any) -> None:
        try:
            mproc.send(os.getpid(), "stop", "ctl", timeout=3.0)
        except Exception as err:
            failures.append(err)

    def fire() -> None:
        wait_for(lambda: r.reading is Reading.CONSUMER, "receive() to lead")
        os.kill(os.getpid(), signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, handler)
    firer = threading.Thread(target=fire)
    try:
        firer.start()
        try:
            got = mproc.receive("ctl", timeout=6.0).data
        except mproc.ReceiveTimeout:
            got = None
    finally:
        firer.join(WAIT)
        signal.signal(signal.SIGUSR1, old)
    assert failures == []
    assert got == "stop"


class _SignalOnceWhilePickled:
    """Sends this process SIGUSR1 the first time it is pickled (a signal landing mid-send)."""

    fired = False

    def __reduce__(self) -> Any:
        if not _SignalOnceWhilePickled.fired:
            _SignalOnceWhilePickled.fired = True
            os.kill(os.getpid(), signal.SIGUSR1)
        return (int, (7,))


class _Interrupted(Exception):
    pass


def test_a_signal_handlers_exception_while_send_pickles_propagates() -> None:
    # Not a MessageError: the object pickles fine; the exception is the handler's.
    def handler(signum: int, frame: Any) -> None:
        raise _Interrupted("SIGUSR1 inside send()")

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        mproc.open_mailbox()
        with pytest.raises(_Interrupted):
            mproc.send(os.getpid(), (1, _SignalOnceWhilePickled()), timeout=5)
        mproc.send(os.getpid(), (2, _SignalOnceWhilePickled()), timeout=5)
        assert mproc.receive(timeout=5).data == (2, 7)
        with pytest.raises(mproc.ReceiveTimeout):
            mproc.receive(timeout=0)  # the interrupted send delivered nothing
    finally:
        signal.signal(signal.SIGUSR1, old)
