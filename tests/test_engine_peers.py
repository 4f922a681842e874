"""Accessor peers on the host's engine: peers and listeners added and removed at runtime, the
relay between accessors and the VM under the expose policy, pong, and failed-login limits.

The host and its peers are real engines with real UDP transports on loopback; each engine's
interface is a stand-in (a socket pair) that records what the engine writes and takes the
packets a kernel would route into it. Peers run with allowed sources 0.0.0.0/0, so whatever
the host lets through reaches their interface and is seen here.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from ctun.core import gso, messages, protocol, relay
from ctun.core.contracts import VirtualInterface
from ctun.core.engine import Engine, EngineTimers, PeerSpec, Role
from ctun.core.login_limit import LOGIN_BURST, FailedLogins
from ctun.core.protocol import FrameType
from ctun.lab.topology import wait_until
from ctun.plugins.transport_udp.transport import UdpTransport

TUNNEL = IPv4Network("192.168.251.0/24")
HOST_ADDR = IPv4Address("192.168.251.2")
EXPOSED = IPv4Network("172.18.0.0/16")
HIDDEN = IPv4Network("172.19.0.0/16")
CONTAINER, HIDDEN_CONTAINER = "172.18.0.2", "172.19.0.2"
ALICE_IP, BOB_IP = "192.168.251.10", "192.168.251.11"
EVERYWHERE = IPv4Network("0.0.0.0/0")
LOOPBACK = "127.0.0.1"
FLOODER = "127.0.0.2"  # another source address on loopback
UP = 10.0


# --- packets -------------------------------------------------------------------------------


def checksum(data: bytes) -> int:
    """The Internet checksum, word by word (not the way the engine computes it)."""
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data) - 1, 2))
    if len(data) % 2:
        total += data[-1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, proto: int, body: bytes, ident: int = 1) -> bytes:
    header = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident, 0x4000,
                                   64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst)))
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + body


def udp(src: str, dst: str, data: bytes = b"hello") -> bytes:
    return ipv4(src, dst, 17, struct.pack(">HHHH", 4000, 53, 8 + len(data), 0) + data)


def echo_request(src: str, dst: str, ident: int = 7) -> bytes:
    icmp = bytearray(b"\x08\x00\x00\x00" + ident.to_bytes(2, "big") + b"\x00\x01" + b"x" * 32)
    icmp[2:4] = checksum(bytes(icmp)).to_bytes(2, "big")
    return ipv4(src, dst, 1, bytes(icmp))


def tcp_super(src: str, dst: str, size: int, mss: int, seq: int = 1000,
              flags: int = 0x18) -> bytes:
    """A TCP packet of `size` bytes of data, as the kernel hands over a super-packet."""
    tcp = struct.pack(">HHIIBBHHH", 40000, 80, seq, 1, 0x50, flags, 65535, 0, 0)
    return ipv4(src, dst, 6, tcp + os.urandom(size), ident=100)


def tcp_checksum_ok(segment: bytes) -> bool:
    pseudo = segment[12:20] + struct.pack(">BBH", 0, 6, len(segment) - 20)
    return checksum(pseudo + segment[20:]) == 0


# --- the scene: stand-in interfaces, engines, peers --------------------------------------


class StandIn(VirtualInterface):
    """An interface whose 'kernel' is this test: send() routes a packet into it, and what
    the engine writes is kept in `written` (and `written_gso`, with its offload header)."""

    def __init__(self, name: str, vnet: bool = False) -> None:
        self.name = name
        self.vnet = vnet
        self.offload = False
        self._engine_end, self._kernel_end = socket.socketpair(socket.AF_UNIX,
                                                               socket.SOCK_DGRAM)
        self._engine_end.setblocking(False)
        self.written: list[bytes] = []
        self.written_gso: list[tuple[bytes, bytes]] = []

    def fileno(self) -> int:
        return self._engine_end.fileno()

    def read_packets(self, limit: int) -> list[bytes]:
        packets: list[bytes] = []
        while len(packets) < limit:
            try:
                packets.append(self._engine_end.recv(1 << 17))
            except BlockingIOError:
                break
        return packets

    def write_packet(self, packet: bytes) -> None:
        self.written.append(bytes(packet))

    def write_gso(self, header: bytes, packet: bytes | memoryview) -> None:
        self.written_gso.append((bytes(header), bytes(packet)))

    def set_offload(self, enabled: bool) -> None:
        self.offload = enabled

    def close(self) -> None:
        self._engine_end.close()
        self._kernel_end.close()

    def send(self, packet: bytes) -> None:
        header = gso.ZERO if self.vnet else b""
        self._kernel_end.send(header + packet)

    def send_super(self, vnet_header: bytes, packet: bytes) -> None:
        self._kernel_end.send(vnet_header + packet)


def accessor(name: str, psk: bytes, ip: str) -> PeerSpec:
    own = (IPv4Network(f"{ip}/32"),)
    return PeerSpec(name, psk, own, own, accessor=True)


def vm_spec(psk: bytes) -> PeerSpec:
    networks = (TUNNEL, EXPOSED, HIDDEN)
    return PeerSpec("vm", psk, networks, networks)


class Node:
    def __init__(self, engine: Engine, interface: StandIn) -> None:
        self.engine, self.interface = engine, interface

    def peer(self, name: str | None = None) -> dict[str, Any]:
        peers = self.engine.snapshot()["peers"]
        return dict(peers[0] if name is None else next(p for p in peers if p["name"] == name))

    def is_up(self, name: str | None = None) -> bool:
        """Up, and the other side's hello (with its offload offer) is in."""
        peer = self.peer(name)
        return peer["state"] == "up" and bool(peer["remote_name"])


