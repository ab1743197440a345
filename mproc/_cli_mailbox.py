"""The mailbox subcommands of ``mproc``: ``ps``, ``send``, ``recv``, ``call``.

``ps`` asks every live mailbox of this user to describe itself with the
STATS control frame (:func:`mproc._sender.query_stats`): the answer comes
from the mailbox's own reader, after it has read everything already sent,
so the queue depths are the receiver's own counters, exact, whatever its
application code is doing. The queries run in parallel, each with a short
timeout; a mailbox that does not answer in time (a stopped process, one
stuck in its handshake) is listed as such.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import psutil

from . import _check, _mailbox, _names, _sender
from . import _runtime as rt
from ._cli_util import (
    EXIT_FAIL,
    EXIT_USAGE,
    CliError,
    emit,
    emit_json,
    exit_codes,
    fmt_time,
    is_tty,
    printable,
    read_value,
    seconds_arg,
    show,
    target_arg,
    to_json,
    warn,
)
from ._errors import (
    MailboxNotFound,
    MessageError,
    MprocError,
    NoSuchProcess,
    ReceiveTimeout,
    RemoteError,
    RemoteTraceback,
)

__all__ = ["add_commands"]

# A live mailbox answers a STATS query in well under a millisecond; one that
# takes this long is stopped, swamped or stuck, and is shown as such.
_QUERY_TIMEOUT = 1.0
_QUERY_THREADS = 16
# `ps --watch` refresh interval bounds (seconds): often enough to see a
# queue move, never a busy loop, never so rare it looks hung.
_WATCH_DEFAULT = 2.0
_WATCH_MIN = 0.1
_WATCH_MAX = 3600.0
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen (what top and circus-top do)

# What a mailbox's answer holds (see mproc.stats()).
_STATS_KEYS = (
    "pid",
    "open",
    "path",
    "start_time",
    "cmdline",
    "names",
    "groups",
    "senders",
    "received",
    "pending_calls",
    "max_queue",
    "max_frame",
    "idle_limit",
)

_FAILED = (1, "the command failed (the message says why)")
_USAGE = (2, "bad usage: a malformed argument; nothing was done")
_INTERRUPTED = (130, "interrupted (Ctrl-C)")


# ---------------------------------------------------------------- ps


def _live_mailboxes() -> list[tuple[int, str]]:
    """(pid, start identity) of every mailbox socket whose process is alive."""
    runtime = rt.runtime()
    rt.remove_stale(runtime)  # SPEC §5: stale socket files are removed when found
    found = []
    for entry in os.listdir(runtime.directory):
        parsed = rt.parse_socket_name(entry)
        if parsed is not None and rt.proc_identity(parsed[0]) == parsed[1]:
            found.append(parsed)
    return sorted(found)


def _query(pid: int, timeout: float, names: dict[int, list[str]]) -> Optional[dict[str, Any]]:
    """The mailbox's own description, or what we know of it if it does not answer.

    ``None`` if it went away meanwhile (the process exited, or closed its mailbox).
    """
    try:
        stats = _sender.query_stats(pid, timeout)
    except (NoSuchProcess, MailboxNotFound):
        return None  # it exited, or closed its mailbox, while we asked
    except (MprocError, OSError) as err:
        if rt.proc_identity(pid) is None:
            return None  # it exited while we asked
        # The keys of an answer, so that JSON readers need no special case.
        row: dict[str, Any] = dict.fromkeys(_STATS_KEYS)
        row.update(pid=pid, names=names.get(pid, []), cmdline=[], answered=False, error=str(err))
        try:
            proc = psutil.Process(pid)
            row["start_time"] = proc.create_time()
            row["cmdline"] = proc.cmdline()
        except psutil.Error:
            pass
        return row
    stats["answered"] = True
    stats["error"] = None
    return stats


def _snapshot(timeout: float) -> list[dict[str, Any]]:
    """One row per live mailbox of this user, sorted by PID."""
    mailboxes = _live_mailboxes()
    if not mailboxes:
        return []
    names: dict[int, list[str]] = {}
    for name, pid in _names.registered().items():
        names.setdefault(pid, []).append(name)
    with ThreadPoolExecutor(min(_QUERY_THREADS, len(mailboxes))) as pool:
        rows = list(pool.map(lambda m: _query(m[0], timeout, names), mailboxes))
    return [r for r in rows if r is not None]


def _group_text(group: str) -> str:
    plain = group and group.isprintable() and not any(c in group for c in " :,\"'")
    return group if plain else to_json(group)


def _cells(row: dict[str, Any]) -> list[str]:
    """PID, NAMES, STARTED, QUEUED, SENDERS, COMMAND of one mailbox."""
    cmd = printable(" ".join(row.get("cmdline") or [])) or "?"
    names = printable(",".join(row.get("names") or [])) or "-"
    if not row["answered"]:
        queued, senders = f"(no answer: {row['error']})", "-"
    else:
        groups: dict[str, int] = row.get("groups") or {}
        queued = " ".join(f"{_group_text(g)}:{n}" for g, n in sorted(groups.items())) or "-"
        pids = [str(p) for p in row.get("senders") or []]
        more = f",+{len(pids) - 3}" if len(pids) > 3 else ""
        senders = ",".join(pids[:3]) + more or "-"
    return [str(row["pid"]), names, fmt_time(row.get("start_time")), queued, senders, cmd]


def _table(rows: list[dict[str, Any]], rates: Optional[dict[int, Optional[float]]]) -> list[str]:
    """The text table; with ``rates`` (``ps --watch``), a MSG/S column before COMMAND."""
    lines = [["PID", "NAMES", "STARTED", "QUEUED", "SENDERS", "COMMAND"]]
    lines += [_cells(row) for row in rows]
    if rates is not None:
        lines[0].insert(5, "MSG/S")
        for row, cells in zip(rows, lines[1:]):
            rate = rates.get(row["pid"])
            cells.insert(5, "-" if rate is None else f"{rate:.0f}")
    widths = [max(len(cells[i]) for cells in lines) for i in range(len(lines[0]) - 1)]
    out = []
    for cells in lines:
        padded = [cells[0].rjust(widths[0])]
        padded += [c.ljust(w) for c, w in zip(cells[1:-1], widths[1:])]
        out.append("  ".join([*padded, cells[-1]]))
    return out


def _fit(lines: list[str]) -> list[str]:
    """Cut lines to the terminal's width when printing to one (as ps does)."""
    if not is_tty(sys.stdout):
        return lines
    width = shutil.get_terminal_size().columns
    return [line[:width] for line in lines]


