"""The agent's DNS responder: real UDP sockets on loopback, queries built byte by byte.

Silence is checked without sleeping: the responder answers datagrams one at a time, in order,
so when a valid query sent after some garbage gets the first reply, the garbage got none.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, cast

import pytest
from ctun.core import messages
from ctun.core.config import HostConfig, HostsSource, PeerConfig, Timers, TunnelConfig
from ctun.core.host_context import HostContext
from ctun.core.hosts_push import setup as hosts_setup
from ctun.vm.dns import DnsService, HostsFeed, Snapshot
from ctun.vm.dns_packet import MAX_QUERY, TTL, encode_name
from ctun.vm.dns_redirect import DnsRedirect

LOOPBACK = IPv4Address("127.0.0.1")
HOST = IPv4Address("192.168.251.2")
A, AAAA, MX = 1, 28, 15
NOERROR, NXDOMAIN, REFUSED = 0, 3, 5
ENTRIES = [["api.dev.local", "192.168.251.2"], ["db.dev.local", "10.1.2.3"]]


def query(name: str, qtype: int = A, ident: int = 0x1234, flags: int = 0x0100,
          edns: bool = False, counts: tuple[int, int, int, int] | None = None) -> bytes:
    qd, an, ns, ar = counts or (1, 0, 0, 1 if edns else 0)
    wire = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    data = struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar) + wire
    data += struct.pack("!HH", qtype, 1)
    if edns:  # an OPT record: root name, type 41, UDP size 1232, no options
        data += b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    return data


@dataclass
class Reply:
    ident: int
    flags: int
    rcode: int
    question: bytes
    answers: list[tuple[int, int, bytes]] = field(default_factory=list)  # type, ttl, rdata


def parse_reply(data: bytes, question_len: int) -> Reply:
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data)
    assert (qd, ns, ar) == (1, 0, 0)
    offset = 12 + question_len
    answers = []
    for _ in range(an):
        pointer, rtype, rclass, ttl, length = struct.unpack_from("!HHHIH", data, offset)
        assert pointer == 0xC00C and rclass == 1
        offset += 12
        answers.append((rtype, ttl, data[offset:offset + length]))
        offset += length
    assert offset == len(data)
    return Reply(ident, flags, flags & 0xF, data[12:12 + question_len], answers)


class Client:
    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(5)
        self.sock.connect(server)

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def receive(self) -> bytes:
        return self.sock.recv(65535)

    def ask(self, data: bytes) -> Reply:
        self.send(data)
        answer = self.receive()
        # No amplification: the reply is the query's header and question, plus one A record.
        assert len(answer) <= len(data) + 16
        name_end = data.index(b"\x00", 12)
        return parse_reply(answer, name_end + 5 - 12)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def service() -> Iterator[DnsService]:
    dns = DnsService(LOOPBACK, "ctuntest", port=0, iptables=None)
    try:
        dns.apply(["dev.local"], ENTRIES)
        yield dns
    finally:
        dns.close()


@pytest.fixture
def client(service: DnsService) -> Iterator[Client]:
    address = service.address
    assert address is not None
    c = Client(address)
    try:
        yield c
    finally:
        c.close()


def test_a_known_name_gets_its_address(client: Client) -> None:
    asked = query("api.dev.local", ident=0xBEEF)
    reply = client.ask(asked)
    assert reply.ident == 0xBEEF
    assert reply.flags == 0x8000 | 0x0400 | 0x0100  # response, authoritative, RD echoed
    assert reply.question == asked[12:]
    assert reply.answers == [(A, TTL, IPv4Address("192.168.251.2").packed)]
    assert client.ask(query("db.dev.local")).answers == [(A, TTL, bytes([10, 1, 2, 3]))]


def test_names_are_case_insensitive_and_the_question_is_echoed_as_asked(client: Client) -> None:
    asked = query("DB.Dev.LOCAL")
    reply = client.ask(asked)
    assert reply.question == asked[12:]
    assert reply.answers == [(A, TTL, bytes([10, 1, 2, 3]))]


def test_other_types_for_a_known_name_are_answered_empty(client: Client) -> None:
    for qtype in (AAAA, MX):
        reply = client.ask(query("api.dev.local", qtype))
        assert (reply.rcode, reply.answers) == (NOERROR, [])


def test_unknown_names_under_a_suffix_do_not_exist(client: Client) -> None:
    for name, qtype in (("nope.dev.local", A), ("nope.dev.local", AAAA), ("dev.local", A),
                        ("a.api.dev.local", A)):
        reply = client.ask(query(name, qtype))
        assert (reply.rcode, reply.answers) == (NXDOMAIN, []), name


def test_names_elsewhere_are_refused(client: Client) -> None:
    for name in ("example.com", "xdev.local", "dev.local.example.com", "local"):
        reply = client.ask(query(name))
        assert (reply.rcode, reply.answers) == (REFUSED, []), name


def test_an_edns_query_gets_a_plain_reply(client: Client) -> None:
    asked = query("api.dev.local", edns=True)
    client.send(asked)
    answer = client.receive()
    assert len(answer) < len(asked) + 16
    name_end = asked.index(b"\x00", 12)
    reply = parse_reply(answer, name_end + 5 - 12)
    assert reply.answers == [(A, TTL, HOST.packed)]


def malformed() -> list[tuple[str, bytes]]:
    good = query("api.dev.local")
    return [
        ("short", b""),
        ("short", good[:11]),
        ("truncated", good[:12]),  # a header only
        ("truncated", good[:20]),  # in the middle of a label
        ("truncated", good[:-2]),  # no class
        ("truncated", struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x3fabc"),
        ("oversize", good + b"\x00" * (MAX_QUERY + 1 - len(good))),
        ("oversize", b"\x00" * 3000),
        ("not_query", query("api.dev.local", flags=0x8180)),  # a response
        ("not_query", query("api.dev.local", flags=0x2900)),  # opcode UPDATE
        ("not_query", query("api.dev.local", flags=0x0300)),  # truncated query
        ("bad_counts", query("api.dev.local", counts=(2, 0, 0, 0))),
        ("bad_counts", query("api.dev.local", counts=(0, 0, 0, 0))),
        ("bad_counts", query("api.dev.local", counts=(1, 1, 0, 0))),
        ("bad_counts", query("api.dev.local", counts=(1, 0, 0, 2))),
        ("bad_name", good[:12] + b"\xc0\x0c" + good[-4:]),  # a compression pointer
        ("bad_name", good[:12] + b"\x41" + b"a" * 65 + b"\x00" + good[-4:]),  # reserved type
        ("bad_name", good[:12] + (b"\x3f" + b"a" * 63) * 4 + b"\x00" + good[-4:]),  # > 255
        ("bad_name", query("a.b", A).replace(b"\x01a\x01b", b"\x03a.b")),  # a dot in a label
        ("not_in_class", good[:-2] + b"\x00\x03"),  # CHAOS
    ]


def test_malformed_queries_get_silence_and_a_count(service: DnsService, client: Client) -> None:
    cases = malformed()
    for _, data in cases:
        client.send(data)
    client.send(query("api.dev.local", ident=7))
    first = client.receive()  # nothing before the valid query's reply
    assert struct.unpack_from("!H", first)[0] == 7
    counters = service.status()["counters"]
    expected: dict[str, int] = {}
    for reason, _ in cases:
        expected[f"dropped_{reason}"] = expected.get(f"dropped_{reason}", 0) + 1
    assert {k: v for k, v in counters.items() if k.startswith("dropped_")} == expected
    assert counters["answered"] == 1


def test_random_garbage_never_gets_a_reply_bigger_than_it(service: DnsService,
                                                          client: Client) -> None:
    rng = random.Random(6)
    good = query("api.dev.local")
    replies: list[bytes] = []
    # In batches, each closed by a marker query: a socket buffer holds a batch, not all.
    for batch in range(30):
        for _ in range(100):
            if rng.random() < 0.5:
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
            else:  # a valid query with a few bytes flipped: the interesting cases
                mutable = bytearray(good)
                for _ in range(rng.randrange(1, 4)):
                    mutable[rng.randrange(len(mutable))] = rng.randrange(256)
                data = bytes(mutable)
            client.send(data)
        marker = query("api.dev.local", ident=0xF000 + batch)
        client.send(marker)
        while (answer := client.receive())[:2] != marker[:2]:
            replies.append(answer)
    # What happens to be a valid query is answered, and the answer is no bigger than a
    # query of that name plus one A record.
    assert all(len(r) <= 12 + 255 + 4 + 16 for r in replies)
    counters = service.status()["counters"]
    dropped = sum(v for k, v in counters.items() if k.startswith("dropped_"))
    answered = sum(counters.get(k, 0) for k in ("answered", "no_data", "nxdomain", "refused"))
    assert dropped + answered == 3000 + 30
    assert answered == len(replies) + 30
    assert dropped > 1500


def test_a_new_snapshot_replaces_the_old_one(service: DnsService, client: Client) -> None:
    service.apply(["dev.local", "other.test"], [["db.dev.local", "10.9.9.9"],
                                                ["x.other.test", "10.8.8.8"]])
    assert client.ask(query("db.dev.local")).answers == [(A, TTL, bytes([10, 9, 9, 9]))]
    assert client.ask(query("x.other.test")).answers == [(A, TTL, bytes([10, 8, 8, 8]))]
    assert client.ask(query("api.dev.local")).rcode == NXDOMAIN  # removed from the file
    status = service.status()
    assert status["suffixes"] == ["dev.local", "other.test"]
    assert status["names"] == 2


def test_nothing_to_serve_closes_the_socket_and_something_opens_it(service: DnsService) -> None:
    address = service.address
    assert address is not None
    service.apply([], [])
    assert service.address is None
    assert service.status()["listen"] is None
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with probe:
        probe.bind(address)  # the port is free again
    service.apply(["dev.local"], ENTRIES)
    assert service.address is not None


def test_invalid_entries_from_the_network_are_skipped_and_counted(service: DnsService,
                                                                   client: Client) -> None:
    service.apply(["dev.local", "bad suffix"], [["ok.dev.local", "10.0.0.1"],
                                                ["bad name.dev.local", "10.0.0.2"],
                                                ["x.dev.local", "not-an-ip"]])
    assert service.status()["counters"]["invalid_entries"] == 3
    assert service.status()["suffixes"] == ["dev.local"]
    assert client.ask(query("ok.dev.local")).answers == [(A, TTL, bytes([10, 0, 0, 1]))]


def test_the_report_for_the_host_sums_up_and_fits_the_schema(service: DnsService,
                                                               client: Client) -> None:
    for name in ("api.dev.local", "nope.dev.local", "example.com"):
        client.ask(query(name))
    client.send(b"\x00")
    client.ask(query("api.dev.local", qtype=28))  # AAAA: the name exists, no address
    address = service.address
    assert address is not None
    report = service.report()
    assert report == {"dns": {
        "listen": f"{address[0]}:{address[1]}", "error": "", "names": len(ENTRIES),
        "redirects": 0, "redirect_error": "not managed: no iptables in the agent",
        "answered": 2, "nxdomain": 1, "refused": 1, "malformed": 1}}
    body = {"firewall": {"backend": None, "rules": 0, "error": ""}, "bridges": {}, **report}
    assert messages.parse(messages.encode("agent_status", 1, **body)).body == body
    service.apply([], [])
    assert service.report() == {}  # nothing asked of it, nothing to say


def test_a_busy_port_is_an_error_in_the_status_and_retried() -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    dns = DnsService(LOOPBACK, "ctuntest", port=port, iptables=None)
    try:
        dns.apply(["dev.local"], ENTRIES)
        assert dns.address is None
        assert dns.status()["error"] == f"cannot listen on 127.0.0.1:{port}: Address already in use"
        blocker.close()
        dns.ensure()
        assert dns.address == ("127.0.0.1", port)
        assert dns.status()["error"] == ""
    finally:
        blocker.close()
        dns.close()


# -- reassembling the host's snapshots ---------------------------------------------------------


def hosts_message(gen: int, part: int, parts: int, entries: list[list[str]], seq: int = 1,
                  epoch: int = 1, suffixes: tuple[str, ...] = ("dev.local",)
                  ) -> messages.ControlMessage:
    payload = messages.encode("hosts", seq, epoch=epoch, gen=gen, part=part, parts=parts,
                              suffixes=list(suffixes), entries=entries)
    return messages.parse(payload)


class Delivered:
    """Stands in for the keeper the feed hands complete snapshots to: keeps the newest."""

    def __init__(self) -> None:
        self.newest: Snapshot | None = None

    def __call__(self, snapshot: Snapshot) -> None:
        self.newest = snapshot

    def take(self) -> Snapshot | None:
        newest, self.newest = self.newest, None
        return newest


def test_parts_are_reassembled_in_any_order_and_old_generations_ignored() -> None:
    delivered = Delivered()
    feed = HostsFeed(delivered)
    one, two = [["a.dev.local", "10.0.0.1"]], [["b.dev.local", "10.0.0.2"]]
    feed.on_control("host", hosts_message(2, 1, 2, two))
    assert delivered.take() is None
    feed.on_control("host", hosts_message(2, 0, 2, one))
    assert delivered.take() == (["dev.local"], one + two)
    assert delivered.take() is None
    feed.on_control("host", hosts_message(1, 0, 1, []))  # late: older than what we have
    feed.on_control("host", hosts_message(2, 0, 1, []))  # the same generation again
    assert delivered.take() is None
    feed.on_control("host", hosts_message(3, 0, 2, one))  # an unfinished one...
    feed.on_control("host", hosts_message(4, 0, 1, two))  # ...overtaken by a newer one
    feed.on_control("host", hosts_message(3, 1, 2, two))
    assert delivered.take() == (["dev.local"], two)
    # The host restarted: a new epoch, generations from 1 again.
    feed.on_control("host", hosts_message(1, 0, 1, one, epoch=2))
    assert delivered.take() == (["dev.local"], one)
    feed.on_control("host", messages.ControlMessage("links", 5, {"pairs": []}, 2))
    assert delivered.take() is None


# -- the host side: what it sends, through the real message schema -------------------------------


@dataclass
class Peer:
    name: str
    state: str = "down"


class RecordingEngine:
    """The engine's send_control through real encoding and parsing, into a list."""

    def __init__(self) -> None:
        self.peers = [Peer("vm")]
        self.sent: list[messages.ControlMessage] = []
        self._seq = 0

    def send_control(self, peer: str, kind: str, **body: Any) -> None:
        assert peer == "vm"
        self._seq += 1
        self.sent.append(messages.parse(messages.encode(kind, self._seq, epoch=42, **body)))


