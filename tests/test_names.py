"""Registered names (SPEC §11): register, unregister, whereis, registered, lookup, resolve.

Cross-process tests run helper interpreters (``python -c CHILD``) that obey
JSON commands on stdin and answer on stdout, so every wait is a bounded
read of one line. A helper leaves by reading EOF and exiting normally
(atexit releases its names and closes its mailbox), or by SIGKILL in the
tests about dead holders.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mailbox_peers import WAIT, Kids, wait_exited

import mproc
from mproc import _names
from mproc import _runtime as rt

CHILD = r"""
import fcntl, json, os, sys
import mproc
from mproc import _names

def say(*parts):
    sys.stdout.write(json.dumps(parts) + "\n")
    sys.stdout.flush()

barriers = [int(fd) for fd in sys.argv[1:]]
mproc.open_mailbox()
say("ready", os.getpid())
for line in sys.stdin:
    cmd, *args = json.loads(line)
    try:
        if cmd == "race":  # block on a pipe until the test closes its write end
            say("waiting")
            os.read(barriers[args[0]], 1)
            result = _names.register(args[1])
        elif cmd == "hold_lock":
            fd = os.open(args[0], os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.lockf(fd, fcntl.LOCK_EX)
            result = None
        elif cmd == "try_lock":
            fd = os.open(args[0], os.O_RDWR)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                result = True
            except OSError:
                result = False
            os.close(fd)
        else:
            result = getattr(_names, cmd)(*args)
    except Exception as err:
        say("err", type(err).__name__, str(err), getattr(err, "pid", None))
    else:
        say("ok", result)
"""


class Child:
    """A helper interpreter that runs name operations on command."""

    def __init__(self, spawner: Any, barriers: tuple[int, ...] = ()) -> None:
        self.proc: subprocess.Popen[bytes] = spawner.popen(
            [sys.executable, "-c", CHILD, *map(str, barriers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            pass_fds=barriers,
        )
        self._buf = b""
        tag, self.pid = self.read()
        assert tag == "ready"

    def read(self, timeout: float = WAIT) -> list[Any]:
        """The next line the child says (bounded)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(remaining, 0))
            if not ready:
                raise AssertionError(f"helper PID {self.proc.pid} said nothing for {timeout} s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"helper PID {self.proc.pid} exited: {self.proc.wait(WAIT)}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        parts: list[Any] = json.loads(line)
        return parts

    def post(self, *cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")

    def do(self, *cmd: Any) -> list[Any]:
        """Run one command; return ``["ok", result]`` or ``["err", type, message, pid]``."""
        self.post(*cmd)
        return self.read()

    def exit(self) -> int:
        """Close its stdin: it exits normally (atexit runs); return its exit code."""
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        return self.proc.wait(WAIT)

    def kill(self) -> None:
        """SIGKILL it and reap it (it cleans nothing up)."""
        self.proc.kill()
        self.proc.wait(WAIT)


@pytest.fixture
def helpers(spawner: Any) -> Iterator[Callable[..., Child]]:
    """Start helpers; at the end they exit normally, and killed ones' sockets are removed."""
    started: list[Child] = []

    def start(barriers: tuple[int, ...] = ()) -> Child:
        child = Child(spawner, barriers)
        started.append(child)
        return child

    yield start
    for child in started:
        if child.proc.poll() is None:
            child.exit()
        for pipe in (child.proc.stdin, child.proc.stdout):
            if pipe is not None:
                pipe.close()
    rt.remove_stale(rt.runtime())  # the sockets of helpers killed with SIGKILL


def link_path(runtime_dir: str, name: str) -> str:
    return os.path.join(runtime_dir, "names", "n." + name)


def me() -> int:
    return os.getpid()


# ---------------------------------------------------------------- in one process


def test_register_whereis_registered_unregister(runtime_dir: str) -> None:
    assert mproc.whereis("svc") is None
    mproc.register("svc")
    assert mproc.whereis("svc") == me()
    assert mproc.registered() == {"svc": me()}
    assert os.readlink(link_path(runtime_dir, "svc")) == f"{me()}.{rt.proc_identity(me())}"
    mproc.unregister("svc")
    assert mproc.whereis("svc") is None
    assert mproc.registered() == {}
    assert not os.path.lexists(link_path(runtime_dir, "svc"))


def test_register_opens_the_mailbox_and_a_name_reaches_it(runtime_dir: str) -> None:
    mproc.register("box")
    sockets = [f for f in os.listdir(runtime_dir) if f.endswith(".sock")]
    assert sockets == [f"{me()}.{rt.proc_identity(me())}.sock"]


def test_register_twice_is_a_no_op_and_several_names_are_allowed() -> None:
    mproc.register("a")
    mproc.register("a")
    mproc.register("b")
    assert mproc.registered() == {"a": me(), "b": me()}
    mproc.unregister("a")
    assert mproc.registered() == {"b": me()}


def test_unregister_a_name_nobody_holds_is_name_not_found(runtime_dir: str) -> None:
    with pytest.raises(mproc.NameNotFound, match=r"unregister\(\): no live process holds") as info:
        mproc.unregister("ghost")
    assert "'ghost'" in str(info.value)
    assert info.value.path == link_path(runtime_dir, "ghost")
    assert isinstance(info.value, mproc.MailboxNotFound)
    mproc.register("once")
    mproc.unregister("once")
    with pytest.raises(mproc.NameNotFound, match="'once'"):
        mproc.unregister("once")


@pytest.mark.parametrize(
    "name", [".", "..", " ", "a b", "lock", "n.x", "名前", "x" * 200, "é" * 100]
)
def test_unusual_names_work(name: str) -> None:
    mproc.register(name)
    assert mproc.whereis(name) == me()
    assert mproc.registered() == {name: me()}
    mproc.unregister(name)
    assert mproc.registered() == {}


def test_names_dir_is_private_and_ignored_by_the_socket_scan(runtime_dir: str) -> None:
    mproc.register("kept")
    names = os.path.join(runtime_dir, "names")
    assert os.stat(names).st_mode & 0o777 == 0o700
    assert rt.remove_stale(rt.runtime()) == []
    assert mproc.whereis("kept") == me()


def test_threads_register_the_same_and_distinct_names() -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            mproc.register("shared")
            mproc.register(f"t{i}")
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert errors == []
    assert mproc.registered() == {"shared": me(), **{f"t{i}": me() for i in range(16)}}


def test_a_nested_change_shares_the_lock() -> None:
    # What a signal handler registering inside register() would do: no deadlock.
    d = _names._dir()
    with _names._locked(d.bpath, "test"):
        mproc.register("inner")
    assert mproc.whereis("inner") == me()
    mproc.unregister("inner")


def test_name_errors_pickle() -> None:
    err = mproc.NameTaken("taken by PID 7", pid=7, path="/x")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is mproc.NameTaken
    assert (back.msg, back.pid, back.path) == (err.msg, 7, "/x")


# ---------------------------------------------------------------- validation


def _valid(name: str) -> bool:
    if not name or "/" in name or "\0" in name:
        return False
    try:
        return len(name.encode("utf-8")) <= 200
    except UnicodeEncodeError:
        return False


_CHARS = st.one_of(
    st.characters(exclude_categories=()),  # any code point, lone surrogates too
    st.sampled_from(["/", "\0", ".", " ", "é", "\U0001f600", "\ud800"]),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(_CHARS, max_size=90))
@example("")
@example(".")
@example("..")
@example("a" * 200)
@example("a" * 201)
@example("é" * 100)
@example("é" * 100 + "a")
@example("\U0001f600" * 50)
@example("a/b")
@example("a\0b")
@example("\udc80")
def test_any_text_is_valid_iff_the_rules_say_so_and_valid_ones_round_trip(name: str) -> None:
    if not _valid(name):
        for func in (mproc.register, mproc.whereis, mproc.unregister):
            with pytest.raises(ValueError, match=rf"^{func.__name__}\(\): name"):
                func(name)
        return
    mproc.register(name)
    assert mproc.whereis(name) == me()
    assert mproc.registered() == {name: me()}
    mproc.unregister(name)
    assert mproc.whereis(name) is None


@pytest.mark.parametrize("bad", [None, b"svc", 1, ["svc"]])
def test_a_name_must_be_a_str(bad: Any) -> None:
    for func in (mproc.register, mproc.whereis, mproc.unregister):
        with pytest.raises(TypeError, match=rf"^{func.__name__}\(\): name must be a str, got"):
            func(bad)
    with pytest.raises(TypeError, match=r"^send\(\): name must be a str"):
        _names.lookup(bad)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "must not be empty"),
        ("a/b", "contains '/'"),
        ("a\0b", "NUL"),
        ("x\udc80", "lone surrogate at index 1"),
        ("a" * 201, "201 bytes long in UTF-8; at most 200"),
        ("é" * 100 + "a", "201 bytes long"),
    ],
)
def test_invalid_names_are_refused_with_a_clear_message(name: str, says: str) -> None:
    with pytest.raises(ValueError, match=r"^register\(\): name") as info:
        mproc.register(name)
    assert says in str(info.value)
    assert mproc.registered() == {}


