"""Waiting for processes to exit without busy-looping; the only platform branches.

One process-wide *reaper* thread watches every process mproc has a handle
on. On Linux it sleeps in ``epoll`` over one pidfd per process (a pidfd
becomes readable when its process exits); where pidfds are missing (macOS,
kernels older than 5.3, seccomp filters) or the process ran out of file
descriptors, it polls those processes instead, backing off from 1 ms to
20 ms. When a process is seen to exit, the reaper runs the handle's poll
callback, which for a child of ours collects the exit status (so no zombie
is left behind even if nobody waits), then closes the pidfd and sets the
watch's ``exited`` event, which is all a waiter blocks on. The pidfd stays
open until then, so a callback may still ask it about the exit (see
:func:`watch_pidfd`). :func:`unwatch` takes a watch back; only the reaper
thread ever unregisters or closes a watched pidfd, so a descriptor number is
never reused while the selector still knows it. A new pidfd goes into the
epoll set straight from the thread that hands it over (epoll watches a
descriptor added while another thread sleeps in ``epoll_wait``): a start
costs no wake-up of the reaper thread.

Process-global state, reset in a forked child (``os.register_at_fork``):
the reaper (``_reaper``), the pidfds of every watch, which a child closes
(``_pidfds``), and the watches of our own children by PID (``_children``).
A watch made by the parent knows in the child that it is a copy
(``Watch._foreign``) and no longer touches its pidfd or its lock.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import selectors
import signal
import threading
import time
from typing import Callable, Optional

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

from ._errors import NoSuchProcess
from ._log import logger
from ._wakeup import Wakeup

__all__ = ["Watch", "child_watch", "pidfd_open", "unwatch", "watch", "watch_pidfd"]

# Fallback polling: most short-lived children exit within milliseconds, so
# start fast, then back off so that a long-running process costs little CPU.
_POLL_MIN = 0.001
_POLL_MAX = 0.020

# When a pidfd said the process exited but the poll callback could not
# collect its status yet (the forkserver has not written it, or another
# thread is mid-waitpid), the reaper keeps polling for at most this long.
_COLLECT_GRACE = 5.0

# Errors after which pidfd_open() falls back to polling instead of failing:
# ENOSYS (kernel < 5.3), EPERM (a seccomp filter refusing the syscall),
# EMFILE/ENFILE (out of file descriptors: degrade, do not fail a start()).
_FALLBACK_ERRNOS = frozenset({errno.ENOSYS, errno.EPERM, errno.EMFILE, errno.ENFILE})

_pidfd_supported = hasattr(os, "pidfd_open")


# Descriptors the pidfds of our own children leave to everything else, and
# in particular to adopted handles, which must keep theirs (see pidfd_open).
_FD_RESERVE = 32

# The soft RLIMIT_NOFILE is raised toward the hard limit at import (as Go's
# runtime does), but not past this: some programs still loop close() over
# every possible descriptor, or use select() on them.
_NOFILE_TARGET = 1 << 16


def raise_nofile_limit() -> None:
    """Raise the soft ``RLIMIT_NOFILE`` toward the hard limit (at most 65536).

    A pidfd per watched process must not run this process out of
    descriptors at the usual soft limit of 1024. Children inherit the raised
    limit (Go restores it for exec'd children; subprocess cannot without a
    preexec_fn on every start, which would cost every start a slow fork).
    """
    try:
        import resource
    except ImportError:  # Windows
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = _NOFILE_TARGET if hard == resource.RLIM_INFINITY else min(hard, _NOFILE_TARGET)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        pass  # a sandbox refusing it: live with the limit we have


def pidfd_open(pid: int, *, keep: bool = False) -> Optional[int]:
    """Open a pidfd (close-on-exec) for ``pid``, or return ``None`` to mean "poll instead".

    Args:
        pid: the process to pin; a positive PID.
        keep: for an adopted process, whose identity depends on it: never
            give the descriptor up to the reserve, and raise instead of
            returning ``None`` when no descriptor is free.

    Returns:
        The file descriptor, or ``None`` when pidfds are unavailable on this
        system or (unless ``keep``) few descriptors are free.

    Raises:
        NoSuchProcess: ``pid`` does not exist.
        OSError: ``keep`` and no descriptor is free (EMFILE, ENFILE).
    """
    global _pidfd_supported
    if not _pidfd_supported:
        return None
    try:
        fd: int = getattr(os, "pidfd_open")(pid)  # noqa: B009 - absent on non-Linux
    except ProcessLookupError as err:
        raise NoSuchProcess(pid=pid) from err
    except OSError as err:
        if err.errno not in _FALLBACK_ERRNOS or (
            keep and err.errno in (errno.EMFILE, errno.ENFILE)
        ):
            raise
        if err.errno in (errno.ENOSYS, errno.EPERM):
            # The syscall will not start working later: stop trying.
            _pidfd_supported = False
        logger.debug("pidfd_open(%d) failed (%s); polling for its exit instead", pid, err)
        return None
    # Leave some descriptors free: pidfds for thousands of processes must not
    # starve the rest (psutil's /proc reads, the polling fallback, sockets).
    if (
        not keep
        and resource is not None
        and fd >= resource.getrlimit(resource.RLIMIT_NOFILE)[0] - _FD_RESERVE
    ):
        os.close(fd)
        logger.debug("pidfd_open(%d): few descriptors left; polling for its exit instead", pid)
        return None
    return fd


def _noop_poll() -> bool:
    return True


def _no_cancel() -> None:
    pass


# Guards the making of an _Exited's Event (held for a moment, never across a
# wait); a new one in a forked child.
_exited_lock = threading.Lock()


class _Exited:
    """A watch's ``exited`` flag: :class:`threading.Event`'s ``is_set``/``set``/``wait``.

    The Event (a Condition, two locks) is made only for a caller that
    actually blocks: most watches are set before anybody waits, and a
    watch is made per start, between two forks, where every object made or
    touched costs a page copied (copy-on-write) when the parent writes it.
    """

    __slots__ = ("_event", "_flag")

    def __init__(self) -> None:
        self._flag = False
        self._event: Optional[threading.Event] = None

    def is_set(self) -> bool:
        """Return whether the flag is set."""
        return self._flag

    def set(self) -> None:
        """Set the flag and wake every waiter."""
        with _exited_lock:
            self._flag = True
            event = self._event
        if event is not None:
            event.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the flag is set or ``timeout`` passes; return the flag."""
        if self._flag:
            return True
        with _exited_lock:
            if self.is_set():  # set meanwhile: no Event needed
                return True
            event = self._event
            if event is None:
                event = self._event = threading.Event()
        return event.wait(timeout)


