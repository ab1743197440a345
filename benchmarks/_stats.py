"""What ``mproc ps`` costs the mailbox it asks (issue 12): ``stats_query_cost``.

A *receiver* (forked from us) takes messages as fast as a *sender* (forked
too) can send them, for a fixed window, while this process asks the
receiver's mailbox to describe itself (``_sender.query_stats``, the STATS
control frame ``mproc ps`` sends: a new connection with its handshake, then
the answer from the receiver's reader) at a fixed rate: none, one per second
(what ``mproc ps --watch 1`` does), or 100 per second. The receiver's CPU
time is ``getrusage(RUSAGE_SELF)`` from the start of the window to the last
message: every thread of it, so its reader and admission threads count too.

The figures are the receiver's CPU per message with and without the
queries, and what one query per second costs as a share of one core. At one
query per second that share is far below the run-to-run noise of a process
busy receiving (a few per cent of its CPU), so it is also measured with 100
queries per second, where it stands out, and divided by 100: the extra CPU
over the same number of messages at the no-query rate, per query.
"""

from __future__ import annotations

import resource
import time
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional

import mproc
from mproc import _sender

from ._common import FORK, Children, Config, Gate, Row, Target, check_codes, message, watchdog

_RATES = {"none": 0.0, "1/s": 1.0, "100/s": 100.0}


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _receiver(gate: Gate, conn: Connection) -> None:
    mproc.open_mailbox()
    gate.child_ready_and_wait()
    receive = mproc.receive
    c0, t0 = _cpu(), time.monotonic()
    count = 0
    while receive().data is not None:
        count += 1
    c1, t1 = _cpu(), time.monotonic()
    conn.send({"messages": count, "cpu": c1 - c0, "wall": t1 - t0})
    conn.recv()  # stay until the last query in flight has its answer


def _idle_receiver(gate: Gate, conn: Connection) -> None:
    mproc.open_mailbox()
    gate.child_ready_and_wait()
    conn.recv()
    c0 = _cpu()
    conn.send("counting")
    conn.recv()
    conn.send(_cpu() - c0)


def per_query_idle(queries: int) -> float:
    """Receiver CPU per stats query answered, in microseconds, by an otherwise idle mailbox."""
    mine, theirs = FORK.Pipe()
    gate = Gate()
    try:
        with Children() as kids, watchdog(120):
            receiver = kids.start(_idle_receiver, gate, theirs)
            pid = receiver.pid
            if pid is None:
                raise RuntimeError("the receiver did not start")
            gate.wait_ready(1)
            gate.release(1)
            _sender.query_stats(pid, 5.0)  # warm up (imports, the first handshake)
            mine.send("start")
            mine.recv()
            for _ in range(queries):
                _sender.query_stats(pid, 5.0)
            mine.send("stop")
            cpu = float(mine.recv())
            check_codes("stats_query_cost child", kids.join())
    finally:
        gate.close()
        mine.close()
        theirs.close()
    return cpu / queries * 1e6


def _sender_loop(gate: Gate, pid: int, window: float) -> None:
    send = mproc.send
    obj = message(0)
    gate.child_ready_and_wait()
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:
        for _ in range(100):  # the clock read costs less than the messages then
            send(pid, obj)
    send(pid, None)


def measure(window: float, rate: float) -> dict[str, Any]:
    """One window of full-speed receiving with ``rate`` stats queries per second."""
    mine, theirs = FORK.Pipe()
    gate = Gate()
    try:
        with Children() as kids, watchdog(window + 60):
            receiver = kids.start(_receiver, gate, theirs)
            pid = receiver.pid
            if pid is None:
                raise RuntimeError("the receiver did not start")
            kids.start(_sender_loop, gate, pid, window)
            gate.wait_ready(2)
            gate.release(2)
            queries = 0
            answered_groups: Optional[dict[str, int]] = None
            if rate > 0:
                period = 1.0 / rate
                due = time.monotonic()
                while not mine.poll(max(due - time.monotonic(), 0.0)):
                    answered_groups = _sender.query_stats(pid, 5.0)["groups"]
                    queries += 1
                    due += period
            result: dict[str, Any] = mine.recv()
            mine.send("bye")
            check_codes("stats_query_cost child", kids.join())
    finally:
        gate.close()
        mine.close()
        theirs.close()
    result.update(rate=rate, queries=queries, last_groups=answered_groups)
    return result


def _per_message_us(run: dict[str, Any]) -> float:
    return float(run["cpu"]) / max(int(run["messages"]), 1) * 1e6


def stats_query_cost(cfg: Config, rundir: str) -> list[Row]:
    """Receiver CPU with and without stats queries; target: < 1 % of a core at 1 query/s."""
    window = 1.5 if cfg.quick else 3.0
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in _RATES}
    cases: dict[str, Callable[[], dict[str, Any]]] = {
        name: (lambda r=rate: measure(window, r)) for name, rate in _RATES.items()
    }
    for _ in range(cfg.reps):  # interleaved: drift of the machine hits every case alike
        for name, case in cases.items():
            runs[name].append(case())

    none = runs["none"]
    n_idle = 200 if cfg.quick else 1000
    idle_us = [per_query_idle(n_idle) for _ in range(cfg.reps)]

    def extra_share(run: dict[str, Any], base: dict[str, Any]) -> float:
        """CPU beyond the same messages at the no-query rate, % of one core over the window."""
        extra = run["cpu"] - run["messages"] * base["cpu"] / max(base["messages"], 1)
        return 100.0 * extra / run["wall"]

    per_query_share = [  # % of one core that one query per second costs
        extra_share(run, base) / max(run["queries"] / run["wall"], 1e-9)
        for run, base in zip(runs["100/s"], none)
    ]
    direct_share = [extra_share(run, base) for run, base in zip(runs["1/s"], none)]
    noise = [extra_share(a, b) for a, b in zip(none[1:], none[:-1])]

    def keep(name: str) -> dict[str, Any]:
        return {
            "runs": [{k: r[k] for k in ("messages", "cpu", "wall", "queries")} for r in runs[name]]
        }

    msgs = int(sum(r["messages"] for r in none) / max(len(none), 1))
    return [
        Row(
            "stats_query_cost",
            f"receiver CPU per message, 1 stats query/s ({window:g} s windows, ~{msgs} msgs)",
            "us",
            [_per_message_us(r) for r in runs["1/s"]],
            "no queries",
            [_per_message_us(r) for r in none],
            extra={"1/s": keep("1/s"), "none": keep("none")},
        ),
        Row(
            "stats_query_cost",
            "CPU of 1 stats query/s, % of one core (measured at 100/s, per query)",
            "%",
            per_query_share,
            target=Target("value", "<=", 1.0),
            note="the receiver's extra CPU at 100 queries/s over the same messages at the "
            "no-query rate, divided by the query rate",
            extra={"100/s": keep("100/s")},
        ),
        Row(
            "stats_query_cost",
            "CPU of 1 stats query/s, % of one core (measured directly at 1/s)",
            "%",
            direct_share,
            note="within the run-to-run noise of a receiving process; the same figure "
            "between two query-free runs: " + ", ".join(f"{x:+.2f}" for x in noise),
            extra={"noise_between_query_free_runs": noise},
        ),
        Row(
            "stats_query_cost",
            f"receiver CPU per stats query, idle mailbox ({n_idle} queries)",
            "us",
            idle_us,
            note="connection, handshake and answer, all threads of the receiver; "
            "1 query/s costs this many us per s, i.e. this / 10 000 % of one core",
        ),
    ]
