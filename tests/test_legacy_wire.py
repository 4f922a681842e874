"""Legacy wire mode's framing (core/legacy): control pushes, logins, accessor sessions, and
what malformed input does (nothing but a counter). No sockets, no root."""

from __future__ import annotations

import re
import struct
from collections import Counter
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
from ctun.core.hosts_file import HostsEntries
from ctun.core.legacy import wire
from ctun.core.legacy.expose import DROP, REPLY, TO_VM, ExposeDesk, Policy, ReplyBudget
from ctun.core.legacy.pushes import PushState, hosts_commands
from ctun.core.relay import checksum

DOCS = Path(__file__).resolve().parent.parent / "docs" / "legacy.md"
NET = IPv4Network("192.168.251.0/24")
HOST = IPv4Address("192.168.251.2")
ALICE = IPv4Address("192.168.251.9")
EXPOSED = IPv4Network("172.18.0.0/16")
HIDDEN = IPv4Network("10.99.0.0/16")
A, B = IPv4Network("172.18.0.0/32"), IPv4Network("172.19.0.0/32")


def ipv4(src: str, dst: str, payload: bytes = b"", proto: int = 1) -> bytes:
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                         IPv4Address(src).packed, IPv4Address(dst).packed)
    header = header[:10] + checksum(header).to_bytes(2, "big") + header[12:]
    return header + payload


def echo_request(src: str, dst: str) -> bytes:
    icmp = bytearray(struct.pack(">BBHHH", 8, 0, 0, 7, 1) + b"ping")
    icmp[2:4] = checksum(icmp).to_bytes(2, "big")
    return ipv4(src, dst, bytes(icmp))


# --- control pushes --------------------------------------------------------------------------


def assemble(datagrams: list[bytes]) -> bytes:
    assembler = wire.PushAssembler()
    body = assembler.start(datagrams[0], 0.0)
    for piece in datagrams[1:]:
        assert body is None and assembler.open
        body = assembler.feed(piece)
    assert body is not None and not assembler.open
    return body


def test_a_push_is_a_header_then_pieces_of_at_most_the_mtu() -> None:
    body = b"x" * 5000
    datagrams = wire.push_datagrams(body, 1400)
    assert datagrams[0] == bytes((0x01, 5000 >> 8, 5000 & 0xFF))
    assert [len(d) for d in datagrams[1:]] == [1400, 1400, 1400, 800]
    assert assemble(datagrams) == body
    assert max(len(d) for d in wire.push_datagrams(body, 576)[1:]) == 576
    # docker-connector reads into 2000-byte buffers: pieces stay small even with jumbo MTUs.
    assert max(len(d) for d in wire.push_datagrams(body, 9000)[1:]) == wire.MAX_PIECE
    assert wire.push_datagrams(b"", 1400) == []
    with pytest.raises(ValueError, match="at most 65535"):
        wire.push_datagrams(b"x" * 65536, 1400)


def test_the_largest_body_goes_through() -> None:
    body = bytes(range(32, 127)) * 700  # printable, 66500 bytes: cut to the maximum
    body = body[:wire.MAX_BODY]
    datagrams = wire.push_datagrams(body, 1400)
    assert datagrams[0] == b"\x01\xff\xff" and len(datagrams) == 1 + 47
    assert assemble(datagrams) == body


def test_a_header_may_carry_the_first_body_bytes() -> None:
    assembler = wire.PushAssembler()
    assert assembler.start(b"\x01\x00\x05conn", 0.0) is None
    assert assembler.feed(b"x") == b"connx"
    assert assembler.start(b"\x01\x00\x03abc", 0.0) == b"abc"


@pytest.mark.parametrize(("datagrams", "reason"), [
    ([b"\x01\x00"], "push_malformed"),
    ([b"\x01\x00\x00"], "push_empty"),
    ([b"\x01\x00\x04", b"abcdef"], "push_overlong"),
    ([b"\x01\x00\x04abcdefgh"], "push_overlong"),
])
def test_malformed_pushes_are_refused(datagrams: list[bytes], reason: str) -> None:
    assembler = wire.PushAssembler()
    with pytest.raises(wire.WireError, match=reason):
        for datagram in datagrams:
            (assembler.feed if assembler.open else
             lambda d: assembler.start(d, 0.0))(datagram)
    assert not assembler.open  # and the next push starts clean
    assert assembler.start(b"\x01\x00\x02ok", 1.0) == b"ok"


def test_an_incomplete_push_expires() -> None:
    assembler = wire.PushAssembler(timeout=2.0)
    assert assembler.start(b"\x01\x00\x10", 10.0) is None
    assert not assembler.expire(11.9) and assembler.open
    assert assembler.expire(12.1) and not assembler.open
    assert not assembler.expire(20.0)