class Watch:
    """One process being watched by the reaper.

    Attributes:
        pid: the process watched.
        exited: set once the process has exited and its poll callback has
            collected whatever there is to collect (e.g. the child's status).
        code: for a watch made with an ``exitcode`` getter (a child of an
            mproc handle), the exit code the handle saw; read it once
            ``exited`` is set (``None``: not collected, or no getter).
    """

    __slots__ = (
        "_deadline",
        "_done",
        "_exitcode",
        "_lock",
        "_owner",
        "_pidfd",
        "_poll",
        "_poll_fd",
        "_removed",
        "code",
        "exited",
        "pid",
    )

    def __init__(
        self,
        pid: int,
        poll: Callable[[], bool],
        pidfd: Optional[int],
        poll_fd: Optional[Callable[[Optional[int]], bool]] = None,
        exitcode: Optional[Callable[[], Optional[int]]] = None,
    ) -> None:
        self.pid = pid
        self.exited = _Exited()
        self.code: Optional[int] = None
        self._poll = poll
        self._poll_fd = poll_fd
        self._exitcode = exitcode
        self._removed = False  # unwatch()ed: never polled or finished again
        self._pidfd = pidfd
        # Guards _pidfd: the reaper closes it while another thread may be
        # about to signal through it, and a closed number can be reused by
        # an unrelated open() (even another process's pidfd).
        # A forked copy of this process never takes it (see _foreign): a
        # thread of the parent may have held it at the fork.
        self._lock = threading.Lock()
        self._deadline: Optional[float] = None
        self._owner = os.getpid()  # only this process's reaper ever reports the exit
        # Run once exited is set (see on_done); made by the first on_done().
        self._done: Optional[list[Callable[[], None]]] = None
        if pidfd is not None:
            _pidfds.add(pidfd)

    def _foreign(self) -> bool:
        """Return whether this is a forked copy of the process that made the watch.

        A fork hook closed the copy's pidfds (see ``_pidfds``): ``_pidfd``
        names nothing of ours here, and nobody here reports the exit.
        """
        return self._owner != os.getpid()

    def __repr__(self) -> str:
        state = "exited" if self.exited.is_set() else "watching"
        how = "polling" if self._pidfd is None else f"pidfd={self._pidfd}"
        return f"<Watch pid={self.pid} {state} {how}>"

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the process has exited.

        Args:
            timeout: seconds to wait at most; ``None`` waits forever, a value
                <= 0 only checks.

        Returns:
            Whether the process has exited.

        Raises:
            ValueError: called in a forked copy of the process that made the watch.
        """
        if self._foreign():
            raise ValueError(
                f"PID {self.pid} is watched by process {self._owner}; this forked copy "
                f"(PID {os.getpid()}) cannot wait for it (as multiprocessing's join())"
            )
        if timeout is not None and timeout <= 0:
            return self.exited.is_set()
        return self.exited.wait(timeout)

    def send_signal(self, sig: int) -> bool:
        """Signal the process through its pidfd, immune to PID reuse.

        Args:
            sig: the signal number.

        Returns:
            ``True`` if sent; ``False`` if no pidfd is held (never opened, or
            closed because the exit was seen): the caller must fall back to
            ``os.kill`` with its own identity check.

        Raises:
            NoSuchProcess: the process has been reaped.
        """
        if self._foreign():
            return False
        with self._lock:
            fd = self._pidfd
            send = getattr(signal, "pidfd_send_signal", None)
            if fd is None or send is None:
                return False
            try:
                send(fd, sig)
            except ProcessLookupError as err:
                raise NoSuchProcess(pid=self.pid) from err
            except OSError as err:
                if err.errno != errno.ENOSYS:
                    raise
                return False
            return True

    def dup_pidfd(self) -> Optional[int]:
        """Return a duplicate of the pidfd (the caller closes it), or ``None`` if none is held."""
        if self._foreign():
            return None
        with self._lock:
            if self._pidfd is None:
                return None
            try:
                return os.dup(self._pidfd)
            except OSError:
                return None

    def on_done(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback()`` once the exit is reported (at once if it was already).

        It runs in the reaper thread: it must be quick and never block (an
        event loop's ``call_soon_threadsafe``, say).

        Returns:
            A function that unregisters it (it may have run already).
        """
        if self._foreign():
            if not self.exited.is_set():
                return _no_cancel  # nobody here will report the exit
        else:
            with self._lock:
                if not self.exited.is_set():
                    if self._done is None:
                        self._done = []
                    self._done.append(callback)
                    return functools.partial(self._forget_done, callback)
        callback()
        return _no_cancel

    def _forget_done(self, callback: Callable[[], None]) -> None:
        if self._foreign():
            return  # never registered here
        with self._lock:
            try:
                if self._done is not None:
                    self._done.remove(callback)
            except ValueError:
                pass

    def _close_pidfd(self) -> None:
        if self._foreign():
            self._pidfd = None  # closed by the fork hook; the number may be another's now
            return
        with self._lock:
            fd, self._pidfd = self._pidfd, None
        if fd is not None:
            _pidfds.discard(fd)  # first: a fork in between must not close a reused number
            os.close(fd)

    def _call_poll(self) -> bool:
        poll_fd = self._poll_fd
        if poll_fd is not None:
            # Only the reaper thread closes the pidfd: it is open for this call.
            return poll_fd(self._pidfd)
        return self._poll()

    def _finish(self) -> None:
        self._close_pidfd()
        getter, self._exitcode = self._exitcode, None
        if getter is not None:
            try:
                self.code = getter()
            except Exception:  # a closed handle: the code is lost, not the reaper
                logger.debug(
                    "PID %d: its handle's exit code is unreadable", self.pid, exc_info=True
                )
            if _children.get(self.pid) is self:
                del _children[self.pid]
        # Drop the callbacks: they hold the handle, which holds this watch.
        self._poll = _noop_poll
        self._poll_fd = None
        with self._lock:
            self.exited.set()
            done, self._done = self._done or (), None
        for callback in done:
            try:
                callback()
            except Exception:
                logger.exception("mproc reaper: a done callback of PID %d failed", self.pid)

    def _drop(self) -> None:
        """Taken back by unwatch(): release everything, never report an exit."""
        self._close_pidfd()
        self._poll = _noop_poll
        self._poll_fd = None
        self._exitcode = None
        if _children.get(self.pid) is self:
            del _children[self.pid]


