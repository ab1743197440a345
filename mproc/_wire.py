"""The mailbox's wire format, both directions side by side.

Every frame is framed as :meth:`multiprocessing.connection.Connection.send_bytes`
frames it: a ``!i`` length (or ``-1`` and a ``!Q`` length over 2 GiB), then
the body. A body starts with one byte, its *kind*:

=========  ==================  ===================================================
kind       direction           body after the kind byte
=========  ==================  ===================================================
``MSG``    sender → receiver   ``!H`` group length, ``!Q`` seq, group, pickle
``CREDIT`` receiver → sender   ``!H`` group length, ``!Q`` limit, group
``HELLO``  both                ``!H`` protocol, ``!Q`` max frame, ``!I`` window,
                               ``!Q`` epoch (a random number naming this mailbox)
``CALL``   sender → receiver   as ``MSG``, the pickle preceded by ``!Q`` call id and
                               ``!Q`` the caller's mailbox epoch (where to reply)
``BULK``   sender → receiver   as ``MSG``, the pickle preceded by ``!I`` n and n ``!Q``
                               buffer sizes; the buffers are in a sealed memfd whose
                               descriptor rides on the frame's first byte
                               (``SCM_RIGHTS``), only on a connection whose
                               HELLO had :data:`HELLO_BULK` (see :mod:`mproc._bulk`)
``REPLY``  sender → receiver   ``!H`` 0, ``!Q`` call id, then ``!Q`` the epoch the
                               CALL named, ``!B`` status (:data:`REPLY_VALUE`,
                               :data:`REPLY_ERROR`, :data:`REPLY_REMOTE`), pickle
``STATS``  sender → receiver   ``!H`` 0, ``!Q`` request id: "describe your mailbox"
``STATS_REPLY`` receiver → sender ``!H`` 0, ``!Q`` the request id, UTF-8 JSON
=========  ==================  ===================================================

A CALL or a BULK is a MSG of its group in every other way (seq, credit). A REPLY
travels from the callee to the *caller's* mailbox, on the callee's own
connection to it; it takes no credit (a caller has at most one reply per
call it is waiting for, and one that finds no waiting call is dropped).
A STATS frame is answered by the receiving mailbox's own reader, on the
same connection, never by application code (``mproc ps``).

*Flow control* is credit-based, per (connection, group), as HTTP/2 streams
and AMQP 1.0 links do it: the sender numbers its messages of each group on
a connection ``0, 1, 2, …`` and may send ``seq`` only while
``seq < limit``; the limit starts at the *window* the receiver announced in
its HELLO and each CREDIT frame raises it. A CREDIT carries the new limit
itself, not an increment, so a credit sent twice, or a stale one, does no
harm (the sender keeps the largest).

*Handshake*, before any of that, is the ``multiprocessing.connection`` HMAC
challenge in both directions (``#CHALLENGE#``, ``#WELCOME#``, ``#FAILURE#``),
with the ``{sha256}`` digest prefix of Python 3.12's protocol on every Python
version, then one HELLO each way. The receiver checks the protocol version
in the sender's HELLO, the sender in the receiver's: a mismatch is refused
with a message naming both versions.

The frames and their order on each side are multiprocessing's; only the
waiting is pipelined, in three round trips::

    receiver: CHALLENGE(r)                          (on accept, uid checked)
    sender:   ANSWER(r) CHALLENGE(s)                (one write)
    receiver: WELCOME ANSWER(s)                     (one write; ANSWER(s) only
                                                     after ANSWER(r) checked out)
    sender:   WELCOME HELLO                         (one write)
    receiver: HELLO                                 (once the reader has the peer)

Both nonces are fresh random 32 bytes per connection, so a recorded
handshake answers no later challenge (no replay), and the receiver answers
a challenge only for a peer that has proved the key (no HMAC oracle for a
peer without it). The receiver reads no further than the handshake's
frames: bytes behind the sender's HELLO are the reader's.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import os
import struct
from typing import Any, Callable, Optional, Union

__all__ = [
    "CHALLENGE",
    "FAILURE",
    "HEAD",
    "HELLO",
    "CALL_HEAD",
    "BULK_COUNT",
    "BULK_SIZE",
    "KIND_BULK",
    "KIND_CALL",
    "KIND_CREDIT",
    "KIND_HELLO",
    "KIND_MSG",
    "KIND_REPLY",
    "KIND_STATS",
    "KIND_STATS_REPLY",
    "FIRST_UNGROUPED",
    "HELLO_BULK",
    "HELLO_CONTROL",
    "REPLY_ERROR",
    "REPLY_HEAD",
    "REPLY_REMOTE",
    "REPLY_VALUE",
    "TO_RECEIVER",
    "LEN",
    "LEN64",
    "PROTOCOL",
    "WELCOME",
    "answer",
    "challenge",
    "credit",
    "frame",
    "hello",
    "hmac_sha256",
    "keyed",
    "msg_prefix",
    "parse",
    "parse_hello",
    "verify",
]

#: Bumped whenever a frame changes meaning; both sides check it in the HELLO.
PROTOCOL = 5

KIND_MSG = 1
KIND_CREDIT = 2
KIND_HELLO = 3
KIND_CALL = 4
KIND_REPLY = 5
KIND_STATS = 6
KIND_STATS_REPLY = 7
KIND_BULK = 8  # grouped, like MSG and CALL (see FIRST_UNGROUPED)

#: The kinds a sender may send to a receiver.
TO_RECEIVER = frozenset({KIND_MSG, KIND_CALL, KIND_BULK, KIND_REPLY, KIND_STATS})
#: In a sender's HELLO, the window field holds flags; this one says "this
#: connection carries control frames (STATS) only, never a message": the
#: receiver reads it at once, outside the order of the process's connections.
HELLO_CONTROL = 1
#: Also in a sender's HELLO: "this connection may carry file descriptors"
#: (BULK frames): the receiver reads it with ``recvmsg``, every other with ``read``.
HELLO_BULK = 2

#: Kinds from this one on carry no group: they never enter a group queue
#: (except KIND_BULK, which came later: a MSG with its buffers beside it).
FIRST_UNGROUPED = KIND_REPLY

REPLY_VALUE = 0  # the pickle is the reply's value
REPLY_ERROR = 1  # the pickle is (exception, traceback text)
REPLY_REMOTE = 2  # the pickle is (type name, message, traceback text): it did not pickle

CALL_HEAD = struct.Struct("!QQ")  # call id, caller's epoch: in front of a CALL's pickle
REPLY_HEAD = struct.Struct("!QB")  # epoch, status: in front of a REPLY's pickle
BULK_COUNT = struct.Struct("!I")  # buffers of a BULK frame...
BULK_SIZE = struct.Struct("!Q")  # ...and the size of each, in front of its pickle

LEN = struct.Struct("!i")  # multiprocessing's frame length...
LEN64 = struct.Struct("!Q")  # ...and its extension past 2 GiB
HEAD = struct.Struct("!BHQ")  # kind, group length, seq (MSG) or limit (CREDIT)
HELLO = struct.Struct("!BHQIQ")  # kind, protocol, max frame, window, epoch
_SMALL = struct.Struct("!iBHQ")  # a short frame's length and head, read at once

CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"
_DIGEST = b"{sha256}"
_NONCE = 32
#: The longest handshake frame either side accepts.
MAX_HANDSHAKE_FRAME = 256

Buffer = Union[bytes, bytearray, memoryview]


# ---------------------------------------------------------------- framing


def frame(body: bytes) -> bytes:
    """``body`` with its length prefix, as ``Connection.send_bytes`` writes it."""
    if len(body) > 0x7FFFFFFF:
        return LEN.pack(-1) + LEN64.pack(len(body)) + body
    return LEN.pack(len(body)) + body


def msg_prefix(group: bytes, seq: int, payload_size: int, kind: int = KIND_MSG) -> bytes:
    """The bytes of a MSG (CALL, REPLY) frame before its payload (length, head, group)."""
    size = HEAD.size + len(group) + payload_size
    head = HEAD.pack(kind, len(group), seq) + group
    if size > 0x7FFFFFFF:
        return LEN.pack(-1) + LEN64.pack(size) + head
    return LEN.pack(size) + head


def credit(group: bytes, limit: int) -> bytes:
    """A whole CREDIT frame: the sender may send ``group``'s messages with seq < ``limit``."""
    return frame(HEAD.pack(KIND_CREDIT, len(group), limit) + group)