def test_a_str_subclass_is_taken_as_its_plain_value() -> None:
    class Name(str):
        pass

    mproc.register(Name("sub"))
    assert mproc.registered() == {"sub": me()}
    assert type(next(iter(mproc.registered()))) is str


# ---------------------------------------------------------------- across processes


def test_another_process_sees_the_holder(helpers: Callable[..., Child], runtime_dir: str) -> None:
    child = helpers()
    assert child.do("register", "worker") == ["ok", None]
    assert mproc.whereis("worker") == child.pid
    assert mproc.registered() == {"worker": child.pid}
    assert _names.lookup("worker") == (child.pid, rt.proc_identity(child.pid))
    mproc.register("boss")
    assert child.do("whereis", "boss") == ["ok", me()]
    assert child.do("registered") == ["ok", {"boss": me(), "worker": child.pid}]


def test_name_taken_names_the_holder(helpers: Callable[..., Child], runtime_dir: str) -> None:
    child = helpers()
    assert child.do("register", "db") == ["ok", None]
    with pytest.raises(mproc.NameTaken, match=rf"'db' is held by PID {child.pid}\b") as info:
        mproc.register("db")
    assert info.value.pid == child.pid
    assert info.value.path == link_path(runtime_dir, "db")
    assert isinstance(info.value, ValueError)
    assert mproc.whereis("db") == child.pid  # the failed attempt changed nothing
    with pytest.raises(mproc.NameTaken, match=rf"held by PID {child.pid}, not by this process"):
        mproc.unregister("db")
    assert mproc.whereis("db") == child.pid
    # The other way round.
    mproc.register("mine")
    tag, kind, message, pid = child.do("register", "mine")
    assert (tag, kind, pid) == ("err", "NameTaken", me())
    assert f"held by PID {me()}" in message


