"""The Linux tun device: bare IPv4/IPv6 packets, no packet-info header."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytun

from ...core.contracts import PlatformError, VirtualInterface

READ_SIZE = 65535

# Transient "the kernel cannot take it now" errors: the packet is dropped, as a full
# queue would drop it; the tunnel's counters see the loss, the packet loop keeps going.
# EINVAL is what the kernel says to a malformed packet (e.g. empty), also not fatal.
_DROP_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.EIO, errno.EINVAL})


class LinuxTun(VirtualInterface):
    """An open tun device; closing it makes the kernel remove the interface and its routes."""

    def __init__(self, device: Any) -> None:
        self._device = device
        self.name: str = str(device.name)
        self._fd: int = int(device.fileno())
        self.write_drops: int = 0
        os.set_blocking(self._fd, False)

    @property
    def closed(self) -> bool:
        return self._device is None

    def _check_open(self) -> int:
        if self._device is None:
            raise ValueError(f"tun device {self.name} is closed")
        return self._fd

    def fileno(self) -> int:
        return self._check_open()

    def read_packets(self, limit: int) -> list[bytes]:
        fd = self._check_open()
        packets: list[bytes] = []
        while len(packets) < limit:
            try:
                packets.append(os.read(fd, READ_SIZE))
            except BlockingIOError:
                break
        return packets

    def write_packet(self, packet: bytes) -> None:
        fd = self._check_open()
        try:
            os.write(fd, packet)
        except OSError as exc:
            if exc.errno not in _DROP_ERRNOS:
                raise
            self.write_drops += 1

    def close(self) -> None:
        if self._device is not None:
            device, self._device = self._device, None
            device.close()


def open_tun(name: str) -> LinuxTun:
    """Create tun device `name` in the calling thread's network namespace."""
    try:
        device = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
    except pytun.Error as exc:
        raise PlatformError(_explain(name, exc)) from exc
    return LinuxTun(device)


def _explain(name: str, exc: OSError) -> str:
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"cannot create tun device {name}: permission denied on /dev/net/tun; "
            "run ctun as root (or with CAP_NET_ADMIN)"
        )
    if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return (
            "/dev/net/tun is missing: load the tun module (modprobe tun), "
            "or in a container pass --device /dev/net/tun"
        )
    if code == errno.EBUSY:
        return f"interface {name} already exists and is in use; pick another interface name"
    if code == errno.EINVAL:
        return (
            f"interface {name} already exists and is not a tun device; "
            f"remove it (ip link del {name}) or pick another interface name"
        )
    return f"cannot create tun device {name}: {exc.strerror or exc}"
