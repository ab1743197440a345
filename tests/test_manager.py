"""Tests for mproc.ProcessManager (SPEC §4)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
import pytest

import mproc

# On 3.12+ os.fork() warns when threads exist; the reaper thread always does.
pytestmark = pytest.mark.filterwarnings("ignore:.*multi-threaded.*:DeprecationWarning")

TIMEOUT = 30

IGNORE_TERM = (
    "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); sys.stdin.read()"
)


def sleeper(m: mproc.ProcessManager) -> mproc.Command:
    cmd = m.new_process("sleep", ["30"])
    cmd.start()
    return cmd


def stubborn(m: mproc.ProcessManager) -> mproc.Command:
    """A started child that ignores SIGTERM and has said so ("ready")."""
    cmd = m.new_process(
        sys.executable, ["-c", IGNORE_TERM], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    cmd.start()
    assert cmd.stdout is not None
    assert cmd.stdout.readline() == b"ready\n"
    return cmd


def close_pipes(*cmds: mproc.Command) -> None:
    for c in cmds:
        for f in (c.stdin, c.stdout, c.stderr):
            if f is not None:
                f.close()


def test_new_process_joins_on_start() -> None:
    m = mproc.ProcessManager()
    cmd = m.new_process("true", ["true"])
    assert cmd.args == ()
    assert len(m) == 0
    pid = cmd.start()
    assert pid in m
    assert m.get_process(pid) is cmd
    assert cmd.start() == pid and m.size() == 1  # idempotent, no duplicate
    assert m.wait_all(TIMEOUT) == {pid: 0}


def test_exited_process_stays_listed_with_exit_code() -> None:
    m = mproc.ProcessManager()
    cmd = m.new_process("sh", ["-c", "exit 3"])
    assert cmd.run() == 3
    assert cmd.pid in m
    handle = m.get_process(cmd.pid)  # type: ignore[arg-type]
    assert handle is not None and handle.exitcode == 3
    assert m.wait_all(TIMEOUT) == {cmd.pid: 3}


def test_start_commands_and_processes() -> None:
    m = mproc.ProcessManager()
    cmd = mproc.Command("sh", ["-c", "exit 4"])
    proc = mproc.Process(target=os._exit, args=(5,), start_method="fork")
    early = mproc.Process(target=os._exit, args=(6,), start_method="fork")
    early.start()
    pids = [m.start(cmd), m.start(proc), m.start(early)]
    assert pids == [cmd.pid, proc.pid, early.pid]
    assert m.start(cmd) == cmd.pid  # starting again just re-adds
    assert sorted(m.pids()) == sorted(pids)
    assert m.wait_all(TIMEOUT) == {cmd.pid: 4, proc.pid: 5, early.pid: 6}


def test_start_rejects_other_objects() -> None:
    m = mproc.ProcessManager()
    with pytest.raises(TypeError, match=r"use mproc\.Process"):
        m.start(multiprocessing.Process(target=print))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot manage"):
        m.start("sleep 1")  # type: ignore[arg-type]


def test_membership_methods(spawner: Any) -> None:
    m = mproc.ProcessManager()
    a, b = sleeper(m), sleeper(m)
    foreign = spawner.popen(["sleep", "30"])
    adopted = m.add_process(foreign.pid)
    assert m.add_process(foreign.pid) is adopted  # already held: same handle
    assert m.add_process(a.pid) is a  # type: ignore[arg-type]
    assert m.size() == len(m) == 3
    assert set(m.pids()) == {a.pid, b.pid, foreign.pid}
    assert set(map(id, m.processes())) == {id(a), id(b), id(adopted)}
    assert {id(h) for h in m} == {id(a), id(b), id(adopted)}
    assert a.pid in m and 12345678 not in m and "x" not in m
    assert m.get_process(12345678) is None
    assert m.remove_process(b.pid) is b  # type: ignore[arg-type]
    assert m.remove_process(b.pid) is None  # type: ignore[arg-type]
    assert b.is_alive()  # forgotten, not killed
    assert "2 process" in repr(m)
    m.clear()
    assert len(m) == 0 and a.is_alive()
    for c in (a, b):
        c.kill()
        assert c.wait(TIMEOUT) == -signal.SIGKILL


def test_iteration_is_a_snapshot() -> None:
    m = mproc.ProcessManager()
    cmds = [sleeper(m) for _ in range(3)]
    for handle in m:
        m.remove_process(handle.pid)  # type: ignore[arg-type]
    assert len(m) == 0
    for c in cmds:
        c.kill()
        c.wait(TIMEOUT)


def test_wait_all_timeout_is_one_deadline() -> None:
    m = mproc.ProcessManager()
    cmds = [sleeper(m) for _ in range(3)]
    t0 = time.monotonic()
    assert m.wait_all(0.2) == {c.pid: None for c in cmds}
    assert time.monotonic() - t0 < 2  # not 3 x 0.2 s and nowhere near 30 s
    assert m.kill_all(TIMEOUT) == {c.pid: -signal.SIGKILL for c in cmds}


def test_kill_all_removes_and_returns_codes(spawner: Any) -> None:
    m = mproc.ProcessManager()
    cmds = [sleeper(m) for _ in range(3)]
    foreign = spawner.orphan()
    m.add_process(foreign)
    done = m.new_process("true")
    done.run()
    codes = m.kill_all()
    assert codes == {**{c.pid: -signal.SIGKILL for c in cmds}, foreign: None, done.pid: 0}
    assert len(m) == 0


def test_kill_all_aggregates_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    # contain=False: each handle's own signal() is used (a contained process
    # is killed with its tree, which goes around the handle).
    m = mproc.ProcessManager(contain=False)
    ok, bad1, bad2 = sleeper(m), sleeper(m), sleeper(m)
    gone = m.new_process("true")
    gone.run()

    def refuse(sig: int) -> None:
        raise PermissionError("not allowed to signal that one")

    with monkeypatch.context() as patch, pytest.raises(mproc.MprocError) as info:
        patch.setattr(bad1, "signal", refuse)
        patch.setattr(bad2, "signal", refuse)
        m.kill_all(TIMEOUT)
    msg = str(info.value)
    assert f"PID {bad1.pid}: PermissionError" in msg and f"PID {bad2.pid}" in msg
    assert str(ok.pid) not in msg and str(gone.pid) not in msg
    assert set(info.value.errors) == {bad1.pid, bad2.pid}
    assert ok.exitcode == -signal.SIGKILL  # the others were killed anyway
    assert sorted(m.pids()) == sorted([bad1.pid, bad2.pid])  # type: ignore[type-var]
    for c in (bad1, bad2):
        c.kill()
        assert c.wait(TIMEOUT) == -signal.SIGKILL


def test_signal_all(spawner: Any) -> None:
    m = mproc.ProcessManager()
    cmds = [sleeper(m) for _ in range(3)]
    foreign = spawner.popen(["sleep", "30"])
    m.add_process(foreign.pid)
    done = m.new_process("true")
    done.run()  # already gone: skipped, not an error
    m.signal_all(signal.SIGUSR1)
    assert m.wait_all(TIMEOUT) == {
        **{c.pid: -signal.SIGUSR1 for c in cmds},
        foreign.pid: None,
        done.pid: 0,
    }
    assert len(m) == 5  # signalled processes stay listed
    assert foreign.wait(TIMEOUT) == -signal.SIGUSR1


def test_signal_all_aggregates_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    m = mproc.ProcessManager()
    ok, bad = sleeper(m), sleeper(m)

    def refuse(sig: int) -> None:
        raise OSError("nope")

    with monkeypatch.context() as patch:
        patch.setattr(bad, "signal", refuse)
        with pytest.raises(
            mproc.MprocError, match=rf"signal_all\(SIGTERM\).*PID {bad.pid}: OSError: nope"
        ):
            m.signal_all(signal.SIGTERM)
    assert ok.wait(TIMEOUT) == -signal.SIGTERM
    bad.kill()
    assert bad.wait(TIMEOUT) == -signal.SIGKILL


def test_terminate_all_escalates(caplog: pytest.LogCaptureFixture) -> None:
    m = mproc.ProcessManager()
    polite = sleeper(m)
    rude = stubborn(m)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="mproc"),
            pytest.warns(RuntimeWarning, match=rf"PID {rude.pid}") as caught,
        ):
            codes = m.terminate_all(timeout=0.3)
    finally:
        close_pipes(rude)
    assert len(caught) == 1 and str(polite.pid) not in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller of terminate_all
    assert codes == {polite.pid: -signal.SIGTERM, rude.pid: -signal.SIGKILL}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"PID {rude.pid}" in w and "SIGKILL" in w for w in warnings)
    assert str(polite.pid) not in " ".join(warnings)
    assert len(m) == 2  # terminated processes stay listed with their codes


def test_per_pid_kill_and_signal() -> None:
    m = mproc.ProcessManager()
    a, b = sleeper(m), sleeper(m)
    m.signal(b.pid, signal.SIGTERM)  # type: ignore[arg-type]
    assert b.wait(TIMEOUT) == -signal.SIGTERM
    assert m.kill(a.pid) == -signal.SIGKILL  # type: ignore[arg-type]
    assert a.pid not in m and b.pid in m
    with pytest.raises(mproc.NoSuchProcess, match=rf"PID {a.pid} is not held"):
        m.kill(a.pid)  # type: ignore[arg-type]
    with pytest.raises(mproc.NoSuchProcess, match=rf"PID {b.pid}\b.*exited"):
        m.signal(b.pid, signal.SIGTERM)  # type: ignore[arg-type]


def test_context_manager_leaves_nothing_alive(spawner: Any) -> None:
    foreign = spawner.popen(["sleep", "30"])
    with mproc.ProcessManager() as m:
        cmd = sleeper(m)
        proc = mproc.Process(target=time.sleep, args=(30,), start_method="fork")
        m.start(proc)
        adopted = m.add_process(foreign.pid)
        rude = stubborn(m)
        close_pipes(rude)  # EOF on stdin: it would exit on its own; fine either way
    handles = [cmd, proc, adopted, rude]
    assert not any(h.is_alive() for h in handles)
    assert cmd.exitcode == -signal.SIGTERM and proc.exitcode == -signal.SIGTERM
    assert foreign.wait(TIMEOUT) == -signal.SIGTERM


def test_context_manager_on_error() -> None:
    with pytest.raises(RuntimeError, match="inside"), mproc.ProcessManager() as m:
        cmd = sleeper(m)
        raise RuntimeError("inside")
    assert cmd.exitcode == -signal.SIGTERM


def test_thread_safety() -> None:
    m = mproc.ProcessManager()
    started: list[mproc.Command] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    go = threading.Barrier(5)

    def starter(n: int) -> None:
        try:
            go.wait(TIMEOUT)
            for i in range(6):
                cmd = m.new_process("sh", ["-c", f"exit {n}"])
                pid = cmd.start()
                with lock:
                    started.append(cmd)
                assert pid in m
                if i % 2:
                    assert m.remove_process(pid) is cmd
        except BaseException as err:
            errors.append(err)

    def reader() -> None:
        try:
            go.wait(TIMEOUT)
            for _ in range(200):
                for h in m:
                    assert h.pid is not None
                m.pids()
                m.size()
                m.processes()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=starter, args=(n,)) for n in range(4)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors
    assert len(started) == 24
    assert m.size() == 12
    for c in started:
        assert c.wait(TIMEOUT) is not None
    codes = m.wait_all(TIMEOUT)
    assert sorted(codes.values()) == sorted([0, 1, 2, 3] * 3)


def test_handles_are_process_handles() -> None:
    assert isinstance(mproc.Process(target=print), mproc.ProcessHandle)
    assert isinstance(mproc.Command("true"), mproc.ProcessHandle)
    assert not isinstance(psutil.Process(), mproc.ProcessHandle)


def _exit_now() -> None:
    pass


def test_a_closed_process_does_not_stop_the_manager() -> None:
    # join() then close() is the multiprocessing idiom; a closed Process no
    # longer answers .pid/.wait(), which must not orphan the others.
    with mproc.ProcessManager() as m:
        done = mproc.Process(target=_exit_now, start_method="fork")
        done_pid = m.start(done)
        done.join(10)
        done.close()
        sleeper = m.new_process("sleep", ["30"])
        sleeper_pid = sleeper.start()
        m.signal_all(0)
        assert m.send("hello", timeout=0.2).keys() == {sleeper_pid}  # no mailbox there
        codes = m.terminate_all(timeout=5)
    assert codes == {done_pid: None, sleeper_pid: -signal.SIGTERM}
    assert not sleeper.is_alive()
