"""mproc.stats() and the STATS control frame (SPEC §14, issue 12): a mailbox describes itself.

The query is answered by the receiving mailbox's own reader, on a control
connection of the querier's, never by application code.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
from typing import Any

import call_peers as peers
import pytest
from mailbox_peers import Kids

import mproc
from mproc import _sender
from mproc import _wire as wire

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-specific checks"),
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),
]

WAIT = peers.WAIT


def idle(name: str) -> None:
    """Register ``name`` and receive nothing until told to stop (group "stop")."""
    mproc.register(name)
    mproc.receive("stop", timeout=WAIT)


def test_stats_of_this_process() -> None:
    before = mproc.stats()
    assert before["pid"] == os.getpid()
    mproc.open_mailbox()
    me = os.getpid()
    for i in range(3):
        mproc.send(me, i, "a", timeout=WAIT)
    mproc.send(me, "x", "b", timeout=WAIT)
    mproc.register("me-myself")
    s = mproc.stats()
    assert s["open"] is True and s["pid"] == me
    assert s["groups"] == {"a": 3, "b": 1}
    assert s["names"] == ["me-myself"]
    assert s["senders"] == [me]
    assert s["received"] == 4
    assert s["path"].endswith(".sock") and s["cmdline"]
    assert abs(s["start_time"] - mproc.start_time()) < 2
    mproc.receive("a", timeout=WAIT)
    assert mproc.stats()["groups"] == {"a": 2, "b": 1}
    mproc.close_mailbox()
    closed = mproc.stats()
    assert closed["open"] is False and closed["groups"] == {} and closed["names"] == []


def test_a_query_sees_exact_depths_and_is_answered_by_the_reader(kids: Kids) -> None:
    p = kids.start(idle, "quiet")
    for i in range(5):
        mproc.send("quiet", i, "jobs", timeout=WAIT)
    for i in range(2):
        mproc.send(p.pid, i, "logs", timeout=WAIT)
    # Sent and held by its mailbox: the answer counts every one, although
    # the child's code never receives them (its reader answers).
    s = _sender.query_stats(p.pid, WAIT)
    assert s["pid"] == p.pid
    assert s["groups"] == {"jobs": 5, "logs": 2}
    assert s["names"] == ["quiet"]
    assert s["senders"] == [os.getpid()]
    assert s["received"] == 7
    mproc.send(p.pid, None, "stop", timeout=WAIT)
    assert kids.finish(p) == 0


def test_a_query_does_not_disturb_order_or_the_senders_link(kids: Kids) -> None:
    p = kids.start(peers.serve)
    assert mproc.call(p.pid, ("double", 1), "rpc", timeout=WAIT) == 2
    link = _sender._links.by_pid[p.pid]
    for _ in range(20):
        assert _sender.query_stats(p.pid, WAIT)["pid"] == p.pid
    assert _sender._links.by_pid[p.pid] is link  # the query used a connection of its own
    assert [mproc.call(p.pid, ("echo", i), "rpc", timeout=WAIT) for i in range(5)] == list(range(5))
    with pytest.raises(mproc.StopServing):
        mproc.call(p.pid, ("stop", None), "rpc", timeout=WAIT)
    assert kids.finish(p) == 0


def test_queries_from_many_threads_at_once() -> None:
    mproc.open_mailbox()
    me = os.getpid()
    mproc.send(me, 1, "g", timeout=WAIT)
    got: list[Any] = []

    def ask() -> None:
        got.append(_sender.query_stats(me, WAIT)["groups"])

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert got == [{"g": 1}] * 8


def test_a_message_on_a_control_connection_drops_only_that_connection() -> None:
    mproc.open_mailbox()
    me = os.getpid()
    link = _sender._connect(me, time.monotonic() + WAIT, control=True)
    try:
        payload = pickle.dumps("sneaky")
        link.sock.sendall(wire.msg_prefix(b"", 0, len(payload)) + payload)
        link.sock.settimeout(WAIT)
        assert link.sock.recv(1 << 16) == b""  # dropped: the reader closed it
    finally:
        link.close()
    mproc.send(me, "still works", timeout=WAIT)
    assert mproc.receive(timeout=WAIT).data == "still works"
    with pytest.raises(mproc.ReceiveTimeout):
        mproc.receive(timeout=0)  # the sneaky one never arrived


def test_query_of_a_pid_without_a_mailbox(spawner: Any) -> None:
    p = spawner.popen(["sleep", "30"])
    with pytest.raises(mproc.MailboxNotFound):
        _sender.query_stats(p.pid, 0.1)
    p.kill()
    p.wait(WAIT)
    with pytest.raises(mproc.NoSuchProcess):
        _sender.query_stats(p.pid, 0.1)
