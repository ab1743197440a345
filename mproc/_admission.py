"""Admission: accepting and authenticating a mailbox's peers, in one thread.

One thread per mailbox runs every handshake at once as a small state machine
per connection, driven by one selector: thousands of idle, slow or hostile
connections cost file descriptors, never threads. Each connection has one
deadline for its whole handshake. Out of file descriptors, ``accept()`` still
takes the connection (a descriptor is kept in reserve for it) and closes it
at once: that peer is refused, the listener keeps accepting.

A peer is admitted when its uid (SO_PEERCRED) is ours, both HMAC challenges
succeeded and its HELLO names our protocol (the frames, and why a sender may
pipeline its challenge behind its answer: :mod:`mproc._wire`); our replies
to the frames of one read go out in one write. It is then handed to the
reader (:meth:`Admission.on_admit`), which sends our HELLO once it has taken
the peer: any message the peer sends after that is already the reader's to
find, and every CREDIT frame comes after the HELLO.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import selectors
import socket
import threading
import time
from typing import Callable, Optional

from . import _runtime as rt
from . import _wire as wire
from ._log import logger as log
from ._wakeup import Wakeup

__all__ = ["Admission"]

_ACCEPT_BATCH = 64  # connections taken per wake-up before looking at the others
_EMFILE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RETRY_RESERVE = 0.1  # after the fd reserve could not be reopened


class _Pending:
    """A connection in the middle of its handshake."""

    __slots__ = ("deadline", "fd", "inbuf", "mine", "out", "pid", "sock", "stage")

    def __init__(self, sock: socket.socket, pid: int, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()  # its key in Admission.pending, also once it is closed
        self.pid = pid
        self.deadline = deadline
        self.inbuf = bytearray()
        self.mine = wire.challenge()
        self.stage = 0  # the number of frames received so far
        # Our answers to the frames of one read, written together: a sender
        # sends its challenge right behind its answer, and gets our verdict
        # and our answer in one write.
        self.out: list[bytes] = []


class Admission:
    """The accepting thread of one mailbox."""

    def __init__(
        self,
        listener: socket.socket,
        key: bytes,
        path: str,
        hello: bytes,
        on_admit: Callable[[socket.socket, int, int, int], bool],
        handshake_timeout: Optional[float] = None,
    ) -> None:
        self.listener = listener
        self.key = key
        self.path = path
        self.hello = hello
        self.on_admit = on_admit
        # Read now, not at import: tests and tools may change the default.
        self.timeout = rt.HANDSHAKE_TIMEOUT if handshake_timeout is None else handshake_timeout
        self.pending: dict[int, _Pending] = {}
        # (deadline, n, connection) for each connection in pending, and for
        # some that left it (skipped when they come up; rebuilt when they
        # outnumber the others): the next deadline without a scan of them all.
        self.deadlines: list[tuple[float, int, _Pending]] = []
        self.serial = itertools.count()  # ties between deadlines: never compare connections
        self.selector = selectors.DefaultSelector()
        self.wakeup = Wakeup()
        self.closed = False
        self.reserve: Optional[int] = _open_reserve()
        self.listening = True
        self.resume_at = 0.0
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.selector.register(self.wakeup.fileno(), selectors.EVENT_READ, self.wakeup)
        self.thread = threading.Thread(
            target=self._run, name="mproc-mailbox-admission", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Stop accepting, drop every connection still in its handshake."""
        self.closed = True
        self.wakeup.wake()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=5.0)
        for p in list(self.pending.values()):
            p.sock.close()
        self.pending.clear()
        self.selector.close()
        self.wakeup.close()
        if self.reserve is not None:
            os.close(self.reserve)
            self.reserve = None

    def forget_after_fork(self) -> None:
        """In a forked child: close our copies of the descriptors, touch nothing else."""
        for p in self.pending.values():
            p.sock.close()
        self.selector.close()
        self.wakeup.close()
        if self.reserve is not None:
            os.close(self.reserve)

    # -- the loop

    def _run(self) -> None:
        while not self.closed:
            timeout = self._next_timeout()
            try:
                events = self.selector.select(timeout)
            except OSError as err:  # pragma: no cover - EBADF after close()
                log.debug("mailbox %s: admission select failed: %r", self.path, err)
                continue
            for key, _ in events:
                if key.data is None:
                    self._accept()
                elif key.data is self.wakeup:
                    self.wakeup.drain()
                else:
                    p: _Pending = key.data
                    try:
                        self._step(p)
                    except Exception as err:  # a peer that hung up, a bug: that peer only
                        if self.pending.get(p.fd) is p:  # not handed over yet
                            self._refuse(p, f"its handshake failed: {err!r}")
            self._expire()

    def _next_timeout(self) -> Optional[float]:
        deadlines = self.deadlines
        while deadlines and self.pending.get(deadlines[0][2].fd) is not deadlines[0][2]:
            heapq.heappop(deadlines)  # admitted or refused meanwhile
        times = [deadlines[0][0]] if deadlines else []
        if not self.listening:
            times.append(self.resume_at)
        return max(min(times) - time.monotonic(), 0.0) if times else None

    def _expire(self) -> None:
        now = time.monotonic()
        if not self.listening and now >= self.resume_at:
            self._listen(True)
        deadlines = self.deadlines
        while deadlines and deadlines[0][0] <= now:
            p = heapq.heappop(deadlines)[2]
            if self.pending.get(p.fd) is p:
                self._refuse(p, f"the handshake took longer than {self.timeout:g} s")

    def _listen(self, on: bool) -> None:
        if on == self.listening:
            return
        if on:
            self.selector.register(self.listener, selectors.EVENT_READ, None)
        else:
            self.selector.unregister(self.listener)
            self.resume_at = time.monotonic() + _RETRY_RESERVE
        self.listening = on

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno in _EMFILE:
                    self._shed(err)
                    return
                log.debug("mailbox %s: accept failed: %r", self.path, err)
                return
            try:
                self._admit(sock)
            except Exception as err:  # MemoryError, a bug: cost this peer only
                log.debug("mailbox %s: refused a connection: %r", self.path, err)
                sock.close()

    def _shed(self, err: OSError) -> None:
        """Out of descriptors: take the waiting connection with the reserve and drop it."""
        log.debug("mailbox %s: out of file descriptors (%s); refusing a peer", self.path, err)
        if self.reserve is not None:
            os.close(self.reserve)
            self.reserve = None
            try:
                sock, _addr = self.listener.accept()
                sock.close()
            except OSError:
                pass
            self.reserve = _open_reserve()
        if self.reserve is None:
            # No reserve to shed with: stop looking at the listener for a
            # moment instead of spinning on it, then try again.
            self._listen(False)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        pid, uid = rt.peer_credentials(sock)
        if uid != os.getuid():
            log.debug("mailbox %s: refused PID %d: uid %d is not ours", self.path, pid, uid)
            sock.close()
            return
        p = _Pending(sock, pid, time.monotonic() + self.timeout)
        # Handshake frames are tiny: on a new socket, sendall cannot block.
        sock.sendall(wire.frame(p.mine))
        self.pending[p.fd] = p
        self.selector.register(sock, selectors.EVENT_READ, p)
        if len(self.deadlines) > 2 * len(self.pending) + 64:  # mostly gone: start afresh
            self.deadlines = [(q.deadline, next(self.serial), q) for q in self.pending.values()]
            heapq.heapify(self.deadlines)
        else:
            heapq.heappush(self.deadlines, (p.deadline, next(self.serial), p))

    # -- one connection's handshake

    def _step(self, p: _Pending) -> None:
        try:
            data = p.sock.recv(_room(p))
        except BlockingIOError:
            return
        except OSError as err:
            self._refuse(p, f"read failed: {err!r}")
            return
        if not data:
            self._refuse(p, "it closed the connection during the handshake")
            return
        p.inbuf += data
        while True:
            if len(p.inbuf) < wire.LEN.size:
                break
            (size,) = wire.LEN.unpack_from(p.inbuf)
            if not 0 < size <= wire.MAX_HANDSHAKE_FRAME:
                self._refuse(p, f"a {size}-byte handshake frame: not an mproc sender")
                return
            if len(p.inbuf) < wire.LEN.size + size:
                break
            body = bytes(p.inbuf[wire.LEN.size : wire.LEN.size + size])
            del p.inbuf[: wire.LEN.size + size]
            if not self._on_frame(p, body):
                return
        if not self._flush(p):
            self._refuse(p, "it hung up during the handshake")

    def _on_frame(self, p: _Pending, body: bytes) -> bool:
        """Handle the next handshake frame; return whether the connection goes on.

        Our replies are queued in ``p.out``, and written (:meth:`_flush`) when
        the frames read so far are handled, before a verdict that ends the
        handshake, and before the peer is handed over.
        """
        p.stage += 1
        if p.stage == 1:  # its answer to our challenge
            if not wire.verify(self.key, p.mine, body):
                p.out.append(wire.frame(wire.FAILURE))
                self._flush(p)
                self._refuse(p, "wrong key (another runtime directory or key file?)")
                return False
            p.out.append(wire.frame(wire.WELCOME))
        elif p.stage == 2:  # its challenge (answered only now that we know its key)
            try:
                p.out.append(wire.frame(wire.answer(self.key, body)))
            except ValueError:
                self._refuse(p, "it sent no valid challenge")
                return False
        elif p.stage == 3:  # its verdict on our key
            if body != wire.WELCOME:
                self._refuse(p, "it refused our key")
                return False
        else:  # its HELLO
            try:
                _version, _max_frame, flags, session = wire.parse_hello(body)
            except ValueError as err:
                p.out.append(self.hello)  # so it can name our version, too
                self._flush(p)
                self._refuse(p, str(err))
                return False
            if not self._flush(p):
                self._refuse(p, "it hung up during the handshake")
                return False
            self._admitted(p, session, flags)
            return False
        return True

    def _flush(self, p: _Pending) -> bool:
        """Write the replies queued for ``p``; return whether that worked (or was nothing)."""
        if not p.out:
            return True
        data = b"".join(p.out)
        p.out.clear()
        return _try_send(p.sock, data)

    def _admitted(self, p: _Pending, session: int, flags: int) -> None:
        self.selector.unregister(p.sock)
        del self.pending[p.fd]
        # The reader sends our HELLO once it knows the peer: whatever the peer
        # then sends, the next receive() finds, and the HELLO comes before any
        # CREDIT the reader sends on the connection.
        if not self.on_admit(p.sock, p.pid, session, flags):
            p.sock.close()

    def _refuse(self, p: _Pending, why: str) -> None:
        log.debug("mailbox %s: refused PID %d: %s", self.path, p.pid, why)
        fd = p.fd
        if self.pending.get(fd) is p:
            del self.pending[fd]
            try:
                self.selector.unregister(p.sock)
            except (KeyError, ValueError):
                pass
        p.sock.close()


# The sizes of a sender's handshake frames (answer, challenge, verdict, HELLO;
# length prefix included), and what is left of them after each stage.
_FRAMES = (
    len(wire.frame(wire.answer(b"k", wire.challenge()))),
    len(wire.frame(wire.challenge())),
    len(wire.frame(wire.WELCOME)),
    len(wire.hello()),
)
_LEFT = tuple(sum(_FRAMES[stage:]) for stage in range(len(_FRAMES) + 1))


def _room(p: _Pending) -> int:
    """How much to read now: never past the end of the handshake.

    A sender may write its first message right behind its HELLO: those
    bytes stay in the socket for the reader (we read no further than the
    handshake frames we still expect, or than the end of a longer one).
    """
    room = _LEFT[min(p.stage, len(_FRAMES))] - len(p.inbuf)
    if room > 0:
        return room
    if len(p.inbuf) < wire.LEN.size:
        return wire.LEN.size - len(p.inbuf)
    size: int = wire.LEN.unpack_from(p.inbuf)[0]
    return max(wire.LEN.size + size - len(p.inbuf), 1)


def _try_send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def _open_reserve() -> Optional[int]:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
