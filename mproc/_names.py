"""Registered names: a mailbox reachable as ``"name"`` as well as by PID (SPEC §11).

Design
------
Names live in ``<runtime dir>/names/`` (mode 700, checked like the runtime
directory: a symlink, a foreign owner or a group/world-writable mode is
refused). Each registered name is one symlink, ``n.<name>`` (the prefix
keeps ``"."``, ``".."`` and ``"lock"`` ordinary file names), whose target
is the holder's identity, ``"<pid>.<start ticks>"`` — the token that also
names its mailbox socket. Nothing is ever written into a file: creating a
symlink is atomic and fails if the name exists, and reading one is one
``readlink()``.

A name is held while its link names a live process with that start time:
a dead holder (also one killed with SIGKILL), a zombie or a PID now used by
another process all make the name free at once, without anybody cleaning.
Every resolution checks the identity, so a name never yields a reused PID.

Changes — creating a link, replacing a stale one, removing one — happen
only under an exclusive POSIX record lock (``lockf``) on ``names/lock``,
so "remove the dead holder's link, then create ours" can never remove the
link another process has just made: exactly one of several racing
processes wins. The kernel drops the lock when its holder dies. POSIX
locks (rather than ``flock``) are not inherited by a forked child, so a
fork while another thread holds the lock cannot leave the lock with a
child that knows nothing of it; being per process, they are paired with a
thread lock. Readers (``whereis``, ``registered``, ``lookup``) take no
lock; ``whereis`` and ``registered`` remove a stale link they find only if
they get the lock at once and the link still names the same dead process.

Process-global state, reset in a forked child (``os.register_at_fork``):
the links this process created (``_held``, released by :func:`release_all`
at ``close_mailbox()`` and at interpreter exit — only links that still
name this process), this process's identity, and the in-process lock. The
per-name cache of :func:`lookup` survives a fork (it holds no process state).
"""

from __future__ import annotations

import atexit
import errno
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable, Optional

from . import _runtime as rt
from ._errors import MailboxError, MailboxTimeout, NameNotFound, NameTaken
from ._log import logger as log

if sys.platform != "win32":
    import fcntl

__all__ = [
    "MAX_NAME_BYTES",
    "check_name",
    "lookup",
    "register",
    "registered",
    "release_all",
    "resolve",
    "unregister",
    "whereis",
]

#: The longest name, in UTF-8 bytes (a link's file name must fit NAME_MAX, 255).
MAX_NAME_BYTES = 200
_PREFIX = b"n."
_LOCK_FILE = b"lock"
#: How long a change waits for the names lock (held for a few syscalls at a time).
_LOCK_WAIT = rt.DEFAULT_TIMEOUT
#: release_all() runs at exit: a stuck lock must not hold the exit up for long,
#: and a link left behind is harmless (its holder is dead, so the name is free).
_RELEASE_WAIT = 1.0
#: Names whose link lookup() remembers per directory before it starts afresh.
_CACHE_MAX = 4096


# ---------------------------------------------------------------- validation


def _check_name(value: object, func: str) -> tuple[str, bytes]:
    """Return ``(name, its UTF-8 bytes)`` or raise TypeError/ValueError naming ``func``."""
    if not isinstance(value, str):
        raise TypeError(f"{func}(): name must be a str, got {type(value).__name__}: {value!r}")
    name = str.__str__(value)  # a plain str, also for a str subclass
    if not name:
        raise ValueError(f"{func}(): name must not be empty")
    if "/" in name:
        raise ValueError(f"{func}(): name {name!r} contains '/', which no name may contain")
    if "\0" in name:
        raise ValueError(f"{func}(): name {name!r} contains a NUL character, which no name may")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{func}(): name {name[:60]!r} is not valid Unicode (a lone surrogate at index "
            f"{err.start}); it must encode to UTF-8"
        ) from None
    if len(raw) > MAX_NAME_BYTES:
        raise ValueError(
            f"{func}(): name {name[:40]!r}... is {len(raw)} bytes long in UTF-8; "
            f"at most {MAX_NAME_BYTES} are allowed"
        )
    return name, raw


