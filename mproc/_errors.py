"""The whole exception hierarchy of mproc, rooted at :class:`MprocError`.

Every exception carries the PID, command, group or path it is about as
attributes, has a ``repr`` that shows them, and survives a pickle round trip
(so it can cross a process boundary, e.g. as a mailbox payload).
"""

from __future__ import annotations

import signal
import subprocess
from typing import Any, Optional, Sequence, Union

__all__ = [
    "CallTimeout",
    "CalleeDied",
    "HandshakeError",
    "NameNotFound",
    "NameTaken",
    "RemoteError",
    "StopServing",
    "SupervisorGaveUp",
    "MailboxClosed",
    "MailboxError",
    "MailboxGone",
    "MailboxTimeout",
    "UnsafeRuntimeDir",
    "MailboxFull",
    "MailboxNotFound",
    "MessageError",
    "MprocError",
    "NoSuchProcess",
    "ReceiveTimeout",
    "ShellError",
    "ShellTimeout",
    "describe_exitcode",
]

Cmd = Union[str, Sequence[str]]
# Windows has no SIGKILL; `import mproc` must still work there.
_SIGKILL = int(getattr(signal, "SIGKILL", 9))


def describe_exitcode(code: Optional[int]) -> str:
    """Render an exit code the way a person reads it: ``0``, ``3``, ``SIGKILL(-9)``."""
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"{signal.Signals(-code).name}({code})"
        except ValueError:
            return f"signal {-code}({code})"
    return str(code)


class MprocError(Exception):
    """Base class of every error mproc raises.

    Attributes:
        msg: the human-readable message.
        pid: the process the error is about, if any.
        path: the file or socket path the error is about, if any.
        group: the mailbox group the error is about, if any.
        errors: for an error about several processes, ``{pid: exception}``.
    """

    def __init__(
        self,
        msg: str = "",
        *,
        pid: Optional[int] = None,
        path: Optional[str] = None,
        group: Optional[str] = None,
        errors: Optional[dict[int, BaseException]] = None,
    ) -> None:
        Exception.__init__(self, msg)
        self.msg = msg
        self.pid = pid
        self.path = path
        self.group = group
        self.errors = errors

    def _fields(self) -> dict[str, Any]:
        return {"pid": self.pid, "path": self.path, "group": self.group, "errors": self.errors}

    def __str__(self) -> str:
        return self.msg

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self._fields().items() if v is not None)
        return f"{type(self).__name__}({self.msg!r}{extra})"

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self.msg, self._fields()))


def _rebuild(cls: type[MprocError], msg: str, fields: dict[str, Any]) -> MprocError:
    return cls(msg, **fields)


class NoSuchProcess(MprocError, ProcessLookupError):
    """The process does not exist (any more), or its PID now names another process."""

    def __init__(self, msg: str = "", *, pid: Optional[int] = None, **kw: Any) -> None:
        if not msg:
            msg = f"no such process: PID {pid}" if pid is not None else "no such process"
        MprocError.__init__(self, msg, pid=pid, **kw)


class ShellError(MprocError, subprocess.CalledProcessError):
    """A shell command exited with a non-zero status.

    Attributes:
        returncode: the exit status (negative: killed by that signal).
        cmd: the command line that was run.
        output: everything the command printed that was captured (or ``None``).
    """

    def __init__(
        self,
        returncode: int,
        cmd: Cmd,
        output: Any = None,
        stderr: Any = None,
        *,
        pid: Optional[int] = None,
        msg: str = "",
    ) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, cmd, output, stderr)
        if not msg:
            msg = f"command {_show(cmd)} exited with status {describe_exitcode(returncode)}"
            if pid is not None:
                msg += f" (PID {pid})"
        MprocError.__init__(self, msg, pid=pid)

    def _fields(self) -> dict[str, Any]:
        return {"returncode": self.returncode, "cmd": self.cmd, "pid": self.pid}

    def __str__(self) -> str:
        return self.msg

    def __reduce__(self) -> Any:
        return (
            type(self),
            (self.returncode, self.cmd, self.output, self.stderr),
            # args too: __init__ rebuilt them from a message without the PID.
            {"pid": self.pid, "msg": self.msg, "args": self.args},
        )


