"""``python -m mproc``: the command line (SPEC §14); see :mod:`mproc._cli`.

Examples::

    python -m mproc ps --watch                  # live mailboxes, queues, senders; refreshed
    python -m mproc send 4242 '{"job": 7}'      # a JSON value (or plain text); '-' reads stdin
    python -m mproc recv --name inbox -n 3      # print the next 3 messages sent to "inbox"
    python -m mproc call worker '[1, 2]'        # request/reply; prints the reply
    python -m mproc kill --tree 4242            # TERM the whole tree, wait, then KILL
    python -m mproc wait 4242 4243 --timeout 10 # any PIDs, children or not
    python -m mproc tree 4242                   # the process tree
    python -m mproc exec --timeout 5 make test  # status passed on; 124 on timeout
"""

from __future__ import annotations

import sys

from ._cli import main as main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
