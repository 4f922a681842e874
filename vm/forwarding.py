"""The agent's side of routing: which subnets the host routes to us, which bridge serves
each, and the firewall rules that let tunnel traffic through Docker's own.

Route updates arrive as control messages on the network thread; they are only stashed
there. The iptables work runs on this module's own thread, at once after a change and every
few seconds anyway, because Docker rewrites its chains when it restarts or a network changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import Any

from ..core.contracts import PlatformAdapter
from ..core.messages import MAX_BRIDGES, MAX_CONTROL, ControlMessage, Snapshots, largest_size
from .firewall import Firewall, FirewallError
from .keeper import Ticker

log = logging.getLogger("ctun.vm.forwarding")

RECHECK_EVERY = 2.0


class Forwarding:
    def __init__(self, adapter: PlatformAdapter, firewall: Firewall | None,
                 report: Callable[[dict[str, Any]], None] | None = None,
                 report_parts: list[Callable[[], dict[str, Any]]] | None = None) -> None:
        self._adapter = adapter
        self._firewall = firewall
        # Tells the host what the VM side sees: the host's `ctun status` is where users look.
        # Other features add their parts; a change is sent at the next round, so a busy
        # counter costs at most one message per RECHECK_EVERY.
        self._report = report
        self._report_parts = report_parts if report_parts is not None else []
        self._reported: dict[str, Any] | None = None
        self._snapshots = Snapshots()
        self.subnets: tuple[IPv4Network, ...] = ()
        self.links: dict[str, str] = {}
        self.rules: list[str] = []
        self.error = ""
        # Snapshots are taken on the network thread (status shows them at once); the ticker
        # only has to be told that there is news.
        self._ticker = Ticker("ctun-forwarding", self._sync, every=RECHECK_EVERY, log=log,
                              what="forwarding")

    def start(self) -> None:
        if self._firewall is not None:
            for line in self._firewall.cleanup_leftovers():
                log.warning("cleaned up after a previous run: firewall rule %s", line)
        self._ticker.start()

    def stop(self) -> None:
        self._ticker.stop()
        if self._firewall is not None:
            try:
                self._firewall.close()
            except FirewallError as exc:
                log.error("could not remove every firewall rule: %s", exc)

    def on_control(self, _peer: str, message: ControlMessage) -> None:
        """Network thread: keep the newest complete snapshot, then hand over to our thread."""
        if message.kind != "routes":
            return
        bodies = self._snapshots.take(message)
        if bodies is not None:
            self.subnets = tuple(IPv4Network(r) for body in bodies for r in body["routes"])
            self._ticker.wake()

    def _sync(self) -> None:
        links: dict[IPv4Network, str] = {}
        for subnet in self.subnets:
            bridge = self._adapter.interface_for(subnet)
            if bridge is not None:
                links[subnet] = bridge
        self.links = {str(k): v for k, v in links.items()}
        if self._firewall is None:
            # Still reported: "no iptables in the agent" is what the host must be told.
            self._send_report()
            return
        try:
            self._firewall.apply(links)
            if self._firewall.ensure():
                log.info("firewall rules re-applied (Docker changed its chains)")
            self.rules = self._firewall.rules()
            self.error = ""
        except FirewallError as exc:
            if str(exc) != self.error:
                log.error("firewall: %s", exc)
            self.error = str(exc)
        self._send_report()

    def summary(self) -> dict[str, Any]:
        """What the host shows about us (bounded to fit one control message)."""
        bridges = list(self.links.items())[:MAX_BRIDGES]
        summary: dict[str, Any] = {
            "firewall": {
                "backend": self._firewall.backend if self._firewall else None,
                "rules": len(self.rules),
                "error": self.error[:300] if self._firewall else
                "not managed: no iptables in the agent",
            },
            "bridges": dict(bridges),
            "bridges_total": len(self.links),
        }
        for part in self._report_parts:
            try:
                summary.update(part())
            except Exception:  # one feature's bug must not silence the firewall's report
                log.exception("agent status: a feature's report failed")
        # Many networks do not fit one control message: the host is told the first ones
        # and how many there are in all (it would otherwise be told nothing).
        while bridges and largest_size("agent_status", summary) > MAX_CONTROL:
            bridges.pop()
            summary["bridges"] = dict(bridges)
        return summary

    def report_again(self) -> None:
        """A new session: the host may have restarted and know nothing of us."""
        self._reported = None
        self._ticker.wake()

    def _send_report(self) -> None:
        summary = self.summary()
        if self._report is not None and summary != self._reported:
            self._reported = summary
            self._report(summary)

    def status(self) -> dict[str, Any]:
        return {
            "subnets": [str(s) for s in self.subnets],
            "bridges": self.links,
            "firewall": {
                "managed": self._firewall is not None,
                "backend": self._firewall.backend if self._firewall else None,
                "rules": self.rules,
                "error": self.error,
            },
        }
