"""mproc for ``async`` code (SPEC §13): the same calls, awaited, never blocking the loop.

``send``, ``receive``, ``call``, ``wait``, ``wait_all`` and ``monitor_down`` take
the arguments of their blocking twins and return or raise the same things
(``ReceiveTimeout``, ``CallTimeout``, ``MailboxFull``, ...). As
``zmq.asyncio`` and ``redis.asyncio`` do, they run in the event loop's
thread and wait through it:

* **Reading.** While a coroutine awaits a message, the loop watches the
  mailbox's epoll descriptor with a reader callback (one per loop, whatever
  the number of awaiting coroutines); when it fires, the loop reads and
  routes what arrived without blocking, and each message wakes the one
  coroutine waiting for its group. While the loop reads, the mailbox's
  background thread naps (as while a blocking ``receive()`` reads); if the
  loop stops reading (it is busy, or blocked in a plain ``mproc.send()``),
  the background thread reads after a moment and wakes the loop's waiters,
  as a blocking ``receive()`` in another thread would.
* **Sending** writes without blocking; waiting for flow-control credit, for
  room in the socket or for a mailbox that is not open yet is an await on
  the loop (the handshake too).
* **Processes.** ``wait()``/``wait_all()``/``monitor_down()`` are woken by the
  one reaper thread that already watches every pidfd (it calls
  ``call_soon_threadsafe``); no thread per awaiting coroutine, and no
  executor.

**Cancellation never loses a message.** A message leaves its group queue
only in a step with no ``await`` in it, so a ``receive()`` cancelled while
waiting has taken nothing: a message that had arrived stays queued for the
next ``receive()``. A cancelled ``call()`` forgets its call, and its late
reply is dropped. A cancelled ``send()`` delivered the message or nothing
(a frame cut by the cancellation is dropped by the receiver).

Blocking and async receivers may share a process: each message goes to
exactly one of them.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pickle
import socket
import threading
import time
from collections.abc import Awaitable
from typing import Any, Callable, Optional, Union

from . import _calls, _check, _mailbox, _monitor, _names, _sender
from . import _runtime as rt
from . import _wire as wire
from ._errors import (
    HandshakeError,
    MailboxClosed,
    MailboxError,
    MailboxFull,
    MailboxGone,
    MailboxTimeout,
    MessageError,
    NameNotFound,
    NoSuchProcess,
    ReceiveTimeout,
)
from ._monitor import Down, Monitor
from ._queues import Group, Msg
from ._receiver import Reading, Receiver

__all__ = ["call", "monitor_down", "receive", "send", "wait", "wait_all"]

_HANDOVER = 0.5  # receive(timeout=0) waits at most this long for another reader to yield
_CREDIT_SLICE = 0.05  # a send without credit looks at its connection at least this often
_BUSY_MIN, _BUSY_MAX = 0.0002, 0.02  # back-off while another thread writes on a connection
_BACKGROUND = Reading.BACKGROUND


# ---------------------------------------------------------------- waking futures


def _wake(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Waiter:
    """What a coroutine leaves in a group's waiters: ``release()`` wakes it, from any thread."""

    __slots__ = ("fut", "reader")

    def __init__(self, fut: asyncio.Future[Any], reader: _LoopReader) -> None:
        self.fut = fut
        self.reader = reader

    def release(self) -> None:
        self.reader.wake(self.fut)


