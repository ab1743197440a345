"""PID-addressed messages: ``send(pid, obj)`` / ``receive()`` (SPEC §5).

A process's mailbox is a :class:`multiprocessing.connection.Listener` on an
AF_UNIX socket in the runtime directory. Senders keep one authenticated
connection per receiver and reuse it; the receiver serves all of them from
one I/O thread (a selector), so a slow, stalled or hostile peer costs it
nothing but that peer's connection.

Wire format, inside multiprocessing's own length-prefixed frames (the sender
writes them with ``Connection.send_bytes``)::

    u8 kind | u16 len(group) | group (UTF-8) | pickle (protocol 5)

Delivery: ``send()`` returns once the whole frame is in the receiver's socket
buffer, i.e. held by the receiving process. The receiver parses frames into
bounded per-group queues; when a group's queue is full it stops reading that
connection, the socket buffer fills, and the sender blocks (back-pressure)
until there is room or its timeout passes (:class:`MailboxFull`).
"""

from __future__ import annotations

import atexit
import collections
import multiprocessing
import os
import pickle
import selectors
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing import connection as mpc
from typing import Any, Optional, overload

import cloudpickle

from . import _transport as tr
from ._errors import MailboxError, MailboxFull, MessageError, MprocError, ReceiveTimeout
from ._log import logger

__all__ = ["Msg", "close_mailbox", "open_mailbox", "receive", "send"]

log = logger

_HEAD = struct.Struct("!BH")  # kind, length of the group name
_KIND_PICKLE = 0
_EMPTY_GROUP_HEAD = _HEAD.pack(_KIND_PICKLE, 0)
_MP_LEN = struct.Struct("!i")  # multiprocessing's frame header...
_MP_LEN64 = struct.Struct("!Q")  # ...and its extension for frames over 2 GiB
_FRAME = struct.Struct("!iBH")  # both headers of a frame under 2 GiB, read at once
_IDLE = 0.02  # no receive() for this long: the background thread reads
_ACCEPT_BACKOFF = 0.05  # after a failed accept() (e.g. out of fds)
_HANDOVER = 0.5  # the most a poll waits for the background reader to step down
_BACKGROUND = "background"
_CONSUMER = "consumer"
_READ_CHUNK = 1 << 18
_BIG_FRAME = 1 << 20  # frames this large are read straight into their own buffer
_SMALL_FRAME = 1 << 16  # smaller frames go out in one write()
_MAX_LINKS = 128  # open sender connections kept per process (oldest evicted)
# cloudpickle's registry of modules to pickle by value; plain pickle ignores it.
_BY_VALUE: Any = getattr(getattr(cloudpickle, "cloudpickle", None), "_PICKLE_BY_VALUE_MODULES", ())


@dataclass(frozen=True)
class Msg:
    """A message taken from this process's mailbox.

    Attributes:
        sender_pid: the sending process, as the kernel reports it (SO_PEERCRED).
        receiver_pid: this process.
        group: the group it was sent to.
        data: the object that was sent.
    """

    sender_pid: int
    receiver_pid: int
    group: str
    data: Any


# ---------------------------------------------------------------- pickling


def _dumps(obj: Any) -> bytes:
    """Pickle ``obj`` so that an unrelated process can rebuild it.

    Plain pickle is ~3x faster than cloudpickle but refers to functions and
    classes by name; that breaks for lambdas, closures and anything defined in
    ``__main__`` (the receiver's ``__main__`` is another module). So plain
    pickle is used only when it succeeds and names nothing in ``__main__``.
    """
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


# ---------------------------------------------------------------- receiving


class _Group:
    __slots__ = ("cond", "paused", "queue", "users", "waiting")

    def __init__(self, lock: threading.Lock) -> None:
        self.queue: collections.deque[tuple[int, Any]] = collections.deque()
        self.cond = threading.Condition(lock)
        self.waiting = 0  # receivers blocked on cond
        self.users = 0  # receivers inside get() for this group, leader included
        self.paused: list[_Peer] = []


class _Peer:
    """One sender's connection as the I/O thread sees it."""

    __slots__ = ("active", "big", "big_got", "buf", "conn", "fd", "pending", "pid")

    def __init__(self, conn: mpc.Connection, pid: int) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        self.pid = pid
        self.buf = bytearray()
        self.big: Optional[bytearray] = None  # a large frame being read in place
        self.big_got = 0
        self.pending: list[tuple[str, Any]] = []  # parsed, waiting for queue room
        self.active = False  # registered with the selector (not paused)


