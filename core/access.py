"""`ctun access`: a LAN machine logs in to a host's expose listener as an accessor.

It runs the engine in the VM role (it connects out and initiates the handshakes) with one
peer, the host. It knows nothing about the host's containers until the host sends
`access_config` after the login: then the interface gets its address and MTU, and exactly
the exposed routes go into the tunnel. Before that nothing is routed. A later
`access_config` replaces the routes (only the difference is changed).

What the host says is checked before it touches the routing table: a route that would take
the default route, or the way to the host itself (a tunnel inside itself), is refused. And
the engine accepts packets only from the exposed routes and the host's tunnel address.

Everything goes through the platform adapter, so the same code runs on Linux, macOS and
Windows; the adapter removes the interface and routes on exit, and after a crash the next
start (runtime.platform) cleans up what was left.
"""

from __future__ import annotations

import getpass
import logging
import os
import queue
import re
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pluggy

from .. import __version__
from . import runtime
from .config import KEY_ENV, MTU_MAX, Timers
from .contracts import Endpoint, PlatformAdapter, PlatformError
from .engine import Engine, PeerSpec, Role
from .keys import ConfigError, decode_key, read_key
from .messages import ControlMessage

log = logging.getLogger("ctun.access")

HOST_PEER = "host"
DEFAULT_INTERFACE = "ctunacc0"
DEFAULT_PORT = 2512  # docker-connector's expose port in its examples
INTERFACE_RE = re.compile(r"ctun[a-z0-9_-]{0,11}")
_HOST_RE = re.compile(r"[A-Za-z0-9_.-]{1,253}")
EVERYTHING = IPv4Network("0.0.0.0/0")


@dataclass(frozen=True)
class AccessConfig:
    remote: Endpoint  # (host name or address, port) of the host's expose listener
    key: bytes = field(repr=False)
    interface: str = DEFAULT_INTERFACE
    transport: str = "auto"
    timers: Timers = field(default_factory=Timers)


def parse_remote(text: str) -> Endpoint:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--remote {text}: use HOST:PORT, like 192.0.2.10:{DEFAULT_PORT} "
                          f"(the host's expose address)")
    if not _HOST_RE.fullmatch(host):
        raise ConfigError(f"--remote {text}: {host!r} is not a host name or IPv4 address")
    return host, int(port)


def load_key(key: str | None, key_file: str | None,
             environ: Mapping[str, str] = os.environ) -> bytes:
    """The accessor's key: --key, --key-file or $CTUN_KEY, exactly one of them."""
    given = [name for name, value in (("--key", key), ("--key-file", key_file)) if value]
    if len(given) > 1:
        raise ConfigError("give the key once: --key or --key-file, not both")
    fix = "use the key `ctun peer add` printed on the host"
    if key:
        return decode_key(key, "--key", fix)
    if key_file == "-":
        # `echo KEY | ctun access ... --key-file -`, as `ctun peer add` prints it: echo is
        # built into the shell, so the key never appears in the process list. At a
        # terminal, it is asked for without being shown.
        text = getpass.getpass("key: ") if sys.stdin.isatty() else sys.stdin.readline()
        return decode_key(text.strip(), "--key-file - (standard input)", fix)
    if key_file:
        return read_key(Path(key_file))
    if environ.get(KEY_ENV):
        return decode_key(environ[KEY_ENV], f"${KEY_ENV}", fix)
    raise ConfigError(f"no key: pass --key KEY, --key-file FILE or set {KEY_ENV} "
                      f"(`ctun peer add NAME` on the host prints it)")


def check_interface(name: str) -> str:
    if not INTERFACE_RE.fullmatch(name):
        raise ConfigError(f'--interface {name}: must be "ctun" followed by up to 11 of a-z, '
                          f'0-9, "_" and "-", like {DEFAULT_INTERFACE}')
    return name


def resolve(host: str, port: int, stop: threading.Event) -> str | None:
    """The host's IPv4 address; keeps trying (DNS may come later), None once stopped."""
    delay = 0.5
    while not stop.is_set():
        try:
            return str(socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4][0])
        except OSError as exc:
            log.warning("cannot resolve %s (%s); retrying in %.1f s", host, exc, delay)
        stop.wait(delay)
        delay = min(delay * 2, 5.0)
    return None


def checked_routes(raw: list[str], address: IPv4Interface, remote: IPv4Address
                   ) -> tuple[list[IPv4Network], list[str]]:
    """The routes the host sent that we take, and why we refuse the others: a remote
    machine must not take our default route, nor the way to itself (the tunnel would run
    through the tunnel)."""
    routes, refused = set(), []
    for text in raw:
        net = IPv4Network(text)
        if net.prefixlen == 0:
            refused.append(f"{net} (would take this machine's default route)")
        elif remote in net:
            refused.append(f"{net} (holds the host {remote} itself: the tunnel would run "
                           f"through itself)")
        elif net.overlaps(address.network):
            refused.append(f"{net} (overlaps the tunnel network {address.network})")
        else:
            routes.add(net)
    return sorted(routes), refused