def test_normal_exit_releases_names(helpers: Callable[..., Child], runtime_dir: str) -> None:
    child = helpers()
    assert child.do("register", "short") == ["ok", None]
    assert child.do("register", "lived") == ["ok", None]
    assert os.path.islink(link_path(runtime_dir, "short"))
    assert child.exit() == 0
    assert os.listdir(os.path.join(runtime_dir, "names")) == ["lock"]
    assert mproc.whereis("short") is None


def test_unregister_in_another_process_frees_the_name(helpers: Callable[..., Child]) -> None:
    child = helpers()
    assert child.do("register", "job") == ["ok", None]
    assert child.do("unregister", "job") == ["ok", None]
    assert mproc.whereis("job") is None
    mproc.register("job")
    assert child.do("whereis", "job") == ["ok", me()]


def test_a_killed_holder_frees_its_name_at_once(
    helpers: Callable[..., Child], runtime_dir: str
) -> None:
    child = helpers()
    assert child.do("register", "victim") == ["ok", None]
    pid = child.pid
    child.proc.send_signal(signal.SIGKILL)
    assert wait_exited(pid, WAIT)
    # Not reaped yet: a zombie is no holder.
    assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert os.path.islink(link_path(runtime_dir, "victim"))
    assert mproc.whereis("victim") is None
    assert _names.lookup("victim") is None
    child.proc.wait(WAIT)
    assert mproc.whereis("victim") is None
    assert not os.path.lexists(link_path(runtime_dir, "victim"))  # whereis tidied it
    other = helpers()
    assert other.do("register", "victim") == ["ok", None]
    assert mproc.whereis("victim") == other.pid


def test_a_killed_holders_name_is_taken_over_without_cleaning(
    helpers: Callable[..., Child], runtime_dir: str
) -> None:
    child = helpers()
    assert child.do("register", "phoenix") == ["ok", None]
    child.kill()
    assert os.path.islink(link_path(runtime_dir, "phoenix"))  # nobody cleaned it
    mproc.register("phoenix")
    assert mproc.whereis("phoenix") == me()


