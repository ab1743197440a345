"""Group queues: where messages wait for ``receive()``, and the :class:`Msg` it returns.

A group's queue is a deque the reader extends and ``receive()`` takes from,
each by one C call (see :attr:`Group.taker`); a message a ``receive()`` had
taken when a signal handler interrupted it waits in :attr:`Group.orphans`
until the next ``receive()`` of the group puts it back in front.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from ._reader import Entry, Peer

__all__ = ["NOTHING", "Group", "Msg"]

#: A sentinel no deque ever yields: iter(deque.popleft, NOTHING) runs until empty.
NOTHING = object()


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
    # Where to reply, for a message sent by call() (a mproc._calls.CallRef in
    # the instance's __dict__). Not a field: a Msg still has exactly the four.
    _reply_to: ClassVar[Optional[Any]] = None

    @property
    def is_call(self) -> bool:
        """Whether a ``call()`` waits for this message's reply (and none was sent yet)."""
        ref = self._reply_to
        return ref is not None and not ref.replied

    def reply(self, value: Any, *, timeout: Optional[float] = None) -> None:
        """Answer the ``call()`` that sent this message: it returns ``value``.

        A caller that gave up (its timeout passed) or exited meanwhile drops
        the reply; that is not an error here.

        Args:
            value: any object cloudpickle can pickle.
            timeout: seconds to reach the caller's mailbox (default 5 s).

        Raises:
            ValueError: this message is not a call, or was answered already.
            MessageError: ``value`` cannot be pickled (nothing was sent; the
                call can still be answered, e.g. with :meth:`reply_error`).
            MailboxTimeout: the caller's mailbox did not read in time.
        """
        from ._calls import reply

        reply(self, value, None, timeout)

    def reply_error(self, exc: BaseException, *, timeout: Optional[float] = None) -> None:
        """Answer the ``call()`` that sent this message by raising ``exc`` in the caller.

        The caller re-raises it (its own class if it unpickles there, else
        :class:`mproc.RemoteError`) with this process's traceback text as
        its ``__cause__``.

        Raises:
            TypeError: ``exc`` is not an exception.
            ValueError, MailboxTimeout: as :meth:`reply`.
        """
        from ._calls import reply

        if not isinstance(exc, BaseException):
            raise TypeError(f"Msg.reply_error() takes an exception, not {type(exc).__name__}")
        reply(self, None, exc, timeout)


class Group:
    __slots__ = (
        "name",
        "orphans",
        "private",
        "queue",
        "raw",
        "starved",
        "taker",
        "touched",
        "waiters",
    )

    def __init__(self, name: str, raw: bytes, private: bool = False) -> None:
        self.name = name
        self.raw = raw
        self.private = private  # a call's reply queue: never in Receiver.groups
        self.queue: deque[Entry] = deque()
        # Yields the queue's messages by popleft(), reused: extending a list
        # from it moves a message with no bytecode in between.
        self.taker = iter(self.queue.popleft, NOTHING)
        self.touched = 0  # the prune round of the last receive() of this group
        self.waiters: list[Any] = []  # locks of receive() calls asleep on this group
        self.orphans: list[list[Entry]] = []  # slots of interrupted receive() calls
        self.starved: dict[Peer, None] = {}  # peers refused credit while full

    def recover(self) -> None:
        """Put the messages of interrupted receive() calls back at the front, in order.

        Each is moved by one C call; an interrupt between two leaves the rest
        for the next call. The caller serializes recoveries (a lock).
        """
        for slot in reversed(self.orphans):
            try:
                self.queue.extendleft(itertools.islice(iter(slot.pop, NOTHING), 1))
            except IndexError:  # recovered already
                pass
        self.orphans = [s for s in self.orphans if s]
