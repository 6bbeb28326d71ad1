"""A process's cgroups, read in one place: its CPU quota and the memory it
may still charge.

A process belongs to one group in each cgroup hierarchy: the unified one
(cgroup v2, line ``0::<path>`` of ``/proc/<pid>/cgroup``) and, on older or
hybrid systems, one v1 hierarchy per set of controllers (``4:cpu,cpuacct:
<path>``).  ``/proc/<pid>/mountinfo`` says where each hierarchy is mounted
and which of its groups the mount shows as its root (a container without
its own cgroup namespace sees ``/docker/<id>`` mounted at
``/sys/fs/cgroup``).  Every group from the process's own up to the mount's
root limits it, so :func:`levels` walks them all and the tightest limit
wins: a ``--cpus=2`` container on a 64-core host, or ``--memory=4g``, are
seen whichever level and version carries them (as loky's ``cpu_count``
reads them).

Everything here takes ``proc`` (default ``/proc/self``), so a test can hand
it a fake ``cgroup`` and ``mountinfo`` whose mount points lead to a fake
tree.  Nothing is cached: a process can be moved between groups.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

# cgroup v1 writes "no limit" as the largest page-aligned long: anything
# this big is no limit.
_V1_UNLIMITED = 2**62


def hierarchies(controller: str, proc: str = "/proc/self") -> Iterator[tuple[int, str, str]]:
    """(version, the process's own group directory, the mount point) of
    every mounted hierarchy that may carry ``controller`` ("cpu",
    "memory") for the process: the v2 one, and each v1 one that has it."""
    try:
        with open(os.path.join(proc, "cgroup")) as f:
            memberships = f.read().splitlines()
        with open(os.path.join(proc, "mountinfo")) as f:
            mounts = f.read().splitlines()
    except OSError:
        return
    v2, v1 = None, None
    for line in memberships:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif controller in parts[1].split(","):
            v1 = parts[2]
    for line in mounts:
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < max(sep + 2, 5):
            continue
        root, point, fstype = fields[3], fields[4], fields[sep + 1]
        options = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        if fstype == "cgroup2" and v2 is not None:
            version, member = 2, v2
        elif fstype == "cgroup" and v1 is not None and controller in options:
            version, member = 1, v1
        else:
            continue
        inside = _inside(member, root)
        if inside is not None:
            yield version, os.path.normpath(os.path.join(point, inside)), os.path.normpath(point)


def _inside(member: str, root: str) -> str | None:
    """``member``'s path relative to the mount's ``root``, or None if the
    mount does not show it.

    >>> _inside("/docker/abc", "/"), _inside("/docker/abc", "/docker/abc")
    ('docker/abc', '.')
    >>> _inside("/docker/abcd", "/docker/abc") is None
    True
    """
    member, root = os.path.normpath(member), os.path.normpath(root)
    if member != root and not member.startswith(root.rstrip("/") + "/"):
        return None
    return os.path.relpath(member, root)


def levels(group: str, point: str) -> Iterator[str]:
    """The directories from ``group`` up to the mount point ``point``.

    >>> list(levels("/sys/fs/cgroup/a/b", "/sys/fs/cgroup"))
    ['/sys/fs/cgroup/a/b', '/sys/fs/cgroup/a', '/sys/fs/cgroup']
    """
    here = group
    while True:
        yield here
        if here == point or len(here) <= len(point):
            return
        here = os.path.dirname(here)


def _words(path: str) -> list[str] | None:
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return None


def _cpus_v2(here: str) -> float | None:
    got = _words(os.path.join(here, "cpu.max"))  # "max 100000" or "150000 100000"
    if got and len(got) >= 2 and got[0] != "max" and int(got[1]) > 0:
        return int(got[0]) / int(got[1])
    return None


def _cpus_v1(here: str) -> float | None:
    quota = _words(os.path.join(here, "cpu.cfs_quota_us"))  # -1: none
    period = _words(os.path.join(here, "cpu.cfs_period_us"))
    if quota and period and int(quota[0]) > 0 and int(period[0]) > 0:
        return int(quota[0]) / int(period[0])
    return None


def _memory_v2(here: str) -> int | None:
    limit = _words(os.path.join(here, "memory.max"))  # "max": none
    used = _words(os.path.join(here, "memory.current"))
    if limit and used and limit[0] != "max":
        return max(int(limit[0]) - int(used[0]), 0)
    return None


def _memory_v1(here: str) -> int | None:
    limit = _words(os.path.join(here, "memory.limit_in_bytes"))
    used = _words(os.path.join(here, "memory.usage_in_bytes"))
    if limit and used and int(limit[0]) < _V1_UNLIMITED:
        return max(int(limit[0]) - int(used[0]), 0)
    return None


def _tightest(
    controller: str,
    read: dict[int, Callable[[str], float | None]],
    proc: str,
) -> float | None:
    """The smallest value ``read[version](directory)`` gives over every
    level of every hierarchy carrying ``controller``; None if none has one."""
    found = []
    for version, group, point in hierarchies(controller, proc):
        for here in levels(group, point):
            try:
                value = read[version](here)
            except (ValueError, IndexError):  # a file we cannot parse: no limit
                value = None
            if value is not None:
                found.append(value)
    return min(found) if found else None


def cpu_quota(proc: str = "/proc/self") -> float | None:
    """The CPU quota of the process, in CPUs, if any: the smallest
    ``cpu.max`` (v2) or ``cpu.cfs_quota_us / cpu.cfs_period_us`` (v1)
    from its own group up to the root."""
    return _tightest("cpu", {1: _cpus_v1, 2: _cpus_v2}, proc)


def memory_left(proc: str = "/proc/self") -> int | None:
    """Bytes the process's groups may still charge, if any is capped: the
    smallest ``memory.max - memory.current`` (v2) or ``memory.limit_in_bytes
    - memory.usage_in_bytes`` (v1) from its own group up to the root."""
    left = _tightest("memory", {1: _memory_v1, 2: _memory_v2}, proc)
    return None if left is None else int(left)
