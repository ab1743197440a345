"""The process subcommands of ``mproc``: ``kill`` and ``wait``.

Every PID is *pinned* before anything is done to it: a pidfd where the
system has them (the kernel then never lets a signal reach another process
that reused the number), else its start time, checked right before each
``os.kill``. Waiting is ``poll()`` on those pidfds: no polling loop, for
children and foreign processes alike. ``kill --tree`` first freezes the
whole tree with :func:`mproc.kill_tree` (SIGSTOP: nothing in it can fork or
exit), pins every member while it is frozen, and only then signals them.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import signal
import time
from typing import Any, Callable, Optional

import psutil

from . import _tree, _wait
from ._cli_util import (
    EXIT_FAIL,
    EXIT_USAGE,
    CliError,
    emit,
    emit_json,
    exit_codes,
    pid_arg,
    seconds_arg,
    signal_arg,
    signal_name,
    warn,
)
from ._errors import NoSuchProcess

__all__ = ["add_commands"]

_KILL_TIMEOUT = 5.0  # default: seconds between the signal and SIGKILL
_AFTER_KILL = 5.0  # SIGKILL cannot be caught: a process still there after this is stuck
_POLL_STEP = 0.02  # only without pidfds (macOS, old kernels): how often to look
# After these the process is stopped, not asked to go: no SIGCONT behind them.
_STOPPING = frozenset(
    getattr(signal, n) for n in ("SIGSTOP", "SIGTSTP", "SIGTTIN", "SIGTTOU") if hasattr(signal, n)
)
_EXIT_MISSING = 3  # wait: a PID did not exist


# ---------------------------------------------------------------- pinned processes


def _proc_stat(pid: int) -> Optional[list[bytes]]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()


def _start_of(pid: int) -> Optional[str]:
    """The start time naming ``pid`` for its lifetime (zombies too), or None if gone."""
    fields = _proc_stat(pid)
    if fields is not None:
        return fields[19].decode()
    if os.path.isdir("/proc"):
        return None
    try:  # no /proc (macOS): psutil's creation time
        return str(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


_PID_LIMIT = 0x7FFFFFFF


def _thread_group(pid: int) -> Optional[int]:
    """The process (thread group) that thread ``pid`` belongs to, from /proc, if any."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class _Pin:
    """One process, pinned (pidfd, else start time) so that nothing else is ever hit."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        if pid > _PID_LIMIT:  # pid_t is a C int: no such process can exist
            raise NoSuchProcess(pid=pid)
        # First the pidfd (from now on the process cannot be mistaken), then the start time.
        try:
            self.fd = _wait.pidfd_open(pid)  # None: no pidfds, or few fds left (then the time)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.EINVAL):
                raise
            leader = _thread_group(pid)
            if leader is not None and leader != pid:
                raise NoSuchProcess(
                    f"no such process: PID {pid} is a thread of process {leader}", pid=pid
                ) from None
            raise NoSuchProcess(pid=pid) from None
        self.start = _start_of(pid)
        if self.start is None:
            self.close()
            raise NoSuchProcess(pid=pid)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def signal(self, sig: int) -> bool:
        """Send ``sig``; return False if the process has exited (nothing was sent).

        Raises:
            PermissionError: another user's process.
        """
        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, sig)
                return True
            if _start_of(self.pid) != self.start:
                return False
            os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def exited(self) -> bool:
        """Whether it has exited (a zombie counts), without waiting."""
        if self.fd is not None:
            poller = select.poll()  # not select(): pidfds may be numbered past 1023
            poller.register(self.fd, select.POLLIN)
            return bool(poller.poll(0))
        if _start_of(self.pid) != self.start:
            return True
        fields = _proc_stat(self.pid)
        return fields is not None and fields[0] == b"Z"

    def status(self) -> Optional[int]:
        """Its wait status (as ``os.waitpid`` gives it), if it is a zombie still unreaped.

        The status of a process that is not our child is not ours to read,
        but Linux shows it in ``/proc/<pid>/stat`` until its parent reaps it
        (field 52, exit_code); the start time says it is still the same process.
        """
        fields = _proc_stat(self.pid)
        if fields is None or fields[0] != b"Z" or fields[19].decode() != self.start:
            return None
        try:
            return int(fields[49])
        except (IndexError, ValueError):
            return None


def _wait_for(
    pins: list[_Pin], deadline: Optional[float], on_exit: Callable[[_Pin], None]
) -> list[_Pin]:
    """Wait until every pin has exited or ``deadline`` passed; return those still running.

    ``on_exit`` runs for each as it is seen to exit.
    """
    pending = list(pins)
    while pending:
        still = []
        for pin in pending:
            if pin.exited():
                on_exit(pin)
            else:
                still.append(pin)
        pending = still
        if not pending:
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        poller = select.poll()
        unpinned = False
        for pin in pending:
            if pin.fd is not None:
                poller.register(pin.fd, select.POLLIN)
            else:
                unpinned = True
        wait = left
        if unpinned:
            wait = _POLL_STEP if left is None else min(left, _POLL_STEP)
        poller.poll(None if wait is None else max(wait * 1000, 0))
    return pending


def _describe_status(status: Optional[int]) -> tuple[str, Optional[int], Optional[str]]:
    """(text, exit code, signal name) of a wait status."""
    if status is None:
        return "exited (status unknown: only its parent may read it)", None, None
    if os.WIFSIGNALED(status):
        name = signal_name(os.WTERMSIG(status))
        return f"was killed by {name}", None, name
    code = os.WEXITSTATUS(status)
    return f"exited with status {code}", code, None


# ---------------------------------------------------------------- kill


def _refuse(pid: int, tree: bool) -> None:
    """Refuse a PID whose killing would take this command (or the system) down with it."""
    why = None
    if pid == 1:
        why = "it is init; killing it would bring the system (or the container) down"
    else:
        who = _tree.kinship(pid)
        if who is not None:
            why = f"it is {who}"
        elif tree and pid == os.getpgid(0):
            why = "it leads this command's process group, so its tree holds this command"
        elif _tree.is_kernel_thread(pid):
            why = "it is a kernel thread, which ignores signals"
    if why is not None:
        raise CliError(f"kill: refusing PID {pid}: {why}", EXIT_USAGE)


def _pin_tree(pid: int) -> list[_Pin]:
    """Freeze the tree of ``pid`` and pin every member while it cannot exit or fork."""
    members = _tree.kill_tree(pid, signal.SIGSTOP, timeout=0)
    pins = []
    try:
        for member in members:
            try:
                pins.append(_Pin(member))
            except NoSuchProcess:
                pass  # killed by someone else meanwhile
    except BaseException:
        for pin in pins:  # never leave the tree frozen
            pin.signal(signal.SIGCONT)
            pin.close()
        raise
    return pins


class _Target:
    """One PID of the command line, with what was pinned for it (several with --tree)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pins: list[_Pin] = []
        self.signals: list[str] = []
        self.error: Optional[str] = None
        self.outcome = "error"
        self.frozen = False  # its tree is stopped by us and must be continued

    def resume(self) -> None:
        """Continue the tree we froze (a member not ours to signal is skipped)."""
        for p in self.pins:
            try:
                p.signal(signal.SIGCONT)
            except PermissionError:
                pass
        self.frozen = False

    def as_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "members": [p.pid for p in self.pins],
            "signals": self.signals,
            "outcome": self.outcome,
            "error": self.error,
        }


