"""Accessors in legacy mode: docker-connector's token login on the expose port, and what may
pass between an accessor and the VM side afterwards.

A token is only a name sent in clear text: whoever sends it, from any address, is that
accessor (docs/legacy.md). What ctun adds to docker-connector's behaviour: an accessor may
send only from its own address and only to exposed routes, and receives only from exposed
routes; every answer to a login or to a stranger (0x02) is rate-limited per source address,
and 0x02 overall too, so the port cannot be used to reflect a flood at someone else.

Used by the packet pump alone (no lock): configure() and kick(), which any thread may call,
replace one attribute or add to a set; sessions they end go at their next packet.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from ..contracts import Endpoint
from ..protocol import Dropped, Prefixes, check_inner
from ..relay import echo_reply
from . import wire

# Per source address: a burst of replies, then one a second. Legitimate accessors log in
# once and hear 0x02 only after the host restarted: they never meet the limit.
REPLY_BURST = 3.0
REPLY_REFILL = 1.0
MAX_SOURCES = 4096  # addresses remembered (the least recently seen go first)
REPLIES_PER_SECOND = 100.0  # all strangers together: a spoofed flood reflects at most this


class ReplyBudget:
    """Token buckets: one per source address, one for everybody."""

    def __init__(self, burst: float = REPLY_BURST, refill: float = REPLY_REFILL,
                 overall: float = REPLIES_PER_SECOND, max_sources: int = MAX_SOURCES) -> None:
        self._burst, self._refill, self._max = burst, refill, max_sources
        self._overall_rate = overall
        self._overall = (overall, 0.0)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, source: str, now: float, overall: bool = True) -> bool:
        """May we answer `source` now? Spends a token of its bucket and, with `overall`, of
        everybody's (answers to strangers; a good login is answered on its own budget)."""
        tokens, when = self._buckets.get(source, (self._burst, now))
        tokens = min(self._burst, tokens + (now - when) * self._refill)
        everyone, since = self._overall
        everyone = min(self._overall_rate, everyone + (now - since) * self._overall_rate)
        allowed = tokens >= 1.0 and (everyone >= 1.0 or not overall)
        if allowed:
            tokens -= 1.0
            everyone -= 1.0 if overall else 0.0
        self._buckets[source] = (tokens, now)
        self._buckets.move_to_end(source)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        self._overall = (everyone, now)
        return allowed


@dataclass(frozen=True)
class Policy:
    tokens: dict[bytes, IPv4Address]  # token -> the accessor's address
    routes: tuple[IPv4Network, ...]  # exposed routes
    pong: bool
    network: IPv4Network  # the tunnel network (the accessors' prefix)
    host_address: IPv4Address
    mtu: int

    @property
    def exposed(self) -> Prefixes:
        return Prefixes(self.routes)


@dataclass
class Session:
    token: bytes
    address: IPv4Address
    endpoint: Endpoint
    allowed: Prefixes  # its own address only
    since: float
    last_seen: float
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    drops: Counter[str] = field(default_factory=Counter)


REPLY, TO_VM, DROP = "reply", "to_vm", "drop"


@dataclass(frozen=True)
class Outcome:
    action: str  # REPLY: send `data` back to the source; TO_VM: relay `data`; DROP
    data: bytes = b""


_DROP = Outcome(DROP)


