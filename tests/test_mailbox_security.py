"""Mailbox security (SPEC §5): the runtime directory, the key file, and who may
deliver.

Pickle runs code, so only the same user may deliver, and nothing is unpickled
before the HMAC handshake and the peer-uid check have both passed. Tests that
need a second Unix user fork a child that drops to ``nobody``; they run only
as root. Each runtime-directory test uses a fresh subdirectory of the test's
private runtime dir (the validated directory and key are cached per path).
"""

from __future__ import annotations

import hmac  # noqa: F401 - see _as_nobody
import json
import multiprocessing
import os
import signal
import socket
import stat
import sys
from typing import Any, Callable

import mailbox_peers as peers
import pytest
from mailbox_peers import WAIT, Kids, me, msg_frame, raw_connect

import mproc
from mproc import _runtime as rt
from mproc import _wire as wire

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-specific checks"),
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),
]

ROOT = os.geteuid() == 0
NOBODY = 65534
needs_root = pytest.mark.skipif(not ROOT, reason="needs root to act as a second user")


def use_dir(monkeypatch: pytest.MonkeyPatch, path: str) -> str:
    monkeypatch.setenv("MPROC_RUNTIME_DIR", path)
    return path


def assert_refused(path: str, *words: str) -> mproc.UnsafeRuntimeDir:
    with pytest.raises(mproc.UnsafeRuntimeDir) as info:
        mproc.open_mailbox()
    err = info.value
    assert type(err) is mproc.UnsafeRuntimeDir
    assert err.path == path
    assert path in str(err)
    for word in words:
        assert word in str(err)
    return err


# ---------------------------------------------------------------- the runtime directory