class Scene:
    """Everything a test started, stopped and closed at the end whatever happened."""

    def __init__(self) -> None:
        self.engines: list[Engine] = []
        self.closables: list[UdpTransport | StandIn] = []
        self.keys = {name: os.urandom(32) for name in ("vm", "alice", "bob")}

    def listener(self) -> UdpTransport:
        transport = UdpTransport.listen((LOOPBACK, 0))
        self.closables.append(transport)
        return transport

    def host(self, specs: list[PeerSpec], vnet: bool = False,
             transports: list[UdpTransport] | None = None) -> Node:
        interface = StandIn("host", vnet)
        self.closables.append(interface)
        engine = Engine(Role.HOST, interface, transports or [self.listener()], specs, 1400,
                        EngineTimers(), name="host", version="1")
        engine.start()
        self.engines.append(engine)
        return Node(engine, interface)

    def client(self, name: str, to: UdpTransport, vnet: bool = False) -> Node:
        """A peer in the VM role (what the agent and `ctun access` run) logging in at `to`."""
        interface = StandIn(name, vnet)
        transport = UdpTransport.connect(to.local_endpoint)
        self.closables += [interface, transport]
        spec = PeerSpec("host", self.keys[name], (EVERYWHERE,), (EVERYWHERE,))
        engine = Engine(Role.VM, interface, [transport], [spec], 1400, EngineTimers(),
                        name=name, version="1", remote=to.local_endpoint)
        engine.start()
        self.engines.append(engine)
        return Node(engine, interface)

    def standard(self, vnet: tuple[bool, bool, bool] = (False, False, False)
                 ) -> tuple[Node, Node, Node]:
        """Host (exposing EXPOSED, pong off) with the VM and accessor alice, both up."""
        host = self.host([vm_spec(self.keys["vm"]), accessor("alice", self.keys["alice"],
                                                              ALICE_IP)], vnet=vnet[0])
        host.engine.set_expose([EXPOSED], HOST_ADDR, pong=False)
        listener = host.engine.transports[0]
        assert isinstance(listener, UdpTransport)
        vm = self.client("vm", listener, vnet=vnet[1])
        alice = self.client("alice", listener, vnet=vnet[2])
        wait_until(lambda: all(n.is_up() for n in (vm, alice)) and host.is_up("vm")
                   and host.is_up("alice"), UP, what="vm and alice up")
        return host, vm, alice

    def close(self) -> None:
        for engine in reversed(self.engines):
            engine.stop()
        for item in self.closables:
            item.close()


@pytest.fixture
def scene() -> Iterator[Scene]:
    made = Scene()
    try:
        yield made
    finally:
        made.close()


def drops(node: Node, name: str | None = None) -> dict[str, int]:
    source = node.engine.snapshot() if name is None else node.peer(name)
    return dict(source["drops"])


