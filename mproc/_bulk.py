"""Out-of-band buffers: a message's big buffers travel in a sealed memfd, not in the stream.

Pickle protocol 5 hands every :class:`pickle.PickleBuffer` (a numpy array's
memory, at any depth; a big ``bytes`` or ``bytearray`` sent as the message
itself, through :class:`_AsBuffer`) to a ``buffer_callback``. (The C pickler
writes a ``bytes`` or ``bytearray`` inside a container itself, before any
``reducer_override`` or dispatch table could see it: those stay in band.)
Those of at least :data:`THRESHOLD` bytes are written, one after the other, into one memfd
(``memfd_create``), which is then sealed against any change (shrink, grow,
write, new seals) and passed with the frame by ``SCM_RIGHTS``. The receiver
checks it, maps it ``MAP_PRIVATE`` (copy on write: a received numpy array is
writable, as a pickled one is), closes the descriptor at once (but before
Python 3.13, ``mmap`` keeps a duplicate of it while the mapping lives: a
received message holds one descriptor until its buffers are gone) and rebuilds
the object over the mapping: a numpy array is not copied at all, a
``bytes``/``bytearray`` once (it must own its memory).

**Wire** (see :mod:`mproc._wire`): a ``BULK`` frame is a ``MSG`` in every
other way (group, seq, credit); its payload is ``!I`` the number of buffers
``n``, ``n`` times ``!Q`` their sizes, then the pickle. Buffer ``i`` starts at
the sum of the earlier sizes, each rounded up to :data:`ALIGN`; the memfd is
exactly as long as the last one's end. Its one descriptor rides on the
frame's first byte. The buffers count against the receiver's frame limit.

**Which connections carry descriptors.** A ``read()`` with no room for
ancillary data makes the kernel discard descriptors, so a connection that
may carry them must be read with ``recvmsg`` (about 0.5 µs more per read).
Only a connection whose sender's HELLO has :data:`~mproc._wire.HELLO_BULK`
is read that way: a sender opens such a connection the first time it sends
out-of-band buffers to a process (closing its plain one: the receiver reads
the new one after the old one ended, so order holds), and uses it for every
message while it lasts. Small messages between processes that never send
bulk keep ``os.read``.

**Fallback.** No ``os.memfd_create``, or it (or writing, or sealing) fails
(EMFILE, ENOMEM, a seccomp filter): the message is pickled in-band, as
before, and sent as a plain ``MSG``.

**A hostile peer** (same uid, authenticated, but not mproc) may send
anything: a descriptor with a frame that announces none, none with one that
does, a pipe or ``/dev/zero``, an unsealed or writable memfd (it could
shrink it under our mapping: ``SIGBUS``), one of the wrong size, more than
fit (``MSG_CTRUNC``), or thousands of them. Each of these drops that
connection (logged like any bad frame); every descriptor received on it is
closed. A connection holds at most one frame's descriptor once its frames
are bound (two for a moment, if an interrupt came between a read and the
binding of the frame it completed).

**Signal safety**, as in :mod:`mproc._reader`: every change is one C call
or one store. ``recvmsg`` results are recorded whole by ``deque.extend``;
their bytes and descriptors are moved on by one ``extend`` each from
per-read deques (so a move interrupted and repeated moves nothing twice);
a descriptor is popped and closed by one ``map(os.close, …)`` pipeline; a
frame's entry is replaced by one store after its mapping was made and
recorded. A sender's memfd goes into a deque as it is created and is closed
by one C call (:attr:`Bulk.close`), the first call of ``send()``'s
``finally`` clause.
"""

from __future__ import annotations

import array
import fcntl
import itertools
import mmap
import os
import pickle
import socket
import stat
import sys
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import _wire as wire

if TYPE_CHECKING:
    from ._reader import Entry, Peer

__all__ = [
    "ALIGN",
    "THRESHOLD",
    "Bulk",
    "Inbox",
    "Received",
    "Violation",
    "attach",
    "discard",
    "dumps",
    "dumps_buffer",
    "prepare",
    "write",
]