class ShellTimeout(ShellError, subprocess.TimeoutExpired):
    """A shell command ran past its timeout; everything it started was killed.

    Attributes:
        timeout: the limit in seconds.
        output: what the command printed before it was killed (or ``None``).
        returncode: the status it died with (normally ``-9``).
    """

    def __init__(
        self,
        cmd: Cmd,
        timeout: float,
        output: Any = None,
        stderr: Any = None,
        *,
        returncode: int = -_SIGKILL,
        pid: Optional[int] = None,
        msg: str = "",
    ) -> None:
        if not msg:
            msg = f"command {_show(cmd)} timed out after {timeout:g} s and was killed"
            if pid is not None:
                msg += f" (PID {pid})"
        ShellError.__init__(self, returncode, cmd, output, stderr, pid=pid, msg=msg)
        self.timeout = timeout

    def _fields(self) -> dict[str, Any]:
        return {"cmd": self.cmd, "timeout": self.timeout, "pid": self.pid}

    def __reduce__(self) -> Any:
        return (
            type(self),
            (self.cmd, self.timeout, self.output, self.stderr),
            {"returncode": self.returncode, "pid": self.pid, "msg": self.msg, "args": self.args},
        )


def _show(cmd: Cmd) -> str:
    if isinstance(cmd, str):
        return repr(cmd)
    return repr(" ".join(str(c) for c in cmd))


class MailboxError(MprocError):
    """The mailbox cannot do what was asked (runtime directory, socket, peer)."""


class MailboxNotFound(MailboxError):
    """The process is alive but has no open mailbox (within the timeout)."""


class MailboxFull(MailboxError, TimeoutError):
    """The receiver's queue for the group stayed full past the timeout."""


class MessageError(MailboxError):
    """A message could not be pickled (sender side) or unpickled (receiver side)."""


class ReceiveTimeout(MailboxError, TimeoutError):
    """``receive()`` found no message for the group within the timeout."""


class MailboxClosed(MailboxError):
    """This process closed its own mailbox (``close_mailbox()``) while it was in use."""


class MailboxGone(MailboxError):
    """The receiver went away in the middle of the conversation (it exited or closed)."""


class HandshakeError(MailboxError):
    """The peer refused the connection's authentication or spoke another protocol.

    The message names the likely cause: another runtime directory or key file,
    another user, or another mproc protocol version.
    """


class UnsafeRuntimeDir(MailboxError):
    """The runtime directory is refused: a symlink, not owned by you, writable by others,
    not a directory, or too long for an AF_UNIX socket path."""


class MailboxTimeout(MailboxError, TimeoutError):
    """The receiver did not answer (e.g. the handshake) within the timeout."""


class CallTimeout(ReceiveTimeout):
    """``call()`` got no reply within its timeout (a late reply is dropped)."""


class CalleeDied(MailboxGone):
    """The callee of a ``call()`` exited before it replied."""


class RemoteError(MprocError):
    """A callee's exception that cannot be rebuilt here (its class does not unpickle).

    Attributes:
        type_name: the qualified name of the remote exception's class.
        traceback: the remote traceback, as text (also the ``__cause__``).
    """

    def __init__(
        self, msg: str = "", *, type_name: str = "", traceback: str = "", **kw: Any
    ) -> None:
        MprocError.__init__(self, msg, **kw)
        self.type_name = type_name
        self.traceback = traceback

    def _fields(self) -> dict[str, Any]:
        return {
            **MprocError._fields(self),
            "type_name": self.type_name,
            "traceback": self.traceback,
        }


class RemoteTraceback(Exception):
    """The ``__cause__`` of an exception re-raised by ``call()``: the callee's traceback text."""

    def __init__(self, tb: str) -> None:
        Exception.__init__(self, tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class NameTaken(MprocError, ValueError):
    """The name is registered by another live process."""


class NameNotFound(MailboxNotFound):
    """No live process holds the name (within the timeout)."""


class StopServing(MprocError):
    """Raised by a ``serve()`` handler to make ``serve()`` return."""


class SupervisorGaveUp(MprocError):
    """A supervisor restarted a child too often and stopped everything.

    Attributes:
        name: the child that exceeded the restart intensity.
        exitcode: that child's last exit code (negative: a signal).
    """

    def __init__(
        self,
        msg: str = "",
        *,
        name: Optional[str] = None,
        exitcode: Optional[int] = None,
        **kw: Any,
    ) -> None:
        MprocError.__init__(self, msg, **kw)
        self.name = name
        self.exitcode = exitcode

    def _fields(self) -> dict[str, Any]:
        return {**MprocError._fields(self), "name": self.name, "exitcode": self.exitcode}


def _public_module() -> None:
    """Make tracebacks say ``mproc.NoSuchProcess``, as psutil and trio do."""
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type):
            obj.__module__ = "mproc"


_public_module()
