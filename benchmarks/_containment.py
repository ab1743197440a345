"""Stopping process trees (issue 8): ``terminate_all()`` of 100 processes with 3 descendants each.

Each of the 100 ``mproc.Process`` children (forked) ignores SIGTERM and
starts three programs that ignore it too: two in its process group, one in
a session of its own (``start_new_session``), so that only the containment
marker finds it. A child reports the PIDs of its descendants through a pipe
once they run; this process pins all 400 with pidfds, then times
``terminate_all(timeout=1.0)``: SIGTERM to every tree, the 1 s grace (nobody
leaves), then the freeze-and-SIGKILL of every tree. Survivors are the pinned
processes whose pidfd has not reported an exit when it returns.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
import warnings
from typing import Any

import mproc

from ._common import Config, Row, Target

_TREES = 100
_GRACE = 1.0
_STUBBORN = ["sh", "-c", "trap '' TERM; exec sleep 3600"]


def _root(fd: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kids = [
        subprocess.Popen(_STUBBORN),
        subprocess.Popen(_STUBBORN),
        subprocess.Popen(_STUBBORN, start_new_session=True),
    ]
    os.write(fd, (" ".join(str(k.pid) for k in kids) + "\n").encode())  # < PIPE_BUF: atomic
    select.select([], [], [])


def _measure() -> dict[str, Any]:
    r, w = os.pipe()
    m = mproc.ProcessManager()
    for _ in range(_TREES):
        m.start(mproc.Process(target=_root, args=(w,), start_method="fork"))
    os.close(w)
    pids: list[int] = list(m.pids())
    buf = b""
    with os.fdopen(r, "rb") as f:
        while buf.count(b"\n") < _TREES:
            chunk = f.read1(65536)
            if not chunk:
                break
            buf += chunk
    pids += [int(x) for x in buf.split()]
    fds = [os.pidfd_open(pid) for pid in pids]
    try:
        started = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the escalation is the point here
            m.terminate_all(timeout=_GRACE)
        took = time.monotonic() - started
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        survivors = len(fds) - len(poller.poll(0))
    finally:
        for fd in fds:
            os.close(fd)
    return {"seconds": took, "survivors": survivors, "processes": len(pids)}


def terminate_trees(cfg: Config, rundir: str) -> list[Row]:
    """The issue-8 row: time of terminate_all() over 100 trees, and that none survives."""
    runs = [_measure() for _ in range(min(cfg.reps, 3))]
    total = runs[0]["processes"]
    return [
        Row(
            "terminate_trees",
            f"terminate_all(), {_TREES} procs x 3 descendants, {_GRACE:g} s TERM grace",
            "s",
            [r["seconds"] for r in runs],
            target=Target("value", "<=", 1.5),
            extra={"runs": runs},
        ),
        Row(
            "terminate_trees",
            f"survivors of the {total} processes",
            "",
            [float(r["survivors"]) for r in runs],
            target=Target("check", "", 0, "none"),
            ok=all(r["survivors"] == 0 for r in runs),
        ),
    ]
