"""Signal handlers and :func:`listen` (SPEC §6), after gproc's ``AddSigHandler``/``Listen``.

Python runs signal handlers only in the main thread, between two bytecodes:
a handler there must neither block nor take a lock the main thread may hold.
So the function mproc installs with :func:`signal.signal` only puts the
signal number on a :class:`queue.SimpleQueue` (its ``put`` is reentrant), and
a daemon thread, ``mproc-signals``, calls the registered handlers for each
delivery one after another, in registration order, as gproc's ``Listen`` does.
Hence each handler runs once per delivery however many threads are in
:func:`listen` (none included: signals are handled even when nobody listens),
and a blocking handler delays later deliveries, never the main thread. The OS
merges repeats of a signal that arrive before Python ran its handler.

A shutdown delivery that finishes while nobody is in :func:`listen` is kept
and returned by the next :func:`listen`, so a ``SIGTERM`` arriving between
registration and ``listen()`` is not lost. Registrations do not survive
``fork`` (the dispatcher thread does not): the child gets back the
dispositions mproc replaced, so a forked worker dies on ``SIGTERM`` again.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from types import FrameType
from typing import Any, Callable, Optional

from . import _check
from ._log import logger

__all__ = [
    "SHUTDOWN_SIGNALS",
    "add_sig_handler",
    "add_sig_handler_shutdown",
    "listen",
    "raised_by_handler",
]

#: A signal handler: called with the signal number; its return value is ignored.
SigHandler = Callable[[int], object]

#: The signals that make :func:`listen` return (those the platform has).
SHUTDOWN_SIGNALS: tuple[int, ...] = tuple(
    int(getattr(signal, name))
    for name in ("SIGINT", "SIGQUIT", "SIGTERM", "SIGABRT")
    if hasattr(signal, name)
)

# While the main thread waits in listen(), a signal the kernel hands to another
# thread only flags the main thread (its handler runs at its next bytecode);
# macOS does that routinely. Waking this often bounds that delay.
_MAIN_THREAD_SLICE = 0.25


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.handlers: dict[int, list[SigHandler]] = {}
        self.originals: dict[int, Any] = {}
        self.deliveries: queue.SimpleQueue[Optional[int]] = queue.SimpleQueue()
        self.dispatcher: Optional[threading.Thread] = None
        self.finished = 0  # shutdown deliveries finished while someone listened
        self.last: Optional[int] = None
        self.pending: Optional[int] = None  # finished while nobody listened
        self.listeners = 0


_state = _State()


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _on_signal(signum: int, frame: Optional[FrameType]) -> None:
    _state.deliveries.put(signum)


def _dispatch(state: _State) -> None:
    while True:
        signum = state.deliveries.get()
        if signum is None:
            return
        with state.lock:
            handlers = list(state.handlers.get(signum, ()))
        for handler in handlers:
            name = getattr(handler, "__qualname__", repr(handler))
            try:
                handler(signum)
            except BaseException as err:
                # sys.exit() would only end this thread, silently.
                hint = (
                    "; sys.exit() cannot end the process from the mproc-signals thread: "
                    "exit after listen() returns, or use os._exit()"
                    if isinstance(err, SystemExit)
                    else ""
                )
                logger.exception("signal handler %s for %s failed%s", name, _signame(signum), hint)
        if signum in SHUTDOWN_SIGNALS:
            with state.changed:
                if state.listeners:
                    state.finished += 1
                    state.last = signum
                    state.changed.notify_all()
                else:
                    state.pending = signum


def _check_handler(func: str, handler: object) -> None:
    if not callable(handler):
        raise TypeError(
            f"{func}() needs a callable handler that takes the signal number, "
            f"got {type(handler).__name__}: {handler!r}"
        )


def _check_signal(sig: object) -> int:
    return _check.signum(sig, "add_sig_handler", catchable=True)


def _register(handlers: list[SigHandler], signums: list[int]) -> None:
    state = _state
    with state.lock:
        if state.dispatcher is None:
            state.dispatcher = threading.Thread(
                target=_dispatch, args=(state,), name="mproc-signals", daemon=True
            )
            state.dispatcher.start()
        for signum in signums:
            if signum in state.handlers:
                continue
            try:
                state.originals[signum] = signal.signal(signum, _on_signal)
            except ValueError as err:
                raise ValueError(
                    f"cannot install a handler for {_signame(signum)} from thread "
                    f"{threading.current_thread().name!r}: Python sets signal handlers only in "
                    "the main thread; register it there first (later additions to that signal "
                    "may come from any thread)"
                ) from err
            state.handlers[signum] = []
        for signum in signums:
            state.handlers[signum].extend(handlers)


def add_sig_handler(handler: SigHandler, *signals: int) -> None:
    """Run ``handler(signum)`` whenever one of ``signals`` arrives.

    Handlers run in mproc's signal thread, in registration order; one that
    raises is logged to the ``mproc`` logger and the others still run. The
    first registration of a signal must happen in the main thread.

    Args:
        handler: a callable taking the signal number.
        *signals: one or more signal numbers, e.g. ``signal.SIGUSR1``.

    Raises:
        TypeError: ``handler`` is not callable, no signal is given, or a
            signal is not an int.
        ValueError: a signal is invalid or uncatchable (``SIGKILL``,
            ``SIGSTOP``), or it is new and this is not the main thread.
    """
    _check_handler("add_sig_handler", handler)
    if not signals:
        raise TypeError(
            "add_sig_handler() needs at least one signal, e.g. add_sig_handler(h, signal.SIGUSR1)"
        )
    _register([handler], [_check_signal(sig) for sig in signals])


def add_sig_handler_shutdown(*handlers: SigHandler) -> None:
    """Run each handler on SIGINT, SIGQUIT, SIGTERM and SIGABRT, after which :func:`listen` returns.

    With no handlers it only makes :func:`listen` return on those signals
    (instead of their default action).

    Args:
        *handlers: callables taking the signal number.

    Raises:
        TypeError: a handler is not callable.
        ValueError: called for the first time from a thread other than the main one.
    """
    for handler in handlers:
        _check_handler("add_sig_handler_shutdown", handler)
    _register(list(handlers), list(SHUTDOWN_SIGNALS))


def listen(*, timeout: Optional[float] = None) -> Optional[int]:
    """Block until a shutdown signal has arrived and every handler for it has finished.

    Any number of threads may listen at once; each returns, and the handlers
    run once. If a shutdown signal was handled while nobody listened, the
    next call returns it at once.

    Args:
        timeout: the most seconds to wait; ``None`` waits for ever.

    Returns:
        The shutdown signal's number, or ``None`` on timeout.

    Raises:
        ValueError: no shutdown signal has a handler (``listen()`` could
            never return), or ``timeout`` is negative.
        RuntimeError: called from a signal handler, which would wait for itself.
    """
    timeout = _check.timeout(timeout, "listen")
    state = _state
    if threading.current_thread() is state.dispatcher:
        raise RuntimeError("listen() called from a signal handler would wait for itself")
    with state.changed:
        if not any(sig in state.handlers for sig in SHUTDOWN_SIGNALS):
            raise ValueError(
                "listen() would never return: no shutdown signal has a handler; "
                "call add_sig_handler_shutdown() first"
            )
        if state.pending is not None:
            signum, state.pending = state.pending, None
            return signum
        seen = state.finished
        state.listeners += 1
        state.changed.notify_all()  # lets _wait_listeners() see us
        try:
            arrived = _wait(state, lambda: state.finished != seen, timeout)
        finally:
            state.listeners -= 1
        return state.last if arrived else None


def _wait(state: _State, predicate: Callable[[], bool], timeout: Optional[float]) -> bool:
    if threading.current_thread() is not threading.main_thread():
        return state.changed.wait_for(predicate, timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not predicate():
        left = _MAIN_THREAD_SLICE if deadline is None else deadline - time.monotonic()
        if left <= 0:
            return False
        state.changed.wait(min(left, _MAIN_THREAD_SLICE))
    return True


def _wait_listeners(count: int, timeout: float) -> bool:
    """For tests: wait until ``count`` threads are inside :func:`listen`."""
    state = _state
    with state.changed:
        return state.changed.wait_for(lambda: state.listeners >= count, timeout)


def _restore(originals: dict[int, Any]) -> None:
    for signum, original in originals.items():
        # None: the disposition was set outside Python; the default is the best guess.
        signal.signal(signum, signal.SIG_DFL if original is None else original)


def _reset() -> None:
    """For tests: restore the dispositions mproc replaced and forget every handler (main thread)."""
    global _state
    old = _state
    with old.lock:
        _restore(old.originals)
        old.handlers.clear()  # deliveries still queued run nothing
        dispatcher = old.dispatcher
    _state = _State()
    old.deliveries.put(None)
    if dispatcher is not None:
        dispatcher.join(timeout=5.0)


def _after_fork_in_child() -> None:
    global _state
    # Not old.lock: a parent thread may have held it at fork time.
    originals = dict(_state.originals)
    _state = _State()
    try:
        _restore(originals)
    except (ValueError, OSError):
        pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def raised_by_handler(err: BaseException) -> bool:
    """Whether ``err`` was raised inside a Python signal handler installed now.

    Python runs a handler between two bytecodes of the main thread, so its
    exception can come out of any call that runs Python code (pickling,
    unpickling): the handler's frame in the traceback tells it from the
    call's own failure, however long the call takes.
    """
    codes = set()
    for signum in signal.valid_signals():
        try:
            handler = signal.getsignal(signum)
        except (OSError, ValueError):  # pragma: no cover - not a settable signal
            continue
        code = getattr(getattr(handler, "__func__", handler), "__code__", None)
        if code is not None:
            codes.add(code)
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in codes:
            return True
        tb = tb.tb_next
    return False
