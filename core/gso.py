"""Offload super-packets: the per-packet header that travels with them, and its checks.

With Linux tun offloads on, the kernel hands ctun TCP packets of up to ~64 KB (to be cut
into MTU-sized segments later) and packets whose checksum is still to be completed. Each
comes with a 10-byte virtio-net header saying how. ctun carries such a packet across the
tunnel whole, in one DATA_GSO frame, with the header in the protocol's byte order, and the
far side hands it to its own kernel with the header back in virtio order. Cutting it into
segments then happens once, in the receiving kernel, instead of 45 times in Python.
"""

from __future__ import annotations

import struct

from .protocol import Drop, Dropped, Prefixes

HEADER_LEN = 10
# virtio-net header as tun reads and writes it: little-endian (ctun sets TUNSETVNETLE).
_VNET = struct.Struct("<BBHHHH")
# The same fields on the wire: big-endian, like everything else in the protocol.
_WIRE = struct.Struct(">BBHHHH")
ZERO = bytes(HEADER_LEN)

F_NEEDS_CSUM = 1  # the checksum at csum_start + csum_offset holds only the pseudo-header sum
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_ECN = 0x80  # with TCPV4: segments carry ECN (CWR only on the first)

_IPPROTO_TCP = 6


def vnet_to_wire(vnet: bytes | memoryview) -> bytes:
    return _WIRE.pack(*_VNET.unpack_from(vnet))


def wire_to_vnet(wire: bytes | memoryview) -> bytes:
    return _VNET.pack(*_WIRE.unpack_from(wire))


def finish_checksum(vnet_packet: bytes) -> bytes | None:
    """The bare packet with its checksum completed, for a packet the kernel handed over with
    only NEEDS_CSUM set (no segmentation); None for anything else.

    Sent that way it travels as ordinary DATA, and the far kernel takes a finished packet:
    measured here, that costs the pair of pumps less than carrying the header along.
    """
    flags, gso_type, _hdr, _size, start, offset = _VNET.unpack_from(vnet_packet)
    if gso_type != GSO_NONE or flags & ~F_DATA_VALID != F_NEEDS_CSUM:
        return None
    packet = bytearray(vnet_packet[HEADER_LEN:])
    where = start + offset
    if start >= len(packet) or where + 2 > len(packet):
        return None
    covered = packet[start:]
    if len(covered) % 2:
        covered += b"\x00"
    # The ones'-complement sum of 16-bit words is the number they make, modulo 0xFFFF
    # (2**16 is 1 modulo 0xFFFF); the field holds the pseudo-header's sum already.
    total = int.from_bytes(covered, "big") % 0xFFFF
    checksum = 0xFFFF - total if total else 0xFFFF
    # 0 would mean "no checksum" to UDP; 0xFFFF is the same value to everyone.
    packet[where:where + 2] = (checksum or 0xFFFF).to_bytes(2, "big")
    return bytes(packet)


def check_gso_inner(payload: bytes, allowed_sources: Prefixes, mtu: int) -> None:
    """Sanity of a decrypted DATA_GSO payload (header + IPv4 packet) before the kernel sees
    it. The kernel validates the header again; this keeps a confused peer's nonsense (and
    anything not IPv4, or from a source it does not own) out of it and counts it by reason.
    """
    size = len(payload) - HEADER_LEN
    if size < 20:
        raise Dropped(Drop.INNER_MALFORMED)
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = _WIRE.unpack_from(payload)
    first = payload[HEADER_LEN]
    if first >> 4 != 4:
        raise Dropped(Drop.INNER_NOT_IPV4)
    ip_len = (first & 0x0F) * 4
    total = int.from_bytes(payload[HEADER_LEN + 2:HEADER_LEN + 4], "big")
    if ip_len < 20 or ip_len > size or total != size:
        raise Dropped(Drop.INNER_MALFORMED)
    if flags & ~(F_NEEDS_CSUM | F_DATA_VALID):
        raise Dropped(Drop.INNER_MALFORMED)
    if flags & F_NEEDS_CSUM and (csum_start < ip_len or csum_start + csum_offset + 2 > size):
        raise Dropped(Drop.INNER_MALFORMED)
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        if gso_type != GSO_NONE:
            raise Dropped(Drop.INNER_MALFORMED)
        if size > mtu:
            raise Dropped(Drop.INNER_TOO_BIG)
    elif kind == GSO_TCPV4:
        if payload[HEADER_LEN + 9] != _IPPROTO_TCP or ip_len + 20 > size:
            raise Dropped(Drop.INNER_MALFORMED)
        tcp_len = (payload[HEADER_LEN + ip_len + 12] >> 4) * 4
        # Every segment the kernel cuts from it must fit the tunnel's MTU.
        if gso_size == 0 or tcp_len < 20 or ip_len + tcp_len + gso_size > mtu:
            raise Dropped(Drop.INNER_TOO_BIG)
    else:
        raise Dropped(Drop.INNER_MALFORMED)
    source = int.from_bytes(payload[HEADER_LEN + 12:HEADER_LEN + 16], "big")
    if source not in allowed_sources:
        raise Dropped(Drop.SOURCE_NOT_ALLOWED)
