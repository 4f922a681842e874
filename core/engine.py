"""The tunnel engine: sessions, packet pumps, keepalive, dead-peer detection, reconnect.

Two threads. The packet pump waits on the interface and every transport at once: it reads
IP packets from the interface, seals them and sends them in batches, and it receives frames,
checks them in the protocol's fixed order and writes what survives to the interface. The
timer thread runs handshakes, keepalives, control retransmits, offload switching and the
event queue. Logging and plugin hooks only ever run on the timer thread, so nothing slow sits
on the packet path.
"""

from __future__ import annotations

import collections
import enum
import logging
import queue
import secrets
import selectors
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from . import gso, messages
from .contracts import Endpoint, Transport, VirtualInterface
from .protocol import (
    MAX_FRAME,
    TRANSPORT_OVERHEAD,
    Drop,
    Dropped,
    FrameType,
    Prefixes,
    check_init_freshness,
    check_inner,
    consume_response,
    create_init,
    create_response,
    frame_type,
    ipv4_destination,
    parse_init,
    receiver_index,
    verify_init,
)
from .session import Peer, Session

log = logging.getLogger("ctun.engine")

BATCH = 64
MAX_KEEPALIVE_ECHO = 16  # a keepalive may carry a timestamp the host echoes, nothing more
HANDSHAKE_TIMEOUT = 1.0  # resend an initiation not answered within this
MAX_BACKOFF = 4.0
CONTROL_RETRY = 1.0
CONTROL_TRIES = 10
PREVIOUS_SESSION_GRACE = 10.0  # in-flight frames under the old keys are still accepted
INITS_PER_SECOND = 20  # per peer: caps the key exchanges a replaying or buggy peer can cost
DROP_REPORT_EVERY = 10.0  # seconds between log summaries of drops (never one line per packet)
UNANSWERED_WARNING = 3  # handshakes without an answer before the VM side says what to check
FALLBACK_AFTER = 3.0  # VM side: no authenticated answer on a path for this long -> next path
PROBE_EVERY = 10.0  # VM side, off the first path: how often to try the first path again
MAX_SWITCHES_KEPT = 20
PROBE_FLAG = b"\x01"  # a keepalive that tests a path: echo it there, do not move the peer
SWITCH_INTERVAL = 0.0005
RECENT_EVENTS = 200
FEATURE_GSO = "gso"  # in hello: "send me DATA_GSO frames, my interface takes them"
_INTERFACE = "interface"  # selector keys of the pump
_WAKE = "wake"

# What a user should check when a drop reason shows up in the log.
DROP_HINTS = {
    Drop.UNKNOWN_PEER: "a handshake with a key we do not know: does the agent use this "
                       "host's vm.key?",
    Drop.BAD_MAC: "a handshake with a damaged or forged key proof",
    Drop.CLOCK_SKEW: "the peer's clock is far from ours: sync the VM's clock",
    Drop.STALE_HANDSHAKE: "a replayed or out-of-order handshake",
    Drop.SOURCE_NOT_ALLOWED: "a peer sent from an address it does not own (check routes and "
                             "[peers.*] allowed)",
    Drop.NO_SESSION: "packets for a peer that is not connected",
    Drop.NO_PEER: "packets for an address no peer owns",
}


class Role(enum.StrEnum):
    HOST = "host"  # listens, answers handshakes, owns the routes to the Docker subnets
    VM = "vm"  # connects out, initiates handshakes, forwards to the bridges


@dataclass(frozen=True)
class PeerSpec:
    name: str
    psk: bytes
    allowed_sources: tuple[IPv4Network, ...]
    routes: tuple[IPv4Network, ...]


@dataclass(frozen=True)
class EngineTimers:
    keepalive: float = 1.0
    dead_after: float = 3.0
    rekey_after: float = 120.0
    handshake_skew: float = 600.0

    @property
    def reject_after(self) -> float:
        # WireGuard's ratio (120 s rekey, 180 s reject): a late rekey never stalls traffic.
        return self.rekey_after * 1.5


Event = tuple[str, str, str]  # (peer, state, reason)
EventSink = Callable[[str, str, str], None]
# Application control messages (kinds the engine does not handle itself), per peer name.
# Called on the network thread: stash the message and return, never do slow work here.
ControlSink = Callable[[str, messages.ControlMessage], None]


