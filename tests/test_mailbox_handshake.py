"""The pipelined handshake and the cheaper connect of a new sender (issue 13, the burst row).

A sender writes its challenge right behind its answer to the mailbox's
challenge; the mailbox answers that challenge only once it has checked the
answer, and writes its verdict and its answer together. These tests play the
sender's side by hand (every frame built with :mod:`mproc._wire`) and check
what the mailbox writes back: nothing an unauthenticated peer could use, and
nothing unpickled before the key and the uid have both been checked.
"""

from __future__ import annotations

import hmac
import os
import socket
import stat
import sys
import threading
import time
from typing import Any, Callable

import mailbox_peers as peers
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mailbox_peers import WAIT, Kids, me, msg_frame, raw_connect

import mproc
from mproc import _mailbox, _sender
from mproc import _runtime as rt
from mproc import _wire as wire

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-specific checks"),
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),
]


class _Marker:
    """Unpickling this creates a directory: proof that a payload was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.mkdir, (self.path,))


def _receiver() -> Any:
    mproc.open_mailbox()
    r = _mailbox._state.receiver
    assert r is not None
    return r


def _assert_serving(kids: Kids, rundir: str) -> None:
    child = kids.start(peers.send_hello, rundir, me(), "alive")
    msg = mproc.receive("alive", timeout=WAIT)
    assert (msg.sender_pid, msg.data) == (child.pid, ("hello", child.pid))
    assert kids.finish(child) == 0


# ---------------------------------------------------------------- HMAC


@given(st.binary(max_size=200), st.binary(max_size=300))
def test_hmac_sha256_is_rfc2104_hmac(key: bytes, message: bytes) -> None:
    assert wire.hmac_sha256(key, message) == hmac.digest(key, message, "sha256")


def test_answer_is_the_multiprocessing_response() -> None:
    # What multiprocessing.connection's answer_challenge() computes for a
    # {sha256} challenge: HMAC over everything after #CHALLENGE#, prefixed.
    key = os.urandom(32)
    message = wire.challenge()
    body = message[len(wire.CHALLENGE) :]
    assert wire.answer(key, message) == b"{sha256}" + hmac.new(key, body, "sha256").digest()
    assert wire.verify(key, message, wire.answer(key, message))
    assert not wire.verify(os.urandom(32), message, wire.answer(key, message))


# ---------------------------------------------------------------- the pipelined order


def test_pipelined_answer_and_challenge_get_verdict_and_answer_together(runtime_dir: str) -> None:
    _receiver()
    key = rt.runtime().key
    with raw_connect(peers.mailbox_path(runtime_dir, me())) as sock:
        mine = wire.challenge()
        sock.sendall(wire.frame(wire.answer(key, peers.read_frame(sock))) + wire.frame(mine))
        assert peers.read_frame(sock) == wire.WELCOME
        assert wire.verify(key, mine, peers.read_frame(sock))
        sock.sendall(wire.frame(wire.WELCOME) + wire.hello())
        version, _max_frame, window, _epoch = wire.parse_hello(peers.read_frame(sock))
        assert version == wire.PROTOCOL and window >= 1
        sock.sendall(msg_frame("pipelined", "first"))
        msg = mproc.receive("pipelined", timeout=WAIT)
    assert (msg.sender_pid, msg.data) == (me(), "first")


def test_a_wrong_answer_gets_no_answer_to_the_challenge_behind_it(runtime_dir: str) -> None:
    # The mailbox must not be an HMAC oracle: a peer without the key that
    # pipelines its challenge behind a wrong answer learns only FAILURE.
    _receiver()
    with raw_connect(peers.mailbox_path(runtime_dir, me())) as sock:
        theirs = peers.read_frame(sock)
        forged = wire.answer(b"not the key".ljust(32, b"!"), theirs)
        sock.sendall(wire.frame(forged) + wire.frame(wire.challenge()))
        assert peers.read_until_eof(sock) == wire.frame(wire.FAILURE)


def test_a_replayed_handshake_is_refused_and_nothing_unpickled(
    kids: Kids, runtime_dir: str
) -> None:
    # Record a whole, successful session of a real sender's bytes (answer,
    # challenge, verdict, HELLO, a message), then play it back on new
    # connections: each gets a fresh challenge, so the recorded answer fails.
    _receiver()
    key = rt.runtime().key
    marker = os.path.join(runtime_dir, "unpickled")
    path = peers.mailbox_path(runtime_dir, me())
    with raw_connect(path) as sock:
        mine = wire.challenge()
        first = wire.frame(wire.answer(key, peers.read_frame(sock))) + wire.frame(mine)
        sock.sendall(first)
        assert peers.read_frame(sock) == wire.WELCOME
        assert wire.verify(key, mine, peers.read_frame(sock))
        second = wire.frame(wire.WELCOME) + wire.hello() + msg_frame("", "recorded")
        sock.sendall(second)
        wire.parse_hello(peers.read_frame(sock))
        assert mproc.receive(timeout=WAIT).data == "recorded"
    evil = msg_frame("", _Marker(marker))
    for replay in (first, first + second, first + wire.frame(wire.WELCOME) + wire.hello() + evil):
        with raw_connect(path) as sock:
            challenge = peers.read_frame(sock)
            assert challenge.startswith(wire.CHALLENGE)
            try:
                sock.sendall(replay)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before it was all written: fine
            assert peers.read_until_eof(sock) == wire.frame(wire.FAILURE)
    with pytest.raises(mproc.ReceiveTimeout):
        mproc.receive(timeout=0.3)
    assert not os.path.exists(marker)
    _assert_serving(kids, runtime_dir)


def test_a_replayed_answer_to_the_mailbox_challenge_is_not_an_answer_to_ours(
    runtime_dir: str,
) -> None:
    # The mailbox's answer to a sender's challenge proves the key to that
    # sender only: a fake mailbox that relays it to another connection's
    # challenge gets nowhere (the nonces differ).
    _receiver()
    key = rt.runtime().key
    path = peers.mailbox_path(runtime_dir, me())
    with raw_connect(path) as a, raw_connect(path) as b:
        challenge_a = peers.read_frame(a)
        challenge_b = peers.read_frame(b)
        assert challenge_a != challenge_b
        # b's challenge is fresh: a's (correct) answer is no answer to it.
        assert not wire.verify(key, challenge_b, wire.answer(key, challenge_a))
        b.sendall(wire.frame(wire.answer(key, challenge_a)) + wire.frame(wire.challenge()))
        assert peers.read_until_eof(b) == wire.frame(wire.FAILURE)


def test_a_peer_stalling_after_its_pipelined_flight_is_dropped(
    kids: Kids, runtime_dir: str
) -> None:
    r = _receiver()
    threads = threading.active_count()
    r.admission.timeout = 0.3  # for connections accepted from now on
    key = rt.runtime().key
    with raw_connect(peers.mailbox_path(runtime_dir, me())) as sock:
        mine = wire.challenge()
        sock.sendall(wire.frame(wire.answer(key, peers.read_frame(sock))) + wire.frame(mine))
        assert peers.read_frame(sock) == wire.WELCOME
        assert wire.verify(key, mine, peers.read_frame(sock))
        # No verdict, no HELLO: dropped at the deadline of the whole handshake.
        assert peers.read_until_eof(sock) == b""
    assert r.admission.pending == {}
    assert threading.active_count() == threads
    _assert_serving(kids, runtime_dir)


def test_a_shorter_deadline_accepted_later_expires_first(kids: Kids, runtime_dir: str) -> None:
    # Deadlines are kept in a heap: a connection accepted after the timeout was
    # lowered is dropped at its own deadline, not after an older, longer one.
    r = _receiver()
    path = peers.mailbox_path(runtime_dir, me())
    with raw_connect(path) as slow:
        assert peers.read_frame(slow).startswith(wire.CHALLENGE)  # accepted, 5 s deadline
        assert len(r.admission.pending) == 1
        r.admission.timeout = 0.3
        with raw_connect(path) as fast:
            assert peers.read_frame(fast).startswith(wire.CHALLENGE)
            assert peers.read_until_eof(fast) == b""
        assert len(r.admission.pending) == 1  # the slow one only
        slow.settimeout(0.0)
        with pytest.raises(BlockingIOError):
            slow.recv(1)  # still open: its own deadline has not come
    peers.wait_for(lambda: not r.admission.pending, "the slow peer's hang-up to be seen")
    _assert_serving(kids, runtime_dir)


# ---------------------------------------------------------------- the sender's side


def _fake_mailbox(
    runtime: rt.Runtime, after_hello: bytes, done: list[BaseException]
) -> tuple[socket.socket, threading.Thread]:
    """A listener at this process's own socket path; its thread plays the mailbox once.

    It writes its HELLO and ``after_hello`` in one write, then waits for the
    sender to hang up.
    """
    path = rt.socket_path(runtime, me(), rt.proc_identity(me()) or "0")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(WAIT)

    def play() -> None:
        try:
            sock, _ = listener.accept()
            with sock:
                sock.settimeout(WAIT)
                mine = wire.challenge()
                sock.sendall(wire.frame(mine))
                assert wire.verify(runtime.key, mine, peers.read_frame(sock))
                reply = wire.frame(wire.WELCOME)
                reply += wire.frame(wire.answer(runtime.key, peers.read_frame(sock)))
                sock.sendall(reply)
                assert peers.read_frame(sock) == wire.WELCOME
                wire.parse_hello(peers.read_frame(sock))
                sock.sendall(wire.hello(rt.DEFAULT_MAX_FRAME, 4) + after_hello)
                peers.read_until_eof(sock)
        except BaseException as err:  # reported to the test
            done.append(err)

    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize("tail", [b"", b"\0\0"])
def test_credit_read_together_with_the_hello_is_taken(runtime_dir: str, tail: bytes) -> None:
    # A reader may send CREDIT right behind the HELLO (a reconnect carrying
    # credit over): the sender's handshake reads ahead, and must not lose it.
    runtime = rt.runtime()
    errors: list[BaseException] = []
    listener, thread = _fake_mailbox(runtime, wire.credit(b"g", 5000) + tail, errors)
    path = listener.getsockname()
    try:
        link = _sender._connect(me(), _deadline())
        try:
            assert link.window == 4
            assert link.limits[b"g"] == 5000
            assert bytes(link.inbuf) == tail  # the start of a frame still to come
        finally:
            link.close()
        thread.join(WAIT)
        assert not thread.is_alive()
        assert errors == []
    finally:
        listener.close()
        os.unlink(path)


def test_garbage_behind_the_hello_is_a_handshake_error(runtime_dir: str) -> None:
    runtime = rt.runtime()
    errors: list[BaseException] = []
    unknown = wire.frame(wire.HEAD.pack(99, 0, 0) + b"?")  # a frame of no kind we know
    listener, thread = _fake_mailbox(runtime, unknown, errors)
    path = listener.getsockname()
    try:
        with pytest.raises(mproc.HandshakeError) as info:
            _sender._connect(me(), _deadline())
        assert f"PID {me()}" in str(info.value)
        assert "after its HELLO" in str(info.value)
        thread.join(WAIT)
        assert not thread.is_alive()
        assert errors == []
    finally:
        listener.close()
        os.unlink(path)


def _scripted_mailbox(
    runtime: rt.Runtime, script: Callable[[socket.socket], None], done: list[BaseException]
) -> tuple[socket.socket, str, threading.Thread]:
    """A listener at this process's own socket path; its thread runs ``script`` on one peer."""
    path = rt.socket_path(runtime, me(), rt.proc_identity(me()) or "0")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(WAIT)

    def play() -> None:
        try:
            sock, _ = listener.accept()
            with sock:
                sock.settimeout(WAIT)
                script(sock)
        except BaseException as err:  # reported to the test
            done.append(err)

    thread = threading.Thread(target=play, daemon=True)
    thread.start()
    return listener, path, thread


