"""Packets the host's engine makes itself when it relays between peers (accessors and the VM).

Two jobs, both pure functions on bytes: the answer to an accessor's ping of the host's tunnel
address (the host's kernel never sees accessor traffic, so the engine answers), and a DATA_GSO
payload turned into plain packets for a peer that never offered to take super-packets.
"""

from __future__ import annotations

import struct

from .gso import F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, HEADER_LEN

_WIRE = struct.Struct(">BBHHHH")  # the offload header as DATA_GSO carries it (core/gso.py)
_ICMP = 1
_ICMP_ECHO_REQUEST, _ICMP_ECHO_REPLY = 8, 0
_TCP_FIN, _TCP_PSH, _TCP_CWR = 0x01, 0x08, 0x80
REPLY_TTL = 64


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum of `data` (plus `initial`, an unfolded sum of more words)."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    # The ones'-complement sum of 16-bit words is the number they make, modulo 0xFFFF; one
    # big-integer remainder does in C what a loop over the words would do in Python.
    total = (int.from_bytes(data, "big") + initial) % 0xFFFF
    return 0xFFFF - total if total else 0xFFFF


def echo_reply(packet: bytes) -> bytes | None:
    """The echo reply to an unfragmented ICMP echo request, as its destination would send
    it; None for anything else."""
    header_len = (packet[0] & 0x0F) * 4
    if (
        packet[9] != _ICMP
        or len(packet) < header_len + 8
        or int.from_bytes(packet[6:8], "big") & 0x3FFF  # a fragment: not ours to reassemble
        or packet[header_len] != _ICMP_ECHO_REQUEST
        or packet[header_len + 1] != 0
    ):
        return None
    reply = bytearray(packet)
    reply[12:16], reply[16:20] = packet[16:20], packet[12:16]
    reply[8] = REPLY_TTL
    reply[10:12] = b"\x00\x00"
    reply[10:12] = checksum(reply[:header_len]).to_bytes(2, "big")
    reply[header_len] = _ICMP_ECHO_REPLY
    reply[header_len + 2:header_len + 4] = b"\x00\x00"
    reply[header_len + 2:header_len + 4] = checksum(reply[header_len:]).to_bytes(2, "big")
    return bytes(reply)


def plain_packets(payload: bytes) -> list[bytes]:
    """What a DATA_GSO payload (wire header + IPv4 packet, already through check_gso_inner)
    becomes for a peer that takes only whole packets: the packet with its checksum finished,
    or a TCP super-packet cut into the segments the receiving kernel would have cut."""
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = _WIRE.unpack_from(payload)
    packet = bytearray(payload[HEADER_LEN:])
    if gso_type == GSO_NONE:
        if flags & F_NEEDS_CSUM:
            where = csum_start + csum_offset
            # The field holds the pseudo-header's sum already: add the rest to it.
            packet[where:where + 2] = checksum(packet[csum_start:]).to_bytes(2, "big")
        return [bytes(packet)]
    assert gso_type & ~GSO_ECN == GSO_TCPV4  # check_gso_inner refuses every other type
    return _tcp_segments(packet, gso_size)


def _tcp_segments(packet: bytearray, gso_size: int) -> list[bytes]:
    ip_len = (packet[0] & 0x0F) * 4
    tcp_len = (packet[ip_len + 12] >> 4) * 4
    headers = ip_len + tcp_len
    data = memoryview(packet)[headers:]
    ip_id = int.from_bytes(packet[4:6], "big")
    seq = int.from_bytes(packet[ip_len + 4:ip_len + 8], "big")
    flags = packet[ip_len + 13]
    # The pseudo-header's addresses and protocol; each segment adds its own length.
    pseudo = int.from_bytes(packet[12:20], "big") + 6
    starts = range(0, max(len(data), 1), gso_size)
    segments = []
    for index, start in enumerate(starts):
        chunk = data[start:start + gso_size]
        segment = bytearray(packet[:headers])
        segment += chunk
        segment[2:4] = len(segment).to_bytes(2, "big")
        segment[4:6] = ((ip_id + index) & 0xFFFF).to_bytes(2, "big")
        segment[10:12] = b"\x00\x00"
        segment[10:12] = checksum(segment[:ip_len]).to_bytes(2, "big")
        segment[ip_len + 4:ip_len + 8] = ((seq + start) & 0xFFFFFFFF).to_bytes(4, "big")
        # As the kernel cuts: FIN and PSH only on the last segment, CWR only on the first.
        last = index == len(starts) - 1
        segment[ip_len + 13] = flags & ~(0 if last else _TCP_FIN | _TCP_PSH) & \
            ~(0 if index == 0 else _TCP_CWR)
        segment[ip_len + 16:ip_len + 18] = b"\x00\x00"
        tcp = memoryview(segment)[ip_len:]
        segment[ip_len + 16:ip_len + 18] = checksum(tcp, pseudo + len(tcp)).to_bytes(2, "big")
        segments.append(bytes(segment))
    return segments
