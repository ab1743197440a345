"""Tests for the shell helpers: shell_exec, shell_run, shell (SPEC §2, §7)."""

from __future__ import annotations

import io
import itertools
import os
import pickle
import shlex
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from typing import Any, Callable, Optional

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mproc
from mproc import _launch, _shell, shell, shell_exec, shell_run

PY = shlex.quote(sys.executable)
_counter = itertools.count()

hypothesis_settings = settings(
    max_examples=30,
    deadline=None,
    # The per-test fixtures (runtime dir, leak check) are meant to span all examples.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def marker() -> str:
    """A ``sleep`` duration unique to this call, to find the processes that use it."""
    return f"100.{os.getpid()}{next(_counter):03d}"


def survivors(mark: str) -> list[str]:
    """Command lines of processes that mention ``mark`` and are still there after 5 s."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and mark in " ".join(p.info["cmdline"] or ()):
            found.append(p)
    _, alive = psutil.wait_procs(found, timeout=5)
    return [" ".join(p.info["cmdline"]) for p in alive]


class StrOnly:
    """A sink that takes only str (no fileno, no io base class)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, data: Any) -> int:
        if not isinstance(data, str):
            raise TypeError("str only")
        self.parts.append(data)
        return len(data)


class BytesOnly:
    """A sink that takes only bytes (no fileno, no io base class)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)


class Chunks:
    """A source whose read() hands out the given chunks (no fileno, no io base class)."""

    def __init__(self, *chunks: Any) -> None:
        self.chunks = list(chunks)

    def read(self, size: int = -1) -> Any:
        return self.chunks.pop(0) if self.chunks else b""


# --- shell_exec ------------------------------------------------------------------------


def test_shell_exec_returns_output() -> None:
    assert shell_exec("echo hello") == "hello\n"


def test_shell_exec_merges_stderr() -> None:
    assert shell_exec("echo out; echo err >&2; echo out2") == "out\nerr\nout2\n"


def test_shell_exec_reads_devnull() -> None:
    assert shell_exec("cat; echo done", timeout=30) == "done\n"


def test_shell_exec_replaces_undecodable_bytes() -> None:
    assert shell_exec(r"printf 'a\377b'") == "a\ufffdb"


def test_shell_exec_keeps_line_endings() -> None:
    assert shell_exec(r"printf 'a\r\nb\rc'") == "a\r\nb\rc"


def test_shell_exec_failure_raises_shell_error() -> None:
    with pytest.raises(mproc.ShellError) as info:
        shell_exec("echo partial; echo oops >&2; exit 3")
    err = info.value
    assert err.returncode == 3
    assert err.cmd == "echo partial; echo oops >&2; exit 3"
    assert err.output == "partial\noops\n"
    assert err.stdout == err.output
    assert err.pid is not None and err.pid > 0
    assert isinstance(err, subprocess.CalledProcessError)
    assert isinstance(err, mproc.MprocError)
    assert "exit 3" in str(err) and "status 3" in str(err)
    assert f"PID {err.pid}" in str(err)


def test_shell_exec_killed_by_signal() -> None:
    with pytest.raises(mproc.ShellError) as info:
        shell_exec("kill -TERM $$")
    assert info.value.returncode == -signal.SIGTERM
    assert "SIGTERM(-15)" in str(info.value)


def test_shell_exec_cwd(tmp_path: Any) -> None:
    assert shell_exec("pwd", cwd=tmp_path).strip() == os.path.realpath(tmp_path)
    assert shell_exec("pwd", cwd=str(tmp_path)).strip() == os.path.realpath(tmp_path)


def test_missing_cwd_names_it(tmp_path: Any) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as info:
        shell_exec("true", cwd=missing)
    assert str(missing) in str(info.value)
    assert "working directory" in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_cwd_that_is_a_file_names_it(tmp_path: Any) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(NotADirectoryError) as info:
        shell_run("true", cwd=path)
    assert str(path) in str(info.value)


# --- the shell itself --------------------------------------------------------------------


def test_bash_is_used_when_present() -> None:
    if not os.access("/bin/bash", os.X_OK):
        pytest.skip("no /bin/bash")
    assert _shell._shell_path() == "/bin/bash"
    assert shell_exec("echo $0") == "/bin/bash\n"


def test_falls_back_to_sh(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setattr(_launch, "_BASH", str(tmp_path / "no-bash"))
    assert _shell._shell_path() == "/bin/sh"
    assert shell_exec("echo $0") == "/bin/sh\n"
    buf = io.StringIO()
    shell("echo $0", buf)
    assert buf.getvalue() == "/bin/sh\n"


def test_missing_shell_raises_file_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_shell, "_shell_path", lambda: "/nonexistent/shell")
    with pytest.raises(FileNotFoundError, match="/nonexistent/shell"):
        shell_exec("true")


@pytest.mark.parametrize("fn", [shell_exec, shell_run, shell])
@pytest.mark.parametrize("cmd", [b"echo hi", ["echo", "hi"], None, 3])
def test_cmd_must_be_str(fn: Callable[..., Any], cmd: Any) -> None:
    with pytest.raises(TypeError, match="cmd must be a str"):
        fn(cmd)


@pytest.mark.parametrize(
    ("timeout", "exc"), [(-1, ValueError), (float("nan"), ValueError), ("1", TypeError)]
)
def test_bad_timeout(timeout: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="timeout"):
        shell_exec("true", timeout=timeout)


# --- env ---------------------------------------------------------------------------------


def test_env_mapping() -> None:
    assert shell_exec('printf "%s|%s" "$A" "$B"', {"A": "1", "B": "two words"}) == "1|two words"


def test_env_list() -> None:
    out = shell_exec('printf "%s|%s|%s" "$A" "$B" "$C"', ["A=1", "B=x=y", "C="])
    assert out == "1|x=y|"


def test_env_adds_to_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPROC_TEST_INHERITED", "yes")
    out = shell_exec('ls / >/dev/null && printf "%s %s" "$MPROC_TEST_INHERITED" "$X"', {"X": "1"})
    assert out == "yes 1"
    assert "X" not in os.environ


@pytest.mark.parametrize(
    ("env", "exc", "named"),
    [
        (["NOEQUALS"], ValueError, "NOEQUALS"),
        (["=value"], ValueError, "=value"),
        ([42], TypeError, "42"),
        (["OK=1", b"B=2"], TypeError, "B=2"),
        ({"": "v"}, ValueError, "''"),
        ({"A=B": "v"}, ValueError, "A=B"),
        ({"K": 1}, TypeError, "'K'"),
        ({1: "v"}, TypeError, "1"),
        ({"K": "a\0b"}, ValueError, "'K'"),
        ("A=B", TypeError, "str"),
        (42, TypeError, "int"),
    ],
)
def test_bad_env(env: Any, exc: type[Exception], named: str) -> None:
    with pytest.raises(exc) as info:
        shell_exec("true", env)
    assert named in str(info.value)


def test_mproc_ppid_is_set() -> None:
    assert shell_exec('printf "%s" "$MPROC_PPID"') == str(os.getpid())
    assert shell_exec('printf "%s" "$MPROC_PPID"', ["OTHER=1"], timeout=30) == str(os.getpid())


def test_child_sees_launcher() -> None:
    code = "import mproc; print(mproc.is_child(), mproc.ppid())"
    assert shell_exec(f"{PY} -c {shlex.quote(code)}") == f"True {os.getpid()}\n"


def test_mproc_ppid_can_be_overridden() -> None:
    assert shell_exec('printf "%s" "$MPROC_PPID"', {"MPROC_PPID": "1"}) == "1"


# --- shell_run -----------------------------------------------------------------------


def test_shell_run_inherits_stdout_and_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    assert shell_run("echo to-out; echo to-err >&2", {"V": "x"}) is None
    out, err = capfd.readouterr()
    assert out == "to-out\n"
    assert err == "to-err\n"


def test_shell_run_failure() -> None:
    with pytest.raises(mproc.ShellError) as info:
        shell_run("exit 7")
    assert info.value.returncode == 7
    assert info.value.output is None
    assert "'exit 7'" in str(info.value)


# --- shell -----------------------------------------------------------------------------


def test_shell_stringio_out() -> None:
    out = io.StringIO()
    assert shell("echo héllo; echo err >&2", out) is None
    assert out.getvalue() == "héllo\n"


def test_shell_bytesio_out() -> None:
    out = io.BytesIO()
    shell(r"printf 'a\377b'", out)
    assert out.getvalue() == b"a\xffb"


def test_shell_stringio_in_and_out() -> None:
    out = io.StringIO()
    shell("tr a-z A-Z", out, io.StringIO("abc\nünï\n"))
    assert out.getvalue() == "ABC\nüNï\n"


def test_shell_bytesio_in_and_out() -> None:
    data = bytes(range(256)) * 4
    out = io.BytesIO()
    shell("cat", out, io.BytesIO(data))
    assert out.getvalue() == data


def test_shell_large_text_through_pipes() -> None:
    # Far beyond a pipe buffer, with multibyte characters split across chunks.
    text = "é€𝄞x\n" * 100_000
    out = io.StringIO()
    shell("cat", out, io.StringIO(text), timeout=60)
    assert out.getvalue() == text


def test_shell_command_ignoring_stdin() -> None:
    out = io.BytesIO()
    shell("echo ignored", out, io.BytesIO(b"x" * 1_000_000), timeout=60)
    assert out.getvalue() == b"ignored\n"


def test_shell_real_files(tmp_path: Any) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(b"line1\nline2\n")
    with open(src, "rb") as fin, open(tmp_path / "out.bin", "wb") as fout:
        shell("sort -r", fout, fin)
    assert (tmp_path / "out.bin").read_bytes() == b"line2\nline1\n"


def test_shell_real_text_file_keeps_order(tmp_path: Any) -> None:
    path = tmp_path / "out.txt"
    with open(path, "w") as f:
        f.write("python first\n")  # buffered by Python: must be flushed before the command
        shell("echo command second", f)
        f.write("python third\n")
    assert path.read_text() == "python first\ncommand second\npython third\n"


def test_shell_none_inherits(capfd: pytest.CaptureFixture[str]) -> None:
    shell("echo inherited")
    assert capfd.readouterr().out == "inherited\n"


def test_shell_unknown_objects() -> None:
    text_sink, bytes_sink = StrOnly(), BytesOnly()
    shell("cat", text_sink, Chunks("a", "é\n"))
    shell("cat", bytes_sink, Chunks(b"\x00\xff", bytearray(b"!")))
    assert "".join(text_sink.parts) == "aé\n"
    assert b"".join(bytes_sink.parts) == b"\x00\xff!"


def test_shell_bad_chunk_from_stdin() -> None:
    with pytest.raises(TypeError, match=r"stdin\.read\(\)"):
        shell("cat >/dev/null", io.StringIO(), Chunks(12))


def test_shell_error_in_sink_is_raised() -> None:
    class Broken(io.StringIO):
        def write(self, data: str) -> int:
            raise OSError("disk full (test)")

    with pytest.raises(OSError, match="disk full"):
        shell("yes | head -c 1000000", Broken(), timeout=60)


def test_shell_error_in_source_is_raised() -> None:
    class Broken(io.BytesIO):
        def read(self, size: Optional[int] = -1) -> bytes:
            raise OSError("unreadable (test)")

    with pytest.raises(OSError, match="unreadable"):
        shell("cat", io.BytesIO(), Broken(), timeout=60)


def test_shell_failure() -> None:
    out = io.StringIO()
    with pytest.raises(mproc.ShellError) as info:
        shell("echo some; exit 4", out)
    assert info.value.returncode == 4
    assert out.getvalue() == "some\n"


# --- errors ----------------------------------------------------------------------------


def test_shell_error_pickles() -> None:
    with pytest.raises(mproc.ShellError) as info:
        shell_exec("echo out; exit 5")
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is mproc.ShellError
    assert (copy.returncode, copy.cmd, copy.output, copy.pid) == (
        5,
        "echo out; exit 5",
        "out\n",
        info.value.pid,
    )
    assert str(copy) == str(info.value)


def test_shell_timeout_pickles() -> None:
    with pytest.raises(mproc.ShellTimeout) as info:
        shell_exec("echo out; sleep 100", timeout=0.5)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is mproc.ShellTimeout
    assert (copy.returncode, copy.cmd, copy.output, copy.timeout) == (
        info.value.returncode,
        "echo out; sleep 100",
        "out\n",
        0.5,
    )
    assert str(copy) == str(info.value)


# --- timeouts --------------------------------------------------------------------------


def test_timeout_kills_pipeline() -> None:
    mark = marker()
    cmd = f"echo before; sleep {mark} | cat"
    with pytest.raises(mproc.ShellTimeout) as info:
        shell_exec(cmd, timeout=0.5)
    err = info.value
    assert isinstance(err, subprocess.TimeoutExpired)
    assert isinstance(err, subprocess.CalledProcessError)
    assert isinstance(err, mproc.ShellError)
    assert err.timeout == 0.5
    assert err.output == "before\n"
    assert err.cmd == cmd
    assert "timed out after 0.5 s" in str(err) and mark in str(err)
    assert survivors(mark) == []


def test_timeout_kills_background_descendants() -> None:
    mark = marker()
    with pytest.raises(mproc.ShellTimeout):
        shell_exec(f"sh -c 'sleep {mark}' & sh -c 'sh -c \"sleep {mark}\"' & wait", timeout=0.5)
    assert survivors(mark) == []


def test_timeout_after_shell_exited_but_pipe_held() -> None:
    # bash exits at once; its background sleep keeps the output pipe open.
    mark = marker()
    with pytest.raises(mproc.ShellTimeout) as info:
        shell_exec(f"sleep {mark} & echo hi", timeout=0.5)
    assert info.value.output == "hi\n"
    assert survivors(mark) == []


def test_timeout_kills_a_descendant_that_left_the_group() -> None:
    mark = marker()
    with pytest.raises(mproc.ShellTimeout):
        shell_exec(f"setsid sleep {mark} & wait", timeout=0.5)
    assert survivors(mark) == []


def test_shell_run_timeout() -> None:
    mark = marker()
    with pytest.raises(mproc.ShellTimeout) as info:
        shell_run(f"sleep {mark} | cat", timeout=0.5)
    assert info.value.output is None
    assert survivors(mark) == []


def test_shell_timeout_keeps_partial_output() -> None:
    mark = marker()
    out = io.StringIO()
    with pytest.raises(mproc.ShellTimeout):
        shell(f"echo before; sleep {mark} | cat", out, io.StringIO("x" * 1_000_000), timeout=0.5)
    assert out.getvalue() == "before\n"
    assert survivors(mark) == []


def test_no_timeout_when_fast_enough() -> None:
    assert shell_exec("echo ok", timeout=30) == "ok\n"
    with pytest.raises(mproc.ShellError) as info:
        shell_exec("exit 2", timeout=30)
    assert type(info.value) is mproc.ShellError


def test_process_group_only_with_timeout() -> None:
    code = shlex.quote("import os; print(os.getpgrp())")
    assert shell_exec(f"{PY} -c {code}") == f"{os.getpgrp()}\n"
    assert shell_exec(f"{PY} -c {code}", timeout=30) != f"{os.getpgrp()}\n"


# --- interruption ----------------------------------------------------------------------


@pytest.fixture
def usr1_interrupts() -> Iterator[None]:
    """Make SIGUSR1 act like Ctrl-C (KeyboardInterrupt) in this process."""

    def handler(signum: int, frame: Optional[types.FrameType]) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, old)


def _via_shell(cmd: str, timeout: Optional[float]) -> None:
    shell(cmd, io.StringIO(), io.StringIO("x" * 1_000_000), timeout=timeout)


@pytest.mark.usefixtures("usr1_interrupts")
@pytest.mark.parametrize("fn", [shell_exec, shell_run, _via_shell])
@pytest.mark.parametrize("timeout", [None, 60])
def test_interrupt_kills_everything(fn: Callable[..., Any], timeout: Optional[float]) -> None:
    mark = marker()
    # The command interrupts us once its pipeline is running.
    cmd = f"sleep {mark} | cat & kill -USR1 $MPROC_PPID; wait"
    with pytest.raises(KeyboardInterrupt):
        fn(cmd, timeout=timeout)
    assert survivors(mark) == []


# --- properties ------------------------------------------------------------------------

no_nul = st.characters(exclude_categories=("Cs",), exclude_characters="\0")


@hypothesis_settings
@given(st.text(no_nul, max_size=200))
def test_text_round_trips(text: str) -> None:
    assert shell_exec("printf '%s' " + shlex.quote(text)) == text


@hypothesis_settings
@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z0-9_]{1,12}", fullmatch=True).map(lambda s: "MPT_" + s),
        st.text(no_nul, max_size=50),
        max_size=6,
    ),
    st.booleans(),
)
def test_env_round_trips(env: dict[str, str], as_list: bool) -> None:
    keys = sorted(env)
    cmd = "printf '%s\\0' " + " ".join(f'"${k}"' for k in keys) if keys else "true"
    arg: Any = [f"{k}={v}" for k, v in env.items()] if as_list else env
    out = shell_exec(cmd, arg)
    assert out.split("\0")[:-1] == [env[k] for k in keys]


# --- public API ------------------------------------------------------------------------


def test_exported() -> None:
    for name in ("shell", "shell_exec", "shell_run"):
        assert name in mproc.__all__
        assert getattr(mproc, name) is getattr(_shell, name)
        assert getattr(mproc, name).__doc__
