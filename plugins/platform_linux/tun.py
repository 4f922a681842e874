"""The Linux tun device: bare IP packets, no packet-info header; with offloads, each packet
comes after a 10-byte virtio-net header and may be a TCP super-packet of up to ~64 KB."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from typing import Any

import pytun

from ...core import gso
from ...core.contracts import PlatformError, VirtualInterface

log = logging.getLogger("ctun.linux")

READ_SIZE = 65535 + gso.HEADER_LEN
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETLE = 0x400454DC
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO_ECN = 0x08
# IPv4 TCP only: the tunnel carries IPv4, and UDP segmentation (USO) needs kernel 6.2.
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN

# Transient "the kernel cannot take it now" errors: the packet is dropped, as a full
# queue would drop it; the tunnel's counters see the loss, the packet loop keeps going.
# EINVAL is what the kernel says to a malformed packet (e.g. empty), also not fatal.
_DROP_ERRNOS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.EIO, errno.EINVAL})


class LinuxTun(VirtualInterface):
    """An open tun device; closing it makes the kernel remove the interface and its routes."""

    def __init__(self, device: Any, vnet: bool = False) -> None:
        self._device = device
        self.name: str = str(device.name)
        self._fd: int = int(device.fileno())
        self.vnet = vnet
        self.offload = False  # whether the kernel may send us super-packets right now
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
        if self.vnet:
            self.write_gso(gso.ZERO, packet)  # an all-zero header: an ordinary packet
            return
        self._write(os.write, packet)

    def write_gso(self, header: bytes, packet: bytes | memoryview) -> None:
        self._write(os.writev, (header, packet))

    def _write(self, write: Any, data: Any) -> None:
        fd = self._check_open()
        try:
            write(fd, data)
        except OSError as exc:
            if exc.errno not in _DROP_ERRNOS:
                raise
            self.write_drops += 1

    def set_offload(self, enabled: bool) -> None:
        if not self.vnet or enabled == self.offload:
            return
        fcntl.ioctl(self._check_open(), TUNSETOFFLOAD, OFFLOADS if enabled else 0)
        self.offload = enabled

    def close(self) -> None:
        if self._device is not None:
            device, self._device = self._device, None
            device.close()


def open_tun(name: str, vnet: bool = False) -> LinuxTun:
    """Create tun device `name` in the calling thread's network namespace; with `vnet`, one
    that can take offloads (they stay off until set_offload(True))."""
    flags = pytun.IFF_TUN | pytun.IFF_NO_PI
    try:
        device = pytun.TunTapDevice(name=name, flags=flags | (IFF_VNET_HDR if vnet else 0))
    except pytun.Error as exc:
        if not vnet or exc.errno != errno.EINVAL:
            raise PlatformError(_explain(name, exc)) from exc
        log.info("this kernel's tun has no offload header; running without offloads")
        return open_tun(name)
    if vnet:
        try:
            # Little-endian headers whatever the CPU, so core/gso.py needs one layout only.
            fcntl.ioctl(device.fileno(), TUNSETVNETLE, struct.pack("i", 1))  # by pointer
            fcntl.ioctl(device.fileno(), TUNSETOFFLOAD, 0)
        except OSError as exc:
            log.info("tun offloads unavailable (%s); running without them", exc.strerror)
            device.close()
            return open_tun(name)
    return LinuxTun(device, vnet)


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
