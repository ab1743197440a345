"""Everything about starting a child: environment, mailbox, process group, death signal.

:class:`~mproc.Process`, :class:`~mproc.Command` and the shell helpers all
start their children through this module, so that every child gets the
same things:

* ``MPROC_PPID`` (this process) and ``MPROC_RUNTIME_DIR`` (where our
  mailbox is) in its environment, and our mailbox opened first, so the child
  can always reach its launcher;
* when it is *contained* (started by a ``ProcessManager`` with
  ``contain=True``, by a shell helper with a timeout, or by any mproc launch
  inside a contained process): a containment marker, a death signal and,
  for a manager's child, its own process group.

The containment marker is ``MPROC_CONTAIN``, a space-separated chain of
elements ``<token>.<serial>``: one element per contained launch on the way
down, so a descendant carries the elements of every contained ancestor. An
environment variable is inherited through ``fork`` *and* ``exec`` and is
readable in ``/proc/<pid>/environ`` (only as it was at ``exec``): a process
that left its parent's process group (``setsid``, ``setsid -f``, ``nohup …
&``, a double fork that then runs a program) still says whose it is. This
is the technique of Jenkins' ProcessTreeKiller.

The death signal is ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, set in the child
and followed by the check that its parent is still the expected one (the
parent may have died before the call). Linux sends it when the *thread*
that forked the child exits, not the process: so every contained child is
forked by one long-lived launcher thread, never by the caller's thread,
which may be a short-lived worker of a pool (see :func:`on_launcher_thread`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, TypeVar, Union

from . import _mailbox, _runtime
from ._identity import ENV_PPID

__all__ = [
    "ENV_CONTAIN",
    "MEMFD_PREFIX",
    "Env",
    "Plan",
    "child_env",
    "child_setup",
    "die_with",
    "mark_memory",
    "on_launcher_thread",
    "plan",
    "plan_shell",
    "popen",
    "preexec",
    "shell_path",
]

#: The environment variable carrying the containment chain.
ENV_CONTAIN = "MPROC_CONTAIN"

#: What ``env=`` accepts: a mapping, or gproc's list of ``"KEY=VALUE"`` strings.
Env = Union[Mapping[str, str], Iterable[str], None]

_BASH = "/bin/bash"
_SH = "/bin/sh"

# linux/prctl.h
_PR_SET_PDEATHSIG = 1

#: The name prefix of the memfd mappings that carry the chain in a Python
#: child's memory (see :func:`mark_memory`); ``/proc/<pid>/maps`` shows
#: ``/memfd:<prefix><element> (deleted)``.
MEMFD_PREFIX = "mproc-contain:"
# sys/mman.h
_PROT_READ = 0x1
_MAP_SHARED = 0x01

_T = TypeVar("_T")


def shell_path() -> str:
    """Return the shell that runs command lines: ``/bin/bash``, else ``/bin/sh``."""
    return _BASH if os.access(_BASH, os.X_OK) else _SH


# --- environment ---------------------------------------------------------------


def child_env(env: Env, *, marker: Optional[str] = None) -> dict[str, str]:
    """Return the environment of a child: ``os.environ``, our variables, then ``env``.

    Args:
        env: variables added to (not replacing) ``os.environ``: a mapping or
            a list of ``"KEY=VALUE"`` strings.
        marker: the containment chain to set, if the child is contained.

    Raises:
        TypeError: ``env`` has the wrong shape.
        ValueError: an ``env`` entry is malformed (the message names it).
    """
    result = dict(os.environ)
    # Ours first, so a caller who means to override MPROC_PPID can.
    result[ENV_PPID] = str(os.getpid())
    result[_runtime.ENV_RUNTIME_DIR] = _runtime.runtime_dir()
    if marker is not None:
        result[ENV_CONTAIN] = marker
    if env is None:
        return result
    if isinstance(env, Mapping):
        items: Iterable[tuple[object, object]] = env.items()
    elif isinstance(env, (str, bytes)) or not isinstance(env, Iterable):
        raise TypeError(
            f"env must be a mapping or a list of 'KEY=VALUE' strings, not {type(env).__name__}"
        )
    else:
        items = (_split_entry(entry) for entry in env)
    for key, value in items:
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"env entry {key!r}: {value!r} must map a str to a str")
        if not key or "=" in key or "\0" in key + value:
            raise ValueError(
                f"env entry {key!r}: {value!r}: the name must be non-empty without "
                "'=' and neither may contain NUL"
            )
        result[key] = value
    return result


def check_env(env: Env) -> None:
    """Validate ``env`` now rather than at start (same errors as :func:`child_env`)."""
    child_env(env)


def _split_entry(entry: object) -> tuple[str, str]:
    if not isinstance(entry, str):
        raise TypeError(f"env entry {entry!r} is not a 'KEY=VALUE' string")
    key, sep, value = entry.partition("=")
    if not sep or not key:
        raise ValueError(f"env entry {entry!r} is not of the form 'KEY=VALUE'")
    return key, value


# --- containment plan ------------------------------------------------------------


class _Token:
    """This process's containment token; a fresh one after fork (a new process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = -1
        self.value = ""
        self.serial = 0

    def element(self) -> str:
        with self.lock:
            if self.pid != os.getpid():
                self.pid, self.value, self.serial = os.getpid(), secrets.token_hex(6), 0
            self.serial += 1
            return f"{self.value}.{self.serial}"