class _LoopReader:
    """One event loop reading one mailbox for the coroutines awaiting messages in it."""

    def __init__(self, receiver: Receiver, loop: asyncio.AbstractEventLoop) -> None:
        self.receiver = receiver
        self.loop = loop
        self.thread = threading.get_ident()
        self.fd = receiver.epoll.fileno()
        self.armed = False
        self.waiting = 0  # coroutines awaiting something of this mailbox
        self.futures: set[asyncio.Future[Any]] = set()  # woken if the mailbox closes
        self.handovers: set[asyncio.Future[Any]] = set()  # also when another reader yields

    def wake(self, fut: asyncio.Future[Any]) -> None:
        if threading.get_ident() == self.thread:
            _wake(fut)
        else:
            try:
                self.loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # the loop is closed: nobody awaits any more
                pass

    # The receiver calls release() (from any thread) when a reader steps down
    # or the mailbox closes: every waiting coroutine looks again.
    def release(self) -> None:
        if threading.get_ident() == self.thread:
            self._look_again()
        else:
            try:
                self.loop.call_soon_threadsafe(self._look_again)
            except RuntimeError:
                pass

    def _look_again(self) -> None:
        if self.receiver.closed:
            for fut in list(self.futures):  # every waiting coroutine raises MailboxClosed
                _wake(fut)
            return
        for fut in list(self.handovers):  # polls waiting for the reader to yield
            _wake(fut)
        if self.waiting:
            self.read(1)  # read ourselves now; what arrives wakes its own waiters

    def enter(self) -> None:
        self.waiting += 1
        if self.waiting == 1:
            self.receiver.async_readers.add(self)
            self._arm()

    def leave(self) -> None:
        self.waiting -= 1
        if not self.waiting and self.loop.is_closed():
            self._idle()  # no later: the loop will not run it
        elif not self.waiting:
            # Later, not now: a coroutine calling in a loop enters again before
            # the loop runs this, and the reader callback stays (an epoll_ctl
            # pair per call saved).
            self.loop.call_soon(self._idle)

    def _idle(self) -> None:
        if self.waiting:
            return
        self.receiver.async_readers.discard(self)
        self._disarm()
        if _readers.get((id(self.receiver), id(self.loop))) is self:
            del _readers[(id(self.receiver), id(self.loop))]

    def read(self, passes: int = 64) -> bool:
        """Read and route what arrived, or arrange to be told when whoever reads stops.

        Args:
            passes: at most this many non-blocking passes over the sockets
                (the reader callback makes one: epoll calls it again if more came).

        Returns:
            Whether this loop read (``False``: another thread does, and routes).
        """
        r = self.receiver
        if r.closed:
            self._disarm()
            return False
        if r.read_now(passes):
            self._arm()
            return True
        # Another thread reads (and routes for us); listen again when it stops.
        self._disarm()
        if self not in r.sleepers:
            r.sleepers.append(self)
        r.ask_to_lead()
        if r.leader_lock.acquire(False):  # it stopped meanwhile: read after all
            r.leader_lock.release()
            if r.read_now():
                self._arm()
                return True
        return False

    def _arm(self) -> None:
        if not self.armed and not self.receiver.closed:
            self.loop.add_reader(self.fd, self.read, 1)
            self.armed = True

    def _disarm(self) -> None:
        if self.armed:
            self.armed = False
            if self.loop.is_closed():
                return
            try:
                self.loop.remove_reader(self.fd)
            except (OSError, ValueError, RuntimeError):
                pass


_readers: dict[tuple[int, int], _LoopReader] = {}


def _reader(receiver: Receiver, loop: asyncio.AbstractEventLoop) -> _LoopReader:
    key = (id(receiver), id(loop))
    reader = _readers.get(key)
    if reader is None or reader.receiver is not receiver or reader.loop is not loop:
        for k, old in list(_readers.items()):  # readers of closed loops: forget them
            if old.loop.is_closed():
                old.receiver.async_readers.discard(old)
                _readers.pop(k, None)
        reader = _readers[key] = _LoopReader(receiver, loop)
    return reader


