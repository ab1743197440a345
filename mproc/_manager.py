"""ProcessManager: one object holding any mix of processes (SPEC §4, gproc's ``Manager``)."""

from __future__ import annotations

import multiprocessing
import signal as _signal
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Callable, Optional, Union

from . import _mailbox
from ._command import Command
from ._errors import MprocError, NoSuchProcess
from ._log import logger
from ._process import AdoptedProcess, EnvLike, PathLike, Process, ProcessHandle, _Stream

__all__ = ["ProcessManager"]

#: How long terminate_all()/kill_all() wait for SIGKILLed processes at most.
_KILL_WAIT = 5.0


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _failure(action: str, failures: dict[int, BaseException]) -> MprocError:
    listed = "; ".join(f"PID {pid}: {type(e).__name__}: {e}" for pid, e in failures.items())
    return MprocError(f"{action} failed for {len(failures)} process(es): {listed}", errors=failures)


class ProcessManager:
    """Holds processes of any kind and kills, signals and waits for them all.

    Every method is thread-safe. A process stays listed after it exits (with
    its exit code) until :meth:`remove_process` or :meth:`clear`; killing it
    through the manager (:meth:`kill`, :meth:`kill_all`) removes it, as gproc
    does. As a context manager, leaving the block runs :meth:`terminate_all`.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._procs: dict[int, ProcessHandle] = {}

    def __repr__(self) -> str:
        return f"<ProcessManager {len(self)} process(es)>"

    def __enter__(self) -> ProcessManager:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.terminate_all()

    # --- membership --------------------------------------------------------

    def _add(self, proc: ProcessHandle) -> int:
        pid = proc.pid
        if pid is None:  # unreachable for started handles; keeps the dict honest
            raise ValueError(f"{proc!r} has no PID; start it first")
        with self._lock:
            old = self._procs.get(pid)
            if old is not None and old is not proc:
                logger.debug("PID %d reused: %r replaces %r", pid, proc, old)
            self._procs[pid] = proc
        return pid

    def _joined(self, cmd: Command) -> None:
        self._add(cmd)

    def new_process(
        self,
        path: PathLike,
        args: Sequence[PathLike] = (),
        env: EnvLike = None,
        *,
        cwd: Optional[PathLike] = None,
        stdin: _Stream = None,
        stdout: _Stream = None,
        stderr: _Stream = None,
    ) -> Command:
        """Return a :class:`Command` owned by this manager; it joins the manager when started.

        Args:
            path: the program.
            args: its arguments (a leading ``path`` is dropped).
            env: variables added to ``os.environ`` (mapping or ``"KEY=VALUE"`` list).
            cwd: the working directory.
            stdin: as for :class:`subprocess.Popen`.
            stdout: as for :class:`subprocess.Popen`.
            stderr: as for :class:`subprocess.Popen`.

        Returns:
            The Command, not started yet.

        Raises:
            TypeError: ``args`` or ``env`` has the wrong shape.
            ValueError: an ``env`` entry is malformed.
        """
        cmd = Command(path, args, env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr)
        cmd._on_start = self._joined
        return cmd

    def start(self, proc: Union[Process, Command, AdoptedProcess]) -> int:
        """Add a process and start it (a started one is just added).

        Args:
            proc: a :class:`Process`, :class:`Command` or :class:`AdoptedProcess`.

        Returns:
            Its PID.

        Raises:
            TypeError: ``proc`` is not an mproc handle (e.g. a plain
                ``multiprocessing.Process``: use ``mproc.Process``).
        """
        given: object = proc  # checked at run time too, for untyped callers
        if not isinstance(given, (Command, Process, AdoptedProcess)):
            hint = " (use mproc.Process)" if isinstance(given, multiprocessing.Process) else ""
            raise TypeError(
                f"cannot manage {given!r}{hint}: need a Process, Command or adopted PID"
            )
        if isinstance(proc, Command) or (isinstance(proc, Process) and proc.pid is None):
            proc.start()
        return self._add(proc)

    def add_process(self, pid: int) -> ProcessHandle:
        """Adopt a process this program did not start.

        Args:
            pid: the process.

        Returns:
            An :class:`AdoptedProcess`; but if this manager already holds a
            live process with that PID (of any kind), that existing handle.

        Raises:
            NoSuchProcess: ``pid`` does not exist.
            TypeError: ``pid`` is not an int.
            ValueError: ``pid`` is not positive.
        """
        with self._lock:
            old = self._procs.get(pid)
            if old is not None and old.is_alive():
                return old
            # A held handle that has exited may share the PID with a new process.
            handle = AdoptedProcess(pid)
            self._procs[pid] = handle
            return handle

    def get_process(self, pid: int) -> Optional[ProcessHandle]:
        """Return the handle of ``pid``, or ``None`` if this manager does not hold it.

        Args:
            pid: the process.
        """
        with self._lock:
            return self._procs.get(pid)

    def remove_process(self, pid: int) -> Optional[ProcessHandle]:
        """Forget ``pid`` without killing it.

        Args:
            pid: the process.

        Returns:
            The handle that was removed, or ``None`` if there was none.
        """
        with self._lock:
            return self._procs.pop(pid, None)

    def processes(self) -> list[ProcessHandle]:
        """Return a snapshot of the handles held."""
        with self._lock:
            return list(self._procs.values())

    def pids(self) -> list[int]:
        """Return a snapshot of the PIDs held."""
        with self._lock:
            return list(self._procs)

    def size(self) -> int:
        """Return how many processes are held."""
        with self._lock:
            return len(self._procs)

    def clear(self) -> None:
        """Forget every process, without killing any."""
        with self._lock:
            self._procs.clear()

    def __len__(self) -> int:
        return self.size()

    def __contains__(self, pid: object) -> bool:
        with self._lock:
            return pid in self._procs

    def __iter__(self) -> Iterator[ProcessHandle]:
        return iter(self.processes())

    # --- waiting and signalling -----------------------------------------------

    def _lookup(self, pid: int) -> ProcessHandle:
        handle = self.get_process(pid)
        if handle is None:
            raise NoSuchProcess(f"PID {pid} is not held by this ProcessManager", pid=pid)
        return handle

    def signal(self, pid: int, sig: int) -> None:
        """Send ``sig`` to one held process (gproc's ``SignalProcess``).

        Args:
            pid: the process.
            sig: the signal number.

        Raises:
            NoSuchProcess: not held, or the process has exited.
        """
        self._lookup(pid).signal(sig)

    def kill(self, pid: int, timeout: Optional[float] = _KILL_WAIT) -> Optional[int]:
        """SIGKILL one held process, wait for it and remove it (gproc's ``KillProcess``).

        Args:
            pid: the process.
            timeout: how long to wait for it to die at most.

        Returns:
            Its exit code (``None`` for an adopted process, or on timeout).

        Raises:
            NoSuchProcess: this manager does not hold ``pid``.
        """
        handle = self._lookup(pid)
        handle.kill()
        code = handle.wait(timeout)
        self._forget(pid, handle)
        return code

    def _forget(self, pid: int, handle: ProcessHandle) -> None:
        with self._lock:
            if self._procs.get(pid) is handle:
                del self._procs[pid]

    def _held(self) -> list[tuple[int, ProcessHandle]]:
        # The PID is the key: a close()d multiprocessing Process no longer
        # answers .pid (nor wait/is_alive: ValueError) but must not stop us.
        with self._lock:
            return list(self._procs.items())

    @staticmethod
    def _signal_each(
        held: list[tuple[int, ProcessHandle]], send: Callable[[ProcessHandle], None]
    ) -> tuple[list[tuple[int, ProcessHandle]], dict[int, BaseException]]:
        done: list[tuple[int, ProcessHandle]] = []
        failures: dict[int, BaseException] = {}
        for pid, h in held:
            try:
                send(h)
            except NoSuchProcess:
                pass  # gone already: nothing to do, not a failure
            except Exception as err:
                if not _closed(h):
                    failures[pid] = err
                    continue
            done.append((pid, h))
        return done, failures

    def wait_all(self, timeout: Optional[float] = None) -> dict[int, Optional[int]]:
        """Wait for every held process to exit, within one overall deadline.

        Args:
            timeout: seconds at most for all of them; ``None`` waits forever.

        Returns:
            ``{pid: exit code}``; the code is ``None`` for a process still
            running at the deadline, and for an adopted one.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._wait_handles(self._held(), deadline)

    @staticmethod
    def _wait_handles(
        held: list[tuple[int, ProcessHandle]], deadline: Optional[float]
    ) -> dict[int, Optional[int]]:
        codes: dict[int, Optional[int]] = {}
        for pid, h in held:
            if _closed(h):
                codes[pid] = None  # joined and closed by its owner: exited, code unknown
            else:
                codes[pid] = h.wait(_remaining(deadline))
        return codes

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to every held process; processes already gone are skipped.

        Args:
            sig: the signal number.

        Raises:
            MprocError: sending failed for some processes (after trying all);
                the message lists each PID and its error, ``errors`` maps them.
        """
        _, failures = self._signal_each(self._held(), lambda h: h.signal(sig))
        if failures:
            raise _failure(f"signal_all({_signal_name(sig)})", failures)

    def kill_all(self, timeout: Optional[float] = _KILL_WAIT) -> dict[int, Optional[int]]:
        """SIGKILL every held process, wait for them, and remove them (as gproc's ``KillAll``).

        Args:
            timeout: how long to wait for all of them to die at most.

        Returns:
            ``{pid: exit code}`` of the processes killed (``None`` for adopted
            ones and for any still alive at the deadline).

        Raises:
            MprocError: killing failed for some processes (after trying all);
                they stay listed; the message lists each PID and its error.
        """
        held = self._held()
        _, failures = self._signal_each(held, lambda h: h.kill())
        deadline = None if timeout is None else time.monotonic() + timeout
        killed = [(pid, h) for pid, h in held if pid not in failures]
        codes = self._wait_handles(killed, deadline)
        for pid, h in killed:
            self._forget(pid, h)
        if failures:
            raise _failure("kill_all()", failures)
        return codes

    def terminate_all(self, timeout: Optional[float] = 5.0) -> dict[int, Optional[int]]:
        """SIGTERM every held process, wait, then SIGKILL (with a warning) those still alive.

        Args:
            timeout: how long to wait after SIGTERM before SIGKILL.

        Returns:
            ``{pid: exit code}`` (``None`` for adopted processes, and for any
            that did not die even after SIGKILL).

        Raises:
            MprocError: signalling failed for some processes (after trying
                all); the message lists each PID and its error.
        """
        held = self._held()
        signalled, failures = self._signal_each(held, lambda h: h.terminate())
        deadline = None if timeout is None else time.monotonic() + timeout
        codes = self._wait_handles(signalled, deadline)
        stubborn = [(pid, h) for pid, h in signalled if not _closed(h) and h.is_alive()]
        if stubborn:
            logger.warning(
                "processes still alive %s s after SIGTERM, sending SIGKILL: %s",
                timeout,
                ", ".join(f"PID {pid}" for pid, _ in stubborn),
            )
            _, more = self._signal_each(stubborn, lambda h: h.kill())
            failures.update(more)
            codes.update(self._wait_handles(stubborn, time.monotonic() + _KILL_WAIT))
        if failures:
            raise _failure("terminate_all()", failures)
        return codes

    def send(
        self, obj: Any, group: str = "", *, timeout: Optional[float] = None
    ) -> dict[int, Exception]:
        """Send ``obj`` to the mailbox of every held process that has started.

        The object is pickled once. A failure for one process does not stop the
        others.

        Args:
            obj: any object cloudpickle can pickle.
            group: the receivers' group.
            timeout: per process, how long to wait for its mailbox and for queue
                room (default 5 s).

        Returns:
            ``{pid: exception}`` for the processes it could not be delivered
            to; ``{}`` when all got it.

        Raises:
            MessageError: ``obj`` cannot be pickled; nothing was sent.
        """
        pids = [pid for pid, h in self._held() if not _closed(h)]
        return _mailbox.send_many(pids, obj, group, timeout=timeout)

    def send_to(
        self, pid: int, obj: Any, group: str = "", *, timeout: Optional[float] = None
    ) -> None:
        """Send ``obj`` to the mailbox of process ``pid`` (see :func:`mproc.send`).

        Raises:
            NoSuchProcess, MailboxNotFound, MailboxFull, MessageError, MailboxError:
                as :func:`mproc.send`.
        """
        _mailbox.send(pid, obj, group, timeout=timeout)


def _closed(handle: ProcessHandle) -> bool:
    """Whether ``handle`` is a multiprocessing Process its owner has close()d."""
    return isinstance(handle, multiprocessing.process.BaseProcess) and bool(
        handle.__dict__.get("_closed")
    )


def _signal_name(sig: int) -> str:
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return str(sig)
