"""The TAP-windows6 device: finding an adapter, its control codes, and the packet queue.

TAP-windows6 (the driver OpenVPN ships, ComponentId `tap0901`) is an Ethernet adapter that
turns into a point-to-point IP device after TAP_WIN_IOCTL_CONFIG_TUN: reads then return
bare IP packets and writes take bare IP packets. In that mode the driver answers ARP itself,
but only for addresses inside the "remote network" CONFIG_TUN gave it, and it only passes up
packets sent to the fake remote MAC, i.e. to a next hop it answered ARP for. That is why
every route into the adapter goes *via the peer* (see adapter.py).

Windows cannot select() on a device handle, only on sockets. So a TapInterface runs one
reader thread doing overlapped reads into a bounded queue, and signals the engine through a
socket pair: one byte per batch on one end, the other end is what fileno() returns. The
thread starts once the virtual cable is connected: the driver fails every read and write
while it is not.

Every control code is sent with non-empty input and output buffers: the driver's
IRP_MJ_DEVICE_CONTROL handler rejects either being empty with STATUS_INVALID_PARAMETER.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address

from ...core.contracts import PlatformError, VirtualInterface
from .winapi import (
    ERROR_ACCESS_DENIED,
    ERROR_BUSY,
    ERROR_FILE_NOT_FOUND,
    ERROR_GEN_FAILURE,
    ERROR_PATH_NOT_FOUND,
    ERROR_SHARING_VIOLATION,
    FILE_ATTRIBUTE_SYSTEM,
    FILE_FLAG_OVERLAPPED,
    GENERIC_READ,
    GENERIC_WRITE,
    OPEN_EXISTING,
    WinApi,
    WinApiError,
)

# --- control codes (tap-windows6 src/tap-windows.h) -------------------------------------

FILE_DEVICE_UNKNOWN = 0x00000022
METHOD_BUFFERED = 0
FILE_ANY_ACCESS = 0


def ctl_code(device_type: int, function: int, method: int, access: int) -> int:
    """The CTL_CODE macro of the Windows DDK."""
    return (device_type << 16) | (access << 14) | (function << 2) | method


def tap_control_code(function: int) -> int:
    """TAP_CONTROL_CODE(request, method) with METHOD_BUFFERED, as tap-windows.h has it."""
    return ctl_code(FILE_DEVICE_UNKNOWN, function, METHOD_BUFFERED, FILE_ANY_ACCESS)


TAP_WIN_IOCTL_GET_MAC = tap_control_code(1)
TAP_WIN_IOCTL_GET_VERSION = tap_control_code(2)
TAP_WIN_IOCTL_GET_MTU = tap_control_code(3)
TAP_WIN_IOCTL_CONFIG_POINT_TO_POINT = tap_control_code(5)
TAP_WIN_IOCTL_SET_MEDIA_STATUS = tap_control_code(6)
TAP_WIN_IOCTL_CONFIG_TUN = tap_control_code(10)

IOCTL_NAMES = {
    TAP_WIN_IOCTL_GET_MAC: "TAP_WIN_IOCTL_GET_MAC",
    TAP_WIN_IOCTL_GET_VERSION: "TAP_WIN_IOCTL_GET_VERSION",
    TAP_WIN_IOCTL_GET_MTU: "TAP_WIN_IOCTL_GET_MTU",
    TAP_WIN_IOCTL_CONFIG_POINT_TO_POINT: "TAP_WIN_IOCTL_CONFIG_POINT_TO_POINT",
    TAP_WIN_IOCTL_SET_MEDIA_STATUS: "TAP_WIN_IOCTL_SET_MEDIA_STATUS",
    TAP_WIN_IOCTL_CONFIG_TUN: "TAP_WIN_IOCTL_CONFIG_TUN",
}

MIN_VERSION = (9, 9)  # TUN mode with IPv4 point-to-point, as every tap-windows6 has it

# --- finding an adapter ------------------------------------------------------------------

# The network adapter device class; its numbered subkeys are the adapters' driver keys.
ADAPTER_CLASS_KEY = (
    r"SYSTEM\CurrentControlSet\Control\Class\{4D36E972-E325-11CE-BFC1-08002BE10318}"
)
# <NETWORK_KEY>\{GUID}\Connection holds the adapter's connection name (value Name).
NETWORK_KEY = (
    r"SYSTEM\CurrentControlSet\Control\Network\{4D36E972-E325-11CE-BFC1-08002BE10318}"
)
# Hardware ids tap-windows6 installs under: plain (tapinstall), or root-enumerated (tapctl,
# OpenVPN 2.5 and later). OpenVPN accepts both, so do we.
COMPONENT_IDS = frozenset({"tap0901", "root\\tap0901"})
PREFERRED_PREFIX = "ctun"

DRIVER_MISSING = (
    "the TAP-windows6 driver (tap0901) is not installed: install it (it ships with OpenVPN, "
    "or tap-windows6 from GitHub) and run ctun again"
)

# CreateFileW errors that mean "this adapter is not available, try the next one".
_UNAVAILABLE = {
    ERROR_FILE_NOT_FOUND: "disabled or removed",
    ERROR_PATH_NOT_FOUND: "disabled or removed",
    ERROR_ACCESS_DENIED: "in use by another program",
    ERROR_GEN_FAILURE: "in use by another program",
    ERROR_SHARING_VIOLATION: "in use by another program",
    ERROR_BUSY: "in use by another program",
}


@dataclass(frozen=True)
class TapAdapterInfo:
    guid: str  # NetCfgInstanceId, braces included: "{...}"
    name: str  # the connection name netsh knows it by, e.g. "ctun0" or "Ethernet 3"

    @property
    def device_path(self) -> str:
        return f"\\\\.\\Global\\{self.guid}.tap"

    def __str__(self) -> str:
        return f'"{self.name}" {self.guid}'


def find_tap_adapters(api: WinApi) -> list[TapAdapterInfo]:
    """Every TAP-windows6 adapter with a connection name, in registry order."""
    found: list[TapAdapterInfo] = []
    for sub in api.reg_subkeys(ADAPTER_CLASS_KEY):
        if not sub.isdigit():  # "Properties", "Configuration": not adapters
            continue
        key = f"{ADAPTER_CLASS_KEY}\\{sub}"
        component = api.reg_value(key, "ComponentId")
        if component is None or component.lower() not in COMPONENT_IDS:
            continue
        guid = api.reg_value(key, "NetCfgInstanceId")
        if not guid:
            continue
        name = api.reg_value(f"{NETWORK_KEY}\\{guid}\\Connection", "Name")
        if name:  # without one, netsh cannot address it
            found.append(TapAdapterInfo(guid, name))
    return found


def preference_order(adapters: list[TapAdapterInfo], ifname: str) -> list[TapAdapterInfo]:
    """The adapter named exactly `ifname` first, then those named "ctun...", then the rest
    (each group in registry order)."""

    def rank(info: TapAdapterInfo) -> int:
        name = info.name.lower()
        if name == ifname.lower():
            return 0
        return 1 if name.startswith(PREFERRED_PREFIX) else 2

    return sorted(adapters, key=rank)  # sorted() is stable


# --- the device --------------------------------------------------------------------------


class TapDevice:
    """An open TAP-windows6 device handle and its control codes."""

    def __init__(self, api: WinApi, info: TapAdapterInfo, handle: int) -> None:
        self.api = api
        self.info = info
        self.handle = handle
        self.closed = False

    @classmethod
    def open(cls, api: WinApi, info: TapAdapterInfo) -> TapDevice:
        """Open the adapter's device exclusively; WinApiError when that fails."""
        handle = api.create_file(
            info.device_path,
            GENERIC_READ | GENERIC_WRITE,
            0,  # no sharing: one program drives a TAP adapter at a time
            OPEN_EXISTING,
            FILE_ATTRIBUTE_SYSTEM | FILE_FLAG_OVERLAPPED,
        )
        return cls(api, info, handle)

    def ioctl(self, code: int, data: bytes, out_size: int) -> bytes:
        try:
            return self.api.device_io_control(self.handle, code, data, out_size)
        except WinApiError as exc:
            what = IOCTL_NAMES.get(code, f"control code {code:#010x}")
            raise PlatformError(
                f"TAP adapter {self.info.name}: {what} failed: {exc.message}"
            ) from exc

    def _ulongs(self, code: int, count: int) -> tuple[int, ...]:
        # The driver fails any control code whose input or output buffer is empty, so the
        # queries send a zeroed input as large as the answer (as OpenVPN does).
        out = self.ioctl(code, bytes(4 * count), 4 * count)
        if len(out) < 4 * count:
            raise PlatformError(
                f"TAP adapter {self.info.name}: {IOCTL_NAMES[code]} returned {len(out)} "
                f"bytes, not {4 * count}"
            )
        return struct.unpack_from(f"<{count}L", out)

    def version(self) -> tuple[int, int, int]:
        """The driver's (major, minor, debug) version."""
        major, minor, debug = self._ulongs(TAP_WIN_IOCTL_GET_VERSION, 3)
        return major, minor, debug

    def mtu(self) -> int:
        """The adapter's own MTU (its Advanced property "MTU", 1500 unless changed)."""
        return self._ulongs(TAP_WIN_IOCTL_GET_MTU, 1)[0]

    def config_tun(self, local: IPv4Address, network: IPv4Address,
                   netmask: IPv4Address) -> None:
        """TUN mode: bare IP packets; the driver answers ARP for addresses in
        `network`/`netmask` other than `local`. Three IPv4 addresses in network byte order."""
        data = local.packed + network.packed + netmask.packed
        self.ioctl(TAP_WIN_IOCTL_CONFIG_TUN, data, len(data))

    def set_media_status(self, connected: bool) -> None:
        """"Cable connected" (Windows brings the interface up) or unplugged. A ULONG."""
        data = struct.pack("<L", 1 if connected else 0)
        self.ioctl(TAP_WIN_IOCTL_SET_MEDIA_STATUS, data, len(data))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.api.close_handle(self.handle)


