"""Tests for monitors (SPEC §9) and the on_exit() hook under call(): mproc._monitor."""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest

import mproc
from mproc import _monitor, _runtime, _wait

# On 3.12+ os.fork() warns when threads exist; the reaper thread always does.
pytestmark = pytest.mark.filterwarnings("ignore:.*multi-threaded.*:DeprecationWarning")

TIMEOUT = 2.0  # a Down must come well within this (the SPEC says 50 ms)
QUIET = 0.3  # how long "no second Down" is watched for
ABSENT = 2**31 - 2  # above any pid_max: no such process, ever


def down(group: str = "", timeout: float = TIMEOUT) -> tuple[mproc.Msg, mproc.Down]:
    msg = mproc.receive(group, timeout=timeout)
    assert isinstance(msg.data, mproc.Down), msg
    return msg, msg.data


def nothing_in(group: str) -> None:
    with pytest.raises(mproc.ReceiveTimeout):
        mproc.receive(group, timeout=QUIET)


def grandchild(spawner: Any) -> tuple[int, subprocess.Popen[Any]]:
    """A ``sleep`` whose parent is a shell that waits for it: not our child, never reparented."""
    sh = spawner.popen(
        ["/bin/sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True
    )
    spawner.cleanup(sh.stdout.close)
    line = sh.stdout.readline()
    assert line.strip().isdigit(), line
    return int(line), sh


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Bounded wait for a condition no event announces (an fd the reaper closes)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.005)
    return True


