"""Request/reply between processes (SPEC §10): ``call()``, ``Msg.reply()``, ``serve()``.

**How a reply finds its call.** ``call()`` picks an id unique in this
process, makes a private reply queue for it in this process's mailbox
(:meth:`~mproc._receiver.Receiver.new_call`), and sends the request as a
CALL frame: a MSG of the callee's group whose pickle is preceded by the call
id and this mailbox's *epoch* (a random number naming this opening of the
mailbox). The callee's ``receive()`` turns it into an ordinary :class:`Msg`
that remembers ``(caller PID, call id, epoch)``; ``msg.reply()`` sends a
REPLY frame with the id and the epoch back to the caller's mailbox, on the
callee's own connection to it. The caller's reader moves a REPLY straight
into the queue of the call it names — never into a group — and drops it if
that call already gave up, or if the epoch is not its own (the caller
exited and another process got its PID). So a late reply shows up nowhere.

**Callee death.** While it waits, a call watches the callee through the
reaper (:func:`mproc._monitor.on_exit`, one shared pidfd per callee). When
the callee exits, the call first reads everything the callee's connections
still hold (a reply written just before the exit is in the socket) and
raises :class:`CalleeDied` only if no reply was among it.
"""

from __future__ import annotations

import functools
import itertools
import pickle
import threading
import time
import traceback
from typing import Any, Callable, Optional, Union

from . import _check, _sender
from . import _runtime as rt
from . import _wire as wire
from ._errors import (
    CalleeDied,
    CallTimeout,
    MailboxError,
    MailboxGone,
    MailboxNotFound,
    MessageError,
    NoSuchProcess,
    ReceiveTimeout,
    RemoteError,
    RemoteTraceback,
    StopServing,
)
from ._log import logger as log

__all__ = ["CallRef", "call", "refuse", "reply", "serve"]

# At most this long, after the callee exited, a call reads what its
# connections still hold before it says CalleeDied (they end at once: the
# process is gone; this only bounds a PID that a new process took over).
_DRAIN = 1.0
_DRAIN_STEP = 0.005

_ids = itertools.count(1)  # next() is atomic in CPython: unique across threads


class CallRef:
    """Where the reply to one call goes: ``(caller PID, call id, caller's mailbox epoch)``."""

    __slots__ = ("call_id", "epoch", "lock", "pid", "replied")

    def __init__(self, pid: int, call_id: int, epoch: int, replied: bool = False) -> None:
        self.pid = pid
        self.call_id = call_id
        self.epoch = epoch
        self.replied = replied
        self.lock = threading.Lock()

    def __reduce__(self) -> Any:
        # A Msg may be handed to another process, which may then reply.
        return (CallRef, (self.pid, self.call_id, self.epoch, self.replied))

    def __repr__(self) -> str:
        return f"CallRef(pid={self.pid}, call_id={self.call_id})"


# ---------------------------------------------------------------- the callee


def reply(msg: Any, value: Any, exc: Optional[BaseException], timeout: Optional[float]) -> None:
    """Send ``value`` (or raise ``exc`` in the caller) as the reply to ``msg``; see Msg.reply."""
    ref: Optional[CallRef] = msg._reply_to
    if ref is None:
        raise ValueError(
            f"this message (from PID {msg.sender_pid}, group {msg.group!r}) was sent with "
            "send(), not call(): there is nobody to reply to"
        )
    wait = rt.DEFAULT_TIMEOUT if timeout is None else _check.timeout(timeout, "Msg.reply")
    with ref.lock:
        if ref.replied:
            raise ValueError(
                f"the call from PID {ref.pid} (group {msg.group!r}) was answered already"
            )
        if exc is None:
            body = _reply_body(ref, wire.REPLY_VALUE, _mailbox._dumps(value))
        else:
            body = _error_body(ref, exc)
        _send_reply(ref, body, wait)
        ref.replied = True


def refuse(ref: CallRef, problem: BaseException, timeout: float = rt.DEFAULT_TIMEOUT) -> None:
    """Answer a call that will never be served here (its request does not unpickle,
    or the mailbox closed with it queued) with ``problem``."""
    with ref.lock:
        if ref.replied:
            return
        try:
            _send_reply(ref, _error_body(ref, problem), timeout)
        except (MailboxError, OSError) as err:
            log.debug("could not tell PID %d its call failed: %s", ref.pid, err)
        ref.replied = True


def _reply_body(ref: CallRef, status: int, pickled: bytes) -> bytes:
    return wire.REPLY_HEAD.pack(ref.epoch, status) + pickled


