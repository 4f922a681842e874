"""Keeps three things in step with the config and the Docker engine's networks: the host's
routing table, what the VM peer may send from (and is sent), and the agent's view of the
routed subnets (which it needs for its firewall rules).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict
from ipaddress import IPv4Network
from typing import Any

from . import docker_policy, messages
from .config import VM_PEER, HostConfig
from .contracts import PlatformAdapter, PlatformError
from .docker_policy import NetworkInfo, Plan
from .engine import Engine

log = logging.getLogger("ctun.routes")


class HostRoutes:
    def __init__(self, adapter: PlatformAdapter, engine: Engine, cfg: HostConfig) -> None:
        self._adapter = adapter
        self._engine = engine
        self._cfg = cfg
        self._lock = threading.Lock()
        self._applied: set[IPv4Network] = set()
        self._networks: dict[str, NetworkInfo] = {}
        self._runtime: set[IPv4Network] = set()  # added over the control socket
        self._generation = 0
        self.plan = Plan()
        self.docker_state = "connecting" if cfg.docker.enabled else "off"
        self.docker_error = ""
        vm = next(p for p in cfg.peers if p.name == VM_PEER)
        self._vm_extra = vm.allowed

    def start(self) -> None:
        """Route what the config names; Docker's networks follow when the watcher reports."""
        with self._lock:
            self._reconcile()

    def docker_changed(self, networks: dict[str, NetworkInfo] | None, reason: str) -> None:
        """From the watcher: the engine's full set of networks, or None when it is down."""
        with self._lock:
            if networks is None:
                self.docker_state, self.docker_error = "down", reason
                self._networks = {}
            else:
                self.docker_state, self.docker_error = "up", ""
                self._networks = networks
            self._reconcile()

    def _reconcile(self) -> None:
        with self._adapter.batch():
            self._reconcile_batched()

    def _reconcile_batched(self) -> None:
        plan = docker_policy.plan(
            self._networks.values(), self._cfg.docker, self._cfg.routes,
            self._cfg.tunnel.network, self._adapter.conflicting_route,
            sorted(self._runtime),
        )
        desired = set(plan.routes)
        for network in sorted(desired - self._applied):
            try:
                self._adapter.add_route(network)
                log.info("route %s added (%s)", network, _source(plan, network))
            except PlatformError as exc:
                log.warning("route %s not added: %s", network, exc)
                desired.discard(network)
        for network in sorted(self._applied - desired):
            self._adapter.remove_route(network)
            log.info("route %s removed", network)
        for decision in plan.decisions:
            if not decision.routed and decision.state != docker_policy.IPV6:
                log.debug("%s (%s): %s %s", decision.subnet, decision.source, decision.state,
                          decision.detail)
        changed = desired != self._applied
        self._applied = desired
        self.plan = plan
        tunnel = self._cfg.tunnel.network
        self._engine.set_peer_networks(
            VM_PEER, (tunnel, *sorted(desired), *self._vm_extra), (tunnel, *sorted(desired))
        )
        if changed:
            self._push()

    @property
    def config(self) -> HostConfig:
        return self._cfg

    def reconfigure(self, cfg: HostConfig) -> None:
        """Take a reloaded config's routes and Docker filters, and route accordingly."""
        with self._lock:
            self._cfg = cfg
            self._runtime -= set(cfg.routes)  # now configured: no longer a runtime addition
            self._reconcile()

    def add_runtime(self, network: IPv4Network) -> dict[str, Any]:
        """Route `network` until the daemon stops or it is removed again; says how it went
        (the same decision the route table shows: active, conflict, duplicate)."""
        with self._lock:
            if network in self._runtime or network in self._cfg.routes:
                raise ValueError(f"{network} is already a configured route")
            self._runtime.add(network)
            self._reconcile()
            return self._decision(network)

    def remove_runtime(self, network: IPv4Network) -> None:
        with self._lock:
            if network not in self._runtime:
                where = "the config file" if network in self._cfg.routes else "nowhere"
                raise ValueError(f"{network} was not added over the control socket "
                                 f"(it comes from {where})")
            self._runtime.discard(network)
            self._reconcile()

    def _decision(self, network: IPv4Network) -> dict[str, Any]:
        for decision in self.plan.decisions:
            if decision.subnet == str(network) and decision.source == "control":
                return asdict(decision)
        return {}

    def push(self) -> None:
        """Send the agent the full set of routed subnets (on connect, and after changes)."""
        with self._lock:
            self._push()

    def _push(self) -> None:
        self._generation += 1
        parts = messages.route_parts([str(n) for n in sorted(self._applied)])
        for index, part in enumerate(parts):
            self._engine.send_control(VM_PEER, "routes", gen=self._generation, part=index,
                                      parts=len(parts), routes=part)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "docker": {"state": self.docker_state, "error": self.docker_error},
                "route_table": [asdict(d) for d in self.plan.decisions],
                "route_problems": [
                    f"{d.subnet} ({d.source}): {d.detail}" for d in self.plan.decisions
                    if d.state == docker_policy.CONFLICT
                ],
            }


def _source(plan: Plan, network: IPv4Network) -> str:
    for decision in plan.decisions:
        if decision.subnet == str(network):
            return decision.source
    return "?"
