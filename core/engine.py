"""The tunnel engine: sessions, packet pumps, keepalive, dead-peer detection, reconnect.

Two threads. The packet pump waits on the interface and every transport at once: it reads
IP packets from the interface, seals them and sends them in batches, and it receives frames,
checks them in the protocol's fixed order and writes what survives to the interface. The
timer thread runs handshakes, keepalives, control retransmits, offload switching and the
event queue. Logging and plugin hooks only ever run on the timer thread, so nothing slow sits
on the packet path.

On the host, LAN machines logged in with `ctun access` (accessor peers) never reach the host's
interface: the pump relays their packets to the VM peer when they go to an exposed route, and
the VM's answers straight back (see _relay). Peers and listeners come and go at runtime; every
change to what the pump looks up is made on the pump thread itself (_on_pump), between two
frames, so a revoked peer's very next frame is already unknown.
"""

from __future__ import annotations

import collections
import contextlib
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
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from . import gso, messages, relay
from .contracts import Endpoint, Transport, VirtualInterface
from .login_limit import FailedLogins
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
from .threads import start_guarded

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
PUMP_TASK_TIMEOUT = 10.0  # a change waiting for the pump thread; it answers within a batch

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
    Drop.NOT_EXPOSED: "an accessor sent to (or the VM answered it from) an address outside "
                      "the exposed routes",
    Drop.LOGIN_RATE_LIMITED: "many failed handshakes from one address (a wrong key, or "
                             "someone guessing): its handshakes are ignored for a while",
    Drop.WRONG_LISTENER: "an accessor at the VM's listener or the VM at the expose listener: "
                         "each logs in only at its own",
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
    # Host side: a LAN machine (`ctun access`). Its allowed sources and routes are its one
    # address (a /32), and it reaches only the exposed routes, relayed to the VM peer.
    accessor: bool = False


@dataclass(frozen=True)
class _Expose:
    """What accessors may reach; swapped whole, so the pump sees one policy or the next."""

    routes: Prefixes
    networks: tuple[IPv4Network, ...]
    host_address: int  # the host's tunnel address, answered by the engine when pong is on
    pong: bool


_NOTHING_EXPOSED = _Expose(Prefixes(), (), -1, False)


class _Removed(Transport):
    """What a removed transport's slot holds: paths are indices, and a reused index would
    send a peer's frames over the wrong transport."""

    name = "removed"

    @classmethod
    def listen(cls, bind: Endpoint) -> Transport:
        raise NotImplementedError

    @classmethod
    def connect(cls, remote: Endpoint) -> Transport:
        raise NotImplementedError

    @property
    def local_endpoint(self) -> Endpoint:
        return ("0.0.0.0", 0)

    def fileno(self) -> int:
        return -1

    def receive(self, limit: int = 64) -> list[tuple[bytes, Endpoint]]:
        return []

    def send(self, frame: bytes, to: Endpoint) -> None:
        return None

    def close(self) -> None:
        return None


PumpAction = Callable[[selectors.BaseSelector | None], Any]


