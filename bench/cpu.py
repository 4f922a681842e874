"""CPU time of processes, every thread included, from /proc."""

from __future__ import annotations

import os
from collections.abc import Iterable

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Fields of /proc/<pid>/stat after the parenthesised command name, 0-based: state is 0, so
# utime (field 14 of proc(5)) is 11 and stime (15) is 12.
_UTIME, _STIME = 11, 12


def stat_ticks(stat: str) -> int:
    """utime + stime of one /proc/.../stat line, in clock ticks."""
    # The command name may itself contain ") ", so split after its last ")".
    fields = stat.rpartition(")")[2].split()
    return int(fields[_UTIME]) + int(fields[_STIME])


def thread_ticks(pid: int) -> int:
    """utime + stime summed over the live threads of `pid`, in clock ticks (0 once it is gone)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                total += stat_ticks(f.read())
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between listing and reading
    return total


def cpu_seconds(pids: Iterable[int]) -> float:
    return sum(thread_ticks(pid) for pid in pids) / CLOCK_TICKS


def percent_per_gbit(cpu_s: float, seconds: float, mbps: float) -> float | None:
    """CPU-seconds per second (as %) per Gbit/s carried; None when nothing was carried."""
    if seconds <= 0 or mbps <= 0:
        return None
    return (cpu_s / seconds * 100) / (mbps / 1000)