def check_name(value: object, func: str = "register") -> str:
    """Check a registered name: a non-empty ``str`` without ``/`` or NUL, <= 200 UTF-8 bytes.

    Raises:
        TypeError: not a ``str``.
        ValueError: empty, contains ``/`` or NUL, has a lone surrogate, or is too long.
    """
    return _check_name(value, func)[0]


# ---------------------------------------------------------------- state


class _Dir:
    """A checked names directory, and what lookup() last read of each name in it."""

    def __init__(self, key: tuple[Optional[str], Optional[str]], path: str) -> None:
        self.key = key  # the environment that chose this directory
        self.path = path
        self.bpath = os.fsencode(path)
        self.prefix = self.bpath + b"/" + _PREFIX
        # name -> (link path, last target read, its pid, its identity)
        self.links: dict[str, tuple[bytes, bytes, int, str]] = {}


class _Guard:
    """The lock on changes: a thread lock around the cross-process file lock."""

    def __init__(self) -> None:
        # Re-entrant, so a signal handler that registers while the main thread
        # is inside register() does not deadlock; it shares the file lock.
        self.mutex = threading.RLock()
        self.depth = 0
        self.fd = -1


_current: Optional[_Dir] = None
_guard = _Guard()
_held: set[bytes] = set()  # link paths this process created
_me: Optional[tuple[int, bytes]] = None  # (pid, link target naming this process)
_atexit_registered = False


def _env_key() -> tuple[Optional[str], Optional[str]]:
    return os.environ.get(rt.ENV_RUNTIME_DIR), os.environ.get("XDG_RUNTIME_DIR")


def _dir() -> _Dir:
    """Check (and create) the runtime and names directories; return the names directory."""
    global _current
    key = _env_key()
    path = rt.names_dir(rt.runtime())
    d = _current
    if d is None or d.key != key or d.path != path:
        d = _current = _Dir(key, path)
    return d


def _link(d: _Dir, raw: bytes) -> bytes:
    return d.prefix + raw


def _own() -> bytes:
    """The link target naming this process: ``b"<pid>.<start ticks>"``."""
    global _me
    pid = os.getpid()
    me = _me
    if me is None or me[0] != pid:
        identity = rt.proc_identity(pid)
        if identity is None:  # pragma: no cover - /proc hides us from ourselves
            raise MailboxError(f"cannot read the identity of this process (PID {pid})", pid=pid)
        me = _me = (pid, f"{pid}.{identity}".encode())
    return me[1]


def _after_fork_in_child() -> None:
    global _guard, _held, _me
    _guard = _Guard()  # another thread may have held the parent's
    _held = set()  # the child holds none of its parent's names
    _me = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------- reading links

_GONE = (errno.ENOENT, errno.ENOTDIR)


def _read(link: bytes) -> Optional[bytes]:
    """The link's target; ``b""`` for a file that is not a symlink; ``None`` if none."""
    try:
        return os.readlink(link)
    except OSError as err:
        if err.errno in _GONE:
            return None
        if err.errno == errno.EINVAL:  # not a symlink: not ours, a junk file
            return b""
        raise MailboxError(
            f"cannot read the name file {os.fsdecode(link)}: {err.strerror}",
            path=os.fsdecode(link),
        ) from err


def _parse(target: bytes) -> Optional[tuple[int, str]]:
    pid_text, _, identity = target.partition(b".")
    if not pid_text.isdigit() or not identity.isdigit():
        return None
    return int(pid_text), identity.decode("ascii")


def _live(target: bytes) -> Optional[tuple[int, str]]:
    """``(pid, identity)`` if ``target`` names a process alive now, else ``None``."""
    holder = _parse(target)
    if holder is None or rt.proc_identity(holder[0]) != holder[1]:
        return None
    return holder


# ---------------------------------------------------------------- the lock


