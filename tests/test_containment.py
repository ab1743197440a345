"""Containment: nothing outlives its manager (SPEC §2 timeouts, §4, issue 8).

Every test learns the PIDs of the processes it expects to be killed through
a handshake (a pipe, a FIFO inside the command), pins them with pidfds in
this process, and then checks that each pidfd reports an exit. Processes
re-parented to this test process (a child subreaper, see conftest) are reaped
here, by pidfd, so the leak check sees nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import pytest

import mproc
from mproc import _launch, _tree

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"),
    reason="containment is tested on Linux with pidfds",
)

TIMEOUT = 30
METHODS = multiprocessing.get_all_start_methods()


# Scripts run by a fresh interpreter import the mproc under test.
def _env() -> dict[str, str]:
    """The environment of a test's helper script: the test's own (its private
    MPROC_RUNTIME_DIR, set per test), with this mproc importable."""
    return dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(mproc.__file__)))


def pin(pids: list[int]) -> list[int]:
    return [os.pidfd_open(pid) for pid in pids]


def exited(fd: int, timeout: float = 0.0) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def settle(fds: list[int], timeout: float = TIMEOUT) -> list[bool]:
    """Wait (bounded) for each pinned process to exit; reap ours; close the fds.

    Returns whether each had exited.
    """
    deadline = time.monotonic() + timeout
    gone = [exited(fd, max(0.0, deadline - time.monotonic())) for fd in fds]
    for fd in fds:
        try:
            os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            pass
        os.close(fd)
    return gone


def cleanup(pids: list[int]) -> None:
    """Kill and reap whatever of ``pids`` is still there (for tests that expect survivors)."""
    fds = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        fds.append(fd)
    settle(fds)


def forget_sockets(runtime_dir: str, pids: list[int]) -> None:
    """Remove the mailbox socket files of killed processes (they had no chance to)."""
    for name in os.listdir(runtime_dir):
        if name.endswith(".sock") and int(name.split(".")[0]) in pids:
            os.unlink(os.path.join(runtime_dir, name))


def _block_forever(conn: Connection) -> None:
    conn.recv()  # the test never sends: killed in here


def _family(conn: Connection, ignore_term: bool) -> None:
    """A worker that starts every kind of descendant, reports their PIDs, and blocks."""
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids = []
    plain = subprocess.Popen(["sleep", "1000"])  # not through mproc at all
    pids.append(plain.pid)
    r, _w = multiprocessing.Pipe(duplex=False)
    daemon = mproc.Process(target=_block_forever, args=(r,), daemon=True)
    daemon.start()
    pids.append(daemon.pid)
    cmd = mproc.Command("sleep", ["1000"])
    pids.append(cmd.start())
    inner = mproc.ProcessManager()  # a nested manager
    pids.append(inner.new_process("sleep", ["1000"]).start())
    # An escapee: a new session, its parent gone at once (re-parented).
    escaper = inner.new_process(
        "sh", ["-c", "setsid sleep 1000 >/dev/null 2>&1 & echo $!"], stdout=subprocess.PIPE
    )
    escaper.start()
    assert escaper.stdout is not None
    pids.append(int(escaper.stdout.readline()))
    escaper.wait(TIMEOUT)
    conn.send(pids)
    select.select([], [], [])  # until killed


def _recv(conn: Connection) -> Any:
    assert conn.poll(TIMEOUT), "the child did not report"
    return conn.recv()


@pytest.mark.parametrize("method", METHODS)
def test_leaving_the_block_stops_every_descendant(method: str, runtime_dir: str) -> None:
    r, w = multiprocessing.Pipe(duplex=False)
    with mproc.ProcessManager() as m:
        p = mproc.Process(target=_family, args=(w, False), start_method=method)
        m.start(p)
        pids = _recv(r)
        fds = pin([p.pid, *pids])  # type: ignore[list-item]
        started = time.monotonic()
    took = time.monotonic() - started
    assert len(pids) == 5
    assert [exited(fd) for fd in fds] == [True] * 6  # all gone when the block is left
    assert took < 2.0
    assert settle(fds) == [True] * 6
    assert p.exitcode == -signal.SIGTERM
    forget_sockets(runtime_dir, [p.pid, *pids])  # type: ignore[list-item]


def _daemonize_without_exec(conn: Connection) -> None:
    """The classic pure-Python daemon: fork, setsid, fork, no exec; report its PID, block."""
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork():
            os._exit(0)
        conn.send(os.getpid())
        select.select([], [], [])
    os.waitpid(middle, 0)
    select.select([], [], [])


@pytest.mark.parametrize("method", METHODS)
def test_a_pure_python_daemon_of_a_process_is_stopped(method: str) -> None:
    # It never execs: its /proc environ is the manager's, without a marker;
    # it left the group and its parent. Its memory still carries the marker.
    r, w = multiprocessing.Pipe(duplex=False)
    with mproc.ProcessManager() as m:
        m.start(mproc.Process(target=_daemonize_without_exec, args=(w,), start_method=method))
        fds = pin([_recv(r)])
    assert exited(fds[0])
    assert settle(fds) == [True]


@pytest.mark.parametrize("method", METHODS)
def test_a_process_that_ignores_sigterm_is_killed_with_its_tree(
    method: str, runtime_dir: str
) -> None:
    r, w = multiprocessing.Pipe(duplex=False)
    m = mproc.ProcessManager()
    p = mproc.Process(target=_family, args=(w, True), start_method=method)
    m.start(p)
    pids = _recv(r)
    fds = pin(pids)
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match=rf"PID {p.pid}"):
        codes = m.terminate_all(timeout=0.5)
    took = time.monotonic() - started
    assert codes == {p.pid: -signal.SIGKILL}
    assert [exited(fd) for fd in fds] == [True] * 5
    assert took < 0.5 + 1.0  # about a second after the SIGKILL step at most
    settle(fds)
    forget_sockets(runtime_dir, [p.pid, *pids])  # type: ignore[list-item]


# --- a tree that changes PID faster than /proc can be read -----------------------------

# How long a fork-and-exit chain runs at most on its own (so nothing can run
# away if a test fails); far longer than any test of it takes.
_CHAIN_SECONDS = 20.0
# The bound on terminate_all(timeout=_CHAIN_GRACE) over such a chain: the grace,
# then about a second after the SIGKILL step (SPEC §4).
_CHAIN_GRACE = 0.3
_CHAIN_BOUND = 2.5


def _fork_chain(conn: Connection, seconds: float) -> None:
    """Ignore SIGTERM; start a chain whose every link forks the next and exits; block.

    The 20th link sends ``"go"`` (the chain runs), a link that outlives
    ``seconds`` sends ``"end"`` (the chain ended on its own) and stops it.
    Every link holds ``conn``: its EOF says that the whole chain has exited.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    end = time.monotonic() + seconds
    if os.fork() == 0:
        links = 0
        while time.monotonic() < end:
            if os.fork():
                os._exit(0)
            links += 1
            if links == 20:
                conn.send("go")
        conn.send("end")
        os._exit(0)
    select.select([], [], [], seconds)
    os._exit(0)


