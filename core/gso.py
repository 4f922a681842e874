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
