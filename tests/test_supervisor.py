"""Supervisor (SPEC §12, issue 10): restart types, strategies, intensity, back-off, nesting.

Synchronisation is by handshakes only: the supervisor's reports (records
of the ``mproc`` logger carrying ``mproc_event``, collected by the
``reports`` fixture) and messages the children send (``supervisor_peers``).
Every wait is bounded. PIDs expected to die are pinned with pidfds and
checked (and reaped when they were re-parented to this test process, a
child subreaper).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
import supervisor_peers as peers
from test_containment import exited, pin, settle

import mproc

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"),
    reason="the supervisor is tested on Linux with pidfds",
)

WAIT = 30.0
ME = os.getpid()


# --- helpers --------------------------------------------------------------------


class Reports(logging.Handler):
    """The supervisor's reports, ``(event, name, pid, exitcode, created)``, in order."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[Any, ...]] = []
        self.cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "mproc_event", None)
        if event is not None:
            with self.cond:
                self.records.append((*event, record.created))
                self.cond.notify_all()

    def wait(self, event: str, name: str, count: int = 1) -> tuple[Any, ...]:
        """Return the ``count``-th report of ``event`` about ``name`` (waiting for it)."""

        def matching() -> list[tuple[Any, ...]]:
            return [r for r in self.records if r[0] == event and r[1] == name]

        with self.cond:
            ok = self.cond.wait_for(lambda: len(matching()) >= count, WAIT)
            assert ok, f"no {event!r} report #{count} of {name!r}; saw {self.records}"
            return matching()[count - 1]

    def all(self) -> list[tuple[Any, ...]]:
        with self.cond:
            return list(self.records)

    def after(self, record: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        seen = self.all()
        return seen[seen.index(record) + 1 :]


@pytest.fixture
def reports() -> Iterator[Reports]:
    log = logging.getLogger("mproc")
    handler = Reports()
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


class Inbox:
    """Messages children send to group ``peers.GROUP``, taken by kind."""

    def __init__(self) -> None:
        self.kept: list[tuple[Any, ...]] = []

    def take(self, kind: str, name: Optional[str] = None) -> tuple[Any, ...]:
        def fits(m: tuple[Any, ...]) -> bool:
            return m[0] == kind and (name is None or m[1] == name)

        for m in self.kept:
            if fits(m):
                self.kept.remove(m)
                return m
        deadline = time.monotonic() + WAIT
        while True:
            m = mproc.receive(peers.GROUP, timeout=max(0.0, deadline - time.monotonic())).data
            if fits(m):
                return tuple(m)
            self.kept.append(tuple(m))


def names(seen: list[tuple[Any, ...]], event: str) -> list[str]:
    return [r[1] for r in seen if r[0] == event]


def forget_sockets(runtime_dir: str, pids: list[int]) -> None:
    """Remove the socket files of killed processes (test_containment's, but racing a sweep)."""
    for name in os.listdir(runtime_dir):
        if name.endswith(".sock") and int(name.split(".")[0]) in pids:
            try:
                os.unlink(os.path.join(runtime_dir, name))
            except FileNotFoundError:
                pass  # swept as stale meanwhile


class steps:
    """A factory whose n-th incarnation does ``what[n]`` (the last one from then on).

    ``calls`` has the ``time.time()`` of every call: when each (re)start began.
    """

    def __init__(self, name: str, *what: str) -> None:
        self.name = name
        self.left = list(what)
        self.calls: list[float] = []

    def __call__(self) -> mproc.Process:
        self.calls.append(time.time())
        todo = self.left.pop(0) if len(self.left) > 1 else self.left[0]
        return mproc.Process(target=peers.step, args=(ME, self.name, todo))


def blocker(name: str) -> Callable[[], mproc.Process]:
    return steps(name, "block")


def sleeper() -> mproc.Command:
    return mproc.Command("sleep", ["1000"])


def kill(pid: Optional[int]) -> None:
    assert pid is not None
    os.kill(pid, signal.SIGKILL)


# --- arguments --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "error", "words"),
    [
        ({"strategy": "one_for_some"}, ValueError, "strategy 'one_for_some'"),
        ({"strategy": 1}, TypeError, "strategy must be one of"),
        ({"max_restarts": -1}, ValueError, "max_restarts must be >= 0"),
        ({"max_restarts": 1.5}, TypeError, "max_restarts must be an int"),
        ({"max_restarts": True}, TypeError, "max_restarts must be an int"),
        ({"max_seconds": 0}, ValueError, "max_seconds must be a finite number > 0"),
        ({"max_seconds": float("nan")}, ValueError, "max_seconds"),
        ({"max_seconds": float("inf")}, ValueError, "max_seconds"),
        ({"max_seconds": "5"}, TypeError, "max_seconds must be a number"),
        ({"contain": "yes"}, TypeError, "contain must be True or False"),
    ],
)
def test_bad_supervisor_arguments(kw: dict[str, Any], error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        mproc.Supervisor(**kw)


@pytest.mark.parametrize(
    ("args", "kw", "error", "words"),
    [
        (("w", sleeper), {"restart": "sometimes"}, ValueError, "restart type 'sometimes'"),
        (("w", sleeper), {"restart": None}, TypeError, "restart type must be one of"),
        (("w", sleeper), {"backoff": (0.1,)}, TypeError, r"\(first, max\) tuple"),
        (("w", sleeper), {"backoff": 0.5}, TypeError, r"\(first, max\) tuple"),
        (("w", sleeper), {"backoff": (0, 1)}, ValueError, "first delay must be a finite"),
        (("w", sleeper), {"backoff": (2, 1)}, ValueError, "first delay 2 s exceeds its max 1 s"),
        (("w", sleeper), {"backoff": ("a", 1)}, TypeError, "first delay must be a number"),
        (("w", sleeper), {"backoff": (1, float("inf"))}, ValueError, "max delay"),
        (("w", sleeper), {"shutdown": -1}, ValueError, "shutdown must be >= 0"),
        (("w", sleeper), {"register": "yes"}, TypeError, "register must be True or False"),
        (("a/b", sleeper), {"register": True}, ValueError, "a/b"),
        (("w", "sleep"), {}, TypeError, "factory must be a callable"),
        (("", sleeper), {}, ValueError, "name must not be empty"),
        ((3, sleeper), {}, TypeError, "name must be a str"),
    ],
)
def test_bad_child_specs(
    args: tuple[Any, ...], kw: dict[str, Any], error: type, words: str
) -> None:
    sup = mproc.Supervisor()
    with pytest.raises(error, match=words):
        sup.add(*args, **kw)
    assert sup.children() == []


def test_names_are_unique_and_must_exist() -> None:
    sup = mproc.Supervisor()
    sup.add("w", sleeper)
    with pytest.raises(ValueError, match="has a child 'w' already"):
        sup.add("w", sleeper)
    with pytest.raises(ValueError, match=r"no child 'x' \(children: 'w'\)"):
        sup.pid("x")
    with pytest.raises(ValueError, match="no child 'x'"):
        sup.remove("x")
    assert sup.remove("w") is None  # never ran
    assert sup.children() == []
    assert sup.wait(0) is True  # never started: nothing to wait for


@pytest.mark.parametrize(
    ("factory", "error", "words"),
    [
        (lambda: "sleep", TypeError, "returned 'sleep'; it must return a new, unstarted"),
        (lambda: mproc.Command("/no/such/program"), FileNotFoundError, "/no/such/program"),
    ],
)
def test_a_child_that_cannot_start_fails_the_with_and_stops_the_others(
    factory: Callable[[], Any], error: type, words: str, reports: Reports
) -> None:
    sup = mproc.Supervisor()
    sup.add("first", sleeper)
    sup.add("bad", factory)
    with pytest.raises(error, match=words), sup:
        raise AssertionError("not reached")
    seen = reports.all()
    started = [r for r in seen if r[0] == "started"]
    assert [r[1] for r in started] == ["first"]
    assert ("stopped", "first", started[0][2], -signal.SIGTERM) == seen[-1][:4]
    assert sup.children() == [("first", None, 0), ("bad", None, 0)]
    assert sup.wait(0) is True


def test_a_started_process_or_a_command_with_register_is_refused() -> None:
    started = mproc.Command("true")
    started.start()
    started.wait(WAIT)
    sup = mproc.Supervisor()
    sup.add("again", lambda: started)
    with pytest.raises(ValueError, match="which has been started; it must return a new one"):
        sup.__enter__()
    sup = mproc.Supervisor()
    sup.add("cmd", sleeper, register=True)
    with pytest.raises(TypeError, match=r"register=True, which needs an mproc\.Process"):
        sup.__enter__()


# --- strategies -----------------------------------------------------------------------


def _three(strategy: str) -> mproc.Supervisor:
    sup = mproc.Supervisor(strategy=strategy, max_restarts=5, max_seconds=WAIT)
    for name in ("a", "b", "c"):
        sup.add(name, blocker(name))
    return sup


def test_one_for_one_restarts_only_that_child(reports: Reports) -> None:
    inbox = Inbox()
    with _three("one_for_one") as sup:
        before = {name: inbox.take("up", name)[2] for name in "abc"}
        assert {n: sup.pid(n) for n in "abc"} == before
        kill(before["b"])
        reports.wait("started", "b", 2)
        seen = reports.all()
        new_b = inbox.take("up", "b")[2]
        assert names(seen, "stopped") == []
        assert [r[:4] for r in seen if r[0] == "exited"] == [
            ("exited", "b", before["b"], -signal.SIGKILL)
        ]
        assert sup.children() == [("a", before["a"], 0), ("b", new_b, 1), ("c", before["c"], 0)]
        assert set(sup.pids()) == {before["a"], new_b, before["c"]}  # §4 on the incarnations


def test_one_for_all_stops_the_others_in_reverse_and_restarts_all_in_order(
    reports: Reports,
) -> None:
    inbox = Inbox()
    with _three("one_for_all") as sup:
        before = {name: inbox.take("up", name)[2] for name in "abc"}
        fds = pin(list(before.values()))
        kill(before["b"])
        reports.wait("started", "c", 2)
        seen = reports.all()
        after = {name: inbox.take("up", name)[2] for name in "abc"}
        assert names(seen, "stopped") == ["c", "a"]
        assert [r[3] for r in seen if r[0] == "stopped"] == [-signal.SIGTERM] * 2
        assert names(seen, "started") == ["a", "b", "c"] * 2
        assert all(after[n] != before[n] for n in "abc")
        assert sup.children() == [(n, after[n], 1) for n in "abc"]
        assert settle(fds) == [True] * 3


def test_rest_for_one_restarts_it_and_those_added_after_it(reports: Reports) -> None:
    inbox = Inbox()
    with _three("rest_for_one") as sup:
        before = {name: inbox.take("up", name)[2] for name in "abc"}
        kill(before["b"])
        reports.wait("started", "c", 2)
        seen = reports.all()
        after = {name: inbox.take("up", name)[2] for name in "bc"}
        assert names(seen, "stopped") == ["c"]
        assert names(seen, "started") == ["a", "b", "c", "b", "c"]
        assert sup.children() == [("a", before["a"], 0), ("b", after["b"], 1), ("c", after["c"], 1)]


def test_kill_through_the_manager_is_an_exit_like_any_other(reports: Reports) -> None:
    inbox = Inbox()
    with _three("one_for_one") as sup:
        a = inbox.take("up", "a")[2]
        assert sup.kill(a) == -signal.SIGKILL
        reports.wait("started", "a", 2)
        assert inbox.take("up", "a")[2] == sup.pid("a") != a


# --- restart types ---------------------------------------------------------------------


def test_restart_types(reports: Reports) -> None:
    inbox = Inbox()
    sup = mproc.Supervisor(max_restarts=10, max_seconds=WAIT)
    sup.add("perm", steps("perm", "exit0", "block"))
    sup.add("trans_ok", steps("trans_ok", "exit0", "block"), restart="transient")
    sup.add("trans_bad", steps("trans_bad", "exit1", "block"), restart="transient")
    sup.add("trans_sig", blocker("trans_sig"), restart="transient")
    sup.add("temp", steps("temp", "exit1", "block"), restart="temporary")
    with sup:
        first = {n: inbox.take("up", n)[2] for n in ("perm", "trans_ok", "trans_bad", "temp")}
        reports.wait("started", "perm", 2)  # restarted after exit 0
        reports.wait("done", "trans_ok")  # exit 0: a normal end
        reports.wait("started", "trans_bad", 2)  # exit 1: restarted
        reports.wait("done", "temp")  # never restarted
        kill(inbox.take("up", "trans_sig")[2])
        reports.wait("started", "trans_sig", 2)  # a signal is abnormal
        seen = reports.all()
        exits = {r[1]: r[3] for r in seen if r[0] == "exited"}
        assert exits == {"perm": 0, "trans_ok": 0, "trans_bad": 1, "temp": 1, "trans_sig": -9}
        got = {n: (pid is not None, restarts) for n, pid, restarts in sup.children()}
        assert got == {
            "perm": (True, 1),
            "trans_ok": (False, 0),
            "trans_bad": (True, 1),
            "trans_sig": (True, 1),
            "temp": (False, 0),
        }
        assert sup.pid("perm") == inbox.take("up", "perm")[2] != first["perm"]
        assert sup.pid("trans_ok") is None and sup.pid("temp") is None


def test_group_restarts_skip_temporary_children_but_not_ended_transient_ones(
    reports: Reports,
) -> None:
    # OTP: a group restart starts every child except temporary ones.
    inbox = Inbox()
    sup = mproc.Supervisor(strategy="one_for_all", max_restarts=5, max_seconds=WAIT)
    sup.add("trans", steps("trans", "exit0", "block"), restart="transient")
    sup.add("temp", blocker("temp"), restart="temporary")
    sup.add("perm", blocker("perm"))
    with sup:
        reports.wait("done", "trans")
        inbox.take("up", "temp")
        kill(inbox.take("up", "perm")[2])
        reports.wait("started", "perm", 2)
        later = reports.after(reports.wait("exited", "perm"))
        assert names(later, "stopped") == ["temp"]
        assert names(later, "started") == ["trans", "perm"]
        assert [(n, pid is not None) for n, pid, _ in sup.children()] == [
            ("trans", True),
            ("temp", False),
            ("perm", True),
        ]


# --- intensity ------------------------------------------------------------------------------


def test_too_many_restarts_stop_everything_and_wait_raises(reports: Reports) -> None:
    inbox = Inbox()
    sup = mproc.Supervisor(max_restarts=2, max_seconds=WAIT)
    sup.add("proc", blocker("proc"))
    sup.add("cmd", sleeper)
    sup.add("bad", steps("bad", "exit3"))
    with sup:
        others = pin([inbox.take("up", "proc")[2], sup.pid("cmd")])  # type: ignore[list-item]
        with pytest.raises(mproc.SupervisorGaveUp) as info:
            sup.wait(WAIT)
        assert settle(others, 0) == [True, True]  # stopped before wait() raised
        with pytest.raises(mproc.SupervisorGaveUp):
            sup.wait(0)  # and again, until entered anew
    err = info.value
    assert (err.name, err.exitcode) == ("bad", 3)
    assert "child 'bad' exited with 3, more than 2 restart(s) within 30 s" in str(err)
    assert sup.children() == [("proc", None, 0), ("cmd", None, 0), ("bad", None, 2)]
    seen = reports.all()
    assert [r[:2] for r in seen if r[0] in ("gave_up", "stopped")] == [
        ("gave_up", "bad"),
        ("stopped", "cmd"),
        ("stopped", "proc"),
    ]


def test_a_child_that_cannot_be_restarted_counts_as_failing(reports: Reports) -> None:
    calls = []

    def factory() -> mproc.Process:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("no more workers today")
        return mproc.Process(target=peers.step, args=(ME, "flaky", "exit1"))

    sup = mproc.Supervisor(max_restarts=3, max_seconds=WAIT)
    sup.add("flaky", factory)
    with sup, pytest.raises(mproc.SupervisorGaveUp) as info:
        sup.wait(WAIT)
    err = info.value
    assert (err.name, err.exitcode) == ("flaky", None)
    assert "could not be started (RuntimeError('no more workers today'))" in str(err)
    assert isinstance(err.__cause__, RuntimeError)
    assert len(calls) == 4  # the first start, then three failed restarts
    assert len([r for r in reports.all() if r[0] == "start_failed"]) == 3


def test_restarts_older_than_max_seconds_do_not_count(reports: Reports) -> None:
    # One restart within 0.2 s is allowed; restarts 0.3 s apart never make two.
    sup = mproc.Supervisor(max_restarts=1, max_seconds=0.2)
    sup.add("slow", steps("slow", "run0.3die1"))
    with sup:
        reports.wait("restart", "slow", 3)
        assert sup.wait(0) is False  # still running


def test_reentering_starts_afresh() -> None:
    inbox = Inbox()
    sup = mproc.Supervisor(max_restarts=0)
    sup.add("bad", steps("bad", "exit2", "block"))
    with sup, pytest.raises(mproc.SupervisorGaveUp):
        sup.wait(WAIT)
    inbox.take("up", "bad")
    with sup:
        with pytest.raises(ValueError, match="running already"):
            sup.__enter__()
        assert inbox.take("up", "bad")[2] == sup.pid("bad")
        assert sup.children()[0][2] == 0
    assert sup.wait(0) is True


# --- back-off ----------------------------------------------------------------------------------


def _gaps(inbox: Inbox, factory: steps, n: int) -> list[float]:
    """The time from each of ``n`` deaths (as the child saw it) to the factory call after."""
    gaps = []
    inbox.take("up", factory.name)  # the first incarnation
    for k in range(n):
        died = inbox.take("dying", factory.name)[3]
        inbox.take("up", factory.name)  # the next one: its factory call is recorded
        gaps.append(factory.calls[k + 1] - died)
    return gaps


def test_backoff_doubles_within_its_jitter() -> None:
    inbox = Inbox()
    crash = steps("crash", "die1")
    sup = mproc.Supervisor(max_restarts=10, max_seconds=WAIT)
    sup.add("crash", crash, backoff=(0.25, 0.6))
    with sup:
        gaps = _gaps(inbox, crash, 4)
    # Each delay is in [0.9 d, d] for d = 0.25, 0.5, then the max 0.6; ±20 % around that.
    for gap, d in zip(gaps, (0.25, 0.5, 0.6, 0.6)):
        assert 0.8 * 0.9 * d <= gap <= 1.2 * d, gaps


def test_backoff_starts_again_after_a_healthy_run() -> None:
    inbox = Inbox()
    crash = steps("crash", "die1", "die1", "run0.6die1", "die1")
    sup = mproc.Supervisor(max_restarts=10, max_seconds=0.5)
    sup.add("crash", crash, backoff=(0.25, 5.0))
    with sup:
        gaps = _gaps(inbox, crash, 4)
    # 0.25, 0.5; the third ran 0.6 s >= max_seconds: 0.25 again, then 0.5.
    for gap, d in zip(gaps, (0.25, 0.5, 0.25, 0.5)):
        assert 0.8 * 0.9 * d <= gap <= 1.2 * d, gaps


def test_without_backoff_a_restart_follows_the_exit_at_once() -> None:
    inbox = Inbox()
    crash = steps("crash", "die1", "die1", "block")
    sup = mproc.Supervisor(max_restarts=10, max_seconds=WAIT)
    sup.add("crash", crash)
    with sup:
        gaps = _gaps(inbox, crash, 2)
    assert max(gaps) < 0.5, gaps  # the benchmark measures it: a few ms


# --- adding and removing -----------------------------------------------------------------------


def test_add_to_a_running_supervisor_starts_it_at_once(reports: Reports) -> None:
    inbox = Inbox()
    with mproc.Supervisor() as sup:
        assert sup.children() == []
        pid = sup.add("late", blocker("late"))
        assert pid is not None and sup.pid("late") == pid == inbox.take("up", "late")[2]
        kill(pid)
        reports.wait("started", "late", 2)  # supervised like the others
        assert inbox.take("up", "late")[2] == sup.pid("late") != pid
        with pytest.raises(FileNotFoundError, match="/no/such/program"):
            sup.add("broken", lambda: mproc.Command("/no/such/program"))
        assert [n for n, _, _ in sup.children()] == ["late"]  # the failed spec is not kept


def test_remove_stops_the_tree_with_its_grace_and_forgets_the_spec(reports: Reports) -> None:
    def tree() -> mproc.Command:
        return mproc.Command.from_shell("sleep 1000 & echo $!; wait", stdout=subprocess.PIPE)

    def rude() -> mproc.Process:
        return mproc.Process(target=_ignore_sigterm_and_report)

    inbox = Inbox()
    sup = mproc.Supervisor()
    sup.add("keep", sleeper)
    sup.add("tree", tree)
    sup.add("rude", rude, shutdown=0.3)
    with sup:
        handle = sup.get_process(sup.pid("tree"))  # type: ignore[arg-type]
        assert isinstance(handle, mproc.Command) and handle.stdout is not None
        grandchild = int(handle.stdout.readline())
        fds = pin([handle.pid, grandchild])  # type: ignore[list-item]
        assert sup.remove("tree") == -signal.SIGTERM
        assert settle(fds, 0) == [True, True]  # its whole tree, when remove() returns
        handle.stdout.close()
        inbox.take("rude-ready")
        t0 = time.monotonic()
        assert sup.remove("rude") == -signal.SIGKILL  # no RuntimeWarning: shutdown is policy
        assert time.monotonic() - t0 >= 0.3
        assert [n for n, _, _ in sup.children()] == ["keep"]
        assert len(sup) == 1  # the removed incarnations are no longer held
        with pytest.raises(ValueError, match="no child 'tree'"):
            sup.pid("tree")
    assert names(reports.all(), "exited") == []  # nothing was a failure


def _ignore_sigterm_and_report() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    peers.report(ME, "rude-ready")
    peers.block()


def test_concurrent_add_remove_children(reports: Reports) -> None:
    errors: list[BaseException] = []
    dupes: list[str] = []
    stop = threading.Event()
    looked: list[str] = []

    def churn(t: int) -> None:
        try:
            for i in range(5):
                name = f"w{t}.{i}"
                pid = sup.add(name, sleeper, shutdown=WAIT)
                assert pid is not None and sup.pid(name) == pid
                try:
                    sup.add("shared", sleeper)
                except ValueError:
                    dupes.append(name)
                assert sup.remove(name) == -signal.SIGTERM
        except BaseException as err:
            errors.append(err)

    def look() -> None:
        while not stop.wait(0.001):  # paced: a hot loop would starve the others of the GIL
            for name, _pid, restarts in sup.children():
                assert isinstance(name, str) and restarts == 0
                looked.append(name)

    with mproc.Supervisor() as sup:
        looker = threading.Thread(target=look)
        looker.start()
        threads = [threading.Thread(target=churn, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        stop.set()
        looker.join(WAIT)
        assert not any(t.is_alive() for t in [looker, *threads])
        assert errors == []
        assert looked  # the lists were read while they changed
        assert len(dupes) == 4 * 5 - 1  # "shared" was added exactly once
        assert [n for n, _, _ in sup.children()] == ["shared"]
    assert names(reports.all(), "exited") == []


# --- lifecycle -----------------------------------------------------------------------------------


def test_the_with_block_stops_everything_in_reverse_order(reports: Reports) -> None:
    def tree() -> mproc.Command:
        return mproc.Command.from_shell("setsid sleep 1000 & echo $!; wait", stdout=subprocess.PIPE)

    inbox = Inbox()
    sup = mproc.Supervisor()
    sup.add("proc", blocker("proc"))
    sup.add("cmd", sleeper)
    sup.add("tree", tree)
    sup.add("grand", lambda: mproc.Process(target=peers.grandparent, args=(ME,)))
    with sup:
        handle = sup.get_process(sup.pid("tree"))  # type: ignore[arg-type]
        assert isinstance(handle, mproc.Command) and handle.stdout is not None
        escaped = int(handle.stdout.readline())  # left the process group
        pids = [inbox.take("up", "proc")[2], *(p for _, p, _ in sup.children()[1:])]
        fds = pin([*pids, escaped, inbox.take("grandchild")[1]])
        assert sup.wait(0) is False
    assert [exited(fd) for fd in fds] == [True] * 6
    assert settle(fds) == [True] * 6
    handle.stdout.close()
    seen = reports.all()
    assert names(seen, "stopped") == ["grand", "tree", "cmd", "proc"]
    assert sup.wait(0) is True
    assert sup.children() == [(n, None, 0) for n in ("proc", "cmd", "tree", "grand")]


def test_stop_from_another_thread_ends_wait() -> None:
    inbox = Inbox()
    with mproc.Supervisor() as sup:
        sup.add("w", blocker("w"))
        inbox.take("up", "w")
        stopper = threading.Thread(target=sup.stop)
        stopper.start()
        assert sup.wait(WAIT) is True
        stopper.join(WAIT)
        assert sup.pid("w") is None


def test_terminate_all_ends_supervision(reports: Reports) -> None:
    inbox = Inbox()
    with mproc.Supervisor() as sup:
        sup.add("w", blocker("w"))
        pid = inbox.take("up", "w")[2]
        unsupervised = sup.start(mproc.Command("sleep", ["1000"]))
        assert sup.terminate_all(WAIT) == {pid: -signal.SIGTERM, unsupervised: -signal.SIGTERM}
        assert sup.wait(0) is True
        assert sup.children() == [("w", None, 0)]
    assert names(reports.all(), "started") == ["w"]  # nothing restarted


# --- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", multiprocessing.get_all_start_methods())
def test_a_named_service_is_reached_across_restarts(method: str, runtime_dir: str) -> None:
    sup = mproc.Supervisor()
    sup.add("svc", lambda: mproc.Process(target=peers.service, start_method=method), register=True)
    with sup:
        first = mproc.call("svc", "pid", timeout=WAIT)
        assert first == sup.pid("svc")
        assert mproc.whereis("svc") == first
        with pytest.raises(mproc.CalleeDied):
            mproc.call("svc", "crash", timeout=WAIT)
        # The call waits for the next incarnation to take the name.
        second = mproc.call("svc", "pid", timeout=WAIT)
        assert second == sup.pid("svc") != first
        mproc.send("svc", "a plain message is fine too", timeout=WAIT)
        assert mproc.call("svc", "hello", timeout=WAIT) == ("echo", "hello")
    assert mproc.whereis("svc") is None  # released when it exited
    # The crashed one could not remove its socket file; the next one's mailbox
    # sweeps stale files when it opens, but a forkserver child may still be
    # an unreaped zombie (alive, to that sweep) then.
    forget_sockets(runtime_dir, [first])


# --- nesting and the supervisor's own death -------------------------------------------------------


def test_nested_supervisors(reports: Reports, runtime_dir: str) -> None:
    inbox = Inbox()
    outer = mproc.Supervisor(max_restarts=5, max_seconds=WAIT)
    outer.add("inner", lambda: mproc.Process(target=peers.inner_supervisor, args=(ME,)))
    with outer:
        _, inner, kids = inbox.take("inner")
        assert inner == outer.pid("inner")
        w1 = inbox.take("up", "w1")[2]
        assert kids["w1"] == w1
        # The inner supervisor restarts its own children.
        kill(w1)
        w1 = inbox.take("up", "w1")[2]
        # The inner one SIGTERMed alone stops its children and ends; the outer restarts it.
        fds = pin([inner, w1, kids["w2"]])
        os.kill(inner, signal.SIGTERM)
        reports.wait("started", "inner", 2)
        assert [r[3] for r in reports.all() if r[0] == "exited"] == [0]
        assert settle(fds) == [True] * 3
        _, inner, kids = inbox.take("inner")
        w1 = inbox.take("up", "w1")[2]
        # SIGKILLed: its children die with it; the outer restarts it.
        fds = pin([inner, w1, kids["w2"]])
        kill(inner)
        reports.wait("started", "inner", 3)
        assert settle(fds) == [True] * 3
        forget_sockets(runtime_dir, [inner])
        _, inner, kids = inbox.take("inner")
        fds = pin([inner, inbox.take("up", "w1")[2], kids["w2"]])
    # Leaving the outer block stops the inner supervisor's whole subtree.
    assert [exited(fd) for fd in fds] == [True] * 3
    assert settle(fds) == [True] * 3


def test_nothing_outlives_a_supervisor_killed_by_sigkill(runtime_dir: str) -> None:
    inbox = Inbox()
    holder = mproc.Process(target=peers.lone_supervisor, args=(ME,))
    holder.start()
    try:
        _, sup_pid, pids = inbox.take("lone")
        grandchild = inbox.take("grandchild")[1]
        fds = pin([*pids, grandchild])
        os.kill(sup_pid, signal.SIGKILL)
        assert holder.wait(WAIT) == -signal.SIGKILL
        assert settle(fds) == [True] * 4
    finally:
        if holder.is_alive():
            holder.kill()
            holder.wait(WAIT)
    forget_sockets(runtime_dir, [sup_pid, *pids])


def test_the_example_runs_and_leaves_nothing() -> None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, os.path.join(here, "examples", "supervisor.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "client: 40+2 = 42" in done.stdout
    assert "gave up: 'worker', last exit 3" in done.stdout, done.stdout
    assert "made the supervisor give up" in done.stderr  # its reports
