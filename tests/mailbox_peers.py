"""Helpers for the mailbox tests, and the code their child processes run.

The child functions live at module level so every start method (fork, spawn,
forkserver) can run them. Each takes the runtime directory explicitly: a
forkserver child inherits the environment of the forkserver, not the test's.
Children report through the mailbox itself, a ``multiprocessing`` pipe or an
exit code; every wait in them is bounded.
"""

from __future__ import annotations

import glob
import importlib
import multiprocessing
import os
import pickle
import select
import socket
import sys
import threading
import time
from multiprocessing import connection as mpc
from typing import Any, Callable, Optional, Union

import mproc
from mproc import _runtime as rt
from mproc import _sender
from mproc import _wire as wire

#: The bound on every wait that is expected to succeed.
WAIT = 10.0


# ---------------------------------------------------------------- test-side helpers


class Kids:
    """Starts ``multiprocessing`` children for one test and always reaps them."""

    def __init__(self) -> None:
        self._procs: list[multiprocessing.process.BaseProcess] = []

    def start(
        self, target: Callable[..., Any], *args: Any, method: str = "fork"
    ) -> multiprocessing.process.BaseProcess:
        proc = multiprocessing.get_context(method).Process(target=target, args=args, daemon=True)
        proc.start()
        self._procs.append(proc)
        return proc

    @staticmethod
    def finish(proc: multiprocessing.process.BaseProcess, timeout: float = WAIT) -> Optional[int]:
        """Join ``proc`` (bounded) and return its exit code."""
        proc.join(timeout)
        if proc.is_alive():
            raise AssertionError(f"child PID {proc.pid} did not exit within {timeout} s")
        return proc.exitcode

    @staticmethod
    def kill(proc: multiprocessing.process.BaseProcess) -> None:
        proc.kill()
        proc.join(WAIT)
        if proc.is_alive():
            raise AssertionError(f"child PID {proc.pid} survived SIGKILL for {WAIT} s")

    def close(self) -> None:
        for proc in self._procs:
            if proc.pid is None:
                continue
            proc.join(0)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def wait_exited(pid: int, timeout: float) -> bool:
    """Wait (bounded, without reaping) until ``pid`` has exited; return whether it did."""
    fd = os.pidfd_open(pid)
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll a condition on internal state until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def mailbox_path(rundir: str, pid: int) -> str:
    """The socket file of ``pid``'s open mailbox in ``rundir`` (exactly one must exist)."""
    found = glob.glob(os.path.join(glob.escape(rundir), f"{pid}.*.sock"))
    if len(found) != 1:
        raise AssertionError(f"expected one mailbox socket of PID {pid} in {rundir}, got {found}")
    return found[0]


def payload_of(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=5)


def msg_frame(
    group: Union[str, bytes], obj: Any = None, *, seq: int = 0, payload: Optional[bytes] = None
) -> bytes:
    """A whole MSG frame (length prefix included), built with :mod:`mproc._wire`."""
    raw = group if isinstance(group, bytes) else group.encode("utf-8", "surrogatepass")
    if payload is None:
        payload = payload_of(obj)
    return wire.msg_prefix(raw, seq, len(payload)) + payload


class Refused(Exception):
    """The mailbox refused our handshake (``verdict`` is what it said, ``b""``: it hung up)."""

    def __init__(self, step: str, verdict: bytes) -> None:
        super().__init__(f"refused at {step}: {verdict!r}")
        self.step = step
        self.verdict = verdict


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"the mailbox closed the connection after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> bytes:
    """Read one length-prefixed frame (a handshake message or a HELLO) and return its body."""
    (size,) = wire.LEN.unpack(_exactly(sock, wire.LEN.size))
    assert 0 < size <= wire.MAX_HANDSHAKE_FRAME, f"a {size}-byte handshake frame"
    return _exactly(sock, size)


def handshake(sock: socket.socket, key: bytes) -> tuple[int, int]:
    """Do a sender's side of the 0.2 handshake on ``sock``; return ``(max_frame, window)``.

    Raises:
        Refused: the mailbox said FAILURE or hung up instead of answering.
    """
    try:
        theirs = read_frame(sock)
    except EOFError:
        raise Refused("the challenge", b"") from None
    sock.sendall(wire.frame(wire.answer(key, theirs)))
    try:
        verdict = read_frame(sock)
    except (EOFError, ConnectionResetError):
        raise Refused("the verdict on our key", b"") from None
    if verdict != wire.WELCOME:
        raise Refused("the verdict on our key", verdict)
    mine = wire.challenge()
    sock.sendall(wire.frame(mine))
    assert wire.verify(key, mine, read_frame(sock)), "the mailbox does not know the key"
    sock.sendall(wire.frame(wire.WELCOME))
    sock.sendall(wire.hello())
    # (protocol, max_frame, window, ...): later fields are not this helper's business.
    version, max_frame, window = wire.parse_hello(read_frame(sock))[:3]
    assert version == wire.PROTOCOL
    return max_frame, window


