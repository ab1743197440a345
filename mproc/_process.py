"""Process handles: the :class:`ProcessHandle` protocol, :class:`Process`, :class:`AdoptedProcess`.

:class:`Command` (external programs) lives in :mod:`mproc._command`. Every
handle is watched by the reaper of :mod:`mproc._wait` from the moment
its process starts (or is adopted): waiting is an event, and a child of ours
is reaped as soon as it exits, whether or not anybody waits for it.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import signal as _signal
import threading
import weakref
from collections import ChainMap
from collections.abc import Mapping, Sequence
from multiprocessing.context import BaseContext
from multiprocessing.reduction import ForkingPickler
from typing import IO, Any, Callable, ClassVar, Optional, Protocol, Union, runtime_checkable

import cloudpickle
import psutil

from . import _check, _launch, _mailbox, _runtime, _tree, _wait
from ._errors import MprocError, NoSuchProcess, describe_exitcode
from ._identity import ENV_PPID
from ._monitor import Monitor, monitor_handle

__all__ = ["AdoptedProcess", "EnvLike", "Process", "ProcessHandle"]

#: What ``env=`` accepts: a mapping, or gproc's list of ``"KEY=VALUE"`` strings.
EnvLike = _launch.Env
_Stream = Union[None, int, IO[Any]]
PathLike = Union[str, "os.PathLike[str]"]


@runtime_checkable
class ProcessHandle(Protocol):
    """What every process handle of mproc offers (``Process``, ``Command``, ``AdoptedProcess``).

    ``isinstance(obj, ProcessHandle)`` checks that the members exist.
    """

    @property
    def pid(self) -> Optional[int]:
        """The PID, ``None`` before the process has started."""

    @property
    def exitcode(self) -> Optional[int]:
        """The exit code (negative: killed by that signal); ``None`` while running or unknowable."""

    def is_alive(self) -> bool:
        """Return whether the process is running (a zombie is not)."""

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait for the process to exit; return its exit code (``None``: timeout or unknowable)."""

    def signal(self, sig: int) -> None:
        """Send ``sig``; raise :class:`NoSuchProcess` if the process has exited."""

    def terminate(self) -> None:
        """Send SIGTERM; a no-op on a process that has exited."""

    def kill(self) -> None:
        """Send SIGKILL; a no-op on a process that has exited."""

    def send(self, obj: Any, group: str = "", *, timeout: Optional[float] = None) -> None:
        """Send ``obj`` to this process's mailbox (see :func:`mproc.send`)."""

    def monitor(self, group: str = "") -> Monitor:
        """Monitor this very process: one :class:`mproc.Down` arrives in ``group`` when it exits."""


def _exited() -> bool:
    return True


def _contained_start(pid: int, p: Optional[_launch.Plan]) -> None:
    """Parent-side bookkeeping of a contained child, right after it started."""
    if p is None:
        return
    if p.new_group:
        # The child makes itself a group leader too; doing it here as well
        # closes the window in which a tree kill would not see the group.
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass  # already exec'd (EACCES), or not our child (forkserver): the child did it
    if p.element is not None:
        _tree.remember(pid, p.element)


def _watch_child(
    pid: int, poll: Callable[[], bool], exitcode: Callable[[], Optional[int]]
) -> _wait.Watch:
    try:
        fd = _wait.pidfd_open(pid)
    except NoSuchProcess:
        fd = None  # already gone (a forkserver child): polling will see it at once
    if fd is not None and poll():
        # Exited before we pinned it; for a forkserver child (not ours to
        # reap) the PID might even be reused already, so trust only poll().
        os.close(fd)
        fd = None
    # exitcode: a monitor of this child reports the code as the handle saw it.
    return _wait.watch(pid, poll, fd, exitcode=exitcode)


def _exited_error(what: str, pid: int, code: Optional[int]) -> NoSuchProcess:
    status = f" with status {describe_exitcode(code)}" if code is not None else ""
    return NoSuchProcess(f"{what} (PID {pid}) has already exited{status}", pid=pid)


def _signal_child(
    what: str, pid: int, sig: int, w: _wait.Watch, lock: Any, poll: Callable[[], Optional[int]]
) -> None:
    # Under the lock the reaper also takes to reap: the child cannot be reaped
    # (and its PID handed to another process) between the check and the kill.
    with lock:
        code = poll()
        if code is not None:
            raise _exited_error(what, pid, code)
        if w.send_signal(sig):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError as err:
            raise _exited_error(what, pid, None) from err


