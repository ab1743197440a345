"""Mailbox robustness (SPEC §5): hostile and broken peers, dead receivers, stale
and impostor socket files.

Every misbehaving peer may cost only its own connection: each test ends by
checking that the mailbox still serves a normal sender (a fresh child process).
Crafted frames are written on connections that passed the real handshake
(``mproc._transport.connect``); the frame format is multiprocessing's length
prefix around ``u8 kind | u16 len(group) | group | pickle``.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import random
import socket
import struct
import subprocess
import sys
import termios
import textwrap
import time
from multiprocessing import connection as mpc
from typing import Any

import mailbox_peers as peers
import pytest
from mailbox_peers import WAIT, Kids, frame, me, wire

import mproc
from mproc import _mailbox
from mproc import _transport as tr

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-specific checks"),
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),
]

MiB = 1 << 20


def assert_serving(kids: Kids, rundir: str) -> None:
    """A normal sender (a new process, so a new connection) still gets through, promptly."""
    start = time.monotonic()
    child = kids.start(peers.send_hello, rundir, me(), "alive")
    msg = mproc.receive("alive", timeout=WAIT)
    assert (msg.sender_pid, msg.data) == (child.pid, ("hello", child.pid))
    assert kids.finish(child) == 0
    assert time.monotonic() - start < 3, "the mailbox served a normal sender only slowly"
    mproc.send(me(), "self too", "alive")
    assert mproc.receive("alive", timeout=WAIT).data == "self too"


def assert_nothing(group: str = "", timeout: float = 0.3) -> None:
    with pytest.raises(mproc.ReceiveTimeout):
        got = mproc.receive(group, timeout=timeout)
        pytest.fail(f"unexpected message {got!r}")


def raw_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(path)
    return sock


def stale_socket(path: str) -> None:
    """Leave a real AF_UNIX socket file behind, as a process killed with it open would."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)


# ---------------------------------------------------------------- before the handshake

_rng = random.Random(1234)
GARBAGE = {
    "random": _rng.randbytes(4096),
    "http": b"GET / HTTP/1.1\r\nHost: mproc\r\n\r\n",
    "huge-length": struct.pack("!i", 0x7FFFFFFF) + b"x" * 64,
    "64bit-length": struct.pack("!i", -1) + struct.pack("!Q", 1 << 60),
    "negative-length": struct.pack("!i", -7) + b"abc",
    "short-length": struct.pack("!i", 100) + b"only ten b",
    "a-frame": wire(frame("", "no handshake")),
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
    kids: Kids, runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tr, "HANDSHAKE_TIMEOUT", 0.3)
    mproc.open_mailbox()
    with raw_connect(peers.mailbox_path(runtime_dir, me())) as sock:
        start = time.monotonic()
        challenge = peers.read_until_eof(sock)
        assert time.monotonic() - start < 0.3 + 3
    assert challenge.startswith(struct.pack("!i", len(challenge) - 4))
    assert_serving(kids, runtime_dir)


