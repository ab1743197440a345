"""Regression tests from an adversarial review of the 0.2 mailbox (issue 7).

Each test forces one interleaving or input that broke a promise of SPEC §5
and fails on the code as reviewed. Waits are bounded; the only polling is of
internal state, to fire a signal at a known point (as ``mailbox_peers.wait_for``).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import mproc
from mproc import _mailbox, _sender
from mproc import _runtime as rt
from mproc import _wire as wire

WAIT = 10.0


def _receiver() -> Any:
    mproc.open_mailbox()
    return _mailbox._state.receiver


def _until(predicate: Any, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def _read_frame(sock: socket.socket) -> bytes:
    (size,) = wire.LEN.unpack(sock.recv(wire.LEN.size, socket.MSG_WAITALL))
    return sock.recv(size, socket.MSG_WAITALL)


class _Interrupt(Exception):
    """What our signal handler raises (stands for KeyboardInterrupt)."""


@pytest.fixture
def raising_usr1() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise _Interrupt

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, old)


def _interrupt_main_once(ready: Any) -> threading.Thread:
    """A thread that sends SIGUSR1 to the main thread as soon as ``ready()`` holds."""
    main = threading.main_thread().ident
    assert main == threading.get_ident(), "run this test in the main thread"

    def kick() -> None:
        _until(ready, "the main thread to reach the point to interrupt")
        signal.pthread_kill(main, signal.SIGUSR1)

    t = threading.Thread(target=kick, daemon=True)
    t.start()
    return t


def _interrupt_leading_receive(r: Any, ready: Any = lambda: True) -> None:
    """Block the main thread in receive() as the reader, and interrupt it there."""
    from mproc._receiver import Reading

    def leading() -> bool:
        # The main thread reads (CONSUMER) and the background sleeps on its
        # doorbell, as in any receive() that has waited for more than 20 ms.
        return r.reading is Reading.CONSUMER and r.bg_asleep and ready()

    kicker = _interrupt_main_once(leading)
    with pytest.raises(_Interrupt):
        mproc.receive("never", timeout=WAIT)
    kicker.join(WAIT)


# ---------------------------------------------------------------- admission


def test_admission_survives_a_peer_that_hangs_up_after_answering() -> None:
    """_admission.py _on_frame: sendall(WELCOME) to a peer that already closed
    raised BrokenPipeError out of the admission thread, which died: the mailbox
    never admitted anyone again (issue 7's "accept thread dies", back again).
    A sender whose own handshake deadline expires does exactly this."""
    r = _receiver()
    key = rt.runtime().key
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.connect(r.path)
    s.sendall(wire.frame(wire.answer(key, _read_frame(s))))  # a right answer...
    s.close()  # ...and gone before the WELCOME
    # A real sender must still get through (a new connection: a fresh link).
    mproc.send(os.getpid(), "still admitted", "adm", timeout=3)
    assert mproc.receive("adm", timeout=WAIT).data == "still admitted"
    assert r.admission.thread.is_alive()


def test_admission_survives_a_peer_that_hangs_up_after_its_challenge() -> None:
    """Same, at stage 2: sendall(answer) to a peer gone after sending its challenge."""
    r = _receiver()
    key = rt.runtime().key
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.connect(r.path)
    s.sendall(wire.frame(wire.answer(key, _read_frame(s))))
    assert _read_frame(s) == wire.WELCOME
    s.sendall(wire.frame(wire.challenge()))
    s.close()
    mproc.send(os.getpid(), "still admitted", "adm", timeout=3)
    assert mproc.receive("adm", timeout=WAIT).data == "still admitted"
    assert r.admission.thread.is_alive()


# ---------------------------------------------------------------- interrupts


def test_receive_timeout_zero_after_an_interrupted_receive_finds_the_message(
    raising_usr1: None,
) -> None:
    """_receiver.py _take: an interrupt in _pump leaves ``reading`` at CONSUMER
    (only the lock is released in the finally clause). Every later
    receive(timeout=0) then sees "a consumer reads" and raises ReceiveTimeout
    without reading, for as long as the background sleeps (up to 10 s), though
    the message's send() returned."""
    r = _receiver()
    _interrupt_leading_receive(r)
    mproc.send(os.getpid(), "here", "t0", timeout=WAIT)  # returned: we hold it
    assert mproc.receive("t0", timeout=0).data == "here"


def test_interrupted_reader_does_not_stall_other_receivers(raising_usr1: None) -> None:
    """_receiver.py _take/_background_loop: the main thread leads, another
    thread's receive() sleeps with no timer (a consumer reads), the background
    sleeps on its doorbell (10 s). The interrupt releases the leader lock but
    neither rings nor wakes the sleepers: nobody reads for 10 s, and the other
    thread's message (whose send() returned) waits that long."""
    r = _receiver()
    got: list[Any] = []

    def receive_other() -> None:
        try:
            got.append(mproc.receive("other", timeout=WAIT))
        except mproc.MailboxError as err:  # closed at teardown, when this test fails
            got.append(err)

    other = threading.Thread(target=receive_other, daemon=True)
    started = []

    def other_asleep() -> bool:
        if not started:
            started.append(other.start())
        return bool(r.sleepers)

    _interrupt_leading_receive(r, other_asleep)
    mproc.send(os.getpid(), "for the other thread", "other", timeout=WAIT)
    other.join(2.0)  # the background's own check comes after 10 s
    assert got, "nobody read for 2 s"
    assert got[0].data == "for the other thread"


# ---------------------------------------------------------------- receive(timeout=0)


def test_receive_timeout_zero_reads_past_other_groups_bytes() -> None:
    """_receiver.py _take: receive(timeout=0) leads once: one _pump does one
    64 KiB read per peer, and then "led and expired" raises ReceiveTimeout.
    A message whose send() returned behind more than 64 KiB of another group's
    messages is not found (a "drain until ReceiveTimeout" loop stops early).
    Here all is sent within the background's 20 ms nap after a receive()."""
    _receiver()
    me = os.getpid()
    mproc.send(me, "warm", "w", timeout=WAIT)  # the connection is up
    for attempt in range(5):
        assert mproc.receive("w", timeout=WAIT).data in ("warm", attempt)
        for _ in range(3):
            mproc.send(me, b"b" * 50_000, "bulk", timeout=WAIT)
        mproc.send(me, attempt, "x", timeout=WAIT)
        assert mproc.receive("x", timeout=0).data == attempt
        for _ in range(3):
            mproc.receive("bulk", timeout=WAIT)
        mproc.send(me, attempt + 1, "w", timeout=WAIT)


# ---------------------------------------------------------------- credit


def _hold_mailbox(rundir: str) -> None:
    os.environ["MPROC_RUNTIME_DIR"] = rundir
    try:
        mproc.open_mailbox()
        mproc.receive("stop", timeout=WAIT)
    finally:
        mproc.close_mailbox()


def test_reconnects_do_not_add_a_window_each(
    kids: Any, runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_sender.py/_receiver.py: every new connection starts each group with a
    whole window of credit, whatever the group holds already. A sender that
    reconnects (here: its link evicted because it talks to more than
    MAX_LINKS receivers, patched to 1) adds a window per reconnect, so a group
    with max_queue=1 (window 1) took 8 messages with nobody receiving, where
    README promises "max_queue plus one window per connected sender" = 2."""
    mproc.open_mailbox(max_queue=1)
    other = kids.start(_hold_mailbox, runtime_dir)
    monkeypatch.setattr(_sender, "MAX_LINKS", 1)
    me = os.getpid()
    held = 0
    try:
        for i in range(8):
            try:
                mproc.send(me, i, "g", timeout=0.3)
            except mproc.MailboxFull:
                break
            held += 1
            mproc.send(other.pid, i, "x", timeout=WAIT)  # evicts our link to ourselves
    finally:
        mproc.send(other.pid, None, "stop", timeout=WAIT)
        kids.finish(other)
    assert [mproc.receive("g", timeout=WAIT).data for _ in range(held)] == list(range(held))
    assert held <= 2, f"a max_queue=1 group held {held} messages nobody received"
