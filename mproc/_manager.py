"""ProcessManager: one object holding any mix of processes (SPEC §4, gproc's ``Manager``)."""

from __future__ import annotations

import multiprocessing
import os
import signal as _signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, Callable, Optional, Union

from . import _check, _mailbox, _tree
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


class _Pinned:
    """A held process as the root of a tree kill: its pidfd, group and marker."""

    def __init__(self, pid: int, handle: ProcessHandle) -> None:
        self.pid, self.handle = pid, handle
        pin = getattr(handle, "_pin", None)
        self.fd: Optional[int] = None
        alive, self.fd = pin() if pin is not None else (False, None)
        self.marker = _marker(handle)
        if self.marker is not None:
            self.group = _new_group(handle)
        else:  # an adopted process: its group is part of its tree if it leads one
            self.group = alive and _pgid(pid) == pid
        self.alive = alive

    def root(self) -> _tree.Root:
        alive = self.alive and not _closed(self.handle) and self.handle.is_alive()
        return _tree.Root(self.pid, self.fd, alive, self.group, self.marker)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _marker(handle: ProcessHandle) -> Optional[str]:
    if isinstance(handle, Command):
        return handle._element
    if isinstance(handle, Process):
        p = handle.__dict__.get("_mproc_plan")
        return None if p is None else p.element
    return None


def _new_group(handle: ProcessHandle) -> bool:
    p = handle._mproc_plan if isinstance(handle, Process) else None
    if isinstance(handle, Command):
        return handle._element is not None  # a manager's contained Command leads a group
    return p is not None and p.new_group


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


