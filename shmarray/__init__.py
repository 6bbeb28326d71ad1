"""shmarray: NumPy arrays in POSIX shared memory, and a persistent pool of
worker processes that runs numba kernels on them in place."""

import logging

# shmarray logs worker replacements, timeouts and recycling on this logger;
# like every library, it prints nothing unless the application configures
# logging.
logging.getLogger("shmarray").addHandler(logging.NullHandler())

from shmarray.batch import ChunkStream, WorkerStats
from shmarray.check import CheckReport
from shmarray.compare import Comparison
from shmarray.descriptors import row_offset, worker_id
from shmarray.engine import Engine, MapFuture
from shmarray.errors import (
    CopyWarning,
    EngineClosedError,
    KernelError,
    MapCancelledError,
    MapReport,
    PythonKernelWarning,
    RaceError,
    RemoteTraceback,
    SharedMemoryFullError,
    ShmarrayError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerStartError,
)

__version__ = "0.1.0"

from shmarray.progress import steps

__all__ = [
    "Engine",
    "MapFuture",
    "MapReport",
    "CheckReport",
    "ChunkStream",
    "WorkerStats",
    "row_offset",
    "worker_id",
    "Comparison",
    "steps",
    "ShmarrayError",
    "EngineClosedError",
    "SharedMemoryFullError",
    "WorkerCrashedError",
    "TaskTimeoutError",
    "MapCancelledError",
    "WorkerStartError",
    "KernelError",
    "RaceError",
    "RemoteTraceback",
    "CopyWarning",
    "PythonKernelWarning",
]
