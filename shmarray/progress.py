"""Progress bars: a widget in a notebook that has ipywidgets, a text bar
in a terminal or in a notebook without them (see :func:`bar_class`).

A map shows chunks completed.  ``progress=None``, the default of every
call, means the global setting, which is automatic unless the environment
variable ``SHMARRAY_PROGRESS`` says ``0``/``off`` (never) or ``1``/``on``
(always).  Automatic means: a bar appears once a map has gone on for about
a second *after its first chunk finished*, so quick maps, the common case
in a loop, cost nothing, and a first map that is slow only because every
worker compiles the kernel before its first chunk shows none.

Bars go to a terminal or a notebook only: on a stderr that is a file or a
pipe (logs, CI) no ``\\r`` bar is written, whatever was asked.
"""

from __future__ import annotations

import os
import sys
import time

DELAY = 1.0  # seconds before an automatic bar appears

_WORDS = {
    "0": False,
    "off": False,
    "false": False,
    "no": False,
    "never": False,
    "1": True,
    "on": True,
    "true": True,
    "yes": True,
    "always": True,
    "": None,
    "auto": None,
}


def default() -> bool | None:
    """The global setting: ``SHMARRAY_PROGRESS`` (auto when unset).

    >>> os.environ["SHMARRAY_PROGRESS"] = "off"; default()
    False
    >>> del os.environ["SHMARRAY_PROGRESS"]; default() is None
    True
    """
    value = os.environ.get("SHMARRAY_PROGRESS", "").strip().lower()
    if value not in _WORDS:
        raise ValueError(f"SHMARRAY_PROGRESS must be 0/off, 1/on or auto; got {value!r} instead.")
    return _WORDS[value]


def resolve(progress: bool | None) -> bool | None:
    """What a call's ``progress`` argument means: True (show now), None
    (automatic) or False (never)."""
    if progress is None:
        progress = default()
    if progress is not False and not can_show():
        return False
    return progress


def in_notebook() -> bool:
    """Whether we run in a Jupyter kernel (where tqdm.auto draws widgets)."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def bar_class():
    """The tqdm class to draw with: ``tqdm.notebook.tqdm`` (a widget) in a
    Jupyter kernel where ipywidgets imports, else ``tqdm.std.tqdm`` (text,
    which a notebook shows too).

    Chosen here, not by ``tqdm.auto``: in a notebook without ipywidgets
    that prints ``TqdmWarning: IProgress not found`` before falling back,
    and with them ``TqdmExperimentalWarning``.  ``tqdm.notebook`` itself
    imports quietly either way and leaves ``IProgress`` None when it finds
    no widgets, which is the test tqdm applies."""
    if in_notebook():
        try:
            from tqdm import notebook
        except Exception:
            notebook = None
        if notebook is not None and getattr(notebook, "IProgress", None) is not None:
            return notebook.tqdm
    from tqdm.std import tqdm

    return tqdm


def can_show() -> bool:
    """A terminal or a notebook to draw on; never a log file or a pipe."""
    if in_notebook():
        return True
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class ChunkProgress:
    """Chunks completed in one map, or steps in an ``iterate`` (``unit``
    "step", every ``per`` chunks one step).  ``mode``: True (show now) or
    None (automatic, as above); for False build nothing."""

    def __init__(
        self, total: int, mode: bool | None, desc: str, unit: str = "chunk", per: int = 1
    ):
        self.total = total
        self.unit = unit
        self.per = per
        self.done = 0
        self.desc = desc
        self.bar = None
        # A bar asked for stays on screen; one that appeared by itself (say
        # in a long loop of maps) goes away when its map ends.
        self.leave = bool(mode)
        self.automatic = not mode
        self.opens_at = None if self.automatic else time.monotonic()
        if mode:
            self._open()

    def _open(self) -> None:
        bar = bar_class()
        self.bar = bar(
            total=self.total, initial=self.done, desc=self.desc, unit=self.unit, leave=self.leave
        )

    def wait(self) -> float | None:
        """Seconds until the bar may appear (for a poll timeout); until a
        chunk has finished, look every 50 ms."""
        if self.bar is not None:
            return None
        if self.opens_at is None:
            return 0.05
        return max(self.opens_at - time.monotonic(), 0.0)

    def tick(self) -> None:
        if (
            self.bar is None
            and self.opens_at is not None
            and time.monotonic() >= self.opens_at
            and self.done < self.total
        ):
            self._open()

    def update(self, n: int) -> None:
        if self.done == 0 and n and self.opens_at is None:
            self.opens_at = time.monotonic() + DELAY
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        else:
            self.tick()

    def update_to(self, done: int) -> None:
        """``done`` chunks completed in all (of every step: ``per`` a
        step)."""
        done //= self.per
        if done > self.done:
            self.update(done - self.done)
        else:
            self.tick()

    def close(self) -> None:
        bar = self.bar
        if bar is None:
            return
        bar.refresh()  # show the final count, not a throttled one
        final = str(bar)
        bar.close()
        if in_notebook() and (not self.leave or type(bar).__module__ == "tqdm.notebook"):
            # A saved or converted notebook keeps no widget's state, and a
            # bar that goes away leaves its first frame behind there: the
            # final state, as a line of text.
            print(final, file=sys.stderr)


def steps(n: int, desc: str = "steps", **tqdm_options):
    """``range(n)`` with a progress bar that appears only if the loop runs
    longer than about a second (and only on a terminal or in a notebook):
    for iterated maps such as a stencil loop::

        for _ in shmarray.steps(1000):
            eng.map(heat_step, new, old, args=(0.2,), halo=1)
            old, new = new, old
    """
    disable = tqdm_options.pop("disable", resolve(None) is False)
    bar = bar_class()
    return bar(
        range(n),
        desc=desc,
        delay=tqdm_options.pop("delay", DELAY),
        disable=disable,
        **tqdm_options,
    )
