"""Starting processes (issue 13): 150 fork ``mproc.Process`` vs 150 ``multiprocessing.Process``.

One sample, for each kind: 150 process objects are made (outside the
clock) with the same module-level target, which says ready through a pipe
and blocks until released (:class:`~benchmarks._common.Gate`). Then, on
one clock:

* **start()**: the 150 ``start()`` calls, back to back: what a program
  that starts a pool of workers waits for before it goes on. The children
  run their own start-up meanwhile, on the other core (or on this one: on
  two cores their work competes with the parent's, as it would for a
  user).
* **running**: from the first ``start()`` until all 150 children have
  said ready, i.e. run the first line of their target.
* **start + join**: from the first ``start()`` until all 150 are joined
  (released as soon as all are ready).

Every child is joined (reaped) and closed, also on failure (kill, then
join). The mproc kinds: a standalone ``mproc.Process(start_method="fork")``
(the row with the target), and the same started by a
``ProcessManager`` (contained: its own process group, the death signal,
forked by the launcher thread), for reference. The peer is
``multiprocessing.get_context("fork").Process``. Kinds alternate within
each repetition, after one warm-up round (imports, the reaper thread, the
mailbox, which a mproc start opens, are set up before the clock).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import mproc

from ._common import FORK, Config, Gate, Row, Target, check_codes, repeat, watchdog

_COUNT = 150
_PEER = 'multiprocessing.get_context("fork").Process'
_Sample = tuple[float, float, float]  # ms: start() calls, until all ran, until all joined


def _ready_and_wait(gate: Gate) -> None:
    gate.child_ready_and_wait()


def _run(make: Callable[[Gate], Any], manager: Optional[mproc.ProcessManager]) -> _Sample:
    gate = Gate()
    procs = [make(gate) for _ in range(_COUNT)]
    started: list[Any] = []
    try:
        with watchdog(120):
            t0 = time.perf_counter()
            if manager is None:
                for p in procs:
                    p.start()
                    started.append(p)
            else:
                for p in procs:
                    manager.start(p)
                    started.append(p)
            t1 = time.perf_counter()
            gate.wait_ready(_COUNT)
            t2 = time.perf_counter()
            gate.release(_COUNT)
            for p in started:
                p.join()
            t3 = time.perf_counter()
        check_codes("process_start", [p.exitcode for p in started])
    finally:
        for p in started:
            if p.exitcode is None:
                p.kill()
                p.join(10)
            p.close()
        if manager is not None:
            manager.clear()
        gate.close()
    return (t1 - t0) * 1e3, (t2 - t0) * 1e3, (t3 - t0) * 1e3


def _mproc_process(gate: Gate) -> mproc.Process:
    return mproc.Process(target=_ready_and_wait, args=(gate,), start_method="fork")


def _mp_process(gate: Gate) -> Any:
    return FORK.Process(target=_ready_and_wait, args=(gate,))


def process_start(cfg: Config, rundir: str) -> list[Row]:
    """Issue 13: 150 fork starts, mproc over multiprocessing; target <= 1.2x (goal <= 1.05x)."""
    cases: dict[str, Callable[[], _Sample]] = {
        "mproc": lambda: _run(_mproc_process, None),
        "managed": lambda: _run(_mproc_process, mproc.ProcessManager()),
        "mp": lambda: _run(_mp_process, None),
    }
    for case in cases.values():  # warm-up: imports, the reaper thread, our mailbox
        case()
    samples = repeat(cfg.reps, cases)

    def column(name: str, i: int) -> list[float]:
        return [s[i] for s in samples[name]]

    what = f"{_COUNT} fork Process"
    rows = [
        Row(
            "process_start",
            f"{what}.start() calls",
            "ms",
            column("mproc", 0),
            _PEER,
            column("mp", 0),
            Target("ratio", "<=", 1.2),
        ),
        Row(
            "process_start",
            f"{what}.start() calls",
            "ms",
            column("mproc", 0),
            _PEER,
            column("mp", 0),
            Target("ratio", "<=", 1.05, "goal"),
        ),
        Row(
            "process_start",
            f"{what}: start() until all run their target",
            "ms",
            column("mproc", 1),
            _PEER,
            column("mp", 1),
        ),
        Row(
            "process_start",
            f"{what}: start() until all are joined",
            "ms",
            column("mproc", 2),
            _PEER,
            column("mp", 2),
        ),
        Row(
            "process_start",
            f"{what}.start() calls, by a ProcessManager (contained)",
            "ms",
            column("managed", 0),
            _PEER,
            column("mp", 0),
            note="own process group, death signal, forked by the launcher thread",
        ),
    ]
    return rows
