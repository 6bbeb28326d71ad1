"""The driver's wake-up: how any thread interrupts the driver wherever it
sleeps.

A self-pipe, as CPython's ``concurrent.futures.process._ThreadWakeup``.
The rule: any thread may call ``wakeup()``; only the driver of the moment
calls ``clear()``, and only right before it acts on what woke it (it reads
``ControlBlock``'s ABORT word and the dispatcher's state, which say why), so
a wake-up is never lost.  ``close()`` runs once nobody drives any more.
"""

from __future__ import annotations

import os


class Wakeup:
    """A pipe the driver sleeps on, beside the workers' pipes."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def fileno(self) -> int:
        """What to poll: readable once woken, until cleared."""
        return self._r

    def wakeup(self) -> None:
        """Any thread: wake the driver if it sleeps (or make it not sleep)."""
        try:
            os.write(self._w, b"!")
        except OSError:
            pass  # already pending (the pipe is full), or closed

    def clear(self) -> None:
        """The driver only: forget the wake-ups so far."""
        try:
            while os.read(self._r, 512):
                pass
        except OSError:
            pass  # empty, or closed

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._r = self._w = -1
