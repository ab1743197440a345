"""Request/reply latency and one 64 MiB object one way (benchmarks 3 and 4).

The peer of both is a raw ``multiprocessing.Pipe`` carrying
``pickle.dumps(obj, protocol=5)`` with ``send_bytes``/``recv_bytes``: what a
careful programmer gets without any library.
"""

from __future__ import annotations

import os
import pickle
import time
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional

import mproc

from ._common import (
    FORK,
    Children,
    Config,
    Gate,
    Row,
    Target,
    check_codes,
    message,
    pin_all,
    pinned,
    repeat,
    watchdog,
)

_PROTOCOL = 5
_WARMUP = 200  # round trips before the clock starts: connections made, caches warm


# ---------------------------------------------------------------- round trip

#: Where the two processes run: (ours, the echo's) CPU, or None for the scheduler's choice.
#: Placement dominates small round trips on a VM: a wake-up across CPUs costs far
#: more than the work, so the pinned rows separate the library's own overhead
#: (same CPU) from the wake-up path (two CPUs).
Placement = Optional[tuple[int, int]]


def _mproc_echo(gate: Gate, count: int, cpu: Optional[int]) -> None:
    mproc.open_mailbox()
    if cpu is not None:
        pin_all({cpu})
    gate.child_ready_and_wait()
    receive, send = mproc.receive, mproc.send
    for _ in range(count):
        msg = receive()
        send(msg.sender_pid, msg.data)


def _pipe_echo(gate: Gate, conn: Connection, count: int, cpu: Optional[int]) -> None:
    if cpu is not None:
        pin_all({cpu})
    gate.child_ready_and_wait()
    recv_bytes, send_bytes = conn.recv_bytes, conn.send_bytes
    loads, dumps = pickle.loads, pickle.dumps
    for _ in range(count):
        send_bytes(dumps(loads(recv_bytes()), _PROTOCOL))


def _time_trips(trips: int, one_trip: Callable[[], object]) -> float:
    for _ in range(_WARMUP):
        one_trip()
    t0 = time.perf_counter()
    for _ in range(trips):
        one_trip()
    return (time.perf_counter() - t0) / trips * 1e6


def mproc_round_trip(trips: int, where: Placement = None) -> float:
    """Return microseconds per round trip: send to an echo process, receive the echo."""
    mproc.open_mailbox()
    gate = Gate()
    obj = message(0)
    cpu, echo_cpu = (None, None) if where is None else where
    try:
        with pinned(None if cpu is None else {cpu}), Children() as kids, watchdog(120):
            echo = kids.start(_mproc_echo, gate, trips + _WARMUP, echo_cpu)
            pid = echo.pid
            if pid is None:
                raise RuntimeError("the echo process did not start")
            gate.wait_ready(1)
            gate.release(1)
            send, receive = mproc.send, mproc.receive

            def one_trip() -> None:
                send(pid, obj)
                receive()

            us = _time_trips(trips, one_trip)
            check_codes("echo", kids.join())
    finally:
        gate.close()
    return us


def pipe_round_trip(trips: int, where: Placement = None) -> float:
    """Return microseconds per round trip over a duplex Pipe, pickling both ways."""
    mine, theirs = FORK.Pipe(duplex=True)
    gate = Gate()
    obj = message(0)
    cpu, echo_cpu = (None, None) if where is None else where
    try:
        with pinned(None if cpu is None else {cpu}), Children() as kids, watchdog(120):
            kids.start(_pipe_echo, gate, theirs, trips + _WARMUP, echo_cpu)
            gate.wait_ready(1)
            gate.release(1)
            send_bytes, recv_bytes = mine.send_bytes, mine.recv_bytes
            loads, dumps = pickle.loads, pickle.dumps

            def one_trip() -> None:
                send_bytes(dumps(obj, _PROTOCOL))
                loads(recv_bytes())

            us = _time_trips(trips, one_trip)
            check_codes("echo", kids.join())
    finally:
        gate.close()
        mine.close()
        theirs.close()
    return us


def round_trip(cfg: Config, rundir: str) -> list[Row]:
    """Benchmark 3: request/reply; target <= 1.5x a raw Pipe round trip."""
    placements: dict[str, Placement] = {"scheduler's choice of CPUs": None}
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        placements["both pinned to one CPU"] = (cpus[0], cpus[0])
        placements["pinned to two CPUs"] = (cpus[0], cpus[1])
    cases: dict[str, Callable[[], float]] = {}
    for label, where in placements.items():
        cases[f"mproc {label}"] = partial(mproc_round_trip, cfg.round_trips, where)
        cases[f"pipe {label}"] = partial(pipe_round_trip, cfg.round_trips, where)
    samples = repeat(cfg.reps, cases)
    return [
        Row(
            "round_trip",
            f"latency per round trip, {label} ({cfg.round_trips} trips)",
            "us",
            samples[f"mproc {label}"],
            "Pipe send_bytes (raw, duplex)",
            samples[f"pipe {label}"],
            Target("ratio", "<=", 1.5) if where is None else None,
        )
        for label, where in placements.items()
    ]


# ---------------------------------------------------------------- bulk

#: The objects of the bulk rows: (label, how to make one of ``size`` bytes).
#: numpy is in the ``bench`` extra; without it, its rows are left out.
try:
    import numpy
except ImportError:  # pragma: no cover - the bench extra installs it
    numpy = None


