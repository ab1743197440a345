"""Child-process code for the asyncio tests (module level: any start method runs it)."""

from __future__ import annotations

import os
from typing import Any

import mproc

WAIT = 10.0


def send_numbers(parent: int, n: int, group: str = "") -> None:
    """Send 0..n-1 to ``parent`` in ``group``, then exit."""
    for i in range(n):
        mproc.send(parent, i, group, timeout=WAIT)


def serve_double() -> None:
    """Answer calls with twice the request; a request "die" exits without replying."""

    def handler(x: Any) -> Any:
        if x == "die":
            os._exit(5)
        if x == "raise":
            raise KeyError("remote")
        if x == "stop":
            raise mproc.StopServing()
        if x == "hold":
            mproc.receive("go", timeout=WAIT)  # reply only when told
            return "held"
        return x * 2

    mproc.serve(handler, "rpc", timeout=WAIT)


def register_and_serve(name: str) -> None:
    mproc.register(name)
    serve_double()


def exit_with(code: int) -> None:
    os._exit(code)