class _Mailbox:
    """The receiving side of this process: listener, readers, group queues.

    Reading is leader/follower: a thread blocked in ``receive()`` reads the
    sockets itself (one wake-up per message, as a plain pipe read would), and
    threads waiting for other groups are handed what it reads. When nobody has
    been receiving for :data:`_IDLE` seconds, a background thread takes over
    the reading, so senders can queue up to ``max_queue`` messages per group
    before anyone calls ``receive()`` (gproc's behaviour).
    """

    def __init__(self, rt: tr.Runtime, max_queue: int, max_frame: int) -> None:
        self.pid = os.getpid()
        self.max_queue = max_queue
        self.max_frame = max_frame
        self.rt = rt
        tr.remove_stale(rt)
        self.path = tr.socket_path(rt, self.pid, tr.proc_identity(self.pid) or "0")
        try:
            os.unlink(self.path)  # ours by name; left by a close that never ran
        except FileNotFoundError:
            pass
        try:
            self.listener = mpc.Listener(self.path, family="AF_UNIX", backlog=512)
        except OSError as err:
            raise MailboxError(
                f"cannot open the mailbox socket {self.path}: {err}", path=self.path
            ) from err
        self.lock = threading.Lock()
        self.groups: dict[str, _Group] = {}
        self.peers: dict[int, _Peer] = {}
        self.new_peers: list[_Peer] = []
        self.closed = False
        self.resume_asked = False
        # Who reads the sockets now: None, _BACKGROUND or _CONSUMER.
        self.leader: Optional[str] = None
        self.background_yield = False
        self.last_consumer = time.monotonic()
        self.leader_cond = threading.Condition(self.lock)  # close() waits on it
        self.background_cond = threading.Condition(self.lock)
        self.scratch = bytearray(_READ_CHUNK)
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)  # written under the lock: must never block
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.background = threading.Thread(
            target=self._background_loop, name="mproc-mailbox-reader", daemon=True
        )
        self.accept_thread = threading.Thread(
            target=self._accept_loop, name="mproc-mailbox-accept", daemon=True
        )
        self.background.start()
        self.accept_thread.start()

    def _is_closed(self) -> bool:
        return self.closed

    # -- accepting

    def _accept_loop(self) -> None:
        while not self._is_closed():
            try:
                conn = self.listener.accept()
            except OSError as err:
                if self._is_closed():
                    return
                log.debug("mailbox %s: accept failed: %r", self.path, err)
                # E.g. EMFILE: the pending connection stays; don't spin on it.
                time.sleep(_ACCEPT_BACKOFF)
                continue
            if self._is_closed():
                conn.close()
                return
            threading.Thread(
                target=self._admit, args=(conn,), name="mproc-mailbox-handshake", daemon=True
            ).start()

    def _admit(self, conn: mpc.Connection) -> None:
        """Check the peer's uid, run the HMAC handshake, then hand it to the readers."""
        pid = -1
        try:
            with socket.socket(fileno=os.dup(conn.fileno())) as sock:
                pid, uid = tr.peer_credentials(sock)
            if uid != os.getuid():
                log.debug("mailbox %s: refused PID %d: uid %d is not ours", self.path, pid, uid)
                conn.close()
                return
            tr.handshake_server(conn, self.rt.key)
            tr.set_timeouts(conn.fileno(), recv=0, send=0)
        except (OSError, EOFError, multiprocessing.AuthenticationError) as err:
            log.debug("mailbox %s: refused PID %d: handshake failed: %r", self.path, pid, err)
            conn.close()
            return
        with self.lock:
            if self.closed:
                conn.close()
                return
            self.new_peers.append(_Peer(conn, pid))
        self._wake()
        # Only now, with the peer known to the readers, may it start sending:
        # whatever send() it then completes, the next receive() must find.
        try:
            tr.send_hello(conn, self.max_frame)
        except OSError as err:
            log.debug("mailbox %s: PID %d left during the handshake: %r", self.path, pid, err)

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"w")
        except OSError:
            pass  # a full pipe wakes the reader just as well

    # -- leadership

    def _background_loop(self) -> None:
        while True:
            with self.lock:
                while True:
                    if self.closed:
                        return
                    idle = time.monotonic() - self.last_consumer
                    if self.leader is None and idle >= _IDLE:
                        self.leader = _BACKGROUND
                        self.background_yield = False
                        break
                    # Checked now and then, never woken per message.
                    self.background_cond.wait(_IDLE if self.leader else max(_IDLE - idle, 0.001))
            try:
                while not self.background_yield and not self.closed:
                    self._pump(None)
            except Exception:
                log.exception("mailbox %s: reader failed", self.path)
            finally:
                with self.lock:
                    self._step_down()

    def _step_down(self) -> None:
        """Give up reading (lock held): let one waiting receiver lead instead."""
        self.leader = None
        if self.closed:
            self.leader_cond.notify_all()
        for g in self.groups.values():
            if g.waiting:
                g.cond.notify()

    # -- reading (only the leader runs these)

    def _pump(self, timeout: Optional[float]) -> None:
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                self._on_wake()
            else:
                self._serve(key.data)

    def _serve(self, peer: _Peer) -> None:
        try:
            self._on_readable(peer)
        except Exception:
            # A bug or a hostile peer must cost only that peer.
            log.exception("mailbox %s: error serving PID %d", self.path, peer.pid)
            self._drop(peer, "internal error")

    def _on_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self.lock:
            if self.closed:
                return
            new, self.new_peers = self.new_peers, []
            self.resume_asked = False
            paused = [p for g in self.groups.values() for p in g.paused]
        for peer in new:
            os.set_blocking(peer.fd, False)
            self.peers[peer.fd] = peer
            self._resume(peer)
            self._serve(peer)  # it may have sent already: read it now
        for peer in paused:
            if self._deliver(peer, []):
                self._resume(peer)

    def _pause(self, peer: _Peer) -> None:
        if peer.active:
            self.selector.unregister(peer.fd)
            peer.active = False

    def _resume(self, peer: _Peer) -> None:
        if not peer.active:
            self.selector.register(peer.fd, selectors.EVENT_READ, peer)
            peer.active = True

    def _on_readable(self, peer: _Peer) -> None:
        try:
            if peer.big is not None:
                n = os.readv(peer.fd, [memoryview(peer.big)[peer.big_got :]])
            else:
                n = os.readv(peer.fd, [self.scratch])
        except BlockingIOError:
            return
        except OSError as err:
            self._drop(peer, f"read failed: {err!r}")
            return
        if n == 0:
            if peer.buf or peer.big is not None:
                self._drop(peer, "connection closed in the middle of a message (truncated frame)")
            else:
                self._drop(peer, "", quiet=True)
            return
        if peer.big is None:
            peer.buf += memoryview(self.scratch)[:n]
            self._parse(peer)
            return
        peer.big_got += n
        if peer.big_got < len(peer.big):
            return
        frame, peer.big = peer.big, None
        _kind, glen = _HEAD.unpack_from(frame)
        group = frame[3 : 3 + glen].decode("utf-8", "surrogatepass")
        # The buffer belongs to this one frame: hand out a view, not a copy.
        if not self._deliver(peer, [(group, memoryview(frame)[3 + glen :])]):
            self._pause(peer)

    def _parse(self, peer: _Peer) -> None:
        """Cut every complete frame out of the peer's buffer and queue it."""
        buf = peer.buf
        end = len(buf)
        pos = 0
        items: list[tuple[str, Any]] = []
        bad = ""
        unpack = _FRAME.unpack_from
        while end - pos >= _FRAME.size:
            size, kind, glen = unpack(buf, pos)
            head = 4
            if size == -1:
                if end - pos < 12 + _HEAD.size:
                    break
                (size,) = _MP_LEN64.unpack_from(buf, pos + 4)
                kind, glen = _HEAD.unpack_from(buf, pos + 12)
                head = 12
            if size < _HEAD.size + glen or size > self.max_frame:
                bad = f"bad frame size {size} (limit {self.max_frame})"
                break
            if kind != _KIND_PICKLE:
                bad = f"unknown frame kind {kind}"
                break
            stop = pos + head + size
            if stop > end:
                if size >= _BIG_FRAME:
                    # Read the rest straight into a buffer of its own (one copy).
                    big = bytearray(size)
                    have = end - pos - head
                    big[:have] = buf[pos + head : end]
                    peer.big, peer.big_got = big, have
                    pos = end
                break
            start = pos + head + _HEAD.size
            try:
                group = buf[start : start + glen].decode("utf-8", "surrogatepass") if glen else ""
            except UnicodeDecodeError:
                bad = "a group name that is not UTF-8"
                break
            # A slice is a copy: the payload must outlive the reused buffer.
            items.append((group, buf[start + glen : stop]))
            pos = stop
        del buf[:pos]
        # What came before a bad frame was sent in good faith: deliver it.
        if items and not self._deliver(peer, items):
            self._pause(peer)
        if bad:
            self._drop(peer, bad)

    def _deliver(self, peer: _Peer, items: list[tuple[str, Any]]) -> bool:
        """Queue the peer's pending and new messages; stop at a full group.

        Returns:
            whether everything was queued (else the peer must be paused).
        """
        todo = peer.pending + items if peer.pending else items
        with self.lock:
            for i, (group, payload) in enumerate(todo):
                g = self.groups.get(group)
                if g is None:
                    g = self.groups[group] = _Group(self.lock)
                if len(g.queue) >= self.max_queue:
                    peer.pending = todo[i:]
                    if peer not in g.paused:
                        g.paused.append(peer)
                    return False
                g.queue.append((peer.pid, payload))
                if g.waiting:
                    g.cond.notify()
                if g.paused and peer in g.paused:
                    g.paused.remove(peer)
            peer.pending = []
            return True

    def _drop(self, peer: _Peer, why: str, *, quiet: bool = False) -> None:
        if not quiet:
            log.debug("mailbox %s: dropped peer PID %d: %s", self.path, peer.pid, why)
        self.peers.pop(peer.fd, None)
        self._pause(peer)
        with self.lock:
            for g in self.groups.values():
                if peer in g.paused:
                    g.paused.remove(peer)
        peer.conn.close()

    # -- the consumer side

    def get(self, group: str, timeout: Optional[float]) -> Msg:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            g = self.groups.get(group)
            if g is None:
                g = self.groups[group] = _Group(self.lock)
            g.users += 1
            try:
                sender, payload = self._take(g, group, timeout, deadline)
            finally:
                g.users -= 1
                if not g.users and not g.queue and not g.paused:
                    del self.groups[group]
        try:
            data = pickle.loads(payload)
        except Exception as err:
            raise MessageError(
                f"cannot unpickle a message from PID {sender} in group {group!r}: {err!r}",
                pid=sender,
                group=group,
            ) from err
        return Msg(sender, self.pid, group, data)

    def _take(
        self, g: _Group, group: str, timeout: Optional[float], deadline: Optional[float]
    ) -> tuple[int, Any]:
        """Pop the group's next message (lock held), reading or waiting for it."""
        read_once = False  # this call has read the sockets itself
        handed = False  # ...or has asked the background reader to hand over
        while True:
            if g.queue:
                break
            if self.closed:
                raise MailboxError(
                    f"the mailbox of PID {self.pid} was closed while receiving (group {group!r})",
                    pid=self.pid,
                    group=group,
                    path=self.path,
                )
            remaining = None if deadline is None else deadline - time.monotonic()
            expired = remaining is not None and remaining <= 0
            # Even receive(timeout=0) reads once (or has the background reader
            # hand over first): a message whose send() returned is ours, if
            # still in the socket buffer. A receiving thread reads at once.
            if expired and (
                read_once or self.leader == _CONSUMER or (handed and self.leader is not None)
            ):
                raise ReceiveTimeout(
                    f"no message for group {group!r} arrived within {timeout:g} s (PID {self.pid})",
                    pid=self.pid,
                    group=group,
                )
            if self.leader is None:
                self.leader = _CONSUMER
                read_once = True
                self.lock.release()
                try:
                    self._pump(None if remaining is None else max(remaining, 0))
                finally:
                    self.lock.acquire()
                    self.last_consumer = time.monotonic()
                    self._step_down()
                continue
            if self.leader == _BACKGROUND and not self.background_yield:
                # Take the reading over from the background thread.
                self.background_yield = True
                self._wake()
            if expired:
                handed = True
                remaining = _HANDOVER  # it steps down (and notifies) at once
            g.waiting += 1
            try:
                g.cond.wait(remaining)
            finally:
                g.waiting -= 1
        item: tuple[int, Any] = g.queue.popleft()
        if g.paused and not self.resume_asked and len(g.queue) <= self.max_queue // 2:
            self.resume_asked = True
            self._wake()
        return item

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            for g in self.groups.values():
                g.cond.notify_all()
            self.background_cond.notify_all()
            self._wake()
            # Whoever is reading returns from select() on the wake-up and steps down.
            if self.leader is not None:
                self.leader_cond.wait_for(lambda: self.leader is None, timeout=5)
            new, self.new_peers = self.new_peers, []
        self._stop_accepting()
        for thread in (self.accept_thread, self.background):
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        try:
            self.listener.close()  # also unlinks the socket file
        except FileNotFoundError:
            pass  # removed already (multiprocessing's exit finalizer, or a person)
        for peer in list(self.peers.values()) + new:
            peer.conn.close()
        self.peers.clear()
        self.selector.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def _stop_accepting(self) -> None:
        """Wake the accept thread, which is blocked in accept()."""
        # Closing a socket does not interrupt accept() in another thread on
        # Linux, but shutdown() does. multiprocessing keeps the socket private;
        # without it, knock on the door (which needs the socket file).
        sock = getattr(getattr(self.listener, "_listener", None), "_socket", None)
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)
                return
            except OSError:
                pass
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as knock:
                knock.settimeout(1.0)
                knock.connect(self.path)
        except OSError:
            pass

    def forget_after_fork(self) -> None:
        """Drop the parent's mailbox in a forked child without touching the parent's."""
        for peer in list(self.peers.values()) + self.new_peers:
            peer.conn.close()
        # multiprocessing's unlink finalizer checks the PID, so this leaves the
        # parent's socket file alone.
        self.listener.close()
        self.selector.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


