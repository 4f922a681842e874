"""What the TUI shows, computed from status snapshots; no Textual here, so it is easy to test."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

Status = dict[str, Any]
Row = tuple[str, ...]
SAMPLES = 60  # sparkline history: about a minute at one sample per second


def overall_state(status: Status | None, error: str | None) -> str:
    """The header's one word (or phrase): the most useful thing to know first.

    Problems that explain a dead tunnel (docker, agent) come before "connecting", so the
    user sees the cause rather than the symptom."""
    if status is None:
        return f"daemon not running: {error}" if error else "daemon not running"
    docker = status.get("docker") or {}
    if docker.get("state") == "down":
        reason = docker.get("error")
        return f"docker down: {reason}" if reason else "docker down"
    agent = status.get("agent")
    if isinstance(agent, str) and agent not in ("running", "not managed"):
        return f"agent missing ({agent})"
    if any(p.get("state") == "up" for p in status.get("peers") or []):
        return "connected"
    return "connecting"


def header_line(status: Status | None, error: str | None) -> str:
    state = overall_state(status, error)
    if status is None:
        return f"ctun  {state}"
    # The transport in use is the connected peers'; the daemon's own field lists every
    # transport it listens on ("udp+tcp").
    used = sorted({str(p.get("transport")) for p in status.get("peers") or []
                   if p.get("state") == "up" and p.get("transport")})
    transport = "+".join(used) if used else f"{status.get('transport', '?')} (listening)"
    return (f"ctun  {state}  transport {transport}  "
            f"interface {status.get('interface', '?')}")


def totals(status: Status) -> dict[str, int]:
    """rx/tx packets and bytes summed over the peers."""
    keys = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")
    return {k: sum(int(p.get(k) or 0) for p in status.get("peers") or []) for k in keys}


def drops(status: Status) -> dict[str, int]:
    """Drops by reason: the daemon's own and every peer's, merged; then the frames each
    transport lost (`<transport> <reason>`), which no peer's counter shows."""
    merged: dict[str, int] = {}
    sources = [status.get("drops") or {}] + [p.get("drops") or {} for p in
                                            status.get("peers") or []]
    for each in sources:
        for reason, n in each.items():
            merged[reason] = merged.get(reason, 0) + int(n)
    for transport in status.get("transports") or []:
        for key, n in (transport.get("stats") or {}).items():
            if key.startswith("dropped_") and n:
                merged[f"{transport.get('name')} {key[len('dropped_'):]}"] = int(n)
    return merged


@dataclass
class Rates:
    """Per-second rates from successive snapshots, with a bounded history for sparklines."""

    last: dict[str, int] | None = None
    last_at: float = 0.0
    current: dict[str, float] = field(default_factory=dict)
    history: dict[str, deque[float]] = field(default_factory=dict)

    def add(self, counters: dict[str, int], at: float | None = None) -> None:
        at = time.monotonic() if at is None else at
        if self.last is not None and at > self.last_at:
            elapsed = at - self.last_at
            for key, value in counters.items():
                # A counter that went down is a restarted daemon: no rate, not a negative one.
                rate = max(0, value - self.last.get(key, 0)) / elapsed
                self.current[key] = rate
                self.history.setdefault(key, deque(maxlen=SAMPLES)).append(rate)
        self.last, self.last_at = dict(counters), at

    def reset(self) -> None:
        self.last = None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def age(seconds: Any) -> str:
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s // 60:.0f}m{s % 60:02.0f}s"
    return f"{s // 3600:.0f}h{s % 3600 // 60:02.0f}m"


def endpoint(value: Any) -> str:
    if not value:
        return "-"
    host, port = value
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f} ms"


def tunnel_rows(status: Status) -> list[Row]:
    """One row per peer: the transport it uses and both ends of it."""
    local = {t.get("name"): t.get("local_endpoint") for t in status.get("transports") or []}
    uptime = age(status.get("uptime"))
    rows: list[Row] = []
    for p in status.get("peers") or []:
        transport = p.get("transport") or status.get("transport") or "?"
        rows.append((str(p.get("name")), str(transport),
                     endpoint(local.get(transport) or status.get("local_endpoint")),
                     endpoint(p.get("endpoint")), str(p.get("state")),
                     age(p.get("handshake_age")), ms(p.get("rtt_ms")), uptime))
    return rows


def peer_rows(status: Status) -> list[Row]:
    rows: list[Row] = []
    for p in status.get("peers") or []:
        remote = " ".join(str(x) for x in (p.get("remote_name"), p.get("remote_version")) if x)
        state = str(p.get("state"))
        if p.get("reason") and state != "up":
            state += f" ({p['reason']})"
        rows.append((str(p.get("name")), remote or "-", endpoint(p.get("endpoint")), state,
                     age(p.get("last_seen_age")),
                     str(p.get("rx_packets", 0)), human_bytes(p.get("rx_bytes", 0)),
                     str(p.get("tx_packets", 0)), human_bytes(p.get("tx_bytes", 0))))
    return rows


def route_rows(status: Status) -> list[Row]:
    return [(str(r.get("subnet")), str(r.get("source")), str(r.get("state")),
             str(r.get("detail") or "")) for r in status.get("route_table") or []]


def event_line(event: dict[str, Any]) -> str:
    at = time.strftime("%H:%M:%S", time.localtime(float(event.get("at") or 0)))
    reason = f" ({event['reason']})" if event.get("reason") else ""
    return f"{at} {event.get('peer', '?')} {event.get('state', '?')}{reason}"
