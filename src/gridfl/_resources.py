"""What this machine gives a run: usable CPUs, and a process's memory."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["memory_kb", "usable_cpus"]


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1



def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in kB; (0, 0) once it is gone.

    RSS counts every page mapped, so the onnxruntime and numpy libraries that eleven
    processes share are counted eleven times in a sum of RSS; PSS divides each shared page
    among the processes that map it, so a sum of PSS is the physical memory they use.
    """
    rss = pss = 0
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except FileNotFoundError:  # gone, or a kernel before 4.14: fall back to VmRSS
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = pss = int(line.split()[1])
        return rss, pss
    except OSError:
        return 0, 0
    for line in text.splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss
