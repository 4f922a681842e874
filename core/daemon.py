"""The host side: listens for the VM agent and routes the Docker subnets into the tunnel."""

from __future__ import annotations

import logging
import threading
from ipaddress import IPv4Network
from typing import Any

import pluggy

from .. import __version__
from . import plugins, runtime
from .config import VM_PEER, HostConfig
from .contracts import PlatformAdapter, PlatformError
from .engine import Engine, EngineTimers, PeerSpec, Role

log = logging.getLogger("ctun.daemon")

def peer_specs(cfg: HostConfig) -> list[PeerSpec]:
    """The VM agent may send from the tunnel network and the routed subnets; others from theirs."""
    specs = []
    for peer in cfg.peers:
        if peer.name == VM_PEER:
            allowed = (cfg.tunnel.network, *cfg.routes, *peer.allowed)
            specs.append(PeerSpec(peer.name, peer.key, allowed, allowed))
        else:
            specs.append(PeerSpec(peer.name, peer.key, peer.allowed, peer.allowed))
    return specs


def engine_timers(cfg: Any) -> EngineTimers:
    t = cfg.timers
    return EngineTimers(t.keepalive, t.dead_after, t.rekey_after, t.handshake_skew)


def apply_routes(adapter: PlatformAdapter, routes: tuple[IPv4Network, ...]) -> list[str]:
    """Route each subnet into the tunnel unless the host already reaches it another way."""
    problems = []
    for route in routes:
        conflict = adapter.conflicting_route(route)
        if conflict is not None:
            problems.append(f"{route} is not routed: it overlaps the host route {conflict}")
            continue
        adapter.add_route(route)
    return problems


def run(cfg: HostConfig, pm: pluggy.PluginManager, stop: threading.Event) -> None:
    transport_cls = plugins.transport(pm, cfg.transport)
    with runtime.platform(pm, cfg.tunnel.interface) as (adapter, resources):
        conflict = adapter.conflicting_route(cfg.tunnel.network)
        if conflict is not None:
            raise PlatformError(
                f"the tunnel network {cfg.tunnel.network} overlaps the host route {conflict}; "
                "choose another `addr`"
            )
        try:
            transport = transport_cls.listen(cfg.listen)
        except OSError as exc:
            where = f"{cfg.listen[0]}:{cfg.listen[1]}"
            raise PlatformError(
                f"cannot listen on {cfg.transport} {where}: {exc.strerror or exc}; "
                "is another ctun running? change `listen`/`port`"
            ) from None
        resources.callback(transport.close)
        interface = adapter.open_interface(cfg.tunnel.interface, cfg.tunnel.mtu)
        adapter.set_address(cfg.tunnel.host_address, cfg.tunnel.vm_address)
        adapter.add_route(cfg.tunnel.network)
        problems = apply_routes(adapter, cfg.routes)
        for problem in problems:
            log.warning("%s", problem)
        engine = Engine(
            Role.HOST, interface, transport, peer_specs(cfg), cfg.tunnel.mtu,
            engine_timers(cfg), name="host", version=__version__,
            on_event=runtime.event_sink(pm),
        )
        log.info(
            "listening on %s %s:%d, interface %s %s -> %s, routes: %s",
            cfg.transport, *transport.local_endpoint, interface.name,
            cfg.tunnel.host_address, cfg.tunnel.vm_address,
            ", ".join(map(str, cfg.routes)) or "none",
        )

        def extra() -> dict[str, Any]:
            return {
                "routes": [str(r) for r in adapter.routes()],
                "configured_routes": [str(r) for r in cfg.routes],
                "route_problems": problems,
                "config": cfg.source,
            }

        runtime.serve(engine, adapter, stop, extra)
