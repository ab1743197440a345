"""A receive() about to block polls first, for a bounded, adaptive while (issue 13).

What is checked here is the bound and the adaptation, not speed (that is
the round_trip benchmark's): the environment knob, the polls stopping after
a few misses, and receiving with polling switched off.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
from typing import Any

import pytest
from mailbox_peers import WAIT

import mproc
from mproc import _mailbox, _receiver

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-specific")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("", _receiver._SPIN), ("0", 0.0), ("100", 100e-6), ("2.5", 2.5e-6), ("10000", 0.01)],
)
def test_the_environment_sets_the_poll_time(monkeypatch: Any, text: str, seconds: float) -> None:
    monkeypatch.setenv(_receiver.ENV_SPIN, text)
    assert _receiver._spin_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["abc", "-1", "nan", "inf", "1e9", "10001"])
def test_a_bad_value_is_ignored_with_a_warning(monkeypatch: Any, caplog: Any, text: str) -> None:
    monkeypatch.setenv(_receiver.ENV_SPIN, text)
    with caplog.at_level(logging.WARNING, logger="mproc"):
        assert _receiver._spin_seconds() == _receiver._SPIN
    assert _receiver.ENV_SPIN in caplog.text and repr(text) in caplog.text


def _receiver_now() -> _receiver.Receiver:
    mproc.open_mailbox()
    r = _mailbox._state.receiver
    assert r is not None
    return r


def test_polling_stops_after_a_few_misses(runtime_dir: str, monkeypatch: Any) -> None:
    r = _receiver_now()
    yields = itertools.count()
    monkeypatch.setattr(_receiver, "_yield", lambda: next(yields))
    r.spin, r.spin_misses = 0.001, 0
    for _ in range(_receiver._SPIN_MISSES):
        with pytest.raises(mproc.ReceiveTimeout):
            mproc.receive("nothing", timeout=0.01)
    assert r.spin_misses == _receiver._SPIN_MISSES
    polled = next(yields)
    assert polled >= _receiver._SPIN_MISSES  # each of those receive() calls polled
    for _ in range(3):  # from now on a receive() that waits just waits
        with pytest.raises(mproc.ReceiveTimeout):
            mproc.receive("nothing", timeout=0.01)
    assert next(yields) == polled + 1
    # A message that is there at once resets nothing and costs no poll.
    mproc.send(os.getpid(), "here", "something")
    assert mproc.receive("something", timeout=WAIT).data == "here"


def test_a_poll_that_finds_a_message_keeps_polling_on(runtime_dir: str) -> None:
    r = _receiver_now()
    r.spin, r.spin_misses = 5.0, 2  # long enough for the sender thread below
    sent = threading.Event()

    def late_send() -> None:
        sent.wait(WAIT)
        mproc.send(os.getpid(), "late", "spin")

    t = threading.Thread(target=late_send)
    t.start()
    try:
        # The receive() leads and polls; the send() from another thread (its
        # write needs the GIL, given up by every sched_yield) lands meanwhile.
        sent.set()
        assert mproc.receive("spin", timeout=WAIT).data == "late"
    finally:
        t.join(WAIT)
    assert r.spin_misses == 0


def test_receiving_with_polling_switched_off(runtime_dir: str, kids: Any) -> None:
    r = _receiver_now()
    r.spin = 0.0
    child = kids.start(_send_three, runtime_dir, os.getpid())
    assert [mproc.receive("off", timeout=WAIT).data for _ in range(3)] == [0, 1, 2]
    assert kids.finish(child) == 0


def _send_three(rundir: str, parent: int) -> None:
    os.environ["MPROC_RUNTIME_DIR"] = rundir
    for i in range(3):
        mproc.send(parent, i, "off", timeout=WAIT)
