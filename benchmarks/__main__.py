"""``python -m benchmarks``: run the suite, print one table, write it as JSON."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any, Callable, Optional

import psutil

import mproc

from . import (
    _async,
    _containment,
    _groups,
    _memory,
    _messaging,
    _monitors,
    _rpc,
    _scale,
    _start,
    _stats,
    _supervisor,
    _table,
    _transfer,
    _waiting,
)
from ._common import RUNDIR_PREFIX, Config, Row, Target

BENCHMARKS: dict[str, Callable[[Config, str], list[Row]]] = {
    "one_to_one": _messaging.one_to_one,
    "four_to_one": _messaging.four_to_one,
    "batched": _messaging.batched,
    "new_group": _groups.new_group,
    "round_trip": _transfer.round_trip,
    "call_round_trip": _rpc.call_round_trip,
    "send_by_name": _rpc.send_by_name,
    "async_receive": _async.async_receive,
    "async_call": _async.async_call,
    "bulk_64mib": _transfer.bulk_64mib,
    "wait_adopted": _waiting.wait_adopted,
    "memory_backpressure": _memory.memory_backpressure,
    "scale": _scale.scale,
    "terminate_trees": _containment.terminate_trees,
    "process_start": _start.process_start,
    "down_latency": _monitors.down_latency,
    "monitor_threads": _monitors.monitor_threads,
    "supervisor_restart": _supervisor.supervisor_restart,
    "supervisor_cpu": _supervisor.supervisor_cpu,
    "stats_query_cost": _stats.stats_query_cost,
}


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="mproc side by side with multiprocessing, pyzmq and psutil (issue 4).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: smaller workloads, 2 repetitions"
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json"),
        help="where to write the results (default: benchmarks/results.json)",
    )
    parser.add_argument(
        "--only",
        metavar="NAME",
        action="append",
        choices=sorted(BENCHMARKS),
        help="run only this benchmark (repeatable): " + ", ".join(BENCHMARKS),
    )
    return parser.parse_args(argv)


def _commit() -> Optional[str]:
    """Return the checkout's commit (``+dirty`` if mproc/ has changes), if it is a git one."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True)

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "mproc")
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _cleanup(rundir: str) -> dict[str, Any]:
    """Close our mailbox, reap stray children, check the runtime dir, remove it."""
    mproc.close_mailbox()
    me = psutil.Process()
    strays = me.children(recursive=True)
    for p in strays:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(strays, timeout=5)
    names = os.path.join(rundir, "names")  # registered names: the directory and its lock stay
    left = sorted(name for name in os.listdir(rundir) if name != "key" and name != "names")
    if os.path.isdir(names):
        left += sorted(f"names/{name}" for name in os.listdir(names) if name != "lock")
    shutil.rmtree(rundir, ignore_errors=True)
    return {"stray_children": [p.pid for p in strays], "files_left": left}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmarks; return the exit status (1 if one crashed or leaked)."""
    args = _parse(argv)
    cfg = Config.make(quick=args.quick)
    names = args.only or list(BENCHMARKS)
    # The exact command line where Python keeps it (3.10+), else rebuilt.
    words = getattr(sys, "orig_argv", None) if argv is None else None
    command = shlex.join(words or ["python", "-m", "benchmarks", *(argv or sys.argv[1:])])
    started = _table.now()
    rundir = tempfile.mkdtemp(prefix=RUNDIR_PREFIX, dir="/tmp")  # short: AF_UNIX paths
    os.environ["MPROC_RUNTIME_DIR"] = rundir
    info = _table.machine()
    versions = {
        "mproc": f"{mproc.__version__} ({_commit() or 'not a git checkout'})",
        "psutil": psutil.__version__,
        "pyzmq": _messaging.zmq_version(),
    }
    print(f"$ {command}")
    print(f"date: {started}")
    load_before = os.getloadavg()
    print(
        f"machine: {info['cpu_count']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"{info['system']} {info['kernel']}; load average {load_before[0]:.2f} "
        "(other work on the machine skews the figures)"
    )
    print(
        f"each figure: median of {cfg.reps} repetitions; mproc and peers interleaved; "
        f"versions: {', '.join(f'{k} {v}' for k, v in versions.items())}"
    )
    print(flush=True)

    rows: list[Row] = []
    crashed: list[str] = []
    t0 = time.monotonic()
    try:
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            t = time.monotonic()
            try:
                rows += BENCHMARKS[name](cfg, rundir)
            except Exception as err:
                traceback.print_exc()
                crashed.append(name)
                why = f"{type(err).__name__}: {err}"
                ran = Target("check", "", 0, "ran")
                rows.append(Row(name, "CRASHED", "", [], target=ran, ok=False, note=why))
            print(f"  {name}: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    finally:
        cleanup = _cleanup(rundir)
    duration = time.monotonic() - t0
    load_after = os.getloadavg()

    print(_table.render(rows))
    print()
    leaks = cleanup["stray_children"] or cleanup["files_left"]
    print(
        f"cleanup: {len(cleanup['stray_children'])} stray children, "
        f"{len(cleanup['files_left'])} files left in the runtime dir"
        + (f" {cleanup}" if leaks else "")
    )
    _table.write_json(
        args.json,
        rows,
        command=command,
        started=started,
        settings={k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        versions=versions,
        cleanup=cleanup,
        duration=duration,
        load=(load_before[0], load_after[0]),
    )
    print(
        f"took {duration:.0f} s; load average at the end {load_after[0]:.2f}; "
        f"results written to {args.json}"
    )
    return 1 if crashed or leaks else 0


if __name__ == "__main__":
    sys.exit(main())
