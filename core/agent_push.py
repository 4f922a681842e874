"""Host feature: tell the agent which Docker subnets are linked (`iptables A+B`).

The agent holds the firewall rules; the host holds the config. Each `links` message carries
the full set of pairs, sent when the agent's session comes up (a new agent knows nothing, a
restarted host must replace what an old one set) and whenever a reloaded config changes the
set (a removed line sends the smaller set, which removes its rules).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from . import messages
from .config import VM_PEER, HostConfig, Link
from .host_context import HostContext

log = logging.getLogger("ctun.links")


class LinksPush:
    def __init__(self, ctx: HostContext) -> None:
        self._ctx = ctx
        self._lock = threading.Lock()
        self._links: tuple[Link, ...] = tuple(ctx.cfg.links)
        self.problem = ""

    def peer_up(self, peer: str) -> None:
        if peer == VM_PEER:
            with self._lock:
                self._send()

    def reconfigure(self, cfg: HostConfig) -> None:
        with self._lock:
            if tuple(cfg.links) == self._links:
                return
            self._links = tuple(cfg.links)
            log.info("subnet links changed: %s", _describe(self._links) or "none")
            self._send()

    def _send(self) -> None:
        pairs = [[str(a), str(b)] for a, b in self._links]
        if len(pairs) > messages.MAX_LINKS:
            self.problem = (f"{len(pairs)} subnet links configured; the agent takes at most "
                            f"{messages.MAX_LINKS}: only the first {messages.MAX_LINKS} apply")
            log.error("%s", self.problem)
            pairs = pairs[:messages.MAX_LINKS]
        else:
            self.problem = ""
        self._ctx.engine.send_control(VM_PEER, "links", pairs=pairs)

    def status(self) -> dict[str, Any]:
        with self._lock:
            part: dict[str, Any] = {"links": [[str(a), str(b)] for a, b in self._links]}
            if self.problem:
                part["links_problem"] = self.problem
            return part


def _describe(links: tuple[Link, ...]) -> str:
    return ", ".join(f"{a}+{b}" for a, b in links)


def setup(ctx: HostContext) -> None:
    push = LinksPush(ctx)
    ctx.on_peer_up.append(push.peer_up)
    ctx.on_reconfigure.append(push.reconfigure)
    ctx.status_parts.append(push.status)