class _Poller:
    """The reaper's descriptors: ``epoll`` where there is one, else a selector.

    ``data`` maps each registered descriptor to its watch (``None`` for the
    wake-up socket). A descriptor added to an epoll set while another
    thread sleeps in ``epoll_wait`` is watched at once (``live``), so a new
    pidfd needs no wake-up; a selector (``poll``, ``select``, ``kqueue`` on
    macOS, where there are no pidfds anyway) is only told at its next call.
    Changed under the reaper's lock only.
    """

    def __init__(self) -> None:
        self.data: dict[int, Optional[Watch]] = {}
        make = getattr(select, "epoll", None)
        self._epoll: Optional[select.epoll] = make() if make is not None else None
        self._selector: Optional[selectors.BaseSelector] = (
            None if self._epoll is not None else selectors.DefaultSelector()
        )
        self.live = self._epoll is not None

    def register(self, fd: int, w: Optional[Watch]) -> None:
        if fd in self.data:
            raise KeyError(f"descriptor {fd} is already registered")
        # Recorded first: the reaper thread may see the descriptor ready the
        # moment it is registered. (A signal handler that raises in between
        # leaves a record that never fires, not a descriptor nobody owns.)
        self.data[fd] = w
        try:
            if self._epoll is not None:
                self._epoll.register(fd, select.EPOLLIN)
            elif self._selector is not None:
                self._selector.register(fd, selectors.EVENT_READ)
        except Exception:
            del self.data[fd]
            raise

    def forget(self, fd: int) -> None:
        """Unregister a descriptor registered but not recorded (never expected)."""
        try:
            if self._epoll is not None:
                self._epoll.unregister(fd)
            elif self._selector is not None:
                self._selector.unregister(fd)
        except (OSError, KeyError, ValueError):
            pass

    def unregister(self, fd: int) -> None:
        del self.data[fd]
        try:
            if self._epoll is not None:
                self._epoll.unregister(fd)
            elif self._selector is not None:
                self._selector.unregister(fd)
        except OSError:
            pass  # as selectors: the descriptor went away, and its registration with it

    def select(self, timeout: Optional[float]) -> list[int]:
        if self._epoll is not None:
            return [fd for fd, _ in self._epoll.poll(-1 if timeout is None else timeout)]
        if self._selector is not None:
            return [key.fd for key, _ in self._selector.select(timeout)]
        return []

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
        if self._selector is not None:
            self._selector.close()