def hello(max_frame: int = 0, window: int = 0, epoch: int = 0) -> bytes:
    """A whole HELLO frame (the sender's carries only the protocol version)."""
    return frame(HELLO.pack(KIND_HELLO, PROTOCOL, max_frame, window, epoch))


def parse_hello(body: Buffer) -> tuple[int, int, int, int]:
    """Return ``(protocol, max_frame, window, epoch)`` of a HELLO body.

    Raises:
        ValueError: not a HELLO, or of another protocol version (the message
            names both versions).
    """
    if len(body) < 1 or body[0] != KIND_HELLO:
        raise ValueError("expected a HELLO frame after the handshake")
    if len(body) < 3:
        raise ValueError("truncated HELLO frame")
    version = int.from_bytes(bytes(body[1:3]), "big")
    if version != PROTOCOL or len(body) != HELLO.size:
        raise ValueError(
            f"the peer speaks mproc mailbox protocol {version}, this process speaks "
            f"{PROTOCOL}: both must run the same mproc version"
        )
    _kind, version, max_frame, window, epoch = HELLO.unpack(body)
    return version, max_frame, window, epoch


#: A frame cut out of a stream: (kind, raw group, seq or limit, payload view).
Frame = tuple[int, bytes, int, memoryview]


def parse(
    data: Buffer,
    max_frame: int,
    kinds: frozenset[int],
    tag: Optional[tuple[Any, Any]] = None,
    limit: int = 1 << 62,
) -> tuple[list[Any], int, int, Optional[str]]:
    """Cut every complete frame out of ``data``.

    Args:
        data: bytes read from a stream, starting at a frame boundary.
        max_frame: frames whose length says more are refused.
        kinds: the kinds this direction may carry.
        tag: ``(pid, peer)``: return each frame as the receiver's entry
            ``(pid, payload, peer, group or None, number, kind)`` instead (the
            group is ``None`` from :data:`FIRST_UNGROUPED` on), with no
            :data:`Frame` tuple made in between. (A BULK frame has a group too.)
        limit: cut at most this many frames (the rest stays in ``data``,
            after ``used``).

    Returns:
        ``(frames, used, need, error)``: the complete frames; how many bytes of
        ``data`` they took; how many bytes the next, incomplete frame needs in
        all (0 if its header has not arrived yet); and a description of the
        first bad frame, after which nothing more is parsed (``None`` if none).
        Payloads are zero-copy views into ``data``.
    """
    view = memoryview(data)
    end = len(view)
    pos = 0
    frames: list[Any] = []
    unpack = _SMALL.unpack_from
    pid, peer = tag if tag is not None else (None, None)
    small, head = _SMALL.size, HEAD.size  # locals: this loop runs once a frame
    while end - pos >= small and limit:
        limit -= 1
        size, kind, glen, number = unpack(view, pos)
        prefix = 4  # LEN.size
        if size == -1:
            if end - pos < LEN.size + LEN64.size + HEAD.size:
                return frames, pos, 0, None
            (size,) = LEN64.unpack_from(view, pos + LEN.size)
            prefix = LEN.size + LEN64.size
            kind, glen, number = HEAD.unpack_from(view, pos + prefix)
        if kind not in kinds:
            return frames, pos, 0, f"a frame of unknown kind {kind}"
        if size < head + glen or size > max_frame:
            return frames, pos, 0, f"a frame of {size} bytes (limit {max_frame})"
        stop = pos + prefix + size
        if stop > end:
            return frames, pos, stop - pos, None
        start = pos + prefix + head
        if tag is None:
            frames.append(
                (kind, bytes(view[start : start + glen]), number, view[start + glen : stop])
            )
        elif kind < FIRST_UNGROUPED or kind == KIND_BULK:
            group = bytes(view[start : start + glen]) if glen else b""
            frames.append((pid, view[start + glen : stop], peer, group, number, kind))
        else:
            frames.append((pid, view[start + glen : stop], peer, None, number, kind))
        pos = stop
    return frames, pos, 0, None


