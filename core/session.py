"""Per-peer state: sessions, counters and the reliable control channel's bookkeeping."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from .contracts import Endpoint
from .protocol import Opener, PendingInit, Prefixes, Sealer, SessionKeys, key_id


@dataclass
class Session:
    """One set of session keys; a peer has a current one and, briefly, the one before."""

    keys: SessionKeys
    created: float  # monotonic seconds
    initiator: bool
    sealer: Sealer = field(init=False)
    opener: Opener = field(init=False)
    confirmed: bool = False  # responder: the initiator has proved it holds the keys

    def __post_init__(self) -> None:
        self.sealer = Sealer(self.keys.send, self.keys.remote_index)
        self.opener = Opener(self.keys.receive)

    @property
    def local_index(self) -> int:
        return self.keys.local_index


@dataclass
class Counters:
    """Written by the packet pump only (no lock on the packet path); super-packets count as
    one packet each here and once more in *_super."""

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_super: int = 0
    tx_super: int = 0
    # Incoming frames and outgoing packets, counted apart for the status view.
    drops_in: collections.Counter[str] = field(default_factory=collections.Counter)
    drops_out: collections.Counter[str] = field(default_factory=collections.Counter)

    def drops(self) -> dict[str, int]:
        total = collections.Counter(self.drops_in)
        total.update(self.drops_out)
        return dict(total)


SEEN_WINDOW = 1024  # control messages further out of order than this are not acted on


@dataclass
class ControlState:
    """Per session: control messages are sequenced, acknowledged and acted on once."""

    next_seq: int = 1
    remote_epoch: int = -1
    highest_seen: int = 0
    seen: set[int] = field(default_factory=set)  # within SEEN_WINDOW below highest_seen
    # seq -> (payload, monotonic time last sent, times sent)
    unacked: dict[int, tuple[bytes, float, int]] = field(default_factory=dict)

    def first_time(self, epoch: int, seq: int) -> bool:
        """True the first time `seq` arrives, even out of order; False for any repeat."""
        if epoch != self.remote_epoch:  # the peer restarted: its numbering starts over
            self.remote_epoch, self.highest_seen, self.seen = epoch, 0, set()
        if seq <= self.highest_seen - SEEN_WINDOW or seq in self.seen:
            return False
        self.seen.add(seq)
        if seq > self.highest_seen:
            self.highest_seen = seq
            floor = seq - SEEN_WINDOW
            if len(self.seen) > 2 * SEEN_WINDOW:
                self.seen = {s for s in self.seen if s > floor}
        return True


@dataclass
class Peer:
    name: str
    psk: bytes
    allowed_sources: Prefixes  # inner source addresses this peer may send from
    routes: Prefixes  # destinations that are sent to this peer
    endpoint: Endpoint | None = None
    path: int = 0  # index of the transport frames to this peer go over
    path_since: float = 0.0  # VM side: when we started on this path
    next_probe: float = 0.0  # VM side: when to test the first path again
    switch_count: int = 0
    switches: list[dict[str, object]] = field(default_factory=list)
    current: Session | None = None
    previous: Session | None = None
    pending_response: Session | None = None  # responder, awaiting the first frame
    pending_init: PendingInit | None = None  # initiator, awaiting the response
    next_attempt: float = 0.0
    backoff: float = 0.0
    last_init_timestamp: int = 0  # responder: newest initiation accepted, for replay refusal
    last_init_accepted: float = 0.0
    last_received: float = 0.0
    last_keepalive: float = 0.0
    last_echo: float = 0.0  # VM side: the host's latest echo of our keepalive on our path
    handshakes: int = 0
    unanswered: int = 0  # initiator: handshakes sent since the last answer
    state: str = "connecting"
    state_reason: str = ""
    up_at: float = 0.0  # monotonic time of the last "up" announced (restart detection)
    rtt: float | None = None
    remote_name: str = ""
    remote_version: str = ""
    close_reason: str = ""
    gso: bool = False  # the peer said it takes offload super-packets (DATA_GSO frames)
    pinned: bool = False  # VM side: on this path by request; no probing back to the first
    init_sent: float = 0.0  # initiator: when the pending handshake went out
    handshake_ms: float | None = None  # initiator: how long the latest handshake took
    counters: Counters = field(default_factory=Counters)
    control: ControlState = field(default_factory=ControlState)
    key_id: bytes = b""
    # Host side: a LAN machine logged in with `ctun access`; `ip` is its one tunnel address
    # (its allowed sources and routes), and its packets are relayed, never written locally.
    accessor: bool = False
    ip: int = -1

    def __post_init__(self) -> None:
        self.key_id = key_id(self.psk)

    def handshake_age(self, now: float | None = None) -> float | None:
        if self.current is None:
            return None
        return (now if now is not None else time.monotonic()) - self.current.created
