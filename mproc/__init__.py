"""mproc: GoFrame's gproc for Python, as an extension of multiprocessing.

Identity, shell helpers, worker processes, external commands and adopted
PIDs, a :class:`ProcessManager` that holds any mix of them, signal helpers,
and a PID-addressed mailbox (``send(pid, obj)`` / ``receive()``).
"""

from ._batch import Batch as Batch
from ._command import Command as Command
from ._errors import CalleeDied as CalleeDied
from ._errors import CallTimeout as CallTimeout
from ._errors import HandshakeError as HandshakeError
from ._errors import MailboxClosed as MailboxClosed
from ._errors import MailboxError as MailboxError
from ._errors import MailboxFull as MailboxFull
from ._errors import MailboxGone as MailboxGone
from ._errors import MailboxNotFound as MailboxNotFound
from ._errors import MailboxTimeout as MailboxTimeout
from ._errors import MessageError as MessageError
from ._errors import MprocError as MprocError
from ._errors import NameNotFound as NameNotFound
from ._errors import NameTaken as NameTaken
from ._errors import NoSuchProcess as NoSuchProcess
from ._errors import ReceiveTimeout as ReceiveTimeout
from ._errors import RemoteError as RemoteError
from ._errors import ShellError as ShellError
from ._errors import ShellTimeout as ShellTimeout
from ._errors import StopServing as StopServing
from ._errors import SupervisorGaveUp as SupervisorGaveUp
from ._errors import UnsafeRuntimeDir as UnsafeRuntimeDir
from ._identity import is_child as is_child
from ._identity import pid as pid
from ._identity import ppid as ppid
from ._identity import ppid_os as ppid_os
from ._identity import search_binary as search_binary
from ._identity import search_binary_path as search_binary_path
from ._identity import set_ppid as set_ppid
from ._identity import start_time as start_time
from ._identity import uptime as uptime
from ._mailbox import Msg as Msg
from ._mailbox import call as call
from ._mailbox import close_mailbox as close_mailbox
from ._mailbox import open_mailbox as open_mailbox
from ._mailbox import receive as receive
from ._mailbox import send as send
from ._mailbox import serve as serve
from ._mailbox import stats as stats
from ._manager import ProcessManager as ProcessManager
from ._monitor import Down as Down
from ._monitor import Monitor as Monitor
from ._monitor import demonitor as demonitor
from ._monitor import monitor as monitor
from ._names import register as register
from ._names import registered as registered
from ._names import unregister as unregister
from ._names import whereis as whereis
from ._process import AdoptedProcess as AdoptedProcess
from ._process import Process as Process
from ._process import ProcessHandle as ProcessHandle
from ._shell import shell as shell
from ._shell import shell_exec as shell_exec
from ._shell import shell_run as shell_run
from ._signals import add_sig_handler as add_sig_handler
from ._signals import add_sig_handler_shutdown as add_sig_handler_shutdown
from ._signals import listen as listen
from ._supervisor import Supervisor as Supervisor
from ._tree import kill_tree as kill_tree

__version__ = "0.1.0"

__all__ = [
    "CallTimeout",
    "CalleeDied",
    "NameNotFound",
    "NameTaken",
    "RemoteError",
    "StopServing",
    "SupervisorGaveUp",
    "HandshakeError",
    "MailboxClosed",
    "MailboxGone",
    "MailboxTimeout",
    "UnsafeRuntimeDir",
    "MailboxError",
    "MailboxFull",
    "MailboxNotFound",
    "MessageError",
    "MprocError",
    "NoSuchProcess",
    "ReceiveTimeout",
    "ShellError",
    "ShellTimeout",
    "__version__",
    "is_child",
    "pid",
    "ppid",
    "ppid_os",
    "search_binary",
    "search_binary_path",
    "set_ppid",
    "start_time",
    "uptime",
    "shell",
    "shell_exec",
    "shell_run",
    "AdoptedProcess",
    "Batch",
    "Command",
    "Process",
    "ProcessHandle",
    "ProcessManager",
    "Supervisor",
    "kill_tree",
    "add_sig_handler",
    "add_sig_handler_shutdown",
    "listen",
    "Msg",
    "call",
    "serve",
    "stats",
    "close_mailbox",
    "open_mailbox",
    "receive",
    "send",
    "register",
    "registered",
    "unregister",
    "whereis",
    "Down",
    "Monitor",
    "demonitor",
    "monitor",
]


def _fixup_module_metadata() -> None:
    """Public names say ``mproc.X`` in reprs and tracebacks (trio's idea)."""
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("mproc._"):
            try:
                obj.__module__ = "mproc"
            except (AttributeError, TypeError):
                pass


_fixup_module_metadata()
