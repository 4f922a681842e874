"""The host end of legacy mode, standing where the engine stands: it moves raw IP packets
between the tun and docker-connector's VM side (or `ctun vm --wire legacy`), relays between
that VM side and logged-in accessors, and pushes subnet links and hosts entries to the VM side.

It offers what HostRoutes and runtime.serve use of an engine (set_peer_networks, send_control,
start, stop, stopped, peers, snapshot, disconnect, switch_transport), so the daemon's routing,
Docker following and control socket work unchanged.

Nothing here is authenticated. The receive path still checks in a fixed order (length and
kind, sender, inner packet sanity) before anything touches the interface, and anything that
fails is counted and forgotten: no reply, no change of state. Two threads, as in the engine:
the packet pump, which never logs, and a timer that logs, pushes and watches the VM side.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable
from ipaddress import IPv4Network
from typing import Any

from ..config import VM_PEER, HostConfig
from ..contracts import Endpoint, PlatformError, VirtualInterface
from ..protocol import Dropped, Prefixes, check_inner, ipv4_destination
from ..threads import start_guarded
from . import status, wire
from .expose import DROP, REPLY, TO_VM, ExposeDesk, Policy
from .pushes import Pusher

log = logging.getLogger("ctun.legacy")

DEAD_AFTER = 3 * wire.HEARTBEAT_EVERY  # no datagram from the VM side for this long: "down"
TICK = 0.2  # the timer thread's period
DROP_REPORT_EVERY = 10.0
BATCH = 64
MAX_DATAGRAM = 65535
_TUN, _MAIN, _EXPOSE, _WAKE = "tun", "main", "expose", "wake"


def bind_udp(endpoint: Endpoint, what: str) -> socket.socket:
    """A UDP socket bound to `endpoint`; PlatformError (one line) when that fails."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(endpoint)
    except OSError as exc:
        sock.close()
        raise PlatformError(f"cannot listen on udp {endpoint[0]}:{endpoint[1]} ({what}): "
                            f"{exc.strerror or exc}; is another ctun or docker-connector "
                            "running? change the port") from None
    sock.setblocking(False)
    return sock


def policy_for(cfg: HostConfig) -> Policy:
    """Accessors' tokens are the names of the peers that have an address (`token NAME IP`)."""
    tokens = {p.name.encode(): p.ip for p in cfg.peers if p.ip is not None}
    return Policy(tokens, cfg.expose.routes, cfg.expose.pong, cfg.tunnel.network,
                  cfg.tunnel.host_address, cfg.tunnel.mtu)


