"""Tests for mproc.Process under fork, spawn and forkserver (SPEC §1, §3)."""

from __future__ import annotations

import multiprocessing
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
import pytest

import mproc

# On 3.12+ os.fork() warns when threads exist; the reaper thread always does.
pytestmark = pytest.mark.filterwarnings("ignore:.*multi-threaded.*:DeprecationWarning")

METHODS = ["fork", "spawn", "forkserver"]
TIMEOUT = 30


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pipe(method: str) -> tuple[Connection, Connection]:
    r, w = multiprocessing.get_context(method).Pipe(duplex=False)
    return r, w


def recv(conn: Connection) -> Any:
    """The next message from a child, within TIMEOUT."""
    assert conn.poll(TIMEOUT), "the child did not report in time"
    return conn.recv()


def run_and_collect(proc: mproc.Process, r: Connection, w: Connection) -> Any:
    proc.start()
    w.close()  # the child holds the only write end now: EOF if it dies
    try:
        return recv(r)
    finally:
        r.close()
        assert proc.wait(TIMEOUT) == 0


class ModuleLevelWorker(mproc.Process):
    """A subclass importable by the child."""

    def __init__(self, conn: Connection, **kw: Any) -> None:
        super().__init__(**kw)
        self.conn = conn

    def run(self) -> None:
        self.conn.send(("module-level", mproc.is_child(), mproc.ppid()))


def test_target_lambda(method: str) -> None:
    r, w = pipe(method)
    proc = mproc.Process(
        target=lambda c: c.send((mproc.is_child(), mproc.ppid(), os.environ["MPROC_PPID"])),
        args=(w,),
        start_method=method,
    )
    assert run_and_collect(proc, r, w) == (True, os.getpid(), str(os.getpid()))


def test_target_closure(method: str) -> None:
    secret = [method, 42]

    def work(c: Connection, extra: int, *, scale: int) -> None:
        c.send([*secret, extra * scale])

    r, w = pipe(method)
    proc = mproc.Process(target=work, args=(w, 3), kwargs={"scale": 2}, start_method=method)
    assert run_and_collect(proc, r, w) == [method, 42, 6]


def test_local_class_as_target_and_arg(method: str) -> None:
    class Box:
        def __init__(self, value: int) -> None:
            self.value = value

        def send_sum(self, c: Connection, other: Box) -> None:
            c.send(self.value + other.value)

    r, w = pipe(method)
    proc = mproc.Process(target=Box(5).send_sum, args=(w, Box(7)), start_method=method)
    assert run_and_collect(proc, r, w) == 12


def test_local_subclass(method: str) -> None:
    class Local(mproc.Process):
        def __init__(self, conn: Connection, word: str) -> None:
            super().__init__(start_method=method)
            self.conn, self.word = conn, word

        def run(self) -> None:
            self.conn.send((self.word.upper(), mproc.is_child(), mproc.ppid()))

    r, w = pipe(method)
    assert run_and_collect(Local(w, "hi"), r, w) == ("HI", True, os.getpid())


def test_module_level_subclass(method: str) -> None:
    r, w = pipe(method)
    proc = ModuleLevelWorker(w, start_method=method)
    assert run_and_collect(proc, r, w) == ("module-level", True, os.getpid())


def test_start_method_as_context() -> None:
    ctx = multiprocessing.get_context("spawn")
    r, w = ctx.Pipe(duplex=False)
    proc = mproc.Process(
        target=lambda c: c.send(multiprocessing.parent_process() is not None),
        args=(w,),
        start_method=ctx,
    )
    assert run_and_collect(proc, r, w) is True
    assert proc._mproc_method == "spawn"


def test_start_returns_none_and_default_method() -> None:
    proc = mproc.Process(target=os._exit, args=(0,))
    assert proc.start() is None  # type: ignore[func-returns-value]
    assert proc.wait(TIMEOUT) == 0


def test_bad_start_method() -> None:
    with pytest.raises(ValueError, match="nonsense"):
        mproc.Process(target=print, start_method="nonsense")
    with pytest.raises(TypeError, match="start_method"):
        mproc.Process(target=print, start_method=3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "code"),
    [
        (lambda: None, 0),
        (lambda: sys.exit(3), 3),
        (lambda: os._exit(5), 5),
    ],
    ids=["return", "sys.exit", "os._exit"],
)
def test_exit_codes(method: str, target: Any, code: int) -> None:
    proc = mproc.Process(target=target, start_method=method)
    proc.start()
    assert proc.wait(TIMEOUT) == code
    assert proc.exitcode == code
    assert not proc.is_alive()