async def _sleep_on(
    g: Group,
    reader: _LoopReader,
    timeout: Optional[float],
    if_empty: bool = True,
    handover: bool = False,
    ready: Optional[Callable[[], bool]] = None,
) -> None:
    """Await a message in ``g`` (or a reason to look again), at most ``timeout`` seconds.

    ``if_empty``: return at once if ``g`` holds a message already (false: wait
    for the next one to arrive). ``handover``: also wake when another reader
    yields the reading to this loop.
    """
    fut: asyncio.Future[Any] = reader.loop.create_future()
    w = _Waiter(fut, reader)
    g.waiters.append(w)
    reader.futures.add(fut)
    if handover:
        reader.handovers.add(fut)
    timer = None if timeout is None else reader.loop.call_later(timeout, _wake, fut)
    try:
        # Checked after registering: what came before would wake nobody.
        if (
            (if_empty and (g.queue or g.orphans))
            or reader.receiver.closed
            or (ready is not None and ready())
        ):
            return
        await fut
    finally:
        try:
            g.waiters.remove(w)
        except ValueError:
            pass
        reader.futures.discard(fut)
        reader.handovers.discard(fut)
        if timer is not None:
            timer.cancel()


def _closed(receiver: Receiver, group: str) -> MailboxClosed:
    return MailboxClosed(
        f"the mailbox of PID {receiver.pid} was closed while receiving (group {group!r})",
        pid=receiver.pid,
        group=group,
        path=receiver.path,
    )


# ---------------------------------------------------------------- receive


async def receive(group: str = "", timeout: Optional[float] = None) -> Msg:
    """Await the next message of ``group`` (see :func:`mproc.receive`).

    Raises:
        ReceiveTimeout, MessageError, MailboxClosed: as :func:`mproc.receive`.
    """
    receiver = _mailbox._state.receiver
    if receiver is not None and timeout is None and group.__class__ is str and len(group) < 16384:
        msg = receiver.poll_get(group)  # valid arguments, a message waiting: the common case
        if msg is not None:
            return msg
        wait = None
    else:
        _check.group(group, "receive")
        wait = _check.timeout(timeout, "receive")
        receiver = _mailbox._ensure_open()
        msg = receiver.poll_get(group)
        if msg is not None:
            return msg
    loop = asyncio.get_running_loop()
    reader = _reader(receiver, loop)
    deadline = None if wait is None else loop.time() + wait
    handed_over = False
    while True:
        # A message is only ever taken here, outside the enter()/leave()
        # bracket: an interrupt in leave() cannot cost a message taken.
        read = False
        reader.enter()
        try:
            read = reader.read()
            if not (read and receiver._group(group).queue):
                if receiver.closed:
                    raise _closed(receiver, group)
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    if handed_over or receiver.reading is not _BACKGROUND:
                        raise ReceiveTimeout(
                            f"no message for group {group!r} arrived within {wait:g} s "
                            f"(PID {receiver.pid})",
                            pid=receiver.pid,
                            group=group,
                        )
                    # A poll while the background thread reads: have it yield
                    # (it does at once), then read what was sent ourselves.
                    handed_over = True
                    remaining = _HANDOVER
                await _sleep_on(receiver._group(group), reader, remaining, handover=handed_over)
        finally:
            reader.leave()
        msg = receiver.poll_get(group)
        if msg is not None:
            return msg


# ---------------------------------------------------------------- send


async def send(
    pid: Union[int, str], obj: Any, group: str = "", *, timeout: Optional[float] = None
) -> None:
    """Send ``obj`` to ``pid`` or a registered name (see :func:`mproc.send`).

    Returns when the receiving process holds the message.

    Raises:
        The exceptions of :func:`mproc.send`.
    """
    raw = _check.group(group, "send")
    wait = rt.DEFAULT_TIMEOUT if timeout is None else _check.timeout(timeout, "send")
    if isinstance(pid, str):
        deadline = time.monotonic() + wait
        try:
            payload = _mailbox._dumps(obj)
        except MessageError as err:
            raise MessageError(f"{err} (to {pid!r}, group {group!r})", group=group) from (
                err.__cause__
            )
        await _to_name(pid, raw, payload, group, deadline, wire.KIND_MSG, "send")
        return
    target = _check.pid(pid, "send")
    payload = _mailbox._dumps_for(obj, target, group)
    if target == os.getpid():
        _mailbox._ensure_open()
    try:
        await _deliver(target, raw, payload, wait)
    except MailboxError as err:
        if err.group is None:
            err.group = group
        raise


