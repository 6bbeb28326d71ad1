"""The fault table: every case of tests/fault_scenarios.py and of
tests/crash_cases.py, injected into a victim interpreter and observed from
outside, as Markdown for the README.

Run: ``.venv/bin/python bench/fault_table.py``
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from crash_cases import HOWS, STAGES  # noqa: E402
from fault_scenarios import CASES, PARENT_KILLS, observe  # noqa: E402
from test_faults import run_crash_case  # noqa: E402

HOW = {
    "worker_sigkill": "SIGKILL to a worker inside a numba loop",
    "oom_kill": "SIGKILL (what the OOM killer sends) to a worker allocating memory",
    "segfault": "kernel reads address 0 (SIGSEGV)",
    "os_exit": "kernel calls os._exit(3)",
    "sys_exit": "kernel calls sys.exit(4)",
    "unpicklable_result": "kernel returns a threading.Lock",
    "kernel_exception": "kernel raises ValueError",
    "timeout": "numba loop that never ends, timeout=1",
    "sigint": "Ctrl-C: SIGINT to the whole process group",
    "idle_worker_killed": "SIGKILL to an idle worker, then a map",
    "shm_exhausted": "ask for 1 GiB more than /dev/shm has free",
    "out_of_inodes": "allocate on a tmpfs with nr_inodes=12 (private mount namespace)",
    "coordinator_sigkill": "kill -9 of the coordinator inside a map",
    "group_sigterm": "SIGTERM to the whole process group inside a map (`timeout`, `scancel`)",
    "group_sighup": "SIGHUP to the whole process group inside a map (terminal closed)",
    "group_sigkill": "SIGKILL to the whole process group inside a map",
    "forked_child_exit": "`os.fork()` in the script; the child exits normally; then a map",
    "watchdog_killed": "SIGKILL to the watchdog, then to a worker, then a map",
    "huge_timeout": "`timeout=1e9` (past poll()'s 2**31 ms)",
    "evil_descriptor": "a hand-made descriptor of dtype object in args",
    "kernel_forks": "the kernel calls os.fork() and both processes return",
    "kernel_keyboard_interrupt": "the kernel raises KeyboardInterrupt",
    "ctrl_c_during_close": "Ctrl-C while close() waits for a stopped worker, then close() again",
}
STAGE_NAMES = {
    "kernel_unpickling": "unpickling the kernel in a worker",
    "run": "running the kernel",
    "result_pickling": "pickling its value in the worker",
    "result_unpickling": "unpickling its value in the caller",
}
HOW_NAMES = {"error": "raises", "exit": "calls sys.exit(5)", "segfault": "segfaults"}


def sees(r: dict, case: str) -> tuple[str, str]:
    if case in PARENT_KILLS or r.get("returncode", 0) < 0:
        return "(coordinator dead) the watchdog unlinks its blocks, kills its workers", "n/a"
    if case == "ctrl_c_during_close":
        return "KeyboardInterrupt; the second close() finishes", "n/a (closed)"
    text = r.get("error") or "nothing: it works"
    if r.get("message") and r.get("error") not in (None, "KeyboardInterrupt"):
        text += f": {r['message'][:70]}..."
    return text, "yes" if r.get("usable") else "NO"


def row(name: str, how: str, r: dict) -> str:
    if "skipped" in r:
        return f"| {name} | {how} | skipped: {r['skipped']} | | | | | | |"
    text, usable = sees(r, name)
    stderr = "empty" if not r["stderr"] else f"{len(r['stderr'])} chars"
    return (
        f"| {name} | {how} | {text} | {r['seconds']:.2f} s | {r['clean_after']:.2f} s | "
        f"{usable} | {len(r['blocks_left'])} | {len(r['workers_left'])} | {stderr} |"
    )


def main() -> int:
    print(
        "| fault | injected by | user sees | time to error | time to a clean "
        "/dev/shm | usable after | blocks left | processes left | stderr |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in CASES:
        print(row(case, HOW[case], observe(case)), flush=True)
    for stage in STAGES:
        for how in HOWS:
            r = run_crash_case(stage, how)
            print(
                row(f"{stage}/{how}", f"{STAGE_NAMES[stage]}: it {HOW_NAMES[how]}", r), flush=True
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
