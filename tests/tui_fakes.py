"""The fake daemon the TUI tests run against: a real ControlServer with canned answers, shared by
the pilot tests (test_tui.py), the snapshot tests and the real-terminal test."""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ctun.core import control
from textual.pilot import Pilot


def sample_status(event_at: float | None = None) -> dict[str, Any]:
    """One host with one peer up. `event_at` fixes the event's time (snapshots need that)."""
    return {
        "role": "host", "name": "host", "version": "0.1.0", "interface": "ctun0",
        "transport": "udp", "local_endpoint": ["127.0.0.1", 2511], "uptime": 12.0,
        "transports": [{"name": "udp", "local_endpoint": ["127.0.0.1", 2511], "stats": {}}],
        "offload": {"available": True, "on": True}, "drops": {"no_route": 2},
        "peers": [{
            "name": "vm", "state": "up", "reason": "", "endpoint": ["127.0.0.1", 40000],
            "handshake_age": 3.0, "last_seen_age": 0.5, "handshakes": 1, "rtt_ms": 0.4,
            "handshake_ms": 1.0, "transport": "udp", "remote_name": "vm",
            "remote_version": "0.1.0", "rx_packets": 100, "rx_bytes": 10000,
            "tx_packets": 200, "tx_bytes": 20000, "drops": {"bad_mac": 1},
        }],
        "events": [{"id": 1, "at": time.time() if event_at is None else event_at,
                    "peer": "vm", "state": "up", "reason": "handshake"}],
        "routes": ["172.17.0.0/16"], "docker": {"state": "up", "error": ""},
        "agent": "running",
        "route_table": [
            {"subnet": "172.17.0.0/16", "source": "docker:bridge", "state": "active",
             "detail": ""},
            {"subnet": "10.9.0.0/24", "source": "config", "state": "active", "detail": ""},
            {"subnet": "10.8.0.0/24", "source": "control", "state": "active", "detail": ""},
        ],
        "route_problems": [],
        "access": {"expose": {"listen": "0.0.0.0:2512", "transports": ["udp"],
                              "routes": ["172.17.0.0/16"]},
                   "accessors": [{"name": "alice", "ip": "192.168.251.9", "origin": "peers.toml",
                                  "state": "up"}],
                   "problems": []},
        "links": [["172.18.0.0/16", "172.19.0.0/16"]],
        "hosts": {"files": ["/etc/hosts"], "suffixes": [".dev.local"],
                  "names": [["api.dev.local", "192.168.251.2"]], "problems": []},
        "proxy": {"proxies": [{"listen": "192.168.251.2:5432", "target": "127.0.0.1:5432",
                               "protocol": "tcp", "state": "listening", "error": "",
                               "active": 1}]},
        "agent_view": {"firewall": {"backend": "iptables-nft", "rules": 6, "error": ""},
                       "bridges": {"172.17.0.0/16": "docker0"},
                       "dns": {"listen": "192.168.251.1:53", "error": "", "names": 1,
                               "redirects": 1, "redirect_error": "", "answered": 4,
                               "nxdomain": 0, "refused": 0, "malformed": 0}},
    }


class FakeDaemon:
    """A real ControlServer whose status the test edits; it records the requests."""

    def __init__(self, path: Path, status: dict[str, Any] | None = None) -> None:
        self.path = path
        self.status = sample_status() if status is None else status
        # Appended to by the server's threads, read by the test's: list.append is atomic.
        self.requests: list[dict[str, Any]] = []
        self.server: control.ControlServer | None = None

    def start(self) -> None:
        handlers = {"status": lambda _r: {"status": copy.deepcopy(self.status)},
                    "add_route": self._add, "remove_route": self._remove,
                    "reconnect": self._reconnect}
        # A deep copy per snapshot: the server edits the events list of what it sends.
        self.server = control.ControlServer(
            self.path, handlers, stream=lambda _r: {"status": copy.deepcopy(self.status)})
        self.server.start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.close()

    def _add(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(request)
        route = {"subnet": request["network"], "source": "control", "state": "active",
                 "detail": ""}
        self.status["route_table"].append(route)
        return {"route": route}

    def _remove(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(request)
        self.status["route_table"] = [r for r in self.status["route_table"]
                                      if r["subnet"] != request["network"]]
        return {}

    def _reconnect(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(request)
        return {"peer": request.get("peer"), "was_connected": True}


@contextmanager
def running_fake(status: dict[str, Any] | None = None,
                 interface: str = "ctun0") -> Iterator[FakeDaemon]:
    """A started FakeDaemon at <fresh dir>/<interface>.sock, closed and removed afterwards."""
    # A short directory of our own: Unix socket paths are limited to about 100 bytes.
    where = Path(tempfile.mkdtemp(prefix="ctui", dir="/tmp"))
    daemon = FakeDaemon(where / f"{interface}.sock", status)
    daemon.start()
    try:
        yield daemon
    finally:
        if daemon.server is not None:
            daemon.server.close()
        shutil.rmtree(where, ignore_errors=True)


async def until(pilot: Pilot[Any], predicate: Callable[[], bool], what: str,
                timeout: float = 10.0) -> None:
    """Wait for the app (not for wall-clock time) until predicate holds, or fail."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.1)

