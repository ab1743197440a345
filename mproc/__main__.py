"""The ``mproc`` command line: look at and talk to mailboxes from a shell.

Examples::

    python -m mproc ls                          # live mailboxes of this user
    python -m mproc send 4242 '{"job": 7}'      # a JSON value (or plain text)
    python -m mproc receive --group jobs -n 3   # print this process's next 3 messages
    python -m mproc exec 'echo hi' --timeout 5  # shell_exec, exit status passed on
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

import psutil

from . import _runtime as tr
from ._errors import MprocError, ShellError
from ._mailbox import receive, send
from ._shell import shell_exec

__all__ = ["main"]


def _cmd_ls(args: argparse.Namespace) -> int:
    rt = tr.runtime()
    print(f"{'PID':>8}  {'STARTED':<19}  COMMAND")
    for name in sorted(os.listdir(rt.directory)):
        parsed = tr.parse_socket_name(name)
        if parsed is None:
            continue
        pid, identity = parsed
        if tr.proc_identity(pid) != identity:
            continue  # stale: its process is gone
        try:
            proc = psutil.Process(pid)
            cmdline = " ".join(proc.cmdline()) or proc.name()
            started = _fmt_time(proc.create_time())
        except psutil.Error:
            continue
        print(f"{pid:>8}  {started:<19}  {cmdline}")
    return 0


def _fmt_time(epoch: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def _parse_value(text: str, as_text: bool) -> Any:
    if as_text:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _cmd_send(args: argparse.Namespace) -> int:
    send(args.pid, _parse_value(args.data, args.text), args.group, timeout=args.timeout)
    return 0


def _cmd_receive(args: argparse.Namespace) -> int:
    print(f"mailbox of PID {os.getpid()} open; waiting", file=sys.stderr, flush=True)
    count = 0
    while args.count is None or count < args.count:
        msg = receive(args.group, timeout=args.timeout)
        try:
            data = json.dumps(msg.data)
        except (TypeError, ValueError):
            data = repr(msg.data)
        print(f"{msg.sender_pid}\t{msg.group}\t{data}", flush=True)
        count += 1
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    try:
        sys.stdout.write(shell_exec(args.command, timeout=args.timeout))
    except ShellError as err:
        if err.output:
            sys.stdout.write(str(err.output))
        print(f"mproc: {err}", file=sys.stderr)
        return err.returncode if err.returncode > 0 else 128 - err.returncode
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mproc", description="Look at and talk to mproc mailboxes."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("ls", help="list the live mailboxes of this user").set_defaults(func=_cmd_ls)

    p = sub.add_parser("send", help="send a JSON value (or text) to a process's mailbox")
    p.add_argument("pid", type=int)
    p.add_argument("data", help="a JSON value; anything that is not JSON is sent as text")
    p.add_argument("--text", action="store_true", help="send DATA as text, never as JSON")
    p.add_argument("--group", default="", help="the receiver's group (default '')")
    p.add_argument("--timeout", type=float, default=None, help="seconds (default 5)")
    p.set_defaults(func=_cmd_send)

    p = sub.add_parser("receive", help="open a mailbox here and print what arrives")
    p.add_argument("--group", default="")
    p.add_argument("-n", "--count", type=int, default=None, help="stop after N messages")
    p.add_argument("--timeout", type=float, default=None, help="per message, in seconds")
    p.set_defaults(func=_cmd_receive)

    p = sub.add_parser("exec", help="run a shell command line (mproc.shell_exec)")
    p.add_argument("command")
    p.add_argument("--timeout", type=float, default=None)
    p.set_defaults(func=_cmd_exec)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit status.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success, 1 on an mproc error (printed to stderr), or the command's
        own status for ``exec``.
    """
    args = _parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except MprocError as err:
        print(f"mproc: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