class NoRoutes:
    def reconfigure(self, _cfg: HostConfig) -> None:
        pass


def host_config(hosts: tuple[HostsSource, ...]) -> HostConfig:
    tunnel = TunnelConfig(IPv4Network("192.168.251.0/24"), IPv4Address("192.168.251.1"), HOST,
                          1400, "ctun0")
    return HostConfig(tunnel, ("127.0.0.1", 2511), "udp", (), (PeerConfig("vm", b"k" * 32, ()),),
                      Timers(), None, hosts=hosts)


@contextlib.contextmanager
def host_side(hosts_file: Path) -> Iterator[tuple[HostContext, RecordingEngine]]:
    engine = RecordingEngine()
    with contextlib.ExitStack() as resources:
        ctx = HostContext(host_config((HostsSource(hosts_file, (".dev.local",)),)),
                          cast(Any, None), cast(Any, engine), cast(Any, NoRoutes()), resources)
        hosts_setup(ctx)
        yield ctx, engine


def test_the_host_sends_the_entries_when_the_agent_comes_up_and_when_they_change(
        tmp_path: Path, service: DnsService, client: Client) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 api.dev.local\n10.1.2.3 db.dev.local\nbogus line\n")
    delivered = Delivered()
    feed = HostsFeed(delivered)
    with host_side(hosts) as (ctx, engine):
        assert ctx.files() == [hosts]
        assert ctx.status()["hosts"] == {
            "files": [str(hosts)], "suffixes": ["dev.local"],
            "names": [["api.dev.local", "192.168.251.2"], ["db.dev.local", "10.1.2.3"]],
            "problems": [f"{hosts}:3: 'bogus' is not an IP address; line skipped"]}
        ctx.peer_up("alice")
        assert engine.sent == []
        ctx.peer_up("vm")
        assert [m.body for m in engine.sent] == [{
            "gen": 1, "part": 0, "parts": 1, "suffixes": ["dev.local"],
            "entries": [["api.dev.local", "192.168.251.2"], ["db.dev.local", "10.1.2.3"]]}]

        # The agent's side takes it as it comes off the wire.
        for message in engine.sent:
            feed.on_control("host", message)
        snapshot = delivered.take()
        assert snapshot is not None
        service.apply(*snapshot)
        assert client.ask(query("api.dev.local")).answers == [(A, TTL, HOST.packed)]

        # A reload with unchanged entries sends nothing; the VM peer is down: nothing either.
        engine.sent.clear()
        ctx.apply(ctx.cfg)
        hosts.write_text("10.1.2.4 db.dev.local\n")
        ctx.apply(ctx.cfg)
        assert engine.sent == []
        engine.peers[0].state = "up"
        hosts.write_text("10.1.2.5 db.dev.local\n" + "".join(
            f"10.0.0.{i} n{i}.dev.local\n" for i in range(20)))
        ctx.apply(replace(ctx.cfg))
        assert [(m.body["gen"], m.body["part"], m.body["parts"]) for m in engine.sent] == [
            (2, 0, 3), (2, 1, 3), (2, 2, 3)]
        for message in reversed(engine.sent):
            feed.on_control("host", message)
        snapshot = delivered.take()
        assert snapshot is not None
        service.apply(*snapshot)
        assert client.ask(query("db.dev.local")).answers == [(A, TTL, bytes([10, 1, 2, 5]))]
        assert client.ask(query("n19.dev.local")).answers == [(A, TTL, bytes([10, 0, 0, 19]))]
        assert client.ask(query("api.dev.local")).rcode == NXDOMAIN


