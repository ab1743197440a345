"""Tests for the reaper of mproc._wait: pidfds, the polling fallback, fork safety."""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import signal
import subprocess
import threading
from typing import Any, Callable, Optional

import psutil
import pytest

import mproc
from mproc import _wait

# On 3.12+ os.fork() warns when threads exist; the reaper thread always does.
pytestmark = pytest.mark.filterwarnings("ignore:.*multi-threaded.*:DeprecationWarning")


def child_poll(p: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: p.poll() is not None


def foreign_poll(pid: int) -> Callable[[], bool]:
    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return gone


@pytest.fixture(params=["pidfd", "polling"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def open_for(pid: int, mode: str) -> Optional[int]:
    return _wait.pidfd_open(pid) if mode == "pidfd" else None


def test_watch_detects_child_exit_and_reaps(mode: str) -> None:
    p = subprocess.Popen(["sleep", "30"])
    w = _wait.watch(p.pid, child_poll(p), open_for(p.pid, mode))
    assert not w.wait(0.05)
    p.kill()
    assert w.wait(10)
    assert p.returncode == -signal.SIGKILL  # reaped by the reaper, nobody waited
    with pytest.raises(ChildProcessError):
        os.waitpid(p.pid, os.WNOHANG)
    assert w._pidfd is None  # closed once the exit was seen


def test_watch_detects_foreign_exit(spawner: Any, mode: str) -> None:
    pid = spawner.orphan()
    w = _wait.watch(pid, foreign_poll(pid), open_for(pid, mode))
    assert not w.wait(0.05)
    os.kill(pid, signal.SIGKILL)
    assert w.wait(10)


def test_watch_of_already_exited_child(mode: str) -> None:
    p = subprocess.Popen(["true"])
    fd = open_for(p.pid, mode)
    # Let it become a zombie before the watch starts: the exit must still be seen.
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
    w = _wait.watch(p.pid, child_poll(p), fd)
    assert w.wait(10)
    assert p.returncode == 0


def test_many_watches(mode: str) -> None:
    procs = [subprocess.Popen(["sleep", "30"]) for _ in range(20)]
    watches = [_wait.watch(p.pid, child_poll(p), open_for(p.pid, mode)) for p in procs]
    for p in procs:
        p.kill()
    assert all(w.wait(10) for w in watches)
    assert all(p.returncode == -signal.SIGKILL for p in procs)


def test_wait_zero_and_negative_timeout_only_check() -> None:
    p = subprocess.Popen(["sleep", "30"])
    w = _wait.watch(p.pid, child_poll(p), _wait.pidfd_open(p.pid))
    assert w.wait(0) is False
    assert w.wait(-1) is False
    p.kill()
    assert w.wait(10)
    assert w.wait(0) is True
    assert "exited" in repr(w)


def test_send_signal_through_pidfd() -> None:
    p = subprocess.Popen(["sleep", "30"])
    w = _wait.watch(p.pid, child_poll(p), _wait.pidfd_open(p.pid))
    assert w.send_signal(signal.SIGTERM) is True
    assert w.wait(10)
    assert p.returncode == -signal.SIGTERM
    assert w.send_signal(signal.SIGTERM) is False  # pidfd closed: caller must fall back


def test_pidfd_open_missing_pid_raises_no_such_process() -> None:
    p = subprocess.Popen(["true"])
    p.wait(10)
    with pytest.raises(mproc.NoSuchProcess, match=rf"\b{p.pid}\b") as info:
        _wait.pidfd_open(p.pid)
    assert info.value.pid == p.pid
    assert isinstance(info.value, ProcessLookupError)


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOSYS, errno.EPERM])
def test_pidfd_open_falls_back(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    monkeypatch.setattr(_wait, "_pidfd_supported", True)

    def fail(pid: int) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "pidfd_open", fail)
    assert _wait.pidfd_open(os.getpid()) is None
    # Out of descriptors is temporary; a missing syscall is not.
    assert _wait._pidfd_supported is (code in (errno.EMFILE, errno.ENFILE))


def test_pidfd_open_other_errors_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(pid: int) -> int:
        raise OSError(errno.EINVAL, "bad")

    monkeypatch.setattr(os, "pidfd_open", fail)
    with pytest.raises(OSError, match="bad"):
        _wait.pidfd_open(os.getpid())


def test_real_emfile_falls_back_to_polling() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    try:
        # Every descriptor number from here on is over the limit: EMFILE.
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        assert _wait.pidfd_open(os.getpid()) is None
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert _wait._pidfd_supported  # temporary: the next open tries again
    fd = _wait.pidfd_open(os.getpid())
    assert fd is not None
    os.close(fd)


def test_handles_work_with_forced_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_wait, "pidfd_open", lambda pid, **kw: None)
    cmd = mproc.Command("sleep", ["30"])
    cmd.start()
    assert cmd._watch is not None and cmd._watch._pidfd is None
    assert cmd.wait(0.05) is None
    cmd.terminate()
    assert cmd.wait(10) == -signal.SIGTERM
    proc = mproc.Process(target=os._exit, args=(4,), start_method="fork")
    proc.start()
    assert proc.wait(10) == 4


