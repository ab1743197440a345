"""Child-process code for tests/test_review10.py (module level: any start method runs it).

Children report to the test process through its mailbox (``mproc.send``,
group :data:`GROUP`); every wait in here is bounded or ends when the
process is stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from supervisor_peers import block, catch_sigterm, until_sigterm

import mproc

WAIT = 30.0
GROUP = "sup"


def report(to: int, *what: Any) -> None:
    mproc.send(to, what, GROUP, timeout=WAIT)


def fork_and_die(to: int, name: str, code: int) -> None:
    """Start a plain ``subprocess`` grandchild (not through mproc), report it, exit ``code``."""
    g = subprocess.Popen(
        ["sleep", "1000"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    report(to, "grandchild", name, g.pid, os.getpid())
    os._exit(code)


def fork_and_block(to: int, name: str) -> None:
    """Start a plain ``subprocess`` grandchild, report it, block until stopped."""
    g = subprocess.Popen(
        ["sleep", "1000"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    report(to, "grandchild", name, g.pid, os.getpid())
    block()


def term_reporter(to: int, name: str) -> None:
    """Report ``("up", name, pid)``; on SIGTERM report ``("term", name, pid)`` and keep running."""

    def on_term(signum: int, frame: Any) -> None:
        # Best effort: the SIGTERM may land while the main thread is still
        # inside its send() of "up" (the parent holds the message already, the
        # call has not returned), and a send from a handler into that raises
        # RuntimeError, which would end this process early: keep running.
        try:
            report(to, "term", name, os.getpid())
        except RuntimeError:
            pass

    signal.signal(signal.SIGTERM, on_term)
    report(to, "up", name, os.getpid())
    while True:
        block()


def level(to: int, depth: int, recipe: bool) -> None:
    """A Process running a Supervisor of one child: the next level, or a ``sleep`` leaf.

    Reports ``("level", depth, pid, child_pid)`` once its child runs.
    """
    sup = mproc.Supervisor(max_restarts=5, max_seconds=WAIT)
    if depth > 1:
        sup.add("next", lambda: mproc.Process(target=level, args=(to, depth - 1, recipe)))
    else:
        sup.add("leaf", lambda: mproc.Command("sleep", ["1000"]))
    if recipe:
        mproc.add_sig_handler_shutdown(lambda signum: sup.stop())
    with sup:
        report(to, "level", depth, os.getpid(), sup.children()[0][1])
        sup.wait(WAIT * 4)


def lone(to: int, recipe: bool) -> None:
    """A supervisor of a Command and a Process with an mproc grandchild; reports its PIDs."""
    sup = mproc.Supervisor()
    sup.add("cmd", lambda: mproc.Command("sleep", ["1000"]))
    sup.add("proc", lambda: mproc.Process(target=_mproc_grandparent, args=(to,)))
    if recipe:
        mproc.add_sig_handler_shutdown(lambda signum: sup.stop())
    with sup:
        report(to, "lone", os.getpid(), [pid for _, pid, _ in sup.children()])
        sup.wait(WAIT * 4)
    report(to, "lone-done", os.getpid())


def _mproc_grandparent(to: int) -> None:
    catch_sigterm()
    cmd = mproc.Command("sleep", ["1000"])
    report(to, "grandchild", "proc", cmd.start(), os.getpid())
    until_sigterm()


def crash() -> None:
    sys.exit(3)