class _Stoppable:
    """terminate(), kill() and send() on top of ``pid`` and ``signal()``."""

    pid: Any  # a property in each subclass

    def signal(self, sig: int) -> None:
        raise NotImplementedError

    def send(self, obj: Any, group: str = "", *, timeout: Optional[float] = None) -> None:
        """Send ``obj`` to this process's mailbox (see :func:`mproc.send`).

        Args:
            obj: any object cloudpickle can pickle.
            group: the receiver's group.
            timeout: how long to wait for its mailbox and for queue room (default 5 s).

        Raises:
            ValueError: the process has not been started.
            NoSuchProcess, MailboxNotFound, MailboxFull, MessageError, MailboxError:
                as :func:`mproc.send`.
        """
        pid = self.pid
        if pid is None:
            raise ValueError(f"{self!r} has not been started; call start() first")
        _mailbox.send(pid, obj, group, timeout=timeout)

    def monitor(self, group: str = "") -> Monitor:
        """Monitor this very process (not whatever later reuses its PID).

        When it exits, one :class:`mproc.Down` arrives in this process's
        mailbox, group ``group`` (see :func:`mproc.monitor`). For a process
        this program started, the Down's ``exitcode`` is the handle's own
        (negative: killed by that signal); a process that has exited
        already gets its Down at once.

        Args:
            group: the mailbox group the Down goes to.

        Returns:
            The :class:`mproc.Monitor` (for :func:`mproc.demonitor`).

        Raises:
            TypeError: ``group`` is not a str.
            ValueError: the process has not been started.
        """
        return monitor_handle(self, group)

    def _monitor_watch(self) -> Optional[_wait.Watch]:
        """Return the watch whose ``code`` is this child's exit code as the handle saw it."""
        return None  # an adopted process: its exit status is not ours

    def terminate(self) -> None:
        """Send SIGTERM; a no-op if the process has exited."""
        try:
            self.signal(_signal.SIGTERM)
        except NoSuchProcess:
            pass

    def kill(self) -> None:
        """Send SIGKILL; a no-op if the process has exited."""
        try:
            self.signal(_signal.SIGKILL)
        except NoSuchProcess:
            pass


# --- Process -----------------------------------------------------------------


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle is untyped
    # multiprocessing registers its reducers (Connection, socket, ...) with
    # ForkingPickler only; plain cloudpickle would copy a Connection's fd
    # *number*, useless in the child. Setting dispatch_table on an instance
    # has no effect on the C pickler, hence the class attribute.
    dispatch_table: ClassVar[ChainMap[Any, Any]] = ChainMap(
        vars(ForkingPickler)["_extra_reducers"], cloudpickle.Pickler.dispatch_table
    )


def _dumps(obj: object) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


# Process attributes that are per-parent and must not travel to the child.
_LOCAL_ATTRS = frozenset({"_mproc_lock", "_mproc_watch", "_popen"})


try:
    from multiprocessing import popen_fork as _popen_fork
except ImportError:  # pragma: no cover - no fork on this platform
    _popen_fork = None  # type: ignore[assignment]

_CAN_PEEK = all(hasattr(os, name) for name in ("waitid", "P_PID", "WEXITED", "WNOWAIT"))
# waitid(P_PID, pid, _PEEK) says whether a child of ours has exited, without reaping it.
_PEEK = (os.WEXITED | os.WNOHANG | os.WNOWAIT) if _CAN_PEEK else 0


def _no_waitid(*args: Any) -> Any:  # pragma: no cover - never called: peek is off
    raise OSError("waitid() is not available")


_POPEN_CLASSES: dict[type, type] = {}