def _cmd_ps(args: argparse.Namespace) -> int:
    if args.watch is None:
        rows = _snapshot(args.timeout)
        if args.json:
            emit_json(rows)
        else:
            for line in _fit(_table(rows, None)):
                emit(line)
        return 0
    return _watch(args)


def _watch(args: argparse.Namespace) -> int:
    interval: float = args.watch
    clear = is_tty(sys.stdout) and not args.json
    seen: dict[tuple[int, Any], tuple[int, float]] = {}
    try:
        while True:
            started = time.monotonic()
            rows = _snapshot(args.timeout)
            rates: dict[int, Optional[float]] = {}
            now_seen: dict[tuple[int, Any], tuple[int, float]] = {}
            for row in rows:
                if not row["answered"]:
                    continue
                key = (row["pid"], row.get("start_time"))
                count = int(row.get("received") or 0)
                before = seen.get(key)
                dt = started - before[1] if before else 0.0
                rates[row["pid"]] = (count - before[0]) / dt if before and dt > 0 else None
                now_seen[key] = (count, started)
            seen = now_seen
            if args.json:
                emit_json({"time": time.time(), "mailboxes": rows})
            else:
                heading = (
                    f"mproc ps - {len(rows)} mailbox{'es' if len(rows) != 1 else ''} - "
                    f"every {interval:g} s - {fmt_time(time.time())} - Ctrl-C to quit"
                )
                text = "\n".join(_fit([heading, "", *_table(rows, rates)]))
                sys.stdout.write((_CLEAR if clear else "\n") + text + "\n")
                sys.stdout.flush()
            time.sleep(max(interval - (time.monotonic() - started), 0.0))
    except KeyboardInterrupt:
        return 0  # how one leaves a top-like view


def _watch_interval(text: str) -> float:
    value = seconds_arg(text)
    if not _WATCH_MIN <= value <= _WATCH_MAX:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the refresh interval must be between {_WATCH_MIN:g} and {_WATCH_MAX:g} s"
        )
    return value


# ---------------------------------------------------------------- send / recv / call


def _cmd_send(args: argparse.Namespace) -> int:
    value = read_value(args.value, args.raw)
    _mailbox.send(args.target, value, args.group, timeout=args.timeout)
    return 0