def test_runtime_dir_is_created_private(runtime_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = use_dir(monkeypatch, os.path.join(runtime_dir, "new"))
    old_umask = os.umask(0)  # even a permissive umask gives 0700
    try:
        mproc.open_mailbox()
    finally:
        os.umask(old_umask)
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.getuid()
    assert os.path.exists(peers.mailbox_path(path, me()))


def test_xdg_runtime_dir_is_used(runtime_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPROC_RUNTIME_DIR")
    xdg = os.path.join(runtime_dir, "xdg")
    os.mkdir(xdg, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)
    mproc.open_mailbox()
    assert stat.S_IMODE(os.lstat(os.path.join(xdg, "mproc")).st_mode) == 0o700
    assert os.path.exists(peers.mailbox_path(os.path.join(xdg, "mproc"), me()))


def test_runtime_dir_that_is_a_symlink(runtime_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.path.join(runtime_dir, "real")
    os.mkdir(real, 0o700)
    link = use_dir(monkeypatch, os.path.join(runtime_dir, "link"))
    os.symlink(real, link)
    assert_refused(link, "symlink")
    assert os.listdir(real) == []


def test_runtime_dir_that_is_a_file(runtime_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = use_dir(monkeypatch, os.path.join(runtime_dir, "file"))
    with open(path, "w") as f:
        f.write("not a directory")
    assert_refused(path, "not a directory")


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702, 0o1777], ids=oct)
def test_runtime_dir_writable_by_others(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    path = use_dir(monkeypatch, os.path.join(runtime_dir, "open"))
    os.mkdir(path)
    os.chmod(path, mode)
    assert_refused(path, "writable by others", "chmod 700")
    assert os.listdir(path) == []


@needs_root
def test_runtime_dir_owned_by_another_user(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = use_dir(monkeypatch, os.path.join(runtime_dir, "theirs"))
    os.mkdir(path, 0o700)
    os.chown(path, NOBODY, NOBODY)
    assert_refused(path, f"uid {NOBODY}")


def test_runtime_dir_too_long(monkeypatch: pytest.MonkeyPatch) -> None:
    path = use_dir(monkeypatch, "/tmp/" + "x" * 100)
    assert_refused(path, "too long", "MPROC_RUNTIME_DIR")
    assert not os.path.exists(path)
    with pytest.raises(mproc.UnsafeRuntimeDir, match="too long") as info:
        mproc.send(os.getppid(), "x", timeout=0)
    assert info.value.path == path


def test_runtime_dir_length_limit_is_exact(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "<dir>/<pid>.<start ticks>.sock" with 10 + 20 digits must fit in 107 bytes.
    longest_ok = 107 - len("/") - 10 - len(".") - 20 - len(".sock")
    fits = os.path.join(runtime_dir, "d" * (longest_ok - len(runtime_dir) - 1))
    assert len(fits) == longest_ok
    use_dir(monkeypatch, fits + "e")
    assert_refused(fits + "e", "too long")
    use_dir(monkeypatch, fits)
    mproc.open_mailbox()
    mproc.send(me(), "fits")
    assert mproc.receive(timeout=WAIT).data == "fits"


def test_deleted_runtime_dir_is_recreated(
    kids: Kids, runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Session clean-up (logout, tmp cleaners) may remove the directory under a
    # long-running process: its next mailbox must not fail for good.
    path = use_dir(monkeypatch, os.path.join(runtime_dir, "wiped"))
    mproc.open_mailbox()
    mproc.close_mailbox()
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)
    mproc.open_mailbox()
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700
    child = kids.start(peers.send_hello, path, me(), "again")
    assert mproc.receive("again", timeout=WAIT).sender_pid == child.pid
    assert kids.finish(child) == 0


# ---------------------------------------------------------------- the key file


def test_key_file_is_private(runtime_dir: str) -> None:
    mproc.open_mailbox()
    key_path = os.path.join(runtime_dir, "key")
    st = os.lstat(key_path)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert st.st_size >= 32
    with open(key_path, "rb") as f:
        assert f.read() == rt.runtime().key


def test_racing_processes_agree_on_one_key(kids: Kids, runtime_dir: str) -> None:
    ctx = multiprocessing.get_context("fork")
    for round_ in range(4):
        path = os.path.join(runtime_dir, f"race{round_}")
        start = ctx.Event()
        pipes = [ctx.Pipe(duplex=False) for _ in range(8)]
        racers = [kids.start(peers.load_key, path, start, w) for _, w in pipes]
        start.set()
        keys = set()
        for r, _ in pipes:
            assert r.poll(WAIT), "a racer did not report its key"
            keys.add(r.recv())
        assert [kids.finish(p) for p in racers] == [0] * 8
        with open(os.path.join(path, "key"), "rb") as f:
            assert keys == {f.read()}
        assert sorted(os.listdir(path)) == ["key"]  # no temporary files left


def _key_dir(runtime_dir: str, monkeypatch: pytest.MonkeyPatch, name: str) -> tuple[str, str]:
    path = use_dir(monkeypatch, os.path.join(runtime_dir, name))
    os.mkdir(path, 0o700)
    return path, os.path.join(path, "key")


def _write_key(key_path: str, data: bytes, mode: int) -> None:
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.write(fd, data)
    os.close(fd)
    os.chmod(key_path, mode)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=oct)
def test_key_file_readable_by_others_is_refused(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    _, key_path = _key_dir(runtime_dir, monkeypatch, "loose")
    _write_key(key_path, os.urandom(32), mode)
    assert_refused(key_path, "600")


def test_truncated_key_file_is_refused(runtime_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, key_path = _key_dir(runtime_dir, monkeypatch, "short")
    _write_key(key_path, b"short", 0o600)
    assert_refused(key_path, "truncated")


@needs_root
def test_key_file_owned_by_another_user_is_refused(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, key_path = _key_dir(runtime_dir, monkeypatch, "foreign")
    _write_key(key_path, os.urandom(32), 0o600)
    os.chown(key_path, NOBODY, NOBODY)
    assert_refused(key_path, f"uid {NOBODY}")


def test_key_file_that_is_a_symlink_is_refused(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, key_path = _key_dir(runtime_dir, monkeypatch, "linked")
    target = os.path.join(runtime_dir, "elsewhere")
    _write_key(target, os.urandom(32), 0o600)
    os.symlink(target, key_path)
    assert_refused(key_path, "regular file")


def test_key_file_that_is_a_directory_is_refused(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, key_path = _key_dir(runtime_dir, monkeypatch, "dirkey")
    os.mkdir(key_path, 0o700)
    assert_refused(key_path, "regular file")


# ---------------------------------------------- nothing unpickled before the checks


class _Marker:
    """Unpickling this creates a directory: proof that a payload was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.mkdir, (self.path,))


def test_nothing_is_unpickled_without_a_handshake(
    kids: Kids, runtime_dir: str, tmp_path: Any
) -> None:
    marker = str(tmp_path / "unpickled")
    evil = msg_frame("", _Marker(marker))
    mproc.open_mailbox()
    path = peers.mailbox_path(runtime_dir, me())
    # Skipping the handshake: the frame is taken as the (wrong) answer to the challenge.
    with raw_connect(path) as sock:
        try:
            sock.sendall(evil * 3)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # hung up on before it was all written: fine
        peers.read_until_eof(sock)
    # Failing the handshake, then sending anyway.
    with raw_connect(path) as sock:
        with pytest.raises(peers.Refused) as info:
            peers.handshake(sock, b"wrong key" * 4)
        assert info.value.verdict == wire.FAILURE
        try:
            sock.sendall(wire.hello() + evil)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert peers.read_until_eof(sock) == b""
    # Skipping only the last steps: answering the challenge, then a frame.
    with raw_connect(path) as sock:
        key = rt.runtime().key
        sock.sendall(wire.frame(wire.answer(key, peers.read_frame(sock))))
        assert peers.read_frame(sock) == wire.WELCOME
        try:
            sock.sendall(evil)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert peers.read_until_eof(sock) == b""
    with pytest.raises(mproc.ReceiveTimeout):
        mproc.receive(timeout=0.3)
    assert not os.path.exists(marker)
    # Control: the same payload through a proper connection is live.
    mproc.send(me(), _Marker(marker))
    assert mproc.receive(timeout=WAIT).data is None
    assert os.path.isdir(marker)


# ---------------------------------------------------------------- a second Unix user


def _as_nobody(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fork, drop to ``nobody`` in the child, run ``body`` there; return its report.

    The child imports nothing new: as ``nobody`` it may not be able to read this
    interpreter's standard library (hence ``hmac`` is imported up front).
    """
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        report: dict[str, Any] = {}
        try:
            os.close(report_r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            report = body()
        except BaseException as err:
            report = {"crash": repr(err)}
        finally:
            os.write(report_w, json.dumps(report).encode())
            os._exit(0)
    os.close(report_w)
    try:
        assert peers.wait_exited(pid, WAIT + 5), "the child running as nobody hung"
        with os.fdopen(report_r, "rb") as f:
            return json.loads(f.read())  # type: ignore[no-any-return]
    finally:
        if not peers.wait_exited(pid, 0):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@needs_root
def test_another_user_cannot_deliver_through_mproc(runtime_dir: str) -> None:
    mproc.open_mailbox()
    parent = me()

    def body() -> dict[str, Any]:
        try:
            mproc.send(parent, "from nobody", timeout=2)
        except mproc.MprocError as err:
            return {"error": type(err).__name__, "text": str(err), "uid": os.getuid()}
        return {"error": None, "uid": os.getuid()}

    report = _as_nobody(body)
    assert report.get("uid") == NOBODY, report
    assert report["error"] is not None, "a send as another user succeeded"
    # Refused before any connection: the runtime directory is not its own.
    assert report["error"] == "UnsafeRuntimeDir", report
    assert runtime_dir in report["text"]
    assert f"owned by uid {os.getuid()}" in report["text"]
    assert f"(uid {NOBODY})" in report["text"]
    with pytest.raises(mproc.ReceiveTimeout):
        mproc.receive(timeout=0.3)


@needs_root
def test_another_user_with_the_key_is_refused_by_uid(runtime_dir: str, tmp_path: Any) -> None:
    # Even knowing the key (read before dropping privileges) and with the
    # directory and socket open to everyone, a peer of another uid is refused
    # before anything it sends is unpickled.
    marker = str(tmp_path / "unpickled")
    mproc.open_mailbox()
    parent = me()
    path = peers.mailbox_path(runtime_dir, parent)
    os.chmod(runtime_dir, 0o711)
    os.chmod(path, 0o777)
    key = rt.runtime().key
    evil = msg_frame("", _Marker(marker))

    def body() -> dict[str, Any]:
        report: dict[str, Any] = {"uid": os.getuid()}
        try:
            with raw_connect(path) as sock:
                try:
                    peers.handshake(sock, key)
                except peers.Refused as err:
                    report["client"] = f"refused at {err.step}: {err.verdict!r}"
                else:
                    sock.sendall(evil)
                    report["client"] = "connected"
        except OSError as err:
            report["client"] = repr(err)
        try:
            mproc.send(parent, _Marker(marker), timeout=2)
            report["send"] = None
        except mproc.MprocError as err:
            report["send"] = type(err).__name__
            report["text"] = str(err)
        return report

    report = _as_nobody(body)
    assert report.get("uid") == NOBODY, report
    # The uid check (SO_PEERCRED) comes first: hung up on before any challenge.
    assert report["client"] == "refused at the challenge: b''", report
    # mproc's own send() refuses earlier still: the directory is not its own.
    assert report["send"] == "UnsafeRuntimeDir", report
    assert runtime_dir in report["text"]
    with pytest.raises(mproc.ReceiveTimeout):
        mproc.receive(timeout=0.3)
    assert not os.path.exists(marker)
