"""Out-of-band buffers in a sealed memfd (:mod:`mproc._bulk`): delivery, fallback, hostile peers.

1. round trips (bytes, bytearray, numpy, mixed, cloudpickle) and order with small messages;
2. the in-band fallback when no memfd can be made;
3. hostile peers on an fd-carrying connection: each drops that connection only,
   leaks no descriptor, and the mailbox keeps serving;
4. signal storms while sending and receiving bulk messages;
5. close_mailbox() with bulk messages queued unmaps them.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import gc
import multiprocessing
import os
import pickle
import socket
import time
from multiprocessing import connection as mpc
from typing import Any, Optional

import fault_peers as fp
import numpy
import pytest
from fault_peers import WAIT, expect
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailbox_peers import RawSender, authed, raw_connect, read_frame

import mproc
from mproc import _bulk, _mailbox, _sender
from mproc import _runtime as rt
from mproc import _wire as wire

BIG = _bulk.THRESHOLD
SEALED = _bulk.SEALS


def _pattern(size: int, seed: int = 0) -> bytes:
    return bytes((seed + i) % 251 for i in range(251)) * (size // 251) + b"z" * (size % 251)


def _memfds() -> int:
    """This process's open descriptors that are memfds."""
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:")
        except OSError:
            pass
    return n


def _mapped_memfds() -> int:
    with open("/proc/self/maps") as f:
        return sum("/memfd:mproc" in line for line in f)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _start(kids: Any, target: Any, *args: Any) -> tuple[Any, Any]:
    """Fork a child running ``target(*args, conn)``; return (process, our end)."""
    ours, theirs = multiprocessing.get_context("fork").Pipe()
    return kids.start(target, *args, theirs), ours


def _finish(kids: Any, proc: Any) -> None:
    code = kids.finish(proc)
    assert code == 0, f"child PID {proc.pid} exited with {code}"


def _self_round_trip(obj: Any) -> Any:
    mproc.send(os.getpid(), obj, timeout=WAIT)
    return mproc.receive(timeout=WAIT).data


# ================================================================ 1. round trips


def test_big_bytes_and_bytearray_round_trip_through_a_memfd(runtime_dir: str) -> None:
    mproc.open_mailbox()
    data = _pattern(3 * BIG + 7)
    got = _self_round_trip(data)
    assert type(got) is bytes and got == data
    got = _self_round_trip(bytearray(data))
    assert type(got) is bytearray and got == data
    got.append(1)  # a bytearray of its own: it grows
    link = _sender._links.by_pid[os.getpid()]
    assert link.bulk, "a bulk send uses a connection that carries descriptors"
    assert _memfds() == 0


