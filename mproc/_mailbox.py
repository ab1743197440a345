"""PID-addressed messages, the public face: ``send(pid, obj)`` / ``receive()`` (SPEC §5).

A message goes from :func:`send` through :mod:`mproc._sender` (one
connection per receiving process, credit flow control), in the frames of
:mod:`mproc._wire`, to the receiving process's :mod:`mproc._receiver`
(admission, readers, group queues), and out of :func:`receive`.

Process-global state, all reset in a forked child (``os.register_at_fork``):
this process's open :class:`~mproc._receiver.Receiver` (``_state.receiver``)
and the sender's connections (``mproc._sender``).
"""

from __future__ import annotations

import atexit
import itertools
import os
import pickle
import re
import threading
import time
from collections.abc import Iterable
from functools import partial
from typing import Any, Optional, Union

import cloudpickle

from . import _bulk, _check, _names, _sender
from . import _runtime as rt
from ._calls import call, serve
from ._errors import MailboxError, MessageError, MprocError, NameNotFound, NoSuchProcess
from ._log import logger as log
from ._receiver import Msg, Receiver
from ._signals import raised_by_handler

__all__ = [
    "Msg",
    "call",
    "serve",
    "close_mailbox",
    "open_for_children",
    "open_mailbox",
    "receive",
    "send",
    "send_many",
    "stats",
]

# Whether a pickle names __main__ (or __mp_main__): one regex pass beats two
# ``in`` tests on a short pickle, ``in`` wins on a long one.
_names_main = re.compile(rb"__m(?:p_)?ain__").search
_known_groups = _check._GROUPS  # group names seen (and checked) already, encoded
_PLAIN = frozenset({bytes, bytearray, str, int, float, bool, type(None)})
# cloudpickle's registry of modules to pickle by value; plain pickle ignores it.
_BY_VALUE: Any = getattr(getattr(cloudpickle, "cloudpickle", None), "_PICKLE_BY_VALUE_MODULES", ())


# ---------------------------------------------------------------- pickling


def _dumps(obj: Any, bulk: bool = False) -> Any:
    """Pickle ``obj`` so that an unrelated process can rebuild it.

    Plain pickle is ~3x faster than cloudpickle but refers to functions and
    classes by name; that breaks for lambdas, closures and anything defined in
    ``__main__`` (the receiver's ``__main__`` is another module). So plain
    pickle is used only when it succeeds and names nothing in ``__main__``.

    ``bulk``: the caller can send a :class:`~mproc._bulk.Bulk` (big buffers
    out of band, in a memfd), returned when there are any: a big ``bytes``
    or ``bytearray``, or objects with big pickle-5 buffers (numpy arrays).
    A builtin container is pickled in band first (fast for small ones) and
    again with its buffers apart only if it came out big and holds other
    objects than builtin ones (see :func:`_may_hold_buffers`).
    """
    if type(obj) in _PLAIN:
        if bulk and type(obj) in _BUFFERS and len(obj) >= _bulk.THRESHOLD:
            return _bulk.dumps_buffer(obj, partial(_dumps, obj))
        # Nothing in these can name __main__: skip the scan (a 64 MiB bytes
        # costs two 30 ms scans otherwise).
        return pickle.dumps(obj, protocol=5)
    data: Optional[bytes] = None
    if not _BY_VALUE:
        try:
            found = None
            if bulk and type(obj) not in _CONTAINERS:  # a numpy array, say (mproc._bulk)
                found = _bulk.dumps(obj, pickle.dumps, partial(_dumps, obj))
                data = found.pickle if found is not None else None
            if data is None:
                data = pickle.dumps(obj, protocol=5)
                if bulk and len(data) >= _bulk.THRESHOLD and _may_hold_buffers(obj):
                    found = _bulk.dumps(obj, pickle.dumps, partial(_dumps, obj))
        except Exception as err:  # lambdas, local classes...: cloudpickle handles them
            _raise_if_from_outside(pickle.dumps, obj, err)
            data = found = None
        if data is not None and (
            _names_main(data) if len(data) < 2048 else b"__main__" in data or b"__mp_main__" in data
        ):
            data = found = None
        if found is not None:
            return found
    if data is None:
        try:
            if bulk:
                found = _bulk.dumps(obj, cloudpickle.dumps, partial(_dumps, obj))
                if found is not None:
                    return found
            data = cloudpickle.dumps(obj, protocol=5)
        except Exception as err:
            _raise_if_from_outside(cloudpickle.dumps, obj, err)
            raise MessageError(
                f"cannot pickle the {type(obj).__name__} object to send: {err}; nothing was sent"
            ) from err
    return data