# A link of the chain for `sh`: $0 is the script itself, $1 the link's number,
# $2 the time (seconds since the epoch) after which the chain ends itself.
_SH_LINK = """
[ "$1" -eq 20 ] && echo go
if [ "$(date +%s)" -ge "$2" ]; then echo end; exit 0; fi
sh -c "$0" "$0" $(($1 + 1)) "$2" &
"""
# The whole chain in Python; its first link is the Command's own process.
_PY_CHAIN = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
end, links = time.monotonic() + float(sys.argv[1]), 0
while time.monotonic() < end:
    if os.fork():
        os._exit(0)
    links += 1
    if links == 20:
        os.write(1, b"go\\n")
os.write(1, b"end\\n")
"""


def _group(pgid: int) -> list[int]:
    """The processes (zombies too) of process group ``pgid``, from /proc."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if int(data[data.rfind(b")") + 2 :].split()[2]) == pgid:
                found.append(int(name))
    return found


def _read_to_eof(fd: int, timeout: float) -> bytes:
    """Everything written to pipe ``fd`` until every writer closed it (bounded)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"the chain still holds its pipe: {data!r}"
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


def _stop_chain(m: mproc.ProcessManager, root: int, stubborn: bool) -> float:
    """terminate_all() the chain of ``root``; check that nothing of it survives; return the time."""
    started = time.monotonic()
    try:
        if stubborn:
            with pytest.warns(RuntimeWarning, match=rf"PID {root}"):
                m.terminate_all(timeout=_CHAIN_GRACE)
        else:
            m.terminate_all(timeout=_CHAIN_GRACE)
        return time.monotonic() - started
    finally:
        # Nothing of the group is left, not even a zombie (kill_trees reaps
        # the links re-parented to this process, a child subreaper).
        assert _group(root) == []


@pytest.mark.parametrize("method", METHODS)
def test_a_chain_that_forks_and_exits_is_stopped_in_bounded_time(
    method: str, runtime_dir: str
) -> None:
    # Each link lives for one fork: no search of /proc sees the chain whole.
    r, w = multiprocessing.Pipe(duplex=False)
    m = mproc.ProcessManager()
    p = mproc.Process(target=_fork_chain, args=(w, _CHAIN_SECONDS), start_method=method)
    m.start(p)
    w.close()
    assert _recv(r) == "go"
    took = _stop_chain(m, p.pid, stubborn=True)  # type: ignore[arg-type]
    assert p.exitcode == -signal.SIGKILL
    # EOF: every link has exited; none ended the chain by itself.
    messages = []
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert r.poll(max(0.0, deadline - time.monotonic())), "the chain still holds its pipe"
        try:
            messages.append(r.recv())
        except EOFError:
            break
    assert "end" not in messages
    assert took < _CHAIN_BOUND
    forget_sockets(runtime_dir, [p.pid])  # type: ignore[list-item]


@pytest.mark.parametrize("kernel", ["6.9", "older"])
@pytest.mark.parametrize("form", ["sh", "python"])
def test_a_command_whose_chain_forks_and_exits_is_stopped_in_bounded_time(
    form: str, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kernel == "older":  # no PIDFD_SIGNAL_PROCESS_GROUP: EINVAL, then os.killpg()
        monkeypatch.setattr(_tree, "_PIDFD_SIGNAL_PROCESS_GROUP", 1 << 30)
    m = mproc.ProcessManager()
    if form == "sh":
        # The command itself stays, ignoring SIGTERM; the chain runs exec'd shells.
        until = int(time.time() + _CHAIN_SECONDS)
        script = f'trap "" TERM; sh -c "$0" "$0" 0 {until} & exec sleep {_CHAIN_SECONDS:g}'
        c = m.new_process("sh", ["-c", script, _SH_LINK], stdout=subprocess.PIPE)
    else:
        # The command is the chain's first link: it is gone at once.
        c = m.new_process(
            sys.executable, ["-c", _PY_CHAIN, str(_CHAIN_SECONDS)], stdout=subprocess.PIPE
        )
    c.start()
    assert c.stdout is not None
    fd = c.stdout.fileno()
    try:
        assert select.select([fd], [], [], TIMEOUT)[0], "the chain did not start"
        assert os.read(fd, 3) == b"go\n"
        took = _stop_chain(m, c.pid, stubborn=form == "sh")  # type: ignore[arg-type]
        # EOF: every link has exited; none ended the chain by itself.
        assert b"end" not in _read_to_eof(fd, TIMEOUT)
    finally:
        c.stdout.close()
    assert took < _CHAIN_BOUND


def test_kill_and_kill_all_stop_trees() -> None:
    m = mproc.ProcessManager()
    cmds = [
        m.new_process(
            "sh",
            ["-c", "setsid sleep 1000 >/dev/null 2>&1 & echo $!; exec sleep 1000"],
            stdout=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    kids = []
    for c in cmds:
        c.start()
        assert c.stdout is not None
        kids.append(int(c.stdout.readline()))
        c.stdout.close()
    fds = pin(kids)
    assert m.kill(cmds[0].pid) == -signal.SIGKILL  # type: ignore[arg-type]
    assert [exited(fd) for fd in fds] == [True, False, False]
    assert m.kill_all(TIMEOUT) == {c.pid: -signal.SIGKILL for c in cmds[1:]}
    assert settle(fds) == [True] * 3


def test_command_background_job_does_not_outlive_terminate_all() -> None:
    m = mproc.ProcessManager()
    c = m.new_process("sh", ["-c", "sleep 1000 & echo $!; wait"], stdout=subprocess.PIPE)
    c.start()
    assert c.stdout is not None
    fds = pin([int(c.stdout.readline())])
    c.stdout.close()
    assert m.terminate_all(TIMEOUT) == {c.pid: -signal.SIGTERM}
    assert exited(fds[0])
    settle(fds)


def test_contained_children_lead_a_group_and_carry_the_marker() -> None:
    m = mproc.ProcessManager()
    c = m.new_process("sleep", ["1000"])
    c.start()
    p = mproc.Process(target=_block_forever, args=(multiprocessing.Pipe(duplex=False)[0],))
    m.start(p)
    try:
        assert os.getpgid(c.pid) == c.pid  # type: ignore[arg-type]
        with open(f"/proc/{c.pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        assert env[_launch.ENV_CONTAIN.encode()] == c._element.encode()  # type: ignore[union-attr]
        # A Process child becomes a group leader itself (also under spawn/forkserver).
        assert os.getpgid(p.pid) == p.pid  # type: ignore[arg-type]
    finally:
        m.kill_all(TIMEOUT)


def test_contain_false_opts_out() -> None:
    m = mproc.ProcessManager(contain=False)
    assert "contain=False" in repr(m)
    c = m.new_process("sh", ["-c", "sleep 1000 & echo $!; wait"], stdout=subprocess.PIPE)
    c.start()
    assert c.stdout is not None
    sleeper = int(c.stdout.readline())
    c.stdout.close()
    try:
        assert os.getpgid(c.pid) == os.getpgid(0)  # type: ignore[arg-type]
        with open(f"/proc/{c.pid}/environ", "rb") as f:
            assert _launch.ENV_CONTAIN.encode() not in f.read()
        m.terminate_all(TIMEOUT)
        fd = os.pidfd_open(sleeper)  # the background job was left alone
        assert not exited(fd)
        os.close(fd)
    finally:
        cleanup([sleeper])


def _echo(conn: Connection) -> None:
    conn.send(conn.recv())


def test_a_child_started_from_a_short_lived_thread_survives_it() -> None:
    # PR_SET_PDEATHSIG fires when the *thread* that forked the child exits.
    m = mproc.ProcessManager()
    here, there = multiprocessing.Pipe()
    box: dict[str, Any] = {}

    def starter() -> None:
        cmd = m.new_process(
            "sh", ["-c", "read x; echo alive-$x"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        cmd.start()
        box["cmd"] = cmd
        for method in METHODS:
            m.start(mproc.Process(target=_echo, args=(there,), start_method=method))

    t = threading.Thread(target=starter)
    t.start()
    t.join(TIMEOUT)
    assert not t.is_alive()
    cmd = box["cmd"]
    try:
        cmd.stdin.write(b"yes\n")
        cmd.stdin.flush()
        assert cmd.stdout.readline() == b"alive-yes\n"
        for i in range(len(METHODS)):
            here.send(i)
            assert here.poll(TIMEOUT) and here.recv() == i
        assert m.wait_all(TIMEOUT) == {pid: 0 for pid in m.pids()}
    finally:
        cmd.stdin.close()
        cmd.stdout.close()
        m.kill_all(TIMEOUT)


_MANAGER_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, select, sys
    import mproc

    def block():
        select.select([], [], [])

    def nested():
        # Started through mproc inside a contained child: dies with it.
        c = mproc.Command("sleep", ["1000"])
        print("grandchild", c.start(), flush=True)
        select.select([], [], [])

    if __name__ == "__main__":
        m = mproc.ProcessManager()
        pids = []
        for method in multiprocessing.get_all_start_methods():
            p = mproc.Process(target=block, start_method=method)
            m.start(p)
            pids.append(p.pid)
        pids.append(m.new_process("sleep", ["1000"]).start())
        m.start(mproc.Process(target=nested))
        print("children", *pids, flush=True)
        sys.stdin.read()
    """
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_children_die_with_the_managers_process(
    sig: int, spawner: Any, tmp_path: Any, runtime_dir: str
) -> None:
    script = tmp_path / "manager.py"
    script.write_text(_MANAGER_SCRIPT)
    proc = spawner.popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    pids: list[int] = []
    for _ in range(2):
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        assert ready, "the manager did not report"
        pids += [int(x) for x in proc.stdout.readline().split()[1:]]
    assert len(pids) == len(METHODS) + 2  # + the Command, + the nested grandchild
    # Everything below the manager, its forkserver and resource tracker too.
    import psutil

    below = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert set(pids) <= set(below)
    names = {pid: " ".join(psutil.Process(pid).cmdline()) for pid in below}
    fds = pin(below)
    proc.send_signal(sig)
    assert proc.wait(TIMEOUT) == -sig
    proc.stdin.close()
    proc.stdout.close()
    gone = settle(fds, 10)
    assert [names[pid][:150] for pid, ok in zip(below, gone) if not ok] == [], names
    forget_sockets(runtime_dir, [proc.pid, *below])