# ---------------------------------------------------------------- sending


class _Link:
    """A sender's persistent connection to one receiver."""

    __slots__ = ("conn", "fd", "lock", "max_frame", "retired", "send_timeout")

    def __init__(self, conn: mpc.Connection, max_frame: int) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        self.max_frame = max_frame  # the receiver's limit, told in the handshake
        self.lock = threading.Lock()  # held for a whole frame's write
        self.send_timeout = -1.0
        self.retired = False

    def after_write(self) -> None:
        """Close the connection if it was retired during the write (lock held)."""
        if self.retired:
            self.conn.close()

    def retire(self) -> None:
        """Close the connection, now or when the thread writing to it is done.

        Closing the fd under a writer would let the kernel hand its number to
        a new socket, and the writer's frame would go to the wrong process.
        """
        self.retired = True
        if self.lock.acquire(blocking=False):
            try:
                self.conn.close()
            finally:
                self.lock.release()
            return
        # A write is in progress: make it fail now (the writer retries on a
        # new connection), and leave closing the fd to the writer (after_write).
        try:
            with socket.socket(fileno=os.dup(self.fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mailbox: Optional[_Mailbox] = None
        self.links: OrderedDict[int, _Link] = OrderedDict()
        self.atexit = False


_state = _State()


def _link(pid: int, deadline: float) -> tuple[_Link, bool]:
    """Return the cached connection to ``pid`` (or a new one) and whether it is new."""
    state = _state
    link = state.links.get(pid)  # a dict read is atomic: no lock on the hot path
    if link is not None:
        return link, False
    try:
        rt = tr.runtime()
    except MailboxError as err:
        raise MailboxError(f"cannot send to PID {pid}: {err}", pid=pid, path=err.path) from err
    conn, max_frame = tr.connect(rt, pid, deadline)
    with state.lock:
        existing = state.links.get(pid)
        if existing is not None:
            conn.close()
            return existing, False
        link = state.links[pid] = _Link(conn, max_frame)
        # Evict the oldest connection: a sender that talks to thousands of PIDs
        # over time must not run out of file descriptors.
        evicted = [state.links.popitem(last=False)[1] for _ in range(len(state.links) - _MAX_LINKS)]
    for old in evicted:
        old.retire()
    return link, True


def _unlink(pid: int, link: _Link) -> None:
    """Forget and close a broken connection (the caller holds ``link.lock``)."""
    with _state.lock:
        if _state.links.get(pid) is link:
            del _state.links[pid]
    link.retired = True
    link.conn.close()


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
        head = _HEAD.pack(_KIND_PICKLE, len(raw_group)) + raw_group
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
    while True:
        link = _state.links.get(pid)
        fresh = False
        if link is None:
            if not deadline:
                deadline = time.monotonic() + wait
            link, fresh = _link(pid, deadline)
        _check_size(len(head) + len(payload), link.max_frame, pid, group, "the receiver's")
        # Whoever holds the lock is inside a write() bounded by SO_SNDTIMEO.
        with link.lock:
            if link.retired:  # evicted or closed while we waited for it
                link.conn.close()
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
                _unlink(pid, link)
                raise _full(pid, group, wait) from err
            except OSError as err:
                _unlink(pid, link)
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
        data = _MP_LEN.pack(size) + head + payload
        written = os.write(fd, data)
        if written != len(data):  # a short write: the receiver's buffer was nearly full
            _write_all(fd, memoryview(data)[written:])
        return
    prefix = _MP_LEN.pack(size) if size <= 0x7FFFFFFF else _MP_LEN.pack(-1) + _MP_LEN64.pack(size)
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
) -> _Mailbox:
    state = _state
    mailbox = state.mailbox
    if mailbox is not None:
        return mailbox
    rt = tr.runtime()
    with state.lock:
        if state.mailbox is None:
            state.mailbox = _Mailbox(rt, max_queue, max_frame)
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