# --- peers at runtime ----------------------------------------------------------------------


def test_a_peer_added_at_runtime_can_log_in(scene: Scene) -> None:
    host = scene.host([vm_spec(scene.keys["vm"])])
    listener = host.engine.transports[0]
    assert isinstance(listener, UdpTransport)
    alice = scene.client("alice", listener)
    # Before it is added, its handshakes name a key nobody configured.
    wait_until(lambda: drops(host).get("unknown_peer", 0) >= 1, UP, what="a refused login")
    assert not alice.is_up()
    host.engine.add_peer(accessor("alice", scene.keys["alice"], ALICE_IP))
    wait_until(lambda: alice.is_up() and host.is_up("alice"), UP, what="alice up")
    snapshot = host.peer("alice")
    assert (snapshot["accessor"], snapshot["ip"]) == (True, ALICE_IP)
    assert (host.peer("vm")["accessor"], host.peer("vm")["ip"]) == (False, None)
    wait_until(lambda: any((e["peer"], e["state"], e["reason"]) == ("alice", "waiting", "added")
                           for e in host.engine.recent_events), UP, what="the event")


def test_add_peer_refuses_a_taken_name_key_or_address(scene: Scene) -> None:
    host = scene.host([vm_spec(scene.keys["vm"]),
                       accessor("alice", scene.keys["alice"], ALICE_IP)])
    add = host.engine.add_peer
    with pytest.raises(ValueError, match="peer named 'alice' already"):
        add(accessor("alice", os.urandom(32), BOB_IP))
    with pytest.raises(ValueError, match="same key as peer 'alice'"):
        add(accessor("bob", scene.keys["alice"], BOB_IP))
    with pytest.raises(ValueError, match=re.escape(f"has the address {ALICE_IP} already")):
        add(accessor("bob", scene.keys["bob"], ALICE_IP))
    with pytest.raises(ValueError, match="exactly its one address"):
        add(PeerSpec("bob", scene.keys["bob"], (TUNNEL,), (TUNNEL,), accessor=True))
    assert [p["name"] for p in host.engine.snapshot()["peers"]] == ["vm", "alice"]


class RawPeer:
    """A peer spoken by hand over a bare UDP socket, to send frames after its revocation."""

    def __init__(self, to: UdpTransport, psk: bytes, bind: str = LOOPBACK) -> None:
        self.psk = psk
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((bind, 0))
        self.sock.connect(to.local_endpoint)
        self.sock.settimeout(5)

    def login(self) -> tuple[protocol.Sealer, protocol.Opener]:
        pending = protocol.create_init(self.psk, 4242, time.time_ns())
        self.sock.send(pending.message)
        keys = protocol.consume_response(pending, self.sock.recv(2048))
        sealer = protocol.Sealer(keys.send, keys.remote_index)
        self.sock.send(sealer.seal(FrameType.KEEPALIVE, b""))  # confirms the session
        return sealer, protocol.Opener(keys.receive)

    def frames(self, opener: protocol.Opener) -> Iterator[tuple[int, bytes]]:
        while True:
            frame = self.sock.recv(65536)
            try:
                yield frame[0], opener.open(frame)
            except protocol.Dropped:
                continue  # a retransmitted control message: seen already

    def close(self) -> None:
        self.sock.close()


def test_remove_peer_cuts_a_connected_peer_at_once(scene: Scene) -> None:
    host = scene.host([vm_spec(scene.keys["vm"]),
                       accessor("alice", scene.keys["alice"], ALICE_IP)])
    listener = host.engine.transports[0]
    assert isinstance(listener, UdpTransport)
    raw = RawPeer(listener, scene.keys["alice"])
    try:
        sealer, opener = raw.login()
        wait_until(lambda: host.peer("alice")["state"] == "up", UP, what="alice up")
        before = drops(host).get("unknown_session", 0)

        assert host.engine.remove_peer("alice", "revoked by the test") is True
        # Its very next frame, sealed under the session it had, is a frame for nobody.
        raw.sock.send(sealer.seal(FrameType.DATA, udp(ALICE_IP, str(HOST_ADDR))))
        wait_until(lambda: drops(host).get("unknown_session", 0) == before + 1, UP,
                   what="the frame counted")
        assert host.interface.written == []
        assert [p["name"] for p in host.engine.snapshot()["peers"]] == ["vm"]
        # It was told why, then closed.
        reasons = []
        for ftype, payload in raw.frames(opener):
            if ftype == FrameType.CONTROL:
                message = messages.parse(payload)
                if message.kind == "close_reason":
                    reasons.append(message.body["reason"])
            if ftype == FrameType.CLOSE:
                break
        assert reasons == ["revoked by the test"]
        # And its key opens nothing any more.
        failed = host.engine.logins_failed
        raw.sock.send(protocol.create_init(scene.keys["alice"], 1, time.time_ns()).message)
        wait_until(lambda: host.engine.logins_failed == failed + 1, UP, what="a failed login")
    finally:
        raw.close()
    with pytest.raises(KeyError):
        host.engine.remove_peer("alice", "twice")
    wait_until(lambda: any((e["peer"], e["state"], e["reason"]) ==
                           ("alice", "removed", "revoked by the test")
                           for e in host.engine.recent_events), UP, what="the event")


