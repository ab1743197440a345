"""Process trees: find everything a process started, freeze it, and kill it.

A process's *tree* is the union of

* its descendants by parent PID (``/proc/<pid>/stat``), read while they are
  frozen, so none can fork a child or re-parent one behind our back;
* the members of its process group, when it leads one (an mproc manager
  gives each contained child a group of its own): a killed pipeline's
  orphans, wherever they were re-parented;
* every process whose ``MPROC_CONTAIN`` chain (see :mod:`mproc._launch`)
  holds the root's marker element: descendants that called ``setsid()``,
  double-forked, or were re-parented to init, as long as they ran a program
  (``exec``) without clearing their environment.

Killing freezes first: every member found is sent SIGSTOP, then the search
runs again until it finds nobody new (a stopped process cannot fork), then
all are sent the signal. A root's process group is frozen as a whole, by one
signal to the group, before the search: the kernel stops every member at
once and restarts a fork under way after the stop, so a chain that forks and
exits (changing PID faster than ``/proc`` can be read) cannot run ahead of
the search. Members are pinned with pidfds as they are found,
so a PID reused meanwhile is never signalled. Members that were re-parented
to us (when this process is a child subreaper) are reaped by their pidfd,
exactly those: never ``waitpid(-1)``, which would steal the status of a
child the user started with :mod:`subprocess`.
"""

from __future__ import annotations

import errno
import os
import select
import signal as _signal
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

from . import _check
from ._errors import NoSuchProcess
from ._launch import ENV_CONTAIN, MEMFD_PREFIX

__all__ = [
    "Root",
    "ancestors",
    "check_root",
    "forget",
    "is_kernel_thread",
    "kill_tree",
    "kill_trees",
    "kinship",
    "remember",
]

_MARKER_KEY = ENV_CONTAIN.encode() + b"="
_MEMFD_TAG = b"/memfd:" + MEMFD_PREFIX.encode()
# A round of search-and-freeze finds what the previous round's members forked
# before they were stopped; a fork bomb could keep it going, so bound it.
_MAX_ROUNDS = 64
# include/uapi/linux/pidfd.h (Linux 6.9): signal the process group whose ID is
# the pidfd's PID (the struct pid it pins: never a group that reused the number).
_PIDFD_SIGNAL_PROCESS_GROUP = 4
# include/linux/sched.h: the flags field of /proc/<pid>/stat marks kernel threads.
_PF_KTHREAD = 0x00200000

# Marker elements of the contained children of this process, by PID, so that
# kill_tree(pid) of one of them also finds its escaped descendants.
_markers: dict[int, str] = {}
_markers_lock = threading.Lock()


def remember(pid: int, element: str) -> None:
    """Record the marker element of a contained child (see :func:`kill_tree`)."""
    with _markers_lock:
        _markers[pid] = element


def forget(pid: int, element: str) -> None:
    """Forget a contained child's marker (it has been reaped: its PID is free)."""
    with _markers_lock:
        if _markers.get(pid) == element:
            del _markers[pid]


@dataclass(frozen=True)
class Root:
    """The root of a tree to kill.

    Attributes:
        pid: the root process.
        pidfd: a pidfd pinning the root, or ``None`` if it has exited (its
            leftovers are still found by ``group`` and ``marker``) or pidfds
            are unavailable.
        alive: whether the root itself is to be signalled.
        group: whether the root's PID names a process group of its own.
        marker: the root's containment marker element, if it has one.
    """

    pid: int
    pidfd: Optional[int] = None
    alive: bool = True
    group: bool = False
    marker: Optional[str] = None


@dataclass
class _Stat:
    ppid: int
    pgid: int
    sid: int
    start: int
    zombie: bool
    kthread: bool


def _read_stat(pid: int) -> Optional[_Stat]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return _Stat(
            int(fields[1]),
            int(fields[2]),
            int(fields[3]),
            int(fields[19]),
            fields[0] == b"Z",
            bool(int(fields[6]) & _PF_KTHREAD),
        )
    except (IndexError, ValueError):
        return None