def raw_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(path)
    return sock


class RawSender:
    """A connection that passed the real handshake, for writing crafted frames.

    It numbers each group's MSG frames ``0, 1, 2...`` as a real sender does
    (the receiver's HELLO announced a window: every test here stays under it).
    """

    def __init__(self, sock: socket.socket, pid: int, max_frame: int, window: int) -> None:
        self.sock = sock
        self.pid = pid
        self.max_frame = max_frame
        self.window = window
        self.seqs: dict[bytes, int] = {}

    def fileno(self) -> int:
        return self.sock.fileno()

    def msg(
        self, group: Union[str, bytes], obj: Any = None, *, payload: Optional[bytes] = None
    ) -> bytes:
        """The next MSG frame of ``group`` (it takes the next sequence number)."""
        raw = group if isinstance(group, bytes) else group.encode("utf-8", "surrogatepass")
        seq = self.seqs.get(raw, 0)
        assert seq < self.window, "a test frame beyond the receiver's window"
        self.seqs[raw] = seq + 1
        return msg_frame(raw, obj, seq=seq, payload=payload)

    def send(
        self, group: Union[str, bytes], obj: Any = None, *, payload: Optional[bytes] = None
    ) -> None:
        self.write(self.msg(group, obj, payload=payload))

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def is_dropped(self, timeout: float = WAIT) -> bool:
        """Whether the mailbox closes this connection within ``timeout``.

        All a mailbox may write on a sender's connection is CREDIT frames:
        anything else read before the end fails the test.
        """
        try:
            data = read_until_eof(self.sock, timeout)
        except TimeoutError:
            return False
        _frames, used, _need, bad = wire.parse(data, 1 << 20, frozenset({wire.KIND_CREDIT}))
        assert bad is None and used == len(data), f"the mailbox wrote {data!r}"
        return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def authed(pid: int) -> RawSender:
    """A connection to ``pid``'s mailbox that passed the real handshake."""
    runtime = rt.runtime()
    identity = rt.proc_identity(pid)
    assert identity is not None, f"PID {pid} is gone"
    sock = raw_connect(rt.socket_path(runtime, pid, identity))
    try:
        max_frame, window = handshake(sock, runtime.key)
    except BaseException:
        sock.close()
        raise
    return RawSender(sock, pid, max_frame, window)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_until_eof(sock: socket.socket, timeout: float = WAIT) -> bytes:
    """Read until the peer closes (a reset counts as closed); time out as a failure."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except ConnectionResetError:
        return data


# ---------------------------------------------------------------- child processes


def use_runtime(rundir: str) -> None:
    os.environ["MPROC_RUNTIME_DIR"] = rundir


def send_hello(rundir: str, parent: int, group: str = "") -> None:
    """Send ``("hello", my pid)`` to the parent."""
    use_runtime(rundir)
    mproc.send(parent, ("hello", os.getpid()), group, timeout=WAIT)


def send_sequence(rundir: str, parent: int, tag: int, count: int) -> None:
    """Send ``(tag, 0) ... (tag, count - 1)`` to the parent."""
    use_runtime(rundir)
    send = mproc.send
    for i in range(count):
        send(parent, (tag, i), timeout=WAIT)


def echo(rundir: str, parent: int) -> None:
    """Open a mailbox, report ready; echo ``(sender, data)`` to each sender until ``None``."""
    use_runtime(rundir)
    mproc.open_mailbox()
    try:
        mproc.send(parent, os.getpid(), "ready", timeout=WAIT)
        while True:
            msg = mproc.receive(timeout=WAIT)
            if msg.data is None:
                return
            mproc.send(msg.sender_pid, (msg.sender_pid, msg.data), "echo", timeout=WAIT)
    finally:
        mproc.close_mailbox()


def call_server(rundir: str, parent: int) -> None:
    """Open a mailbox, report ready; call each callable received, send the result back."""
    use_runtime(rundir)
    mproc.open_mailbox()
    try:
        mproc.send(parent, os.getpid(), "ready", timeout=WAIT)
        while True:
            msg = mproc.receive(timeout=WAIT)
            if msg.data is None:
                return
            mproc.send(parent, msg.data(), "result", timeout=WAIT)
    finally:
        mproc.close_mailbox()


def chat(rundir: str, parent: int) -> None:
    """Learn another child's PID from the parent, greet it, report what it said."""
    use_runtime(rundir)
    me = os.getpid()
    mproc.open_mailbox()
    try:
        mproc.send(parent, me, "ready", timeout=WAIT)
        other = mproc.receive("peer", timeout=WAIT).data
        mproc.send(other, ("hi from", me), "chat", timeout=WAIT)
        got = mproc.receive("chat", timeout=WAIT)
        mproc.send(parent, (got.sender_pid, got.receiver_pid, got.data), "result", timeout=WAIT)
    finally:
        mproc.close_mailbox()


