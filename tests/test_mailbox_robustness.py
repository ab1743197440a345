"""Mailbox robustness (SPEC §5): hostile and broken peers, dead receivers, stale
and impostor socket files.

Every misbehaving peer may cost only its own connection: each test ends by
checking that the mailbox still serves a normal sender (a fresh child process).
Crafted frames are written on connections that passed the real handshake
(``mailbox_peers.authed``); every frame and handshake message is built with
:mod:`mproc._wire`, never with a literal struct.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import mailbox_peers as peers
import pytest
from mailbox_peers import WAIT, Kids, me, msg_frame, raw_connect

import mproc
from mproc import _mailbox, _sender
from mproc import _runtime as rt
from mproc import _wire as wire

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-specific checks"),
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),
]

MiB = 1 << 20


def assert_serving(kids: Kids, rundir: str, *, self_too: bool = True) -> None:
    """A normal sender (a new process, so a new connection) still gets through, promptly.

    With ``self_too``, so does this process's own ``send()``: a new connection of
    this process is read once its earlier ones have ended, so a test calls it
    with ``self_too`` only when it has closed its crafted connections.
    """
    start = time.monotonic()
    child = kids.start(peers.send_hello, rundir, me(), "alive")
    msg = mproc.receive("alive", timeout=WAIT)
    assert (msg.sender_pid, msg.data) == (child.pid, ("hello", child.pid))
    assert kids.finish(child) == 0
    assert time.monotonic() - start < 3, "the mailbox served a normal sender only slowly"
    if not self_too:
        return
    mproc.send(me(), "self too", "alive")
    assert mproc.receive("alive", timeout=WAIT).data == "self too"


def assert_nothing(group: str = "", timeout: float = 0.3) -> None:
    with pytest.raises(mproc.ReceiveTimeout):
        got = mproc.receive(group, timeout=timeout)
        pytest.fail(f"unexpected message {got!r}")


def stale_socket(path: str) -> None:
    """Leave a real AF_UNIX socket file behind, as a process killed with it open would."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)


# ---------------------------------------------------------------- before the handshake

_rng = random.Random(1234)
GARBAGE = {
    "random": _rng.randbytes(4096),
    "http": b"GET / HTTP/1.1\r\nHost: mproc\r\n\r\n",
    "huge-length": wire.LEN.pack(0x7FFFFFFF) + b"x" * 64,
    "64bit-length": wire.LEN.pack(-1) + wire.LEN64.pack(1 << 60),
    "negative-length": wire.LEN.pack(-7) + b"abc",
    "short-length": wire.LEN.pack(100) + b"only ten b",
    "a-frame": msg_frame("", "no handshake"),
    "a-hello": wire.hello(),
    "nothing": b"",
    "large": _rng.randbytes(300_000),
}


@pytest.mark.parametrize("garbage", list(GARBAGE), ids=list(GARBAGE))
def test_garbage_instead_of_a_handshake(kids: Kids, runtime_dir: str, garbage: str) -> None:
    mproc.open_mailbox()
    with raw_connect(peers.mailbox_path(runtime_dir, me())) as sock:
        try:
            sock.sendall(GARBAGE[garbage])
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the mailbox hung up before reading it all: fine
        # The mailbox closes the connection (what it sends first is its challenge).
        peers.read_until_eof(sock)
    assert_nothing()
    assert_serving(kids, runtime_dir)