def _may_hold_buffers(obj: Any, budget: int = 64) -> bool:
    """Whether a builtin container may hold objects with pickle-5 buffers (numpy arrays).

    Looks at no more than ``budget`` objects, depth first: what it has not
    seen is assumed to be like what it saw (a long list of numbers holds none).
    """
    stack = [obj]
    while stack and budget > 0:
        item = stack.pop()
        budget -= 1
        kind = type(item)
        if kind is dict:
            stack.extend(itertools.islice(item.values(), budget))
        elif kind in _CONTAINERS:
            stack.extend(itertools.islice(item, budget))
        elif kind not in _PLAIN:
            return True
    return False


_CONTAINERS = frozenset({dict, list, tuple, set, frozenset})
_BUFFERS = (bytes, bytearray)


def _raise_if_from_outside(dumps: Any, obj: Any, err: Exception) -> None:
    """Re-raise ``err`` if it did not come from pickling ``obj`` itself.

    A signal handler's exception raised while the pickler ran Python code
    looks the same as the object's own failure: pickle once more; failing
    alike (same type) is the object's fault, working now means ``err`` came
    from outside and must propagate as it is (SPEC §5 Interrupts), as does
    one raised in a signal handler (its frame is in the traceback: a big
    object pickles for longer than a storm's period, and fails alike twice).
    """
    if raised_by_handler(err):
        raise err
    try:
        dumps(obj, protocol=5)
    except Exception as again:
        if type(again) is type(err) and not raised_by_handler(again):
            return
    raise err


# ---------------------------------------------------------------- state


class _State:
    def __init__(self) -> None:
        self.pid = os.getpid()  # this process (a new _State after fork)
        self.lock = threading.Lock()
        self.receiver: Optional[Receiver] = None
        self.atexit = False


_state = _State()


# ---------------------------------------------------------------- sending


def send(
    pid: Union[int, str], obj: Any, group: str = "", *, timeout: Optional[float] = None
) -> None:
    """Send ``obj`` to the mailbox of process ``pid`` (or of the holder of a registered name).

    When this returns, the receiving process holds the message. Messages from one
    thread to one receiver and group arrive in the order sent.

    Args:
        pid: the receiving process (this process's own PID opens its own
            mailbox), or a name registered with :func:`mproc.register`: a
            name nobody holds is waited for like a mailbox not yet open.
        obj: any object cloudpickle can pickle (lambdas and ``__main__`` classes too).
        group: the receiver's queue to put it in; only ``receive(group)`` sees it.
        timeout: seconds for the whole call — waiting for the mailbox to open,
            for credit while the group is full, for the write (default 5 s).

    Raises:
        NoSuchProcess: ``pid`` does not exist (raised at once).
        MailboxNotFound: ``pid`` opened no mailbox within the timeout.
        NameNotFound: nobody held the name within the timeout.
        MailboxFull: the receiver's queue for ``group`` stayed full past the timeout.
        MailboxTimeout: the receiver did not read, or answer the handshake, in time.
        MailboxGone: the receiver went away while sending.
        HandshakeError: the receiver refused the connection (another key, user or version).
        MessageError: ``obj`` cannot be pickled or is over the frame size limit;
            nothing was sent.
    """
    name = identity = None
    if isinstance(pid, str):
        found = _names.fast_lookup(pid, _sender.trusts)
        if found is None:
            _send_named(pid, obj, group, timeout)
            return
        name, (pid, identity) = pid, found
    payload: Any = None
    try:
        if pid.__class__ is int and group.__class__ is str and timeout is None:
            # The common case in the fewest steps: valid arguments, a group seen
            # before, a connection (to the very holder of a name) with credit to
            # spare, a small message (else the general way, below).
            raw = _known_groups.get(group)
            if raw is not None and 0 < pid != _state.pid:
                payload = _dumps_for(obj, pid, group, bulk=True)
                link = _sender._links.by_pid.get(pid)
                if (
                    link is not None
                    and payload.__class__ is bytes
                    and (identity is None or link.identity == identity)
                    and _sender._fast_send(link, raw, payload)
                ):
                    return
        pid = _check.pid(pid, "send")
        raw = _check.group(group, "send")
        wait = rt.DEFAULT_TIMEOUT if timeout is None else _check.timeout(timeout, "send")
        if payload is None:
            payload = _dumps_for(obj, pid, group, bulk=True)  # big buffers out of band (_bulk)
        if pid == _state.pid:
            _ensure_open()  # nobody else would open it (also in a freshly forked child)
        # For a name, only the very holder: never a process that took its PID.
        _deliver(pid, raw, payload, group, wait, identity)
    except NoSuchProcess:
        if name is None:
            raise
        _send_named(name, obj, group, timeout)  # its holder exited: wait for the next
    finally:
        if payload is not None and payload.__class__ is not bytes:
            payload.close()  # its memfd (mproc._bulk): one C call, first in the clause