# ---------------------------------------------------------------- handshake


def challenge() -> bytes:
    """A fresh challenge message (the body of the first handshake frame)."""
    return CHALLENGE + _DIGEST + os.urandom(_NONCE)


def answer(key: bytes, message: Buffer) -> bytes:
    """The response that proves knowledge of ``key`` to the sender of ``message``.

    Raises:
        ValueError: ``message`` is not a challenge of this protocol.
    """
    message = bytes(message)
    if not message.startswith(CHALLENGE + _DIGEST) or len(message) < len(CHALLENGE) + 16:
        raise ValueError("the peer sent no valid challenge")
    return _DIGEST + hmac_sha256(key, message[len(CHALLENGE) :])


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 of ``message`` (RFC 2104; equal to ``hmac.digest(key, message, "sha256")``).

    From the two keyed SHA-256 states, computed once per key and copied for
    each message, with CPython's own SHA-256 where it has one: the ``hmac``
    module's OpenSSL HMAC set-up, and even an OpenSSL context copy, write to
    so many of libcrypto's pages that a freshly forked sender spent a fifth
    of its first ``send()`` copying them (copy-on-write faults).
    """
    pads = _keyed.get(key)
    if pads is None:
        pads = keyed(key)
    inner = pads[0].copy()
    inner.update(message)
    outer = pads[1].copy()
    outer.update(inner.digest())
    digest: bytes = outer.digest()
    return digest


def keyed(key: bytes) -> tuple[Any, Any]:
    """Compute (and keep) the SHA-256 states after ``key ^ ipad`` and ``key ^ opad``.

    Called when a key is read, so that the processes forked afterwards
    inherit them (see :func:`hmac_sha256`).
    """
    block = key if len(key) <= _BLOCK else _sha256(key).digest()
    block = block.ljust(_BLOCK, b"\0")
    pads = (_sha256(block.translate(_IPAD)), _sha256(block.translate(_OPAD)))
    if len(_keyed) >= 8:  # one key per runtime directory: a handful at most
        _keyed.clear()
    _keyed[key] = pads
    return pads


def _builtin_sha256() -> Callable[[bytes], Any]:
    # CPython's own SHA-256 (_sha256 up to 3.11, _sha2 from 3.12); OpenSSL's
    # where a build lacks it. Both give the same digests.
    for name in ("_sha2", "_sha256"):
        try:
            return importlib.import_module(name).sha256  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


_sha256 = _builtin_sha256()
_BLOCK = 64  # SHA-256's block size
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
# key -> SHA-256 states after (key ^ ipad) and (key ^ opad): see hmac_sha256().
_keyed: dict[bytes, tuple[Any, Any]] = {}


def verify(key: bytes, message: bytes, response: Buffer) -> bool:
    """Whether ``response`` answers our challenge ``message`` with ``key``."""
    try:
        expected = answer(key, message)
    except ValueError:
        return False
    return hmac.compare_digest(expected, bytes(response))