def test_racing_processes_one_winner(helpers: Callable[..., Child], runtime_dir: str) -> None:
    # Round 0 races for a free name; the others for a name whose link names a
    # dead process, where each racer must remove that link before making its
    # own: without the lock, one could remove the link another has just made.
    rounds = 6
    pipes = [os.pipe() for _ in range(rounds)]
    try:
        children = [helpers(tuple(r for r, _ in pipes)) for _ in range(8)]
    finally:
        for r, _ in pipes:
            os.close(r)
    for round_, (_, w) in enumerate(pipes):
        name = f"race{round_}"
        if round_:
            _forge(runtime_dir, name, "999999999.1")
        for child in children:
            child.post("race", round_, name)
        for child in children:
            assert child.read() == ["waiting"]
        os.close(w)  # every helper's read returns at once: they register together
        results = {child.pid: child.read() for child in children}
        winners = [pid for pid, result in results.items() if result == ["ok", None]]
        assert len(winners) == 1, results
        (winner,) = winners
        for pid, result in results.items():
            if pid != winner:
                assert result[:2] == ["err", "NameTaken"], result
                assert result[3] == winner
                assert f"held by PID {winner}" in result[2]
        assert mproc.whereis(name) == winner


# ---------------------------------------------------------------- identity and stale links


def _forge(runtime_dir: str, name: str, target: str) -> str:
    os.makedirs(os.path.join(runtime_dir, "names"), mode=0o700, exist_ok=True)
    path = link_path(runtime_dir, name)
    os.symlink(target, path)
    return path


def test_a_reused_pid_is_not_the_holder(runtime_dir: str) -> None:
    live = os.getppid()  # alive, but with another start time than the link says
    identity = rt.proc_identity(live)
    assert identity is not None
    path = _forge(runtime_dir, "reused", f"{live}.{int(identity) + 1}")
    assert mproc.whereis("reused") is None
    assert _names.lookup("reused") is None
    assert "reused" not in mproc.registered()
    assert not os.path.lexists(path)
    _forge(runtime_dir, "mine-before", f"{me()}.{int(rt.proc_identity(me()) or 0) - 1}")
    mproc.register("mine-before")  # our PID, an earlier process: free
    assert mproc.whereis("mine-before") == me()


def test_a_stale_link_of_a_dead_pid_is_cleaned(runtime_dir: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=WAIT,
    )
    dead = int(proc.stdout)
    assert rt.proc_identity(dead) is None
    a = _forge(runtime_dir, "dead-a", f"{dead}.12345")
    b = _forge(runtime_dir, "dead-b", f"{dead}.12345")
    assert mproc.registered() == {}
    assert not os.path.lexists(a)
    assert not os.path.lexists(b)
    _forge(runtime_dir, "dead-c", f"{dead}.12345")
    mproc.register("dead-c")
    assert mproc.whereis("dead-c") == me()


@pytest.mark.parametrize("junk", ["garbage", "12x.34", "-1.5", "1234"])
def test_a_malformed_link_is_free(runtime_dir: str, junk: str) -> None:
    _forge(runtime_dir, "junk", junk)
    assert mproc.whereis("junk") is None
    _forge(runtime_dir, "junk2", junk)
    mproc.register("junk2")
    assert mproc.whereis("junk2") == me()


def test_a_regular_file_in_place_of_a_link_is_free(runtime_dir: str) -> None:
    os.makedirs(os.path.join(runtime_dir, "names"), mode=0o700, exist_ok=True)
    with open(link_path(runtime_dir, "file"), "w") as f:
        f.write("not a link")
    assert mproc.whereis("file") is None
    assert mproc.registered() == {}
    mproc.register("file")
    assert os.path.islink(link_path(runtime_dir, "file"))


# ---------------------------------------------------------------- release and fork


def test_release_all_removes_only_links_that_name_us(runtime_dir: str) -> None:
    mproc.register("r1")
    mproc.register("r2")
    mproc.register("r3")
    # r3's link was replaced behind our back by another process's: not ours to remove.
    other = f"{os.getppid()}.{rt.proc_identity(os.getppid())}"
    os.unlink(link_path(runtime_dir, "r3"))
    os.symlink(other, link_path(runtime_dir, "r3"))
    _names.release_all()
    assert mproc.registered() == {"r3": os.getppid()}
    assert _names._held == set()
    _names.release_all()  # idempotent
    os.unlink(link_path(runtime_dir, "r3"))


