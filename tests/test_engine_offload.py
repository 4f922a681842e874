"""The engine's side of offloads, with an interface and a transport that only record: which
frame type a packet becomes, what reaches the interface, and when offloads go on."""

from __future__ import annotations

import os
import struct
import time
from ipaddress import IPv4Address, IPv4Network

from ctun.core import gso, messages
from ctun.core.contracts import Endpoint, Transport, VirtualInterface
from ctun.core.engine import Engine, EngineTimers, PeerSpec, Role
from ctun.core.protocol import FrameType, Opener, Sealer, SessionKeys
from ctun.core.session import Session

HOST = ("10.251.0.1", 2511)


class RecordingInterface(VirtualInterface):
    name = "ctunfake"

    def __init__(self, vnet: bool) -> None:
        self.vnet = vnet
        self.offload = False
        self.incoming: list[bytes] = []
        self.written: list[tuple[bytes, bytes]] = []

    def fileno(self) -> int:
        return -1

    def read_packets(self, limit: int) -> list[bytes]:
        packets, self.incoming = self.incoming[:limit], self.incoming[limit:]
        return packets

    def write_packet(self, packet: bytes) -> None:
        self.written.append((gso.ZERO, bytes(packet)))

    def write_gso(self, header: bytes, packet: bytes | memoryview) -> None:
        self.written.append((bytes(header), bytes(packet)))

    def set_offload(self, enabled: bool) -> None:
        self.offload = enabled

    def close(self) -> None:
        pass


class RecordingTransport(Transport):
    name = "rec"
    max_frame = 65535

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.calls = 0

    @classmethod
    def listen(cls, bind: Endpoint) -> RecordingTransport:
        return cls()

    @classmethod
    def connect(cls, remote: Endpoint) -> RecordingTransport:
        return cls()

    @property
    def local_endpoint(self) -> Endpoint:
        return ("10.251.0.2", 40000)

    def fileno(self) -> int:
        return -1

    def receive(self, limit: int = 64) -> list[tuple[bytes, Endpoint]]:
        return []

    def send(self, frame: bytes, to: Endpoint) -> None:
        self.sent.append(frame)

    def send_many(self, frames: list[bytes], to: Endpoint) -> None:
        self.calls += 1
        self.sent += frames

    def close(self) -> None:
        pass


def tcp(size: int, src: str = "172.18.0.2") -> bytes:
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, size, 1, 0x4000, 64, 6, 0,
                     IPv4Address(src).packed, IPv4Address("192.168.251.2").packed)
    return ip + bytes([0] * 12 + [0x50] + [0] * 7) + bytes(size - 40)


def vm_engine(vnet: bool, peer_gso: bool, transport: Transport | None = None
              ) -> tuple[Engine, RecordingInterface, RecordingTransport, Sealer, Opener]:
    interface = RecordingInterface(vnet)
    recorder = RecordingTransport()
    spec = PeerSpec("host", os.urandom(32), (IPv4Network("192.168.251.0/24"),), ())
    engine = Engine(Role.VM, interface, [transport or recorder], [spec], 1400, EngineTimers(),
                    name="vm", version="1", remote=HOST)
    key_out, key_in = os.urandom(32), os.urandom(32)
    session = Session(SessionKeys(send=key_out, receive=key_in, local_index=1,
                                  remote_index=2), time.monotonic(), initiator=True,
                      confirmed=True)
    peer = engine.peers[0]
    peer.current, peer.gso = session, peer_gso
    engine._sessions[1] = (session, peer)
    # The host's ends of the same keys.
    return engine, interface, recorder, Sealer(key_in, 1), Opener(key_out)


def test_super_packets_go_whole_as_data_gso_and_plain_ones_as_data() -> None:
    engine, interface, transport, _, opener = vm_engine(vnet=True, peer_gso=True)
    super_header = struct.pack("<BBHHHH", 1, 1, 40, 1348, 20, 16)
    big, small = tcp(30000, src="192.168.251.1"), tcp(100, src="192.168.251.1")
    interface.incoming = [super_header + big, gso.ZERO + small]
    engine._from_interface()
    assert transport.calls == 1  # one batch for both
    first, second = transport.sent
    assert first[0] == FrameType.DATA_GSO and second[0] == FrameType.DATA
    assert opener.open(first) == gso.vnet_to_wire(super_header) + big
    assert opener.open(second) == small
    counters = engine.peers[0].counters
    assert (counters.tx_packets, counters.tx_super, counters.tx_bytes) == (2, 1, 30100)