def _scan() -> dict[int, _Stat]:
    procs: dict[int, _Stat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _read_stat(int(name))
            if st is not None:
                procs[int(name)] = st
    return procs


def _carries(pid: int, markers: set[bytes]) -> bool:
    """Whether ``pid`` carries one of ``markers``: in its environment, or its memory maps."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:  # another user's process, or gone
        return False
    for var in env.split(b"\0"):
        if var.startswith(_MARKER_KEY):
            if markers.intersection(var[len(_MARKER_KEY) :].split()):
                return True
            break
    # A Python descendant that forked without exec (see _launch.mark_memory).
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            maps = f.read()
    except OSError:
        return False
    if _MEMFD_TAG not in maps:
        return False
    return any(_MEMFD_TAG + m + b" " in maps for m in markers)


def ancestors() -> set[int]:
    """Return this process and its ancestors, PID 1 included (without ``/proc``: and its parent).

    None of them is ever frozen or signalled by a tree kill, whatever its
    group or marker: a tree that holds the caller is refused (see
    :func:`check_root`), and these are left out of any other.
    """
    seen = {os.getpid()}
    pid = os.getppid()
    while pid > 0 and pid not in seen:
        seen.add(pid)
        st = _read_stat(pid)
        if st is None:
            break
        pid = st.ppid
    return seen


def kinship(pid: int) -> Optional[str]:
    """Say how ``pid`` is related to this process, if it is this process or an ancestor.

    Returns:
        ``"this process"``, ``"the parent of this process"``, ``"an ancestor
        of this process"``, or ``None`` for any other PID.
    """
    if pid == os.getpid():
        return "this process"
    if pid == os.getppid():
        return "the parent of this process"
    return "an ancestor of this process" if pid in ancestors() else None


def is_kernel_thread(pid: int) -> bool:
    """Return whether ``pid`` is a kernel thread (which ignores every signal)."""
    st = _read_stat(pid)
    return st is not None and st.kthread


def check_root(pid: int, func: str) -> None:
    """Refuse a root whose tree would hold this process, or a kernel thread.

    The tree of an ancestor (PID 1 above all) is every process but the
    ancestors themselves: our siblings, the user's own children, the rest of
    the system. The group of a process that leads ours holds us and our
    children.

    Args:
        pid: the would-be root.
        func: the public function, for the message.

    Raises:
        ValueError: ``pid`` is this process, an ancestor of it, the leader of
            its process group, or a kernel thread (the message says which).
    """
    who = kinship(pid)
    if who is None and pid == os.getpgid(0):
        who = "the leader of this process's process group"
    if who is not None:
        raise ValueError(
            f"{func}(): PID {pid} is {who}; its tree holds the caller, so stopping it "
            "would stop this process or the children it started itself"
        )
    if is_kernel_thread(pid):
        raise ValueError(f"{func}(): PID {pid} is a kernel thread; it cannot be signalled")


class _Member:
    """A process found in a tree, pinned by a pidfd where possible."""

    __slots__ = ("fd", "pid", "start")

    def __init__(self, pid: int, start: int, fd: Optional[int]) -> None:
        self.pid, self.start, self.fd = pid, start, fd

    def send(self, sig: int) -> None:
        try:
            if self.fd is not None:
                _signal.pidfd_send_signal(self.fd, sig)
                return
            # No pidfd: check that the PID still names the process we found.
            st = _read_stat(self.pid)
            if st is not None and st.start == self.start:
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # exited already; or setuid (not ours to stop)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _pin(pid: int) -> Optional[int]:
    if not hasattr(os, "pidfd_open") or not hasattr(_signal, "pidfd_send_signal"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:  # gone, out of fds (then the start-time check guards os.kill)
        return None


def _signal_group(pgid: int, pidfd: Optional[int], sig: int, procs: dict[int, _Stat]) -> bool:
    """Send ``sig`` to every member of process group ``pgid`` at once; return whether it was.

    Through ``pidfd`` (the group leader's, Linux 6.9) the group is the one
    that PID pins, whatever happened since. Without one, or on an older
    kernel, the group must have a member in ``procs`` that still is in it
    when re-read just before :func:`os.killpg`: then the ID is in use, so it
    names that group (PIDs are allocated cyclically: a number freed in
    between is not handed out again before the allocator wraps around).
    """
    if pidfd is not None:
        try:
            _signal.pidfd_send_signal(pidfd, sig, None, _PIDFD_SIGNAL_PROCESS_GROUP)
            return True
        except ProcessLookupError:
            return True  # the group is empty: nothing to signal
        except PermissionError:
            return True  # some members are not ours to signal: the others were
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: a kernel older than 6.9
                raise
    for pid, st in procs.items():
        if st.pgid != pgid:
            continue
        now = _read_stat(pid)
        if now is not None and now.start == st.start and now.pgid == pgid:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            return True
    return False


def _groups_of(pids: Iterable[int]) -> set[int]:
    """The process groups of ``pids`` (those never to be signalled as a whole)."""
    groups = {os.getpgid(0)}
    for pid in pids:
        st = _read_stat(pid)
        if st is not None:
            groups.add(st.pgid)
    return groups


def _find(roots: Sequence[Root], procs: dict[int, _Stat], members: dict[int, _Member]) -> set[int]:
    """Return the PIDs in ``procs`` that belong to the trees and are not members yet."""
    found: set[int] = set()
    # Never our own group: it holds us and the children the user started.
    groups = {r.pid for r in roots if r.group} - {os.getpgid(0)}
    for r in roots:
        if r.alive and r.pid in procs:
            found.add(r.pid)
    for pid, st in procs.items():
        if st.pgid in groups and not st.kthread:
            found.add(pid)
    children: dict[int, list[int]] = {}
    for pid, st in procs.items():
        if not st.kthread:  # a kernel thread is nobody's descendant and ignores signals
            children.setdefault(st.ppid, []).append(pid)

    def descend(seeds: Iterable[int]) -> None:
        stack = list(seeds)
        while stack:
            for kid in children.get(stack.pop(), ()):
                if kid not in found and kid not in members:
                    found.add(kid)
                    stack.append(kid)

    descend(found | set(members))
    markers = {r.marker.encode() for r in roots if r.marker}
    if markers:
        # Marked processes outside the trees found so far (they escaped).
        # Each started after its root: while every root is alive (so its
        # PID is still its own), older processes need not be read.
        live = [procs[r.pid].start for r in roots if r.alive and r.pid in procs]
        since = min(live) if len(live) == len(roots) else 0
        escaped = [
            pid
            for pid, st in procs.items()
            if pid not in found
            and pid not in members
            and not st.zombie
            and not st.kthread
            and st.start >= since
            and _carries(pid, markers)
        ]
        found.update(escaped)
        descend(escaped)
    return found - set(members)


def kill_trees(
    roots: Sequence[Root],
    sig: int = _signal.SIGKILL,
    *,
    timeout: Optional[float] = 5.0,
    keep: Iterable[int] = (),
    seen: Optional[dict[int, int]] = None,
) -> list[int]:
    """Freeze and signal every tree of ``roots`` at once (one ``/proc`` search for all).

    Args:
        roots: the trees' roots; their pidfds stay the caller's.
        sig: the signal for every member.
        timeout: how long to wait for the members to exit (``None``: no
            limit; ``0``: do not wait).
        keep: PIDs never to reap here (children whose status belongs to a
            handle).
        seen: members of earlier calls for the same trees (PID -> start
            time), added to here: one that exited while its parent lived and
            became our child (a zombie) when that parent died is reaped too.

    Returns:
        The PIDs signalled, sorted.
    """
    exclude = ancestors()
    members: dict[int, _Member] = {}
    root_fds = {r.pid: r.pidfd for r in roots if r.pidfd is not None}
    procs: dict[int, _Stat] = {}
    # The roots' groups, to freeze as a whole (never one holding us or an ancestor).
    groups = {r.pid: r.pidfd for r in roots if r.group}
    for pgid in _groups_of(exclude) & set(groups):
        del groups[pgid]
    frozen: set[int] = set()
    try:
        try:
            for pgid, fd in groups.items():
                if fd is not None and _signal_group(pgid, fd, _signal.SIGSTOP, procs):
                    frozen.add(pgid)
            for _ in range(_MAX_ROUNDS):
                procs = _scan()
                # A group without its leader's pidfd is frozen once a member is seen;
                # then search again: this search may have missed what they forked.
                late = [
                    pgid
                    for pgid in groups.keys() - frozen
                    if _signal_group(pgid, None, _signal.SIGSTOP, procs)
                ]
                if late:
                    frozen.update(late)
                    continue
                new = _find(roots, procs, members) - exclude
                if not new:
                    break
                for pid in new:
                    fd = root_fds.get(pid)
                    fd = os.dup(fd) if fd is not None else _pin(pid)
                    m = members[pid] = _Member(pid, procs[pid].start, fd)
                    m.send(_signal.SIGSTOP)
        finally:
            # Even if the search failed half-way, what was frozen gets the signal.
            for m in members.values():
                m.send(sig)
            if sig == _signal.SIGKILL:
                for pgid in frozen:  # the members any search missed, too
                    _signal_group(pgid, groups[pgid], sig, procs)
            elif sig != _signal.SIGSTOP:
                for m in members.values():
                    m.send(_signal.SIGCONT)  # stopped processes would not act on it
                for pgid in frozen:  # no member is left stopped, found or not
                    _signal_group(pgid, groups[pgid], _signal.SIGCONT, procs)
        if timeout is None or timeout > 0:
            _wait_gone(list(members.values()), timeout)
        _reap(members.values(), set(keep))
        if seen is not None:
            _reap_seen(seen, set(keep) | set(members))
            seen.update((pid, m.start) for pid, m in members.items())
    finally:
        for m in members.values():
            m.close()
    return sorted(members)


def _wait_gone(members: list[_Member], timeout: Optional[float]) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = members
    while pending:
        poller = select.poll()
        unpinned = []
        for m in pending:
            if m.fd is not None:
                poller.register(m.fd, select.POLLIN)
            else:
                unpinned.append(m)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        # Unpinned members (no pidfd) need a look at /proc: poll briefly then.
        wait = left if not unpinned else min(left if left is not None else 0.01, 0.01)
        ready = {fd for fd, _ in poller.poll(None if wait is None else wait * 1000)}
        still = []
        for m in pending:
            if m.fd is not None:
                if m.fd not in ready:
                    still.append(m)
            else:
                st = _read_stat(m.pid)
                if st is not None and st.start == m.start and not st.zombie:
                    still.append(m)
        pending = still
        if deadline is not None and time.monotonic() >= deadline:
            return


def _reap(members: Iterable[_Member], keep: set[int]) -> None:
    """Reap the members that were re-parented to us, by pidfd: exactly those."""
    for m in members:
        if m.pid in keep or m.fd is None:
            continue
        try:
            os.waitid(os.P_PIDFD, m.fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            pass  # not our child: init or another subreaper reaps it
        except OSError as err:
            if err.errno != errno.EINVAL:  # P_PIDFD unknown to an old kernel
                raise


def _reap_seen(seen: dict[int, int], skip: set[int]) -> None:
    """Reap former members that are now zombie children of ours (same start time)."""
    me = os.getpid()
    for pid, start in list(seen.items()):
        if pid in skip:
            continue
        st = _read_stat(pid)
        # A zombie's PID is not reused until it is reaped: the start time names it.
        if st is not None and st.zombie and st.ppid == me and st.start == start:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            del seen[pid]


def kill_tree(pid: int, sig: int = _signal.SIGKILL, *, timeout: Optional[float] = 5.0) -> list[int]:
    """Send ``sig`` to ``pid`` and everything it started, then wait for them to exit.

    The tree is ``pid``'s descendants, the members of its process group when
    it leads one, and, for a child an mproc manager started, the
    descendants that escaped (``setsid``, double fork, re-parenting) but
    carry its containment marker. Everything found is frozen (SIGSTOP) before
    anything is signalled, so nothing can fork its way out; a process that
    does not die of ``sig`` is continued (SIGCONT) so it can act on it.

    Args:
        pid: the root; any process this one may signal.
        sig: the signal (default SIGKILL).
        timeout: how long to wait for them all to exit; ``None`` waits
            forever, ``0`` does not wait. Those still running afterwards are
            left running (for a signal they may catch).

    Returns:
        The PIDs signalled, sorted.

    Raises:
        NoSuchProcess: ``pid`` does not exist.
        TypeError, ValueError: an argument is malformed.
    """
    pid = _check.pid(pid, "kill_tree")
    sig = _check.signum(sig, "kill_tree")
    timeout = _check.timeout(timeout, "kill_tree")
    check_root(pid, "kill_tree")
    fd = _pin(pid)
    st = _read_stat(pid)
    if st is None or st.zombie:
        if fd is not None:
            os.close(fd)
        raise NoSuchProcess(f"kill_tree(): PID {pid} does not exist", pid=pid)
    try:
        with _markers_lock:
            marker = _markers.get(pid)
        root = Root(pid, fd, alive=True, group=st.pgid == pid, marker=marker)
        return kill_trees([root], sig, timeout=timeout, keep=(pid,))
    finally:
        if fd is not None:
            os.close(fd)
