"""`ctun vm --wire legacy`: the VM side in docker-connector's format (docs/legacy.md), for a
docker-connector host or a ctun host in legacy mode. No key: the format has none.

It sets up the tun as docker-connector's VM side does, says hello (0x00) at once and whenever
it has sent nothing for 5 s, moves raw IP packets both ways, and applies the host's pushes
(`connect`/`disconnect` through vm/links.py, `dns`/`host` through vm/dns.py) on a worker
thread. The host pushes no routes in this format, so the routed subnets are the Docker
bridges' own: every IPv4 subnet on a bridge interface here gets the forwarding rules.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Interface, IPv4Network
from typing import Any, cast

import pluggy

from .. import __version__
from ..core import runtime
from ..core.config import AgentConfig
from ..core.contracts import Endpoint, PlatformAdapter, VirtualInterface
from ..core.engine import Engine
from ..core.legacy import status, wire
from ..core.messages import ControlMessage
from ..core.protocol import Dropped, Prefixes, check_inner
from ..core.threads import start_guarded
from .dns import DnsService
from .firewall import Firewall, FirewallError
from .forwarding import Forwarding
from .keeper import Ticker
from .links import Pair, SubnetLinks

log = logging.getLogger("ctun.vm.legacy")

HOST_PEER = "host"
RECHECK_EVERY = 2.0  # bridges, link rules and DNS redirects are checked this often
BATCH = 64
MAX_DATAGRAM = 65535
_TUN, _SOCK, _WAKE = "tun", "sock", "wake"


def run(cfg: AgentConfig, pm: pluggy.PluginManager, stop: threading.Event) -> None:
    from .agent import resolve

    log.warning("LEGACY WIRE MODE: no authentication, no encryption; whoever can send UDP "
                "to this VM side's port can inject packets. Use it on trusted networks only.")
    with runtime.platform(pm, cfg.tunnel.interface) as (adapter, resources):
        address = resolve(cfg.host, cfg.port, stop)
        if address is None:
            return
        adapter.offload = False  # raw packets: the other end knows no offload headers
        interface = adapter.open_interface(cfg.tunnel.interface, cfg.tunnel.mtu)
        adapter.set_address(cfg.tunnel.vm_address, cfg.tunnel.host_address)
        adapter.add_route(cfg.tunnel.network, via=cfg.tunnel.host_address)
        adapter.enable_forwarding()
        firewall = _firewall(cfg)
        forwarding = Forwarding(adapter, firewall)
        forwarding.start()
        resources.callback(forwarding.stop)
        controls = Controls(cfg, adapter, firewall, forwarding)
        controls.start()
        resources.callback(controls.stop)
        agent = LegacyAgent(cfg, interface, (address, cfg.port), controls.push)
        log.info("legacy mode: talking to %s (%s:%d) from %s %s", cfg.host, address, cfg.port,
                 interface.name, cfg.tunnel.vm_address)

        def extra() -> dict[str, Any]:
            return {"remote": [cfg.host, cfg.port], "wire": status.WIRE,
                    "routes": [str(r) for r in adapter.routes()],
                    **forwarding.status(), **controls.status()}

        runtime.serve(cast(Engine, agent), cfg.tunnel.interface, stop, extra)


def _firewall(cfg: AgentConfig) -> Firewall | None:
    try:
        return Firewall(cfg.tunnel.interface, host_address=cfg.tunnel.host_address)
    except FirewallError as exc:
        log.warning("not managing the VM's firewall: %s", exc)
        return None


class LegacyAgent:
    """The packet pump, in place of the engine for runtime.serve (the same status shape)."""

    role = "vm"

    def __init__(self, cfg: AgentConfig, interface: VirtualInterface, remote: Endpoint,
                 on_push: Callable[[bytes], None]) -> None:
        self.interface = interface
        self.name = socket.gethostname()
        self.mtu = cfg.tunnel.mtu
        self._remote = remote
        self._on_push = on_push
        self._allowed = Prefixes([cfg.tunnel.network])  # the host and its accessors
        self._sock = self._connect()
        self._assembler = wire.PushAssembler()
        self._last_sent = 0.0
        self._last_heard = 0.0
        self._new_socket = threading.Event()  # `ctun reconnect`: a new port, a new VM side
        self.traffic = status.Traffic()
        self.events = status.EventLog()
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread: threading.Thread | None = None

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(self._remote)  # and the kernel drops datagrams from anyone else
        sock.setblocking(False)
        return sock

    # --- what runtime.serve calls ------------------------------------------------------------

    @property
    def peers(self) -> list[status.PeerName]:
        return [status.PeerName(HOST_PEER)]

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self._thread = start_guarded(self._pump, "ctun-legacy-pump", self._stop.set)

    def stop(self, reason: str = "shutting down") -> None:
        self._stop.set()
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def disconnect(self, peer_name: str, reason: str) -> bool:
        """Start over from a new port: the host takes us as a new VM side and pushes all."""
        self._new_socket.set()
        self._wake_w.send(b"x")
        self.events.record(HOST_PEER, "connecting", reason)
        return True

    def switch_transport(self, peer_name: str, to: str) -> None:
        raise ValueError("legacy mode has one transport: udp")

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        heard = self._last_heard
        state = "up" if heard and now - heard <= 3 * wire.HEARTBEAT_EVERY else "connecting"
        reason = "" if state == "up" else "nothing from the host lately (it answers only " \
                                          "when it has something to send)"
        peer = status.peer_view(HOST_PEER, state, reason, self._remote, heard or None,
                                self.traffic, now)
        local: Endpoint = self._sock.getsockname() if not self._stop.is_set() else ("", 0)
        return status.snapshot("vm", self.name, __version__, self.interface.name, local,
                               self.started, Counter(), [peer], self.events)

    # --- the pump ------------------------------------------------------------------------------

    def _pump(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.interface.fileno(), selectors.EVENT_READ, _TUN)
        selector.register(self._sock, selectors.EVENT_READ, _SOCK)
        selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._send(wire.HEARTBEAT)  # hello: the host learns our address from it
        while not self._stop.is_set():
            if self._new_socket.is_set():
                self._new_socket.clear()
                selector.unregister(self._sock)
                self._sock.close()
                self._sock = self._connect()
                selector.register(self._sock, selectors.EVENT_READ, _SOCK)
                self._send(wire.HEARTBEAT)
            idle = self._last_sent + wire.HEARTBEAT_EVERY - time.monotonic()
            if idle <= 0:
                self._send(wire.HEARTBEAT)
                continue
            for key, _events in selector.select(min(idle, 1.0)):
                if key.data is _TUN:
                    for packet in self.interface.read_packets(BATCH):
                        self._send(packet)
                elif key.data is _SOCK:
                    self._receive()
                else:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)

    def _send(self, data: bytes) -> None:
        try:
            self._sock.send(data)
        except OSError:  # the host is not there (yet): the heartbeat tries again
            self.traffic.drops["send_failed"] += 1
            return
        self._last_sent = time.monotonic()
        if data != wire.HEARTBEAT:
            self.traffic.sent(len(data))

    def _receive(self) -> None:
        for _ in range(BATCH):
            try:
                datagram = self._sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # an ICMP error for an earlier send
            now = time.monotonic()
            self._last_heard = now
            self._one(datagram, now)

    def _one(self, datagram: bytes, now: float) -> None:
        """In the format's order: a push's pieces while one is open (a real packet has a
        valid IPv4 header, a piece of text practically never), a push header, a packet."""
        if self._assembler.expire(now):
            self.traffic.drops["push_timeout"] += 1
        try:
            if self._assembler.open and not wire.is_checked_ipv4_packet(datagram):
                body = self._assembler.feed(datagram)
            elif datagram[:1] == bytes((wire.CONTROL,)):
                body = self._assembler.start(datagram, now)
            elif wire.is_ipv4_packet(datagram):
                self._packet(datagram)
                return
            else:
                self.traffic.drops["malformed"] += 1
                return
        except wire.WireError as exc:
            self.traffic.drops[str(exc)] += 1
            return
        if body is not None:
            self._on_push(body)

    def _packet(self, packet: bytes) -> None:
        try:
            check_inner(packet, self._allowed, self.mtu)
        except Dropped as dropped:
            self.traffic.drops[dropped.reason.value] += 1
            return
        self.traffic.received(len(packet))
        self.interface.write_packet(packet)


class Controls:
    """Applies the host's pushes on a thread of its own (iptables is slow), and keeps the
    bridges' subnets, the link rules and the DNS redirects in step every few seconds."""

    def __init__(self, cfg: AgentConfig, adapter: PlatformAdapter, firewall: Firewall | None,
                 forwarding: Forwarding) -> None:
        self._forwarding = forwarding
        self._links = SubnetLinks(adapter, firewall)
        self._dns = DnsService(cfg.tunnel.vm_address, cfg.tunnel.interface,
                               iptables=firewall.backend if firewall is not None else None)
        self._pairs: set[Pair] = set()
        self._suffixes: list[str] = []
        self._serving = False  # the DNS service has had something to serve
        self._bodies: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._subnets: tuple[IPv4Network, ...] = ()
        self._generation = 0
        self.pushes = 0
        self.bad: Counter[str] = Counter()
        self._ticker = Ticker("ctun-legacy-controls", self._round, every=RECHECK_EVERY,
                              log=log, what="legacy controls")

    def start(self) -> None:
        try:
            for line in self._dns.cleanup_leftovers():
                log.warning("cleaned up after a previous run: DNS redirect %s", line)
        except FirewallError as exc:
            log.error("DNS redirect: %s", exc)
        self._ticker.start()

    def stop(self) -> None:
        self._ticker.stop()
        self._links.close()
        self._dns.close()

    def push(self, body: bytes) -> None:
        """Network thread: keep it, wake the worker."""
        self._bodies.put(body)
        self._ticker.wake()

    def status(self) -> dict[str, Any]:
        return {"legacy": {"pushes": self.pushes, "bad_commands": dict(self.bad),
                           "bridge_subnets": [str(s) for s in self._subnets]},
                **self._links.status(), "dns": self._dns.status()}

    def _round(self) -> None:
        self._follow_bridges()
        applied = False
        while True:
            try:
                body = self._bodies.get_nowait()
            except queue.Empty:
                break
            self._apply(body)
            applied = True
        if not applied:
            self._links.refresh()
            self._dns.ensure()

    def _apply(self, body: bytes) -> None:
        commands, bad = wire.decode_body(body)
        self.pushes += 1
        for reason in bad:
            self.bad[reason] += 1
        if bad:
            log.warning("control push: %d parts skipped (%s)", len(bad), ", ".join(bad))
        suffixes: list[str] | None = None
        entries: list[tuple[str, str]] = []
        for command in commands:
            log.info("control => %s", command.text())
            if command.verb in ("connect", "disconnect"):
                pair = cast(Pair, tuple(sorted(map(wire.link_side, command.args))))
                if command.verb == "connect":
                    self._pairs.add(pair)
                else:
                    self._pairs.discard(pair)
            elif command.verb == "dns":
                added, removed = wire.dns_suffixes(command)
                suffixes = [s for s in (suffixes if suffixes is not None else self._suffixes)
                            if s not in removed]
                suffixes += [s for s in added if s not in suffixes]
            else:
                address, *names = command.args
                entries += [(name.rstrip(".").lower(), address) for name in names]
        self._links.apply(sorted(self._pairs))
        # Each push holds the whole hosts snapshot, as docker-connector's VM side takes it;
        # its redirects stay until a `dns -SUFFIX` removes them.
        if suffixes is not None:
            self._suffixes = suffixes
        if self._suffixes or entries or self._serving:
            self._dns.apply(self._suffixes, entries)
            self._serving = bool(self._suffixes or entries)

    def _follow_bridges(self) -> None:
        subnets = bridge_subnets()
        if subnets == self._subnets:
            return
        self._subnets = subnets
        self._generation += 1
        log.info("routed subnets (the Docker bridges here): %s",
                 ", ".join(map(str, subnets)) or "none")
        # The same snapshot the host's `routes` message would carry in ctun's own wire.
        self._forwarding.on_control(HOST_PEER, ControlMessage(
            "routes", self._generation, {"gen": self._generation, "part": 0, "parts": 1,
                                         "routes": [str(s) for s in subnets]}))


def bridge_subnets() -> tuple[IPv4Network, ...]:
    """The IPv4 subnets of this machine's bridge interfaces (Docker's docker0 and br-*)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        bridges = set()
        for link in ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            if info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge":
                bridges.add(int(link["index"]))
        found = {IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network
                 for a in ipr.get_addr(family=socket.AF_INET) if int(a["index"]) in bridges}
    return tuple(sorted(found))
