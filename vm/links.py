"""Subnet links (`iptables A+B`): two Docker subnets that may reach each other.

Docker keeps its bridge networks apart (DOCKER-ISOLATION-STAGE-1/2). For each linked pair the
agent finds the bridge that routes each side and has the firewall accept traffic between them,
both ways, above Docker's rules (see firewall.py). The host sends the full set of pairs in a
`links` control message whenever it changes; that arrives on the network thread and is only
stashed there: the iptables work runs on this module's thread, at once and then every few
seconds, so a pair whose network does not exist yet is linked once it appears, and follows
its network to a new bridge when it is created again.

Sides are given as docker-connector writes them, often a bare address (`172.18.0.1`, a /32):
the rules then match the routed subnet of the bridge that address is on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from ipaddress import IPv4Network
from typing import Any

from ..core.contracts import PlatformAdapter
from ..core.messages import ControlMessage
from .agent_context import AgentContext
from .firewall import BridgeLink, Firewall, FirewallError
from .keeper import Keeper

log = logging.getLogger("ctun.vm.links")

Pair = tuple[IPv4Network, IPv4Network]

HOST_PEER = "host"  # the agent's only peer (vm.agent names it so)
RECHECK_EVERY = 2.0  # seconds: how soon a pending pair is linked once its network appears


class SubnetLinks:
    """The linked pairs the host asked for, resolved to bridges and kept in the firewall.

    Thread-safe; apply() and refresh() do iptables work and belong on a worker thread.
    """

    def __init__(self, adapter: PlatformAdapter, firewall: Firewall | None) -> None:
        self._adapter = adapter
        self._firewall = firewall
        self._lock = threading.Lock()
        self._pairs: tuple[Pair, ...] = ()
        self._active: list[tuple[Pair, BridgeLink]] = []
        self._pending: list[tuple[Pair, str]] = []
        self.error = ""

    def apply(self, pairs: Iterable[Pair]) -> None:
        """Link exactly `pairs` (the full set): new ones are added, missing ones removed."""
        wanted = tuple(dict.fromkeys((min(a, b), max(a, b)) for a, b in pairs))
        with self._lock:
            if wanted != self._pairs:
                log.info("subnet links: %s", ", ".join(f"{a}+{b}" for a, b in wanted) or "none")
            self._pairs = wanted
            self._sync()

    def refresh(self) -> None:
        """Resolve the pairs again (networks come and go) and correct the rules."""
        with self._lock:
            if self._pairs or self._active:
                self._sync()

    def close(self) -> None:
        """Remove the link rules (and only those); the routed subnets' rules stay."""
        with self._lock:
            self._pairs = ()
            self._active, self._pending = [], []
            if self._firewall is not None:
                try:
                    self._firewall.link_bridges(())
                except FirewallError as exc:
                    log.error("could not remove the subnet-link rules: %s", exc)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"links": {
                "pairs": [[str(a), str(b)] for a, b in self._pairs],
                "active": [{"pair": [str(a), str(b)],
                            "bridges": [link.bridge_a, link.bridge_b],
                            "subnets": [_show(link.subnet_a), _show(link.subnet_b)]}
                           for (a, b), link in self._active],
                "pending": [{"pair": [str(a), str(b)], "reason": reason}
                            for (a, b), reason in self._pending],
                "error": self.error if self._firewall is not None
                else "not managed: no iptables in the agent",
            }}

    # -- helpers ---------------------------------------------------------------------------

    def _sync(self) -> None:
        routed = self._firewall.routed() if self._firewall is not None else {}
        # Each lookup reads the routing table: once per distinct side, however many pairs.
        found = {side: self._resolve(side, routed) for pair in self._pairs for side in pair}
        active: list[tuple[Pair, BridgeLink]] = []
        pending: list[tuple[Pair, str]] = []
        for pair in self._pairs:
            sides = [found[side] for side in pair]
            missing = [str(net) for net, side in zip(pair, sides, strict=True) if side is None]
            if missing:
                pending.append((pair, f"no bridge routes {' or '.join(missing)} (yet)"))
                continue
            (bridge_a, subnet_a), (bridge_b, subnet_b) = (s for s in sides if s is not None)
            if bridge_a == bridge_b:
                pending.append((pair, f"both on {bridge_a}: Docker lets them talk already"))
                continue
            active.append((pair, BridgeLink(bridge_a, subnet_a, bridge_b, subnet_b)))
        if [p for p, _ in pending] != [p for p, _ in self._pending]:
            for pair, reason in pending:
                log.warning("subnet link %s+%s waits: %s", *pair, reason)
        self._active, self._pending = active, pending
        if self._firewall is None:
            return
        try:
            if self._firewall.link_bridges(link for _, link in active):
                log.info("subnet-link rules in place for %d pair(s)", len(active))
            self.error = ""
        except FirewallError as exc:
            if str(exc) != self.error:
                log.error("subnet links: %s", exc)
            self.error = str(exc)

    def _resolve(self, side: IPv4Network,
                 routed: dict[IPv4Network, str]) -> tuple[str, IPv4Network | None] | None:
        """The bridge that routes `side`, and the subnet to match there: `side` itself, or
        for a bare address the routed subnet it is in (None when that is not known: then the
        bridge alone says where traffic comes from, as in docker-connector)."""
        bridge = self._adapter.interface_for(side)
        if bridge is None:
            return None
        if side.prefixlen < 32:
            return bridge, side
        around = [s for s, b in routed.items() if b == bridge and side.subnet_of(s)]
        return bridge, max(around, key=lambda s: s.prefixlen, default=None)


def _show(subnet: IPv4Network | None) -> str:
    return str(subnet) if subnet is not None else "any"


class LinksWorker:
    """Runs a SubnetLinks: takes `links` messages on the network thread; a keeper applies
    them (and re-checks every RECHECK_EVERY seconds) on a thread of its own."""

    def __init__(self, links: SubnetLinks) -> None:
        self.links = links
        self._last: tuple[int, int] = (0, 0)  # (epoch, seq) of the newest message taken
        self._keeper: Keeper[tuple[Pair, ...]] = Keeper(
            "ctun-links", apply=links.apply, refresh=links.refresh, every=RECHECK_EVERY,
            log=log, what="subnet links")

    def start(self) -> None:
        self._keeper.start()

    def stop(self) -> None:
        self._keeper.stop()
        self.links.close()

    def on_control(self, peer: str, message: ControlMessage) -> None:
        """Network thread: keep the newest set, wake the worker; nothing else."""
        if peer != HOST_PEER or message.kind != "links":
            return
        epoch, seq = self._last
        # Each message is the full set, and retransmits can overtake: an older one must not
        # undo a newer. A new epoch is a restarted host, whose numbering starts over.
        if message.epoch == epoch and message.seq < seq:
            return
        self._last = (message.epoch, message.seq)
        self._keeper.offer(tuple((IPv4Network(a), IPv4Network(b))
                                 for a, b in message.body["pairs"]))


def setup(ctx: AgentContext) -> None:
    """The agent feature: register for `links` messages and the status; stop on teardown."""
    worker = LinksWorker(SubnetLinks(ctx.adapter, ctx.firewall))
    ctx.on_control.append(worker.on_control)
    ctx.status_parts.append(worker.links.status)
    worker.start()
    ctx.resources.callback(worker.stop)
