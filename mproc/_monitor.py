"""Monitors (SPEC §9): a ``Down`` in this process's mailbox when a watched process exits.

Every watched process is *one target*: one pidfd in the epoll of the one
reaper thread (:mod:`mproc._wait`), shared by all the monitors and
:func:`on_exit` registrations of that process, so a thousand monitors cost
no thread and one descriptor per distinct process. Where pidfds are missing
the reaper polls instead, comparing the process's start time (a zombie
counts as gone).

Identity is fixed when the target is made: the pidfd pins the very process
(the start time read from ``/proc`` beside it is confirmed by a
``pidfd_send_signal(fd, 0)`` afterwards: had the process been reaped in
between, the read might have been of a successor), so a process that later
reuses the PID never fires or suppresses anything.

Exit codes and reasons, read in the reaper thread while the pidfd is open:

* a child of ours not reaped yet: ``waitid(P_PIDFD, WNOWAIT)`` — the status
  without reaping, so subprocess/multiprocessing still get it;
* a child an mproc handle collects: the code as the handle saw it (the Down
  waits up to :data:`_HANDLE_GRACE` for the handle's watch to finish);
* otherwise the wait status from ``ioctl(PIDFD_GET_INFO, PIDFD_INFO_EXIT)``
  (Linux 6.15+, available once the parent has reaped it), else the
  ``exit_code`` field of ``/proc/PID/stat`` while it is a zombie with the
  recorded start time. Only our own children get ``exitcode``; for the others
  the status only decides ``reason`` (``"signal"`` or ``"exit"``), and
  ``reason`` is ``"exit"`` when nothing could be read.

Process-global state (``_state``), replaced by a fresh one in a forked child:
a forked child inherits no monitors (the reaper closes the inherited pidfds).
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import pickle
import signal as _signal
import struct
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from . import _check, _mailbox, _runtime, _wait
from ._errors import MailboxClosed, NoSuchProcess
from ._log import logger

if TYPE_CHECKING:
    from ._reader import Entry
    from ._receiver import Receiver

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Down", "Monitor", "demonitor", "monitor", "monitor_handle", "on_exit"]

#: At most this many shared watches are kept with nobody registered on them.
_IDLE_MAX = 256
#: How long a Down waits for an mproc handle to collect its child's exit code.
_HANDLE_GRACE = 1.0
#: Delivered Downs remembered for demonitor() before the received ones are pruned.
_DELIVERED_MIN = 1024

# linux/pidfd.h: PIDFD_GET_INFO = _IOWR(0xFF, 11, struct pidfd_info), 64 bytes:
# __u64 mask at 0, ..., __s32 exit_code at 60 (a wait status, like waitpid's).
_PIDFD_GET_INFO = 0xC040FF0B
_PIDFD_INFO_EXIT = 1 << 3
_INFO = struct.Struct("=Q52xi")
_info_supported = sys.platform.startswith("linux")
_HAVE_PROC = sys.platform.startswith("linux")
_PID_LIMIT = 0x7FFFFFFF  # pid_t is a C int

REASONS = ("exit", "signal", "noproc")


def _signame(sig: int) -> str:
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


@dataclass(frozen=True, order=True)
class Monitor:
    """A reference to one monitor, as :func:`monitor` returns it; hashable and ordered.

    Attributes:
        id: unique among the monitors of this process.
        pid: the monitored process.
    """

    id: int
    pid: int


@dataclass(frozen=True)
class Down:
    """What a monitor delivers when its process exits (``msg.data`` of the message).

    Attributes:
        ref: the :class:`Monitor` that fired.
        pid: the process that exited (also the message's ``sender_pid``).
        exitcode: its exit code, negative for a signal (as :mod:`subprocess`);
            only for our own children, else ``None``.
        reason: ``"exit"``, ``"signal"`` (killed by a signal) or ``"noproc"``
            (no such process when :func:`monitor` was called).
        signal: the signal number when ``reason == "signal"``, also for a
            process that is not our child (not part of equality).
    """

    ref: Monitor
    pid: int
    exitcode: Optional[int]
    reason: str
    signal: Optional[int] = field(default=None, compare=False)

    def __str__(self) -> str:
        if self.reason == "noproc":
            return f"PID {self.pid} did not exist when monitored (noproc)"
        if self.reason == "signal":
            sig = self.signal
            if sig is None and self.exitcode is not None and self.exitcode < 0:
                sig = -self.exitcode
            return f"PID {self.pid} was killed by " + (
                _signame(sig) if sig is not None else "a signal"
            )
        if self.exitcode is None:
            return f"PID {self.pid} exited"
        return f"PID {self.pid} exited with code {self.exitcode}"


# ---------------------------------------------------------------- state


class _Mon:
    """One active monitor: where its Down goes."""

    __slots__ = ("adopted", "group", "receiver", "ref", "target")

    def __init__(self, ref: Monitor, group: str, receiver: Receiver, adopted: bool = False) -> None:
        self.ref = ref
        self.group = group
        self.receiver = receiver
        # From an AdoptedProcess: no exit code, as the handle (even when the
        # process was re-parented to us, say as a subreaper).
        self.adopted = adopted
        self.target: Optional[_Target] = None


class _Status(NamedTuple):
    exitcode: Optional[int]
    reason: str
    signal: Optional[int]


class _State:
    def __init__(self) -> None:
        # Guards the registry: by_pid, idle and every target's registrations.
        self.lock = threading.Lock()
        # Held (first) while a callback runs or a Down is queued, and by
        # cancel()/demonitor(): once they return, nothing of theirs is delivered.
        self.deliver = threading.RLock()
        self.by_pid: dict[int, _Target] = {}  # the live shared target of each PID
        self.idle: OrderedDict[_Target, None] = OrderedDict()  # oldest first
        self.monitors: dict[Monitor, _Mon] = {}  # active ones
        # Downs queued and maybe not received yet (under ``deliver``).
        self.delivered: dict[Monitor, tuple[Receiver, str, Entry]] = {}
        self.prune_at = _DELIVERED_MIN


_state = _State()
_ids = itertools.count(1)
_tokens = itertools.count(1)


class _Target:
    """One watched process, shared by its monitors and on_exit() registrations."""

    __slots__ = (
        "child",
        "dropped",
        "exited",
        "give_up",
        "handle",
        "identity",
        "monitors",
        "pid",
        "shared",
        "waiters",
        "watch",
    )

    def __init__(
        self, pid: int, identity: Optional[str], child: bool, handle: Optional[_wait.Watch]
    ) -> None:
        self.pid = pid
        self.identity = identity
        self.child = child  # an unreaped child of ours when the target was made
        self.handle = handle  # the watch of the mproc handle that collects it, if any
        self.watch: Optional[_wait.Watch] = None
        self.waiters: dict[int, Callable[[], None]] = {}
        self.monitors: dict[Monitor, _Mon] = {}
        self.shared = False  # on_exit() used it: kept while idle
        self.exited = False
        self.dropped = False
        self.give_up = 0.0

    def __repr__(self) -> str:
        return (
            f"<_Target pid={self.pid} identity={self.identity} waiters={len(self.waiters)} "
            f"monitors={len(self.monitors)}{' exited' if self.exited else ''}>"
        )

    # -- in the reaper thread

    def poll(self, fd: Optional[int]) -> bool:
        st = _state
        if fd is None and not self._gone_now():
            return False
        if not self.exited:
            with st.lock:
                self.exited = True
                if st.by_pid.get(self.pid) is self:
                    del st.by_pid[self.pid]
                st.idle.pop(self, None)
            self.give_up = time.monotonic() + _HANDLE_GRACE
            _run_waiters(st, self)
        if not self.monitors:
            return True
        status = self._status(fd)
        if status is None:
            return False  # the reaper asks again shortly (bounded by give_up)
        _deliver_all(st, self, status)
        return True

    def _gone_now(self) -> bool:
        w = self.handle
        if w is not None and w.exited.is_set():
            return True
        return self.identity is None or _runtime.proc_identity(self.pid) != self.identity

    def _status(self, fd: Optional[int]) -> Optional[_Status]:
        if self.child and fd is not None:
            got = _waitid_nowait(fd)
            if got is not None:
                return got
        w = self.handle
        if w is not None:
            if w.exited.is_set():
                if w.code is not None:
                    return _from_code(w.code)
            elif time.monotonic() < self.give_up:
                return None  # the handle collects it in a moment: report its code
        status = _exit_info(fd)
        if status is None and self.identity is not None:
            status = _zombie_status(self.pid, self.identity)
        if status is None:
            status = _exit_info(fd)  # reaped between the two reads
        if status is None:
            return _Status(None, "exit", None)
        code = _from_status(status)
        if self.child or w is not None:
            return code
        return _Status(None, code.reason, code.signal)


# ---------------------------------------------------------------- reading the exit


def _from_code(code: int) -> _Status:
    if code < 0:
        return _Status(code, "signal", -code)
    return _Status(code, "exit", None)


def _from_status(status: int) -> _Status:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return _Status(-sig, "signal", sig)
    if os.WIFEXITED(status):
        return _Status(os.WEXITSTATUS(status), "exit", None)
    return _Status(None, "exit", None)


def _waitid_nowait(fd: int) -> Optional[_Status]:
    """The status of an exited, unreaped child of ours, leaving it unreaped."""
    try:
        got = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except OSError:  # ECHILD: reaped already (by its handle, subprocess...), or not ours
        return None
    if got is None:
        return None
    if got.si_code == os.CLD_EXITED:
        return _Status(got.si_status, "exit", None)
    return _Status(-got.si_status, "signal", got.si_status)


def _exit_info(fd: Optional[int]) -> Optional[int]:
    """The wait status the kernel keeps on a pidfd once its process is reaped (6.15+)."""
    global _info_supported
    if fd is None or not _info_supported or fcntl is None:
        return None
    buf = bytearray(_INFO.size)
    _INFO.pack_into(buf, 0, _PIDFD_INFO_EXIT, 0)
    try:
        fcntl.ioctl(fd, _PIDFD_GET_INFO, buf, True)
    except OSError as err:
        if err.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            _info_supported = False  # kernel < 6.13: no PIDFD_GET_INFO at all
        return None  # ESRCH: reaped, on a kernel that keeps no exit info
    mask, status = _INFO.unpack_from(buf)
    return int(status) if mask & _PIDFD_INFO_EXIT else None


def _read_stat(pid: int) -> Optional[tuple[bytes, str, int]]:
    """(state, start time, exit_code) from /proc/PID/stat; ``None`` if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:  # ENOENT/ESRCH: gone; EACCES (hidepid): unknowable alike
        return None
    # The command name is in parentheses and may contain spaces or ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    # Field 52 (Linux 3.5+): the exit status as waitpid() reports it; 0 when
    # we may not ptrace-read the process.
    exit_code = int(fields[49]) if len(fields) > 49 else 0
    return fields[0], fields[19].decode(), exit_code


def _zombie_status(pid: int, identity: str) -> Optional[int]:
    if not _HAVE_PROC:
        return None
    stat = _read_stat(pid)
    if stat is None or stat[0] not in (b"Z", b"X") or stat[1] != identity:
        return None  # gone, or the PID is another process's now: never read that
    return stat[2]


def _owns_pid(t: _Target) -> bool:
    """Whether the target's process still has its PID (exited maybe, but not reaped).

    Once it is reaped, another process may have the PID already, within the
    same tick of the start-time clock: only the pidfd tells.
    """
    if t.exited:
        return False
    w = t.watch
    if w is not None:
        try:
            if w.send_signal(0):
                return True
        except NoSuchProcess:
            return False
    return t.identity is not None and _runtime.proc_identity(t.pid) == t.identity


def _pinned_unreaped(fd: int) -> bool:
    """Whether the process a pidfd pins has not been reaped (a zombie has not)."""
    try:
        _signal.pidfd_send_signal(fd, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's, but there
        pass
    return True


class _Opened(NamedTuple):
    fd: Optional[int]
    identity: Optional[str]
    exited: bool  # a zombie, or reaped already (pinned by fd)
    child: bool


def _open(pid: int, fd: Optional[int] = None, *, pinned: bool = False) -> Optional[_Opened]:
    """Pin ``pid`` and read its identity; ``None`` if there is no such process.

    ``pinned``: ``fd`` is the caller's (a handle's) pidfd, or ``None`` for a
    handle without one; otherwise a pidfd is opened here (``None`` where
    pidfds are missing: the target is polled).
    """
    if pid > _PID_LIMIT:
        return None  # beyond any pid_max (and pid_t): no such process can exist
    if not pinned:
        try:
            fd = _wait.pidfd_open(pid)
        except NoSuchProcess:
            return None
        except OSError as err:
            # Linux refuses a pidfd for a thread that leads no thread group
            # (EINVAL; ENOENT since 6.9's PIDFD_THREAD rework).
            if err.errno not in (errno.EINVAL, errno.ENOENT):
                raise
            raise ValueError(
                f"PID {pid} is a thread, not a process; monitor the process it belongs to "
                f"(Tgid in /proc/{pid}/status)"
            ) from err
    if not _HAVE_PROC:
        identity = _runtime.proc_identity(pid)
        if identity is None:
            return None  # gone, or a zombie: psutil cannot tell them apart here
        return _Opened(fd, identity, False, _is_child(pid, fd))
    stat = _read_stat(pid)
    if fd is not None:
        if not _pinned_unreaped(fd):
            # Reaped since we pinned it: the /proc read may be of a successor.
            return _Opened(fd, None, True, False)
        if stat is None:
            return _Opened(fd, None, False, _is_child(pid, fd))  # /proc hidden from us
    elif stat is None:
        return None
    identity = stat[1]
    zombie = stat[0] in (b"Z", b"X")
    return _Opened(fd, identity, zombie, _is_child(pid, fd))


def _is_child(pid: int, fd: Optional[int]) -> bool:
    if not hasattr(os, "waitid"):  # macOS
        return False
    flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
    try:
        if fd is not None:
            os.waitid(os.P_PIDFD, fd, flags)
        else:
            os.waitid(os.P_PID, pid, flags)
    except OSError:  # ECHILD
        return False
    return True


# ---------------------------------------------------------------- registry


def _start(st: _State, t: _Target, fd: Optional[int], *, shareable: bool) -> None:
    """Hand a new target to the reaper; list it as its PID's shared target if it may be."""
    t.watch = _wait.watch_pidfd(t.pid, t.poll, fd)
    if not shareable or t.identity is None:
        return
    with st.lock:
        if t.exited:
            return
        old = st.by_pid.get(t.pid)
        st.by_pid[t.pid] = t
        # An old one is of a process that exited (the reaper has not said so
        # yet), or a twin made by another thread: it now fires for its own.
        if old is not None and not old.waiters and not old.monitors:
            _drop_locked(st, old)


def _release_locked(st: _State, t: _Target) -> None:
    """``t`` has nobody registered any more: keep it (bounded) or give it up."""
    if t.exited or t.dropped:
        return
    if t.shared and st.by_pid.get(t.pid) is t:
        st.idle[t] = None
        while len(st.idle) > _IDLE_MAX:
            oldest, _ = st.idle.popitem(last=False)
            _drop_locked(st, oldest)
    else:
        _drop_locked(st, t)


def _drop_locked(st: _State, t: _Target) -> None:
    t.dropped = True
    if st.by_pid.get(t.pid) is t:
        del st.by_pid[t.pid]
    st.idle.pop(t, None)
    if t.watch is not None:
        _wait.unwatch(t.watch)  # the reaper closes the pidfd


def _run_waiters(st: _State, t: _Target) -> None:
    with st.deliver:
        while True:
            with st.lock:
                if not t.waiters:
                    return
                _, callback = t.waiters.popitem()
            try:
                callback()
            except Exception:
                logger.exception("mproc: an on_exit() callback for PID %d failed", t.pid)


def _deliver_all(st: _State, t: _Target, status: _Status) -> None:
    with st.deliver:
        while True:
            with st.lock:
                if not t.monitors:
                    return
                ref, rec = t.monitors.popitem()
                st.monitors.pop(ref, None)
            code = None if rec.adopted else status.exitcode
            _inject(st, rec, Down(ref, t.pid, code, status.reason, status.signal))


def _inject(st: _State, rec: _Mon, down: Down) -> None:
    """Queue ``down`` in the mailbox; under ``st.deliver``."""
    try:
        entry = rec.receiver.inject(rec.group, down.pid, pickle.dumps(down))
    except MailboxClosed:
        logger.debug("mproc: %s; the mailbox is closed, the Down of %s is dropped", down, down.ref)
        return
    st.delivered[down.ref] = (rec.receiver, rec.group, entry)
    if len(st.delivered) > st.prune_at:
        _prune(st)
        st.prune_at = max(_DELIVERED_MIN, 2 * len(st.delivered))


def _prune(st: _State) -> None:
    """Forget the delivered Downs that were received (or whose mailbox closed)."""
    queued: dict[tuple[int, str], set[int]] = {}
    keep: dict[Monitor, tuple[Receiver, str, Entry]] = {}
    for ref, item in st.delivered.items():
        receiver, group, entry = item
        if receiver.closed:
            continue
        key = (id(receiver), group)
        ids = queued.get(key)
        if ids is None:
            ids = queued[key] = _queued_ids(receiver, group)
        if id(entry) in ids:  # the record holds the entry: its id is not reused
            keep[ref] = item
    st.delivered = keep


def _queued_ids(receiver: Receiver, group: str) -> set[int]:
    g = receiver.groups.get(group)
    if g is None:
        return set()
    entries: list[Any] = list(g.queue)  # one C call: no other thread runs meanwhile
    for slot in list(g.orphans):  # taken by an interrupted receive(): not received
        entries.extend(slot)
    return set(map(id, entries))


# ---------------------------------------------------------------- on_exit


def _no_cancel() -> None:
    pass


def _cancel(t: _Target, token: int) -> None:
    st = _state
    with st.deliver, st.lock:
        if t.waiters.pop(token, None) is not None and not t.waiters and not t.monitors:
            _release_locked(st, t)


def on_exit(
    pid: int,
    identity: Optional[str],
    callback: Callable[[], None],
    out: Optional[list[Callable[[], None]]] = None,
) -> Callable[[], None]:
    """Run ``callback()`` once when process ``pid`` exits (internal: ``call()``'s monitor).

    The callback runs in the reaper thread, or synchronously before this
    returns when the process is gone already, is a zombie, or (``identity``
    given) its current identity (:func:`mproc._runtime.proc_identity`)
    differs. It must be quick and must not block: it holds up every other
    exit, and a ``cancel()`` in another thread waits for it to finish.

    Registrations on one live process share one watch (one pidfd), which is
    kept while the process lives even when nobody is registered (at most
    :data:`_IDLE_MAX` such, the oldest given up first): registering and
    cancelling on a watched process makes no system call.

    Args:
        pid: the process.
        identity: its start-time identity as the caller knows it, or ``None``
            for whatever process has the PID now.
        callback: called with no argument; an exception is logged.
        out: a list the ``cancel()`` is appended to *before* the callback is
            registered, so that a caller interrupted (a signal handler
            raising) right after registering still finds it to cancel.

    Returns:
        ``cancel()``: idempotent; once it returns, the callback does not run
        (unless it already has).
    """
    st = _state
    with st.lock:
        t = st.by_pid.get(pid)
        if t is not None and (identity == t.identity if identity is not None else _owns_pid(t)):
            token = next(_tokens)
            cancel = functools.partial(_cancel, t, token)
            if out is not None:
                out.append(cancel)
            t.waiters[token] = callback
            t.shared = True
            if st.idle:
                st.idle.pop(t, None)
            return cancel
    opened = _open(pid)
    if (
        opened is None
        or opened.exited
        or opened.identity is None
        or (identity is not None and opened.identity != identity)
    ):
        if opened is not None and opened.fd is not None:
            os.close(opened.fd)
        callback()
        return _no_cancel
    t = _Target(pid, opened.identity, opened.child, None)
    token = next(_tokens)
    cancel = functools.partial(_cancel, t, token)
    if out is not None:
        out.append(cancel)
    t.waiters[token] = callback
    t.shared = True
    _start(st, t, opened.fd, shareable=True)
    return cancel


# ---------------------------------------------------------------- monitors


def monitor(pid: int, group: str = "") -> Monitor:
    """Monitor process ``pid``: when it exits, one :class:`Down` arrives in ``group``.

    Any process this one may see can be monitored: children, adopted,
    unrelated, mproc or not. The Down is a message of this process's mailbox
    (opened here) with ``msg.sender_pid == pid`` and ``msg.data`` the
    :class:`Down`; it arrives within milliseconds of the exit (the reaper
    thread's epoll over pidfds, no thread per monitor). The process is the
    one that has the PID now: a later process reusing the PID never triggers
    or suppresses the Down. A PID that does not exist gets a Down with
    reason ``"noproc"`` at once; a zombie (exited, not yet reaped by its
    parent) has exited, and gets its Down at once with its status.

    Args:
        pid: the process to monitor.
        group: the mailbox group the Down goes to.

    Returns:
        The :class:`Monitor`, for :func:`demonitor` and to match the Down.

    Raises:
        TypeError: ``pid`` is not an int, or ``group`` not a str.
        ValueError: ``pid`` is not > 0, or is a thread other than a process's main thread.
        UnsafeRuntimeDir, MailboxError: the mailbox cannot open.
    """
    pid = _check.pid(pid, "monitor")
    _check.group(group, "monitor")
    rec = _Mon(Monitor(next(_ids), pid), group, _mailbox._ensure_open())
    st = _state
    with st.lock:
        t = st.by_pid.get(pid)
        if t is not None and _owns_pid(t):
            if t.child and t.handle is None:
                t.handle = _wait.child_watch(pid)
            _attach_locked(st, t, rec)
            return rec.ref
    opened = _open(pid)
    # An unreaped child of ours that an mproc handle collects: the Down
    # reports the code the handle saw (on kernels that keep no exit info
    # on the pidfd, the handle may reap it before the Down looks).
    handle = _wait.child_watch(pid) if opened is not None and opened.child else None
    return _monitor_new(st, rec, opened, handle)


def _attach_locked(st: _State, t: _Target, rec: _Mon) -> None:
    rec.target = t
    t.monitors[rec.ref] = rec
    st.monitors[rec.ref] = rec
    if st.idle:
        st.idle.pop(t, None)


def _monitor_new(
    st: _State, rec: _Mon, opened: Optional[_Opened], handle: Optional[_wait.Watch]
) -> Monitor:
    pid = rec.ref.pid
    if opened is None:
        with st.deliver:
            _inject(st, rec, Down(rec.ref, pid, None, "noproc"))
        return rec.ref
    t = _Target(pid, opened.identity, opened.child, handle)
    with st.lock:
        _attach_locked(st, t, rec)
    # An exited process is not shared: the reaper fires for it at once.
    _start(st, t, opened.fd, shareable=not opened.exited)
    return rec.ref


def monitor_handle(handle: Any, group: str) -> Monitor:
    """``handle.monitor(group)`` for a Process, Command or AdoptedProcess.

    The handle pins its process (``_pin()``, under the lock its reaper
    reaps under), so the monitor is of that very process; for a child an
    mproc handle collects, the Down carries the code the handle saw.
    """
    _check.group(group, "monitor")
    pid = handle.pid
    if pid is None:
        raise ValueError(f"{handle!r} has not been started; call start() first")
    watch: Optional[_wait.Watch] = handle._monitor_watch()
    receiver = _mailbox._ensure_open()
    rec = _Mon(Monitor(next(_ids), pid), group, receiver, adopted=watch is None)
    st = _state
    alive, fd = handle._pin()
    if not alive:
        code: Optional[int] = handle.exitcode
        if code is None and watch is not None and watch.exited.is_set():
            code = watch.code
        status = _from_code(code) if code is not None else _Status(None, "exit", None)
        with st.deliver:
            _inject(st, rec, Down(rec.ref, pid, *status))
        return rec.ref
    if fd is None and watch is None:
        opened = _open(pid)  # an adopted process where pidfds are missing
    else:
        opened = _open(pid, fd, pinned=True)
        if opened is None:  # a handle without pidfd whose child vanished: its watch says
            opened = _Opened(None, None, True, False)
    if opened is not None and not opened.exited and opened.identity is not None:
        with st.lock:
            t = st.by_pid.get(pid)
            if t is not None and t.identity == opened.identity:
                if t.handle is None:
                    t.handle = watch
                _attach_locked(st, t, rec)
                if opened.fd is not None:
                    os.close(opened.fd)
                return rec.ref
    return _monitor_new(st, rec, opened, watch)


def demonitor(ref: Monitor) -> bool:
    """Stop a monitor: once this returns, no :class:`Down` for ``ref`` arrives.

    A Down already queued but not yet received is taken back out of the
    mailbox. The monitor's watch is given up (its pidfd closed by the
    reaper) when nobody else watches that process.

    Args:
        ref: what :func:`monitor` (or ``handle.monitor()``) returned.

    Returns:
        Whether the monitor was active or its Down was withdrawn; ``False``
        for a Down already received, or a ref of another process.

    Raises:
        TypeError: ``ref`` is not a :class:`Monitor`.
    """
    if not isinstance(ref, Monitor):
        raise TypeError(
            f"demonitor() takes the Monitor that monitor() returned, "
            f"got {type(ref).__name__}: {ref!r}"
        )
    st = _state
    with st.deliver:
        with st.lock:
            rec = st.monitors.pop(ref, None)
            if rec is not None:
                t = rec.target
                if t is not None:
                    t.monitors.pop(ref, None)
                    if not t.waiters and not t.monitors:
                        _release_locked(st, t)
                return True
        item = st.delivered.pop(ref, None)
    if item is None:
        return False
    receiver, group, entry = item
    return receiver.withdraw(group, entry)


def _after_fork_in_child() -> None:
    global _state
    _state = _State()  # the reaper closes the inherited pidfds itself


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
