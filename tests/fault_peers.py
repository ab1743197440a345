"""Helpers for ``test_mailbox_faults.py``, and the code its child processes run.

Children are started with the ``fork`` method by the ``kids`` fixture and talk
to the test through a ``multiprocessing`` pipe, always their last positional
argument: every message is a tuple whose
first item is a tag; a child that fails sends ``("error", traceback)`` instead,
which :func:`expect` turns into a test failure. Every wait is bounded.

The faults are forced, never awaited: signal storms come from an interval
timer (children) or a ticker thread (the test process, whose SIGALRM belongs
to pytest-timeout); "slow readers" read in small chunks; a raw peer speaks the
handshake of :mod:`mproc._wire` by hand.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from functools import partial
from multiprocessing import connection as mpc
from typing import Any, Callable, Optional

import mproc
from mproc import _admission, _mailbox, _receiver, _sender
from mproc import _runtime as rt
from mproc import _wire as wire

#: The bound on every wait that is expected to succeed.
WAIT = 10.0
#: Files under this directory are "inside mproc" for the signal handlers.
MPROC_DIR = os.path.dirname(os.path.abspath(mproc.__file__)) + os.sep
NOBODY = 65534


class Boom(Exception):
    """What the fault injectors raise: any exception a signal handler may raise."""


class BaseBoom(BaseException):
    """Like :class:`Boom`, but not an ``Exception`` (as KeyboardInterrupt)."""


BOOMS = (Boom, BaseBoom)


# ---------------------------------------------------------------- reporting


def expect(conn: mpc.Connection, tag: str, timeout: float = WAIT) -> tuple[Any, ...]:
    """Read the child's next report, which must carry ``tag``; return the rest of it."""
    if not conn.poll(timeout):
        raise AssertionError(f"the child sent no {tag!r} report within {timeout} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise AssertionError(f"the child failed while the test waited for {tag!r}:\n{msg[1]}")
    if msg[0] != tag:
        raise AssertionError(f"expected a {tag!r} report from the child, got {msg!r}")
    return tuple(msg[1:])


@contextlib.contextmanager
def reporting(conn: mpc.Connection) -> Iterator[None]:
    """In a child: report any exception to the test, then close this process's mailbox."""
    try:
        yield
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    finally:
        mproc.close_mailbox()


def wait_command(conn: mpc.Connection, command: str, timeout: float = WAIT) -> None:
    """In a child: wait for ``command`` from the test."""
    if not conn.poll(timeout):
        raise AssertionError(f"no {command!r} from the test within {timeout} s")
    got = conn.recv()
    if got != command:
        raise AssertionError(f"expected {command!r} from the test, got {got!r}")


def use_runtime(rundir: str) -> None:
    os.environ["MPROC_RUNTIME_DIR"] = rundir


def receiver() -> _receiver.Receiver:
    r = _mailbox._state.receiver
    assert r is not None, "no mailbox is open"
    return r


def count_admissions(r: _receiver.Receiver) -> list[int]:
    """Count the connections the mailbox admits from now on (a one-item list)."""
    admitted = [0]
    real = r.admission.on_admit

    def counting(sock: socket.socket, pid: int, session: int, flags: int) -> bool:
        admitted[0] += 1
        return real(sock, pid, session, flags)

    r.admission.on_admit = counting
    return admitted


def slow_reader(chunk: int) -> None:
    """Make this process's mailbox read at most ``chunk`` bytes per read (before opening)."""
    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("mproc.") and isinstance(getattr(module, "_CHUNK", None), int):
            module._CHUNK = chunk  # type: ignore[attr-defined]
            patched.append(name)
    assert patched, "no mproc module reads in chunks of _CHUNK bytes any more"


def handshake_timeout(seconds: float) -> None:
    """Give this process's mailbox another whole-handshake deadline (before opening).

    ``Admission`` binds ``rt.HANDSHAKE_TIMEOUT`` as a default argument when it
    is defined, so the constant itself cannot be patched: wrap the class.
    """
    _receiver.Admission = partial(_admission.Admission, handshake_timeout=seconds)  # type: ignore[misc]


# ---------------------------------------------------------------- signals


def inside_mproc(frame: Any) -> bool:
    """Whether the interrupted main thread is inside mproc (any frame of its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(MPROC_DIR):
            return True
        frame = frame.f_back
    return False


def in_function(frame: Any, names: frozenset[str]) -> bool:
    """Whether the interrupted stack is inside one of mproc's functions ``names``."""
    while frame is not None:
        code = frame.f_code
        if code.co_name in names and code.co_filename.startswith(MPROC_DIR):
            return True
        frame = frame.f_back
    return False


class Storm:
    """SIGALRM every ``period`` s; the handler raises :class:`Boom` only inside mproc.

    For child processes only: in the test process SIGALRM is pytest-timeout's.
    """

    def __init__(self, period: float, exc: type[BaseException] = Boom) -> None:
        self.period = period
        self.exc = exc
        self.raised = 0  # signals that landed inside mproc
        self.outside = 0  # ...and elsewhere
        self.previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if inside_mproc(frame):
            self.raised += 1
            raise self.exc("signal storm")
        self.outside += 1

    def __enter__(self) -> Storm:
        self.previous = signal.signal(signal.SIGALRM, self._handler)
        signal.setitimer(signal.ITIMER_REAL, self.period, self.period)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)


