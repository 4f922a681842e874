"""The Windows adapter, proven without Windows: every netsh/route command line and every
Windows API call it would make is recorded and compared with the exact expected sequence.

`FakeWindows` plays both seams at once: it is the runner (answering `netsh` and `route` the
way Windows does: `route print -4` in its real layout, failures as a non-zero exit) and the
`WinApi` object (registry, CreateFileW, DeviceIoControl, overlapped reads and writes, the
lock). Both append to one log, so the tests also see how commands and control codes
interleave. The control codes are checked against values computed here again from the
TAP-windows6 definitions, and against literal constants.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import selectors
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pluggy
import pytest
from ctun.core import hookspecs
from ctun.core.contracts import PlatformAdapter, PlatformError, VirtualInterface
from ctun.plugins import platform_windows
from ctun.plugins.platform_windows import tap as tapmod
from ctun.plugins.platform_windows import winapi
from ctun.plugins.platform_windows.adapter import (
    NOT_ADMIN,
    RouteEntry,
    WindowsAdapter,
    default_run_dir,
    link_network,
    parse_route_print,
    run,
)
from ctun.plugins.platform_windows.tap import (
    DRIVER_MISSING,
    TapAdapterInfo,
    TapDevice,
    TapInterface,
    find_tap_adapters,
    preference_order,
)
from ctun.plugins.platform_windows.winapi import WinApiError

IFNAME = "ctun0"
LOCAL = IPv4Address("192.168.251.2")  # the host side: ctun's addr .1 is the VM's
PEER = IPv4Address("192.168.251.1")
TUNNEL = IPv4Network("192.168.251.0/24")
DOCKER = IPv4Network("172.18.0.0/16")
GUID = "{3F8A1C52-7D4E-4B9A-9E1F-2C6D8B0A4E71}"
OTHER_GUID = "{B7E0D9A4-1C3F-4E2B-8A6D-5F9C0E1B2A38}"
HANDLE = 0x2A4

# --- the control codes, computed again from tap-windows6's tap-windows.h -----------------


def CTL_CODE(device_type: int, function: int, method: int, access: int) -> int:
    return (device_type << 16) | (access << 14) | (function << 2) | method


def TAP_CONTROL_CODE(request: int, method: int) -> int:
    FILE_DEVICE_UNKNOWN, FILE_ANY_ACCESS = 0x00000022, 0x0000
    return CTL_CODE(FILE_DEVICE_UNKNOWN, request, method, FILE_ANY_ACCESS)


METHOD_BUFFERED = 0
GET_MAC = TAP_CONTROL_CODE(1, METHOD_BUFFERED)
GET_VERSION = TAP_CONTROL_CODE(2, METHOD_BUFFERED)
GET_MTU = TAP_CONTROL_CODE(3, METHOD_BUFFERED)
CONFIG_POINT_TO_POINT = TAP_CONTROL_CODE(5, METHOD_BUFFERED)
SET_MEDIA_STATUS = TAP_CONTROL_CODE(6, METHOD_BUFFERED)
CONFIG_TUN = TAP_CONTROL_CODE(10, METHOD_BUFFERED)

CLASS_KEY = r"SYSTEM\CurrentControlSet\Control\Class\{4D36E972-E325-11CE-BFC1-08002BE10318}"
NETWORK_KEY = r"SYSTEM\CurrentControlSet\Control\Network\{4D36E972-E325-11CE-BFC1-08002BE10318}"

# `route print -4` on Windows 10 (22H2), English: Wi-Fi/Ethernet LAN, the WSL switch, an
# OpenVPN full tunnel (def1: 0.0.0.0/1 + 128.0.0.0/1, net30 topology) and ctun up on a TAP
# adapter with one Docker network routed.
ROUTE_PRINT_SAMPLE = """\
===========================================================================
Interface List
 17...00 ff 8c 2e 41 7a ......TAP-Windows Adapter V9
 12...f4 8e 38 a1 5c 02 ......Intel(R) Ethernet Connection (7) I219-LM
 31...00 15 5d 7e 91 0c ......Hyper-V Virtual Ethernet Adapter
 24...00 ff 3a 9b 10 c4 ......TAP-Windows Adapter V9 #2
  1...........................Software Loopback Interface 1
===========================================================================

IPv4 Route Table
===========================================================================
Active Routes:
Network Destination        Netmask          Gateway       Interface  Metric
          0.0.0.0          0.0.0.0      192.168.1.1     192.168.1.23     35
          0.0.0.0        128.0.0.0         10.8.0.5         10.8.0.6    291
         10.8.0.1  255.255.255.255         10.8.0.5         10.8.0.6    291
         10.8.0.4  255.255.255.252         On-link          10.8.0.6    291
         10.8.0.6  255.255.255.255         On-link          10.8.0.6    291
         10.8.0.7  255.255.255.255         On-link          10.8.0.6    291
        127.0.0.0        255.0.0.0         On-link         127.0.0.1    331
        127.0.0.1  255.255.255.255         On-link         127.0.0.1    331
  127.255.255.255  255.255.255.255         On-link         127.0.0.1    331
        128.0.0.0        128.0.0.0         10.8.0.5         10.8.0.6    291
       172.18.0.0      255.255.0.0    192.168.251.1    192.168.251.2     36
      172.24.16.0    255.255.240.0         On-link       172.24.16.1   5256
      172.24.16.1  255.255.255.255         On-link       172.24.16.1   5256
    172.24.31.255  255.255.255.255         On-link       172.24.16.1   5256
      192.168.1.0    255.255.255.0         On-link      192.168.1.23    291
     192.168.1.23  255.255.255.255         On-link      192.168.1.23    291
    192.168.1.255  255.255.255.255         On-link      192.168.1.23    291
    192.168.251.0    255.255.255.0    192.168.251.1    192.168.251.2     36
    192.168.251.0  255.255.255.252         On-link     192.168.251.2    291
    192.168.251.2  255.255.255.255         On-link     192.168.251.2    291
    192.168.251.3  255.255.255.255         On-link     192.168.251.2    291
     203.0.113.10  255.255.255.255      192.168.1.1     192.168.1.23     35
        224.0.0.0        240.0.0.0         On-link         127.0.0.1    331
        224.0.0.0        240.0.0.0         On-link      192.168.1.23    291
        224.0.0.0        240.0.0.0         On-link       172.24.16.1   5256
        224.0.0.0        240.0.0.0         On-link          10.8.0.6    291
        224.0.0.0        240.0.0.0         On-link     192.168.251.2    291
  255.255.255.255  255.255.255.255         On-link         127.0.0.1    331
  255.255.255.255  255.255.255.255         On-link      192.168.1.23    291
  255.255.255.255  255.255.255.255         On-link       172.24.16.1   5256
  255.255.255.255  255.255.255.255         On-link          10.8.0.6    291
  255.255.255.255  255.255.255.255         On-link     192.168.251.2    291
===========================================================================
Persistent Routes:
  Network Address          Netmask  Gateway Address  Metric
        10.20.0.0      255.255.0.0      192.168.1.1       1
===========================================================================
"""

# The same layout in German: the labels and "On-link" are translated, the numbers are not.
ROUTE_PRINT_GERMAN = """\
IPv4-Routentabelle
===========================================================================
Aktive Routen:
     Netzwerkziel    Netzwerkmaske          Gateway    Schnittstelle Metrik
          0.0.0.0          0.0.0.0      192.168.1.1     192.168.1.23     35
      192.168.1.0    255.255.255.0   Auf Verbindung     192.168.1.23    291
       172.18.0.0      255.255.0.0    192.168.251.1    192.168.251.2     36
