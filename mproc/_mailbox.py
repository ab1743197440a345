"""PID-addressed messages: ``send(pid, obj)`` / ``receive()`` (SPEC §5).

This module is the public face and the sending side; the receiving side is
:mod:`mproc._receiver`, the plumbing (runtime dir, key, handshake) is
:mod:`mproc._transport`.

A sender keeps one authenticated connection per receiver (at most
``_MAX_LINKS``, oldest evicted) and reuses it. Each message is one frame in
multiprocessing's own framing, the bytes ``Connection.send_bytes`` would
write, around ``u8 kind | u16 len(group) | group (UTF-8) | pickle``.

Delivery: ``send()`` returns once the whole frame is in the receiver's socket
buffer, i.e. held by the receiving process. The receiver parses frames into
bounded per-group queues; when a group's queue is full it stops reading that
connection, the socket buffer fills, and the sender blocks (back-pressure)
until there is room or its timeout passes (:class:`MailboxFull`).
"""

from __future__ import annotations

import atexit
import os
import pickle
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from multiprocessing import connection as mpc
from typing import Any, Optional, overload

import cloudpickle

from . import _transport as tr
from ._errors import MailboxError, MailboxFull, MessageError, MprocError
from ._log import logger as log
from ._receiver import HEAD, KIND_PICKLE, MP_LEN, MP_LEN64, Mailbox, Msg

__all__ = ["Msg", "close_mailbox", "open_mailbox", "receive", "send"]


_EMPTY_GROUP_HEAD = HEAD.pack(KIND_PICKLE, 0)
_SMALL_FRAME = 1 << 16  # smaller frames go out in one write()
_MAX_LINKS = 128  # open sender connections kept per process (oldest evicted)
_PLAIN = frozenset({bytes, bytearray, str, int, float, bool, type(None)})
# cloudpickle's registry of modules to pickle by value; plain pickle ignores it.
_BY_VALUE: Any = getattr(getattr(cloudpickle, "cloudpickle", None), "_PICKLE_BY_VALUE_MODULES", ())


# ---------------------------------------------------------------- pickling


def _dumps(obj: Any) -> bytes:
    """Pickle ``obj`` so that an unrelated process can rebuild it.

    Plain pickle is ~3x faster than cloudpickle but refers to functions and
    classes by name; that breaks for lambdas, closures and anything defined in
    ``__main__`` (the receiver's ``__main__`` is another module). So plain
    pickle is used only when it succeeds and names nothing in ``__main__``.
    """
    if type(obj) in _PLAIN:
        # Nothing in these can name __main__: skip the scan (a 64 MiB bytes
        # costs two 30 ms scans otherwise).
        return pickle.dumps(obj, protocol=5)
    data: Optional[bytes] = None
    if not _BY_VALUE:
        try:
            data = pickle.dumps(obj, protocol=5)
        except Exception:  # lambdas, local classes...: cloudpickle handles them
            data = None
        if data is not None and (b"__main__" in data or b"__mp_main__" in data):
            data = None
    if data is None:
        try:
            data = cloudpickle.dumps(obj, protocol=5)
        except Exception as err:
            raise MessageError(
                f"cannot pickle the {type(obj).__name__} object to send: {err}; nothing was sent"
            ) from err
    return data


def _encode_group(group: str) -> bytes:
    if not isinstance(group, str):
        raise TypeError(f"group must be a str, got {type(group).__name__}: {group!r}")
    raw = group.encode("utf-8", "surrogatepass")
    if len(raw) > 0xFFFF:
        raise ValueError(f"group name is {len(raw)} bytes long; at most 65535 are allowed")
    return raw


@overload
def _check_timeout(timeout: float) -> float: ...
@overload
def _check_timeout(timeout: None) -> None: ...
def _check_timeout(timeout: Optional[float]) -> Optional[float]:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0, got {timeout}")
    return float(timeout)


# ---------------------------------------------------------------- sending