class Ticker:
    """In the test process: SIGUSR1 to ourselves every ``period`` s from a thread.

    The handler raises :class:`Boom` when ``should_raise(frame)`` says so,
    once per arming (:meth:`arm`), and counts the raises.
    """

    def __init__(self, period: float, should_raise: Callable[[Any], bool]) -> None:
        self.period = period
        self.should_raise = should_raise
        self.raised = 0
        self.armed = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ticker", daemon=True)
        self.previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.armed and self.should_raise(frame):
            self.armed = False
            self.raised += 1
            raise Boom("SIGUSR1 while inside mproc")

    def _run(self) -> None:
        pid = os.getpid()
        while not self.stop.wait(self.period):
            os.kill(pid, signal.SIGUSR1)

    def __enter__(self) -> Ticker:
        self.previous = signal.signal(signal.SIGUSR1, self._handler)
        self.armed = True
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.armed = False
        self.stop.set()
        self.thread.join(WAIT)
        # A SIGUSR1 still pending would meet the default action (exit): let it land first.
        deadline = time.monotonic() + WAIT
        while signal.SIGUSR1 in signal.sigpending() and time.monotonic() < deadline:
            time.sleep(0.001)
        signal.signal(signal.SIGUSR1, self.previous)


# ---------------------------------------------------------------- a raw peer


