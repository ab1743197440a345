"""mproc: GoFrame's gproc for Python, as an extension of multiprocessing.

Identity, shell helpers, worker processes, external commands and adopted
PIDs, a :class:`ProcessManager` that holds any mix of them, signal helpers,
and a PID-addressed mailbox (``send(pid, obj)`` / ``receive()``).
"""

from ._errors import MailboxError as MailboxError
from ._errors import MailboxFull as MailboxFull
from ._errors import MailboxNotFound as MailboxNotFound
from ._errors import MessageError as MessageError
from ._errors import MprocError as MprocError
from ._errors import NoSuchProcess as NoSuchProcess
from ._errors import ReceiveTimeout as ReceiveTimeout
from ._errors import ShellError as ShellError
from ._errors import ShellTimeout as ShellTimeout
from ._identity import is_child as is_child
from ._identity import pid as pid
from ._identity import ppid as ppid
from ._identity import ppid_os as ppid_os
from ._identity import search_binary as search_binary
from ._identity import search_binary_path as search_binary_path
from ._identity import set_ppid as set_ppid
from ._identity import start_time as start_time
from ._identity import uptime as uptime

# --- shell ---
# --- processes ---
# --- manager ---
# --- signals ---
# --- mailbox ---

__version__ = "0.1.0"

__all__ = [
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
    # --- __all__ shell ---
    # --- __all__ processes ---
    # --- __all__ manager ---
    # --- __all__ signals ---
    # --- __all__ mailbox ---
]
