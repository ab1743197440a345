"""The per-peer reader: one sender's connection, its bytes and the frames cut from them.

Every change a reader makes is one C call or one store, so that a signal
handler raising between any two of them (Python runs handlers in the main
thread, which may be reading: see :mod:`mproc._receiver`) leaves a state the
next reader continues from:

* bytes are read by ``deque.extend`` from an iterator over ``os.read``, so
  every chunk read is recorded before anything else runs;
* the frames cut out of them are published, with the bytes left over, by one
  store of a new :class:`Input` (the old one is left whole until then);
* a frame over :data:`BIG_FRAME` bytes is read into an anonymous mapping of
  its own, grown with ``mremap`` as bytes arrive (memory follows bytes, one
  copy), each ``readv`` count recorded by ``extend(map(...))`` in C;
* a connection that may carry file descriptors (its HELLO had
  ``HELLO_BULK``) is read with ``recvmsg`` by its :attr:`Peer.bulk`
  (:class:`mproc._bulk.Inbox`), under the same rules.
"""

from __future__ import annotations

import itertools
import mmap
import os
import socket
import struct
import threading
import time
from collections import deque
from functools import partial
from typing import Any, Optional

from . import _wire as wire

__all__ = ["BIG_FRAME", "KIND_LOCAL", "Big", "Entry", "Input", "Peer"]

# One read() takes at most this much: under glibc's mmap threshold (128 KiB),
# so the buffer comes from the heap (an mmap + munmap per read costs ~5 µs).
_CHUNK = 1 << 16
#: A frame larger than this is read into an anonymous mapping of its own.
BIG_FRAME = 1 << 20
_MSG_KINDS = wire.TO_RECEIVER
_UNGROUPED = wire.FIRST_UNGROUPED  # REPLY, STATS: no group (raw None in the entry)
_BULK = wire.KIND_BULK  # ...but BULK has one (mproc._bulk)
_SMALL = struct.Struct("!iBHQ")  # a short frame's length and head
_SLICE = 64  # frames cut out (and published) at a time: ~6 000 bytecodes

#: A parsed message: (sender pid, payload, peer, raw group, seq, kind). A
#: REPLY's (or STATS request's) raw group is ``None`` (it goes to its call, never to a group); a
#: message made in this process (a monitor's Down) has no peer and kind
#: :data:`KIND_LOCAL`.
Entry = tuple[int, Any, Optional["Peer"], Optional[bytes], int, int]
#: The kind of an :data:`Entry` made in this process, not read from a peer.
KIND_LOCAL = 0


class Big:
    """A large frame read straight into memory of its own: one copy, no join.

    The memory is an anonymous mapping grown geometrically (``mremap``) as
    bytes arrive, so what is committed follows what arrived, whatever the
    header announced. ``counts`` records every read's length in C.
    """

    __slots__ = ("counts", "mm", "need")

    def __init__(self, mm: mmap.mmap, counts: deque[int], need: int) -> None:
        self.mm = mm
        self.counts = counts  # bytes of each read (the first: what came before)
        self.need = need  # the whole frame's length, prefix included


class Input:
    """A peer's input, replaced whole by one store when frames are cut out of it."""

    __slots__ = ("big", "chunks", "need", "pending")

    def __init__(
        self,
        chunks: deque[bytes],
        pending: deque[Entry],
        need: int,
        big: Optional[Big] = None,
    ) -> None:
        self.chunks = chunks  # bytes read and not yet parsed (b"" marks EOF)
        self.pending = pending  # parsed messages not yet in their group queue
        self.need = need  # bytes the next frame needs in all (0: unknown)
        self.big = big  # a large frame being read into memory of its own


