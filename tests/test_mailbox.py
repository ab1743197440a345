"""The mailbox (SPEC §5): send/receive, Msg, groups, timeouts, the start-up race,
ordering, back-pressure, pickling, exit clean-up, fork and threads.

Cross-process tests run the child code in ``mailbox_peers`` under the fork,
spawn and forkserver start methods, or plain interpreters from ``spawner``.
Processes synchronise with mailbox messages, pipes and events, never with
sleeps; every wait is bounded. A few tests peek at ``mproc._mailbox`` internals
(queue lengths, the reader's state) where the property is about them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
import select
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import mailbox_peers as peers
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailbox_peers import WAIT, Kids, me

import mproc
from mproc import _mailbox, _receiver, _sender
from mproc import _runtime as rt

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-specific checks"),
    # Python >= 3.12 warns about fork() in a process with threads (the mailbox
    # has some); forking is exactly what these tests exercise.
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),
]

START_METHODS = ["fork", "spawn", "forkserver"]
MiB = 1 << 20


def assert_nothing_more(group: str = "", timeout: float = 0.3) -> None:
    with pytest.raises(mproc.ReceiveTimeout):
        got = mproc.receive(group, timeout=timeout)
        pytest.fail(f"unexpected extra message {got!r}")


# ---------------------------------------------------------------- 1. round trips and Msg


def test_send_to_self_round_trip() -> None:
    mproc.open_mailbox()
    mproc.send(me(), {"answer": [42, "x"]})
    msg = mproc.receive(timeout=WAIT)
    assert msg == mproc.Msg(
        sender_pid=me(), receiver_pid=me(), group="", data={"answer": [42, "x"]}
    )


def test_receive_opens_the_mailbox(runtime_dir: str) -> None:
    assert _mailbox._state.receiver is None
    with pytest.raises(mproc.ReceiveTimeout):
        mproc.receive(timeout=0)
    path = peers.mailbox_path(runtime_dir, me())
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    mproc.send(me(), "now reachable")
    assert mproc.receive(timeout=WAIT).data == "now reachable"


def test_open_mailbox_is_idempotent(runtime_dir: str) -> None:
    mproc.open_mailbox()
    path = peers.mailbox_path(runtime_dir, me())
    mproc.open_mailbox()
    assert peers.mailbox_path(runtime_dir, me()) == path


def test_msg_is_a_frozen_dataclass() -> None:
    assert dataclasses.is_dataclass(mproc.Msg)
    names = [f.name for f in dataclasses.fields(mproc.Msg)]
    assert names == ["sender_pid", "receiver_pid", "group", "data"]
    msg = mproc.Msg(1, 2, "g", "data")
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.data = "other"  # type: ignore[misc]
    assert msg == mproc.Msg(1, 2, "g", "data")
    assert hash(msg) == hash(mproc.Msg(1, 2, "g", "data"))


@pytest.mark.parametrize("method", START_METHODS)
def test_child_to_parent(kids: Kids, runtime_dir: str, method: str) -> None:
    mproc.open_mailbox()
    child = kids.start(peers.send_hello, runtime_dir, me(), "hi", method=method)
    msg = mproc.receive("hi", timeout=WAIT)
    assert kids.finish(child) == 0
    # sender_pid is the kernel's word (SO_PEERCRED), and matches what the child says.
    assert msg == mproc.Msg(child.pid, me(), "hi", ("hello", child.pid))


@pytest.mark.parametrize("method", START_METHODS)
def test_parent_to_child(kids: Kids, runtime_dir: str, method: str) -> None:
    child = kids.start(peers.echo, runtime_dir, me(), method=method)
    ready = mproc.receive("ready", timeout=WAIT)
    assert ready.sender_pid == ready.data == child.pid
    mproc.send(child.pid, {"x": [1, 2]})
    echoed = mproc.receive("echo", timeout=WAIT)
    assert echoed.sender_pid == child.pid
    assert echoed.data == (me(), {"x": [1, 2]})
    mproc.send(child.pid, None)
    assert kids.finish(child) == 0


def test_child_to_child(kids: Kids, runtime_dir: str) -> None:
    a = kids.start(peers.chat, runtime_dir, me())
    b = kids.start(peers.chat, runtime_dir, me())
    ready = {mproc.receive("ready", timeout=WAIT).data for _ in range(2)}
    assert ready == {a.pid, b.pid}
    mproc.send(a.pid, b.pid, "peer")
    mproc.send(b.pid, a.pid, "peer")
    results = {}
    for _ in range(2):
        msg = mproc.receive("result", timeout=WAIT)
        results[msg.sender_pid] = msg.data
    assert results == {
        a.pid: (b.pid, a.pid, ("hi from", b.pid)),
        b.pid: (a.pid, b.pid, ("hi from", a.pid)),
    }
    assert kids.finish(a) == 0
    assert kids.finish(b) == 0


@pytest.mark.parametrize("size", [64 * 1024 - 40, 3 * MiB, 40 * MiB], ids=["64k", "3M", "40M"])
def test_large_messages(kids: Kids, runtime_dir: str, size: int) -> None:
    blob = os.urandom(1024) * (size // 1024) + b"end"
    mproc.open_mailbox()
    mproc.send(me(), (blob, [blob[:10]] * 3), "big")
    data, small = mproc.receive("big", timeout=WAIT).data
    assert type(data) is bytes
    assert data == blob
    assert small == [blob[:10]] * 3
    # And from another process, through the same reader.
    child = kids.start(_send_blob, runtime_dir, me(), size)
    msg = mproc.receive("big", timeout=WAIT)
    assert (msg.sender_pid, len(msg.data), msg.data[-3:]) == (child.pid, size, b"end")
    assert kids.finish(child) == 0


def _send_blob(rundir: str, parent: int, size: int) -> None:
    peers.use_runtime(rundir)
    mproc.send(parent, b"b" * (size - 3) + b"end", "big", timeout=WAIT)


# ---------------------------------------------------------------- 2. groups


def test_receive_returns_only_its_group() -> None:
    mproc.open_mailbox()
    mproc.send(me(), "b1", "b")
    mproc.send(me(), "a1", "a")
    mproc.send(me(), "default")
    msg = mproc.receive("a", timeout=WAIT)
    assert (msg.group, msg.data) == ("a", "a1")
    assert_nothing_more("a")
    msg = mproc.receive("b", timeout=WAIT)
    assert (msg.group, msg.data) == ("b", "b1")
    assert mproc.receive(timeout=WAIT).data == "default"


def test_messages_wait_until_their_group_is_received() -> None:
    mproc.open_mailbox()
    for i in range(3):
        mproc.send(me(), i, "later")
    # Others come and go while they wait.
    for i in range(20):
        mproc.send(me(), i, "now")
        assert mproc.receive("now", timeout=WAIT).data == i
    assert_nothing_more("")
    assert [mproc.receive("later", timeout=WAIT).data for _ in range(3)] == [0, 1, 2]
    assert_nothing_more("later")


@pytest.mark.parametrize(
    "group",
    [
        "",
        "a",
        "ünïcødé ✓ 🚀 名前",
        "with space\nand newline",
        "\x00nul",
        "\ud800 lone surrogate",
        "g" * 65535,
        "é" * 32767,
    ],
    ids=["empty", "ascii", "unicode", "whitespace", "nul", "surrogate", "max-ascii", "max-utf8"],
)
def test_group_names(group: str) -> None:
    mproc.open_mailbox()
    mproc.send(me(), ("payload", group[:10]), group)
    msg = mproc.receive(group, timeout=WAIT)
    assert msg.group == group
    assert msg.data == ("payload", group[:10])


@pytest.mark.parametrize("group", [1, b"bytes", None, ["a"]], ids=repr)
def test_group_must_be_a_str(group: Any) -> None:
    with pytest.raises(TypeError, match="group must be a str") as info:
        mproc.send(me(), "x", group)
    assert type(group).__name__ in str(info.value)
    with pytest.raises(TypeError, match="group must be a str"):
        mproc.receive(group, timeout=0)


# ---------------------------------------------------------------- 3. receive timeouts


@pytest.mark.parametrize("timeout", [0, 0.05, 0.3])
def test_receive_timeout(timeout: float) -> None:
    mproc.open_mailbox()
    start = time.monotonic()
    with pytest.raises(mproc.ReceiveTimeout) as info:
        mproc.receive("nothing-here", timeout=timeout)
    elapsed = time.monotonic() - start
    assert timeout <= elapsed < timeout + 2
    err = info.value
    assert isinstance(err, TimeoutError)
    assert isinstance(err, mproc.MailboxError)
    assert "'nothing-here'" in str(err)
    assert str(me()) in str(err)
    assert (err.pid, err.group) == (me(), "nothing-here")


@pytest.mark.parametrize("reader", ["busy", "idle"])
def test_receive_timeout_zero_returns_a_delivered_message(reader: str) -> None:
    # send() returns once this process holds the message, so a poll must see
    # it, whoever is reading the sockets at the time.
    mproc.open_mailbox()
    receiver = _mailbox._state.receiver
    assert receiver is not None
    for i in range(20):
        if reader == "idle":
            peers.wait_for(
                lambda: receiver.reading is _receiver.Reading.BACKGROUND,
                "the background reader to lead",
            )
        mproc.send(me(), i)
        assert mproc.receive(timeout=0).data == i


def test_receive_timeout_zero_sees_what_another_process_sent(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    receiver = _mailbox._state.receiver
    assert receiver is not None
    ack_r, ack_w = multiprocessing.get_context("fork").Pipe()
    child = kids.start(_send_when_told, runtime_dir, me(), 10, ack_w)
    try:
        for i in range(10):
            # Idle here: the background thread is the one reading the sockets.
            peers.wait_for(
                lambda: receiver.reading is _receiver.Reading.BACKGROUND,
                "the background reader to lead",
            )
            ack_r.send("go")
            assert ack_r.poll(WAIT)
            assert ack_r.recv() == i  # the child's send(i) has returned
            msg = mproc.receive(timeout=0)
            assert (msg.sender_pid, msg.data) == (child.pid, i)
    finally:
        ack_r.close()
    assert kids.finish(child) == 0


def _send_when_told(rundir: str, parent: int, count: int, ack: Any) -> None:
    peers.use_runtime(rundir)
    for i in range(count):
        if not ack.poll(WAIT):
            raise SystemExit(2)
        ack.recv()
        mproc.send(parent, i, timeout=WAIT)
        ack.send(i)


def test_receive_with_timeout_returns_as_soon_as_a_message_arrives(
    kids: Kids, runtime_dir: str
) -> None:
    mproc.open_mailbox()
    child = kids.start(peers.send_hello, runtime_dir, me(), "late")
    start = time.monotonic()
    msg = mproc.receive("late", timeout=60)
    assert time.monotonic() - start < WAIT
    assert msg.sender_pid == child.pid
    assert kids.finish(child) == 0


# ---------------------------------------------------------------- 4. the start-up race


def test_send_waits_for_a_mailbox_that_opens_later(
    kids: Kids, runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    go = multiprocessing.get_context("fork").Event()
    child = kids.start(peers.open_when_told, runtime_dir, me(), go)
    lookups = peers.count_lookups(monkeypatch, child.pid)
    threads, errors = peers.start_threads([lambda: mproc.send(child.pid, "early", timeout=WAIT)])
    # A second look-up means the first found no mailbox: send() is waiting for it.
    assert lookups.acquire(timeout=WAIT)
    assert lookups.acquire(timeout=WAIT)
    assert threads[0].is_alive()
    go.set()
    peers.join_all(threads)
    assert errors == []
    echoed = mproc.receive("echo", timeout=WAIT)
    assert (echoed.sender_pid, echoed.data) == (child.pid, (me(), "early"))
    assert kids.finish(child) == 0


def test_send_to_a_live_pid_that_never_opens_a_mailbox(spawner: Any, runtime_dir: str) -> None:
    proc = spawner.popen(["sleep", "60"])
    start = time.monotonic()
    with pytest.raises(mproc.MailboxNotFound) as info:
        mproc.send(proc.pid, "x", timeout=0.5)
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 2.5
    err = info.value
    assert err.pid == proc.pid
    assert f"PID {proc.pid}" in str(err)
    assert err.path is not None
    assert err.path in str(err)
    assert os.path.basename(err.path).startswith(f"{proc.pid}.")
    assert os.path.dirname(err.path) == runtime_dir
    assert "open_mailbox" in str(err)


def test_send_to_self_opens_the_mailbox(runtime_dir: str) -> None:
    # Nobody else would open it: send() to one's own PID does (SPEC §5).
    assert _mailbox._state.receiver is None
    start = time.monotonic()
    mproc.send(me(), "to myself", "self", timeout=0.2)
    assert time.monotonic() - start < 0.2
    assert _mailbox._state.receiver is not None
    assert stat.S_ISSOCK(os.stat(peers.mailbox_path(runtime_dir, me())).st_mode)
    msg = mproc.receive("self", timeout=WAIT)
    assert msg == mproc.Msg(me(), me(), "self", "to myself")


def test_send_to_a_pid_that_does_not_exist(spawner: Any) -> None:
    proc = spawner.popen(["true"])
    proc.wait(WAIT)
    dead = proc.pid
    if psutil.pid_exists(dead):  # pragma: no cover - the PID was reused at once
        pytest.skip(f"PID {dead} was reused")
    for pid in (dead, 2**31 - 1):
        start = time.monotonic()
        with pytest.raises(mproc.NoSuchProcess) as info:
            mproc.send(pid, "x", timeout=30)
        assert time.monotonic() - start < 1
        assert isinstance(info.value, ProcessLookupError)
        assert info.value.pid == pid
        assert str(pid) in str(info.value)


def test_send_to_a_zombie(spawner: Any) -> None:
    proc = spawner.popen(["true"])
    assert peers.wait_exited(proc.pid, WAIT)
    # Exited but not reaped: a zombie.
    assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
    start = time.monotonic()
    with pytest.raises(mproc.NoSuchProcess, match=str(proc.pid)):
        mproc.send(proc.pid, "x", timeout=30)
    assert time.monotonic() - start < 1
    proc.wait(WAIT)


def test_send_timeout_zero_to_an_open_mailbox_delivers(kids: Kids, runtime_dir: str) -> None:
    # timeout=0 means "do not wait for the mailbox or for room"; connecting to a
    # mailbox that is open (and empty) must still work when the receiver is
    # busy (here: two Python threads competing for its GIL).
    mproc.open_mailbox()
    stop = threading.Event()
    busy, _ = peers.start_threads([lambda: _spin(stop) for _ in range(2)])
    try:
        children = [kids.start(_send_with_timeout_zero, runtime_dir, me(), i) for i in range(10)]
        codes = [kids.finish(c) for c in children]
    finally:
        stop.set()
        peers.join_all(busy)
    assert codes == [0] * 10
    got = sorted(mproc.receive("zero", timeout=WAIT).data for _ in range(10))
    assert got == list(range(10))


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        pass


def _send_with_timeout_zero(rundir: str, parent: int, i: int) -> None:
    peers.use_runtime(rundir)
    mproc.send(parent, i, "zero", timeout=0)


# ---------------------------------------------------------------- 5. ordering and no loss


def test_order_is_kept_per_sending_thread() -> None:
    mproc.open_mailbox()
    n_threads, n_msgs = 8, 300
    barrier = threading.Barrier(n_threads)

    def sender(tag: int) -> None:
        barrier.wait(WAIT)
        for i in range(n_msgs):
            mproc.send(me(), (tag, i))

    threads, errors = peers.start_threads([lambda t=t: sender(t) for t in range(n_threads)])
    got = [mproc.receive(timeout=WAIT).data for _ in range(n_threads * n_msgs)]
    peers.join_all(threads)
    assert errors == []
    per_thread = collections.defaultdict(list)
    for tag, i in got:
        per_thread[tag].append(i)
    assert per_thread == {t: list(range(n_msgs)) for t in range(n_threads)}
    assert_nothing_more()


def test_no_message_lost_from_many_processes(kids: Kids, runtime_dir: str) -> None:
    n_procs, n_msgs = 8, 3000
    start = time.monotonic()
    mproc.open_mailbox()
    children = [
        kids.start(peers.send_sequence, runtime_dir, me(), tag, n_msgs) for tag in range(n_procs)
    ]
    pids = {c.pid: tag for tag, c in enumerate(children)}
    per_sender: dict[int, list[int]] = collections.defaultdict(list)
    for _ in range(n_procs * n_msgs):
        msg = mproc.receive(timeout=WAIT)
        tag, i = msg.data
        assert pids[msg.sender_pid] == tag
        per_sender[tag].append(i)
    assert [kids.finish(c) for c in children] == [0] * n_procs
    # None lost, none duplicated, each sender's order kept.
    assert per_sender == {tag: list(range(n_msgs)) for tag in range(n_procs)}
    assert_nothing_more()
    assert time.monotonic() - start < 20


# ---------------------------------------------------------------- 6. back-pressure


def test_full_mailbox_blocks_the_sender_then_raises_mailbox_full(
    kids: Kids, runtime_dir: str
) -> None:
    max_queue = 5
    mproc.open_mailbox(max_queue=max_queue)
    receiver = _mailbox._state.receiver
    assert receiver is not None
    window = receiver.window
    assert window == min(rt.DEFAULT_WINDOW, max_queue)
    report_r, report_w = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = kids.start(peers.flood, runtime_dir, me(), 20, MiB, 0.3, report_w)
    # This process does not receive: the group holds max_queue messages plus
    # at most one window per sending connection, then the sender gets no credit.
    assert report_r.poll(WAIT), "the sender neither finished nor reported MailboxFull"
    outcome, stopped_at, text, err_pid, err_group = report_r.recv()
    assert kids.finish(child) == 0
    assert outcome == "full"
    assert max_queue <= stopped_at <= max_queue + window
    assert err_pid == me()
    assert err_group == ""
    assert f"PID {me()}" in text
    assert "''" in text  # the group
    assert "not delivered" in text
    # Once the child's connection has ended, all it sent is here: exactly the
    # messages whose send() returned.
    peers.wait_for(lambda: child.pid not in receiver.by_pid, "the child's connection to end")
    assert receiver.depths() == {"": stopped_at, "hello": 1}
    # Every send() that returned was delivered, in order; the failed one was not.
    for i in range(stopped_at):
        data = mproc.receive(timeout=WAIT).data
        assert data == (i, bytes([i]) * MiB)
    assert_nothing_more()
    assert mproc.receive("hello", timeout=WAIT).sender_pid == child.pid


def test_back_pressure_holds_bounded_memory_and_delivers_everything(
    kids: Kids, runtime_dir: str
) -> None:
    max_queue = 5
    mproc.open_mailbox(max_queue=max_queue)
    receiver = _mailbox._state.receiver
    assert receiver is not None
    window = receiver.window
    report_r, report_w = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = kids.start(peers.flood, runtime_dir, me(), 20, MiB, 60.0, report_w)

    def credit_used_up() -> bool:
        # The group is full, the sender was refused more credit, and all the
        # credit it had is in the queue: it can send nothing more until we receive.
        peer = receiver.by_pid.get(child.pid)
        group = receiver.groups.get("")
        if peer is None or group is None or peer not in group.starved:
            return False
        return len(group.queue) == peer.granted.get(b"", window)

    peers.wait_for(credit_used_up, "the sender to use up its credit")
    assert not report_r.poll(0), "all 20 messages were accepted without back-pressure"
    peer = receiver.by_pid[child.pid]
    group = receiver.groups[""]
    limit = peer.granted.get(b"", window)
    # What a group holds ahead of its receivers: max_queue plus one window.
    assert max_queue <= limit <= max_queue + window
    assert [entry[4] for entry in group.queue] == list(range(limit))  # the seqs, in order
    # Nothing beyond the queue is held: no parsed or unparsed bytes of this peer.
    assert not peer.inp.chunks
    assert not peer.inp.pending
    held = sum(len(entry[1]) for entry in group.queue)
    assert limit * MiB < held <= limit * (MiB + 1024)
    got = [mproc.receive(timeout=WAIT).data for _ in range(20)]
    assert [i for i, _ in got] == list(range(20))
    assert all(blob == bytes([i]) * MiB for i, blob in got)
    assert report_r.poll(WAIT)
    assert report_r.recv()[:2] == ("done", 20)
    assert kids.finish(child) == 0
    assert mproc.receive("hello", timeout=WAIT).sender_pid == child.pid
    assert_nothing_more()


# ---------------------------------------------------------------- 7. pickling errors


@pytest.mark.parametrize(
    "make",
    [threading.Lock, lambda: (i for i in range(3))],
    ids=["lock", "generator"],
)
def test_unpicklable_object_raises_in_the_sender(make: Any) -> None:
    mproc.open_mailbox()
    with pytest.raises(mproc.MessageError) as info:
        mproc.send(me(), {"bad": make()}, "grp")
    err = info.value
    assert err.__cause__ is not None
    assert "nothing was sent" in str(err)
    # Nothing was delivered: the next good message is the first one received.
    mproc.send(me(), "good", "grp")
    assert mproc.receive("grp", timeout=WAIT).data == "good"
    assert_nothing_more("grp")


def test_unpicklable_object_error_names_pid_and_group() -> None:
    mproc.open_mailbox()
    with pytest.raises(mproc.MessageError) as info:
        mproc.send(me(), threading.Lock(), "grp")
    assert f"PID {me()}" in str(info.value)
    assert "'grp'" in str(info.value)
    assert (info.value.pid, info.value.group) == (me(), "grp")


def test_message_the_receiver_cannot_unpickle(kids: Kids, runtime_dir: str, tmp_path: Any) -> None:
    modname = "mproc_only_in_the_child"
    (tmp_path / f"{modname}.py").write_text(
        "class Secret:\n    def __init__(self, v):\n        self.v = v\n"
    )
    mproc.open_mailbox()
    child = kids.start(peers.send_unimportable, runtime_dir, me(), str(tmp_path), modname, "grp")
    assert kids.finish(child) == 0
    with pytest.raises(mproc.MessageError) as info:
        mproc.receive("grp", timeout=WAIT)
    err = info.value
    assert (err.pid, err.group) == (child.pid, "grp")
    assert f"PID {child.pid}" in str(err)
    assert "'grp'" in str(err)
    assert isinstance(err.__cause__, ImportError)
    # The bad message was consumed; the next one is fine.
    msg = mproc.receive("grp", timeout=WAIT)
    assert (msg.sender_pid, msg.data) == (child.pid, "after")
    assert_nothing_more("grp")


# ---------------------------------------------------------------- 8. cloudpickle semantics


def test_lambdas_closures_and_local_classes_round_trip() -> None:
    mproc.open_mailbox()
    factor = 3

    def closure(x: int) -> int:
        return x * factor

    class Local:
        def __init__(self, v: int) -> None:
            self.v = v

        def double(self) -> int:
            return self.v * 2

    mproc.send(me(), (lambda x: x + 1, closure, Local, Local(21)))
    inc, clo, cls, obj = mproc.receive(timeout=WAIT).data
    assert inc(1) == 2
    assert clo(2) == 6
    assert cls(4).double() == 8
    assert obj.double() == 42


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_closures_run_in_another_process(kids: Kids, runtime_dir: str, method: str) -> None:
    child = kids.start(peers.call_server, runtime_dir, me(), method=method)
    assert mproc.receive("ready", timeout=WAIT).data == child.pid
    base = 10

    class Counter:
        def __init__(self) -> None:
            self.n = base

        def bump(self) -> int:
            self.n += 1
            return self.n

    mproc.send(child.pid, lambda: (base * 7, Counter().bump(), os.getpid()))
    msg = mproc.receive("result", timeout=WAIT)
    assert msg.data == (70, 11, child.pid)
    mproc.send(child.pid, None)
    assert kids.finish(child) == 0


def test_instances_of_main_classes_arrive_intact(spawner: Any) -> None:
    script = textwrap.dedent(
        """
        import sys
        import mproc

        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y

            def norm2(self):
                return self.x ** 2 + self.y ** 2

        def make_point(x, y):
            return Point(x, y)

        mproc.send(int(sys.argv[1]), (Point(3, 4), make_point, Point), "main", timeout=10)
        """
    )
    mproc.open_mailbox()
    proc = spawner.popen([sys.executable, "-c", script, str(me())])
    msg = mproc.receive("main", timeout=WAIT)
    assert proc.wait(WAIT) == 0
    point, make_point, point_cls = msg.data
    assert msg.sender_pid == proc.pid
    assert type(point).__name__ == "Point"
    assert point.norm2() == 25
    assert make_point(1, 2).norm2() == 5
    assert isinstance(make_point(0, 0), point_cls)


# ---------------------------------------------------------------- 9. properties

_text = st.text(st.characters() | st.integers(0xD800, 0xDFFF).map(chr))
_objects = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text | st.binary(),
    lambda children: (
        st.lists(children)
        | st.tuples(children, children)
        | st.dictionaries(_text | st.integers(), children)
    ),
    max_leaves=20,
)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(obj=_objects, group=_text)
def test_any_object_and_group_round_trips(obj: Any, group: str) -> None:
    mproc.open_mailbox()
    mproc.send(me(), obj, group)
    msg = mproc.receive(group, timeout=WAIT)
    assert msg.group == group
    assert msg.data == obj
    assert repr(msg.data) == repr(obj)  # types too: a tuple stays a tuple, True stays True


# ---------------------------------------------------------------- 13. clean-up at exit

_EXIT_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import mproc
    mproc.open_mailbox()
    print(os.getpid(), flush=True)
    sys.stdin.readline()
    mode = sys.argv[1]
    if mode == "exit3":
        sys.exit(3)
    if mode == "raise":
        raise RuntimeError("boom")
    """
)


