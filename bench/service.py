"""A web service that computes with shmarray, and the load that measures it.

The app (``make_app``) holds one Engine for its lifetime (FastAPI's
lifespan).  ``POST /compute`` runs a reduction over a shared array with
``await eng.reduce_async``; ``GET /health`` answers at once.  With
``--mode sequential`` the same handler calls the numba kernel directly
instead, as a service without the engine would.

``python bench/service.py`` starts the app under uvicorn on 127.0.0.1 in a
child process, loads it with httpx (8 clients posting computations for 10
s, a health check every 10 ms), and reports health latency percentiles and
compute throughput for both modes.  ``python bench/service.py serve --port
P`` runs the app alone.  Needs the ``service`` extra (fastapi, uvicorn,
httpx).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
from numba import njit

from shmarray import control

ROWS = 1_000_000  # one computation: about 13 ms of sequential numba


@njit(cache=True, nogil=True)
def damped_sine(x, scale):
    """A compute-bound reduction (transcendentals, not memory traffic)."""
    total = 0.0
    for i in range(x.shape[0]):
        v = x[i] * scale
        total += math.sin(v) * math.exp(-v * v)
    return total


@njit(nogil=True)
def hold(flag):
    """Sets flag[0], then runs until flag[1] is set: a computation a test
    can see running and release.  ``flag`` holds int64; the atomic load
    keeps the compiler from reading flag[1] once and looping forever."""
    flag[0] = 1
    while control.load(flag, 1) == 0:
        pass
    return 0.0


def make_app(mode: str = "engine", workers: int = 2):
    from fastapi import FastAPI

    import shmarray

    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        data = np.random.default_rng(0).random(ROWS)
        if mode == "engine":
            with shmarray.Engine(workers=workers) as eng:
                state.update(eng=eng, x=eng.from_numpy(data), flag=eng.zeros(2, np.int64))
                await eng.reduce_async(damped_sine, state["x"], args=(1.0,))
                yield
                state.clear()
        else:
            state.update(x=data, flag=np.zeros(2, np.int64))
            damped_sine(data, 1.0)
            yield
            state.clear()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.post("/compute")
    async def compute(scale: float = 1.0):
        if mode == "engine":
            value = await state["eng"].reduce_async(damped_sine, state["x"], args=(scale,))
        else:
            value = damped_sine(state["x"], scale)
        return {"value": value}

    @app.post("/hold")
    async def held():
        """Runs until /release: proves the loop stays free meanwhile."""
        state["flag"][:] = 0
        if mode == "engine":
            await state["eng"].reduce_async(hold, state["flag"], chunks=1)
        else:
            hold(state["flag"])
        return {"released": True}

    @app.get("/holding")
    async def holding():
        return {"holding": bool(state["flag"][0])}

    @app.post("/release")
    async def release():
        state["flag"][1] = 1
        return {"ok": True}

    return app


def serve(port: int, mode: str) -> None:
    import uvicorn

    uvicorn.run(make_app(mode), host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(mode: str, timeout: float = 120.0):
    """The app under uvicorn in a child process; yields its base URL."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "serve", "--port", str(port), "--mode", mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {proc.communicate()}")
            time.sleep(0.05)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()  # uvicorn shuts down; the lifespan closes
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if err:
            sys.stderr.write(f"server ({mode}) stderr:\n{err}")


async def load(url: str, clients: int, seconds: float, poll: float) -> dict:
    """``clients`` concurrent clients post computations for ``seconds``
    while one more checks /health every ``poll`` seconds."""
    import httpx

    latencies: list[float] = []
    computed = 0
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:

        async def worker(k: int):
            nonlocal computed
            while time.monotonic() < stop:
                r = await client.post("/compute", params={"scale": 1.0 + k})
                r.raise_for_status()
                computed += 1

        async def health():
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = await client.get("/health")
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(poll)

        started = time.monotonic()
        await asyncio.gather(health(), *(worker(k) for k in range(clients)))
        took = time.monotonic() - started
    q = statistics.quantiles(latencies, n=100)
    return {
        "computations": computed,
        "seconds": took,
        "throughput_per_s": computed / took,
        "health_checks": len(latencies),
        "health_p50_ms": statistics.median(latencies) * 1e3,
        "health_p99_ms": q[98] * 1e3,
        "health_max_ms": max(latencies) * 1e3,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="bench", choices=["bench", "serve"])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--mode", default="engine", choices=["engine", "sequential"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.port, args.mode)
        return 0
    fig = {}
    for mode in ("engine", "sequential"):
        with server(mode) as (url, _):
            fig[mode] = asyncio.run(load(url, args.clients, args.seconds, 0.01))
    for mode, f in fig.items():
        print(
            f"{mode:<10} /health p50 {f['health_p50_ms']:6.2f} ms  p99 "
            f"{f['health_p99_ms']:6.2f} ms  max {f['health_max_ms']:6.1f} ms  "
            f"({f['health_checks']} checks)   compute {f['throughput_per_s']:6.1f}/s "
            f"({f['computations']} in {f['seconds']:.1f} s)"
        )
    print(
        f"engine / sequential throughput: "
        f"{fig['engine']['throughput_per_s'] / fig['sequential']['throughput_per_s']:.2f}x"
        f"  (health p99 target <= 20 ms with the engine)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