class _Reaper:
    """The thread, its poller and the watches it is working on."""

    def __init__(self) -> None:
        # Guards _pending, _removing, the start-up and every change to the
        # poller (made from the thread that hands a watch over, too).
        self._lock = threading.Lock()
        # Held while a poll callback runs; fork() takes it first so that no
        # handle lock is held by this thread in the child (see _before_fork).
        self._callback_lock = threading.Lock()
        self._pending: list[Watch] = []
        self._removing: list[Watch] = []
        self._poller: Optional[_Poller] = None
        self._wakeup: Optional[Wakeup] = None
        self._thread: Optional[threading.Thread] = None

    def add(self, w: Watch) -> None:
        with self._lock:
            if self._thread is None:
                self._start()
            poller, fd = self._poller, w._pidfd
            if poller is not None and poller.live and fd is not None:
                # The pidfd is open (only the reaper thread closes a watched
                # one, after unregistering it under this lock), so its number
                # is not one the poller still knows. Registered here, it is
                # watched at once: a start costs no wake-up, no thread hop.
                try:
                    poller.register(fd, w)
                    return
                except (OSError, ValueError, KeyError):
                    pass  # the reaper thread tries again, and polls if it fails too
            self._pending.append(w)
            wakeup = self._wakeup
        if wakeup is not None:
            wakeup.wake()

    def remove(self, w: Watch) -> None:
        w._removed = True  # from now on the reaper skips it
        with self._lock:
            if self._thread is None:  # never started: nothing registered anywhere
                w._drop()
                return
            self._removing.append(w)
            wakeup = self._wakeup
        if wakeup is not None:
            wakeup.wake()

    def _start(self) -> None:
        self._poller = _Poller()
        self._wakeup = Wakeup()
        self._poller.register(self._wakeup.fileno(), None)
        self._thread = threading.Thread(
            target=self._run, args=(self._poller, self._wakeup), name="mproc-reaper", daemon=True
        )
        self._thread.start()

    def _run(self, poller: _Poller, wakeup: Wakeup) -> None:
        wakeup_fd = wakeup.fileno()
        polled: list[Watch] = []
        delay = _POLL_MIN
        while True:
            try:
                with self._lock:
                    new, self._pending = self._pending, []
                    removing, self._removing = self._removing, []
                if new:
                    delay = _POLL_MIN
                for w in new:
                    self._register(poller, w, polled)
                if removing:
                    polled = self._remove(poller, removing, polled)
                for fd in poller.select(delay if polled else None):
                    if fd == wakeup_fd:
                        wakeup.drain()
                        continue
                    # Only this thread unregisters: a reported descriptor is
                    # still the one registered (each is reported once a call).
                    ready = poller.data.get(fd)
                    if ready is None:
                        # Registered, not recorded: a readable pidfd would make
                        # every select() return at once. Never expected.
                        with self._lock:
                            if fd not in poller.data:
                                poller.forget(fd)
                        continue
                    # The pidfd stays open (the callback may ask it about the
                    # exit) until the watch finishes; out of epoll, as it stays
                    # readable for good.
                    with self._lock:
                        poller.unregister(fd)
                    if not self._collect(ready):
                        ready._deadline = time.monotonic() + _COLLECT_GRACE
                        polled.append(ready)
                if polled:
                    now = time.monotonic()
                    polled = [w for w in polled if not self._check(w, now)]
                    delay = min(delay * 2, _POLL_MAX)
            except Exception:  # never let the reaper die: every wait depends on it
                logger.exception("mproc reaper: unexpected error; continuing")
                time.sleep(_POLL_MAX)  # should the error repeat, do not spin

    def _remove(self, poller: _Poller, removing: list[Watch], polled: list[Watch]) -> list[Watch]:
        gone = set(map(id, removing))
        for w in removing:
            fd = w._pidfd
            if fd is not None:
                with self._lock:
                    if poller.data.get(fd) is w:  # else: polled, or its exit already seen
                        poller.unregister(fd)
            w._drop()
        return [w for w in polled if id(w) not in gone]

    def _register(self, poller: _Poller, w: Watch, polled: list[Watch]) -> None:
        if w._removed:
            return  # unwatch()ed before the reaper saw it: _remove() closes it
        fd = w._pidfd
        if fd is not None:
            try:
                with self._lock:
                    poller.register(fd, w)
                return
            except (OSError, ValueError, KeyError) as err:
                logger.debug("cannot watch pidfd of PID %d (%s); polling", w.pid, err)
                w._close_pidfd()
        polled.append(w)

    def _check(self, w: Watch, now: float) -> bool:
        if self._collect(w):
            return True
        if w._deadline is not None and now > w._deadline:
            logger.debug("PID %d exited but its status could not be collected", w.pid)
            w._finish()
            return True
        return False

    def _collect(self, w: Watch) -> bool:
        if w._removed:
            return True  # unwatch()ed: _remove() releases it
        with self._callback_lock:
            try:
                done = w._call_poll()
            except Exception:
                # A broken callback must not wedge its waiters forever.
                logger.exception("mproc reaper: checking PID %d failed", w.pid)
                done = True
        if done:
            w._finish()
        return done

    def close_inherited(self) -> None:
        """In a forked child: close the descriptors inherited from the parent."""
        if self._poller is not None:
            try:
                self._poller.close()
            except OSError:
                pass
        if self._wakeup is not None:
            self._wakeup.close()
        # The pidfds of the parent's watches: closed here, forgotten by each
        # watch when it is next asked (see Watch._foreign). Touching every
        # watch here would cost each forked child a page copy per few watches.
        for fd in _pidfds:
            try:
                os.close(fd)
            except OSError:
                pass
        _pidfds.clear()