def _blob(size: int) -> bytes:
    # Not all zeros, so nothing along the way can cheat on a page of zeros.
    return bytes(range(256)) * (size // 256)


def _make(kind: str, size: int) -> Any:
    if kind == "bytes":
        return _blob(size)
    if kind == "bytearray":
        return bytearray(_blob(size))
    if numpy is None:  # pragma: no cover - kinds are listed only with numpy
        raise RuntimeError("numpy is not installed (pip install mproc[bench])")
    return numpy.frombuffer(_blob(size), dtype=numpy.uint8).copy()  # writable, owns its memory


def _usable(got: Any, touch: bool) -> int:
    """The size of what arrived; with ``touch``, also read every byte of it (sum)."""
    if touch:
        if numpy is not None and isinstance(got, numpy.ndarray):
            got.sum(dtype=numpy.uint64)
        else:
            sum(memoryview(got).cast("Q")[::512])  # one read per 4 KiB page
    return len(got) if not hasattr(got, "nbytes") else int(got.nbytes)


def _mproc_bulk_sender(gate: Gate, parent: int, size: int, kind: str) -> None:
    data = _make(kind, size)
    gate.child_ready_and_wait()
    mproc.send(parent, data, timeout=60)


def _pipe_bulk_sender(gate: Gate, conn: Connection, size: int, kind: str) -> None:
    data = _make(kind, size)
    gate.child_ready_and_wait()
    conn.send_bytes(pickle.dumps(data, _PROTOCOL))


def mproc_bulk(size: int, kind: str = "bytes", touch: bool = False) -> float:
    """Return MiB/s for one object of ``size`` bytes, sender child -> us.

    The clock runs from the sender's start (the gate) until this process
    holds the received object: pickling, writing, reading and unpickling.
    For a numpy array that arrives mapped (mproc's out-of-band buffers), its
    pages are read lazily: with ``touch`` the clock also covers reading
    every page of it once (what a first use of the data costs).
    """
    parent = os.getpid()
    mproc.open_mailbox()
    gate = Gate()
    try:
        with Children() as kids, watchdog(120):
            kids.start(_mproc_bulk_sender, gate, parent, size, kind)
            gate.wait_ready(1)
            t0 = gate.release(1)
            got = mproc.receive().data
            n = _usable(got, touch)
            elapsed = time.perf_counter() - t0
            check_codes("bulk sender", kids.join())
    finally:
        gate.close()
    if n != size:
        raise RuntimeError(f"mproc delivered {n} of {size} bytes")
    return size / elapsed / (1 << 20)


def pipe_bulk(size: int, kind: str = "bytes", touch: bool = False) -> float:
    """Return MiB/s for the same object through a Pipe (send_bytes of its in-band pickle)."""
    r, w = FORK.Pipe(duplex=False)
    gate = Gate()
    try:
        with Children() as kids, watchdog(120):
            kids.start(_pipe_bulk_sender, gate, w, size, kind)
            gate.wait_ready(1)
            t0 = gate.release(1)
            got = pickle.loads(r.recv_bytes())
            n = _usable(got, touch)
            elapsed = time.perf_counter() - t0
            check_codes("bulk sender", kids.join())
    finally:
        gate.close()
        r.close()
        w.close()
    if n != size:
        raise RuntimeError(f"the Pipe delivered {n} of {size} bytes")
    return size / elapsed / (1 << 20)


def bulk_64mib(cfg: Config, rundir: str) -> list[Row]:
    """Benchmark 4: one big object one way, mproc vs a Pipe carrying its pickle.

    ``bytes`` (>= 1.0x Pipe, stretch >= 3x), ``bytearray`` and a numpy
    array (>= 3x, goal >= 5x: their buffers travel in a memfd, mapped, not
    copied; a bytes or bytearray is copied once out of the mapping, as it
    must own its memory), and the numpy array read once after arrival
    (the mapped pages are touched for the first time: reported, no target).
    """
    cases: dict[str, Callable[[], float]] = {}
    kinds = ["bytes", "bytearray"] + (["numpy"] if numpy is not None else [])
    for kind in kinds:
        cases[f"mproc {kind}"] = partial(mproc_bulk, cfg.bulk_bytes, kind)
        cases[f"pipe {kind}"] = partial(pipe_bulk, cfg.bulk_bytes, kind)
    if numpy is not None:
        cases["mproc numpy read"] = partial(mproc_bulk, cfg.bulk_bytes, "numpy", True)
        cases["pipe numpy read"] = partial(pipe_bulk, cfg.bulk_bytes, "numpy", True)
    samples = repeat(cfg.reps, cases)
    mib = cfg.bulk_bytes >> 20
    peer = "Pipe send_bytes (raw)"
    rows = [
        Row(
            "bulk_64mib",
            f"throughput, one {mib} MiB bytes",
            "MiB/s",
            samples["mproc bytes"],
            peer,
            samples["pipe bytes"],
            Target("ratio", ">=", 1.0),
        ),
        Row(
            "bulk_64mib",
            f"throughput, one {mib} MiB bytes",
            "MiB/s",
            samples["mproc bytes"],
            peer,
            samples["pipe bytes"],
            Target("ratio", ">=", 3.0, "stretch"),
        ),
    ]
    for kind, label in (("bytearray", "bytearray"), ("numpy", "numpy uint8 array")):
        if kind not in kinds:
            continue
        for target in (Target("ratio", ">=", 3.0), Target("ratio", ">=", 5.0, "goal")):
            rows.append(
                Row(
                    "bulk_64mib",
                    f"throughput, one {mib} MiB {label}",
                    "MiB/s",
                    samples[f"mproc {kind}"],
                    peer,
                    samples[f"pipe {kind}"],
                    target,
                )
            )
    if numpy is not None:
        rows.append(
            Row(
                "bulk_64mib",
                f"throughput, one {mib} MiB numpy array, every page read after arrival",
                "MiB/s",
                samples["mproc numpy read"],
                peer,
                samples["pipe numpy read"],
            )
        )
    return rows
