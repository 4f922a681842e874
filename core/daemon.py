"""The host side: listens for the VM agent and routes the Docker subnets into the tunnel."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import Any

import pluggy

from .. import __version__
from . import accessors, agent_push, config_watch, control, hosts_push, messages, proxy, runtime
from .agent_container import AgentContainer
from .config import VM_PEER, HostConfig
from .contracts import PlatformError
from .docker_watch import DockerWatcher, connect
from .engine import Engine, PeerSpec, Role
from .host_context import Feature, HostContext
from .routing import HostRoutes

log = logging.getLogger("ctun.daemon")

# Host-side features, set up in this order once the tunnel is built (see host_context).
FEATURES: list[Feature] = [
    config_watch.setup,  # hot reload; also the `reload` request (first: others may fail)
    agent_push.setup,  # subnet links: the pairs the agent opens its firewall for
    accessors.setup,  # sharing with LAN machines: expose listener, accessor peers
    hosts_push.setup,  # hosts-file entries for the agent's DNS responder
    proxy.setup,  # host services on 127.0.0.1 relayed from the tunnel address (TCP)
]


def peer_specs(cfg: HostConfig) -> list[PeerSpec]:
    """Each peer with the networks its config gives it. The VM agent's networks also follow
    the routing table; HostRoutes sets them, before the engine starts and on every change.
    Accessors (peers with an `ip`) own just that address, and only while sharing is on; the
    peer store's are added by the accessors feature."""
    return [accessors.spec_for(p) for p in accessors.admitted(cfg, list(cfg.peers))]


def run(cfg: HostConfig, pm: pluggy.PluginManager, stop: threading.Event) -> None:
    if cfg.wire == "legacy":  # docker-connector's unauthenticated format (docs/legacy.md)
        from .legacy.daemon import run_legacy

        run_legacy(cfg, pm, stop, FEATURES)
        return
    transport_classes = runtime.transport_classes(pm, cfg.transport)
    with runtime.platform(pm, cfg.tunnel.interface) as (adapter, resources):
        runtime.check_tunnel_network(adapter, cfg.tunnel.network)
        transports = []
        for transport_cls in transport_classes:
            try:
                transport = transport_cls.listen(cfg.listen)
            except OSError as exc:
                where = f"{cfg.listen[0]}:{cfg.listen[1]}"
                raise PlatformError(
                    f"cannot listen on {transport_cls.name} {where}: {exc.strerror or exc}; "
                    "is another ctun running? change `listen`/`port`"
                ) from None
            resources.callback(transport.close)
            transports.append(transport)
        adapter.offload = cfg.tunnel.offload
        interface = adapter.open_interface(cfg.tunnel.interface, cfg.tunnel.mtu)
        adapter.set_address(cfg.tunnel.host_address, cfg.tunnel.vm_address)
        adapter.add_route(cfg.tunnel.network)
        plugin_sink = runtime.event_sink(pm)

        def on_event(peer: str, state: str, reason: str) -> None:
            if state == "up":
                if peer == VM_PEER:
                    routes.push()  # a new agent knows nothing yet
                ctx.peer_up(peer)
            plugin_sink(peer, state, reason)

        agent_view: dict[str, Any] = {}

        def on_control(peer: str, message: messages.ControlMessage) -> None:
            # Network thread: just keep it; the status request reads it.
            if peer == VM_PEER and message.kind == "agent_status":
                agent_view.clear()
                agent_view.update(message.body)
            ctx.control_message(peer, message)

        engine = Engine(
            Role.HOST, interface, transports, peer_specs(cfg), cfg.tunnel.mtu,
            runtime.engine_timers(cfg), name="host", version=__version__, on_event=on_event,
            on_control=on_control, offload=cfg.tunnel.offload,
        )
        routes = HostRoutes(adapter, engine, cfg)
        ctx = HostContext(cfg, adapter, engine, routes, resources, pm=pm)
        routes.start()
        agent = _follow_docker(cfg, routes, resources)
        for feature in FEATURES:
            feature(ctx)
        log.info(
            "listening on %s %s:%d, interface %s %s -> %s, routes: %s",
            "+".join(t.name for t in transports), *transports[0].local_endpoint, interface.name,
            cfg.tunnel.host_address, cfg.tunnel.vm_address,
            ", ".join(map(str, cfg.routes)) or "none",
        )

        kernel_routes = _Cached(lambda: [str(r) for r in adapter.routes()], ROUTES_TTL)

        def extra() -> dict[str, Any]:
            return {
                "routes": kernel_routes.get(),
                "configured_routes": [str(r) for r in ctx.cfg.routes],
                "agent": agent.state if agent else "not managed",
                "agent_view": dict(agent_view),
                **routes.status(),
                **ctx.status(),
            }

        runtime.serve(engine, cfg.tunnel.interface, stop, extra,
                      handlers={**route_handlers(ctx), **ctx.handlers},
                      group=cfg.control_group, owner=runtime.sudo_user())


# The kernel's view of our routes is a netlink dump (milliseconds of Python on the daemon's
# GIL); subscribers ask for it several times a second, and it changes only with the plan.
ROUTES_TTL = 2.0


class _Cached:
    def __init__(self, fetch: Callable[[], list[str]], ttl: float) -> None:
        self._fetch, self._ttl = fetch, ttl
        self._value: list[str] = []
        self._expires = 0.0
        self._lock = threading.Lock()

    def get(self) -> list[str]:
        with self._lock:
            now = time.monotonic()
            if now >= self._expires:
                self._value, self._expires = self._fetch(), now + self._ttl
            return self._value


def route_handlers(ctx: HostContext) -> dict[str, control.Handler]:
    """Control requests about routes: the table, and routes added or removed at runtime."""
    routes = ctx.routes

    def network_of(request: dict[str, Any]) -> IPv4Network:
        value = request.get("network")
        try:
            return IPv4Network(str(value))
        except ValueError:
            raise control.RequestError(
                f"network must be an IPv4 network like 10.1.0.0/24, not {value!r}") from None

    def add(request: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"route": routes.add_runtime(network_of(request))}
        except ValueError as exc:
            raise control.RequestError(str(exc)) from None

    def remove(request: dict[str, Any]) -> dict[str, Any]:
        try:
            routes.remove_runtime(network_of(request))
        except ValueError as exc:
            raise control.RequestError(str(exc)) from None
        return {}

    # `reload` is core/config_watch's: the one function a changed file also goes through.
    return {
        "routes": lambda _req: {"route_table": routes.status()["route_table"]},
        "add_route": add,
        "remove_route": remove,
    }


def _follow_docker(
    cfg: HostConfig, routes: HostRoutes, resources: contextlib.ExitStack
) -> AgentContainer | None:
    """Watch the engine's networks and, unless told not to, run the agent container there."""
    if not cfg.docker.enabled:
        return None
    agent = None
    if cfg.docker.agent:
        vm_key = next(p.key for p in cfg.peers if p.name == VM_PEER)
        agent = AgentContainer(cfg, vm_key)
        # Runs last: the agent removes its interface and firewall rules as it stops.
        resources.callback(_remove_agent, cfg, agent)
    watcher = DockerWatcher(cfg.docker.url, routes.docker_changed,
                            on_connect=agent.ensure if agent else None)
    watcher.start()
    resources.callback(watcher.stop)
    return agent


def _remove_agent(cfg: HostConfig, agent: AgentContainer) -> None:
    try:
        client = connect(cfg.docker.url)
        try:
            agent.remove(client)
        finally:
            client.close()
    except Exception as exc:  # docker gone: `ctun down` or the next start removes it
        log.warning("could not remove the agent container: %s", exc)