def _deliver(
    pid: int, raw: bytes, payload: Any, group: str, wait: float, identity: Optional[str] = None
) -> None:
    try:
        _sender.deliver(pid, raw, payload, wait, identity=identity)
    except MailboxError as err:
        if err.group is None:
            err.group = group
        raise


def _dumps_for(obj: Any, pid: int, group: str, bulk: bool = False) -> Any:
    try:
        return _dumps(obj, bulk)
    except MessageError as err:
        raise MessageError(f"{err} (to PID {pid}, group {group!r})", pid=pid, group=group) from (
            err.__cause__
        )


def _send_named(name: str, obj: Any, group: str, timeout: Optional[float]) -> None:
    raw = _check.group(group, "send")
    wait = rt.DEFAULT_TIMEOUT if timeout is None else _check.timeout(timeout, "send")
    deadline = time.monotonic() + wait
    try:
        payload = _dumps(obj)
    except MessageError as err:
        raise MessageError(f"{err} (to {name!r}, group {group!r})", group=group) from (
            err.__cause__
        )
    while True:
        pid, identity = _resolve(name, "send", deadline)
        if pid == _state.pid:
            _ensure_open()
        try:
            _deliver(pid, raw, payload, group, max(deadline - time.monotonic(), 0.001), identity)
            return
        except NoSuchProcess:
            # The holder exited: wait for the next one (a restart), up to the deadline.
            if time.monotonic() >= deadline:
                raise NameNotFound(
                    f"the holder of the name {name!r} (PID {pid}) exited and nobody took "
                    f"the name within {wait:g} s",
                    pid=pid,
                    group=group,
                ) from None


def _resolve(
    target: Union[int, str], function: str, deadline: Optional[float]
) -> tuple[int, Optional[str]]:
    """The PID (and, for a name, the holder's identity) a send() or call() goes to."""
    if not isinstance(target, str):
        return _check.pid(target, function), None
    name = str(target)
    found = _names.lookup(name, _sender.trusts, func=function)
    if found is not None:
        return found
    until = time.monotonic() + rt.DEFAULT_TIMEOUT if deadline is None else deadline
    return _names.resolve(name, until, func=function)


def send_many(
    pids: Iterable[int], obj: Any, group: str = "", *, timeout: Optional[float] = None
) -> dict[int, Exception]:
    """Send one object to several processes, pickling it once.

    Returns:
        ``{pid: exception}`` for every process it could not be delivered to.

    Raises:
        MessageError: ``obj`` cannot be pickled (nothing was sent to anyone).
    """
    raw = _check.group(group, "send")
    wait = rt.DEFAULT_TIMEOUT if timeout is None else _check.timeout(timeout, "send")
    payload = _dumps(obj, bulk=True)
    failures: dict[int, Exception] = {}
    try:
        for pid in pids:
            try:
                _check.pid(pid, "send")
                if pid == _state.pid:
                    _ensure_open()
                _deliver(pid, raw, payload, group, wait)
            except (MprocError, OSError, TypeError, ValueError) as err:
                failures[pid] = err
    finally:
        if payload.__class__ is not bytes:
            payload.close()  # one memfd for every receiver (mproc._bulk)
    return failures


# ---------------------------------------------------------------- the receiving side


def open_mailbox(
    *,
    max_queue: Optional[int] = None,
    max_frame: Optional[int] = None,
    idle_limit: Optional[float] = None,
) -> None:
    """Open this process's mailbox (idempotent); it normally opens by itself.

    Args:
        max_queue: messages a group holds ahead of its receivers before senders
            are slowed down (default 10 000), plus a window of
            ``min(1024, max_queue)`` per sending process; on an open mailbox,
            changes it.
        max_frame: the largest message accepted, in bytes (default 1 GiB);
            senders learn it when they connect and refuse larger messages.
        idle_limit: seconds a sender may stay silent in the middle of a message
            before it is dropped (default 30).

    Raises:
        TypeError, ValueError: a limit is not a positive number, or ``max_frame``
            differs from that of the mailbox already open (close it first).
        UnsafeRuntimeDir: the runtime directory is refused.
        MailboxError: the socket cannot be made, or its threads cannot start.
    """
    if max_queue is not None:
        _check.positive_int(max_queue, "open_mailbox", "max_queue")
    if max_frame is not None:
        _check.positive_int(max_frame, "open_mailbox", "max_frame")
    if idle_limit is not None:
        _check.timeout(idle_limit, "open_mailbox", "idle_limit")
        if idle_limit <= 0:
            raise ValueError("open_mailbox(): idle_limit must be > 0 seconds")
    receiver = _state.receiver
    if receiver is None or receiver.pid != os.getpid():
        _ensure_open(
            max_queue or rt.DEFAULT_MAX_QUEUE,
            max_frame or rt.DEFAULT_MAX_FRAME,
            idle_limit or rt.DEFAULT_IDLE_LIMIT,
        )
        return
    if max_frame is not None and max_frame != receiver.max_frame:
        raise ValueError(
            f"open_mailbox(): the mailbox is open with max_frame={receiver.max_frame}, which "
            "its senders were told; call close_mailbox() before opening it with another"
        )
    if max_queue is not None:
        receiver.max_queue = max_queue
    if idle_limit is not None:
        receiver.idle_limit = idle_limit