class ProcessManager:
    """Holds processes of any kind and kills, signals and waits for them all.

    Every method is thread-safe. A process stays listed after it exits (with
    its exit code) until :meth:`remove_process` or :meth:`clear`; killing it
    through the manager (:meth:`kill`, :meth:`kill_all`) removes it, as gproc
    does. As a context manager, leaving the block runs :meth:`terminate_all`.

    **Containment** (``contain=True``, the default): a process the manager
    starts leads a process group of its own, carries a containment marker
    in its environment (inherited by everything it runs), and dies when this
    process dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``). Stopping it
    through the manager (:meth:`kill`, :meth:`kill_all`,
    :meth:`terminate_all`, leaving the ``with`` block) stops its whole tree
    (see :func:`mproc.kill_tree`). Adopted PIDs are signalled alone unless
    ``tree=True`` is given.

    Args:
        contain: ``False`` for a program that means to leave daemons behind:
            children are started as plain ``multiprocessing``/``subprocess``
            children and signalled alone.
    """

    def __init__(self, *, contain: bool = True) -> None:
        if not isinstance(contain, bool):
            raise TypeError(f"ProcessManager(): contain must be True or False, got {contain!r}")
        self._contain = contain
        self._lock = threading.RLock()
        self._procs: dict[int, ProcessHandle] = {}

    def __repr__(self) -> str:
        how = "" if self._contain else " contain=False"
        return f"<ProcessManager {len(self)} process(es){how}>"

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
        cmd._contain = self._contain
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
        if isinstance(proc, Command):
            if proc.pid is None:
                proc._contain = self._contain
            proc.start()
        elif isinstance(proc, Process) and proc.pid is None:
            proc._mproc_contain = self._contain
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
            MprocError: no file descriptor is free to pin it (see :class:`AdoptedProcess`).
            TypeError: ``pid`` is not an int.
            ValueError: ``pid`` is not positive, is this process or one of its
                ancestors (PID 1 included), or is a kernel thread.
        """
        _check.pid(pid, "add_process")
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
        """SIGKILL one held process (its tree, if contained), wait for it and remove it.

        gproc's ``KillProcess``.

        Args:
            pid: the process.
            timeout: how long to wait for it to die at most.

        Returns:
            Its exit code (``None`` for an adopted process, or on timeout).

        Raises:
            NoSuchProcess: this manager does not hold ``pid``.
            TypeError, ValueError: an argument is malformed.
        """
        timeout = _check.timeout(timeout, "ProcessManager.kill")
        handle = self._lookup(_check.pid(pid, "ProcessManager.kill"))
        if _marker(handle) is not None:
            self._kill_trees([(pid, handle)], _signal.SIGKILL, timeout)
        else:
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
        timeout = _check.timeout(timeout, "wait_all")
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
            TypeError, ValueError: ``sig`` is not a valid signal number.
        """
        if not (type(sig) is int and sig == 0):  # 0 only checks that they exist
            sig = _check.signum(sig, "signal_all")
        _, failures = self._signal_each(self._held(), lambda h: h.signal(sig))
        if failures:
            raise _failure(f"signal_all({_signal_name(sig)})", failures)

    def _trees(
        self, held: list[tuple[int, ProcessHandle]], tree: bool
    ) -> tuple[list[tuple[int, ProcessHandle]], list[tuple[int, ProcessHandle]]]:
        """Split ``held`` into (roots of tree kills, processes signalled alone)."""
        trees, alone = [], []
        for pid, h in held:
            if _closed(h):
                alone.append((pid, h))
            elif _marker(h) is not None or (tree and isinstance(h, AdoptedProcess)):
                trees.append((pid, h))
            else:
                alone.append((pid, h))
        return trees, alone

    def _pin(self, trees: list[tuple[int, ProcessHandle]]) -> list[_Pinned]:
        pinned: list[_Pinned] = []
        try:
            for pid, h in trees:
                pinned.append(_Pinned(pid, h))
        except BaseException:
            for p in pinned:
                p.close()
            raise
        return pinned

    def _kill_trees(
        self,
        trees: list[tuple[int, ProcessHandle]],
        sig: int,
        timeout: Optional[float],
        pinned: Optional[list[_Pinned]] = None,
        seen: Optional[dict[int, int]] = None,
    ) -> list[int]:
        """Freeze and signal the trees of ``trees`` in one search; return the PIDs signalled."""
        own = pinned is None
        pins = self._pin(trees) if pinned is None else pinned
        try:
            if not pins:
                return []
            # Handles reap their own processes: their statuses are theirs.
            keep = {pid for pid, _ in self._held()}
            return _tree.kill_trees(
                [p.root() for p in pins], sig, timeout=timeout, keep=keep, seen=seen
            )
        finally:
            if own:
                for p in pins:
                    p.close()

    def kill_all(
        self, timeout: Optional[float] = _KILL_WAIT, *, tree: bool = False
    ) -> dict[int, Optional[int]]:
        """SIGKILL every held process, wait for them, and remove them (as gproc's ``KillAll``).

        A contained process is killed with its whole tree (see
        :func:`mproc.kill_tree`); an adopted one alone, unless ``tree``.

        Args:
            timeout: how long to wait for all of them to die at most.
            tree: also kill the trees of adopted processes.

        Returns:
            ``{pid: exit code}`` of the processes killed (``None`` for adopted
            ones and for any still alive at the deadline).

        Raises:
            MprocError: killing failed for some processes (after trying all);
                they stay listed; the message lists each PID and its error.
            TypeError, ValueError: an argument is malformed.
        """
        timeout = _check.timeout(timeout, "kill_all")
        held = self._held()
        trees, alone = self._trees(held, tree)
        _, failures = self._signal_each(alone, lambda h: h.kill())
        try:
            self._kill_trees(trees, _signal.SIGKILL, timeout)
        except Exception as err:  # e.g. /proc unreadable: say so for each of them
            failures.update((pid, err) for pid, _ in trees)
        deadline = None if timeout is None else time.monotonic() + timeout
        killed = [(pid, h) for pid, h in held if pid not in failures]
        codes = self._wait_handles(killed, deadline)
        for pid, h in killed:
            self._forget(pid, h)
        if failures:
            raise _failure("kill_all()", failures)
        return codes

    def terminate_all(
        self, timeout: Optional[float] = 5.0, *, tree: bool = False
    ) -> dict[int, Optional[int]]:
        """SIGTERM every held process, wait, then SIGKILL (with a warning) those still alive.

        A contained process is stopped with its whole tree: every member gets
        SIGTERM, and after ``timeout`` whatever is left of the tree (the
        process itself, or descendants that outlived it) gets SIGKILL. An
        adopted process is signalled alone, unless ``tree``. The escalation
        to SIGKILL of a held process is logged and issues a
        :class:`RuntimeWarning` (as trio does): it usually means a bug.

        Args:
            timeout: how long to wait after SIGTERM before SIGKILL.
            tree: also stop the trees of adopted processes.

        Returns:
            ``{pid: exit code}`` (``None`` for adopted processes, and for any
            that did not die even after SIGKILL).

        Raises:
            MprocError: signalling failed for some processes (after trying
                all); the message lists each PID and its error.
            TypeError, ValueError: an argument is malformed.
        """
        timeout = _check.timeout(timeout, "terminate_all")
        return self._terminate_held(self._held(), timeout, tree=tree)

    def _terminate_held(
        self,
        held: list[tuple[int, ProcessHandle]],
        timeout: Optional[float],
        *,
        tree: bool = False,
        warn: bool = True,
    ) -> dict[int, Optional[int]]:
        """:meth:`terminate_all` of ``held`` only.

        ``warn=False``: no RuntimeWarning on SIGKILL, for a caller whose
        policy expects it (a supervisor's ``shutdown`` grace running out).
        """
        trees, alone = self._trees(held, tree)
        pins = self._pin(trees)
        try:
            return self._terminate(held, trees, alone, pins, timeout, warn)
        finally:
            for p in pins:
                p.close()

    def _terminate(
        self,
        held: list[tuple[int, ProcessHandle]],
        trees: list[tuple[int, ProcessHandle]],
        alone: list[tuple[int, ProcessHandle]],
        pins: list[_Pinned],
        timeout: Optional[float],
        warn: bool,
    ) -> dict[int, Optional[int]]:
        signalled, failures = self._signal_each(alone, lambda h: h.terminate())
        seen: dict[int, int] = {}  # tree members of the SIGTERM step, for the SIGKILL step
        try:
            self._kill_trees(trees, _signal.SIGTERM, 0, pins, seen)
        except Exception as err:
            failures.update((pid, err) for pid, _ in trees)
        signalled += [t for t in trees if t[0] not in failures]
        deadline = None if timeout is None else time.monotonic() + timeout
        codes = self._wait_handles(signalled, deadline)
        stubborn = [(pid, h) for pid, h in signalled if not _closed(h) and h.is_alive()]
        if stubborn:
            listed = ", ".join(f"PID {pid}" for pid, _ in stubborn)
            logger.warning(
                "processes still alive %s s after SIGTERM, sending SIGKILL: %s", timeout, listed
            )
            if warn:
                warnings.warn(
                    f"terminate_all(): {len(stubborn)} process(es) still alive {timeout} s after "
                    f"SIGTERM, sent SIGKILL: {listed}",
                    RuntimeWarning,
                    stacklevel=4,  # _terminate, _terminate_held, terminate_all, the caller
                )
        _, more = self._signal_each([t for t in stubborn if t not in trees], lambda h: h.kill())
        failures.update(more)
        # Every tree, whether its root is alive or not: descendants that
        # outlived their root (or ignored SIGTERM) go now.
        try:
            self._kill_trees(trees, _signal.SIGKILL, _KILL_WAIT, pins, seen)
        except Exception as err:
            failures.update((pid, err) for pid, _ in trees)
        if stubborn:
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
