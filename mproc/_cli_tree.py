"""``mproc tree PID``: a process and its descendants, read with psutil.

Read-only: nothing is pinned or signalled. A process that exits while the
tree is read is left out; one whose command line we may not read shows its
name in brackets. The names each process registered come from the names
directory of this user's runtime dir.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import psutil

from . import _names
from ._cli_util import CliError, emit, emit_json, exit_codes, pid_arg, printable, warn

__all__ = ["add_commands"]


def _node(proc: psutil.Process) -> Optional[dict[str, Any]]:
    try:
        with proc.oneshot():
            node: dict[str, Any] = {
                "pid": proc.pid,
                "ppid": proc.ppid(),
                "name": proc.name(),
                "status": proc.status(),
            }
            try:
                node["cmdline"] = proc.cmdline()
            except psutil.AccessDenied:
                node["cmdline"] = []
    except psutil.ZombieProcess:  # a NoSuchProcess, but there: shown as <zombie>
        node = {
            "pid": proc.pid,
            "ppid": _ppid(proc),
            "name": "?",
            "status": "zombie",
            "cmdline": [],
        }
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        node = {"pid": proc.pid, "ppid": None, "name": "?", "status": "?", "cmdline": []}
    node["names"] = []
    node["children"] = []
    return node


def _ppid(proc: psutil.Process) -> Optional[int]:
    try:
        return int(proc.ppid())
    except psutil.Error:
        return None


def _build_tree(pid: int) -> dict[str, Any]:
    try:
        root_proc = psutil.Process(pid)
        procs = [root_proc, *root_proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        raise CliError(f"tree: no such process: PID {pid}") from None
    nodes: dict[int, dict[str, Any]] = {}
    for proc in procs:
        node = _node(proc)
        if node is not None:
            nodes[node["pid"]] = node
    if pid not in nodes:
        raise CliError(f"tree: no such process: PID {pid}")
    try:
        for name, holder in _names.registered().items():
            if holder in nodes:
                nodes[holder]["names"].append(name)
    except (OSError, ValueError) as err:  # an unsafe runtime dir must not hide the tree
        warn(f"tree: cannot read the registered names: {err}")
    for p, node in sorted(nodes.items()):
        parent = nodes.get(node["ppid"])
        if p != pid and parent is not None:
            parent["children"].append(node)
    return nodes[pid]


def _render(node: dict[str, Any], lead: str, branch: str, out: list[str]) -> None:
    cmd = printable(" ".join(node["cmdline"]) or f"[{node['name']}]")
    extra = f"  [names: {printable(', '.join(node['names']))}]" if node["names"] else ""
    state = "  <zombie>" if node["status"] == psutil.STATUS_ZOMBIE else ""
    out.append(f"{lead}{branch}{node['pid']}  {cmd}{extra}{state}")
    kids = node["children"]
    for i, kid in enumerate(kids):
        last = i == len(kids) - 1
        more = lead + ("" if not branch else ("   " if branch.startswith("└") else "│  "))
        _render(kid, more, "└─ " if last else "├─ ", out)


def _cmd_tree(args: argparse.Namespace) -> int:
    root = _build_tree(args.pid)
    if args.json:
        emit_json(root)
        return 0
    lines: list[str] = []
    _render(root, "", "", lines)
    for line in lines:
        emit(line)
    return 0


def add_commands(sub: Any, formatter: Any) -> None:
    """Add ``tree`` to the subparsers ``sub``."""
    p = sub.add_parser(
        "tree",
        help="print a process and its descendants",
        formatter_class=formatter,
        description=(
            "Print PID and its descendants as a tree: PID, command line, the names they "
            "registered, and <zombie> for exited processes nobody reaped."
        ),
        epilog=exit_codes(
            (0, "success"),
            (1, "no such process"),
            (2, "bad usage (malformed PID)"),
        ),
    )
    p.add_argument("pid", type=pid_arg, metavar="PID", help="the root of the tree")
    p.add_argument(
        "--json",
        action="store_true",
        help="print it as nested JSON: pid, ppid, name, cmdline, status, names, children",
    )
    p.set_defaults(func=_cmd_tree)