def test_a_removed_client_is_told_and_stays_out(scene: Scene) -> None:
    host, vm, alice = scene.standard()
    assert host.engine.remove_peer("alice", "revoked") is True
    wait_until(lambda: alice.peer()["reason"] == "peer closed: revoked", UP,
               what="alice told why")
    # It tries again at once, with a key the host no longer knows.
    failed = host.engine.logins_failed
    wait_until(lambda: host.engine.logins_failed > failed, UP, what="alice's next login")
    assert not alice.is_up()
    assert vm.is_up() and host.is_up("vm")
    # Never connected: nothing to cut.
    host.engine.add_peer(accessor("bob", scene.keys["bob"], BOB_IP))
    assert host.engine.remove_peer("bob", "never came") is False


# --- the relay -----------------------------------------------------------------------------


def test_accessors_reach_exposed_routes_only_and_never_the_host(scene: Scene) -> None:
    host, vm, alice = scene.standard()
    # Accessor -> exposed route: straight to the VM.
    to_container = udp(ALICE_IP, CONTAINER, b"exposed")
    alice.interface.send(to_container)
    wait_until(lambda: vm.interface.written == [to_container], UP, what="the relayed packet")
    # Accessor -> anything else, the host's own address included: dropped and counted.
    for packet in (udp(ALICE_IP, HIDDEN_CONTAINER), udp(ALICE_IP, str(HOST_ADDR)),
                   udp(ALICE_IP, "192.168.251.1"), udp(ALICE_IP, "8.8.8.8"),
                   echo_request(ALICE_IP, str(HOST_ADDR))):  # pong is off
        alice.interface.send(packet)
    wait_until(lambda: drops(host, "alice").get("not_exposed") == 5, UP, what="5 drops")
    # VM -> accessor: from an exposed route only.
    answer = udp(CONTAINER, ALICE_IP, b"answer")
    vm.interface.send(udp(HIDDEN_CONTAINER, ALICE_IP, b"hidden"))
    vm.interface.send(answer)
    wait_until(lambda: alice.interface.written == [answer], UP, what="the answer")
    wait_until(lambda: drops(host, "vm").get("not_exposed") == 1, UP, what="the hidden one")
    # The VM's other traffic goes to the host as before; the host reaches the accessor.
    to_host = udp(CONTAINER, str(HOST_ADDR), b"for the host")
    vm.interface.send(to_host)
    from_host = udp(str(HOST_ADDR), ALICE_IP, b"from the host")
    host.interface.send(from_host)
    wait_until(lambda: alice.interface.written == [answer, from_host], UP, what="host->alice")
    wait_until(lambda: host.interface.written == [to_host], UP, what="vm->host")
    # Not one accessor packet reached the host's interface; counters say what went where.
    assert vm.interface.written == [to_container]
    assert (host.peer("alice")["rx_packets"], host.peer("alice")["tx_packets"]) == (1, 2)
    assert (host.peer("vm")["rx_packets"], host.peer("vm")["tx_packets"]) == (2, 1)


def test_an_accessor_cannot_use_another_accessors_address(scene: Scene) -> None:
    host, vm, alice = scene.standard()
    host.engine.add_peer(accessor("bob", scene.keys["bob"], BOB_IP))
    for source in (BOB_IP, "192.168.251.1", CONTAINER):
        alice.interface.send(udp(source, CONTAINER))
    wait_until(lambda: drops(host, "alice").get("source_not_allowed") == 3, UP,
               what="3 spoofed packets counted")
    assert vm.interface.written == [] and host.interface.written == []


