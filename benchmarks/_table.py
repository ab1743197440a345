"""The report: one text table for the terminal, the same rows as JSON, machine info."""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Sequence
from typing import Any, Optional

from ._common import Row, fmt_number

_HEADERS = (
    "benchmark",
    "figure",
    "unit",
    "mproc",
    "peer",
    "peer figure",
    "ratio",
    "target",
    "result",
)


def machine() -> dict[str, Any]:
    """Return what the figures depend on: CPUs, their model, Python, kernel."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "system": platform.system(),
        "machine": platform.machine(),
    }


def now() -> str:
    """Return the local date and time, ISO 8601 with the offset."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _cells(row: Row) -> tuple[str, ...]:
    ratio = row.ratio
    return (
        row.bench,
        row.metric,
        row.unit,
        fmt_number(row.value),
        row.peer or "-",
        fmt_number(row.peer_value) if row.peer else "-",
        f"{ratio:.2f}x" if ratio is not None else "-",
        row.target.text(row.unit) if row.target else "-",
        row.result,
    )


def render(rows: Sequence[Row]) -> str:
    """Return the table as aligned text, notes under it."""
    body = [_cells(r) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(_HEADERS)]
    numeric = {3, 5, 6}

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths)):
            out.append(c.rjust(w) if i in numeric else c.ljust(w))
        return "  ".join(out).rstrip()

    lines = [line(_HEADERS), "  ".join("-" * w for w in widths)]
    previous = None
    for r, cells in zip(rows, body):
        if previous is not None and r.bench != previous:
            lines.append("")
        previous = r.bench
        lines.append(line(cells))
    notes = [f"  {r.bench}: {r.metric}: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def write_json(
    path: str,
    rows: Sequence[Row],
    *,
    command: str,
    started: str,
    settings: dict[str, Any],
    versions: dict[str, Optional[str]],
    cleanup: dict[str, Any],
    duration: float,
    load: tuple[float, float],
) -> None:
    """Write the rows, their samples and the run's context to ``path``."""
    doc = {
        "command": command,
        "date": started,
        "duration_s": round(duration, 1),
        "machine": machine(),
        "load_average_1min": {"start": load[0], "end": load[1]},
        "versions": versions,
        "settings": settings,
        "rows": [r.as_json() for r in rows],
        "cleanup": cleanup,
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
