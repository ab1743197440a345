"""Run shell command lines: :func:`shell_exec`, :func:`shell_run`, :func:`shell` (SPEC §2).

A command runs as ``/bin/bash -c CMD`` (``/bin/sh -c CMD`` where bash is
missing), started by :mod:`mproc._launch` like every child of mproc.

Without a timeout the command stays in our process group, so Ctrl-C in the
terminal reaches it as it reaches us. With a timeout it gets its own session
and process group and a containment marker of its own: on timeout its whole
tree is frozen and killed (:mod:`mproc._tree`): the group (``sleep 100 |
cat``), and the descendants that left it (``setsid``, ``setsid -f``, double
forks, ``nohup … &``) by their marker. Ctrl-C (KeyboardInterrupt) while
waiting kills the tree too. Background jobs that keep the output pipe open
are part of the command: they are waited for, and killed on timeout. Killed
processes that were re-parented to us (we may be a child subreaper, as
supervisors are) are reaped.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import select
import signal
import subprocess
import threading
import time
from typing import IO, Any, Optional, Union

from . import _check, _launch, _tree
from ._errors import ShellError, ShellTimeout
from ._launch import Env
from ._log import logger as _log
from ._wakeup import Wakeup

__all__ = ["shell", "shell_exec", "shell_run"]

StrPath = Union[str, "os.PathLike[str]"]

_CHUNK = 65536
# After SIGKILL: how long the killed processes get to vanish (bounded, not expected).
_REAP_TIMEOUT = 5.0
# After the tree is killed every writer of the output pipe is dead, so the
# rest of the output is there at once; only a process that escaped the tree
# (it cleared its environment and left the group) could hold the pipe open.
_DRAIN_AFTER_KILL = 0.5
# Ctrl-C without a timeout also reached the command; give it the time
# subprocess.run gives it to exit on its own before it is killed.
_SIGINT_GRACE = 0.25
_CAPTURE: dict[str, Any] = {
    "stdin": subprocess.DEVNULL,
    "stdout": subprocess.PIPE,
    "stderr": subprocess.STDOUT,
}


def _shell_path() -> str:
    """Return the shell that runs command lines (see :func:`mproc._launch.shell_path`)."""
    return _launch.shell_path()


def _fileno(stream: Any) -> Optional[int]:
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


class _Child:
    """One run of the shell, as a context manager.

    ``__enter__`` starts it; ``__exit__`` kills everything it started if the
    block raised (timeout, Ctrl-C, a bug), stops the pump threads and always
    reaps the shell, each step bounded.
    """

    def __init__(
        self,
        cmd: str,
        env: Env,
        cwd: Optional[StrPath],
        timeout: Optional[float],
        pump: bool = False,
        *,
        func: str = "shell",
        **popen: Any,
    ) -> None:
        if not isinstance(cmd, str):
            raise TypeError(
                f"{func}(): cmd must be a str (a shell command line), not {type(cmd).__name__}"
            )
        timeout = _check.timeout(timeout, func)
        self.cmd, self.timeout, self.group = cmd, timeout, timeout is not None
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._cwd = cwd
        # With a timeout, a marker of its own finds what leaves the session.
        self._plan = _launch.plan_shell(marked=self.group)
        marker = None if self._plan is None else self._plan.chain
        self._popen = dict(
            popen,
            env=_launch.child_env(env, marker=marker),
            cwd=cwd,
            start_new_session=self.group,
            preexec_fn=_launch.preexec(self._plan),
        )
        self._killed = False
        self.pumps = _Pumps() if pump else None
        self._started = threading.Event()
        self._start_error: Optional[BaseException] = None
        # Made here, filled by Popen.__init__ in __enter__.
        self.proc: subprocess.Popen[bytes] = subprocess.Popen.__new__(subprocess.Popen)

    def __enter__(self) -> _Child:
        # Popen() runs on the launcher thread: Python runs signal handlers
        # only in the main thread, so a Ctrl-C cannot land between the fork
        # and Popen() storing the PID, which would orphan the command; and a
        # death signal is tied to that long-lived thread (see mproc._launch).
        _launch.open_mailbox()
        try:
            _launch.on_launcher_thread(self._start)
        except BaseException as exc:  # the launch finished: we know what to kill
            self.__exit__(type(exc), exc, None)
            raise
        err = self._start_error
        if err is None:
            return self
        self.__exit__(type(err), err, None)
        cwd = self._cwd
        if isinstance(err, OSError) and cwd is not None and err.filename in (cwd, os.fspath(cwd)):
            raise type(err)(
                err.errno,
                f"cannot run {self.cmd!r}: working directory {os.fspath(cwd)!r} "
                f"is unusable ({err.strerror})",
                os.fspath(cwd),
            ) from err
        raise err

    def _start(self) -> None:
        try:
            subprocess.Popen.__init__(self.proc, [_shell_path(), "-c", self.cmd], **self._popen)
        except BaseException as err:
            self._start_error = err
        finally:
            self._started.set()

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> None:
        started = getattr(self.proc, "pid", None) is not None
        try:
            if exc is not None and started and self.proc.returncode is None:
                _unstick(self.proc)
                try:
                    if isinstance(exc, KeyboardInterrupt) and not self.group:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            self.proc.wait(_SIGINT_GRACE)
                finally:
                    self.kill()
        finally:
            try:
                if self.pumps is not None:
                    self.pumps.close()
            finally:
                if started:
                    self._reap()

    def remaining(self) -> Optional[float]:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def expired(self, output: Optional[str] = None) -> ShellTimeout:
        """Kill everything and return the exception to raise (the timeout is ``not None``)."""
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(_REAP_TIMEOUT)  # SIGKILLed and not reaped yet: a matter of ms
        code = self.proc.returncode if self.proc.returncode is not None else -signal.SIGKILL
        return ShellTimeout(
            self.cmd, self.timeout or 0.0, output=output, pid=self.proc.pid, returncode=code
        )

    def check(self, output: Optional[str] = None) -> None:
        if self.proc.returncode:
            raise ShellError(self.proc.returncode, self.cmd, output=output, pid=self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the shell and everything it started (idempotent).

        With a timeout that is the shell's tree: its session's group and
        every process carrying its marker. Without one (Ctrl-C, an error),
        the shell and its descendants.
        """
        if self._killed or (self.proc.returncode is not None and not self.group):
            return
        self._killed = True
        p = self._plan
        # The shell is unreaped until _reap(): its PID (and group) cannot be reused.
        root = _tree.Root(
            self.proc.pid,
            alive=self.proc.returncode is None,
            group=self.group,
            marker=None if p is None or not self.group else p.element,
        )
        _tree.kill_trees([root], signal.SIGKILL, timeout=_REAP_TIMEOUT, keep=(self.proc.pid,))

    def _reap(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        try:
            self.proc.wait(_REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _log.warning("PID %d of %r survived SIGKILL", self.proc.pid, self.cmd)


def _unstick(proc: subprocess.Popen[bytes]) -> None:
    # Popen.wait(timeout) takes a private lock before its try/finally: a
    # KeyboardInterrupt in between leaves it held, and every later poll()/wait()
    # of this Popen (ours to reap it) would fail. Nobody else waits on it.
    lock = getattr(proc, "_waitpid_lock", None)
    if lock is not None and lock.locked():
        lock.release()


class _Pumps:
    """Threads copying between file-likes without a fileno and the command's pipes."""

    def __init__(self) -> None:
        self._stop = Wakeup()  # never drained: once woken, every poll sees it
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="mproc-shell-pump", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _ready(self, poller: Any) -> bool:
        """Block until the pipe is ready; ``False`` once :meth:`close` stopped us."""
        return all(fd != self._stop.fileno() for fd, _ in poller.poll())

    def _poller(self, fd: int, events: int) -> Any:
        poller = select.poll()  # not select.select: it fails for fds >= FD_SETSIZE
        poller.register(fd, events)
        poller.register(self._stop.fileno(), select.POLLIN)
        return poller

    def feed(self, source: Any, pipe: IO[bytes]) -> None:
        """Copy ``source`` (text or binary) into the command's stdin, then close it."""
        try:
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            poller = self._poller(fd, select.POLLOUT)
            while True:
                chunk = source.read(_CHUNK)
                if not chunk:
                    return
                if isinstance(chunk, str):
                    data = memoryview(chunk.encode("utf-8"))
                elif isinstance(chunk, (bytes, bytearray, memoryview)):
                    data = memoryview(chunk).cast("B")
                else:
                    raise TypeError(
                        f"stdin.read() returned {type(chunk).__name__}, not str or bytes"
                    )
                while data:
                    if not self._ready(poller):
                        return
                    with contextlib.suppress(BlockingIOError):
                        data = data[os.write(fd, data) :]
        except BrokenPipeError:  # the command stopped reading: the rest is not wanted
            pass
        except BaseException as err:
            self.errors.append(err)
        finally:
            pipe.close()

    def drain(self, pipe: IO[bytes], sink: Any) -> None:
        """Copy the command's stdout into ``sink`` (text or binary) until EOF."""
        text: Optional[bool] = None  # None: an object we cannot classify
        if isinstance(sink, (io.TextIOBase, io.RawIOBase, io.BufferedIOBase)):
            text = isinstance(sink, io.TextIOBase)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            fd = pipe.fileno()
            poller = self._poller(fd, select.POLLIN)
            data = b"-"
            while data and self._ready(poller):
                data = os.read(fd, _CHUNK)
                if text is None and data:
                    try:  # bytes first, then str
                        _write_all(sink, data)
                        text = False
                        continue
                    except TypeError:
                        text = True
                if text:
                    decoded = decoder.decode(data, final=not data)
                    if decoded:
                        sink.write(decoded)
                elif data:
                    _write_all(sink, data)
            if callable(getattr(sink, "flush", None)):
                sink.flush()
        except BaseException as err:
            # Closing our end makes the command's writes fail (SIGPIPE), so it cannot block.
            self.errors.append(err)
        finally:
            pipe.close()

    def join(self, timeout: Optional[float]) -> bool:
        """Wait for the threads (up to ``timeout`` in all); return whether all finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            with contextlib.suppress(RuntimeError):  # its start() was interrupted
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def close(self) -> None:
        """Let the threads finish (bounded), then stop them; raise nothing."""
        if not self.join(_REAP_TIMEOUT):
            self._stop.wake()
            if not self.join(_REAP_TIMEOUT):
                # Stuck in the caller's read()/write(): keep the wake-up open for it.
                _log.warning("a shell pump thread is stuck in a read or write of the caller's")
                return
        self._stop.close()


def _write_all(sink: Any, data: bytes) -> None:
    if not isinstance(sink, io.RawIOBase):
        sink.write(data)
        return
    view = memoryview(data)
    while view:  # raw writes may be partial
        written = sink.write(view)
        if not written:
            raise BlockingIOError(f"{sink!r}.write() wrote nothing")
        view = view[written:]


def shell_exec(
    cmd: str, env: Env = None, *, cwd: Optional[StrPath] = None, timeout: Optional[float] = None
) -> str:
    """Run ``cmd`` in the shell and return its stdout and stderr combined, as text.

    The command reads from ``/dev/null`` (as gproc's ``ShellExec``); its output
    is decoded as UTF-8, undecodable bytes replaced by U+FFFD.

    Args:
        cmd: the command line, run by ``/bin/bash -c`` (else ``/bin/sh -c``).
        env: variables added to (not replacing) ``os.environ``: a mapping, or
            a list of ``"KEY=VALUE"`` strings.
        cwd: the working directory of the command.
        timeout: seconds after which the command and everything it started
            are killed; it then runs in its own process group.

    Returns:
        Everything the command wrote to stdout and stderr.

    Raises:
        ShellError: the command exited with a non-zero status (``output`` holds its output).
        ShellTimeout: the timeout passed (``output`` holds what came before).
        TypeError, ValueError: ``cmd``, ``env`` or ``timeout`` is malformed.
        OSError: the shell could not be started, e.g. ``cwd`` does not exist.
    """
    with _Child(cmd, env, cwd, timeout, func="shell_exec", **_CAPTURE) as child:
        try:
            out, _ = child.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            child.kill()
            try:  # the tree is dead: the pipe closes, the rest of the output comes
                out, _ = child.proc.communicate(timeout=_DRAIN_AFTER_KILL)
            except subprocess.TimeoutExpired as again:  # a holder escaped the tree
                out = again.output or err.output
            raise child.expired(_decode(out)) from None
    text = _decode(out)
    child.check(text)
    return text


def _decode(data: Optional[bytes]) -> str:
    return (data or b"").decode("utf-8", errors="replace")


def shell_run(
    cmd: str, env: Env = None, *, cwd: Optional[StrPath] = None, timeout: Optional[float] = None
) -> None:
    """Run ``cmd`` in the shell with this process's stdin, stdout and stderr.

    Args:
        cmd: the command line, run by ``/bin/bash -c`` (else ``/bin/sh -c``).
        env: variables added to ``os.environ``: a mapping or ``"KEY=VALUE"`` strings.
        cwd: the working directory of the command.
        timeout: seconds after which the command and everything it started
            are killed; it then runs in its own process group, so Ctrl-C in
            the terminal reaches it only through this process.

    Raises:
        ShellError: the command exited with a non-zero status.
        ShellTimeout: the timeout passed.
        TypeError, ValueError: ``cmd``, ``env`` or ``timeout`` is malformed.
        OSError: the shell could not be started, e.g. ``cwd`` does not exist.
    """
    with _Child(cmd, env, cwd, timeout, func="shell_run") as child:
        try:
            child.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise child.expired() from None
    child.check()


def shell(
    cmd: str,
    stdout: Any = None,
    stdin: Any = None,
    *,
    env: Env = None,
    cwd: Optional[StrPath] = None,
    timeout: Optional[float] = None,
) -> None:
    """Run ``cmd`` in the shell with the given stdout and stdin; stderr is inherited.

    Each stream may be a real file (with a working ``fileno()``), any other
    file-like object, text or binary (``io.StringIO``, ``io.BytesIO``; copied
    by a thread), or ``None`` to inherit this process's. Text is UTF-8.

    Args:
        cmd: the command line, run by ``/bin/bash -c`` (else ``/bin/sh -c``).
        stdout: where the command's output goes.
        stdin: what the command reads; it sees EOF at the end of it.
        env: variables added to ``os.environ``: a mapping or ``"KEY=VALUE"`` strings.
        cwd: the working directory of the command.
        timeout: seconds after which the command and everything it started
            are killed; it then runs in its own process group.

    Raises:
        ShellError: the command exited with a non-zero status.
        ShellTimeout: the timeout passed (the output so far is in ``stdout``).
        TypeError, ValueError: an argument is malformed.
        OSError: the shell could not be started, or reading ``stdin`` /
            writing ``stdout`` failed (that error is raised as it is).
    """
    streams: dict[str, Any] = {}
    for name, stream in (("stdout", stdout), ("stdin", stdin)):
        fd = None if stream is None else _fileno(stream)
        if fd is not None and name == "stdout" and callable(getattr(stream, "flush", None)):
            stream.flush()  # what Python buffered comes before what the command writes
        streams[name] = subprocess.PIPE if stream is not None and fd is None else fd
    pump = subprocess.PIPE in streams.values()
    with _Child(cmd, env, cwd, timeout, pump, **streams) as child:
        pumps = child.pumps
        if pumps is not None:
            if child.proc.stdin is not None:
                pumps.start(pumps.feed, stdin, child.proc.stdin)
            if child.proc.stdout is not None:
                pumps.start(pumps.drain, child.proc.stdout, stdout)
            # The pipes first: the shell stays unreaped, so its PID still names the group.
            if not pumps.join(child.remaining()):
                raise child.expired()
        try:
            child.proc.wait(child.remaining())
        except subprocess.TimeoutExpired:
            raise child.expired() from None
    if pumps is not None and pumps.errors:
        raise pumps.errors[0]
    child.check()