@contextmanager
def _locked(directory: bytes, func: str, wait: Optional[float] = None) -> Iterator[bool]:
    """Hold the names lock of ``directory``; yields False if ``wait`` is 0 and it is busy.

    Raises:
        MailboxTimeout: the lock stayed busy for ``wait`` seconds (default ``_LOCK_WAIT``).
    """
    if wait is None:
        wait = _LOCK_WAIT
    guard = _guard
    deadline = time.monotonic() + wait
    got = guard.mutex.acquire(timeout=wait) if wait > 0 else guard.mutex.acquire(False)
    if not got:
        if wait > 0:
            raise _lock_timeout(directory, func, wait)
        yield False
        return
    try:
        if guard.depth == 0:
            # Record the fd before locking: an interrupt between the two must
            # not leave a locked fd nobody will close (the finally below does).
            guard.fd = os.open(
                directory + b"/" + _LOCK_FILE,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            if not _lock_file(guard.fd, deadline):
                if wait > 0:
                    raise _lock_timeout(directory, func, wait)
                yield False
                return
        guard.depth += 1
        try:
            yield True
        finally:
            guard.depth -= 1
    finally:
        if guard.depth == 0 and guard.fd >= 0:
            fd, guard.fd = guard.fd, -1
            os.close(fd)  # closing drops the POSIX lock
        guard.mutex.release()


def _lock_file(fd: int, deadline: float) -> bool:
    delay = 0.0002
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        # Polled rather than blocking in F_SETLKW: a holder that was stopped
        # (SIGSTOP) must not hang us past the deadline. It is held for a few
        # syscalls at a time, so waits are short.
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.01)


def _lock_timeout(directory: bytes, func: str, wait: float) -> MailboxTimeout:
    path = os.fsdecode(directory + b"/" + _LOCK_FILE)
    return MailboxTimeout(
        f"{func}(): the registered-names lock {path} stayed taken for {wait:g} s; "
        "a process holding it is stuck (stopped?)",
        path=path,
    )


def _remove_stale(d: _Dir, stale: list[tuple[bytes, bytes]], func: str) -> None:
    """Remove links still naming the same dead holder, if the lock is free right now."""
    if not stale:
        return
    try:
        with _locked(d.bpath, func, wait=0) as got:
            if not got:
                return
            for link, target in stale:
                # Links change only under the lock, and a dead process stays dead:
                # the same target now means the same stale link.
                if _read(link) == target:
                    try:
                        os.unlink(link)
                    except FileNotFoundError:
                        pass
    except (OSError, MailboxError) as err:  # tidying is optional; the answer stands
        log.debug("mproc: could not remove stale name links in %s: %s", d.path, err)


# ---------------------------------------------------------------- public API


def register(name: str) -> None:
    """Make this process's mailbox reachable as ``name`` too (opens the mailbox).

    A name is free when nobody holds it or its holder has exited; it stays
    this process's until :func:`unregister`, ``close_mailbox()`` or exit. A
    process may hold several names. Registering a name this process already
    holds does nothing.

    Args:
        name: a non-empty ``str`` without ``/`` or NUL, at most 200 bytes in UTF-8.

    Raises:
        TypeError, ValueError: ``name`` is not a valid name.
        NameTaken: another live process holds ``name`` (the message names its PID);
            of several processes racing for a free name, all but one get this.
        UnsafeRuntimeDir: the runtime or names directory is refused.
        MailboxError: the mailbox cannot open.
        MailboxTimeout: the names lock stayed busy (a stuck process holds it).
    """
    global _atexit_registered
    name, raw = _check_name(name, "register")
    d = _dir()
    from . import _mailbox  # _mailbox will import us: import it late

    _mailbox._ensure_open()  # open before the name is visible: senders find a mailbox
    me = _own()
    link = _link(d, raw)
    if not _atexit_registered:
        atexit.register(release_all)
        _atexit_registered = True
    with _locked(d.bpath, "register"):
        target = _read(link)
        if target == me:
            _held.add(link)
            return
        if target is not None:
            holder = _live(target)
            if holder is not None:
                raise NameTaken(
                    f"register(): the name {name!r} is held by PID {holder[0]}; choose "
                    "another name, or wait until that process exits or unregisters it",
                    pid=holder[0],
                    path=os.fsdecode(link),
                )
            os.unlink(link)  # its holder is gone (or its PID reused): the name is free
        _held.add(link)  # before the link: an interrupt may at worst over-record it
        try:
            os.symlink(me, link)
        except FileExistsError:
            # Only a process that ignores the lock (not mproc) gets here.
            _held.discard(link)
            raise NameTaken(
                f"register(): the name {name!r} was just taken by a process that does "
                "not take the names lock",
                path=os.fsdecode(link),
            ) from None


