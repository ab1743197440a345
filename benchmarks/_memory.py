"""A receiver that stops reading: back-pressure must bound its memory (benchmark 6).

The receiver (forked) opens its mailbox and never calls ``receive()``; a
sender (forked) sends 1 KiB messages with a short timeout until it gets
``MailboxFull``. This process samples the receiver's RSS every millisecond
meanwhile. For contrast, a ``multiprocessing.Queue`` nobody reads: ``put()``
never blocks, so the sender's memory grows with every message.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import mproc
import mproc._runtime

from ._common import FORK, Children, Config, Row, Target, rss_of, watchdog

_SIZE = 1024  # bytes of payload per message
_CAP = 2_000_000  # a sender that never hears MailboxFull stops here: a FAIL


def _receiver(conn: Connection) -> None:
    mproc.open_mailbox()
    conn.send(os.getpid())
    conn.recv()  # "stop": until then, read nothing
    mproc.close_mailbox()


def _flooder(conn: Connection, receiver: int, timeout: float) -> None:
    payload = os.urandom(_SIZE)
    sent = 0
    outcome = "no MailboxFull"
    t0 = time.perf_counter()
    while sent < _CAP:
        try:
            mproc.send(receiver, sent.to_bytes(8, "little") + payload[8:], timeout=timeout)
        except mproc.MailboxFull:
            outcome = "MailboxFull"
            break
        except mproc.MprocError as err:
            outcome = f"{type(err).__name__}: {err}"
            break
        sent += 1
    conn.send((sent, outcome, time.perf_counter() - t0))


def _sample_peak(pid: int, stop: threading.Event, out: list[int]) -> None:
    while not stop.is_set():
        try:
            out.append(rss_of(pid))
        except OSError:
            return
        time.sleep(0.001)


def mproc_flood(timeout: float) -> dict[str, Any]:
    """One flood; return the receiver's baseline and peak RSS and what the sender saw."""
    r_mine, r_theirs = FORK.Pipe()
    s_mine, s_theirs = FORK.Pipe()
    try:
        with Children() as kids, watchdog(120):
            kids.start(_receiver, r_theirs)
            pid = r_mine.recv()
            time.sleep(0.05)  # let its reader threads settle before the baseline
            baseline = rss_of(pid)
            samples: list[int] = []
            stop = threading.Event()
            sampler = threading.Thread(target=_sample_peak, args=(pid, stop, samples))
            sampler.start()
            kids.start(_flooder, s_theirs, pid, timeout)
            sent, outcome, elapsed = s_mine.recv()
            stop.set()
            sampler.join()
            r_mine.send("stop")
            kids.join()
    finally:
        for c in (r_mine, r_theirs, s_mine, s_theirs):
            c.close()
    peak = max([baseline, *samples])
    return {
        "baseline": baseline,
        "peak": peak,
        "sent": sent,
        "outcome": outcome,
        "elapsed": elapsed,
        "samples": len(samples),
    }


def _queue_putter(conn: Connection, q: Any, count: int) -> None:
    payload = os.urandom(_SIZE)
    before = rss_of(os.getpid())
    t0 = time.perf_counter()
    for i in range(count):
        # A new object each time: put() keeps a reference, pickling comes later.
        q.put(i.to_bytes(8, "little") + payload[8:])
    elapsed = time.perf_counter() - t0
    time.sleep(0.05)  # the feeder thread holds what the pipe cannot take
    conn.send((rss_of(os.getpid()) - before, elapsed))
    q.cancel_join_thread()  # nobody will read it: exit without flushing


def queue_flood(count: int) -> tuple[int, float]:
    """Put ``count`` messages into a Queue nobody reads; return the putter's RSS growth."""
    q = FORK.Queue()
    mine, theirs = FORK.Pipe()
    try:
        with Children() as kids, watchdog(120):
            kids.start(_queue_putter, theirs, q, count)
            growth, elapsed = mine.recv()
            kids.join()
    finally:
        mine.close()
        theirs.close()
        q.close()
        q.cancel_join_thread()
    return growth, elapsed


def memory_backpressure(cfg: Config, rundir: str) -> list[Row]:
    """Benchmark 6: the receiver's RSS stays bounded by the queue limit."""
    runs = []
    queue_growth: list[float] = []
    for _ in range(cfg.reps):
        runs.append(mproc_flood(cfg.flood_timeout))
        queue_growth.append(queue_flood(cfg.queue_contrast)[0] / (1 << 20))
    max_queue = mproc._runtime.DEFAULT_MAX_QUEUE
    # A group holds max_queue plus one credit window per sending connection.
    window = min(mproc._runtime.DEFAULT_WINDOW, max_queue)
    msg_bytes = len(pickle.dumps(os.urandom(_SIZE), protocol=5))
    bound = (2 * max_queue * msg_bytes + (50 << 20)) / (1 << 20)
    mib = 1 << 20
    growth = [(r["peak"] - r["baseline"]) / mib for r in runs]
    outcomes = sorted({r["outcome"] for r in runs})
    sent = [float(r["sent"]) for r in runs]
    return [
        Row(
            "memory_backpressure",
            f"receiver peak RSS growth (max_queue {max_queue} x {msg_bytes} B)",
            "MiB",
            growth,
            target=Target("value", "<=", round(bound, 1)),
            note="bound = 2 x max_queue x message + 50 MiB",
            extra={
                "runs": runs,
                "queue_limit_bytes": max_queue * msg_bytes,
            },
        ),
        Row(
            "memory_backpressure",
            f"messages accepted until MailboxFull ({cfg.flood_timeout:g} s timeout)",
            "msgs",
            sent,
            target=Target("check", "", 0, f"MailboxFull, {max_queue}..{max_queue + window} held"),
            ok=outcomes == ["MailboxFull"]
            and min(sent) >= max_queue
            and max(sent) <= max_queue + window,
            note=", ".join(outcomes),
        ),
        Row(
            "memory_backpressure",
            f"contrast: Queue nobody reads, sender RSS after {cfg.queue_contrast} puts",
            "MiB",
            queue_growth,
            note="put() never blocks: grows without bound",
        ),
    ]