def _locked_class(base: type) -> type:
    """Return the subclass of ``base`` (a multiprocessing Popen) whose poll() takes the lock.

    multiprocessing.active_children() and every start() poll all children
    from whatever thread; racing the reaper, two polls of a forkserver child
    can both read its status pipe (one gets EOF and reports 255), and two
    waitpid()s lose a status. So every waitpid() runs under the handle's
    lock. A class, not a closure per popen: every start() polls every
    running child, and touching a closure, a weak reference and a lock per
    child after each fork copies their pages (copy-on-write) for nothing.
    For a child of ours, polled without blocking, ``waitid(WNOWAIT)`` first
    says whether there is anything to collect: a running child costs no
    lock. (Until it is reaped, under the lock, its PID cannot be reused.)
    """
    sub = _POPEN_CLASSES.get(base)
    if sub is not None:
        return sub
    unlocked: Callable[[Any, int], Optional[int]] = getattr(base, "poll")  # noqa: B009
    launch: Callable[[Any, Any], None] = getattr(base, "__init__")  # noqa: B009
    peek = _CAN_PEEK and unlocked is getattr(getattr(_popen_fork, "Popen", None), "poll", None)
    waitid: Callable[..., Any] = getattr(os, "waitid", None) or _no_waitid
    p_pid, wnohang = getattr(os, "P_PID", 0), os.WNOHANG

    def poll(self: Any, flag: int = wnohang) -> Optional[int]:
        if self.returncode is None:
            if peek and flag == wnohang:
                # Only a peek: any doubt (ECHILD: reaped meanwhile by another
                # thread) goes on to the locked waitpid().
                try:
                    if waitid(p_pid, self.pid, _PEEK) is None:
                        return None  # not exited: nothing to collect
                except OSError:
                    pass
            with self._mproc_lock:
                return unlocked(self, flag)
        code: Optional[int] = self.returncode
        return code

    def __init__(self: Any, process_obj: Any) -> None:
        # Before the launch: the attribute is written before the fork, not after.
        self._mproc_lock = process_obj._mproc_lock
        launch(self, process_obj)

    namespace = {"poll": poll, "__init__": __init__, "__module__": __name__}
    sub = type(base.__name__, (base,), namespace)
    _POPEN_CLASSES[base] = sub
    return sub


class _ChildExit:
    """The reaper's callbacks for a Process child: collect its exit, then read its code.

    The popen is held weakly: a Process dropped while its child runs frees
    its popen (and the popen's two pipe descriptors) at once.
    """

    __slots__ = ("_element", "_pid", "_ref")

    def __init__(self, popen: Any, element: Optional[str]) -> None:
        self._ref = weakref.ref(popen)
        self._pid: int = popen.pid
        self._element = element

    def reaped(self) -> bool:
        target = self._ref()
        if target is not None and target.poll() is None:
            return False
        if self._element is not None:
            _tree.forget(self._pid, self._element)
        return True

    def exitcode(self) -> Optional[int]:
        target = self._ref()
        return None if target is None else target.returncode


def _rebuild_process(blob: bytes) -> Process:
    cls, state = cloudpickle.loads(blob)
    obj: Process = cls.__new__(cls)
    obj.__dict__.update(state)
    obj.__dict__.update(_mproc_lock=threading.RLock(), _mproc_watch=None, _popen=None)
    return obj


def _method_name(start_method: Union[str, BaseContext, None]) -> Optional[str]:
    if start_method is None:
        return None
    if isinstance(start_method, BaseContext):
        return start_method.get_start_method()
    if isinstance(start_method, str):
        allowed = multiprocessing.get_all_start_methods()
        if start_method not in allowed:
            raise ValueError(f"unknown start_method {start_method!r}; use one of {allowed}")
        return start_method
    raise TypeError(
        f"start_method must be a name or a multiprocessing context, got {start_method!r}"
    )


