"""The VM side: connects out to the host and forwards between the tunnel and the bridges."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pluggy

from .. import __version__
from ..core import runtime
from ..core.config import AgentConfig
from ..core.engine import Engine, PeerSpec, Role
from ..core.messages import ControlMessage
from . import dns, links
from .agent_context import AgentContext, Feature
from .firewall import Firewall, FirewallError
from .forwarding import Forwarding

log = logging.getLogger("ctun.vm")

HOST_PEER = "host"
# VM-side features, set up in this order once the tunnel is built (see agent_context).
FEATURES: list[Feature] = [
    links.setup,  # subnet links (`iptables A+B`)
    dns.setup,  # the DNS responder for the host's hosts-file entries (`hosts`)
]


def resolve(host: str, port: int, stop: threading.Event) -> str | None:
    """The host's IPv4 address; keeps trying (the name may appear later), None if stopped."""
    delay = 0.5
    while not stop.is_set():
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
            return str(infos[0][4][0])
        except OSError as exc:
            log.warning("cannot resolve %s (%s); retrying in %.1f s", host, exc, delay)
        stop.wait(delay)
        delay = min(delay * 2, 5.0)
    return None


def run(cfg: AgentConfig, pm: pluggy.PluginManager, stop: threading.Event) -> None:
    if cfg.wire == "legacy":  # docker-connector's unauthenticated format (docs/legacy.md)
        from .legacy_agent import run as run_legacy

        run_legacy(cfg, pm, stop)
        return
    transport_classes = runtime.transport_classes(pm, cfg.transport)
    with runtime.platform(pm, cfg.tunnel.interface) as (adapter, resources):
        address = resolve(cfg.host, cfg.port, stop)
        if address is None:
            return
        adapter.offload = cfg.tunnel.offload
        interface = adapter.open_interface(cfg.tunnel.interface, cfg.tunnel.mtu)
        adapter.set_address(cfg.tunnel.vm_address, cfg.tunnel.host_address)
        adapter.add_route(cfg.tunnel.network, via=cfg.tunnel.host_address)
        adapter.enable_forwarding()
        transports = []
        for transport_cls in transport_classes:
            transport = transport_cls.connect((address, cfg.port))
            resources.callback(transport.close)
            transports.append(transport)
        # From the host we accept only tunnel-network sources: the host and its accessors.
        host = PeerSpec(HOST_PEER, cfg.key, (cfg.tunnel.network,), (IPv4Network("0.0.0.0/0"),))
        plugin_sink = runtime.event_sink(pm)

        def on_event(peer: str, state: str, reason: str) -> None:
            if state == "up":
                forwarding.report_again()
                ctx.session_up()
            plugin_sink(peer, state, reason)

        def on_control(peer: str, message: ControlMessage) -> None:
            forwarding.on_control(peer, message)
            ctx.control_message(peer, message)

        def report(summary: dict[str, Any]) -> None:
            engine.send_control(HOST_PEER, "agent_status", **summary)

        firewall = _firewall(cfg.tunnel.interface, cfg.tunnel.host_address)
        report_parts: list[Callable[[], dict[str, Any]]] = []
        forwarding = Forwarding(adapter, firewall, report, report_parts)
        engine = Engine(
            Role.VM, interface, transports, [host], cfg.tunnel.mtu, runtime.engine_timers(cfg),
            name=socket.gethostname(), version=__version__, remote=(address, cfg.port),
            on_event=on_event, on_control=on_control, offload=cfg.tunnel.offload,
        )
        forwarding.start()
        resources.callback(forwarding.stop)
        ctx = AgentContext(cfg, adapter, engine, firewall, resources,
                           report_parts=report_parts)
        for feature in FEATURES:
            feature(ctx)
        log.info("connecting to %s (%s:%d) over %s from %s %s", cfg.host, address, cfg.port,
                 cfg.transport, interface.name, cfg.tunnel.vm_address)

        def extra() -> dict[str, Any]:
            return {"remote": [cfg.host, cfg.port], "routes": [str(r) for r in adapter.routes()],
                    **forwarding.status(), **ctx.status()}

        runtime.serve(engine, cfg.tunnel.interface, stop, extra)


def _firewall(tun: str, host_address: IPv4Address) -> Firewall | None:
    """The VM's firewall manager, or None (with a warning) where there is no iptables."""
    try:
        return Firewall(tun, host_address=host_address)
    except FirewallError as exc:
        log.warning("not managing the VM's firewall: %s", exc)
        return None
