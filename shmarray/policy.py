"""What a round's failures mean for its call: a *policy* the round is
given (``shmarray.rounds``).

A round sees a worker die, its timeout pass, and replies come in; its
policy decides what that means: ``FAIL_FAST`` (a plain call: the first
failure ends the call, and the round's settle step ends its workers), or a
tracked call's ``shmarray.tracked.Tally`` (``retries``,
``errors="collect"``, ``imap``: the round goes on without a lost worker,
and the call runs more rounds of its own).  A policy acts on the round only
through its public methods (``Round.lose``, ``Round.restart``,
``Round.assignment``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from shmarray import deaths

if TYPE_CHECKING:
    from shmarray.control import ControlBlock
    from shmarray.pool import WorkerProcess
    from shmarray.rounds import Round

# Crashes and timeouts of workers, at WARNING, under the rounds' logger.
log = logging.getLogger("shmarray.rounds")


class Policy:
    """What a round's failures mean for its call: the contract a policy
    fulfils.  ``FAIL_FAST`` is the plain call's; ``tracked.Tally`` a
    tracked call's.  Round calls these; they may call Round's ``lose``
    and ``restart``."""

    #: the chunks that messages' indices refer to, or None: the job's
    chunks: tuple | None = None

    def died(self, rnd: Round, w: WorkerProcess, respawn: bool = True) -> bool:
        """Worker ``w`` died running the round (``respawn``), or before its
        replies could be read (not): raise, or go on without it; True if a
        replacement was started in its place."""
        raise NotImplementedError

    def timed_out(self, rnd: Round, late: list[WorkerProcess]) -> None:
        """The call's timeout passed with ``late`` still running: raise, or
        go on without them."""
        raise NotImplementedError

    def took(self, indices: tuple, values: tuple) -> None:
        """Values of chunks ``indices`` (a call that does not collect them
        in chunk order, or streams them)."""

    def filed(self, problems: list, values: list | None) -> list | None:
        """Every reply is read: ``problems`` (chunk index, exception; -1: a
        value that cannot be read), and the values in chunk order (None
        unless the call wants them).  What the round returns, or raise."""
        raise NotImplementedError

    def interrupted(self, ctl: ControlBlock) -> None:
        """The driver was woken and nothing stops the call."""


class FailFast(Policy):
    """A plain call's policy: the first failure ends it.  Stateless."""

    def died(self, rnd: Round, w: WorkerProcess, respawn: bool = True) -> bool:
        exc = deaths.death_error(rnd.ctl, w, rnd.placed.groups, rnd.chunks)
        log.warning("%s", exc)
        raise exc  # settle ends the workers still busy with its other chunks

    def timed_out(self, rnd: Round, late: list[WorkerProcess]) -> None:
        timeout = rnd.call.timeout
        assert timeout is not None  # there was a deadline
        exc = deaths.map_timeout(sorted(w.pid for w in late), timeout)
        log.warning("%s", exc)
        raise exc  # settle kills them

    def filed(self, problems: list, values: list | None) -> list | None:
        if problems:
            raise min(problems, key=lambda p: p[0])[1]
        return values


FAIL_FAST = FailFast()