class Process(_Stoppable, multiprocessing.Process):
    """A :class:`multiprocessing.Process` that also runs lambdas, closures and local classes.

    Same constructor as :class:`multiprocessing.Process`, plus
    ``start_method``. ``target``, ``args``, ``kwargs`` and the subclass
    itself are carried to the child with cloudpickle under every start
    method; the child sees ``mproc.is_child()`` and ``mproc.ppid()`` names
    the launcher. The child is reaped as soon as it exits.

    Args:
        group: must be ``None`` (as in multiprocessing).
        target: the callable run by :meth:`run`.
        name: the process name.
        args: positional arguments for ``target``.
        kwargs: keyword arguments for ``target``.
        daemon: whether the child is daemonic.
        start_method: ``"fork"``, ``"spawn"``, ``"forkserver"``, or a
            multiprocessing context; ``None`` uses multiprocessing's default.

    Raises:
        ValueError: unknown start method.
    """

    def __init__(
        self,
        group: None = None,
        target: Optional[Callable[..., object]] = None,
        name: Optional[str] = None,
        args: Sequence[Any] = (),
        kwargs: Optional[Mapping[str, Any]] = None,
        *,
        daemon: Optional[bool] = None,
        start_method: Union[str, BaseContext, None] = None,
    ) -> None:
        super().__init__(group, target, name, args, {} if kwargs is None else kwargs, daemon=daemon)
        self._mproc_method = _method_name(start_method)
        self._mproc_started = ""  # the start method start() used
        self._mproc_launcher = 0
        self._mproc_runtime_dir = ""
        # Set by a ProcessManager before start(): True/False, or None (standalone).
        self._mproc_contain: Optional[bool] = None
        self._mproc_plan: Optional[_launch.Plan] = None
        self._mproc_parent = 0  # who must be the child's parent when its death signal is armed
        self._mproc_launcher_ticks = -1
        self._mproc_lock = threading.RLock()
        self._mproc_watch: Optional[_wait.Watch] = None

    def __reduce__(self) -> tuple[Callable[[bytes], Process], tuple[bytes]]:
        # Pickling happens inside the spawn/forkserver launch, where
        # multiprocessing lets the AuthenticationString in _config through.
        state = {k: v for k, v in self.__dict__.items() if k not in _LOCAL_ATTRS}
        return (_rebuild_process, (_dumps((type(self), state)),))

    def _Popen(self, process_obj: Any) -> Any:  # type: ignore[override]  # a staticmethod upstream
        if self._mproc_started == "fork" and _popen_fork is not None:
            return _locked_class(_popen_fork.Popen)(process_obj)  # see _locked_class
        context: Any = multiprocessing.get_context(self._mproc_method)
        popen = context.Process._Popen(process_obj)
        popen._mproc_lock = self._mproc_lock
        popen.__class__ = _locked_class(type(popen))
        return popen

    def _bootstrap(self, *args: Any, **kwargs: Any) -> int:
        # Runs first thing in the child under every start method (private,
        # but stable from 3.9 to 3.13): the one place to set MPROC_PPID for
        # spawn and forkserver children, whose environment is not ours (a
        # forkserver's is that of the moment it started). The runtime
        # directory too: the child must find its launcher's mailbox.
        if self._mproc_launcher:
            os.environ[ENV_PPID] = str(self._mproc_launcher)
            if self._mproc_runtime_dir:
                os.environ[_runtime.ENV_RUNTIME_DIR] = self._mproc_runtime_dir
            else:
                # A fork child: it inherited the environment and the working
                # directory its launcher had at start() (see start()).
                _runtime.pin_runtime_dir()
        p = self._mproc_plan
        if p is not None:
            # The chain goes into os.environ, so every program this child
            # runs carries it in /proc/<pid>/environ (see mproc._launch).
            os.environ[_launch.ENV_CONTAIN] = p.chain
            _launch.mark_memory(p.chain)
            if self._mproc_parent:
                _launch.child_setup(p, self._mproc_parent)
            else:  # a forkserver child: its parent is not its launcher
                _launch.child_setup(_launch.Plan(p.element, p.chain, p.new_group, False), 0)
                if p.death_signal:
                    _launch.die_with(self._mproc_launcher, self._mproc_launcher_ticks)
        try:
            code: int = super()._bootstrap(*args, **kwargs)  # type: ignore[misc]
        finally:
            # The child leaves through os._exit(), which skips atexit: close
            # its mailbox (if run() opened one) so no socket file is left.
            _mailbox.close_mailbox()
        return code

    def start(self) -> None:
        """Start the child process (returns nothing, as in multiprocessing).

        Raises:
            AssertionError: started twice, as :meth:`multiprocessing.Process.start`.
        """
        method = self._mproc_started = self._mproc_method or multiprocessing.get_start_method()
        self._mproc_launcher = os.getpid()
        # A fork child computes it itself (see _bootstrap): less work here,
        # between two forks, where every page written is a page copied.
        self._mproc_runtime_dir = "" if method == "fork" else _runtime.runtime_dir()
        p = self._mproc_plan = _launch.plan(self._mproc_contain)
        _launch.open_mailbox()
        if p is not None and p.death_signal:
            self._mproc_parent = self._expected_parent(method)
            if not self._mproc_parent:  # a forkserver child watches us by pidfd and start time
                self._mproc_launcher_ticks = _launch.start_ticks(os.getpid())
            # Forked by the long-lived launcher thread: PR_SET_PDEATHSIG
            # fires when the forking *thread* exits (see mproc._launch).
            _launch.on_launcher_thread(super().start)
        else:
            super().start()
        popen = self.__dict__["_popen"]
        if p is not None:
            _contained_start(popen.pid, p)
        child = _ChildExit(popen, None if p is None else p.element)
        self._mproc_watch = _watch_child(popen.pid, child.reaped, child.exitcode)

    def _monitor_watch(self) -> Optional[_wait.Watch]:
        return self._mproc_watch

    def _expected_parent(self, method: str) -> int:
        """Return the PID that forks our child (us), or 0 for a forkserver child.

        A forkserver child's parent is the forkserver, and its death signal
        would be tied to it; it watches its launcher instead (see
        :func:`mproc._launch.die_with`).
        """
        return 0 if method == "forkserver" else os.getpid()

    def _pin(self) -> tuple[bool, Optional[int]]:
        """Return (alive, a new pidfd) for a tree kill; under the lock the reaper reaps under."""
        popen = self.__dict__.get("_popen")
        if popen is None:
            return False, None
        with self._mproc_lock:
            if popen.poll() is not None:
                return False, None
            try:
                return True, _wait.pidfd_open(popen.pid)
            except NoSuchProcess:
                return False, None

    def _release(self) -> None:
        # The exit is collected: close the two pipe fds multiprocessing keeps
        # for the sentinel until the Process is garbage or close()d.
        popen = self.__dict__.get("_popen")
        if popen is not None and popen.returncode is not None:
            popen.close()

    def _started(self) -> tuple[Any, _wait.Watch]:
        if self.__dict__.get("_closed"):
            raise ValueError("process object is closed")
        popen, w = self.__dict__.get("_popen"), self._mproc_watch
        if popen is None or w is None:
            raise ValueError(f"{self.name} has not been started; call start() first")
        return popen, w

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until the child exits, without polling (a pidfd or the reaper's poll).

        Args:
            timeout: seconds at most; ``None`` waits forever.
        """
        w = self._mproc_watch
        if w is not None and self.__dict__.get("_parent_pid") == os.getpid():
            if not w.wait(timeout):
                return
            timeout = 0  # the status is collected: super() only does the bookkeeping
        super().join(timeout)
        if self.__dict__.get("_parent_pid") == os.getpid():
            self._release()

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait for the child to exit and return its exit code.

        Args:
            timeout: seconds at most; ``None`` waits forever.

        Returns:
            The exit code (negative: killed by that signal), ``None`` on timeout.

        Raises:
            TypeError, ValueError: ``timeout`` is malformed.
            ValueError: the process has not been started.
        """
        timeout = _check.timeout(timeout, "Process.wait")
        self._started()
        self.join(timeout)
        return self.exitcode

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child (through its pidfd when there is one).

        Args:
            sig: the signal number.

        Raises:
            NoSuchProcess: the child has exited.
            ValueError: the process has not been started.
        """
        popen, w = self._started()
        _signal_child(repr(self.name), popen.pid, sig, w, self._mproc_lock, popen.poll)


# --- adopted -----------------------------------------------------------------


class AdoptedProcess(_Stoppable):
    """A handle on a process this program did not start (``ProcessManager.add_process``).

    Its identity is ``(pid, create_time)``: it never signals another process
    that later reuses the PID. On Linux a pidfd pins it for the handle's
    whole life (the reaper never gives it up for lack of descriptors; if no
    descriptor is free at all, adopting fails instead). Where the system has
    no pidfds (macOS, Linux < 5.3) the creation time is checked right
    before ``os.kill``: a PID reused between that check and the kill, within
    one tick of the creation-time clock, could still be hit (psutil has the
    same window). Its exit status is not ours: :meth:`wait` returns ``None``
    and :attr:`exitcode` is always ``None``; it is never reaped by mproc,
    even if it is our child.

    Args:
        pid: the process to adopt.

    Raises:
        NoSuchProcess: ``pid`` does not exist.
        PermissionError: the process's creation time cannot be read.
        MprocError: no file descriptor is free for its pidfd (the message
            says how to raise the limit).
        TypeError: ``pid`` is not an int.
        ValueError: ``pid`` is not positive, is this process or one of its
            ancestors (PID 1 too: a later ``kill_all()`` would kill the
            caller), or is a kernel thread.
    """

    def __init__(self, pid: int) -> None:
        self._pid = _check.pid(pid, "add_process")
        who = _tree.kinship(pid)
        if who is not None:
            raise ValueError(
                f"add_process(): PID {pid} is {who}; adopting it would let kill_all() "
                "or terminate_all() kill the caller"
            )
        if _tree.is_kernel_thread(pid):
            raise ValueError(
                f"add_process(): PID {pid} is a kernel thread; it cannot be signalled or stopped"
            )
        try:
            # First: from now on this process cannot be mistaken.
            fd = _wait.pidfd_open(pid, keep=True)
        except NoSuchProcess:
            raise
        except OSError as err:
            raise MprocError(
                f"cannot adopt PID {pid}: no file descriptor is free for its pidfd "
                f"({err.strerror}); close some or raise RLIMIT_NOFILE (ulimit -n)",
                pid=pid,
            ) from err
        self._pinned = fd is not None
        try:
            self._create_time = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess as err:
            if fd is not None:
                os.close(fd)
            raise NoSuchProcess(pid=pid) from err
        except psutil.AccessDenied as err:
            if fd is not None:
                os.close(fd)
            raise PermissionError(f"cannot read the creation time of PID {pid}") from err
        except OSError as err:  # e.g. EMFILE: no fd left to read /proc with
            if fd is not None:
                os.close(fd)
            raise MprocError(
                f"cannot adopt PID {pid}: no file descriptor is free to read its identity "
                f"({err.strerror}); close some or raise RLIMIT_NOFILE (ulimit -n)",
                pid=pid,
            ) from err
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        # The reaper asks a pidfd-watched process only once its pidfd fired,
        # and a pidfd pins its process: it has exited, no /proc read needed.
        self._watch = _wait.watch(pid, _exited if fd is not None else self._gone, fd)

    def _pin(self) -> tuple[bool, Optional[int]]:
        """Return (alive, a new pidfd) for a tree kill."""
        if not self.is_alive():
            return False, None
        fd = self._watch.dup_pidfd()
        if fd is None and self._pinned:
            return False, None  # its pidfd was closed: it exited
        return True, fd

    def __repr__(self) -> str:
        return f"<AdoptedProcess pid={self._pid} {'running' if self.is_alive() else 'gone'}>"

    @property
    def pid(self) -> int:
        """The adopted PID."""
        return self._pid

    @property
    def create_time(self) -> float:
        """The creation time (epoch seconds, as psutil reports it) that identifies the process."""
        return self._create_time

    @property
    def exitcode(self) -> Optional[int]:
        """Always ``None``: the exit status of a process we did not start is not ours to read."""
        return None

    def _alive_now(self) -> bool:
        try:
            proc = psutil.Process(self._pid)
            if proc.create_time() != self._create_time:
                return False  # the PID names another process now
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:  # ZombieProcess is a subclass: gone too
            return False
        except psutil.AccessDenied:
            return True  # exists, but we may not look: only NoSuchProcess means gone

    def _gone(self) -> bool:
        return not self._alive_now()

    def is_alive(self) -> bool:
        """Return whether the adopted process is still running (not gone, zombie or replaced)."""
        return not self._watch.exited.is_set() and self._alive_now()

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait until the process is gone (an event, no polling on Linux).

        Args:
            timeout: seconds at most; ``None`` waits forever.

        Returns:
            ``None`` always: on timeout, and because the status is not ours.
        """
        self._watch.wait(_check.timeout(timeout, "AdoptedProcess.wait"))
        return None

    def signal(self, sig: int) -> None:
        """Send ``sig``, but only to the very process that was adopted.

        Args:
            sig: the signal number.

        Raises:
            NoSuchProcess: the process is gone, or its PID now names another process.
        """
        if self._watch.exited.is_set() or not self._alive_now():
            raise NoSuchProcess(
                f"adopted process PID {self._pid} has exited (the PID may be another's now)",
                pid=self._pid,
            )
        if self._watch.send_signal(sig):
            return
        if self._pinned:
            # The pidfd was closed because the exit was seen: the PID may be
            # another process's already, so os.kill is out of the question.
            raise NoSuchProcess(
                f"adopted process PID {self._pid} has exited (the PID may be another's now)",
                pid=self._pid,
            )
        try:
            os.kill(self._pid, sig)
        except ProcessLookupError as err:
            raise NoSuchProcess(pid=self._pid) from err
