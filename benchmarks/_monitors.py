"""Monitors (SPEC §9): how soon a Down arrives, and what 1 000 monitors cost.

``down_latency``: a *launcher* (forked from us) starts ``sleep`` programs and
stays their parent, reaping each the moment it dies, so to this process they
are foreign. This process adopts each (``ProcessManager.add_process``),
monitors it through the handle, and SIGKILLs it; the latency is from just
before the ``kill()`` to the return of the ``receive()`` that got its Down.
One process at a time, so each figure is one exit seen alone. The same with
pidfds disabled (the reaper's polling fallback, 1 to 20 ms back-off) is
shown for reference.

``monitor_threads``: 1 000 ``sleep`` processes of a launcher, one monitor
each: the threads of this process before and after (``threading`` and
``/proc/self/task``), the descriptors before, with the monitors and after
``demonitor()`` of them all, the time per ``monitor()``; and the cost of the
``on_exit()`` registration that ``call()`` makes on an already watched
process (registration plus cancel, no system call).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import mproc
from mproc import _monitor, _runtime, _wait

from ._common import FORK, Children, Config, Row, Target, check_codes, watchdog

_GROUP = "bench-downs"


def _launcher(conn: Connection, n: int) -> None:
    procs = [
        subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL, close_fds=True)
        for _ in range(n)
    ]
    conn.send([p.pid for p in procs])
    # Reap each the moment it dies, as its parent (SIGKILLed by the other side).
    for _ in procs:
        os.waitpid(-1, 0)
    for p in procs:
        p.returncode = -9  # reaped above: Popen must not wait again
    conn.send("reaped")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def _settle(fds: int, timeout: float = 5.0) -> int:
    """Wait (bounded) until the reaper has closed the pidfds given up; return the count."""
    deadline = time.monotonic() + timeout
    while _fds() > fds and time.monotonic() < deadline:
        threading.Event().wait(0.002)
    return _fds()


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _latencies(n: int, polling: bool) -> dict[str, Any]:
    """Kill ``n`` adopted processes one by one; return each Down's latency (ms)."""
    mine, theirs = FORK.Pipe()
    saved = _wait._pidfd_supported
    result: dict[str, Any] = {"ms": [], "wrong": []}
    try:
        with Children() as kids, watchdog(120):
            kids.start(_launcher, theirs, n)
            pids: list[int] = mine.recv()
            if polling:
                _wait._pidfd_supported = False
            manager = mproc.ProcessManager()
            for pid in pids:
                h = manager.add_process(pid)
                ref = h.monitor(_GROUP)
                t0 = time.perf_counter()
                h.kill()
                msg = mproc.receive(_GROUP, timeout=5)
                result["ms"].append((time.perf_counter() - t0) * 1e3)
                down = msg.data
                if not (isinstance(down, mproc.Down) and down.ref == ref and down.pid == pid):
                    result["wrong"].append(repr(down))
            _wait._pidfd_supported = saved
            if mine.recv() != "reaped":
                raise RuntimeError("the launcher did not reap its processes")
            check_codes("down_latency", kids.join())
    finally:
        _wait._pidfd_supported = saved
        mine.close()
        theirs.close()
    return result