def _error_body(ref: CallRef, exc: BaseException) -> bytes:
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:  # a broken __str__ must not lose the reply
        tb = f"{kind} (its traceback could not be formatted)"
    inner: Optional[bytes] = None  # the caller gets a RemoteError with the same text
    if isinstance(exc, Exception):
        # Not SystemExit, KeyboardInterrupt...: the callee's exit or Ctrl-C is
        # not the caller's (it gets a RemoteError naming it).
        try:
            inner = _mailbox._dumps(exc)
        except MessageError:
            pass
    text = _text_of(exc, kind)
    return _reply_body(ref, wire.REPLY_ERROR, pickle.dumps((inner, kind, text, tb), protocol=5))


def _text_of(exc: BaseException, kind: str) -> str:
    for show in (str, repr):
        try:
            return show(exc)
        except Exception:  # a broken __str__ (and __repr__) must not lose the reply
            pass
    return f"<{kind} instance>"


def _send_reply(ref: CallRef, body: bytes, wait: float) -> None:
    try:
        _sender.deliver_reply(ref.pid, ref.call_id, body, wait)
    except (NoSuchProcess, MailboxNotFound, MailboxGone) as err:
        # The caller exited (or closed its mailbox): it is not waiting any more,
        # and a late reply is dropped anyway.
        log.debug("reply to PID %d dropped: %s", ref.pid, err)


def serve(
    handler: Callable[[Any], Any], group: str = "", *, timeout: Optional[float] = None
) -> None:
    """Answer calls (and take plain messages) of ``group`` with ``handler`` until told to stop.

    For each message, ``handler(msg.data)`` runs; a call is answered with
    its return value, or with the exception it raised (re-raised in the
    caller). A plain message's result is dropped, and its exception logged.

    Args:
        handler: called with each message's data.
        group: the group to serve.
        timeout: return once this many seconds pass with no message
            (``None``: serve for ever).

    Returns when ``timeout`` passes with no message, or the handler raises
    :class:`StopServing` (a call that raised it gets it re-raised).

    Raises:
        MailboxClosed: the mailbox was closed meanwhile.
        Whatever the handler raises that is not an ``Exception``
        (``KeyboardInterrupt``, ``SystemExit``...), and any exception that
        interrupts ``serve()`` itself, after answering the call being served
        (its caller gets a :class:`RemoteError` naming it).
    """
    if not callable(handler):
        raise TypeError(f"serve() takes a callable handler, not {type(handler).__name__}")
    _check.group(group, "serve")
    wait = _check.timeout(timeout, "serve")
    receive = _mailbox.receive
    while True:
        msg = None
        try:
            try:
                msg = receive(group, wait)
            except ReceiveTimeout:
                return
            except MessageError as err:  # one bad message: its caller was told; go on
                log.warning("serve(%r): %s", group, err)
                continue
            if not _serve_one(handler, msg, group):
                return
        except BaseException as exc:
            # Raised after the message was taken (an interrupt, a failed
            # reply): its caller must not wait for ever. A reply sent twice
            # is harmless (the second finds no waiting call).
            if msg is not None and msg.is_call:
                try:
                    _answer(msg, None, exc)
                except BaseException:
                    pass
            raise


def _serve_one(handler: Callable[[Any], Any], msg: Any, group: str) -> bool:
    """Handle one message for serve(); return whether to go on."""
    try:
        result = handler(msg.data)
    except StopServing as stop:
        if msg.is_call:
            _answer(msg, None, stop)
        return False
    except Exception as exc:
        if msg.is_call:
            _answer(msg, None, exc)
        else:
            log.exception(
                "serve(%r): the handler failed on a message from PID %d", group, msg.sender_pid
            )
        return True
    if msg.is_call:
        _answer(msg, result, None)
    return True


def _answer(msg: Any, value: Any, exc: Optional[BaseException]) -> None:
    """Reply for serve(): a value that does not pickle is answered with the error."""
    try:
        reply(msg, value, exc, None)
    except MessageError as err:
        reply(msg, None, err, None)
    except MailboxError as err:
        log.warning("serve(%r): could not reply to PID %d: %s", msg.group, msg.sender_pid, err)


# ---------------------------------------------------------------- the caller


