"""The exception hierarchy (SPEC §7), the public surface, and a silent logger (SPEC §8)."""

from __future__ import annotations

import inspect
import logging
import pickle
import signal
import subprocess
import sys
from typing import Any, Callable

import cloudpickle
import pytest

import mproc
from mproc._errors import describe_exitcode

ALL_ERRORS = [
    mproc.MprocError,
    mproc.NoSuchProcess,
    mproc.ShellError,
    mproc.ShellTimeout,
    mproc.MailboxError,
    mproc.MailboxNotFound,
    mproc.MailboxFull,
    mproc.MessageError,
    mproc.ReceiveTimeout,
]


# --- hierarchy ----------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_every_error_is_an_mproc_error(cls: type[Exception]) -> None:
    assert issubclass(cls, mproc.MprocError)


@pytest.mark.parametrize(
    ("cls", "base"),
    [
        (mproc.NoSuchProcess, ProcessLookupError),
        (mproc.ShellError, subprocess.CalledProcessError),
        (mproc.ShellTimeout, mproc.ShellError),
        (mproc.ShellTimeout, subprocess.CalledProcessError),
        (mproc.ShellTimeout, subprocess.TimeoutExpired),
        (mproc.MailboxNotFound, mproc.MailboxError),
        (mproc.MailboxFull, mproc.MailboxError),
        (mproc.MessageError, mproc.MailboxError),
        (mproc.ReceiveTimeout, mproc.MailboxError),
        (mproc.ReceiveTimeout, TimeoutError),
    ],
)
def test_error_also_is_the_standard_exception(cls: type[Exception], base: type[Exception]) -> None:
    assert issubclass(cls, base)


def test_errors_are_caught_by_the_standard_except_clauses() -> None:
    with pytest.raises(ProcessLookupError, match="PID 77"):
        raise mproc.NoSuchProcess(pid=77)
    with pytest.raises(subprocess.TimeoutExpired) as timeout:
        raise mproc.ShellTimeout("sleep 9", 2.5, output=b"partial")
    assert timeout.value.timeout == 2.5 and timeout.value.stdout == b"partial"
    with pytest.raises(subprocess.CalledProcessError) as failed:
        raise mproc.ShellError(3, ["ls", "/nope"], output="no such dir")
    assert failed.value.returncode == 3 and failed.value.stdout == "no such dir"
    with pytest.raises(TimeoutError, match="group 'jobs'"):
        raise mproc.ReceiveTimeout("no message for group 'jobs' within 1 s", group="jobs")


# --- messages and repr --------------------------------------------------------


def test_str_is_the_message_and_repr_shows_the_fields() -> None:
    err = mproc.MailboxError("runtime dir /run/x is a symlink", path="/run/x", pid=12, group="g")
    assert str(err) == "runtime dir /run/x is a symlink"
    assert repr(err) == (
        "MailboxError('runtime dir /run/x is a symlink', pid=12, path='/run/x', group='g')"
    )
    assert repr(mproc.MprocError("plain")) == "MprocError('plain')"


def test_no_such_process_names_the_pid() -> None:
    err = mproc.NoSuchProcess(pid=4242)
    assert str(err) == "no such process: PID 4242"
    assert err.pid == 4242
    assert repr(err) == "NoSuchProcess('no such process: PID 4242', pid=4242)"
    assert str(mproc.NoSuchProcess()) == "no such process"
    assert str(mproc.NoSuchProcess("gone since", pid=1)) == "gone since"


def test_shell_error_names_command_status_and_pid() -> None:
    err = mproc.ShellError(-9, ["sleep", "100"], output="x", pid=99)
    assert str(err) == "command 'sleep 100' exited with status SIGKILL(-9) (PID 99)"
    assert (err.returncode, err.cmd, err.output, err.pid) == (-9, ["sleep", "100"], "x", 99)
    assert repr(err) == (
        "ShellError(\"command 'sleep 100' exited with status SIGKILL(-9) (PID 99)\", "
        "returncode=-9, cmd=['sleep', '100'], pid=99)"
    )
    assert str(mproc.ShellError(2, "false")) == "command 'false' exited with status 2"