def test_pong_is_answered_by_the_engine_when_on(scene: Scene) -> None:
    host, vm, alice = scene.standard()
    host.engine.set_expose([EXPOSED], HOST_ADDR, pong=True)
    request = echo_request(ALICE_IP, str(HOST_ADDR), ident=42)
    alice.interface.send(request)
    (reply,) = wait_until(lambda: alice.interface.written, UP, what="the echo reply")
    assert reply[12:16] == socket.inet_aton(str(HOST_ADDR))
    assert reply[16:20] == socket.inet_aton(ALICE_IP)
    assert reply[20] == 0 and reply[24:] == request[24:]  # type 0, same id, seq and data
    assert checksum(reply[:20]) == 0 and checksum(reply[20:]) == 0
    # Only echo requests: anything else to the host's address is still refused.
    alice.interface.send(udp(ALICE_IP, str(HOST_ADDR)))
    wait_until(lambda: drops(host, "alice").get("not_exposed") == 1, UP, what="the udp one")
    host.engine.set_expose([EXPOSED], HOST_ADDR, pong=False)
    alice.interface.send(request)
    wait_until(lambda: drops(host, "alice").get("not_exposed") == 2, UP, what="pong off")
    assert len(alice.interface.written) == 1
    assert host.interface.written == [] and vm.interface.written == []


def test_the_expose_policy_changes_at_runtime(scene: Scene) -> None:
    host, vm, alice = scene.standard()
    host.engine.set_expose([EXPOSED, HIDDEN], HOST_ADDR, pong=False)
    packet = udp(ALICE_IP, HIDDEN_CONTAINER)
    alice.interface.send(packet)
    wait_until(lambda: vm.interface.written == [packet], UP, what="newly exposed")
    host.engine.set_expose([], HOST_ADDR, pong=False)
    alice.interface.send(udp(ALICE_IP, CONTAINER))
    wait_until(lambda: drops(host, "alice").get("not_exposed") == 1, UP, what="nothing exposed")
    assert host.engine.snapshot()["relay"] == {"exposed": [], "pong": False}


@pytest.mark.parametrize("vm_takes_super_packets", [True, False])
def test_super_packets_are_relayed_whole_or_cut(scene: Scene,
                                                vm_takes_super_packets: bool) -> None:
    host, vm, alice = scene.standard(vnet=(True, vm_takes_super_packets, True))
    assert alice.peer()["gso"] and host.peer("alice")["gso"]
    assert host.peer("vm")["gso"] is vm_takes_super_packets
    mss = 1000
    packet = tcp_super(ALICE_IP, CONTAINER, 10 * mss + 123, mss)
    vnet_header = struct.pack("<BBHHHH", gso.F_NEEDS_CSUM, gso.GSO_TCPV4, 40, mss, 20, 16)
    alice.interface.send_super(vnet_header, packet)
    if vm_takes_super_packets:
        wait_until(lambda: vm.interface.written_gso == [(vnet_header, packet)], UP,
                   what="the super-packet, whole")
        assert host.peer("vm")["tx_super"] == 1
    else:
        wait_until(lambda: len(vm.interface.written) == 11, UP, what="11 segments")
        segments = vm.interface.written
        assert b"".join(s[40:] for s in segments) == packet[40:]
        assert all(checksum(s[:20]) == 0 and tcp_checksum_ok(s) for s in segments)
        assert [int.from_bytes(s[24:28], "big") for s in segments] == \
            [1000 + i * mss for i in range(11)]
        assert [s[33] for s in segments] == [0x10] * 10 + [0x18]  # PSH on the last only
    assert host.interface.written == [] and host.interface.written_gso == []


# --- listeners at runtime ------------------------------------------------------------------


