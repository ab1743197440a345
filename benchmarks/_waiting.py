"""Waiting for 100 adopted foreign processes (benchmark 5).

Three processes per measurement, so that nothing else is counted:

* a *launcher* (forked from us) starts ``sleep 3600`` programs and stays
  their parent: to the waiter they are foreign processes that some other
  program started, and the launcher reaps each the moment it dies;
* a *waiter* (forked from us, so it has no thread of ours) adopts them with
  ``ProcessManager.add_process`` or wraps them in ``psutil.Process``, says
  ready, and waits. Its CPU time is ``getrusage(RUSAGE_SELF)`` around the
  wait: every thread of the process, so mproc's reaper thread counts too;
* this process relays "ready" to the launcher, which sleeps ``wait_delay``
  seconds, SIGKILLs all of them, and reaps them, timing each step on the
  system-wide ``CLOCK_MONOTONIC``.

Latency is the waiter's return minus the end of the launcher's last
``kill()``: an upper bound, since it includes the kernel tearing the
processes down. The JSON also has it from the launcher's last ``waitpid()``
return, but that observer can be scheduled later than the waiter (the
figure then goes negative), so it is not the headline.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from multiprocessing.connection import Connection
from typing import Any

import psutil

import mproc._runtime
import mproc._wait
from mproc import ProcessManager

from ._common import FORK, Children, Config, Row, Target, watchdog


def _launcher(conn: Connection, n: int) -> None:
    procs = [
        subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL, close_fds=True)
        for _ in range(n)
    ]
    pids = [p.pid for p in procs]
    conn.send(pids)
    delay = conn.recv()
    time.sleep(delay)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    for _ in pids:
        os.waitpid(-1, 0)
    last_reaped = time.monotonic()
    for p in procs:
        p.returncode = -signal.SIGKILL  # reaped above: Popen must not wait again
    conn.send((killed, last_reaped))


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _no_pidfd(pid: int, *, keep: bool = False) -> None:
    return None


def _waiter(conn: Connection, pids: list[int], how: str) -> None:
    result: dict[str, Any] = {"how": how}
    try:
        if how == "mproc-poll":
            mproc._wait.pidfd_open = _no_pidfd
        if how == "mproc-fewfds":
            # Room for half of the pidfds: the rest must fall back to polling.
            in_use = len(os.listdir("/proc/self/fd"))
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            result["soft"] = soft
            limit = in_use + len(pids) // 2
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            result["rlimit_nofile"] = limit
        if how.startswith("mproc"):
            manager = ProcessManager()
            refused: list[str] = []
            for pid in pids:
                try:
                    manager.add_process(pid)
                except mproc.MprocError as err:
                    # Short of fds, an adopted handle is refused rather than
                    # left without the pidfd that pins its identity (issue 8).
                    refused.append(str(err))
            result["refused"] = len(refused)
            result["refusal"] = refused[0] if refused else None
            pids = [pid for pid in pids if manager.get_process(pid) is not None]
            conn.send("ready")
            c0, t0 = _cpu(), time.monotonic()
            manager.wait_all(timeout=30)
            t1, c1 = time.monotonic(), _cpu()
            if "soft" in result:  # room again to read /proc
                resource.setrlimit(resource.RLIMIT_NOFILE, (result.pop("soft"), hard))
            # Gone, or a zombie its launcher has not reaped yet: exited either way.
            alive = [pid for pid in pids if mproc._runtime.proc_identity(pid) is not None]
            handles = [manager.get_process(pid) for pid in pids]
            result["not_seen"] = sum(1 for h in handles if h is None or h.is_alive())
        else:
            procs = [psutil.Process(pid) for pid in pids]
            conn.send("ready")
            c0, t0 = _cpu(), time.monotonic()
            _gone, still = psutil.wait_procs(procs, timeout=30)
            t1, c1 = time.monotonic(), _cpu()
            alive = [pid for pid in pids if mproc._runtime.proc_identity(pid) is not None]
            result["not_seen"] = len(still)
        result.update(cpu=c1 - c0, start=t0, end=t1, alive_after=len(alive), error=None)
    except Exception as err:  # reported in the table, not a crash of the suite
        result["error"] = f"{type(err).__name__}: {err}"
        try:
            conn.send("ready")
        except OSError:
            pass
    conn.send(result)


def measure(n: int, delay: float, how: str) -> dict[str, Any]:
    """One measurement: ``how`` is mproc, mproc-poll, mproc-fewfds or psutil."""
    l_mine, l_theirs = FORK.Pipe()
    w_mine, w_theirs = FORK.Pipe()
    try:
        with Children() as kids, watchdog(90):
            kids.start(_launcher, l_theirs, n)
            pids = l_mine.recv()
            kids.start(_waiter, w_theirs, pids, how)
            if w_mine.recv() != "ready":
                raise RuntimeError("the waiter did not get ready")
            l_mine.send(delay)
            killed, last_reaped = l_mine.recv()
            result: dict[str, Any] = w_mine.recv()
            codes = kids.join()
    finally:
        for c in (l_mine, l_theirs, w_mine, w_theirs):
            c.close()
    result["codes"] = codes
    if result.get("error") is None:
        result["latency"] = result["end"] - killed
        result["latency_after_reap"] = result["end"] - last_reaped
        result["ok"] = result["not_seen"] == 0 and result["alive_after"] == 0
        if how == "mproc-fewfds":  # the rest is refused, saying why
            refusal = result.get("refusal") or ""
            result["ok"] = result["ok"] and result["refused"] > 0 and "RLIMIT_NOFILE" in refusal
    else:
        result["ok"] = False
    return result


def wait_adopted(cfg: Config, rundir: str) -> list[Row]:
    """Benchmark 5: CPU and latency of waiting for 100 adopted processes, and the fallbacks."""
    hows = ("mproc", "psutil", "mproc-poll", "mproc-fewfds")
    runs: dict[str, list[dict[str, Any]]] = {h: [] for h in hows}
    for _ in range(cfg.reps):
        for how in hows:
            runs[how].append(measure(cfg.wait_procs, cfg.wait_delay, how))

    def series(how: str, key: str, scale: float = 1e3) -> list[float]:
        return [r[key] * scale for r in runs[how] if r.get("error") is None]

    def extra(how: str) -> dict[str, Any]:
        keep = (
            "latency_after_reap",
            "cpu",
            "not_seen",
            "alive_after",
            "error",
            "rlimit_nofile",
            "refused",
            "refusal",
        )
        return {"runs": [{k: r[k] for k in keep if k in r} for r in runs[how]]}

    n, d = cfg.wait_procs, cfg.wait_delay
    rows = [
        Row(
            "wait_adopted",
            f"CPU of wait_all, {n} procs exiting after {d:g} s",
            "ms",
            series("mproc", "cpu"),
            "psutil.wait_procs",
            series("psutil", "cpu"),
            Target("ratio", "<=", 0.2),
            extra={"mproc": extra("mproc"), "psutil": extra("psutil")},
        ),
        Row(
            "wait_adopted",
            "latency, last kill() to the return (upper bound)",
            "ms",
            series("mproc", "latency"),
            "psutil.wait_procs",
            series("psutil", "latency"),
            Target("value", "<=", 10.0),
            note="includes the kernel tearing the 100 processes down; the JSON also has it "
            "from the launcher's last waitpid(), which can come after the waiter saw the exit",
        ),
    ]
    for how, what in (
        ("mproc-poll", "fallback, no pidfd (polling): latency"),
        ("mproc-fewfds", f"fds for only {n // 2} pidfds: the rest refused; latency"),
    ):
        errors = [r["error"] for r in runs[how] if r.get("error")]
        why = f"{len(errors)}/{len(runs[how])} runs failed: {errors[0]}" if errors else ""
        rows.append(
            Row(
                "wait_adopted",
                what,
                "ms",
                series(how, "latency"),
                target=Target(
                    "check",
                    "",
                    0,
                    "all exits seen" if how == "mproc-poll" else "refused clearly, exits seen",
                ),
                ok=all(r["ok"] for r in runs[how]),
                note=why,
                extra={"cpu_ms": series(how, "cpu"), **extra(how)},
            )
        )
    return rows
