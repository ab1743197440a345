"""Who am I, who launched me, and where are the binaries (SPEC §1)."""

from __future__ import annotations

import os
import time
from typing import Optional, Union

import psutil

__all__ = [
    "ENV_PPID",
    "is_child",
    "pid",
    "ppid",
    "ppid_os",
    "search_binary",
    "search_binary_path",
    "set_ppid",
    "start_time",
    "uptime",
]

#: The environment variable through which a launcher tells its child who it is.
ENV_PPID = "MPROC_PPID"

# The start time is cached per PID: it never changes for one process, and a
# forked child (new PID) recomputes its own.
_start_time_cache: tuple[int, float] = (-1, 0.0)


def pid() -> int:
    """Return this process's PID (always current, also after ``fork``)."""
    return os.getpid()


def ppid_os() -> int:
    """Return the PID of this process's OS parent (``os.getppid()``)."""
    return os.getppid()


def _env_ppid() -> int:
    value = os.environ.get(ENV_PPID, "")
    try:
        return int(value)
    except ValueError:
        return 0


def is_child() -> bool:
    """Return whether this process was started through mproc (``MPROC_PPID`` is set)."""
    return _env_ppid() > 0


def ppid() -> int:
    """Return the PID of the mproc launcher when :func:`is_child`, else the OS parent."""
    launcher = _env_ppid()
    return launcher if launcher > 0 else os.getppid()


def set_ppid(pid: int) -> None:
    """Set (``pid > 0``) or remove (``pid == 0``) ``MPROC_PPID`` in this process's environment.

    Raises:
        TypeError: ``pid`` is not an int.
        ValueError: ``pid`` is negative.
    """
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise TypeError(f"set_ppid() needs an int PID, got {type(pid).__name__}: {pid!r}")
    if pid < 0:
        raise ValueError(f"set_ppid() needs a PID >= 0 (0 removes it), got {pid}")
    if pid == 0:
        os.environ.pop(ENV_PPID, None)
    else:
        os.environ[ENV_PPID] = str(pid)


def start_time() -> float:
    """Return this process's creation time in epoch seconds, as the OS records it.

    The value is the one ``psutil.Process().create_time()`` reports, and is
    stable across calls.
    """
    global _start_time_cache
    me = os.getpid()
    cached_pid, cached = _start_time_cache
    if cached_pid != me:
        cached = psutil.Process(me).create_time()
        _start_time_cache = (me, cached)
    return cached


def uptime() -> float:
    """Return the seconds since :func:`start_time` (always > 0)."""
    return max(time.time() - start_time(), 1e-9)


PathLike = Union[str, "os.PathLike[str]"]


def search_binary(name: PathLike) -> Optional[str]:
    """Return ``name`` if it is an existing file, else :func:`search_binary_path` of it.

    Args:
        name: a path (absolute, or relative to the working directory) or a
            bare program name.
    """
    name = os.fspath(name)
    if not name:
        return None
    if os.path.isfile(name):
        return name
    return search_binary_path(name)


def search_binary_path(name: PathLike) -> Optional[str]:
    """Return the full path of the first executable ``name`` in ``PATH``, or ``None``.

    Args:
        name: a bare program name; a name with a ``/`` in it is not searched.
    """
    name = os.fspath(name)
    if not name or os.sep in name:
        return None
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or os.curdir, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    return None