def test_only_checked_ipv4_packets_count_as_packets_inside_a_push() -> None:
    packet = echo_request("192.168.251.2", "192.168.251.1")
    assert wire.is_ipv4_packet(packet) and wire.is_checked_ipv4_packet(packet)
    damaged = packet[:10] + b"\x00\x00" + packet[12:]
    assert wire.is_ipv4_packet(damaged) and not wire.is_checked_ipv4_packet(damaged)
    # A piece of text can start like a packet ("E" is 0x45) but its length never matches.
    assert not wire.is_ipv4_packet(b"E" + b"x" * 40)
    for junk in (b"", b"\x00", b"\x01\x00\x03", packet[:19], packet + b"x", b"\x65" + packet[1:]):
        assert not wire.is_ipv4_packet(junk)


def test_body_encoding_and_decoding() -> None:
    commands = [wire.connect(A, B), wire.connect(IPv4Network("10.1.0.0/16"), B, linked=False),
                wire.dns([".test", ".dev.local"]),
                wire.host("192.168.251.2", ["db.test", "x.test"])]
    body, left_out = wire.encode_body(commands)
    assert left_out == 0
    assert body == (b"connect 172.18.0.0 172.19.0.0,disconnect 10.1.0.0 172.19.0.0,"
                    b"dns .test .dev.local,host 192.168.251.2 db.test x.test")
    decoded, bad = wire.decode_body(body)
    assert decoded == commands and bad == []
    assert wire.dns_suffixes(wire.Command("dns", (".Test", "-.old.", "x"))) == (
        ["test", "x"], ["old"])


def test_commands_that_do_not_fit_are_left_out_whole() -> None:
    commands = [wire.host(f"10.0.0.{i}", [f"name{i}.test"]) for i in range(100)]
    body, left_out = wire.encode_body(commands, limit=200)
    assert len(body) <= 200 and left_out > 0
    decoded, bad = wire.decode_body(body)
    assert len(decoded) + left_out == 100 and bad == []
    with pytest.raises(ValueError, match="cannot travel"):
        wire.encode_body([wire.host("10.0.0.1", ["a,b"])])
    with pytest.raises(ValueError, match="cannot travel"):
        wire.encode_body([wire.dns(["a b"])])


def test_bad_parts_of_a_body_are_skipped_and_named() -> None:
    body = (b"connect 172.18.0.0,bogus 1 2,host 999.1.1.1 x.test,dns,,connect 172.18.0.0/16 "
            b"172.19.0.1,host 10.0.0.1 ok.test bad..name,dns -.gone .kept,disconnect a b,")
    commands, bad = wire.decode_body(body)
    assert [c.text() for c in commands] == ["connect 172.18.0.0/16 172.19.0.1",
                                            "dns -.gone .kept"]
    assert bad == ["bad_connect", "unknown_command", "bad_host", "bad_dns", "bad_host",
                   "bad_disconnect"]
    assert wire.decode_body("host 10.0.0.1 é.test".encode()) == ([], ["not_ascii"])
    assert wire.decode_body(b"dns .test\x00") == ([], ["not_printable"])
    assert wire.link_side("172.18.0.1") == IPv4Network("172.18.0.1/32")


def test_the_documented_example_push_is_what_ctun_sends(tmp_path: Path) -> None:
    text = DOCS.read_text()
    match = re.search(r"```\n01 ([0-9a-f]{2}) ([0-9a-f]{2})\n(.+)\n```", text)
    assert match, "docs/legacy.md lost its example push"
    (tmp_path / "hosts").write_text("127.0.0.1 db.test\n")
    hosts = HostsEntries(("test",), (("db.test", str(HOST)),))
    commands = PushState().full([(A, B)], hosts)
    body, _ = wire.encode_body(commands)
    assert body.decode() == match[3]
    assert wire.push_datagrams(body, 1400)[0].hex() == "01" + match[1] + match[2]


# --- what the host pushes, and when ----------------------------------------------------------


def test_a_new_vm_side_gets_everything_then_only_changes() -> None:
    state = PushState()
    hosts = HostsEntries(("test",), (("db.test", "192.168.251.2"), ("api.test", "10.1.2.3"),
                                     ("www.test", "192.168.251.2")))
    full = [c.text() for c in state.full([(A, B)], hosts)]
    assert full == ["connect 172.18.0.0 172.19.0.0", "dns .test",
                    "host 192.168.251.2 db.test www.test", "host 10.1.2.3 api.test"]
    assert state.changes([(A, B)], hosts) == []  # nothing changed: no push
    # The link goes: its removal, and the hosts snapshot again (a push replaces all entries).
    assert [c.text() for c in state.changes([], hosts)] == [
        "disconnect 172.18.0.0 172.19.0.0", "dns .test",
        "host 192.168.251.2 db.test www.test", "host 10.1.2.3 api.test"]
    # Hosts removed: the redirect is taken away with `dns -SUFFIX`, no entries follow.
    assert [c.text() for c in state.changes([], None)] == ["dns -.test"]
    assert state.changes([], None) == []
    # A VM side that comes later is told to drop the link too: it may hold the rules still.
    assert [c.text() for c in state.full([], None)] == ["disconnect 172.18.0.0 172.19.0.0"]
    assert hosts_commands(None) == [] and hosts_commands(HostsEntries((), ())) == []