#: Buffers smaller than this stay in the pickle (a memfd costs ~30 µs to make and map).
THRESHOLD = 1 << 20
#: Each buffer starts at a multiple of this in the memfd (numpy's widest SIMD loads).
ALIGN = 64
#: The most buffers one frame may carry (the header says how many).
MAX_BUFFERS = 1 << 16
#: Seals a received memfd must have: nobody can change it under our mapping.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_COUNT = wire.BULK_COUNT
_SIZE = wire.BULK_SIZE
_CHUNK = 1 << 16  # bytes per recvmsg, as _reader reads
# Room for a few descriptors: more than one per read is a violation anyway,
# and what does not fit is closed by the kernel (MSG_CTRUNC).
_CONTROL = socket.CMSG_SPACE(4 * array.array("i").itemsize)
_MAX_HELD = 1  # descriptors waiting for their frame's last byte
# Python < 3.13's mmap keeps a dup of the descriptor for its whole life
# (trackfd=False, 3.13, does not): there, a received bulk message holds one
# descriptor until its last buffer is gone.
_UNTRACKED: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}
_SINK: Callable[[Any], None] = deque(maxlen=0).extend  # runs an iterator to its end, in C
_END = object()


class Violation(OSError):
    """A peer broke the bulk protocol (its connection is dropped)."""


# ---------------------------------------------------------------- sending


class _AsBuffer:
    """Pickles a ``bytes``/``bytearray`` as ``type(PickleBuffer(obj))``: out of band."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __reduce_ex__(self, protocol: Any) -> Any:
        return type(self.obj), (pickle.PickleBuffer(self.obj),)


class Bulk:
    """A message whose big buffers go in a memfd: the pickle, the buffers, the memfd."""

    __slots__ = ("buffers", "close", "fallback", "fds", "head", "inband", "pickle", "size")

    def __init__(
        self, data: bytes, buffers: list[memoryview], fallback: Callable[[], bytes]
    ) -> None:
        self.pickle = data
        self.buffers = buffers
        self.fallback = fallback  # the in-band pickle, if no memfd can be made
        offsets = _offsets([b.nbytes for b in buffers])
        self.size = offsets[-1] + buffers[-1].nbytes  # the memfd's length
        self.head = _COUNT.pack(len(buffers)) + b"".join(_SIZE.pack(b.nbytes) for b in buffers)
        # The memfd, once made: recorded by the C call that makes it, closed
        # by one C call (popped and closed with nothing in between).
        self.fds: deque[Any] = deque((_END,))
        self.close: Callable[[], None] = partial(_SINK, map(os.close, iter(self.fds.pop, _END)))
        self.inband: Optional[bytes] = None

    def __len__(self) -> int:
        """Bytes the message costs the receiver: its frame and its buffers."""
        return len(self.head) + len(self.pickle) + self.size


def _offsets(sizes: list[int]) -> list[int]:
    offsets = []
    at = 0
    for size in sizes:
        offsets.append(at)
        at += -(-size // ALIGN) * ALIGN
    return offsets


def dumps_buffer(obj: Any, fallback: Callable[[], bytes]) -> Bulk:
    """A :class:`Bulk` of one big ``bytes`` or ``bytearray``."""
    buffers: list[memoryview] = []
    data = pickle.dumps(_AsBuffer(obj), protocol=5, buffer_callback=_collect(buffers))
    return Bulk(data, buffers, fallback)


def dumps(obj: Any, pickler: Any, fallback: Callable[[], bytes]) -> Optional[Bulk]:
    """Pickle ``obj`` with ``pickler`` (``pickle.dumps``, ``cloudpickle.dumps``), big buffers apart.

    Returns:
        ``None`` if no buffer was big enough to go out of band.
    """
    buffers: list[memoryview] = []
    data = pickler(obj, protocol=5, buffer_callback=_collect(buffers))
    if not buffers:
        return None
    return Bulk(data, buffers, fallback)


def _collect(buffers: list[memoryview]) -> Callable[[pickle.PickleBuffer], bool]:
    def callback(buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < THRESHOLD or len(buffers) >= MAX_BUFFERS:
            return True  # in band
        buffers.append(view)
        return False

    return callback


def prepare(bulk: Bulk) -> Any:
    """Make, fill and seal the memfd of ``bulk`` (once); return ``bulk``, or its in-band pickle.

    Falls back to the in-band pickle when no memfd can be made, filled or
    sealed. An exception from a signal handler propagates; the memfd, if
    made, is in ``bulk.fds`` (closed by ``bulk.close()``).
    """
    if bulk.inband is not None:
        return bulk.inband
    if len(bulk.fds) > 1:
        return bulk  # made already (send_many)
    try:
        # One C call makes it and records it: no signal can lose it.
        bulk.fds.extend(map(os.memfd_create, ("mproc",), (os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING,)))
        fd = bulk.fds[-1]
        for at, view in zip(_offsets([b.nbytes for b in bulk.buffers]), bulk.buffers):
            # pwrite: one copy, by the kernel, straight into the memfd's pages.
            view = view.cast("B")
            while view:
                written = os.pwrite(fd, view, at)
                view, at = view[written:], at + written
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except (AttributeError, OSError):
        bulk.close()
        bulk.inband = bulk.fallback()
        return bulk.inband
    return bulk


def write(sock: socket.socket, prefix: bytes, bulk: Bulk) -> bytes:
    """Write the first part of ``bulk``'s frame with its memfd; return what is left to write.

    ``prefix``: the frame's length and head (kind :data:`~mproc._wire.KIND_BULK`).
    """
    data = prefix + bulk.head + bulk.pickle
    fd = array.array("i", (bulk.fds[-1],))
    written = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd)])
    return data[written:]


def body_size(bulk: Bulk) -> int:
    """The length of ``bulk``'s frame payload (its buffers travel beside it)."""
    return len(bulk.head) + len(bulk.pickle)