def _cmd_recv(args: argparse.Namespace) -> int:
    if args.name is not None:
        _names.check_name(args.name, "recv")
        if args.name.strip().isdigit():
            # `mproc send 123` means PID 123: such a name could not be reached.
            raise CliError(
                f"recv: --name {args.name!r} is all digits; `mproc send` would take it "
                "for a PID: choose a name with a letter in it",
                EXIT_USAGE,
            )
    _check.group(args.group, "recv")
    _mailbox.open_mailbox()
    me = os.getpid()
    if args.name is not None:
        _names.register(args.name)
    if not args.quiet:
        called = f" (name {args.name!r})" if args.name is not None else ""
        sys.stderr.write(
            f"receiving group {args.group!r} as PID {me}{called}; "
            f"senders must address PID {me}{' or the name' if called else ''}\n"
        )
        sys.stderr.flush()
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    got = 0
    while args.count is None or got < args.count:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            msg = _mailbox.receive(args.group, left)
        except ReceiveTimeout:
            wanted = f" of {args.count}" if args.count is not None else ""
            warn(
                f"no more messages in group {args.group!r} within {args.timeout:g} s "
                f"({got}{wanted} received)"
            )
            return EXIT_FAIL
        except MessageError as err:  # one bad message; the next receive() works
            warn(str(err))
            continue
        is_call = msg.is_call  # (false once answered)
        if is_call:
            # A caller waiting for a reply that never comes would hang: tell it.
            try:
                msg.reply_error(
                    ValueError(f"PID {me} is `mproc recv`: it prints messages, it does not answer")
                )
            except MprocError:
                pass
        if args.json:
            emit_json(
                {
                    "sender": msg.sender_pid,
                    "group": msg.group,
                    "data": msg.data,
                    "is_call": is_call,
                }
            )
        else:
            emit(f"{msg.sender_pid}\t{msg.group}\t{to_json(msg.data)}")
        got += 1
    return 0


def _cmd_call(args: argparse.Namespace) -> int:
    value = read_value(args.value, args.raw)
    try:
        reply = _mailbox.call(args.target, value, args.group, timeout=args.timeout)
    except Exception as exc:
        if not isinstance(exc.__cause__, RemoteTraceback):
            raise
        if isinstance(exc, RemoteError):  # its class did not unpickle here; says it all
            warn(str(exc))
        else:
            warn(f"{_callee(args.target)} raised {type(exc).__name__}: {exc}")
        return EXIT_FAIL
    emit(to_json(reply) if args.json else show(reply))
    return 0


def _callee(target: Any) -> str:
    if isinstance(target, int):
        return f"PID {target}"
    try:
        pid = _names.whereis(target)
    except (MprocError, ValueError):
        pid = None
    return f"{target!r}" + (f" (PID {pid})" if pid is not None else "")


# ---------------------------------------------------------------- the parsers


