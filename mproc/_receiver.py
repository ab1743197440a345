"""The receiving side of a mailbox: listener, readers, bounded group queues.

A process's mailbox is a :class:`multiprocessing.connection.Listener` on an
AF_UNIX socket. Each sender's connection is admitted by a short handshake
thread (peer uid, HMAC challenge), then read by whoever leads: a thread
blocked in ``receive()`` reads the sockets itself, so a message costs one
wake-up; when nobody has received for :data:`_IDLE` seconds a background
thread reads instead, so up to ``max_queue`` messages per group are held
before anyone asks. A slow, stalled or hostile peer costs nothing but its
own connection.

Frames are multiprocessing's (``!i`` length, or ``-1`` and ``!Q``) around
``u8 kind | u16 len(group) | group (UTF-8) | pickle``.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import pickle
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from multiprocessing import connection as mpc
from typing import Any, Optional

from . import _transport as tr
from ._errors import MailboxError, MessageError, ReceiveTimeout
from ._log import logger as log

__all__ = ["Msg"]


HEAD = struct.Struct("!BH")  # kind, length of the group name
KIND_PICKLE = 0
MP_LEN = struct.Struct("!i")  # multiprocessing's frame header...
MP_LEN64 = struct.Struct("!Q")  # ...and its extension for frames over 2 GiB
_FRAME = struct.Struct("!iBH")  # both headers of a frame under 2 GiB, read at once
_IDLE = 0.02  # no receive() for this long: the background thread reads
_ACCEPT_BACKOFF = 0.05  # after a failed accept() (e.g. out of fds)
_HANDOVER = 0.5  # the most a poll waits for the background reader to step down
_KEEP_GROUPS = 32  # idle groups kept (with their Condition) before any is dropped
_BACKGROUND = "background"
_CONSUMER = "consumer"
_READ_CHUNK = 1 << 18
_BIG_FRAME = 1 << 20  # frames this large are read straight into their own buffer


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


class Mailbox:
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
        self.wake_open = True
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
        """Wake whoever reads (lock held: close() closes the pipe under it)."""
        if not self.wake_open:
            return
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
                    waiting = any(g.waiting for g in self.groups.values())
                    if self.leader is None and idle >= _IDLE and not waiting:
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
        _kind, glen = HEAD.unpack_from(frame)
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
                if end - pos < 12 + HEAD.size:
                    break
                (size,) = MP_LEN64.unpack_from(buf, pos + 4)
                kind, glen = HEAD.unpack_from(buf, pos + 12)
                head = 12
            if size < HEAD.size + glen or size > self.max_frame:
                bad = f"bad frame size {size} (limit {self.max_frame})"
                break
            if kind != KIND_PICKLE:
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
            start = pos + head + HEAD.size
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
            # A receiver is active: the background reader must not take the
            # reading over (and must hand it back if it has it).
            self.last_consumer = time.monotonic()
            g.users += 1
            try:
                sender, payload = self._take(g, group, timeout, deadline)
            finally:
                g.users -= 1
                # Keep a few idle groups (and their Condition) for reuse; drop
                # idle ones only when there are many, e.g. one per request id.
                if not g.users and not g.queue and not g.paused and len(self.groups) > _KEEP_GROUPS:
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
                # Take the reading over from the background thread, which must
                # then not take it back at once (it would, were we "idle").
                self.background_yield = True
                self.last_consumer = time.monotonic()
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
        with self.lock:  # _wake() writes under it
            self.wake_open = False
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
