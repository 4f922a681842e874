"""Adding routes in bulk: RTM_NEWROUTE messages built by hand on a plain netlink socket.

pyroute2 spends close to a millisecond of Python encoding each message; a thousand routes
(a big cluster, or a config that lists every /32) then take over a second. These messages
are fixed in shape, so they are packed with struct directly: tens of microseconds each.
The routes come out exactly as pyroute2 makes them (proto static, scope global, unicast,
main table), so every other path (listing, removing, crash cleanup) sees no difference.
"""

from __future__ import annotations

import errno
import socket
import struct
from ipaddress import IPv4Address, IPv4Network

RTM_NEWROUTE = 24
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_TABLE = 15

_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")
_ERROR = struct.Struct("=i")


def _attr(kind: int, data: bytes) -> bytes:
    # All our attributes are 4 bytes long, so no padding is ever needed.
    return _RTATTR.pack(_RTATTR.size + len(data), kind) + data


class RouteSocket:
    """One netlink socket in the calling thread's namespace; close() when done."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def add(self, ifindex: int, table: int, network: IPv4Network,
            via: IPv4Address | None) -> int:
        """Add one route (create, never replace); 0 or the errno the kernel answered."""
        self._seq += 1
        # The header's table field is 8 bits; RTA_TABLE carries the real one.
        body = _RTMSG.pack(socket.AF_INET, network.prefixlen, 0, 0, min(table, 252),
                           RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
        body += _attr(RTA_TABLE, struct.pack("=I", table))
        body += _attr(RTA_DST, network.network_address.packed)
        body += _attr(RTA_OIF, struct.pack("=I", ifindex))
        if via is not None:
            body += _attr(RTA_GATEWAY, via.packed)
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_NEWROUTE, flags,
                                       self._seq, 0) + body)
        return self._answer(self._seq)

    def _answer(self, seq: int) -> int:
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, got, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    return errno.EPROTO
                if kind == NLMSG_ERROR and got == seq:
                    code: int = _ERROR.unpack_from(data, offset + _NLMSGHDR.size)[0]
                    return -code
                offset += (length + 3) & ~3

    def close(self) -> None:
        self._sock.close()