_token = _Token()


@dataclass(frozen=True)
class Plan:
    """How one child is contained.

    Attributes:
        element: this child's own marker element (``None``: it only inherits
            the chain of a contained launcher).
        chain: the full ``MPROC_CONTAIN`` value the child gets.
        new_group: whether the child leads a process group of its own.
        death_signal: whether the child dies with this process (``PR_SET_PDEATHSIG``).
    """

    element: Optional[str]
    chain: str
    new_group: bool
    death_signal: bool


_ENVIRON_TYPE = type(os.environ)
_CONTAIN_KEY: Any = os.environ.encodekey(ENV_CONTAIN)


def _inherited_chain() -> str:
    """Return ``os.environ.get(ENV_CONTAIN, "")``, cheaply.

    Asked on every start, where it is usually missing: ``os.environ.get``
    then raises and catches a KeyError inside, which touches (and, in a
    process with many forked children, copies) a few dozen pages. The
    mapping under ``os.environ`` answers directly.
    """
    env = os.environ
    if type(env) is not _ENVIRON_TYPE:  # replaced by the program: ask it
        return env.get(ENV_CONTAIN, "")
    raw = getattr(env, "_data").get(_CONTAIN_KEY)  # noqa: B009 - not in typeshed
    return "" if raw is None else env.decodevalue(raw)


def plan(contain: Optional[bool]) -> Optional[Plan]:
    """Decide how a child is contained.

    Args:
        contain: ``True`` for a manager's child (own marker element, process
            group and death signal); ``False`` to opt out; ``None`` for a
            standalone launch, which is contained (death signal, inherited
            chain) only when this process is itself contained.

    Returns:
        The plan, or ``None`` for an uncontained child.
    """
    inherited = _inherited_chain()
    if contain is None:
        if not inherited or not _can_prctl():
            return None
        return Plan(None, inherited, new_group=False, death_signal=True)
    if not contain:
        return None
    element = _token.element()
    chain = f"{inherited} {element}" if inherited else element
    return Plan(element, chain, new_group=True, death_signal=_can_prctl())


def plan_shell(*, marked: bool) -> Optional[Plan]:
    """Decide how a shell helper's command is contained.

    Args:
        marked: the command has a timeout: it gets a marker element of its
            own, so that a timeout finds what left its session. (Its new
            session comes from ``start_new_session``.)

    Returns:
        The plan, or ``None`` for an uncontained command.
    """
    inherited = plan(None)
    if not marked:
        return inherited
    element = _token.element()
    chain = f"{inherited.chain} {element}" if inherited is not None else element
    return Plan(element, chain, new_group=False, death_signal=inherited is not None)


