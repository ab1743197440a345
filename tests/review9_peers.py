"""Child-process code for tests/test_review9.py (module level: fork children run it).

Every wait in here is bounded by :data:`WAIT`.
"""

from __future__ import annotations

import os
import select
import sys
import time
from typing import Any

import mproc

WAIT = 10.0


class BrokenText(Exception):
    """An exception whose ``__str__`` and ``__repr__`` both raise."""

    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


class BadReduce(Exception):
    """An exception that cannot be pickled: its ``__reduce__`` raises."""

    def __reduce__(self) -> Any:
        raise TypeError("BadReduce refuses to be pickled")


def handler(request: Any) -> Any:
    op, arg = request
    if op == "echo":
        return arg
    if op == "big":
        return b"x" * arg
    if op == "broken_text":
        raise BrokenText()
    if op == "bad_reduce":
        raise BadReduce("detail")
    if op == "exit":
        sys.exit(arg)
    if op == "pid":
        return os.getpid()
    if op == "stop":
        raise mproc.StopServing()
    raise ValueError(f"unknown op {op!r}")


def serve(group: str = "rpc") -> None:
    mproc.serve(handler, group, timeout=WAIT)


def serve_with_max_frame(max_frame: int) -> None:
    mproc.open_mailbox(max_frame=max_frame)
    serve()


def _wait_queued(group: str) -> None:
    receiver = mproc._mailbox._state.receiver
    deadline = time.monotonic() + WAIT
    while not receiver.depths().get(group):
        if time.monotonic() > deadline:
            os._exit(7)
        time.sleep(0.002)


def close_without_receiving(parent: int, gate: int) -> None:
    """Open the mailbox, wait until a call is queued, close the mailbox, stay alive."""
    mproc.open_mailbox()
    mproc.send(parent, "ready", "ctl", timeout=WAIT)
    _wait_queued("rpc")
    mproc.close_mailbox()
    select.select([gate], [], [], WAIT)
    os._exit(0)


def exec_after_receiving(parent: int) -> None:
    """Receive one call, then exec another program in the same PID."""
    mproc.open_mailbox()
    mproc.send(parent, "ready", "ctl", timeout=WAIT)
    mproc.receive("rpc", timeout=WAIT)
    os.execv("/bin/sleep", ["sleep", str(int(WAIT))])


def exec_without_receiving(parent: int) -> None:
    """Wait until a call is queued, then exec another program in the same PID."""
    mproc.open_mailbox()
    mproc.send(parent, "ready", "ctl", timeout=WAIT)
    _wait_queued("rpc")
    os.execv("/bin/sleep", ["sleep", str(int(WAIT))])


def forward_and_exit(worker: int) -> None:
    """Take one call, hand the Msg to ``worker`` and exit at once."""
    msg = mproc.receive("rpc", timeout=WAIT)
    mproc.send(worker, (os.getpid(), msg), "job", timeout=WAIT)
    os._exit(0)


def reply_when_told() -> None:
    """Reply to a forwarded call only when told to (by a message in group "go")."""
    _front, msg = mproc.receive("job", timeout=WAIT).data
    mproc.receive("go", timeout=WAIT)
    msg.reply(("from", os.getpid()))
    os._exit(0)


def reply_and_forward(worker: int) -> None:
    """Answer one call itself and also hand a copy of the Msg to ``worker``; then serve."""
    msg = mproc.receive("rpc", timeout=WAIT)
    mproc.send(worker, msg, "job", timeout=WAIT)
    msg.reply("original")
    serve()


def reply_to_forwarded_copy(parent: int) -> None:
    msg = mproc.receive("job", timeout=WAIT).data
    msg.reply("copy")
    mproc.send(parent, "copy replied", "done", timeout=WAIT)


def register_and_serve(name: str, parent: int) -> None:
    mproc.register(name)
    mproc.send(parent, ("registered", os.getpid()), "ctl", timeout=WAIT)
    serve()


def register_unregister_on_request(name: str, parent: int) -> None:
    """Register ``name``; on "drop" unregister it (and stay alive), then receive plain messages."""
    mproc.register(name)
    mproc.send(parent, ("registered", os.getpid()), "ctl", timeout=WAIT)
    assert mproc.receive("cmd", timeout=WAIT).data == "drop"
    mproc.unregister(name)
    mproc.send(parent, ("dropped", os.getpid()), "ctl", timeout=WAIT)
    got = []
    while True:
        try:
            msg = mproc.receive("", timeout=WAIT)
        except mproc.ReceiveTimeout:
            break
        if msg.data == "report":
            break
        got.append(msg.data)
    mproc.send(parent, (os.getpid(), got), "report", timeout=WAIT)


def _collect(parent: int) -> None:
    got = []
    while True:
        try:
            msg = mproc.receive("", timeout=WAIT)
        except mproc.ReceiveTimeout:
            break
        if msg.data == "report":
            break
        got.append(msg.data)
    mproc.send(parent, (os.getpid(), got), "report", timeout=WAIT)


def register_and_collect(name: str, parent: int) -> None:
    """Register ``name`` and collect plain messages until "report"."""
    mproc.register(name)
    mproc.send(parent, ("registered", os.getpid()), "ctl", timeout=WAIT)
    _collect(parent)


def hold_name_in(runtime_dir: str, name: str, parent_dir: str, parent: int) -> None:
    """Register ``name`` in ``runtime_dir``, report (in ``parent_dir``), and collect messages."""
    os.environ["MPROC_RUNTIME_DIR"] = runtime_dir
    mproc.close_mailbox()
    mproc.register(name)
    got = []
    # Tell the parent through its own runtime dir (its mailbox lives there).
    os.environ["MPROC_RUNTIME_DIR"] = parent_dir
    mproc.send(parent, ("registered", os.getpid()), "ctl", timeout=WAIT)
    while True:
        try:
            msg = mproc.receive("", timeout=WAIT)
        except mproc.ReceiveTimeout:
            break
        if msg.data == "report":
            break
        got.append(msg.data)
    mproc.send(parent, (os.getpid(), got), "report", timeout=WAIT)


def receive_and_report(parent: int) -> None:
    """Receive one call, tell the parent, then wait (to be killed)."""
    mproc.receive("rpc", timeout=WAIT)
    mproc.send(parent, "got it", "ctl", timeout=WAIT)
    mproc.receive("never", timeout=WAIT)


def never_answer(parent: int) -> None:
    mproc.open_mailbox()
    mproc.send(parent, "ready", "ctl", timeout=WAIT)
    mproc.receive("quit", timeout=WAIT)


def fork_and_reply_from_child() -> None:
    """Receive a call, answer it from a forked child, reap it, and serve on."""
    msg = mproc.receive("rpc", timeout=WAIT)
    child = os.fork()
    if child == 0:
        code = 1
        try:
            msg.reply(("child", os.getpid()))
            code = 0
        finally:
            os._exit(code)
    os.waitpid(child, 0)
    serve()


def collect_only(parent: int) -> None:
    """Open a mailbox (no name), say so, and collect plain messages until "report"."""
    mproc.open_mailbox()
    mproc.send(parent, ("ready", os.getpid()), "ctl", timeout=WAIT)
    _collect(parent)


def register_then_exec(name: str, parent: int) -> None:
    """Register ``name``, say so, then exec another program in the same PID."""
    mproc.register(name)
    mproc.send(parent, ("registered", os.getpid()), "ctl", timeout=WAIT)
    os.execv("/bin/sleep", ["sleep", str(int(WAIT))])
