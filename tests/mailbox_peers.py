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
import struct
import sys
import threading
import time
from multiprocessing import connection as mpc
from typing import Any, Callable, Optional

import mproc
from mproc import _transport as tr

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


def frame(group: str, obj: Any = None, *, payload: Optional[bytes] = None, kind: int = 0) -> bytes:
    """The body of one mailbox frame, as ``Connection.send_bytes`` takes it."""
    raw = group.encode("utf-8", "surrogatepass")
    if payload is None:
        payload = pickle.dumps(obj, protocol=5)
    return struct.pack("!BH", kind, len(raw)) + raw + payload


def frame_with_raw_group(raw_group: bytes, obj: Any) -> bytes:
    return struct.pack("!BH", 0, len(raw_group)) + raw_group + pickle.dumps(obj, protocol=5)


def wire(body: bytes) -> bytes:
    """``body`` with multiprocessing's length prefix: the bytes ``send_bytes`` writes."""
    return struct.pack("!i", len(body)) + body


def authed(pid: int) -> mpc.Connection:
    """An authenticated connection to ``pid``'s mailbox, for writing crafted frames."""
    return tr.connect(tr.runtime(), pid, time.monotonic() + WAIT)[0]


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


def is_dropped(conn: mpc.Connection, timeout: float = WAIT) -> bool:
    """Whether the mailbox closed this sending connection (it never writes on one)."""
    if not conn.poll(timeout):
        return False
    try:
        conn.recv_bytes()
    except (EOFError, ConnectionResetError):
        return True
    return False


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
    conn.send_bytes(frame("", "before"))
    data = wire(frame("", "never whole " * 100))
    write_all(conn.fileno(), data[: len(data) // 2])
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
    out.send(tr.runtime().key)


def report_fork_state(rundir: str, parent: int) -> None:
    """In a forked child: report the inherited mailbox state, then talk to the parent."""
    use_runtime(rundir)
    state = sys.modules["mproc._mailbox"]._state
    before = (state.mailbox is None, len(state.links))
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
    real_socket_path = tr.socket_path

    def counting_socket_path(rt: tr.Runtime, pid: int, identity: str) -> str:
        if pid == target:
            lookups.release()
        return real_socket_path(rt, pid, identity)

    monkeypatch.setattr(tr, "socket_path", counting_socket_path)
    return lookups