def _cmd_kill(args: argparse.Namespace) -> int:
    sig: int = args.signal
    pids = list(dict.fromkeys(args.pids))
    for pid in pids:
        _refuse(pid, args.tree)
    targets = [_Target(pid) for pid in pids]
    try:
        for t in targets:
            try:
                t.pins = _pin_tree(t.pid) if args.tree else [_Pin(t.pid)]
            except NoSuchProcess:
                t.error = "no such process"
                continue
            t.frozen = args.tree
            _send(t, sig, resume=not args.no_kill)
        live = [t for t in targets if t.error is None]
        if args.no_kill and args.timeout == 0:
            for t in live:
                t.outcome = "signalled"
        else:
            pins = [p for t in live for p in t.pins]
            deadline = time.monotonic() + args.timeout
            left = {id(p) for p in _wait_for(pins, deadline, lambda p: None)}
            for t in live:
                gone = not any(id(p) in left for p in t.pins)
                t.outcome = "exited" if gone else "still running"
            if left and not args.no_kill:
                _escalate([t for t in live if t.outcome != "exited"], args.tree)
    finally:
        for t in targets:
            if t.frozen:  # interrupted between freezing and signalling it
                t.resume()
            for p in t.pins:
                p.close()
    return _report_kill(targets, args)


def _send(t: _Target, sig: int, resume: bool) -> None:
    """Send ``sig`` to every pin of ``t``; then continue them (unless ``sig`` stops them).

    A stopped process would not act on ``sig``: it is continued when
    ``resume`` (not with ``--no-kill``), and always when we froze it.
    """
    try:
        sent = [p.signal(sig) for p in t.pins]
    except PermissionError:
        t.error = "not permitted (another user's process?)"
        if t.frozen:
            t.resume()
        return
    if not any(sent):
        t.error = "no such process"
        return
    t.signals.append(signal_name(sig))
    if sig in _STOPPING:
        t.frozen = False  # stopped is what was asked for
    elif (resume or t.frozen) and sig not in (signal.SIGCONT, signal.SIGKILL):
        t.resume()
    t.frozen = False


