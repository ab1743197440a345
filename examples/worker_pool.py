"""A pool of subclassed workers that send results, lambdas included, back to the parent.

Each ``Worker`` is an ``mproc.Process`` subclass defined in ``__main__`` and
started with the *spawn* method, where plain multiprocessing could not carry
it; every result carries a lambda that the parent calls.

Run: python examples/worker_pool.py
"""

from __future__ import annotations

from collections.abc import Sequence

import mproc


class Worker(mproc.Process):
    """Squares its share of the numbers and reports each result to the parent."""

    def __init__(self, numbers: Sequence[int]) -> None:
        super().__init__(start_method="spawn")
        self.numbers = list(numbers)

    def run(self) -> None:
        for n in self.numbers:
            # The lambda closes over n; cloudpickle carries it to the parent.
            mproc.send(mproc.ppid(), (n, n * n, lambda x, n=n: x + n), group="results")


def main() -> None:
    """Split 1..12 over four workers and collect the results."""
    numbers = list(range(1, 13))
    workers = [Worker(numbers[i::4]) for i in range(4)]
    with mproc.ProcessManager() as manager:
        for worker in workers:
            manager.start(worker)
        results = {}
        for _ in numbers:
            msg = mproc.receive("results", timeout=30)
            n, square, add_n = msg.data
            results[n] = (square, add_n(100), msg.sender_pid)
        codes = manager.wait_all(timeout=30)
    for n in numbers:
        square, plus, pid = results[n]
        print(f"{n:2d}^2 = {square:3d}   lambda(100) = {plus}   from worker PID {pid}")
    print("workers exited with", codes)


if __name__ == "__main__":
    main()
