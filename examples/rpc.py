"""A named service answering calls from several clients, one of which times out.

The service registers the name "adder" and serves calls with
``mproc.serve()``. Three clients reach it by name (they may start before it
has registered: a send or call to a name nobody holds yet waits for it).
One client asks for a slow answer with a short timeout and gets
``CallTimeout``; the service's late reply is dropped and shows up nowhere.
An error raised by the service is re-raised in the client that asked.

Run: python examples/rpc.py
"""

from __future__ import annotations

import time

import mproc


def service() -> None:
    """Answer ("add", numbers), ("slow", x) and ("fail", text) calls until told to stop."""
    mproc.register("adder")

    def handle(request: tuple[str, object]) -> object:
        op, arg = request
        if op == "add":
            return sum(arg)  # type: ignore[call-overload]
        if op == "slow":
            time.sleep(0.5)  # longer than the caller is willing to wait
            return arg
        if op == "fail":
            raise ValueError(arg)
        if op == "stop":
            raise mproc.StopServing()
        raise KeyError(op)

    mproc.serve(handle, timeout=30)


def client(k: int) -> None:
    """Make a few calls to "adder" and report the answers to the parent."""
    lines = [f"client {k}: 1+..+{k} = {mproc.call('adder', ('add', range(1, k + 1)), timeout=10)}"]
    if k == 1:
        try:
            mproc.call("adder", ("slow", "too late"), timeout=0.1)
        except mproc.CallTimeout as err:
            lines.append(f"client {k}: gave up: {err}")
        # The next call gets its own answer, never the late one.
        lines.append(f"client {k}: then 2+2 = {mproc.call('adder', ('add', [2, 2]), timeout=10)}")
    if k == 2:
        try:
            mproc.call("adder", ("fail", "no such account"), timeout=10)
        except ValueError as err:
            lines.append(f"client {k}: the service raised ValueError({err})")
    mproc.send(mproc.ppid(), lines, group="report")


def main() -> None:
    """Start the clients first, then the service; print what the clients report."""
    with mproc.ProcessManager() as manager:
        for k in (1, 2, 3):
            manager.start(mproc.Process(target=client, args=(k,)))
        manager.start(mproc.Process(target=service))
        for _ in range(3):
            for line in mproc.receive("report", timeout=30).data:
                print(line)
        try:
            mproc.call("adder", ("stop", None), timeout=10)
        except mproc.StopServing:
            print("service stopped")
        print("exit codes:", sorted(manager.wait_all(timeout=30).values()))


if __name__ == "__main__":
    main()
