"""Why a driver stops waiting, in one place.

A driver (``shmarray.rounds``) waits for its workers in compiled spins, on
a futex, and asleep on pipes.  Four things may end that wait early, and
each used to reach it by its own road:

* ``close()`` from any thread, and ``MapFuture.stop()``: they ask the
  dispatcher's ``should_stop`` to say so, then :meth:`Interrupts.interrupt`;
* a signal whose handler raises (Ctrl-C's ``KeyboardInterrupt``, a
  SIGTERM handler's ``SystemExit``) in the main thread while it drives:
  :class:`HeldSignals` catches what the handler raises, keeps it, and
  interrupts the driver the same way;
* a worker's death or the call's timeout, which the round sees itself.

:class:`Interrupts` is the driver's side: the ABORT word its spins watch
(``ControlBlock.abort``), the wake-up its sleeps poll (``Wakeup``), and the
one question "should this round end, and with what?" (:meth:`reason`).

Held signals.  A round that ends early must kill every worker still
writing its arrays before control returns to the caller, and that cleanup
must not itself be cut short by the next Ctrl-C of a burst (an impatient
user presses three times).  Python raises a signal handler's exception at
whatever bytecode the main thread runs next, so while the main thread
drives a round (from before it takes the driver's role until it has given
it back: ``Dispatcher.run``), or waits for a map another thread drives
(from before it is queued until no worker of it runs: ``dispatch.Waiting``),
the handlers of SIGINT and SIGTERM are wrapped: the user's handler still
runs at once (its side effects happen as usual), but what it raises is
kept, the driver is interrupted (or the waited-for map stopped), and it is
raised once the round is settled.  Outside those spans the wrapper calls
the user's handler and nothing else (``signal.getsignal`` shows the
wrapper while an engine is open; the last engine's close puts the user's
handlers back).  Trio defers Ctrl-C the same way with
``enable_ki_protection``.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from shmarray.errors import EngineClosedError
from shmarray.wakeup import Wakeup

try:
    # The C functions under ``signal.getsignal``/``signal.signal``: the
    # public ones convert handlers to and from enums, which costs 1.6 us a
    # call (0.04 us here) on a path every map of the main thread takes.
    import _signal

    _getsignal: Callable[[int], Any] = _signal.getsignal
    _setsignal: Callable[[int, Any], Any] = _signal.signal
except (ImportError, AttributeError):  # pragma: no cover - other Pythons
    _getsignal, _setsignal = signal.getsignal, signal.signal

# The signals whose Python handlers are held while a round settles: Ctrl-C,
# and SIGTERM where the program gave it a handler (a service's graceful
# shutdown).  Others keep their handlers as they are.
HELD = (signal.SIGINT, signal.SIGTERM)

_main_ident = threading.main_thread().ident


class Interrupts:
    """The driver's interruption sources, one object.

    Created by the Runner over the pool's control block, with the
    dispatcher's ``should_stop`` (EngineClosedError while closing,
    MapCancelledError for a stopped future, else None).  ``interrupt`` may
    be called from any thread; the rest by the driver of the moment only.
    """

    def __init__(self, ctl, should_stop: Callable[[], BaseException | None]):
        self.ctl = ctl
        self.wakeup = Wakeup()
        self._should_stop = should_stop
        # What a held signal's handler raised, kept until the round that
        # caught it is settled (HeldSignals).  Written by the main thread's
        # handler only, read and cleared by the driver.
        self.caught: BaseException | None = None

    # -- any thread --------------------------------------------------------

    def interrupt(self) -> None:
        """Wake the driver wherever it waits: its spins watch ABORT, its
        futex nap is rung, its sleep polls the wake-up."""
        self.ctl.abort()
        self.wakeup.wakeup()

    # -- the driver --------------------------------------------------------

    def fileno(self) -> int:
        """What the driver's sleeps poll beside the workers' pipes."""
        return self.wakeup.fileno()

    def reason(self) -> BaseException | None:
        """Why the round must end now, or None: a held signal's exception
        first, then what the dispatcher says."""
        return self.caught if self.caught is not None else self._should_stop()

    def check(self) -> None:
        """Something woke the driver: raise the reason, if any.  Cleared
        first, so an interruption after the check is seen next time."""
        self.ctl.clear_abort()
        self.wakeup.clear()
        exc = self.reason()
        if exc is not None:
            raise exc

    def closing(self) -> bool:
        """Whether the engine is closing (nothing new may start)."""
        return isinstance(self._should_stop(), EngineClosedError)

    def catch(self, exc: BaseException) -> None:
        """A held signal's handler raised ``exc`` while this driver ran a
        round (``SIGNALS``): keep it, and end the wait.  The first of a
        burst is kept; later ones fold into it."""
        if self.caught is None:
            self.caught = exc
        self.interrupt()

    def take_caught(self) -> BaseException | None:
        """The held signal's exception, forgotten here (the driver raises it)."""
        exc, self.caught = self.caught, None
        return exc

    def close(self) -> None:
        self.wakeup.close()


