"""A parent and its children talking by PID (gproc's IPC example, the README's main example).

The program starts two copies of itself as children through a ProcessManager.
Each child sends the current time to its parent (``mproc.ppid()``) once a
second, three times; the parent prints every message with the sender's PID,
as the kernel reported it.

Run: python examples/ipc.py
"""

from __future__ import annotations

import datetime
import sys
import time

import mproc

CHILDREN = 2
ROUNDS = 3


def child() -> None:
    """Send the time to the parent once a second."""
    for i in range(ROUNDS):
        if i:
            time.sleep(1)  # the example's pace, not synchronisation
        now = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
        mproc.send(mproc.ppid(), f"{now} (message {i + 1} of {ROUNDS})")


def parent() -> None:
    """Start the children, print what they send, and wait for them."""
    print(f"parent PID {mproc.pid()} starts {CHILDREN} children")
    with mproc.ProcessManager() as manager:
        for _ in range(CHILDREN):
            manager.new_process(sys.executable, [__file__]).start()
        for _ in range(CHILDREN * ROUNDS):
            msg = mproc.receive(timeout=10)
            print(f"receive from {msg.sender_pid}, data: {msg.data}")
        codes = manager.wait_all(timeout=10)
    print("children exited with", codes)


if __name__ == "__main__":
    if mproc.is_child():
        child()
    else:
        parent()
