"""Start this very program again as a child through a ProcessManager (gproc's seed example).

Run with ``python examples/child_process.py``. The parent starts itself as a
child; the child sees ``mproc.is_child()``, prints who its launcher is and
exits; the parent waits for it and prints ``child died``.
"""

import sys
import time

import mproc

if __name__ == "__main__":
    if mproc.is_child():
        print(f"I am child {mproc.pid()}, my parent is {mproc.ppid()}")
        time.sleep(0.5)
        sys.exit(0)

    m = mproc.ProcessManager()
    child = m.new_process(sys.executable, [__file__])
    pid = child.start()
    print(f"parent {mproc.pid()} started child {pid}; waiting")
    codes = m.wait_all(timeout=30)
    print(f"child died with exit code {codes[pid]}")
