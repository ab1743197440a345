"""Tests for adopted PIDs: handles on processes mproc did not start (SPEC §3)."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import psutil
import pytest

import mproc
from mproc import _wait

TIMEOUT = 30


@pytest.fixture(params=["pidfd", "polling"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "polling":
        monkeypatch.setattr(_wait, "pidfd_open", lambda pid, **kw: None)
    return str(request.param)


def adopt(pid: int) -> mproc.AdoptedProcess:
    handle = mproc.ProcessManager().add_process(pid)
    assert isinstance(handle, mproc.AdoptedProcess)
    return handle


def dead_pid() -> int:
    """The PID of a child that has exited and been reaped."""
    p = subprocess.Popen(["true"])
    p.wait(TIMEOUT)
    return p.pid


def test_adopt_popen_child_signal_and_wait(spawner: Any, mode: str) -> None:
    p = spawner.popen(["sleep", "30"])
    h = adopt(p.pid)
    assert h.pid == p.pid
    assert h.is_alive()
    assert h.exitcode is None
    assert h.wait(0.05) is None
    assert h.create_time == psutil.Process(p.pid).create_time()
    assert isinstance(h, mproc.ProcessHandle)
    assert "running" in repr(h)
    h.signal(signal.SIGTERM)
    assert h.wait(TIMEOUT) is None
    assert not h.is_alive()
    assert h._watch.exited.is_set()
    # Not reaped by mproc even though it is our child: its status is the spawner's.
    assert psutil.Process(p.pid).status() == psutil.STATUS_ZOMBIE
    assert p.wait(TIMEOUT) == -signal.SIGTERM
    assert "gone" in repr(h)


def test_adopt_orphan_kill_and_wait(spawner: Any, mode: str) -> None:
    pid = spawner.orphan()
    h = adopt(pid)
    assert h.is_alive()
    h.kill()
    assert h.wait(TIMEOUT) is None
    assert not h.is_alive()
    with pytest.raises(mproc.NoSuchProcess, match=rf"PID {pid}\b") as info:
        h.signal(signal.SIGTERM)
    assert info.value.pid == pid
    h.kill()  # no-op once gone
    h.terminate()


def test_adopt_missing_pid(mode: str) -> None:
    pid = dead_pid()
    with pytest.raises(mproc.NoSuchProcess, match=rf"\b{pid}\b") as info:
        mproc.ProcessManager().add_process(pid)
    assert info.value.pid == pid


@pytest.mark.parametrize(
    ("pid", "error"), [("12", TypeError), (True, TypeError), (0, ValueError), (-1, ValueError)]
)
def test_adopt_rejects_bad_pids(pid: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="PID"):
        mproc.ProcessManager().add_process(pid)


def test_pid_reuse_is_detected_without_pidfd(spawner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_wait, "pidfd_open", lambda pid, **kw: None)
    p = spawner.popen(["sleep", "30"])
    h = adopt(p.pid)
    assert h.is_alive()
    sent: list[int] = []
    real_kill = os.kill

    def spy(pid: int, sig: int) -> None:
        sent.append(pid)
        real_kill(pid, sig)

    # The PID now names "another" process: same number, other creation time.
    real_create_time = psutil.Process.create_time
    with monkeypatch.context() as m:
        m.setattr(psutil.Process, "create_time", lambda self: real_create_time(self) + 1000.0)
        m.setattr(os, "kill", spy)
        with pytest.raises(mproc.NoSuchProcess, match=rf"PID {p.pid}\b"):
            h.signal(signal.SIGTERM)
        h.kill()  # a no-op, and above all not a kill of the new process
        h.terminate()
        assert not h.is_alive()
        assert h.wait(TIMEOUT) is None  # the reaper's polling also sees "gone"
    assert p.pid not in sent
    assert p.poll() is None  # the "other" process was never touched


def test_pid_reuse_cannot_hit_through_pidfd(spawner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    p = spawner.popen(["sleep", "30"])
    h = adopt(p.pid)
    assert h._watch._pidfd is not None
    real_create_time = psutil.Process.create_time
    with monkeypatch.context() as m:
        m.setattr(psutil.Process, "create_time", lambda self: real_create_time(self) + 1000.0)
        with pytest.raises(mproc.NoSuchProcess, match=rf"PID {p.pid}\b"):
            h.signal(signal.SIGTERM)
    assert p.poll() is None


def test_signal_goes_through_pidfd(spawner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    p = spawner.popen(["sleep", "30"])
    h = adopt(p.pid)
    sent: list[int] = []
    with monkeypatch.context() as m:
        m.setattr(os, "kill", lambda pid, sig: sent.append(pid))
        h.signal(signal.SIGUSR1)
    assert p.wait(TIMEOUT) == -signal.SIGUSR1
    assert sent == []


def test_fallback_waiting_detects_exit(spawner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_wait, "pidfd_open", lambda pid, **kw: None)
    pid = spawner.orphan()
    h = adopt(pid)
    assert h._watch._pidfd is None
    assert h.wait(0.05) is None and h.is_alive()
    os.kill(pid, signal.SIGKILL)  # killed by someone else
    assert h._watch.wait(TIMEOUT)
    assert not h.is_alive()


def test_many_adopted(spawner: Any, mode: str) -> None:
    procs = [spawner.popen(["sleep", "30"]) for _ in range(20)]
    m = mproc.ProcessManager()
    handles = [m.add_process(p.pid) for p in procs]
    assert sorted(m.pids()) == sorted(p.pid for p in procs)
    for p in procs:
        p.terminate()
    for h in handles:
        assert h.wait(TIMEOUT) is None
    assert not any(h.is_alive() for h in handles)
    assert m.wait_all(TIMEOUT) == {p.pid: None for p in procs}
    for p in procs:
        assert p.wait(TIMEOUT) == -signal.SIGTERM


def test_adopt_zombie(spawner: Any) -> None:
    p = spawner.popen(["true"])
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped
    h = adopt(p.pid)
    assert not h.is_alive()
    assert h.wait(TIMEOUT) is None
    with pytest.raises(mproc.NoSuchProcess):
        h.signal(signal.SIGTERM)
    assert p.wait(TIMEOUT) == 0


def test_adopting_without_a_free_descriptor_is_a_clear_error(
    spawner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = spawner.popen(["sleep", "30"])

    def no_fds(pid: int) -> Any:
        raise OSError(24, "Too many open files", f"/proc/{pid}/stat")

    with monkeypatch.context() as patch, pytest.raises(mproc.MprocError) as info:
        patch.setattr(psutil, "Process", no_fds)  # undone before the leak check
        mproc.ProcessManager().add_process(proc.pid)
    assert info.value.pid == proc.pid
    assert f"PID {proc.pid}" in str(info.value)
    assert "Too many open files" in str(info.value)
