"""The ``mproc`` command line (SPEC §14): ``python -m mproc`` and the ``mproc`` script.

Subcommands, in :mod:`mproc._cli_mailbox` (``ps``, ``send``, ``recv``,
``call``), :mod:`mproc._cli_process` (``kill``, ``wait``), :mod:`mproc._cli_tree`
(``tree``) and :mod:`mproc._cli_exec` (``exec``). This module builds the parser and holds
the error policy: whatever goes wrong is one ``mproc: <message>`` line on
stderr and a non-zero exit status, never a traceback — 2 for bad usage
(nothing was done), 1 for a failure, 130 for Ctrl-C, 128+N for a signal N
that asked us to stop. Output cut short by its reader (``mproc ps | head``)
ends the command quietly, as it ends ``cat``: status 141 (128+SIGPIPE).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn, Optional

from . import _cli_exec, _cli_mailbox, _cli_process, _cli_tree
from ._cli_util import EXIT_FAIL, EXIT_USAGE, CliError
from ._errors import MprocError

__all__ = ["main"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
# Signals that ask this command to stop: it exits cleanly (its mailbox closed,
# its names released) with 128+N. `exec` forwards them to its command instead.
_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


class _Stopped(BaseException):
    """A stop signal arrived (a BaseException: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        BaseException.__init__(self, signum)
        self.signum = signum


def _stop(signum: int, _frame: Optional[FrameType]) -> None:
    raise _Stopped(signum)


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions; keeps the exit-status table of an epilog as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("exit status:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``mproc: …`` line and status 2."""

    def error(self, message: str) -> NoReturn:
        sub = self.prog[len("mproc") :].strip() if self.prog.startswith("mproc") else self.prog
        where = f"{sub}: " if sub else ""
        raise CliError(f"{where}{message} (see: {self.prog} --help)", EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="mproc",
        formatter_class=_Formatter,
        description=(
            "Look at and talk to mproc mailboxes, and handle processes safely "
            "(pidfd-pinned signals and waits). Each subcommand has --help; errors are "
            "one 'mproc: …' line on stderr; --json wherever data is printed."
        ),
        epilog=(
            "exit status:\n"
            "  0    success\n"
            "  1    the command failed (the message says why)\n"
            "  2    bad usage: nothing was done\n"
            "  130  interrupted (Ctrl-C)\n"
            "  141  the reader of the output went away (mproc ps | head)\n"
            "  exec passes its command's status on; kill and wait add their own\n"
            "  (see their --help)"
        ),
    )
    parser.add_argument("--version", action="version", version=f"mproc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _cli_mailbox.add_commands(sub, _Formatter)
    _cli_process.add_commands(sub, _Formatter)
    _cli_tree.add_commands(sub, _Formatter)
    _cli_exec.add_commands(sub, _Formatter)
    return parser


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"mproc: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass  # stderr is closed too: the status says it


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the exit-time flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _run(argv: Optional[Sequence[str]]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # --help, --version: printed; flushed below
        code = done.code
        status = code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    else:
        status = args.func(args)
    if sys.stdout is not None:  # None: started with stdout closed
        sys.stdout.flush()  # here, where a broken pipe is still ours to report
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit status (see ``mproc --help``).

    Args:
        argv: the arguments (default ``sys.argv[1:]``: then stop signals are
            handled too, and Ctrl-C is ignored once the command is done).

    Returns:
        0 on success; 1 when the command failed; 2 for bad usage; 130 on
        Ctrl-C; 128+N after a stop signal N; 141 when the output's reader
        went away; ``exec``, ``kill`` and ``wait`` document their own.
    """
    entry = argv is None
    try:
        try:
            if entry:
                for sig in _STOP_SIGNALS:
                    signal.signal(sig, _stop)
            status = _run(argv)
        except CliError as err:
            _say(str(err))
            status = err.status
        except BrokenPipeError:
            _silence_stdout()
            status = EXIT_BROKEN_PIPE
        except MprocError as err:
            _say(str(err))
            status = EXIT_FAIL
        except (TypeError, ValueError) as err:  # the library refused an argument
            _say(str(err))
            status = EXIT_USAGE
        except OSError as err:
            _say(f"{err.strerror}: {err.filename}" if err.filename and err.strerror else str(err))
            status = EXIT_FAIL
        except Exception as err:  # a bug; still one line, with what it was
            _say(f"internal error: {type(err).__name__}: {err}")
            status = EXIT_FAIL
        finally:
            if entry:
                for sig in _STOP_SIGNALS:  # what is left is cleanup: let it finish
                    signal.signal(sig, signal.SIG_IGN)
    except KeyboardInterrupt:
        _say("interrupted")
        status = EXIT_INTERRUPTED
    except _Stopped as stop:
        status = 128 + stop.signum
    if entry:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # nor may Ctrl-C cut the exit short
    return status