class Peer:
    """One sender's connection, as the reader sees it."""

    __slots__ = (
        "active",
        "bulk",
        "control",
        "dead",
        "fd",
        "granted",
        "greeted",
        "greeting",
        "inp",
        "last_seq",
        "names",
        "pid",
        "progress",
        "reader",
        "sent",
        "session",
        "sock",
        "successor",
    )

    def __init__(
        self, sock: socket.socket, pid: int, session: int = 0, control: bool = False
    ) -> None:
        self.sock = sock
        self.control = control  # carries control frames only (see wire.HELLO_CONTROL)
        self.fd = sock.fileno()
        self.pid = pid
        self.session = session  # the sending process's session (its HELLO's epoch)
        # Calls os.read until the iterator is dropped (None never matches):
        # extending a deque from it records every byte read in C.
        self.reader = iter(partial(os.read, self.fd, _CHUNK), None)
        self.inp = Input(deque(), deque(), 0)
        self.bulk: Any = None  # an fd-carrying connection's mproc._bulk.Inbox (read by recvmsg)
        self.last_seq: dict[bytes, int] = {}  # group -> highest seq routed
        self.granted: dict[bytes, int] = {}  # group -> the limit granted (recorded first)
        self.sent: dict[bytes, int] = {}  # group -> the largest limit written to it
        self.greeted = False  # our HELLO was written
        self.greeting = threading.Lock()  # held by admission while it writes the HELLO
        self.names: dict[bytes, str] = {}
        self.successor: Optional[Peer] = None  # this process's next connection
        self.active = False  # registered with epoll
        self.dead = False
        self.progress = time.monotonic()

    # -- reading (only the reader that holds the leadership calls these)

    def read(self) -> str:
        """Read what has arrived (one read); return what failed, or ``""``."""
        inp = self.inp
        big = inp.big
        try:
            if big is None:
                if self.bulk is None:
                    inp.chunks.extend(itertools.islice(self.reader, 1))
                else:  # descriptors may come with the bytes (mproc._bulk)
                    self.bulk.read(self)
            else:
                filled = sum(big.counts)
                cap = len(big.mm)
                if filled == cap:
                    big.mm.resize(min(big.need, 2 * cap))
                    cap = len(big.mm)
                # map() calls readv and extend() records its count, in C: the
                # view is a temporary, gone before the mapping is resized again.
                big.counts.extend(map(os.readv, (self.fd,), ([memoryview(big.mm)[filled:cap]],)))
        except BlockingIOError:
            return ""
        except (OSError, MemoryError, BufferError) as err:
            return f"read failed: {err!r}"
        self.progress = time.monotonic()
        return ""

    def at_eof(self) -> bool:
        """Whether the last read found the end of the connection."""
        inp = self.inp
        if inp.big is not None:
            return len(inp.big.counts) > 1 and not inp.big.counts[-1]
        return bool(inp.chunks) and not inp.chunks[-1]

    def mid_frame(self) -> bool:
        """Whether bytes of an incomplete frame are held."""
        return bool(self.inp.chunks) or self.inp.big is not None

    def parse(self, max_frame: int) -> str:
        """Cut the complete frames out of the bytes read; return what was bad, if anything.

        The frames go to ``inp.pending`` and the bytes left over stay, both
        published by one store of a new :class:`Input`.
        """
        inp = self.inp
        if inp.big is not None:
            return self._parse_big(inp, inp.big, max_frame)
        chunks = inp.chunks
        if not chunks:
            return ""
        if len(chunks) == 1 and not inp.pending:
            # The common case, one small frame in one read: cut it out directly.
            data = chunks[0]
            if len(data) > _SMALL.size:
                size, kind, glen, seq = _SMALL.unpack_from(data)
                start = _SMALL.size + glen
                if (
                    size + 4 == len(data)
                    and kind in _MSG_KINDS
                    and wire.HEAD.size + glen <= size <= max_frame
                ):
                    group = (
                        data[_SMALL.size : start] if kind < _UNGROUPED or kind == _BULK else None
                    )
                    entry = (self.pid, memoryview(data)[start:], self, group, seq, kind)
                    self.inp = Input(deque(), deque((entry,)), 0)  # one store commits it
                    return ""
        if inp.need and sum(map(len, chunks)) < inp.need:
            return ""  # the rest of a large frame has not arrived yet
        while True:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            entries, used, need, bad = wire.parse(
                data, max_frame, _MSG_KINDS, (self.pid, self), _SLICE
            )
            if not entries and not bad and len(chunks) == 1 and need == inp.need:
                return ""
            if len(entries) < _SLICE or bad or used == len(data):
                break
            # A slice at a time, each published by one store: however often
            # signal handlers interrupt, every pass makes progress.
            pending = deque(inp.pending)
            pending.extend(entries)
            self.inp = inp = Input(deque((bytes(data[used:]),)), pending, 0)
            chunks = inp.chunks
        rest = bytes(data[used:]) if used < len(data) and not bad else b""
        pending = inp.pending
        if entries:
            pending = deque(pending)
            pending.extend(entries)
        big = None
        if rest and need > BIG_FRAME:
            # A large frame: read the rest of it into memory of its own.
            # Private (fd -1 adds MAP_ANONYMOUS): a shared anonymous mapping is
            # a shmem file of its first size, and growing it with mremap would
            # leave pages without backing (EFAULT).
            mm = mmap.mmap(-1, min(need, max(2 * len(rest), BIG_FRAME)), flags=mmap.MAP_PRIVATE)
            mm[: len(rest)] = rest
            big, rest = Big(mm, deque((len(rest),)), need), b""
        # One store publishes the new input: a signal landing before it left
        # the old one whole, and nothing of it was changed.
        self.inp = Input(deque((rest,)) if rest else deque(), pending, need, big)
        return f"sent {bad}" if bad else ""

    def _parse_big(self, inp: Input, big: Big, max_frame: int) -> str:
        if sum(big.counts) < big.need:
            return ""
        frames, used, _need, bad = wire.parse(memoryview(big.mm)[: big.need], max_frame, _MSG_KINDS)
        if bad or len(frames) != 1 or used != big.need:  # pragma: no cover - checked before
            return f"sent {bad or 'a large frame that does not parse'}"
        kind, group, seq, payload = frames[0]
        pending = deque(inp.pending)
        grouped = kind < _UNGROUPED or kind == _BULK
        pending.append((self.pid, payload, self, group if grouped else None, seq, kind))
        self.inp = Input(deque(), pending, 0)  # one store commits it
        return ""