def _forked_child(link: str, parent: int) -> None:
    if _names._held:
        sys.exit(3)
    _names.release_all()
    if not os.path.islink(link):
        sys.exit(4)
    try:
        mproc.register("family")
    except mproc.NameTaken as err:
        code = 0 if err.pid == parent else 5
    else:
        code = 6
    mproc.close_mailbox()  # it opened ours; a multiprocessing child skips atexit
    sys.exit(code)


def test_a_forked_child_holds_none_of_its_parents_names(kids: Kids, runtime_dir: str) -> None:
    mproc.register("family")
    child = kids.start(_forked_child, link_path(runtime_dir, "family"), me(), method="fork")
    assert kids.finish(child) == 0
    assert mproc.whereis("family") == me()


# ---------------------------------------------------------------- lookup and resolve


def test_lookup_reads_proc_unless_told_the_holder_is_alive(
    monkeypatch: pytest.MonkeyPatch, helpers: Callable[..., Child]
) -> None:
    child = helpers()
    assert child.do("register", "svc") == ["ok", None]
    reads: list[int] = []
    real = rt.proc_identity

    def counting(pid: int) -> Any:
        reads.append(pid)
        return real(pid)

    monkeypatch.setattr(rt, "proc_identity", counting)
    asked: list[tuple[int, str]] = []

    def trust(pid: int, identity: str) -> bool:
        asked.append((pid, identity))
        return True

    expected = (child.pid, real(child.pid))
    assert _names.lookup("svc", trust) == expected  # a new target: /proc is read
    assert (reads, asked) == ([child.pid], [])
    assert _names.lookup("svc", trust) == expected  # unchanged and trusted: no /proc read
    assert (reads, asked) == ([child.pid], [expected])
    assert _names.lookup("svc", lambda pid, ident: False) == expected
    assert reads == [child.pid, child.pid]
    assert _names.lookup("svc") == expected
    assert len(reads) == 3
    # The holder changes: the trust check is not consulted for the new target.
    assert child.do("unregister", "svc") == ["ok", None]
    assert _names.lookup("svc", trust) is None
    monkeypatch.setattr(rt, "proc_identity", real)
    mproc.register("svc")
    monkeypatch.setattr(rt, "proc_identity", counting)
    del asked[:]
    assert _names.lookup("svc", trust) == (me(), real(me()))
    assert asked == []


