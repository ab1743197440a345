"""The one wake-up primitive: a non-blocking socketpair a sleeping selector watches.

As trio's ``WakeupSocketpair``: :meth:`Wakeup.wake` never blocks (a full
buffer already means "wake up"), may be called from any thread, under a lock
or from a signal handler, and after :meth:`Wakeup.close` does nothing.
"""

from __future__ import annotations

import socket

__all__ = ["Wakeup"]


class Wakeup:
    """Wake a thread blocked in ``select``/``epoll`` on :meth:`fileno`."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        # A small buffer: a few pending wake-ups mean the same as thousands.
        try:
            self._w.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        except OSError:  # pragma: no cover - some platforms refuse tiny buffers
            pass
        self._closed = False

    def fileno(self) -> int:
        """The descriptor that becomes readable after :meth:`wake`."""
        return self._r.fileno()

    def wake(self) -> None:
        """Make :meth:`fileno` readable (idempotent, never blocks, never raises)."""
        if self._closed:
            return
        try:
            self._w.send(b"\0")
        except OSError:
            pass  # full (already readable) or closed meanwhile

    def drain(self) -> None:
        """Consume every pending wake-up."""
        try:
            while self._r.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        """Close both ends; later wake() calls do nothing."""
        self._closed = True
        self._r.close()
        self._w.close()
