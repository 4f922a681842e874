"""Control messages carried inside sealed CONTROL frames: JSON objects, schema-checked.

Control frames are sequenced and acknowledged by the engine; this module only says what a
well-formed message is. Anything else is dropped and counted, never acted on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from .protocol import Drop, Dropped

SCHEMA = 1
MAX_CONTROL = 1200  # fits one frame at the smallest MTU we allow, with room to spare

MAX_FEATURES = 16
KINDS = ("hello", "ack", "close_reason", "routes", "agent_status", "switch_transport",
         "access_config", "links", "hosts")
MAX_BRIDGES = 64  # subnet -> bridge entries an agent reports (more would not fit a frame)
ROUTES_PER_PART = 40  # 40 CIDRs of up to 18 characters stay well inside MAX_CONTROL
MAX_PARTS = 64
MAX_EPOCH = 1 << 53  # JSON numbers are exact up to here
MAX_LINKS = 16  # subnet pairs in one `links` message (pairs of 18-character CIDRs)
MAX_SUFFIXES, MAX_SUFFIX = 8, 40
HOSTS_PER_PART = 8  # with 8 suffixes and 64-character names a part stays inside MAX_CONTROL
MAX_NAME = 64  # a host name pushed to the agent's DNS responder


@dataclass(frozen=True)
class ControlMessage:
    kind: str
    seq: int
    body: dict[str, Any]
    epoch: int = 0  # the sender's run: a new epoch means its sequence numbers start over


def largest_size(kind: str, body: dict[str, Any]) -> int:
    """How long `body` is as a message of `kind` with the longest header it could get."""
    return len(json.dumps({"v": SCHEMA, "kind": kind, "seq": MAX_EPOCH - 1,
                           "epoch": MAX_EPOCH - 1, **body}, separators=(",", ":")).encode())


def encode(kind: str, seq: int, *, epoch: int = 0, **body: Any) -> bytes:
    header = {"v": SCHEMA, "kind": kind, "seq": seq}
    if epoch:
        header["epoch"] = epoch
    payload = json.dumps({**header, **body}, separators=(",", ":"))
    data = payload.encode()
    if len(data) > MAX_CONTROL:
        raise ValueError(f"control message {kind!r} is {len(data)} bytes, over {MAX_CONTROL}")
    return data


def _short_str(value: Any, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()


def _valid_body(kind: str, body: dict[str, Any]) -> bool:
    if kind == "hello":
        features = body.get("features", [])
        return (
            body.get("role") in ("host", "vm")
            and _short_str(body.get("name"), 64)
            and _short_str(body.get("version"), 32)
            # Optional: peers older than the list send none, and ignore ours.
            and isinstance(features, list) and len(features) <= MAX_FEATURES
            and all(_short_str(f, 32) for f in features)
        )
    if kind == "close_reason":
        return _short_str(body.get("reason"), 200)
    if kind == "routes":
        return _valid_routes(body)
    if kind == "switch_transport":
        return _short_str(body.get("to"), 32)
    if kind == "agent_status":
        return _valid_agent_status(body)
    if kind == "access_config":
        return _valid_access_config(body)
    if kind == "links":
        return _valid_links(body)
    if kind == "hosts":
        return _valid_hosts(body)
    return kind == "ack"


def _network_str(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > 18:
        return False
    try:
        IPv4Network(value)
    except ValueError:
        return False
    return True


def _address_str(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > 15:
        return False
    try:
        IPv4Address(value)
    except ValueError:
        return False
    return True


def _valid_access_config(body: dict[str, Any]) -> bool:
    """Host -> accessor after login: its address (with the tunnel's prefix), the host's
    tunnel address, the MTU and the exposed routes it may reach."""
    addr, peer, mtu, routes = (body.get("addr"), body.get("peer"), body.get("mtu"),
                               body.get("routes"))
    if not isinstance(addr, str) or len(addr) > 18:
        return False
    try:
        IPv4Interface(addr)
    except ValueError:
        return False
    if not _address_str(peer) or type(mtu) is not int or not 576 <= mtu <= 9000:
        return False
    return (isinstance(routes, list) and len(routes) <= ROUTES_PER_PART
            and all(_network_str(r) for r in routes))


def _valid_links(body: dict[str, Any]) -> bool:
    """Host -> agent: the full set of linked subnet pairs (`iptables A+B`)."""
    pairs = body.get("pairs")
    if not isinstance(pairs, list) or len(pairs) > MAX_LINKS:
        return False
    return all(isinstance(p, list) and len(p) == 2 and all(_network_str(n) for n in p)
               for p in pairs)


def _valid_hosts(body: dict[str, Any]) -> bool:
    """Host -> agent: a full-state snapshot `gen` of the names its DNS responder serves,
    split into `parts` like `routes`; `suffixes` say which queries it answers."""
    suffixes, entries = body.get("suffixes"), body.get("entries")
    if not _valid_parts(body):
        return False
    if not isinstance(suffixes, list) or len(suffixes) > MAX_SUFFIXES:
        return False
    if not all(_short_str(s, MAX_SUFFIX) for s in suffixes):
        return False
    if not isinstance(entries, list) or len(entries) > HOSTS_PER_PART:
        return False
    return all(isinstance(e, list) and len(e) == 2 and _short_str(e[0], MAX_NAME)
               and _address_str(e[1]) for e in entries)


def hosts_parts(entries: list[tuple[str, str]]) -> list[list[list[str]]]:
    """Split (name, address) entries into parts for `hosts` messages (at least one)."""
    rows = [[name, address] for name, address in entries]
    chunks = [rows[i:i + HOSTS_PER_PART] for i in range(0, len(rows), HOSTS_PER_PART)]
    return chunks or [[]]


def _valid_agent_status(body: dict[str, Any]) -> bool:
    """The VM side's view for the host's status: its firewall and which bridge serves what."""
    firewall, bridges = body.get("firewall"), body.get("bridges")
    if not isinstance(firewall, dict) or not isinstance(bridges, dict):
        return False
    backend, rules, error = firewall.get("backend"), firewall.get("rules"), firewall.get("error")
    if backend is not None and not _short_str(backend, 32):
        return False
    if type(rules) is not int or not 0 <= rules <= 10_000:
        return False
    if not isinstance(error, str) or len(error) > 300 or not error.isprintable():
        return False
    if len(bridges) > MAX_BRIDGES:
        return False
    total = body.get("bridges_total", len(bridges))
    if type(total) is not int or not len(bridges) <= total <= 10_000:
        return False
    for subnet, bridge in bridges.items():
        if not _short_str(bridge, 15):
            return False
        try:
            IPv4Network(subnet)
        except ValueError:
            return False
    return "dns" not in body or _valid_dns_report(body["dns"])


_DNS_COUNTS = ("names", "redirects", "answered", "nxdomain", "refused", "malformed")


def _valid_dns_report(dns: Any) -> bool:
    """The agent's DNS responder, as the host's status shows it (vm.dns.DnsService.report)."""
    if not isinstance(dns, dict) or set(dns) != {"listen", "error", "redirect_error",
                                                  *_DNS_COUNTS}:
        return False
    if dns["listen"] is not None and not _short_str(dns["listen"], 21):
        return False
    for key in ("error", "redirect_error"):
        text = dns[key]
        if not isinstance(text, str) or len(text) > 200 or not text.isprintable():
            return False
    return all(type(dns[k]) is int and 0 <= dns[k] < 2**63 for k in _DNS_COUNTS)


def _valid_routes(body: dict[str, Any]) -> bool:
    """A full-state snapshot `gen`, split into `parts`; each part lists IPv4 networks."""
    routes = body.get("routes")
    return (_valid_parts(body) and isinstance(routes, list) and len(routes) <= ROUTES_PER_PART
            and all(_network_str(r) for r in routes))


def _valid_parts(body: dict[str, Any]) -> bool:
    """Part `part` of `parts` of full-state snapshot `gen` (`routes` and `hosts`)."""
    gen, part, parts = body.get("gen"), body.get("part"), body.get("parts")
    if type(gen) is not int or type(part) is not int or type(parts) is not int:
        return False
    return 0 < gen < MAX_EPOCH and 0 < parts <= MAX_PARTS and 0 <= part < parts


class Snapshots:
    """Reassembles full-state snapshots the host sends in parts (`routes`, `hosts`): only a
    complete snapshot newer than the last one taken counts, a late retransmit of an older
    one is ignored, and a new epoch (the host restarted) numbers them from 1 again. Used by
    one thread (the network thread)."""

    def __init__(self) -> None:
        self._epoch: int | None = None
        self._generation = 0  # the newest complete snapshot taken
        self._parts_gen = 0  # the snapshot being assembled
        self._parts_count = 0
        self._parts: dict[int, dict[str, Any]] = {}

    def take(self, message: ControlMessage) -> list[dict[str, Any]] | None:
        """The bodies of the snapshot this part completes, in order; None until then."""
        body = message.body
        gen, part, parts = body["gen"], body["part"], body["parts"]
        if message.epoch != self._epoch:
            self._epoch, self._generation, self._parts_gen = message.epoch, 0, 0
        if gen <= self._generation or gen < self._parts_gen:
            return None  # older than what we have: a late retransmit
        if gen > self._parts_gen:
            self._parts_gen, self._parts_count, self._parts = gen, parts, {}
        if parts != self._parts_count:
            return None  # parts of one snapshot disagree: wait for a consistent one
        self._parts[part] = body
        if len(self._parts) < parts:
            return None
        ordered = [self._parts[i] for i in range(parts)]
        self._generation, self._parts = gen, {}
        return ordered


def route_parts(routes: list[str]) -> list[list[str]]:
    """Split a route list into parts for `routes` messages (at least one, maybe empty)."""
    chunks = [routes[i:i + ROUTES_PER_PART] for i in range(0, len(routes), ROUTES_PER_PART)]
    return chunks or [[]]


def parse(payload: bytes) -> ControlMessage:
    if len(payload) > MAX_CONTROL:
        raise Dropped(Drop.CONTROL_INVALID)
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Dropped(Drop.CONTROL_INVALID) from None
    if not isinstance(obj, dict) or type(obj.get("v")) is not int or obj["v"] != SCHEMA:
        raise Dropped(Drop.CONTROL_INVALID)
    kind, seq, epoch = obj.get("kind"), obj.get("seq"), obj.get("epoch", 0)
    if kind not in KINDS or type(seq) is not int or not 0 < seq < MAX_EPOCH:
        raise Dropped(Drop.CONTROL_INVALID)
    if type(epoch) is not int or not 0 <= epoch < MAX_EPOCH:
        raise Dropped(Drop.CONTROL_INVALID)
    body = {k: v for k, v in obj.items() if k not in ("v", "kind", "seq", "epoch")}
    if not _valid_body(kind, body):
        raise Dropped(Drop.CONTROL_INVALID)
    return ControlMessage(kind, seq, body, epoch)