class _PumpTask:
    """A change the pump thread makes between two frames; the caller waits for it."""

    def __init__(self, action: PumpAction) -> None:
        self.action = action
        self.done = threading.Event()
        self.result: Any = None
        self.error: Exception | None = None

    def run(self, selector: selectors.BaseSelector | None) -> None:
        try:
            self.result = self.action(selector)
        except Exception as exc:  # handed to the waiting caller, raised there
            self.error = exc
        finally:
            self.done.set()


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
        # Replaced whole, never changed in place (a removed one leaves a _Removed): the
        # pump and the timer read it without a lock, and a peer's path stays its index.
        self.transports = list(transports)
        self.mtu = mtu
        self.timers = timers
        self.name = name
        self.version = version
        self._offload = offload
        # The peer tables, rebuilt whole by _index_peers on every change (see _on_pump).
        self.peers: list[Peer] = []
        self._by_key_id: dict[bytes, Peer] = {}
        self._accessors: dict[int, Peer] = {}  # accessor address -> accessor
        self._plain: list[Peer] = []  # everyone else: where accessors' packets may go
        self._relaying = False  # any accessor at all: the only cost of this on the fast path
        # Paths of the expose listeners. Once there are any, accessors are heard only there
        # and every other peer only elsewhere: a LAN machine with an accessor key does not get
        # in through the VM's listener, nor anything through the port facing the LAN unless
        # it is an accessor's.
        self._accessor_paths: frozenset[int] = frozenset()
        self._expose = _NOTHING_EXPOSED
        new = [self._make_peer(spec) for spec in peers]
        if role is Role.VM and (remote is None or len(new) != 1):
            raise ValueError("the VM side talks to exactly one host at a known address")
        for peer in new:
            self._check_new_peer(peer, [p for p in new if p is not peer])
        if role is Role.VM:
            new[0].endpoint = remote
        self._index_peers(new)
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
        self._failed_logins = FailedLogins()
        self.logins_failed = 0  # handshakes refused for their key id, MAC or age
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
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self._threads: list[threading.Thread] = []
        self._pump_lock = threading.Lock()  # whether the pump runs, and its queue of changes
        self._pump_tasks: collections.deque[_PumpTask] = collections.deque()
        self._pump_thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None  # set while the pump runs

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
            self._threads.append(start_guarded(target, name, self._crashed))

    def _crashed(self) -> None:
        self._stop.set()
        self._wake()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self, reason: str = "shutting down") -> None:
        """Tell the peers we are going (so they reconnect at once), then stop the threads."""
        if not self._stop.is_set():
            for peer in self.peers:
                self._send_close(peer, reason)
        self._stop.set()
        self._wake()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        self._drain_events()
        self._wake_r.close()
        self._wake_w.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout)

    def _wake(self) -> None:
        # Full: the pump has a wake-up pending anyway. Closed: it has stopped.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _on_pump(self, action: PumpAction) -> Any:
        """Run `action` on the pump thread, between two frames, and return what it returns
        (thread-safe). The pump's lookups then never change under a frame it is checking.
        Before start() and after the pump stopped, `action` runs here with no selector."""
        task = _PumpTask(action)
        with self._pump_lock:
            if self._selector is None or threading.current_thread() is self._pump_thread:
                task.run(self._selector)
            else:
                self._pump_tasks.append(task)
                self._wake()
        if not task.done.wait(PUMP_TASK_TIMEOUT):
            raise TimeoutError("the engine's packet pump did not take the change")
        if task.error is not None:
            raise task.error
        return task.result

    def _run_pump_tasks(self, selector: selectors.BaseSelector | None) -> None:
        while True:
            try:
                task = self._pump_tasks.popleft()
            except IndexError:
                return
            task.run(selector)

    # --- the packet pump --------------------------------------------------------------

    def _pump(self) -> None:
        """One thread for both directions. Two pumps in one process would hand the GIL to
        each other on every packet; one loop that drains whatever is ready (in bounded
        batches, so neither direction starves the other) pays for one wake-up per burst."""
        # selectors, not poll(): the same code waits with epoll, kqueue or (Windows) select.
        selector = selectors.DefaultSelector()
        with self._pump_lock:
            selector.register(self.interface.fileno(), selectors.EVENT_READ, _INTERFACE)
            for path, transport in enumerate(self.transports):
                if not isinstance(transport, _Removed):
                    selector.register(transport.fileno(), selectors.EVENT_READ, path)
            selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
            self._pump_thread, self._selector = threading.current_thread(), selector
        try:
            while not self._stop.is_set():
                for key, _events in selector.select(1.0):
                    source = key.data
                    if source is _INTERFACE:
                        self._from_interface()
                    elif source is _WAKE:
                        self._woken(selector)
                    else:
                        self._from_network(source)
        finally:
            with self._pump_lock:
                self._selector = None
                # Whatever was queued runs now, as it would before start(): nobody waits
                # for a pump that has gone.
                self._run_pump_tasks(None)
            selector.close()

    def _woken(self, selector: selectors.BaseSelector) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: nothing more to read
            while self._wake_r.recv(4096):
                pass
        self._run_pump_tasks(selector)

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
        if self._relaying:
            # An accessor's /32 is the most specific route there is: one lookup, so that
            # many accessors cost the VM's traffic nothing.
            accessor = self._accessors.get(destination)
            if accessor is not None:
                return accessor
        return self._plain_peer_for(destination)  # without accessors, that is every peer

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
        if self._accessor_paths and (path in self._accessor_paths) != peer.accessor:
            raise Dropped(Drop.WRONG_LISTENER)  # and never roams its endpoint there
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
            if self._relaying and self._relay(peer, payload, ftype, now):
                return
            self.interface.write_packet(payload)
            peer.counters.rx_packets += 1
            peer.counters.rx_bytes += len(payload)
        elif ftype is FrameType.DATA_GSO:
            if self._relaying and self._relay(peer, payload, ftype, now):
                return
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

    # --- relaying between accessors and the VM (host side) -------------------------------

    def _relay(self, peer: Peer, payload: bytes, ftype: FrameType, now: float) -> bool:
        """Host with accessors, for a checked packet: True when it was dealt with here
        (relayed, or refused by raising Dropped), False when it goes to the interface.

        An accessor's packet never reaches the interface: to an exposed route it goes to the
        peer owning that route, a ping of the host's tunnel address is answered here (pong),
        anything else is `not_exposed`. Another peer's packet for an accessor goes to it
        only from inside an exposed route."""
        offset = gso.HEADER_LEN if ftype is FrameType.DATA_GSO else 0
        destination = int.from_bytes(payload[offset + 16:offset + 20], "big")
        expose = self._expose
        if peer.accessor:
            if destination == expose.host_address:
                # Checked before the routes: through the VM, it would come back to the host.
                reply = relay.echo_reply(payload) if expose.pong and not offset else None
                if reply is None:
                    raise Dropped(Drop.NOT_EXPOSED)
                target, packet, ftype = peer, reply, FrameType.DATA
            elif destination in expose.routes:
                found = self._plain_peer_for(destination)
                if found is None:
                    raise Dropped(Drop.NO_PEER)
                target, packet = found, payload
            else:
                raise Dropped(Drop.NOT_EXPOSED)
        else:
            accessor = self._accessors.get(destination)
            if accessor is None:
                return False
            if int.from_bytes(payload[offset + 12:offset + 16], "big") not in expose.routes:
                raise Dropped(Drop.NOT_EXPOSED)
            target, packet = accessor, payload
        counters = peer.counters
        counters.rx_packets += 1
        counters.rx_bytes += len(payload) - offset
        if offset:
            counters.rx_super += 1
        self._forward(target, packet, ftype, now)
        return True

    def _plain_peer_for(self, destination: int) -> Peer | None:
        best, best_len = None, -1
        for peer in self._plain:
            length = peer.routes.longest_match(destination)
            if length > best_len:
                best, best_len = peer, length
        return best

    def _forward(self, target: Peer, packet: bytes, ftype: FrameType, now: float) -> None:
        """Seal a relayed packet for `target`; its drops count as the target's, like those
        of packets from the interface."""
        counters = target.counters
        session, endpoint = target.current, target.endpoint
        if session is None or endpoint is None or \
                now - session.created > self.timers.reject_after:
            counters.drops_out[Drop.NO_SESSION] += 1
            return
        packets = [packet]
        offset = 0
        if ftype is FrameType.DATA_GSO:
            if target.gso:
                offset = gso.HEADER_LEN
                counters.tx_super += 1
            else:
                # It never offered to take super-packets: cut here what its kernel would
                # have cut (rare: only when one end runs without offloads).
                packets, ftype = relay.plain_packets(packet), FrameType.DATA
        transport = self.transports[target.path]
        frames = []
        for item in packets:
            try:
                frame = session.sealer.seal(ftype, item)
            except Dropped as dropped:
                counters.drops_out[dropped.reason] += 1
                continue
            if len(frame) > transport.max_frame:
                counters.drops_out[Drop.OVERSIZE] += 1
                continue
            frames.append(frame)
            counters.tx_packets += 1
            counters.tx_bytes += len(item) - offset
        if len(frames) == 1:
            transport.send(frames[0], endpoint)
        elif frames:
            transport.send_many(frames, endpoint)

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
        address = source[0]
        # An address that keeps failing is ignored before anything costs: by address, so
        # a peer logging in from its own address never pays for someone else's guesses.
        if not self._failed_logins.allowed(address, now):
            raise Dropped(Drop.LOGIN_RATE_LIMITED)
        peer = self._by_key_id.get(message.key_id)
        if peer is None:
            self._login_failed(address, now)
            raise Dropped(Drop.UNKNOWN_PEER)
        try:
            verify_init(message, peer.psk)
            check_init_freshness(
                message,
                peer.last_init_timestamp,
                time.time_ns(),
                int(self.timers.handshake_skew * 1e9),
            )
        except Dropped as dropped:
            peer.counters.drops_in[dropped.reason] += 1
            self._login_failed(address, now)
            return
        if now - peer.last_init_accepted < 1 / INITS_PER_SECOND:
            peer.counters.drops_in[Drop.RATE_LIMITED] += 1  # the right key, just too often
            return
        if self._accessor_paths and (path in self._accessor_paths) != peer.accessor:
            peer.counters.drops_in[Drop.WRONG_LISTENER] += 1
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

    def _login_failed(self, address: str, now: float) -> None:
        self.logins_failed += 1
        self._failed_logins.failed(address, now)

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

    def send_control(self, peer_name: str, kind: str, /, **body: Any) -> None:
        """Queue a control message; it is retransmitted until acknowledged (thread-safe)."""
        self._queue_control(self._peer(peer_name), kind, **body)

    def set_peer_networks(self, peer_name: str, allowed_sources: Iterable[IPv4Network],
                          routes: Iterable[IPv4Network]) -> None:
        """Change what a peer may send from and what is sent to it, without a restart."""
        peer = self._peer(peer_name)
        if peer.accessor:
            raise ValueError(f"{peer_name!r} is an accessor: its address is fixed; remove it "
                             "and add it again with the new one")
        # Each is one attribute store: the pumps see the old set or the new one, never a mix.
        peer.allowed_sources = Prefixes(allowed_sources)
        peer.routes = Prefixes(routes)

    def _peer(self, name: str) -> Peer:
        for peer in self.peers:
            if peer.name == name:
                return peer
        raise KeyError(f"no peer named {name!r}")

    # --- peers, listeners and the expose policy at runtime (host side) ------------------

    def _make_peer(self, spec: PeerSpec) -> Peer:
        peer = Peer(spec.name, spec.psk, Prefixes(spec.allowed_sources), Prefixes(spec.routes))
        if spec.accessor:
            if self.role is not Role.HOST:
                raise ValueError(f"{spec.name!r}: accessors log in to the host side only")
            networks = {*spec.allowed_sources, *spec.routes}
            if len(networks) != 1 or next(iter(networks)).prefixlen != 32:
                raise ValueError(f"{spec.name!r}: an accessor sends from and is sent exactly "
                                 f"its one address (a /32), not {sorted(map(str, networks))}")
            peer.accessor = True
            peer.ip = int(next(iter(networks)).network_address)
        if self.role is Role.HOST:
            peer.state = "waiting"  # for its first handshake
        return peer

    def _check_new_peer(self, peer: Peer, others: Iterable[Peer]) -> None:
        for other in others:
            if other.name == peer.name:
                raise ValueError(f"there is a peer named {peer.name!r} already")
            if other.key_id == peer.key_id:
                raise ValueError(f"{peer.name!r} has the same key as peer {other.name!r}")
            if peer.accessor and other.accessor and other.ip == peer.ip:
                raise ValueError(f"{peer.name!r}: accessor {other.name!r} has the address "
                                 f"{IPv4Address(peer.ip)} already")

    def _index_peers(self, peers: list[Peer]) -> None:
        """Install a new peer list and every lookup made from it (each one store)."""
        self._by_key_id = {p.key_id: p for p in peers}
        self._accessors = {p.ip: p for p in peers if p.accessor}
        self._plain = [p for p in peers if not p.accessor]
        self.peers = peers
        self._relaying = self.role is Role.HOST and bool(self._accessors)

    def add_peer(self, spec: PeerSpec) -> None:
        """Host side, thread-safe: accept handshakes with `spec`'s key from now on. The peer
        starts "waiting". ValueError: the name, the key or an accessor's address is taken."""
        if self.role is not Role.HOST:
            raise ValueError("only the host side takes more peers")
        peer = self._make_peer(spec)
        peer.path_since = time.monotonic()

        def add(_selector: selectors.BaseSelector | None) -> None:
            with self._lock:
                self._check_new_peer(peer, self.peers)
                self._index_peers([*self.peers, peer])

        self._on_pump(add)
        self._events.put((peer.name, peer.state, "added"))

    def remove_peer(self, name: str, reason: str) -> bool:
        """Thread-safe: revoke a peer now. A connected one is told why (as by disconnect);
        all its sessions are forgotten at once, so its next frame is an `unknown_session`
        drop and its next handshake an `unknown_peer` one. True: it had a session.
        KeyError: no such peer."""
        if self.role is not Role.HOST:
            raise ValueError("the VM side's one peer is the host; stop the engine instead")
        peer = self._peer(name)
        connected = peer.current is not None
        self._send_close(peer, reason)

        def remove(_selector: selectors.BaseSelector | None) -> None:
            with self._lock:
                if peer not in self.peers:
                    raise KeyError(f"no peer named {name!r}")
                for index, (_session, owner) in list(self._sessions.items()):
                    if owner is peer:
                        del self._sessions[index]
                peer.current = peer.previous = peer.pending_response = None
                peer.endpoint = None
                peer.control.unacked.clear()
                self._index_peers([p for p in self.peers if p is not peer])

        self._on_pump(remove)
        peer.state, peer.state_reason = "removed", reason
        self._events.put((peer.name, "removed", reason))
        return connected

    def add_transport(self, transport: Transport, *, accessors: bool = False) -> None:
        """Host side, thread-safe: listen on one more transport from now on, with the same
        offload and datagram settings as the others. `accessors`: an expose listener, where
        only accessors log in (and accessors log in nowhere else)."""
        if self.role is not Role.HOST:
            raise ValueError("only the host side listens on more transports")
        transport.use_offloads(self._offload)
        transport.set_datagram_size(self.max_frame)

        def add(selector: selectors.BaseSelector | None) -> None:
            # Only ever changed here, on the pump thread (or before it runs).
            if any(t is transport for t in self.transports):
                raise ValueError(f"already listening on this {transport.name} transport")
            path = len(self.transports)
            if selector is not None:  # first: a transport it cannot wait on is not taken
                selector.register(transport.fileno(), selectors.EVENT_READ, path)
            self.transports = [*self.transports, transport]
            if accessors:
                self._accessor_paths = self._accessor_paths | {path}

        self._on_pump(add)

    def remove_transport(self, transport: Transport) -> None:
        """Host side, thread-safe: stop listening on `transport` and close it. Peers last
        heard over it lose their endpoint until they come back over another (they
        reconnect). ValueError: not one of ours, or the last one left."""
        if self.role is not Role.HOST:
            raise ValueError("only the host side removes transports")

        def remove(selector: selectors.BaseSelector | None) -> None:
            paths = [i for i, t in enumerate(self.transports) if t is transport]
            if not paths:
                raise ValueError(f"not listening on this {transport.name} transport")
            live = [t for t in self.transports if not isinstance(t, _Removed)]
            if len(live) == 1:
                raise ValueError("the engine needs at least one transport")
            path = paths[0]
            transports = list(self.transports)
            transports[path] = _Removed()
            self.transports = transports
            self._accessor_paths = self._accessor_paths - {path}
            with self._lock:
                for peer in self.peers:
                    if peer.path == path:
                        peer.endpoint = None
            if selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(transport.fileno())
            transport.close()

        self._on_pump(remove)

    def set_expose(self, routes: Iterable[IPv4Network], host_address: IPv4Address,
                   pong: bool) -> None:
        """Thread-safe: what accessors may reach (relayed to the VM), and whether the engine
        answers their pings of `host_address`, the host's tunnel address. Swapped whole."""
        networks = tuple(routes)
        self._expose = _Expose(Prefixes(networks), networks, int(host_address), pong)

    def _queue_control(self, peer: Peer, kind: str, /, **body: Any) -> None:
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
        restarted = peer.control.remote_epoch not in (-1, message.epoch)
        if not peer.control.first_time(message.epoch, message.seq):
            return
        if restarted and peer.state == "up" and peer.up_at < session.created:
            # It restarted within dead_after, so it never looked down and no "up" was
            # announced; its new run knows nothing of what we told the old one (routes...).
            peer.up_at = time.monotonic()
            self._events.put((peer.name, "up", "peer restarted"))
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
        if state == "up":
            peer.up_at = time.monotonic()
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
        live = [t for t in self.transports if not isinstance(t, _Removed)]
        expose = self._expose
        return {
            "role": self.role.value,
            "name": self.name,
            "version": self.version,
            "interface": self.interface.name,
            "transport": "+".join(t.name for t in live),
            "transports": [
                {"name": t.name, "local_endpoint": list(t.local_endpoint), "stats": t.stats()}
                for t in live
            ],
            "local_endpoint": list(live[0].local_endpoint),
            "offload": {"available": self.interface.vnet,
                        "on": bool(getattr(self.interface, "offload", False))},
            "uptime": round(now - self.started, 3),
            "drops": dict(drops),
            "peers": [self._peer_snapshot(p, now) for p in self.peers],
            "events": list(self.recent_events),
            "relay": {"exposed": [str(n) for n in expose.networks], "pong": expose.pong},
            "logins": {"failed": self.logins_failed,
                       "rate_limited": self.drops_in[Drop.LOGIN_RATE_LIMITED],
                       "addresses_limited": self._failed_logins.limited(now)},
        }

    def _peer_snapshot(self, peer: Peer, now: float) -> dict[str, Any]:
        c = peer.counters
        age = peer.handshake_age(now)
        return {
            "name": peer.name,
            "accessor": peer.accessor,
            "ip": str(IPv4Address(peer.ip)) if peer.accessor else None,
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
