"""mproc.asyncio (SPEC §13): the blocking API's twins, awaited on the loop.

Every test runs on the default event loop and, when it is installed, on
uvloop. Children run ``async_peers``; every wait is bounded, nothing
synchronises with sleeps (the ticker tests measure that the loop runs).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import threading
from collections.abc import Coroutine
from typing import Any, Callable, TypeVar

import async_peers as peers
import psutil
import pytest
from mailbox_peers import Kids

import mproc
import mproc.asyncio as ma
from mproc import _mailbox
from mproc import _runtime as rt

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-specific checks"),
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),
]

WAIT = peers.WAIT
T = TypeVar("T")

try:
    import uvloop
except ImportError:  # pragma: no cover - the test extra installs it
    uvloop = None

LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])


@pytest.fixture(params=LOOPS)
def run(request: Any) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run a coroutine to completion on a fresh loop of the parameter's kind."""

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        new_loop = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
        loop = new_loop()
        try:
            return loop.run_until_complete(asyncio.wait_for(coro, 60))
        finally:
            loop.close()

    return runner


def remove_stale() -> None:
    rt.remove_stale(rt.runtime())


def threads() -> int:
    return psutil.Process().num_threads()


# ---------------------------------------------------------------- send, receive


def test_round_trip_to_self(run: Any) -> None:
    async def main() -> Any:
        me = os.getpid()
        await ma.send(me, {"a": 1}, "g", timeout=WAIT)
        msg = await ma.receive("g", timeout=WAIT)
        return msg

    msg = run(main())
    assert (msg.sender_pid, msg.receiver_pid, msg.group, msg.data) == (
        os.getpid(),
        os.getpid(),
        "g",
        {"a": 1},
    )


def test_receive_from_a_child_in_order(run: Any, kids: Kids) -> None:
    async def main() -> list[Any]:
        mproc.open_mailbox()
        p = kids.start(peers.send_numbers, os.getpid(), 500, "n")
        got = [(await ma.receive("n", timeout=WAIT)).data for _ in range(500)]
        assert await ma.wait(mproc.AdoptedProcess(p.pid), WAIT) is None
        return got

    assert run(main()) == list(range(500))


def test_receive_timeout_and_the_loop_keeps_ticking(run: Any) -> None:
    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.ensure_future(ticker())
        try:
            with pytest.raises(mproc.ReceiveTimeout) as info:
                await ma.receive("nothing", timeout=0.2)
            assert isinstance(info.value, TimeoutError) and info.value.group == "nothing"
        finally:
            task.cancel()
        return ticks

    assert run(main()) >= 10  # a blocked loop would tick once


def test_receive_timeout_zero_sees_what_was_sent(run: Any) -> None:
    async def main() -> Any:
        me = os.getpid()
        mproc.send(me, "there", "z", timeout=WAIT)
        return (await ma.receive("z", timeout=0)).data

    assert run(main()) == "there"


def test_bad_arguments_raise_as_the_blocking_api(run: Any) -> None:
    async def main() -> None:
        with pytest.raises(TypeError):
            await ma.receive(3)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await ma.receive("", timeout=-1)
        with pytest.raises(ValueError):
            await ma.send(0, "x")
        with pytest.raises(TypeError):
            await ma.send(True, "x")  # type: ignore[arg-type]
        with pytest.raises(mproc.MessageError):
            await ma.send(os.getpid(), threading.Lock())
        with pytest.raises(mproc.NameNotFound):
            await ma.send("nobody-holds-this", 1, timeout=0.05)

    run(main())


def test_send_waits_for_credit_on_the_loop_then_mailbox_full(run: Any) -> None:
    async def main() -> int:
        mproc.open_mailbox(max_queue=2)
        me = os.getpid()
        sent = 0
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.ensure_future(ticker())
        try:
            with pytest.raises(mproc.MailboxFull):
                while True:
                    await ma.send(me, sent, "full", timeout=0.2)
                    sent += 1
        finally:
            task.cancel()
        assert ticks >= 10  # the wait for credit did not block the loop
        got = [(await ma.receive("full", timeout=WAIT)).data for _ in range(sent)]
        assert got == list(range(sent))
        return sent

    assert 2 <= run(main()) <= 4  # at most max_queue + one window