def open_when_told(rundir: str, parent: int, go: Any) -> None:
    """Open no mailbox until ``go`` is set; then echo one message to the parent."""
    use_runtime(rundir)
    if not go.wait(WAIT):
        sys.exit(2)
    try:
        msg = mproc.receive(timeout=WAIT)
        mproc.send(parent, (msg.sender_pid, msg.data), "echo", timeout=WAIT)
    finally:
        mproc.close_mailbox()


def try_send(rundir: str, parent: int, timeout: float, report: mpc.Connection) -> None:
    """Send once; report ``(exception class name, message, pid, path)`` or ``"sent"``."""
    use_runtime(rundir)
    try:
        mproc.send(parent, "try", timeout=timeout)
    except mproc.MprocError as err:
        report.send((type(err).__name__, str(err), err.pid, err.path))
        return
    report.send(("sent", "", None, None))


def flood(
    rundir: str, parent: int, count: int, size: int, timeout: float, report: mpc.Connection
) -> None:
    """Send ``count`` messages of ``size`` bytes; report where MailboxFull stopped us."""
    use_runtime(rundir)
    # Connect with a generous timeout first: only the flood itself races the limit.
    mproc.send(parent, "hello", "hello", timeout=WAIT)
    for i in range(count):
        try:
            mproc.send(parent, (i, bytes([i % 256]) * size), timeout=timeout)
        except mproc.MailboxFull as err:
            report.send(("full", i, str(err), err.pid, err.group))
            return
    report.send(("done", count, "", None, None))


def send_unimportable(rundir: str, parent: int, moddir: str, modname: str, group: str) -> None:
    """Send an instance of a class only this process can import, then a plain message."""
    use_runtime(rundir)
    sys.path.insert(0, moddir)
    module = importlib.import_module(modname)
    mproc.send(parent, module.Secret(42), group, timeout=WAIT)
    mproc.send(parent, "after", group, timeout=WAIT)


def half_frame_then_wait(rundir: str, parent: int, report: mpc.Connection) -> None:
    """Send one whole frame and half of the next, say so, then wait to be killed."""
    use_runtime(rundir)
    conn = authed(parent)
    conn.send("", "before")
    data = conn.msg("", "never whole " * 100)
    conn.write(data[: len(data) // 2])
    report.send("written")
    report.poll(60)  # the test SIGKILLs us long before this


def hold_mailbox(rundir: str, parent: int, max_queue: int, release: Any) -> None:
    """Open a small mailbox, report ready, and never receive (until released)."""
    use_runtime(rundir)
    mproc.open_mailbox(max_queue=max_queue)
    mproc.send(parent, os.getpid(), "ready", timeout=WAIT)
    release.wait(60)  # the test SIGKILLs us long before this


def load_key(rundir: str, start: Any, out: mpc.Connection) -> None:
    """Wait for the start signal, then create or load the key of ``rundir``."""
    use_runtime(rundir)
    if not start.wait(WAIT):
        sys.exit(2)
    out.send(rt.runtime().key)


def report_fork_state(rundir: str, parent: int) -> None:
    """In a forked child: report the inherited mailbox state, then talk to the parent."""
    use_runtime(rundir)
    state = sys.modules["mproc._mailbox"]._state
    before = (state.receiver is None, len(_sender._links.by_pid))
    mproc.send(parent, ("state", os.getpid(), before), "fork", timeout=WAIT)
    msg = mproc.receive("to-child", timeout=WAIT)
    mproc.send(parent, ("got", msg.sender_pid, msg.data), "fork", timeout=WAIT)
    mproc.close_mailbox()


def start_threads(targets: list[Callable[[], None]]) -> tuple[list[threading.Thread], list[Any]]:
    """Run each target in a thread; exceptions are collected in the returned list."""
    errors: list[Any] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as err:  # reported by the test
                errors.append(err)

        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    return threads, errors


def join_all(threads: list[threading.Thread], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0))
        if t.is_alive():
            raise AssertionError(f"thread {t.name} did not finish within {timeout} s")


def me() -> int:
    """This process's PID (the receiver in most tests)."""
    return os.getpid()


def control_behind_full_data(rundir: str, parent: int) -> None:
    """Hold a tiny queue, never read group "data", wait for group "ctl"."""
    use_runtime(rundir)
    mproc.open_mailbox(max_queue=2)
    mproc.send(parent, os.getpid(), "ready", timeout=WAIT)
    mproc.send(parent, mproc.receive("ctl", timeout=WAIT).data, "got", timeout=WAIT)


def count_lookups(monkeypatch: Any, target: int) -> threading.Semaphore:
    """Release the returned semaphore each time a sender looks up ``target``'s socket.

    Two acquisitions mean the sender found no mailbox at its first look and is
    waiting for one: a handshake, not a sleep.
    """
    lookups = threading.Semaphore(0)
    real_socket_path = rt.socket_path

    def counting_socket_path(runtime: rt.Runtime, pid: int, identity: str) -> str:
        if pid == target:
            lookups.release()
        return real_socket_path(runtime, pid, identity)

    monkeypatch.setattr(rt, "socket_path", counting_socket_path)
    return lookups
