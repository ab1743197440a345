"""Tests for mproc.Command: external programs as process handles (SPEC §3)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

import mproc

TIMEOUT = 30
PY = sys.executable


def output_of(cmd: mproc.Command) -> str:
    """Run ``cmd`` (started with stdout=PIPE) to the end and return its output."""
    cmd.start()
    assert cmd.stdout is not None
    try:
        data = cmd.stdout.read()
    finally:
        cmd.stdout.close()
    assert cmd.wait(TIMEOUT) == 0
    return data.decode()


def started_sleeper() -> mproc.Command:
    cmd = mproc.Command("sleep", ["30"])
    cmd.start()
    return cmd


def test_leading_path_in_args_is_dropped() -> None:
    cmd = mproc.Command("echo", ["echo", "hi"], stdout=subprocess.PIPE)
    assert cmd.args == ("hi",)
    assert output_of(cmd) == "hi\n"
    assert mproc.Command("echo", ["hi", "echo"]).args == ("hi", "echo")


def test_args_must_not_be_a_string() -> None:
    with pytest.raises(TypeError, match=r"\['-l'\]"):
        mproc.Command("ls", "-l")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="path"):
        mproc.Command("")


def test_before_start() -> None:
    cmd = mproc.Command("true")
    assert cmd.pid is None and cmd.exitcode is None and cmd.returncode is None
    assert not cmd.is_alive()
    assert cmd.stdout is None
    assert "not started" in repr(cmd)
    with pytest.raises(ValueError, match="not been started"):
        cmd.wait(1)
    with pytest.raises(ValueError, match="not been started"):
        cmd.kill()


def test_start_is_idempotent() -> None:
    cmd = mproc.Command("sleep", ["30"])
    before = {p.pid for p in psutil.Process().children()}
    pid = cmd.start()
    assert cmd.start() == pid == cmd.pid
    new = [p for p in psutil.Process().children() if p.pid not in before]
    assert [p.pid for p in new] == [pid]
    cmd.kill()
    assert cmd.wait(TIMEOUT) == -signal.SIGKILL
    assert cmd.start() == pid  # still nothing new after exit


@pytest.mark.parametrize("code", [0, 1, 7])
def test_run_returns_exit_code(code: int) -> None:
    assert mproc.Command(PY, ["-c", f"raise SystemExit({code})"]).run() == code


def test_from_shell() -> None:
    cmd = mproc.Command.from_shell("echo $0 $((6 * 7)); exit 3", stdout=subprocess.PIPE)
    assert cmd.path in ("/bin/bash", "/bin/sh")
    cmd.start()
    assert cmd.stdout is not None
    with cmd.stdout:
        out = cmd.stdout.read().decode()
    assert cmd.wait(TIMEOUT) == 3
    assert out.split() == [cmd.path, "42"]


SHOW_ENV = "import os; print(os.environ.get('A'), os.environ.get('B'), os.environ['MPROC_PPID'])"


@pytest.mark.parametrize("env", [{"A": "1", "B": "x=y"}, ["A=1", "B=x=y"]], ids=["mapping", "list"])
def test_env_adds_to_environ_and_sets_ppid(env: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INHERITED", "yes")
    cmd = mproc.Command(
        PY,
        ["-c", SHOW_ENV + "; print(os.environ['INHERITED'])"],
        env,  # type: ignore[arg-type]
        stdout=subprocess.PIPE,
    )
    assert output_of(cmd).split() == ["1", "x=y", str(os.getpid()), "yes"]


def test_env_may_override_ppid() -> None:
    cmd = mproc.Command(PY, ["-c", SHOW_ENV], {"MPROC_PPID": "0"}, stdout=subprocess.PIPE)
    assert output_of(cmd).split() == ["None", "None", "0"]


def test_child_sees_is_child() -> None:
    code = "import mproc, sys; sys.exit(0 if mproc.is_child() and mproc.ppid() == %d else 1)"
    assert mproc.Command(PY, ["-c", code % os.getpid()]).run() == 0


@pytest.mark.parametrize(
    ("env", "error", "needle"),
    [
        (["A=1", "BROKEN"], ValueError, "'BROKEN'"),
        (["=1"], ValueError, "'=1'"),
        ("A=1", TypeError, "str"),
        ({"A": 1}, TypeError, "'A'"),
    ],
)
def test_bad_env(env: object, error: type[Exception], needle: str) -> None:
    with pytest.raises(error, match=needle):
        mproc.Command("true", env=env)  # type: ignore[arg-type]


def test_cwd(tmp_path: Path) -> None:
    cmd = mproc.Command("pwd", cwd=tmp_path, stdout=subprocess.PIPE)
    assert output_of(cmd).strip() == str(tmp_path)


def test_missing_cwd_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope") as info:
        mproc.Command("true", cwd=missing).start()
    assert "working directory" in str(info.value)


def test_stdout_to_file(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        assert mproc.Command("echo", ["to", "file"], stdout=f).run() == 0
    assert out.read_text() == "to file\n"


def test_stdin_and_stderr_pipes() -> None:
    cmd = mproc.Command(
        PY,
        ["-c", "import sys; sys.stderr.write(sys.stdin.read().upper())"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    cmd.start()
    assert cmd.stdin is not None and cmd.stderr is not None
    with cmd.stdin:
        cmd.stdin.write(b"shout")
    with cmd.stderr:
        assert cmd.stderr.read() == b"SHOUT"
    assert cmd.wait(TIMEOUT) == 0


def test_missing_binary_names_path(tmp_path: Path) -> None:
    path = str(tmp_path / "no-such-program")
    cmd = mproc.Command(path, ["x"])
    with pytest.raises(FileNotFoundError, match="no-such-program") as info:
        cmd.start()
    assert path in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert cmd.pid is None


def test_not_executable_names_path(tmp_path: Path) -> None:
    path = tmp_path / "script.sh"
    path.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError, match=r"script\.sh"):
        mproc.Command(path).start()


@pytest.mark.parametrize(
    ("action", "code"),
    [("kill", -signal.SIGKILL), ("terminate", -signal.SIGTERM), ("usr1", -signal.SIGUSR1)],
)
def test_signals_give_negative_exit_codes(action: str, code: int) -> None:
    cmd = started_sleeper()
    assert cmd.is_alive()
    assert cmd.wait(0.05) is None
    if action == "usr1":
        cmd.signal(signal.SIGUSR1)
    else:
        getattr(cmd, action)()
    assert cmd.wait(TIMEOUT) == code
    assert cmd.returncode == code
    assert not cmd.is_alive()
    assert mproc._errors.describe_exitcode(code) in repr(cmd)


def test_signal_after_exit() -> None:
    cmd = mproc.Command("true")
    assert cmd.run() == 0
    with pytest.raises(mproc.NoSuchProcess, match=rf"'true' \(PID {cmd.pid}\) has already exited"):
        cmd.signal(signal.SIGTERM)
    cmd.terminate()  # no-ops
    cmd.kill()
    assert cmd.exitcode == 0


def test_signal_uses_os_kill_without_pidfd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mproc._wait, "pidfd_open", lambda pid, **kw: None)
    sent: list[tuple[int, int]] = []
    real_kill = os.kill

    def spy(pid: int, sig: int) -> None:
        sent.append((pid, sig))
        real_kill(pid, sig)

    cmd = started_sleeper()
    with monkeypatch.context() as m:
        m.setattr(os, "kill", spy)
        cmd.kill()
    assert cmd.wait(TIMEOUT) == -signal.SIGKILL
    assert sent == [(cmd.pid, signal.SIGKILL)]


def test_no_zombie_without_wait() -> None:
    cmd = mproc.Command("true")
    pid = cmd.start()
    assert cmd._watch is not None
    assert cmd._watch.wait(TIMEOUT)  # the reaper saw the exit; nobody called wait()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert cmd.exitcode == 0


def test_wait_from_many_threads() -> None:
    cmd = started_sleeper()
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(cmd.wait(TIMEOUT))) for _ in range(8)]
    for t in threads:
        t.start()
    cmd.terminate()
    for t in threads:
        t.join(TIMEOUT)
    assert results == [-signal.SIGTERM] * 8


def test_is_a_process_handle() -> None:
    assert isinstance(mproc.Command("true"), mproc.ProcessHandle)
