"""Fault scenarios, each run as the victim in a child interpreter:

    python tests/fault_scenarios.py CASE

The child injects the fault (or is hit by its parent), catches what the
user would see, and prints JSON lines: first its worker and watchdog pids
and block names (so the parent can check from outside that all of them go),
then, when it survives, the error's type and message, seconds from
injection to error, and whether the engine still ran a map afterwards.
Nothing waits on a timer: a kernel that must be running before the fault
sets a flag in shared memory, and the injector waits for that flag.
``tests/test_faults.py`` asserts on these; ``bench/fault_table.py`` prints
them as the README's table.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
from numba import njit

import shmarray
from shmarray.descriptors import ArrayDescriptor

# allocate_forever() loops in Python on purpose.
warnings.filterwarnings("ignore", category=shmarray.PythonKernelWarning)

# As a terminal job has it, even when the tests run under nohup (which makes
# every child ignore SIGHUP): group_sighup sends it.
signal.signal(signal.SIGHUP, signal.SIG_DFL)


@njit
def spin(flag):
    """Says it runs (flag[0]), then never ends."""
    flag[0] = 1.0
    while flag[1] == 0.0:  # never set
        pass
    return 0.0


@njit
def scale(x, s):
    for i in range(x.shape[0]):
        x[i] *= s


def segfault(x):
    ctypes.string_at(0)


def hard_exit(x):
    os._exit(3)


def sys_exit(x):
    sys.exit(4)


def unpicklable_result(x):
    return threading.Lock()  # no pickler can carry a lock


def raises(x):
    raise ValueError("kernel rejected its input")


def allocate_forever(flag):
    flag[0] = 1.0
    hog = []
    while True:
        hog.append(np.ones(2**20))


def forks(x):
    os.fork()  # both processes return from here
    x[:] += 1.0


def impatient(x):
    raise KeyboardInterrupt("the kernel gave up")


def wait_running(flag) -> None:
    while flag[0] == 0.0:
        time.sleep(0.001)


def when_running(flag, act) -> list[float]:
    """Run ``act()`` in a thread once the kernel has set ``flag``; returns
    a list that receives the moment it acted."""
    when: list[float] = []

    def go():
        wait_running(flag)
        when.append(time.monotonic())
        act()

    threading.Thread(target=go, daemon=True).start()
    return when


def tell(report: dict) -> None:
    print(json.dumps(report), flush=True)


def run_case(case: str) -> dict:
    report: dict = {"case": case}
    eng = shmarray.Engine(workers=2)
    with eng:
        pool = eng._dispatcher.pool
        flag = eng.zeros(2)
        x = eng.zeros(1000)
        report["pids"] = eng.worker_pids + [pool.watchdog.child.pid]
        report["blocks"] = [b.name for b in eng.blocks] + [pool._control_name]
        injected = [time.monotonic()]
        if case in PARENT_KILLS:
            # The parent strikes once the kernel runs; we do not survive.
            when_running(flag, lambda: tell(report))
            eng.map(spin, flag, chunks=1)
        try:
            if case == "worker_sigkill":
                injected = when_running(flag, lambda: os.kill(eng.worker_pids[0], signal.SIGKILL))
                eng.map(spin, flag, chunks=1)
            elif case == "oom_kill":  # the OOM killer sends SIGKILL
                injected = when_running(flag, lambda: os.kill(eng.worker_pids[0], signal.SIGKILL))
                eng.map(allocate_forever, flag, chunks=1)
            elif case == "segfault":
                eng.map(segfault, x)
            elif case == "os_exit":
                eng.map(hard_exit, x)
            elif case == "sys_exit":
                eng.map(sys_exit, x)
            elif case == "unpicklable_result":
                eng.reduce(unpicklable_result, x)
            elif case == "kernel_exception":
                eng.map(raises, x)
            elif case == "timeout":
                eng.map(spin, flag, chunks=1, timeout=1.0, progress=False)
            elif case == "sigint":
                tell(report)  # the parent sends SIGINT when told
                injected = when_running(flag, lambda: tell({"running": True}))
                eng.map(spin, flag, chunks=1)
            elif case == "idle_worker_killed":
                eng.map(scale, x, args=(2.0,))  # the kernel is installed
                victim = eng.worker_pids[0]
                os.kill(victim, signal.SIGKILL)
                _wait_gone(victim)
                injected = [time.monotonic()]
                eng.map(scale, x, args=(2.0,))
            elif case == "shm_exhausted":
                free = shmarray.blocks.free_space()[0]
                eng.empty(free + 2**30, np.uint8)
            elif case == "out_of_inodes":
                kept = [eng.zeros(10) for _ in range(100)]  # noqa: F841  (held until the exit)
            elif case == "forked_child_exit":
                pid = os.fork()
                if pid == 0:
                    report["child"] = True
                    sys.exit(0)  # a normal exit: atexit hooks run here
                os.waitpid(pid, 0)
                injected = [time.monotonic()]
                eng.map(scale, x, args=(2.0,))
            elif case == "watchdog_killed":
                dog = pool.watchdog.child.pid
                os.kill(dog, signal.SIGKILL)
                _wait_gone(dog)
                victim = eng.worker_pids[0]
                os.kill(victim, signal.SIGKILL)  # a replacement is due
                _wait_gone(victim)
                injected = [time.monotonic()]
                eng.map(scale, x, args=(2.0,))
            elif case == "huge_timeout":
                eng.map(scale, x, args=(2.0,), timeout=1e9)
            elif case == "evil_descriptor":
                evil = ArrayDescriptor(report["blocks"][1], 0, (4,), (8,), "|O")
                eng.reduce(lambda a, objs: objs[0], x, args=(evil,))
            elif case == "kernel_forks":
                eng.map(forks, x, chunks=1)
                eng.map(scale, x, args=(2.0,))
            elif case == "kernel_keyboard_interrupt":
                eng.map(impatient, x)
            elif case == "ctrl_c_during_close":
                os.kill(eng.worker_pids[1], signal.SIGSTOP)  # will not answer Stop
                injected = [time.monotonic()]
                try:
                    # The parent sends SIGINT when told; close() then waits
                    # seconds for the stopped worker, so that is where it lands.
                    tell(report)
                    eng.close()
                except KeyboardInterrupt:
                    report["interrupted_at"] = time.monotonic()
                eng.close()  # and again: it must finish
                report["closed"] = eng.closed
            else:
                raise SystemExit(f"unknown case {case!r}")
            report["error"] = None
        except BaseException as exc:  # noqa: BLE001 - we report what users see
            if report.get("child"):
                raise  # the forked child: exit, as it asked
            report["error_at"] = time.monotonic()
            report["error"] = type(exc).__name__
            report["message"] = (str(exc).splitlines() or [""])[0][:300]
            report["is_shmarray_error"] = isinstance(exc, shmarray.ShmarrayError)
        report["seconds"] = time.monotonic() - injected[0] if injected else None
        if not eng.closed:
            try:
                y = eng.from_numpy(np.arange(10.0))
                eng.map(scale, y, args=(3.0,))
                report["usable"] = bool(np.array_equal(y, np.arange(10.0) * 3.0))
                del y
            except Exception as exc:  # noqa: BLE001
                report["usable"] = False
                report["usable_error"] = repr(exc)
            report["pids"] = sorted(
                set(report["pids"]) | set(eng.worker_pids) | {pool.watchdog.child.pid}
            )
            report["blocks"] = sorted(set(report["blocks"]) | {b.name for b in eng.blocks})
        del x, flag
    return report


def _wait_gone(pid: int) -> None:
    import psutil

    try:
        psutil.Process(pid).wait(10)
    except psutil.NoSuchProcess:
        pass


# Cases the parent ends by killing the victim: how, once the kernel runs.
PARENT_KILLS = {
    "coordinator_sigkill": ("kill", signal.SIGKILL),
    "group_sigterm": ("killpg", signal.SIGTERM),
    "group_sighup": ("killpg", signal.SIGHUP),
    "group_sigkill": ("killpg", signal.SIGKILL),
}


def private_shm(size: str = "256m", inodes: int = 12) -> list[str] | None:
    """A command prefix that runs its command with a small tmpfs of its own
    on /dev/shm (a private mount namespace), or None where not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    mount = f"mount -t tmpfs -o size={size},nr_inodes={inodes} tmpfs /dev/shm"
    probe = subprocess.run(
        [unshare, "-m", "sh", "-c", f"{mount} && echo ok"], capture_output=True, text=True
    )
    if probe.stdout.strip() != "ok":
        return None
    return [unshare, "-m", "sh", "-c", f'{mount} && exec "$0" "$@"']