class LegacyHost:
    role = "host"
    name = "host"

    def __init__(self, cfg: HostConfig, interface: VirtualInterface, sock: socket.socket,
                 expose: socket.socket | None, version: str) -> None:
        self.cfg = cfg
        self.interface = interface
        self.version = version
        self.mtu = cfg.tunnel.mtu
        self._sock = sock
        self._local: Endpoint = sock.getsockname()
        # What the VM side may send from, and what is sent to it (HostRoutes keeps them).
        self._allowed = Prefixes([cfg.tunnel.network])
        self._routes = Prefixes([cfg.tunnel.network])
        self._vm: Endpoint | None = None
        self._vm_seen = 0.0
        self._hellos = 0  # heartbeats that made a VM side new (pump); the timer pushes to it
        self._hellos_pushed = 0
        self._vm_state, self._vm_reason = "waiting", "no heartbeat yet"
        self.vm_traffic = status.Traffic()
        self.drops: Counter[str] = Counter()  # datagrams from senders we do not talk to
        self._desk = ExposeDesk(policy_for(cfg))
        self._expose = expose
        self._expose_next: list[socket.socket | None] = []  # a new expose socket for the pump
        self._pushes: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._pusher = Pusher(cfg.tunnel.mtu)
        self._news: collections.deque[tuple[str, str, str]] = collections.deque(maxlen=1000)
        self.events = status.EventLog()
        self._reported: Counter[str] = Counter()
        self._next_report = time.monotonic() + DROP_REPORT_EVERY
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._threads: list[threading.Thread] = []

    # --- what HostRoutes calls -----------------------------------------------------------------

    def set_peer_networks(self, peer_name: str, allowed_sources: Iterable[IPv4Network],
                          routes: Iterable[IPv4Network]) -> None:
        if peer_name == VM_PEER:
            # One attribute store each: the pump sees the old set or the new one.
            self._allowed = Prefixes(allowed_sources)
            self._routes = Prefixes(routes)

    def send_control(self, peer_name: str, kind: str, **body: Any) -> None:
        """ctun's control messages have no place in this format: the routed subnets, which
        the agent learns from them, are the VM side's own business here."""
        log.debug("legacy mode: not sending %s to %s", kind, peer_name)

    # --- what runtime.serve calls --------------------------------------------------------------

    @property
    def peers(self) -> list[status.PeerName]:
        names = [VM_PEER, *(t.decode(errors="replace") for t in self._desk.policy.tokens)]
        return [status.PeerName(n) for n in names]

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        for target, name in ((self._pump, "ctun-legacy-pump"), (self._timer, "ctun-legacy")):
            self._threads.append(start_guarded(target, name, self._crashed))

    def _crashed(self) -> None:
        self._stop.set()
        self._wake()

    def stop(self, reason: str = "shutting down") -> None:
        self._stop.set()
        self._wake()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        self._drain_news()
        for sock in (self._expose, *self._expose_next):
            if sock is not None:
                sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def disconnect(self, peer_name: str, reason: str) -> bool:
        """Forget the VM side (it is taken again at its next heartbeat, with a full push) or
        end an accessor's session (it logs in again after its next 0x02)."""
        if peer_name == VM_PEER:
            was, self._vm = self._vm, None
            self._news.append((VM_PEER, "waiting", reason))
            return was is not None
        return self._desk.kick(peer_name.encode())

    def switch_transport(self, peer_name: str, to: str) -> None:
        raise ValueError("legacy mode has one transport: udp")

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        peers = [status.peer_view(VM_PEER, self._vm_state, self._vm_reason, self._vm,
                                  self._vm_seen or None, self.vm_traffic, now)]
        sessions = {s.token: s for s in self._desk.sessions()}
        for token in self._desk.policy.tokens:
            session = sessions.get(token)
            traffic = status.Traffic()
            if session is not None:
                traffic = status.Traffic(session.rx_packets, session.rx_bytes,
                                         session.tx_packets, session.tx_bytes, session.drops)
            peers.append(status.peer_view(
                token.decode(errors="replace"), "up" if session else "waiting",
                "logged in" if session else "not logged in",
                session.endpoint if session else None, session.last_seen if session else None,
                traffic, now))
        drops = Counter(self.drops)
        drops.update(self._desk.drops)
        return status.snapshot("host", self.name, self.version, self.interface.name,
                               self._local, self.started, drops, peers, self.events)

    def legacy_status(self) -> dict[str, Any]:
        """Legacy mode's own part of `ctun status`."""
        policy = self._desk.policy
        return {"wire": status.WIRE, "legacy": {
            "expose": list(self._expose.getsockname()) if self._expose else None,
            "exposed_routes": [str(r) for r in policy.routes],
            "pong": policy.pong,
            "pushes": self._pusher.count,
            "push_problem": self._pusher.problem,
            "logins": self._desk.logins,
        }}

    # --- reloads -------------------------------------------------------------------------------

    def reconfigure(self, cfg: HostConfig) -> None:
        """A reloaded config: tokens, exposed routes, pong and the expose listener now; links
        and hosts at the timer's next round (a push if they changed)."""
        old, self.cfg = self.cfg, cfg
        self._desk.configure(policy_for(cfg))
        self._pusher.reread_hosts()
        if cfg.expose.listen != old.expose.listen:
            self._reopen_expose(cfg.expose.listen)

    def _reopen_expose(self, listen: Endpoint | None) -> None:
        fresh = None
        if listen is not None:
            try:
                fresh = bind_udp(listen, "expose")
            except PlatformError as exc:
                log.error("%s; accessors keep the old listener", exc)
                return
        log.info("expose listener %s", f"now on {listen[0]}:{listen[1]}" if listen else "closed")
        self._expose_next.append(fresh)
        self._wake()

    # --- the packet pump ---------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # closed: we are stopping anyway
            self._wake_w.send(b"x")

    def _pump(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.interface.fileno(), selectors.EVENT_READ, _TUN)
        selector.register(self._sock, selectors.EVENT_READ, _MAIN)
        selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        if self._expose is not None:
            selector.register(self._expose, selectors.EVENT_READ, _EXPOSE)
        while not self._stop.is_set():
            self._swap_expose(selector)
            self._send_pushes()
            for key, _events in selector.select(1.0):
                if key.data is _TUN:
                    self._from_tun()
                elif key.data is _MAIN:
                    self._from_main()
                elif key.data is _EXPOSE:
                    self._from_expose()
                else:
                    _drain(self._wake_r)

    def _swap_expose(self, selector: selectors.BaseSelector) -> None:
        while self._expose_next:
            fresh = self._expose_next.pop(0)
            if self._expose is not None:
                selector.unregister(self._expose)
                self._expose.close()
            self._expose = fresh
            if fresh is not None:
                selector.register(fresh, selectors.EVENT_READ, _EXPOSE)

    def _send_pushes(self) -> None:
        # Here, not on the timer thread: the pieces of a push must not have packets between
        # them (docker-connector's VM side takes whatever comes next as the body).
        while True:
            try:
                datagrams = self._pushes.get_nowait()
            except queue.Empty:
                return
            vm = self._vm
            if vm is not None:
                for datagram in datagrams:
                    self._send(self._sock, datagram, vm, self.vm_traffic)

    def _send(self, sock: socket.socket, data: bytes, to: Endpoint,
              traffic: status.Traffic | None = None) -> None:
        try:
            sock.sendto(data, to)
        except OSError:
            self.drops["send_failed"] += 1
            return
        if traffic is not None:
            traffic.sent(len(data))

    def _from_tun(self) -> None:
        vm = self._vm
        for packet in self.interface.read_packets(BATCH):
            destination = ipv4_destination(packet)
            if destination is None or destination not in self._routes or \
                    self._desk.is_accessor(destination):
                # The host itself does not talk to accessors: they reach exposed routes only.
                self.vm_traffic.drops["no_peer"] += 1
            elif vm is None:
                self.vm_traffic.drops["no_session"] += 1
            else:
                self._send(self._sock, packet, vm, self.vm_traffic)

    def _from_main(self) -> None:
        now = time.monotonic()
        for datagram, source in _receive(self._sock):
            if datagram == wire.HEARTBEAT:
                self._heartbeat(source, now)
            elif source != self._vm:
                # docker-connector appends `0x01 TEXT` to its config file; ctun never does.
                self.drops["config_write_refused" if datagram[:1] == b"\x01"
                           else "not_peer"] += 1
            elif wire.is_ipv4_packet(datagram):
                self._vm_seen = now
                self._from_vm(datagram)
            elif datagram[:1] == b"\x01":
                self.drops["config_write_refused"] += 1
            else:
                self.vm_traffic.drops["malformed"] += 1

    def _heartbeat(self, source: Endpoint, now: float) -> None:
        if source != self._vm:
            before, self._vm = self._vm, source
            self._hellos += 1
            where = f"{source[0]}:{source[1]}"
            self._news.append((VM_PEER, "up", f"heartbeat from {where}" if before is None
                               else f"VM side moved from {before[0]}:{before[1]} to {where}"))
        elif now - self._vm_seen > DEAD_AFTER:
            self._hellos += 1  # back after a silence: it may have restarted, tell it again
        self._vm_seen = now

    def _from_vm(self, packet: bytes) -> None:
        try:
            check_inner(packet, self._allowed, self.mtu)
        except Dropped as dropped:
            self.vm_traffic.drops[dropped.reason.value] += 1
            return
        self.vm_traffic.received(len(packet))
        destination = int.from_bytes(packet[16:20], "big")
        if not self._desk.is_accessor(destination):
            self.interface.write_packet(packet)
            return
        session, why = self._desk.to_accessor(packet)
        if session is None or self._expose is None:
            self.vm_traffic.drops[why or "no_session"] += 1
            return
        self._send(self._expose, packet, session.endpoint)

    def _from_expose(self) -> None:
        if self._expose is None:
            return
        now = time.monotonic()
        for datagram, source in _receive(self._expose):
            outcome = self._desk.on_datagram(datagram, source, now)
            if outcome.action == REPLY:
                self._send(self._expose, outcome.data, source)
            elif outcome.action == TO_VM:
                vm = self._vm
                if vm is None:
                    self.vm_traffic.drops["no_session"] += 1
                else:
                    self._send(self._sock, outcome.data, vm, self.vm_traffic)
            else:
                assert outcome.action == DROP

    # --- the timer -----------------------------------------------------------------------

    def _timer(self) -> None:
        while not self._stop.wait(TICK):
            now = time.monotonic()
            self._watch_vm(now)
            self._pusher.refresh_hosts(self.cfg, now)
            self._push_if_needed()
            self._drain_news()
            if now >= self._next_report:
                self._next_report = now + DROP_REPORT_EVERY
                self._report_drops()

    def _watch_vm(self, now: float) -> None:
        if self._vm is None:
            return
        if now - self._vm_seen > DEAD_AFTER and self._vm_state == "up":
            self._news.append((VM_PEER, "down", f"nothing from the VM side for {DEAD_AFTER:g} s"))
        elif now - self._vm_seen <= DEAD_AFTER and self._vm_state == "down":
            self._news.append((VM_PEER, "up", "heard from it again"))

    def _push_if_needed(self) -> None:
        if self._vm is None:
            return
        hellos = self._hellos
        full = hellos != self._hellos_pushed
        self._hellos_pushed = hellos
        datagrams = self._pusher.next_push(self.cfg, full)
        if datagrams:
            self._pushes.put(datagrams)
            self._wake()

    def _drain_news(self) -> None:
        for line in self._desk.take_events():
            log.info("%s", line)
        while self._news:
            peer, state, reason = self._news.popleft()
            if peer == VM_PEER:
                self._vm_state, self._vm_reason = state, reason
            log.info("peer %s: %s (%s)", peer, state, reason)
            self.events.record(peer, state, reason)

    def _report_drops(self) -> None:
        total = Counter(self.drops)
        total.update(self._desk.drops)
        total.update(self.vm_traffic.drops)
        for session in self._desk.sessions():
            total.update(session.drops)
        fresh = total - self._reported
        self._reported = total
        for reason, count in sorted(fresh.items()):
            log.warning("legacy mode dropped %d datagrams/packets (%s) in the last %g s",
                        count, reason, DROP_REPORT_EVERY)


def _receive(sock: socket.socket) -> list[tuple[bytes, Endpoint]]:
    found: list[tuple[bytes, Endpoint]] = []
    while len(found) < BATCH:
        try:
            data, source = sock.recvfrom(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break  # an ICMP error for an earlier send: nothing to read, nothing to do
        found.append((data, (source[0], source[1])))
    return found


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass
