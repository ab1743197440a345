"""A supervisor keeping a crash-looping worker and a named service up, until it gives up.

One ``mproc.Supervisor`` (OTP's ``one_for_one``) holds two children:

* ``worker`` crashes 50 ms after every start; it is restarted with an
  exponential back-off (0.2 s, 0.4 s, 0.8 s... with up to 10 % jitter);
* ``adder`` is a service registered under its name; a client (this
  process) keeps calling it by name, and crashes it once on purpose: the
  call in flight gets ``CalleeDied``, the next one reaches the new
  incarnation (a call to a name nobody holds waits for its next holder).

Every restart counts toward the restart intensity (here more than 4
restarts within 10 s): the worker's crash loop exhausts it, the supervisor
stops everything and ``wait()`` raises ``SupervisorGaveUp``. The
supervisor's reports (records of the ``mproc`` logger) are printed as
they come.

Run: ``python examples/supervisor.py`` (about 2 s; leaves nothing behind).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import mproc


def worker() -> None:
    """Do a little work, then crash (exit status 3)."""
    time.sleep(0.05)
    raise SystemExit(3)


def adder() -> None:
    """Answer ("add", numbers) and ("whoami", None); ("crash", None) kills it mid-call.

    It serves from a thread and waits for SIGTERM in the main one
    (``mproc.listen()``): when the supervisor stops it, it returns, and its
    mailbox closes cleanly.
    """

    def handle(request: tuple[str, object]) -> object:
        op, arg = request
        if op == "add":
            return sum(arg)  # type: ignore[call-overload]
        if op == "whoami":
            return os.getpid()
        if op == "crash":
            os._exit(1)
        raise KeyError(op)

    def serve() -> None:
        try:
            mproc.serve(handle)
        except mproc.MailboxClosed:
            pass  # run() returned

    mproc.add_sig_handler_shutdown(lambda signum: None)
    threading.Thread(target=serve, daemon=True).start()
    mproc.listen()


def client(sup: mproc.Supervisor) -> None:
    """Call "adder" by name across its restarts until the supervisor stops."""
    print(f"client: 1+2+3 = {mproc.call('adder', ('add', [1, 2, 3]), timeout=5)}")
    first = mproc.call("adder", ("whoami", None), timeout=5)
    try:
        mproc.call("adder", ("crash", None), timeout=5)
    except mproc.CalleeDied as err:
        print(f"client: {err}")
    second = mproc.call("adder", ("whoami", None), timeout=5)
    print(
        f"client: 'adder' was PID {first}, is PID {second} now; supervisor says {sup.pid('adder')}"
    )
    print(f"client: 40+2 = {mproc.call('adder', ('add', [40, 2]), timeout=5)}")


def main() -> None:
    """Run the supervisor until it gives up; show what happened."""
    reports = logging.getLogger("mproc")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(relativeCreated)5.0f ms  %(message)s"))
    reports.addHandler(handler)
    reports.setLevel(logging.INFO)

    sup = mproc.Supervisor(strategy="one_for_one", max_restarts=4, max_seconds=10.0)
    sup.add("adder", lambda: mproc.Process(target=adder), register=True, shutdown=2.0)
    sup.add("worker", lambda: mproc.Process(target=worker), backoff=(0.2, 5.0))
    with sup:
        client(sup)
        try:
            sup.wait(timeout=30)
        except mproc.SupervisorGaveUp as err:
            print(f"gave up: {err.name!r}, last exit {err.exitcode}: {err}")
    print("children:", sup.children())
    mproc.close_mailbox()


if __name__ == "__main__":
    main()