# --- in the child ----------------------------------------------------------------


class _Prctl:
    """``prctl(2)`` and ``mmap(2)`` through ctypes, loaded once (never in a fresh fork child)."""

    def __init__(self) -> None:
        self.func: Optional[Callable[..., int]] = None
        self.mmap: Optional[Callable[..., Optional[int]]] = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                func = libc.prctl
                func.restype = ctypes.c_int
                func.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
                self.func = func
                mmap = libc.mmap
                mmap.restype = ctypes.c_void_p
                mmap.argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_size_t,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_int,
                    ctypes.c_long,
                ]
                self.mmap = mmap
            except (OSError, AttributeError):
                self.func = self.mmap = None


_prctl = _Prctl()


def _can_prctl() -> bool:
    return _prctl.func is not None


def child_setup(p: Plan, parent: int) -> None:
    """In the child, before it runs anything of its own: apply ``p``.

    Runs between fork and exec for a Command (``preexec_fn``) and first thing
    in a Process child. Exits the child at once if ``parent`` died before
    the death signal was armed (the kernel would never send it then).

    Args:
        p: the plan.
        parent: the PID that must still be our parent once the signal is armed.
    """
    if p.new_group:
        try:
            os.setpgid(0, 0)
        except OSError:
            pass  # already a session leader (cannot happen for a fresh child): keep going
    if p.death_signal and _prctl.func is not None:
        _prctl.func(_PR_SET_PDEATHSIG, signal.SIGKILL, 0)
        if os.getppid() != parent:
            os._exit(1)  # our launcher is gone already: it wanted us dead with it


def mark_memory(chain: str) -> None:
    """In a Process child: carry the containment chain in this process's memory too.

    A Python child runs no ``exec``, so its ``/proc/<pid>/environ`` is its
    launcher's (setting ``os.environ`` reaches only the programs it runs).
    A pure-Python daemon it starts (``fork(); setsid(); fork()``, no exec)
    would carry no marker at all. Memory mappings are inherited through
    ``fork`` (and dropped at ``exec``, where the environment takes over):
    one read-only mapping of an empty memfd per chain element, named after
    it, shows in ``/proc/<pid>/maps`` of every such descendant. No
    descriptor is kept; best effort (no memfd or libc: the environment only).

    Args:
        chain: the ``MPROC_CONTAIN`` value of this child.
    """
    mmap = _prctl.mmap
    create = getattr(os, "memfd_create", None)
    if mmap is None or create is None:
        return
    try:
        with open("/proc/self/maps", "rb") as f:
            mapped = f.read()
    except OSError:
        mapped = b""
    size = os.sysconf("SC_PAGE_SIZE")
    for element in chain.split():
        name = MEMFD_PREFIX + element
        if f"/memfd:{name} ".encode() in mapped:
            continue  # inherited through fork from a contained parent
        try:
            fd = create(name, getattr(os, "MFD_CLOEXEC", 1))
        except OSError:
            return
        try:
            os.ftruncate(fd, size)  # mapping past the end would fault; no page is ever touched
            mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        except OSError:
            return
        finally:
            os.close(fd)


