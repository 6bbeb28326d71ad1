"""The trust model, checked: private blocks, no network, strict workers."""

from __future__ import annotations

import os
import stat

import numpy as np
import psutil

import shmarray
from shmarray import blocks


def _descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def test_local_engine_opens_no_network_port():
    with shmarray.Engine(workers=2) as eng:
        x = eng.zeros(100)
        eng.map(lambda a: None, x)
        procs = [psutil.Process(), *_descendants()]
        assert set(eng.worker_pids) <= {p.pid for p in procs}
        for p in procs:
            assert p.net_connections(kind="inet") == [], (p.pid, p.name())
        del x


def test_blocks_are_private_to_their_user(engine):
    old = os.umask(0)  # even with a permissive umask
    try:
        x = engine.zeros(10)
    finally:
        os.umask(old)
    st = os.stat(f"{blocks.SHM_DIR}{engine.blocks[-1].name}")
    assert stat.S_IMODE(st.st_mode) == 0o600
    del x


def test_block_names_are_not_guessable_from_earlier_ones(engine):
    arrays = [engine.zeros(1) for _ in range(50)]
    tokens = [int(b.name.rsplit("-", 1)[1], 16) for b in engine.blocks]
    assert len(set(tokens)) == len(tokens)
    # neighbours differ in about half of their 64 bits, as random bits do
    flips = [bin(a ^ b).count("1") for a, b in zip(tokens, tokens[1:])]
    assert 20 < np.mean(flips) < 44
    del arrays