class HeldSignals:
    """Hold the main thread's SIGINT and SIGTERM handlers' exceptions (see
    the module docstring).  ``hold(catch)`` and ``release()`` bracket a
    span, during which what a handler raises goes to ``catch`` instead of
    the main thread's code; in any thread but the main one both do nothing
    (signals run their handlers in the main thread only).

    One per process (:data:`SIGNALS`).  Spans do not nest: a span is a
    driven call (``Dispatcher.run``, ``tidy``), a wait for a map another
    thread drives (``dispatch.Waiting``), an engine's close cancelling its
    queued calls (``Dispatcher.close``), an exit hook (``at_exit``), or the
    making of a block (``BlockTable.allocate``), and a span asked for within
    another is not opened (the outer one holds).

    The wrapper is installed at the first span and stays between spans,
    where it calls the user's handler and nothing else: installing and
    removing it around every map cost 1.2-1.8 us a map (two ``sigaction``
    calls and the lookups), checking that it is still in place costs
    0.1 us.  A handler the program installs later is wrapped at the next
    span; ``restore`` (the last engine's close, interpreter exit) puts the
    user's handlers back.
    """

    def __init__(self) -> None:
        self._saved: dict[int, Any] = {}  # signal -> the user's handler, ours installed
        self._seen: tuple = (None, None)  # getsignal() of HELD after the last install
        self._catch: Callable[[BaseException], None] | None = None  # set within a span
        self._handler = self._handle  # one bound method, for the identity test
        self._restore_on_release = False  # ``restore`` asked for within a span

    def hold(self, catch: Callable[[BaseException], None]) -> bool:
        """Open a span; True if one was opened (then call ``release``).
        Within a span already open (a block made while a round is driven),
        opens none: the outer span's ``catch`` keeps what comes."""
        if threading.get_ident() != _main_ident or self._catch is not None:
            return False
        if _getsignal(_INT) is not self._seen[0] or _getsignal(_TERM) is not self._seen[1]:
            self._install()
        self._catch = catch
        return True

    def retarget(self, catch: Callable[[BaseException], None]) -> None:
        """Within a span, send what the handlers raise from now on to
        ``catch``; outside one, nothing."""
        if self._catch is not None:
            self._catch = catch

    def release(self) -> None:
        """Close the span: from now on the user's handlers act as usual."""
        self._catch = None
        if self._restore_on_release:
            self._restore_on_release = False
            self.restore()

    def _install(self) -> None:
        saved = self._saved
        for sig in HELD:
            handler = _getsignal(sig)
            # SIG_DFL, SIG_IGN and None (set outside Python) raise nothing
            # in Python: nothing to hold.
            if callable(handler) and handler is not self._handler:
                saved[sig] = handler
                _setsignal(sig, self._handler)
        self._seen = (_getsignal(_INT), _getsignal(_TERM))

    def restore(self) -> None:
        """Put the user's handlers back where ours still stands.  In the
        main thread only (``signal.signal``'s rule); elsewhere a no-op.
        Within a span (the last engine closed by a finalizer while its
        map is driven), done as the span closes: the user's handler in
        place within a span would raise in the middle of it, and cut
        short its ``release``.

        What each wrapper stood for is kept: a program that saved our
        wrapper (``signal.getsignal`` while an engine was open) and
        installs it again gets its own handler's behaviour from it."""
        if threading.get_ident() != _main_ident:
            return
        if self._catch is not None:
            self._restore_on_release = True
            return
        for sig, handler in self._saved.items():
            if _getsignal(sig) is self._handler:
                _setsignal(sig, handler)
        self._seen = (None, None)

    def _handle(self, signum: int, frame) -> None:
        # Python looks a handler up when it runs it, so while we are called
        # we are installed (now or, put back by the program, again), and
        # the user's handler is saved.
        handler = self._saved[signum]
        catch = self._catch
        if catch is None:
            return handler(signum, frame)  # between spans: the user's handler, as is
        try:
            handler(signum, frame)
        except BaseException as exc:
            catch(exc)


_INT, _TERM = HELD


def drop(exc: BaseException) -> None:
    """A held signal's exception nobody waits for: the span it interrupted
    is already ending with the first of its burst."""


def at_exit(cleanup: Callable[[], object]) -> None:
    """Run an exit hook's ``cleanup`` with the main thread's signals held
    and dropped: when a burst of Ctrl-C ends the program, the later ones
    land in the exit hooks, and must neither cut the cleanup short (what
    it did not stop is left to the watchdog) nor print a second traceback
    ("Exception ignored in atexit callback").  The cleanup is bounded (a
    few seconds at most)."""
    held = SIGNALS.hold(drop)
    try:
        cleanup()
    finally:
        if held:
            SIGNALS.release()


SIGNALS = HeldSignals()


def _after_fork_in_child() -> None:
    # The thread that forked is the child's main thread, where its signal
    # handlers run; a span the parent was in is not the child's.
    global _main_ident
    _main_ident = threading.get_ident()
    SIGNALS.release()


os.register_at_fork(after_in_child=_after_fork_in_child)
