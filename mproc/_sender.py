"""The sending side of the mailbox: one connection per receiver, credit flow control.

A process keeps one authenticated connection (a :class:`Link`) per
receiving process, whatever the number of groups, and reuses it (at most
:data:`MAX_LINKS`; idle ones are evicted oldest first). A message to a new
group costs what a message to a known one costs: the group travels in the
frame and every group starts with the receiver's whole window of credit.

Interrupts: a link is *dirty* from the first byte written (or read) of a
frame until the frame is complete. An exception that escapes in between —
a ``KeyboardInterrupt`` from a signal handler included — leaves it dirty,
and the next thread to take the link closes it instead of writing after a
half frame. The receiver drops the partial frame at the end of that
connection and reads this process's next connection only after it, so
order holds across the reconnect.
"""

from __future__ import annotations

import bisect
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Generator, Sequence
from types import FrameType
from typing import Any, Optional, Union

from . import _bulk
from . import _runtime as rt
from . import _wire as wire
from ._errors import (
    HandshakeError,
    MailboxError,
    MailboxFull,
    MailboxGone,
    MailboxNotFound,
    MailboxTimeout,
    MessageError,
    MprocError,
    NoSuchProcess,
)

__all__ = [
    "MAX_LINKS",
    "Link",
    "deliver",
    "deliver_many",
    "deliver_reply",
    "forget_after_fork",
    "identity_of",
    "query_stats",
    "retire_all",
    "trusts",
]

#: Connections kept open per process; idle ones beyond this are closed, oldest first.
MAX_LINKS = 128
_MAX_CREDIT = 1024  # receivers whose credit is remembered across connections
_SMALL_FRAME = 1 << 16  # smaller frames go out in one write()
_RUN_BYTES = 1 << 18  # deliver_many() writes at most about this much at once
_SMALL_HEAD = struct.Struct("!iBHQ")  # length and head of a frame under 2 GiB
_HEAD_SIZE = wire.HEAD.size
_CREDIT_SLICE = 0.05  # a thread waiting for credit re-checks the link this often
_ARM_SLACK = 0.01  # a handshake read may overrun its deadline by this much
_READ_AHEAD = 256  # a handshake read takes what has come (small: from pymalloc, not malloc)
# A HELLO can come twice (written again after an interrupt): skipped.
_CREDIT_KINDS = frozenset({wire.KIND_CREDIT, wire.KIND_HELLO})
_REPLY = wire.KIND_REPLY


class _Retry(Exception):
    """The link died under us before anything of this message was written.

    For a run of messages (:func:`deliver_many`), ``done`` of them were
    written whole before it died: the receiver holds those.
    """

    def __init__(self, done: int = 0) -> None:
        super().__init__(done)
        self.done = done


class Link:
    """A sender's connection to one receiving process."""

    __slots__ = (
        "bulk",
        "dead",
        "dirty",
        "fd",
        "identity",
        "inbuf",
        "limits",
        "lock",
        "max_frame",
        "path",
        "pid",
        "seqs",
        "sndtimeo",
        "sock",
        "window",
    )

    def __init__(self, sock: socket.socket, pid: int, path: str, max_frame: int, window: int):
        self.sock = sock
        self.fd = sock.fileno()
        self.pid = pid
        self.path = path
        # The receiver's start-time identity, from its socket's name.
        named = rt.parse_socket_name(os.path.basename(path))
        self.identity = named[1] if named is not None else ""
        self.max_frame = max_frame  # the receiver's limit, told in its HELLO
        self.window = window  # the credit every group starts with
        # Held while the socket is written or read. An RLock, whose release()
        # raises unless this thread holds it: a finally clause can release it
        # with no bytecode before (see _send_on).
        self.lock = threading.RLock()
        self.seqs: dict[bytes, int] = {}  # group -> seq of its next message
        self.limits: dict[bytes, int] = {}  # group -> first seq not yet allowed
        self.inbuf = bytearray()  # received bytes of an incomplete CREDIT frame
        self.dirty = False  # a frame was begun and not finished: never reuse
        self.dead = False
        self.sndtimeo = -1.0
        self.bulk = False  # may carry file descriptors (its HELLO said HELLO_BULK)

    def close(self) -> None:
        """Close the socket (the caller holds :attr:`lock`, or nobody else can)."""
        self.dead = True
        self.sock.close()

    def close_if_retired(self) -> None:
        """After a frame: close the socket if close_mailbox() retired the link meanwhile."""
        if self.dead:
            self.sock.close()


class _Links:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_pid: OrderedDict[int, Link] = OrderedDict()
        # (pid, mailbox epoch) -> (seqs, limits): credit kept across connections.
        self.credit: OrderedDict[tuple[int, int], tuple[dict[bytes, int], dict[bytes, int]]]
        self.credit = OrderedDict()
        # Names this process's credit to receivers (a new one after fork or exec).
        self.session = int.from_bytes(os.urandom(8), "big")


_links = _Links()