# ---------------------------------------------------------------- receiving


class Received:
    """A BULK frame's payload once its memfd is mapped (``mm``): calling it unpickles it.

    A numpy array maps its buffer; a ``bytes`` or ``bytearray`` copies it once.
    """

    __slots__ = ("mm", "pickle", "spans")

    def __init__(self, data: memoryview, mm: mmap.mmap, spans: list[tuple[int, int]]) -> None:
        self.pickle = data
        self.mm = mm
        self.spans = spans

    def __call__(self) -> Any:
        view = memoryview(self.mm)
        return pickle.loads(self.pickle, buffers=[view[at : at + n] for at, n in self.spans])


def loads(payload: Any) -> Any:
    """Unpickle a BULK entry's payload (a :class:`Received`)."""
    if payload.__class__ is not Received:  # a BULK frame on a connection without HELLO_BULK
        raise pickle.UnpicklingError("a bulk frame without its buffers (no HELLO_BULK)")
    return payload()


def attach(peer: Peer) -> None:
    """Read ``peer`` (its HELLO had HELLO_BULK) with ``recvmsg``, taking descriptors."""
    peer.bulk = Inbox(peer.sock)


class Inbox:
    """The descriptors of one connection, from ``recvmsg`` to the frames they belong to."""

    __slots__ = ("binding", "cur", "fds", "maps", "raw", "reader", "taken")

    def __init__(self, sock: socket.socket) -> None:
        # Calls recvmsg until dropped (None never matches): extend() records
        # each whole result (bytes, descriptors, flags) in C.
        self.reader = iter(partial(sock.recvmsg, _CHUNK, _CONTROL), None)
        self.raw: deque[Any] = deque()  # recvmsg results not yet split
        self.cur: Any = None  # (result, its bytes, its descriptors) being split
        self.fds: deque[int] = deque()  # received, not yet given to a frame
        self.taken: deque[int] = deque()  # given to the frame being mapped
        self.binding: Any = None  # the entry being mapped
        self.maps: Optional[mmap.mmap] = None  # its mapping, once made

    def read(self, peer: Peer) -> None:
        """One ``recvmsg`` (for :meth:`Peer.read`): raises as ``os.read``, or :class:`Violation`.

        A read left unsettled by an interrupt is settled instead, and read
        on after its frames were bound (the socket stays readable): else a
        second frame's descriptor could come before the first one's is taken.
        """
        if not self.raw:
            self.raw.extend(itertools.islice(self.reader, 1))
        self.settle(peer)

    def settle(self, peer: Peer) -> bool:
        """Move recorded reads on: bytes to the peer's input, descriptors to :attr:`fds`.

        Returns whether any bytes moved. Raises :class:`Violation`.
        """
        moved = False
        raw = self.raw
        while raw:
            item = raw[0]
            cur = self.cur
            if cur is None or cur[0] is not item:
                cur = (item, deque((item[0],)), deque(_descriptors(item[1])))
                self.cur = cur  # one store: nothing was moved yet
            fds, data = cur[2], cur[1]
            self.fds.extend(itertools.islice(iter(fds.popleft, None), len(fds)))
            if data:
                peer.inp.chunks.extend(itertools.islice(iter(data.popleft, None), len(data)))
                moved = True
            if raw and raw[0] is item:
                raw.popleft()
            if item[2] & socket.MSG_CTRUNC:
                raise Violation("sent more file descriptors than a frame carries (MSG_CTRUNC)")
            if len(self.fds) > _MAX_HELD + 1:  # (bind() holds it to _MAX_HELD)
                raise Violation("sent more file descriptors than its frames carry")
        return moved

    def bind(self, peer: Peer, max_frame: int) -> str:
        """Give each parsed BULK frame its mapped memfd; return what was wrong, if anything.

        Called after :meth:`Peer.parse`, before routing. Frames after a bad
        one are not delivered (as after any bad frame).
        """
        try:
            if self.raw and self.settle(peer):
                bad = peer.parse(max_frame)
                if bad:
                    return bad
        except Violation as err:
            return str(err)
        pending = peer.inp.pending
        for i in range(len(pending)):
            entry = pending[i]
            if entry[5] != wire.KIND_BULK or entry[1].__class__ is Received:
                continue
            problem = self._bind(pending, i, entry, max_frame)
            if problem:
                while len(pending) > i:
                    pending.pop()
                return problem
        inp = peer.inp
        if self.fds and (len(self.fds) > _MAX_HELD or not (inp.chunks or inp.big is not None)):
            pending.clear()  # one of them came with it: deliver none (the peer is dropped)
            return "sent a file descriptor with a frame that carries none"
        return ""

    def _bind(self, pending: deque[Entry], i: int, entry: Entry, max_frame: int) -> str:
        payload = entry[1]
        # Checked, not caught: an exception here is a signal handler's, never the frame's.
        if len(payload) < _COUNT.size:
            return "sent a bulk frame with a bad header"
        (n,) = _COUNT.unpack_from(payload)
        start = _COUNT.size + _SIZE.size * n
        if not 0 < n <= MAX_BUFFERS or len(payload) < start:
            return "sent a bulk frame with a bad header"
        sizes = [s for (s,) in _SIZE.iter_unpack(payload[_COUNT.size : start])]
        offsets = _offsets(sizes)
        total = offsets[-1] + sizes[-1]
        if total <= 0 or total + len(payload) > max_frame:
            return f"sent a bulk frame of {total + len(payload)} bytes (limit {max_frame})"
        if self.binding is not entry:
            self.maps = None
            self.binding = entry
        if self.maps is None:
            if not self.taken:
                if not self.fds:
                    return "sent a bulk frame without its file descriptor"
                self.taken.extend(itertools.islice(iter(self.fds.popleft, None), 1))
            problem = _check(self.taken[0], total)
            if problem:
                return problem
            try:
                mm = mmap.mmap(
                    self.taken[0],
                    total,
                    flags=mmap.MAP_PRIVATE,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                    **_UNTRACKED,
                )
            except (OSError, ValueError) as err:
                return f"sent a memfd that cannot be mapped ({err})"
            self.maps = mm
        # Popped and closed in one C call each.
        _SINK(map(os.close, itertools.islice(iter(self.taken.popleft, None), len(self.taken))))
        bound = Received(payload[start:], self.maps, list(zip(offsets, sizes)))
        pending[i] = (entry[0], bound, entry[2], entry[3], entry[4], entry[5])  # one store
        self.binding = None
        self.maps = None  # the entry holds it now (and unmaps it with its last reference)
        return ""

    def close(self) -> None:
        """Close every descriptor received and not yet mapped (the connection is dropped)."""
        raw = self.raw
        while raw:
            item = raw[0]
            cur = self.cur
            if cur is None or cur[0] is not item:
                cur = (item, deque(), deque(_descriptors(item[1])))
                self.cur = cur
            fds = cur[2]
            self.fds.extend(itertools.islice(iter(fds.popleft, None), len(fds)))
            if raw and raw[0] is item:
                raw.popleft()
        for held in (self.fds, self.taken):
            _SINK(map(_close_quietly, itertools.islice(iter(held.popleft, None), len(held))))
        self.maps = None


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _descriptors(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
    return fds


def _check(fd: int, size: int) -> str:
    """Why ``fd`` is not a sealed memfd of ``size`` bytes (``""`` if it is)."""
    try:
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS) if stat.S_ISREG(st.st_mode) else -1
    except OSError:
        seals = -1
    if seals < 0:
        return "sent a file descriptor that is not a memfd"
    if seals & SEALS != SEALS:
        return "sent a memfd that is not sealed against changes"
    if st.st_size != size:
        return f"sent a memfd of {st.st_size} bytes for a frame that announced {size}"
    return ""


def discard(entries: list[Entry]) -> None:
    """Unmap the memfds of bulk messages nobody will receive (``close_mailbox()``)."""
    for entry in entries:
        payload = entry[1]
        if payload.__class__ is Received:
            try:
                payload.mm.close()
            except BufferError:  # pragma: no cover - unpickled meanwhile: it is in use
                pass
