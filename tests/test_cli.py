"""The command line, ``python -m mproc`` (SPEC §14, issue 12), driven as a user would.

Every subcommand runs as a subprocess with this test's environment (its
private runtime dir). Synchronisation is by handshakes: a line the command
or a child prints, a message, a zombie that stays until we reap it; every
wait is bounded.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Optional

import call_peers as peers
import psutil
import pytest
from conftest import Spawner
from mailbox_peers import Kids

import mproc

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-specific checks"),
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),
]

WAIT = peers.WAIT
CLI = [sys.executable, "-m", "mproc"]
SUBCOMMANDS = ["ps", "ls", "send", "recv", "receive", "call", "kill", "wait", "tree", "exec"]


def run(*args: str, input: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    """Run ``mproc ARGS`` to the end (bounded), stdin ``input`` (else empty); return what it did."""
    stdin = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=WAIT * 3, **stdin)


def one_error_line(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert that stderr is exactly one ``mproc: …`` line containing ``needles``; return it."""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("mproc: "), done.stderr
    for needle in needles:
        assert needle in lines[0], done.stderr
    return lines[0]


def read_line(stream: Any, timeout: float = WAIT) -> str:
    """Read one line from a text pipe, failing after ``timeout``."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no line within {timeout} s"
    return str(stream.readline())


def popen(spawner: Spawner, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
    """``spawner.popen``, whose pipes are closed at the end of the test."""
    p = spawner.popen(argv, **kw)

    def close() -> None:
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                stream.close()

    spawner.cleanup(close)
    return p


def dead_pid(spawner: Spawner) -> int:
    """A PID whose process has exited and been reaped."""
    p = spawner.popen(["true"])
    p.wait(WAIT)
    return p.pid


def exited_child(spawner: Spawner, code: str) -> subprocess.Popen[Any]:
    """A child that has exited with ``code`` and stays a zombie until the test reaps it."""
    p = spawner.popen(["sh", "-c", code])
    fd = os.pidfd_open(p.pid)
    try:
        assert select.select([fd], [], [], WAIT)[0]
    finally:
        os.close(fd)
    return p


def idle(name: str, parent: int) -> None:
    """Register ``name``, tell ``parent`` (group "ready"); on a message in "ctl",
    report our own mproc.stats() (group "report"); then stop (group "stop")."""
    mproc.register(name)
    mproc.send(parent, name, "ready", timeout=WAIT)
    msg = mproc.receive("ctl", timeout=WAIT)
    mproc.send(msg.sender_pid, mproc.stats(), "report", timeout=WAIT)
    mproc.receive("stop", timeout=WAIT)


# ---------------------------------------------------------------- help and usage


@pytest.mark.parametrize("command", ["", *SUBCOMMANDS])
def test_help_says_what_and_lists_exit_codes(command: str) -> None:
    done = run(*([command] if command else []), "--help")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "exit status:" in done.stdout
    shown = {"ls": "ps", "receive": "recv"}.get(command, command)  # aliases
    assert f"usage: mproc {shown}".rstrip() in done.stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ([], ["required: COMMAND"]),
        (["frob"], ["invalid choice: 'frob'"]),
        (["send", "0", "x"], ["'0' is not a PID", "> 0"]),
        (["send", "-7", "x"], ["'-7' is not a PID"]),
        (["send", "a/b", "x"], ["'a/b'", "'/'"]),
        (["send", "1", "x", "--timeout", "soon"], ["--timeout", "'soon' is not a number"]),
        (["send", "1", "x", "--timeout", "-1"], ["'-1' is not a number of seconds >= 0"]),
        (["call", "1", "x", "--timeout", "nan"], ["'nan'"]),
        (["kill", "0"], ["'0' is not a PID"]),
        (["kill", "-1"], ["'-1' is not a PID"]),
        (["kill", "12x"], ["'12x' is not a PID"]),
        (["kill", "1"], ["refusing PID 1", "init"]),
        (["kill", "2"], ["refusing PID 2", "kernel thread"]),
        (["kill", "-s", "NOPE", "4242"], ["'NOPE' is not a signal"]),
        (["kill", "-s", "0", "4242"], ["'0' is not a signal"]),
        (["kill", "-s", "999", "4242"], ["'999' is not a signal"]),
        (["kill", "--timeout", "x", "4242"], ["'x' is not a number"]),
        (["wait", "0"], ["'0' is not a PID"]),
        (["wait", "me"], ["'me' is not a PID"]),
        (["wait", "4242", "--timeout", "-2"], ["'-2'"]),
        (["tree", "x"], ["'x' is not a PID"]),
        (["ps", "--watch", "0.01"], ["between 0.1 and 3600"]),
        (["ps", "--watch", "1e9"], ["between 0.1 and 3600"]),
        (["recv", "-n", "0"], ["'0' is not a count"]),
        (["exec"], ["which command"]),
        (["exec", "--timeout", "x", "true"], ["'x' is not a number"]),
    ],
)
def test_bad_usage_is_one_line_and_status_2(args: list[str], needles: list[str]) -> None:
    done = run(*args)
    assert done.returncode == 2, done
    one_error_line(done, *needles)
    assert done.stdout == ""


def test_kill_refuses_its_parent_and_itself() -> None:
    # $$ is the shell: the parent of mproc, then (after exec) mproc itself.
    out = subprocess.run(
        ["sh", "-c", f'{shlex.join(CLI)} kill $$; echo "status $?"'],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert out.stdout == "status 2\n"
    assert "refusing PID" in out.stderr and "the parent of this process" in out.stderr
    out = subprocess.run(
        ["sh", "-c", f"exec {shlex.join(CLI)} kill --tree $$"],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert out.returncode == 2
    assert "refusing PID" in out.stderr and "this process" in out.stderr


# ---------------------------------------------------------------- ps


def test_ps_json_depths_are_the_receivers_own_counters(kids: Kids) -> None:
    mproc.open_mailbox()
    p = kids.start(idle, "quiet", os.getpid())
    assert mproc.receive("ready", timeout=WAIT).data == "quiet"
    sent = {"jobs": 5, "": 3, "logs ünï": 2}
    for group, n in sent.items():
        for i in range(n):
            mproc.send("quiet", {"i": i}, group, timeout=WAIT)
    done = run("ps", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["pid"]: row for row in json.loads(done.stdout)}
    row = rows[p.pid]
    assert row["answered"] is True and row["error"] is None
    assert row["groups"] == sent  # exactly: the child's code received none of them
    assert row["names"] == ["quiet"]
    assert row["senders"] == [os.getpid()]  # ps's own query is not a sender
    assert row["received"] == sum(sent.values())
    assert abs(row["start_time"] - psutil.Process(p.pid).create_time()) < 1
    assert row["cmdline"] == psutil.Process(p.pid).cmdline()
    # The child's own in-process view agrees.
    mproc.send(p.pid, "report", "ctl", timeout=WAIT)
    own = mproc.receive("report", timeout=WAIT).data
    assert own["groups"] == row["groups"] and own["names"] == row["names"]
    assert own["received"] == row["received"] + 1  # plus the "report" request itself
    # And the text table shows the same.
    text = run("ps")
    assert text.returncode == 0, text.stderr
    line = next(s for s in text.stdout.splitlines() if s.split()[0] == str(p.pid))
    assert '"":3 jobs:5 "logs ünï":2' in line
    assert " quiet " in line and f" {os.getpid()} " in line
    assert text.stdout.splitlines()[0].split() == [
        "PID",
        "NAMES",
        "STARTED",
        "QUEUED",
        "SENDERS",
        "COMMAND",
    ]
    mproc.send(p.pid, None, "stop", timeout=WAIT)
    assert kids.finish(p) == 0


def test_ps_shows_a_mailbox_that_does_not_answer(kids: Kids) -> None:
    p = kids.start(idle, "frozen", os.getpid())
    assert mproc.receive("ready", timeout=WAIT).data == "frozen"
    assert p.pid is not None
    os.kill(p.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        done = run("ps", "--json", "--timeout", "0.3")
        assert time.monotonic() - started < WAIT
        assert done.returncode == 0, done.stderr
        rows = {r["pid"]: r for r in json.loads(done.stdout)}
        row = rows[p.pid]
        assert row["answered"] is False
        assert row.keys() == rows[os.getpid()].keys()  # ours answered: the same keys
        assert row["groups"] is None and row["senders"] is None
        assert f"PID {p.pid}" in row["error"] and "did not answer" in row["error"]
        assert row["names"] == ["frozen"]  # from the names directory
        text = run("ps", "--timeout", "0.3")
        assert "(no answer: " in text.stdout
    finally:
        os.kill(p.pid, signal.SIGCONT)
    mproc.send(p.pid, None, "ctl", timeout=WAIT)
    mproc.receive("report", timeout=WAIT)
    mproc.send(p.pid, None, "stop", timeout=WAIT)
    assert kids.finish(p) == 0


def test_ps_of_nothing_and_ls_alias() -> None:
    done = run("ls", "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == []
    done = run("ps")
    assert done.returncode == 0 and done.stdout.split() == [
        "PID",
        "NAMES",
        "STARTED",
        "QUEUED",
        "SENDERS",
        "COMMAND",
    ]


def test_ps_watch_refreshes_in_place_and_ctrl_c_exits_0(spawner: Spawner) -> None:
    mproc.open_mailbox()
    mproc.send(os.getpid(), 1, "seen", timeout=WAIT)
    master, slave = pty.openpty()
    try:
        p = popen(spawner, [*CLI, "ps", "--watch", "0.1"], stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        slave = -1
        out = b""
        deadline = time.monotonic() + WAIT
        while out.count(b"\x1b[H\x1b[2J") < 3:  # cleared and redrawn, three times
            assert time.monotonic() < deadline, out
            if select.select([master], [], [], 0.5)[0]:
                out += os.read(master, 65536)
        text = out.decode()
        assert "mproc ps - 1 mailbox - every 0.1 s" in text
        assert "MSG/S" in text and f"{os.getpid()}" in text and "seen:1" in text
        p.send_signal(signal.SIGINT)
        assert p.wait(WAIT) == 0
        assert p.stderr is not None and p.stderr.read() == b""
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_ps_watch_json_is_one_object_per_refresh(spawner: Spawner) -> None:
    p = popen(spawner, [*CLI, "ps", "--watch", "0.1", "--json"], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    first = json.loads(read_line(p.stdout))
    second = json.loads(read_line(p.stdout))
    assert first["mailboxes"] == [] and second["time"] >= first["time"]
    p.send_signal(signal.SIGINT)
    assert p.wait(WAIT) == 0


# ---------------------------------------------------------------- send


@pytest.mark.parametrize(
    ("args", "stdin", "expected"),
    [
        (["42"], None, 42),
        (['{"job": [1, 2]}'], None, {"job": [1, 2]}),
        (["hello world"], None, "hello world"),
        (['"quoted"'], None, "quoted"),
        (["42", "--raw"], None, "42"),
        (["-"], '{"a": null}\n', {"a": None}),
        (["-"], "plain text\n", "plain text"),
        (["-", "--raw"], "kept as is\n", "kept as is\n"),
        (["-7"], None, -7),
    ],
)
def test_send_parses_json_else_sends_the_string(
    args: list[str], stdin: Optional[str], expected: Any
) -> None:
    mproc.open_mailbox()
    done = run("send", str(os.getpid()), *args, "--group", "cli", input=stdin)
    assert done.returncode == 0, done.stderr
    assert done.stdout == done.stderr == ""
    msg = mproc.receive("cli", timeout=WAIT)
    assert msg.data == expected
    assert msg.group == "cli"


def test_send_by_name() -> None:
    mproc.register("cli-target")
    done = run("send", "cli-target", "[1]", "--timeout", str(WAIT))
    assert done.returncode == 0, done.stderr
    assert mproc.receive(timeout=WAIT).data == [1]


def test_send_to_a_dead_pid_or_an_unknown_name_fails_clearly(spawner: Spawner) -> None:
    pid = dead_pid(spawner)
    done = run("send", str(pid), "1")
    assert done.returncode == 1
    one_error_line(done, f"PID {pid}", "no such process")
    started = time.monotonic()
    done = run("send", "nobody-holds-this", "1", "--timeout", "0.2")
    assert done.returncode == 1
    one_error_line(done, "'nobody-holds-this'")
    assert time.monotonic() - started < WAIT


def test_send_from_bad_stdin_fails_clearly(tmp_path: Any) -> None:
    me = str(os.getpid())
    done = run("send", me, "-")  # /dev/null: empty
    assert done.returncode == 1
    one_error_line(done, "stdin is empty")
    raw = subprocess.run(
        [*CLI, "send", me, "-"], input=b"\xff\xfe", capture_output=True, timeout=WAIT
    )
    assert raw.returncode == 1
    assert raw.stderr == b"mproc: stdin is not UTF-8 text (byte 0xff at offset 0)\n"
    closed = subprocess.run(
        ["sh", "-c", f"{shlex.join(CLI)} send {me} - <&-"],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert closed.returncode == 1
    one_error_line(closed, "stdin is closed")
    out_only = tmp_path / "w"
    unreadable = subprocess.run(
        ["sh", "-c", f"{shlex.join(CLI)} send {me} - 0>{shlex.quote(str(out_only))}"],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert unreadable.returncode == 1
    one_error_line(unreadable, "cannot read the value from stdin", "Bad file descriptor")


# ---------------------------------------------------------------- recv


def test_recv_prints_what_is_sent_to_its_pid_or_name(spawner: Spawner) -> None:
    p = popen(
        spawner,
        [*CLI, "recv", "--name", "cli-inbox", "-n", "3", "--json", "--timeout", str(WAIT * 2)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stderr is not None
    hello = read_line(p.stderr)
    assert f"as PID {p.pid}" in hello and "'cli-inbox'" in hello
    mproc.send("cli-inbox", {"a": 1}, timeout=WAIT)
    mproc.send(p.pid, "by pid", timeout=WAIT)
    mproc.send(p.pid, "other group", "elsewhere", timeout=WAIT)  # not printed
    with pytest.raises(ValueError, match="mproc recv"):
        mproc.call("cli-inbox", "a call", timeout=WAIT)  # printed, and refused
    lines = [json.loads(read_line(p.stdout)) for _ in range(3)]
    me = os.getpid()
    assert lines == [
        {"sender": me, "group": "", "data": {"a": 1}, "is_call": False},
        {"sender": me, "group": "", "data": "by pid", "is_call": False},
        {"sender": me, "group": "", "data": "a call", "is_call": True},
    ]
    assert p.wait(WAIT) == 0
    assert p.stdout.read() == "" and p.stderr.read() == ""
    assert mproc.whereis("cli-inbox") is None  # released at exit


def test_recv_text_format_and_timeout() -> None:
    done = run("recv", "-n", "2", "--timeout", "0.2", "--group", "g")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[0].startswith("receiving group 'g' as PID")
    assert lines[1] == "mproc: no more messages in group 'g' within 0.2 s (0 of 2 received)"
    assert len(lines) == 2


def test_recv_text_lines(spawner: Spawner) -> None:
    p = popen(
        spawner,
        [*CLI, "recv", "-q", "-n", "1", "--group", "jobs", "--timeout", str(WAIT * 2)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    mproc.send(p.pid, {"x": "two\nlines"}, "jobs", timeout=WAIT)
    out, err = p.communicate(timeout=WAIT)
    assert p.returncode == 0 and err == ""
    assert out == f'{os.getpid()}\tjobs\t{{"x": "two\\nlines"}}\n'


def test_recv_with_a_name_held_by_another_process() -> None:
    mproc.register("cli-taken")
    done = run("recv", "--name", "cli-taken", "--timeout", "1")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("mproc: ")
    assert "cli-taken" in done.stderr and str(os.getpid()) in done.stderr


def test_recv_interrupted_and_terminated_exit_cleanly(spawner: Spawner) -> None:
    for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        p = popen(
            spawner,
            [*CLI, "recv", "--name", f"cli-{sig.name}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert p.stderr is not None
        read_line(p.stderr)  # the mailbox is open, the name held
        assert mproc.whereis(f"cli-{sig.name}") == p.pid
        p.send_signal(sig)
        assert p.wait(WAIT) == status
        rest = p.stderr.read()
        assert "Traceback" not in rest
        assert rest == ("mproc: interrupted\n" if sig == signal.SIGINT else "")
        assert mproc.whereis(f"cli-{sig.name}") is None
        sockets = [f for f in os.listdir(os.environ["MPROC_RUNTIME_DIR"]) if f.endswith(".sock")]
        assert not [f for f in sockets if f.startswith(f"{p.pid}.")]


# ---------------------------------------------------------------- call


def test_call_prints_the_reply_and_reports_remote_errors(kids: Kids) -> None:
    p = kids.start(peers.serve)
    pid = str(p.pid)
    done = run("call", pid, '["double", 21]', "--group", "rpc")
    assert (done.returncode, done.stdout, done.stderr) == (0, "42\n", "")
    done = run("call", pid, '["echo", "text"]', "--group", "rpc")
    assert done.stdout == "text\n"
    done = run("call", pid, '["echo", "text"]', "--group", "rpc", "--json")
    assert done.stdout == '"text"\n'
    done = run("call", pid, "-", "--group", "rpc", input='["echo", {"k": [1]}]')
    assert done.stdout == '{"k": [1]}\n'
    done = run("call", pid, '["nope", 1]', "--group", "rpc")
    assert done.returncode == 1
    one_error_line(done, f"PID {pid} raised ValueError: unknown op 'nope'")
    done = run("call", pid, '["raise_local", "boom"]', "--group", "rpc")
    assert done.returncode == 1  # its class came by value (cloudpickle)
    one_error_line(done, f"PID {pid} raised LocalError: boom")
    done = run("call", pid, '["raise_unpicklable", 0]', "--group", "rpc")
    assert done.returncode == 1  # a RemoteError: the instance does not unpickle here
    assert done.stderr == f"mproc: PID {pid} raised call_peers.Unpicklable: 3\n"
    done = run("call", pid, "1", "--group", "nobody-serves", "--timeout", "0.3")
    assert done.returncode == 1
    one_error_line(done, "no reply from PID", "0.3 s")
    done = run("call", pid, '["stop", null]', "--group", "rpc")
    assert done.returncode == 1
    one_error_line(done, "raised StopServing")
    assert kids.finish(p) == 0


def test_call_by_name_and_to_nobody(kids: Kids, spawner: Spawner) -> None:
    p = kids.start(peers.hold_name_and_serve, "cli-calc")
    done = run("call", "cli-calc", '["double", 4]', "--group", "rpc", "--timeout", str(WAIT))
    assert (done.returncode, done.stdout) == (0, "8\n"), done.stderr
    done = run("call", "cli-calc", '["nope", 0]', "--group", "rpc", "--timeout", str(WAIT))
    one_error_line(done, f"'cli-calc' (PID {p.pid}) raised ValueError")
    run("call", "cli-calc", '["stop", 0]', "--group", "rpc", "--timeout", str(WAIT))
    assert kids.finish(p) == 0
    pid = dead_pid(spawner)
    done = run("call", str(pid), "1")
    assert done.returncode == 1
    one_error_line(done, f"PID {pid}", "no such process")


# ---------------------------------------------------------------- kill


def test_kill_terms_waits_and_reports(spawner: Spawner) -> None:
    a = spawner.popen(["sleep", "60"])
    b = spawner.popen(["sleep", "60"])
    done = run("kill", str(a.pid), str(b.pid))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"PID {a.pid}: exited after SIGTERM",
        f"PID {b.pid}: exited after SIGTERM",
    ]
    assert a.wait(WAIT) == -signal.SIGTERM and b.wait(WAIT) == -signal.SIGTERM


def test_kill_escalates_to_sigkill(spawner: Spawner) -> None:
    p = popen(
        spawner,
        [
            sys.executable,
            "-c",
            "import signal,sys,time; signal.signal(signal.SIGTERM, "
            "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert read_line(p.stdout) == "ready\n"
    started = time.monotonic()
    done = run("kill", "--timeout", "0.3", "--json", str(p.pid))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        {
            "pid": p.pid,
            "members": [p.pid],
            "signals": ["SIGTERM", "SIGKILL"],
            "outcome": "killed",
            "error": None,
        }
    ]
    assert time.monotonic() - started < WAIT
    assert p.wait(WAIT) == -signal.SIGKILL


def test_kill_with_another_signal_and_no_kill(spawner: Spawner) -> None:
    code = (
        "import os, signal, time\n"
        "def got(*_):\n    print('got', flush=True)\n    os._exit(0)\n"
        "signal.signal(signal.SIGUSR1, got)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    p = popen(spawner, [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert read_line(p.stdout) == "ready\n"
    done = run("kill", "-s", "usr1", "--no-kill", "--timeout", "0", str(p.pid))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"PID {p.pid}: sent SIGUSR1\n"
    assert read_line(p.stdout) == "got\n"
    assert p.wait(WAIT) == 0


def test_kill_a_stopped_process_and_a_zombie(spawner: Spawner) -> None:
    p = spawner.popen(["sleep", "60"])
    os.kill(p.pid, signal.SIGSTOP)
    z = exited_child(spawner, "exit 0")
    done = run("kill", "-s", "INT", str(p.pid), str(z.pid))
    assert done.returncode == 0, done.stderr
    assert f"PID {p.pid}: exited after SIGINT" in done.stdout
    assert p.wait(WAIT) == -signal.SIGINT


def test_kill_some_missing_still_kills_the_rest(spawner: Spawner) -> None:
    gone = dead_pid(spawner)
    p = spawner.popen(["sleep", "60"])
    done = run("kill", str(gone), str(p.pid))
    assert done.returncode == 1
    one_error_line(done, f"PID {gone}: no such process")
    assert done.stdout == f"PID {p.pid}: exited after SIGTERM\n"
    assert p.wait(WAIT) == -signal.SIGTERM


def _tree_script(*commands: str) -> list[str]:
    """A shell that starts ``commands`` in the background, prints their PIDs, then waits."""
    started = "".join(f"{c} &\np{i}=$!\n" for i, c in enumerate(commands))
    pids = " ".join(f"$p{i}" for i in range(len(commands)))
    return ["sh", "-c", f"{started}echo {pids}\nwait"]


def reap_orphans() -> None:
    """Reap the zombies re-parented to us (a subreaper), as init would."""
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass


def test_kill_tree_escalates_for_the_member_that_ignores_term(spawner: Spawner) -> None:
    stubborn = (
        f"{sys.executable} -c 'import signal, time; signal.signal(signal.SIGTERM, "
        'signal.SIG_IGN); print("ready", flush=True); time.sleep(60)\''
    )
    p = popen(spawner, _tree_script(stubborn, "sleep 60"), stdout=subprocess.PIPE, text=True)
    lines = sorted(read_line(p.stdout) for _ in range(2))  # in either order
    assert lines[1] == "ready\n"
    kids = [int(x) for x in lines[0].split()]
    assert len(kids) == 2
    done = run("kill", "--tree", "--timeout", "1", "--json", str(p.pid))
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert sorted(result["members"]) == sorted([p.pid, *kids])
    assert result["signals"] == ["SIGTERM", "SIGKILL"] and result["outcome"] == "killed"
    assert p.wait(WAIT) == -signal.SIGTERM
    for pid in kids:  # re-parented to us (a subreaper) when their shell died
        assert os.waitpid(pid, 0)[0] == pid


def test_kill_tree_text(spawner: Spawner) -> None:
    p = popen(spawner, _tree_script("sleep 60", "sleep 61"), stdout=subprocess.PIPE, text=True)
    kids = [int(x) for x in read_line(p.stdout).split()]
    done = run("kill", "--tree", str(p.pid))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"PID {p.pid} and 2 more in its tree: exited after SIGTERM\n"
    p.wait(WAIT)
    for pid in kids:
        assert os.waitpid(pid, 0)[0] == pid


# ---------------------------------------------------------------- wait


def test_wait_reports_exit_statuses_while_they_can_be_read(spawner: Spawner) -> None:
    a = exited_child(spawner, "exit 7")
    b = exited_child(spawner, "kill -TERM $$")
    done = run("wait", str(a.pid), str(b.pid), "--timeout", str(WAIT))
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(
        [f"PID {a.pid} exited with status 7", f"PID {b.pid} was killed by SIGTERM"]
    )
    done = run("wait", "--json", str(a.pid))
    assert json.loads(done.stdout) == {"pid": a.pid, "exited": True, "exitcode": 7, "signal": None}


def test_wait_for_a_process_that_exits_later(spawner: Spawner) -> None:
    p = popen(spawner, ["sh", "-c", "read line; exit 4"], stdin=subprocess.PIPE)
    w = popen(
        spawner,
        [*CLI, "wait", "--json", "--timeout", str(WAIT), str(p.pid)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdin is not None
    p.stdin.close()  # whether wait pinned it before or after: it stays a zombie till we reap
    out, _ = w.communicate(timeout=WAIT * 2)
    assert w.returncode == 0
    assert json.loads(out) == {"pid": p.pid, "exited": True, "exitcode": 4, "signal": None}
    assert p.wait(WAIT) == 4


def test_wait_timeout_and_missing_pids(spawner: Spawner) -> None:
    p = spawner.popen(["sleep", "60"])
    done = run("wait", str(p.pid), "--timeout", "0.2")
    assert done.returncode == 1
    one_error_line(done, "timed out after 0.2 s", f"still running: PID {p.pid}")
    gone = dead_pid(spawner)
    z = exited_child(spawner, "exit 0")
    done = run("wait", str(gone), str(z.pid))
    assert done.returncode == 3
    one_error_line(done, f"no such process: PID {gone}")
    assert done.stdout == f"PID {z.pid} exited with status 0\n"


# ---------------------------------------------------------------- tree


def test_tree_text_and_json(spawner: Spawner) -> None:
    p = popen(spawner, _tree_script("sleep 60", "sleep 61"), stdout=subprocess.PIPE, text=True)
    kid_pids = [int(x) for x in read_line(p.stdout).split()]
    done = run("tree", str(p.pid), "--json")
    assert done.returncode == 0, done.stderr
    root = json.loads(done.stdout)
    assert root["pid"] == p.pid and root["ppid"] == os.getpid()
    assert sorted(c["pid"] for c in root["children"]) == sorted(kid_pids)
    assert sorted(c["cmdline"][1] for c in root["children"]) == ["60", "61"]
    text = run("tree", str(p.pid)).stdout.splitlines()
    assert text[0].startswith(f"{p.pid}  sh -c ")
    assert text[1].startswith("├─ ") and text[2].startswith("└─ ")
    assert "sleep 60" in text[1] and "sleep 61" in text[2]
    mproc.kill_tree(p.pid, timeout=WAIT)
    p.wait(WAIT)
    for pid in kid_pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def test_tree_shows_registered_names(kids: Kids) -> None:
    named = kids.start(idle, "cli-tree", os.getpid())
    assert mproc.receive("ready", timeout=WAIT).data == "cli-tree"
    done = run("tree", str(os.getpid()))
    assert done.returncode == 0, done.stderr
    mine = [line for line in done.stdout.splitlines() if f" {named.pid}  " in line]
    assert len(mine) == 1 and mine[0].endswith("  [names: cli-tree]")
    assert mine[0].startswith(("├─ ", "└─ "))  # a child of ours
    tree = json.loads(run("tree", "--json", str(named.pid)).stdout)
    assert tree["names"] == ["cli-tree"] and tree["children"] == []
    mproc.send(named.pid, None, "ctl", timeout=WAIT)
    mproc.receive("report", timeout=WAIT)
    mproc.send(named.pid, None, "stop", timeout=WAIT)
    assert kids.finish(named) == 0


def test_tree_of_a_dead_pid(spawner: Spawner) -> None:
    pid = dead_pid(spawner)
    done = run("tree", str(pid))
    assert done.returncode == 1
    one_error_line(done, f"no such process: PID {pid}")


# ---------------------------------------------------------------- exec


@pytest.mark.parametrize(
    ("args", "stdout", "status"),
    [
        (["echo", "hi", "there"], "hi there\n", 0),
        (["echo hi | tr a-z A-Z"], "HI\n", 0),
        (["exit 3"], "", 3),
        (["sh", "-c", "kill -TERM $$"], "", 128 + signal.SIGTERM),
        (["sh", "-c", "kill -KILL $$"], "", 128 + signal.SIGKILL),
        (["--", "printf", "%s|", "--flag", "-x"], "--flag|-x|", 0),
        (["true"], "", 0),
    ],
)
def test_exec_passes_output_and_status_on(args: list[str], stdout: str, status: int) -> None:
    done = run("exec", *args)
    assert (done.returncode, done.stdout, done.stderr) == (status, stdout, "")


def test_exec_keeps_stdout_and_stderr_apart_and_passes_stdin() -> None:
    done = run("exec", "sh", "-c", "echo out; echo err >&2; tr a-z A-Z", input="abc\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "out\nABC\n", "err\n")


def test_exec_streams_as_the_command_writes(spawner: Spawner) -> None:
    code = (
        "import sys; sys.stderr.write('waiting for stdin\\n'); sys.stderr.flush();"
        "print(sys.stdin.read().upper())"
    )
    p = popen(
        spawner,
        [*CLI, "exec", sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdin is not None and p.stdout is not None and p.stderr is not None
    # Seen while the command still runs, blocked on its stdin.
    assert read_line(p.stderr) == "waiting for stdin\n"
    assert p.poll() is None
    p.stdin.write("hello")
    p.stdin.close()
    assert read_line(p.stdout) == "HELLO\n"
    assert p.wait(WAIT) == 0


def test_exec_timeout_kills_the_tree_with_status_124() -> None:
    started = time.monotonic()
    done = run("exec", "--timeout", "0.3", "sleep", "60")
    assert done.returncode == 124
    one_error_line(done, "'sleep' timed out after 0.3 s")
    assert time.monotonic() - started < WAIT
    # A member that ignores SIGTERM is killed --kill-after later; nothing is left
    # (the leak check would see the sleep, re-parented to us).
    done = run(
        "exec",
        "--timeout",
        "0.3",
        "--kill-after",
        "0.2",
        "sh",
        "-c",
        "trap '' TERM; sleep 60 & wait",
    )
    assert done.returncode == 124
    one_error_line(done, "timed out")
    reap_orphans()  # the killed sleep, whose shell died first


def test_exec_cannot_run(tmp_path: Any) -> None:
    done = run("exec", "no-such-program-here")
    assert done.returncode == 127
    one_error_line(done, "cannot run 'no-such-program-here'", "No such file")
    script = tmp_path / "not-executable"
    script.write_text("echo no\n")
    done = run("exec", str(script))
    assert done.returncode == 126
    one_error_line(done, "Permission denied")


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_exec_forwards_ctrl_c_and_term(spawner: Spawner, sig: int, status: int) -> None:
    code = "import time; print('up', flush=True); time.sleep(60)"
    p = popen(
        spawner,
        [*CLI, "exec", sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stderr is not None
    assert read_line(p.stdout) == "up\n"
    p.send_signal(sig)
    assert p.wait(WAIT) == status
    assert "mproc:" not in p.stderr.read()


# ---------------------------------------------------------------- the rest


def test_broken_pipe_ends_quietly() -> None:
    r, w = os.pipe()
    os.close(r)  # the reader went away before anything was written (mproc ps | head -0)
    try:
        done = subprocess.run([*CLI, "ps"], stdout=w, stderr=subprocess.PIPE, timeout=WAIT)
        helped = subprocess.run([*CLI, "--help"], stdout=w, stderr=subprocess.PIPE, timeout=WAIT)
    finally:
        os.close(w)
    assert done.returncode == 141  # 128 + SIGPIPE, as a shell reports `cat` killed by it
    assert done.stderr == b""
    assert helped.stderr == b""  # (argparse swallows the error of printing help: status 0)


def test_the_console_script_is_declared() -> None:
    from importlib.metadata import entry_points

    points: Any = entry_points()
    scripts = (
        points.select(group="console_scripts")  # Python 3.10+
        if hasattr(points, "select")
        else points.get("console_scripts", [])
    )
    found = [e for e in scripts if e.name == "mproc"]
    if not found:
        pytest.skip("mproc is not installed in this environment (no entry points)")
    assert found[0].value == "mproc.__main__:main"
    from mproc.__main__ import main

    assert found[0].load() is main
