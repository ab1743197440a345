"""Two peers learn each other's PID from the parent, then talk directly.

The parent starts two ``mproc.Process`` workers, tells each the other's PID,
and waits for their reports. Peer A sends "ping" straight to peer B; B
answers "pong" straight to A — the parent never relays a message.

Run: python examples/peers.py
"""

from __future__ import annotations

import mproc


def peer(name: str, starts: bool) -> None:
    """Learn the other peer's PID from the parent, then ping-pong with it."""
    other = mproc.receive("peer", timeout=30).data
    if starts:
        mproc.send(other, f"ping from {name}", group="chat")
        reply = mproc.receive("chat", timeout=30)
    else:
        reply = mproc.receive("chat", timeout=30)
        mproc.send(other, f"pong from {name}", group="chat")
    report = f"{name} (PID {mproc.pid()}) heard {reply.data!r} from PID {reply.sender_pid}"
    mproc.send(mproc.ppid(), report, group="report")


def main() -> None:
    """Introduce the peers and print what each heard."""
    with mproc.ProcessManager() as manager:
        a = mproc.Process(target=peer, args=("A", True))
        b = mproc.Process(target=peer, args=("B", False))
        pid_a = manager.start(a)
        pid_b = manager.start(b)
        mproc.send(pid_a, pid_b, group="peer")
        mproc.send(pid_b, pid_a, group="peer")
        for _ in range(2):
            print(mproc.receive("report", timeout=30).data)
        print("peers exited with", manager.wait_all(timeout=30))


if __name__ == "__main__":
    main()
