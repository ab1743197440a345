"""Shared fixtures: a private runtime dir per test, and a leak check.

Every test runs with its own short ``MPROC_RUNTIME_DIR`` under ``/tmp`` and
must leave behind no child process, no zombie and no socket file; a leak
fails the test (after the leftovers have been killed and reaped, so one
leaky test does not cascade into the next).

On Linux the test process makes itself a *child subreaper*
(``prctl(PR_SET_CHILD_SUBREAPER)``), so orphaned grandchildren — e.g. the
``sleep`` of a killed ``sleep 100 | cat`` pipeline — are re-parented to it
and show up in the leak check instead of escaping to init. And every test
sets a marker of its own in the environment (``MPROC_TEST_LEAK``), which
every program a test starts inherits: the leak check also looks for it in
``/proc/<pid>/environ``, so a descendant that escaped our subtree (into
another PID namespace's init, or re-parented past us) is still seen.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, Callable

import psutil
import pytest

# multiprocessing's own long-lived helpers are not leaks of any one test.
_ALLOWED_CMDLINE = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")

PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


SUBREAPER = _become_subreaper()


def _allowed(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False
    return any(tag in cmdline for tag in _ALLOWED_CMDLINE)


def _children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if not _allowed(p)]


_LEAK_MARKER = "MPROC_TEST_LEAK"


def _marked(token: str) -> list[psutil.Process]:
    """Processes other than us whose environment carries this test's marker."""
    needle = f"{_LEAK_MARKER}={token}".encode()
    found = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            p = psutil.Process(int(name))
        except (OSError, psutil.Error):
            continue
        if not _allowed(p):
            found.append(p)
    return found


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _kill_and_reap(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
    for p in procs:
        _reap(p.pid)


def _describe(p: psutil.Process) -> str:
    try:
        return f"PID {p.pid} {p.status()} {p.cmdline()!r}"
    except psutil.Error:
        return f"PID {p.pid} (gone)"


@pytest.fixture(autouse=True)
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Give the test a private, short runtime dir; fail it if it leaks anything."""
    path = tempfile.mkdtemp(prefix="mp", dir="/tmp")
    os.chmod(path, 0o700)
    monkeypatch.setenv("MPROC_RUNTIME_DIR", path)
    monkeypatch.delenv("MPROC_PPID", raising=False)
    token = secrets.token_hex(8)
    monkeypatch.setenv(_LEAK_MARKER, token)
    before = {p.pid for p in _children()}
    yield path
    _close_mailbox()
    leaked = [p for p in _children() if p.pid not in before]
    seen = {p.pid for p in leaked}
    leaked += [p for p in _marked(token) if p.pid not in seen]
    described = [_describe(p) for p in leaked]
    _kill_and_reap(leaked)
    # The key file is meant to persist; a socket file is a leak.
    sockets = [f for f in os.listdir(path) if f.endswith(".sock")] if os.path.isdir(path) else []
    shutil.rmtree(path, ignore_errors=True)
    problems = []
    if described:
        problems.append(f"left child processes behind: {described}")
    if sockets:
        problems.append(f"left socket files in the runtime dir {path}: {sockets}")
    if problems:
        pytest.fail("; ".join(problems))


def _close_mailbox() -> None:
    import mproc

    close = getattr(mproc, "close_mailbox", None)
    if close is not None:
        close()


class Spawner:
    """Starts helper processes for a test and always kills and reaps them."""

    def __init__(self) -> None:
        self._popens: list[subprocess.Popen[Any]] = []
        self._orphans: list[int] = []
        self._cleanups: list[Callable[[], None]] = []

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` as a plain subprocess (a process mproc did not start)."""
        p = subprocess.Popen(argv, **kw)
        self._popens.append(p)
        return p

    def orphan(self, seconds: float = 60) -> int:
        """Start a ``sleep`` whose parent has already exited (not our child) and return its PID."""
        out = subprocess.run(
            ["/bin/sh", "-c", f"sleep {seconds} >/dev/null 2>&1 & echo $!"],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        pid = int(out.strip())
        self._orphans.append(pid)
        return pid

    def cleanup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` at teardown (before the leak check)."""
        self._cleanups.append(fn)

    def close(self) -> None:
        for fn in reversed(self._cleanups):
            fn()
        for p in self._popens:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        for pid in self._orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if SUBREAPER:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    """A :class:`Spawner` whose processes are killed and reaped when the test ends."""
    s = Spawner()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def kids() -> Iterator[Any]:
    """Mailbox test children (``mailbox_peers.Kids``), always reaped at the end."""
    from mailbox_peers import Kids

    k = Kids()
    try:
        yield k
    finally:
        k.close()
