"""Progress bars (tqdm.auto: a widget in notebooks, a bar in terminals).

A map shows chunks completed.  By default a bar appears only once a map has
run for about a second, so quick maps, the common case in a loop, cost
nothing: the bar object is not even built.
"""

from __future__ import annotations

import time

DELAY = 1.0   # seconds before an automatic bar appears


class ChunkProgress:
    """Chunks completed in one map.  ``mode``: True (show now), None (show
    after ``DELAY`` seconds), False (never; use ``None`` instead of this
    object)."""

    def __init__(self, total: int, mode: bool | None, desc: str):
        self.total = total
        self.done = 0
        self.desc = desc
        self.bar = None
        # A bar asked for stays on screen; one that appeared by itself (say
        # in a long loop of maps) goes away when its map ends.
        self.leave = bool(mode)
        self.opens_at = time.monotonic() + (0.0 if mode else DELAY)
        if mode:
            self._open()

    def _open(self) -> None:
        from tqdm.auto import tqdm
        self.bar = tqdm(total=self.total, initial=self.done, desc=self.desc,
                        unit="chunk", leave=self.leave)

    def wait(self) -> float | None:
        """Seconds until the bar should appear (for a poll timeout)."""
        if self.bar is not None:
            return None
        return max(self.opens_at - time.monotonic(), 0.0)

    def tick(self) -> None:
        if self.bar is None and time.monotonic() >= self.opens_at:
            self._open()

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        else:
            self.tick()

    def update_to(self, done: int) -> None:
        """``done`` chunks completed in all."""
        if done > self.done:
            self.update(done - self.done)
        else:
            self.tick()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()     # show the final count, not a throttled one
            self.bar.close()


def steps(n: int, desc: str = "steps", **tqdm_options):
    """``range(n)`` with a progress bar that appears only if the loop runs
    longer than about a second: for iterated maps such as a stencil loop::

        for _ in shmarray.steps(1000):
            eng.map(heat_step, new, old, args=(0.2,), halo=1)
            old, new = new, old
    """
    from tqdm.auto import trange
    return trange(n, desc=desc, delay=tqdm_options.pop("delay", DELAY), **tqdm_options)