def test_listeners_come_and_go_without_moving_anyone(scene: Scene) -> None:
    first = scene.listener()
    host = scene.host([vm_spec(scene.keys["vm"]), accessor("alice", scene.keys["alice"], ALICE_IP),
                       accessor("bob", scene.keys["bob"], BOB_IP)], transports=[first])
    host.engine.set_expose([EXPOSED], HOST_ADDR, pong=False)
    vm = scene.client("vm", first)
    second = scene.listener()
    host.engine.add_transport(second)
    alice = scene.client("alice", second)
    wait_until(lambda: vm.is_up() and alice.is_up() and host.is_up("alice"), UP,
               what="vm on the first listener, alice on the second")
    assert [t["local_endpoint"] for t in host.engine.snapshot()["transports"]] == \
        [list(first.local_endpoint), list(second.local_endpoint)]
    packet, answer = udp(ALICE_IP, CONTAINER), udp(CONTAINER, ALICE_IP)
    alice.interface.send(packet)
    vm.interface.send(answer)
    wait_until(lambda: vm.interface.written == [packet] and alice.interface.written == [answer],
               UP, what="relayed across listeners")

    host.engine.remove_transport(second)
    assert host.peer("alice")["endpoint"] is None  # at once: nothing more goes out there
    assert second.fileno() == -1  # closed
    assert [t["local_endpoint"] for t in host.engine.snapshot()["transports"]] == \
        [list(first.local_endpoint)]
    to_vm = udp(str(HOST_ADDR), CONTAINER)
    host.interface.send(to_vm)
    wait_until(lambda: vm.interface.written == [packet, to_vm], UP, what="the vm unaffected")

    # A new listener takes a new path; the removed one's is never reused.
    third = scene.listener()
    host.engine.add_transport(third)
    assert [t.name for t in host.engine.transports] == ["udp", "removed", "udp"]
    bob = scene.client("bob", third)
    wait_until(lambda: bob.is_up() and host.is_up("bob"), UP, what="bob on the third")
    assert host.engine._peer("bob").path == 2
    assert host.engine._peer("vm").path == 0
    bob_packet = udp(BOB_IP, CONTAINER, b"bob")
    bob.interface.send(bob_packet)
    wait_until(lambda: vm.interface.written[-1:] == [bob_packet], UP, what="bob relayed")

    with pytest.raises(ValueError, match="not listening"):
        host.engine.remove_transport(second)
    with pytest.raises(ValueError, match="already listening"):
        host.engine.add_transport(third)
    host.engine.remove_transport(third)
    with pytest.raises(ValueError, match="at least one transport"):
        host.engine.remove_transport(first)


def test_accessors_log_in_only_at_the_expose_listener_and_the_vm_never_there(
        scene: Scene) -> None:
    host = scene.host([vm_spec(scene.keys["vm"]), accessor("alice", scene.keys["alice"],
                                                            ALICE_IP)])
    host.engine.set_expose([EXPOSED], HOST_ADDR, pong=False)
    main = host.engine.transports[0]
    assert isinstance(main, UdpTransport)
    expose = scene.listener()
    host.engine.add_transport(expose, accessors=True)
    vm = scene.client("vm", main)
    wait_until(lambda: vm.is_up() and host.is_up("vm"), UP, what="vm up at its listener")
    # alice with her right key, at the VM's listener: refused, counted, never up.
    wrong = scene.client("alice", main)
    wait_until(lambda: drops(host, "alice").get("wrong_listener", 0) >= 2, UP,
               what="alice refused at the VM's listener")
    assert host.peer("alice")["state"] == "waiting" and not wrong.is_up()
    wrong.engine.stop()
    # The VM's key at the expose listener: refused the same way, the VM's session untouched.
    stray = scene.client("vm", expose)
    wait_until(lambda: drops(host, "vm").get("wrong_listener", 0) >= 2, UP,
               what="the VM's key refused at the expose listener")
    stray.engine.stop()
    assert host.engine._peer("vm").path == 0
    # At the expose listener alice gets in, and her traffic is relayed.
    alice = scene.client("alice", expose)
    wait_until(lambda: alice.is_up() and host.is_up("alice"), UP, what="alice up")
    packet = udp(ALICE_IP, CONTAINER)
    alice.interface.send(packet)
    wait_until(lambda: vm.interface.written[-1:] == [packet], UP, what="alice relayed")


# --- failed logins -------------------------------------------------------------------------


