"""What every subcommand of the ``mproc`` command line shares: argument types, output, errors.

Argument types are ``argparse`` ``type=`` callables: a malformed value is an
``ArgumentTypeError``, which the parser turns into one ``mproc: …`` line and
exit status 2, before the subcommand does anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import signal
import sys
from typing import Any, NoReturn, Optional, Union

from ._check import FOREVER

__all__ = [
    "EXIT_FAIL",
    "EXIT_USAGE",
    "CliError",
    "emit",
    "emit_json",
    "exit_codes",
    "fmt_time",
    "pid_arg",
    "printable",
    "read_value",
    "seconds_arg",
    "show",
    "signal_arg",
    "signal_name",
    "target_arg",
    "to_json",
]

#: A command failed (an mproc error, a process that does not exist...).
EXIT_FAIL = 1
#: The command line itself is wrong: nothing was done.
EXIT_USAGE = 2

_NUMBER = re.compile(r"[+-]?[0-9]+")


class CliError(Exception):
    """An error the command line reports as one ``mproc: <message>`` line.

    Attributes:
        status: the exit status (1: the command failed, 2: bad usage).
    """

    def __init__(self, msg: str, status: int = EXIT_FAIL) -> None:
        Exception.__init__(self, msg)
        self.status = status


# ---------------------------------------------------------------- argument types


def seconds_arg(text: str) -> float:
    """A duration in seconds: a number >= 0 (``inf`` allowed, ``nan`` not)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds (e.g. 5 or 0.5)"
        ) from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return min(value, FOREVER)  # inf: no limit in practice (20 days)


def pid_arg(text: str) -> int:
    """A process ID: decimal digits making a number > 0."""
    word = text.strip()
    if _NUMBER.fullmatch(word):
        value = int(word)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a PID: it must be > 0")
        return value
    raise argparse.ArgumentTypeError(f"{text!r} is not a PID (a number > 0)")


def target_arg(text: str) -> Union[int, str]:
    """A PID (digits) or a registered name (anything else)."""
    if _NUMBER.fullmatch(text.strip()):
        return pid_arg(text)
    if not text:
        raise argparse.ArgumentTypeError("an empty string is neither a PID nor a name")
    if "/" in text or "\0" in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a PID, nor a name (names contain no '/' or NUL)"
        )
    return text


def signal_arg(text: str) -> int:
    """A signal: a name (``TERM``, ``SIGTERM``, ``term``) or a number (``15``)."""
    word = text.strip().upper()
    if word.isdecimal():
        number = int(word)
    else:
        name = word if word.startswith("SIG") else "SIG" + word
        found = getattr(signal.Signals, name, None) if name.isidentifier() else None
        if not isinstance(found, signal.Signals):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a signal name or number (e.g. TERM, INT, KILL, HUP, 15)"
            )
        number = int(found)
    if number == 0 or number not in signal.valid_signals():
        raise argparse.ArgumentTypeError(f"{text!r} is not a signal of this system")
    return number


def signal_name(sig: int) -> str:
    """``SIGTERM`` for 15; ``signal 40`` for a number without a name."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


# ---------------------------------------------------------------- values


def read_value(text: str, raw: bool) -> Any:
    """Return what ``send``/``call`` sends: ``text``, or stdin for ``-``.

    Not ``raw``: a JSON value if ``text`` parses as JSON, else the string.
    From stdin, one trailing newline is dropped (unless ``raw``).

    Raises:
        CliError: stdin is closed, unreadable, empty or not UTF-8.
    """
    if text == "-":
        text = _read_stdin()
        if not raw and text.endswith("\n"):
            text = text[:-2] if text.endswith("\r\n") else text[:-1]
    if raw:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _read_stdin() -> str:
    stream = sys.stdin
    if stream is None:
        raise CliError("cannot read the value from stdin: stdin is closed")
    try:
        data = stream.buffer.read()
    except (OSError, ValueError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise CliError(f"cannot read the value from stdin: {why}") from None
    if not data:
        raise CliError("stdin is empty: there is no value to send (give VALUE, or pipe one in)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CliError(
            f"stdin is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


def _plain(value: Any) -> Any:
    """``value`` with what JSON cannot hold made so: non-str keys and NaN as ``repr()``,
    lone surrogates escaped."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_text(k if isinstance(k, str) else repr(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and (value != value or abs(value) == float("inf")):
        return repr(value)
    return value


def _text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 output could hold it
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def to_json(value: Any) -> str:
    """One line of valid JSON; what JSON cannot hold becomes its ``repr()`` string.

    A lone surrogate in a group name or a value is escaped, never an encoding error.
    """
    return json.dumps(_plain(value), default=repr, ensure_ascii=False, allow_nan=False)


def show(value: Any) -> str:
    """The text form of a received value: a str as it is, else JSON (else ``repr``)."""
    if isinstance(value, str):
        return printable(value)
    try:
        return to_json(value)
    except (TypeError, ValueError, RecursionError):
        return printable(repr(value))


def printable(text: str) -> str:
    """``text`` with control characters escaped (a command line spanning lines stays on one)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def fmt_time(epoch: Optional[float]) -> str:
    """Local time ``YYYY-mm-dd HH:MM:SS``, or ``-``."""
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------- output


def exit_codes(*codes: tuple[Union[int, str], str]) -> str:
    """The ``--help`` epilog listing a subcommand's exit statuses."""
    width = max(len(str(code)) for code, _ in codes)
    lines = ["exit status:"]
    for code, what in codes:
        text = what.replace("\n", "\n" + " " * (width + 4))
        lines.append(f"  {code!s:<{width}}  {text}")
    return "\n".join(lines)


def emit(line: str = "") -> None:
    """Print one line to stdout at once (a reader sees it before we go on)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def emit_json(value: Any) -> None:
    """Print ``value`` as one line of JSON."""
    emit(to_json(value))


def warn(message: str) -> None:
    """Print ``mproc: message`` to stderr (an error that does not end the command)."""
    sys.stderr.write(f"mproc: {message}\n")
    sys.stderr.flush()


def die(message: str, status: int = EXIT_FAIL) -> NoReturn:
    """End the command with ``mproc: message`` and ``status``."""
    raise CliError(message, status)


def is_tty(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (false for a closed or fd-less stream)."""
    try:
        return stream is not None and os.isatty(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
