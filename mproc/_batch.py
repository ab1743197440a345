"""Explicit batching: many messages to one receiver and group in few writes.

A :class:`Batch` pickles each message when it is added and keeps the
pickles; :meth:`Batch.flush` sends them in order, as many per ``write()``
as the receiver's credit allows (see :func:`mproc._sender.deliver_many`),
and returns when the receiver holds them all — what ``send()`` promises for
one message, for the whole batch at once.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any, Optional, Union

from . import _check, _mailbox, _sender
from . import _runtime as rt
from ._errors import MailboxError, MessageError, MprocError

__all__ = ["Batch"]

_MAX_BYTES = 1 << 20  # pickles held before send() flushes by itself
_MAX_MESSAGES = 4096  # ...or this many messages


class Batch:
    """Messages to one process and group, sent together by :meth:`flush`.

    ``send()`` only pickles and keeps the message (it raises
    :class:`MessageError` at once for an object that cannot be pickled, and
    nothing is kept); ``flush()`` — also on leaving a ``with`` block, and by
    itself once ``max_bytes`` or ``max_messages`` are held — returns when the
    receiver holds every message kept so far. Messages of one batch arrive in
    the order added. A plain :func:`mproc.send` to the same receiver meanwhile
    is not held back: it arrives before the messages the batch still holds.

    Not thread-safe: one batch, one thread (use one batch per thread).

    Example::

        with mproc.Batch(worker_pid) as batch:
            for item in items:
                batch.send(item)
        # here the worker holds every item

    Args:
        pid: the receiving process, or a registered name (resolved at each flush).
        group: the receiver's group.
        timeout: seconds each flush may take (finding the mailbox, credit,
            writing); default 5 s.
        max_bytes, max_messages: flush by itself when this much is held.

    Raises:
        TypeError, ValueError: a bad argument (named in the message).
    """

    def __init__(
        self,
        pid: Union[int, str],
        group: str = "",
        *,
        timeout: Optional[float] = None,
        max_bytes: int = _MAX_BYTES,
        max_messages: int = _MAX_MESSAGES,
    ) -> None:
        if not isinstance(pid, str):
            pid = _check.pid(pid, "Batch")
        self._target: Union[int, str] = pid
        self._raw = _check.group(group, "Batch")
        self.group = group
        self._timeout = rt.DEFAULT_TIMEOUT if timeout is None else _check.timeout(timeout, "Batch")
        for name, value in (("max_bytes", max_bytes), ("max_messages", max_messages)):
            if value.__class__ is not int or value < 1:
                raise ValueError(f"Batch(): {name} must be an int >= 1, got {value!r}")
        self._max_bytes = max_bytes
        self._max_messages = max_messages
        self._held: list[bytes] = []
        self._bytes = 0
        self.sent = 0  # messages delivered by this batch so far

    @property
    def pid(self) -> Union[int, str]:
        """The receiving process (or the name given)."""
        return self._target

    def __len__(self) -> int:
        """How many messages are held, not yet flushed."""
        return len(self._held)

    def __repr__(self) -> str:
        return (
            f"<mproc.Batch to {self._target!r} group={self.group!r} held={len(self._held)} "
            f"sent={self.sent}>"
        )

    def send(self, obj: Any) -> None:
        """Pickle ``obj`` and keep it for the next flush (flushing first if the batch is full).

        A ``send()`` that raised kept nothing: retrying it sends ``obj`` once.

        Raises:
            MessageError: ``obj`` cannot be pickled; nothing was kept.
            Whatever :meth:`flush` raises, when the batch was full (``obj``
            was not kept).
        """
        try:
            payload = _mailbox._dumps(obj)
        except MessageError as err:
            raise MessageError(
                f"{err} (to {self._target!r}, group {self.group!r})", group=self.group
            ) from err.__cause__
        if self._held and (
            self._bytes + len(payload) > self._max_bytes or len(self._held) >= self._max_messages
        ):
            self.flush()
        self._held.append(payload)
        self._bytes += len(payload)

    def flush(self) -> None:
        """Send every message held; return when the receiver holds them all.

        Raises:
            As :func:`mproc.send`. The exception's ``delivered`` attribute
            says how many of the held messages (the first ones) the receiver
            holds; the batch keeps the others, so calling ``flush()`` again
            sends them (after the cause is fixed), and never sends one twice.
            A message over the receiver's frame limit is dropped from the
            batch (:class:`MessageError` says so), as one that cannot be
            pickled is never kept. An interrupt (``KeyboardInterrupt``) while
            waiting (for the mailbox, for credit) keeps what was not sent; one
            in the middle of a write leaves it unknown whether the messages of
            that write arrived: the batch drops those (never sends one twice)
            and keeps the rest.
        """
        held = self._held
        if not held:
            return
        deadline = time.monotonic() + self._timeout
        pid, identity = _mailbox._resolve(self._target, "Batch.flush", deadline)
        if pid == _mailbox._state.pid:
            _mailbox._ensure_open()
        # (delivered, in flight): stored whole by the sender after each write.
        progress: list[tuple[int, int]] = [(0, 0)]
        try:
            _sender.deliver_many(
                pid, self._raw, held, max(deadline - time.monotonic(), 0.001), identity, progress
            )
            self._keep(held, len(held), 0)
        except MprocError as err:
            done = int(getattr(err, "delivered", 0))
            if isinstance(err, MessageError) and done < len(held):
                self._keep(held, done, 1)  # the message over the frame limit: dropped
            else:
                self._keep(held, done, 0)
            if isinstance(err, MailboxError) and err.group is None:
                err.group = self.group
            raise
        except BaseException:
            done, in_flight = progress[0]
            self._keep(held, done, in_flight)
            raise

    def _keep(self, held: list[bytes], done: int, dropped: int) -> None:
        """After a flush of ``held``: ``done`` delivered, the next ``dropped`` given up."""
        self._held = held[done + dropped :]  # one store: the batch's state
        self._bytes = sum(map(len, self._held))
        self.sent += done

    def close(self) -> None:
        """Flush (see :meth:`flush`)."""
        self.flush()

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.flush()
