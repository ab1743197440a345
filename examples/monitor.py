"""Monitors: a Down message in your mailbox when a watched process exits (SPEC §9).

Watches two processes die: a child of ours (a Command, killed by SIGTERM) and
an unrelated one (a ``sleep`` started by a shell that stays its parent, so
its exit status is not ours to read), plus a PID that does not exist. Each
exit arrives as an ordinary message whose ``data`` is a ``mproc.Down``.

Run: ``python examples/monitor.py`` (a second or so; leaves nothing behind).
"""

from __future__ import annotations

import os
import signal
import subprocess

import mproc


def main() -> None:
    # A child of ours: the Down carries its exit code, as the handle sees it.
    child = mproc.Command("sleep", ["30"])
    child.start()
    child_ref = child.monitor("downs")

    # An unrelated process: the shell, not us, is its parent.
    shell = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True
    )
    assert shell.stdout is not None
    stranger = int(shell.stdout.readline())
    stranger_ref = mproc.monitor(stranger, "downs")

    # A PID that cannot exist: its Down ("noproc") arrives at once.
    nobody_ref = mproc.monitor(2**31 - 2, "downs")

    # A monitor we change our mind about: its Down never arrives.
    spare = mproc.monitor(stranger, "downs")
    mproc.demonitor(spare)

    child.terminate()
    os.kill(stranger, signal.SIGKILL)
    names = {child_ref: "child", stranger_ref: "stranger", nobody_ref: "nobody"}
    for _ in names:
        msg = mproc.receive("downs", timeout=5)
        down = msg.data
        print(f"{names[down.ref]:>8}: {down}  (exitcode={down.exitcode}, reason={down.reason!r})")

    child.wait(5)
    shell.wait(5)
    shell.stdout.close()
    mproc.close_mailbox()


if __name__ == "__main__":
    main()
