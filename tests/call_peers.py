"""Child-process code for the request/reply tests (module level: any start method runs it).

Every wait in here is bounded by :data:`WAIT`; the callees report through
the mailbox itself.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import mproc

WAIT = 10.0


class Unpicklable(Exception):
    """An exception whose class the caller can rebuild but whose instance does not unpickle."""

    def __init__(self, a: int, b: int) -> None:  # pickled args (a+b,) do not fit
        super().__init__(a + b)


def handler(request: Any) -> Any:
    op, arg = request
    if op == "double":
        return arg * 2
    if op == "echo":
        return arg
    if op == "raise":
        raise arg
    if op == "raise_local":

        class LocalError(Exception):
            pass

        LocalError.__qualname__ = "LocalError"
        LocalError.__module__ = "no_such_module_here"
        raise LocalError(arg)
    if op == "raise_unpicklable":
        raise Unpicklable(1, 2)
    if op == "lambda":
        return lambda: 1  # cloudpickle handles it: the caller gets a function
    if op == "unpicklable_result":
        import threading

        return threading.Lock()
    if op == "stop":
        raise mproc.StopServing("asked to stop")
    if op == "pid":
        return os.getpid()
    raise ValueError(f"unknown op {op!r}")


def serve(group: str = "rpc") -> None:
    """Serve ``handler`` on ``group`` until StopServing or WAIT s of silence."""
    mproc.serve(handler, group, timeout=WAIT)


def serve_and_report(parent: int) -> None:
    """Serve; plain messages are counted and reported to ``parent`` at the end."""
    seen: list[Any] = []

    def h(data: Any) -> Any:
        if data == "report":
            raise mproc.StopServing()
        if isinstance(data, tuple):
            return handler(data)
        seen.append(data)
        if data == "boom":
            raise RuntimeError("a plain message's error is only logged")
        return None

    mproc.serve(h, "rpc", timeout=WAIT)
    mproc.send(parent, seen, "report", timeout=WAIT)


def reply_late(parent: int) -> None:
    """Take one call, wait for "go" from the parent, then reply and say so."""
    msg = mproc.receive("rpc", timeout=WAIT)
    mproc.receive("go", timeout=WAIT)
    msg.reply(("late", msg.data))
    mproc.send(parent, "replied", "done", timeout=WAIT)
    serve()


def die_without_reply(code: int = 3) -> None:
    """Take one call and exit without replying."""
    mproc.receive("rpc", timeout=WAIT)
    os._exit(code)


def die_after_n(n: int) -> None:
    """Take ``n`` calls, then get killed by SIGKILL without replying."""
    for _ in range(n):
        mproc.receive("rpc", timeout=WAIT)
    os.kill(os.getpid(), signal.SIGKILL)


def reply_then_die(value: Any) -> None:
    """Reply to one call and exit at once (the reply must still arrive)."""
    msg = mproc.receive("rpc", timeout=WAIT)
    msg.reply(value)
    os._exit(0)


def check_reply_errors(parent: int) -> None:
    """Receive a plain message and a call; report what reply() raises for each."""
    results = []
    plain = mproc.receive("rpc", timeout=WAIT)
    results.append(plain.is_call)
    try:
        plain.reply(1)
    except ValueError as err:
        results.append(("plain", str(err)))
    msg = mproc.receive("rpc", timeout=WAIT)
    results.append(msg.is_call)
    msg.reply("first")
    results.append(msg.is_call)
    try:
        msg.reply("second")
    except ValueError as err:
        results.append(("twice", str(err)))
    try:
        msg.reply_error("not an exception")  # type: ignore[arg-type]
    except TypeError as err:
        results.append(("type", str(err)))
    mproc.send(parent, results, "report", timeout=WAIT)


def forward_to(worker: int) -> None:
    """Take one call and hand the Msg itself to ``worker``, which replies."""
    msg = mproc.receive("rpc", timeout=WAIT)
    mproc.send(worker, msg, "job", timeout=WAIT)
    # The call watches *this* process: stay until the worker has replied.
    mproc.receive("done", timeout=WAIT)


def reply_to_forwarded() -> None:
    """Reply to a call whose Msg another process forwarded here."""
    msg = mproc.receive("job", timeout=WAIT)
    msg.data.reply(("from", os.getpid()))
    mproc.send(msg.sender_pid, "replied", "done", timeout=WAIT)


def hold_name_and_serve(name: str, gate_fd: int = -1) -> None:
    """Wait for a byte on ``gate_fd`` (if given), register ``name``, then serve."""
    if gate_fd >= 0:
        os.read(gate_fd, 1)
    mproc.register(name)
    serve()


def hold_name_and_receive(name: str, parent: int) -> None:
    """Register ``name``, receive one message and report it with our PID."""
    mproc.register(name)
    msg = mproc.receive("", timeout=WAIT)
    mproc.send(parent, (os.getpid(), msg.data), "report", timeout=WAIT)