async def _to_name(
    name: str,
    raw: bytes,
    payload: bytes,
    group: str,
    deadline: float,
    kind: int,
    function: str,
) -> int:
    """Deliver to whoever holds ``name`` now, waiting for a holder up to ``deadline``."""
    while True:
        pid, identity = await _resolve(name, function, deadline)
        if pid == os.getpid():
            _mailbox._ensure_open()
        try:
            await _deliver(
                pid, raw, payload, max(deadline - time.monotonic(), 0.001), kind, identity
            )
            return pid
        except NoSuchProcess:
            if time.monotonic() >= deadline:
                raise NameNotFound(
                    f"the holder of the name {name!r} (PID {pid}) exited and nobody took "
                    "the name in time",
                    pid=pid,
                    group=group,
                ) from None
        except MailboxError as err:
            if err.group is None:
                err.group = group
            raise


async def _resolve(name: str, function: str, deadline: float) -> tuple[int, str]:
    delay = 0.0005
    while True:
        found = _names.lookup(name, _sender.trusts, func=function)
        if found is not None:
            return found
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            # resolve() with a spent deadline looks once more and says why.
            return _names.resolve(name, deadline, func=function)
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


async def _deliver(
    pid: int,
    group: bytes,
    payload: bytes,
    timeout: float,
    kind: int = wire.KIND_MSG,
    identity: Optional[str] = None,
    number: int = -1,
) -> None:
    """The awaitable :func:`mproc._sender.deliver` (and ``deliver_reply``)."""
    link = _sender._links.by_pid.get(pid)
    if (
        link is not None
        and (identity is None or link.identity == identity)
        and _sender._fast_send(link, group, payload, kind, number, nonblocking=True)
    ):
        return
    deadline = time.monotonic() + timeout
    retried = False
    while True:
        link, fresh = await _get(pid, deadline, identity)
        size = wire.HEAD.size + len(group) + len(payload)
        if size > link.max_frame:
            raise MessageError(
                f"the message to PID {pid} is {size} bytes, over the receiver's "
                f"{link.max_frame}-byte frame limit; nothing was sent",
                pid=pid,
                group=_sender._show(group),
            )
        try:
            await _send_on(link, group, payload, deadline, timeout, kind, number)
            return
        except _sender._Retry:
            if fresh or retried:
                raise MailboxGone(
                    f"the mailbox of PID {pid} went away while sending (group "
                    f"{_sender._show(group)}); the message was not delivered",
                    pid=pid,
                    group=_sender._show(group),
                    path=link.path,
                ) from None
            retried = True


# Connections being made, per (loop, PID): concurrent sends to a PID with no
# connection share one attempt instead of opening one each.
_connecting: dict[tuple[int, int, Optional[str]], asyncio.Future[_sender.Link]] = {}
_waiters: dict[asyncio.Future[_sender.Link], int] = {}  # sends awaiting each attempt


def _connected(key: tuple[int, int, Optional[str]], done: asyncio.Future[_sender.Link]) -> None:
    if _connecting.get(key) is done:
        del _connecting[key]
    if not done.cancelled() and done.exception() is None:
        # Installed here too: should every waiter have been cancelled, the new
        # connection is still kept (and closed) like any other, never leaked.
        _sender.install(key[1], done.result())


