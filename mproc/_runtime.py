"""Where mailboxes live and who may talk to them: runtime dir, key file, socket and name files.

Everything here is about *where* a mailbox lives and *who* may talk to it;
:mod:`mproc._wire` says what is said, :mod:`mproc._sender` and
:mod:`mproc._receiver` say it.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

import psutil

from . import _wire
from ._errors import MailboxError, UnsafeRuntimeDir

__all__ = [
    "DEFAULT_IDLE_LIMIT",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WINDOW",
    "HANDSHAKE_TIMEOUT",
    "Runtime",
    "names_dir",
    "peer_credentials",
    "pin_runtime_dir",
    "proc_identity",
    "remove_stale",
    "runtime",
    "runtime_dir",
    "socket_path",
]

#: The environment variable that names the runtime directory.
ENV_RUNTIME_DIR = "MPROC_RUNTIME_DIR"
#: A send() waits this long for a mailbox to open, or for queue space.
DEFAULT_TIMEOUT = 5.0
#: Messages waiting per group before senders are slowed down (gproc's default).
DEFAULT_MAX_QUEUE = 10_000
#: The largest frame a mailbox accepts (and a sender will produce).
DEFAULT_MAX_FRAME = 1 << 30
#: How long a peer may take over the whole handshake before it is dropped.
HANDSHAKE_TIMEOUT = 5.0
#: What a sender grants the handshake at least, even with send(timeout=0).
HANDSHAKE_MIN = 1.0
#: Messages per group a sender may send ahead of the receiver's credit.
DEFAULT_WINDOW = 1024
#: A peer silent for this long in the middle of a frame is dropped.
DEFAULT_IDLE_LIMIT = 30.0

# sun_path is 108 bytes on Linux, 104 on the BSDs and macOS; one byte is the NUL.
_SUN_PATH_MAX = 107 if sys.platform.startswith("linux") else 103
_KEY_NAME = "key"
_SOCK_SUFFIX = ".sock"
_SEP = os.sep
# Registered names (mproc._names): a subdirectory, so socket scans never see them.
_NAMES_DIR = "names"


@dataclass(frozen=True)
class Runtime:
    """A validated runtime directory and the per-user secret that guards it."""

    directory: str
    key: bytes


# The key per runtime directory, keyed by the directory's identity too, so a
# directory that was deleted and made again is checked and keyed again.
_runtime_cache: dict[tuple[str, int, int], Runtime] = {}


def runtime_dir() -> str:
    """Return the runtime directory this process uses now (not checked, not created)."""
    explicit = os.environ.get(ENV_RUNTIME_DIR)
    if explicit:
        global _absolute
        last = _absolute  # one read: another thread may replace it meanwhile
        if explicit == last[0]:
            return last[1]
        path = os.path.abspath(explicit)
        if os.path.isabs(explicit):  # a relative one depends on the working directory
            _absolute = (explicit, path)
        return path
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "mproc")
    return os.path.join(tempfile.gettempdir(), f"mproc-{os.getuid()}")


def pin_runtime_dir() -> None:
    """Set ``MPROC_RUNTIME_DIR`` to :func:`runtime_dir`, so that it stays what it is now.

    For a forked child, which inherited its launcher's environment and
    working directory: a later ``chdir`` or change of ``XDG_RUNTIME_DIR``
    must not take it away from its launcher's mailbox. Usually the variable
    holds that very path already (an mproc launcher passes it on), and is
    left alone.
    """
    explicit = os.environ.get(ENV_RUNTIME_DIR)
    if explicit and os.path.isabs(explicit) and os.path.normpath(explicit) == explicit:
        return  # what abspath() would return, i.e. runtime_dir()
    os.environ[ENV_RUNTIME_DIR] = runtime_dir()


# The last absolute MPROC_RUNTIME_DIR and its normalised form (os.path.abspath).
_absolute = ("", "")


def _check_dir(path: str, what: str = "the mailbox runtime directory") -> os.stat_result:
    try:
        st = os.lstat(path)  # the common case: it is there (makedirs would stat it twice)
    except FileNotFoundError:
        st = _make_dir(path, what)
    except OSError as err:
        raise MailboxError(f"cannot inspect {what} {path}: {err.strerror}", path=path) from err
    _check_stat(path, what, st)
    return st


def _make_dir(path: str, what: str) -> os.stat_result:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:
        pass  # a file, or a symlink to nothing: lstat says which, below
    except OSError as err:
        raise MailboxError(
            f"cannot create {what} {path}: {err.strerror}; "
            "set MPROC_RUNTIME_DIR to a directory you own",
            path=path,
        ) from err
    try:
        return os.lstat(path)
    except OSError as err:
        raise MailboxError(f"cannot inspect {what} {path}: {err.strerror}", path=path) from err


def _check_stat(path: str, what: str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeRuntimeDir(f"refusing {what} {path}: it is a symlink", path=path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeRuntimeDir(f"refusing {what} {path}: it is not a directory", path=path)
    if st.st_uid != os.getuid():
        raise UnsafeRuntimeDir(
            f"refusing {what} {path}: it is owned by uid "
            f"{st.st_uid}, not by you (uid {os.getuid()})",
            path=path,
        )
    if st.st_mode & 0o022:
        raise UnsafeRuntimeDir(
            f"refusing {what} {path}: it is writable by others "
            f"(mode {stat.S_IMODE(st.st_mode):o}); run chmod 700 on it",
            path=path,
        )


def _read_key(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as err:  # ELOOP: a symlink; EISDIR...
        raise UnsafeRuntimeDir(
            f"refusing the mailbox key file {path}: {err.strerror}; it must be a regular "
            "file owned by you with mode 600 (delete it to have a new one made)",
            path=path,
        ) from err
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeRuntimeDir(
                f"refusing the mailbox key file {path}: it is not a regular file", path=path
            )
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise UnsafeRuntimeDir(
                f"refusing the mailbox key file {path}: it must be owned by you "
                f"with mode 600 (it has uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})",
                path=path,
            )
        key = os.read(fd, 64)
    finally:
        os.close(fd)
    if len(key) < 32:
        raise UnsafeRuntimeDir(
            f"the mailbox key file {path} is truncated ({len(key)} bytes); delete it", path=path
        )
    return key


def _load_key(directory: str) -> bytes:
    path = os.path.join(directory, _KEY_NAME)
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    # Write a private temp file, then link() it into place: link fails with
    # EEXIST if another process won the race, and nobody ever sees a partial key.
    fd, tmp = tempfile.mkstemp(prefix=".key-", dir=directory)
    try:
        os.write(fd, os.urandom(32))
        os.fsync(fd)
        os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return _read_key(path)


def runtime() -> Runtime:
    """Return the validated runtime directory and key, creating them if needed.

    Raises:
        UnsafeRuntimeDir: the directory is refused (symlink, foreign owner, writable
            by others, too long for an AF_UNIX path) or so is its key file.
        MailboxError: the directory cannot be created, or AF_UNIX is missing.
    """
    global _last_checked
    if not hasattr(socket, "AF_UNIX"):
        raise MailboxError("the mproc mailbox needs AF_UNIX sockets, which this platform lacks")
    directory = runtime_dir()
    # Every connect() checks the directory again, so keep that to one lstat():
    # a directory whose lstat() matches, field for field, what passed every
    # check below (for the same uid of ours) passes them again.
    last = _last_checked
    if last is not None and last[0] == directory:
        try:
            st = os.lstat(directory)
        except OSError:
            pass  # gone, say: the whole way below says what is wrong
        else:
            if last[1] == (st.st_dev, st.st_ino, st.st_uid, st.st_mode, os.getuid()):
                return last[2]
    # The longest name we make: "<pid>.<start>.sock" with 10 + 20 digits.
    longest = len(os.fsencode(directory)) + 1 + 10 + 1 + 20 + len(_SOCK_SUFFIX)
    if longest > _SUN_PATH_MAX:
        raise UnsafeRuntimeDir(
            f"the mailbox runtime directory {directory} is too long for an AF_UNIX socket "
            f"path (at most {_SUN_PATH_MAX} bytes in all); set MPROC_RUNTIME_DIR to a "
            "shorter directory",
            path=directory,
        )
    st = _check_dir(directory)
    ident = (directory, st.st_dev, st.st_ino)
    rt = _runtime_cache.get(ident)
    if rt is None:
        rt = _runtime_cache[ident] = Runtime(directory, _load_key(directory))
        _wire.keyed(rt.key)  # now, so that forked children inherit it
    _last_checked = (directory, (st.st_dev, st.st_ino, st.st_uid, st.st_mode, os.getuid()), rt)
    return rt


# The directory runtime() last checked, its lstat() fields and our uid then, and its Runtime.
_last_checked: Optional[tuple[str, tuple[int, int, int, int, int], Runtime]] = None


def names_dir(runtime: Runtime) -> str:
    """Return the checked directory of registered-name files, creating it (mode 700).

    It is ``<runtime dir>/names``, checked as the runtime directory is.

    Raises:
        UnsafeRuntimeDir: it is a symlink, not a directory, owned by another
            user, or writable by others.
        MailboxError: it cannot be created.
    """
    path = os.path.join(runtime.directory, _NAMES_DIR)
    _check_dir(path, "the registered-names directory")
    return path


def proc_identity(pid: int) -> Optional[str]:
    """Return a token naming process ``pid`` for its lifetime, or ``None`` if it is gone.

    The token is the process's start time (clock ticks since boot on Linux), so a
    later process that reuses the PID gets a different one. A zombie counts as gone.
    """
    if _HAVE_PROC:
        return _proc_stat_identity(pid)
    return _psutil_identity(pid)


_HAVE_PROC = sys.platform.startswith("linux")
_O_PROC = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


def _proc_stat_identity(pid: int) -> Optional[str]:
    # os.open/os.read, not open(): no file objects (a sender's first connect
    # in a freshly forked child pays for every page it touches).
    try:
        fd = os.open(f"/proc/{pid}/stat", _O_PROC)
        try:
            data = os.read(fd, 4096)  # ~300 bytes; the kernel hands it over in one read
        finally:
            os.close(fd)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as err:
        if err.errno in (errno.ESRCH, errno.ENOENT):
            return None
        raise
    # The command name is in parentheses and may contain spaces or ')'. The
    # start time is the 20th field after it: split no further than that.
    fields = data[data.rindex(b")") + 2 :].split(None, 20)
    if fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


def _psutil_identity(pid: int) -> Optional[str]:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return str(int(proc.create_time() * 1_000_000))
    except psutil.NoSuchProcess:
        return None


def socket_path(rt: Runtime, pid: int, identity: str) -> str:
    """Return the socket path of the mailbox of process ``pid`` with start token ``identity``."""
    # os.path.join's result, without its generic machinery (every new connection asks).
    sep = "" if rt.directory.endswith(_SEP) else _SEP
    return f"{rt.directory}{sep}{pid}.{identity}{_SOCK_SUFFIX}"


def parse_socket_name(name: str) -> Optional[tuple[int, str]]:
    """Return ``(pid, identity)`` for a mailbox socket file name, else ``None``."""
    if not name.endswith(_SOCK_SUFFIX):
        return None
    pid_text, _, identity = name[: -len(_SOCK_SUFFIX)].partition(".")
    if not pid_text.isdigit() or not identity:
        return None
    return int(pid_text), identity


def remove_stale(rt: Runtime) -> list[str]:
    """Remove socket files of processes that are gone or whose PID was reused.

    Returns:
        The paths removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(rt.directory)
    except OSError:
        return removed
    for name in names:
        parsed = parse_socket_name(name)
        if parsed is None:
            continue
        pid, identity = parsed
        if proc_identity(pid) != identity:
            path = os.path.join(rt.directory, name)
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


if sys.platform.startswith("linux"):
    _PEERCRED = struct.Struct("3i")

    def peer_credentials(sock: socket.socket) -> tuple[int, int]:
        """Return ``(pid, uid)`` of the process at the other end of ``sock`` (SO_PEERCRED)."""
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        pid, uid, _gid = _PEERCRED.unpack(raw)
        return pid, uid

else:  # pragma: no cover - exercised on macOS/BSD only
    _LOCAL_PEERPID = 0x002  # <sys/un.h>, SOL_LOCAL level 0

    def peer_credentials(sock: socket.socket) -> tuple[int, int]:
        """Return ``(pid, uid)`` of the process at the other end of ``sock``."""
        pid = struct.unpack("i", sock.getsockopt(0, _LOCAL_PEERPID, 4))[0]
        # getpeereid() is what Python lacks; psutil reads the uid of the pid instead.
        uid = psutil.Process(pid).uids().real
        return pid, uid
