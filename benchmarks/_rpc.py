"""``call()`` round trips and sends by registered name (issue 9).

* ``call_round_trip``: ``mproc.call()`` to a child running ``mproc.serve()``
  (echo), against the raw duplex ``Pipe`` round trip of the round-trip
  benchmark, interleaved in one run. Target: at most 1.6x the Pipe.
* ``send_by_name``: a one-way stream of small messages sent by registered
  name and by PID to the same draining child, interleaved; the name is
  resolved once before the clock starts. Target: at most 1.1x by PID.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Callable, Union

import mproc

from ._common import Children, Config, Gate, Row, Target, check_codes, message, repeat, watchdog
from ._transfer import _WARMUP, pipe_round_trip

_NAME = "bench-echo"


def _serve_echo(gate: Gate, count: int) -> None:
    mproc.open_mailbox()
    gate.child_ready_and_wait()
    served = 0

    def echo(data: object) -> object:
        nonlocal served
        served += 1
        if served >= count:
            raise mproc.StopServing(data)
        return data

    mproc.serve(echo, timeout=60)


def _blocking_calls(pid: int, obj: object, count: int) -> None:
    call = mproc.call
    for _ in range(count):
        call(pid, obj)


def mproc_call_round_trip(
    trips: int, runner: Callable[[int, object, int], None] = _blocking_calls
) -> float:
    """Return microseconds per ``call()`` round trip to a serving child.

    ``runner(pid, obj, count)`` makes the calls (the async benchmark passes its own).
    """
    mproc.open_mailbox()
    gate = Gate()
    obj = message(0)
    try:
        with Children() as kids, watchdog(120):
            server = kids.start(_serve_echo, gate, trips + _WARMUP + 1)
            pid = server.pid
            if pid is None:
                raise RuntimeError("the server did not start")
            gate.wait_ready(1)
            gate.release(1)
            runner(pid, obj, _WARMUP)
            t0 = time.perf_counter()
            runner(pid, obj, trips)
            us = (time.perf_counter() - t0) / trips * 1e6
            try:
                mproc.call(pid, obj)
            except mproc.StopServing:
                pass
            check_codes("server", kids.join())
    finally:
        gate.close()
    return us


def call_round_trip(cfg: Config, rundir: str) -> list[Row]:
    """call() round trip vs a raw Pipe round trip; target <= 1.6x."""
    cases: dict[str, Callable[[], float]] = {
        "mproc": partial(mproc_call_round_trip, cfg.round_trips),
        "pipe": partial(pipe_round_trip, cfg.round_trips),
    }
    samples = repeat(cfg.reps, cases)
    return [
        Row(
            "call_round_trip",
            f"latency per call() round trip ({cfg.round_trips} calls)",
            "us",
            samples["mproc"],
            "Pipe send_bytes (raw, duplex)",
            samples["pipe"],
            Target("ratio", "<=", 1.6),
        )
    ]


def _drain(gate: Gate, parent: int, count: int) -> None:
    mproc.register(_NAME)
    gate.child_ready_and_wait()
    receive = mproc.receive
    for _ in range(count):
        receive()
    mproc.unregister(_NAME)  # a forked child's exit runs no atexit: give it up here
    mproc.send(parent, "done", "done", timeout=60)


def mproc_send_stream(n: int, by_name: bool) -> float:
    """Return microseconds per send() of a small message, by name or by PID."""
    mproc.open_mailbox()
    gate = Gate()
    obj = message(0)
    try:
        with Children() as kids, watchdog(120):
            child = kids.start(_drain, gate, mproc.pid(), n + _WARMUP)
            gate.wait_ready(1)
            if child.pid is None:
                raise RuntimeError("the receiver did not start")
            target: Union[int, str] = _NAME if by_name else child.pid
            gate.release(1)
            send = mproc.send
            for _ in range(_WARMUP):
                send(target, obj)
            t0 = time.perf_counter()
            for _ in range(n):
                send(target, obj)
            mproc.receive("done", timeout=60)
            us = (time.perf_counter() - t0) / n * 1e6
            check_codes("receiver", kids.join())
    finally:
        gate.close()
    return us


def send_by_name(cfg: Config, rundir: str) -> list[Row]:
    """send() by registered name vs by PID, after the first resolution; target <= 1.1x."""
    n = cfg.messages // 2
    cases: dict[str, Callable[[], float]] = {
        "name": partial(mproc_send_stream, n, True),
        "pid": partial(mproc_send_stream, n, False),
    }
    samples = repeat(cfg.reps, cases)
    return [
        Row(
            "send_by_name",
            f"time per send() of a small message, {n} in a stream",
            "us",
            samples["name"],
            "mproc send() by PID",
            samples["pid"],
            Target("ratio", "<=", 1.1),
        )
    ]
