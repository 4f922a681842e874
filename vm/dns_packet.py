"""DNS queries in, answers out: just enough of RFC 1035 for a responder of A records.

Anything that is not a plain, well-formed standard query gets no reply at all: a reason to
count, never an exception. A reply is the query's header and question plus at most one A
record (16 bytes), so it is never much bigger than what asked for it: no amplification.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
MAX_QUERY = 512  # RFC 1035's UDP limit; real queries (even with EDNS) are far smaller
MAX_NAME_WIRE = 255
TTL = 10  # seconds: short, so an edited hosts file shows within a few seconds

QR = 0x8000
OPCODE = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
RCODE_NOERROR, RCODE_NXDOMAIN, RCODE_REFUSED = 0, 3, 5
TYPE_A = 1
CLASS_IN = 1
NAME_POINTER = 0xC00C  # the question's name, right after the 12-byte header


class Malformed(Exception):
    """Why a datagram is not a query we answer; str() is the counter's name."""


@dataclass(frozen=True)
class Question:
    ident: int
    flags: int
    name: str  # lower case, dots between labels, no trailing dot
    qtype: int
    wire: bytes  # the question section exactly as asked (case kept, for the reply)


def parse_query(data: bytes) -> Question:
    """The single question of a standard query, or Malformed."""
    if len(data) > MAX_QUERY:
        raise Malformed("oversize")
    if len(data) < HEADER.size:
        raise Malformed("short")
    ident, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if flags & QR:
        raise Malformed("not_query")  # a response: answering it could start a loop
    if flags & OPCODE or flags & TC:
        raise Malformed("not_query")
    if qdcount != 1 or ancount or nscount or arcount > 1:
        raise Malformed("bad_counts")
    labels, end = _read_name(data, HEADER.size)
    if end + 4 > len(data):
        raise Malformed("truncated")
    qtype, qclass = struct.unpack_from("!HH", data, end)
    if qclass != CLASS_IN:
        raise Malformed("not_in_class")
    name = ".".join(label.decode("latin-1").lower() for label in labels)
    return Question(ident, flags, name, qtype, data[HEADER.size:end + 4])


def _read_name(data: bytes, offset: int) -> tuple[list[bytes], int]:
    labels: list[bytes] = []
    length_on_wire = 0
    while True:
        if offset >= len(data):
            raise Malformed("truncated")
        size = data[offset]
        if size == 0:
            return labels, offset + 1
        if size > 63:
            raise Malformed("bad_name")  # a compression pointer or a reserved label type
        length_on_wire += size + 1
        if length_on_wire + 1 > MAX_NAME_WIRE:
            raise Malformed("bad_name")
        label = data[offset + 1:offset + 1 + size]
        if len(label) < size:
            raise Malformed("truncated")
        if b"." in label:
            raise Malformed("bad_name")  # would blur the label boundaries of the lookup
        labels.append(label)
        offset += 1 + size


def reply(question: Question, rcode: int, address: IPv4Address | None = None) -> bytes:
    """An authoritative reply to `question`: `rcode`, and an A record when `address`."""
    flags = QR | AA | (question.flags & RD) | rcode
    answers = 1 if address is not None else 0
    message = HEADER.pack(question.ident, flags, 1, answers, 0, 0) + question.wire
    if address is not None:
        message += struct.pack("!HHHIH", NAME_POINTER, TYPE_A, CLASS_IN, TTL, 4)
        message += address.packed
    return message


def encode_name(name: str) -> bytes:
    """`dev.local` -> b"\\x03dev\\x05local\\x00": the name as it appears in a query."""
    wire = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.split("."))
    return wire + b"\x00"
