"""An asyncio service that fans requests out to worker processes and gathers the results.

Four worker processes serve calls with ``mproc.serve()``. The asyncio side
sends each request with ``await mproc.asyncio.call()`` — many in flight at
once, none blocking the event loop — and gathers the answers, while a
ticker task shows the loop kept running. One request fails in its worker
and the exception comes back to the task that asked; one worker is asked
for something slow with a short timeout and the call is cancelled cleanly.

Run: python examples/async_workers.py
"""

from __future__ import annotations

import asyncio
import math
import time

import mproc
import mproc.asyncio as amproc


def work(request: tuple[str, int]) -> object:
    """What a worker does with one request."""
    op, n = request
    if op == "stop":
        raise mproc.StopServing()
    if op == "slow":
        time.sleep(1.0)  # longer than the caller waits
        return n
    if n < 0:
        raise ValueError(f"no factorial of {n}")
    return (mproc.pid(), sum(int(d) for d in str(math.factorial(n))))


def worker() -> None:
    """Serve calls until told to stop (or 30 s of silence)."""
    mproc.serve(work, timeout=30)


async def main() -> None:
    """Start the workers, fan 40 requests out, gather, report, stop."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    with mproc.ProcessManager() as manager:
        pids = [manager.start(mproc.Process(target=worker)) for _ in range(4)]
        tick = asyncio.ensure_future(ticker())
        started = time.monotonic()
        requests = [pids[i % 4] for i in range(40)]
        results = await asyncio.gather(
            *(amproc.call(pid, ("digits", 200 + i), timeout=10) for i, pid in enumerate(requests))
        )
        elapsed = time.monotonic() - started
        by_worker: dict[int, int] = {}
        for pid, _digits in results:  # type: ignore[misc]
            by_worker[pid] = by_worker.get(pid, 0) + 1
        print(f"40 calls answered in {elapsed * 1000:.0f} ms by {len(by_worker)} workers:")
        for pid, count in sorted(by_worker.items()):
            print(f"  worker {pid}: {count} requests")
        try:
            await amproc.call(pids[0], ("digits", -1), timeout=10)
        except ValueError as err:
            print(f"a worker's error came back: ValueError: {err}")
        try:
            await amproc.call(pids[1], ("slow", 7), timeout=0.1)
        except mproc.CallTimeout:
            print("a slow call timed out; its late reply will be dropped")
        tick.cancel()
        print(f"the event loop ticked {ticks} times meanwhile")
        for pid in pids:
            try:
                await amproc.call(pid, ("stop", 0), timeout=10)
            except mproc.StopServing:
                pass
        codes = await amproc.wait_all(manager, timeout=10)
        print("workers exited with", sorted(codes.values()))


if __name__ == "__main__":
    asyncio.run(main())