raise_nofile_limit()
_reaper = _Reaper()
# The pidfds held by watches: a forked child closes them. A set of numbers,
# changed by single (atomic) operations: added when a watch takes one,
# discarded before it is closed.
_pidfds: set[int] = set()
# The unfinished watches of mproc handles' children, by PID (see child_watch).
_children: dict[int, Watch] = {}


def watch(
    pid: int,
    poll: Callable[[], bool],
    pidfd: Optional[int],
    *,
    exitcode: Optional[Callable[[], Optional[int]]] = None,
) -> Watch:
    """Hand a process to the reaper.

    Args:
        pid: the process.
        poll: called by the reaper thread, never concurrently with another
            callback: try to collect the exit without blocking; return
            whether the process has finished (for a child, reaped). It is
            called when the pidfd reports the exit, or periodically when
            there is no pidfd.
        pidfd: an open pidfd for ``pid`` (the watch takes ownership and
            closes it once the exit is seen), or ``None`` to poll.
        exitcode: for a child of an mproc handle: returns the exit code the
            handle collected; read once when the watch finishes (into
            :attr:`Watch.code`), and the watch is listed by :func:`child_watch`
            until then.

    Returns:
        The :class:`Watch`, whose ``exited`` event is set after ``poll``
        returned ``True``.
    """
    w = Watch(pid, poll, pidfd, exitcode=exitcode)
    if exitcode is not None:
        _children[pid] = w
    _reaper.add(w)
    return w