async def _get(pid: int, deadline: float, identity: Optional[str]) -> tuple[_sender.Link, bool]:
    link = _sender._links.by_pid.get(pid)
    if link is not None and not link.dead and (identity is None or link.identity == identity):
        return link, False
    key = (id(asyncio.get_running_loop()), pid, identity)
    attempt = _connecting.get(key)
    if attempt is None or attempt.done():
        attempt = asyncio.ensure_future(_connect(pid, deadline, identity))
        _connecting[key] = attempt
        attempt.add_done_callback(functools.partial(_connected, key))
    _waiters[attempt] = _waiters.get(attempt, 0) + 1
    try:
        # Shielded: one waiter cancelled does not cancel the others' connection...
        new = await asyncio.shield(attempt)
    except asyncio.CancelledError:
        # ...but the last one does (it closes its socket): nothing is left pending.
        if not attempt.done() and _waiters.get(attempt, 0) <= 1:
            if _connecting.get(key) is attempt:
                del _connecting[key]  # no later send joins an attempt being cancelled
            attempt.cancel()
        raise
    finally:
        left = _waiters.get(attempt, 1) - 1
        if left > 0:
            _waiters[attempt] = left
        else:
            _waiters.pop(attempt, None)
    return _sender.install(pid, new)


async def _connect(pid: int, deadline: float, expect: Optional[str]) -> _sender.Link:
    loop = asyncio.get_running_loop()
    runtime = rt.runtime()
    delay = 0.0005
    while True:
        path = _sender.mailbox_path(runtime, pid, expect)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        except OSError as err:
            sock.close()
            raise _sender.connect_failed(pid, path, err) from err
        except BaseException:
            sock.close()
            raise
        else:
            try:
                return await _handshake(sock, runtime, pid, path, deadline)
            except BaseException:
                sock.close()
                raise
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _sender.not_open(pid, path)
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