class Access:
    """Applies the host's access_config: address, MTU and routes, only the differences.

    Messages arrive on the engine's network thread, which must not wait on the OS's routing
    table: they are queued for a thread of our own, which applies only the latest."""

    def __init__(self, adapter: PlatformAdapter, engine: Engine, remote_ip: str) -> None:
        self._adapter = adapter
        self._engine = engine
        self._remote = IPv4Address(remote_ip)
        self._inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ctun-access", daemon=True)
        self.address: IPv4Interface | None = None
        self.peer: IPv4Address | None = None
        self.mtu: int | None = None
        self.routes: set[IPv4Network] = set()
        self.refused: list[str] = []
        self.configs = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=5)

    def on_control(self, _peer: str, message: ControlMessage) -> None:
        if message.kind == "access_config":
            self._inbox.put(message.body)

    def _run(self) -> None:
        while True:
            body = self._inbox.get()
            # Only the latest counts: skip whatever a burst of updates queued before it.
            while body is not None:
                try:
                    newer = self._inbox.get_nowait()
                except queue.Empty:
                    break
                body = newer
            if body is None:
                return
            try:
                self.apply(body)
            except PlatformError as exc:
                log.error("could not apply the host's settings: %s", exc)

    def _checked_routes(self, raw: list[str], address: IPv4Interface) -> list[IPv4Network]:
        routes, refused = checked_routes(raw, address, self._remote)
        if refused != self.refused:
            for why in refused:
                log.warning("refused exposed route %s", why)
        self.refused = refused
        return routes

    def apply(self, body: dict[str, Any]) -> None:
        address = IPv4Interface(body["addr"])
        peer = IPv4Address(body["peer"])
        mtu = int(body["mtu"])
        routes = self._checked_routes(list(body["routes"]), address)
        wanted = set(routes)
        # What we accept from the tunnel first, so a new route never meets an old filter.
        self._engine.set_peer_networks(
            HOST_PEER, [*routes, IPv4Network(f"{peer}/32")], [EVERYTHING])
        if (address, peer) != (self.address, self.peer):
            self._adapter.set_address(address.ip, peer)
            self.address, self.peer = address, peer
        if mtu != self.mtu:
            self._adapter.set_mtu(mtu)
            self.mtu = mtu
        with self._adapter.batch():
            for net in sorted(self.routes - wanted):
                self._adapter.remove_route(net)
                self.routes.discard(net)
            for net in sorted(wanted - self.routes):
                try:
                    self._adapter.add_route(net)
                    self.routes.add(net)
                except PlatformError as exc:
                    log.warning("exposed route %s not added: %s", net, exc)
        self.configs += 1
        log.info("connected as %s, routes: %s (MTU %d)", address.ip,
                 ", ".join(map(str, sorted(self.routes))) or "none", mtu)

    def status(self) -> dict[str, Any]:
        return {"access": {
            "address": str(self.address) if self.address else None,
            "host_address": str(self.peer) if self.peer else None,
            "mtu": self.mtu,
            "routes": [str(r) for r in sorted(self.routes)],
            "refused": list(self.refused),
            "configs": self.configs,
        }}


def run(cfg: AccessConfig, pm: pluggy.PluginManager, stop: threading.Event) -> None:
    transport_classes = runtime.transport_classes(pm, cfg.transport)
    with runtime.platform(pm, cfg.interface) as (adapter, resources):
        host, port = cfg.remote
        address = resolve(host, port, stop)
        if address is None:
            return
        # Offloads stay off: an accessor's traffic is relayed by the host's engine, which
        # passes plain packets only.
        adapter.offload = False
        interface = adapter.open_interface(cfg.interface, 1400)
        transports = []
        for transport_cls in transport_classes:
            transport = transport_cls.connect((address, port))
            resources.callback(transport.close)
            transports.append(transport)
        # Nothing is accepted from the tunnel until the host says what is exposed.
        spec = PeerSpec(HOST_PEER, cfg.key, (), (EVERYTHING,))
        plugin_sink = runtime.event_sink(pm)

        def on_control(peer: str, message: ControlMessage) -> None:
            access.on_control(peer, message)

        engine = Engine(
            Role.VM, interface, [*transports], [spec], MTU_MAX,
            runtime.engine_timers(cfg), name=socket.gethostname(), version=__version__,
            remote=(address, port), on_event=plugin_sink, on_control=on_control,
            offload=False,
        )
        access = Access(adapter, engine, address)
        access.start()
        resources.callback(access.stop)
        log.info("logging in to %s (%s:%d) over %s from %s", host, address, port,
                 cfg.transport, interface.name)

        def extra() -> dict[str, Any]:
            return {"remote": [host, port], "routes": [str(r) for r in adapter.routes()],
                    **access.status()}

        runtime.serve(engine, cfg.interface, stop, extra)