class Engine:
    def __init__(
        self,
        role: Role,
        interface: VirtualInterface,
        transports: Sequence[Transport],
        peers: Iterable[PeerSpec],
        mtu: int,
        timers: EngineTimers,
        name: str,
        version: str,
        remote: Endpoint | None = None,
        on_event: EventSink | None = None,
        on_control: ControlSink | None = None,
        offload: bool = True,
    ) -> None:
        self.role = role
        self.interface = interface
        if not transports:
            raise ValueError("the engine needs at least one transport")
        # In order of preference: the VM side starts on the first and falls back in turn.
        self.transports = list(transports)
        self.mtu = mtu
        self.timers = timers
        self.name = name
        self.version = version
        self.peers = [
            Peer(p.name, p.psk, Prefixes(p.allowed_sources), Prefixes(p.routes)) for p in peers
        ]
        if role is Role.HOST:
            for peer in self.peers:
                peer.state = "waiting"  # for its first handshake
        else:
            if remote is None or len(self.peers) != 1:
                raise ValueError("the VM side talks to exactly one host at a known address")
            self.peers[0].endpoint = remote
        self._by_key_id = {p.key_id: p for p in self.peers}
        self._sessions: dict[int, tuple[Session, Peer]] = {}
        self._lock = threading.Lock()  # handshake and session bookkeeping, never per packet
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        # The latest events, for status views (the TUI's log); appended by the timer thread.
        self.recent_events: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=RECENT_EVENTS)
        self._event_id = 0
        self._on_event = on_event
        self._on_control_message = on_control
        # Tells the peer that our control sequence numbers start over (we restarted).
        self.epoch = secrets.randbelow(messages.MAX_EPOCH - 1) + 1
        self.drops_in: Counter[str] = Counter()  # frames no session could be found for
        self.drops_out: Counter[str] = Counter()  # interface packets with nowhere to go
        # Nothing legitimate is bigger: one packet of at most the MTU, or one control message;
        # only a DATA_GSO frame (a super-packet), and only if we said we take them, may be.
        self.max_frame = max(mtu, messages.MAX_CONTROL) + TRANSPORT_OVERHEAD
        self.max_gso_frame = MAX_FRAME if interface.vnet else self.max_frame
        for transport in self.transports:
            transport.use_offloads(offload)
            transport.set_datagram_size(self.max_frame)
        self.started = time.monotonic()
        self._reported_drops: Counter[str] = Counter()
        self._next_drop_report = self.started + DROP_REPORT_EVERY
        self._stop = threading.Event()
        # A socket pair, not a pipe: Windows can only wait on sockets.
        self._wake_r, self._wake_w = socket.socketpair()
        self._threads: list[threading.Thread] = []

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        # Python hands the GIL to a waiting thread only every switch interval (5 ms by
        # default): a packet that arrives while the forwarding or control thread is busy in
        # Python would wait that long. 0.5 ms bounds the wait at little cost in switches.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        now = time.monotonic()
        for peer in self.peers:
            peer.path_since = now
        for target, name in ((self._pump, "ctun-pump"), (self._timer_loop, "ctun-timer")):
            thread = threading.Thread(target=self._guard(target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception:
                log.exception("engine thread %s failed; stopping", threading.current_thread().name)
                self._stop.set()
                self._wake_w.send(b"x")

        return run

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self, reason: str = "shutting down") -> None:
        """Tell the peers we are going (so they reconnect at once), then stop the threads."""
        if not self._stop.is_set():
            for peer in self.peers:
                self._send_close(peer, reason)
        self._stop.set()
        self._wake_w.send(b"x")
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        self._drain_events()
        self._wake_r.close()
        self._wake_w.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout)

    # --- the packet pump --------------------------------------------------------------

    def _pump(self) -> None:
        """One thread for both directions. Two pumps in one process would hand the GIL to
        each other on every packet; one loop that drains whatever is ready (in bounded
        batches, so neither direction starves the other) pays for one wake-up per burst."""
        # selectors, not poll(): the same code waits with epoll, kqueue or (Windows) select.
        selector = selectors.DefaultSelector()
        selector.register(self.interface.fileno(), selectors.EVENT_READ, _INTERFACE)
        for path, transport in enumerate(self.transports):
            selector.register(transport.fileno(), selectors.EVENT_READ, path)
        selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        while not self._stop.is_set():
            for key, _events in selector.select(1.0):
                source = key.data
                if source is _INTERFACE:
                    self._from_interface()
                elif source is not _WAKE:
                    self._from_network(source)

    def _from_interface(self) -> None:
        packets = self.interface.read_packets(BATCH)
        if not packets:
            return
        now = time.monotonic()
        single = self.peers[0] if self.role is Role.VM else None
        vnet = self.interface.vnet
        offset = gso.HEADER_LEN if vnet else 0
        batches: dict[int, tuple[Peer, list[bytes]]] = {}
        for raw in packets:
            peer = single or self._peer_for(raw, offset)
            if peer is None:
                self.drops_out[Drop.NO_PEER] += 1
                continue
            session, endpoint = peer.current, peer.endpoint
            if session is None or endpoint is None or \
                    now - session.created > self.timers.reject_after:
                peer.counters.drops_out[Drop.NO_SESSION] += 1
                continue
            ftype = FrameType.DATA
            if not vnet:
                payload = raw
            elif raw[:offset] == gso.ZERO:
                payload = raw[offset:]
            elif (finished := gso.finish_checksum(raw)) is not None:
                # Not a super-packet, only a checksum left to do: finished here, it goes as
                # plain DATA, which costs the two ends less than the header does.
                payload = finished
            elif peer.gso:
                ftype = FrameType.DATA_GSO
                payload = gso.vnet_to_wire(raw) + memoryview(raw)[offset:]
                peer.counters.tx_super += 1
            else:
                # Offloads went on for peers that take super-packets; this one does not.
                peer.counters.drops_out[Drop.GSO_UNSUPPORTED] += 1
                continue
            try:
                frame = session.sealer.seal(ftype, payload)
            except Dropped as dropped:
                peer.counters.drops_out[dropped.reason] += 1
                continue
            if len(frame) > self.transports[peer.path].max_frame:
                # A forwarded 64 KB super-packet over a transport with a 16-bit length.
                peer.counters.drops_out[Drop.OVERSIZE] += 1
                continue
            batch = batches.get(id(peer))
            if batch is None:
                batches[id(peer)] = (peer, [frame])
            else:
                batch[1].append(frame)
            counters = peer.counters
            counters.tx_packets += 1
            counters.tx_bytes += len(raw) - offset
        for peer, frames in batches.values():
            if peer.endpoint is not None:
                self.transports[peer.path].send_many(frames, peer.endpoint)

    def _peer_for(self, packet: bytes, offset: int = 0) -> Peer | None:
        destination = ipv4_destination(packet, offset)
        if destination is None:
            return None
        best, best_len = None, -1
        for peer in self.peers:
            length = peer.routes.longest_match(destination)
            if length > best_len:
                best, best_len = peer, length
        return best

    def _from_network(self, path: int) -> None:
        frames = self.transports[path].receive(BATCH)
        now = time.monotonic()
        for frame, source in frames:
            self.receive_frame(frame, source, now, path)

    def receive_frame(self, frame: bytes, source: Endpoint, now: float, path: int = 0) -> None:
        """Check one frame in the protocol's order; count and forget anything that fails."""
        peer: Peer | None = None
        try:
            size = len(frame)
            if size > self.max_frame and (size > self.max_gso_frame or
                                          frame[0] != FrameType.DATA_GSO):
                raise Dropped(Drop.OVERSIZE)
            ftype = frame_type(frame)
            if ftype is FrameType.INIT:
                self._on_init(frame, source, now, path)
            elif ftype is FrameType.RESPONSE:
                self._on_response(frame, source, now, path)
            else:
                entry = self._sessions.get(receiver_index(frame))
                if entry is None:
                    raise Dropped(Drop.UNKNOWN_SESSION)
                session, peer = entry
                self._on_transport(peer, session, ftype, frame, source, now, path)
        except Dropped as dropped:
            (peer.counters.drops_in if peer else self.drops_in)[dropped.reason] += 1

    def _on_transport(
        self,
        peer: Peer,
        session: Session,
        ftype: FrameType,
        frame: bytes,
        source: Endpoint,
        now: float,
        path: int,
    ) -> None:
        if now - session.created > self.timers.reject_after:
            raise Dropped(Drop.KEY_EXPIRED)
        payload = session.opener.open(frame)
        message: messages.ControlMessage | None = None
        if ftype is FrameType.DATA:
            check_inner(payload, peer.allowed_sources, self.mtu)
        elif ftype is FrameType.DATA_GSO:
            if not self.interface.vnet:
                raise Dropped(Drop.GSO_UNSUPPORTED)  # we never said we take them
            gso.check_gso_inner(payload, peer.allowed_sources, self.mtu)
        elif ftype is FrameType.KEEPALIVE and len(payload) > MAX_KEEPALIVE_ECHO:
            raise Dropped(Drop.MALFORMED)
        elif ftype is FrameType.CONTROL:
            message = messages.parse(payload)
        # Authenticated, fresh and sane: only now may it change state or reach the interface.
        probe = ftype is FrameType.KEEPALIVE and payload[8:9] == PROBE_FLAG
        if not session.confirmed:
            self._confirm(peer, session, now)
        if self.role is Role.HOST and not probe:
            # Roaming: replies follow the latest authenticated frame, across transports too.
            if peer.path != path:
                self._events.put((peer.name, "transport", f"now over {self._path_name(path)}"))
            peer.endpoint, peer.path = source, path
        peer.last_received = now
        if peer.state != "up" and session is peer.current:
            self._set_state(peer, "up", "traffic resumed")
        if ftype is FrameType.DATA:
            self.interface.write_packet(payload)
            peer.counters.rx_packets += 1
            peer.counters.rx_bytes += len(payload)
        elif ftype is FrameType.DATA_GSO:
            self.interface.write_gso(gso.wire_to_vnet(payload),
                                     memoryview(payload)[gso.HEADER_LEN:])
            counters = peer.counters
            counters.rx_packets += 1
            counters.rx_super += 1
            counters.rx_bytes += len(payload) - gso.HEADER_LEN
        elif ftype is FrameType.KEEPALIVE:
            self._on_keepalive(peer, session, payload, now, source, path)
        elif message is not None:
            self._on_control(peer, session, message, now)
        elif ftype is FrameType.CLOSE:
            self._on_close(peer, session)

    def _on_keepalive(self, peer: Peer, session: Session, payload: bytes, now: float,
                      source: Endpoint, path: int) -> None:
        if self.role is Role.HOST:
            # Echo, on the path it came by, so the VM side knows that path works and can
            # measure the round trip.
            frame = self._seal(session, FrameType.KEEPALIVE, payload, now)
            if frame is not None:
                self.transports[path].send(frame, source)
            return
        if path == peer.path:
            # Only an echo of our own keepalive proves that the path works both ways.
            peer.last_echo = now
        if len(payload) >= 8:
            sent = int.from_bytes(payload[:8], "big") / 1e9
            if 0 <= now - sent < 60:
                peer.rtt = now - sent
        # A probe's echo over a more preferred path than ours: go back to it.
        if payload[8:9] == PROBE_FLAG and path < peer.path and not peer.pinned:
            self._switch_path(peer, path, f"{self._path_name(path)} works again", now)

    def _on_close(self, peer: Peer, session: Session) -> None:
        with self._lock:
            self._forget(session)
            if peer.current is session:
                peer.current = None
            peer.next_attempt = 0.0
            peer.backoff = 0.0
        reason = f"peer closed: {peer.close_reason}" if peer.close_reason else "peer closed"
        peer.close_reason = ""
        self._set_state(peer, "connecting" if self.role is Role.VM else "down", reason)

    # --- handshakes --------------------------------------------------------------------

    def _on_init(self, frame: bytes, source: Endpoint, now: float, path: int) -> None:
        if self.role is not Role.HOST:
            raise Dropped(Drop.UNKNOWN_TYPE)
        message = parse_init(frame)
        peer = self._by_key_id.get(message.key_id)
        if peer is None:
            raise Dropped(Drop.UNKNOWN_PEER)
        try:
            verify_init(message, peer.psk)
            check_init_freshness(
                message,
                peer.last_init_timestamp,
                time.time_ns(),
                int(self.timers.handshake_skew * 1e9),
            )
            if now - peer.last_init_accepted < 1 / INITS_PER_SECOND:
                raise Dropped(Drop.RATE_LIMITED)
        except Dropped as dropped:
            peer.counters.drops_in[dropped.reason] += 1
            return
        with self._lock:
            response, keys = create_response(message, peer.psk, self._new_index())
            peer.last_init_timestamp = message.timestamp_ns
            peer.last_init_accepted = now
            if peer.pending_response is not None:
                self._forget(peer.pending_response)
            session = Session(keys, now, initiator=False)
            peer.pending_response = session
            self._sessions[session.local_index] = (session, peer)
        self.transports[path].send(response, source)

    def _on_response(self, frame: bytes, source: Endpoint, now: float, path: int) -> None:
        if self.role is not Role.VM:
            raise Dropped(Drop.UNKNOWN_TYPE)
        peer = self.peers[0]
        with self._lock:
            pending = peer.pending_init
            if pending is None:
                raise Dropped(Drop.UNKNOWN_SESSION)
            try:
                keys = consume_response(pending, frame)
            except Dropped as dropped:
                peer.counters.drops_in[dropped.reason] += 1
                return
            peer.pending_init = None
            peer.handshake_ms = (now - peer.init_sent) * 1000
            session = Session(keys, now, initiator=True, confirmed=True)
            self._sessions[session.local_index] = (session, peer)
            self._install(peer, session, now)
            peer.backoff = 0.0
            peer.unanswered = 0
        peer.last_received = peer.last_echo = now
        # The first frame under the new keys confirms them to the host; send it at once.
        self._send_keepalive(peer, session, now)
        self._queue_hello(peer)
        self._set_state(peer, "up", "handshake complete")

    def _queue_hello(self, peer: Peer) -> None:
        features = [FEATURE_GSO] if self.interface.vnet else []
        self._queue_control(peer, "hello", role=self.role.value, name=self.name,
                            version=self.version, features=features)

    def _confirm(self, peer: Peer, session: Session, now: float) -> None:
        with self._lock:
            session.confirmed = True
            if peer.pending_response is session:
                peer.pending_response = None
            self._install(peer, session, now)
        self._queue_hello(peer)
        self._set_state(peer, "up", "handshake complete")

    def _install(self, peer: Peer, session: Session, now: float) -> None:
        """Make `session` current; the old one stays valid for receiving a little longer."""
        if peer.previous is not None:
            self._forget(peer.previous)
        peer.previous = peer.current
        peer.current = session
        peer.handshakes += 1
        # Control state outlives rekeys: unacknowledged messages go out again under the new
        # keys. A restarted peer is recognised by its epoch, not by its new session.

    def _forget(self, session: Session) -> None:
        self._sessions.pop(session.local_index, None)

    def _new_index(self) -> int:
        while True:
            index = secrets.randbits(32)
            if index not in self._sessions:
                return index

    def _initiate(self, peer: Peer, now: float) -> None:
        with self._lock:
            peer.pending_init = create_init(peer.psk, self._new_index(), time.time_ns())
            peer.init_sent = time.monotonic()
            # Exponential backoff with jitter, so many agents never retry in lockstep.
            peer.backoff = min(MAX_BACKOFF, max(HANDSHAKE_TIMEOUT, peer.backoff * 2))
            peer.next_attempt = now + peer.backoff * (0.8 + 0.4 * secrets.randbelow(1000) / 1000)
            message = peer.pending_init.message
            peer.unanswered += 1
        # With fallback, unanswered handshakes on the first path are expected: warn once
        # every path has had its share.
        if peer.unanswered == UNANSWERED_WARNING * len(self.transports) and \
                peer.endpoint is not None:
            host, port = peer.endpoint
            log.warning(
                "no answer from %s:%d to %d handshakes: is `ctun up` running there and "
                "listening on that address, does this agent use the host's vm.key, and are "
                "both clocks right?", host, port, peer.unanswered,
            )
        if peer.endpoint is not None:
            self.transports[peer.path].send(message, peer.endpoint)

    # --- control channel ---------------------------------------------------------------

    def send_control(self, peer_name: str, kind: str, **body: Any) -> None:
        """Queue a control message; it is retransmitted until acknowledged (thread-safe)."""
        self._queue_control(self._peer(peer_name), kind, **body)

    def set_peer_networks(self, peer_name: str, allowed_sources: Iterable[IPv4Network],
                          routes: Iterable[IPv4Network]) -> None:
        """Change what a peer may send from and what is sent to it, without a restart."""
        peer = self._peer(peer_name)
        # Each is one attribute store: the pumps see the old set or the new one, never a mix.
        peer.allowed_sources = Prefixes(allowed_sources)
        peer.routes = Prefixes(routes)

    def _peer(self, name: str) -> Peer:
        for peer in self.peers:
            if peer.name == name:
                return peer
        raise KeyError(f"no peer named {name!r}")

    def _queue_control(self, peer: Peer, kind: str, **body: Any) -> None:
        with self._lock:
            seq = peer.control.next_seq
            peer.control.next_seq += 1
            payload = messages.encode(kind, seq, epoch=self.epoch, **body)
            peer.control.unacked[seq] = (payload, 0.0, 0)

    def _on_control(
        self, peer: Peer, session: Session, message: messages.ControlMessage, now: float
    ) -> None:
        if message.kind == "ack":
            peer.control.unacked.pop(message.seq, None)
            return
        # Acknowledge every copy (our ack may have been lost), act on each seq once.
        self._send(peer, session, FrameType.CONTROL,
                   messages.encode("ack", message.seq, epoch=self.epoch), now)
        if not peer.control.first_time(message.epoch, message.seq):
            return
        if message.kind == "close_reason":
            peer.close_reason = message.body["reason"]
        elif message.kind == "hello":
            peer.remote_name = message.body["name"]
            peer.remote_version = message.body["version"]
            peer.gso = FEATURE_GSO in message.body.get("features", [])
            self._events.put((peer.name, "hello", f"{peer.remote_name} {peer.remote_version}"))
        elif message.kind == "switch_transport" and self.role is Role.VM:
            self._switch_on_request(peer, message.body["to"], now)
        elif self._on_control_message is not None:
            self._on_control_message(peer.name, message)

    def _switch_on_request(self, peer: Peer, name: str, now: float) -> None:
        names = [t.name for t in self.transports]
        if name not in names:
            log.warning("the host asked to switch to transport %r; this agent has only %s",
                        name, ", ".join(names))
            return
        path = names.index(name)
        peer.pinned = path != 0  # stay there: the probes would otherwise move us back
        if path != peer.path:
            self._switch_path(peer, path, "switched on the host's request", now)

    def switch_transport(self, peer_name: str, to: str) -> None:
        """Host side: ask the VM peer to move to transport `to` (thread-safe); it stays
        there until that transport fails, then falls back as usual."""
        if self.role is not Role.HOST:
            raise ValueError("only the host asks a peer to switch transports")
        if to not in {t.name for t in self.transports}:
            raise ValueError(f"this side does not listen on {to!r}: "
                             f"{', '.join(t.name for t in self.transports)}")
        self.send_control(peer_name, "switch_transport", to=to)

    def _flush_control(self, peer: Peer, now: float) -> None:
        session = peer.current
        if session is None:
            return
        for seq, (payload, sent_at, tries) in list(peer.control.unacked.items()):
            if now - sent_at < CONTROL_RETRY:
                continue
            if tries >= CONTROL_TRIES:
                peer.control.unacked.pop(seq, None)
                continue
            peer.control.unacked[seq] = (payload, now, tries + 1)
            self._send(peer, session, FrameType.CONTROL, payload, now)

    # --- sending helpers ---------------------------------------------------------------

    def _send(self, peer: Peer, session: Session, ftype: FrameType, payload: bytes, now: float
              ) -> None:
        frame = self._seal(session, ftype, payload, now)
        if frame is not None and peer.endpoint is not None:
            self.transports[peer.path].send(frame, peer.endpoint)

    def _seal(self, session: Session, ftype: FrameType, payload: bytes, now: float
              ) -> bytes | None:
        if now - session.created > self.timers.reject_after:
            return None
        try:
            return session.sealer.seal(ftype, payload)
        except Dropped:
            return None

    def _send_keepalive(self, peer: Peer, session: Session, now: float) -> None:
        self._send(peer, session, FrameType.KEEPALIVE, time.monotonic_ns().to_bytes(8, "big"),
                   now)
        peer.last_keepalive = now

    def _send_probe(self, peer: Peer, session: Session, path: int, now: float) -> None:
        """A keepalive over another path; its echo there proves the path works both ways."""
        payload = time.monotonic_ns().to_bytes(8, "big") + PROBE_FLAG
        frame = self._seal(session, FrameType.KEEPALIVE, payload, now)
        if frame is not None and peer.endpoint is not None:
            self.transports[path].send(frame, peer.endpoint)

    def disconnect(self, peer_name: str, reason: str) -> bool:
        """End a peer's session now (thread-safe). The peer is told why and, if it is the VM
        side, connects again at once with a fresh handshake. False: it had no session."""
        peer = self._peer(peer_name)
        if peer.current is None:
            return False
        self._send_close(peer, reason)
        with self._lock:
            for session in (peer.current, peer.previous, peer.pending_response):
                if session is not None:
                    self._forget(session)
            peer.current = peer.previous = peer.pending_response = None
        self._set_state(peer, "down" if self.role is Role.HOST else "connecting", reason)
        return True

    def _send_close(self, peer: Peer, reason: str) -> None:
        """Best effort and unacknowledged: we are going, there is nobody left to retry."""
        session = peer.current
        if session is not None:
            now = time.monotonic()
            with self._lock:
                seq = peer.control.next_seq
                peer.control.next_seq += 1
            self._send(peer, session, FrameType.CONTROL,
                       messages.encode("close_reason", seq, epoch=self.epoch,
                                       reason=reason[:200]), now)
            self._send(peer, session, FrameType.CLOSE, b"", now)

    # --- timers ------------------------------------------------------------------------

    def _timer_loop(self) -> None:
        while not self._stop.wait(0.05):
            now = time.monotonic()
            for peer in self.peers:
                if self.role is Role.VM:
                    self._tick_initiator(peer, now)
                else:
                    self._tick_responder(peer, now)
                self._flush_control(peer, now)
                self._retire_previous(peer, now)
            self._update_offload()
            if now >= self._next_drop_report:
                self._next_drop_report = now + DROP_REPORT_EVERY
                self._report_drops()
            self._drain_events()

    def _update_offload(self) -> None:
        """Super-packets from the interface only while every connected peer takes them: a
        peer that does not would have them dropped."""
        connected = [peer for peer in self.peers if peer.current is not None]
        wanted = bool(connected) and all(peer.gso for peer in connected)
        self.interface.set_offload(wanted and self.interface.vnet)

    def _tick_initiator(self, peer: Peer, now: float) -> None:
        session = peer.current
        # Keepalive echoes, not just any frame: the host may still reach us while nothing of
        # ours reaches it (a one-way block), and then we must move.
        if session is not None and now - peer.last_echo > self.timers.dead_after:
            with self._lock:
                self._forget(session)
                peer.current = None
                peer.backoff = 0.0
                peer.next_attempt = 0.0
            reason = f"no answer from the host for {self.timers.dead_after:g} s"
            peer.pinned = False  # the requested path failed: fall back as usual
            self._set_state(peer, "connecting", reason)
            if len(self.transports) > 1:
                self._switch_path(peer, (peer.path + 1) % len(self.transports),
                                  f"keepalives stopped coming back over "
                                  f"{self._path_name(peer.path)}", now)
            session = None
        if session is None:
            if len(self.transports) > 1 and now - peer.path_since >= FALLBACK_AFTER:
                self._switch_path(peer, (peer.path + 1) % len(self.transports),
                                  f"no authenticated answer over {self._path_name(peer.path)} "
                                  f"within {FALLBACK_AFTER:g} s", now)
            if now >= peer.next_attempt:
                self._initiate(peer, now)
            return
        if peer.path != 0 and not peer.pinned and now >= peer.next_probe:
            peer.next_probe = now + PROBE_EVERY
            self._send_probe(peer, session, 0, now)
        age = now - session.created
        wants_rekey = age > self.timers.rekey_after or session.sealer.sent > 1 << 60
        if wants_rekey and (peer.pending_init is None or now >= peer.next_attempt):
            self._initiate(peer, now)
        # Keepalives go out even under load: the host's echo is how we know it is alive.
        if now - peer.last_keepalive >= self.timers.keepalive:
            self._send_keepalive(peer, session, now)

    def _tick_responder(self, peer: Peer, now: float) -> None:
        if (
            peer.state == "up"
            and peer.current is not None
            and now - peer.last_received > self.timers.dead_after
        ):
            self._set_state(peer, "down",
                            f"no frame from {peer.name} for {self.timers.dead_after:g} s")

    def _retire_previous(self, peer: Peer, now: float) -> None:
        previous, current = peer.previous, peer.current
        if previous is not None and current is not None and \
                now - current.created > PREVIOUS_SESSION_GRACE:
            with self._lock:
                self._forget(previous)
                peer.previous = None

    def _path_name(self, path: int) -> str:
        return self.transports[path].name

    def _switch_path(self, peer: Peer, path: int, reason: str, now: float) -> None:
        """VM side: send over another transport from now on (the host follows by roaming)."""
        before = self._path_name(peer.path)
        with self._lock:
            peer.path = path
            peer.path_since = now
            peer.next_attempt = 0.0  # handshake (if one is due) at once on the new path
            peer.backoff = 0.0
            peer.next_probe = now + PROBE_EVERY
            peer.switches.append({"at": round(time.time(), 3), "from": before,
                                  "to": self._path_name(path), "reason": reason})
            del peer.switches[:-MAX_SWITCHES_KEPT]
            peer.switch_count += 1
        session = peer.current
        if session is not None:
            # Tell the host at once, so its replies move to the new path too.
            self._send_keepalive(peer, session, now)
        self._events.put((peer.name, "transport", f"{before} -> {self._path_name(path)}: "
                                                  f"{reason}"))

    def _report_drops(self) -> None:
        """One log line per interval with what was dropped since the last one, and why."""
        total = self.total_drops()
        fresh = total - self._reported_drops
        self._reported_drops = total
        for reason, count in sorted(fresh.items()):
            hint = DROP_HINTS.get(Drop(reason))
            log.warning("dropped %d frames/packets (%s) in the last %g s%s", count, reason,
                        DROP_REPORT_EVERY, f": {hint}" if hint else "")

    def total_drops(self) -> Counter[str]:
        total = Counter(self.drops_in)
        total.update(self.drops_out)
        for peer in self.peers:
            total.update(peer.counters.drops_in)
            total.update(peer.counters.drops_out)
        return total

    def _set_state(self, peer: Peer, state: str, reason: str) -> None:
        if peer.state == state:
            return
        peer.state = state
        peer.state_reason = reason
        self._events.put((peer.name, state, reason))

    def _drain_events(self) -> None:
        while True:
            try:
                peer, state, reason = self._events.get_nowait()
            except queue.Empty:
                return
            log.info("peer %s: %s (%s)", peer, state, reason)
            self._event_id += 1
            self.recent_events.append({"id": self._event_id, "at": round(time.time(), 3),
                                       "peer": peer, "state": state, "reason": reason})
            if self._on_event is not None:
                try:
                    self._on_event(peer, state, reason)
                except Exception:
                    log.exception("event handler failed for peer %s", peer)

    # --- status ------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        drops = Counter(self.drops_in)
        drops.update(self.drops_out)
        return {
            "role": self.role.value,
            "name": self.name,
            "version": self.version,
            "interface": self.interface.name,
            "transport": "+".join(t.name for t in self.transports),
            "transports": [
                {"name": t.name, "local_endpoint": list(t.local_endpoint), "stats": t.stats()}
                for t in self.transports
            ],
            "local_endpoint": list(self.transports[0].local_endpoint),
            "offload": {"available": self.interface.vnet,
                        "on": bool(getattr(self.interface, "offload", False))},
            "uptime": round(now - self.started, 3),
            "drops": dict(drops),
            "peers": [self._peer_snapshot(p, now) for p in self.peers],
            "events": list(self.recent_events),
        }

    def _peer_snapshot(self, peer: Peer, now: float) -> dict[str, Any]:
        c = peer.counters
        age = peer.handshake_age(now)
        return {
            "name": peer.name,
            "state": peer.state,
            "reason": peer.state_reason,
            "endpoint": list(peer.endpoint) if peer.endpoint else None,
            "handshake_age": None if age is None else round(age, 3),
            "last_seen_age": round(now - peer.last_received, 3) if peer.last_received else None,
            "handshakes": peer.handshakes,
            "rtt_ms": None if peer.rtt is None else round(peer.rtt * 1000, 3),
            "handshake_ms": None if peer.handshake_ms is None else round(peer.handshake_ms, 3),
            "gso": peer.gso,
            "rx_super": c.rx_super,
            "tx_super": c.tx_super,
            "transport": self._path_name(peer.path),
            "pinned": peer.pinned,
            "switches": list(peer.switches),
            "switch_count": peer.switch_count,
            "remote_name": peer.remote_name,
            "remote_version": peer.remote_version,
            "rx_packets": c.rx_packets,
            "rx_bytes": c.rx_bytes,
            "tx_packets": c.tx_packets,
            "tx_bytes": c.tx_bytes,
            "drops": c.drops(),
        }
