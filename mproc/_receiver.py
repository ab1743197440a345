"""The receiving side of a mailbox: who reads, routing, credit, ``receive()``.

The parts, one job each:

* **admission** (:mod:`mproc._admission`, its own thread) accepts and
  authenticates connections and hands each admitted peer to the reader;
* the **per-peer reader** (:class:`~mproc._reader.Peer`) reads a peer's
  bytes and cuts frames out of them;
* this module routes the frames into **group queues**
  (:class:`~mproc._queues.Group`), grants each peer credit (see
  :mod:`mproc._wire`) while the group has room, drops bad peers, and takes
  messages out for ``receive()``.

*Who reads now* is a small state machine (:class:`Reading`): ``NOBODY``,
``CONSUMER`` (a thread blocked in ``receive()`` reads the sockets itself, so a
message costs one wake-up) or ``BACKGROUND`` (when nobody has received for
:data:`_IDLE` seconds, the background thread reads, so messages queue up
before anyone asks). Leadership is one lock, taken without blocking. The
background thread never polls: it sleeps in ``epoll`` while it reads, and on
a doorbell, rung when a reading ``receive()`` steps down, while one reads.

**Interrupts.** Python runs signal handlers in the main thread between
bytecodes, and a handler may raise anywhere in here. So every change of
shared state is made by one C-level call or one store — ``deque.extend`` of
an ``islice`` over ``deque.popleft`` moves messages from one deque to
another with no bytecode in between — and the state between any two such
steps is consistent for the next reader. A message handed to a
``receive()`` that is interrupted before it returns stays in that call's
slot, and the next ``receive()`` of the group puts it back first.

**Order.** A sender reconnects only after closing its old connection
(:mod:`mproc._sender`); the reader reads a process's connections one after
the other, the next only when the previous one has ended, so a process's
messages to a group are received in the order sent.
"""

from __future__ import annotations

import enum
import itertools
import json
import os
import pickle
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from types import FrameType
from typing import Any, Optional

from . import _bulk
from . import _runtime as rt
from . import _wire as wire
from ._admission import Admission
from ._calls import CallRef, refuse
from ._errors import MailboxClosed, MailboxError, MailboxGone, MessageError, ReceiveTimeout
from ._log import logger as log
from ._queues import NOTHING, Group, Msg
from ._reader import KIND_LOCAL, Entry, Input, Peer
from ._signals import raised_by_handler
from ._wakeup import Wakeup

__all__ = ["Msg", "Reading", "Receiver"]

_IDLE = 0.02  # no receive() for this long: the background thread reads
#: How long a receive() about to block polls first (see Receiver._spin); the
#: environment variable MPROC_SPIN_US overrides it (0: never poll).
_SPIN = 50e-6
ENV_SPIN = "MPROC_SPIN_US"
_SPIN_MISSES = 4  # polls in a row that found nothing: stop polling for a while
_yield = getattr(os, "sched_yield", lambda: None)
_ASLEEP_CHECK = 10.0  # see _background_loop
_REFUSE_FOR = 1.0  # at close, queued calls are refused for at most this long
_HANDOVER = 0.5  # the most receive(timeout=0) waits for the background to step down
_KEEP_GROUPS = 64  # idle groups are forgotten only when there are more than this
_PRUNE_EVERY = 1.0  # ...at most this often
_KEEP_CREDIT = 256  # sending processes whose credit is kept before the dead are forgotten
_CALL = wire.KIND_CALL
_BULK = wire.KIND_BULK
_REPLY = wire.KIND_REPLY
_STATS_REPLY = wire.KIND_STATS_REPLY
_CALL_HEAD = wire.CALL_HEAD
_MSG = wire.KIND_MSG
_HEAD_SIZE = wire.HEAD.size
_SMALL = struct.Struct("!iBHQ")  # a short frame's length and head
_SMALL_SIZE = _SMALL.size
_SMALL_UNPACK = _SMALL.unpack_from
_EPOLLIN = select.EPOLLIN if hasattr(select, "EPOLLIN") else 1
_EPOLLOUT = select.EPOLLOUT if hasattr(select, "EPOLLOUT") else 4


class Reading(enum.Enum):
    """Who reads the sockets now (the leadership state machine).

    ``NOBODY`` → ``CONSUMER``: a ``receive()`` finds its group empty and takes
    the leader lock; ``CONSUMER`` → ``NOBODY``: it has a message (or times
    out) and steps down. ``NOBODY`` → ``BACKGROUND``: nobody has received for
    ``_IDLE`` s, or receive() calls wait and nobody reads. ``BACKGROUND`` →
    ``NOBODY``: a ``receive()`` asked to read itself (``lead_request``).
    """

    NOBODY = "nobody"
    CONSUMER = "consumer"
    BACKGROUND = "background"


# Module constants: storing one runs no Python code (no signal handler).
_NOBODY = Reading.NOBODY
_CONSUMER = Reading.CONSUMER
_BACKGROUND = Reading.BACKGROUND