def test_a_login_flood_is_limited_and_costs_a_legitimate_accessor_nothing(scene: Scene) -> None:
    host, vm, alice = scene.standard()
    listener = host.engine.transports[0]
    assert isinstance(listener, UdpTransport)
    flooder = RawPeer(listener, os.urandom(32), bind=FLOODER)
    try:
        forged = bytearray(protocol.create_init(scene.keys["alice"], 1, time.time_ns()).message)
        forged[-1] ^= 1  # alice's key id, a MAC nobody can make without her key
        sent: list[bytes] = []
        started = time.monotonic()
        for i in range(1000):
            if i % 2:
                flooder.sock.send(bytes(forged))
            else:
                flooder.sock.send(protocol.create_init(os.urandom(32), i, time.time_ns())
                                  .message)
            if i % 4 == 0:
                packet = udp(ALICE_IP, CONTAINER, i.to_bytes(4, "big"))
                alice.interface.send(packet)
                sent.append(packet)

        def all_counted() -> dict[str, int] | None:
            logins: dict[str, int] = host.engine.snapshot()["logins"]
            return logins if logins["failed"] + logins["rate_limited"] == 1000 else None

        logins = wait_until(all_counted, UP, what="every flooded login counted")
        assert logins is not None
        elapsed = time.monotonic() - started
        # Every one of alice's packets arrived, in order, while the flood went on.
        wait_until(lambda: len(vm.interface.written) == len(sent), UP, what="alice's packets")
        assert vm.interface.written == sent
        # A burst, then one a second: the rest was dropped unchecked.
        assert logins["failed"] <= LOGIN_BURST + elapsed + 1
        assert logins["rate_limited"] == drops(host)["login_rate_limited"] >= 900
        assert drops(host).get("unknown_peer", 0) + drops(host, "alice").get("bad_mac", 0) == \
            logins["failed"]
        # Alice, from her own address, logs in again as usual.
        handshakes = host.peer("alice")["handshakes"]
        alice.engine.disconnect("host", "log in again")
        wait_until(lambda: host.peer("alice")["handshakes"] == handshakes + 1 and alice.is_up()
                   and host.is_up("alice"), UP, what="alice's new session")
        assert alice.peer()["handshakes"] == 2
    finally:
        flooder.close()


def test_an_address_out_of_budget_is_ignored_even_with_the_right_key(scene: Scene) -> None:
    """The engine's clock is the caller's: frames handed in with chosen times."""
    listener = scene.listener()
    interface = StandIn("host")
    scene.closables.append(interface)
    alice = accessor("alice", scene.keys["alice"], ALICE_IP)
    engine = Engine(Role.HOST, interface, [listener], [alice], 1400, EngineTimers(),
                    name="host", version="1")
    scene.engines.append(engine)
    flooder, elsewhere = (FLOODER, 40000), (LOOPBACK, 40001)

    def init(psk: bytes) -> bytes:
        return protocol.create_init(psk, 1, time.time_ns()).message

    for _ in range(1000):
        engine.receive_frame(init(os.urandom(32)), flooder, 100.0)
    assert engine.logins_failed == LOGIN_BURST
    assert engine.drops_in == {"unknown_peer": LOGIN_BURST,
                               "login_rate_limited": 1000 - LOGIN_BURST}
    peer = engine.peers[0]
    engine.receive_frame(init(scene.keys["alice"]), flooder, 100.0)
    assert engine.drops_in["login_rate_limited"] == 1001 - LOGIN_BURST
    assert peer.pending_response is None  # not even looked at
    # The same key from any other address is answered as always ...
    engine.receive_frame(init(scene.keys["alice"]), elsewhere, 100.0)
    assert peer.pending_response is not None
    # ... and the flooding address gets one more try a second.
    engine.receive_frame(init(os.urandom(32)), flooder, 101.0)
    engine.receive_frame(init(os.urandom(32)), flooder, 101.0)
    assert engine.logins_failed == LOGIN_BURST + 1
    assert engine.drops_in["login_rate_limited"] == 1002 - LOGIN_BURST


def test_failed_logins_budget_per_address() -> None:
    limits = FailedLogins(burst=3, refill=1.0, max_sources=2)
    for _ in range(3):
        assert limits.allowed("10.0.0.1", 100.0)
        limits.failed("10.0.0.1", 100.0)
    assert not limits.allowed("10.0.0.1", 100.0)
    assert limits.allowed("10.0.0.2", 100.0)  # another address is not affected
    assert limits.limited(100.0) == 1
    assert limits.allowed("10.0.0.1", 101.0)  # one token back after a second
    # Bounded: the least recently failed address is forgotten first.
    limits.failed("10.0.0.2", 100.0)
    limits.failed("10.0.0.3", 100.0)
    assert len(limits) == 2 and limits.allowed("10.0.0.1", 100.0)


