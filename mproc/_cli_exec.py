"""``mproc exec``: run a command as if the shell ran it, with a deadline.

The command gets this process's stdin, stdout and stderr themselves (not
pipes): its output is never buffered or merged here, it reads what we would
read, and a terminal stays a terminal to it. Its exit status becomes ours
(``128+N`` when signal N killed it, as shells report it).

**Process group.** When this command is the foreground job of a terminal,
the program stays in our process group, so that it can use the terminal
(a background group reading it would be stopped by SIGTTIN): a Ctrl-C at the
terminal reaches it directly, and is not sent again. Otherwise (a script, a
pipeline, a service) it leads a process group of its own, and every signal
we get that asks a program to stop or reload (INT, TERM, HUP, QUIT, USR1,
USR2) is forwarded to that group.

**Timeout.** At the deadline the command's tree (its process group, its
descendants) gets SIGTERM through :func:`mproc.kill_tree`, then SIGKILL
``--kill-after`` seconds later if anything of it is left; the exit status is
124, as with coreutils ``timeout``. The leader is reaped last, so its PID,
and with it the process group's ID, cannot be reused while we signal it.

A plain ``subprocess.Popen`` on purpose, not :mod:`mproc._launch`: the
program is the user's, not an mproc child, so it sees the environment as
it was given (no ``MPROC_PPID`` leading to a mailbox nobody reads) and this
command opens no mailbox for it.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import os
import select
import signal
import subprocess
import sys
import time
from types import FrameType
from typing import Any, Optional

from . import _launch, _tree
from ._cli_util import EXIT_USAGE, CliError, exit_codes, seconds_arg, warn
from ._errors import NoSuchProcess

__all__ = ["add_commands"]

EXIT_TIMEOUT = 124  # coreutils timeout(1)
EXIT_CANNOT_RUN = 126  # found but not executable (POSIX shells)
EXIT_NOT_FOUND = 127  # no such command (POSIX shells)
_KILL_AFTER = 5.0
_FORWARDED = tuple(
    getattr(signal, n)
    for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, n)
)
# What a terminal sends to its whole foreground process group by itself.
_FROM_TERMINAL = frozenset(getattr(signal, n) for n in ("SIGINT", "SIGQUIT") if hasattr(signal, n))
_HAS_PROCESS_GROUP = "process_group" in inspect.signature(subprocess.Popen).parameters
# A single argument with any of these is a shell command line.
_SHELL_SYNTAX = frozenset(" \t\n|&;<>()$`\\\"'*?[]#~=%{}!")


def argv_of(words: list[str]) -> list[str]:
    """The program to run: one word with shell syntax runs in the shell, else as it is."""
    if len(words) == 1 and any(c in _SHELL_SYNTAX for c in words[0]):
        return [_launch.shell_path(), "-c", words[0]]
    return words


def _foreground_of_terminal() -> bool:
    """Whether our process group is the foreground job of the terminal on fd 0, 1 or 2."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
    return False