def _not_a_challenge(sock: socket.socket) -> None:
    sock.sendall(wire.frame(b"#NOT A CHALLENGE#" + bytes(40)))
    peers.read_until_eof(sock)


def _wrong_answer_to_ours(sock: socket.socket) -> None:
    key = rt.runtime().key
    mine = wire.challenge()
    sock.sendall(wire.frame(mine))
    assert wire.verify(key, mine, peers.read_frame(sock))
    theirs = peers.read_frame(sock)  # right behind its answer
    assert theirs.startswith(wire.CHALLENGE)
    forged = wire.answer(b"not the key".ljust(32, b"!"), theirs)
    sock.sendall(wire.frame(wire.WELCOME) + wire.frame(forged))
    # Its verdict, and nothing of a HELLO or a message after it.
    assert peers.read_until_eof(sock) == wire.frame(wire.FAILURE)


@pytest.mark.parametrize(
    ("script", "words"),
    [(_not_a_challenge, "no valid challenge"), (_wrong_answer_to_ours, "does not know our key")],
)
def test_the_sender_refuses_a_mailbox_that_fails_the_handshake(
    runtime_dir: str, script: Callable[[socket.socket], None], words: str
) -> None:
    errors: list[BaseException] = []
    listener, path, thread = _scripted_mailbox(rt.runtime(), script, errors)
    try:
        with pytest.raises(mproc.HandshakeError) as info:
            _sender._connect(me(), _deadline())
        assert words in str(info.value)
        assert f"PID {me()}" in str(info.value) and path in str(info.value)
        thread.join(WAIT)
        assert not thread.is_alive()
        assert errors == []
    finally:
        listener.close()
        os.unlink(path)


