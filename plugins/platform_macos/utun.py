"""The macOS utun device: a kernel-control socket carrying one IP packet per datagram.

Opening one is four system calls on a `PF_SYSTEM`/`SOCK_DGRAM`/`SYSPROTO_CONTROL` socket:
`CTLIOCGINFO` turns the control name `com.apple.net.utun_control` into its id, `connect`
to (id, unit 0) makes the kernel create the next free `utunN`, and
`getsockopt(SYSPROTO_CONTROL, UTUN_OPT_IFNAME)` says which N it picked. Closing the socket
removes the interface, and the kernel removes its routes with it.

Every datagram starts with the packet's address family as a 4-byte big-endian number
(`AF_INET` = 2, `AF_INET6` = 30 on macOS) in both directions: `frame()` adds it, `unframe()`
strips it.

The constants are spelled out because Linux's `socket` module has none of them (and mypy
checks this module on Linux). All system calls go through a `UtunSystem`, which the tests
replace with a recorder.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from collections import Counter

from ...core.contracts import PlatformError, VirtualInterface

# <sys/socket.h>, <sys/sys_domain.h>, <sys/kern_control.h>, <net/if_utun.h>
AF_SYSTEM = 32
PF_SYSTEM = AF_SYSTEM
SYSPROTO_CONTROL = 2
AF_SYS_CONTROL = 2  # sockaddr_ctl.ss_sysaddr; CPython fills it in for PF_SYSTEM sockets
UTUN_OPT_IFNAME = 2
MAX_KCTL_NAME = 96
# _IOWR('N', 3, struct ctl_info): struct ctl_info { u_int32_t ctl_id; char ctl_name[96]; }
CTLIOCGINFO = 0xC0644E03
CTL_INFO = struct.Struct(f"=I{MAX_KCTL_NAME}s")  # 100 bytes, the size CTLIOCGINFO encodes
UTUN_CONTROL_NAME = "com.apple.net.utun_control"
UTUN_UNIT_ANY = 0  # sc_unit 0: the kernel picks the next free utunN
IFNAMSIZ = 16

# The family header: macOS's AF_INET6 (30) is not Linux's (10), so never socket.AF_INET6.
DARWIN_AF_INET = 2
DARWIN_AF_INET6 = 30
HEADER = struct.Struct("!I")
_FAMILY_OF_VERSION = {4: DARWIN_AF_INET, 6: DARWIN_AF_INET6}
_FAMILIES = frozenset(_FAMILY_OF_VERSION.values())

READ_SIZE = 65535 + HEADER.size

# Why a frame or packet was dropped: the keys of MacUtun.drops.
DROP_SHORT = "short-frame"  # no packet after the family header (or not even a header)
DROP_FAMILY = "unknown-family"  # a family other than AF_INET/AF_INET6 in the header
DROP_VERSION = "unknown-version"  # a packet to write whose version nibble is not 4 or 6
DROP_QUEUE_FULL = "queue-full"  # the kernel could not take the packet now (EAGAIN/ENOBUFS)
DROP_REJECTED = "rejected"  # the kernel refused the packet (EINVAL, EIO, ...)

_QUEUE_FULL_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS})
_REJECTED_ERRNOS = frozenset({errno.EINVAL, errno.EIO, errno.EMSGSIZE, errno.EAFNOSUPPORT})


def frame(packet: bytes) -> bytes | None:
    """`packet` with the family header utun expects, or None when it is not IPv4 or IPv6."""
    family = _FAMILY_OF_VERSION.get(packet[0] >> 4) if packet else None
    if family is None:
        return None
    return HEADER.pack(family) + packet


def unframe(data: bytes) -> bytes | None:
    """The packet inside a utun datagram, or None when the datagram has no packet after the
    header or names a family other than AF_INET/AF_INET6."""
    if len(data) <= HEADER.size:
        return None
    (family,) = HEADER.unpack_from(data)
    if family not in _FAMILIES:
        return None
    return data[HEADER.size :]


class UtunSystem:
    """The system calls that create a utun socket; tests replace it with a recorder."""

    def open_socket(self, family: int, kind: int, proto: int) -> socket.socket:
        return socket.socket(family, kind, proto)

    def ioctl(self, sock: socket.socket, request: int, arg: bytes) -> bytes:
        return fcntl.ioctl(sock.fileno(), request, arg)

    def connect(self, sock: socket.socket, address: tuple[int, int]) -> None:
        # A (ctl_id, unit) pair: CPython builds the sockaddr_ctl (sc_family AF_SYSTEM,
        # ss_sysaddr AF_SYS_CONTROL) from it. A str would also work, but only with unit 0.
        sock.connect(address)

    def getsockopt(self, sock: socket.socket, level: int, option: int, buflen: int) -> bytes:
        return sock.getsockopt(level, option, buflen)


class MacUtun(VirtualInterface):
    """An open utun interface; closing it makes the kernel remove the interface and routes."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock: socket.socket | None = sock
        self.name: str = name
        self._fd = sock.fileno()
        self.drops: Counter[str] = Counter()
        sock.setblocking(False)

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _check_open(self) -> socket.socket:
        if self._sock is None:
            raise ValueError(f"utun interface {self.name} is closed")
        return self._sock

    def fileno(self) -> int:
        self._check_open()
        return self._fd

    def read_packets(self, limit: int) -> list[bytes]:
        sock = self._check_open()
        packets: list[bytes] = []
        # At most `limit` datagrams, dropped ones included, so one call never spins long.
        for _ in range(limit):
            try:
                data = sock.recv(READ_SIZE)
            except BlockingIOError:
                break
            packet = unframe(data)
            if packet is not None:
                packets.append(packet)
            elif len(data) <= HEADER.size:
                self.drops[DROP_SHORT] += 1
            else:
                self.drops[DROP_FAMILY] += 1
        return packets

    def write_packet(self, packet: bytes) -> None:
        sock = self._check_open()
        data = frame(packet)
        if data is None:
            self.drops[DROP_VERSION] += 1
            return
        try:
            sock.send(data)
        except OSError as exc:
            if exc.errno in _QUEUE_FULL_ERRNOS:
                self.drops[DROP_QUEUE_FULL] += 1
            elif exc.errno in _REJECTED_ERRNOS:
                self.drops[DROP_REJECTED] += 1
            else:
                raise

    def close(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()


def open_utun(system: UtunSystem | None = None) -> MacUtun:
    """Create a utun interface; the kernel picks its unit. Needs root."""
    system = system or UtunSystem()
    try:
        sock = system.open_socket(PF_SYSTEM, socket.SOCK_DGRAM, SYSPROTO_CONTROL)
    except OSError as exc:
        raise PlatformError(_explain(exc)) from exc
    try:
        request = CTL_INFO.pack(0, UTUN_CONTROL_NAME.encode())
        (ctl_id, _name) = CTL_INFO.unpack(system.ioctl(sock, CTLIOCGINFO, request))
        system.connect(sock, (ctl_id, UTUN_UNIT_ANY))
        raw = system.getsockopt(sock, SYSPROTO_CONTROL, UTUN_OPT_IFNAME, IFNAMSIZ)
        name = raw.split(b"\0", 1)[0].decode("ascii", errors="replace")
        if not name:
            raise PlatformError("the kernel created a utun interface but did not name it")
        return MacUtun(sock, name)
    except BaseException as exc:
        sock.close()
        if isinstance(exc, OSError):
            raise PlatformError(_explain(exc)) from exc
        raise


def _explain(exc: OSError) -> str:
    code = exc.errno
    if code in (errno.EPERM, errno.EACCES):
        return "creating a utun interface needs root on macOS: run ctun with sudo"
    if code in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.ENOENT):
        return (
            f"cannot create a utun interface: {exc.strerror or exc} "
            "(utun exists on macOS only)"
        )
    return f"cannot create a utun interface: {exc.strerror or exc}"