def test_send_waits_for_a_mailbox_that_opens_later(run: Any, kids: Kids) -> None:
    async def main() -> Any:
        mproc.open_mailbox()
        r, w = os.pipe()
        try:
            # The child opens its mailbox only when told: the send waits (on the loop).
            p = kids.start(_open_late, r, os.getpid())
            sending = asyncio.ensure_future(ma.send(p.pid, "hi", timeout=WAIT))
            await asyncio.sleep(0.05)
            assert not sending.done()
            os.write(w, b"g")
            await sending
            return (await ma.receive("echo", timeout=WAIT)).data, p
        finally:
            os.close(r)
            os.close(w)

    data, p = run(main())
    assert data == "hi"
    assert kids.finish(p) == 0


def _open_late(fd: int, parent: int) -> None:
    os.read(fd, 1)
    msg = mproc.receive(timeout=WAIT)
    mproc.send(parent, msg.data, "echo", timeout=WAIT)


# ---------------------------------------------------------------- cancellation


def test_a_cancelled_receive_leaves_the_message_for_the_next(run: Any) -> None:
    async def main() -> Any:
        me = os.getpid()
        task = asyncio.ensure_future(ma.receive("c", timeout=WAIT))
        await asyncio.sleep(0)  # it is waiting now
        mproc.send(me, "kept", "c", timeout=WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return (await ma.receive("c", timeout=WAIT)).data

    assert run(main()) == "kept"


def test_cancellation_races_never_lose_or_duplicate_a_message(run: Any, kids: Kids) -> None:
    n = 2000
    rng = random.Random(7)

    async def main() -> list[Any]:
        mproc.open_mailbox()
        p = kids.start(peers.send_numbers, os.getpid(), n, "race")
        got: list[Any] = []
        cancelled = 0
        while len(got) < n:
            task = asyncio.ensure_future(ma.receive("race", timeout=WAIT))
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
            if rng.random() < 0.5 and task.cancel():
                try:
                    got.append((await task).data)  # it may have finished meanwhile
                except asyncio.CancelledError:
                    cancelled += 1
            else:
                got.append((await task).data)
        assert cancelled > 100, cancelled
        assert kids.finish(p) == 0
        return got

    assert run(main()) == list(range(n))
    with pytest.raises(mproc.ReceiveTimeout):
        mproc.receive("race", timeout=0)


def test_a_thousand_concurrent_receives_on_distinct_groups(run: Any) -> None:
    async def main() -> tuple[list[Any], int, int]:
        mproc.open_mailbox()
        before = threads()
        tasks = [asyncio.ensure_future(ma.receive(f"g{i}", timeout=WAIT)) for i in range(1000)]
        await asyncio.sleep(0.01)
        during = threads()
        me = os.getpid()
        for i in reversed(range(1000)):
            mproc.send(me, i, f"g{i}", timeout=WAIT)
        msgs = await asyncio.gather(*tasks)
        return [m.data for m in msgs], before, during

    data, before, during = run(main())
    assert data == list(range(1000))
    assert during == before  # no thread per awaiting coroutine


def test_blocking_and_async_receivers_share_a_group(run: Any, kids: Kids) -> None:
    n = 3000
    blocking: list[Any] = []

    def block() -> None:
        try:
            while True:
                blocking.append(mproc.receive("mix", timeout=0.5).data)
        except mproc.ReceiveTimeout:
            pass

    async def main() -> list[Any]:
        mproc.open_mailbox()
        t = threading.Thread(target=block)
        t.start()
        p = kids.start(peers.send_numbers, os.getpid(), n, "mix")
        mine: list[Any] = []
        try:
            while True:
                mine.append((await ma.receive("mix", timeout=0.5)).data)
        except mproc.ReceiveTimeout:
            pass
        t.join(WAIT)
        assert kids.finish(p) == 0
        return mine

    mine = run(main())
    assert sorted(mine + blocking) == list(range(n))  # each message to exactly one
    assert mine == sorted(mine) and blocking == sorted(blocking)


# ---------------------------------------------------------------- call


def test_call_and_its_errors(run: Any, kids: Kids) -> None:
    async def main() -> Any:
        p = kids.start(peers.serve_double)
        assert await ma.call(p.pid, 21, "rpc", timeout=WAIT) == 42
        with pytest.raises(KeyError) as info:
            await ma.call(p.pid, "raise", "rpc", timeout=WAIT)
        assert "remote" in str(info.value.__cause__)
        with pytest.raises(mproc.CallTimeout):
            await ma.call(p.pid, 1, "nobody", timeout=0.05)
        results = await asyncio.gather(*(ma.call(p.pid, i, "rpc", timeout=WAIT) for i in range(50)))
        assert results == [2 * i for i in range(50)]
        with pytest.raises(mproc.CalleeDied):
            await ma.call(p.pid, "die", "rpc")
        return p

    p = run(main())
    assert kids.finish(p) == 5
    remove_stale()


def test_a_cancelled_call_drops_its_late_reply(run: Any, kids: Kids) -> None:
    async def main() -> Any:
        p = kids.start(peers.serve_double)
        task = asyncio.ensure_future(ma.call(p.pid, "hold", "rpc"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        mproc.send(p.pid, "now", "go", timeout=WAIT)  # the late reply goes out
        assert await ma.call(p.pid, 4, "rpc", timeout=WAIT) == 8  # after it, in order
        receiver = _mailbox._state.receiver
        assert receiver is not None and receiver.calls == {} and receiver.depths() == {}
        with pytest.raises(mproc.StopServing):
            await ma.call(p.pid, "stop", "rpc", timeout=WAIT)
        return p

    p = run(main())
    assert kids.finish(p) == 0


def test_call_by_name(run: Any, kids: Kids) -> None:
    async def main() -> Any:
        p = kids.start(peers.register_and_serve, "adoubler")
        assert await ma.call("adoubler", 5, "rpc", timeout=WAIT) == 10
        await ma.send("adoubler", "stop", "rpc", timeout=WAIT)
        return p

    p = run(main())
    assert kids.finish(p) == 0


def test_pending_calls_add_no_threads(run: Any, kids: Kids) -> None:
    async def main() -> Any:
        p = kids.start(peers.serve_double)
        assert await ma.call(p.pid, 1, "rpc", timeout=WAIT) == 2
        before = threads()
        tasks = [
            asyncio.ensure_future(ma.call(p.pid, i, "nobody", timeout=0.3)) for i in range(300)
        ]
        await asyncio.sleep(0.05)
        assert threads() == before
        for t in tasks:
            with pytest.raises(mproc.CallTimeout):
                await t
        with pytest.raises(mproc.StopServing):
            await ma.call(p.pid, "stop", "rpc", timeout=WAIT)
        return p

    p = run(main())
    assert kids.finish(p) == 0


# ---------------------------------------------------------------- processes


def test_wait_and_wait_all(run: Any) -> None:
    async def main() -> Any:
        with mproc.ProcessManager() as manager:
            a = mproc.Process(target=peers.exit_with, args=(3,))
            b = mproc.Command("sh", ["-c", "exit 4"])
            manager.start(a)
            manager.start(b)
            assert await ma.wait(a, WAIT) == 3
            codes = await ma.wait_all(manager, WAIT)
            assert sorted(codes.values()) == [3, 4]
            slow = mproc.Command("sleep", ["30"])
            manager.start(slow)
            assert await ma.wait(slow, 0.05) is None  # timeout: still running
            slow.kill()
            assert await ma.wait(slow, WAIT) == -9
        with pytest.raises(ValueError):
            await ma.wait(mproc.Command("true"))

    run(main())


def test_monitor_down(run: Any, spawner: Any) -> None:
    async def main() -> Any:
        p = spawner.popen(["sleep", "30"])
        ref = mproc.monitor(p.pid, "downs")
        mproc.send(os.getpid(), "other", "downs", timeout=WAIT)
        waiting = asyncio.ensure_future(ma.monitor_down(ref, timeout=WAIT))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        p.kill()
        down = await waiting
        assert down.ref == ref and down.pid == p.pid and down.reason == "signal"
        # The Down was taken out of its group; the other message stays.
        assert (await ma.receive("downs", timeout=WAIT)).data == "other"
        with pytest.raises(mproc.ReceiveTimeout):
            await ma.receive("downs", timeout=0)
        ref2 = mproc.monitor(os.getpid(), "x")
        with pytest.raises(mproc.ReceiveTimeout):
            await ma.monitor_down(ref2, timeout=0.05)
        mproc.demonitor(ref2)
        with pytest.raises(ValueError):
            await ma.monitor_down(ref2)

    run(main())
    spawner.close()