def unregister(name: str) -> None:
    """Release ``name``, which this process holds.

    Only the holder can release a name (unlike Erlang, where any process can):
    releasing another process's name, or one nobody holds, is an error, as a
    double unregister usually is a bug.

    Raises:
        TypeError, ValueError: ``name`` is not a valid name.
        NameNotFound: no live process holds ``name``.
        NameTaken: another live process holds ``name`` (the message names its PID).
        UnsafeRuntimeDir: the runtime or names directory is refused.
    """
    name, raw = _check_name(name, "unregister")
    d = _dir()
    me = _own()
    link = _link(d, raw)
    with _locked(d.bpath, "unregister"):
        target = _read(link)
        _held.discard(link)
        if target == me:
            os.unlink(link)
            return
        holder = None if target is None else _live(target)
        if holder is not None:
            raise NameTaken(
                f"unregister(): the name {name!r} is held by PID {holder[0]}, not by this "
                f"process (PID {os.getpid()}); only its holder can unregister it",
                pid=holder[0],
                path=os.fsdecode(link),
            )
        if target is not None:
            os.unlink(link)  # a dead holder's: tidy up while we hold the lock
    raise NameNotFound(
        f"unregister(): no live process holds the name {name!r}", path=os.fsdecode(link)
    )


def whereis(name: str) -> Optional[int]:
    """Return the PID of the live process holding ``name``, or ``None``.

    Never the PID of a process that merely reuses a dead holder's PID.

    Raises:
        TypeError, ValueError: ``name`` is not a valid name.
        UnsafeRuntimeDir: the runtime or names directory is refused.
    """
    name, raw = _check_name(name, "whereis")
    d = _dir()
    link = _link(d, raw)
    target = _read(link)
    if target is None:
        return None
    holder = _live(target)
    if holder is None:
        _remove_stale(d, [(link, target)], "whereis")
        return None
    return holder[0]


def registered() -> dict[str, int]:
    """Return ``{name: pid}`` of every live name of this user's runtime directory, sorted.

    Raises:
        UnsafeRuntimeDir: the runtime or names directory is refused.
    """
    d = _dir()
    found: dict[str, int] = {}
    stale: list[tuple[bytes, bytes]] = []
    for entry in sorted(os.listdir(d.bpath)):
        if not entry.startswith(_PREFIX):
            continue
        try:
            name = entry[len(_PREFIX) :].decode("utf-8")
        except UnicodeDecodeError:
            continue  # not a name we made
        link = d.bpath + b"/" + entry
        target = _read(link)
        if target is None:
            continue
        holder = _live(target)
        if holder is None:
            stale.append((link, target))
        else:
            found[name] = holder[0]
    _remove_stale(d, stale, "registered")
    return found


def release_all() -> None:
    """Unregister every name this process holds (at ``close_mailbox()`` and at exit).

    Only links that still name this process are removed; failures are logged,
    never raised (a link left behind names a dead process once we exit).
    """
    if not _held:
        return
    try:
        me = _own()
    except MailboxError:  # pragma: no cover
        return
    by_dir: dict[bytes, list[bytes]] = {}
    for link in list(_held):
        by_dir.setdefault(os.path.dirname(link), []).append(link)
    for directory, links in by_dir.items():
        try:
            with _locked(directory, "release_all", wait=min(_RELEASE_WAIT, _LOCK_WAIT)):
                for link in links:
                    if _read(link) == me:
                        try:
                            os.unlink(link)
                        except FileNotFoundError:
                            pass
                    _held.discard(link)
        except FileNotFoundError:
            _held.difference_update(links)  # the directory is gone, and our links with it
        except (OSError, MailboxError) as err:
            # Kept in _held: the next release_all() (at exit) tries again.
            log.debug("mproc: could not release the names in %s: %s", os.fsdecode(directory), err)