def _ensure_open(
    max_queue: int = rt.DEFAULT_MAX_QUEUE,
    max_frame: int = rt.DEFAULT_MAX_FRAME,
    idle_limit: float = rt.DEFAULT_IDLE_LIMIT,
) -> Receiver:
    receiver = _state.receiver
    if receiver is not None:
        return receiver
    runtime = rt.runtime()
    with _state.lock:
        if _state.receiver is None:
            _state.receiver = Receiver(runtime, max_queue, max_frame, idle_limit)
            if not _state.atexit:
                atexit.register(close_mailbox)
                _state.atexit = True
        return _state.receiver


def open_for_children() -> None:
    """Open the mailbox before starting a child, so the child can always reach us.

    A mailbox that cannot open must not stop the child from starting; the
    child's ``send()`` to us will report the problem instead.
    """
    if _state.receiver is not None:
        return  # open (a fork hook clears it in a child): the common case, kept cheap
    try:
        _ensure_open()
    except MailboxError as err:
        log.warning("mproc: could not open this process's mailbox: %s", err)


def close_mailbox() -> None:
    """Close this process's mailbox and its connections; remove its socket file.

    Messages not yet received are discarded; ``receive()`` calls blocked in
    other threads raise :class:`MailboxClosed`. A later ``receive()`` opens a
    new mailbox.
    """
    if _state.receiver is not None:
        _names.release_all()  # a name must not lead to a closed mailbox
    _names.forget_cache()
    with _state.lock:
        receiver, _state.receiver = _state.receiver, None
    if receiver is not None and receiver.pid == os.getpid():
        receiver.close()  # first: it may answer queued calls (on links of ours)
    _sender.retire_all()


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
        MailboxClosed: the mailbox was closed (by this process) while waiting.
        UnsafeRuntimeDir, MailboxError: the mailbox cannot open.
    """
    receiver = _state.receiver
    if receiver is not None and timeout is None and group.__class__ is str and len(group) < 16384:
        return receiver.get(group, None)  # valid: at most 4 UTF-8 bytes a character
    _check.group(group, "receive")
    wait = _check.timeout(timeout, "receive")  # before opening: bad input has no side effect
    return _ensure_open().get(group, wait)


def stats() -> dict[str, Any]:
    """Describe this process's mailbox, as ``mproc ps`` shows it for every mailbox.

    Returns:
        A dict: ``pid``; ``open``; ``path`` (the socket); ``start_time`` (epoch
        seconds); ``cmdline``; ``names`` (registered, see
        :func:`mproc.register`); ``groups`` (``{group: messages queued}``, for
        groups that hold any); ``senders`` (PIDs connected now);
        ``received`` (messages ever put in a group queue); ``pending_calls``
        (``call()`` calls of this process waiting for a reply); ``max_queue``,
        ``max_frame``, ``idle_limit``. A closed mailbox has ``open`` false,
        no groups and no senders.
    """
    receiver = _state.receiver
    if receiver is not None and receiver.pid == os.getpid() and not receiver.closed:
        if receiver.leader_lock._is_owned():  # type: ignore[attr-defined]
            # From a signal handler that interrupted this thread's receive():
            # the reader is this very thread; what it has routed is all we know.
            return receiver.stats()
        # Asked of our own reader, like any other: it first reads what was
        # sent already, so the depths are exact.
        return _sender.query_stats(receiver.pid, rt.DEFAULT_TIMEOUT)
    import psutil

    me = psutil.Process()
    return {
        "pid": me.pid,
        "open": False,
        "path": None,
        "start_time": me.create_time(),
        "cmdline": me.cmdline(),
        "names": _names.held(),
        "groups": {},
        "senders": [],
        "received": 0,
        "pending_calls": 0,
        "max_queue": None,
        "max_frame": None,
        "idle_limit": None,
    }


def _after_fork_in_child() -> None:
    global _state
    old = _state
    _state = _State()
    _sender.forget_after_fork()
    if old.receiver is not None:
        old.receiver.forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