def test_shell_timeout_names_command_limit_and_pid() -> None:
    err = mproc.ShellTimeout("sleep 100 | cat", 1.5, output="partial", pid=5)
    assert str(err) == "command 'sleep 100 | cat' timed out after 1.5 s and was killed (PID 5)"
    assert (err.timeout, err.output, err.returncode) == (1.5, "partial", -signal.SIGKILL)
    assert "timeout=1.5" in repr(err) and "cmd='sleep 100 | cat'" in repr(err)


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (None, "unknown"),
        (0, "0"),
        (3, "3"),
        (-9, "SIGKILL(-9)"),
        (-15, "SIGTERM(-15)"),
        (-999, "signal 999(-999)"),
    ],
)
def test_describe_exitcode(code: Any, text: str) -> None:
    assert describe_exitcode(code) == text


# --- pickling -----------------------------------------------------------------


def samples() -> list[Exception]:
    return [
        mproc.MprocError("base", pid=1, path="/p", group="g"),
        mproc.NoSuchProcess(pid=2),
        mproc.NoSuchProcess("custom", pid=3, path="/proc/3"),
        mproc.ShellError(4, "exit 4", output="out", stderr="err", pid=4),
        mproc.ShellError(-15, ["a", "b"]),
        mproc.ShellTimeout("sleep 9", 0.5, output=b"partial", pid=5),
        mproc.ShellTimeout("sleep 9", 2, returncode=-15, msg="custom message"),
        mproc.MailboxError("bad dir", path="/tmp/x"),
        mproc.MailboxNotFound("no mailbox", pid=6, group="jobs"),
        mproc.MailboxFull("full", pid=7, group="jobs"),
        mproc.MessageError("cannot unpickle", pid=8, group="g"),
        mproc.ReceiveTimeout("nothing", group="g"),
    ]


FIELDS = ("msg", "pid", "path", "group", "returncode", "cmd", "output", "stderr", "timeout")


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
@pytest.mark.parametrize("err", samples(), ids=lambda e: type(e).__name__)
def test_errors_survive_a_pickle_round_trip(err: Exception, dumps: Callable[[Any], bytes]) -> None:
    copy = pickle.loads(dumps(err))
    assert type(copy) is type(err)
    assert str(copy) == str(err)
    assert repr(copy) == repr(err)
    assert copy.args == err.args
    for field in FIELDS:
        assert getattr(copy, field, None) == getattr(err, field, None), field


def test_every_error_class_is_sampled() -> None:
    assert {type(e) for e in samples()} == set(ALL_ERRORS)


# --- public surface -----------------------------------------------------------


def test_all_names_exist_once() -> None:
    assert len(mproc.__all__) == len(set(mproc.__all__))
    missing = [name for name in mproc.__all__ if not hasattr(mproc, name)]
    assert missing == []


def test_every_public_attribute_is_in_all() -> None:
    public = {
        name
        for name, value in vars(mproc).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public - set(mproc.__all__) == set()


def test_every_public_name_has_a_docstring() -> None:
    undocumented = []
    for name in mproc.__all__:
        obj = getattr(mproc, name)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        doc = obj.__doc__  # the object's own, not one inherited from a base class
        if not doc or not doc.strip().splitlines()[0].strip():
            undocumented.append(name)
    assert undocumented == []


# --- logging ------------------------------------------------------------------


def test_mproc_logger_is_silent_but_propagates() -> None:
    logger = logging.getLogger("mproc")
    assert logger.propagate
    assert logger.level == logging.NOTSET
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)
    assert all(isinstance(h, logging.NullHandler) for h in logger.handlers)


def test_mproc_logs_nothing_to_stderr_by_default() -> None:
    code = (
        "import logging, mproc\n"
        "logging.getLogger('mproc').error('must not be printed')\n"
        "logging.getLogger('mproc.sub').warning('nor this')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert (done.stdout, done.stderr) == ("", "")
