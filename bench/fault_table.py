"""The fault table: every fault case of tests/fault_scenarios.py, injected
into a victim interpreter and observed from outside.

Run: ``.venv/bin/python bench/fault_table.py``
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from fault_scenarios import CASES, observe  # noqa: E402

HOW = {
    "worker_sigkill": "SIGKILL to a worker inside a numba loop",
    "oom_kill": "SIGKILL (what the OOM killer sends) to a worker allocating memory",
    "segfault": "kernel reads address 0 (SIGSEGV)",
    "os_exit": "kernel calls os._exit(3)",
    "sys_exit": "kernel calls sys.exit(4)",
    "unpicklable_result": "kernel returns a lambda",
    "kernel_exception": "kernel raises ValueError",
    "timeout": "numba loop that never ends, timeout=1",
    "sigint": "Ctrl-C: SIGINT to the whole process group",
    "idle_worker_killed": "SIGKILL to an idle worker, then a map",
    "shm_exhausted": "ask for 1 GiB more than /dev/shm has free",
    "coordinator_sigkill": "kill -9 of the coordinator inside a map",
}


def main() -> int:
    print("| fault | injected by | user sees | time to error | usable after | "
          "blocks left | workers left | stderr |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in CASES:
        r = observe(case)
        if case == "coordinator_sigkill":
            sees = "(coordinator dead) watchdog unlinks blocks, kills workers"
            usable = "n/a"
        else:
            sees = r.get("error") or "nothing: the map succeeds"
            if r.get("message") and r.get("error") not in (None, "KeyboardInterrupt"):
                sees += f": {r['message'][:70]}..."
            usable = "yes" if r.get("usable") else "NO"
        stderr = "empty" if not r["stderr"] else f"{len(r['stderr'])} chars"
        print(f"| {case} | {HOW[case]} | {sees} | {r['seconds']:.2f} s | {usable} | "
              f"{len(r['blocks_left'])} | {len(r['workers_left'])} | {stderr} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