def deliver(
    pid: int,
    group: bytes,
    payload: Union[bytes, _bulk.Bulk],
    timeout: float,
    kind: int = wire.KIND_MSG,
    identity: Optional[str] = None,
) -> None:
    """Send one pickled message to ``pid`` and return when the receiver holds it.

    Args:
        pid: the receiving process.
        group: the raw group name.
        payload: the pickled object (for a CALL, preceded by its call head), or
            a :class:`~mproc._bulk.Bulk` (its buffers go in a memfd).
        timeout: seconds for the whole call: finding the mailbox, the
            handshake, waiting for credit, writing.
        kind: ``KIND_MSG`` or ``KIND_CALL``.
        identity: deliver only to the process with this start-time identity
            (a registered name's holder): another process in the PID now is
            :class:`NoSuchProcess`.

    Raises:
        NoSuchProcess, MailboxNotFound, MailboxFull, MailboxTimeout, MailboxGone,
        HandshakeError, MessageError: see :func:`mproc.send`.
    """
    link = _links.by_pid.get(pid)
    if (
        link is not None
        and (identity is None or link.identity == identity)
        and _fast_send(link, group, payload, kind)
    ):
        return
    deadline = time.monotonic() + timeout
    if payload.__class__ is not bytes:  # out-of-band buffers (mproc._bulk): make the memfd
        payload = _bulk.prepare(payload)  # type: ignore[arg-type]
    bulk = payload.__class__ is not bytes
    retried = False
    while True:
        link, fresh = _get(pid, deadline, identity, bulk)
        size = wire.HEAD.size + len(group) + len(payload)
        if size > link.max_frame:
            raise MessageError(
                f"the message to PID {pid} (group {_show(group)!r}) is {size} bytes, over "
                f"the receiver's {link.max_frame}-byte frame limit; nothing was sent",
                pid=pid,
                group=_show(group),
            )
        try:
            _send_on(link, group, payload, deadline, timeout, kind)
            return
        except _Retry:
            # A cached connection that had died (the receiver closed and
            # reopened its mailbox, say): one more try on a new one.
            if fresh or retried:
                raise _gone(pid, group, link, "the message was not delivered") from None
            retried = True


def _gone(pid: int, group: bytes, link: Link, what: str) -> MailboxGone:
    return MailboxGone(
        f"the mailbox of PID {pid} went away while sending (group {_show(group)}); {what}",
        pid=pid,
        group=_show(group),
        path=link.path,
    )


def deliver_many(
    pid: int,
    group: bytes,
    payloads: Sequence[bytes],
    timeout: float,
    identity: Optional[str] = None,
    progress: Optional[list[tuple[int, int]]] = None,
) -> None:
    """Send pickled messages to ``pid``, in order, in as few writes as credit allows.

    Returns when the receiver holds them all. Small messages go out
    together, up to :data:`_RUN_BYTES` a write; a large one goes alone.

    ``progress[0]``, if given, is ``(delivered, in flight)`` at every moment,
    stored whole: how many of ``payloads`` (a prefix) the receiver holds, and
    how many after those a write in progress carries (an interrupt there
    leaves them unknown).

    Raises:
        As :func:`deliver`; the exception's ``delivered`` attribute says how
        many of ``payloads`` (a prefix) the receiver surely holds.
    """
    deadline = time.monotonic() + timeout
    done = 0
    retried = False
    if progress is None:
        progress = [(0, 0)]
    try:
        while done < len(payloads):
            link, fresh = _get(pid, deadline, identity)
            try:
                done += _send_on(
                    link, group, b"", deadline, timeout, run=(payloads, done, progress)
                )
                retried = False
            except _Retry as err:
                done += err.done
                if err.done:
                    retried = False
                elif fresh or retried:
                    raise _gone(
                        pid, group, link, f"{done} of {len(payloads)} messages were delivered"
                    ) from None
                else:
                    retried = True
    except MprocError as err:
        # Plus those a write that timed out had finished (it says how many).
        err.delivered = done + getattr(err, "delivered", 0)  # type: ignore[attr-defined]
        raise


def deliver_reply(pid: int, call_id: int, body: bytes, timeout: float) -> None:
    """Send a REPLY frame (no credit: see :mod:`mproc._wire`) to the caller ``pid``.

    Raises:
        NoSuchProcess, MailboxNotFound, MailboxGone: the caller is gone.
        MailboxTimeout, HandshakeError, MessageError: as :func:`deliver`.
    """
    link = _links.by_pid.get(pid)
    if link is not None and _fast_send(link, b"", body, wire.KIND_REPLY, call_id):
        return
    deadline = time.monotonic() + timeout
    retried = False
    while True:
        link, fresh = _get(pid, deadline)
        if wire.HEAD.size + len(body) > link.max_frame:
            raise MessageError(
                f"the reply to PID {pid} is {len(body)} bytes, over the caller's "
                f"{link.max_frame}-byte frame limit; nothing was sent",
                pid=pid,
            )
        try:
            _send_on(link, b"", body, deadline, timeout, wire.KIND_REPLY, call_id)
            return
        except _Retry:
            if fresh or retried:
                raise MailboxGone(
                    f"the mailbox of PID {pid} went away while replying; the reply was "
                    "not delivered",
                    pid=pid,
                    path=link.path,
                ) from None
            retried = True