def test_a_packet_with_only_its_checksum_left_goes_finished_as_data() -> None:
    engine, interface, transport, _, opener = vm_engine(vnet=True, peer_gso=False)
    packet = bytearray(tcp(300, src="192.168.251.1"))
    packet[36:38] = b"\x12\x34"  # what the kernel leaves: the pseudo-header's sum
    interface.incoming = [struct.pack("<BBHHHH", 1, 0, 0, 0, 20, 16) + bytes(packet)]
    engine._from_interface()
    (frame,) = transport.sent
    assert frame[0] == FrameType.DATA
    sent = opener.open(frame)
    assert sent[:36] == packet[:36] and sent[38:] == packet[38:]
    # The segment's words (the new checksum among them) plus the pseudo-header's sum the
    # kernel had left there add up, in ones' complement, to all ones.
    total = sum(struct.unpack("!140H", sent[20:])) + 0x1234
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF


def test_a_peer_that_did_not_ask_for_super_packets_never_gets_one() -> None:
    engine, interface, transport, _, _ = vm_engine(vnet=True, peer_gso=False)
    interface.incoming = [struct.pack("<BBHHHH", 1, 1, 40, 1348, 20, 16) + tcp(3000)]
    engine._from_interface()
    assert transport.sent == []
    assert engine.peers[0].counters.drops_out == {"gso_unsupported": 1}
    # ...and offloads stay off until every connected peer takes them.
    engine._update_offload()
    assert not interface.offload
    engine.peers[0].gso = True
    engine._update_offload()
    assert interface.offload
    engine.peers[0].current = None
    engine._update_offload()
    assert not interface.offload


def test_received_super_packets_reach_the_interface_with_their_header() -> None:
    engine, interface, _, sealer, _ = vm_engine(vnet=True, peer_gso=True)
    wire = struct.pack(">BBHHHH", 1, 1, 40, 1348, 20, 16)
    packet = tcp(20000, src="192.168.251.2")
    engine.receive_frame(sealer.seal(FrameType.DATA_GSO, wire + packet), HOST, time.monotonic())
    engine.receive_frame(sealer.seal(FrameType.DATA, tcp(80, src="192.168.251.2")), HOST,
                         time.monotonic())
    assert interface.written == [(gso.wire_to_vnet(wire), packet),
                                 (gso.ZERO, tcp(80, src="192.168.251.2"))]
    assert engine.peers[0].counters.rx_super == 1


def test_super_packets_are_refused_where_we_never_offered_to_take_them() -> None:
    engine, interface, _, sealer, _ = vm_engine(vnet=False, peer_gso=True)
    wire = struct.pack(">BBHHHH", 1, 1, 40, 1348, 20, 16)
    frame = sealer.seal(FrameType.DATA_GSO, wire + tcp(1000, src="192.168.251.2"))
    engine.receive_frame(frame, HOST, time.monotonic())
    assert interface.written == []
    assert engine.peers[0].counters.drops_in == {"gso_unsupported": 1}
    # A frame over the ordinary limit is oversize unless it is a super-packet we take.
    big = sealer.seal(FrameType.DATA_GSO, wire + tcp(30000, src="192.168.251.2"))
    engine.receive_frame(big, HOST, time.monotonic())
    assert engine.drops_in == {"oversize": 1}


def test_a_super_packet_too_big_for_the_transport_is_counted_not_sent() -> None:
    class Small(RecordingTransport):
        max_frame = 9216

    small = Small()
    engine, interface, _, _, _ = vm_engine(vnet=True, peer_gso=True, transport=small)
    interface.incoming = [struct.pack("<BBHHHH", 1, 1, 40, 1348, 20, 16)
                          + tcp(20000, src="192.168.251.1")]
    engine._from_interface()
    assert small.sent == [] and engine.peers[0].counters.drops_out == {"oversize": 1}


def test_hello_says_whether_we_take_super_packets() -> None:
    for vnet in (True, False):
        engine, _, _, _, _ = vm_engine(vnet=vnet, peer_gso=False)
        engine._queue_hello(engine.peers[0])
        (payload, _, _), = engine.peers[0].control.unacked.values()
        message = messages.parse(payload)
        assert message.body["features"] == (["gso"] if vnet else [])
    # A hello without the list (an older peer) is valid and means "no".
    old = messages.parse(messages.encode("hello", 1, role="host", name="h", version="0.1"))
    assert "features" not in old.body