# -- the redirect's commands -------------------------------------------------------------------


class RecordingRunner:
    """iptables as a fake: -C answers from the set of rules it was told to insert."""

    def __init__(self, listing: str = "") -> None:
        self.calls: list[list[str]] = []
        self.rules: list[list[str]] = []
        self.listing = listing

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        args = argv[3:]  # after "iptables -w 5": -t nat -X PREROUTING [1] SPEC...
        spec = args[5:] if args[2] == "-I" else args[4:]
        code, out = 0, ""
        if args[2] == "-C":
            code = 0 if spec in self.rules else 1
        elif args[2] == "-I":
            self.rules.insert(0, spec)
        elif args[2] == "-D":
            if spec in self.rules:
                self.rules.remove(spec)
        elif args[2] == "-S":
            out = self.listing
        return subprocess.CompletedProcess(argv, code, out, "")


def spec(hex_name: str) -> list[str]:
    return ["-p", "udp", "-m", "udp", "--dport", "53", "-m", "string", "--algo", "bm",
            "--icase", "--hex-string", f"|{hex_name}|", "-m", "comment", "--comment",
            "ctun:ctun0", "-j", "DNAT", "--to-destination", "192.168.251.1:53"]


DEV_LOCAL = "03646576056c6f63616c00"


def test_the_redirect_commands() -> None:
    runner = RecordingRunner()
    redirect = DnsRedirect("ctun0", IPv4Address("192.168.251.1"), binary="iptables-nft",
                           runner=runner)
    assert encode_name("dev.local").hex() == DEV_LOCAL
    redirect.apply(["dev.local"])
    ipt = ["iptables-nft", "-w", "5", "-t", "nat"]
    assert runner.calls == [[*ipt, "-C", "PREROUTING", *spec(DEV_LOCAL)],
                            [*ipt, "-I", "PREROUTING", "1", *spec(DEV_LOCAL)]]
    runner.calls.clear()
    assert redirect.ensure() is False
    assert runner.calls == [[*ipt, "-C", "PREROUTING", *spec(DEV_LOCAL)]]
    runner.rules.clear()  # Docker (or a user) flushed the nat table
    assert redirect.ensure() is True
    assert runner.rules == [spec(DEV_LOCAL)]
    runner.calls.clear()
    redirect.apply(["other.test"])
    other = spec(encode_name("other.test").hex())
    assert runner.calls == [[*ipt, "-C", "PREROUTING", *spec(DEV_LOCAL)],
                            [*ipt, "-D", "PREROUTING", *spec(DEV_LOCAL)],
                            [*ipt, "-C", "PREROUTING", *other],
                            [*ipt, "-I", "PREROUTING", "1", *other]]
    redirect.close()
    assert runner.rules == []


