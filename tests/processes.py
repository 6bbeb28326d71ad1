"""Whether a process runs, judged from outside: shared by the tests and by
``bench/fault_table.py`` (so it needs nothing of pytest)."""

from __future__ import annotations

import psutil


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie); one that vanishes
    while we look is gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