# --- relay packets -------------------------------------------------------------------------


def test_echo_reply_refuses_what_is_not_an_unfragmented_echo_request() -> None:
    request = echo_request(ALICE_IP, str(HOST_ADDR))
    assert relay.echo_reply(request) is not None
    assert relay.echo_reply(udp(ALICE_IP, str(HOST_ADDR))) is None
    fragment = bytearray(request)
    fragment[6] |= 0x20  # more fragments
    assert relay.echo_reply(bytes(fragment)) is None
    reply_already = bytearray(request)
    reply_already[20] = 0
    assert relay.echo_reply(bytes(reply_already)) is None


def test_plain_packets_cut_like_the_kernel() -> None:
    mss = 500
    packet = tcp_super(ALICE_IP, CONTAINER, 3 * mss, mss, seq=0xFFFFFF00, flags=0x80 | 0x19)
    wire = struct.pack(">BBHHHH", gso.F_NEEDS_CSUM, gso.GSO_TCPV4 | gso.GSO_ECN, 40, mss, 20, 16)
    segments = relay.plain_packets(wire + packet)
    assert [len(s) for s in segments] == [540] * 3
    assert [int.from_bytes(s[4:6], "big") for s in segments] == [100, 101, 102]
    assert [int.from_bytes(s[24:28], "big") for s in segments] == \
        [0xFFFFFF00, (0xFFFFFF00 + mss) & 0xFFFFFFFF, (0xFFFFFF00 + 2 * mss) & 0xFFFFFFFF]
    # CWR on the first only, FIN and PSH on the last only.
    assert [s[33] for s in segments] == [0x90, 0x10, 0x19]
    assert all(checksum(s[:20]) == 0 and tcp_checksum_ok(s) for s in segments)
    # Only a checksum left to do: finished, one packet.
    small = bytearray(udp(ALICE_IP, CONTAINER, b"odd length!"))
    pseudo = small[12:20] + struct.pack(">BBH", 0, 17, len(small) - 20)
    partial = ~checksum(bytes(pseudo)) & 0xFFFF  # what the kernel leaves: the pseudo sum
    small[26:28] = partial.to_bytes(2, "big")
    wire = struct.pack(">BBHHHH", gso.F_NEEDS_CSUM, gso.GSO_NONE, 0, 0, 20, 6)
    (finished,) = relay.plain_packets(wire + bytes(small))
    assert checksum(bytes(pseudo) + finished[20:]) == 0


# --- a peer that restarts before it looks dead -------------------------------------------


def test_a_peer_restarting_within_dead_after_is_announced_up_again(scene: Scene) -> None:
    """Its new run knows nothing of what the host sent the old one (routes, links, hosts):
    the host's features resend on "up", so a quick restart must produce one, exactly one."""
    host = scene.host([vm_spec(scene.keys["vm"])])
    listener = host.engine.transports[0]
    assert isinstance(listener, UdpTransport)
    first = scene.client("vm", listener)
    wait_until(lambda: first.is_up() and host.is_up("vm"), UP, what="vm up")

    def ups() -> list[str]:
        return [e["reason"] for e in host.engine.recent_events
                if (e["peer"], e["state"]) == ("vm", "up")]

    wait_until(lambda: len(ups()) == 1, UP, what="the first up announced")
    # No CLOSE from the old run (it "crashed"), and the new one logs in at once.
    first.engine._stop.set()
    second = scene.client("vm", listener)
    wait_until(lambda: second.is_up() and "peer restarted" in ups(), UP,
               what="the restart announced")
    assert host.peer("vm")["state"] == "up"
    # The restart was announced once, beside the first handshake; never for the new run's
    # own later messages.
    second.engine.send_control("host", "close_reason", reason="a later control message")
    wait_until(lambda: not second.engine.peers[0].control.unacked, UP,
               what="the message acknowledged")
    assert ups() == ["handshake complete", "peer restarted"]
