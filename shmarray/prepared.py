"""``Engine.prepare``: a map made ready once, then repeated at the least
cost the engine has.

What a prepared map trades: it is checked once, when prepared, and then
holds its arrays (alive until it is dropped) and its arguments as given.
Each call rings the workers and spins for their answer in one compiled call
(``control.ring_and_wait``), and the workers serve it in compiled code from
its first run (``control.serve``).  Process isolation is unchanged: a crash,
a timeout or a kernel's exception in a prepared map is reported as it is
for ``map``, and the engine goes on.
"""

from __future__ import annotations

from typing import Any


class PreparedMap:
    """A map ready to run again: ``step()`` runs it, ``step.swap()`` swaps
    its first two arrays (double buffering).  Made by ``Engine.prepare``."""

    __slots__ = ("_run", "_calls", "_swapped", "_which", "__weakref__")

    def __init__(self, run, call, swapped):
        self._run = run  # Dispatcher.run
        self._calls = [call]  # the call as prepared, then swapped (made on demand)
        self._swapped = swapped  # makes the swapped call
        self._which = 0

    def __call__(self) -> Any:
        """Run the map; returns what ``Engine.map`` returns."""
        return self._run(self._calls[self._which])

    def swap(self) -> PreparedMap:
        """Exchange the first two arrays (``out, inp = inp, out``) for the
        calls that follow; returns the prepared map itself."""
        if len(self._calls) == 1:
            self._calls.append(self._swapped())
        self._which ^= 1
        return self

    @property
    def arrays(self) -> tuple:
        """The arrays of the next call, in order."""
        return self._calls[self._which].arrays

    def __repr__(self) -> str:
        call = self._calls[self._which]
        name = getattr(call.job.kernel, "__name__", "kernel")
        return f"<shmarray.PreparedMap {name} over {len(call.arrays)} arrays>"
