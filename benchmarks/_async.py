"""mproc.asyncio against the blocking API, interleaved in one run (issue 11).

* ``async_receive``: one forked sender streams small messages; the parent
  takes them with ``await mproc.asyncio.receive()`` on the default asyncio
  loop (and on uvloop when installed), or with the blocking
  ``mproc.receive()``. Target: async at least 0.9x the blocking throughput.
* ``async_call``: ``await mproc.asyncio.call()`` round trips to a child
  running ``mproc.serve()``, against blocking ``mproc.call()`` to the same
  kind of child. Target: at most 1.2x the blocking round trip.
"""

from __future__ import annotations

import asyncio
import os
from functools import partial
from typing import Any, Callable

import mproc
import mproc.asyncio as ma

from ._common import Config, Row, Target, polling_off, repeat
from ._messaging import _mproc_sender, _run
from ._rpc import mproc_call_round_trip

try:
    import uvloop
except ImportError:  # an optional extra
    uvloop = None

_WARMUP = 200


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop" and uvloop is not None:
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


def async_receive_case(n: int, kind: str) -> float:
    """Return msg/s for ``n`` messages taken with ``await receive()`` on a ``kind`` loop."""
    parent = os.getpid()
    mproc.open_mailbox()
    loop = _new_loop(kind)

    async def take() -> None:
        receive = ma.receive
        for _ in range(n):
            await receive()

    try:
        return _run(
            1,
            n,
            lambda k, g, m: k.start(_mproc_sender, g, parent, m),
            lambda: loop.run_until_complete(take()),
        )
    finally:
        loop.close()


def blocking_receive_case(n: int) -> float:
    parent = os.getpid()
    mproc.open_mailbox()

    def take() -> None:
        receive = mproc.receive
        for _ in range(n):
            receive()

    return _run(1, n, lambda k, g, m: k.start(_mproc_sender, g, parent, m), take)


def _kinds() -> list[str]:
    return ["asyncio"] + (["uvloop"] if uvloop is not None else [])


def _without_polling(case: Callable[[], float]) -> float:
    with polling_off():
        return case()


def async_receive(cfg: Config, rundir: str) -> list[Row]:
    """Async receive throughput vs blocking; target >= 0.9x.

    An event loop never polls before it blocks (it would hold up its other
    tasks), a blocking receive() does (see Receiver._spin): the reference
    rows compare with a blocking receive() that does not poll either.
    """
    n = cfg.messages // 2
    cases: dict[str, Callable[[], float]] = {
        "blocking": partial(blocking_receive_case, n),
        "no polling": partial(_without_polling, partial(blocking_receive_case, n)),
    }
    for kind in _kinds():
        cases[kind] = partial(async_receive_case, n, kind)
    samples = repeat(cfg.reps, cases)
    metric = "throughput, {n} small messages 1->1, await receive() on {kind}"
    return [
        Row(
            "async_receive",
            metric.format(n=n, kind=kind),
            "msg/s",
            samples[kind],
            peer,
            samples[case],
            Target("ratio", ">=", 0.9) if case == "blocking" else None,
        )
        for kind in _kinds()
        for case, peer in (
            ("blocking", "blocking mproc.receive()"),
            ("no polling", "blocking receive(), MPROC_SPIN_US=0"),
        )
    ]


def _async_call_round_trip(trips: int, kind: str) -> float:
    loop = _new_loop(kind)
    try:
        result: float = mproc_call_round_trip(trips, runner=partial(_run_calls, loop))
        return result
    finally:
        loop.close()


def _run_calls(loop: asyncio.AbstractEventLoop, pid: int, obj: Any, count: int) -> None:
    async def calls() -> None:
        call = ma.call
        for _ in range(count):
            await call(pid, obj)

    loop.run_until_complete(calls())


def async_call(cfg: Config, rundir: str) -> list[Row]:
    """Async call() round trip vs blocking call(); target <= 1.2x."""
    blocking = partial(mproc_call_round_trip, cfg.round_trips)
    cases: dict[str, Callable[[], float]] = {
        "blocking": blocking,
        "no polling": partial(_without_polling, blocking),
    }
    for kind in _kinds():
        cases[kind] = partial(_async_call_round_trip, cfg.round_trips, kind)
    samples = repeat(cfg.reps, cases)
    return [
        Row(
            "async_call",
            f"latency per await call() round trip on {kind} ({cfg.round_trips} calls)",
            "us",
            samples[kind],
            peer,
            samples[case],
            Target("ratio", "<=", 1.2) if case == "blocking" else None,
        )
        for kind in _kinds()
        for case, peer in (
            ("blocking", "blocking mproc.call()"),
            ("no polling", "blocking call(), MPROC_SPIN_US=0"),
        )
    ]


__all__ = ["async_call", "async_receive"]