# ---------------------------------------------------------------- resolution (send, call)


def lookup(
    name: str, trust: Optional[Callable[[int, str], bool]] = None, *, func: str = "send"
) -> Optional[tuple[int, str]]:
    """Return ``(pid, identity)`` of the live holder of ``name``, or ``None``.

    One ``readlink()`` per call. When the link's target is the one read last
    time and ``trust(pid, identity)`` says that process is known alive (e.g.
    the caller has a live connection to exactly it), the ``/proc`` identity
    read is skipped; otherwise it is checked.

    Raises:
        TypeError, ValueError: ``name`` is not a valid name (naming ``func``).
        UnsafeRuntimeDir: the runtime or names directory is refused.
    """
    if trust is not None and name.__class__ is str:
        # The fast path: the same target as last time, and the caller has a
        # live connection to exactly that process (so no /proc read, and no
        # look at the environment: forget_cache() runs when the mailbox closes).
        found = fast_lookup(name, trust)
        if found is not None:
            return found
    d = _current
    entry = d.links.get(name) if d is not None and name.__class__ is str else None
    if d is None or d.key != _env_key():
        d = _dir()
        entry = d.links.get(name) if name.__class__ is str else None
    if entry is None:
        name, raw = _check_name(name, func)
        entry = (_link(d, raw), b"", 0, "")
        if len(d.links) >= _CACHE_MAX:
            d.links.clear()
        d.links[name] = entry
    link, last, pid, identity = entry
    target = _read(link)
    if not target:
        return None
    if target == last:
        if trust is not None and trust(pid, identity):
            return pid, identity
    else:
        holder = _parse(target)
        if holder is None:
            return None
        pid, identity = holder
        d.links[name] = (link, target, pid, identity)
    if rt.proc_identity(pid) != identity:
        return None
    return pid, identity


def held() -> list[str]:
    """The names this process holds now (sorted)."""
    out = []
    for link in list(_held):
        base = os.path.basename(link)
        if base.startswith(_PREFIX) and _read(link) == _me_now():
            out.append(base[len(_PREFIX) :].decode("utf-8", "surrogateescape"))
    return sorted(out)


def _me_now() -> Optional[bytes]:
    try:
        return _own()
    except MailboxError:  # pragma: no cover
        return None


def fast_lookup(name: str, trust: Callable[[int, str], bool]) -> Optional[tuple[int, str]]:
    """Only the fast path of :func:`lookup`: ``None`` unless a cached, trusted holder is current."""
    d = _current
    if d is None:
        return None
    entry = d.links.get(name)
    if entry is None:
        return None
    try:
        target = os.readlink(entry[0])
    except OSError:
        return None
    if target != entry[1] or not trust(entry[2], entry[3]):
        return None
    return entry[2], entry[3]


def forget_cache() -> None:
    """Forget what lookup() read (close_mailbox(): the runtime directory may change next)."""
    global _current
    _current = None


def resolve(name: str, deadline: float, *, func: str = "send") -> tuple[int, str]:
    """Return ``(pid, identity)`` of the holder of ``name``, waiting for one until ``deadline``.

    Args:
        name: the registered name.
        deadline: a ``time.monotonic()`` value; one look is always made.

    Raises:
        TypeError, ValueError: ``name`` is not a valid name (naming ``func``).
        NameNotFound: nobody held ``name`` by ``deadline``.
        UnsafeRuntimeDir: the runtime or names directory is refused.
    """
    start = time.monotonic()
    delay = 0.0005
    while True:
        found = lookup(name, func=func)
        if found is not None:
            return found
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        # A holder being (re)started usually registers within ms: poll with back-off.
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)
    name, raw = _check_name(name, func)
    d = _dir()
    link = _link(d, raw)
    target = _read(link)
    holder = None if not target else _parse(target)
    last = f" (its last holder, PID {holder[0]}, has exited)" if holder is not None else ""
    raise NameNotFound(
        f"no live process holds the name {name!r}{last} after waiting "
        f"{time.monotonic() - start:.3g} s; a process takes it with mproc.register({name!r})",
        path=os.fsdecode(link),
    )