def start_ticks(pid: int) -> int:
    """Return the start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat``), or -1."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rfind(b")") + 2 :].split()[19])
    except (OSError, IndexError, ValueError):
        return -1


def die_with(pid: int, ticks: int) -> None:
    """In a child whose parent is not its launcher: die (SIGKILL) when ``pid`` exits.

    A forkserver child's parent is the forkserver, which outlives a killed
    launcher for as long as its children hold the launcher's "alive" pipe:
    a death signal tied to it would never fire. So the child watches the
    launcher itself, through a pidfd, from a daemon thread. Exits at once if
    the launcher is gone already (or its PID names another process).

    Args:
        pid: the launcher.
        ticks: its start time (:func:`start_ticks`), proving that ``pid`` is still it.
    """
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return  # no pidfd (old kernel): documented, the tree kill still applies
    try:
        fd = opener(pid)
    except ProcessLookupError:
        os._exit(1)
    except OSError:
        return
    if start_ticks(pid) != ticks:
        os._exit(1)

    def watch() -> None:
        import select

        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll():
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="mproc-die-with-launcher", daemon=True).start()


# --- the launcher thread -----------------------------------------------------------


class _Launcher:
    """A long-lived thread that forks contained children (the PR_SET_PDEATHSIG trap).

    The kernel delivers the death signal when the thread that forked the
    child exits. The caller may be a pool worker or a supervisor's restart
    thread that exits a moment later; this thread lives as long as the
    process, so the signal means what we want: this process died.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._jobs: list[Job[Any]] = []
        self._thread: Optional[threading.Thread] = None
        self._owner = -1

    def run(self, fn: Callable[[], _T]) -> _T:
        job: Job[_T] = Job(fn)
        with self._cond:
            if self._owner != os.getpid() or self._thread is None:
                # First use, or a forked child: the thread did not survive fork.
                self._owner = os.getpid()
                self._jobs = []
                self._thread = threading.Thread(
                    target=self._loop, name="mproc-launcher", daemon=True
                )
                self._thread.start()
            if threading.current_thread() is self._thread:
                job.run()
                return job.result()
            self._jobs.append(job)
            self._cond.notify()
        try:
            job.done.wait()
        except BaseException:
            # Interrupted (Ctrl-C): let the launch finish, so that the child
            # it may have started is known to its handle and can be stopped.
            job.done.wait()
            raise
        return job.result()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                job = self._jobs.pop(0)
            job.run()


class Job(Generic[_T]):
    """A callable run on another thread (the launcher's, a supervisor's), with its outcome."""

    def __init__(self, fn: Callable[[], _T]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.value: Optional[_T] = None
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as err:
            self.error = err
        finally:
            self.done.set()

    def result(self) -> _T:
        """Wait for the run; return its value or raise its exception."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]  # set when error is None


_launcher = _Launcher()


def on_launcher_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` (which forks a child) on the long-lived launcher thread; return its result.

    Args:
        fn: the callable; its exception is re-raised here.
    """
    result: _T = _launcher.run(fn)
    return result


# --- starting a program ----------------------------------------------------------------


def open_mailbox() -> None:
    """Open our mailbox before a child starts, so that it can always reach us."""
    _mailbox.open_for_children()


def preexec(p: Optional[Plan]) -> Optional[Callable[[], None]]:
    """Return the ``preexec_fn`` that applies ``p`` in a Popen child, or ``None`` if none is needed.

    ``None`` lets subprocess use its fast ``vfork``/``posix_spawn`` path.
    """
    if p is None or not (p.new_group or p.death_signal):
        return None
    me = os.getpid()

    def setup() -> None:
        child_setup(p, me)

    return setup


def popen(argv: list[str], *, contain: Optional[Plan], **kw: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` with :class:`subprocess.Popen`, contained as ``contain`` says.

    ``kw`` goes to Popen (``env`` must come from :func:`child_env`). The
    mailbox is opened first. A contained child is forked by the launcher
    thread (see :func:`on_launcher_thread`).

    Args:
        argv: the program and its arguments.
        contain: the plan, or ``None`` for an uncontained child.
        kw: arguments for :class:`subprocess.Popen`.

    Returns:
        The started Popen.
    """
    open_mailbox()
    setup = preexec(contain)
    if setup is None:
        return subprocess.Popen(argv, **kw)

    def start() -> subprocess.Popen[bytes]:
        # preexec_fn runs only async-signal-safe-enough calls (setpgid,
        # prctl, getppid, _exit) through a ctypes function loaded earlier.
        return subprocess.Popen(argv, preexec_fn=setup, **kw)

    if contain is not None and contain.death_signal:
        return on_launcher_thread(start)
    return start()
