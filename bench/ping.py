"""Reading iputils ping output: round-trip times, their average and 99th percentile, and the
`-D` timestamp of the first reply."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_RTT = re.compile(r"\btime=(\d+(?:\.\d+)?) ms\b")
# `-D` prefixes each line with the wall-clock time it was printed: "[1700000000.123456] 64 bytes
# from 172.18.0.2: icmp_seq=7 ttl=63 time=0.48 ms".
_STAMPED_REPLY = re.compile(r"^\[(\d+(?:\.\d+)?)\] \d+ bytes from ", re.MULTILINE)


@dataclass(frozen=True)
class RttStats:
    count: int
    avg_ms: float
    p99_ms: float


def rtts(output: str) -> list[float]:
    """Every reply's round-trip time in ms, in the order ping printed them."""
    return [float(m.group(1)) for m in _RTT.finditer(output)]


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile: a value that was actually measured, never interpolated."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def stats(output: str) -> RttStats:
    values = rtts(output)
    if not values:
        last = output.strip().splitlines()[-1:] or ["(no output)"]
        raise ValueError(f"ping got no replies: {last[0]}")
    return RttStats(len(values), sum(values) / len(values), percentile(values, 99))


def first_reply_at(output: str) -> float | None:
    """The `-D` timestamp (seconds since the epoch) of the first reply, if one came yet."""
    match = _STAMPED_REPLY.search(output)
    return float(match.group(1)) if match else None