def open_first(api: WinApi, candidates: list[TapAdapterInfo]) -> TapDevice:
    """Open the first candidate that is free; PlatformError saying why each was not."""
    if not candidates:
        raise PlatformError(DRIVER_MISSING)
    reasons: list[str] = []
    for info in candidates:
        try:
            return TapDevice.open(api, info)
        except WinApiError as exc:
            if exc.code not in _UNAVAILABLE:
                raise PlatformError(f"cannot open TAP adapter {info}: {exc.message}") from exc
            reasons.append(f'"{info.name}" is {_UNAVAILABLE[exc.code]}')
    raise PlatformError(
        f"no TAP-windows6 adapter is free ({'; '.join(reasons)}): close the program using "
        "one (OpenVPN?), enable it, or add another adapter named ctun0 "
        '(tapctl create --hwid root\\tap0901 --name ctun0)'
    )


# --- the packet queue the engine polls ---------------------------------------------------

READ_SIZE = 65536
READ_WAIT = 0.2  # how long one overlapped read waits before checking for close()
WRITE_TIMEOUT = 0.05  # a write the driver has not taken by then is dropped
QUEUE_PACKETS = 1024  # packets read but not yet taken by the engine; more are dropped


class TapInterface(VirtualInterface):
    """A TAP-windows6 device in TUN mode, made pollable by selectors through a socket pair.

    `name` is ctun's name for the interface (the control socket and state files use it);
    `device.info.name` is the Windows connection name netsh uses.
    """

    def __init__(self, name: str, device: TapDevice, *, read_wait: float = READ_WAIT,
                 queue_packets: int = QUEUE_PACKETS) -> None:
        self.name = name
        self.device = device
        self.read_wait = read_wait
        self.queue_packets = queue_packets
        self.read_drops = 0
        self.write_drops = 0
        self.last_write_error: str | None = None
        self._queue: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        self._signalled = False  # a wake byte is in (or on its way into) the socket pair
        self._failure: str | None = None
        self._stopping = threading.Event()
        # A socket pair, not a pipe: select() on Windows only takes sockets.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._reader = threading.Thread(target=self._read_loop, name=f"ctun-tap-{name}",
                                        daemon=True)
        self._started = False

    def start(self) -> None:
        """Start the reader thread. Only once the virtual cable is connected: the driver
        fails every read and write while it is not (tapAdapterReadAndWriteReady)."""
        self._check_open()
        if not self._started:
            self._started = True
            self._reader.start()

    @property
    def started(self) -> bool:
        return self._started

    @property
    def closed(self) -> bool:
        return self._stopping.is_set()

    def _check_open(self) -> None:
        if self._stopping.is_set():
            raise ValueError(f"TAP interface {self.name} is closed")

    # -- reader thread ----------------------------------------------------------------

    def _read_loop(self) -> None:
        device = self.device
        while not self._stopping.is_set():
            try:
                packet = device.api.read_file(device.handle, READ_SIZE, self.read_wait)
            except Exception as exc:  # whatever it is, the engine must hear of it
                if not self._stopping.is_set():
                    text = exc.message if isinstance(exc, WinApiError) else str(exc)
                    self._fail(f"reading from TAP adapter {device.info.name} failed: {text}")
                return
            if not packet:
                continue  # nothing yet (None), or an empty read
            with self._lock:
                if len(self._queue) >= self.queue_packets:
                    self.read_drops += 1
                    continue
                self._queue.append(packet)
                if self._signalled:
                    continue
                self._signalled = True
            self._signal()

    def _fail(self, message: str) -> None:
        with self._lock:
            self._failure = message
            self._signalled = True
        self._signal()  # read_packets() raises it on the engine's thread

    def _signal(self) -> None:
        with contextlib.suppress(OSError):  # full (cannot be: one byte a batch) or closed
            self._wake_w.send(b"\x01")

    def _drain_signal(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass

    # -- VirtualInterface -------------------------------------------------------------

    def fileno(self) -> int:
        self._check_open()
        return self._wake_r.fileno()

    def read_packets(self, limit: int) -> list[bytes]:
        self._check_open()
        with self._lock:
            if self._failure is not None and not self._queue:
                raise PlatformError(self._failure)
            count = min(limit, len(self._queue))
            packets = [self._queue.popleft() for _ in range(count)]
            if not self._queue and self._failure is None:
                # Only an empty queue ends the batch; otherwise the byte stays and the
                # socket keeps polling readable.
                self._signalled = False
                self._drain_signal()
        return packets

    def write_packet(self, packet: bytes) -> None:
        self._check_open()
        device = self.device
        try:
            written = device.api.write_file(device.handle, packet, WRITE_TIMEOUT)
        except OSError as exc:
            self.last_write_error = exc.message if isinstance(exc, WinApiError) else str(exc)
            written = False
        if not written:
            self.write_drops += 1

    def stop_reader(self) -> None:
        """Stop the reader thread: cancel its pending read and wait for it."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if not self._started:
            return
        with contextlib.suppress(OSError):
            self.device.api.cancel_io(self.device.handle)
        self._reader.join(timeout=max(2.0, 4 * self.read_wait))

    def close(self) -> None:
        """Stop reading, unplug the virtual cable and close the device; idempotent."""
        if self.device.closed:
            return
        self.stop_reader()
        try:
            self.device.set_media_status(False)
        finally:
            self.device.close()
            self._wake_r.close()
            self._wake_w.close()