def test_leftovers_of_a_crashed_run_are_found_by_their_tag() -> None:
    listing = (
        "-P PREROUTING ACCEPT\n"
        "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n"
        f'-A PREROUTING -p udp -m udp --dport 53 -m string --hex-string "|{DEV_LOCAL}|" '
        '--algo bm --icase -m comment --comment "ctun:ctun0" -j DNAT '
        "--to-destination 192.168.251.1:53\n"
        f'-A PREROUTING -p udp -m udp --dport 53 -m string --hex-string "|{DEV_LOCAL}|" '
        '--algo bm -m comment --comment "ctun:ctun1" -j DNAT '
        "--to-destination 192.168.252.1:53\n"
    )
    runner = RecordingRunner(listing)
    redirect = DnsRedirect("ctun0", IPv4Address("192.168.251.1"), runner=runner)
    removed = redirect.cleanup_leftovers()
    assert len(removed) == 1 and "ctun:ctun0" in removed[0]
    assert runner.calls[-1][:6] == ["iptables", "-w", "5", "-t", "nat", "-D"]
    assert "ctun:ctun0" in runner.calls[-1]
    assert "192.168.251.1:53" in runner.calls[-1]


def test_the_service_puts_rules_only_while_it_listens() -> None:
    runner = RecordingRunner()
    dns = DnsService(LOOPBACK, "ctun0", port=0, iptables="iptables", runner=runner)
    try:
        dns.apply(["dev.local"], ENTRIES)
        assert len(runner.rules) == 1
        assert dns.status()["redirect"] == {"managed": True, "rules": 1, "error": ""}
        dns.apply([], [])
        assert runner.rules == []
        dns.apply(["dev.local"], ENTRIES)
    finally:
        dns.close()
    assert runner.rules == []