def ready_child(method: str, *, ignore_term: bool = False) -> tuple[mproc.Process, Connection]:
    """A started child that has said "ready" and then blocks until it is signalled."""

    def work(c: Connection) -> None:
        if ignore_term:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        c.send("ready")
        c.recv()  # the parent never sends: blocks until signalled or the parent closes

    # duplex: the child says "ready" and then blocks in recv() on the same end.
    a, b = multiprocessing.get_context(method).Pipe()
    proc = mproc.Process(target=work, args=(b,), start_method=method)
    proc.start()
    b.close()
    assert recv(a) == "ready"
    return proc, a


@pytest.mark.parametrize(
    ("action", "code"),
    [
        ("kill", -signal.SIGKILL),
        ("terminate", -signal.SIGTERM),
        ("sigusr1", -signal.SIGUSR1),
    ],
)
def test_signals(method: str, action: str, code: int) -> None:
    proc, conn = ready_child(method)
    try:
        assert proc.is_alive()
        assert proc.wait(0.05) is None  # still running
        if action == "sigusr1":
            proc.signal(signal.SIGUSR1)
        else:
            getattr(proc, action)()
        assert proc.wait(TIMEOUT) == code
        assert proc.exitcode == code
        assert "exitcode" in repr(proc)
    finally:
        conn.close()


def test_signal_after_exit_raises_and_stop_is_noop(method: str) -> None:
    proc = mproc.Process(target=lambda: None, start_method=method)
    proc.start()
    assert proc.wait(TIMEOUT) == 0
    pid = proc.pid
    with pytest.raises(mproc.NoSuchProcess, match=rf"PID {pid}\b.*exited") as info:
        proc.signal(signal.SIGUSR1)
    assert info.value.pid == pid
    proc.terminate()
    proc.kill()
    assert proc.exitcode == 0


def test_not_started() -> None:
    proc = mproc.Process(target=print)
    assert proc.pid is None
    with pytest.raises(ValueError, match="not been started"):
        proc.wait(1)
    with pytest.raises(ValueError, match="not been started"):
        proc.signal(signal.SIGTERM)


def test_reaped_without_wait(method: str) -> None:
    proc = mproc.Process(target=lambda: None, start_method=method)
    proc.start()
    pid = proc.pid
    assert pid is not None and proc._mproc_watch is not None
    assert proc._mproc_watch.wait(TIMEOUT)  # the reaper saw it; nobody called wait/join
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped (or, forkserver: never ours)
    try:
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass
    assert proc.exitcode == 0


def test_join_and_multiprocessing_bookkeeping(method: str) -> None:
    proc = mproc.Process(target=lambda: None, start_method=method)
    proc.start()
    assert proc in multiprocessing.active_children() or proc.exitcode is not None
    proc.join(TIMEOUT)
    assert proc.exitcode == 0
    assert proc not in multiprocessing.active_children()
    proc.close()
    with pytest.raises(ValueError, match="closed"):
        proc.signal(signal.SIGTERM)


def test_nested_process_sees_its_own_launcher(method: str) -> None:
    def outer(c: Connection) -> None:
        # The inner one forks: a forkserver/spawn child starting its own
        # forkserver would orphan it (and its resource tracker) to us.
        inner_r, inner_w = multiprocessing.get_context("fork").Pipe(duplex=False)
        inner = mproc.Process(
            target=lambda w: w.send(mproc.ppid()), args=(inner_w,), start_method="fork"
        )
        inner.start()
        inner_w.close()
        c.send((os.getpid(), inner_r.recv() if inner_r.poll(TIMEOUT) else None))
        inner.wait(TIMEOUT)

    r, w = pipe(method)
    me, inner_ppid = run_and_collect(
        mproc.Process(target=outer, args=(w,), start_method=method), r, w
    )
    assert inner_ppid == me


MAIN_SCRIPT = textwrap.dedent(
    """
    import sys
    import mproc

    class Worker(mproc.Process):
        def __init__(self, code, **kw):
            super().__init__(**kw)
            self.code = code

        def run(self):
            ok = mproc.is_child() and mproc.ppid() == self.launcher
            sys.exit(self.code if ok else 99)

    if __name__ == "__main__":
        import os
        total = 0
        for method in ("spawn", "forkserver"):
            w = Worker(20, start_method=method)
            w.launcher = os.getpid()
            w.start()
            total += w.wait(60)
            p = mproc.Process(target=lambda: sys.exit(1), start_method=method)
            p.start()
            total += p.wait(60)
        sys.exit(total)
    """
)


def test_main_module_classes(tmp_path: Path) -> None:
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT)
    before = {p.pid for p in psutil.Process().children()}
    try:
        done = subprocess.run([sys.executable, str(script)], timeout=120, capture_output=True)
    finally:
        # The script's forkserver and resource tracker exit right after it
        # and are re-parented to us (a subreaper): wait for them.
        orphans = [p for p in psutil.Process().children() if p.pid not in before]
        psutil.wait_procs(orphans, timeout=10)
    assert done.returncode == 42, done.stderr.decode()


def _send_home() -> None:
    mproc.send(mproc.ppid(), "home", timeout=10)