class _Running:
    """The started command: its Popen, a pidfd, and how signals reach it."""

    def __init__(self, argv: list[str]) -> None:
        self.shared_group = _foreground_of_terminal()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()  # what we printed comes before what it prints
        # process_group=0 (Python 3.11+) is setpgid(0, 0) without a preexec_fn.
        group: dict[str, Any] = {}
        if not self.shared_group:
            group = {"process_group": 0} if _HAS_PROCESS_GROUP else {"preexec_fn": os.setpgrp}
        self.proc = subprocess.Popen(argv, **group)
        self.pid = self.proc.pid
        try:
            self.pidfd: Optional[int] = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # no pidfds: wait with the fallback below
            self.pidfd = None

    def forward(self, sig: int) -> None:
        """Pass ``sig`` on (the leader is unreaped, so its PID and group ID are still its own)."""
        try:
            if not self.shared_group:
                os.killpg(self.pid, sig)
            elif sig not in _FROM_TERMINAL:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: Optional[float]) -> bool:
        """Wait for the command to exit, without reaping it; return whether it has."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if self.pidfd is not None:
                # A signal handler may run meanwhile; poll() is retried (PEP 475).
                poller = select.poll()
                poller.register(self.pidfd, select.POLLIN)
                return bool(poller.poll(None if left is None else left * 1000))
            # Without pidfds: waitid(WNOWAIT) leaves it a zombie, as the pidfd does.
            try:
                info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True
            if info is not None:
                return True
            if left is not None and left <= 0:
                return False
            time.sleep(0.01 if left is None else min(left, 0.01))

    def kill_after_timeout(self, grace: float) -> None:
        """The deadline passed: TERM the tree, then KILL what is left after ``grace``."""
        try:
            _tree.kill_tree(self.pid, signal.SIGTERM, timeout=grace)
        except NoSuchProcess:
            pass  # it exited just now; its group may still hold something
        if not self.wait(0):
            try:
                _tree.kill_tree(self.pid, signal.SIGKILL, timeout=_KILL_AFTER)
            except NoSuchProcess:
                pass
        if not self.shared_group:
            try:  # leftovers of its group (the leader, unreaped, keeps the ID its own)
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def finish(self) -> int:
        """Reap the command and return its exit status as a shell reports it."""
        code = self.proc.wait()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        return 128 - code if code < 0 else code


def _cmd_exec(args: argparse.Namespace) -> int:
    words: list[str] = list(args.command)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise CliError("exec: which command? e.g. mproc exec echo hi", EXIT_USAGE)
    argv = argv_of(words)
    try:
        running = _Running(argv)
    except OSError as err:
        status = EXIT_NOT_FOUND if err.errno == errno.ENOENT else EXIT_CANNOT_RUN
        warn(f"exec: cannot run {argv[0]!r}: {err.strerror or err}")
        return status

    def forward(signum: int, _frame: Optional[FrameType]) -> None:
        running.forward(signum)

    previous: dict[int, Any] = {}
    try:
        for sig in _FORWARDED:
            if signal.getsignal(sig) != signal.SIG_IGN:  # ignored by whoever started us: so be it
                previous[sig] = signal.signal(sig, forward)
        if not running.wait(args.timeout):
            running.kill_after_timeout(args.kill_after)
            running.finish()
            warn(f"exec: {words[0]!r} timed out after {args.timeout:g} s and was killed")
            return EXIT_TIMEOUT
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return running.finish()


def add_commands(sub: Any, formatter: Any) -> None:
    """Add ``exec`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "exec",
        help="run a command; its output streamed as it comes, its exit status passed on",
        formatter_class=formatter,
        usage="mproc exec [-h] [--timeout SECONDS] [--kill-after SECONDS] CMD [ARG ...]",
        description=(
            "Run a command with this command's stdin, stdout and stderr: its output "
            "comes as it writes it, stdout and stderr apart, and it reads our stdin. "
            "Several arguments are the program and its arguments, run directly "
            "(mproc exec echo hi there). One argument with spaces or shell syntax is a "
            "command line for /bin/bash -c (else /bin/sh -c): mproc exec 'echo hi | tr "
            "a-z A-Z'. Options of exec come before the command. Ctrl-C and TERM, HUP, "
            "QUIT, USR1, USR2 reach the command (its process group, unless it shares "
            "ours as the foreground job of a terminal, where Ctrl-C reaches it directly)."
        ),
        epilog=exit_codes(
            (0, "the command exited with 0"),
            ("N", "the command exited with N"),
            ("128+N", "the command was killed by signal N (130: SIGINT, 143: SIGTERM)"),
            (EXIT_TIMEOUT, "--timeout passed: the command's tree got SIGTERM, then SIGKILL"),
            (EXIT_CANNOT_RUN, "the program cannot be executed"),
            (EXIT_NOT_FOUND, "the program does not exist"),
            (EXIT_USAGE, "bad usage (no command, bad timeout)"),
        ),
    )
    p.add_argument(
        "--timeout",
        type=seconds_arg,
        default=None,
        metavar="SECONDS",
        help="stop the command after this long (SIGTERM to its tree, exit 124)",
    )
    p.add_argument(
        "--kill-after",
        type=seconds_arg,
        default=_KILL_AFTER,
        metavar="SECONDS",
        help=f"after the timeout's SIGTERM, SIGKILL what is left this much later "
        f"(default {_KILL_AFTER:g}; 0: at once)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD [ARG ...]")
    p.set_defaults(func=_cmd_exec)