def add_commands(sub: Any, formatter: Any) -> None:
    """Add ``ps``, ``send``, ``recv``/``receive`` and ``call`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "ps",
        aliases=["ls"],
        help="list this user's live mailboxes, with their queues",
        formatter_class=formatter,
        description=(
            "List every live mailbox of this user (its runtime directory): PID, "
            "registered names, start time, messages queued per group (GROUP:COUNT; "
            'the default group shows as ""), connected senders and command line. '
            "Each mailbox describes itself: its own reader answers, after reading "
            "everything already sent, so the depths are exact. A mailbox that does not "
            "answer within --timeout is listed as '(no answer: ...)'. "
            "`ls` is the old name of this command."
        ),
        epilog=exit_codes(
            (0, "success (with --watch: also Ctrl-C, which is how one leaves it)"),
            _FAILED,
            _USAGE,
            _INTERRUPTED,
        ),
    )
    p.add_argument("--json", action="store_true", help="print a JSON array, one object per mailbox")
    p.add_argument(
        "--watch",
        nargs="?",
        const=_WATCH_DEFAULT,
        type=_watch_interval,
        metavar="SECONDS",
        help=f"refresh in place every SECONDS (default {_WATCH_DEFAULT:g}; "
        f"{_WATCH_MIN:g} to {_WATCH_MAX:g}) with a MSG/S column, until Ctrl-C; "
        "with --json, one JSON object per refresh",
    )
    p.add_argument(
        "--timeout",
        type=seconds_arg,
        default=_QUERY_TIMEOUT,
        metavar="SECONDS",
        help=f"how long each mailbox may take to answer (default {_QUERY_TIMEOUT:g})",
    )
    p.set_defaults(func=_cmd_ps)

    value_help = (
        'a JSON value (42, "text", [1, 2], {"job": 7}); anything that is not JSON is '
        "sent as a string; '-' reads it from stdin (one trailing newline dropped)"
    )
    target_help = "the receiver: a PID (digits), or a name it registered"

    p = sub.add_parser(
        "send",
        help="send a value to a process's mailbox",
        formatter_class=formatter,
        description=(
            "Send VALUE to the mailbox of the process PID, or of the process holding the "
            "registered name NAME. Returns once the receiver holds it (SPEC §5)."
        ),
        epilog=exit_codes((0, "the receiver holds the message"), _FAILED, _USAGE, _INTERRUPTED),
    )
    p.add_argument("target", type=target_arg, metavar="PID|NAME", help=target_help)
    p.add_argument("value", metavar="VALUE|-", help=value_help)
    p.add_argument("--group", default="", help="the receiver's group (default: '')")
    p.add_argument(
        "--raw",
        "--text",
        action="store_true",
        help="send VALUE (or stdin, byte for byte) as a string; never parse it as JSON",
    )
    p.add_argument(
        "--timeout",
        type=seconds_arg,
        default=None,
        metavar="SECONDS",
        help="give up after this long: waiting for the mailbox to open or the name to be "
        "registered, and for room in a full queue (default 5)",
    )
    p.set_defaults(func=_cmd_send)

    p = sub.add_parser(
        "recv",
        aliases=["receive"],
        help="print the messages sent to this command's mailbox",
        formatter_class=formatter,
        description=(
            "Open a mailbox in this command's own process and print the messages that "
            "arrive in GROUP, one line each: SENDER-PID<TAB>GROUP<TAB>DATA-as-JSON "
            "(with --json: one JSON object per line). Senders must address THIS process: "
            "its PID is printed on stderr at start; or use --name NAME and send to NAME. "
            "A call() that arrives is printed, and its caller gets an error back "
            "(this command does not answer calls)."
        ),
        epilog=exit_codes(
            (0, "COUNT messages were printed"),
            (
                1,
                "--timeout passed first (without -n, it always ends so), or the\n"
                "command failed (e.g. --name is held by another process)",
            ),
            _USAGE,
            _INTERRUPTED,
        ),
    )
    p.add_argument("--group", default="", help="the group to receive (default: '')")
    p.add_argument("-n", "--count", type=_count_arg, default=None, help="stop after COUNT messages")
    p.add_argument(
        "--timeout",
        type=seconds_arg,
        default=None,
        metavar="SECONDS",
        help="stop after this long in all (default: never)",
    )
    p.add_argument("--name", default=None, help="register NAME for this mailbox while it runs")
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.add_argument("-q", "--quiet", action="store_true", help="no PID line on stderr")
    p.set_defaults(func=_cmd_recv)

    p = sub.add_parser(
        "call",
        help="call a process (request/reply) and print its reply",
        formatter_class=formatter,
        description=(
            "Send VALUE to PID or NAME as a call (mproc.call) and print the reply: a string as "
            "it is, anything else as JSON. If the callee raised, print "
            "'mproc: PID … raised TYPE: message' and exit 1."
        ),
        epilog=exit_codes(
            (0, "the reply was printed"),
            (
                1,
                "the callee raised an exception, or the call failed (timeout, the\n"
                "callee died, no such process or name...)",
            ),
            _USAGE,
            _INTERRUPTED,
        ),
    )
    p.add_argument("target", type=target_arg, metavar="PID|NAME", help=target_help)
    p.add_argument("value", metavar="VALUE|-", help=value_help)
    p.add_argument("--group", default="", help="the callee's group (default: '')")
    p.add_argument("--raw", action="store_true", help="send VALUE as a string; never as JSON")
    p.add_argument(
        "--timeout",
        type=seconds_arg,
        default=None,
        metavar="SECONDS",
        help="give up after this long in all (default: wait for the reply for ever)",
    )
    p.add_argument("--json", action="store_true", help="print the reply as JSON, strings too")
    p.set_defaults(func=_cmd_call)


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (a whole number >= 1)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (a whole number >= 1)")
    return value