# --- shell timeouts -----------------------------------------------------------------

# Each command starts a detached `sleep 1000` in its own way; the detached
# process writes its PID into a FIFO that the foreground reads before it
# sleeps, so the timeout always finds it running.
_DETACHED = {
    "subshell_setsid": "(setsid sh -c 'echo $$ > {fifo}; exec sleep 1000' &)",
    "setsid_f": "setsid -f sh -c 'echo $$ > {fifo}; exec sleep 1000'",
    # The first process waits for the middle one: a middle left to exit as
    # an orphan would be a zombie of this test process (a child subreaper),
    # not mproc's to reap (it never killed it).
    "double_fork": (
        "{python} -c 'import os,sys\n"
        "pid = os.fork()\n"
        "if pid: os.waitpid(pid, 0); sys.exit(0)\n"
        "os.setsid()\n"
        "if os.fork(): os._exit(0)\n"
        'open(sys.argv[1], "w").write(str(os.getpid()))\n'
        'os.execvp("sleep", ["sleep", "1000"])\' {fifo}'
    ),
    "nohup": "nohup sh -c 'echo $$ > {fifo}; exec sleep 1000' >/dev/null 2>&1 &",
}


@pytest.mark.parametrize("form", sorted(_DETACHED))
@pytest.mark.parametrize("helper", ["shell_exec", "shell_run", "shell"])
def test_shell_timeout_kills_detached_descendants(form: str, helper: str, tmp_path: Any) -> None:
    fifo = tmp_path / "pid"
    os.mkfifo(fifo)
    pidfile = tmp_path / "pid.txt"
    detach = _DETACHED[form].format(fifo=fifo, python=sys.executable)
    cmd = f"{detach}\nread pid < {fifo}; echo $pid > {pidfile}; echo started; sleep 100"
    run = getattr(mproc, helper)
    started = time.monotonic()
    with pytest.raises(mproc.ShellTimeout) as info:
        if helper == "shell":
            import io

            run(cmd, io.StringIO(), timeout=1)
        elif helper == "shell_run":
            run(cmd + " >/dev/null", timeout=1)
        else:
            run(cmd, timeout=1)
    took = time.monotonic() - started
    assert took < 1 + 1.0, f"ShellTimeout after {took:.2f} s"
    if helper == "shell_exec":
        assert info.value.output == "started\n"
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.pidfd_open(pid)  # killed, and reaped (it was re-parented to us)