def _fast_send(
    link: Link,
    group: bytes,
    payload: Union[bytes, _bulk.Bulk],
    kind: int = wire.KIND_MSG,
    number: int = -1,
    nonblocking: bool = False,
) -> bool:
    """Send a small frame on a clean link with credit to spare, or return False.

    The common case, with the fewest steps; everything else (no credit, a
    large frame, a short write, an error) goes the general way.
    """
    if link.lock._is_owned():  # type: ignore[attr-defined]
        return False  # a send() interrupted on this link: the general way says so
    try:
        if not link.lock.acquire(False):
            return False
        if link.dead or link.dirty:
            return False
        if kind == _REPLY:
            seq = number  # a REPLY carries its call id and takes no credit
        else:
            seq = link.seqs.get(group, 0)
            if seq >= link.limits.get(group, link.window):
                return False  # out of credit: the general way reads what came, or waits
        size = _HEAD_SIZE + len(group) + len(payload)
        if size >= _SMALL_FRAME or size > link.max_frame:
            return False  # (a Bulk is always larger)
        data = _SMALL_HEAD.pack(size, kind, len(group), seq) + group + payload  # type: ignore[operator]
        link.dirty = True
        try:
            if nonblocking:  # an event loop's: never wait for room in the socket
                written = link.sock.send(data, socket.MSG_DONTWAIT)
            else:
                written = os.write(link.fd, data)
        except OSError:
            return False  # dirty: the general way retires it and tries a new one
        if written != len(data):
            return False  # dirty, likewise: the frame is cut
        if kind != _REPLY:
            link.seqs[group] = seq + 1
        link.dirty = False
        link.close_if_retired()
        return True
    finally:
        try:
            link.lock.release()  # an RLock: raises unless this thread holds it
        except RuntimeError:
            pass


def _show(group: bytes) -> str:
    return group.decode("utf-8", "surrogatepass")


