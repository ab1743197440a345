"""What every benchmark shares: settings, result rows, start gates, children."""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import select
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, Callable, Optional

import psutil

#: Sender and receiver processes are forked: the cheapest start on Linux, and
#: the same for every peer (documented in the package docstring).
FORK = multiprocessing.get_context("fork")

#: The private runtime directory of a run is tempfile.mkdtemp(prefix=RUNDIR_PREFIX).
RUNDIR_PREFIX = "mpb-"

#: The ~100-byte message of the throughput benchmarks (83 bytes pickled).
VALUES = list(range(10))


def message(seq: int) -> dict[str, Any]:
    """Return the small dict that the messaging benchmarks send."""
    return {"seq": seq, "name": "benchmark", "values": VALUES, "ok": True}


@dataclass(frozen=True)
class Config:
    """The workload sizes of one run."""

    quick: bool
    reps: int
    messages: int  # one_to_one and four_to_one, in all
    round_trips: int
    bulk_bytes: int
    wait_procs: int
    wait_delay: float  # seconds between the start of the wait and the kill
    flood_timeout: float
    queue_contrast: int  # messages put into a Queue nobody reads
    scale_senders: int
    scale_each: int  # messages per sender
    scale_pids: int
    scale_batch: int

    @classmethod
    def make(cls, *, quick: bool) -> Config:
        """Return the settings of a quick (smoke) or a full run."""
        return cls(
            quick=quick,
            reps=2 if quick else 5,
            messages=20_000 if quick else 100_000,
            round_trips=2_000 if quick else 10_000,
            bulk_bytes=64 << 20,
            wait_procs=100,
            wait_delay=1.0,  # psutil's CPU grows with it; mproc's does not
            flood_timeout=1.0,
            queue_contrast=20_000 if quick else 100_000,
            scale_senders=200,
            scale_each=5 if quick else 10,
            scale_pids=300 if quick else 2_000,
            scale_batch=50,
        )


@dataclass(frozen=True)
class Target:
    """A goal of issue 4 for a row.

    ``of`` is "ratio" (mproc / peer), "value" (the mproc figure) compared with
    ``limit`` by ``op`` (">=" or "<="), or "check": the row's ``ok`` flag, with
    ``label`` saying what was checked.
    """

    of: str
    op: str
    limit: float
    label: str = ""  # e.g. "stretch"

    def holds(self, row: Row) -> Optional[bool]:
        """Return whether ``row`` meets the target (``None`` if it has no figure)."""
        if self.of == "check" or row.ok is False:
            return row.ok  # a figure of a run that failed its check meets no target
        x = row.ratio if self.of == "ratio" else row.value
        if x is None:
            return None
        return x >= self.limit if self.op == ">=" else x <= self.limit

    def text(self, unit: str) -> str:
        """Return the target as the table shows it, e.g. ``>= 1.2x`` or ``<= 10 ms``."""
        if self.of == "check":
            return self.label
        prefix = f"{self.label} " if self.label else ""
        if self.of == "ratio":
            limit = f"{self.limit:.2f}"  # 1.2 -> "1.2", 3 -> "3.0", 1.05 -> "1.05"
            return f"{prefix}{self.op} {limit[:-1] if limit.endswith('0') else limit}x"
        return f"{prefix}{self.op} {fmt_number(self.limit)} {unit}".rstrip()


@dataclass
class Row:
    """One line of the table: an mproc figure, maybe a peer's, maybe a target."""

    bench: str
    metric: str
    unit: str
    samples: list[float]
    peer: str = ""
    peer_samples: list[float] = field(default_factory=list)
    target: Optional[Target] = None
    ok: Optional[bool] = None  # for a "check" target
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> Optional[float]:
        return statistics.median(self.samples) if self.samples else None

    @property
    def peer_value(self) -> Optional[float]:
        return statistics.median(self.peer_samples) if self.peer_samples else None

    @property
    def ratio(self) -> Optional[float]:
        v, p = self.value, self.peer_value
        if v is None or p is None or p == 0:
            return None
        return v / p

    @property
    def result(self) -> str:
        if self.target is None:
            return "ref" if self.peer else "info"
        ok = self.target.holds(self)
        if ok is None:
            return "n/a"
        return "PASS" if ok else "FAIL"

    def as_json(self) -> dict[str, Any]:
        """Return the row, with its raw samples, for the JSON report."""
        return {
            "benchmark": self.bench,
            "metric": self.metric,
            "unit": self.unit,
            "mproc": self.value,
            "mproc_samples": self.samples,
            "peer": self.peer or None,
            "peer_value": self.peer_value,
            "peer_samples": self.peer_samples,
            "ratio": self.ratio,
            "target": self.target.text(self.unit) if self.target else None,
            "result": self.result,
            "note": self.note,
            **({"extra": self.extra} if self.extra else {}),
        }


def fmt_number(x: Optional[float]) -> str:
    """Format a figure with about 3 significant digits and thin thousands separators."""
    if x is None:
        return "-"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}".replace(",", " ")
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1 or ax == 0:
        return f"{x:.2f}"
    return f"{x:.3g}"