def _nothing() -> None:
    pass


def test_forkserver_child_uses_its_launchers_runtime_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The forkserver keeps the environment of the moment it started. Have it
    # start (if it is not running yet) under another runtime dir, as when a
    # program sets MPROC_RUNTIME_DIR later: the child must still find us.
    other = tempfile.mkdtemp(prefix="mp", dir="/tmp")
    try:
        with monkeypatch.context() as patch:
            patch.setenv("MPROC_RUNTIME_DIR", other)
            warm = mproc.Process(target=_nothing, start_method="forkserver")
            warm.start()
            warm.join(30)
            mproc.close_mailbox()  # the one starting warm opened in `other`
        child = mproc.Process(target=_send_home, start_method="forkserver")
        child.start()
        msg = mproc.receive(timeout=30)
        assert (msg.data, msg.sender_pid) == ("home", child.pid)
        assert child.wait(30) == 0
    finally:
        shutil.rmtree(other, ignore_errors=True)


def _report_runtime_dir(conn: Connection) -> None:
    os.chdir("/")  # what the child does later must not change where its launcher is
    conn.send(os.environ["MPROC_RUNTIME_DIR"])


def test_child_gets_the_runtime_dir_as_an_absolute_path(
    method: str, runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fork child works it out itself, from the environment and working
    # directory it inherited; the others get it from the launcher.
    monkeypatch.chdir(os.path.dirname(runtime_dir))
    monkeypatch.setenv("MPROC_RUNTIME_DIR", os.path.basename(runtime_dir))
    r, w = pipe(method)
    proc = mproc.Process(target=_report_runtime_dir, args=(w,), start_method=method)
    assert run_and_collect(proc, r, w) == runtime_dir


def _exit_with(code: int) -> None:
    os._exit(code)


def test_polls_from_other_threads_agree_with_the_reaper() -> None:
    # multiprocessing.active_children() and is_alive() poll every child from
    # whatever thread while the reaper collects them: each status is seen
    # once, by whoever gets it first, and never lost.
    procs = [mproc.Process(target=_exit_with, args=(i,), start_method="fork") for i in range(30)]
    stop = threading.Event()

    def poll_all() -> None:
        while not stop.is_set():
            multiprocessing.active_children()
            for p in procs:
                p.is_alive()

    pollers = [threading.Thread(target=poll_all) for _ in range(3)]
    for t in pollers:
        t.start()
    try:
        for p in procs:
            p.start()
        codes = [p.wait(TIMEOUT) for p in procs]
    finally:
        stop.set()
        for t in pollers:
            t.join(TIMEOUT)
    assert not any(t.is_alive() for t in pollers)
    assert codes == list(range(30))
    assert all(p.exitcode == i and not p.is_alive() for i, p in enumerate(procs))


def _block(conn: Connection) -> None:
    conn.recv()


def test_polling_a_running_child_does_not_wait_for_its_handles_lock() -> None:
    r, w = multiprocessing.get_context("fork").Pipe(duplex=False)
    proc = mproc.Process(target=_block, args=(r,), start_method="fork")
    proc.start()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with proc._mproc_lock:  # type: ignore[attr-defined]
            held.set()
            release.wait(TIMEOUT)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(TIMEOUT)
        # Nothing to collect: no lock needed, so nothing to wait for.
        answers: list[bool] = []
        poller = threading.Thread(target=lambda: answers.append(proc.is_alive()))
        poller.start()
        poller.join(TIMEOUT)
        assert answers == [True]
    finally:
        release.set()
        holder.join(TIMEOUT)
        w.send("go")
        assert proc.wait(TIMEOUT) == 0
        r.close()
        w.close()


def test_collecting_an_exit_waits_for_the_handles_lock() -> None:
    # Under the lock, _signal_child checks and signals: the status must not be
    # collected (and the PID freed) in between, by a poll from another thread.
    r, w = multiprocessing.get_context("fork").Pipe(duplex=False)
    proc = mproc.Process(target=_block, args=(r,), start_method="fork")
    proc.start()
    popen = proc._popen  # type: ignore[attr-defined]
    answers: list[Any] = []
    with proc._mproc_lock:  # type: ignore[attr-defined]
        w.send("go")
        # The child has exited once its pidfd says so; it stays unreaped.
        fd = os.pidfd_open(proc.pid)  # type: ignore[arg-type]
        try:
            assert select.select([fd], [], [], TIMEOUT)[0]
        finally:
            os.close(fd)
        poller = threading.Thread(target=lambda: answers.append(popen.poll()))
        poller.start()
        poller.join(0.2)  # it must be waiting for us; any wait here only shortens the test
        assert answers == []
        assert psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE  # type: ignore[arg-type]
    poller.join(TIMEOUT)
    assert answers == [0]
    assert proc.wait(TIMEOUT) == 0
    r.close()
    w.close()