@pytest.mark.parametrize(("mode", "code"), [("normal", 0), ("exit3", 3), ("raise", 1)])
def test_socket_file_removed_at_interpreter_exit(
    spawner: Any, runtime_dir: str, mode: str, code: int
) -> None:
    proc = spawner.popen(
        [sys.executable, "-c", _EXIT_SCRIPT, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    readable, _, _ = select.select([proc.stdout], [], [], WAIT)
    assert readable, "the child did not open its mailbox"
    assert int(proc.stdout.readline()) == proc.pid
    path = peers.mailbox_path(runtime_dir, proc.pid)
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    proc.communicate(b"go\n", timeout=WAIT)
    assert proc.returncode == code
    assert not os.path.exists(path)


@pytest.mark.parametrize("method", START_METHODS)
def test_multiprocessing_child_removes_its_socket_file(
    kids: Kids, runtime_dir: str, method: str
) -> None:
    child = kids.start(_open_and_return, runtime_dir, me(), method=method)
    assert mproc.receive("opened", timeout=WAIT).sender_pid == child.pid
    start = time.monotonic()
    assert kids.finish(child) == 0
    # Closing the mailbox at exit is quick (no thread waits out a timeout).
    assert time.monotonic() - start < 3
    assert [f for f in os.listdir(runtime_dir) if f.startswith(f"{child.pid}.")] == []


def _open_and_return(rundir: str, parent: int) -> None:
    peers.use_runtime(rundir)
    mproc.open_mailbox()
    mproc.send(parent, "opened", "opened", timeout=WAIT)
    # Returning without close_mailbox(): the exit clean-up must remove the file.


def test_close_and_reopen(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    first = _mailbox._state.receiver
    path = peers.mailbox_path(runtime_dir, me())
    mproc.send(me(), "lost")
    mproc.close_mailbox()
    assert not os.path.exists(path)
    assert _mailbox._state.receiver is None
    assert dict(_sender._links.by_pid) == {}  # our connections closed with it
    mproc.close_mailbox()  # idempotent
    # Closed, it is not reachable: another process's send() finds no mailbox.
    report_r, report_w = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = kids.start(peers.try_send, runtime_dir, me(), 0.2, report_w)
    assert report_r.poll(WAIT)
    name, text, err_pid, err_path = report_r.recv()
    assert kids.finish(child) == 0
    assert (name, err_pid, err_path) == ("MailboxNotFound", me(), path)
    assert f"PID {me()}" in text
    assert path in text
    assert os.listdir(runtime_dir) == ["key"]
    mproc.open_mailbox()
    assert _mailbox._state.receiver is not first
    assert peers.mailbox_path(runtime_dir, me()) == path
    mproc.send(me(), "again")
    # Unreceived messages of the closed mailbox are gone.
    assert mproc.receive(timeout=WAIT).data == "again"
    assert_nothing_more()


def test_sender_reconnects_after_the_receiver_reopens(kids: Kids, runtime_dir: str) -> None:
    child = kids.start(peers.call_server, runtime_dir, me())
    assert mproc.receive("ready", timeout=WAIT).data == child.pid
    mproc.send(child.pid, lambda: "first")
    assert mproc.receive("result", timeout=WAIT).data == "first"
    # The child's cached connection now leads to a closed mailbox.
    mproc.close_mailbox()
    mproc.open_mailbox()
    mproc.send(child.pid, lambda: "second")
    msg = mproc.receive("result", timeout=WAIT)
    assert (msg.sender_pid, msg.data) == (child.pid, "second")
    mproc.send(child.pid, None)
    assert kids.finish(child) == 0


def test_old_connections_are_evicted(
    kids: Kids, runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One connection per receiving process, whatever the groups; at most
    # MAX_LINKS of them, the oldest idle one closed first.
    monkeypatch.setattr(_sender, "MAX_LINKS", 2)
    children = [kids.start(peers.echo, runtime_dir, me()) for _ in range(3)]
    assert {mproc.receive("ready", timeout=WAIT).data for _ in children} == {
        c.pid for c in children
    }
    links = _sender._links.by_pid
    order: list[int] = []
    for round_ in range(2):
        for c in children:
            mproc.send(c.pid, round_)
            echoed = mproc.receive("echo", timeout=WAIT)
            assert (echoed.sender_pid, echoed.data) == (c.pid, (me(), round_))
            order.append(c.pid)
            assert list(links) == order[-2:]
    for c in children:
        mproc.send(c.pid, None)
    assert [kids.finish(c) for c in children] == [0, 0, 0]


def test_evicted_connection_is_never_used_for_another_process(
    kids: Kids, runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A thread about to write on a cached connection while other sends evict
    # (close) it: the freed descriptor is soon another connection's. The
    # message must reach its PID or fail, never land in another process.
    # Only idle connections are evicted: the one being written stays open
    # (and cached) until its writer is done.
    monkeypatch.setattr(_sender, "MAX_LINKS", 1)
    p, q, r = (kids.start(peers.echo, runtime_dir, me()) for _ in range(3))
    assert {mproc.receive("ready", timeout=WAIT).data for _ in range(3)} == {p.pid, q.pid, r.pid}
    mproc.send(p.pid, "warm")
    assert mproc.receive("echo", timeout=WAIT).data == (me(), "warm")
    p_link = _sender._links.by_pid[p.pid]
    in_write = threading.Event()
    go_on = threading.Event()

    class PausingOs:
        """The sender's ``os``, whose first write in "paused-sender" waits for go_on."""

        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        def write(self, fd: int, data: Any) -> int:
            if threading.current_thread().name == "paused-sender" and not in_write.is_set():
                in_write.set()
                go_on.wait(WAIT)
            return os.write(fd, data)

    monkeypatch.setattr(_sender, "os", PausingOs())
    errors: list[BaseException] = []

    def send_to_p() -> None:
        try:
            mproc.send(p.pid, "for P only")
        except Exception as err:
            errors.append(err)

    sender = threading.Thread(target=send_to_p, name="paused-sender", daemon=True)
    sender.start()
    try:
        assert in_write.wait(WAIT)
        # Each new connection evicts the idle ones before it (the limit is 1
        # here), never P's, which is in the middle of a frame.
        mproc.send(q.pid, "for Q")
        mproc.send(r.pid, "for R")
        assert list(_sender._links.by_pid) == [p.pid, r.pid]
        assert _sender._links.by_pid[p.pid] is p_link
        assert not p_link.dead
    finally:
        go_on.set()
        sender.join(WAIT)
    assert not sender.is_alive()
    assert errors == []
    echoes: dict[int, list[Any]] = collections.defaultdict(list)
    try:
        for _ in range(3):
            msg = mproc.receive("echo", timeout=WAIT)
            echoes[msg.sender_pid].append(msg.data[1])
        assert_nothing_more("echo")
    finally:
        for child in (p, q, r):
            mproc.send(child.pid, None)  # let them close their mailboxes and exit
        assert [kids.finish(c) for c in (p, q, r)] == [0, 0, 0]
    assert echoes[q.pid] == ["for Q"]
    assert echoes[r.pid] == ["for R"]
    assert echoes[p.pid] == ["for P only"]


# ---------------------------------------------------------------- 14. fork


def test_os_fork_child_starts_without_a_mailbox(runtime_dir: str) -> None:
    mproc.open_mailbox()
    # Give this process a cached connection to its own mailbox: the child must not use it.
    mproc.send(me(), "warm")
    assert mproc.receive(timeout=WAIT).data == "warm"
    parent_path = peers.mailbox_path(runtime_dir, me())
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(report_r)
            state = _mailbox._state
            report = {
                "mailbox_none": state.receiver is None,
                "links": len(_sender._links.by_pid),
            }
            mproc.send(os.getppid(), "from child", "fork", timeout=WAIT)
            mproc.open_mailbox()
            report["own_socket"] = os.path.basename(peers.mailbox_path(runtime_dir, os.getpid()))
            msg = mproc.receive("to-child", timeout=WAIT)
            report["got"] = [msg.sender_pid, msg.data]
            mproc.close_mailbox()
            code = 0
        except BaseException as err:
            report = {"error": repr(err)}
        finally:
            os.write(report_w, json.dumps(report).encode())
            os._exit(code)
    os.close(report_w)
    try:
        msg = mproc.receive("fork", timeout=WAIT)
        assert (msg.sender_pid, msg.data) == (pid, "from child")
        mproc.send(pid, "to you", "to-child")
        assert peers.wait_exited(pid, WAIT)
        with os.fdopen(report_r, "rb") as f:
            report = json.loads(f.read())
    finally:
        if not peers.wait_exited(pid, 0):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    assert report == {
        "mailbox_none": True,
        "links": 0,
        "own_socket": report["own_socket"],
        "got": [me(), "to you"],
    }
    assert report["own_socket"].startswith(f"{pid}.")
    # The parent's mailbox was not touched by the child.
    assert os.path.exists(parent_path)
    assert not os.path.exists(os.path.join(runtime_dir, report["own_socket"]))
    mproc.send(me(), "still here")
    assert mproc.receive(timeout=WAIT).data == "still here"


def test_fork_context_child_uses_a_fresh_connection(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    mproc.send(me(), "warm", "fork")
    assert mproc.receive("fork", timeout=WAIT).sender_pid == me()
    child = kids.start(peers.report_fork_state, runtime_dir, me())
    msg = mproc.receive("fork", timeout=WAIT)
    # Had the child reused our cached connection, the kernel would name us.
    assert msg.sender_pid == child.pid
    assert msg.data == ("state", child.pid, (True, 0))
    mproc.send(child.pid, "hello child", "to-child")
    msg = mproc.receive("fork", timeout=WAIT)
    assert msg.data == ("got", me(), "hello child")
    assert kids.finish(child) == 0
    mproc.send(me(), "after")
    assert mproc.receive(timeout=WAIT).data == "after"


# ---------------------------------------------------------------- 15. threads


def test_many_sender_and_receiver_threads() -> None:
    mproc.open_mailbox()
    groups = ["g0", "g1", "g2", "g3"]
    n_senders, per_sender = 12, 100
    received: dict[str, list[tuple[int, int]]] = {g: [] for g in groups}

    def sender(tag: int) -> None:
        for i in range(per_sender):
            mproc.send(me(), (tag, i), groups[i % len(groups)])

    def receiver(group: str) -> None:
        for _ in range(n_senders * per_sender // len(groups)):
            msg = mproc.receive(group, timeout=WAIT)
            assert msg.group == group
            received[group].append(msg.data)

    threads, errors = peers.start_threads(
        [lambda g=g: receiver(g) for g in groups] + [lambda t=t: sender(t) for t in range(12)]
    )
    peers.join_all(threads, 60)
    assert errors == []
    for index, group in enumerate(groups):
        per_tag = collections.defaultdict(list)
        for tag, i in received[group]:
            per_tag[tag].append(i)
        expected = [i for i in range(per_sender) if i % len(groups) == index]
        assert per_tag == {t: expected for t in range(n_senders)}


def test_two_receivers_of_one_group_while_one_polls() -> None:
    # One thread waits for "g" (and reads the socket meanwhile); another polls
    # "g" and gives up. The waiting thread must still get the next message.
    mproc.open_mailbox()
    receiver = _mailbox._state.receiver
    assert receiver is not None
    result: list[Any] = []
    threads, errors = peers.start_threads(
        [lambda: result.append(mproc.receive("g", timeout=WAIT).data)]
    )
    peers.wait_for(
        lambda: receiver.reading is _receiver.Reading.CONSUMER, "the receiver thread to read"
    )
    with pytest.raises(mproc.ReceiveTimeout):
        mproc.receive("g", timeout=0)
    mproc.send(me(), "for the waiter", "g")
    peers.join_all(threads)
    assert errors == []
    assert result == ["for the waiter"]


def test_a_timed_out_receive_does_not_lose_messages() -> None:
    # A receive() that reads the sockets itself (it leads) takes in messages of
    # other groups meanwhile; timing out must not lose them, nor a poll that
    # timed out while it led.
    mproc.open_mailbox()
    receiver = _mailbox._state.receiver
    assert receiver is not None
    threads, errors = peers.start_threads([lambda: mproc.receive("g", timeout=2)])
    peers.wait_for(
        lambda: receiver.reading is _receiver.Reading.CONSUMER, "the receiver thread to read"
    )
    with pytest.raises(mproc.ReceiveTimeout):
        mproc.receive("g", timeout=0)
    mproc.send(me(), "for h", "h")
    peers.join_all(threads)
    assert len(errors) == 1
    assert type(errors[0]) is mproc.ReceiveTimeout
    assert errors[0].group == "g"
    assert mproc.receive("h", timeout=WAIT).data == "for h"
    mproc.send(me(), "kept", "g")
    assert mproc.receive("g", timeout=WAIT).data == "kept"
    assert_nothing_more("g")
    assert_nothing_more("h")


def test_close_mailbox_wakes_blocked_receivers() -> None:
    mproc.open_mailbox()
    receiver = _mailbox._state.receiver
    assert receiver is not None
    groups = ["a", "b", "c"]
    threads, errors = peers.start_threads(
        [lambda g=g: mproc.receive(g, timeout=30) for g in groups]
    )

    peers.wait_for(lambda: all(g in receiver.groups for g in groups), "the receivers to block")
    start = time.monotonic()
    mproc.close_mailbox()
    peers.join_all(threads)
    assert time.monotonic() - start < 5
    assert len(errors) == 3
    for err in errors:
        assert type(err) is mproc.MailboxClosed, repr(err)
        assert "closed" in str(err)
        assert f"PID {me()}" in str(err)
        assert f"{err.group!r}" in str(err)
        assert (err.pid, err.path) == (me(), receiver.path)
    assert sorted(err.group for err in errors) == groups


# ---------------------------------------------------------------- 17. validation


@pytest.mark.parametrize(
    ("pid", "exc", "words"),
    [
        (12.0, TypeError, "int PID"),
        (b"12", TypeError, "int PID"),
        (True, TypeError, "int PID"),
        (None, TypeError, "int PID"),
        (0, ValueError, "PID > 0"),
        (-5, ValueError, "PID > 0"),
    ],
    ids=repr,
)
def test_send_validates_the_pid(pid: Any, exc: type[Exception], words: str) -> None:
    with pytest.raises(exc, match=words) as info:
        mproc.send(pid, "x")
    assert repr(pid) in str(info.value) or str(pid) in str(info.value)


def test_send_accepts_an_int_subclass() -> None:
    class Pid(int):
        pass

    mproc.open_mailbox()
    mproc.send(Pid(me()), "x")
    assert mproc.receive(timeout=WAIT).data == "x"


@pytest.mark.parametrize(
    ("timeout", "exc"), [(-1, ValueError), (-0.001, ValueError), ("1", TypeError)], ids=repr
)
def test_timeouts_are_validated(timeout: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="timeout") as info:
        mproc.send(me(), "x", timeout=timeout)
    assert repr(timeout) in str(info.value) or str(timeout) in str(info.value)
    with pytest.raises(exc, match="timeout"):
        mproc.receive(timeout=timeout)


def test_group_name_too_long() -> None:
    group = "x" * 70_000
    with pytest.raises(ValueError, match="70000 bytes") as info:
        mproc.send(me(), "x", group)
    assert "65535" in str(info.value)
    with pytest.raises(ValueError, match="65535"):
        mproc.receive("é" * 32768, timeout=0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"max_queue": 0}, ValueError, "max_queue must be >= 1"),
        ({"max_queue": -1}, ValueError, "max_queue must be >= 1"),
        ({"max_queue": True}, TypeError, "max_queue must be an int"),
        ({"max_queue": 1.5}, TypeError, "max_queue must be an int"),
        ({"max_frame": 0}, ValueError, "max_frame must be >= 1"),
        ({"max_frame": "1"}, TypeError, "max_frame must be an int"),
        ({"idle_limit": 0}, ValueError, "idle_limit must be > 0"),
        ({"idle_limit": float("nan")}, ValueError, "idle_limit must be a number"),
        ({"idle_limit": "1"}, TypeError, "idle_limit must be a number"),
    ],
    ids=repr,
)
def test_open_mailbox_validates_limits(
    kwargs: dict[str, Any], exc: type[Exception], words: str
) -> None:
    ((name, value),) = kwargs.items()
    with pytest.raises(exc) as info:
        mproc.open_mailbox(**kwargs)
    assert type(info.value) is exc
    assert str(info.value).startswith("open_mailbox(): ")
    assert words in str(info.value)
    if not (name == "idle_limit" and isinstance(value, (int, float))):
        assert repr(value) in str(info.value)
    assert _mailbox._state.receiver is None


def test_open_mailbox_on_an_open_mailbox_changes_max_queue_only() -> None:
    mproc.open_mailbox(max_frame=1 << 20)
    mailbox = _mailbox._state.receiver
    assert mailbox is not None
    mproc.open_mailbox(max_queue=7)
    assert (mailbox.max_queue, mailbox.max_frame) == (7, 1 << 20)
    mproc.open_mailbox()  # no limits given: nothing changes
    assert (mailbox.max_queue, mailbox.max_frame) == (7, 1 << 20)
    with pytest.raises(ValueError, match=r"max_frame=1048576.*close_mailbox"):
        mproc.open_mailbox(max_frame=1 << 21)
    assert _mailbox._state.receiver is mailbox


def test_receive_with_bad_arguments_does_not_open_the_mailbox(runtime_dir: str) -> None:
    with pytest.raises(ValueError, match="timeout"):
        mproc.receive(timeout=-1)
    with pytest.raises(TypeError, match="group"):
        mproc.receive(3)  # type: ignore[arg-type]
    assert _mailbox._state.receiver is None
    assert not [f for f in os.listdir(runtime_dir) if f.endswith(".sock")]


def test_a_full_group_does_not_hold_up_another_group(kids: Kids, runtime_dir: str) -> None:
    # Back-pressure is per (sender, receiver, group): "data" is full and never
    # read, yet "ctl" from the same sending thread gets through.
    mproc.open_mailbox()
    child = kids.start(peers.control_behind_full_data, runtime_dir, me())
    assert mproc.receive("ready", timeout=WAIT).data == child.pid
    max_queue = 2  # the child's
    window = min(rt.DEFAULT_WINDOW, max_queue)
    # Fill "data" until this sender gets no more credit for it.
    sent = 0
    with pytest.raises(mproc.MailboxFull) as info:
        while sent <= max_queue + window:
            mproc.send(child.pid, sent, "data", timeout=0.3)
            sent += 1
    assert max_queue <= sent <= max_queue + window
    assert (info.value.pid, info.value.group) == (child.pid, "data")
    # On the same connection, from the same thread: "ctl" is not held up.
    start = time.monotonic()
    mproc.send(child.pid, "stop", "ctl", timeout=WAIT)
    assert time.monotonic() - start < 1
    assert mproc.receive("got", timeout=WAIT).data == "stop"
    assert kids.finish(child) == 0