# --- kill_tree --------------------------------------------------------------------------


def test_kill_tree_of_any_pid(spawner: Any) -> None:
    # Not ours: a plain subprocess in a session of its own, with a pipeline
    # and a job that left the group.
    p = spawner.popen(
        ["sh", "-c", "sleep 1000 | cat & setsid sleep 1000 & echo $!; wait"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    escaped = int(p.stdout.readline())
    p.stdout.close()
    import psutil

    below = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    fds = pin(below)
    killed = mproc.kill_tree(p.pid, timeout=TIMEOUT)
    assert set(killed) == {p.pid, *below}
    assert escaped in below
    assert p.wait(TIMEOUT) == -signal.SIGKILL  # the root's status is left to its owner
    assert settle(fds) == [True] * len(fds)


def test_kill_tree_with_a_catchable_signal_lets_them_act(spawner: Any) -> None:
    p = spawner.popen(
        ["sh", "-c", "trap 'echo got-term; exit 3' TERM; echo ready; while :; do read x; done"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert p.stdout.readline() == b"ready\n"
    assert mproc.kill_tree(p.pid, signal.SIGTERM, timeout=TIMEOUT) == [p.pid]
    assert p.stdout.readline() == b"got-term\n"
    assert p.wait(TIMEOUT) == 3
    p.stdin.close()
    p.stdout.close()


def test_kill_tree_checks_its_arguments(spawner: Any) -> None:
    dead = spawner.popen(["true"])
    dead.wait(TIMEOUT)
    with pytest.raises(mproc.NoSuchProcess, match=rf"PID {dead.pid}"):
        mproc.kill_tree(dead.pid)
    with pytest.raises(TypeError, match="kill_tree"):
        mproc.kill_tree("1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kill_tree"):
        mproc.kill_tree(0)
    with pytest.raises(ValueError, match="NaN"):
        mproc.kill_tree(os.getpid(), timeout=float("nan"))
    with pytest.raises(ValueError, match="signal"):
        mproc.kill_tree(os.getpid(), 0)


def test_adopted_processes_alone_unless_tree(spawner: Any) -> None:
    def family() -> tuple[Any, int]:
        p = spawner.popen(
            ["sh", "-c", "setsid sleep 1000 & echo $!; wait"],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        return p, int(p.stdout.readline())

    (alone, kid1), (whole, kid2) = family(), family()
    alone.stdout.close()
    whole.stdout.close()
    fds = pin([kid1, kid2])
    try:
        m = mproc.ProcessManager()
        m.add_process(alone.pid)
        assert m.terminate_all(TIMEOUT) == {alone.pid: None}
        assert alone.wait(TIMEOUT) == -signal.SIGTERM
        assert not exited(fds[0])  # an adopted process is signalled alone
        m = mproc.ProcessManager()
        m.add_process(whole.pid)
        m.kill_all(TIMEOUT, tree=True)
        assert whole.wait(TIMEOUT) == -signal.SIGKILL
        assert exited(fds[1], TIMEOUT)
    finally:
        cleanup([kid1])
        settle(fds)


def test_tree_search_never_freezes_us_or_our_ancestors() -> None:
    me = os.getpid()
    assert {me, os.getppid(), 1} <= _tree.ancestors()


_REFUSE_SCRIPT = textwrap.dedent(
    """
    # PID 1 of a new PID namespace: whatever a broken kill_tree() hits stays in here.
    import subprocess, sys, textwrap

    victim = subprocess.Popen(["sleep", "1000"])  # a sibling of the checker's parent
    checker = textwrap.dedent('''
        import os, subprocess
        import mproc

        mine = subprocess.Popen(["sh", "-c", "read x; exit 7"], stdin=subprocess.PIPE)
        # A sibling that leads our process group (we join it).
        leader = subprocess.Popen(["sleep", "1000"], process_group=0)
        os.setpgid(0, leader.pid)
        m = mproc.ProcessManager()
        for pid in (os.getpid(), os.getppid(), 1, leader.pid):
            try:
                mproc.kill_tree(pid, timeout=1)
            except ValueError as err:
                print("refused", pid, err)
            else:
                print("KILLED", pid)
            try:
                m.add_process(pid)
            except ValueError as err:
                print("not adopted", pid, err)
            else:
                print("ADOPTED", pid)
        m.kill_all(tree=True)
        mine.stdin.close()
        print("mine", mine.wait())
        leader.kill()
        leader.wait()
    ''')
    # sh in between: PID 1 is the checker's grandparent, not its parent.
    out = subprocess.run(
        ["sh", "-c", '"$0" -c "$1"; exit $?', sys.executable, checker],
        capture_output=True, text=True, timeout=60,
    )
    print(out.stdout, out.stderr)
    print("victim", "alive" if victim.poll() is None else "KILLED")
    victim.kill()
    victim.wait()
    """
)


def _unshare_works() -> bool:
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/unshare"):
        return False
    try:
        return (
            subprocess.run(
                ["unshare", "-fp", "--mount-proc", "true"], timeout=TIMEOUT, capture_output=True
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs root and unshare -fp (a PID namespace)")
def test_kill_tree_and_add_process_refuse_trees_that_hold_the_caller(tmp_path: Any) -> None:
    # kill_tree(1) froze and killed every process but our ancestors (and
    # signalled PID 1 itself); nor may the grandparent's tree, the group we
    # are in, or our own children's statuses be touched.
    script = tmp_path / "refuse.py"
    script.write_text(_REFUSE_SCRIPT)
    out = subprocess.run(
        ["unshare", "-fp", "--mount-proc", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    refused = [line for line in lines if line.startswith("refused ")]
    assert len(refused) == 4, out.stdout
    assert "is this process" in refused[0]
    assert "is the parent of this process" in refused[1]
    assert "PID 1 is an ancestor of this process" in refused[2]
    assert "is the leader of this process's process group" in refused[3]
    not_adopted = [line for line in lines if line.startswith("not adopted ")]
    assert len(not_adopted) == 3, out.stdout
    assert "PID 1 is an ancestor of this process" in not_adopted[2]
    assert "KILLED" not in out.stdout
    assert "mine 7" in lines, out.stdout  # our own child kept its status
    assert "victim alive" in lines, out.stdout


def test_kill_tree_never_steals_the_status_of_a_users_child(spawner: Any) -> None:
    # The user's child exits (a zombie, not waited for yet); its background
    # job lives on in its session. Killing that job's tree must leave the
    # user's child for the user to reap.
    p = spawner.popen(
        ["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!; exit 3"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    job = int(p.stdout.readline())
    p.stdout.close()
    fd = os.pidfd_open(p.pid)
    try:
        assert exited(fd, TIMEOUT)  # exited: a zombie until somebody waits
    finally:
        os.close(fd)
    fds = pin([job])
    assert mproc.kill_tree(job, timeout=TIMEOUT) == [job]
    assert settle(fds) == [True]
    assert p.wait(TIMEOUT) == 3


def _kernel_thread() -> int:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if int(data[data.rfind(b")") + 2 :].split()[6]) & 0x00200000:  # PF_KTHREAD
                return int(name)
    pytest.skip("no kernel thread visible (a PID namespace)")


def test_kernel_threads_are_neither_adopted_nor_tree_killed() -> None:
    pid = _kernel_thread()
    with pytest.raises(ValueError, match=rf"PID {pid} is a kernel thread"):
        mproc.kill_tree(pid)
    m = mproc.ProcessManager()
    with pytest.raises(ValueError, match=rf"PID {pid} is a kernel thread"):
        m.add_process(pid)
    assert len(m) == 0


# --- PID safety -----------------------------------------------------------------------------


def test_adopting_ourselves_or_our_parent_is_refused() -> None:
    m = mproc.ProcessManager()
    with pytest.raises(ValueError, match=rf"PID {os.getpid()} is this process"):
        m.add_process(os.getpid())
    with pytest.raises(ValueError, match=rf"PID {os.getppid()} is the parent"):
        m.add_process(os.getppid())
    assert len(m) == 0


_REUSE_SCRIPT = textwrap.dedent(
    """
    # Runs as PID 1 of a new PID namespace (unshare -fp --mount-proc).
    import errno, os, resource, signal, subprocess, sys
    import mproc

    assert os.getpid() == 1
    victim = subprocess.Popen(["sleep", "1000"])
    pid = victim.pid
    # Short of descriptors: fewer free than the reserve the reaper keeps.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 4, hard))
    m = mproc.ProcessManager()
    handle = m.add_process(pid)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    os.kill(pid, signal.SIGKILL)
    victim.wait()
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
    new = subprocess.Popen(["sleep", "1000"])
    assert new.pid == pid, (new.pid, pid)  # the PID is reused, same tick
    handle.kill()
    m.kill_all()
    m.terminate_all(timeout=0)
    assert new.poll() is None, "the stale handle signalled the new process"
    # No descriptor free at all: adopting is refused with a clear error.
    lowest = os.open("/dev/null", os.O_RDONLY)  # the lowest free descriptor number
    os.close(lowest)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
    try:
        m.add_process(new.pid)
    except mproc.MprocError as err:
        refused = str(err)
    else:
        refused = ""
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    new.kill()
    new.wait()
    print("refused:", refused)
    print("SAFE")
    """
)


@pytest.mark.skipif(not _unshare_works(), reason="needs root and unshare -fp (a PID namespace)")
@pytest.mark.parametrize("run", range(3))
def test_pid_reuse_in_a_namespace_never_signals_the_new_process(run: int, tmp_path: Any) -> None:
    script = tmp_path / "reuse.py"
    script.write_text(_REUSE_SCRIPT)
    out = subprocess.run(
        ["unshare", "-fp", "--mount-proc", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("SAFE\n")
    assert "no file descriptor is free for its pidfd" in out.stdout
    assert "RLIMIT_NOFILE" in out.stdout


def test_the_leak_check_sees_processes_that_left_our_subtree() -> None:
    # A process that left its parent (re-parented, new session) still
    # carries this test's marker; conftest finds it by that, wherever it went.
    import conftest

    out = subprocess.run(
        ["sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    pid = int(out.stdout)
    try:
        # /proc/<pid>/environ is readable only once its exec is over: wait
        # (bounded) until the process is the sleep.
        deadline = time.monotonic() + TIMEOUT
        while not _cmdline(pid).startswith(b"sleep\0"):
            assert time.monotonic() < deadline, f"PID {pid} never became the sleep"
            time.sleep(0.001)
        token = os.environ[conftest._LEAK_MARKER]
        assert pid in {p.pid for p in conftest._marked(token)}
    finally:
        cleanup([pid])


# --- file descriptors and validation -------------------------------------------------


def _nothing() -> None:
    pass


def test_an_exited_process_holds_no_fds_after_wait() -> None:
    warm = mproc.Process(target=_nothing, start_method="fork")
    warm.start()  # opens the mailbox and starts the reaper: not counted
    warm.wait(TIMEOUT)
    before = len(os.listdir("/proc/self/fd"))
    procs = [mproc.Process(target=_nothing, start_method="fork") for _ in range(5)]
    for p in procs:
        p.start()
    for p in procs:
        assert p.wait(TIMEOUT) == 0
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_dropped_process_is_freed_without_the_cyclic_gc() -> None:
    import gc
    import weakref

    p = mproc.Process(target=_nothing, start_method="fork")
    p.start()
    assert p.wait(TIMEOUT) == 0
    ref = weakref.ref(p._popen)  # type: ignore[attr-defined]
    gc.disable()
    try:
        del p
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("bad", "error"),
    [(float("nan"), ValueError), (-1, ValueError), (True, TypeError), ("1", TypeError)],
)
def test_timeouts_are_validated_everywhere(bad: Any, error: type, spawner: Any) -> None:
    m = mproc.ProcessManager()
    c = m.new_process("true")
    c.run()
    calls = [
        lambda: c.wait(bad),
        lambda: m.wait_all(bad),
        lambda: m.terminate_all(bad),
        lambda: m.kill_all(bad),
        lambda: mproc.kill_tree(os.getpid(), timeout=bad),
        lambda: mproc.shell_exec("true", timeout=bad),
        lambda: mproc.shell_run("true", timeout=bad),
        lambda: mproc.shell("true", timeout=bad),
    ]
    for call in calls:
        with pytest.raises(error, match="timeout"):
            call()


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _leave_a_zombie(conn: Any) -> None:
    kid = os.fork()
    if kid == 0:
        os.setsid()
        os._exit(0)
    conn.send(kid)
    select.select([], [], [])  # never reaps it: a zombie of this worker


def test_a_zombie_a_worker_never_reaped_is_reaped_when_its_tree_stops() -> None:
    # The worker's child left the session and exited; the worker never reaped
    # it. When the tree is stopped the zombie comes to us (pytest is a
    # subreaper): terminate_all() must reap it, not leave it behind.
    r, w = multiprocessing.get_context("fork").Pipe(duplex=False)
    with mproc.ProcessManager() as m:
        m.start(mproc.Process(target=_leave_a_zombie, args=(w,), start_method="fork"))
        assert r.poll(TIMEOUT)
        kid = r.recv()
        deadline = time.monotonic() + TIMEOUT
        while _stat_fields(kid)[:1] != ["Z"]:
            assert time.monotonic() < deadline, f"PID {kid} never became a zombie"
            time.sleep(0.001)
    # Gone: neither running nor a zombie child of ours.
    assert _stat_fields(kid) == [], f"PID {kid} was left behind: {_stat_fields(kid)}"
    r.close()
    w.close()


def _stat_fields(pid: int) -> list[str]:
    """State and parent of ``pid`` (``[]`` when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return []
    return data[data.rfind(")") + 2 :].split()[:2]