# --- accessors -------------------------------------------------------------------------------


def desk(pong: bool = True, budget: ReplyBudget | None = None) -> ExposeDesk:
    policy = Policy({b"alice": ALICE}, (EXPOSED,), pong, NET, HOST, 1400)
    return ExposeDesk(policy, budget or ReplyBudget())


def test_login_tokens() -> None:
    assert wire.login_token(b"\x00alice") == b"alice"
    assert wire.login_token(b"\x01alice") == b"alice"
    for junk in (b"", b"\x00", b"\x01", b"\x02alice", b"\x00" + b"x" * 65,
                 echo_request("192.168.251.9", "172.18.0.2")):
        assert wire.login_token(junk) is None
    assert wire.login("alice") == b"\x00alice" and wire.login("alice", True) == b"\x01alice"


def test_access_reply_round_trip_and_size_limit() -> None:
    config = wire.AccessConfig(IPv4Interface("192.168.251.9/24"), HOST, 1400,
                               (EXPOSED, IPv4Network("10.5.0.0/16")))
    data, left_out = wire.encode_access(config)
    assert data == (b"\x01addr 192.168.251.9/24,peer 192.168.251.2,mtu 1400,"
                    b"route 172.18.0.0/16,route 10.5.0.0/16") and left_out == 0
    assert wire.decode_access(data) == config
    many = wire.AccessConfig(config.address, HOST, 1400,
                             tuple(IPv4Network(f"10.{i}.0.0/16") for i in range(200)))
    data, left_out = wire.encode_access(many)
    assert len(data) <= wire.MAX_PIECE and left_out > 0
    assert len(wire.decode_access(data).routes) == 200 - left_out
    for junk in (b"", b"\x02", b"\x01addr x", b"\x01peer 1.2.3.4,mtu 1400", b"\x01\xff"):
        with pytest.raises(wire.WireError):
            wire.decode_access(junk)


def test_wrong_token_gets_0x02_right_token_the_exposed_routes_only() -> None:
    d = desk()
    source = ("10.251.1.2", 40000)
    assert d.on_datagram(b"\x00mallory", source, 0.0).data == wire.NOT_LOGGED_IN
    reply = d.on_datagram(b"\x00alice", source, 0.0)
    assert reply.action == REPLY
    assert wire.decode_access(reply.data) == wire.AccessConfig(
        IPv4Interface("192.168.251.9/24"), HOST, 1400, (EXPOSED,))
    assert d.drops == {"bad_login": 1}


def test_after_login_only_own_address_to_exposed_routes_reaches_the_vm() -> None:
    d = desk()
    me, other = ("10.251.1.2", 40000), ("10.251.1.3", 40000)
    assert d.on_datagram(echo_request("192.168.251.9", "172.18.0.2"), me, 0.0).data == b"\x02"
    d.on_datagram(b"\x00alice", me, 0.0)
    packet = echo_request("192.168.251.9", "172.18.0.2")
    outcome = d.on_datagram(packet, me, 0.1)
    assert (outcome.action, outcome.data) == (TO_VM, packet)
    assert d.on_datagram(echo_request("192.168.251.10", "172.18.0.2"), me, 0.2).action == DROP
    assert d.on_datagram(echo_request("192.168.251.9", "10.99.0.5"), me, 0.3).action == DROP
    assert d.on_datagram(b"\x45junk", me, 0.4).action == DROP
    assert d.on_datagram(packet, other, 0.5).data == b"\x02"  # not logged in from there
    (session,) = d.sessions()
    assert session.drops == {"source_not_allowed": 1, "not_exposed": 1, "inner_malformed": 1}
    assert session.rx_packets == 2


def test_pong_answers_pings_of_the_host_address_only_when_on() -> None:
    for pong in (True, False):
        d = desk(pong=pong)
        me = ("10.251.1.2", 40000)
        d.on_datagram(b"\x00alice", me, 0.0)
        outcome = d.on_datagram(echo_request("192.168.251.9", "192.168.251.2"), me, 0.1)
        if pong:
            assert outcome.action == REPLY
            assert outcome.data[12:16] == HOST.packed and outcome.data[16:20] == ALICE.packed
            assert outcome.data[20] == 0  # echo reply
            assert checksum(outcome.data[20:]) == 0xFFFF
        else:
            assert outcome.action == DROP and d.sessions()[0].drops == {"to_host": 1}


