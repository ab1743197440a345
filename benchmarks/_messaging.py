"""Throughput: one and four sender processes to one receiver (benchmarks 1 and 2).

The receiver is this process. The clock starts when the (already forked and
set-up) senders are released, and stops when the receiver has unpickled the
last message: connection set-up, pickling, the transport and unpickling are
all inside it, for every peer alike.
"""

from __future__ import annotations

import os
import pickle
import time
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
    repeat,
    watchdog,
)

try:
    import zmq
except ImportError:  # the optional "bench" extra
    zmq = None  # type: ignore[assignment]

_PROTOCOL = 5


# ---------------------------------------------------------------- senders (in children)


def _mproc_sender(gate: Gate, parent: int, n: int) -> None:
    send = mproc.send
    gate.child_ready_and_wait()
    for i in range(n):
        send(parent, message(i))


def _mproc_batch_sender(gate: Gate, parent: int, n: int) -> None:
    gate.child_ready_and_wait()
    with mproc.Batch(parent) as batch:  # flushes by itself every 1 MiB, and at the end
        add = batch.send
        for i in range(n):
            add(message(i))


def _queue_sender(gate: Gate, q: Any, n: int) -> None:
    put = q.put
    gate.child_ready_and_wait()
    for i in range(n):
        put(message(i))


def _pipe_sender(gate: Gate, conn: Connection, n: int) -> None:
    send_bytes = conn.send_bytes
    dumps = pickle.dumps
    gate.child_ready_and_wait()
    for i in range(n):
        send_bytes(dumps(message(i), _PROTOCOL))


def _zmq_sender(gate: Gate, address: str, n: int, done: tuple[int, int]) -> None:
    os.close(done[1])
    ctx = zmq.Context()  # never the parent's: a zmq context does not survive fork
    push = ctx.socket(zmq.PUSH)
    push.connect(address)
    dumps = pickle.dumps
    send = push.send
    gate.child_ready_and_wait()
    for i in range(n):
        send(dumps(message(i), _PROTOCOL))
    # Stay connected until the receiver has everything: libzmq (4.3) drops the
    # messages a PULL socket holds over its RCVHWM when the PUSH peer goes away.
    os.read(done[0], 1)
    push.close(linger=0)
    ctx.term()


# ---------------------------------------------------------------- one run of each peer


#: The receiving process's CPU time per message (all its threads: for pyzmq, its
#: I/O thread too) in the last run of each case, in microseconds.
receiver_cpu: dict[str, float] = {}


