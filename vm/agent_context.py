"""What a VM-side feature (subnet links, the DNS responder, ...) hooks into the agent.

Like core.host_context on the host: the agent builds the tunnel, then hands one AgentContext
to each feature's `setup`, which registers for control messages from the host, for the
session coming up, for the agent's status, and for teardown (`resources`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.config import AgentConfig
from ..core.contracts import PlatformAdapter
from ..core.engine import ControlSink, Engine
from .firewall import Firewall

log = logging.getLogger("ctun.vm")

StatusPart = Callable[[], dict[str, Any]]


@dataclass
class AgentContext:
    cfg: AgentConfig
    adapter: PlatformAdapter
    engine: Engine
    firewall: Firewall | None  # None where the agent has no iptables
    resources: contextlib.ExitStack  # closed in reverse order when the agent stops
    on_control: list[ControlSink] = field(default_factory=list)  # network thread: stash only
    on_up: list[Callable[[], None]] = field(default_factory=list)  # timer thread
    status_parts: list[StatusPart] = field(default_factory=list)
    # Parts of the agent_status sent to the host (at most every few seconds, when changed):
    # what the host's `ctun status` should say about this feature.
    report_parts: list[StatusPart] = field(default_factory=list)

    def control_message(self, peer: str, message: Any) -> None:
        for sink in self.on_control:
            sink(peer, message)

    def session_up(self) -> None:
        for callback in self.on_up:
            try:
                callback()
            except Exception:
                log.exception("session up: %s failed", getattr(callback, "__qualname__", callback))

    def status(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in self.status_parts:
            merged.update(part())
        return merged


Feature = Callable[[AgentContext], None]