def test_a_closed_service_stays_closed() -> None:
    """A keeper round that outlives the agent's stop must not listen or redirect again."""
    runner = RecordingRunner()
    dns = DnsService(LOOPBACK, "ctun0", port=0, iptables="iptables", runner=runner)
    dns.apply(["dev.local"], ENTRIES)
    assert dns.address is not None and len(runner.rules) == 1
    dns.close()
    dns.ensure()
    dns.apply(["dev.local"], ENTRIES)
    assert dns.address is None and runner.rules == []


def test_an_agent_that_restarted_quickly_gets_the_entries_again(tmp_path: Path) -> None:
    """Restarted within the engine's dead_after, the agent's peer never went down; the
    engine announces it "up" again ("peer restarted", tests/test_engine_peers.py), and every
    up of the VM peer sends the current snapshot."""
    hosts = tmp_path / "hosts"
    hosts.write_text("10.1.2.3 db.dev.local\n")
    with host_side(hosts) as (ctx, engine):
        ctx.peer_up("vm")
        assert len(engine.sent) == 1
        ctx.peer_up("alice")
        assert len(engine.sent) == 1
        ctx.peer_up("vm")  # the new run of the agent
        assert [m.body["gen"] for m in engine.sent] == [1, 2]
        assert engine.sent[1].body["entries"] == [["db.dev.local", "10.1.2.3"]]