def observe(case: str, timeout: float = 120.0) -> dict:
    """Run ``case`` in a child interpreter (its own session, as a terminal
    job) and watch it from outside: its report, its stderr, and how long
    until its workers, watchdog and blocks are gone."""
    # Here, not at the top: the victim runs this file too, and needs none of
    # the tests' helpers (nor conftest's hooks on Popen and fork).
    from processes import running as _running

    prefix = []
    if case == "out_of_inodes":
        prefix = private_shm()
        if prefix is None:
            return {"case": case, "skipped": "no private mount namespace here"}
    proc = subprocess.Popen(
        prefix + [sys.executable, os.path.abspath(__file__), case],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    sent = None
    first = None
    if case in PARENT_KILLS or case in ("sigint", "ctrl_c_during_close"):
        first = json.loads(proc.stdout.readline())
        if case == "sigint":
            json.loads(proc.stdout.readline())  # {"running": true}
        sent = time.monotonic()
        how, sig = PARENT_KILLS.get(case, ("killpg", signal.SIGINT))
        if how == "kill":
            os.kill(proc.pid, sig)
        else:
            os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=timeout)
    lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    report = dict(first or {}, **(lines[-1] if lines and "case" in lines[-1] else {}))
    if case in PARENT_KILLS:
        report.update(error=None, usable=None)
    if sent is not None and "error_at" in report:
        report["seconds"] = report["error_at"] - sent
    if case == "ctrl_c_during_close" and "interrupted_at" in report:
        report["seconds"] = report["interrupted_at"] - sent
    clean_from = sent if case in PARENT_KILLS else time.monotonic()
    deadline = time.monotonic() + 10.0
    names = [n.lstrip("/") for n in report.get("blocks", [])]
    while True:
        alive = [p for p in report.get("pids", []) if _running(p)]  # vanishing: gone
        left = [n for n in names if os.path.exists(f"/dev/shm/{n}")]
        if not (alive or left) or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    report["clean_after"] = time.monotonic() - clean_from
    if case in PARENT_KILLS:
        report["seconds"] = report["clean_after"]
    report.update(returncode=proc.returncode, stderr=err, workers_left=alive, blocks_left=left)
    return report


CASES = [
    "worker_sigkill",
    "oom_kill",
    "segfault",
    "os_exit",
    "sys_exit",
    "unpicklable_result",
    "kernel_exception",
    "timeout",
    "sigint",
    "idle_worker_killed",
    "shm_exhausted",
    "out_of_inodes",
    "coordinator_sigkill",
    "group_sigterm",
    "group_sighup",
    "group_sigkill",
    "forked_child_exit",
    "watchdog_killed",
    "huge_timeout",
    "evil_descriptor",
    "kernel_forks",
    "kernel_keyboard_interrupt",
    "ctrl_c_during_close",
]

if __name__ == "__main__":
    if sys.argv[1] in ("sigint", "ctrl_c_during_close"):
        # Like a terminal: the SIGINT that reaches our process group.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    tell(run_case(sys.argv[1]))
