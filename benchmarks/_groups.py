"""A message to a new group vs a message to a group in use (issue 7).

One connection carries every group, and a group starts with the receiver's
whole window of credit, so a message to a group nobody has used yet should
cost about what one to a known group costs (0.1 opened a connection and ran
an HMAC handshake per group: ~40x). A forked receiver takes ``n`` messages,
either all of group ``"g"`` or one of each of ``"g0"``, ``"g1"``, …, in the
order this process sends them; the clock runs from the first ``send()`` to
the receiver's word that it has them all.
"""

from __future__ import annotations

import os
import time

import mproc

from ._common import Children, Config, Row, Target, check_codes, repeat, watchdog

_TARGET = 3.0  # new group / existing group, at most


def _receiver(n: int, fresh: bool, ready_w: int, done_w: int) -> None:
    mproc.open_mailbox()
    os.write(ready_w, b"r")
    receive = mproc.receive
    if fresh:
        for i in range(n):
            receive(f"g{i}", timeout=30)
    else:
        for _ in range(n):
            receive("g", timeout=30)
    os.write(done_w, b"d")
    mproc.close_mailbox()


def _case(n: int, fresh: bool) -> float:
    """Return µs per message, send to receipt, for ``n`` messages."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    try:
        with Children() as kids, watchdog(120):
            child = kids.start(_receiver, n, fresh, ready_w, done_w)
            if os.read(ready_r, 1) != b"r":
                raise RuntimeError("the receiver died before it opened its mailbox")
            pid = child.pid
            assert pid is not None
            send = mproc.send
            t0 = time.perf_counter()
            if fresh:
                for i in range(n):
                    send(pid, i, f"g{i}")
            else:
                for i in range(n):
                    send(pid, i, "g")
            if os.read(done_r, 1) != b"d":
                raise RuntimeError("the receiver died before it had every message")
            elapsed = time.perf_counter() - t0
            check_codes("receiver", kids.join())
    finally:
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
        mproc.close_mailbox()
    return elapsed / n * 1e6


def new_group(cfg: Config, rundir: str) -> list[Row]:
    """A message to a new group vs one to a group in use; target <= 3x."""
    n = max(cfg.messages // 5, 2000)
    samples = repeat(cfg.reps, {"new": lambda: _case(n, True), "same": lambda: _case(n, False)})
    return [
        Row(
            "new_group",
            f"send + receive, each message to a new group ({n} msgs)",
            "us",
            samples["new"],
            "mproc, every message to one group",
            samples["same"],
            Target("ratio", "<=", _TARGET),
        )
    ]