def watch_pidfd(pid: int, poll: Callable[[Optional[int]], bool], pidfd: Optional[int]) -> Watch:
    """Hand a process to the reaper, whose poll callback gets the pidfd.

    As :func:`watch`, but ``poll(fd)`` receives the watch's pidfd, open for
    the duration of the call (the reaper closes it only after ``poll``
    returned ``True``), or ``None`` when the process is polled for without
    one: the callback can read the exit status through it (``waitid``
    with ``P_PIDFD``, ``PIDFD_GET_INFO``), immune to PID reuse.
    """
    w = Watch(pid, _noop_poll, pidfd, poll_fd=poll)
    _reaper.add(w)
    return w


def unwatch(w: Watch) -> None:
    """Stop watching: its poll callback is not called again, ``exited`` is never set.

    Any thread may call it (also a poll callback). The reaper thread closes
    the pidfd soon after; the call does not wait for that.
    """
    _reaper.remove(w)


def child_watch(pid: int) -> Optional[Watch]:
    """Return the unfinished watch an mproc handle holds on its child ``pid``, if any.

    It names the handle's process only while that child has not been
    reaped: the caller must know that ``pid`` is an unreaped child of ours.
    """
    return _children.get(pid)


def _before_fork() -> None:
    _reaper._callback_lock.acquire()
    _reaper._lock.acquire()


def _after_fork_parent() -> None:
    _reaper._lock.release()
    _reaper._callback_lock.release()


def _after_fork_child() -> None:
    # Only the forking thread survives fork(): the reaper thread is gone and
    # its locks may have been held by it. Close what the child inherited so
    # nothing leaks, and start over with a fresh reaper (started lazily).
    global _reaper, _exited_lock
    _exited_lock = threading.Lock()
    _reaper.close_inherited()
    _reaper = _Reaper()
    _children.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child
    )