def test_client_with_the_wrong_key_is_refused(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    path = peers.mailbox_path(runtime_dir, me())
    with pytest.raises((multiprocessing.AuthenticationError, EOFError, ConnectionResetError)):
        conn = mpc.Client(path, family="AF_UNIX", authkey=b"not the key" * 3)
        conn.close()
    assert_nothing()
    assert_serving(kids, runtime_dir)


def test_sender_with_the_wrong_key_gets_a_clear_error(
    kids: Kids, runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mproc.open_mailbox()
    path = peers.mailbox_path(runtime_dir, me())
    with monkeypatch.context() as patch:
        patch.setattr(tr, "runtime", lambda: tr.Runtime(runtime_dir, b"k" * 32))
        with pytest.raises(mproc.MailboxError) as info:
            mproc.send(me(), "x", timeout=2)
    err = info.value
    assert (err.pid, err.path) == (me(), path)
    assert f"PID {me()}" in str(err)
    assert path in str(err)
    assert "handshake" in str(err)
    assert_nothing()
    assert_serving(kids, runtime_dir)


# ---------------------------------------------------------------- bad frames after the handshake


def _oversized_frames() -> dict[str, bytes]:
    empty_head = struct.pack("!BH", 0, 0)
    return {
        "whole": wire(frame("", b"x" * 10_000)),
        "header-32": struct.pack("!i", (1 << 30) + 1) + empty_head,
        "header-64": struct.pack("!i", -1) + struct.pack("!Q", 1 << 40) + empty_head,
        "too-small": struct.pack("!i", 2) + empty_head,
        "group-longer-than-frame": struct.pack("!i", 10) + struct.pack("!BH", 0, 100) + b"g" * 7,
    }


@pytest.mark.parametrize("kind", list(_oversized_frames()))
def test_frame_with_a_bad_size_is_refused(kids: Kids, runtime_dir: str, kind: str) -> None:
    mproc.open_mailbox(max_frame=4096)
    conn = peers.authed(me())
    try:
        # Only the header is sent for most: the mailbox must judge it without the body.
        os.write(conn.fileno(), _oversized_frames()[kind])
        assert peers.is_dropped(conn), "the mailbox kept a connection that sent a bad frame"
    finally:
        conn.close()
    assert_nothing()
    assert_serving(kids, runtime_dir)


@pytest.mark.parametrize("extra", [0, 1], ids=["at-limit", "one-over"])
def test_frame_size_limit_is_exact(kids: Kids, runtime_dir: str, extra: int) -> None:
    mproc.open_mailbox(max_frame=4096)
    overhead = len(frame("", b"y" * 3000)) - 3000  # constant for these sizes
    blob = b"y" * (4096 + extra - overhead)
    body = frame("", blob)
    assert len(body) == 4096 + extra
    conn = peers.authed(me())
    try:
        conn.send_bytes(body)
        if extra:
            assert peers.is_dropped(conn)
            assert_nothing()
        else:
            msg = mproc.receive(timeout=WAIT)
            assert (msg.sender_pid, msg.data) == (me(), blob)
    finally:
        conn.close()
    assert_serving(kids, runtime_dir)


def test_send_over_the_receivers_frame_limit_is_not_silently_lost() -> None:
    # "When send() returns, the receiving process holds the message": a frame
    # the receiver refuses must make send() fail, not vanish.
    mproc.open_mailbox(max_frame=4096)
    try:
        mproc.send(me(), b"x" * 10_000, "big", timeout=2)
    except mproc.MprocError as err:
        assert f"PID {me()}" in str(err)
        return
    msg = mproc.receive("big", timeout=2)
    assert msg.data == b"x" * 10_000


def test_truncated_frame(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    conn = peers.authed(me())
    data = wire(frame("t", "complete")) + wire(frame("t", "cut " * 100))
    os.write(conn.fileno(), data[: len(data) - 200])
    conn.close()
    msg = mproc.receive("t", timeout=WAIT)
    assert (msg.sender_pid, msg.data) == (me(), "complete")
    assert_nothing("t")
    assert_serving(kids, runtime_dir)


def test_truncated_large_frame(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    conn = peers.authed(me())
    data = wire(frame("t", b"z" * (3 * MiB)))
    peers.write_all(conn.fileno(), data[: 2 * MiB])
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
        first = wire(frame("stall", "first"))
        second = wire(frame("stall", "second " * 20))
        os.write(conn.fileno(), first + second[:cut])
        assert mproc.receive("stall", timeout=WAIT).data == "first"
        # Others are served while this peer sits in the middle of a frame...
        assert_serving(kids, runtime_dir)
        # ...and when it goes on, its frame arrives whole.
        os.write(conn.fileno(), second[cut:])
        msg = mproc.receive("stall", timeout=WAIT)
        assert (msg.sender_pid, msg.data) == (me(), "second " * 20)
    finally:
        conn.close()


def test_invalid_group_encoding_drops_the_connection(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    conn = peers.authed(me())
    try:
        conn.send_bytes(peers.frame_with_raw_group(b"\xff\xfe", "bad group"))
        assert peers.is_dropped(conn)
    finally:
        conn.close()
    assert_serving(kids, runtime_dir)


def test_frames_before_a_bad_one_are_delivered() -> None:
    # Like a truncated frame, a malformed one costs the connection, not the
    # messages that came whole before it (their send() returned).
    mproc.open_mailbox()
    conn = peers.authed(me())
    try:
        good = wire(frame("g", "good"))
        bad = wire(peers.frame_with_raw_group(b"\xff\xfe", "bad group"))
        os.write(conn.fileno(), good + bad)  # one write: one read on the other side
        assert peers.is_dropped(conn)
    finally:
        conn.close()
    assert mproc.receive("g", timeout=2).data == "good"


def test_unknown_frame_kind_drops_only_that_connection(
    kids: Kids, runtime_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    mproc.open_mailbox()
    conn = peers.authed(me())
    try:
        with caplog.at_level(logging.DEBUG, logger="mproc"):
            good = wire(frame("k", "good"))
            unknown = wire(struct.pack("!BH", 7, 1) + b"k" + b"payload")
            os.write(conn.fileno(), good + unknown)
            assert peers.is_dropped(conn)
    finally:
        conn.close()
    assert mproc.receive("k", timeout=2).data == "good"
    assert any("unknown frame kind 7" in r.getMessage() for r in caplog.records)
    assert_nothing("k")
    assert_serving(kids, runtime_dir)


def test_payload_that_is_not_a_pickle(kids: Kids, runtime_dir: str) -> None:
    mproc.open_mailbox()
    conn = peers.authed(me())
    try:
        conn.send_bytes(frame("p", payload=b"\x80\x05 certainly not a pickle"))
        conn.send_bytes(frame("p", "next"))
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
        with pytest.raises((multiprocessing.AuthenticationError, EOFError)):
            mpc.Client(path, family="AF_UNIX", authkey=b"wrong" * 8).close()
        return
    conn = peers.authed(me())
    try:
        if kind == "oversized":
            os.write(conn.fileno(), struct.pack("!i", (1 << 30) + 1) + struct.pack("!BH", 0, 0))
            assert peers.is_dropped(conn)
        elif kind == "bad-group":
            conn.send_bytes(peers.frame_with_raw_group(b"\xff", "x"))
            assert peers.is_dropped(conn)
        else:  # truncated
            os.write(conn.fileno(), wire(frame("", "cut"))[:-3])
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


def _unsent_bytes(pid: int) -> int:
    """Bytes written to our connection to ``pid`` that its reader has not taken yet."""
    link = _mailbox._state.links.get((pid, ""))
    if link is None:
        return 0
    raw = fcntl.ioctl(link.fd, termios.TIOCOUTQ, struct.pack("i", 0))  # SIOCOUTQ
    return int(struct.unpack("i", raw)[0])


def test_receiver_killed_while_a_sender_is_blocked(kids: Kids, runtime_dir: str) -> None:
    release = multiprocessing.get_context("fork").Event()
    child = kids.start(peers.hold_mailbox, runtime_dir, me(), 1, release)
    assert mproc.receive("ready", timeout=WAIT).data == child.pid
    child_socket = peers.mailbox_path(runtime_dir, child.pid)
    sent: list[int] = []

    def flood() -> None:
        for i in range(200):
            mproc.send(child.pid, bytes(MiB), timeout=60)
            sent.append(i)

    threads, errors = peers.start_threads([flood])
    # The receiver stopped reading (its queue is full) and our socket buffer filled up.
    peers.wait_for(lambda: _unsent_bytes(child.pid) >= 100_000, "the sender to block")
    start = time.monotonic()
    kids.kill(child)
    peers.join_all(threads)
    assert time.monotonic() - start < 3, "the blocked send() did not fail promptly"
    assert len(sent) < 200
    assert len(errors) == 1
    err = errors[0]
    assert isinstance(err, (mproc.MailboxError, mproc.NoSuchProcess)), repr(err)
    assert str(child.pid) in str(err)
    # Later sends fail at once.
    start = time.monotonic()
    with pytest.raises((mproc.NoSuchProcess, mproc.MailboxError), match=str(child.pid)):
        mproc.send(child.pid, "x", timeout=30)
    assert time.monotonic() - start < 1
    # The killed receiver left its socket file; the next look for stale files takes it.
    assert child_socket in tr.remove_stale(tr.runtime())


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
    token = tr.proc_identity(live.pid)
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
    token = tr.proc_identity(child.pid)
    assert token is not None
    stale = tr.socket_path(tr.runtime(), child.pid, token)
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
    token = tr.proc_identity(victim.pid)
    assert token is not None
    path = tr.socket_path(tr.runtime(), victim.pid, token)
    # Another process (this one) listens on the victim's mailbox path.
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        impostor.bind(path)
        impostor.listen(5)
        start = time.monotonic()
        with pytest.raises(mproc.MailboxError) as info:
            mproc.send(victim.pid, "secret", timeout=2)
        assert time.monotonic() - start < 2 + 1
        err = info.value
        assert err.pid == victim.pid
        assert f"PID {victim.pid}" in str(err)
        if not isinstance(err, mproc.MailboxNotFound):
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
    token = tr.proc_identity(victim.pid)
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

_FORK_DURING_IMPORT = textwrap.dedent(
    """
    import importlib.machinery, os, select, signal, sys, threading
    import mproc

    progress = threading.Event()
    release = threading.Event()

    class SlowLoader:
        def __init__(self, real):
            self.real = real

        def create_module(self, spec):
            return self.real.create_module(spec)

        def exec_module(self, module):
            progress.set()
            release.wait(10)
            self.real.exec_module(module)

    class SlowImport:
        # The first import of hmac in a mailbox thread (the handshake) holds
        # hmac's module lock until the main thread has forked.
        def find_spec(self, name, path=None, target=None):
            if name != "hmac" or threading.current_thread() is threading.main_thread():
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            spec.loader = SlowLoader(spec.loader)
            return spec

    sys.meta_path.insert(0, SlowImport())
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
        try:
            mproc.send(me, "from the child", timeout=5)
        finally:
            os._exit(0)
    release.set()
    sender.join(10)
    fd = os.pidfd_open(pid)
    exited = select.select([fd], [], [], 5)[0]
    if not exited:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    print("child", "exited" if exited else "hung", os.waitstatus_to_exitcode(status))
    print("got", sorted(mproc.receive(timeout=5).data for _ in range(1 + bool(exited))))
    """
)


def test_fork_while_a_mailbox_thread_handshakes(spawner: Any) -> None:
    proc = spawner.popen(
        [sys.executable, "-c", _FORK_DURING_IMPORT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["child exited 0", "got ['first', 'from the child']"], err