async def _handshake(
    sock: socket.socket, runtime: rt.Runtime, pid: int, path: str, deadline: float
) -> _sender.Link:
    """The handshake of :func:`mproc._sender._handshake`, awaited."""
    loop = asyncio.get_running_loop()
    _sender.check_peer(sock, pid, path)
    budget = min(max(deadline - time.monotonic(), rt.HANDSHAKE_MIN), rt.HANDSHAKE_TIMEOUT)
    until = time.monotonic() + budget
    errors = _sender._Blocking(sock, until, pid, path, budget)  # its messages

    async def within(what: str, step: Awaitable[Any]) -> Any:
        try:
            return await asyncio.wait_for(step, max(until - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            raise errors._timeout(what) from None
        except OSError as err:
            raise errors._refused(err) from err

    async def exactly(n: int, what: str) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await within(what, loop.sock_recv(sock, n - len(data)))
            if not chunk:
                raise errors._refused(None)
            data += chunk
        return data

    steps = _sender.handshake_steps(runtime.key, pid, path, False)
    step = next(steps)
    try:
        while True:
            if step[0] == "send":
                await within("room to write", loop.sock_sendall(sock, wire.frame(step[1])))
                step = next(steps)
            else:
                (size,) = wire.LEN.unpack(await exactly(wire.LEN.size, step[1]))
                if not 0 < size <= wire.MAX_HANDSHAKE_FRAME:
                    raise HandshakeError(
                        f"the mailbox of PID {pid} at {path} sent a {size}-byte handshake "
                        "frame: it is not an mproc mailbox of this version",
                        pid=pid,
                        path=path,
                    )
                step = steps.send(await exactly(size, step[1]))
    except StopIteration as done:
        max_frame, window, epoch = done.value
    sock.setblocking(True)  # the link's other users write with SO_SNDTIMEO
    return _sender.new_link(sock, pid, path, max_frame, window, epoch)


async def _send_on(
    link: _sender.Link,
    group: bytes,
    payload: bytes,
    deadline: float,
    timeout: float,
    kind: int,
    number: int,
) -> None:
    busy = _BUSY_MIN
    while True:
        remaining = deadline - time.monotonic()
        # A connection carries one frame at a time: another coroutine of this
        # loop (whose thread already "holds" the RLock) or another thread
        # writing on it means waiting, on the loop.
        if link.lock._is_owned() or not link.lock.acquire(False):  # type: ignore[attr-defined]
            if remaining <= 0:
                raise MailboxTimeout(
                    f"the connection to PID {link.pid} stayed busy for {timeout:g} s (the "
                    "receiver is not reading); the message was not delivered",
                    pid=link.pid,
                    group=_sender._show(group),
                )
            await asyncio.sleep(min(busy, remaining))
            busy = min(busy * 2, _BUSY_MAX)
            continue
        try:
            if link.dead or link.dirty:
                _sender._retire(link)
                raise _sender._Retry
            if kind == wire.KIND_REPLY:
                seq = number
            else:
                seq = link.seqs.get(group, 0)
                if seq >= link.limits.get(group, link.window):
                    _sender._read_credits(link)
            if kind == wire.KIND_REPLY or seq < link.limits.get(group, link.window):
                await _write_frame(link, group, seq, payload, deadline, timeout, kind)
                return
        finally:
            link.lock.release()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MailboxFull(
                f"the mailbox of PID {link.pid} stayed full for {timeout:g} s (group "
                f"{_sender._show(group)!r}): its receiver is not keeping up; the message was "
                "not delivered",
                pid=link.pid,
                group=_sender._show(group),
            )
        await _readable(link.fd, min(remaining, _CREDIT_SLICE))


async def _write_frame(
    link: _sender.Link,
    group: bytes,
    seq: int,
    payload: bytes,
    deadline: float,
    timeout: float,
    kind: int,
) -> None:
    """Write one frame without blocking the loop (link lock held); dirty until complete."""
    prefix = wire.msg_prefix(group, seq, len(payload), kind)
    link.dirty = True
    try:
        for part in (memoryview(prefix), memoryview(payload)):
            while part:
                try:
                    part = part[link.sock.send(part, socket.MSG_DONTWAIT) :]
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not await _writable(link.fd, remaining):
                        _sender._retire(link)
                        raise MailboxTimeout(
                            f"the mailbox of PID {link.pid} did not read for {timeout:g} s "
                            "(is it stopped?); the message was not delivered",
                            pid=link.pid,
                            group=_sender._show(group),
                        ) from None
    except OSError as err:
        _sender._retire(link)
        raise _sender._Retry from err
    if kind != wire.KIND_REPLY:
        link.seqs[group] = seq + 1
    link.dirty = False
    link.close_if_retired()


# Coroutines of one loop waiting for one descriptor share one reader callback.
_fd_waits: dict[tuple[int, int, bool], list[asyncio.Future[Any]]] = {}


async def _fd_ready(fd: int, timeout: float, write: bool) -> bool:
    loop = asyncio.get_running_loop()
    key = (id(loop), fd, write)
    fut: asyncio.Future[Any] = loop.create_future()
    waiting = _fd_waits.get(key)
    if waiting is None:
        waiting = _fd_waits[key] = []
        # The loop watches a duplicate of its own: another thread may close the
        # link's socket meanwhile, and its number go to a new socket.
        mine = os.dup(fd)
        _fd_dups[key] = mine

        def ready() -> None:
            for f in _fd_waits.pop(key, ()):
                if not f.done():
                    f.set_result(True)
            _unwatch(loop, key, write)

        (loop.add_writer if write else loop.add_reader)(mine, ready)
    waiting.append(fut)
    timer = loop.call_later(timeout, _wake, fut)
    try:
        await fut
    finally:
        timer.cancel()
        left = _fd_waits.get(key)
        if left is not None:
            try:
                left.remove(fut)
            except ValueError:
                pass
            if not left:
                del _fd_waits[key]
                _unwatch(loop, key, write)
    return fut.result() is True  # not the timer's None


_fd_dups: dict[tuple[int, int, bool], int] = {}


def _unwatch(loop: asyncio.AbstractEventLoop, key: tuple[int, int, bool], write: bool) -> None:
    mine = _fd_dups.pop(key, None)
    if mine is None:
        return
    if not loop.is_closed():
        (loop.remove_writer if write else loop.remove_reader)(mine)
    os.close(mine)


async def _readable(fd: int, timeout: float) -> bool:
    return await _fd_ready(fd, timeout, False)


async def _writable(fd: int, timeout: float) -> bool:
    return await _fd_ready(fd, timeout, True)


# ---------------------------------------------------------------- call


async def call(
    target: Union[int, str], request: Any, group: str = "", *, timeout: Optional[float] = None
) -> Any:
    """Send a request and await its reply (see :func:`mproc.call`).

    Cancelling it forgets the call: its reply, if one comes, is dropped.

    Raises:
        CallTimeout, CalleeDied, RemoteError, and the exceptions of :func:`mproc.call`.
    """
    raw = _check.group(group, "call")
    wait = _check.timeout(timeout, "call")
    loop = asyncio.get_running_loop()
    receiver = _mailbox._ensure_open()  # the reply comes to our mailbox
    deadline = None if wait is None else time.monotonic() + wait
    send_by = time.monotonic() + rt.DEFAULT_TIMEOUT if deadline is None else deadline
    if isinstance(target, str):
        pid, identity = await _resolve(target, "call", send_by)
    else:
        pid, identity = _check.pid(target, "call"), None
    payload = _mailbox._dumps_for(request, pid, group)
    call_id = next(_calls._ids)
    reader = _reader(receiver, loop)
    cancels: list[Callable[[], None]] = []  # of the callee's exit watch
    reader.enter()
    try:
        g = receiver.new_call(call_id)
        body = wire.CALL_HEAD.pack(call_id, receiver.epoch) + payload
        if isinstance(target, str):
            pid = await _to_name(target, raw, body, group, send_by, wire.KIND_CALL, "call")
            identity = _sender.identity_of(pid)
        else:
            left = send_by - time.monotonic()
            if left <= 0:
                raise _calls._timeout(pid, group, wait)
            try:
                await _deliver(pid, raw, body, left, wire.KIND_CALL)
            except MailboxError as err:
                if err.group is None:
                    err.group = group
                raise
        _monitor.on_exit(
            pid,
            identity or _sender.identity_of(pid),
            functools.partial(receiver.callee_died, g, pid),
            cancels,
        )
        died_at: Optional[float] = None
        looked = False  # right after sending, the reply cannot be there yet
        while True:
            entry = receiver.poll_entry(g)
            if entry is None and looked and reader.read():
                entry = receiver.poll_entry(g)
            looked = True
            if entry is not None:
                if entry[5] == wire.KIND_REPLY:
                    return _calls._outcome(entry[1], pid, group)
                if died_at is None:
                    died_at = time.monotonic()  # read what its connections still hold
                continue
            if receiver.closed:
                raise _closed(receiver, group)
            now = time.monotonic()
            if died_at is not None and (
                not receiver.connections_from(pid) or now > died_at + _calls._DRAIN
            ):
                if not g.queue:
                    raise _calls._died(pid, group)
                continue
            remaining = None if deadline is None else deadline - now
            if remaining is not None and remaining <= 0:
                raise _calls._timeout(pid, group, wait)
            if died_at is not None:
                step = _calls._DRAIN_STEP
                remaining = step if remaining is None else min(remaining, step)
            await _sleep_on(g, reader, remaining)
    finally:
        receiver.calls.pop(call_id, None)
        for cancel in cancels:
            try:
                cancel()
            except BaseException:
                # Interrupted on its way in: unregister by one C call, then go on raising.
                cancel.args[0].waiters.pop(cancel.args[1], None)  # type: ignore[attr-defined]
                raise
        reader.leave()


# ---------------------------------------------------------------- processes


def _timer_future(
    loop: asyncio.AbstractEventLoop, timeout: Optional[float]
) -> tuple[asyncio.Future[Any], Optional[asyncio.TimerHandle]]:
    fut: asyncio.Future[Any] = loop.create_future()
    timer = None if timeout is None else loop.call_later(timeout, _wake, fut)
    return fut, timer


def _threadsafe_waker(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any]
) -> Callable[[], None]:
    def wake() -> None:
        try:
            loop.call_soon_threadsafe(_wake, fut)
        except RuntimeError:  # the loop closed
            pass

    return wake


async def wait(handle: Any, timeout: Optional[float] = None) -> Optional[int]:
    """Await the exit of a process handle; return what ``handle.wait()`` returns.

    Args:
        handle: a :class:`mproc.Process`, :class:`mproc.Command`,
            :class:`mproc.AdoptedProcess` (or any ProcessHandle).
        timeout: seconds at most; ``None`` waits for ever.

    Returns:
        The exit code (``None``: still running at the timeout, or not ours to know).

    Raises:
        ValueError: the handle was never started.
    """
    wait_for = _check.timeout(timeout, "wait")
    pid = getattr(handle, "pid", None)
    if pid is None:
        raise ValueError("wait(): the process has not been started")
    loop = asyncio.get_running_loop()
    fut, timer = _timer_future(loop, wait_for)
    watch = _watch_of(handle)
    if watch is not None:
        cancel = watch.on_done(_threadsafe_waker(loop, fut))
    else:
        cancel = _monitor.on_exit(pid, None, _threadsafe_waker(loop, fut))
    try:
        await fut
    finally:
        cancel()
        if timer is not None:
            timer.cancel()
    code: Optional[int] = handle.wait(0)
    return code


def _watch_of(handle: Any) -> Any:
    get = getattr(handle, "_monitor_watch", None)
    watch = get() if callable(get) else None
    return watch if watch is not None else getattr(handle, "_watch", None)


async def wait_all(manager: Any, timeout: Optional[float] = None) -> dict[int, Optional[int]]:
    """Await every process of a :class:`mproc.ProcessManager` (see its ``wait_all()``).

    Returns:
        ``{pid: exit code}`` (``None`` for one still running at the deadline,
        or an adopted one).
    """
    wait_for = _check.timeout(timeout, "wait_all")
    held = manager._held()
    codes = await asyncio.gather(*(wait(h, wait_for) for _pid, h in held))
    return {pid: code for (pid, _h), code in zip(held, codes)}


async def monitor_down(ref: Monitor, timeout: Optional[float] = None) -> Down:
    """Await the :class:`mproc.Down` of a monitor and take it out of its group.

    The Down is the one ``receive(group)`` would have returned for ``ref``;
    other messages of the group stay queued. If a ``receive()`` took it
    already, it is returned all the same.

    Raises:
        ValueError: ``ref`` is not an active monitor of this process (never
            made here, or demonitored).
        ReceiveTimeout: no Down within ``timeout``.
    """
    if not isinstance(ref, Monitor):
        raise TypeError(f"monitor_down() takes a Monitor, not {type(ref).__name__}")
    wait_for = _check.timeout(timeout, "monitor_down")
    loop = asyncio.get_running_loop()
    deadline = None if wait_for is None else loop.time() + wait_for
    st = _monitor._state
    while True:
        with st.deliver:  # handed out once: the record goes with it
            item = st.delivered.pop(ref, None)
        if item is not None:
            receiver, group, entry = item
            receiver.withdraw(group, entry)
            down: Down = pickle.loads(entry[1])
            return down
        rec = st.monitors.get(ref)
        if rec is None:
            with st.deliver:  # held while a Down is on its way from monitors to delivered
                delivered = ref in st.delivered
            if delivered:
                continue
            raise ValueError(f"monitor_down(): {ref} is not an active monitor of this process")
        if rec.receiver.closed:
            raise _closed(rec.receiver, rec.group)
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            raise ReceiveTimeout(
                f"no Down for {ref} within {wait_for:g} s", pid=ref.pid, group=rec.group
            )
        reader = _reader(rec.receiver, loop)
        reader.enter()
        try:
            # Woken by every message of the group (a Down too): look again.
            await _sleep_on(
                rec.receiver._group(rec.group),
                reader,
                remaining,
                if_empty=False,
                ready=lambda: ref in st.delivered,  # came as we registered
            )
        finally:
            reader.leave()