def _escalate(targets: list[_Target], tree: bool) -> None:
    for t in targets:
        t.signals.append("SIGKILL")
        root = next((p for p in t.pins if p.pid == t.pid), None)
        if tree and root is not None and not root.exited():
            # What the tree forked after the first signal, too — searched from
            # the root's pidfd, never from its bare number: once the root is
            # gone its PID may be another process's (then only the pinned
            # members are killed, below).
            try:
                _tree.kill_trees([_tree.Root(t.pid, pidfd=root.fd)], signal.SIGKILL, timeout=0)
            except (NoSuchProcess, ValueError, OSError):
                pass
        for p in t.pins:
            p.signal(signal.SIGKILL)
    pins = [p for t in targets for p in t.pins]
    left = {id(p) for p in _wait_for(pins, time.monotonic() + _AFTER_KILL, lambda p: None)}
    for t in targets:
        stuck = any(id(p) in left for p in t.pins)
        t.outcome = "still running" if stuck else "killed"


def _report_kill(targets: list[_Target], args: argparse.Namespace) -> int:
    status = 0
    for t in targets:
        if t.error is not None or t.outcome == "still running":
            status = EXIT_FAIL
    if args.json:
        emit_json([t.as_json() for t in targets])
    for t in targets:
        who = f"PID {t.pid}"
        if args.tree and len(t.pins) > 1:
            who += f" and {len(t.pins) - 1} more in its tree"
        if t.error is not None:
            warn(f"kill: PID {t.pid}: {t.error}")
            continue
        first = t.signals[0] if t.signals else "?"
        text = {
            "exited": f"{who}: exited after {first}",
            "killed": f"{who}: killed with SIGKILL ({first} was not enough within "
            f"{args.timeout:g} s)",
            "signalled": f"{who}: sent {first}",
            "still running": f"{who}: still running after {', '.join(t.signals)}",
        }[t.outcome]
        if t.outcome == "still running":
            warn(f"kill: {text}")
        elif not args.json:
            emit(text)
    return status


# ---------------------------------------------------------------- wait