def down_latency(cfg: Config, rundir: str) -> list[Row]:
    """Latency of a Down after SIGKILL of an adopted process: p50 and p99, pidfd and polling."""
    n = 100 if cfg.quick else 200
    runs = [_latencies(n, polling=False) for _ in range(cfg.reps)]
    polled = [_latencies(n // 4, polling=True) for _ in range(min(cfg.reps, 3))]
    wrong = [w for r in runs + polled for w in r["wrong"]]
    every = [x for r in runs for x in r["ms"]]
    note = f"{len(wrong)} wrong Downs: {wrong[:2]}" if wrong else ""
    extra = {"max_ms": max(every), "mean_ms": statistics.mean(every), "kills": len(every)}
    return [
        Row(
            "down_latency",
            f"p50, kill() of an adopted process to its Down received ({n} kills/run)",
            "ms",
            [_percentile(r["ms"], 0.50) for r in runs],
            note=note,
        ),
        Row(
            "down_latency",
            f"p99, kill() of an adopted process to its Down received ({n} kills/run)",
            "ms",
            [_percentile(r["ms"], 0.99) for r in runs],
            target=Target("value", "<=", 20.0),
            extra=extra,
        ),
        Row(
            "down_latency",
            f"p99, the same without pidfds (polling fallback, {n // 4} kills/run)",
            "ms",
            [_percentile(r["ms"], 0.99) for r in polled],
            extra={"p50_ms": [_percentile(r["ms"], 0.50) for r in polled]},
        ),
    ]


def _thousand(n: int) -> dict[str, Any]:
    mine, theirs = FORK.Pipe()
    try:
        with Children() as kids, watchdog(120):
            kids.start(_launcher, theirs, n)
            pids: list[int] = mine.recv()
            # Warm up: the mailbox and the reaper run before the count starts.
            mproc.monitor(2**31 - 2, _GROUP)  # no such process: opens the mailbox
            mproc.receive(_GROUP, timeout=5)
            fds = _fds()
            mproc.demonitor(mproc.monitor(pids[0], _GROUP))  # starts the reaper
            _settle(fds)
            threads, tasks = threading.active_count(), _tasks()
            t0 = time.perf_counter()
            refs = [mproc.monitor(pid, _GROUP) for pid in pids]
            took = time.perf_counter() - t0
            during = {"threads": threading.active_count(), "tasks": _tasks(), "fds": _fds()}
            released = all(mproc.demonitor(r) for r in refs)
            after_fds = _settle(fds)
            for pid in pids:
                os.kill(pid, 9)
            if mine.recv() != "reaped":
                raise RuntimeError("the launcher did not reap its processes")
            check_codes("monitor_threads", kids.join())
    finally:
        mine.close()
        theirs.close()
    return {
        "threads_added": max(during["threads"] - threads, during["tasks"] - tasks),
        "fds_added": during["fds"] - fds,
        "fds_left": after_fds - fds,
        "released": released,
        "us_per_monitor": took / n * 1e6,
    }


def _on_exit_cost(rounds: int) -> float:
    """µs per on_exit() + cancel() on a process already watched (call()'s monitor)."""
    p = subprocess.Popen(["sleep", "3600"])
    try:
        identity = _runtime.proc_identity(p.pid)
        _monitor.on_exit(p.pid, identity, _monitor._no_cancel)()  # the shared watch
        t0 = time.perf_counter()
        for _ in range(rounds):
            _monitor.on_exit(p.pid, identity, _monitor._no_cancel)()
        return (time.perf_counter() - t0) / rounds * 1e6
    finally:
        p.kill()
        p.wait()


def monitor_threads(cfg: Config, rundir: str) -> list[Row]:
    """Threads and descriptors of 1 000 monitors; the cost of call()'s on_exit()."""
    n = 1000
    runs = [_thousand(n) for _ in range(min(cfg.reps, 3))]
    costs = [_on_exit_cost(20_000) for _ in range(cfg.reps)]
    return [
        Row(
            "monitor_threads",
            f"threads added by {n} monitors of {n} processes",
            "threads",
            [float(r["threads_added"]) for r in runs],
            target=Target("value", "<=", 0.0),
            extra={"runs": runs},
        ),
        Row(
            "monitor_threads",
            f"descriptors: +1 pidfd per process, all closed after demonitor() ({n})",
            "fds",
            [float(r["fds_added"]) for r in runs],
            target=Target("check", "", 0, "released"),
            ok=all(r["released"] and r["fds_left"] <= 0 and r["fds_added"] == n for r in runs),
        ),
        Row(
            "monitor_threads",
            "monitor() of a new process (pidfd, /proc read, epoll)",
            "µs",
            [r["us_per_monitor"] for r in runs],
        ),
        Row(
            "monitor_threads",
            "on_exit() + cancel() on a watched process (call()'s monitor)",
            "µs",
            costs,
            target=Target("value", "<=", 5.0),
        ),
    ]