class RawPeer:
    """A connection to a mailbox that speaks the sender's side of the handshake by hand."""

    def __init__(self, path: str, key: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(path)
        self.sock.sendall(wire.frame(wire.answer(key, self.recv_frame())))
        assert self.recv_frame() == wire.WELCOME
        mine = wire.challenge()
        self.sock.sendall(wire.frame(mine))
        assert wire.verify(key, mine, self.recv_frame())
        self.sock.sendall(wire.frame(wire.WELCOME) + wire.hello())
        hello = wire.parse_hello(self.recv_frame())  # (protocol, max_frame, window, ...)
        self.max_frame, self.window = hello[1], hello[2]

    def recv_frame(self) -> bytes:
        return _Frames(self.sock).recv()

    def unsent(self) -> int:
        """Bytes we wrote that the mailbox has not read yet (SIOCOUTQ)."""
        return unsent_bytes(self.sock.fileno())

    def close(self) -> None:
        self.sock.close()


def unsent_bytes(fd: int) -> int:
    import fcntl
    import struct
    import termios

    raw = fcntl.ioctl(fd, termios.TIOCOUTQ, struct.pack("i", 0))  # SIOCOUTQ
    return int(struct.unpack("i", raw)[0])


def wait_eof(sock: socket.socket, timeout: float) -> Optional[float]:
    """Wait (bounded) until the peer closed ``sock``; return when (monotonic), else None.

    Data that arrives meanwhile (credit frames) is read and ignored.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = max(deadline - time.monotonic(), 0)
        readable, _, _ = select.select([sock], [], [], remaining)
        if not readable:
            return None
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic()
        if not data:
            return time.monotonic()


# ---------------------------------------------------------------- child processes


def collect(
    rundir: str,
    count: int,
    conn: mpc.Connection,
    *,
    max_queue: Optional[int] = None,
    chunk: Optional[int] = None,
    hold: bool = False,
    drop_every: int = 0,
    storm: Optional[float] = None,
    storm_exc: type[BaseException] = Boom,
    shape: Callable[[Any], Any] = lambda data: data,
) -> None:
    """Open a mailbox, report ready, receive ``count`` messages of group "" and report them.

    Args:
        max_queue: the mailbox's max_queue.
        chunk: read at most this many bytes at a time (a slow reader).
        hold: receive nothing until the test sends "go".
        drop_every: every that many messages, shut down the sender's connection
            being read, if it has delivered a message and was not shut down yet
            (the receiver drops it: the sender must reconnect).
        storm: a SIGALRM storm of this period raising ``storm_exc`` inside
            mproc; each is caught and receive() called again.
        shape: what to keep of each message's data.

    Reports ``("ready", pid)``, then ``("done", data, admissions, booms, drops)``.
    """
    use_runtime(rundir)
    if chunk is not None:
        slow_reader(chunk)
    with reporting(conn):
        mproc.open_mailbox(max_queue=max_queue)
        r = receiver()
        admitted = count_admissions(r)
        conn.send(("ready", os.getpid()))
        if hold:
            wait_command(conn, "go")
        got: list[Any] = []
        drops = 0
        shut: list[Any] = []
        next_drop = drop_every
        receive = mproc.receive
        with Storm(storm, storm_exc) if storm else contextlib.nullcontext() as s:
            deadline = time.monotonic() + 60
            while len(got) < count:
                if time.monotonic() > deadline:
                    raise AssertionError(f"received only {len(got)} of {count} in 60 s")
                try:
                    msg = receive("", WAIT)
                except BOOMS:
                    continue
                got.append(shape(msg.data))
                if drop_every and len(got) >= next_drop:
                    peer = r.by_pid.get(msg.sender_pid)
                    if peer is not None and peer.last_seq and peer not in shut:
                        shut.append(peer)
                        peer.sock.shutdown(socket.SHUT_RDWR)
                        drops += 1
                        next_drop = len(got) + drop_every
        booms = s.raised if isinstance(s, Storm) else 0
        conn.send(("done", got, admitted[0], booms, drops))


def storm_sender(
    rundir: str,
    target: int,
    count: int,
    period: float,
    exc: type[BaseException],
    conn: mpc.Connection,
) -> None:
    """Send ``(i, attempt)`` for i < count to ``target`` under a SIGALRM storm.

    A send() that raised Boom is tried again with the next attempt number; the
    report says which attempt of each message returned: ``("done", last, booms)``.
    The stream ends with ``("end", count)``, sent after the storm.
    """
    use_runtime(rundir)
    with reporting(conn):
        send = mproc.send
        last: list[int] = []
        deadline = time.monotonic() + 60
        with Storm(period, exc) as s:
            for i in range(count):
                attempt = 0
                while True:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"sent only {i} of {count} in 60 s")
                    try:
                        send(target, (i, attempt), timeout=WAIT)
                        break
                    except BOOMS:
                        attempt += 1
                last.append(attempt)
        mproc.send(target, ("end", count), timeout=WAIT)
        conn.send(("done", last, s.raised))


def self_send_after_fork(rundir: str, conn: mpc.Connection) -> None:
    """In a freshly forked child with no mailbox: send to our own PID, then receive it."""
    use_runtime(rundir)
    with reporting(conn):
        had_mailbox = _mailbox._state.receiver is not None
        start = time.monotonic()
        mproc.send(os.getpid(), "to myself", timeout=WAIT)
        took = time.monotonic() - start
        msg = mproc.receive(timeout=WAIT)
        conn.send(("done", had_mailbox, took, msg.sender_pid, msg.receiver_pid, msg.data))


def idle_receiver(rundir: str, seconds: float, blocked: bool, conn: mpc.Connection) -> None:
    """Open a mailbox; on "go", sit idle for ``seconds`` (in receive() if ``blocked``)."""
    use_runtime(rundir)
    with reporting(conn):
        mproc.open_mailbox()
        # One message through the mailbox first: both threads have run.
        mproc.send(os.getpid(), "warm", timeout=WAIT)
        assert mproc.receive(timeout=WAIT).data == "warm"
        conn.send(("ready", os.getpid()))
        wait_command(conn, "go")
        if blocked:
            try:
                mproc.receive("nobody sends this", timeout=seconds)
            except mproc.ReceiveTimeout:
                pass
        else:
            conn.poll(seconds)
        conn.send(("idled",))
        wait_command(conn, "exit")


def groups_receiver(rundir: str, groups: list[str], per_group: int, conn: mpc.Connection) -> None:
    """Report ready; on "go", receive ``per_group`` messages of each group; report them."""
    use_runtime(rundir)
    with reporting(conn):
        mproc.open_mailbox()
        r = receiver()
        admitted = count_admissions(r)
        conn.send(("ready", os.getpid()))
        wait_command(conn, "go")
        got = {g: [mproc.receive(g, WAIT).data for _ in range(per_group)] for g in groups}
        conn.send(("done", got, admitted[0], len(r.peers), len(r.by_pid)))


def serve(
    rundir: str,
    conn: mpc.Connection,
    *,
    handshake: Optional[float] = None,
    idle_limit: Optional[float] = None,
    fd_spare: Optional[int] = None,
    key: Optional[bytes] = None,
) -> None:
    """Open a mailbox; report every message received to the test until "stop" arrives.

    Args:
        handshake: the whole-handshake deadline of the mailbox.
        idle_limit: the mailbox's idle limit.
        fd_spare: lower RLIMIT_NOFILE to leave only this many free descriptors.
        key: use this key instead of the runtime directory's.

    Reports ``("ready", pid, threads)``, then ``("got", data)`` for each message.
    """
    use_runtime(rundir)
    if handshake is not None:
        handshake_timeout(handshake)
    if key is not None:
        directory = rt.runtime().directory
        rt.runtime = lambda: rt.Runtime(directory, key)  # type: ignore[assignment]
    with reporting(conn):
        mproc.open_mailbox(idle_limit=idle_limit)
        if fd_spare is not None:
            # Fill every free descriptor number below the highest one in use,
            # then allow exactly fd_spare more.
            top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            fillers = []
            while True:
                fd = os.open(os.devnull, os.O_RDONLY)
                if fd > top:
                    os.close(fd)
                    break
                fillers.append(fd)
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1 + fd_spare, hard))
        conn.send(("ready", os.getpid(), len(os.listdir("/proc/self/task"))))
        while True:
            msg = mproc.receive(timeout=60)
            if msg.data == "stop":
                return
            conn.send(("got", msg.data))


def nobody_receiver(rundir: str, count: int, conn: mpc.Connection) -> None:
    """As uid nobody, under an RLIMIT_NPROC that allows no new thread: receive ``count``."""
    become_nobody()
    use_runtime(rundir)
    with reporting(conn):
        mproc.open_mailbox()
        tasks = sum(1 for _ in _tasks_of(NOBODY))
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        resource.setrlimit(resource.RLIMIT_NPROC, (tasks, hard))
        try:
            threading.Thread(target=lambda: None).start()
            refused = ""
        except RuntimeError as err:
            refused = str(err)
        conn.send(("ready", os.getpid(), refused))
        got = sorted(mproc.receive(timeout=WAIT).data for _ in range(count))
        conn.send(("done", got))


def nobody_sender(rundir: str, target: int, tag: int, conn: mpc.Connection) -> None:
    become_nobody()
    use_runtime(rundir)
    with reporting(conn):
        mproc.send(target, tag, timeout=WAIT)
        conn.send(("sent", tag))


def become_nobody() -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


def _tasks_of(uid: int) -> Iterator[str]:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            yield from os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue


def fake_mailbox(rundir: str, conn: mpc.Connection) -> None:
    """A mailbox of our own making: handshake correctly, then refuse to read anything.

    It shuts its side down for reading before its HELLO goes out, so the
    sender's first write fails (EPIPE): the receiver went away mid-conversation.
    """
    use_runtime(rundir)
    with reporting(conn):
        runtime = rt.runtime()
        path = rt.socket_path(runtime, os.getpid(), rt.proc_identity(os.getpid()) or "0")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        try:
            listener.listen(1)
            conn.send(("ready", os.getpid(), path))
            listener.settimeout(WAIT)
            sock, _ = listener.accept()
            sock.settimeout(WAIT)
            peer = _Frames(sock)
            mine = wire.challenge()
            sock.sendall(wire.frame(mine))
            assert wire.verify(runtime.key, mine, peer.recv())
            sock.sendall(wire.frame(wire.WELCOME))
            sock.sendall(wire.frame(wire.answer(runtime.key, peer.recv())))
            assert peer.recv() == wire.WELCOME
            wire.parse_hello(peer.recv())
            sock.shutdown(socket.SHUT_RD)
            sock.sendall(wire.hello(rt.DEFAULT_MAX_FRAME, rt.DEFAULT_WINDOW))
            wait_command(conn, "stop")
            sock.close()
        finally:
            listener.close()
            os.unlink(path)


class _Frames:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self) -> bytes:
        (size,) = wire.LEN.unpack(self._exactly(wire.LEN.size))
        return self._exactly(size)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError("the peer closed the connection")
            data += chunk
        return data


def stalled_peer(rundir: str, target: int, size: int, conn: mpc.Connection) -> None:
    """Announce a ``size``-byte frame to ``target`` and stall; report when dropped.

    Reports ``("announced",)`` once the mailbox has read the header, then
    ``("dropped", seconds after the header)`` if the mailbox closes the
    connection before the test says "close".
    """
    use_runtime(rundir)
    with reporting(conn):
        runtime = rt.runtime()
        path = rt.socket_path(runtime, target, rt.proc_identity(target) or "0")
        peer = RawPeer(path, runtime.key)
        peer.sock.sendall(wire.msg_prefix(b"", 0, size - wire.HEAD.size) + b"\x80\x05")
        announced = time.monotonic()
        deadline = announced + WAIT
        while peer.unsent():
            assert time.monotonic() < deadline, "the mailbox never read the header"
            time.sleep(0.002)
        conn.send(("announced",))
        readable, _, _ = select.select([peer.sock, conn], [], [], 3 * WAIT)
        if peer.sock in readable:
            dropped = wait_eof(peer.sock, 0)
            assert dropped is not None, "the mailbox wrote to a stalled peer"
            conn.send(("dropped", dropped - announced))
        wait_command(conn, "close")
        peer.close()


def steady_peer(
    rundir: str, target: int, payload: bytes, steps: int, pause: float, conn: mpc.Connection
) -> None:
    """Send one message to ``target`` in ``steps`` pieces, ``pause`` s apart.

    Reports ``("sent",)``, or ``("dropped", seconds after the first piece)``.
    """
    use_runtime(rundir)
    with reporting(conn):
        runtime = rt.runtime()
        path = rt.socket_path(runtime, target, rt.proc_identity(target) or "0")
        peer = RawPeer(path, runtime.key)
        data = wire.msg_prefix(b"", 0, len(payload)) + payload
        step = len(data) // steps + 1
        start = time.monotonic()
        for pos in range(0, len(data), step):
            try:
                peer.sock.sendall(data[pos : pos + step])
            except (BrokenPipeError, ConnectionResetError):
                conn.send(("dropped", time.monotonic() - start))
                return
            dropped = wait_eof(peer.sock, pause)  # paces us, and sees a drop
            if dropped is not None:
                conn.send(("dropped", dropped - start))
                return
        conn.send(("sent",))
        wait_command(conn, "close")
        peer.close()


def kill_once(pid: int, flag: str) -> str:
    """Unpickled as the result of this call: SIGUSR1 to ``pid`` the first time only."""
    if not os.path.exists(flag):
        open(flag, "w").close()
        os.kill(pid, signal.SIGUSR1)
    return "unpickled"


class SignalOnLoad:
    """An object whose unpickling sends SIGUSR1 to ``pid`` (once per ``flag`` file)."""

    def __init__(self, pid: int, flag: str) -> None:
        self.pid = pid
        self.flag = flag

    def __reduce__(self) -> Any:
        return (kill_once, (self.pid, self.flag))


def links() -> dict[int, _sender.Link]:
    """The sending side's open connections, by receiving PID (this process)."""
    return dict(_sender._links.by_pid)
