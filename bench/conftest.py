"""Benchmarks come in pairs (shmarray and a peer, same group); the summary
prints each pair's ratio of medians from this run."""

from __future__ import annotations

import pytest

MEDIANS: dict[str, dict[str, float]] = {}


@pytest.fixture
def record(benchmark):
    """Call after ``benchmark(...)``: remembers the median under its group."""

    def done(role: str) -> None:
        MEDIANS.setdefault(benchmark.group, {})[role] = benchmark.stats.stats.median

    return done


def pytest_terminal_summary(terminalreporter):
    if not MEDIANS:
        return
    terminalreporter.section("shmarray / peer (ratio of medians, this run)")
    for group, roles in sorted(MEDIANS.items()):
        engine = roles.get("shmarray")
        for role, median in sorted(roles.items()):
            if role != "shmarray" and engine:
                terminalreporter.write_line(
                    f"{group:<28} shmarray / {role:<24} {engine / median:7.3f}"
                )
