"""Argument validation shared by every module: one validator per kind of argument.

Each validator returns the normalised value or raises ``TypeError`` /
``ValueError`` with a message that names the function, the argument and
how to fix it. None of them has a side effect, so public functions call
them before doing anything else: bad input never half-does an operation.
"""

from __future__ import annotations

import math
import signal
from typing import Optional, overload

__all__ = ["group", "pid", "positive_int", "signum", "timeout"]

# Signals a handler can never be installed for (SIGKILL/SIGSTOP, where they exist).
_UNCATCHABLE = frozenset(
    int(getattr(signal, name)) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name)
)
#: The longest group name, in UTF-8 bytes (the wire carries it in 16 bits).
MAX_GROUP_BYTES = 0xFFFF
#: The longest wait mproc makes in one go (20 days): a larger timeout counts as this.
FOREVER = 20 * 24 * 3600.0


@overload
def timeout(value: None, func: str = ..., name: str = ...) -> None: ...
@overload
def timeout(value: float, func: str = ..., name: str = ...) -> float: ...


def timeout(value: Optional[float], func: str = "mproc", name: str = "timeout") -> Optional[float]:
    """Check a timeout in seconds: ``None`` (no limit) or a number >= 0.

    ``inf`` and anything over :data:`FOREVER` (20 days) count as 20 days.

    Raises:
        TypeError: not a number (``bool`` counts as not a number).
        ValueError: negative or NaN.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{func}(): {name} must be a number of seconds or None, "
            f"got {type(value).__name__}: {value!r}"
        )
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{func}(): {name} must be a number of seconds, got NaN")
    if value < 0:
        raise ValueError(f"{func}(): {name} must be >= 0 seconds, got {value:g}")
    # poll(), epoll and socket timeouts overflow past ~24 days (an int of
    # milliseconds): a longer timeout, inf included, waits that long.
    return min(value, FOREVER)


def pid(value: object, func: str = "mproc", name: str = "pid") -> int:
    """Check a process ID: an ``int`` (not ``bool``) greater than 0.

    PIDs 0 and -1 are refused: ``os.kill`` would signal a whole process group,
    or every process the user may signal.
    """
    if value.__class__ is int and value > 0:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{func}(): {name} must be an int PID, got {type(value).__name__}: {value!r}"
        )
    if value <= 0:
        raise ValueError(f"{func}(): {name} must be a PID > 0, got {value}")
    return int(value)


_GROUPS: dict[str, bytes] = {"": b""}  # the names seen last, encoded


def group(value: object, func: str = "mproc") -> bytes:
    """Check a mailbox group name and return it encoded for the wire.

    Any ``str`` is a group, lone surrogates included (they round-trip with
    ``surrogatepass``); it must fit in 65 535 UTF-8 bytes.
    """
    if value.__class__ is str:
        raw = _GROUPS.get(value)
        if raw is not None:
            return raw
    if not isinstance(value, str):
        raise TypeError(f"{func}(): group must be a str, got {type(value).__name__}: {value!r}")
    raw = value.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_GROUP_BYTES:
        raise ValueError(
            f"{func}(): group name is {len(raw)} bytes long in UTF-8; "
            f"at most {MAX_GROUP_BYTES} are allowed"
        )
    if len(_GROUPS) > 256:
        _GROUPS.clear()
        _GROUPS[""] = b""
    if value.__class__ is str:
        _GROUPS[value] = raw
    return raw


def signum(value: object, func: str = "mproc", *, catchable: bool = False) -> int:
    """Check a signal number valid on this platform (and catchable, if asked)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{func}(): needs a signal number such as signal.SIGTERM, "
            f"got {type(value).__name__}: {value!r}"
        )
    if value not in signal.valid_signals():
        raise ValueError(f"{func}(): {value} is not a valid signal number on this platform")
    if catchable and value in _UNCATCHABLE:
        raise ValueError(
            f"{func}(): {signal.Signals(value).name} cannot be caught, choose another signal"
        )
    return int(value)


def positive_int(value: object, func: str, name: str) -> int:
    """Check a count or size: an ``int`` (not ``bool``) >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{func}(): {name} must be an int, got {type(value).__name__}: {value!r}")
    if value < 1:
        raise ValueError(f"{func}(): {name} must be >= 1, got {value}")
    return int(value)
