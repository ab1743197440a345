"""Many senders, and one sender to many PIDs (benchmark 7).

* 200 forked senders each send a few messages to this process at once
  (released together): every send must succeed and every message arrive.
  A ``multiprocessing.Queue`` with as many putters is timed for context.
* The burst: 200 forked senders each send ONE message right after being
  released, so every sender's connection set-up (finding the socket, the
  handshake) is inside the clock; against a ``multiprocessing.Queue`` with
  as many putters (each starts its feeder thread on its first ``put``).
* One sender (forked, so it starts with no mproc state) sends one message
  to each of 2 000 short-lived receivers, forked by it with ``os.fork`` in
  batches of 50 alive at a time; each opens its mailbox, receives one
  message and exits. Its open file descriptors are counted after every
  send: the connection cache must keep them bounded.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection
from typing import Any, Optional

import mproc
import mproc._sender

from ._common import FORK, Children, Config, Gate, Row, Target, message, watchdog

_TIMEOUT = 30.0
#: The sender's connection cache (mproc._sender.MAX_LINKS) plus room for the
#: socket being connected before the oldest is evicted, a dup() while setting
#: its timeouts, and the directory fd of the count itself.
_LINKS = mproc._sender.MAX_LINKS
_SLACK = 4


# ---------------------------------------------------------------- many senders


def _sender(gate: Gate, parent: int, count: int) -> None:
    gate.child_ready_and_wait()
    for i in range(count):
        mproc.send(parent, message(i), timeout=_TIMEOUT)


def _putter(gate: Gate, q: Any, count: int) -> None:
    gate.child_ready_and_wait()
    for i in range(count):
        q.put(message(i))


def many_senders(senders: int, each: int, peer: str) -> dict[str, Any]:
    """Release ``senders`` children that each send ``each`` messages to us; time it."""
    parent = os.getpid()
    gate = Gate()
    q: Any = None
    received = 0
    error: Optional[str] = None
    try:
        with Children() as kids, watchdog(120):
            if peer == "mproc":
                mproc.open_mailbox()
                for _ in range(senders):
                    kids.start(_sender, gate, parent, each)
            else:
                q = FORK.Queue()
                for _ in range(senders):
                    kids.start(_putter, gate, q, each)
            gate.wait_ready(senders)
            t0 = gate.release(senders)
            try:
                for _ in range(senders * each):
                    if q is None:
                        mproc.receive(timeout=_TIMEOUT)
                    else:
                        q.get(timeout=_TIMEOUT)
                    received += 1
            except Exception as err:  # ReceiveTimeout, queue.Empty: reported
                error = f"{type(err).__name__}: {err}"
            elapsed = time.perf_counter() - t0
            codes = kids.join()
    finally:
        gate.close()
        if q is not None:
            q.close()
            q.join_thread()
    failed = sum(1 for c in codes if c != 0)
    return {"elapsed": elapsed, "received": received, "failed": failed, "error": error}


# ---------------------------------------------------------------- many receivers


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # minus the listing's own fd


def _one_shot_receiver() -> None:
    code = 1
    try:
        msg = mproc.receive(timeout=_TIMEOUT)
        code = 0 if msg.data == "hello" else 2
        mproc.close_mailbox()
    finally:
        os._exit(code)


def _pid_hopper(conn: Connection, total: int, batch: int) -> None:
    baseline = _open_fds()
    peak = baseline
    sent = 0
    bad_exits = 0
    errors: list[str] = []
    t0 = time.perf_counter()
    done = 0
    while done < total:
        pids = []
        for _ in range(min(batch, total - done)):
            pid = os.fork()
            if pid == 0:
                _one_shot_receiver()
            pids.append(pid)
        for pid in pids:
            try:
                mproc.send(pid, "hello", timeout=_TIMEOUT)
                sent += 1
            except mproc.MprocError as err:
                errors.append(f"{type(err).__name__}: {err}")
            peak = max(peak, _open_fds())
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                bad_exits += 1
        done += len(pids)
    conn.send(
        {
            "baseline_fds": baseline,
            "peak_fds": peak,
            "final_fds": _open_fds(),
            "sent": sent,
            "bad_exits": bad_exits,
            "errors": errors[:5],
            "elapsed": time.perf_counter() - t0,
        }
    )


def many_receivers(total: int, batch: int) -> dict[str, Any]:
    """Run the PID-hopping sender in a fresh child; return its fd counts."""
    mine, theirs = FORK.Pipe()
    try:
        with Children() as kids, watchdog(600):
            kids.start(_pid_hopper, theirs, total, batch)
            result: dict[str, Any] = mine.recv()
            result["codes"] = kids.join()
    finally:
        mine.close()
        theirs.close()
    return result


# ---------------------------------------------------------------- the benchmark


def scale(cfg: Config, rundir: str) -> list[Row]:
    """Benchmark 7: 200 senders all succeed; 2 000 PIDs keep the fds bounded."""
    mp_runs: list[dict[str, Any]] = []
    q_runs: list[dict[str, Any]] = []
    burst_runs: list[dict[str, Any]] = []
    burst_q_runs: list[dict[str, Any]] = []
    hops: list[dict[str, Any]] = []
    for _ in range(cfg.reps):
        mp_runs.append(many_senders(cfg.scale_senders, cfg.scale_each, "mproc"))
        q_runs.append(many_senders(cfg.scale_senders, cfg.scale_each, "Queue"))
        burst_runs.append(many_senders(cfg.scale_senders, 1, "mproc"))
        burst_q_runs.append(many_senders(cfg.scale_senders, 1, "Queue"))
        hops.append(many_receivers(cfg.scale_pids, cfg.scale_batch))
    want = cfg.scale_senders * cfg.scale_each
    all_ok = all(r["failed"] == 0 and r["received"] == want for r in mp_runs)
    errors = sorted({r["error"] for r in mp_runs if r["error"]})
    burst_ok = all(r["failed"] == 0 and r["received"] == cfg.scale_senders for r in burst_runs)
    burst_errors = sorted({r["error"] for r in burst_runs if r["error"]})
    hop_ok = all(h["sent"] == cfg.scale_pids and h["bad_exits"] == 0 for h in hops)
    hop_errors = sorted({e for h in hops for e in h["errors"]})
    growth = [float(h["peak_fds"] - h["baseline_fds"]) for h in hops]
    return [
        Row(
            "scale",
            f"{cfg.scale_senders} senders x {cfg.scale_each} msgs: time until all received",
            "ms",
            [r["elapsed"] * 1e3 for r in mp_runs],
            "multiprocessing.Queue",
            [r["elapsed"] * 1e3 for r in q_runs],
            Target("check", "", 0, "all sent and received"),
            ok=all_ok,
            note="; ".join(errors),
            extra={"mproc": mp_runs, "Queue": q_runs},
        ),
        Row(
            "scale",
            f"{cfg.scale_senders} senders, first message each: time until all received",
            "ms",
            [r["elapsed"] * 1e3 for r in burst_runs],
            "multiprocessing.Queue",
            [r["elapsed"] * 1e3 for r in burst_q_runs],
            Target("ratio", "<=", 1.0),
            ok=burst_ok,
            note=("" if burst_ok else "NOT ALL DELIVERED: ") + "; ".join(burst_errors),
            extra={"mproc": burst_runs, "Queue": burst_q_runs},
        ),
        Row(
            "scale",
            f"1 sender to {cfg.scale_pids} PIDs ({cfg.scale_batch} alive): peak extra fds",
            "fds",
            growth,
            target=Target("value", "<=", _LINKS + _SLACK),
            note=f"cache {_LINKS} + {_SLACK}"
            + ("" if hop_ok else "; NOT ALL DELIVERED: " + "; ".join(hop_errors)),
            extra={"runs": hops},
        ),
        Row(
            "scale",
            f"1 sender to {cfg.scale_pids} PIDs: time (fork + open + send + exit)",
            "s",
            [h["elapsed"] for h in hops],
            target=Target("check", "", 0, "every send delivered"),
            ok=hop_ok,
        ),
    ]
