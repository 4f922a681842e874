"""Legacy mode's status, in the shape of the engine's snapshot (core/engine.py), so that
`ctun status`, `ctun peers` and the TUI show a legacy daemon like any other."""

from __future__ import annotations

import collections
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..contracts import Endpoint

WIRE = "legacy (unauthenticated)"
TRANSPORT = "udp"
RECENT_EVENTS = 200


@dataclass
class Traffic:
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: Counter[str] = field(default_factory=Counter)

    def received(self, size: int) -> None:
        self.rx_packets += 1
        self.rx_bytes += size

    def sent(self, size: int) -> None:
        self.tx_packets += 1
        self.tx_bytes += size


@dataclass(frozen=True)
class PeerName:
    """What runtime.serve needs of a peer: its name."""

    name: str


def peer_view(name: str, state: str, reason: str, endpoint: Endpoint | None,
              last_seen: float | None, traffic: Traffic, now: float) -> dict[str, Any]:
    return {
        "name": name,
        "state": state,
        "reason": reason,
        "endpoint": list(endpoint) if endpoint else None,
        "handshake_age": None,  # there are no handshakes in this format
        "last_seen_age": round(now - last_seen, 3) if last_seen else None,
        "handshakes": 0,
        "rtt_ms": None,
        "handshake_ms": None,
        "gso": False,
        "rx_super": 0,
        "tx_super": 0,
        "transport": TRANSPORT,
        "pinned": False,
        "switches": [],
        "switch_count": 0,
        "remote_name": None,
        "remote_version": None,
        "rx_packets": traffic.rx_packets,
        "rx_bytes": traffic.rx_bytes,
        "tx_packets": traffic.tx_packets,
        "tx_bytes": traffic.tx_bytes,
        "drops": {k: v for k, v in traffic.drops.items() if v},
    }


class EventLog:
    """Peer state changes for the log and the status view; record() on the timer thread."""

    def __init__(self) -> None:
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_EVENTS)
        self._id = 0

    def record(self, peer: str, state: str, reason: str) -> None:
        self._id += 1
        self.recent.append({"id": self._id, "at": round(time.time(), 3), "peer": peer,
                            "state": state, "reason": reason})


def snapshot(role: str, name: str, version: str, interface: str, local: Endpoint,
             started: float, drops: Counter[str], peers: list[dict[str, Any]],
             events: EventLog) -> dict[str, Any]:
    return {
        "role": role,
        "name": name,
        "version": version,
        "wire": WIRE,
        "interface": interface,
        "transport": TRANSPORT,
        "transports": [{"name": TRANSPORT, "local_endpoint": list(local), "stats": {}}],
        "local_endpoint": list(local),
        "offload": {"available": False, "on": False},
        "uptime": round(time.monotonic() - started, 3),
        "drops": {k: v for k, v in drops.items() if v},
        "peers": peers,
        "events": list(events.recent),
    }