def test_lookup_follows_the_runtime_dir(runtime_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mproc.register("here")
    assert _names.lookup("here") == (me(), rt.proc_identity(me()))
    other = os.path.join(runtime_dir, "o")
    monkeypatch.setenv("MPROC_RUNTIME_DIR", other)
    assert _names.lookup("here") is None
    assert mproc.whereis("here") is None
    assert os.path.isdir(os.path.join(other, "names"))
    monkeypatch.setenv("MPROC_RUNTIME_DIR", runtime_dir)
    assert _names.lookup("here") == (me(), rt.proc_identity(me()))


class _Clock:
    """``time`` for _names whose first sleep runs a hook (the holder appears while waiting)."""

    def __init__(self, hook: Callable[[], None]) -> None:
        self.hook: Callable[[], None] | None = hook
        self.sleeps = 0
        self.monotonic = time.monotonic

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        time.sleep(seconds)


def test_resolve_waits_for_a_later_holder(
    helpers: Callable[..., Child], monkeypatch: pytest.MonkeyPatch
) -> None:
    child = helpers()

    def register_now() -> None:
        assert child.do("register", "late") == ["ok", None]

    clock = _Clock(register_now)
    monkeypatch.setattr(_names, "time", clock)
    found = _names.resolve("late", time.monotonic() + WAIT)
    assert found == (child.pid, rt.proc_identity(child.pid))
    assert clock.sleeps >= 1 and clock.hook is None  # it did wait, then found it


def test_resolve_gives_up_at_the_deadline(runtime_dir: str) -> None:
    start = time.monotonic()
    with pytest.raises(mproc.NameNotFound, match=r"no live process holds the name 'nobody'") as e:
        _names.resolve("nobody", start + 0.1)
    assert 0.1 <= time.monotonic() - start < WAIT
    assert e.value.path == link_path(runtime_dir, "nobody")
    assert "mproc.register('nobody')" in str(e.value)
    start = time.monotonic()
    with pytest.raises(mproc.NameNotFound):
        _names.resolve("nobody", start - 1)  # a past deadline: one look, no wait
    assert time.monotonic() - start < 1


def test_resolve_names_the_dead_last_holder(helpers: Callable[..., Child]) -> None:
    child = helpers()
    assert child.do("register", "gone") == ["ok", None]
    child.kill()
    with pytest.raises(mproc.NameNotFound, match=rf"its last holder, PID {child.pid}, has exited"):
        _names.resolve("gone", time.monotonic())


def test_resolve_refuses_an_invalid_name_naming_the_caller() -> None:
    with pytest.raises(ValueError, match=r"^call\(\): name must not be empty"):
        _names.resolve("", time.monotonic(), func="call")


# ---------------------------------------------------------------- the lock


def test_a_stuck_lock_holder_times_out_and_its_death_frees_the_lock(
    helpers: Callable[..., Child], runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.makedirs(os.path.join(runtime_dir, "names"), mode=0o700, exist_ok=True)
    lock = os.path.join(runtime_dir, "names", "lock")
    holder = helpers()
    assert holder.do("hold_lock", lock) == ["ok", None]
    monkeypatch.setattr(_names, "_LOCK_WAIT", 0.2)
    start = time.monotonic()
    with pytest.raises(mproc.MailboxTimeout, match=r"register\(\): the registered-names lock"):
        mproc.register("blocked")
    assert time.monotonic() - start < WAIT
    assert mproc.whereis("blocked") is None
    # A reader never waits for the lock: a stale link it cannot remove is just skipped.
    _forge(runtime_dir, "stale", "999999999.1")
    assert mproc.whereis("stale") is None
    assert os.path.lexists(link_path(runtime_dir, "stale"))
    holder.kill()  # the kernel drops the lock of a dead process
    mproc.register("blocked")
    assert mproc.whereis("blocked") == me()


def _hold_until_closed(r: int, w: int) -> None:
    os.close(w)
    select.select([r], [], [], WAIT)  # the test closes the write end when done


def test_a_child_forked_while_the_lock_is_held_does_not_keep_it(
    kids: Kids, helpers: Callable[..., Child], runtime_dir: str
) -> None:
    # With flock() the child would share the lock (its open file description) and
    # keep it taken for as long as it lives; a POSIX lock is not inherited.
    helper = helpers()
    lock = os.path.join(runtime_dir, "names", "lock")
    r, w = os.pipe()
    try:
        d = _names._dir()
        with _names._locked(d.bpath, "test"):
            assert helper.do("try_lock", lock) == ["ok", False]
            forked = kids.start(_hold_until_closed, r, w, method="fork")
        assert forked.is_alive()
        assert helper.do("try_lock", lock) == ["ok", True]
        mproc.register("after-fork")
        assert mproc.whereis("after-fork") == me()
    finally:
        os.close(w)
        os.close(r)
    assert kids.finish(forked) == 0


# ---------------------------------------------------------------- an unsafe names directory


def test_a_names_dir_that_is_a_symlink_is_refused(runtime_dir: str) -> None:
    real = os.path.join(runtime_dir, "elsewhere")
    os.mkdir(real, 0o700)
    os.symlink(real, os.path.join(runtime_dir, "names"))
    for call in (lambda: mproc.register("x"), lambda: mproc.whereis("x"), mproc.registered):
        with pytest.raises(mproc.UnsafeRuntimeDir, match=r"registered-names directory .* symlink"):
            call()
    with pytest.raises(mproc.UnsafeRuntimeDir) as info:
        _names.lookup("x")
    assert info.value.path == os.path.join(runtime_dir, "names")
    assert os.listdir(real) == []


@pytest.mark.parametrize("mode", [0o777, 0o720, 0o702])
def test_a_names_dir_writable_by_others_is_refused(runtime_dir: str, mode: int) -> None:
    names = os.path.join(runtime_dir, "names")
    os.mkdir(names)
    os.chmod(names, mode)
    with pytest.raises(mproc.UnsafeRuntimeDir, match=f"writable by others .mode {mode:o}.") as e:
        mproc.register("x")
    assert names in str(e.value)
    assert os.listdir(names) == []


def test_a_names_dir_that_is_a_file_is_refused(runtime_dir: str) -> None:
    with open(os.path.join(runtime_dir, "names"), "w"):
        pass
    with pytest.raises(mproc.UnsafeRuntimeDir, match="not a directory"):
        mproc.whereis("x")