@pytest.fixture(params=["pidfd", "polling"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "polling":
        monkeypatch.setattr(_wait, "_pidfd_supported", False)
    return str(request.param)


@pytest.fixture(autouse=True)
def no_monitor_left() -> Iterator[None]:
    yield
    # Every process a test monitors has exited: its targets are gone.
    st = _monitor._state
    assert wait_for(lambda: not st.monitors), st.monitors


# ---------------------------------------------------------------- children


def test_child_exit_code(spawner: Any, mode: str) -> None:
    p = spawner.popen(["/bin/sh", "-c", "read x; exit 3"], stdin=subprocess.PIPE)
    ref = mproc.monitor(p.pid, "mon")
    assert ref.pid == p.pid
    nothing_in("mon")
    p.stdin.close()
    msg, d = down("mon")
    assert msg.sender_pid == p.pid and msg.group == "mon"
    assert d == mproc.Down(ref, p.pid, 3, "exit")
    assert str(d) == f"PID {p.pid} exited with code 3"
    # Read without reaping: subprocess still gets its status.
    assert p.wait(TIMEOUT) == 3


def test_child_killed_by_signal(spawner: Any, mode: str) -> None:
    p = spawner.popen(["sleep", "60"])
    ref = mproc.monitor(p.pid)
    p.kill()
    _, d = down()
    assert d == mproc.Down(ref, p.pid, -signal.SIGKILL, "signal")
    assert d.signal == signal.SIGKILL
    assert str(d) == f"PID {p.pid} was killed by SIGKILL"
    assert p.wait(TIMEOUT) == -signal.SIGKILL


def test_exactly_one_down(spawner: Any) -> None:
    p = spawner.popen(["sleep", "60"])
    mproc.monitor(p.pid, "once")
    p.terminate()
    down("once")
    assert p.wait(TIMEOUT) == -signal.SIGTERM
    nothing_in("once")


def test_several_monitors_of_one_pid(spawner: Any, mode: str) -> None:
    p = spawner.popen(["sleep", "60"])
    refs = {mproc.monitor(p.pid, "a"), mproc.monitor(p.pid, "a"), mproc.monitor(p.pid, "b")}
    assert len(refs) == 3
    p.kill()
    got = {down("a")[1].ref, down("a")[1].ref, down("b")[1].ref}
    assert got == refs
    nothing_in("a")
    nothing_in("b")
    p.wait(TIMEOUT)


def test_down_arrives_promptly(spawner: Any) -> None:
    p = spawner.popen(["sleep", "60"])
    mproc.monitor(p.pid)
    start = time.monotonic()
    p.kill()
    down(timeout=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT
    p.wait(TIMEOUT)


# ---------------------------------------------------------------- not our children


def test_unrelated_process(spawner: Any, mode: str) -> None:
    pid, sh = grandchild(spawner)
    ref = mproc.monitor(pid, "u")
    os.kill(pid, signal.SIGTERM)
    msg, d = down("u")
    assert msg.sender_pid == pid
    assert d.ref == ref and d.exitcode is None  # not ours to know
    if mode == "pidfd":
        # Read through the pidfd (PIDFD_INFO_EXIT) or /proc while a zombie.
        # (Polling: the shell may reap it before we look; no reason to check.)
        assert d == mproc.Down(ref, pid, None, "signal")
        assert str(d) == f"PID {pid} was killed by SIGTERM"
    assert sh.wait(TIMEOUT) == 0


def test_unreaped_unrelated_zombie_is_read_from_proc(
    spawner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its parent does not reap it until told: /proc/PID/stat has the status.
    monkeypatch.setattr(_monitor, "_info_supported", False)  # as before Linux 6.15
    parent = spawner.popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; p = subprocess.Popen(['sleep', '60']); "
            "print(p.pid, flush=True); sys.stdin.readline(); p.wait()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    spawner.cleanup(parent.stdout.close)
    spawner.cleanup(parent.stdin.close)
    pid = int(parent.stdout.readline())
    ref = mproc.monitor(pid)
    os.kill(pid, signal.SIGKILL)
    _, d = down()
    assert d == mproc.Down(ref, pid, None, "signal") and d.signal == signal.SIGKILL
    parent.stdin.write("reap\n")
    parent.stdin.flush()
    assert parent.wait(TIMEOUT) == 0


def test_generic_monitor_of_an_mproc_child_waits_for_its_handle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As on a kernel without PIDFD_INFO_EXIT, with the handle reaping first.
    monkeypatch.setattr(_monitor, "_info_supported", False)
    monkeypatch.setattr(_monitor, "_waitid_nowait", lambda fd: None)
    monkeypatch.setattr(_monitor, "_zombie_status", lambda pid, identity: None)
    cmd = mproc.Command("sleep", ["60"])
    cmd.start()
    ref = mproc.monitor(cmd.pid)
    cmd.kill()
    _, d = down()
    assert d == mproc.Down(ref, cmd.pid, -signal.SIGKILL, "signal")
    assert cmd.wait(TIMEOUT) == -signal.SIGKILL


def test_reparented_orphan(spawner: Any) -> None:
    import conftest

    pid = spawner.orphan()  # its shell exited: it is ours now as the tests' subreaper
    ref = mproc.monitor(pid)
    os.kill(pid, signal.SIGKILL)
    _, d = down()
    assert d.reason == "signal" and d.signal == signal.SIGKILL
    # A re-parented orphan is a child of ours in the kernel's eyes.
    assert d.exitcode == (-signal.SIGKILL if conftest.SUBREAPER else None)
    assert d.ref == ref  # spawner.close() reaps it: the Down did not


def test_noproc_at_once(mode: str) -> None:
    ref = mproc.monitor(ABSENT, "np")
    msg, d = down("np")
    assert msg.sender_pid == ABSENT
    assert d == mproc.Down(ref, ABSENT, None, "noproc")
    assert str(d) == f"PID {ABSENT} did not exist when monitored (noproc)"
    assert not mproc.demonitor(ref)  # received already
    nothing_in("np")


def test_zombie_gets_its_down_at_once(spawner: Any) -> None:
    p = spawner.popen(["true"])
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped
    ref = mproc.monitor(p.pid)
    _, d = down()
    assert d == mproc.Down(ref, p.pid, 0, "exit")
    assert p.wait(TIMEOUT) == 0


# ---------------------------------------------------------------- handles


def test_command_monitor(mode: str) -> None:
    cmd = mproc.Command("sleep", ["60"])
    cmd.start()
    ref = cmd.monitor("cmd")
    assert ref.pid == cmd.pid
    cmd.kill()
    _, d = down("cmd")
    assert d == mproc.Down(ref, cmd.pid, -signal.SIGKILL, "signal")
    assert cmd.wait(TIMEOUT) == -signal.SIGKILL


def test_process_monitor_gets_the_handles_code(mode: str) -> None:
    proc = mproc.Process(target=os._exit, args=(7,), start_method="fork")
    proc.start()
    ref = proc.monitor("p")
    _, d = down("p")
    assert d == mproc.Down(ref, proc.pid, 7, "exit")
    assert proc.wait(TIMEOUT) == 7


def test_forkserver_child_code_comes_from_its_handle() -> None:
    # Its kernel parent is the forkserver: only the handle knows the code.
    proc = mproc.Process(target=os._exit, args=(9,), start_method="forkserver")
    proc.start()
    ref = proc.monitor("fs")
    _, d = down("fs", timeout=10)
    assert d == mproc.Down(ref, proc.pid, 9, "exit")
    assert proc.wait(TIMEOUT) == 9


def test_handle_already_exited() -> None:
    cmd = mproc.Command("/bin/sh", ["-c", "exit 4"])
    assert cmd.run() == 4
    ref = cmd.monitor("gone")
    _, d = down("gone")
    assert d == mproc.Down(ref, cmd.pid, 4, "exit")


def test_unstarted_handle() -> None:
    with pytest.raises(ValueError, match="not been started"):
        mproc.Command("true").monitor()
    with pytest.raises(ValueError, match="not been started"):
        mproc.Process(target=print).monitor()


def test_adopted_handle(spawner: Any, mode: str) -> None:
    pid, sh = grandchild(spawner)
    h = mproc.ProcessManager().add_process(pid)
    ref = h.monitor("adopted")
    assert ref.pid == pid
    h.kill()
    _, d = down("adopted")
    assert d.ref == ref and d.exitcode is None
    if mode == "pidfd":
        assert d.reason == "signal" and str(d) == f"PID {pid} was killed by SIGKILL"
    sh.wait(TIMEOUT)
    # Exited: a new monitor gets its Down at once.
    ref2 = h.monitor("adopted")
    assert down("adopted")[1] == mproc.Down(ref2, pid, None, "exit")


def test_adopted_reparented_orphan_has_no_code(spawner: Any) -> None:
    h = mproc.ProcessManager().add_process(spawner.orphan())
    ref = h.monitor()
    h.kill()
    _, d = down()
    # As the handle: the status of an adopted process is not ours, even as its subreaper.
    assert d == mproc.Down(ref, h.pid, None, "signal")


def test_handle_protocol_documents_monitor() -> None:
    assert "monitor" in vars(mproc.ProcessHandle)
    cmd = mproc.Command("true")
    assert isinstance(cmd, mproc.ProcessHandle)


# ---------------------------------------------------------------- demonitor


def test_demonitor_before_exit(spawner: Any, mode: str) -> None:
    p = spawner.popen(["sleep", "60"])
    ref = mproc.monitor(p.pid, "dm")
    target = _monitor._state.monitors[ref].target
    assert target is not None and target.watch is not None
    assert mproc.demonitor(ref) is True
    assert mproc.demonitor(ref) is False
    assert p.pid not in _monitor._state.by_pid
    assert target.watch._removed
    assert wait_for(lambda: target.watch is not None and target.watch._pidfd is None)
    p.kill()
    p.wait(TIMEOUT)
    nothing_in("dm")


def test_demonitor_withdraws_a_queued_down(spawner: Any) -> None:
    p = spawner.popen(["sleep", "60"])
    ref = mproc.monitor(p.pid, "dm")
    probe = mproc.monitor(p.pid, "probe")
    p.kill()
    # Both Downs are queued by one delivery that demonitor() waits out.
    down("probe")
    assert mproc.demonitor(ref) is True  # withdrawn from the queue
    nothing_in("dm")
    assert mproc.demonitor(ref) is False
    assert mproc.demonitor(probe) is False  # received
    p.wait(TIMEOUT)


def test_demonitor_unknown_and_bad_refs() -> None:
    assert mproc.demonitor(mproc.Monitor(10**12, 1)) is False
    with pytest.raises(TypeError, match=r"demonitor.*Monitor.*str"):
        mproc.demonitor("ref")  # type: ignore[arg-type]


def test_demonitor_keeps_the_others(spawner: Any) -> None:
    p = spawner.popen(["sleep", "60"])
    a = mproc.monitor(p.pid, "k")
    b = mproc.monitor(p.pid, "k")
    assert mproc.demonitor(a)
    p.kill()
    assert down("k")[1].ref == b
    nothing_in("k")
    p.wait(TIMEOUT)


def test_closed_mailbox_drops_the_down(spawner: Any, caplog: pytest.LogCaptureFixture) -> None:
    p = spawner.popen(["sleep", "60"])
    ref = mproc.monitor(p.pid)
    mproc.close_mailbox()
    dropped = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "dropped" in record.getMessage():
                dropped.set()

    handler = Seen(logging.DEBUG)
    logger = logging.getLogger("mproc")
    logger.addHandler(handler)
    try:
        with caplog.at_level(logging.DEBUG, logger="mproc"):
            p.kill()
            assert dropped.wait(TIMEOUT)
    finally:
        logger.removeHandler(handler)
    assert any(str(ref) in r.getMessage() for r in caplog.records)
    assert mproc.demonitor(ref) is False
    p.wait(TIMEOUT)


def test_delivered_record_is_pruned_of_received_downs() -> None:
    refs = [mproc.monitor(ABSENT, "pr") for _ in range(5)]
    st = _monitor._state
    assert all(r in st.delivered for r in refs)
    for _ in range(3):
        down("pr")
    _monitor._prune(st)
    assert sorted(r for r in refs if r in st.delivered) == refs[3:]  # FIFO: the last two
    assert all(mproc.demonitor(r) for r in refs[3:])
    nothing_in("pr")


# ---------------------------------------------------------------- values


def test_monitor_is_hashable_ordered_picklable() -> None:
    a, b = mproc.Monitor(1, 500), mproc.Monitor(2, 100)
    assert a < b and sorted([b, a]) == [a, b]
    assert {a: 1}[mproc.Monitor(1, 500)] == 1
    assert pickle.loads(pickle.dumps(a)) == a
    with pytest.raises(AttributeError):
        a.id = 3  # type: ignore[misc]
    assert repr(a) == "Monitor(id=1, pid=500)"


def test_down_pickles_and_reads_well() -> None:
    ref = mproc.Monitor(7, 123)
    killed = mproc.Down(ref, 123, None, "signal", signal.SIGKILL)
    assert pickle.loads(pickle.dumps(killed)) == killed
    assert pickle.loads(pickle.dumps(killed)).signal == signal.SIGKILL
    assert killed == mproc.Down(ref, 123, None, "signal")  # the signal is not compared
    assert str(killed) == "PID 123 was killed by SIGKILL"
    assert str(mproc.Down(ref, 123, -15, "signal")) == "PID 123 was killed by SIGTERM"
    assert str(mproc.Down(ref, 123, 0, "exit")) == "PID 123 exited with code 0"
    assert str(mproc.Down(ref, 123, None, "exit")) == "PID 123 exited"
    assert str(mproc.Down(ref, 123, None, "noproc")) == (
        "PID 123 did not exist when monitored (noproc)"
    )
    assert mproc.Down.__module__ == "mproc" and "Down" in mproc.__all__


def test_monitor_ids_are_unique(spawner: Any) -> None:
    p = spawner.popen(["sleep", "60"])
    refs = [mproc.monitor(p.pid) for _ in range(50)]
    assert len(set(refs)) == 50 and refs == sorted(refs)
    assert all(mproc.demonitor(r) for r in refs)
    p.kill()
    p.wait(TIMEOUT)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("pid", "error", "words"),
    [
        (0, ValueError, "monitor.*PID > 0, got 0"),
        (-1, ValueError, "monitor.*PID > 0, got -1"),
        ("x", TypeError, "monitor.*int PID.*str"),
        (True, TypeError, "monitor.*int PID.*bool"),
        (1.5, TypeError, "monitor.*int PID.*float"),
    ],
)
def test_bad_pid(pid: Any, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        mproc.monitor(pid)


def test_bad_group() -> None:
    with pytest.raises(TypeError, match=r"monitor.*group must be a str.*int"):
        mproc.monitor(os.getpid(), 3)  # type: ignore[arg-type]
    cmd = mproc.Command("true")
    with pytest.raises(TypeError, match="group must be a str"):
        cmd.monitor(b"g")  # type: ignore[arg-type]


def test_thread_id_is_refused() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, args=(TIMEOUT,))
    t.start()
    try:
        assert t.native_id is not None and t.native_id != os.getpid()
        with pytest.raises(ValueError, match=f"PID {t.native_id} is a thread"):
            mproc.monitor(t.native_id)
    finally:
        stop.set()
        t.join(TIMEOUT)


# ---------------------------------------------------------------- scale


def test_thousand_monitors_add_no_thread_and_release_their_fds(spawner: Any) -> None:
    # Warm up: mailbox open, reaper running, a Down received.
    warm = spawner.popen(["true"])
    mproc.monitor(warm.pid)
    down()
    warm.wait(TIMEOUT)
    procs = [spawner.popen(["sleep", "60"]) for _ in range(200)]
    threads, tasks, fds = threading.active_count(), len(os.listdir("/proc/self/task")), fd_count()
    refs = [mproc.monitor(p.pid) for p in procs for _ in range(5)]
    assert len(refs) == 1000
    assert threading.active_count() == threads
    assert len(os.listdir("/proc/self/task")) == tasks
    assert fd_count() == fds + len(procs)  # one pidfd per process, shared by its monitors
    assert all(mproc.demonitor(r) for r in refs)
    assert wait_for(lambda: fd_count() == fds), (fd_count(), fds)
    assert not _monitor._state.by_pid.keys() & {p.pid for p in procs}
    for p in procs:
        p.kill()
    for p in procs:
        p.wait(TIMEOUT)
    nothing_in("")


# ---------------------------------------------------------------- identity


def test_identity_is_pinned_at_monitor_time(spawner: Any) -> None:
    p = spawner.popen(["sleep", "60"])
    ref = mproc.monitor(p.pid)
    target = _monitor._state.monitors[ref].target
    assert target is not None and target.identity == _runtime.proc_identity(p.pid)
    p.kill()
    down()
    p.wait(TIMEOUT)


def test_fallback_sees_a_replaced_process_as_gone_and_reads_nothing_of_it(
    spawner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_wait, "_pidfd_supported", False)
    p = spawner.popen(["sleep", "60"])
    ref = mproc.monitor(p.pid)
    real = _runtime.proc_identity

    def reused(pid: int) -> Optional[str]:
        return "another process" if pid == p.pid else real(pid)

    # As if the PID named another process now: the one monitored is gone, and
    # the (live) new one's status is never taken for its exit status.
    monkeypatch.setattr(_runtime, "proc_identity", reused)
    _, d = down()
    assert d == mproc.Down(ref, p.pid, None, "exit")
    assert p.poll() is None
    p.kill()
    p.wait(TIMEOUT)


def _set_last_pid(pid: int) -> bool:
    try:
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
    except OSError:
        return False
    return True


def test_real_pid_reuse_neither_triggers_nor_suppresses(spawner: Any, mode: str) -> None:
    if not sys.platform.startswith("linux") or not _set_last_pid(os.getpid() + 1):
        pytest.skip("needs CAP_SYS_ADMIN to choose the next PID (ns_last_pid)")
    first = spawner.popen(["sleep", "60"])
    pid = first.pid
    old_identity = _runtime.proc_identity(pid)
    ref = mproc.monitor(pid, "reuse")
    first.kill()
    assert first.wait(TIMEOUT) == -signal.SIGKILL  # reaped: the PID is free again
    # Start times count clock ticks (10 ms): a successor started in the same
    # tick would look the same to the start-time identity (psutil's limit too;
    # a pidfd has none). Not a synchronisation: the clock must move on.
    threading.Event().wait(0.05)
    second = None
    for _ in range(20):  # other programs on the machine may take the PID first
        _set_last_pid(pid)
        candidate = spawner.popen(["sleep", "60"])
        if candidate.pid == pid:
            second = candidate
            break
        candidate.kill()
        candidate.wait(TIMEOUT)
    if second is None:
        pytest.skip(f"PID {pid} was taken by another program each time")
    # The first process's Down comes although the PID lives on (polling: maybe
    # only now, and its status was reaped before anybody could read it).
    _, d = down("reuse")
    assert d.ref == ref
    if mode == "pidfd":
        assert d == mproc.Down(ref, pid, -signal.SIGKILL, "signal")
    nothing_in("reuse")
    called: list[str] = []
    _monitor.on_exit(pid, old_identity, lambda: called.append("old"))
    assert called == ["old"]  # that process is gone, whoever has the PID now
    ref2 = mproc.monitor(pid, "reuse")
    nothing_in("reuse")
    second.kill()
    assert down("reuse")[1].ref == ref2
    nothing_in("reuse")
    second.wait(TIMEOUT)


# ---------------------------------------------------------------- fork


def test_forked_child_inherits_no_monitors(spawner: Any) -> None:
    p = spawner.popen(["sleep", "60"])
    ref = mproc.monitor(p.pid, "fork")
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        code = 1
        try:
            st = _monitor._state
            report = f"{len(st.monitors)} {len(st.by_pid)} {mproc.demonitor(ref)}"
            os.write(w, report.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        assert select.select([r], [], [], TIMEOUT)[0]
        report = os.read(r, 100).decode()
    finally:
        os.close(r)
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == "0 0 False"
    # The parent's monitor is untouched.
    p.kill()
    assert down("fork")[1].ref == ref
    p.wait(TIMEOUT)


# ---------------------------------------------------------------- on_exit


def test_on_exit_runs_once_from_the_reaper(spawner: Any, mode: str) -> None:
    p = spawner.popen(["sleep", "60"])
    fired = threading.Event()
    threads: list[str] = []

    def callback() -> None:
        threads.append(threading.current_thread().name)
        fired.set()

    _monitor.on_exit(p.pid, None, callback)
    assert not fired.is_set()
    p.kill()
    assert fired.wait(TIMEOUT)
    p.wait(TIMEOUT)
    assert threads == ["mproc-reaper"]


def test_on_exit_cancel(spawner: Any) -> None:
    p = spawner.popen(["sleep", "60"])
    called: list[int] = []
    cancel = _monitor.on_exit(p.pid, None, lambda: called.append(1))
    fired = threading.Event()
    _monitor.on_exit(p.pid, None, fired.set)
    cancel()
    cancel()  # idempotent
    p.kill()
    assert fired.wait(TIMEOUT)
    assert called == []
    p.wait(TIMEOUT)


def test_on_exit_already_gone_runs_at_once(spawner: Any) -> None:
    called: list[str] = []
    cancel = _monitor.on_exit(ABSENT, None, lambda: called.append("gone"))
    assert called == ["gone"]
    cancel()
    p = spawner.popen(["true"])
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # a zombie counts as gone
    _monitor.on_exit(p.pid, None, lambda: called.append("zombie"))
    assert called == ["gone", "zombie"]
    assert p.wait(TIMEOUT) == 0


def test_on_exit_identity_mismatch_runs_at_once(spawner: Any) -> None:
    p = spawner.popen(["sleep", "60"])
    identity = _runtime.proc_identity(p.pid)
    assert identity is not None
    called: list[str] = []
    cancel = _monitor.on_exit(p.pid, identity, lambda: called.append("same"))
    _monitor.on_exit(p.pid, "0", lambda: called.append("other"))  # a watch exists
    assert called == ["other"]
    cancel()
    q = spawner.popen(["sleep", "60"])
    _monitor.on_exit(q.pid, "0", lambda: called.append("other2"))  # none exists
    assert called == ["other", "other2"]
    assert q.pid not in _monitor._state.by_pid
    for proc in (p, q):
        proc.kill()
        proc.wait(TIMEOUT)


def test_on_exit_shares_one_watch_and_keeps_it_idle(
    spawner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = spawner.popen(["sleep", "60"])
    _monitor.on_exit(p.pid, None, lambda: None)()
    target = _monitor._state.by_pid[p.pid]
    assert target in _monitor._state.idle  # nobody registered, but kept
    opened: list[int] = []
    identity = _runtime.proc_identity(p.pid)
    n = 2000
    with monkeypatch.context() as patched:
        patched.setattr(_wait, "pidfd_open", lambda pid, **kw: opened.append(pid))
        patched.setattr(_wait, "watch_pidfd", lambda *a: pytest.fail("a second watch"))
        started = time.perf_counter()
        for _ in range(n):
            _monitor.on_exit(p.pid, identity, _monitor._no_cancel)()
        each = (time.perf_counter() - started) / n
        # A monitor joins the same watch too.
        ref = mproc.monitor(p.pid)
    assert opened == [] and _monitor._state.by_pid[p.pid] is target
    assert _monitor._state.monitors[ref].target is target
    assert each < 50e-6, f"{each * 1e6:.1f} µs per on_exit() + cancel()"
    p.kill()
    assert down()[1].ref == ref
    p.wait(TIMEOUT)


def test_idle_watches_are_bounded(spawner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_monitor, "_IDLE_MAX", 2)
    procs = [spawner.popen(["sleep", "60"]) for _ in range(3)]
    targets = []
    for p in procs:
        _monitor.on_exit(p.pid, None, lambda: None)()
        targets.append(_monitor._state.by_pid[p.pid])
    st = _monitor._state
    assert list(st.idle) == targets[1:]
    assert targets[0].dropped and procs[0].pid not in st.by_pid
    watch = targets[0].watch
    assert watch is not None and wait_for(lambda: watch._pidfd is None)
    for p in procs:
        p.kill()
        p.wait(TIMEOUT)
    assert wait_for(lambda: not st.idle)


def test_on_exit_callback_error_is_logged(spawner: Any, caplog: pytest.LogCaptureFixture) -> None:
    p = spawner.popen(["sleep", "60"])
    fired = threading.Event()

    def broken() -> None:
        raise RuntimeError("boom in on_exit")

    with caplog.at_level(logging.ERROR, logger="mproc"):
        _monitor.on_exit(p.pid, None, fired.set)
        _monitor.on_exit(p.pid, None, broken)  # the last registered runs first
        p.kill()
        assert fired.wait(TIMEOUT)
    assert any("boom in on_exit" in (r.exc_text or "") for r in caplog.records)
    p.wait(TIMEOUT)


def test_cancel_waits_for_a_running_callback(spawner: Any) -> None:
    p = spawner.popen(["sleep", "60"])
    entered, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow() -> None:
        entered.set()
        release.wait(TIMEOUT)
        order.append("slow")

    cancel_other = _monitor.on_exit(p.pid, None, lambda: order.append("other"))
    _monitor.on_exit(p.pid, None, slow)  # run first: the last registered goes first
    p.kill()
    assert entered.wait(TIMEOUT)
    t = threading.Thread(target=lambda: (cancel_other(), order.append("cancel returned")))
    t.start()
    release.set()
    t.join(TIMEOUT)
    # The delivery had begun: cancel() waited for it to end, and returned after.
    assert order == ["slow", "other", "cancel returned"]
    p.wait(TIMEOUT)


# ---------------------------------------------------------------- the reaper's hooks


def test_unwatch_closes_the_pidfd_and_never_reports(spawner: Any) -> None:
    p = spawner.popen(["sleep", "60"])
    polled: list[Optional[int]] = []

    def poll(fd: Optional[int]) -> bool:
        polled.append(fd)
        return True

    w = _wait.watch_pidfd(p.pid, poll, _wait.pidfd_open(p.pid))
    _wait.unwatch(w)
    assert wait_for(lambda: w._pidfd is None)
    p.kill()
    p.wait(TIMEOUT)
    assert not w.wait(QUIET)
    assert polled == []


def test_poll_callback_reads_the_exit_through_the_open_pidfd(spawner: Any) -> None:
    p = spawner.popen(["sleep", "60"])
    seen: list[Any] = []

    def poll(fd: Optional[int]) -> bool:
        assert fd is not None
        seen.append(os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG | os.WNOWAIT))
        return True

    w = _wait.watch_pidfd(p.pid, poll, _wait.pidfd_open(p.pid))
    p.kill()
    assert w.wait(TIMEOUT)
    assert w._pidfd is None  # closed once finished
    assert seen[0].si_status == signal.SIGKILL
    assert p.wait(TIMEOUT) == -signal.SIGKILL
