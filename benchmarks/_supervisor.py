"""Supervisor (SPEC §12, issue 10): restart latency, and the CPU of a crash loop.

``supervisor_restart``: a supervisor in this process with one child, no
back-off. The child writes its PID to a pipe first thing; the latency is
from just before the ``kill(SIGKILL)`` of the current incarnation to the
next one's PID read from the pipe: the exit seen, the policy applied, the
factory called, the child forked and running its first line. Once for an
``mproc.Process`` (fork) and once for a ``Command`` (``sh`` that echoes its
PID, then ``exec sleep``). Target: median <= 50 ms.

``supervisor_cpu``: a supervisor in a process of its own (forked from us),
with 100 ``Command("false")`` children that exit 1 at once, each with the
back-off of SPEC §12's example, ``(0.1, 5.0)``. After a warm-up long enough
for every back-off to reach its 5 s maximum (the steady state of a crash
loop: about 20 restarts a second), the CPU time of the supervisor's
process (``psutil`` ``cpu_times``: user + system of all its threads, not of
its children) over a window, as a share of one core. The restarts in the
window are counted, and the same process then times plain
``ProcessManager.start()`` calls of the same Command: most of a restart's
cost is that start (a contained child is forked with a ``preexec_fn``).
Target: < 5 %.
"""

from __future__ import annotations

import os
import select
import signal
import statistics
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable, Union

import psutil

import mproc

from ._common import FORK, Config, Row, Target, watchdog

_BACKOFF = (0.1, 5.0)
_WARMUP = 8.0  # 0.1 + 0.2 + ... + 3.2 = 6.3 s to reach the 5 s back-off, plus one delay
# Children started together restart in waves about 5 s apart (the jitter
# spreads each wave over half a second): a window of whole periods.
_WINDOW = 10.0
_CHILDREN = 100


# --- restart latency ------------------------------------------------------------------


def _announce(fd: int) -> None:
    os.write(fd, f"{os.getpid()}\n".encode())
    select.select([], [], [], 3600)


class _Lines:
    """Reads PIDs, one per line, from a pipe, with a deadline."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def next(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError("the next incarnation did not report")
            self.buf += os.read(self.fd, 4096)
        line, _, self.buf = self.buf.partition(b"\n")
        return int(line)


def _latencies(kind: str, kills: int) -> list[float]:
    """Kill the child ``kills`` times; return the ms to each next incarnation's first line."""
    r, w = os.pipe()
    factory: Callable[[], Union[mproc.Process, mproc.Command]]
    if kind == "process":

        def factory() -> mproc.Process:
            return mproc.Process(target=_announce, args=(w,), start_method="fork")

    else:

        def factory() -> mproc.Command:
            return mproc.Command("sh", ["-c", "echo $$; exec sleep 3600"], stdout=w)

    lines = _Lines(r)
    ms = []
    try:
        sup = mproc.Supervisor(max_restarts=kills + 10, max_seconds=1.0)
        sup.add("child", factory, shutdown=1.0)
        with watchdog(120), sup:
            pid = lines.next()
            for i in range(kills + 2):
                t0 = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                pid = lines.next()
                if i >= 2:  # the first two warm up the paths
                    ms.append((time.perf_counter() - t0) * 1e3)
    finally:
        os.close(r)
        os.close(w)
    return ms


def supervisor_restart(cfg: Config, rundir: str) -> list[Row]:
    """Restart latency after a crash, no back-off: median per run, target <= 50 ms."""
    kills = 20 if cfg.quick else 50
    rows = []
    for kind, what in (("process", "an mproc.Process (fork)"), ("command", "a Command (sh)")):
        runs = [_latencies(kind, kills) for _ in range(cfg.reps)]
        every = sorted(x for run in runs for x in run)
        rows.append(
            Row(
                "supervisor_restart",
                f"SIGKILL of {what} to its next incarnation running, no back-off",
                "ms",
                [statistics.median(run) for run in runs],
                target=Target("value", "<=", 50.0),
                extra={
                    "kills_per_run": kills,
                    "p99_ms": every[min(len(every) - 1, round(0.99 * (len(every) - 1)))],
                    "max_ms": every[-1],
                },
            )
        )
    return rows


# --- CPU of a crash loop -----------------------------------------------------------------


def _crash_loop(conn: Connection, warmup: float, window: float) -> None:
    result: dict[str, Any] = {"error": None}
    try:
        sup = mproc.Supervisor(max_restarts=10**9, max_seconds=5.0)
        for i in range(_CHILDREN):
            sup.add(f"c{i}", lambda: mproc.Command("false"), backoff=_BACKOFF)
        me = psutil.Process()
        pause = threading.Event()
        with sup:
            pause.wait(warmup)
            c0, t0 = me.cpu_times(), time.monotonic()
            r0 = sum(r for _, _, r in sup.children())
            pause.wait(window)
            c1, t1 = me.cpu_times(), time.monotonic()
            r1 = sum(r for _, _, r in sup.children())
        cpu = (c1.user - c0.user) + (c1.system - c0.system)
        result.update(cpu=cpu, seconds=t1 - t0, restarts=r1 - r0, threads=me.num_threads())
        # For comparison: the same children started (and waited for) by a
        # plain ProcessManager, one after the other, in this same process.
        m = mproc.ProcessManager()
        c0 = me.cpu_times()
        for _ in range(_CHILDREN):
            cmd = mproc.Command("false")
            m.start(cmd)
            cmd.wait(10)
        c1 = me.cpu_times()
        result["start_cpu"] = ((c1.user - c0.user) + (c1.system - c0.system)) / _CHILDREN
    except Exception as err:  # reported in the table, not a crash of the suite
        result["error"] = f"{type(err).__name__}: {err}"
    conn.send(result)


def _cpu_run(warmup: float, window: float) -> dict[str, Any]:
    mine, theirs = FORK.Pipe()
    # Not daemonic: a daemonic multiprocessing process may not start children.
    proc = FORK.Process(target=_crash_loop, args=(theirs, warmup, window))
    try:
        with watchdog(warmup + window + 60):
            proc.start()
            if not mine.poll(warmup + window + 30):
                raise TimeoutError("the supervisor did not report")
            result: dict[str, Any] = mine.recv()
            proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        mine.close()
        theirs.close()
    if result["error"] is not None:
        raise RuntimeError(result["error"])
    return result


def supervisor_cpu(cfg: Config, rundir: str) -> list[Row]:
    """CPU of a supervisor whose 100 children crash-loop with back-off; target < 5 %."""
    window = _WINDOW / 2 if cfg.quick else _WINDOW
    runs = [_cpu_run(_WARMUP, window) for _ in range(cfg.reps)]
    return [
        Row(
            "supervisor_cpu",
            f"CPU, {_CHILDREN} children crash-looping, back-off {_BACKOFF} s, steady state",
            "% core",
            [100 * r["cpu"] / r["seconds"] for r in runs],
            target=Target("value", "<=", 5.0),
            note="most of it is starting the contained children: CPU per restart vs per "
            "ProcessManager.start() of the same Command in the JSON",
            extra={
                "restarts_per_s": [r["restarts"] / r["seconds"] for r in runs],
                "cpu_ms_per_restart": [1e3 * r["cpu"] / max(1, r["restarts"]) for r in runs],
                "cpu_ms_per_manager_start": [1e3 * r["start_cpu"] for r in runs],
                "window_s": window,
                "warmup_s": _WARMUP,
            },
        )
    ]