def _cmd_wait(args: argparse.Namespace) -> int:
    pids = list(dict.fromkeys(args.pids))
    if os.getpid() in pids:
        raise CliError("wait: a process cannot wait for itself", EXIT_USAGE)
    pins: list[_Pin] = []
    missing = []
    try:
        for pid in pids:
            try:
                pins.append(_Pin(pid))
            except NoSuchProcess:
                missing.append(pid)
                warn(f"wait: no such process: PID {pid}")

        def report(pin: _Pin) -> None:
            text, code, sig = _describe_status(pin.status())
            if args.json:
                emit_json({"pid": pin.pid, "exited": True, "exitcode": code, "signal": sig})
            else:
                emit(f"PID {pin.pid} {text}")

        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        left = _wait_for(pins, deadline, report)
    finally:
        for pin in pins:
            pin.close()
    if left:
        if args.json:
            for pin in left:
                emit_json({"pid": pin.pid, "exited": False, "exitcode": None, "signal": None})
        still = ", ".join(str(p.pid) for p in left)
        warn(f"wait: timed out after {args.timeout:g} s; still running: PID {still}")
        return EXIT_FAIL
    return _EXIT_MISSING if missing else 0


# ---------------------------------------------------------------- the parsers


def add_commands(sub: Any, formatter: Any) -> None:
    """Add ``kill`` and ``wait`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "kill",
        help="signal processes, wait for them, then SIGKILL (pidfd-safe)",
        formatter_class=formatter,
        description=(
            "Send SIG (default SIGTERM) to each PID, wait up to --timeout seconds for it "
            "to exit, then send SIGKILL to what is left and wait again (at most "
            f"{_AFTER_KILL:g} s). Each PID is pinned (pidfd) before anything is sent, "
            "so a PID reused meanwhile by another process is never hit. A stopped process "
            "is continued (SIGCONT) after SIG so that it can act on it. Refused, before "
            "anything is sent: PIDs <= 0, PID 1, this command and its ancestors, kernel "
            "threads. With --tree, each PID's whole tree (its descendants and, if it "
            "leads one, its process group) is frozen first, then signalled; see "
            "mproc.kill_tree. One line per PID says what happened."
        ),
        epilog=exit_codes(
            (0, "every PID has exited (or, with --no-kill --timeout 0, was signalled)"),
            (1, "a PID did not exist, could not be signalled, or still runs at the end"),
            (
                2,
                "bad usage (malformed or refused PID, unknown signal, bad timeout):\n"
                "nothing was signalled",
            ),
            (130, "interrupted (Ctrl-C)"),
        ),
    )
    p.add_argument("pids", nargs="+", type=pid_arg, metavar="PID", help="processes to kill")
    p.add_argument(
        "-s",
        "--signal",
        type=signal_arg,
        default=signal.SIGTERM,
        metavar="SIG",
        help="the first signal: a name (TERM, SIGTERM, term) or number (default TERM)",
    )
    p.add_argument("--tree", action="store_true", help="kill each PID's process tree")
    p.add_argument(
        "--timeout",
        type=seconds_arg,
        default=_KILL_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait after SIG before SIGKILL (default {_KILL_TIMEOUT:g})",
    )
    p.add_argument(
        "--no-kill",
        action="store_true",
        help="never send SIGKILL: send SIG, wait up to --timeout (0: do not wait)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON array, one object per PID")
    p.set_defaults(func=_cmd_kill)

    p = sub.add_parser(
        "wait",
        help="wait for processes to exit (children or not)",
        formatter_class=formatter,
        description=(
            "Wait until every PID has exited: any process, not only children of this "
            "command. Uses pidfds (no polling) where the system has them. Prints one "
            "line per PID as it exits, with its exit status when it can be known: a "
            "process's status belongs to its parent, so it is shown only if the process "
            "is still a zombie when seen."
        ),
        epilog=exit_codes(
            (0, "every PID has exited"),
            (1, "--timeout passed first (the PIDs still running are named)"),
            (2, "bad usage (malformed PID, bad timeout)"),
            (3, "a PID did not exist when the command started (the others were waited for)"),
            (130, "interrupted (Ctrl-C)"),
        ),
    )
    p.add_argument("pids", nargs="+", type=pid_arg, metavar="PID", help="processes to wait for")
    p.add_argument(
        "--timeout",
        type=seconds_arg,
        default=None,
        metavar="SECONDS",
        help="give up after this long (default: wait for ever)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per PID as it exits")
    p.set_defaults(func=_cmd_wait)