def call(
    target: Union[int, str],
    request: Any,
    group: str = "",
    *,
    timeout: Optional[float] = None,
) -> Any:
    """Send ``request`` to ``group`` of ``target`` and wait for its reply (SPEC §10).

    Args:
        target: the callee's PID, or a name it registered (see
            :func:`mproc.register`).
        request: any object cloudpickle can pickle; the callee's
            ``receive()`` sees it as ``msg.data``, with ``msg.is_call`` true.
        group: the callee's group.
        timeout: seconds for the whole call; ``None`` waits for the reply for
            ever (reaching the callee's mailbox still gives up after 5 s).

    Returns:
        The value the callee passed to ``msg.reply()``.

    Raises:
        CallTimeout: no reply within ``timeout`` (a later reply is dropped).
        CalleeDied: the callee exited before replying.
        RemoteError: the callee replied with an exception that does not
            unpickle here (otherwise that exception itself is raised); the
            remote traceback is its ``__cause__``.
        NoSuchProcess, NameNotFound, MailboxNotFound, MailboxFull,
        MessageError...: as :func:`mproc.send`, for the request.
    """
    raw = _check.group(group, "call")
    wait = _check.timeout(timeout, "call")
    started = time.monotonic()
    deadline = None if wait is None else started + wait
    receiver = _mailbox._ensure_open()  # the reply comes to our mailbox
    pid, identity = _mailbox._resolve(target, "call", deadline)
    payload = _mailbox._dumps_for(request, pid, group)
    call_id = next(_ids)
    cancels: list[Callable[[], None]] = []  # of the callee's exit watch
    try:
        g = receiver.new_call(call_id)
        while True:
            left = rt.DEFAULT_TIMEOUT if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise _timeout(pid, group, wait)
            try:
                _sender.deliver(
                    pid,
                    raw,
                    wire.CALL_HEAD.pack(call_id, receiver.epoch) + payload,
                    left,
                    wire.KIND_CALL,
                    identity,
                )
                break
            except NoSuchProcess:
                if not isinstance(target, str):
                    raise
                # The name's holder exited: wait for the next one (a restart).
                pid, identity = _mailbox._resolve(target, "call", deadline)
            except MailboxError as err:
                if err.group is None:
                    err.group = group
                raise
        _monitor.on_exit(
            pid,
            identity or _sender.identity_of(pid),
            functools.partial(receiver.callee_died, g, pid),
            cancels,
        )
        died = False
        died_at = 0.0
        while True:
            left_now = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if died:
                left_now = _DRAIN_STEP if left_now is None else min(left_now, _DRAIN_STEP)
            try:
                entry = receiver.take_entry(g, left_now)
            except ReceiveTimeout:
                if died:
                    if not receiver.connections_from(pid) or time.monotonic() > died_at + _DRAIN:
                        if g.queue:
                            continue  # the reply came with the connection's end
                        raise _died(pid, group) from None
                    if deadline is None or time.monotonic() < deadline:
                        continue
                raise _timeout(pid, group, wait) from None
            if entry[5] == wire.KIND_REPLY:
                return _outcome(entry[1], pid, group)
            # The callee exited: read what its connections still hold first.
            if not died:
                died = True
                died_at = time.monotonic()
    finally:
        # Inline, not receiver.end_call(): a signal handler could raise on
        # entry to a Python function and leave the call registered.
        receiver.calls.pop(call_id, None)
        for cancel in cancels:
            try:
                cancel()
            except BaseException:
                # Interrupted on its way in: unregister by one C call, then go on raising.
                cancel.args[0].waiters.pop(cancel.args[1], None)  # type: ignore[attr-defined]
                raise


def _outcome(payload: Any, pid: int, group: str) -> Any:
    _epoch, status = wire.REPLY_HEAD.unpack_from(payload)
    body = payload[wire.REPLY_HEAD.size :]
    if status == wire.REPLY_VALUE:
        try:
            return pickle.loads(body)
        except Exception as err:
            raise MessageError(
                f"cannot unpickle the reply of PID {pid} (group {group!r}): {err!r}",
                pid=pid,
                group=group,
            ) from err
    inner, kind, text, tb = pickle.loads(body)
    exc: Optional[BaseException] = None
    if inner is not None:
        try:
            exc = pickle.loads(inner)
        except Exception:
            exc = None
        if not isinstance(exc, BaseException):
            exc = None
    if exc is None:
        exc = RemoteError(
            f"PID {pid} raised {kind}: {text}", pid=pid, group=group, type_name=kind, traceback=tb
        )
    raise exc from RemoteTraceback(tb)


def _timeout(pid: int, group: str, wait: Optional[float]) -> CallTimeout:
    return CallTimeout(
        f"no reply from PID {pid} to a call in group {group!r} within {wait or 0:g} s "
        "(a late reply will be dropped)",
        pid=pid,
        group=group,
    )


def _died(pid: int, group: str) -> CalleeDied:
    return CalleeDied(
        f"PID {pid} exited before replying to a call in group {group!r}", pid=pid, group=group
    )


from . import _mailbox, _monitor  # noqa: E402 - they import this module (a cycle)