def test_stalled_handshakes_do_not_delay_others(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    path = peers.mailbox_path(runtime_dir, me())
    stalled = [raw_connect(path) for _ in range(20)]
    try:
        # Well inside the handshake timeout: nobody waits for the silent peers.
        assert_serving(kids, runtime_dir)
    finally:
        for sock in stalled:
            sock.close()


def test_stalled_handshake_is_dropped_after_the_handshake_timeout(
    kids: Kids, runtime_dir: str
) -> None:
    mproc.open_mailbox()
    receiver = _mailbox._state.receiver
    assert receiver is not None
    receiver.admission.timeout = 0.3  # the deadline of connections accepted from now on
    with raw_connect(peers.mailbox_path(runtime_dir, me())) as sock:
        start = time.monotonic()
        challenge = peers.read_until_eof(sock)
        assert time.monotonic() - start < 0.3 + 3
    # All it sent before hanging up was its challenge, one whole frame.
    (size,) = wire.LEN.unpack_from(challenge)
    assert size == len(challenge) - wire.LEN.size
    assert challenge[wire.LEN.size :].startswith(wire.CHALLENGE)
    assert receiver.admission.pending == {}
    assert_serving(kids, runtime_dir)


def test_one_deadline_for_the_whole_handshake(kids: Kids, runtime_dir: str) -> None:
    # A peer that answers each step promptly but never finishes is dropped at
    # the deadline of the whole handshake, not after a timeout per read.
    mproc.open_mailbox()
    receiver = _mailbox._state.receiver
    assert receiver is not None
    receiver.admission.timeout = 0.5
    key = rt.runtime().key
    with raw_connect(peers.mailbox_path(runtime_dir, me())) as sock:
        start = time.monotonic()
        sock.sendall(wire.frame(wire.answer(key, peers.read_frame(sock))))
        assert peers.read_frame(sock) == wire.WELCOME
        # Our challenge, then nothing more: no WELCOME, no HELLO.
        mine = wire.challenge()
        sock.sendall(wire.frame(mine))
        assert wire.verify(key, mine, peers.read_frame(sock))
        assert peers.read_until_eof(sock) == b""
        elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 0.5 + 3
    assert receiver.peers == {}
    assert_serving(kids, runtime_dir)


def test_client_with_the_wrong_key_is_refused(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    path = peers.mailbox_path(runtime_dir, me())
    with raw_connect(path) as sock:
        with pytest.raises(peers.Refused) as info:
            peers.handshake(sock, b"not the key" * 3)
        # Told so (FAILURE), then hung up on: nothing we send is read.
        assert (info.value.step, info.value.verdict) == ("the verdict on our key", wire.FAILURE)
        assert peers.read_until_eof(sock) == b""
    assert_nothing()
    assert_serving(kids, runtime_dir)


def test_sender_with_the_wrong_key_gets_a_clear_error(
    kids: Kids, runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mproc.open_mailbox()
    path = peers.mailbox_path(runtime_dir, me())
    with monkeypatch.context() as patch:
        patch.setattr(rt, "runtime", lambda: rt.Runtime(runtime_dir, b"k" * 32))
        with pytest.raises(mproc.HandshakeError) as info:
            mproc.send(me(), "x", timeout=2)
    err = info.value
    assert type(err) is mproc.HandshakeError
    assert (err.pid, err.path, err.group) == (me(), path, "")
    assert f"PID {me()}" in str(err)
    assert path in str(err)
    assert "refused our key" in str(err)
    assert "MPROC_RUNTIME_DIR" in str(err)
    # Nothing of it is cached: with the right key the same process gets through.
    assert _sender._links.by_pid.get(me()) is None
    assert_nothing()
    assert_serving(kids, runtime_dir)


# ---------------------------------------------------------------- bad frames after the handshake


def _oversized_frames() -> dict[str, bytes]:
    empty_head = wire.HEAD.pack(wire.KIND_MSG, 0, 0)
    return {
        "whole": msg_frame("", b"x" * 10_000),
        "header-32": wire.LEN.pack((1 << 30) + 1) + empty_head,
        "header-64": wire.LEN.pack(-1) + wire.LEN64.pack(1 << 40) + empty_head,
        "too-small": wire.LEN.pack(2) + empty_head,
        "group-longer-than-frame": (
            wire.LEN.pack(20) + wire.HEAD.pack(wire.KIND_MSG, 100, 0) + b"g" * 9
        ),
    }


@pytest.mark.parametrize("kind", list(_oversized_frames()))
def test_frame_with_a_bad_size_is_refused(kids: Kids, runtime_dir: str, kind: str) -> None:
    mproc.open_mailbox(max_frame=4096)
    conn = peers.authed(me())
    try:
        assert conn.max_frame == 4096  # announced in the mailbox's HELLO
        # Only the header is sent for most: the mailbox must judge it without the body.
        conn.write(_oversized_frames()[kind])
        assert conn.is_dropped(), "the mailbox kept a connection that sent a bad frame"
    finally:
        conn.close()
    assert_nothing()
    assert_serving(kids, runtime_dir)


@pytest.mark.parametrize("extra", [0, 1], ids=["at-limit", "one-over"])
def test_frame_size_limit_is_exact(kids: Kids, runtime_dir: str, extra: int) -> None:
    mproc.open_mailbox(max_frame=4096)
    # The frame's size (what the limit is about) excludes its length prefix.
    overhead = len(msg_frame("", b"y" * 3000)) - wire.LEN.size - 3000  # constant for these sizes
    blob = b"y" * (4096 + extra - overhead)
    data = msg_frame("", blob)
    assert len(data) - wire.LEN.size == 4096 + extra
    conn = peers.authed(me())
    try:
        conn.send("", blob)
        if extra:
            assert conn.is_dropped()
            assert_nothing()
        else:
            msg = mproc.receive(timeout=WAIT)
            assert (msg.sender_pid, msg.data) == (me(), blob)
    finally:
        conn.close()
    assert_serving(kids, runtime_dir)


def test_send_over_the_receivers_frame_limit_is_not_silently_lost() -> None:
    # "When send() returns, the receiving process holds the message": a frame
    # the receiver refuses must make send() fail, not vanish. The sender
    # learns the limit from the receiver's HELLO and sends nothing.
    mproc.open_mailbox(max_frame=4096)
    with pytest.raises(mproc.MessageError) as info:
        mproc.send(me(), b"x" * 10_000, "big", timeout=2)
    err = info.value
    assert type(err) is mproc.MessageError
    assert (err.pid, err.group) == (me(), "big")
    assert f"PID {me()}" in str(err)
    assert "'big'" in str(err)
    assert "4096" in str(err)
    assert "nothing was sent" in str(err)
    assert_nothing("big")
    # The connection was not spoiled: the next message that fits arrives.
    mproc.send(me(), b"x" * 100, "big", timeout=2)
    assert mproc.receive("big", timeout=WAIT).data == b"x" * 100


def test_truncated_frame(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    conn = peers.authed(me())
    data = conn.msg("t", "complete") + conn.msg("t", "cut " * 100)
    conn.write(data[: len(data) - 200])
    conn.close()
    msg = mproc.receive("t", timeout=WAIT)
    assert (msg.sender_pid, msg.data) == (me(), "complete")
    assert_nothing("t")
    assert_serving(kids, runtime_dir)


def test_truncated_large_frame(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    conn = peers.authed(me())
    data = conn.msg("t", b"z" * (3 * MiB))
    conn.write(data[: 2 * MiB])
    conn.close()
    assert_nothing("t")
    assert_serving(kids, runtime_dir)


def test_peer_killed_in_the_middle_of_a_message(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    report_r, report_w = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = kids.start(peers.half_frame_then_wait, runtime_dir, me(), report_w)
    assert report_r.poll(WAIT)
    assert report_r.recv() == "written"
    kids.kill(child)
    msg = mproc.receive(timeout=WAIT)
    assert (msg.sender_pid, msg.data) == (child.pid, "before")
    assert_nothing()
    assert_serving(kids, runtime_dir)


@pytest.mark.parametrize("cut", [2, 5, 40], ids=["in-length", "in-head", "in-payload"])
def test_peer_stalled_in_the_middle_of_a_frame(kids: Kids, runtime_dir: str, cut: int) -> None:
    mproc.open_mailbox()
    conn = peers.authed(me())
    try:
        first = conn.msg("stall", "first")
        second = conn.msg("stall", "second " * 20)
        conn.write(first + second[:cut])
        assert mproc.receive("stall", timeout=WAIT).data == "first"
        # Other processes are served while this peer sits in the middle of a frame...
        assert_serving(kids, runtime_dir, self_too=False)
        # ...and when it goes on, its frame arrives whole.
        conn.write(second[cut:])
        msg = mproc.receive("stall", timeout=WAIT)
        assert (msg.sender_pid, msg.data) == (me(), "second " * 20)
    finally:
        conn.close()
    # This process's own new connection is read once that one has ended.
    assert_serving(kids, runtime_dir)


def test_invalid_group_encoding_drops_the_connection(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    conn = peers.authed(me())
    try:
        conn.send(b"\xff\xfe", "bad group")
        assert conn.is_dropped()
    finally:
        conn.close()
    receiver = _mailbox._state.receiver
    assert receiver is not None
    assert receiver.depths() == {}
    assert_serving(kids, runtime_dir)


def test_frames_before_a_bad_one_are_delivered() -> None:
    # Like a truncated frame, a malformed one costs the connection, not the
    # messages that came whole before it (their send() returned).
    mproc.open_mailbox()
    conn = peers.authed(me())
    try:
        good = conn.msg("g", "good")
        bad = conn.msg(b"\xff\xfe", "bad group")
        conn.write(good + bad)  # one write: one read on the other side
        assert conn.is_dropped()
    finally:
        conn.close()
    assert mproc.receive("g", timeout=2).data == "good"
    assert_nothing("g")


def test_unknown_frame_kind_drops_only_that_connection(
    kids: Kids, runtime_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    mproc.open_mailbox()
    conn = peers.authed(me())
    try:
        with caplog.at_level(logging.DEBUG, logger="mproc"):
            good = conn.msg("k", "good")
            unknown = wire.frame(wire.HEAD.pack(7, 1, 0) + b"k" + b"payload")
            conn.write(good + unknown)
            assert conn.is_dropped()
    finally:
        conn.close()
    assert mproc.receive("k", timeout=2).data == "good"
    assert any(
        f"PID {me()}" in r.getMessage() and "unknown kind 7" in r.getMessage()
        for r in caplog.records
    )
    assert_nothing("k")
    assert_serving(kids, runtime_dir)


def test_payload_that_is_not_a_pickle(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    conn = peers.authed(me())
    try:
        conn.send("p", payload=b"\x80\x05 certainly not a pickle")
        conn.send("p", "next")
        with pytest.raises(mproc.MessageError) as info:
            mproc.receive("p", timeout=WAIT)
        assert (info.value.pid, info.value.group) == (me(), "p")
        assert f"PID {me()}" in str(info.value)
        assert "'p'" in str(info.value)
        # The connection survived: the next frame on it arrives.
        assert mproc.receive("p", timeout=WAIT).data == "next"
    finally:
        conn.close()
    assert_serving(kids, runtime_dir)


def _bad_peer(kind: str, path: str) -> None:
    if kind == "garbage":
        with raw_connect(path) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            peers.read_until_eof(sock)
        return
    if kind == "wrong-key":
        with raw_connect(path) as sock, pytest.raises(peers.Refused):
            peers.handshake(sock, b"wrong" * 8)
        return
    conn = peers.authed(me())
    try:
        if kind == "oversized":
            conn.write(wire.LEN.pack((1 << 30) + 1) + wire.HEAD.pack(wire.KIND_MSG, 0, 0))
            assert conn.is_dropped()
        elif kind == "bad-group":
            conn.send(b"\xff", "x")
            assert conn.is_dropped()
        else:  # truncated
            conn.write(conn.msg("", "cut")[:-3])
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["garbage", "wrong-key", "oversized", "truncated", "bad-group"])
def test_refused_and_dropped_peers_are_logged_at_debug_level(
    runtime_dir: str, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    # SPEC §8: silent by default; a debug record for every refused connection
    # and dropped peer. A misbehaving peer is not an error of this process.
    caplog.set_level(logging.DEBUG, logger="mproc")
    mproc.open_mailbox()
    _bad_peer(kind, peers.mailbox_path(runtime_dir, me()))

    def logged() -> bool:
        return any(
            r.levelno == logging.DEBUG
            and ("refused" in r.getMessage() or "dropped" in r.getMessage())
            for r in caplog.records
            if r.name == "mproc"
        )

    peers.wait_for(logged, "a debug record of the refused or dropped peer")
    loud = [
        f"{r.levelname}: {r.getMessage()}"
        for r in caplog.records
        if r.name == "mproc" and r.levelno > logging.DEBUG
    ]
    assert loud == []


# ---------------------------------------------------------------- dead receivers


def _link(pid: int) -> Any:
    """This process's connection to ``pid`` (``None`` if there is none)."""
    return _sender._links.by_pid.get(pid)


def test_receiver_killed_while_a_sender_is_blocked(kids: Kids, runtime_dir: str) -> None:
    max_queue = 1
    release = multiprocessing.get_context("fork").Event()
    child = kids.start(peers.hold_mailbox, runtime_dir, me(), max_queue, release)
    assert mproc.receive("ready", timeout=WAIT).data == child.pid
    child_socket = peers.mailbox_path(runtime_dir, child.pid)
    sent: list[int] = []

    def flood() -> None:
        for i in range(200):
            mproc.send(child.pid, bytes(MiB), timeout=60)
            sent.append(i)

    def blocked() -> bool:
        # Out of credit, and every send() that wrote its frame has returned:
        # the next one waits for credit the receiver (its queue full) never gives.
        link = _link(child.pid)
        if link is None:
            return False
        seq = link.seqs.get(b"", 0)
        return seq >= link.limits.get(b"", link.window) and len(sent) == seq

    threads, errors = peers.start_threads([flood])
    peers.wait_for(blocked, "the sender to run out of credit")
    window = _link(child.pid).window
    assert window == min(rt.DEFAULT_WINDOW, max_queue)  # announced in the receiver's HELLO
    # The receiver holds at most max_queue + window messages of one connection.
    assert max_queue <= len(sent) <= max_queue + window
    try:
        start = time.monotonic()
        kids.kill(child)
        peers.join_all(threads)
        assert time.monotonic() - start < 3, "the blocked send() did not fail promptly"
        assert len(sent) <= max_queue + window
        assert len(errors) == 1
        err = errors[0]
        # The connection broke under the waiting send(): the receiver went away
        # (MailboxGone), or was gone altogether by the time send() tried to
        # reconnect (NoSuchProcess). Never a handshake or key problem.
        assert type(err) in (mproc.MailboxGone, mproc.NoSuchProcess), repr(err)
        assert err.pid == child.pid
        assert f"PID {child.pid}" in str(err)
        assert _link(child.pid) is None
        # Later sends fail at once.
        start = time.monotonic()
        with pytest.raises(mproc.NoSuchProcess, match=f"PID {child.pid}"):
            mproc.send(child.pid, "x", timeout=30)
        assert time.monotonic() - start < 1
    finally:
        # The killed receiver left its socket file; the next look for stale files takes it.
        removed = rt.remove_stale(rt.runtime())
    assert child_socket in removed


def test_receiver_dies_while_a_sender_waits_for_it_to_open(
    spawner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = spawner.popen(["sleep", "60"])
    lookups = peers.count_lookups(monkeypatch, proc.pid)
    threads, errors = peers.start_threads([lambda: mproc.send(proc.pid, "x", timeout=30)])
    assert lookups.acquire(timeout=WAIT)
    assert lookups.acquire(timeout=WAIT)
    start = time.monotonic()
    proc.kill()
    proc.wait(WAIT)
    peers.join_all(threads)
    assert time.monotonic() - start < 2
    assert len(errors) == 1
    assert isinstance(errors[0], mproc.NoSuchProcess)
    assert str(proc.pid) in str(errors[0])


# ---------------------------------------------------------------- stale and impostor sockets


def test_stale_socket_files_are_removed_at_open(spawner: Any, runtime_dir: str) -> None:
    gone = spawner.popen(["true"])
    gone.wait(WAIT)
    live = spawner.popen(["sleep", "60"])
    token = rt.proc_identity(live.pid)
    assert token is not None
    dead_file = os.path.join(runtime_dir, f"{gone.pid}.12345.sock")
    wrong_token = os.path.join(runtime_dir, f"{live.pid}.{int(token) + 1}.sock")
    right_token = os.path.join(runtime_dir, f"{live.pid}.{token}.sock")
    other_file = os.path.join(runtime_dir, "notes.txt")
    for path in (dead_file, wrong_token, right_token):
        stale_socket(path)
    with open(other_file, "w") as f:
        f.write("not a socket\n")
    try:
        mproc.open_mailbox()
        assert not os.path.exists(dead_file)
        assert not os.path.exists(wrong_token)
        # A live process may still open it: not ours to judge, so it stays.
        assert os.path.exists(right_token)
        assert os.path.exists(other_file)
    finally:
        os.unlink(right_token)
    assert os.path.exists(peers.mailbox_path(runtime_dir, me()))


def test_socket_file_of_a_killed_process_is_removed(kids: Kids, runtime_dir: str) -> None:
    release = multiprocessing.get_context("fork").Event()
    child = kids.start(peers.hold_mailbox, runtime_dir, me(), 10, release)
    assert mproc.receive("ready", timeout=WAIT).data == child.pid
    path = peers.mailbox_path(runtime_dir, child.pid)
    kids.kill(child)
    assert os.path.exists(path)  # SIGKILL leaves it behind
    with pytest.raises(mproc.NoSuchProcess):
        mproc.send(child.pid, "x", timeout=30)
    mproc.close_mailbox()
    mproc.open_mailbox()
    assert not os.path.exists(path)


def test_stale_file_at_the_right_path_gives_way_to_the_new_mailbox(
    kids: Kids, runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mproc.open_mailbox()
    go = multiprocessing.get_context("fork").Event()
    child = kids.start(peers.open_when_told, runtime_dir, me(), go)
    token = rt.proc_identity(child.pid)
    assert token is not None
    stale = rt.socket_path(rt.runtime(), child.pid, token)
    stale_socket(stale)
    lookups = peers.count_lookups(monkeypatch, child.pid)
    threads, errors = peers.start_threads([lambda: mproc.send(child.pid, "hi", timeout=WAIT)])
    # The stale file refuses connections: the sender keeps waiting for the real mailbox.
    assert lookups.acquire(timeout=WAIT)
    assert lookups.acquire(timeout=WAIT)
    go.set()
    peers.join_all(threads)
    assert errors == []
    echoed = mproc.receive("echo", timeout=WAIT)
    assert (echoed.sender_pid, echoed.data) == (child.pid, (me(), "hi"))
    assert kids.finish(child) == 0


def test_impostor_listener_is_refused(spawner: Any) -> None:
    victim = spawner.popen(["sleep", "60"])
    token = rt.proc_identity(victim.pid)
    assert token is not None
    path = rt.socket_path(rt.runtime(), victim.pid, token)
    # Another process (this one) listens on the victim's mailbox path.
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        impostor.bind(path)
        impostor.listen(5)
        start = time.monotonic()
        with pytest.raises(mproc.HandshakeError) as info:
            mproc.send(victim.pid, "secret", timeout=2)
        assert time.monotonic() - start < 2 + 1
        err = info.value
        assert type(err) is mproc.HandshakeError
        assert (err.pid, err.path) == (victim.pid, path)
        assert f"PID {victim.pid}" in str(err)
        # The kernel names the listener (this process), not the victim.
        assert f"held by PID {me()}" in str(err)
        assert path in str(err)
        # Nothing was sent to the impostor.
        impostor.settimeout(0)
        try:
            conn, _ = impostor.accept()
        except BlockingIOError:
            pass
        else:
            with conn:
                assert peers.read_until_eof(conn) == b""
    finally:
        impostor.close()
        os.unlink(path)


def test_listener_with_a_wrong_token_is_never_used(spawner: Any, runtime_dir: str) -> None:
    victim = spawner.popen(["sleep", "60"])
    token = rt.proc_identity(victim.pid)
    assert token is not None
    path = os.path.join(runtime_dir, f"{victim.pid}.{int(token) - 1}.sock")
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        impostor.bind(path)
        impostor.listen(5)
        with pytest.raises(mproc.MailboxNotFound, match=f"PID {victim.pid}"):
            mproc.send(victim.pid, "secret", timeout=0.3)
        impostor.settimeout(0)
        with pytest.raises(BlockingIOError):
            impostor.accept()
    finally:
        impostor.close()
        os.unlink(path)


def test_close_after_the_socket_file_was_removed(runtime_dir: str) -> None:
    # A cleaner (or multiprocessing's exit hook in a spawned child) may remove
    # the file first; closing must still be quick and quiet.
    mproc.open_mailbox()
    os.unlink(peers.mailbox_path(runtime_dir, me()))
    start = time.monotonic()
    mproc.close_mailbox()
    assert time.monotonic() - start < 2


# ---------------------------------------------------------------- fork during a handshake

_FORK_DURING_HANDSHAKE = textwrap.dedent(
    """
    import os, select, signal, threading
    import mproc
    from mproc import _wire

    progress = threading.Event()
    release = threading.Event()
    real_verify = _wire.verify
    paused = []

    def slow_verify(key, message, response):
        # The first check outside the main thread is the mailbox's admission
        # thread checking the first sender's answer: it stays in the middle of
        # that handshake (and the sender thread in its own) until we forked.
        if threading.current_thread() is not threading.main_thread() and not progress.is_set():
            paused.append(threading.current_thread().name)
            progress.set()
            release.wait(10)
        return real_verify(key, message, response)

    _wire.verify = slow_verify
    mproc.open_mailbox()
    me = os.getpid()

    def first_send():
        try:
            mproc.send(me, "first", timeout=10)
        finally:
            progress.set()

    sender = threading.Thread(target=first_send)
    sender.start()
    progress.wait(10)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            mproc.send(me, "from the child", timeout=5)
            code = 0
        finally:
            os._exit(code)
    release.set()
    sender.join(10)
    fd = os.pidfd_open(pid)
    exited = select.select([fd], [], [], 5)[0]
    if not exited:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    print("paused in", *paused)
    print("child", "exited" if exited else "hung", os.waitstatus_to_exitcode(status))
    print("got", sorted(mproc.receive(timeout=5).data for _ in range(1 + bool(exited))))
    """
)


def test_fork_while_a_mailbox_thread_handshakes(spawner: Any) -> None:
    proc = spawner.popen(
        [sys.executable, "-c", _FORK_DURING_HANDSHAKE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.splitlines() == [
        "paused in mproc-mailbox-admission",
        "child exited 0",
        "got ['first', 'from the child']",
    ], err