def _run(
    senders: int,
    n: int,
    start: Callable[[Children, Gate, int], object],
    drain: Callable[[], None],
    case: str = "",
) -> float:
    """Fork ``senders`` children, release them, run ``drain``; return msg/s."""
    gate = Gate()
    try:
        with Children() as kids, watchdog(120):
            for _ in range(senders):
                start(kids, gate, n // senders)
            gate.wait_ready(senders)
            cpu0 = time.process_time()
            t0 = gate.release(senders)
            drain()
            elapsed = time.perf_counter() - t0
            if case:
                receiver_cpu[case] = (time.process_time() - cpu0) / n * 1e6
            check_codes("sender", kids.join())
    finally:
        gate.close()
    return n / elapsed


def mproc_case(senders: int, n: int, batch: bool = False) -> float:
    parent = os.getpid()
    mproc.open_mailbox()  # open before the senders connect, as a receiver would be

    def drain() -> None:
        receive = mproc.receive
        for _ in range(n):
            receive()

    sender = _mproc_batch_sender if batch else _mproc_sender
    case = f"mproc{' batch' if batch else ''} {senders}"
    return _run(senders, n, lambda k, g, m: k.start(sender, g, parent, m), drain, case)


def queue_case(senders: int, n: int) -> float:
    q = FORK.Queue()

    def drain() -> None:
        get = q.get
        for _ in range(n):
            get()

    try:
        return _run(senders, n, lambda k, g, m: k.start(_queue_sender, g, q, m), drain)
    finally:
        q.close()
        q.join_thread()


def pipe_case(n: int) -> float:
    r, w = FORK.Pipe(duplex=False)

    def drain() -> None:
        recv_bytes = r.recv_bytes
        loads = pickle.loads
        for _ in range(n):
            loads(recv_bytes())

    try:
        return _run(1, n, lambda k, g, m: k.start(_pipe_sender, g, w, m), drain)
    finally:
        r.close()
        w.close()


def zmq_case(senders: int, n: int, rundir: str) -> float:
    path = os.path.join(rundir, f"zmq-{os.getpid()}.ipc")
    address = f"ipc://{path}"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(address)
    done = os.pipe()
    still_open = list(done)

    def drain() -> None:
        recv = pull.recv
        loads = pickle.loads
        for _ in range(n):
            loads(recv())
        os.close(still_open.pop())  # the write end: the senders may go now

    try:
        return _run(
            senders,
            n,
            lambda k, g, m: k.start(_zmq_sender, g, address, m, done),
            drain,
            f"zmq {senders}",
        )
    finally:
        for fd in still_open:
            os.close(fd)
        pull.close(linger=0)
        ctx.term()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------- the benchmarks


def _throughput(
    name: str, senders: int, cfg: Config, rundir: str, target: float, zmq_target: float
) -> list[Row]:
    n = cfg.messages - cfg.messages % senders
    cases: dict[str, Callable[[], float]] = {
        "mproc": lambda: mproc_case(senders, n),
        "Queue": lambda: queue_case(senders, n),
    }
    if senders == 1:
        cases["Pipe"] = lambda: pipe_case(n)
    if zmq is not None:
        cases["zmq"] = lambda: zmq_case(senders, n, rundir)
    samples = repeat(cfg.reps, cases)
    return _rows(name, senders, n, samples, target, zmq_target)


def _rows(
    name: str,
    senders: int,
    n: int,
    samples: dict[str, list[float]],
    target: float,
    zmq_target: float,
) -> list[Row]:
    metric = f"throughput, {senders} sender{'s' if senders > 1 else ''}, {n} msgs"
    rows = [
        Row(
            name,
            metric,
            "msg/s",
            samples["mproc"],
            "multiprocessing.Queue",
            samples["Queue"],
            Target("ratio", ">=", target),
        )
    ]
    if "Pipe" in samples:
        rows.append(
            Row(name, metric, "msg/s", samples["mproc"], "Pipe send_bytes (raw)", samples["Pipe"])
        )
    if "zmq" in samples:
        rows.append(
            Row(
                name,
                metric,
                "msg/s",
                samples["mproc"],
                "pyzmq ipc PUSH/PULL",
                samples["zmq"],
                Target("ratio", ">=", zmq_target),
            )
        )
    return rows


def _cpu_samples(case: str, run: Callable[[], float]) -> tuple[Callable[[], float], list[float]]:
    """Wrap a case so that each run also records the receiver's CPU per message."""
    cpu: list[float] = []

    def wrapped() -> float:
        rate = run()
        cpu.append(receiver_cpu[case])
        return rate

    return wrapped, cpu


def one_to_one(cfg: Config, rundir: str) -> list[Row]:
    """Benchmark 1: one sender, one receiver; >= 1.0x Queue, >= 0.6x pyzmq (issue 13)."""
    return _throughput("one_to_one", 1, cfg, rundir, 1.0, 0.6)


def four_to_one(cfg: Config, rundir: str) -> list[Row]:
    """Benchmark 2: four senders, one receiver; >= 1.2x Queue, >= 0.5x pyzmq (issue 13).

    Also reports the receiving process's CPU time per message (all its
    threads), mproc beside pyzmq.
    """
    n = cfg.messages - cfg.messages % 4
    mp_run, mp_cpu = _cpu_samples("mproc 4", lambda: mproc_case(4, n))
    cases: dict[str, Callable[[], float]] = {"mproc": mp_run, "Queue": lambda: queue_case(4, n)}
    zmq_cpu: list[float] = []
    if zmq is not None:
        cases["zmq"], zmq_cpu = _cpu_samples("zmq 4", lambda: zmq_case(4, n, rundir))
    samples = repeat(cfg.reps, cases)
    rows = _rows("four_to_one", 4, n, samples, 1.2, 0.5)
    rows.append(
        Row(
            "four_to_one",
            "receiver CPU per message, 4 senders (process CPU time / messages)",
            "us",
            mp_cpu,
            "pyzmq ipc PUSH/PULL" if zmq_cpu else "",
            zmq_cpu,
            note="all threads of the receiving process; lower is better",
        )
    )
    return rows


def batched(cfg: Config, rundir: str) -> list[Row]:
    """Issue 13: one sender with ``mproc.Batch`` (flush when done) vs pyzmq; >= 1.0x."""
    n = cfg.messages
    cases: dict[str, Callable[[], float]] = {"mproc": lambda: mproc_case(1, n, batch=True)}
    if zmq is not None:
        cases["zmq"] = lambda: zmq_case(1, n, rundir)
    cases["plain"] = lambda: mproc_case(1, n)
    samples = repeat(cfg.reps, cases)
    metric = f"throughput, 1 sender with mproc.Batch, {n} msgs"
    rows = [
        Row(
            "batched",
            metric,
            "msg/s",
            samples["mproc"],
            "mproc plain send()",
            samples["plain"],
        )
    ]
    if "zmq" in samples:
        rows.append(
            Row(
                "batched",
                metric,
                "msg/s",
                samples["mproc"],
                "pyzmq ipc PUSH/PULL",
                samples["zmq"],
                Target("ratio", ">=", 1.0),
            )
        )
    return rows


def zmq_version() -> Optional[str]:
    """Return pyzmq's version, or ``None`` when the optional peer is not installed."""
    return None if zmq is None else str(zmq.__version__)
