"""Adopt a process that mproc did not start, kill it through a ProcessManager.

Run with ``python examples/adopt.py``. A ``sleep 100`` is started with plain
:mod:`subprocess` in its own session (as if some other program had started
it); the manager adopts its PID, kills it, and the script reaps it.
"""

import subprocess

import mproc

if __name__ == "__main__":
    stranger = subprocess.Popen(["setsid", "sleep", "100"])
    m = mproc.ProcessManager()
    handle = m.add_process(stranger.pid)
    print(f"adopted {handle!r}")

    killed = m.kill_all()  # SIGKILL, wait until gone, forget (as gproc's KillAll)
    # An adopted process's exit status is not ours to read: its code is None.
    print(f"kill_all() -> {killed}; still alive: {handle.is_alive()}")
    print(f"wait_all() -> {m.wait_all(timeout=5)} (nothing left to wait for)")

    # We did start it with subprocess, so reaping it is our job, not mproc's.
    print(f"subprocess saw exit status {stranger.wait(timeout=5)}")