class Receiver:
    """This process's mailbox: the listener, the readers and the group queues."""

    def __init__(
        self,
        runtime: rt.Runtime,
        max_queue: int,
        max_frame: int,
        idle_limit: float = rt.DEFAULT_IDLE_LIMIT,
    ) -> None:
        from multiprocessing import connection as mpc

        self.pid = os.getpid()
        self.max_queue = max_queue
        self.max_frame = max_frame
        self.window = min(rt.DEFAULT_WINDOW, max_queue)
        self.half = max(1, self.window // 2)  # credit is granted in steps this large
        self.idle_limit = idle_limit
        self.spin = _spin_seconds()
        self.spin_misses = 0
        rt.remove_stale(runtime)
        self.path = rt.socket_path(runtime, self.pid, rt.proc_identity(self.pid) or "0")
        try:
            os.unlink(self.path)  # ours by name; left by a close that never ran
        except FileNotFoundError:
            pass
        try:
            self.listener = mpc.Listener(self.path, family="AF_UNIX", backlog=1024)
        except OSError as err:
            raise MailboxError(
                f"cannot open the mailbox socket {self.path}: {err}", path=self.path
            ) from err
        lsock = getattr(getattr(self.listener, "_listener", None), "_socket", None)
        if not isinstance(lsock, socket.socket):  # pragma: no cover - CPython internals moved
            self.listener.close()
            raise MailboxError("this Python's multiprocessing.connection.Listener is unsupported")
        self.lock = threading.Lock()  # short critical sections only; never held while blocking
        self.groups: dict[str, Group] = {}
        self.by_raw: dict[bytes, Group] = {}
        self.peers: dict[int, Peer] = {}  # fd -> the active (read) peers
        self.by_pid: dict[int, Peer] = {}  # pid -> the connection read now
        self.new_peers: deque[Peer] = deque()  # admitted, not yet seen by a reader
        self.dying: deque[Peer] = deque()  # being dropped (finished by any reader)
        self.owed: deque[Peer] = deque()  # credit that did not fit: wait until writable
        self.starving: deque[Group] = deque()  # groups with room again for starved senders
        self.unsent: dict[Peer, None] = {}  # peers with a grant recorded, maybe not sent
        # Per sending PID, its credit (last seq routed, limit granted, per
        # group): a new connection of the process carries on with it.
        self.credit: dict[tuple[int, int], tuple[dict[bytes, int], dict[bytes, int]]] = {}
        self.credit_limit = _KEEP_CREDIT
        self.epoch = int.from_bytes(os.urandom(8), "big")  # told in HELLO: this mailbox
        self.hello = wire.hello(max_frame, self.window, self.epoch)
        self.partial: dict[Peer, None] = {}  # peers in the middle of a frame
        # call id -> the reply queue of a call() waiting in this process.
        self.calls: dict[int, Group] = {}
        self.dropped: deque[Entry] = deque(maxlen=0)  # where late replies go
        self.received = 0  # messages routed into group queues, ever
        self.stats_wanted: dict[Peer, int] = {}  # STATS requests to answer (peer -> id)
        self.answering = False
        self.about: Optional[tuple[float, list[str]]] = None  # start time, command line
        # Event loops reading this mailbox for awaiting coroutines (mproc.asyncio),
        # told when it closes. (Their reads count as a consumer's: while they
        # read, the background thread naps, as for a blocking receive().)
        self.async_readers: set[Any] = set()
        self.prune_at = _KEEP_GROUPS
        self.prune_after = 0.0
        self.round = 1
        self.sleepers: list[Any] = []  # every receive() asleep, to wake at a step-down
        self.closed = False
        self.reading = _NOBODY  # which kind of reader holds leader_lock (set by the holder)
        # Leadership. An RLock: its release() is one C call that releases it if
        # this thread holds it and raises otherwise, so a finally clause can
        # release it with no bytecode that could run a signal handler first.
        self.leader_lock = threading.RLock()
        self.lead_request = 0.0  # when a receive() last asked the background to yield
        self.last_consumer = time.monotonic()
        self.doorbell = threading.Lock()  # held; the background sleeps by taking it
        self.doorbell.acquire()
        self.bg_asleep = False  # the background sleeps with no timer: ring at step-down
        self.unfinished: dict[Peer, None] = {}  # peers whose bytes a reader began on
        self.epoll = select.epoll()
        self.wakeup = Wakeup()
        self.epoll.register(self.wakeup.fileno(), _EPOLLIN)
        self.admission = Admission(
            lsock,
            runtime.key,
            self.path,
            self.hello,
            self._on_admit,
        )
        self.background = threading.Thread(
            target=self._background_loop, name="mproc-mailbox-reader", daemon=True
        )
        try:
            self.admission.start()
            self.background.start()
        except RuntimeError as err:  # can't start new thread (task limit)
            self.close()
            raise MailboxError(
                f"cannot open the mailbox {self.path}: cannot start its threads ({err})",
                path=self.path,
            ) from err

    # ---------------------------------------------------------------- admission

    def _on_admit(self, sock: socket.socket, pid: int, session: int, flags: int) -> bool:
        """Take an admitted peer (admission thread); the reader picks it up at once.

        Our HELLO goes out after the peer is queued for the reader (whatever it
        sends then, the next receive() finds), from this thread, which no
        signal handler interrupts: a handler of the main thread, which may be
        the reader, can send to its own PID. The reader takes the peer only
        once it is greeted, so the HELLO precedes every CREDIT.
        """
        if self.closed:
            return False
        peer = Peer(sock, pid, session, bool(flags & wire.HELLO_CONTROL))
        if flags & wire.HELLO_BULK:
            _bulk.attach(peer)  # it may send file descriptors: read it with recvmsg
        with peer.greeting:  # the reader waits for it if it finds the peer first
            self.new_peers.append(peer)
            try:
                os.write(peer.fd, self.hello)
            except OSError:
                pass  # it left; the reader sees EOF
            peer.greeted = True
        self.wakeup.wake()
        return True

    def _take_new_peers(self) -> None:
        while self.new_peers:
            peer = self.new_peers[0]
            if not peer.greeted:
                with peer.greeting:  # admission is writing our HELLO: a moment
                    pass
            head = self.by_pid.get(peer.pid)
            if peer.control:
                self._watch(peer)  # no messages on it: no order to keep
            elif head is None or head.dead or head is peer:
                self._activate(peer)
            else:
                # Read this connection only after the process's earlier one has
                # ended: its messages were sent after everything on that one.
                tail = head
                while tail.successor is not None and tail.successor is not peer:
                    tail = tail.successor
                tail.successor = peer
            self.new_peers.popleft()

    def _activate(self, peer: Peer) -> None:
        # Keyed by the sending process's session too (a random number in its
        # HELLO): a new program in the same PID (exec) starts afresh.
        key = (peer.pid, peer.session)
        saved = self.credit.get(key)
        if saved is not None and saved[0] is not peer.last_seq:
            # The sender carries its credit over to its new connection (see
            # _sender): so must we, or every reconnect would add a window.
            # What it was told on the old one it may not have read: tell it again.
            peer.last_seq, peer.granted = saved
            peer.sent = {}
            self.unsent[peer] = None
            for raw in list(peer.last_seq):
                g = self.by_raw.get(raw)
                if g is None or len(g.queue) < self.max_queue:
                    self._grant(peer, raw)  # it may have run out on the old connection
                else:
                    g.starved[peer] = None
        self.credit[key] = (peer.last_seq, peer.granted)
        if len(self.credit) > self.credit_limit:
            self._forget_dead_senders()
        self.by_pid[peer.pid] = peer
        self._watch(peer)

    def _watch(self, peer: Peer) -> None:
        self.peers[peer.fd] = peer
        if not peer.active:
            try:
                self.epoll.register(peer.fd, _EPOLLIN)
            except FileExistsError:
                pass
            peer.active = True

    def _forget_dead_senders(self) -> None:
        """Drop the credit kept for processes that are gone (amortised: the limit doubles)."""
        for key in list(self.credit):
            if key[0] not in self.by_pid and rt.proc_identity(key[0]) is None:
                del self.credit[key]
        self.credit_limit = max(_KEEP_CREDIT, 2 * len(self.credit))

    # ---------------------------------------------------------------- reading

    def _pump(self, timeout: Optional[float], spin: bool = False) -> int:
        """Wait for and handle one batch of events (the caller leads); return how many.

        It first finishes what an interrupted reader left: control work (a
        wake-up already drained), bytes read and not yet parsed or routed.
        With ``spin`` (a ``receive()`` about to block), it first polls for a
        short while, yielding the CPU between polls (see :meth:`_spin`).
        """
        if (
            self.new_peers
            or self.dying
            or self.owed
            or self.unfinished
            or self.partial
            or self.starving
            or self.unsent
        ):
            timeout = self._catch_up(timeout)
        if spin and self.spin:
            events = self.epoll.poll(0.0)
            if not events and timeout != 0.0:
                events = self._spin(timeout)
        else:
            events = self.epoll.poll(-1 if timeout is None else timeout)
        handled = 0
        for fd, mask in events:
            peer = self.peers.get(fd)
            if peer is None:
                if fd == self.wakeup.fileno():
                    self.wakeup.drain()
                    self._on_wake()
                continue
            handled += 1
            if mask == _EPOLLIN:
                self._read_one(peer)
                continue
            if mask & _EPOLLOUT:
                self._regrant_all(peer)
            if mask & ~_EPOLLOUT:
                self._on_readable(peer)
        if self.stats_wanted and not self.answering:
            self._answer_stats()
        return handled

    def _spin(self, timeout: Optional[float]) -> list[tuple[int, int]]:
        """Wait for events as :meth:`_pump` does, polling for up to ``self.spin`` s first.

        A thread blocked in ``epoll_wait`` takes a long time to wake up on a
        VM (the sender's write must kick a halted virtual CPU): polling for a
        few tens of microseconds, with ``sched_yield()`` between polls so that
        any other runnable task of this CPU (the sender itself, say) runs
        first, turns most round trips into no sleep at all — what Erlang's
        schedulers do (busy wait before sleep) and Go's runtime (spinning).
        It adapts: after :data:`_SPIN_MISSES` polls in a row that found
        nothing, it stops spinning until a blocking wait ends soon enough for
        a spin to have caught it.
        """
        poll = self.epoll.poll
        if self.spin_misses < _SPIN_MISSES:
            until = time.monotonic() + (
                self.spin if timeout is None else min(self.spin, max(timeout, 0.0))
            )
            while True:
                _yield()
                events = poll(0.0)
                if events:
                    self.spin_misses = 0
                    return events
                now = time.monotonic()
                if now >= until:
                    break
            self.spin_misses += 1
            if timeout is not None:
                timeout = max(timeout - self.spin, 0.0)
            return poll(-1 if timeout is None else timeout)
        began = time.monotonic()
        events = poll(-1 if timeout is None else timeout)
        if events and time.monotonic() - began < 2 * self.spin:
            self.spin_misses = 0  # a spin would have caught this one: spin again
        return events

    def _catch_up(self, timeout: Optional[float]) -> Optional[float]:
        """Finish what an interrupted reader left, and control work; return the poll's timeout."""
        if self.new_peers or self.dying or self.owed:
            self._on_wake()
        if self.unfinished:
            for left in list(self.unfinished):
                # A reader was interrupted with this peer: routing or a grant may
                # be half done. Grant again what its groups have room for.
                self._digest(left)
                self._regrant(left)
        if self.partial:
            self._expire_stalled()
            timeout = self.idle_limit / 4 if timeout is None else min(timeout, self.idle_limit / 4)
        if self.starving:
            self._release_starving()
        if self.unsent:
            self._send_unsent()
        return timeout

    def _read_one(self, peer: Peer) -> None:
        """Read a readable peer: :meth:`_on_readable` with a short way for the common case.

        The common case is one read that holds exactly one small MSG of a
        known group, within credit, to a group with room: it is cut out and
        queued here, by the same committing steps as the general way (the
        read recorded by one C call, the entry published by one store of a
        new input, the move into the group by one C call); anything else
        goes the general way from where this left it.
        """
        inp = peer.inp
        if (
            inp.chunks
            or inp.pending
            or inp.big is not None
            or peer.control
            or peer.bulk is not None  # it may send descriptors: read with recvmsg
        ):
            self._on_readable(peer)
            return
        self.unfinished[peer] = None
        chunks = inp.chunks
        try:
            chunks.extend(itertools.islice(peer.reader, 1))
        except BlockingIOError:
            pass
        except (OSError, MemoryError, BufferError) as err:
            self._drop(peer, f"read failed: {err!r}")
            return
        if len(chunks) == 1:
            data = chunks[0]
            if len(data) > _SMALL_SIZE:
                size, kind, glen, seq = _SMALL_UNPACK(data)
                if size + 4 == len(data) and kind == _MSG and _HEAD_SIZE + glen <= size:
                    start = _SMALL_SIZE + glen
                    raw = data[_SMALL_SIZE:start]
                    g = self.by_raw.get(raw)
                    granted = peer.granted.get(raw, self.window)
                    if (
                        g is not None
                        and seq < granted
                        and size <= self.max_frame
                        and len(g.queue) < self.max_queue - 1
                    ):
                        pending: deque[Entry] = deque()
                        pending.append((peer.pid, memoryview(data)[start:], peer, raw, seq, kind))
                        peer.inp = Input(deque(), pending, 0)  # one store commits the cut
                        peer.last_seq[raw] = seq
                        # One C call moves it (see _route).
                        g.queue.extend(itertools.islice(iter(pending.popleft, NOTHING), 1))
                        self.received += 1
                        if g.waiters:
                            self._wake(g)
                        if seq + 1 + self.window - granted >= self.half or granted > peer.sent.get(
                            raw, self.window
                        ):
                            self._grant(peer, raw)
                        del self.unfinished[peer]
                        return
        peer.progress = time.monotonic()
        self._digest(peer)

    def _on_wake(self) -> None:
        if self.starving:
            self._release_starving()
        if self.dying:
            self._finish_drops()
        if self.new_peers:
            self._take_new_peers()
        while self.owed:
            peer = self.owed[0]
            if not peer.dead and peer.active:
                try:
                    self.epoll.modify(peer.fd, _EPOLLIN | _EPOLLOUT)
                except OSError:
                    pass
            self.owed.popleft()

    def _on_readable(self, peer: Peer) -> None:
        # Marked before the read: if a signal handler raises after it, the
        # next reader digests these bytes (epoll would not report them again).
        self.unfinished[peer] = None
        failed = peer.read()
        if failed:
            self._drop(peer, failed)
            return
        self._digest(peer)

    def _digest(self, peer: Peer) -> None:
        """Parse and route what the peer sent; drop it on EOF or a bad frame."""
        if peer.dead:
            self.unfinished.pop(peer, None)
            return
        eof = peer.at_eof()
        bad = peer.parse(self.max_frame)
        if peer.bulk is not None and not bad:  # map the memfds of BULK frames (mproc._bulk)
            bad = peer.bulk.bind(peer, self.max_frame)
        inp = peer.inp
        if inp.chunks or inp.big is not None:  # in the middle of a frame
            self.partial[peer] = None
        elif peer in self.partial:
            del self.partial[peer]
        if inp.pending:
            self._route(peer)
        self.unfinished.pop(peer, None)
        if bad:
            self._drop(peer, bad)
        elif eof:
            if peer.mid_frame():
                self._drop(peer, "connection closed in the middle of a message (truncated frame)")
            else:
                self._drop(peer, "", quiet=True)

    def _route(self, peer: Peer) -> None:
        """Move the peer's parsed messages into their group queues, granting credit."""
        pending = peer.inp.pending
        take = pending.popleft
        while pending:
            raw = pending[0][3]
            if peer.control and pending[0][5] != wire.KIND_STATS:
                self._drop(peer, "sent a message on a control connection (a protocol violation)")
                return
            if raw is None:
                if pending[0][5] == _REPLY:
                    self._route_reply(pending[0])
                else:
                    self._want_stats(peer, pending)
                continue
            k = 1
            n = len(pending)
            while k < n and pending[k][3] == raw:
                k += 1
            last = pending[k - 1][4]
            if last >= peer.granted.get(raw, self.window):
                self._drop(peer, "sent more than its credit (a protocol violation)")
                return
            g = self.by_raw.get(raw)
            if g is None:
                g = self._new_group(raw, peer)
                if g is None:
                    self._drop(peer, "sent a group name that is not UTF-8")
                    return
            # Recorded first: an interrupt before the move leaves the messages
            # pending (routed by the next reader), never credit unaccounted.
            peer.last_seq[raw] = last
            # One C call moves the run: no bytecode runs between taking a
            # message from the peer and putting it in the group.
            g.queue.extend(itertools.islice(iter(take, NOTHING), k))
            self.received += k
            if g.waiters:
                self._wake(g)
            if len(g.queue) >= self.max_queue:
                g.starved[peer] = None
            elif last + 1 + self.window - peer.granted.get(raw, self.window) >= self.half:
                self._grant(peer, raw)
            elif peer.granted.get(raw, 0) > peer.sent.get(raw, self.window):
                self._grant(peer, raw)  # recorded and not sent: an interrupt came between

    def _route_reply(self, entry: Entry) -> None:
        """Move a REPLY (first of its peer's pending) to its waiting call, or drop it.

        A reply whose call gave up, or that names another mailbox (a caller
        that exited, its PID reused), is dropped: it shows up nowhere.
        """
        pending = entry[2].inp.pending if entry[2] is not None else None
        if pending is None:  # pragma: no cover - replies always come from a peer
            return
        payload = entry[1]
        g = None
        if len(payload) >= wire.REPLY_HEAD.size:
            epoch, _status = wire.REPLY_HEAD.unpack_from(payload)
            if epoch == self.epoch:
                g = self.calls.get(entry[4])
        target = g.queue if g is not None else self.dropped
        # One C call moves it, as for a group (see _route).
        target.extend(itertools.islice(iter(pending.popleft, NOTHING), 1))
        if g is not None and g.waiters:
            self._wake(g)

    def _want_stats(self, peer: Peer, pending: deque[Entry]) -> None:
        """Note a STATS request (first of the peer's pending); _pump answers it.

        One answer per connection and pump: requests a querier pipelined are
        answered once, with the id of the last (a flood costs one answer).
        """
        self.stats_wanted[peer] = pending[0][4]  # first: asked twice is harmless
        self.dropped.extend(itertools.islice(iter(pending.popleft, NOTHING), 1))

    def _answer_stats(self) -> None:
        """Answer STATS requests, after reading everything already sent (exact depths)."""
        self.answering = True
        try:
            passes = 0
            while passes < 100 and self._pump(0.0):
                passes += 1
            body = b""
            for peer in list(self.stats_wanted):
                request = self.stats_wanted.pop(peer)
                if peer.dead:
                    continue
                if not body:
                    body = _stats_json(self.stats())
                frame = wire.frame(wire.HEAD.pack(_STATS_REPLY, 0, request) + body)
                try:
                    os.write(peer.fd, frame)  # fits a socket's buffer (_stats_json): whole
                except OSError:
                    pass  # it left, or does not read: it times out on its side
        finally:
            self.answering = False

    def _about(self) -> tuple[float, list[str]]:
        if self.about is None:
            import psutil

            me = psutil.Process(self.pid)
            try:
                cmdline = me.cmdline()
            except psutil.Error:
                cmdline = []
            self.about = (me.create_time(), cmdline)
        return self.about

    def stats(self) -> dict[str, Any]:
        """What ``mproc.stats()`` and ``mproc ps`` report about this mailbox."""
        from . import _names

        senders = sorted({p.pid for p in list(self.by_pid.values()) if not p.dead})
        return {
            "pid": self.pid,
            "open": not self.closed,
            "path": self.path,
            "start_time": self._about()[0],
            "cmdline": self._about()[1],
            "names": _names.held(),
            "groups": self.depths(),
            "senders": senders,
            "received": self.received,
            "pending_calls": len(self.calls),
            "max_queue": self.max_queue,
            "max_frame": self.max_frame,
            "idle_limit": self.idle_limit,
        }

    def _new_group(self, raw: bytes, peer: Peer) -> Optional[Group]:
        name = peer.names.get(raw)
        if name is None:
            try:
                name = raw.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                return None  # no str group could receive it: a broken sender
            peer.names[raw] = name
        return self._group(name, raw)

    def _group(self, name: str, raw: Optional[bytes] = None) -> Group:
        g = self.groups.get(name)
        if g is None:
            if raw is None:
                raw = name.encode("utf-8", "surrogatepass")
            with self.lock:
                g = self.groups.get(name)
                if g is None:
                    g = Group(name, raw)
                    self.groups[name] = g
                # Also after an interrupted _prune() (which forgets by_raw first).
                self.by_raw.setdefault(g.raw, g)
        return g

    def _prune(self) -> None:
        """Forget idle groups (one per request id adds up); only the reader may.

        A group is forgotten when it holds nothing, nobody waits on it and no
        receive() has looked it up for a whole prune round; a receive() that
        finds its group forgotten takes the new one (see _take).
        """
        if len(self.groups) <= self.prune_at:
            return
        now = time.monotonic()
        if now < self.prune_after:
            return
        self.prune_after = now + _PRUNE_EVERY
        self.round += 1
        with self.lock:
            for name, g in list(self.groups.items()):
                if g.touched < self.round - 1 and not (
                    g.queue or g.waiters or g.orphans or g.starved
                ):
                    # by_raw first: an interrupt between leaves a group that
                    # _group() finds again, never one that routing fills alone.
                    if self.by_raw.get(g.raw) is g:
                        del self.by_raw[g.raw]
                    del self.groups[name]
            self.prune_at = max(_KEEP_GROUPS, 2 * len(self.groups))

    # ---------------------------------------------------------------- credit

    def _grant(self, peer: Peer, raw: bytes) -> None:
        """Grant the peer more credit for the group if it moved far enough, and send it.

        ``granted`` is recorded before the frame is written, ``sent`` after: the
        sender keeps the largest limit it was told, so a limit recorded and not
        yet sent costs nothing, and one sent and not recorded could make us
        take its next messages for a violation. A peer whose grant is recorded
        and not sent (a signal handler raised between) is in ``unsent`` until
        a reader sends it (see _pump).
        """
        limit = peer.last_seq.get(raw, -1) + 1 + self.window
        if limit - peer.granted.get(raw, self.window) >= self.half:
            self.unsent[peer] = None
            peer.granted[raw] = limit
        if peer.granted.get(raw, 0) > peer.sent.get(raw, self.window):
            self._send_credit(peer, raw, peer.granted[raw])

    def _send_credit(self, peer: Peer, raw: bytes, limit: int) -> None:
        if peer.dead:
            return
        try:
            # A small write to an AF_UNIX stream socket is all or nothing, and
            # a CREDIT names a limit, not an increment: sending it twice is harmless.
            os.write(peer.fd, wire.credit(raw, limit))
        except BlockingIOError:
            self.owed.append(peer)  # the sender is not reading: wait until it does
            self.wakeup.wake()
            return
        except OSError:
            return  # the reader sees the error on the next read
        if limit > peer.sent.get(raw, 0):
            peer.sent[raw] = limit

    def _send_unsent(self) -> None:
        """Send every grant that was recorded and not sent (after an interrupt)."""
        for peer in list(self.unsent):
            for raw, limit in list(peer.granted.items()):
                if limit > peer.sent.get(raw, self.window):
                    self._send_credit(peer, raw, limit)
            self.unsent.pop(peer, None)

    def _regrant(self, peer: Peer) -> None:
        """Re-evaluate every grant of ``peer`` (after an interrupted reader)."""
        if peer.dead:
            return
        for raw in list(peer.last_seq):
            g = self.by_raw.get(raw)
            if g is None or len(g.queue) < self.max_queue:
                self._grant(peer, raw)
            elif peer.granted.get(raw, 0) > peer.sent.get(raw, self.window):
                self._send_credit(peer, raw, peer.granted[raw])

    def _regrant_all(self, peer: Peer) -> None:
        """The peer became writable: send it every limit it was granted."""
        try:
            self.epoll.modify(peer.fd, _EPOLLIN)
        except OSError:
            pass
        for raw, limit in list(peer.granted.items()):
            self._send_credit(peer, raw, limit)

    def _release_starving(self) -> None:
        """Grant credit to the senders of groups a receive() made room in (reader only).

        Only the reader changes ``Group.starved``; an interrupt between two
        steps leaves the rest for the next pump, and a grant made twice is
        harmless.
        """
        while self.starving:
            g = self.starving[0]
            if len(g.queue) < self.max_queue:
                for peer in list(g.starved):
                    # A connection that ended hands over to the process's next one.
                    now = peer if not peer.dead else self.by_pid.get(peer.pid)
                    if now is not None and not now.dead:
                        self._grant(now, g.raw)
                    g.starved.pop(peer, None)
            self.starving.popleft()
            if g.starved and len(g.queue) < self.max_queue and g not in self.starving:
                # A receive() made room while g was still listed (so it did
                # not list it again): grant on the next round.
                self.starving.append(g)

    # ---------------------------------------------------------------- dropping

    def _drop(self, peer: Peer, why: str, *, quiet: bool = False) -> None:
        if not quiet:
            log.debug("mailbox %s: dropped peer PID %d: %s", self.path, peer.pid, why)
        peer.dead = True
        self.dying.append(peer)
        self._finish_drops()

    def _finish_drops(self) -> None:
        """Finish dropping peers; every step may be done twice (an interrupt between)."""
        while self.dying:
            peer = self.dying[0]
            if peer.active:
                try:
                    self.epoll.unregister(peer.fd)
                except (OSError, ValueError):
                    pass
                peer.active = False
            if self.peers.get(peer.fd) is peer:
                del self.peers[peer.fd]
            if peer in self.partial:
                del self.partial[peer]
            if self.by_pid.get(peer.pid) is peer:
                nxt = peer.successor
                while nxt is not None and nxt.dead:
                    nxt = nxt.successor
                if nxt is None:
                    del self.by_pid[peer.pid]
                else:
                    self._activate(nxt)
            if peer.bulk is not None:
                peer.bulk.close()  # descriptors received and not yet mapped
            peer.sock.close()
            self.dying.popleft()

    def _expire_stalled(self) -> None:
        limit = time.monotonic() - self.idle_limit
        for peer in [p for p in self.partial if p.progress < limit]:
            self._drop(
                peer, f"silent for {self.idle_limit:g} s in the middle of a message (idle limit)"
            )

    # ---------------------------------------------------------------- leadership

    def _wake_sleepers(self) -> None:
        sleepers, self.sleepers = self.sleepers, []
        for w in sleepers:
            _release(w)

    def _wake(self, g: Group) -> None:
        waiters, g.waiters = g.waiters, []
        for w in waiters:
            _release(w)

    def _background_loop(self) -> None:
        """Read when nobody else does; otherwise sleep.

        While a receive() reads, this thread sleeps on the doorbell, rung when
        that reader steps down (and, should an interrupt have cost that ring,
        it looks again after :data:`_ASLEEP_CHECK` seconds); right after a
        step-down it naps for :data:`_IDLE` (a receive() in a loop leads again
        within microseconds) and takes over only if nobody did.
        """
        try:
            while not self.closed:
                now = time.monotonic()
                recent = now - self.last_consumer
                if recent < _IDLE and not self.sleepers:
                    self.doorbell.acquire(True, _IDLE - recent)
                    continue
                asked = now - self.lead_request
                if asked < _IDLE:
                    self.doorbell.acquire(True, _IDLE - asked)  # a receive() is about to lead
                    continue
                if self.leader_lock.acquire(False):
                    try:
                        self._lead_in_background(now)
                    finally:
                        self.reading = _NOBODY
                        self.leader_lock.release()
                    self._wake_sleepers()
                    continue
                # A receive() reads: sleep until it steps down and rings.
                self.bg_asleep = True
                if self.leader_lock.acquire(False):  # it stepped down meanwhile
                    self.leader_lock.release()
                else:
                    self.doorbell.acquire(True, _ASLEEP_CHECK)
                self.bg_asleep = False
        except Exception:  # pragma: no cover - a bug: log it, never die silently
            log.exception("mailbox %s: the background reader failed", self.path)

    def _lead_in_background(self, since: float) -> None:
        self.reading = _BACKGROUND
        self._wake_sleepers()  # anyone asleep re-checks its group now
        while not self.closed and self.lead_request <= since:
            try:
                self._pump(None)
            except Exception:
                log.exception("mailbox %s: reader error", self.path)

    # ---------------------------------------------------------------- consuming

    def get(self, group: str, timeout: Optional[float]) -> Msg:
        """Take the next message of ``group``, reading or waiting for it.

        Raises:
            ReceiveTimeout, MailboxClosed, MessageError: see :func:`mproc.receive`.
        """
        slot: list[Entry] = []  # the message, from its group until it is returned
        g = self.groups.get(group)
        try:
            if g is None:
                g = self._group(group)
            g.touched = self.round  # not pruned while in use
            if g.queue and not g.orphans:
                try:
                    # One C call moves the message from the queue to the slot.
                    slot.extend(itertools.islice(g.taker, 1))
                except IndexError:  # another thread took the last one
                    pass
            if not slot:
                g = self._take(g, slot, timeout)
            entry = slot[0]
            if entry[5] == _MSG and not g.starved:
                # The common case in the fewest steps (else, and on any
                # error, _to_msg() does it all again, the careful way).
                try:
                    data = _loads(entry[1])
                except Exception as err:
                    if not _unpicklable(entry[1], err):
                        raise  # a signal handler's: the message goes back (below)
                    return self._to_msg(g, slot, group)  # MessageError, the careful way
                msg = _new_msg(Msg)
                msg.__dict__.update(
                    sender_pid=entry[0], receiver_pid=self.pid, group=group, data=data
                )
                return msg
            return self._to_msg(g, slot, group)
        except BaseException:
            # No call runs before this append: a message taken and not
            # returned goes back to its group (the next receive() puts it first).
            if slot and g is not None:
                g.orphans.append(slot)
            raise

    def _to_msg(self, g: Group, slot: list[Entry], group: str) -> Msg:
        """Unpickle the message in ``slot`` (taken from ``g``) into a :class:`Msg`.

        On a message that cannot be unpickled, the slot is emptied (the
        message is consumed) and :class:`MessageError` raised; on any other
        exception the slot keeps it, for the caller to give back.
        """
        sender, payload, _peer, _raw, _seq, kind = slot[0]
        if g.starved and len(g.queue) < self.max_queue and g not in self.starving:
            # Once: the reader grants them credit again (and looks again after
            # taking g off the list, for a receive() that came meanwhile).
            self.starving.append(g)
            self.wakeup.wake()
        ref = None
        if kind == _CALL:
            call_id, epoch = _CALL_HEAD.unpack_from(payload)
            ref = CallRef(sender, call_id, epoch)
            payload = payload[_CALL_HEAD.size :]
        loads = pickle.loads if kind != _BULK else _bulk.loads  # out-of-band buffers
        try:
            data = loads(payload)
        except Exception as err:
            if not _unpicklable(payload, err, loads):
                raise  # a signal handler's: the message goes back (below)
            slot.clear()  # SPEC: that message is consumed; the next works
            problem = MessageError(
                f"cannot unpickle a message from PID {sender} in group {group!r}: {err!r}",
                pid=sender,
                group=group,
            )
            if ref is not None:
                refuse(ref, problem)  # the caller gets it rather than waiting
            raise problem from err
        msg = _new_msg(Msg)
        msg.__dict__.update(sender_pid=sender, receiver_pid=self.pid, group=group, data=data)
        if ref is not None:
            msg.__dict__["_reply_to"] = ref
        # Nothing that can run a signal handler comes after this point:
        # no finally clause, no call (either could replace the return).
        return msg

    def poll_get(self, group: str) -> Optional[Msg]:
        """Take the next queued message of ``group``, or return ``None``: no reading, no waiting."""
        g = self.groups.get(group)
        if g is None:
            g = self._group(group)
        g.touched = self.round
        if g.orphans:
            self._recover(g)
        if not g.queue:
            return None
        slot: list[Entry] = []
        try:
            try:
                slot.extend(itertools.islice(g.taker, 1))
            except IndexError:  # another thread took the last one
                return None
            return self._to_msg(g, slot, group)
        except BaseException:
            if slot:
                g.orphans.append(slot)
            raise

    def read_now(self, passes: int = 64) -> bool:
        """Read and route whatever has arrived, without blocking, unless someone else reads.

        For a reader that is not a blocked thread (an event loop's callback).

        Returns:
            Whether it read (``False``: another thread leads, and routes).
        """
        if self.closed:
            return False
        leading = False
        try:
            # Inside the try: an interrupt right after the acquire still
            # releases it (below).
            if not self.leader_lock.acquire(False):
                return False
            leading = True
            self.reading = _CONSUMER
            while passes > 0 and self._pump(0.0):
                passes -= 1
            if len(self.groups) > self.prune_at:
                self._prune()
        except (OSError, ValueError):
            if not self.closed:
                raise
        finally:
            if leading:
                self.reading = _NOBODY
            try:
                self.leader_lock.release()  # raises unless this thread holds it
            except RuntimeError:
                pass
            else:
                self.last_consumer = time.monotonic()
                if self.bg_asleep:
                    _release(self.doorbell)
                if self.sleepers:
                    self._wake_sleepers()
        return True

    def poll_entry(self, g: Group) -> Optional[Entry]:
        """Take the next entry of a private queue (a call's) if there is one: no reading."""
        slot: list[Entry] = []
        try:
            if g.orphans:
                self._recover(g)
            if g.queue:
                try:
                    slot.extend(itertools.islice(g.taker, 1))
                except IndexError:
                    pass
            return slot[0] if slot else None
        except BaseException:
            if slot:
                g.orphans.append(slot)
            raise

    def ask_to_lead(self) -> None:
        """Have the background reader step down (a consumer wants to read itself)."""
        if self.reading is _BACKGROUND:
            self.lead_request = time.monotonic()
            self.wakeup.wake()

    def _take(self, g: Group, items: list[Entry], timeout: Optional[float]) -> Group:
        """Move the group's next message into ``items``, reading or waiting for it.

        Returns:
            The group (a new one, if the old one was pruned while we slept).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        led = False  # this call has read the sockets itself
        handover: Optional[float] = None  # until when it waits for the background to yield
        while True:
            if not g.private and self.groups.get(g.name) is not g:
                g = self._group(g.name)  # pruned (cannot be while touched: a safety net)
            g.touched = self.round
            if g.orphans:
                self._recover(g)
            if g.queue:
                try:
                    items.extend(itertools.islice(g.taker, 1))
                except IndexError:  # another thread took the last one
                    pass
                if items:
                    return g
            if self.closed:
                raise MailboxClosed(
                    f"the mailbox of PID {self.pid} was closed while receiving (group {g.name!r})",
                    pid=self.pid,
                    group=g.name,
                    path=self.path,
                )
            remaining = None if deadline is None else deadline - time.monotonic()
            expired = remaining is not None and remaining <= 0
            if expired and (
                led
                or self.reading is _CONSUMER
                or (handover is not None and time.monotonic() >= handover)
            ):
                raise ReceiveTimeout(
                    f"no message for group {g.name!r} arrived within {timeout:g} s "
                    f"(PID {self.pid})",
                    pid=self.pid,
                    group=g.name,
                )
            if self.leader_lock._is_owned():  # type: ignore[attr-defined]
                if self._suspended_here():
                    raise RuntimeError(
                        "receive() was called (from a signal handler?) while this thread was "
                        "already inside receive(); the mailbox cannot be read re-entrantly"
                    )
                # Left held by a receive() a signal handler interrupted inside its
                # finally clause (Python < 3.11 runs handlers there too).
                self.reading = _NOBODY
                self.leader_lock.release()
            leading = False
            try:
                if self.leader_lock.acquire(False):
                    leading = led = True
                    self.reading = _CONSUMER
                    if not g.queue and not self.closed:
                        try:
                            if expired:
                                # A poll: read everything already sent, even behind
                                # other groups' bytes (one pass reads 64 KiB a peer).
                                passes = 0
                                while self._pump(0.0) and not g.queue and passes < 1000:
                                    passes += 1
                            else:
                                self._pump(remaining, True)
                        except (OSError, ValueError):
                            # close_mailbox() closed the epoll under us (a signal
                            # handler of this thread): say so below, not this.
                            if not self.closed:
                                raise
                    if len(self.groups) > self.prune_at:
                        self._prune()
                    if g.queue and not g.orphans:
                        try:
                            items.extend(itertools.islice(g.taker, 1))  # as at the top
                        except IndexError:  # pragma: no cover - another thread took it
                            pass
            finally:
                if leading:
                    self.reading = _NOBODY  # a store: no signal handler runs before it
                # The first call of the clause: whatever raised above, and
                # wherever, the lock is released if this thread took it...
                try:
                    self.leader_lock.release()  # an RLock: raises unless this thread holds it
                except RuntimeError:
                    pass
                else:
                    # ...and, also when a signal handler raised, whoever waits is
                    # woken and the background reader takes over if need be.
                    self.last_consumer = time.monotonic()
                    if self.bg_asleep:
                        _release(self.doorbell)
                    if self.sleepers:
                        self._wake_sleepers()
            if leading:
                if items:
                    return g
                continue
            if self.reading is _BACKGROUND:
                self.lead_request = time.monotonic()
                self.wakeup.wake()
            if expired:
                # A poll: have the background step down (it does at once), then
                # read what was sent ourselves, as a poll must.
                if handover is None:
                    handover = time.monotonic() + _HANDOVER
                remaining = max(handover - time.monotonic(), 0.0)
            self._sleep(g, remaining)

    def _suspended_here(self) -> bool:
        """Whether a receive() of this mailbox is suspended further up this thread's stack."""
        frame: Optional[FrameType] = sys._getframe(2)  # above the caller
        while frame is not None:
            if frame.f_code is _TAKE_CODE and frame.f_locals.get("self") is self:
                return True
            frame = frame.f_back
        return False

    def _sleep(self, g: Group, timeout: Optional[float]) -> None:
        w = threading.Lock()
        w.acquire()
        g.waiters.append(w)
        self.sleepers.append(w)
        try:
            # Checked after registering: a message or a step-down before it
            # would otherwise wake nobody.
            if (
                g.queue
                or g.orphans
                or self.closed
                or (not g.private and self.groups.get(g.name) is not g)
            ):
                return
            if self.reading is _NOBODY:
                # Nobody reads, or a reader is just taking or leaving the lock:
                # look again in a moment rather than spin against it.
                timeout = 0.001 if timeout is None else min(timeout, 0.001)
            w.acquire(True, -1 if timeout is None else timeout)
        finally:
            _discard(g.waiters, w)
            _discard(self.sleepers, w)

    def _recover(self, g: Group) -> None:
        with self.lock:
            g.recover()

    # ---------------------------------------------------------------- calls

    def new_call(self, call_id: int) -> Group:
        """Make the reply queue of a call() about to be sent (its id unique in this process)."""
        g = Group(f"<reply to call {call_id}>", b"", private=True)
        self.calls[call_id] = g
        return g

    def end_call(self, call_id: int) -> None:
        """Forget a call: a reply that comes after this is dropped."""
        self.calls.pop(call_id, None)

    def take_entry(self, g: Group, timeout: Optional[float]) -> Entry:
        """Take the next entry of a private queue (a call's), reading or waiting for it.

        Raises:
            ReceiveTimeout, MailboxClosed: as :meth:`get`.
        """
        slot: list[Entry] = []
        try:
            if g.queue and not g.orphans:
                try:
                    slot.extend(itertools.islice(g.taker, 1))
                except IndexError:
                    pass
            if not slot:
                self._take(g, slot, timeout)
            return slot[0]
        except BaseException:
            if slot:
                g.orphans.append(slot)  # the next take_entry() puts it back first
            raise

    def callee_died(self, g: Group, pid: int) -> None:
        """Tell a waiting call that its callee exited (a marker in its reply queue)."""
        g.queue.append((pid, None, None, None, -1, KIND_LOCAL))
        self._wake(g)
        self.wakeup.wake()

    def connections_from(self, pid: int) -> list[Peer]:
        """This process's connections from ``pid`` that have not ended yet."""
        found = [p for p in list(self.new_peers) if p.pid == pid]
        peer = self.by_pid.get(pid)
        while peer is not None:
            found.append(peer)
            peer = peer.successor
        return [p for p in found if not p.dead]

    # ---------------------------------------------------------------- local messages

    def inject(self, group: str, sender: int, payload: bytes) -> Entry:
        """Queue a message made in this process (a monitor's ``Down``) for ``receive(group)``.

        Any thread may call it. It takes no credit (nobody is slowed down by
        it) and wakes whoever waits for the group.

        Returns:
            The queued entry, for :meth:`withdraw`.

        Raises:
            MailboxClosed: the mailbox is closed.
        """
        raw = group.encode("utf-8", "surrogatepass")
        entry: Entry = (sender, payload, None, raw, -1, KIND_LOCAL)
        with self.lock:  # _prune() forgets empty groups under it
            if self.closed:
                raise MailboxClosed(
                    f"the mailbox of PID {self.pid} is closed", pid=self.pid, group=group
                )
            g = self.groups.get(group)
            if g is None:
                g = self.groups[group] = Group(group, raw)
            self.by_raw.setdefault(g.raw, g)
            g.queue.append(entry)
        self._wake(g)
        self.wakeup.wake()  # a receive() leading in epoll looks at its group again
        return entry

    def withdraw(self, group: str, entry: Entry) -> bool:
        """Remove a message :meth:`inject` queued, unless a receive() took it already."""
        g = self.groups.get(group)
        if g is None:
            return False
        try:
            g.queue.remove(entry)  # one C call
        except ValueError:
            pass
        else:
            return True
        # Taken by a receive() a signal handler interrupted: not received.
        for slot in list(g.orphans):
            try:
                slot.remove(entry)
            except ValueError:
                continue
            return True
        return False

    def depths(self) -> dict[str, int]:
        """Messages queued per group (orphans of interrupted calls included)."""
        return {
            name: len(g.queue) + sum(map(len, g.orphans))
            for name, g in list(self.groups.items())
            if g.queue or g.orphans
        }

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Close: stop admitting, wake every receive(), close every connection."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.admission.close()
        self.wakeup.wake()
        self._wake_sleepers()
        for loop_reader in list(self.async_readers):
            _release(loop_reader)  # its awaiting coroutines raise MailboxClosed
        for g in list(self.groups.values()):
            self._wake(g)
        _release(self.doorbell)
        # The reader returns from epoll on the wake-up and steps down.
        got = self.leader_lock.acquire(True, 5.0)
        try:
            if got:
                self._refuse_calls()
            self._close_peers()
            for g in list(self.groups.values()):  # unmap what nobody will receive (mproc._bulk)
                _bulk.discard(list(g.queue))
            self.epoll.close()
            self.wakeup.close()
        finally:
            if got:
                self.leader_lock.release()
        if self.background.is_alive() and self.background is not threading.current_thread():
            _release(self.doorbell)
            self.background.join(timeout=5.0)
        try:
            self.listener.close()  # also unlinks the socket file
        except OSError:
            pass  # removed already (multiprocessing's exit finalizer, or a person)

    def _refuse_calls(self) -> None:
        """Closing (reader lock held): fail the calls nobody will receive now.

        What was sent already is read first; every CALL still queued is
        answered with MailboxClosed, so its caller does not wait for ever.
        """
        passes = 0
        try:
            while passes < 100 and self._pump(0.0):
                passes += 1
        except (OSError, ValueError):
            pass
        calls: list[Entry] = []
        for g in list(self.groups.values()):
            for entry in list(g.queue) + [e for slot in list(g.orphans) for e in slot]:
                if entry[5] == _CALL:
                    calls.append(entry)
        if not calls:
            return
        until = time.monotonic() + _REFUSE_FOR
        for sender, payload, _peer, raw, _seq, _kind in calls:
            left = until - time.monotonic()
            if left <= 0:
                break
            call_id, epoch = _CALL_HEAD.unpack_from(payload)
            group = raw.decode("utf-8", "surrogatepass") if raw is not None else ""
            problem = MailboxGone(
                f"the mailbox of PID {self.pid} was closed with the call still queued "
                f"(group {group!r}): it was never received",
                pid=self.pid,
                group=group,
            )
            refuse(CallRef(sender, call_id, epoch), problem, left)

    def _close_peers(self) -> None:
        seen: list[Peer] = list(self.peers.values()) + list(self.new_peers)
        seen += list(self.dying)
        for peer in list(self.by_pid.values()):
            nxt = peer.successor
            while nxt is not None:
                seen.append(nxt)
                nxt = nxt.successor
        for peer in seen:
            peer.dead = True
            if peer.bulk is not None:
                peer.bulk.close()
            peer.sock.close()
        self.peers.clear()
        self.by_pid.clear()
        self.new_peers.clear()

    def forget_after_fork(self) -> None:
        """Drop the parent's mailbox in a forked child without touching the parent's."""
        self.admission.forget_after_fork()
        for peer in list(self.peers.values()) + list(self.new_peers) + list(self.dying):
            if peer.bulk is not None:
                peer.bulk.close()  # our copies of the descriptors it received
            peer.sock.close()
        for peer in list(self.by_pid.values()):
            nxt = peer.successor
            while nxt is not None:
                nxt.sock.close()
                nxt = nxt.successor
        # multiprocessing's unlink finalizer checks the PID, so this leaves the
        # parent's socket file alone.
        self.listener.close()
        self.epoll.close()
        self.wakeup.close()


_new_msg = object.__new__  # Msg is frozen: build it by its __dict__ (4x faster)
_loads = pickle.loads
_TAKE_CODE = Receiver._take.__code__


#: A STATS answer is cut to fit this (a socket buffer holds it whole).
_STATS_MAX = 48 * 1024


def _spin_seconds() -> float:
    """How long a receive() polls before it blocks: ``MPROC_SPIN_US`` µs, or the default."""
    text = os.environ.get(ENV_SPIN, "")
    if not text:
        return _SPIN
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 10_000.0:  # NaN fails too
        log.warning("%s=%r is not a number of microseconds in [0, 10000]: ignored", ENV_SPIN, text)
        return _SPIN
    return value / 1e6


def _stats_json(stats: dict[str, Any]) -> bytes:
    """``stats`` as JSON, at most :data:`_STATS_MAX` bytes, so it is written whole.

    Past that, group names longer than :data:`_NAME_SHOWN` characters are cut
    (ending in "…"), then only the deepest groups are listed and
    ``"truncated"`` says how many were left out.
    """
    body = json.dumps(stats).encode()
    if len(body) <= _STATS_MAX:
        return body
    groups = sorted(stats["groups"].items(), key=lambda kv: -kv[1])
    keep = len(groups)
    while True:
        cut = dict(stats)
        cut["groups"] = {_shown(name): depth for name, depth in groups[:keep]}
        cut["truncated"] = len(groups) - keep
        cut["cmdline"] = [_shown(arg) for arg in stats["cmdline"][:64]]
        body = json.dumps(cut).encode()
        if len(body) <= _STATS_MAX or keep == 0:
            return body
        keep //= 2


_NAME_SHOWN = 256


def _shown(text: str) -> str:
    return text if len(text) <= _NAME_SHOWN else text[: _NAME_SHOWN - 1] + "\u2026"


def _unpicklable(payload: Any, err: Exception, loads: Any = pickle.loads) -> bool:
    """Whether ``err`` from unpickling ``payload`` is the message's fault.

    A signal handler's exception raised while the unpickler ran Python code
    looks the same. So try once more: failing again alike is the message's
    fault (it is consumed, MessageError; the text may differ, e.g. it names a
    request id); working now means the first failure came from outside (the
    message is kept and the exception propagates). An exception raised in a
    signal handler (its frame in the traceback) is never the message's: a
    big message unpickles for longer than a storm's period, and would fail
    alike twice.
    """
    if raised_by_handler(err):
        return False
    try:
        loads(payload)
    except Exception as again:
        return type(again) is type(err) and not raised_by_handler(again)
    return False


def _release(w: Any) -> None:
    try:
        w.release()
    except RuntimeError:  # released already (woken twice)
        pass


def _discard(items: list[Any], w: Any) -> None:
    try:
        items.remove(w)
    except ValueError:
        pass