class ExposeDesk:
    def __init__(self, policy: Policy, budget: ReplyBudget | None = None) -> None:
        self._policy = policy
        self._exposed = policy.exposed
        self._budget = budget or ReplyBudget()
        self._by_endpoint: dict[Endpoint, Session] = {}
        self._by_address: dict[int, Session] = {}
        self.drops: Counter[str] = Counter()  # from sources with no session
        self._addresses = _addresses(policy)
        self._kicked: set[bytes] = set()
        self.logins = 0
        # For the timer thread's log (the pump never logs); deque: appends are thread-safe.
        self.events: deque[str] = deque(maxlen=100)

    # -- configuration (any thread) ------------------------------------------------------------

    def configure(self, policy: Policy) -> None:
        self._policy, self._exposed = policy, policy.exposed
        self._addresses = _addresses(policy)

    def kick(self, token: bytes) -> bool:
        """End the session of `token` (an administrator's request); False if it had none."""
        if not any(s.token == token for s in self.sessions()):
            return False
        self._kicked.add(token)
        return True

    @property
    def policy(self) -> Policy:
        return self._policy

    # -- from the expose port (the pump) ---------------------------------------------------

    def on_datagram(self, datagram: bytes, source: Endpoint, now: float) -> Outcome:
        """What to do with a datagram an accessor (or anyone) sent to the expose port."""
        token = wire.login_token(datagram)
        if token is not None:
            return self._login(token, source, now)
        session = self._current(self._by_endpoint.get(source))
        if session is None:
            self.drops["not_logged_in"] += 1
            return self._refuse(source, now)
        session.last_seen = now
        try:
            check_inner(datagram, session.allowed, self._policy.mtu)
        except Dropped as dropped:
            session.drops[dropped.reason.value] += 1
            return _DROP
        session.rx_packets += 1
        session.rx_bytes += len(datagram)
        destination = int.from_bytes(datagram[16:20], "big")
        if destination == int(self._policy.host_address):
            reply = echo_reply(datagram) if self._policy.pong else None
            if reply is None:
                session.drops["to_host"] += 1  # the host's own interface is not shared
                return _DROP
            session.tx_packets += 1
            session.tx_bytes += len(reply)
            return Outcome(REPLY, reply)
        if destination not in self._exposed:
            session.drops["not_exposed"] += 1
            return _DROP
        return Outcome(TO_VM, datagram)

    def _login(self, token: bytes, source: Endpoint, now: float) -> Outcome:
        address = self._policy.tokens.get(token)
        if address is None:
            self.drops["bad_login"] += 1
            return self._refuse(source, now)
        if not self._budget.take(source[0], now, overall=False):
            self.drops["rate_limited"] += 1
            return _DROP
        self._kicked.discard(token)  # a kick ends the session it found, not the next one
        self._end(self._by_endpoint.get(source))
        self._end(self._by_address.get(int(address)))
        session = Session(token, address, source, Prefixes([IPv4Network(address)]), now, now)
        self._by_endpoint[source] = session
        self._by_address[int(address)] = session
        self.logins += 1
        self.events.append(f"accessor {_show(token)} logged in from {source[0]}:{source[1]} "
                           f"as {address}")
        policy = self._policy
        reply, _left_out = wire.encode_access(wire.AccessConfig(
            IPv4Interface(f"{address}/{policy.network.prefixlen}"), policy.host_address,
            policy.mtu, policy.routes))
        return Outcome(REPLY, reply)

    def _refuse(self, source: Endpoint, now: float) -> Outcome:
        if not self._budget.take(source[0], now):
            self.drops["rate_limited"] += 1
            return _DROP
        return Outcome(REPLY, wire.NOT_LOGGED_IN)

    # -- from the VM side (the pump) -------------------------------------------------------

    def is_accessor(self, address: int) -> bool:
        return address in self._addresses

    def to_accessor(self, packet: bytes) -> tuple[Session | None, str]:
        """The session a VM packet (already checked) goes to, or None and why not."""
        session = self._current(self._by_address.get(int.from_bytes(packet[16:20], "big")))
        if session is None:
            return None, "no_session"
        if int.from_bytes(packet[12:16], "big") not in self._exposed:
            session.drops["not_exposed"] += 1
            return None, "not_exposed"
        session.tx_packets += 1
        session.tx_bytes += len(packet)
        return session, ""

    # -- sessions ------------------------------------------------------------------------------

    def _current(self, session: Session | None) -> Session | None:
        """The session if its token still stands for its address (a reload may revoke it)."""
        if session is None:
            return None
        if session.token in self._kicked:
            self._kicked.discard(session.token)
            self.events.append(f"accessor {_show(session.token)}: session ended on request")
        elif self._policy.tokens.get(session.token) != session.address:
            self.events.append(f"accessor {_show(session.token)} revoked; session ended")
        else:
            return session
        self._end(session)
        return None

    def _end(self, session: Session | None) -> None:
        if session is None:
            return
        if self._by_endpoint.get(session.endpoint) is session:
            del self._by_endpoint[session.endpoint]
        if self._by_address.get(int(session.address)) is session:
            del self._by_address[int(session.address)]

    def sessions(self) -> list[Session]:
        # list() of a dict's values is one step under the GIL: safe beside the pump.
        return list(self._by_endpoint.values())

    def take_events(self) -> list[str]:
        events = []
        while self.events:
            events.append(self.events.popleft())
        return events


def _addresses(policy: Policy) -> frozenset[int]:
    return frozenset(int(a) for a in policy.tokens.values())


def _show(token: bytes) -> str:
    return token.decode("ascii", errors="replace")[:32]
