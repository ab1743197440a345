"""Command: an external program as a process handle (gproc's ``NewProcess``/``NewProcessCmd``)."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Sequence
from typing import IO, Callable, Optional

from . import _check, _launch, _tree, _wait
from ._errors import MprocError, NoSuchProcess, describe_exitcode
from ._process import (
    EnvLike,
    PathLike,
    _contained_start,
    _signal_child,
    _Stoppable,
    _Stream,
    _watch_child,
)

__all__ = ["Command"]


def _start_error(err: OSError, path: str, cwd: Optional[str]) -> OSError:
    if cwd is not None and err.filename == cwd:
        what = f"cannot start {path!r} in working directory {cwd!r}: {err.strerror}"
    else:
        what = f"cannot start {path!r}: {err.strerror}"
    return type(err)(err.errno, what, err.filename)


class Command(_Stoppable):
    """An external program, started with :mod:`subprocess` (gproc's ``NewProcess``).

    Args:
        path: the program; a bare name is looked up in ``PATH``.
        args: its arguments, without ``path`` (a leading ``path`` is dropped,
            as gproc does).
        env: variables added to ``os.environ``: a mapping or a list of
            ``"KEY=VALUE"`` strings.
        cwd: the working directory of the child.
        stdin: as for :class:`subprocess.Popen` (``None`` inherits).
        stdout: as for :class:`subprocess.Popen`.
        stderr: as for :class:`subprocess.Popen`.

    Raises:
        TypeError: ``args`` is a string, or ``env`` has the wrong shape.
        ValueError: an ``env`` entry is malformed (the message names it).
    """

    def __init__(
        self,
        path: PathLike,
        args: Sequence[PathLike] = (),
        env: EnvLike = None,
        *,
        cwd: Optional[PathLike] = None,
        stdin: _Stream = None,
        stdout: _Stream = None,
        stderr: _Stream = None,
    ) -> None:
        if isinstance(args, (str, bytes)):
            raise TypeError(f"args must be a list of strings, not a string: use [{args!r}]")
        self.path = os.fspath(path)
        if not self.path:
            raise ValueError("Command needs a program path, got an empty string")
        argv = [os.fspath(a) for a in args]
        if argv and argv[0] == self.path:
            del argv[0]
        self.args: tuple[str, ...] = tuple(argv)
        self.env = env
        _launch.check_env(env)  # validate now rather than at start()
        self.cwd = None if cwd is None else os.fspath(cwd)
        self._streams = (stdin, stdout, stderr)
        self._lock = threading.RLock()
        self._popen: Optional[subprocess.Popen[bytes]] = None
        self._watch: Optional[_wait.Watch] = None
        self._on_start: Optional[Callable[[Command], None]] = None  # set by a ProcessManager
        # Set by a ProcessManager before start(): True/False, or None (standalone).
        self._contain: Optional[bool] = None
        self._element: Optional[str] = None

    @classmethod
    def from_shell(
        cls,
        cmd: str,
        env: EnvLike = None,
        *,
        cwd: Optional[PathLike] = None,
        stdin: _Stream = None,
        stdout: _Stream = None,
        stderr: _Stream = None,
    ) -> Command:
        """Return a Command running ``cmd`` through ``/bin/bash -c`` (else ``/bin/sh``).

        This is gproc's ``NewProcessCmd``. Arguments after ``cmd`` as for :class:`Command`.

        Args:
            cmd: the command line.
            env: variables added to ``os.environ``.
            cwd: the working directory.
            stdin: as for :class:`subprocess.Popen`.
            stdout: as for :class:`subprocess.Popen`.
            stderr: as for :class:`subprocess.Popen`.

        Returns:
            The (not yet started) Command.
        """
        return cls(
            _launch.shell_path(),
            ["-c", cmd],
            env,
            cwd=cwd,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
        )

    def __repr__(self) -> str:
        popen = self._popen
        if popen is None:
            state = "not started"
        else:
            code = popen.returncode
            state = f"pid={popen.pid} " + (
                "running" if code is None else f"exited {describe_exitcode(code)}"
            )
        return f"<Command {self.path!r} args={list(self.args)!r} {state}>"

    @property
    def pid(self) -> Optional[int]:
        """The PID, ``None`` before :meth:`start`."""
        popen = self._popen
        return None if popen is None else popen.pid

    @property
    def stdin(self) -> Optional[IO[bytes]]:
        """The child's stdin pipe when started with ``stdin=subprocess.PIPE``, else ``None``."""
        return None if self._popen is None else self._popen.stdin

    @property
    def stdout(self) -> Optional[IO[bytes]]:
        """The child's stdout pipe when started with ``stdout=subprocess.PIPE``, else ``None``."""
        return None if self._popen is None else self._popen.stdout

    @property
    def stderr(self) -> Optional[IO[bytes]]:
        """The child's stderr pipe when started with ``stderr=subprocess.PIPE``, else ``None``."""
        return None if self._popen is None else self._popen.stderr

    def start(self) -> int:
        """Start the program once; later calls return the same PID and start nothing.

        Returns:
            The PID.

        Raises:
            FileNotFoundError: the program (or ``cwd``) does not exist; the
                message names it.
            OSError: the program cannot be executed (e.g. ``PermissionError``).
        """
        with self._lock:
            if self._popen is not None:
                return self._popen.pid
            p = _launch.plan(self._contain)
            # os.environ + MPROC_PPID=us + marker + env (which may override them)
            env = _launch.child_env(self.env, marker=None if p is None else p.chain)
            stdin, stdout, stderr = self._streams
            try:
                popen = _launch.popen(
                    [self.path, *self.args],
                    contain=p,
                    env=env,
                    cwd=self.cwd,
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                )
            except OSError as err:
                raise _start_error(err, self.path, self.cwd) from err
            self._popen = popen
            self._element = None if p is None else p.element
            _contained_start(popen.pid, p)
            self._watch = _watch_child(popen.pid, self._reap, self._returncode)
            on_start = self._on_start
        if on_start is not None:
            on_start(self)
        return popen.pid

    def _reap(self) -> bool:
        with self._lock:  # signal() checks and kills under this lock: no PID reuse race
            popen = self._popen
            if popen is None or popen.poll() is None:
                return False
        if self._element is not None:
            _tree.forget(popen.pid, self._element)
        return True

    def _returncode(self) -> Optional[int]:
        popen = self._popen
        return None if popen is None else popen.returncode

    def _monitor_watch(self) -> Optional[_wait.Watch]:
        return self._watch

    def _pin(self) -> tuple[bool, Optional[int]]:
        """Return (alive, a new pidfd) for a tree kill; under the lock the reaper reaps under."""
        with self._lock:
            popen = self._popen
            if popen is None or popen.poll() is not None:
                return False, None
            try:
                return True, _wait.pidfd_open(popen.pid)
            except NoSuchProcess:
                return False, None

    def _started(self) -> tuple[subprocess.Popen[bytes], _wait.Watch]:
        popen, w = self._popen, self._watch
        if popen is None or w is None:
            raise ValueError(f"{self!r} has not been started; call start() first")
        return popen, w

    def run(self) -> int:
        """Start the program (if not started yet), wait for it, return its exit code.

        Returns:
            The exit code (negative: killed by that signal).

        Raises:
            FileNotFoundError: the program does not exist (see :meth:`start`).
        """
        self.start()
        code = self.wait()
        if code is None:  # only if someone else reaped our child behind our back
            raise MprocError(f"the exit status of {self!r} was lost", pid=self.pid)
        return code

    @property
    def exitcode(self) -> Optional[int]:
        """The exit code (negative: a signal); ``None`` while running or not started."""
        popen = self._popen
        if popen is None:
            return None
        with self._lock:
            return popen.poll()

    returncode = exitcode

    def is_alive(self) -> bool:
        """Return whether the program has been started and has not exited."""
        return self._popen is not None and self.exitcode is None

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait for the program to exit (an event, no polling).

        Args:
            timeout: seconds at most; ``None`` waits forever.

        Returns:
            The exit code (negative: killed by that signal), ``None`` on timeout.

        Raises:
            TypeError, ValueError: ``timeout`` is malformed.
            ValueError: not started.
        """
        timeout = _check.timeout(timeout, "Command.wait")
        _, w = self._started()
        if not w.wait(timeout):
            return None
        return self.exitcode

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the program (through its pidfd when there is one).

        Args:
            sig: the signal number.

        Raises:
            NoSuchProcess: the program has exited.
            ValueError: not started.
        """
        popen, w = self._started()
        _signal_child(repr(self.path), popen.pid, sig, w, self._lock, popen.poll)