def test_numpy_arrays_arrive_mapped_and_writable(runtime_dir: str) -> None:
    mproc.open_mailbox()
    a = numpy.arange(BIG // 4, dtype=numpy.float64).reshape(-1, 8)
    got = _self_round_trip(a)
    assert got.dtype == a.dtype and got.shape == a.shape
    assert numpy.array_equal(got, a)
    assert got.flags.writeable
    got[0, 0] = -1.0  # copy on write: the sender's memfd is sealed, ours is private
    assert got[0, 0] == -1.0 and a[0, 0] == 0.0
    assert _mapped_memfds() >= 1, "the array is mapped, not copied"
    fortran = numpy.asfortranarray(numpy.ones((512, 512), dtype=numpy.int32))
    got = _self_round_trip(fortran)
    assert numpy.array_equal(got, fortran) and got.flags.f_contiguous
    del got
    gc.collect()
    assert _mapped_memfds() == 0, "an array's mapping goes with its last reference"


class _Holder:  # a class of the test module: plain pickle finds it by name
    def __init__(self, arr: Any) -> None:
        self.arr = arr


def test_mixed_objects_and_cloudpickle_payloads(runtime_dir: str) -> None:
    mproc.open_mailbox()
    small = numpy.arange(10)
    mixed = {
        "a": numpy.full(BIG, 3, dtype=numpy.uint8),
        "b": bytearray(_pattern(BIG + 1, 5)),
        "c": [1, "two", small],
        "d": (numpy.zeros(BIG // 8), b"tiny"),
    }
    got = _self_round_trip(mixed)
    assert numpy.array_equal(got["a"], mixed["a"])
    assert type(got["b"]) is bytearray and got["b"] == mixed["b"]
    assert got["c"][:2] == [1, "two"] and numpy.array_equal(got["c"][2], small)
    assert numpy.array_equal(got["d"][0], mixed["d"][0]) and got["d"][1] == b"tiny"
    big = numpy.arange(BIG // 8)
    fn = _self_round_trip(lambda: big.sum())  # cloudpickle, the array out of band
    assert fn() == big.sum()
    holder = _self_round_trip(_Holder(big))
    assert numpy.array_equal(holder.arr, big)


def test_order_kept_between_bulk_and_small_messages(runtime_dir: str) -> None:
    mproc.open_mailbox()
    me = os.getpid()
    mproc.send(me, "first", timeout=WAIT)  # on a plain connection
    sent: list[Any] = []
    for i in range(6):
        obj: Any = ("small", i) if i % 2 else bytearray(_pattern(BIG, i))
        sent.append(obj)
        mproc.send(me, obj, timeout=WAIT)
    assert mproc.receive(timeout=WAIT).data == "first"
    for obj in sent:
        got = mproc.receive(timeout=WAIT).data
        assert got == obj


def test_cross_process_bulk_and_send_many(kids: Any, runtime_dir: str) -> None:
    mproc.open_mailbox()
    child, conn = _start(kids, _bulk_echo, runtime_dir, os.getpid())
    (cpid,) = expect(conn, "ready")
    arr = numpy.arange(BIG // 2, dtype=numpy.int16)
    failures = _mailbox.send_many([cpid, os.getpid()], arr, timeout=WAIT)
    assert failures == {}
    # Ours and the child's echo, in either order (two senders).
    got = {m.sender_pid: m.data for m in (mproc.receive(timeout=WAIT) for _ in range(2))}
    assert set(got) == {cpid, os.getpid()}
    assert numpy.array_equal(got[os.getpid()], arr)
    assert got[cpid] == ("sum", int(arr.sum()), True)
    del got
    gc.collect()
    assert _memfds() == 0, "a message's descriptor outlived it"
    _finish(kids, child)


def _bulk_echo(rundir: str, parent: int, conn: mpc.Connection) -> None:
    fp.use_runtime(rundir)
    with fp.reporting(conn):
        mproc.open_mailbox()
        conn.send(("ready", os.getpid()))
        got = mproc.receive(timeout=WAIT).data
        mproc.send(parent, ("sum", int(got.sum()), bool(got.flags.writeable)), timeout=WAIT)


def test_a_message_over_the_frame_limit_counts_its_buffers(runtime_dir: str) -> None:
    mproc.open_mailbox(max_frame=2 * BIG)
    gc.collect()
    with pytest.raises(mproc.MessageError, match="frame limit"):
        mproc.send(os.getpid(), numpy.zeros(3 * BIG, dtype=numpy.uint8), timeout=WAIT)
    assert _memfds() == 0
    assert _self_round_trip("still fine") == "still fine"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(min_value=BIG, max_value=BIG + 200), min_size=1, max_size=4),
    # (numpy keeps a buffer under the threshold in band: mixed in below)
    smalls=st.lists(st.binary(max_size=40), max_size=3),
)
def test_bulk_encoding_round_trips(sizes: list[int], smalls: list[bytes]) -> None:
    """Encode (pickle, memfd), decode (check, map, unpickle) without a socket."""
    arrays = [numpy.frombuffer(_pattern(n, n), dtype=numpy.uint8) for n in sizes]
    obj = [*arrays, *smalls]
    bulk = _bulk.dumps(obj, pickle.dumps, lambda: pickle.dumps(obj, protocol=5))
    assert bulk is not None and len(bulk.buffers) == len(sizes)
    try:
        assert _bulk.prepare(bulk) is bulk
        fd = bulk.fds[-1]
        assert _bulk._check(fd, bulk.size) == ""
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALED == SEALED
        head = memoryview(bulk.head + bulk.pickle)
        (n,) = wire.BULK_COUNT.unpack_from(head)
        got_sizes = [s for (s,) in wire.BULK_SIZE.iter_unpack(head[4 : 4 + 8 * n])]
        assert got_sizes == sizes
        import mmap

        mm = mmap.mmap(fd, bulk.size, flags=mmap.MAP_PRIVATE)
        spans = list(zip(_bulk._offsets(got_sizes), got_sizes))
        assert all(at % _bulk.ALIGN == 0 for at, _ in spans)
        got = _bulk.loads(_bulk.Received(head[4 + 8 * n :], mm, spans))
        assert all(numpy.array_equal(x, y) for x, y in zip(got[: len(sizes)], arrays))
        assert got[len(sizes) :] == smalls
    finally:
        bulk.close()
    assert len(bulk.fds) == 0


# ================================================================ 2. fallback


@pytest.mark.parametrize("how", ["missing", "EMFILE", "seal refused"])
def test_without_memfd_the_message_goes_in_band(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    mproc.open_mailbox()
    if how == "missing":
        monkeypatch.delattr(os, "memfd_create")
    elif how == "EMFILE":

        def no_fd(*args: Any) -> int:
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(os, "memfd_create", no_fd)
    else:
        real = fcntl.fcntl

        def no_seals(fd: int, cmd: int, arg: Any = 0) -> Any:
            if cmd == fcntl.F_ADD_SEALS:
                raise PermissionError(1, "Operation not permitted")
            return real(fd, cmd, arg)

        monkeypatch.setattr(fcntl, "fcntl", no_seals)
    before = _memfds()
    arr = numpy.arange(BIG // 8)
    assert numpy.array_equal(_self_round_trip(arr), arr)
    data = bytearray(_pattern(BIG))
    assert _self_round_trip(data) == data
    link = _sender._links.by_pid[os.getpid()]
    assert not link.bulk, "no descriptors to carry: the plain connection serves"
    assert _memfds() == before


# ================================================================ 3. hostile peers


def _bulk_peer(pid: int) -> RawSender:
    """A raw connection that passed the handshake announcing HELLO_BULK."""
    runtime = rt.runtime()
    identity = rt.proc_identity(pid)
    assert identity is not None
    sock = raw_connect(rt.socket_path(runtime, pid, identity))
    try:
        sock.sendall(wire.frame(wire.answer(runtime.key, read_frame(sock))))
        assert read_frame(sock) == wire.WELCOME
        mine = wire.challenge()
        sock.sendall(wire.frame(mine))
        assert wire.verify(runtime.key, mine, read_frame(sock))
        sock.sendall(wire.frame(wire.WELCOME))
        sock.sendall(wire.hello(window=wire.HELLO_BULK))
        _version, max_frame, window, _epoch = wire.parse_hello(read_frame(sock))
    except BaseException:
        sock.close()
        raise
    return RawSender(sock, pid, max_frame, window)


def _bulk_frame(
    group: bytes, seq: int, sizes: list[int], obj: Any = None, pickled: Optional[bytes] = None
) -> bytes:
    if pickled is None:
        pickled = pickle.dumps(obj, protocol=5)
    body = wire.BULK_COUNT.pack(len(sizes)) + b"".join(wire.BULK_SIZE.pack(s) for s in sizes)
    body += pickled
    return wire.msg_prefix(group, seq, len(body), wire.KIND_BULK) + body


def _memfd(data: bytes, seals: int = SEALED) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _send_fds(peer: RawSender, data: bytes, fds: list[int]) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    try:
        sent = peer.sock.sendmsg([data], rights)
        peer.sock.sendall(data[sent:])
    except (BrokenPipeError, ConnectionResetError):
        pass  # dropped before the end of the frame: as good
    finally:
        for fd in fds:
            os.close(fd)


def _valid_payload(size: int) -> tuple[bytes, list[int]]:
    """The pickle and buffer sizes of a bytearray of ``size`` bytes sent out of band."""
    bulk = _bulk.dumps_buffer(bytearray(size), lambda: b"")
    return bulk.pickle, [b.nbytes for b in bulk.buffers]


def test_a_well_formed_bulk_frame_from_a_raw_peer_is_delivered(runtime_dir: str) -> None:
    mproc.open_mailbox()
    data = _pattern(BIG)
    pickled, sizes = _valid_payload(len(data))
    with _bulk_peer(os.getpid()) as peer:
        _send_fds(peer, _bulk_frame(b"", 0, sizes, pickled=pickled), [_memfd(data)])
        peer.send("", "after")
        assert mproc.receive(timeout=WAIT).data == data
        assert mproc.receive(timeout=WAIT).data == "after"


def _hostile_cases() -> dict[str, Any]:
    data = _pattern(BIG)
    pickled, sizes = _valid_payload(len(data))
    frame = _bulk_frame(b"", 0, sizes, pickled=pickled)
    pipe_r, pipe_w = os.pipe()
    os.close(pipe_w)
    return {
        "an unsealed memfd": (frame, lambda: [_memfd(data, seals=0)]),
        "a memfd sealed against writes only": (
            frame,
            lambda: [_memfd(data, seals=fcntl.F_SEAL_WRITE)],
        ),
        "a memfd of the wrong size": (frame, lambda: [_memfd(data + b"!")]),
        "a pipe": (frame, lambda: [os.dup(pipe_r)]),
        "/dev/zero": (frame, lambda: [os.open("/dev/zero", os.O_RDONLY)]),
        "a descriptor on a plain MSG": (
            wire.msg_prefix(b"", 0, len(pickle.dumps("x"))) + pickle.dumps("x"),
            lambda: [_memfd(data)],
        ),
        "no descriptor with a bulk frame": (frame, lambda: []),
        "two descriptors for one buffer": (frame, lambda: [_memfd(data), _memfd(data)]),
        "a flood of descriptors (MSG_CTRUNC)": (
            frame,
            lambda: [os.open("/dev/null", os.O_RDONLY) for _ in range(200)],
        ),
        "a bulk frame over the frame limit": (
            _bulk_frame(b"", 0, [1 << 40], pickled=pickled),
            lambda: [_memfd(data)],
        ),
        "a bulk frame announcing no buffers": (
            _bulk_frame(b"", 0, [], pickled=pickled),
            lambda: [_memfd(data)],
        ),
        "_closer": lambda: os.close(pipe_r),
    }


_HOSTILE = [k for k in _hostile_cases() if not k.startswith("_")]


@pytest.mark.parametrize("case", _HOSTILE)
def test_a_hostile_bulk_peer_is_dropped_without_leaking(
    kids: Any, runtime_dir: str, case: str
) -> None:
    mproc.open_mailbox()
    assert _self_round_trip("warm") == "warm"  # our own links exist before counting
    # Another process: a process's connections are read one after the other.
    child, conn = _start(kids, _hostile_peer, runtime_dir, os.getpid(), case)
    expect(conn, "ready")
    before = _fds()
    conn.send("go")
    (dropped,) = expect(conn, "sent")
    assert dropped, f"the mailbox kept a peer that sent {case}"
    gc.collect()
    leaked = _fds() - before
    assert not leaked, f"descriptors left open after {case}: {leaked}"
    # The mailbox serves everyone else.
    assert _self_round_trip(bytearray(BIG)) == bytearray(BIG)
    assert _self_round_trip("small") == "small"
    _finish(kids, child)


def _hostile_peer(rundir: str, parent: int, case: str, conn: mpc.Connection) -> None:
    fp.use_runtime(rundir)
    with fp.reporting(conn):
        cases = _hostile_cases()
        frame, make_fds = cases[case]
        conn.send(("ready",))
        fp.wait_command(conn, "go")
        with _bulk_peer(parent) as bad:
            _send_fds(bad, frame, make_fds())
            conn.send(("sent", bad.is_dropped()))
        cases["_closer"]()


def test_a_bulk_frame_on_a_plain_connection_is_a_message_error(runtime_dir: str) -> None:
    """Without HELLO_BULK no descriptor can come: the frame cannot be unpickled."""
    mproc.open_mailbox()
    pickled, sizes = _valid_payload(BIG)
    with authed(os.getpid()) as peer:
        peer.write(_bulk_frame(b"", 0, sizes, pickled=pickled))
        peer.send("", "next")
        with pytest.raises(mproc.MessageError, match=f"PID {os.getpid()}.*without its buffers"):
            mproc.receive(timeout=WAIT)
        assert mproc.receive(timeout=WAIT).data == "next"


def test_a_bad_frame_after_good_ones_keeps_those(runtime_dir: str) -> None:
    """What came before the bad frame is delivered; nothing after it."""
    mproc.open_mailbox()
    data = _pattern(BIG)
    pickled, sizes = _valid_payload(len(data))
    with _bulk_peer(os.getpid()) as peer:
        _send_fds(peer, _bulk_frame(b"", 0, sizes, pickled=pickled), [_memfd(data)])
        _send_fds(peer, _bulk_frame(b"", 1, sizes, pickled=pickled), [_memfd(data, seals=0)])
        peer.write(wire.msg_prefix(b"", 2, 5) + b"never")
        assert peer.is_dropped()
    assert mproc.receive(timeout=WAIT).data == data
    with pytest.raises(mproc.ReceiveTimeout):
        mproc.receive(timeout=0.2)


# ================================================================ 4. signal storms


@pytest.mark.parametrize("exc", [fp.Boom, fp.BaseBoom], ids=["Exception", "BaseException"])
def test_signal_storm_while_sending_bulk(kids: Any, runtime_dir: str, exc: Any) -> None:
    count = 150
    mproc.open_mailbox()
    child, conn = _start(kids, _bulk_storm_sender, runtime_dir, os.getpid(), count, exc)
    got = []
    while True:
        msg = mproc.receive(timeout=WAIT)
        if msg.data == ("end", count):
            break
        data = msg.data
        i, attempt = data[0], data[1]
        assert _eq(data, _storm_obj(i, attempt)), f"message {i} garbled"
        got.append((i, attempt))
    last, booms, memfds = expect(conn, "done", timeout=WAIT)
    assert booms >= 10, f"only {booms} signals landed inside send()"
    assert memfds == 0, "the sender leaked memfds under the storm"
    returned = list(enumerate(last))
    assert [m for m in got if m == returned[m[0]]] == returned
    assert [i for i, _ in got] == sorted(i for i, _ in got)
    assert len(set(got)) == len(got), "one attempt arrived twice"
    _finish(kids, child)


def _storm_obj(i: int, attempt: int) -> Any:
    if i % 3 == 2:
        return (i, attempt, "small")
    return (i, attempt, bytearray(_pattern(BIG + i, i)), numpy.full(BIG // 8, i))


def _eq(a: Any, b: Any) -> bool:
    return all(
        numpy.array_equal(x, y) if isinstance(x, numpy.ndarray) else x == y for x, y in zip(a, b)
    )


def _bulk_storm_sender(
    rundir: str, target: int, count: int, exc: Any, conn: mpc.Connection
) -> None:
    fp.use_runtime(rundir)
    with fp.reporting(conn):
        last: list[int] = []
        objs = {}
        deadline = time.monotonic() + 60
        # A bulk send takes a few ms (a memfd of 2 MiB to fill): a storm
        # much denser than that would interrupt every attempt.
        with fp.Storm(0.02, exc) as s:
            for i in range(count):
                attempt = 0
                while True:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"sent only {i} of {count} in 60 s")
                    try:
                        obj = objs.get((i, attempt))
                        if obj is None:
                            obj = objs[(i, attempt)] = _storm_obj(i, attempt)
                        mproc.send(target, obj, timeout=WAIT)
                        break
                    except fp.BOOMS:
                        attempt += 1
                last.append(attempt)
                objs.clear()
        mproc.send(target, ("end", count), timeout=WAIT)
        conn.send(("done", last, s.raised, _memfds()))


def test_signal_storm_while_receiving_bulk(kids: Any, runtime_dir: str) -> None:
    count = 150
    child, conn = _start(kids, _bulk_storm_receiver, runtime_dir, count)
    (rpid,) = expect(conn, "ready")
    for i in range(count):
        mproc.send(rpid, _storm_obj(i, 0), timeout=WAIT)
    got, booms, memfds, mapped = expect(conn, "done", timeout=60)
    assert got == list(range(count)), "lost, duplicated or reordered under the storm"
    assert booms >= 10, f"only {booms} signals landed inside receive()"
    assert memfds == 0, "the receiver leaked descriptors under the storm"
    assert mapped == 0, "mappings outlived their messages"
    _finish(kids, child)


def _bulk_storm_receiver(rundir: str, count: int, conn: mpc.Connection) -> None:
    fp.use_runtime(rundir)
    with fp.reporting(conn):
        mproc.open_mailbox()
        conn.send(("ready", os.getpid()))
        got: list[int] = []
        deadline = time.monotonic() + 60
        with fp.Storm(0.0003) as s:
            while len(got) < count:
                if time.monotonic() > deadline:
                    raise AssertionError(f"received only {len(got)} of {count} in 60 s")
                try:
                    data = mproc.receive(timeout=WAIT).data
                except fp.BOOMS:
                    continue
                if not _eq(data, _storm_obj(data[0], 0)):
                    raise AssertionError(f"message {data[0]} garbled")
                got.append(data[0])
                del data
        gc.collect()
        conn.send(("done", got, s.raised, _memfds(), _mapped_memfds()))


# ================================================================ 5. closing


def test_close_mailbox_unmaps_queued_bulk_messages(runtime_dir: str) -> None:
    mproc.open_mailbox()
    for i in range(3):
        mproc.send(os.getpid(), numpy.full(BIG, i, dtype=numpy.uint8), timeout=WAIT)
    r = _mailbox._state.receiver
    assert r is not None
    deadline = time.monotonic() + WAIT
    while r.depths().get("", 0) < 3:  # the background reader maps them
        assert time.monotonic() < deadline, "the messages were never read"
        time.sleep(0.01)
    assert _mapped_memfds() == 3
    mproc.close_mailbox()
    assert _mapped_memfds() == 0
    assert _memfds() == 0
    with contextlib.suppress(Exception):
        del r