def test_failing_callback_is_logged_and_reaper_survives(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> bool:
        raise RuntimeError("boom in callback")

    p = subprocess.Popen(["true"])
    with caplog.at_level(logging.ERROR, logger="mproc"):
        w = _wait.watch(p.pid, broken, _wait.pidfd_open(p.pid))
        assert w.wait(10)  # a broken callback must not leave waiters hanging
    assert any("boom in callback" in (r.exc_text or "") for r in caplog.records)
    assert any(str(p.pid) in r.getMessage() for r in caplog.records)
    p.wait(10)
    q = subprocess.Popen(["true"])
    w2 = _wait.watch(q.pid, child_poll(q), _wait.pidfd_open(q.pid))
    assert w2.wait(10)


def test_idle_reaper_uses_no_cpu() -> None:
    p = subprocess.Popen(["sleep", "30"])
    w = _wait.watch(p.pid, child_poll(p), _wait.pidfd_open(p.pid))
    thread = _wait._reaper._thread
    assert thread is not None and thread.native_id is not None
    me = psutil.Process()

    def cpu() -> float:
        for t in me.threads():
            if t.id == thread.native_id:
                return float(t.user_time + t.system_time)
        raise AssertionError("reaper thread not found")

    before = cpu()
    threading.Event().wait(0.3)  # a measuring window, not synchronisation
    assert cpu() - before < 0.05
    p.kill()
    assert w.wait(10)


def _read_exact(fd: int, timeout: float = 20) -> bytes:
    data = b""
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, "child did not report in time"
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


def _in_fork(work: Callable[[], str]) -> str:
    """Run ``work`` in an os.fork()ed child; return what it reported (the child is reaped)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        code = 1
        try:
            os.close(r)
            os.write(w, work().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        report = _read_exact(r).decode()
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    return report


def test_fork_resets_reaper() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    held = _wait.watch(sleeper.pid, child_poll(sleeper), _wait.pidfd_open(sleeper.pid))
    inherited_fd = held._pidfd
    assert inherited_fd is not None

    def in_child() -> str:
        try:
            os.fstat(inherited_fd)
            closed = "open"
        except OSError:
            closed = "closed"
        status = mproc.Command("sh", ["-c", "exit 5"]).run()
        mproc.close_mailbox()  # os._exit() skips atexit, which would close it
        return f"{closed} {status}"

    assert _in_fork(in_child) == "closed 5"
    # The parent's reaper is unaffected.
    sleeper.kill()
    assert held.wait(10)
    assert sleeper.returncode == -signal.SIGKILL


def test_pidfd_open_leaves_descriptors_free_near_the_limit() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open(os.devnull, os.O_RDONLY)  # the next free descriptor
    os.close(probe)
    try:
        # The next descriptor falls inside the reserve: poll rather than use it.
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe + _wait._FD_RESERVE, hard))
        assert _wait.pidfd_open(proc.pid) is None
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe + _wait._FD_RESERVE + 8, hard))
        fd = _wait.pidfd_open(proc.pid)
        assert fd is not None
        os.close(fd)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        proc.kill()
        proc.wait(10)


def test_a_forked_copy_cannot_wait_for_its_parents_child() -> None:
    cmd = mproc.Command("sleep", ["30"])
    cmd.start()

    def in_child() -> str:
        try:
            cmd.wait(30)  # would wait out the timeout: the child's reaper never sees it
        except ValueError as err:
            return str(err)
        return "waited"

    try:
        report = _in_fork(in_child)
    finally:
        cmd.kill()
        cmd.wait(10)
    assert f"PID {cmd.pid}" in report and "forked" in report


def _in_fork_bounded(work: Callable[[], str], timeout: float = 20) -> str:
    """As _in_fork, but a child that hangs is killed (and the test fails) instead of waited for."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        code = 1
        try:
            os.close(r)
            os.write(w, work().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        hung = not select.select([r], [], [], timeout)[0]
        if hung:
            os.kill(pid, signal.SIGKILL)
        report = b"" if hung else _read_exact(r)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert not hung, "the forked child hung"
    assert os.waitstatus_to_exitcode(status) == 0, report
    return report.decode()


def test_a_forked_copy_leaves_its_parents_watches_alone() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    w = _wait.watch(sleeper.pid, child_poll(sleeper), _wait.pidfd_open(sleeper.pid))
    inherited_fd = w._pidfd
    assert inherited_fd is not None

    def in_child() -> str:
        try:
            os.fstat(inherited_fd)
            fd_state = "open"
        except OSError:
            fd_state = "closed"
        ran: list[bool] = []
        # The lock is held (by the parent, at the fork): none of these may take it.
        answers = (w.send_signal(0), w.dup_pidfd(), w.on_done(lambda: ran.append(True))())
        _wait.unwatch(w)
        return f"{fd_state} {answers} {ran}"

    try:
        with w._lock:  # as if a thread of ours were in the middle of using it
            report = _in_fork_bounded(in_child)
    finally:
        sleeper.kill()
    assert report == "closed (False, None, None) []"
    # The parent's watch is untouched.
    assert w.wait(10)
    assert sleeper.returncode == -signal.SIGKILL


def test_exited_flag_wakes_every_waiter() -> None:
    flag = _wait._Exited()
    assert not flag.is_set() and not flag.wait(0)
    results: list[bool] = []
    waiters = [threading.Thread(target=lambda: results.append(flag.wait(30))) for _ in range(4)]
    for t in waiters:
        t.start()
    flag.set()
    for t in waiters:
        t.join(30)
    assert results == [True] * 4
    assert flag.is_set() and flag.wait(0) and flag.wait(None)


def _poller(monkeypatch: pytest.MonkeyPatch, kind: str) -> Any:
    if kind == "selector":
        monkeypatch.delattr(select, "epoll")  # as on macOS
    poller = _wait._Poller()
    assert poller.live == (kind == "epoll")
    return poller


@pytest.mark.parametrize("kind", ["epoll", "selector"])
def test_poller_reports_an_exit(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    poller = _poller(monkeypatch, kind)
    p = subprocess.Popen(["sleep", "30"])
    fd = os.pidfd_open(p.pid)
    try:
        poller.register(fd, None)
        with pytest.raises(KeyError):
            poller.register(fd, None)
        assert poller.select(0) == []
        p.kill()
        assert poller.select(10) == [fd]
        poller.unregister(fd)
        assert poller.select(0) == [] and fd not in poller.data
    finally:
        poller.close()
        os.close(fd)
        p.wait(10)


def test_epoll_sees_a_pidfd_added_while_another_thread_waits() -> None:
    # What lets a start() hand its pidfd to the sleeping reaper without a wake-up.
    poller = _wait._Poller()
    assert poller.live
    p = subprocess.Popen(["sleep", "30"])
    fd = os.pidfd_open(p.pid)
    seen: list[list[int]] = []
    waiter = threading.Thread(target=lambda: seen.append(poller.select(30)))
    try:
        waiter.start()
        poller.register(fd, None)
        p.kill()
        waiter.join(30)
        assert seen == [[fd]]
    finally:
        p.kill()
        waiter.join(30)
        poller.close()
        os.close(fd)
        p.wait(10)
