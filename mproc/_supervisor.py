"""Supervisor (SPEC §12): OTP's restart strategies for OS processes.

A :class:`Supervisor` is a :class:`~mproc.ProcessManager` whose children
are described by *specs* (a name, a factory and a policy) and started again
by policy when they exit.

How it works:

* **One coordinator thread per running supervisor** does every start, stop
  and restart; the public methods hand it jobs and wait for their result,
  so a child's state is only ever changed by one thread. The thread sleeps
  on a :class:`queue.SimpleQueue` with a deadline: the earliest pending
  back-off, or none. Nothing polls.
* **Exits are events.** Every incarnation's handle is watched by the one
  reaper thread (a pidfd in its epoll) from its start; a callback on that
  watch (:meth:`mproc._wait.Watch.on_done`), run once the handle has
  collected the exit code, only puts the incarnation and the time on the
  queue. No extra descriptor or thread per child.
* **Stopping** a child goes through :meth:`ProcessManager._terminate_held`:
  SIGTERM to its whole tree (contained children), ``shutdown`` seconds of
  grace, then SIGKILL of whatever is left of the tree.
* **The supervisor's process dies** (even by SIGKILL): its children are
  contained (``PR_SET_PDEATHSIG``) and die with it, as every manager's do.

Supervisor reports (OTP's progress and crash reports) are records of the
``mproc`` logger: INFO for starts, exits, restarts and stops, ERROR when the
supervisor gives up. Each carries ``record.mproc_event = (event, name, pid,
exitcode)``.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import multiprocessing
import os
import queue
import random
import threading
import time
from types import TracebackType
from typing import Any, Callable, NamedTuple, Optional, TypeVar, Union

from . import _check, _names
from ._command import Command
from ._errors import SupervisorGaveUp, describe_exitcode
from ._launch import Job
from ._log import logger
from ._manager import ProcessManager
from ._process import Process
from ._signals import _MAIN_THREAD_SLICE

__all__ = ["Supervisor"]

#: What a factory returns: a new, unstarted child.
Child = Union[Process, Command]
Factory = Callable[[], Child]

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
RESTARTS = ("permanent", "transient", "temporary")

#: Each back-off delay is drawn from [(1 - _JITTER) * d, d].
_JITTER = 0.1
#: How long the coordinator waits for a handle to collect an exit it was told of.
_COLLECT = 5.0

_T = TypeVar("_T")


def _run_registered(name: str) -> None:
    """A child's ``run`` with ``register=True``: take ``name``, then run as usual."""
    _names.register(name)
    me = multiprocessing.current_process()
    type(me).run(me)