def _deadline() -> float:
    return time.monotonic() + WAIT


# ---------------------------------------------------------------- the runtime directory


def test_runtime_dir_is_checked_again_at_every_connect(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fast path (one lstat) must refuse what the full checks refuse.
    path = os.path.join(runtime_dir, "again")
    monkeypatch.setenv(rt.ENV_RUNTIME_DIR, path)
    first = rt.runtime()
    assert rt.runtime() is first
    os.chmod(path, 0o777)
    try:
        with pytest.raises(mproc.UnsafeRuntimeDir) as info:
            rt.runtime()
        assert path in str(info.value) and "writable by others" in str(info.value)
    finally:
        os.chmod(path, 0o700)
    assert rt.runtime() is first
    # Replaced by another directory (a new inode): checked and keyed afresh.
    os.rename(path, path + ".old")
    try:
        os.symlink(path + ".old", path)
        with pytest.raises(mproc.UnsafeRuntimeDir) as info:
            rt.runtime()
        assert "symlink" in str(info.value)
        os.unlink(path)
        again = rt.runtime()
        assert again is not first
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700
    finally:
        for leftover in (os.path.join(path + ".old", "key"), os.path.join(path, "key")):
            if os.path.exists(leftover):
                os.unlink(leftover)
        os.rmdir(path + ".old")
        if os.path.isdir(path):
            os.rmdir(path)


def test_relative_runtime_dir_follows_the_working_directory(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(rt.ENV_RUNTIME_DIR, "rel")
    monkeypatch.chdir(runtime_dir)
    assert rt.runtime_dir() == os.path.join(runtime_dir, "rel")
    os.mkdir(os.path.join(runtime_dir, "sub"))
    monkeypatch.chdir(os.path.join(runtime_dir, "sub"))
    assert rt.runtime_dir() == os.path.join(runtime_dir, "sub", "rel")
    monkeypatch.setenv(rt.ENV_RUNTIME_DIR, runtime_dir + "/x/../y/")
    assert rt.runtime_dir() == os.path.join(runtime_dir, "y")


def test_identity_survives_a_command_name_with_spaces_and_parentheses(kids: Kids) -> None:
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    try:
        child = kids.start(_rename_self, r, w, go_r, go_w)
        os.close(w)
        w = -1
        before = rt.proc_identity(child.pid)
        assert before is not None
        os.write(go_w, b"g")
        assert os.read(r, 1) == b"r"  # renamed
        with open(f"/proc/{child.pid}/comm") as f:
            assert f.read().strip() == "a) b ( c"
        assert rt.proc_identity(child.pid) == before
        os.write(go_w, b"q")
        assert kids.finish(child) == 0
    finally:
        for fd in (r, w, go_r, go_w):
            if fd >= 0:
                os.close(fd)


def _rename_self(r: int, w: int, go_r: int, go_w: int) -> None:
    os.close(r)
    os.close(go_w)
    assert os.read(go_r, 1) == b"g"
    with open("/proc/self/comm", "w") as f:
        f.write("a) b ( c")
    os.write(w, b"r")
    os.read(go_r, 1)
