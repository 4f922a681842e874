"""A tunnel running in a lab: starting it, and reading its state and counters."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from typing import Any

from ..core import control
from .topology import Lab

HOST_IF = "ctun0"
VM_IF = "ctunvm0"
UP_TIMEOUT = 15.0


def status(lab: Lab, interface: str) -> dict[str, Any]:
    answer = control.request(lab.run_dir / f"{interface}.sock", "status")
    result: dict[str, Any] = answer["status"]
    return result


def peer(lab: Lab, interface: str, name: str | None = None) -> dict[str, Any]:
    peers = status(lab, interface)["peers"]
    if name is None:
        return dict(peers[0])
    return dict(next(p for p in peers if p["name"] == name))


def is_up(lab: Lab, interface: str) -> bool:
    try:
        return bool(peer(lab, interface)["state"] == "up")
    except control.ControlError:
        return False


def wait_up(lab: Lab, timeout: float = UP_TIMEOUT) -> None:
    try:
        lab.wait_until(lambda: is_up(lab, HOST_IF) and is_up(lab, VM_IF), timeout,
                       what="both ends of the tunnel to be up")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n--- daemon ---\n{lab.log('daemon')}\n--- agent ---\n{lab.log('agent')}"
        ) from None


def reachable(lab: Lab, index: int = 0) -> bool:
    result = lab.http_get(lab.host_ns, f"http://{lab.container_ips[index]}/", timeout=1)
    return isinstance(result, tuple) and result[0] == 200


def seconds_until(lab: Lab, predicate: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    lab.wait_until(predicate, timeout, interval=0.02, what=what)
    return time.monotonic() - started


@dataclass
class Tunnel:
    lab: Lab
    daemon: subprocess.Popen[bytes]
    agent: subprocess.Popen[bytes]


def start_tunnel(lab: Lab, daemon_args: tuple[str, ...] = (),
                 agent_args: tuple[str, ...] = ()) -> Tunnel:
    daemon = lab.start_daemon(*daemon_args)
    agent = lab.start_agent(*agent_args)
    wait_up(lab)
    return Tunnel(lab, daemon, agent)


COUNTER_KEYS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")


def counters(lab: Lab, interface: str, name: str | None = None) -> dict[str, int]:
    p = peer(lab, interface, name)
    return {k: int(p[k]) for k in COUNTER_KEYS}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def all_drops(lab: Lab, interface: str) -> dict[str, int]:
    """Every drop counter of an instance, unauthenticated and per peer, summed by reason."""
    s = status(lab, interface)
    total: dict[str, int] = dict(s["drops"])
    for p in s["peers"]:
        for reason, count in p["drops"].items():
            total[reason] = total.get(reason, 0) + count
    return total