# ---------------------------------------------------------------- processes


class Gate:
    """Start children together: each says it is ready, then waits to be released.

    Two pipes, inherited through fork: children write one byte to *ready*
    when set up and block reading *release*; the parent starts the clock and
    writes one byte per child. A child whose parent died reads EOF and quits.
    """

    def __init__(self) -> None:
        self.release_r, self.release_w = os.pipe()
        self.ready_r, self.ready_w = os.pipe()

    # -- in the child

    def child_ready_and_wait(self) -> None:
        """Say ready, then block until released; exit if the parent went away."""
        os.close(self.release_w)
        os.close(self.ready_r)
        os.write(self.ready_w, b"r")
        if os.read(self.release_r, 1) != b"g":
            os._exit(3)

    # -- in the parent

    def wait_ready(self, n: int, timeout: float = 60.0) -> None:
        """Block until ``n`` children said ready (``TimeoutError`` after ``timeout``)."""
        deadline = time.monotonic() + timeout
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.ready_r], [], [], left)[0]:
                raise TimeoutError(f"only {got} of {n} benchmark children got ready")
            chunk = os.read(self.ready_r, n - got)
            if not chunk:
                raise RuntimeError("a benchmark child died before it got ready")
            got += len(chunk)

    def release(self, n: int) -> float:
        """Release ``n`` children; return the ``perf_counter()`` just before."""
        t0 = time.perf_counter()
        os.write(self.release_w, b"g" * n)
        return t0

    def close(self) -> None:
        for fd in (self.release_r, self.release_w, self.ready_r, self.ready_w):
            try:
                os.close(fd)
            except OSError:
                pass


class Children:
    """Forked benchmark children; every one is reaped on exit (terminate, then kill)."""

    def __init__(self) -> None:
        self.procs: list[BaseProcess] = []

    def start(self, target: Callable[..., Any], *args: Any) -> BaseProcess:
        p = FORK.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def join(self, timeout: float = 60.0) -> list[Optional[int]]:
        """Wait for all children; return their exit codes (kill the ones that hang)."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(deadline - time.monotonic(), 0.01))
        codes = []
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive():
                p.kill()
                p.join(2)
            codes.append(p.exitcode)
            p.close()
        self.procs = []
        return codes

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.join(timeout=0.0 if exc[0] is not None else 60.0)


def check_codes(what: str, codes: Sequence[Optional[int]]) -> None:
    """Raise if a benchmark child failed: its figure would be meaningless."""
    bad = [c for c in codes if c != 0]
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} of {len(codes)} children failed (codes {bad})")


def _give_up(seconds: float) -> None:
    sys.stderr.write(f"\nbenchmarks: a measurement hung for {seconds:g} s; stacks:\n")
    faulthandler.dump_traceback(all_threads=True)
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    rundir = os.environ.get("MPROC_RUNTIME_DIR", "")
    if os.path.basename(rundir).startswith(RUNDIR_PREFIX):
        shutil.rmtree(rundir, ignore_errors=True)
    os._exit(2)  # the blocked main thread cannot be unwound


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Bound a measurement that waits without a timeout (the hot loops take none).

    If it hangs: dump every thread's stack, kill the children, remove the
    private runtime directory and exit with status 2.
    """
    timer = threading.Timer(seconds, _give_up, args=(seconds,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def pin_all(cpus: set[int]) -> dict[int, set[int]]:
    """Pin every thread of this process to ``cpus``; return the old masks by thread id.

    ``sched_setaffinity`` acts on one thread; mproc's reader threads must move too.
    """
    old = {}
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        try:
            old[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended meanwhile
            pass
    return old


@contextmanager
def pinned(cpus: Optional[set[int]]) -> Iterator[None]:
    """Run the block with this process on ``cpus`` (``None``: leave it where it is)."""
    if cpus is None:
        yield
        return
    old = pin_all(cpus)
    try:
        yield
    finally:
        for tid, mask in old.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass


def rss_of(pid: int) -> int:
    """Return the resident set size of ``pid`` in bytes (from /proc, no psutil object)."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def repeat(reps: int, cases: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every case once per repetition, interleaved, and collect the samples."""
    out: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, case in cases.items():
            out[name].append(case())
    return out


@contextmanager
def polling_off() -> Iterator[None]:
    """Blocking receive() and call() without polling before they block (MPROC_SPIN_US=0).

    For reference rows: this process's open mailbox stops polling, and so do
    the mailboxes of the children forked meanwhile (they read the variable).
    """
    from mproc import _mailbox

    receiver = _mailbox._state.receiver
    saved_env = os.environ.get("MPROC_SPIN_US")
    saved = receiver.spin if receiver is not None else None
    os.environ["MPROC_SPIN_US"] = "0"
    if receiver is not None:
        receiver.spin = 0.0
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("MPROC_SPIN_US", None)
        else:
            os.environ["MPROC_SPIN_US"] = saved_env
        if receiver is not None and saved is not None:
            receiver.spin = saved
