"""A real web service: the FastAPI app of bench/service.py under uvicorn on
127.0.0.1, driven by a real HTTP client, bounded in requests and time."""

from __future__ import annotations

import asyncio
import os
import sys

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import service  # noqa: E402
from shmarray.partition import split_rows  # noqa: E402


def test_health_answers_while_a_computation_runs():
    with service.server("engine") as (url, proc):

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
                held = asyncio.create_task(client.post("/hold"))
                while not (await client.get("/holding")).json()["holding"]:
                    await asyncio.sleep(0.005)
                # the kernel is running in a worker: the loop must still answer
                answers = [(await client.get("/health")).json() for _ in range(20)]
                assert not held.done()
                await client.post("/release")
                return answers, (await held).json()

        answers, released = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert answers == [{"ok": True}] * 20
    assert released == {"released": True}
    assert proc.returncode is not None


def test_concurrent_clients_get_exact_results():
    data = np.random.default_rng(0).random(service.ROWS)

    def expected(scale: float) -> float:
        # the engine reduces one chunk per worker and adds them in order
        parts = [service.damped_sine(data[lo:hi], scale) for lo, hi in split_rows(len(data), 2)]
        return parts[0] + parts[1]

    with service.server("engine") as (url, _):

        async def client_run(client, k):
            out = []
            for _ in range(3):
                r = await client.post("/compute", params={"scale": 1.0 + k})
                r.raise_for_status()
                out.append((k, r.json()["value"]))
            return out

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
                return await asyncio.gather(*(client_run(client, k) for k in range(8)))

        results = asyncio.run(asyncio.wait_for(scenario(), 120))
    for per_client in results:
        for k, value in per_client:
            assert value == expected(1.0 + k)
