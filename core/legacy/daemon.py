"""`ctun up` with `wire = "legacy"`: the daemon's tunnel, routes, Docker following and control
socket around legacy mode's packet pump instead of the engine (core/legacy/host.py)."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any, cast

import pluggy

from ... import __version__
from .. import runtime
from ..config import HostConfig
from ..daemon import route_handlers
from ..docker_watch import DockerWatcher
from ..engine import Engine
from ..host_context import Feature, HostContext
from ..routing import HostRoutes
from .host import LegacyHost, bind_udp

log = logging.getLogger("ctun.legacy")

WARNING = (
    "LEGACY WIRE MODE: docker-connector's format has no authentication and no encryption. "
    "Anyone who can send to %s (and to the expose port) can inject packets into the "
    "tunnel and take the VM side's place; anyone on the path can read the traffic. Use it "
    "only on loopback or a network you trust, and move to ctun's own wire when you can."
)
# Host features that touch only files, sockets of their own and the config (never the
# engine's peers or control messages): they work the same in legacy mode.
ENGINE_FREE_FEATURES = ("config_watch", "proxy")


def run_legacy(cfg: HostConfig, pm: pluggy.PluginManager, stop: threading.Event,
               features: list[Feature]) -> None:
    where = f"udp {cfg.listen[0]}:{cfg.listen[1]}"
    log.warning(WARNING, where)
    with runtime.platform(pm, cfg.tunnel.interface) as (adapter, resources):
        runtime.check_tunnel_network(adapter, cfg.tunnel.network)
        sock = bind_udp(cfg.listen, "the VM side")
        resources.callback(sock.close)
        expose = bind_udp(cfg.expose.listen, "expose") if cfg.expose.listen else None
        if expose is not None:
            resources.callback(expose.close)  # closing twice (host.stop) is harmless
        # Raw packets only: docker-connector's peers know nothing of offload headers.
        adapter.offload = False
        interface = adapter.open_interface(cfg.tunnel.interface, cfg.tunnel.mtu)
        adapter.set_address(cfg.tunnel.host_address, cfg.tunnel.vm_address)
        adapter.add_route(cfg.tunnel.network)

        host = LegacyHost(cfg, interface, sock, expose, __version__)
        # HostRoutes and the features see it where they would see the engine.
        engine = cast(Engine, host)
        routes = HostRoutes(adapter, engine, cfg)
        ctx = HostContext(cfg, adapter, engine, routes, resources, pm=pm)
        ctx.on_reconfigure.append(host.reconfigure)
        ctx.watched_files.append(lambda: [Path(s.file) for s in ctx.cfg.hosts])
        ctx.status_parts.append(host.legacy_status)
        routes.start()
        _follow_docker(cfg, routes, resources)
        for feature in features:
            if feature.__module__.rpartition(".")[2] in ENGINE_FREE_FEATURES:
                feature(ctx)
        log.info("legacy mode: listening on %s, expose %s, interface %s %s -> %s, routes: %s",
                 where, f"udp {cfg.expose.listen[0]}:{cfg.expose.listen[1]}"
                 if cfg.expose.listen else "off", interface.name, cfg.tunnel.host_address,
                 cfg.tunnel.vm_address, ", ".join(map(str, cfg.routes)) or "none")

        def extra() -> dict[str, Any]:
            return {
                "routes": [str(r) for r in adapter.routes()],
                "configured_routes": [str(r) for r in ctx.cfg.routes],
                "agent": "not managed in legacy mode (run docker-connector's VM side, or "
                         "`ctun vm --wire legacy`)",
                **routes.status(),
                **ctx.status(),
            }

        runtime.serve(engine, cfg.tunnel.interface, stop, extra,
                      handlers={**route_handlers(ctx), **ctx.handlers},
                      group=cfg.control_group, owner=runtime.sudo_user())


def _follow_docker(cfg: HostConfig, routes: HostRoutes,
                   resources: contextlib.ExitStack) -> None:
    """Route the engine's networks, as the daemon does; the agent container is ctun's own
    wire, so in legacy mode nobody starts one (the user runs the VM side)."""
    if not cfg.docker.enabled:
        return
    watcher = DockerWatcher(cfg.docker.url, routes.docker_changed)
    watcher.start()
    resources.callback(watcher.stop)
