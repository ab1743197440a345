"""Child-process code for the supervisor tests (module level: any start method runs it).

Children report to the test process through the mailbox (``mproc.send``);
a child that only sends opens no mailbox of its own, so it leaves no socket
file when it is killed. Every wait in here is bounded by :data:`WAIT` or
ends when the process is stopped.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Any

import mproc

WAIT = 30.0
GROUP = "sup"


def report(to: int, *what: Any) -> None:
    mproc.send(to, what, GROUP, timeout=WAIT)


def block() -> None:
    select.select([], [], [], WAIT * 4)


def step(to: int, name: str, what: str) -> None:
    """One incarnation: say ``("up", name, pid)``, then do ``what``.

    ``"block"``: until stopped; ``"exit<N>"``: exit with code N;
    ``"die<N>"``: report ``("dying", name, pid, time.time())`` first;
    ``"run<S>die<N>"``: run S seconds, then as ``die<N>``.
    """
    report(to, "up", name, os.getpid())
    if what == "block":
        block()
        return
    if what.startswith("run"):
        seconds, _, what = what[3:].partition("die")
        time.sleep(float(seconds))  # the child's own healthy run, not a synchronisation
        what = "die" + what
    if what.startswith("die"):
        report(to, "dying", name, os.getpid(), time.time())
        os._exit(int(what[3:]))
    os._exit(int(what[4:]))


def catch_sigterm() -> None:
    """From now on SIGTERM ends :func:`until_sigterm`, not the process (call it first)."""
    mproc.add_sig_handler_shutdown(lambda signum: None)


def until_sigterm() -> None:
    """Block until SIGTERM, then return: run() ends, the mailbox and its socket file go.

    ``mproc.listen()``, not a handler raising SystemExit: a tree kill sends
    SIGTERM to frozen processes, and the kernel may hand it to any thread;
    the main thread must wake up to run the Python handler (listen() does).
    """
    mproc.listen(timeout=WAIT * 4)


def _serve(handler: Any) -> None:
    try:
        mproc.serve(handler, "")
    except mproc.MailboxClosed:
        pass  # run() returned


def service() -> None:
    """A named service: answers ``"pid"``; ``"crash"`` exits with 3 before replying."""

    def handle(request: Any) -> Any:
        if request == "crash":
            os._exit(3)
        if request == "pid":
            return os.getpid()
        return ("echo", request)

    catch_sigterm()
    threading.Thread(target=_serve, args=(handle,), daemon=True).start()
    until_sigterm()


def grandparent(to: int) -> None:
    """Start a grandchild through mproc, report ``("grandchild", pid)``, block.

    Starting a child opens our mailbox: return on SIGTERM so that its
    socket file goes with us.
    """
    catch_sigterm()
    cmd = mproc.Command("sleep", ["1000"])
    report(to, "grandchild", cmd.start())
    until_sigterm()


def inner_supervisor(to: int) -> None:
    """A Process whose run() runs a Supervisor (nesting).

    On SIGTERM it stops its children in order and returns (the recipe the
    README gives). Reports ``("inner", pid, {name: pid})``; its ``w1``
    children report ``("up", "w1", pid)`` themselves.
    """
    sup = mproc.Supervisor(strategy="one_for_one", max_restarts=10, max_seconds=5.0)
    sup.add("w1", lambda: mproc.Process(target=step, args=(to, "w1", "block")))
    sup.add("w2", lambda: mproc.Command("sleep", ["1000"]))
    mproc.add_sig_handler_shutdown(lambda signum: sup.stop())  # before anything is started
    with sup:
        report(to, "inner", os.getpid(), {name: pid for name, pid, _ in sup.children()})
        sup.wait(WAIT * 4)


def lone_supervisor(to: int) -> None:
    """A supervisor of several kinds of children; reports ``("lone", pid, pids)``, blocks."""
    sup = mproc.Supervisor()
    sup.add("proc", lambda: mproc.Process(target=block))
    sup.add("cmd", lambda: mproc.Command("sleep", ["1000"]))
    sup.add("tree", lambda: mproc.Process(target=grandparent, args=(to,)))
    with sup:
        report(to, "lone", os.getpid(), [pid for _, pid, _ in sup.children()])
        sup.wait(WAIT * 4)
