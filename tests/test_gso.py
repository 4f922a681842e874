"""Offload super-packets: the header's two byte orders and the checks before the kernel."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from ctun.core import gso
from ctun.core.protocol import Drop, Dropped, Prefixes
from hypothesis import given
from hypothesis import strategies as st

ALLOWED = Prefixes(["172.18.0.0/16"])
MTU = 1400


def tcp_packet(payload: int, src: str = "172.18.0.2", proto: int = 6, doff: int = 5,
               total: int | None = None) -> bytes:
    tcp = bytes(12) + bytes([doff << 4]) + bytes(7) + bytes(4 * (doff - 5))
    size = 20 + len(tcp) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, size if total is None else total, 1, 0x4000,
                     64, proto, 0, IPv4Address(src).packed, IPv4Address("10.0.0.1").packed)
    return ip + tcp + bytes(payload)


def frame(packet: bytes, flags: int = gso.F_NEEDS_CSUM, gso_type: int = gso.GSO_TCPV4,
          gso_size: int = 1348, csum_start: int = 20, csum_offset: int = 16) -> bytes:
    header = struct.pack(">BBHHHH", flags, gso_type, 52, gso_size, csum_start, csum_offset)
    return header + packet


def reason(payload: bytes) -> Drop | None:
    try:
        gso.check_gso_inner(payload, ALLOWED, MTU)
    except Dropped as exc:
        return Drop(str(exc))
    return None


def test_header_byte_orders_round_trip_and_differ() -> None:
    vnet = struct.pack("<BBHHHH", 1, 1, 52, 1348, 20, 16)
    wire = gso.vnet_to_wire(vnet)
    assert wire == struct.pack(">BBHHHH", 1, 1, 52, 1348, 20, 16)
    assert gso.wire_to_vnet(wire) == vnet
    assert len(gso.ZERO) == gso.HEADER_LEN == 10


@given(st.binary(min_size=10, max_size=10))
def test_any_header_round_trips(vnet: bytes) -> None:
    assert gso.wire_to_vnet(gso.vnet_to_wire(vnet)) == vnet


def test_a_kernel_made_super_packet_passes() -> None:
    assert reason(frame(tcp_packet(40 * 1348))) is None
    # Up to the largest IPv4 packet there is.
    assert reason(frame(tcp_packet(65535 - 40))) is None
    # A small packet that only needs its checksum finished.
    assert reason(frame(tcp_packet(100), gso_type=gso.GSO_NONE, gso_size=0)) is None
    # ECN rides along with TCPv4.
    assert reason(frame(tcp_packet(3000), gso_type=gso.GSO_TCPV4 | gso.GSO_ECN)) is None


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (frame(tcp_packet(3000), gso_size=1361), Drop.INNER_TOO_BIG),  # 20+20+1361 > 1400
        (frame(tcp_packet(3000), gso_size=0), Drop.INNER_TOO_BIG),
        (frame(tcp_packet(1500), gso_type=gso.GSO_NONE, gso_size=0), Drop.INNER_TOO_BIG),
        (frame(tcp_packet(3000), gso_type=3), Drop.INNER_MALFORMED),  # UDP (UFO): never
        (frame(tcp_packet(3000), gso_type=gso.GSO_NONE | gso.GSO_ECN), Drop.INNER_MALFORMED),
        (frame(tcp_packet(3000, proto=17)), Drop.INNER_MALFORMED),  # says TCP, is not
        (frame(tcp_packet(3000), flags=4), Drop.INNER_MALFORMED),
        (frame(tcp_packet(3000), csum_start=10), Drop.INNER_MALFORMED),  # inside the IP header
        (frame(tcp_packet(100), csum_start=20, csum_offset=200), Drop.INNER_MALFORMED),
        (frame(tcp_packet(3000, total=1000)), Drop.INNER_MALFORMED),
        (frame(tcp_packet(3000, src="10.9.9.9")), Drop.SOURCE_NOT_ALLOWED),
        (frame(b"\x60" + bytes(60)), Drop.INNER_NOT_IPV4),
        (frame(bytes(10)), Drop.INNER_MALFORMED),
        (bytes(12), Drop.INNER_MALFORMED),
    ],
)
def test_nonsense_is_dropped_by_reason(payload: bytes, expected: Drop) -> None:
    assert reason(payload) is expected


@given(st.binary(max_size=200))
def test_the_check_never_raises_anything_but_dropped(payload: bytes) -> None:
    reason(payload)