class _Link:
    """A sender's persistent connection to one receiver, for one group.

    One connection per (receiver, group): back-pressure is per connection, so
    a full group must not hold up the sender's messages to other groups.
    """

    __slots__ = ("conn", "fd", "fd_lock", "lock", "max_frame", "retired", "send_timeout")

    def __init__(self, conn: mpc.Connection, max_frame: int) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        self.max_frame = max_frame  # the receiver's limit, told in the handshake
        self.lock = threading.Lock()  # held for a whole frame's write
        self.fd_lock = threading.Lock()  # held while the fd is closed or shut down
        self.send_timeout = -1.0
        self.retired = False

    def close(self) -> None:
        with self.fd_lock:
            self.conn.close()

    def after_write(self) -> None:
        """Close the connection if it was retired during the write (lock held)."""
        if self.retired:
            self.close()

    def retire(self) -> None:
        """Close the connection, now or when the thread writing to it is done.

        Closing the fd under a writer would let the kernel hand its number to
        a new socket, and the writer's frame would go to the wrong process.
        """
        self.retired = True
        if self.lock.acquire(blocking=False):
            try:
                self.close()
            finally:
                self.lock.release()
            return
        # A write is in progress: make it fail now (the writer retries on a
        # new connection), and leave closing the fd to the writer (after_write).
        # fd_lock: the writer may have closed it meanwhile, and the number
        # may name another socket by now.
        with self.fd_lock:
            if self.conn.closed:
                return
            try:
                with socket.socket(fileno=os.dup(self.fd)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mailbox: Optional[Mailbox] = None
        self.links: OrderedDict[tuple[int, str], _Link] = OrderedDict()
        self.atexit = False


_state = _State()


def _link(pid: int, group: str, deadline: float) -> tuple[_Link, bool]:
    """Return the connection to ``pid`` for ``group`` (maybe new) and whether it is new."""
    state = _state
    key = (pid, group)
    link = state.links.get(key)  # a dict read is atomic: no lock on the hot path
    if link is not None:
        return link, False
    try:
        rt = tr.runtime()
    except MailboxError as err:
        raise MailboxError(f"cannot send to PID {pid}: {err}", pid=pid, path=err.path) from err
    conn, max_frame = tr.connect(rt, pid, deadline)
    with state.lock:
        existing = state.links.get(key)
        if existing is not None:
            conn.close()
            return existing, False
        link = state.links[key] = _Link(conn, max_frame)
        # Evict the oldest connection: a sender that talks to thousands of PIDs
        # over time must not run out of file descriptors.
        evicted = [state.links.popitem(last=False)[1] for _ in range(len(state.links) - _MAX_LINKS)]
    for old in evicted:
        old.retire()
    return link, True


def _unlink(key: tuple[int, str], link: _Link) -> None:
    """Forget and close a broken connection (the caller holds ``link.lock``)."""
    with _state.lock:
        if _state.links.get(key) is link:
            del _state.links[key]
    link.retired = True
    link.close()


def send(pid: int, obj: Any, group: str = "", *, timeout: Optional[float] = None) -> None:
    """Send ``obj`` to the mailbox of process ``pid``.

    When this returns, the receiving process holds the message. Messages from one
    thread to one receiver arrive in order.

    Args:
        pid: the receiving process.
        obj: any object cloudpickle can pickle (lambdas and ``__main__`` classes too).
        group: the receiver's queue to put it in; only ``receive(group)`` sees it.
        timeout: how long to wait for the mailbox to open and for queue room
            (default 5 s).

    Raises:
        NoSuchProcess: ``pid`` does not exist (raised at once).
        MailboxNotFound: ``pid`` opened no mailbox within the timeout.
        MailboxFull: the receiver's queue for ``group`` stayed full past the timeout.
        MessageError: ``obj`` cannot be pickled or is over the frame size limit;
            nothing was sent.
        MailboxError: the receiver went away, or failed authentication.
    """
    pid = _check_pid(pid)
    head, payload = _prepare(obj, group, pid)
    _send_frame(pid, head, payload, group, timeout)


def send_many(
    pids: Iterable[int], obj: Any, group: str = "", *, timeout: Optional[float] = None
) -> dict[int, Exception]:
    """Send one object to several processes, pickling it once.

    Returns:
        ``{pid: exception}`` for every process it could not be delivered to.

    Raises:
        MessageError: ``obj`` cannot be pickled (nothing was sent to anyone).
    """
    head, payload = _prepare(obj, group)
    failures: dict[int, Exception] = {}
    for pid in pids:
        try:
            _send_frame(_check_pid(pid), head, payload, group, timeout)
        except (MprocError, OSError, TypeError, ValueError) as err:
            failures[pid] = err
    return failures


def _check_pid(pid: int) -> int:
    if pid.__class__ is not int:
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise TypeError(f"send() needs an int PID, got {type(pid).__name__}: {pid!r}")
        pid = int(pid)
    if pid <= 0:
        raise ValueError(f"send() needs a PID > 0, got {pid}")
    return pid


def _prepare(obj: Any, group: str, pid: Optional[int] = None) -> tuple[bytes, bytes]:
    """Return the frame's head (kind and group) and the pickled payload."""
    if group == "":
        head = _EMPTY_GROUP_HEAD
    else:
        raw_group = _encode_group(group)
        head = HEAD.pack(KIND_PICKLE, len(raw_group)) + raw_group
    try:
        payload = _dumps(obj)
    except MessageError as err:
        if pid is None:
            raise
        raise MessageError(f"{err} (to PID {pid}, group {group!r})", pid=pid, group=group) from (
            err.__cause__
        )
    _check_size(len(head) + len(payload), tr.DEFAULT_MAX_FRAME, pid, group, "this process's")
    return head, payload


def _check_size(size: int, limit: int, pid: Optional[int], group: str, whose: str) -> None:
    if size > limit:
        to = "" if pid is None else f" to PID {pid}"
        raise MessageError(
            f"the message{to} (group {group!r}) is {size} bytes, over {whose} "
            f"{limit}-byte frame limit; nothing was sent",
            pid=pid,
            group=group,
        )


def _send_frame(
    pid: int, head: bytes, payload: bytes, group: str, timeout: Optional[float]
) -> None:
    wait = tr.DEFAULT_TIMEOUT if timeout is None else _check_timeout(timeout)
    deadline = 0.0
    key = (pid, group)
    while True:
        link = _state.links.get(key)
        fresh = False
        if link is None:
            if not deadline:
                deadline = time.monotonic() + wait
            link, fresh = _link(pid, group, deadline)
        _check_size(len(head) + len(payload), link.max_frame, pid, group, "the receiver's")
        # Whoever holds the lock is inside a write() bounded by SO_SNDTIMEO.
        with link.lock:
            if link.retired:  # evicted or closed while we waited for it
                link.close()
                continue
            try:
                # SO_SNDTIMEO bounds each write(): the wait for room in the
                # receiver's buffer. Set only when it changes (a syscall).
                if link.send_timeout != wait:
                    tr.set_timeouts(link.conn.fileno(), send=max(wait, 0.001))
                    link.send_timeout = wait
                _write_frame(link.fd, head, payload)
                link.after_write()
                return
            except BlockingIOError as err:
                # SO_SNDTIMEO ran out: the receiver's buffer stayed full. Part of
                # the frame may be written, so this connection can carry no more.
                _unlink(key, link)
                raise _full(pid, group, wait) from err
            except OSError as err:
                _unlink(key, link)
                if not fresh:
                    continue  # a cached connection to a mailbox since closed: look again
                raise MailboxError(
                    f"the mailbox of PID {pid} went away while sending ({err}); "
                    "the message was not delivered",
                    pid=pid,
                    group=group,
                ) from err


def _write_frame(fd: int, head: bytes, payload: bytes) -> None:
    """Write one frame exactly as ``Connection.send_bytes(head + payload)`` would.

    The bytes on the wire are multiprocessing's own framing; writing them here
    saves the Connection's per-call overhead (a third of a small send) and,
    for large payloads, the copy that concatenating them would cost.
    """
    size = len(head) + len(payload)
    if size < _SMALL_FRAME:
        data = MP_LEN.pack(size) + head + payload
        written = os.write(fd, data)
        if written != len(data):  # a short write: the receiver's buffer was nearly full
            _write_all(fd, memoryview(data)[written:])
        return
    prefix = MP_LEN.pack(size) if size <= 0x7FFFFFFF else MP_LEN.pack(-1) + MP_LEN64.pack(size)
    _write_all(fd, memoryview(prefix + head))
    _write_all(fd, memoryview(payload))


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _full(pid: int, group: str, wait: float) -> MailboxFull:
    return MailboxFull(
        f"the mailbox of PID {pid} stayed full for {wait:g} s (group {group!r}): "
        "the receiver is not keeping up; the message was not delivered",
        pid=pid,
        group=group,
    )


def open_mailbox(*, max_queue: Optional[int] = None, max_frame: Optional[int] = None) -> None:
    """Open this process's mailbox (idempotent); it normally opens by itself.

    Args:
        max_queue: messages held per group before senders are slowed down
            (default 10 000); on an open mailbox, changes it.
        max_frame: the largest message accepted, in bytes (default 1 GiB);
            senders learn it when they connect and refuse larger messages.

    Raises:
        ValueError: a limit is not a positive int, or ``max_frame`` differs from
            that of the mailbox already open (close it first).
        MailboxError: the runtime directory is unsafe or the socket cannot be made.
    """
    for name, value in (("max_queue", max_queue), ("max_frame", max_frame)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    mailbox = _state.mailbox
    if mailbox is None:
        _ensure_open(max_queue or tr.DEFAULT_MAX_QUEUE, max_frame or tr.DEFAULT_MAX_FRAME)
        return
    if max_frame is not None and max_frame != mailbox.max_frame:
        raise ValueError(
            f"the mailbox is open with max_frame={mailbox.max_frame}, which its senders "
            "were told; call close_mailbox() before opening it with another"
        )
    if max_queue is not None:
        with mailbox.lock:
            mailbox.max_queue = max_queue


def _ensure_open(
    max_queue: int = tr.DEFAULT_MAX_QUEUE, max_frame: int = tr.DEFAULT_MAX_FRAME
) -> Mailbox:
    state = _state
    mailbox = state.mailbox
    if mailbox is not None:
        return mailbox
    rt = tr.runtime()
    with state.lock:
        if state.mailbox is None:
            state.mailbox = Mailbox(rt, max_queue, max_frame)
            if not state.atexit:
                atexit.register(close_mailbox)
                state.atexit = True
        return state.mailbox


def open_for_children() -> None:
    """Open the mailbox before starting a child, so the child can always reach us.

    A mailbox that cannot open must not stop the child from starting; the
    child's ``send()`` to us will report the problem instead.
    """
    try:
        _ensure_open()
    except MailboxError as err:
        log.warning("mproc: could not open this process's mailbox: %s", err)


def close_mailbox() -> None:
    """Close this process's mailbox and its connections; remove its socket file.

    Messages not yet received are discarded. A later ``receive()`` opens a new one.
    """
    state = _state
    with state.lock:
        mailbox, state.mailbox = state.mailbox, None
        links = list(state.links.values())
        state.links.clear()
    for link in links:
        link.retire()
    if mailbox is not None and mailbox.pid == os.getpid():
        mailbox.close()


def receive(group: str = "", timeout: Optional[float] = None) -> Msg:
    """Take the next message of ``group`` from this process's mailbox (opening it).

    Args:
        group: only messages sent to this group are returned.
        timeout: seconds to wait; ``None`` waits for ever.

    Returns:
        The :class:`Msg`, with the sender's PID as the kernel reports it.

    Raises:
        ReceiveTimeout: nothing arrived within ``timeout``.
        MessageError: this message cannot be unpickled here (it is consumed; the
            next ``receive()`` works).
        MailboxError: the mailbox cannot open, or was closed while waiting.
    """
    _encode_group(group)
    wait = _check_timeout(timeout)  # before opening: bad input has no side effect
    return _ensure_open().get(group, wait)


def _after_fork_in_child() -> None:
    global _state
    old = _state
    _state = _State()
    # Close (never shut down) the inherited sockets: the parent still uses them.
    for link in old.links.values():
        link.conn.close()
    if old.mailbox is not None:
        old.mailbox.forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
