"""Run `linkworker ARGS` and, as the process exits, write its peak RSS to a file.

    python -m worker.bench_peak OUTPUT ARGS...

The benchmark starts the worker this way because the kernel's own figure for a reaped child
(wait4's ru_maxrss) is not the worker's alone: a forked child starts with its parent's peak
and keeps it across exec, so a large parent would hide a small worker. `VmHWM` in
/proc/self/status belongs to the program's own address space, and read at exit it is exact.
Only the standard library is imported here, so the wrapper adds nothing the worker would not
load anyway.
"""

from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path


def peak_rss_line() -> str:
    """The `VmHWM:   123456 kB` line of this process (empty where /proc has none)."""
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""
    return next((line for line in status.splitlines() if line.startswith("VmHWM:")), "")


def main() -> None:
    output = Path(sys.argv[1])
    atexit.register(lambda: output.write_text(peak_rss_line() + "\n", encoding="ascii"))
    sys.argv = ["linkworker", *sys.argv[2:]]
    runpy.run_module("worker", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
