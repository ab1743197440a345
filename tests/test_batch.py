"""mproc.Batch (issue 13): many messages in few writes, flush() = the receiver holds them all.

The receiving side is ``fault_peers.collect`` in a forked child (it reports
what it received, in order); faults are injected as in test_mailbox_faults.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import subprocess
import sys
from typing import Any

import fault_peers as fp
import psutil
import pytest
from fault_peers import WAIT, Boom, expect
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mproc
from mproc import _runtime as rt
from mproc import _sender
from mproc import _wire as wire

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-specific checks"),
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),
    pytest.mark.timeout(60),
]

MiB = 1 << 20


def start(kids: Any, *args: Any, **kw: Any) -> tuple[Any, Any]:
    ours, theirs = multiprocessing.get_context("fork").Pipe()
    proc = kids.start(_collect, args, theirs, kw)
    return proc, ours


def _collect(args: tuple[Any, ...], conn: Any, kw: dict[str, Any]) -> None:
    fp.collect(*args, conn, **kw)


def finish(kids: Any, proc: Any) -> None:
    assert kids.finish(proc) == 0


# ---------------------------------------------------------------- the basics


def test_flush_delivers_everything_in_order_in_few_writes(
    kids: Any, runtime_dir: str, monkeypatch: Any
) -> None:
    count = 3000  # more than one window (1024) of credit: flush waits for credit too
    child, conn = start(kids, runtime_dir, count)
    (rpid,) = expect(conn, "ready")
    writes = itertools.count()
    real_write = os.write

    class CountingOs:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        def write(self, fd: int, data: Any) -> int:
            next(writes)
            return real_write(fd, data)

    batch = mproc.Batch(rpid, timeout=WAIT)
    for i in range(count):
        batch.send(("item", i))
    assert len(batch) == count and batch.sent == 0
    with monkeypatch.context() as patch:
        patch.setattr(_sender, "os", CountingOs())
        batch.flush()
    assert len(batch) == 0 and batch.sent == count
    got, _admitted, _booms, _drops = expect(conn, "done")
    assert got == [("item", i) for i in range(count)]
    # Credit is granted every half window: a few dozen writes, not 3000.
    assert next(writes) < count // 20
    finish(kids, child)


def test_with_block_flushes_and_order_holds_with_plain_sends_after(
    kids: Any, runtime_dir: str
) -> None:
    child, conn = start(kids, runtime_dir, 7)
    (rpid,) = expect(conn, "ready")
    mproc.send(rpid, "first", timeout=WAIT)
    with mproc.Batch(rpid) as batch:
        for word in ("a", "b", "c"):
            batch.send(word)
        assert repr(batch).startswith(f"<mproc.Batch to {rpid} ")
    assert batch.sent == 3
    mproc.send(rpid, "after", timeout=WAIT)
    with mproc.Batch(rpid) as empty:  # nothing held: nothing sent, no error
        pass
    assert empty.sent == 0
    with mproc.Batch(rpid) as batch:
        batch.send("x")
        batch.send("end")
    got, _admitted, _booms, _drops = expect(conn, "done")
    assert got == ["first", "a", "b", "c", "after", "x", "end"]
    finish(kids, child)


def test_large_and_small_messages_mixed(kids: Any, runtime_dir: str) -> None:
    sizes = [10, 200_000, 10, 10, 3 * MiB, 70_000, 10]
    child, conn = start(kids, runtime_dir, len(sizes), shape=lambda d: (d[0], len(d[1])))
    (rpid,) = expect(conn, "ready")
    with mproc.Batch(rpid, timeout=WAIT) as batch:
        for i, size in enumerate(sizes):
            batch.send((i, bytes(size)))
    got, _admitted, _booms, _drops = expect(conn, "done")
    assert got == list(enumerate(sizes))
    finish(kids, child)


def test_full_batch_flushes_by_itself(kids: Any, runtime_dir: str) -> None:
    child, conn = start(kids, runtime_dir, 10)
    (rpid,) = expect(conn, "ready")
    batch = mproc.Batch(rpid, max_messages=4)
    for i in range(10):
        batch.send(i)
    assert (batch.sent, len(batch)) == (8, 2)
    batch.close()
    assert (batch.sent, len(batch)) == (10, 0)
    got, _admitted, _booms, _drops = expect(conn, "done")
    assert got == list(range(10))
    finish(kids, child)


def test_batch_to_self_and_to_a_name(runtime_dir: str) -> None:
    with mproc.Batch(os.getpid(), "mine") as batch:
        batch.send(1)
        batch.send(lambda: 2)  # cloudpickle, as send()
    assert mproc.receive("mine", timeout=WAIT).data == 1
    assert mproc.receive("mine", timeout=WAIT).data() == 2
    mproc.register("batch-target")
    try:
        with mproc.Batch("batch-target", "named") as batch:
            batch.send("by name")
        assert batch.pid == "batch-target"
        msg = mproc.receive("named", timeout=WAIT)
        assert (msg.data, msg.sender_pid) == ("by name", os.getpid())
    finally:
        mproc.unregister("batch-target")


@given(
    st.lists(st.one_of(st.integers(), st.text(max_size=30), st.binary(max_size=3000)), max_size=60),
    st.integers(min_value=1, max_value=7),
)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_sequence_any_flush_points(runtime_dir: str, items: list[Any], every: int) -> None:
    batch = mproc.Batch(os.getpid(), "prop", max_messages=every)
    for item in items:
        batch.send(item)
    batch.flush()
    assert [mproc.receive("prop", timeout=WAIT).data for _ in items] == items
    with pytest.raises(mproc.ReceiveTimeout):
        mproc.receive("prop", timeout=0)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "kw", "exc", "words"),
    [
        ((0,), {}, ValueError, "pid"),
        ((True,), {}, TypeError, "pid"),
        ((1.5,), {}, TypeError, "pid"),
        ((1, 3), {}, TypeError, "group"),
        ((1,), {"timeout": -1}, ValueError, "timeout"),
        ((1,), {"max_bytes": 0}, ValueError, "max_bytes"),
        ((1,), {"max_messages": 1.5}, ValueError, "max_messages"),
    ],
)
def test_bad_arguments(args: Any, kw: Any, exc: type[Exception], words: str) -> None:
    with pytest.raises(exc, match=words):
        mproc.Batch(*args, **kw)


def test_unpicklable_object_is_refused_and_nothing_kept(runtime_dir: str) -> None:
    import threading

    batch = mproc.Batch(os.getpid(), "u")
    batch.send("ok")
    with pytest.raises(mproc.MessageError, match="group 'u'"):
        batch.send(threading.Lock())
    assert len(batch) == 1
    batch.flush()
    assert mproc.receive("u", timeout=WAIT).data == "ok"


def test_a_pid_that_does_not_exist_keeps_the_messages() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait(WAIT)
    dead = proc.pid  # exited and reaped
    batch = mproc.Batch(dead)
    batch.send("kept")
    with pytest.raises(mproc.NoSuchProcess):
        batch.flush()
    assert len(batch) == 1 and batch.sent == 0


def _small_frames(rundir: str, conn: Any) -> None:
    fp.use_runtime(rundir)
    mproc.open_mailbox(max_frame=64 * 1024)
    conn.send(("ready", os.getpid()))
    got = [mproc.receive(timeout=WAIT).data for _ in range(2)]
    conn.send(("done", got, 0, 0, 0))


def test_a_message_over_the_frame_limit(kids: Any, runtime_dir: str) -> None:
    ours, theirs = multiprocessing.get_context("fork").Pipe()
    child = kids.start(_small_frames, runtime_dir, theirs)
    conn = ours
    (rpid,) = expect(conn, "ready")
    batch = mproc.Batch(rpid, timeout=WAIT)
    for item in ("a", bytes(100_000), "c"):
        batch.send(item)
    with pytest.raises(mproc.MessageError, match="frame limit") as info:
        batch.flush()
    assert info.value.delivered == 1  # type: ignore[attr-defined]
    assert batch.sent == 1 and len(batch) == 1  # the big one was dropped, "c" is kept
    batch.flush()
    got, _admitted, _booms, _drops = expect(conn, "done")
    assert got == ["a", "c"]
    finish(kids, child)


# ---------------------------------------------------------------- faults


def test_full_receiver_says_how_many_were_delivered_and_keeps_the_rest(
    kids: Any, runtime_dir: str
) -> None:
    count = 40
    child, conn = start(kids, runtime_dir, count, max_queue=8, hold=True)
    (rpid,) = expect(conn, "ready")
    batch = mproc.Batch(rpid, timeout=0.3)
    for i in range(count):
        batch.send(i)
    with pytest.raises(mproc.MailboxFull) as info:
        batch.flush()
    delivered = info.value.delivered  # type: ignore[attr-defined]
    assert 8 <= delivered < count  # max_queue plus at most one window
    assert (batch.sent, len(batch)) == (delivered, count - delivered)
    conn.send("go")
    batch = mproc.Batch(rpid, timeout=WAIT)
    for i in range(delivered, count):  # a new batch; the old one still holds them too
        batch.send(i)
    batch.flush()
    got, _admitted, _booms, _drops = expect(conn, "done")
    assert got == list(range(count))
    finish(kids, child)


def test_a_write_cut_in_the_middle_never_duplicates_and_order_holds(
    kids: Any, runtime_dir: str, monkeypatch: Any
) -> None:
    """Now and then a write takes half its bytes and the next fails (the peer reset it).

    The messages written whole count as delivered; the cut one is sent again
    on a new connection; nothing arrives twice, order holds.
    """
    count = 600
    child, conn = start(kids, runtime_dir, count, chunk=4096)
    (rpid,) = expect(conn, "ready")
    mproc.send(rpid, 0, timeout=WAIT)  # connect before the faults
    cuts = 0
    cut_fd = -1
    real_write = os.write
    writes = itertools.count(1)

    class CuttingOs:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        def write(self, fd: int, data: Any) -> int:
            nonlocal cuts, cut_fd
            if fd == cut_fd:
                cut_fd = -1
                raise BrokenPipeError("the peer reset the connection")
            is_msg = len(data) > 5 and data[4] == wire.KIND_MSG  # not a handshake flight
            if is_msg and next(writes) % 3 == 0:
                cuts += 1
                cut_fd = fd
                return real_write(fd, memoryview(data)[: len(data) // 2])
            return real_write(fd, data)

    batch = mproc.Batch(rpid, timeout=WAIT, max_messages=50)
    with monkeypatch.context() as patch:
        patch.setattr(_sender, "os", CuttingOs())
        for i in range(1, count):
            batch.send(i)
        batch.flush()
    got, _admitted, _booms, _drops = expect(conn, "done")
    assert cuts >= 3
    assert got == list(range(count))
    finish(kids, child)


def test_receiver_killed_mid_flush_is_a_clear_error(kids: Any, runtime_dir: str) -> None:
    child, conn = start(kids, runtime_dir, 10**6, max_queue=16, hold=True)
    (rpid,) = expect(conn, "ready")
    batch = mproc.Batch(rpid, timeout=WAIT)
    for i in range(200):
        batch.send(i)
    psutil.Process(rpid).send_signal(signal.SIGKILL)
    with pytest.raises((mproc.MailboxGone, mproc.NoSuchProcess, mproc.MailboxNotFound)):
        batch.flush()
    assert kids.finish(child) == -signal.SIGKILL
    rt.remove_stale(rt.runtime())  # its socket file: SIGKILL left it


def test_interrupt_in_flush_never_duplicates(kids: Any, runtime_dir: str) -> None:
    """A signal handler raising inside flush() while it waits for credit: what was
    written is delivered and counted, the rest kept, nothing twice."""
    child, conn = start(kids, runtime_dir, 100, max_queue=4, hold=True)
    (rpid,) = expect(conn, "ready")
    batch = mproc.Batch(rpid, timeout=WAIT)
    for i in range(100):
        batch.send(("held", i))
    with fp.Ticker(0.02, fp.inside_mproc) as ticker, pytest.raises(Boom):
        batch.flush()  # blocks for credit (max_queue 4, nobody receives) until interrupted
    assert ticker.raised == 1
    # One window (4) went out in one write before the wait: delivered, counted.
    assert (batch.sent, len(batch)) == (4, 96)
    conn.send("go")
    batch.flush()
    got, _admitted, _booms, _drops = expect(conn, "done")
    assert got == [("held", i) for i in range(100)]
    finish(kids, child)


def test_deliver_many_reports_delivered_on_every_mproc_error(runtime_dir: str) -> None:
    with pytest.raises(mproc.NoSuchProcess) as info:
        _sender.deliver_many(2**22 + 12345, b"", [b"x"], 0.5)
    assert info.value.delivered == 0  # type: ignore[attr-defined]