===========================================================================
Ständige Routen:
  Keine
"""


def R(*argv: str) -> tuple[Any, ...]:
    """A runner call in the log."""
    return ("run", argv)


def IO(code: int, data: bytes, out_size: int, handle: int = HANDLE) -> tuple[Any, ...]:
    """A DeviceIoControl call in the log."""
    return ("DeviceIoControl", handle, code, data, out_size)


CREATE = (
    "CreateFileW",
    "\\\\.\\Global\\" + GUID + ".tap",
    0xC0000000,  # GENERIC_READ | GENERIC_WRITE
    0,  # no sharing
    3,  # OPEN_EXISTING
    0x40000004,  # FILE_FLAG_OVERLAPPED | FILE_ATTRIBUTE_SYSTEM
)

# --- a Windows that exists only as far as the adapter can see -------------------------


class Failed(Exception):
    pass


class FakeWindows:
    """The runner and the WinApi object. Routes, addresses and the TAP device are simulated
    closely enough that the adapter's follow-up checks see what Windows would show."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.sleeps: list[float] = []
        self.now = 1000.0
        self.admin = True
        self.version = (9, 24, 7)
        self.driver_mtu = 1500
        # registry: key path -> values; subkeys are implied by the paths
        self.registry: dict[str, dict[str, str]] = {}
        self.open_errors: dict[str, int] = {}  # device path -> CreateFileW error
        self.handles: dict[int, str] = {}
        self.next_handle = HANDLE
        self.media = False
        self.tun: tuple[IPv4Address, IPv4Network] | None = None  # what CONFIG_TUN said
        # netsh's address: set, then shown once `address_after` more polls have happened
        self.address: tuple[str, str] | None = None
        self.address_after = 0
        self.set_address_error: str | None = None
        self.other_routes = parse_route_print(ROUTE_PRINT_SAMPLE)
        self.other_routes = [
            e for e in self.other_routes if e.interface != LOCAL  # ctun's own come and go
        ]
        self.tap_routes: list[RouteEntry] = []  # routes out of the TAP adapter's address
        self.hidden_routes: list[RouteEntry] = []  # back when the adapter reconnects
        # overlapped I/O
        self.packets: queue.Queue[bytes | Exception | None] = queue.Queue()
        self.written: list[bytes] = []
        self.reads_unplugged = 0
        self.failing_codes: set[int] = set()
        self.write_result: bool | Exception = True
        self.locks: dict[int, int] = {}  # fd -> its flock()ed twin, standing in for msvcrt

    # -- registry helpers -----------------------------------------------------------------

    def add_adapter(self, index: int, component: str, guid: str | None,
                    name: str | None) -> None:
        values = {"ComponentId": component, "DriverDesc": "some adapter"}
        if guid is not None:
            values["NetCfgInstanceId"] = guid
        self.registry[f"{CLASS_KEY}\\{index:04d}"] = values
        if guid is not None and name is not None:
            self.registry[f"{NETWORK_KEY}\\{guid}\\Connection"] = {"Name": name}

    # -- the runner ---------------------------------------------------------------------

    def __call__(self, argv: Sequence[str]) -> str:
        argv = tuple(argv)
        self.log.append(("run", argv))
        try:
            return self._answer(argv)
        except Failed as exc:
            raise PlatformError(f"{' '.join(argv)} failed (exit 1): {exc}") from None

    def _answer(self, argv: tuple[str, ...]) -> str:
        if argv[:3] == ("route", "print", "-4"):
            return self.route_print()
        if argv[:2] == ("route", "add"):
            return self._route_add(argv)
        if argv[:2] == ("route", "delete"):
            return self._route_delete(argv)
        if argv[:5] == ("netsh", "interface", "ip", "set", "address"):
            if self.set_address_error is not None:
                raise Failed(self.set_address_error)
            _name, source, addr, mask = argv[5:]
            assert source == "static"
            self.address = (addr, mask)
            return "\n"
        if argv[:5] == ("netsh", "interface", "ip", "show", "addresses"):
            return self._show_addresses(argv[5])
        if argv[:5] == ("netsh", "interface", "ip", "delete", "dns"):
            raise Failed("There are no Domain Name Servers (DNS) configured on this system.")
        if argv[:5] == ("netsh", "interface", "ip", "delete", "wins"):
            raise Failed("There are no WINS servers configured on this system.")
        if argv[:5] == ("netsh", "interface", "ipv4", "set", "subinterface"):
            return "Ok.\n\n"
        raise AssertionError(f"unexpected command {argv}")

    def _show_addresses(self, name: str) -> str:
        text = (f'\nConfiguration for interface "{name}"\n'
                "    DHCP enabled:                         No\n")
        if self.address is not None and self.address_after > 0:
            self.address_after -= 1
        elif self.address is not None:
            addr, mask = self.address
            net = IPv4Network(f"{addr}/{mask}", strict=False)
            text += (
                f"    IP Address:                           {addr}\n"
                f"    Subnet Prefix:                        {net} (mask {mask})\n"
            )
        return text + "    InterfaceMetric:                      35\n\n"

    @property
    def tap_address(self) -> IPv4Address | None:
        if self.address is None or not self.media or self.address_after > 0:
            return None
        return IPv4Address(self.address[0])

    def _tap_link(self) -> IPv4Network | None:
        if self.tap_address is None or self.address is None:
            return None
        return IPv4Network(f"{self.address[0]}/{self.address[1]}", strict=False)

    def _route_add(self, argv: tuple[str, ...]) -> str:
        _route, _add, dest, _mask, mask, gateway = argv
        network = IPv4Network(f"{dest}/{mask}")
        gw = IPv4Address(gateway)
        link, local = self._tap_link(), self.tap_address
        if link is None or local is None or gw not in link:
            raise Failed(
                "The route addition failed: Either the interface index is wrong or the "
                "gateway does not lie on the same network as the interface. Check the IP "
                "Address Table for the machine."
            )
        if any(e.network == network and e.gateway == gw for e in self.tap_routes):
            raise Failed("The route addition failed: The object already exists.")
        self.tap_routes.append(RouteEntry(network, gw, local, 36))
        return " OK!\n"

    def _route_delete(self, argv: tuple[str, ...]) -> str:
        dest, mask = argv[2], argv[4]
        network = IPv4Network(f"{dest}/{mask}")
        gw = IPv4Address(argv[5]) if len(argv) > 5 else None

        def matches(e: RouteEntry) -> bool:
            return e.network == network and (gw is None or e.gateway == gw)

        before = len(self.tap_routes) + len(self.other_routes)
        self.tap_routes = [e for e in self.tap_routes if not matches(e)]
        self.other_routes = [e for e in self.other_routes if not matches(e)]
        if len(self.tap_routes) + len(self.other_routes) == before:
            raise Failed("The route deletion failed: Element not found.")
        return " OK!\n"

    def active_routes(self) -> list[RouteEntry]:
        routes = list(self.other_routes)
        local, link = self.tap_address, self._tap_link()
        if local is not None and link is not None:
            routes += self.tap_routes
            routes += [
                RouteEntry(link, None, local, 291),
                RouteEntry(IPv4Network(f"{local}/32"), None, local, 291),
                RouteEntry(IPv4Network(f"{link.broadcast_address}/32"), None, local, 291),
                RouteEntry(IPv4Network("224.0.0.0/4"), None, local, 291),
                RouteEntry(IPv4Network("255.255.255.255/32"), None, local, 291),
            ]
        return sorted(routes, key=lambda e: (e.network.network_address, e.network.netmask))

    def route_print(self) -> str:
        lines = [ROUTE_PRINT_SAMPLE.split("Active Routes:")[0] + "Active Routes:",
                 "Network Destination        Netmask          Gateway       Interface  Metric"]
        for e in self.active_routes():
            gateway = "On-link" if e.gateway is None else str(e.gateway)
            lines.append(f"{e.network.network_address!s:>17}{e.network.netmask!s:>17}"
                         f"{gateway:>17}{e.interface!s:>17}{e.metric:>7}")
        lines += ["=" * 75, "Persistent Routes:", "  None", ""]
        return "\n".join(lines)

    # -- the clock ----------------------------------------------------------------------

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    # -- WinApi -------------------------------------------------------------------------

    def is_admin(self) -> bool:
        self.log.append(("IsUserAnAdmin",))
        return self.admin

    def reg_subkeys(self, path: str) -> list[str]:
        prefix = path + "\\"
        names = []
        for key in self.registry:
            if key.startswith(prefix):
                child = key[len(prefix):].split("\\")[0]
                if child not in names:
                    names.append(child)
        return names

    def reg_value(self, path: str, name: str) -> str | None:
        return self.registry.get(path, {}).get(name)

    def create_file(self, path: str, access: int, share: int, disposition: int,
                    flags: int) -> int:
        self.log.append(("CreateFileW", path, access, share, disposition, flags))
        if path in self.open_errors:
            raise WinApiError("CreateFileW", self.open_errors[path], "refused")
        handle = self.next_handle
        self.next_handle += 4
        self.handles[handle] = path
        return handle

    def device_io_control(self, handle: int, code: int, data: bytes, out_size: int) -> bytes:
        self.log.append(("DeviceIoControl", handle, code, data, out_size))
        assert handle in self.handles
        if not data or not out_size:  # tap-windows6 TapDeviceControl() does this first
            raise WinApiError("DeviceIoControl", 87, "The parameter is incorrect.")
        if code in self.failing_codes:
            raise WinApiError("DeviceIoControl", winapi.ERROR_GEN_FAILURE,
                              "A device attached to the system is not functioning.")
        if code == GET_VERSION:
            return struct.pack("<3L", *self.version)
        if code == GET_MTU:
            return struct.pack("<L", self.driver_mtu)
        if code == CONFIG_TUN:
            local, network, mask = (IPv4Address(data[i:i + 4]) for i in (0, 4, 8))
            self.tun = (local, IPv4Network(f"{network}/{mask}"))
            return b"\x01"
        if code == SET_MEDIA_STATUS:
            (status,) = struct.unpack("<L", data)
            self.media = bool(status)
            if self.media:
                self.tap_routes += self.hidden_routes
                self.hidden_routes = []
            return data
        raise AssertionError(f"unexpected control code {code:#x}")

    def read_file(self, handle: int, size: int, timeout: float) -> bytes | None:
        if not self.media:  # the driver cancels reads while the cable is unplugged
            self.reads_unplugged += 1
            raise WinApiError("ReadFile", winapi.ERROR_OPERATION_ABORTED, "aborted")
        try:
            item = self.packets.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    def write_file(self, handle: int, data: bytes, timeout: float) -> bool:
        if isinstance(self.write_result, Exception):
            raise self.write_result
        if self.write_result:
            self.written.append(data)
        return self.write_result

    def cancel_io(self, handle: int) -> None:
        self.log.append(("CancelIoEx", handle))
        self.packets.put(WinApiError("ReadFile", winapi.ERROR_OPERATION_ABORTED, "aborted"))

    def close_handle(self, handle: int) -> None:
        self.log.append(("CloseHandle", handle))
        del self.handles[handle]

    def lock_file(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def unlock_file(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


@pytest.fixture
def win() -> FakeWindows:
    w = FakeWindows()
    w.add_adapter(0, "PCI\\VEN_8086&DEV_15BC", "{11111111-2222-3333-4444-555555555555}",
                  "Ethernet")
    w.add_adapter(1, "tap0901", GUID, IFNAME)
    return w


@pytest.fixture
def made() -> Iterator[list[WindowsAdapter]]:
    adapters: list[WindowsAdapter] = []
    yield adapters
    for a in adapters:  # a test that fails half-way still stops its reader thread
        tap = a.interface
        if tap is not None:
            tap.stop_reader()


@pytest.fixture
def new_adapter(win: FakeWindows, tmp_path: Path, made: list[WindowsAdapter]) -> Any:
    def make(**kw: Any) -> WindowsAdapter:
        kw.setdefault("runner", win)
        a = WindowsAdapter(tmp_path / "run", api=win, clock=win.clock, sleep=win.sleep, **kw)
        made.append(a)
        return a

    return make


def bring_up(a: WindowsAdapter) -> VirtualInterface:
    """What the host daemon does, in its order."""
    a.cleanup_leftovers(IFNAME)
    interface = a.open_interface(IFNAME, 1400)
    a.set_address(LOCAL, PEER)
    a.add_route(TUNNEL)
    return interface


BRING_UP = [
    ("IsUserAnAdmin",),
    CREATE,
    IO(0x00220008, bytes(12), 12),  # TAP_WIN_IOCTL_GET_VERSION (zeroed input: never empty)
    IO(0x0022000C, bytes(4), 4),  # TAP_WIN_IOCTL_GET_MTU
    # TAP_WIN_IOCTL_CONFIG_TUN: local, remote network, remote netmask, network byte order
    IO(0x00220028, bytes([192, 168, 251, 2, 192, 168, 251, 0, 255, 255, 255, 252]), 12),
    IO(0x00220018, b"\x01\x00\x00\x00", 4),  # TAP_WIN_IOCTL_SET_MEDIA_STATUS, ULONG 1
    R("netsh", "interface", "ip", "set", "address", IFNAME, "static", "192.168.251.2",
      "255.255.255.252"),
    R("netsh", "interface", "ip", "show", "addresses", IFNAME),
    R("netsh", "interface", "ipv4", "set", "subinterface", IFNAME, "mtu=1400",
      "store=persistent"),
    R("netsh", "interface", "ip", "delete", "dns", IFNAME, "all"),
    R("netsh", "interface", "ip", "delete", "wins", IFNAME, "all"),
    R("route", "add", "192.168.251.0", "mask", "255.255.255.0", "192.168.251.1"),
]


def state_file(tmp_path: Path) -> Path:
    return tmp_path / "run" / f"{IFNAME}.json"


# --- control codes -------------------------------------------------------------------


def test_control_codes_are_tap_windows6s() -> None:
    assert tapmod.TAP_WIN_IOCTL_GET_MAC == GET_MAC == 0x00220004
    assert tapmod.TAP_WIN_IOCTL_GET_VERSION == GET_VERSION == 0x00220008
    assert tapmod.TAP_WIN_IOCTL_GET_MTU == GET_MTU == 0x0022000C
    assert tapmod.TAP_WIN_IOCTL_CONFIG_POINT_TO_POINT == CONFIG_POINT_TO_POINT == 0x00220014
    assert tapmod.TAP_WIN_IOCTL_SET_MEDIA_STATUS == SET_MEDIA_STATUS == 0x00220018
    assert tapmod.TAP_WIN_IOCTL_CONFIG_TUN == CONFIG_TUN == 0x00220028
    # The CreateFileW flags, against the Windows SDK's values.
    assert winapi.GENERIC_READ | winapi.GENERIC_WRITE == 0xC0000000
    assert winapi.OPEN_EXISTING == 3
    assert winapi.FILE_ATTRIBUTE_SYSTEM | winapi.FILE_FLAG_OVERLAPPED == 0x40000004


# --- the plugin hook -----------------------------------------------------------------


def test_hook_returns_the_adapter_for_win32_only() -> None:
    assert platform_windows.ctun_platform_adapter(platform="win32") is WindowsAdapter
    for other in ("linux", "darwin", "cygwin", "msys", "win64"):
        assert platform_windows.ctun_platform_adapter(platform=other) is None
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(platform_windows)
    assert pm.hook.ctun_platform_adapter(platform="win32") is WindowsAdapter
    assert pm.hook.ctun_platform_adapter(platform="linux") is None
    assert issubclass(WindowsAdapter, PlatformAdapter)
    assert WindowsAdapter.name == "windows"
    assert WindowsAdapter.is_supported() is False  # this is not Windows
    assert not WindowsAdapter.__abstractmethods__
    assert not TapInterface.__abstractmethods__


def test_the_real_api_is_windows_only() -> None:
    with pytest.raises(PlatformError, match="cannot run on linux"):
        winapi.system_api()


# --- finding the adapter -------------------------------------------------------------


def test_registry_discovery_picks_tap0901_adapters_only(win: FakeWindows) -> None:
    win.add_adapter(2, "wintun", "{99999999-0000-0000-0000-000000000001}", "OpenVPN Wintun")
    win.add_adapter(3, "root\\tap0901", OTHER_GUID, "Ethernet 3")  # tapctl's hardware id
    win.add_adapter(4, "TAP0901", "{99999999-0000-0000-0000-000000000002}", None)  # no name
    win.add_adapter(5, "ovpn-dco", "{99999999-0000-0000-0000-000000000003}", "OpenVPN DCO")
    win.add_adapter(6, "tap0901", None, None)  # half-installed: no NetCfgInstanceId
    win.registry[f"{CLASS_KEY}\\Properties"] = {}  # not an adapter (and access-denied)
    win.registry[f"{CLASS_KEY}\\Configuration\\Reset"] = {"ComponentId": "tap0901"}
    found = find_tap_adapters(win)
    assert found == [TapAdapterInfo(GUID, IFNAME), TapAdapterInfo(OTHER_GUID, "Ethernet 3")]
    assert found[0].device_path == "\\\\.\\Global\\" + GUID + ".tap"


def test_an_adapter_named_ctun_is_preferred() -> None:
    plain = TapAdapterInfo("{A}", "Ethernet 3")
    other = TapAdapterInfo("{B}", "ctun-other")
    exact = TapAdapterInfo("{C}", "CTUN0")
    openvpn = TapAdapterInfo("{D}", "OpenVPN TAP-Windows6")
    assert preference_order([plain, other, exact, openvpn], "ctun0") == [
        exact, other, plain, openvpn,
    ]
    assert preference_order([plain, openvpn, other], "ctun1") == [other, plain, openvpn]
    assert preference_order([plain, openvpn], "ctun0") == [plain, openvpn]


def test_driver_missing_says_what_to_install(win: FakeWindows, new_adapter: Any) -> None:
    win.registry = {}
    win.add_adapter(0, "PCI\\VEN_8086&DEV_15BC", "{11111111-2222-3333-4444-555555555555}",
                    "Ethernet")
    a = new_adapter()
    with pytest.raises(PlatformError) as info:
        a.open_interface(IFNAME, 1400)
    assert str(info.value) == DRIVER_MISSING == (
        "the TAP-windows6 driver (tap0901) is not installed: install it (it ships with "
        "OpenVPN, or tap-windows6 from GitHub) and run ctun again"
    )
    assert [e for e in win.log if e[0] == "CreateFileW"] == []
    a.close()


def test_a_busy_adapter_is_skipped_for_the_next(win: FakeWindows, new_adapter: Any) -> None:
    win.add_adapter(2, "tap0901", OTHER_GUID, "Ethernet 3")
    win.open_errors[CREATE[1]] = winapi.ERROR_ACCESS_DENIED  # ctun0: OpenVPN has it
    a = new_adapter()
    tap = a.open_interface(IFNAME, 1400)
    creates = [e[1] for e in win.log if e[0] == "CreateFileW"]
    assert creates == [CREATE[1], "\\\\.\\Global\\" + OTHER_GUID + ".tap"]
    a.set_address(LOCAL, PEER)
    assert R("netsh", "interface", "ip", "set", "address", "Ethernet 3", "static",
             "192.168.251.2", "255.255.255.252") in win.log  # one argument, space and all
    assert tap.name == IFNAME  # ctun's name; the control socket is named after it
    a.close()


def test_every_adapter_busy_is_one_clear_error(win: FakeWindows, new_adapter: Any) -> None:
    win.add_adapter(2, "tap0901", OTHER_GUID, "Ethernet 3")
    win.open_errors[CREATE[1]] = winapi.ERROR_GEN_FAILURE
    win.open_errors["\\\\.\\Global\\" + OTHER_GUID + ".tap"] = winapi.ERROR_FILE_NOT_FOUND
    a = new_adapter()
    with pytest.raises(PlatformError) as info:
        a.open_interface(IFNAME, 1400)
    assert str(info.value).startswith(
        'no TAP-windows6 adapter is free ("ctun0" is in use by another program; '
        '"Ethernet 3" is disabled or removed): '
    )
    a.close()


def test_an_old_driver_is_refused_and_closed(win: FakeWindows, new_adapter: Any) -> None:
    win.version = (9, 8, 0)
    a = new_adapter()
    with pytest.raises(PlatformError, match=r"driver version 9\.8; ctun needs 9\.9 or later"):
        a.open_interface(IFNAME, 1400)
    assert win.log[-1] == ("CloseHandle", HANDLE) and win.handles == {}
    a.close()


def test_an_mtu_above_the_adapters_own_is_refused(win: FakeWindows, new_adapter: Any) -> None:
    a = new_adapter()
    with pytest.raises(PlatformError, match="MTU 9000 is larger than TAP adapter ctun0's own "
                                            "MTU of 1500: set ctun's mtu to 1500 or less"):
        a.open_interface(IFNAME, 9000)
    assert win.handles == {}
    a.close()


def test_not_an_administrator(win: FakeWindows, new_adapter: Any) -> None:
    win.admin = False
    a = new_adapter()
    with pytest.raises(PlatformError) as info:
        a.cleanup_leftovers(IFNAME)
    assert str(info.value) == NOT_ADMIN
    assert str(info.value).startswith(
        "ctun needs an elevated (Administrator) prompt on Windows"
    )
    assert win.log == [("IsUserAnAdmin",)]
    assert not (Path(a._run_dir) / f"{IFNAME}.lock").exists()  # nothing touched


# --- bring-up, routes, MTU, teardown: the exact sequences ------------------------------


def test_bring_up_sequence(win: FakeWindows, new_adapter: Any, tmp_path: Path) -> None:
    a = new_adapter()
    assert a.cleanup_leftovers(IFNAME) == []
    tap = a.open_interface(IFNAME, 1400)
    a.set_address(LOCAL, PEER)
    a.add_route(TUNNEL)
    assert win.log == BRING_UP
    assert win.tun == (LOCAL, IPv4Network("192.168.251.0/30"))
    assert isinstance(tap, TapInterface) and tap.name == IFNAME
    assert tap.started  # after the cable was connected, not before
    record = json.loads(state_file(tmp_path).read_text())
    assert record == {
        "pid": os.getpid(),
        "ifname": IFNAME,
        "guid": GUID,
        "connection": IFNAME,
        "local": "192.168.251.2",
        "peer": "192.168.251.1",
        "routes": [["192.168.251.0/24", "192.168.251.1"]],
    }
    assert a.routes() == [IPv4Network("192.168.251.0/24"), IPv4Network("192.168.251.0/30")]
    a.close()


def test_add_and_remove_route_sequences(win: FakeWindows, new_adapter: Any,
                                        tmp_path: Path) -> None:
    a = new_adapter()
    bring_up(a)
    del win.log[:]
    a.add_route(DOCKER)
    assert win.log == [R("route", "add", "172.18.0.0", "mask", "255.255.0.0", "192.168.251.1")]
    assert DOCKER in a.routes()
    assert json.loads(state_file(tmp_path).read_text())["routes"] == [
        ["172.18.0.0/16", "192.168.251.1"], ["192.168.251.0/24", "192.168.251.1"],
    ]
    del win.log[:]
    a.remove_route(DOCKER)
    assert win.log == [
        R("route", "delete", "172.18.0.0", "mask", "255.255.0.0", "192.168.251.1"),
    ]
    assert DOCKER not in a.routes()
    assert json.loads(state_file(tmp_path).read_text())["routes"] == [
        ["192.168.251.0/24", "192.168.251.1"],
    ]
    a.close()


def test_routes_already_there_or_already_gone_are_not_errors(
    win: FakeWindows, new_adapter: Any
) -> None:
    a = new_adapter()
    bring_up(a)
    del win.log[:]
    a.add_route(TUNNEL)  # again: route says "The object already exists."
    assert win.log == [
        R("route", "add", "192.168.251.0", "mask", "255.255.255.0", "192.168.251.1"),
        R("route", "print", "-4"),
    ]
    del win.log[:]
    a.remove_route(DOCKER)  # never added: "Element not found."
    assert win.log == [
        R("route", "delete", "172.18.0.0", "mask", "255.255.0.0", "192.168.251.1"),
        R("route", "print", "-4"),
    ]
    a.close()


def test_a_route_that_cannot_be_added_says_why(win: FakeWindows, new_adapter: Any,
                                              tmp_path: Path) -> None:
    a = new_adapter()
    bring_up(a)
    with pytest.raises(PlatformError, match=r"cannot add route 10\.9\.0\.0/16 via 10\.1\.1\.1: "
                                            r"route add .* failed \(exit 1\): The route "
                                            "addition failed: Either the interface index"):
        a.add_route(IPv4Network("10.9.0.0/16"), via=IPv4Address("10.1.1.1"))
    # Not left in the record, so a later crash cleanup will not look for it.
    assert json.loads(state_file(tmp_path).read_text())["routes"] == [
        ["192.168.251.0/24", "192.168.251.1"],
    ]
    a.close()


def test_replace_route_deletes_then_adds(win: FakeWindows, new_adapter: Any) -> None:
    a = new_adapter()
    bring_up(a)
    # A VPN's route for the same network, on its own interface.
    win.other_routes.append(
        RouteEntry(DOCKER, IPv4Address("10.8.0.5"), IPv4Address("10.8.0.6"), 291)
    )
    assert a.conflicting_route(DOCKER) == "172.18.0.0/16 via 10.8.0.5 (interface 10.8.0.6)"
    del win.log[:]
    a.replace_route(DOCKER)
    assert win.log == [
        R("route", "delete", "172.18.0.0", "mask", "255.255.0.0"),
        R("route", "add", "172.18.0.0", "mask", "255.255.0.0", "192.168.251.1"),
    ]
    assert a.conflicting_route(DOCKER) is None
    assert DOCKER in a.routes()
    a.close()


def test_mtu_change(win: FakeWindows, new_adapter: Any) -> None:
    a = new_adapter()
    bring_up(a)
    del win.log[:]
    a.set_mtu(1280)
    assert win.log == [
        R("netsh", "interface", "ipv4", "set", "subinterface", IFNAME, "mtu=1280",
          "store=persistent"),
    ]
    del win.log[:]
    with pytest.raises(PlatformError, match="own MTU of 1500"):
        a.set_mtu(1501)
    assert win.log == []
    a.close()


def test_mtu_set_before_the_address_is_applied_with_it(win: FakeWindows,
                                                       new_adapter: Any) -> None:
    a = new_adapter()
    a.open_interface(IFNAME, 1400)
    a.set_mtu(1300)
    assert not [e for e in win.log if e[0] == "run"]  # the adapter is still unplugged
    a.set_address(LOCAL, PEER)
    mtus = [e for e in win.log if e[0] == "run" and "subinterface" in e[1]]
    assert mtus == [R("netsh", "interface", "ipv4", "set", "subinterface", IFNAME,
                      "mtu=1300", "store=persistent")]
    a.close()


def test_teardown_sequence(win: FakeWindows, new_adapter: Any, tmp_path: Path) -> None:
    a = new_adapter()
    bring_up(a)
    a.add_route(DOCKER)
    del win.log[:]
    a.close()
    assert win.log == [
        R("route", "delete", "172.18.0.0", "mask", "255.255.0.0", "192.168.251.1"),
        R("route", "delete", "192.168.251.0", "mask", "255.255.255.0", "192.168.251.1"),
        ("CancelIoEx", HANDLE),  # wakes the reader thread's pending read
        IO(0x00220018, b"\x00\x00\x00\x00", 4),  # TAP_WIN_IOCTL_SET_MEDIA_STATUS, ULONG 0
        ("CloseHandle", HANDLE),
    ]
    assert win.tap_routes == [] and win.handles == {} and not win.media
    assert win.reads_unplugged == 0  # the reader ran only while the cable was connected
    assert not state_file(tmp_path).exists()
    a.close()  # idempotent
    assert len(win.log) == 5
    # The name is free again.
    b = new_adapter()
    assert b.cleanup_leftovers(IFNAME) == []
    b.close()


def test_a_failed_teardown_keeps_the_record_for_next_time(
    win: FakeWindows, new_adapter: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = new_adapter()
    bring_up(a)

    def stuck(argv: tuple[str, ...]) -> str:
        raise Failed("The route deletion failed: Access is denied.")

    monkeypatch.setattr(win, "_route_delete", stuck)
    with pytest.raises(PlatformError, match=r"cannot remove route 192\.168\.251\.0/24: .*"
                                            "Access is denied"):
        a.close()
    assert win.handles == {}  # the device is closed all the same
    assert state_file(tmp_path).exists()
    b = new_adapter()
    b.cleanup_leftovers(IFNAME)  # the lock was released
    b.close()


def test_the_name_is_locked_while_in_use(win: FakeWindows, new_adapter: Any) -> None:
    a = new_adapter()
    a.cleanup_leftovers(IFNAME)
    b = new_adapter()
    with pytest.raises(PlatformError, match=rf"interface ctun0 is in use by another running "
                                            rf"ctun \(pid {os.getpid()}\)"):
        b.cleanup_leftovers(IFNAME)
    a.close()
    assert b.cleanup_leftovers(IFNAME) == []
    b.close()


# --- crash cleanup -------------------------------------------------------------------


def crash(a: WindowsAdapter, win: FakeWindows) -> None:
    """The process dies: Windows closes its handles (so its lock goes) and unplugs the TAP
    adapter's cable; the state file stays."""
    tap = a.interface
    assert tap is not None and a._run is not None
    tap.stop_reader()
    os.close(a._run._fd)  # closing the file releases the lock
    a._run = None
    a._tap = None
    del win.handles[tap.device.handle]


def test_bring_up_after_a_crash(win: FakeWindows, new_adapter: Any, tmp_path: Path) -> None:
    crashed = new_adapter()
    bring_up(crashed)
    crashed.add_route(DOCKER)
    crashed.add_route(IPv4Network("10.30.0.0/16"))
    crash(crashed, win)
    # Windows kept two of the routes active; the third only comes back with the adapter.
    hidden = [e for e in win.tap_routes if e.network == IPv4Network("10.30.0.0/16")]
    win.tap_routes = [e for e in win.tap_routes if e not in hidden]
    win.hidden_routes = hidden
    del win.log[:]

    a = new_adapter()
    cleaned = a.cleanup_leftovers(IFNAME)
    handle = HANDLE + 4
    assert win.log == [
        ("IsUserAnAdmin",),
        R("route", "print", "-4"),
        R("route", "delete", "172.18.0.0", "mask", "255.255.0.0", "192.168.251.1"),
        R("route", "delete", "192.168.251.0", "mask", "255.255.255.0", "192.168.251.1"),
        CREATE,
        IO(0x00220018, b"\x00\x00\x00\x00", 4, handle),  # media status 0
        ("CloseHandle", handle),
    ]
    who = f"a crashed ctun (pid {os.getpid()})"
    assert cleaned == [
        f"deleted route 172.18.0.0/16 via 192.168.251.1 left by {who}",
        f"deleted route 192.168.251.0/24 via 192.168.251.1 left by {who}",
        f'reset the media status of TAP adapter "ctun0" {GUID} left by {who}',
        f"removed state file {state_file(tmp_path)} left by {who}",
    ]
    assert not state_file(tmp_path).exists()

    del win.log[:]
    a.open_interface(IFNAME, 1400)
    a.set_address(LOCAL, PEER)
    a.add_route(TUNNEL)
    handle += 4
    expected = [e if e[0] != "DeviceIoControl" else (*e[:1], handle, *e[2:])
                for e in BRING_UP[1:]]  # no second IsUserAnAdmin: asked once per adapter
    # The route that came back with the adapter goes before ctun adds its own.
    wins = expected.index(R("netsh", "interface", "ip", "delete", "wins", IFNAME, "all"))
    expected[wins + 1:wins + 1] = [
        R("route", "print", "-4"),
        R("route", "delete", "10.30.0.0", "mask", "255.255.0.0", "192.168.251.1"),
    ]
    assert win.log == expected
    assert a.routes() == [IPv4Network("192.168.251.0/24"), IPv4Network("192.168.251.0/30")]
    a.close()


def test_a_crash_before_any_route_only_resets_the_adapter(
    win: FakeWindows, new_adapter: Any, tmp_path: Path
) -> None:
    crashed = new_adapter()
    crashed.cleanup_leftovers(IFNAME)
    crashed.open_interface(IFNAME, 1400)
    crash(crashed, win)
    del win.log[:]
    a = new_adapter()
    cleaned = a.cleanup_leftovers(IFNAME)
    assert win.log == [
        ("IsUserAnAdmin",),
        CREATE,
        IO(0x00220018, b"\x00\x00\x00\x00", 4, HANDLE + 4),
        ("CloseHandle", HANDLE + 4),
    ]
    assert len(cleaned) == 2
    a.close()


def test_a_crashed_runs_adapter_now_in_use_elsewhere_is_left_alone(
    win: FakeWindows, new_adapter: Any
) -> None:
    crashed = new_adapter()
    crashed.cleanup_leftovers(IFNAME)
    crashed.open_interface(IFNAME, 1400)
    crash(crashed, win)
    win.open_errors[CREATE[1]] = winapi.ERROR_ACCESS_DENIED  # OpenVPN took it meanwhile
    a = new_adapter()
    cleaned = a.cleanup_leftovers(IFNAME)
    assert [line.split(" left by")[0] for line in cleaned] == [
        f"removed state file {a._run_dir / 'ctun0.json'}"
    ]
    assert not [e for e in win.log if e[0] == "DeviceIoControl" and e[1] != HANDLE]
    a.close()


def test_a_failing_media_reset_does_not_block_the_next_start(
    win: FakeWindows, new_adapter: Any
) -> None:
    crashed = new_adapter()
    crashed.cleanup_leftovers(IFNAME)
    crashed.open_interface(IFNAME, 1400)
    crash(crashed, win)
    win.failing_codes = {SET_MEDIA_STATUS}
    a = new_adapter()
    cleaned = a.cleanup_leftovers(IFNAME)
    assert [line.split(" left by")[0] for line in cleaned] == [
        f"removed state file {a._run_dir / 'ctun0.json'}"
    ]
    assert win.handles == {}  # opened, and closed again
    a.close()


def test_a_damaged_state_file_is_removed(win: FakeWindows, new_adapter: Any,
                                         tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    state_file(tmp_path).write_text("{not json")
    a = new_adapter()
    assert a.cleanup_leftovers(IFNAME) == [
        f"removed state file {state_file(tmp_path)} left by a crashed ctun (pid unknown)"
    ]
    a.close()


# --- the address poll ----------------------------------------------------------------


def test_the_address_poll_waits_until_it_shows(win: FakeWindows, new_adapter: Any) -> None:
    win.address_after = 3  # three polls see no address yet
    a = new_adapter()
    a.open_interface(IFNAME, 1400)
    a.set_address(LOCAL, PEER)
    show = R("netsh", "interface", "ip", "show", "addresses", IFNAME)
    assert win.log.count(show) == 4
    assert win.sleeps == [0.2, 0.2, 0.2]
    assert win.log.index(show) == win.log.index(
        R("netsh", "interface", "ip", "set", "address", IFNAME, "static", "192.168.251.2",
          "255.255.255.252")
    ) + 1
    a.close()


def test_an_address_that_never_shows_is_an_error_not_a_hang(
    win: FakeWindows, new_adapter: Any
) -> None:
    win.address_after = 10**9
    a = new_adapter()
    a.open_interface(IFNAME, 1400)
    start = win.now
    with pytest.raises(PlatformError) as info:
        a.set_address(LOCAL, PEER)
    assert str(info.value) == (
        "the address 192.168.251.2 never appeared on TAP adapter ctun0 within 10 s (netsh "
        'interface ip show addresses "ctun0"): check that the adapter is enabled and that no '
        "other adapter has 192.168.251.2"
    )
    shows = [e for e in win.log if e == R("netsh", "interface", "ip", "show", "addresses",
                                           IFNAME)]
    assert len(shows) == len(win.sleeps) + 1
    assert 10.0 <= win.now - start <= 10.2 + 1e-9
    assert set(win.sleeps) == {0.2}
    a.close()


def test_the_deadline_and_interval_are_settable(win: FakeWindows, new_adapter: Any) -> None:
    win.address_after = 10**9
    a = new_adapter(address_timeout=1.0, address_poll=0.5)
    a.open_interface(IFNAME, 1400)
    with pytest.raises(PlatformError, match="within 1 s"):
        a.set_address(LOCAL, PEER)
    assert win.sleeps == [0.5, 0.5]
    a.close()


def test_netsh_refusing_an_address_the_adapter_already_has(
    win: FakeWindows, new_adapter: Any
) -> None:
    a = new_adapter()
    a.open_interface(IFNAME, 1400)
    win.address = ("192.168.251.2", "255.255.255.252")  # from an earlier run: persistent
    win.set_address_error = "The object already exists."
    a.set_address(LOCAL, PEER)
    set_cmd = R("netsh", "interface", "ip", "set", "address", IFNAME, "static",
                "192.168.251.2", "255.255.255.252")
    at = win.log.index(set_cmd)
    assert win.log[at + 1] == R("netsh", "interface", "ip", "show", "addresses", IFNAME)
    assert win.sleeps == []
    a.close()


def test_netsh_refusing_an_address_is_reported(win: FakeWindows, new_adapter: Any) -> None:
    a = new_adapter()
    a.open_interface(IFNAME, 1400)
    win.set_address_error = "The filename, directory name, or volume label syntax is incorrect."
    with pytest.raises(PlatformError, match=r"cannot set address 192\.168\.251\.2/30 on TAP "
                                            "adapter ctun0: netsh .* failed .*syntax"):
        a.set_address(LOCAL, PEER)
    a.close()


# --- addressing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "peer", "link"),
    [
        ("192.168.251.2", "192.168.251.1", "192.168.251.0/30"),  # ctun's default
        ("192.168.251.1", "192.168.251.2", "192.168.251.0/30"),
        ("10.0.0.3", "10.0.0.2", "10.0.0.0/29"),  # .3 is the /30's broadcast address
        ("10.0.0.5", "10.0.0.4", "10.0.0.0/29"),  # .4 is the /30's network address
        ("10.0.0.128", "10.0.0.127", "10.0.0.0/24"),
        ("10.0.1.0", "10.0.0.255", "10.0.0.0/23"),
    ],
)
def test_the_link_subnet_holds_both_ends_as_hosts(local: str, peer: str, link: str) -> None:
    net = link_network(IPv4Address(local), IPv4Address(peer))
    assert net == IPv4Network(link)
    assert IPv4Address(local) in net and IPv4Address(peer) in net
    ends = {net.network_address, net.broadcast_address}
    assert IPv4Address(local) not in ends and IPv4Address(peer) not in ends


def test_the_link_needs_two_neighbours() -> None:
    with pytest.raises(PlatformError, match=r"both 10\.0\.0\.1"):
        link_network(IPv4Address("10.0.0.1"), IPv4Address("10.0.0.1"))
    with pytest.raises(PlatformError, match="too far apart"):
        link_network(IPv4Address("10.0.0.1"), IPv4Address("192.168.0.1"))


def test_routes_need_the_address_first(win: FakeWindows, new_adapter: Any) -> None:
    a = new_adapter()
    a.open_interface(IFNAME, 1400)
    with pytest.raises(PlatformError, match="call set_address"):
        a.add_route(DOCKER)
    assert a.routes() == []
    a.close()


# --- what `route print -4` says -------------------------------------------------------


def test_route_print_is_parsed() -> None:
    entries = parse_route_print(ROUTE_PRINT_SAMPLE)
    assert len(entries) == 32  # the active routes; not the interface list, not persistent
    assert entries[0] == RouteEntry(IPv4Network("0.0.0.0/0"), IPv4Address("192.168.1.1"),
                                    IPv4Address("192.168.1.23"), 35)
    assert RouteEntry(IPv4Network("192.168.1.0/24"), None, IPv4Address("192.168.1.23"),
                      291) in entries
    assert not [e for e in entries if e.network == IPv4Network("10.20.0.0/16")]
    german = parse_route_print(ROUTE_PRINT_GERMAN)
    assert [(str(e.network), e.gateway) for e in german] == [
        ("0.0.0.0/0", IPv4Address("192.168.1.1")),
        ("192.168.1.0/24", None),
        ("172.18.0.0/16", IPv4Address("192.168.251.1")),
    ]


def sample_adapter(win: FakeWindows, new_adapter: Any, text: str) -> WindowsAdapter:
    """An adapter that believes it is up, over a fixed `route print -4`."""
    a: WindowsAdapter = new_adapter(runner=lambda argv: text)
    a._local, a._peer = LOCAL, PEER
    return a


def test_routes_lists_what_goes_into_the_adapter(win: FakeWindows, new_adapter: Any) -> None:
    a = sample_adapter(win, new_adapter, ROUTE_PRINT_SAMPLE)
    assert a.routes() == [
        IPv4Network("172.18.0.0/16"),
        IPv4Network("192.168.251.0/24"),
        IPv4Network("192.168.251.0/30"),
    ]


def test_conflicting_route_on_a_realistic_table(win: FakeWindows, new_adapter: Any) -> None:
    a = sample_adapter(win, new_adapter, ROUTE_PRINT_SAMPLE)
    # The LAN, the WSL switch and the VPN's own subnet are conflicts...
    assert a.conflicting_route(IPv4Network("192.168.0.0/16")) == (
        "192.168.1.0/24 on-link (interface 192.168.1.23)"
    )
    assert a.conflicting_route(IPv4Network("172.24.0.0/16")) == (
        "172.24.16.0/20 on-link (interface 172.24.16.1)"
    )
    assert a.conflicting_route(IPv4Network("10.8.0.0/24")) == (
        "10.8.0.1/32 via 10.8.0.5 (interface 10.8.0.6)"
    )
    assert a.conflicting_route(IPv4Network("203.0.113.0/24")) == (
        "203.0.113.10/32 via 192.168.1.1 (interface 192.168.1.23)"
    )
    # ...the default route, the VPN's def1 halves, multicast and our own routes are not.
    assert a.conflicting_route(IPv4Network("172.18.0.0/16")) is None
    assert a.conflicting_route(IPv4Network("192.168.251.0/24")) is None
    assert a.conflicting_route(IPv4Network("172.17.0.0/16")) is None
    assert a.conflicting_route(IPv4Network("224.1.0.0/16")) is None


def test_conflicting_route_before_the_address(win: FakeWindows, new_adapter: Any) -> None:
    a = new_adapter(runner=lambda argv: ROUTE_PRINT_SAMPLE)
    # Before set_address() nothing is ours: a leftover route on a TAP address counts.
    assert a.conflicting_route(IPv4Network("172.18.0.0/16")) == (
        "172.18.0.0/16 via 192.168.251.1 (interface 192.168.251.2)"
    )


# --- the packet queue the engine polls ------------------------------------------------


@pytest.fixture
def device(win: FakeWindows) -> TapDevice:
    win.handles[HANDLE] = "tap"
    win.media = True
    return TapDevice(win, TapAdapterInfo(GUID, IFNAME), HANDLE)


def started(tap: TapInterface) -> TapInterface:
    tap.start()
    return tap


def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_interface_works_with_default_selector(win: FakeWindows, device: TapDevice) -> None:
    tap = started(TapInterface(IFNAME, device, read_wait=0.02))
    sel = selectors.DefaultSelector()
    try:
        sel.register(tap.fileno(), selectors.EVENT_READ)
        assert sel.select(0.05) == []  # nothing read yet: not readable
        packets = [bytes([0x45, 0, 0, 20]) + bytes([i]) * 16 for i in range(3)]
        for p in packets:
            win.packets.put(p)
        assert sel.select(5.0)
        wait_until(lambda: len(tap._queue) == 3)
        assert tap.read_packets(64) == packets
        assert tap.read_packets(64) == []
        assert sel.select(0.05) == []  # the signal bytes were drained with the queue

        # A batch larger than the engine's limit keeps the descriptor readable.
        many = [bytes([0x45]) + i.to_bytes(2, "big") for i in range(100)]
        for p in many:
            win.packets.put(p)
        wait_until(lambda: len(tap._queue) == 100)
        assert sel.select(5.0)
        assert tap.read_packets(64) == many[:64]
        assert sel.select(0.05)  # still readable: 36 are waiting
        assert tap.read_packets(64) == many[64:]
        assert sel.select(0.05) == []
    finally:
        sel.close()
        tap.close()
    assert ("CancelIoEx", HANDLE) in win.log
    assert win.log[-2:] == [IO(0x00220018, b"\x00\x00\x00\x00", 4), ("CloseHandle", HANDLE)]
    with pytest.raises(ValueError, match="closed"):
        tap.fileno()
    tap.close()  # idempotent


def test_the_engine_pump_pattern_sees_every_packet(win: FakeWindows,
                                                   device: TapDevice) -> None:
    """The engine's interface pump: select, then read_packets(64), from another thread."""
    tap = started(TapInterface(IFNAME, device, read_wait=0.02))
    got: list[bytes] = []
    stop = threading.Event()

    def pump() -> None:
        sel = selectors.DefaultSelector()
        sel.register(tap.fileno(), selectors.EVENT_READ)
        while not stop.is_set():
            if sel.select(0.1):
                got.extend(tap.read_packets(64))
        sel.close()

    thread = threading.Thread(target=pump)
    thread.start()
    sent = [i.to_bytes(4, "big") for i in range(500)]
    try:
        for i, p in enumerate(sent):
            win.packets.put(p)
            if i % 50 == 0:
                time.sleep(0.002)
        wait_until(lambda: len(got) == len(sent))
    finally:
        stop.set()
        thread.join()
        tap.close()
    assert got == sent and tap.read_drops == 0


def test_a_full_queue_drops_and_counts(win: FakeWindows, device: TapDevice) -> None:
    tap = started(TapInterface(IFNAME, device, read_wait=0.02, queue_packets=4))
    try:
        for i in range(10):
            win.packets.put(bytes([0x45, i]))
        wait_until(lambda: win.packets.empty() and tap.read_drops == 6)
        assert tap.read_packets(64) == [bytes([0x45, i]) for i in range(4)]
    finally:
        tap.close()


def test_writes_never_block_and_failures_are_counted(win: FakeWindows,
                                                     device: TapDevice) -> None:
    tap = started(TapInterface(IFNAME, device, read_wait=0.02))
    try:
        tap.write_packet(b"\x45one")
        assert win.written == [b"\x45one"] and tap.write_drops == 0
        win.write_result = False  # not taken within the bounded wait
        tap.write_packet(b"\x45two")
        win.write_result = WinApiError("WriteFile", winapi.ERROR_GEN_FAILURE,
                                       "A device attached to the system is not functioning.")
        tap.write_packet(b"\x45three")
        assert tap.write_drops == 2 and win.written == [b"\x45one"]
        assert tap.last_write_error == "A device attached to the system is not functioning."
    finally:
        tap.close()
    with pytest.raises(ValueError, match="closed"):
        tap.write_packet(b"\x45four")


def test_a_failing_device_stops_the_engine_with_a_reason(win: FakeWindows,
                                                         device: TapDevice) -> None:
    tap = started(TapInterface(IFNAME, device, read_wait=0.02))
    sel = selectors.DefaultSelector()
    try:
        sel.register(tap.fileno(), selectors.EVENT_READ)
        win.packets.put(b"\x45last")
        win.packets.put(WinApiError("ReadFile", winapi.ERROR_GEN_FAILURE,
                                    "A device attached to the system is not functioning."))
        assert sel.select(5.0)
        wait_until(lambda: tap._failure is not None)
        assert tap.read_packets(64) == [b"\x45last"]  # what was read still arrives
        with pytest.raises(PlatformError, match="reading from TAP adapter ctun0 failed: A "
                                                "device attached"):
            tap.read_packets(64)
    finally:
        sel.close()
        tap.close()


# --- the real runner and the run directory --------------------------------------------


def test_the_runner_reports_a_failing_command() -> None:
    assert run(["sh", "-c", "echo ' OK!'"]) == " OK!\n"
    with pytest.raises(PlatformError) as info:
        run(["sh", "-c", "echo; echo 'The route addition failed: Element not found.'; exit 1"])
    assert str(info.value) == (
        "sh -c echo; echo 'The route addition failed: Element not found.'; exit 1 failed "
        "(exit 1): The route addition failed: Element not found."
    )
    with pytest.raises(PlatformError, match="not found"):
        run(["ctun-no-such-tool"])


def test_the_run_directory_defaults_to_programdata(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTUN_RUN_DIR", raising=False)
    monkeypatch.setenv("PROGRAMDATA", "D:\\ProgramData")
    assert default_run_dir() == Path("D:\\ProgramData") / "ctun"
    monkeypatch.setenv("CTUN_RUN_DIR", "/tmp/elsewhere")
    assert default_run_dir() == Path("/tmp/elsewhere")


# -- ctun access through this adapter ------------------------------------------------------


class _EngineFilter:
    """What `Access` asks of the engine: only its filter of what the tunnel may deliver."""

    def set_peer_networks(self, peer: str, allowed: Any, routes: Any) -> None:
        self.last = (peer, list(allowed), list(routes))


def test_ctun_access_applies_the_hosts_settings_with_these_commands(
    win: FakeWindows, new_adapter: Any
) -> None:
    from ctun.core.access import Access

    a = new_adapter()
    a.cleanup_leftovers(IFNAME)
    a.open_interface(IFNAME, 1400)
    access = Access(a, _EngineFilter(), "192.0.2.10")  # type: ignore[arg-type]
    del win.log[:]
    access.apply({"addr": "192.168.251.10/24", "peer": "192.168.251.2", "mtu": 1400,
                  "routes": ["172.18.0.0/16", "172.19.0.0/16"]})
    subnet = "255.255.255.240"  # the smallest network holding both ends: 192.168.251.0/28
    assert win.log == [
        # TAP_WIN_IOCTL_CONFIG_TUN: local, network, mask; then the cable is connected.
        IO(0x00220028, bytes([192, 168, 251, 10, 192, 168, 251, 0, 255, 255, 255, 240]), 12),
        IO(0x00220018, (1).to_bytes(4, "little"), 4),
        R("netsh", "interface", "ip", "set", "address", IFNAME, "static", "192.168.251.10",
          subnet),
        R("netsh", "interface", "ip", "show", "addresses", IFNAME),
        R("netsh", "interface", "ipv4", "set", "subinterface", IFNAME, "mtu=1400",
          "store=persistent"),
        R("netsh", "interface", "ip", "delete", "dns", IFNAME, "all"),
        R("netsh", "interface", "ip", "delete", "wins", IFNAME, "all"),
        R("netsh", "interface", "ipv4", "set", "subinterface", IFNAME, "mtu=1400",
          "store=persistent"),
        R("route", "add", "172.18.0.0", "mask", "255.255.0.0", "192.168.251.2"),
        R("route", "add", "172.19.0.0", "mask", "255.255.0.0", "192.168.251.2"),
    ]
    # A new config from the host (after its reload): only the difference is applied.
    del win.log[:]
    access.apply({"addr": "192.168.251.10/24", "peer": "192.168.251.2", "mtu": 1280,
                  "routes": ["172.18.0.0/16"]})
    assert win.log == [
        R("netsh", "interface", "ipv4", "set", "subinterface", IFNAME, "mtu=1280",
          "store=persistent"),
        R("route", "delete", "172.19.0.0", "mask", "255.255.0.0", "192.168.251.2"),
    ]
    a.close()