def _number(value: object, func: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{func}(): {what} must be a number, got {type(value).__name__}: {value!r}")
    x = float(value)
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{func}(): {what} must be a finite number > 0, got {value!r}")
    return x


def _backoff(value: object) -> Optional[tuple[float, float]]:
    if value is None:
        return None
    if not isinstance(value, tuple) or len(value) != 2:
        raise TypeError(
            f"add(): backoff must be None or a (first, max) tuple of seconds, got {value!r}"
        )
    first = _number(value[0], "add", "backoff's first delay")
    most = _number(value[1], "add", "backoff's max delay")
    if first > most:
        raise ValueError(f"add(): backoff's first delay {first:g} s exceeds its max {most:g} s")
    return first, most


def _choice(value: object, allowed: tuple[str, ...], func: str, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"{func}(): {what} must be one of {', '.join(map(repr, allowed))}, "
            f"got {type(value).__name__}: {value!r}"
        )
    if value not in allowed:
        raise ValueError(
            f"{func}(): unknown {what} {value!r}; use one of {', '.join(map(repr, allowed))}"
        )
    return value


class _Spec:
    """One child: its spec, and the state of its current incarnation."""

    def __init__(
        self,
        name: str,
        factory: Factory,
        restart: str,
        shutdown: Optional[float],
        backoff: Optional[tuple[float, float]],
        register: bool,
    ) -> None:
        self.name = name
        self.factory = factory
        self.restart = restart
        self.shutdown = shutdown
        self.backoff = backoff
        self.register = register
        self.handle: Optional[Child] = None  # the current (or last) incarnation
        self.pid: Optional[int] = None
        self.running = False  # the incarnation is ours to watch (not seen exit, not stopping)
        self.cancel: Optional[Callable[[], None]] = None  # unregisters its exit callback
        self.started = 0.0
        self.restarts = 0
        self.failures = 0  # consecutive, for the back-off
        self.due: Optional[float] = None  # a pending restart, monotonic time
        self.exitcode: Optional[int] = None
        self.error: Optional[BaseException] = None  # why the last start failed

    def forget_exit_watch(self) -> None:
        cancel, self.cancel = self.cancel, None
        if cancel is not None:
            cancel()


class _Exit(NamedTuple):
    """An incarnation has exited, as the reaper saw it ``at`` (monotonic time)."""

    spec: _Spec
    handle: Child
    at: float


#: What the coordinator's queue carries.
_Item = Union[Job[Any], _Exit]


def _on_exit(q: queue.SimpleQueue[_Item], spec: _Spec, handle: Child) -> Callable[[], None]:
    """The exit callback of an incarnation: runs in the reaper thread, so it only queues."""

    def exited() -> None:
        q.put(_Exit(spec, handle, time.monotonic()))

    return exited


class Supervisor(ProcessManager):
    """A :class:`ProcessManager` that restarts its children by policy, as Erlang/OTP does.

    Children are added as specs (:meth:`add`): a name and a factory that
    returns a new, unstarted :class:`mproc.Process` or :class:`mproc.Command`
    for every start. ``with sup:`` starts them in order and, on exit, stops
    them in reverse order; :meth:`wait` blocks until the supervisor gives
    up or is stopped. Every :class:`ProcessManager` method works on the
    current incarnations (``pids()``, ``signal_all()``, ``send()``...); an
    exit they cause is handled by policy, except :meth:`terminate_all` and
    :meth:`kill_all`, which end supervision first. Processes added with
    ``start()``/``add_process()`` are held but not supervised.

    Restarts happen within milliseconds of the exit (plus the child's
    back-off). More than ``max_restarts`` restarts within ``max_seconds``
    (counted over all children; a restart of several children for one exit
    counts once) make the supervisor give up: it stops every child, and
    :meth:`wait` raises :class:`mproc.SupervisorGaveUp`. A supervisor with
    no child running keeps running (OTP's default).

    Every method is thread-safe. A supervisor can be entered again after
    it stopped or gave up (with fresh restart counts).

    Args:
        strategy: ``"one_for_one"``: restart the child that exited;
            ``"one_for_all"``: stop all the others (reverse order), then
            restart all; ``"rest_for_one"``: stop the children added after
            it, then restart it and them.
        max_restarts: restarts allowed within ``max_seconds`` (>= 0).
        max_seconds: the intensity window, in seconds (> 0); also how long
            a child must run for its back-off to start again from the first
            delay.
        contain: as for :class:`ProcessManager`.

    Raises:
        TypeError, ValueError: an argument is malformed (the message says how).
    """

    def __init__(
        self,
        *,
        strategy: str = "one_for_one",
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        contain: bool = True,
    ) -> None:
        super().__init__(contain=contain)
        self._strategy = _choice(strategy, STRATEGIES, "Supervisor", "strategy")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int):
            raise TypeError(
                f"Supervisor(): max_restarts must be an int >= 0, "
                f"got {type(max_restarts).__name__}: {max_restarts!r}"
            )
        if max_restarts < 0:
            raise ValueError(f"Supervisor(): max_restarts must be >= 0, got {max_restarts}")
        self._max_restarts = max_restarts
        self._max_seconds = _number(max_seconds, "Supervisor", "max_seconds")
        # Guards the specs and the lifecycle fields; held only for bookkeeping,
        # never while a child starts or stops.
        self._cond = threading.Condition(threading.RLock())
        self._specs: list[_Spec] = []
        self._active = False  # entered, and the coordinator has not finished
        self._accepting = False  # the coordinator takes jobs
        self._running = False  # the coordinator supervises (not stopping or stopped)
        self._thread: Optional[threading.Thread] = None
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._history: collections.deque[float] = collections.deque()  # restart times
        self._outcome: Optional[SupervisorGaveUp] = None

    def __repr__(self) -> str:
        with self._cond:
            state = "running" if self._active else "stopped"
            if self._outcome is not None:
                state = "gave up"
            n = len(self._specs)
        return f"<Supervisor {self._strategy} {state} {n} child(ren)>"

    # --- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Supervisor:
        """Start the children in the order added, and supervise them.

        Raises:
            ValueError: the supervisor is running already.
            Exception: a factory or a start failed: the children started so
                far are stopped again and the error is raised.
        """
        with self._cond:
            old = self._thread if self._active and not self._accepting else None
        if old is not None:
            old.join()  # it gave up a moment ago and is finishing
        with self._cond:
            if self._active:
                raise ValueError(f"{self!r} is running already; stop() it before entering again")
            self._active = self._accepting = self._running = True
            self._outcome = None
            self._history.clear()
            for spec in self._specs:
                spec.restarts = spec.failures = 0
                spec.due = None
                spec.error = None
            q: queue.SimpleQueue[_Item] = queue.SimpleQueue()
            self._queue = q
            thread = threading.Thread(
                target=self._loop, args=(q,), name="mproc-supervisor", daemon=True
            )
            self._thread = thread
        thread.start()
        try:
            self._control(self._start_all)
        except BaseException:
            # Also an interrupt (Ctrl-C) while the children start: the
            # coordinator goes on unless told to stop, so tell it.
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        """Stop the children in reverse order (see :meth:`stop`), then anything else held."""
        self.stop()
        super().__exit__(exc_type, exc, tb)

    def stop(self) -> None:
        """Stop supervising: stop every child in reverse order, each with its ``shutdown`` grace.

        Returns once they are stopped (each takes at most its ``shutdown``
        plus a few seconds for SIGKILL); :meth:`wait` then returns. A no-op
        when the supervisor is not running. The specs are kept.
        """
        self._control(self._stop_all, only_running=True)
        self._join()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the supervisor has been stopped or has given up.

        In the main thread it wakes up every 0.25 s, so that Python runs the
        signal handlers of its process (e.g. one that calls :meth:`stop`).

        Args:
            timeout: seconds at most; ``None`` waits forever.

        Returns:
            ``True`` once it has been stopped (also if it never ran),
            ``False`` when ``timeout`` passed while it still runs.

        Raises:
            SupervisorGaveUp: it restarted too often and stopped everything;
                ``name`` and ``exitcode`` say which child and how it last exited.
            TypeError, ValueError: ``timeout`` is malformed.
        """
        timeout = _check.timeout(timeout, "Supervisor.wait")
        deadline = None if timeout is None else time.monotonic() + timeout
        # A signal the kernel hands to another thread only flags the main
        # thread, whose handler then waits for its next bytecode: the main
        # thread wakes up now and then to run it (a SIGTERM handler that
        # calls stop(), in a supervisor's own process).
        main = threading.current_thread() is threading.main_thread()
        with self._cond:
            while self._active:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if main:
                    left = _MAIN_THREAD_SLICE if left is None else min(left, _MAIN_THREAD_SLICE)
                self._cond.wait(left)
            outcome = self._outcome
        if outcome is not None:
            err = SupervisorGaveUp(outcome.msg, name=outcome.name, exitcode=outcome.exitcode)
            raise err from outcome.__cause__
        return True

    def terminate_all(
        self, timeout: Optional[float] = 5.0, *, tree: bool = False
    ) -> dict[int, Optional[int]]:
        """End supervision (nothing restarts), then :meth:`ProcessManager.terminate_all`.

        The children get ``timeout`` seconds of grace, not their ``shutdown``
        (that is :meth:`stop`).
        """
        timeout = _check.timeout(timeout, "terminate_all")
        self._halt()
        return super().terminate_all(timeout, tree=tree)

    def kill_all(
        self, timeout: Optional[float] = 5.0, *, tree: bool = False
    ) -> dict[int, Optional[int]]:
        """End supervision (nothing restarts), then :meth:`ProcessManager.kill_all`."""
        timeout = _check.timeout(timeout, "kill_all")
        self._halt()
        return super().kill_all(timeout, tree=tree)

    # --- children ------------------------------------------------------------

    def add(
        self,
        name: str,
        factory: Factory,
        *,
        restart: str = "permanent",
        shutdown: Optional[float] = 5.0,
        backoff: Optional[tuple[float, float]] = None,
        register: bool = False,
    ) -> Optional[int]:
        """Add a child spec; on a running supervisor, start the child at once.

        Args:
            name: the child's name, unique in this supervisor.
            factory: called with no argument for every start; returns a
                new, unstarted :class:`mproc.Process` or :class:`mproc.Command`.
                It runs on the supervisor's thread: it should be quick.
            restart: ``"permanent"`` (always restarted), ``"transient"``
                (only after an abnormal exit: a non-zero code or a signal) or
                ``"temporary"`` (never).
            shutdown: seconds between SIGTERM and SIGKILL when the supervisor
                stops the child (its whole tree); ``None`` waits forever.
            backoff: ``(first, max)`` seconds: the delay before a restart
                doubles from ``first`` up to ``max`` with each failure in a
                row, minus up to 10 % jitter, and starts again from ``first``
                once the child ran ``max_seconds`` before failing.
                ``None`` (the default): restart at once.
            register: the child (a Process) registers ``name`` (see
                :func:`mproc.register`) before its ``run()``, so that
                ``send(name)``/``call(name)`` reach every incarnation. A
                Command can register itself, from a Python program it runs.

        Returns:
            The child's PID if it was started, else ``None``.

        Raises:
            TypeError, ValueError: an argument is malformed, or ``name`` is taken.
            Exception: on a running supervisor, what the factory or the start
                raised; the spec is not kept.
        """
        if not isinstance(name, str):
            raise TypeError(f"add(): name must be a str, got {type(name).__name__}: {name!r}")
        if not name:
            raise ValueError("add(): name must not be empty")
        if register:
            _names.check_name(name, "add")
        if not callable(factory):
            raise TypeError(
                f"add(): factory must be a callable returning a new mproc.Process or "
                f"mproc.Command, got {type(factory).__name__}: {factory!r}"
            )
        restart = _choice(restart, RESTARTS, "add", "restart type")
        shutdown = _check.timeout(shutdown, "add", "shutdown")
        if not isinstance(register, bool):
            raise TypeError(f"add(): register must be True or False, got {register!r}")
        spec = _Spec(name, factory, restart, shutdown, _backoff(backoff), register)
        return self._control(functools.partial(self._add_spec, spec))

    def remove(self, name: str) -> Optional[int]:
        """Stop a child (its tree, with its ``shutdown`` grace) and forget its spec.

        Args:
            name: the child.

        Returns:
            The exit code of its last incarnation, ``None`` if it never ran
            (or its code is unknown).

        Raises:
            ValueError: no child has that name.
        """
        return self._control(functools.partial(self._remove_spec, name))

    def pid(self, name: str) -> Optional[int]:
        """Return the PID of the child's current incarnation, ``None`` if it is not running.

        Raises:
            ValueError: no child has that name.
        """
        with self._cond:
            spec = self._find(name, "pid")
            return spec.pid if spec.running else None

    def children(self) -> list[tuple[str, Optional[int], int]]:
        """Return ``(name, pid or None, restarts)`` of every child, in the order added."""
        with self._cond:
            return [(s.name, s.pid if s.running else None, s.restarts) for s in self._specs]

    # --- talking to the coordinator ---------------------------------------------

    def _control(self, fn: Callable[[], _T], *, only_running: bool = False) -> Optional[_T]:
        """Run ``fn`` on the coordinator and return its result; here when it is not running."""
        with self._cond:
            if not self._accepting:
                return None if only_running else fn()
            if threading.current_thread() is self._thread:
                return fn()  # a factory calling us
            job: Job[_T] = Job(fn)
            self._queue.put(job)
        return job.result()

    def _join(self) -> None:
        with self._cond:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
            with self._cond:
                if self._thread is thread:
                    self._thread = None

    def _halt(self) -> None:
        """End supervision without stopping anything (terminate_all/kill_all follow)."""

        def halt() -> None:
            self._running = False
            for spec in self._specs:
                spec.due = None
                spec.forget_exit_watch()
                with self._cond:
                    spec.running = False

        self._control(halt, only_running=True)
        self._join()

    def _find(self, name: str, func: str) -> _Spec:
        for spec in self._specs:
            if spec.name == name:
                return spec
        known = ", ".join(repr(s.name) for s in self._specs) or "none"
        raise ValueError(f"{func}(): this supervisor has no child {name!r} (children: {known})")

    # --- the coordinator thread ---------------------------------------------------

    def _loop(self, q: queue.SimpleQueue[_Item]) -> None:
        try:
            while self._running:
                dues = [s.due for s in self._specs if s.due is not None]
                wait = None if not dues else max(0.0, min(dues) - time.monotonic())
                try:
                    item = q.get(timeout=wait)
                except queue.Empty:
                    item = None
                try:
                    if isinstance(item, Job):
                        item.run()
                    elif item is not None:
                        self._exited(item)
                    if self._running:
                        self._restart_due()
                except BaseException:  # never let a bug end supervision silently
                    logger.exception("supervisor: unexpected error; supervision goes on")
        finally:
            self._finish(q)

    def _finish(self, q: queue.SimpleQueue[_Item]) -> None:
        with self._cond:
            self._accepting = False
        # Jobs queued before that: they find the supervisor stopped.
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                item.run()
        with self._cond:
            self._active = False
            self._cond.notify_all()

    def _report(
        self, event: str, spec: _Spec, text: str, *args: object, level: int = logging.INFO
    ) -> None:
        logger.log(
            level,
            "supervisor: child %r " + text,
            spec.name,
            *args,
            extra={"mproc_event": (event, spec.name, spec.pid, spec.exitcode)},
        )

    def _start_all(self) -> None:
        for spec in list(self._specs):
            try:
                self._start(spec)
            except BaseException:
                self._stop_all()
                raise

    def _start(self, spec: _Spec) -> int:
        proc = spec.factory()
        if not isinstance(proc, (Process, Command)):
            raise TypeError(
                f"the factory of child {spec.name!r} returned {proc!r}; it must return a new, "
                "unstarted mproc.Process or mproc.Command"
            )
        if proc.pid is not None:
            raise ValueError(
                f"the factory of child {spec.name!r} returned {proc!r}, which has been started; "
                "it must return a new one for every start"
            )
        if spec.register:
            if not isinstance(proc, Process):
                raise TypeError(
                    f"child {spec.name!r} has register=True, which needs an mproc.Process; "
                    f"its factory returned {proc!r} (a Command can call mproc.register itself)"
                )
            proc.__dict__["run"] = functools.partial(_run_registered, spec.name)
        pid = self.start(proc)
        watch = proc._monitor_watch()
        if watch is None:  # unreachable: a started handle always has its watch
            self._terminate_held([(pid, proc)], spec.shutdown, warn=False)
            raise RuntimeError(f"child {spec.name!r} (PID {pid}) has no exit watch")
        # Runs at once if it has exited already; else in the reaper thread,
        # once the handle has collected the exit code.
        cancel = watch.on_done(_on_exit(self._queue, spec, proc))
        old = spec.handle
        with self._cond:
            if old is not None and spec.pid is not None:
                self._forget(spec.pid, old)
            spec.handle, spec.pid, spec.cancel = proc, pid, cancel
            spec.running = True
            spec.started = time.monotonic()
            spec.exitcode = spec.error = None
        self._report("started", spec, "started (PID %d)", pid)
        return pid

    def _stop(self, spec: _Spec) -> None:
        handle, pid = spec.handle, spec.pid
        with self._cond:
            spec.running = False  # from now on its exit is ours, not a failure
        spec.forget_exit_watch()
        if handle is None or pid is None:
            return
        try:
            codes = self._terminate_held([(pid, handle)], spec.shutdown, warn=False)
            spec.exitcode = codes.get(pid)
        except Exception:
            logger.exception("supervisor: stopping child %r (PID %d) failed", spec.name, pid)
        self._report("stopped", spec, "(PID %d) stopped: %s", pid, describe_exitcode(spec.exitcode))

    def _stop_all(self) -> None:
        self._running = False
        for spec in self._specs:
            spec.due = None
        for spec in reversed(self._specs):
            if spec.running:
                self._stop(spec)

    def _add_spec(self, spec: _Spec) -> Optional[int]:
        with self._cond:
            if any(s.name == spec.name for s in self._specs):
                raise ValueError(f"add(): this supervisor has a child {spec.name!r} already")
            self._specs.append(spec)
            if not self._running:
                return None
        try:
            return self._start(spec)
        except BaseException:
            with self._cond:
                self._specs.remove(spec)
            raise

    def _remove_spec(self, name: str) -> Optional[int]:
        with self._cond:
            spec = self._find(name, "remove")
        spec.due = None
        if spec.running:
            self._stop(spec)
        else:
            self._stop_leftovers(spec)  # it ended (waiting for a restart): its tree may not have
        with self._cond:
            if spec not in self._specs:  # another remove() of it won
                return spec.exitcode
            self._specs.remove(spec)
            if spec.handle is not None and spec.pid is not None:
                self._forget(spec.pid, spec.handle)
        return spec.exitcode

    def _exited(self, item: _Exit) -> None:
        spec, handle = item.spec, item.handle
        if spec.handle is not handle or not spec.running:
            return  # an earlier incarnation, or one we stopped
        code = handle.wait(_COLLECT)
        with self._cond:
            spec.running = False
            spec.exitcode = code
        spec.forget_exit_watch()
        self._report("exited", spec, "(PID %d) exited: %s", spec.pid, describe_exitcode(code))
        self._stop_leftovers(spec)
        self._failed(spec, code, item.at, item.at - spec.started)

    def _stop_leftovers(self, spec: _Spec) -> None:
        """Stop what an ended incarnation left running (its tree: a grandchild, a job)."""
        handle, pid = spec.handle, spec.pid
        if handle is None or pid is None:
            return
        try:
            # A contained child leads a process group of its own, and what it
            # starts stays in it unless it calls setsid(): an empty group means
            # nothing is left, and the tree search (a /proc scan) is skipped —
            # a crash loop costs a syscall here, not a scan.
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        except OSError:
            pass  # EPERM: a member we may not signal; search anyway
        try:
            self._terminate_held([(pid, handle)], spec.shutdown, warn=False)
        except Exception:
            logger.exception(
                "supervisor: stopping what child %r (PID %d) left failed", spec.name, pid
            )

    def _failed(self, spec: _Spec, code: Optional[int], now: float, ran: float) -> None:
        """Apply the policy to ``spec``, which ended at ``now`` after ``ran`` seconds.

        Times are the exit's as the reaper saw it, not when the coordinator
        got to it: a busy coordinator neither stretches a child's run (which
        resets its back-off) nor delays its restart beyond the back-off.
        """
        if spec.restart == "temporary" or (spec.restart == "transient" and code == 0):
            self._report("done", spec, "is not restarted (%s)", spec.restart)
            return
        self._history.append(now)
        while self._history and self._history[0] <= now - self._max_seconds:
            self._history.popleft()
        if len(self._history) > self._max_restarts:
            self._give_up(spec, code)
            return
        if ran >= self._max_seconds:
            spec.failures = 0
        delay = self._delay(spec)
        spec.failures += 1
        i = self._specs.index(spec)
        if self._strategy == "one_for_all":
            group = list(self._specs)
        elif self._strategy == "rest_for_one":
            group = self._specs[i:]
        else:
            group = [spec]
        for other in reversed(group):
            if other.running:
                self._stop(other)
        due = now + delay
        for other in group:
            if other is spec or other.restart != "temporary":
                other.due = due if other.due is None else max(other.due, due)
        self._report("restart", spec, "restarts in %.3f s (%s)", delay, self._strategy)

    def _delay(self, spec: _Spec) -> float:
        if spec.backoff is None:
            return 0.0
        first, most = spec.backoff
        d = min(most, first * 2.0 ** min(spec.failures, 64))
        return d * random.uniform(1.0 - _JITTER, 1.0)

    def _restart_due(self) -> None:
        while self._running:
            now = time.monotonic()
            spec = next((s for s in self._specs if s.due is not None and s.due <= now), None)
            if spec is None:
                return
            spec.due = None
            with self._cond:
                spec.restarts += 1
            try:
                self._start(spec)
            except BaseException as err:  # SystemExit from a factory too: a failed start
                with self._cond:
                    spec.exitcode = None
                    spec.error = err
                self._report("start_failed", spec, "failed to start: %r", err, level=logging.ERROR)
                self._failed(spec, None, time.monotonic(), 0.0)
                if not self._queue.empty():
                    return  # stop(), add(), an exit...: served first, then we go on

    def _give_up(self, spec: _Spec, code: Optional[int]) -> None:
        why = (
            f"could not be started ({spec.error!r})"
            if spec.error is not None
            else f"exited with {describe_exitcode(code)}"
        )
        err = SupervisorGaveUp(
            f"supervisor gave up: child {spec.name!r} {why}, more than "
            f"{self._max_restarts} restart(s) within {self._max_seconds:g} s; "
            "every child has been stopped",
            name=spec.name,
            exitcode=code,
        )
        err.__cause__ = spec.error
        self._report("gave_up", spec, "made the supervisor give up: %s", why, level=logging.ERROR)
        self._stop_all()
        with self._cond:
            self._outcome = err