def test_vm_packets_reach_an_accessor_only_from_exposed_routes() -> None:
    d = desk()
    assert d.is_accessor(int(ALICE)) and not d.is_accessor(int(HOST))
    assert d.to_accessor(echo_request("172.18.0.2", "192.168.251.9")) == (None, "no_session")
    d.on_datagram(b"\x01alice", ("10.251.1.2", 40000), 0.0)
    session, why = d.to_accessor(echo_request("172.18.0.2", "192.168.251.9"))
    assert session is not None and session.endpoint == ("10.251.1.2", 40000) and why == ""
    assert d.to_accessor(echo_request("10.99.0.5", "192.168.251.9")) == (None, "not_exposed")


def test_a_new_login_moves_the_session_and_revoking_ends_it() -> None:
    d = desk()
    d.on_datagram(b"\x00alice", ("10.251.1.2", 40000), 0.0)
    d.on_datagram(b"\x00alice", ("10.251.1.2", 40001), 1.0)
    assert [s.endpoint for s in d.sessions()] == [("10.251.1.2", 40001)]
    packet = echo_request("192.168.251.9", "172.18.0.2")
    assert d.on_datagram(packet, ("10.251.1.2", 40000), 1.1).data == b"\x02"
    assert d.kick(b"alice") and not d.kick(b"bob")
    assert d.on_datagram(packet, ("10.251.1.2", 40001), 1.2).data == b"\x02"
    d.on_datagram(b"\x01alice", ("10.251.1.2", 40001), 5.0)
    assert d.on_datagram(packet, ("10.251.1.2", 40001), 5.1).action == TO_VM
    d.configure(Policy({}, (EXPOSED,), True, NET, HOST, 1400))  # the token is gone
    assert d.on_datagram(packet, ("10.251.1.2", 40001), 5.2).data == b"\x02"
    assert d.sessions() == []
    assert any("revoked" in line for line in d.take_events()) and d.take_events() == []


def test_replies_to_strangers_are_rate_limited_per_source_and_overall() -> None:
    d = desk(budget=ReplyBudget(burst=3, refill=1, overall=10))
    replies = sum(d.on_datagram(b"\x00wrong", ("203.0.113.7", 1), 0.0).action == REPLY
                  for _ in range(1000))
    assert replies == 3 and d.drops["rate_limited"] == 997
    assert d.on_datagram(b"\x00wrong", ("203.0.113.7", 1), 1.0).action == REPLY  # refilled
    # Spoofed sources share the overall budget: 10 a second whatever the addresses.
    replies = sum(d.on_datagram(b"junk", (f"198.51.100.{i}", 1), 2.0).action == REPLY
                  for i in range(200))
    assert replies == 10
    # Another address logs in at once all the same (its own bucket), and only once per token.
    assert d.on_datagram(b"\x00alice", ("10.251.1.2", 40000), 2.0).action == REPLY


def test_the_reply_budget_forgets_the_oldest_sources() -> None:
    budget = ReplyBudget(burst=1, refill=0.001, overall=1e9, max_sources=10)
    assert budget.take("a", 0.0) and not budget.take("a", 0.0)
    for i in range(10):
        budget.take(f"s{i}", 0.0)
    assert budget.take("a", 0.0)  # forgotten: a fresh bucket (the table stays bounded)


# --- turning it on -------------------------------------------------------------------------------


def test_wire_flag_on_up_and_vm(capsys: pytest.CaptureFixture[str]) -> None:
    from ctun import cli

    parser = cli.build_parser()
    assert parser.parse_args(["up", "--wire", "legacy"]).wire == "legacy"
    assert parser.parse_args(["vm", "--wire", "legacy", "--host", "h", "--port", "2511"]).wire \
        == "legacy"
    assert parser.parse_args(["up"]).wire is None  # the config file (or "ctun") decides
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["vm", "--wire", "docker-connector"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_status_names_the_wire_when_it_is_legacy() -> None:
    from ctun.core import status_text
    from ctun.core.legacy import status

    snap = status.snapshot("host", "host", "0", "ctun0", ("127.0.0.1", 2511), 0.0,
                           Counter(), [], status.EventLog())
    assert status_text.format_status(snap).splitlines()[1] == "wire: legacy (unauthenticated)"


def test_legacy_mode_runs_the_engine_free_features_it_names() -> None:
    """A renamed feature module must not silently drop hot reload or proxies in legacy mode."""
    from ctun.core import daemon
    from ctun.core.legacy.daemon import ENGINE_FREE_FEATURES

    modules = {f.__module__.rpartition(".")[2] for f in daemon.FEATURES}
    assert set(ENGINE_FREE_FEATURES) <= modules