def _send_on(
    link: Link,
    group: bytes,
    payload: Union[bytes, _bulk.Bulk],
    deadline: float,
    timeout: float,
    kind: int = wire.KIND_MSG,
    number: int = -1,
    run: Optional[tuple[Sequence[bytes], int, list[tuple[int, int]]]] = None,
) -> int:
    """Write one message, waiting for credit; return 1.

    With ``run=(payloads, start, progress)``, write as many of
    ``payloads[start:]`` as credit allows (at least one) instead, and return
    how many (see :func:`deliver_many` for ``progress``).
    """
    if link.lock._is_owned():  # type: ignore[attr-defined]
        if _suspended_here(link):
            raise RuntimeError(
                f"send() to PID {link.pid} was called (from a signal handler?) while this "
                "thread was inside another send() to it; a connection carries one frame at a time"
            )
        # Left held by a send() a signal handler interrupted inside its finally
        # clause (Python < 3.11 runs handlers there too): never reuse the link.
        link.dirty = True
        link.lock.release()
    while True:
        remaining = deadline - time.monotonic()
        try:
            # Inside the try: a signal handler raising right after the
            # acquire must still release it (in the finally clause).
            if not (link.lock.acquire(False) or link.lock.acquire(True, max(remaining, 0.001))):
                raise MailboxTimeout(
                    f"another thread of this process kept the connection to PID {link.pid} "
                    f"busy for {timeout:g} s (the receiver is not reading); the message was "
                    "not delivered",
                    pid=link.pid,
                    group=_show(group),
                )
            if link.dead or link.dirty or (payload.__class__ is not bytes and not link.bulk):
                # (A Bulk needs a connection that carries descriptors: a new one.)
                _retire(link)
                raise _Retry
            if kind == _REPLY:
                _write_msg(link, group, number, payload, deadline, timeout, kind)
                return 1
            seq = link.seqs.get(group, 0)
            limit = link.limits.get(group, link.window)
            # Credit comes every half window: look for it now and then, and
            # always before waiting (a non-blocking read).
            if seq >= limit or (limit - seq <= link.window // 2 and not seq % 8):
                _read_credits(link)
                limit = link.limits.get(group, link.window)
            if seq < limit and run is not None:
                return _write_run(link, group, run, seq, limit - seq, deadline, timeout)
            if seq < limit:
                _write_msg(link, group, seq, payload, deadline, timeout, kind)
                return 1
        finally:
            # The first call of the clause; raises if this thread does not hold it.
            try:
                link.lock.release()  # an RLock: raises unless this thread holds it
            except RuntimeError:
                pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MailboxFull(
                f"the mailbox of PID {link.pid} stayed full for {timeout:g} s (group "
                f"{_show(group)!r}): its receiver is not keeping up; the message was not "
                "delivered",
                pid=link.pid,
                group=_show(group),
            )
        # Wait for a CREDIT frame without holding the lock, so that other
        # threads keep sending to other groups meanwhile. A closed and reused
        # fd number only wakes us early: the link is checked under the lock.
        poller = select.poll()
        poller.register(link.fd, select.POLLIN)
        poller.poll(min(remaining, _CREDIT_SLICE) * 1000)


def _write_msg(
    link: Link,
    group: bytes,
    seq: int,
    payload: Union[bytes, _bulk.Bulk],
    deadline: float,
    timeout: float,
    kind: int = wire.KIND_MSG,
) -> None:
    """Write one MSG (CALL, REPLY) frame (lock held); on any failure the link is left dirty."""
    _bound_writes(link, deadline)
    link.dirty = True
    try:
        size = wire.HEAD.size + len(group) + len(payload)
        if size < _SMALL_FRAME:
            data = _SMALL_HEAD.pack(size, kind, len(group), seq) + group + payload  # type: ignore[operator]
            written = os.write(link.fd, data)
            if written != len(data):  # the receiver's buffer was nearly full
                _write_all(link.fd, memoryview(data)[written:])
        elif payload.__class__ is not bytes:  # its memfd goes with it (mproc._bulk)
            body = _bulk.body_size(payload)  # type: ignore[arg-type]
            prefix = wire.msg_prefix(group, seq, body, wire.KIND_BULK)
            _write_all(link.fd, memoryview(_bulk.write(link.sock, prefix, payload)))  # type: ignore[arg-type]
        else:
            _write_all(link.fd, memoryview(wire.msg_prefix(group, seq, len(payload), kind)))
            _write_all(link.fd, memoryview(payload))
    except BlockingIOError as err:  # SO_SNDTIMEO ran out in the middle of the frame
        _retire(link)
        raise MailboxTimeout(
            f"the mailbox of PID {link.pid} did not read for {timeout:g} s (is it "
            "stopped?); the message was not delivered",
            pid=link.pid,
            group=_show(group),
        ) from err
    except OSError as err:
        _retire(link)
        raise _Retry from err
    if kind != _REPLY:
        link.seqs[group] = seq + 1
    link.dirty = False
    link.close_if_retired()


def _write_run(
    link: Link,
    group: bytes,
    run: tuple[Sequence[bytes], int, list[tuple[int, int]]],
    seq: int,
    room: int,
    deadline: float,
    timeout: float,
) -> int:
    """Write the next messages of a run (lock held) in one go; return how many.

    At most ``room`` (the credit left) and about :data:`_RUN_BYTES`; a
    message of :data:`_SMALL_FRAME` bytes or more goes alone. On failure
    the messages written whole count as sent (``_Retry.done``); the cut
    one is not, and the link is left dirty.
    """
    payloads, start, progress = run
    first = payloads[start]
    size = _HEAD_SIZE + len(group) + len(first)
    if size > link.max_frame:
        raise MessageError(
            f"a message to PID {link.pid} (group {_show(group)!r}) is {size} bytes, over "
            f"the receiver's {link.max_frame}-byte frame limit; it and the messages after "
            "it were not sent",
            pid=link.pid,
            group=_show(group),
        )
    if size >= _SMALL_FRAME:
        progress[0] = (start, 1)
        _write_msg(link, group, seq, first, deadline, timeout)
        progress[0] = (start + 1, 0)
        return 1
    parts: list[bytes] = []
    ends: list[int] = []  # where each message ends in the joined bytes
    total = 0
    glen = len(group)
    for i in range(start, min(start + room, len(payloads))):
        payload = payloads[i]
        size = _HEAD_SIZE + glen + len(payload)
        if size >= _SMALL_FRAME or size > link.max_frame:
            break  # it goes alone, next time
        parts.append(_SMALL_HEAD.pack(size, wire.KIND_MSG, glen, seq + len(ends)))
        parts.append(group)
        parts.append(payload)
        total += size + 4
        ends.append(total)
        if total >= _RUN_BYTES:
            break
    data = memoryview(b"".join(parts))
    _bound_writes(link, deadline)
    link.dirty = True
    progress[0] = (start, len(ends))
    written = 0
    try:
        while written < total:
            written += os.write(link.fd, data[written:])
    except OSError as err:
        whole = bisect.bisect_right(ends, written)
        if whole:
            link.seqs[group] = seq + whole
        progress[0] = (start + whole, 0)
        _retire(link)
        if isinstance(err, BlockingIOError):  # SO_SNDTIMEO ran out
            timed_out = MailboxTimeout(
                f"the mailbox of PID {link.pid} did not read for {timeout:g} s (is it "
                f"stopped?); {whole} of the {len(ends)} messages written were delivered",
                pid=link.pid,
                group=_show(group),
            )
            timed_out.delivered = whole  # type: ignore[attr-defined]
            raise timed_out from err
        raise _Retry(whole) from err
    link.seqs[group] = seq + len(ends)
    progress[0] = (start + len(ends), 0)
    link.dirty = False
    link.close_if_retired()
    return len(ends)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _bound_writes(link: Link, deadline: float) -> None:
    """Make the link's blocking writes give up at ``deadline`` (SO_SNDTIMEO, set when it moved)."""
    wait = max(deadline - time.monotonic(), 0.001)
    if abs(link.sndtimeo - wait) > 0.05:
        _set_sndtimeo(link.sock, wait)
        link.sndtimeo = wait


def _set_sndtimeo(sock: socket.socket, seconds: float) -> None:
    sec = int(seconds)
    usec = max(int((seconds - sec) * 1_000_000), 1 if sec == 0 else 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(sec, usec))


def _timeval(sec: int, usec: int) -> bytes:
    return struct.pack("ll", sec, usec)


def _read_credits(link: Link) -> None:
    """Take every CREDIT frame that has arrived, without blocking (lock held)."""
    link.dirty = True
    while True:
        try:
            data = link.sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            break
        except OSError as err:
            _retire(link)
            raise _Retry from err
        if not data:  # EOF: the receiver closed the connection
            _retire(link)
            raise _Retry
        link.inbuf += data
        # A copy to parse: views into inbuf would keep it from shrinking.
        frames, used, _need, bad = wire.parse(bytes(link.inbuf), 1 << 20, _CREDIT_KINDS)
        for kind, group, limit, _payload in frames:
            if kind == wire.KIND_CREDIT and limit > link.limits.get(group, link.window):
                link.limits[group] = limit
        del link.inbuf[:used]
        if bad:
            _retire(link)
            raise HandshakeError(
                f"the mailbox of PID {link.pid} sent {bad}; closing the connection",
                pid=link.pid,
                path=link.path,
            )
    link.dirty = False


def _retire(link: Link) -> None:
    """Forget and close a link (its lock held by the caller)."""
    with _links.lock:
        if _links.by_pid.get(link.pid) is link:
            del _links.by_pid[link.pid]
    link.close()


def identity_of(pid: int) -> Optional[str]:
    """The start-time identity of the process our open connection to ``pid`` reaches, if any."""
    link = _links.by_pid.get(pid)
    return link.identity if link is not None and not link.dead else None


def trusts(pid: int, identity: str) -> bool:
    """Whether our open connection to ``pid`` reaches exactly the process ``identity``."""
    link = _links.by_pid.get(pid)
    return link is not None and not link.dead and link.identity == identity


def _get(
    pid: int, deadline: float, identity: Optional[str] = None, bulk: bool = False
) -> tuple[Link, bool]:
    link = _links.by_pid.get(pid)  # a dict read is atomic: no lock on the hot path
    if link is not None and not link.dead and (identity is None or link.identity == identity):
        return link, False  # (one that cannot carry descriptors is retired by _send_on)
    return install(pid, _connect(pid, deadline, identity, bulk=bulk))


def install(pid: int, new: Link) -> tuple[Link, bool]:
    """Make a new connection the link to ``pid`` (unless another thread's won); evict idle ones.

    Returns:
        ``(link, fresh)``: the link to use, and whether it is ``new``.
    """
    with _links.lock:
        existing = _links.by_pid.get(pid)
        if existing is new:  # installed already (an attempt shared by several sends)
            return new, False
        if existing is not None and not existing.dead:
            if existing.identity == new.identity and (existing.bulk or not new.bulk):
                new.close()  # another thread won: its connection is the one
                return existing, False
            # A connection to an earlier process of this PID (it is gone), or
            # one that cannot carry the descriptors of a bulk send.
            existing.dead = True  # its writer, if any, closes it when done
            _links.by_pid[pid] = new
            if existing.lock.acquire(False):
                try:
                    existing.sock.close()
                finally:
                    existing.lock.release()
        _links.by_pid[pid] = new
        excess = list(_links.by_pid.values())[: max(len(_links.by_pid) - MAX_LINKS, 0)]
    # Only links nobody is using are evicted: closing one under a writer would
    # let the kernel hand its fd number to a new socket mid-frame.
    for old in excess:
        try:
            if old.lock.acquire(False):
                with _links.lock:
                    if _links.by_pid.get(old.pid) is old:
                        del _links.by_pid[old.pid]
                old.close()
        finally:
            try:
                old.lock.release()  # an RLock: raises unless this thread holds it
            except RuntimeError:
                pass
    return new, True


_STATS_KINDS = frozenset({wire.KIND_CREDIT, wire.KIND_HELLO, wire.KIND_STATS_REPLY})


def query_stats(pid: int, timeout: float) -> dict[str, Any]:
    """Ask the mailbox of ``pid`` to describe itself (its reader answers, not its code).

    A connection of its own, closed afterwards: the query never disturbs
    this process's links (or their order guarantees).

    Raises:
        NoSuchProcess, MailboxNotFound, MailboxTimeout, HandshakeError: as :func:`deliver`.
        MailboxGone: the mailbox closed the connection before answering.
    """
    deadline = time.monotonic() + timeout
    link = _connect(pid, deadline, control=True)
    try:
        request = int.from_bytes(os.urandom(4), "big")
        link.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        link.sock.sendall(wire.frame(wire.HEAD.pack(wire.KIND_STATS, 0, request)))
        buf = bytes(link.inbuf)  # read with the handshake's last frame, if anything
        while True:
            try:
                chunk = link.sock.recv(1 << 16)
            except socket.timeout:
                raise MailboxTimeout(
                    f"the mailbox of PID {pid} did not answer a stats query within {timeout:g} s",
                    pid=pid,
                    path=link.path,
                ) from None
            if not chunk:
                raise MailboxGone(
                    f"the mailbox of PID {pid} closed before answering a stats query",
                    pid=pid,
                    path=link.path,
                )
            buf += chunk
            frames, used, _need, bad = wire.parse(buf, 1 << 26, _STATS_KINDS)
            if bad:
                raise HandshakeError(f"the mailbox of PID {pid} sent {bad}", pid=pid)
            for kind, _group, number, payload in frames:
                if kind == wire.KIND_STATS_REPLY and number == request:
                    answer: dict[str, Any] = json.loads(bytes(payload))
                    return answer
            buf = buf[used:]
            link.sock.settimeout(max(deadline - time.monotonic(), 0.001))
    finally:
        link.close()


def retire_all() -> None:
    """Close every link (``close_mailbox()``); links in use close when their writer is done."""
    with _links.lock:
        links = list(_links.by_pid.values())
        _links.by_pid.clear()
    for link in links:
        if link.lock._is_owned():  # type: ignore[attr-defined]
            # From a signal handler that interrupted a send() on it: closing the
            # fd under that send could hand its number to another file.
            link.dead = True  # that send closes it when its frame is done
            continue
        if link.lock.acquire(timeout=5.0):
            try:
                link.close()
            finally:
                link.lock.release()
        else:
            link.dead = True  # its writer closes it when its frame is done


def forget_after_fork() -> None:
    """In a forked child: close (never shut down) the parent's links, share nothing."""
    global _links
    old, _links = _links, _Links()
    for link in old.by_pid.values():
        link.sock.close()


# ---------------------------------------------------------------- connecting


def mailbox_path(runtime: rt.Runtime, pid: int, expect: Optional[str]) -> str:
    """The socket path of the mailbox of ``pid`` as it is now.

    Raises:
        NoSuchProcess: no such process, or (``expect`` given) another process
            than the one with that start-time identity has the PID now.
    """
    identity = rt.proc_identity(pid)
    if identity is None or (expect is not None and identity != expect):
        raise NoSuchProcess(f"cannot send to PID {pid}: no such process", pid=pid)
    return rt.socket_path(runtime, pid, identity)


def connect_failed(pid: int, path: str, err: OSError) -> MailboxError:
    """The error for a connect() that failed otherwise than "not there (yet)"."""
    return MailboxError(
        f"cannot connect to the mailbox of PID {pid} at {path}: {err}", pid=pid, path=path
    )


def not_open(pid: int, path: str) -> MailboxNotFound:
    """The error for a live process whose mailbox did not open in time."""
    return MailboxNotFound(
        f"PID {pid} is alive but has no open mailbox at {path}; it opens one with "
        "mproc.receive() or mproc.open_mailbox()",
        pid=pid,
        path=path,
    )


def _connect(
    pid: int,
    deadline: float,
    expect: Optional[str] = None,
    control: bool = False,
    bulk: bool = False,
) -> Link:
    """Open an authenticated connection to the mailbox of ``pid``, waiting for it to open.

    ``expect``: the process's start-time identity; another process in the
    PID now is :class:`NoSuchProcess`.
    """
    runtime = rt.runtime()
    delay = 0.0005
    while True:
        path = mailbox_path(runtime, pid, expect)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        except OSError as err:
            sock.close()
            raise connect_failed(pid, path, err) from err
        except BaseException:
            sock.close()
            raise
        else:
            try:
                return _handshake(sock, runtime, pid, path, deadline, control, bulk)
            except BaseException:
                sock.close()
                raise
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise not_open(pid, path)
        # The receiver's start-up is usually a few ms: poll the file with back-off.
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


def _handshake(
    sock: socket.socket,
    runtime: rt.Runtime,
    pid: int,
    path: str,
    deadline: float,
    control: bool = False,
    bulk: bool = False,
) -> Link:
    check_peer(sock, pid, path)
    # The mailbox is there: give the handshake a fair chance even when the
    # caller's deadline is (nearly) spent, e.g. send(timeout=0) — but a
    # control query (mproc ps) keeps to its deadline.
    left = deadline - time.monotonic()
    budget = min(max(left, 0.001 if control else rt.HANDSHAKE_MIN), rt.HANDSHAKE_TIMEOUT)
    io = _Blocking(sock, time.monotonic() + budget, pid, path, budget)
    key = runtime.key
    # The steps of handshake_steps(), straight through (a generator and its
    # driver cost a freshly forked sender a fifth of its first send()): our
    # challenge goes in one write with our answer, our verdict with our HELLO.
    mine = wire.challenge()
    io.write(wire.frame(_answer(key, io.recv("its challenge"), pid, path)) + wire.frame(mine))
    if io.recv("its verdict on our key") != wire.WELCOME:
        raise _key_refused(pid, path)
    if not wire.verify(key, mine, io.recv("the answer to our challenge")):
        io.write_quietly(wire.frame(wire.FAILURE))  # a courtesy
        raise _key_unknown(pid, path)
    io.write(wire.frame(wire.WELCOME) + wire.frame(_hello(control, bulk)))
    max_frame, window, epoch = _their_hello(io.recv("its HELLO"), pid, path)
    sock.settimeout(None)
    link = new_link(sock, pid, path, max_frame, window, epoch, control, bytes(io.buf))
    link.bulk = bulk  # it may carry descriptors (mproc._bulk)
    return link


def check_peer(sock: socket.socket, pid: int, path: str) -> None:
    """Check that the socket's peer is ``pid`` of our uid (SO_PEERCRED)."""
    try:
        peer_pid, peer_uid = rt.peer_credentials(sock)
    except OSError as err:
        raise MailboxError(f"cannot identify the mailbox at {path}: {err}", path=path) from err
    if peer_uid != os.getuid() or peer_pid != pid:
        raise HandshakeError(
            f"the mailbox socket {path} is held by PID {peer_pid} of uid {peer_uid}; "
            f"only PID {pid} of uid {os.getuid()} (you) may hold it; refusing to send",
            pid=pid,
            path=path,
        )


#: A handshake step: ("send", frame body) or ("recv", what we wait for).
Step = tuple[str, Any]


def handshake_steps(
    key: bytes, pid: int, path: str, control: bool, bulk: bool = False
) -> Generator[Step, bytes, tuple[int, int, int]]:
    """The sender's side of the handshake, without I/O (driven by a blocking or async caller).

    Yields the frames to send and what to receive next (``send()`` it the
    received body); returns the receiver's ``(max_frame, window, epoch)``.
    """
    # multiprocessing's order: the client answers first, then challenges; our
    # challenge goes out right behind our answer, without waiting for the
    # verdict on it (the mailbox answers it only once it has checked our key,
    # so it learns nothing it did not earn). The blocking _handshake() takes
    # these steps straight through, writing each flight at once: one round
    # trip less per new connection than waiting for the verdict first.
    challenge = yield ("recv", "its challenge")
    yield ("send", _answer(key, challenge, pid, path))
    mine = wire.challenge()
    yield ("send", mine)
    if (yield ("recv", "its verdict on our key")) != wire.WELCOME:
        raise _key_refused(pid, path)
    if not wire.verify(key, mine, (yield ("recv", "the answer to our challenge"))):
        yield ("send", wire.FAILURE)
        raise _key_unknown(pid, path)
    yield ("send", wire.WELCOME)
    yield ("send", _hello(control, bulk))
    return _their_hello((yield ("recv", "its HELLO")), pid, path)


def _answer(key: bytes, challenge: bytes, pid: int, path: str) -> bytes:
    try:
        return wire.answer(key, challenge)
    except ValueError as err:
        raise HandshakeError(
            f"the mailbox of PID {pid} at {path} sent no valid challenge: it is not an "
            "mproc mailbox of this version",
            pid=pid,
            path=path,
        ) from err


def _key_refused(pid: int, path: str) -> HandshakeError:
    return HandshakeError(
        f"the mailbox of PID {pid} at {path} refused our key: it uses another key "
        "file (is MPROC_RUNTIME_DIR the same for both processes?)",
        pid=pid,
        path=path,
    )


def _key_unknown(pid: int, path: str) -> HandshakeError:
    return HandshakeError(
        f"the mailbox of PID {pid} at {path} does not know our key; refusing to send",
        pid=pid,
        path=path,
    )


def _hello(control: bool, bulk: bool = False) -> bytes:
    """The body of our HELLO (its window field holds our flags)."""
    flags = (wire.HELLO_CONTROL if control else 0) | (wire.HELLO_BULK if bulk else 0)
    return wire.hello(window=flags, epoch=_links.session)[wire.LEN.size :]


def _their_hello(body: bytes, pid: int, path: str) -> tuple[int, int, int]:
    try:
        _version, max_frame, window, epoch = wire.parse_hello(body)
    except ValueError as err:
        raise HandshakeError(
            f"the mailbox of PID {pid} at {path}: {err}", pid=pid, path=path
        ) from err
    return max_frame, window, epoch


def new_link(
    sock: socket.socket,
    pid: int,
    path: str,
    max_frame: int,
    window: int,
    epoch: int,
    control: bool = False,
    leftover: bytes = b"",
) -> Link:
    """A :class:`Link` on a socket that finished the handshake (credit carried over).

    ``leftover``: bytes read after the receiver's HELLO (CREDIT frames the
    reader sent at once, on a reconnect): taken as :func:`_read_credits` takes them.
    """
    link = Link(sock, pid, path, max_frame, max(window, 1))
    link.inbuf += leftover
    if control:
        return link  # no messages on it: no credit to carry on
    # The credit of this process with that mailbox (named by its epoch) goes
    # on from the last connection: the receiver carries it over too, so a
    # reconnect does not add a window to what a full group holds.
    with _links.lock:
        saved = _links.credit.pop((pid, epoch), None)
        if saved is not None:
            link.seqs, link.limits = saved
        _links.credit[(pid, epoch)] = (link.seqs, link.limits)
        while len(_links.credit) > _MAX_CREDIT:
            _links.credit.popitem(last=False)  # the receiver accepts a fresh start too
    if leftover:
        frames, used, _need, bad = wire.parse(leftover, 1 << 20, _CREDIT_KINDS)
        if bad:
            raise HandshakeError(
                f"the mailbox of PID {pid} at {path} sent {bad} after its HELLO",
                pid=pid,
                path=path,
            )
        for kind, group, limit, _payload in frames:
            if kind == wire.KIND_CREDIT and limit > link.limits.get(group, link.window):
                link.limits[group] = limit
        del link.inbuf[:used]
    return link


class _Blocking:
    """Handshake frames over a blocking socket, all within one deadline.

    Frames are read as many at a time as have arrived (the peer writes its
    verdict and its answer together); what is left after the last one stays
    in :attr:`buf`.
    """

    def __init__(
        self, sock: socket.socket, deadline: float, pid: int, path: str, budget: float
    ) -> None:
        self.sock = sock
        self.deadline = deadline
        self.pid = pid
        self.path = path
        self.budget = budget
        self.buf = bytearray()
        self.armed = -1.0  # the socket timeout we set last (-1: not yet)

    def write_quietly(self, data: bytes) -> None:
        try:
            self.write(data)
        except MprocError:
            pass

    def _arm(self, waiting_for: str) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._timeout(waiting_for)
        # Each blocking call may wait the socket's timeout: keep it within the
        # deadline (give or take _ARM_SLACK), setting it again only when needed.
        if self.armed < 0 or self.armed > remaining + _ARM_SLACK:
            self.sock.settimeout(remaining)
            self.armed = remaining

    def _timeout(self, waiting_for: str) -> MailboxTimeout:
        return MailboxTimeout(
            f"the mailbox of PID {self.pid} at {self.path} did not answer the handshake "
            f"within {self.budget:g} s (waiting for {waiting_for}); it may be stopped or "
            "overloaded",
            pid=self.pid,
            path=self.path,
        )

    def write(self, data: bytes) -> None:
        """Write whole frames (one flight of ours)."""
        try:
            # A handshake flight is a few frames on a socket we have barely
            # used: it fits at once. A timed sendall() would poll() first.
            written = os.write(self.sock.fileno(), data)
        except BlockingIOError:
            written = 0
        except OSError as err:
            raise self._refused(err) from err
        if written == len(data):
            return
        self._arm("room to write")
        try:
            self.sock.sendall(data[written:])
        except socket.timeout as err:
            raise self._timeout("room to write") from err
        except OSError as err:
            raise self._refused(err) from err

    def recv(self, waiting_for: str) -> bytes:
        """The body of the next frame (``waiting_for`` names it in errors)."""
        self._fill(wire.LEN.size, waiting_for)
        (size,) = wire.LEN.unpack_from(self.buf)
        if not 0 < size <= wire.MAX_HANDSHAKE_FRAME:
            raise HandshakeError(
                f"the mailbox of PID {self.pid} at {self.path} sent a {size}-byte handshake "
                "frame: it is not an mproc mailbox of this version",
                pid=self.pid,
                path=self.path,
            )
        self._fill(wire.LEN.size + size, waiting_for)
        body = bytes(self.buf[wire.LEN.size : wire.LEN.size + size])
        del self.buf[: wire.LEN.size + size]
        return body

    def _fill(self, n: int, waiting_for: str) -> None:
        while len(self.buf) < n:
            self._arm(waiting_for)
            try:
                chunk = self.sock.recv(_READ_AHEAD)
            except socket.timeout as err:
                raise self._timeout(waiting_for) from err
            except OSError as err:
                raise self._refused(err) from err
            if not chunk:
                raise self._refused(None)
            self.buf += chunk

    def _refused(self, err: Optional[OSError]) -> MprocError:
        why = "closed the connection" if err is None else f"failed ({err})"
        if _exits_soon(self.pid):
            # It exited (or is exiting) under us: not a matter of keys.
            return NoSuchProcess(
                f"PID {self.pid} exited during the handshake with its mailbox at {self.path}",
                pid=self.pid,
                path=self.path,
            )
        return HandshakeError(
            f"the mailbox of PID {self.pid} at {self.path} {why} during the handshake: it "
            "uses another key (another MPROC_RUNTIME_DIR?), refused our uid, or is "
            "closing",
            pid=self.pid,
            path=self.path,
        )


def _exits_soon(pid: int, within: float = 0.2) -> bool:
    """Whether ``pid`` is gone or exits within ``within`` seconds (a reset may come
    from a process in the middle of exiting: its listener closes before it is a zombie)."""
    if rt.proc_identity(pid) is None:
        return True
    try:
        fd = os.pidfd_open(pid)  # type: ignore[attr-defined,unused-ignore]
    except (AttributeError, OSError):
        return rt.proc_identity(pid) is None
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(within * 1000)) or rt.proc_identity(pid) is None
    finally:
        os.close(fd)


def _suspended_here(link: Link) -> bool:
    """Whether a send() on ``link`` is suspended further up this thread's stack."""
    frame: Optional[FrameType] = sys._getframe(2)  # above the caller
    while frame is not None:
        if frame.f_code in _SEND_CODES and frame.f_locals.get("link") is link:
            return True
        frame = frame.f_back
    return False


_SEND_CODES = frozenset(
    {_send_on.__code__, _fast_send.__code__, _write_msg.__code__, _write_run.__code__}
)
