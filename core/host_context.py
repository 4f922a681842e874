"""What a host-side feature (accessors, agent pushes, proxies, ...) hooks into the daemon.

The daemon builds the tunnel, then hands one HostContext to each feature's `setup`. A feature
registers what it needs: control requests, callbacks for a peer coming up, for control
messages, for a reloaded config, and a part of `ctun status`. That keeps daemon.py about
the order of things, and each feature in its own module.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from . import control
from .config import HostConfig
from .contracts import PlatformAdapter
from .engine import ControlSink, Engine
from .routing import HostRoutes

log = logging.getLogger("ctun.daemon")

PeerUp = Callable[[str], None]  # a peer's session came up (timer thread): send it its state
Reconfigure = Callable[[HostConfig], None]  # a reloaded config: apply only the difference
StatusPart = Callable[[], dict[str, Any]]


@dataclass
class HostContext:
    cfg: HostConfig  # the config in force; replaced by apply()
    adapter: PlatformAdapter
    engine: Engine
    routes: HostRoutes
    resources: contextlib.ExitStack  # closed in reverse order when the daemon stops
    pm: pluggy.PluginManager | None = None  # for features that open transports (expose)
    handlers: dict[str, control.Handler] = field(default_factory=dict)
    on_peer_up: list[PeerUp] = field(default_factory=list)
    on_control: list[ControlSink] = field(default_factory=list)
    on_reconfigure: list[Reconfigure] = field(default_factory=list)
    status_parts: list[StatusPart] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # reload errors etc., for status
    # Files besides the config file whose change means "reload": hosts files, the peer store.
    watched_files: list[Callable[[], list[Path]]] = field(default_factory=list)

    def apply(self, cfg: HostConfig) -> None:
        """Take a reloaded config: routes first, then every feature, each on its own (one
        feature failing must not keep the others on the old config)."""
        self.cfg = cfg
        self.routes.reconfigure(cfg)
        for reconfigure in self.on_reconfigure:
            try:
                reconfigure(cfg)
            except Exception:
                log.exception("applying the reloaded config failed in %s",
                              getattr(reconfigure, "__qualname__", reconfigure))

    def peer_up(self, peer: str) -> None:
        for callback in self.on_peer_up:
            try:
                callback(peer)
            except Exception:
                log.exception("peer %s came up: %s failed", peer,
                              getattr(callback, "__qualname__", callback))

    def control_message(self, peer: str, message: Any) -> None:
        for sink in self.on_control:
            sink(peer, message)

    def files(self) -> list[Path]:
        """Every file whose change means "reload": the config file, then the features'."""
        found = [Path(self.cfg.source)] if self.cfg.source else []
        for more in self.watched_files:
            found += [p for p in more() if p not in found]
        return found

    def status(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in self.status_parts:
            merged.update(part())
        return merged


Feature = Callable[[HostContext], None]
