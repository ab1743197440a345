"""Child-process code for test_review11.py (module level: any start method runs it).

Every wait is bounded; children report through the mailbox.
"""

from __future__ import annotations

import os
from typing import Any

import mproc

WAIT = 10.0


def hold(fd: int, max_queue: int = 10_000) -> None:
    """Open a mailbox (never receive from it) and exit when ``fd`` is readable."""
    mproc.open_mailbox(max_queue=max_queue)
    os.read(fd, 1)


def collect(parent: int, fd: int, group: str) -> None:
    """Open a mailbox; once ``fd`` says go, receive ``group`` up to "end" and report it.

    Large payloads are reported by their length.
    """
    mproc.open_mailbox()
    os.read(fd, 1)
    got: list[Any] = []
    while True:
        data = mproc.receive(group, timeout=WAIT).data
        if data == "end":
            break
        got.append(data if isinstance(data, (int, str)) else f"<{len(data)} bytes>")
    mproc.send(parent, got, "report", timeout=WAIT)


def collect_now(parent: int, group: str) -> None:
    """Receive ``group`` up to "end" (no go signal) and report what came, in order."""
    got: list[Any] = []
    while True:
        data = mproc.receive(group, timeout=WAIT).data
        if data == "end":
            break
        got.append(data)
    mproc.send(parent, got, "report", timeout=WAIT)


def serve_numbered() -> None:
    """Answer calls on "rpc" with the request, recording the order; "stop" ends it."""
    seen: list[Any] = []

    def handler(x: Any) -> Any:
        if x == "stop":
            mproc.send(mproc.ppid_os(), seen, "report", timeout=WAIT)
            raise mproc.StopServing()
        seen.append(x)
        return x

    mproc.serve(handler, "rpc", timeout=WAIT)
