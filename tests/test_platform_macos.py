"""The macOS adapter, proven on any OS: every system call and command it would make is
recorded and compared with the exact expected sequence.

The utun socket is a socketpair behind a recording `UtunSystem`; the commands go to
`FakeMac`, which answers `ifconfig`, `route` and `netstat` the way macOS does (output
formats from Apple's network_cmds: `route` exits 0 even on failure, `route get` prints
nothing on stdout for a route it does not have, netstat abbreviates destinations by class).
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pluggy
import pytest
from ctun.core import hookspecs
from ctun.core.contracts import PlatformAdapter, PlatformError, VirtualInterface
from ctun.plugins import platform_macos
from ctun.plugins.platform_macos.adapter import NOT_ROOT, MacOSAdapter, run
from ctun.plugins.platform_macos.routes import (
    RouteRow,
    parse_destination,
    parse_netstat,
    parse_route_get,
)
from ctun.plugins.platform_macos.utun import (
    CTL_INFO,
    CTLIOCGINFO,
    DROP_FAMILY,
    DROP_QUEUE_FULL,
    DROP_SHORT,
    DROP_VERSION,
    PF_SYSTEM,
    SYSPROTO_CONTROL,
    UTUN_CONTROL_NAME,
    UTUN_OPT_IFNAME,
    MacUtun,
    UtunSystem,
    frame,
    open_utun,
    unframe,
)
from hypothesis import given
from hypothesis import strategies as st

IFNAME = "ctun0"  # the config's name: keys the lock and state file
UTUN = "utun5"  # the kernel's name for the interface
CTL_ID = 0x1F  # what CTLIOCGINFO answers for com.apple.net.utun_control (varies by boot)
LOCAL = IPv4Address("192.168.251.2")  # host side of the default tunnel network
PEER = IPv4Address("192.168.251.1")  # VM side
TUNNEL = IPv4Network("192.168.251.0/24")
DOCKER = IPv4Network("172.17.0.0/16")
NETSTAT = "netstat -rn -f inet"

# `netstat -rn -f inet` on a MacBook on Wi-Fi whose office LAN routes 10/8, with ctun up on
# utun5 routing Docker's default bridge (macOS 14; columns as netstat prints them).
SAMPLE_NETSTAT = """\
Routing tables

Internet:
Destination        Gateway            Flags               Netif Expire
default            192.168.1.1        UGScg                 en0
10                 192.168.1.1        UGSc                  en0
127                127.0.0.1          UCS                   lo0
127.0.0.1          127.0.0.1          UH                    lo0
169.254            link#11            UCS                   en0      !
172.17             192.168.251.1      UGSc                utun5
192.168.1          link#11            UCS                   en0      !
192.168.1.1/32     link#11            UCS                   en0      !
192.168.1.1        a4:2b:b0:c1:d2:e3  UHLWIir               en0   1183
192.168.1.23/32    link#11            UCS                   en0      !
192.168.251        192.168.251.1      UGSc                utun5
192.168.251.1      192.168.251.2      UH                  utun5
224.0.0/4          link#11            UmCS                  en0      !
224.0.0.251        1:0:5e:0:0:fb      UHmLWI                en0
255.255.255.255/32 link#11            UCS                   en0      !
"""

# Older macOS releases print Refs and Use columns too.
SAMPLE_NETSTAT_OLD = """\
Routing tables

Internet:
Destination        Gateway            Flags        Refs      Use   Netif Expire
default            192.168.1.1        UGSc           38        0     en0
10.33/24           10.33.0.2          UGSc            0        0   utun2
192.168.1          link#4             UCS             2        0     en0

Internet6:
Destination                             Gateway                         Flags         Netif Expire
default                                 fe80::%utun0                    UGcI          utun0
"""

# `route -n get 172.17.0.0/16` once ctun routes it.
SAMPLE_ROUTE_GET = """\
   route to: 172.17.0.0
destination: 172.17.0.0
       mask: 255.255.0.0
    gateway: 192.168.251.1
  interface: utun5
      flags: <UP,GATEWAY,DONE,STATIC,PRCLONING>
 recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu     expire
       0         0         0         0         0         0      1400         0
"""


# -- a macOS host, as its commands see it ------------------------------------------------


def netname(network: IPv4Network) -> str:
    """How netstat prints a network destination (netstat.tproj/route.c: netname, domask)."""
    i = int(network.network_address)
    mask = int(network.netmask)
    if network.prefixlen == 0:
        return "default"
    first = i >> 24
    classmask = 0xFF000000 if first < 128 else 0xFFFF0000 if first < 192 else 0xFFFFFF00
    octets = [(i >> shift) & 0xFF for shift in (24, 16, 8, 0)]
    shown = 4
    for keep, hostmask in ((1, 0x00FFFFFF), (2, 0x0000FFFF), (3, 0x000000FF)):
        if classmask <= (0xFFFFFFFF ^ hostmask) and i & hostmask == 0:
            shown = keep
            break
    text = ".".join(map(str, octets[:shown]))
    return text if mask == classmask else f"{text}/{network.prefixlen}"


@dataclass
class Row:
    network: IPv4Network
    gateway: str
    flags: str
    netif: str
    expire: str = ""

    def destination(self) -> str:
        if "H" in self.flags:
            return str(self.network.network_address)
        return netname(self.network)


class FakeMac:
    """Answers `run(argv)` like ifconfig, route and netstat on macOS; records every call."""

    def __init__(self, netstat: str = SAMPLE_NETSTAT) -> None:
        self.calls: list[str] = []
        self.rows = [Row(r.network, r.gateway, r.flags, r.netif) for r in parse_netstat(netstat)]
        self.mtu: dict[str, int] = {}
        self.fail: dict[str, str] = {}  # command -> stderr: exits 1, as run() reports it

    def __call__(self, argv: list[str]) -> str:
        assert all(isinstance(a, str) for a in argv), argv
        command = " ".join(argv)
        self.calls.append(command)
        if command in self.fail:
            raise PlatformError(f"{command} failed: {self.fail[command]}")
        if command == NETSTAT:
            return self.netstat()
        if argv[:2] == ["route", "-n"]:
            return self.route(argv[2:])
        if argv[0] == "ifconfig":
            return self.ifconfig(argv[1], argv[2:])
        raise AssertionError(f"unexpected command {command!r}")

    def netstat(self) -> str:
        lines = ["Routing tables", "", "Internet:",
                 f"{'Destination':<18} {'Gateway':<18} {'Flags':<10} {'Netif':>14} Expire"]
        for r in self.rows:
            lines.append(f"{r.destination():<18} {r.gateway:<18} {r.flags:<10} {r.netif:>14} "
                         f"{r.expire:>6}")
        return "\n".join(lines) + "\n"

    def exact(self, network: IPv4Network) -> Row | None:
        for r in self.rows:
            if r.network == network and "W" not in r.flags and "I" not in r.flags:
                return r
        return None

    def interface_to(self, gateway: str) -> str:
        for r in self.rows:  # a gateway behind a point-to-point host route
            if "H" in r.flags and str(r.network.network_address) == gateway:
                return r.netif
        return "en0"

    def route(self, args: list[str]) -> str:
        verb, rest = args[0], args[1:]
        if rest[:1] == ["-net"]:
            rest = rest[1:]
        network = IPv4Network(rest[0])
        address = network.network_address
        if verb == "get":
            r = self.exact(network)
            if r is None:
                return ""  # stderr: "route: writing to routing socket: not in table"
            gateway = f"    gateway: {r.gateway}\n" if "G" in r.flags else ""
            return (f"   route to: {address}\ndestination: {address}\n"
                    f"       mask: {network.netmask}\n{gateway}  interface: {r.netif}\n"
                    "      flags: <UP,GATEWAY,DONE,STATIC,PRCLONING>\n"
                    " recvpipe  sendpipe  ssthresh  rtt,msec    rttvar  hopcount      mtu"
                    "     expire\n       0         0         0         0         0         0"
                    "      1400         0\n")
        if verb == "delete":
            r = self.exact(network)
            if r is None:
                return f"delete net {address}: not in table\n"
            self.rows.remove(r)
            return f"delete net {address}\n"
        assert verb == "add", args
        if rest[1] == "-interface":
            gateway, netif, flags = "link#20", rest[2], "USc"
        else:
            gateway, netif, flags = rest[1], self.interface_to(rest[1]), "UGSc"
        said = f"add net {address}: gateway {rest[-1]}"
        if self.exact(network) is not None:
            return said + ": File exists\n"  # and route still exits 0
        self.rows.append(Row(network, gateway, flags, netif))
        return said + "\n"

    def ifconfig(self, device: str, args: list[str]) -> str:
        if args[0] == "mtu":
            self.mtu[device] = int(args[1])
        elif args[0] == "inet":
            self.rows = [r for r in self.rows if not (r.netif == device and "H" in r.flags)]
            self.rows.append(Row(IPv4Network(f"{args[2]}/32"), args[1], "UH", device))
        return ""


class RecordingSystem(UtunSystem):
    """The utun system calls, recorded; the 'utun socket' is one end of a socketpair."""

    def __init__(self, ifname: str = UTUN, connect_error: int | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.ifname = ifname
        self.connect_error = connect_error
        self.kernel: socket.socket | None = None
        self.ours: socket.socket | None = None

    def open_socket(self, family: int, kind: int, proto: int) -> socket.socket:
        self.calls.append(("socket", family, kind, proto))
        self.ours, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        return self.ours

    def ioctl(self, sock: socket.socket, request: int, arg: bytes) -> bytes:
        assert sock is self.ours
        self.calls.append(("ioctl", request, arg))
        return CTL_INFO.pack(CTL_ID, CTL_INFO.unpack(arg)[1])

    def connect(self, sock: socket.socket, address: tuple[int, int]) -> None:
        assert sock is self.ours
        self.calls.append(("connect", address))
        if self.connect_error is not None:
            raise OSError(self.connect_error, os.strerror(self.connect_error))

    def getsockopt(self, sock: socket.socket, level: int, option: int, buflen: int) -> bytes:
        assert sock is self.ours
        self.calls.append(("getsockopt", level, option, buflen))
        return self.ifname.encode().ljust(buflen, b"\0")

    def close(self) -> None:
        for s in (self.ours, self.kernel):
            if s is not None:
                s.close()


EXPECTED_UTUN_CALLS = [
    ("socket", 32, socket.SOCK_DGRAM, 2),
    ("ioctl", 0xC0644E03, bytes(4) + b"com.apple.net.utun_control".ljust(96, b"\0")),
    ("connect", (CTL_ID, 0)),
    ("getsockopt", 2, 2, 16),
]


@pytest.fixture(autouse=True)
def on_macos_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(os, "geteuid", lambda: 0)


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "run"
    monkeypatch.setenv("CTUN_RUN_DIR", str(path))
    return path


@pytest.fixture
def system() -> Iterator[RecordingSystem]:
    s = RecordingSystem()
    yield s
    s.close()


@pytest.fixture
def mac() -> FakeMac:
    return FakeMac(SAMPLE_NETSTAT_BEFORE)


def _without(netstat: str, *destinations: str) -> str:
    keep = [line for line in netstat.splitlines() if line.split()[:1] not in
            [[d] for d in destinations]]
    return "\n".join(keep) + "\n"


# The same host before ctun started: no utun5 routes.
SAMPLE_NETSTAT_BEFORE = _without(SAMPLE_NETSTAT, "172.17", "192.168.251", "192.168.251.1")


@pytest.fixture
def adapter(run_dir: Path, mac: FakeMac, system: RecordingSystem) -> Iterator[MacOSAdapter]:
    a = MacOSAdapter(runner=mac, system=system)
    yield a
    a.close()


def bring_up(adapter: MacOSAdapter) -> VirtualInterface:
    """What the host daemon does, in its order (core/daemon.py)."""
    assert adapter.cleanup_leftovers(IFNAME) == []
    interface = adapter.open_interface(IFNAME, 1400)
    adapter.set_address(LOCAL, PEER)
    adapter.add_route(TUNNEL)
    return interface


def state_file(run_dir: Path) -> Path:
    return run_dir / f"{IFNAME}.json"


# -- the hook ------------------------------------------------------------------------------


def test_hook_returns_the_adapter_for_darwin_only() -> None:
    assert platform_macos.ctun_platform_adapter(platform="darwin") is MacOSAdapter
    assert platform_macos.ctun_platform_adapter(platform="linux") is None
    assert platform_macos.ctun_platform_adapter(platform="win32") is None
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(platform_macos)
    assert pm.hook.ctun_platform_adapter(platform="darwin") is MacOSAdapter
    assert pm.hook.ctun_platform_adapter(platform="linux") is None
    assert pm.hook.ctun_platform_adapter(platform="win32") is None
    assert issubclass(MacOSAdapter, PlatformAdapter)
    assert MacOSAdapter.name == "macos"


def test_is_supported_follows_sys_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MacOSAdapter.is_supported()
    monkeypatch.setattr(sys, "platform", "linux")
    assert not MacOSAdapter.is_supported()


# -- the utun device -----------------------------------------------------------------------


def test_open_utun_makes_exactly_these_system_calls(system: RecordingSystem) -> None:
    utun = open_utun(system)
    assert system.calls == EXPECTED_UTUN_CALLS
    # The same, spelled with the module's names.
    request = struct.pack("=I96s", 0, UTUN_CONTROL_NAME.encode())
    assert system.calls == [
        ("socket", PF_SYSTEM, socket.SOCK_DGRAM, SYSPROTO_CONTROL),
        ("ioctl", CTLIOCGINFO, request),
        ("connect", (CTL_ID, 0)),
        ("getsockopt", SYSPROTO_CONTROL, UTUN_OPT_IFNAME, 16),
    ]
    assert CTL_INFO.size == 100
    assert CTL_INFO.size == (CTLIOCGINFO >> 16) & 0x1FFF  # the size _IOWR encodes
    assert utun.name == UTUN
    assert not os.get_blocking(utun.fileno())
    utun.close()
    assert utun.closed


def test_open_utun_without_root_says_to_use_sudo() -> None:
    system = RecordingSystem(connect_error=errno.EPERM)
    with pytest.raises(PlatformError) as caught:
        open_utun(system)
    assert str(caught.value) == NOT_ROOT
    assert system.ours is not None and system.ours.fileno() == -1  # closed, not leaked
    system.close()


def test_other_utun_errors_are_one_line() -> None:
    system = RecordingSystem(connect_error=errno.EBUSY)
    with pytest.raises(PlatformError, match=r"^cannot create a utun interface: .*busy"):
        open_utun(system)
    system.close()


# -- framing -------------------------------------------------------------------------------

UDP = b"\x30\x39\x00\x35\x00\x08\x00\x00"  # 12345 -> 53, no payload
IPV4 = bytes.fromhex("4500001c12344000401100000a0000010a000002") + UDP
IPV6 = (bytes.fromhex("6000000000081140") + bytes(15) + b"\x01" + bytes(15) + b"\x02"
        + UDP)


def test_frame_prepends_the_family_in_network_order() -> None:
    assert frame(IPV4) == b"\x00\x00\x00\x02" + IPV4  # AF_INET
    assert frame(IPV6) == b"\x00\x00\x00\x1e" + IPV6  # AF_INET6 is 30 on macOS
    assert unframe(b"\x00\x00\x00\x02" + IPV4) == IPV4
    assert unframe(b"\x00\x00\x00\x1e" + IPV6) == IPV6


@pytest.mark.parametrize("packet", [IPV4, IPV6])
def test_frame_and_unframe_round_trip(packet: bytes) -> None:
    framed = frame(packet)
    assert framed is not None and len(framed) == len(packet) + 4
    assert unframe(framed) == packet


@pytest.mark.parametrize("packet", [b"", b"\x50abc", b"\x00" * 20, b"\xff"])
def test_frame_refuses_what_is_not_ipv4_or_ipv6(packet: bytes) -> None:
    assert frame(packet) is None


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"\x00\x00\x02", b"\x00\x00\x00\x02",  # short, or a header alone
     b"\x00\x00\x00\x0a" + IPV6,  # Linux's AF_INET6 (10) is not macOS's
     b"\x02\x00\x00\x00" + IPV4,  # little-endian: wrong
     b"\x00\x00\x00\x07" + IPV4],
)
def test_unframe_refuses_short_frames_and_unknown_families(data: bytes) -> None:
    assert unframe(data) is None


@pytest.fixture
def utun(system: RecordingSystem) -> Iterator[MacUtun]:
    u = open_utun(system)
    yield u
    u.close()


def test_write_packet_frames_and_drops_unknown_versions(
    utun: MacUtun, system: RecordingSystem
) -> None:
    assert system.kernel is not None
    utun.write_packet(IPV4)
    utun.write_packet(IPV6)
    utun.write_packet(b"\x50" + bytes(19))  # version 5: dropped, counted, not raised
    utun.write_packet(b"")
    assert system.kernel.recv(4096) == b"\x00\x00\x00\x02" + IPV4
    assert system.kernel.recv(4096) == b"\x00\x00\x00\x1e" + IPV6
    system.kernel.setblocking(False)
    with pytest.raises(BlockingIOError):
        system.kernel.recv(4096)
    assert utun.drops == {DROP_VERSION: 2}


def test_read_packets_strips_headers_and_counts_bad_frames(
    utun: MacUtun, system: RecordingSystem
) -> None:
    assert system.kernel is not None
    for data in [b"\x00\x00\x00\x02" + IPV4, b"\x00\x00", b"\x00\x00\x00\x02",
                 b"\x00\x00\x00\x07" + IPV4, b"\x00\x00\x00\x1e" + IPV6]:
        system.kernel.send(data)
    assert utun.read_packets(64) == [IPV4, IPV6]
    assert utun.drops == {DROP_SHORT: 2, DROP_FAMILY: 1}


def test_a_full_kernel_queue_drops_the_packet(utun: MacUtun, system: RecordingSystem) -> None:
    assert system.kernel is not None
    for _ in range(100_000):  # fill the socket buffer; the reader never reads
        utun.write_packet(IPV4)
        if utun.drops[DROP_QUEUE_FULL]:
            break
    assert utun.drops[DROP_QUEUE_FULL] == 1, "write_packet blocked or raised instead"


def test_the_engine_can_wait_on_it_and_drain_batches(
    utun: MacUtun, system: RecordingSystem
) -> None:
    """core/engine.py registers fileno() with selectors.DefaultSelector and calls
    read_packets(BATCH) when it is readable; neither may block."""
    assert system.kernel is not None
    assert isinstance(utun, VirtualInterface)
    selector = selectors.DefaultSelector()
    selector.register(utun.fileno(), selectors.EVENT_READ)
    assert selector.select(0) == []
    assert utun.read_packets(64) == []  # nothing there: returns at once
    for n in range(100):
        system.kernel.send(frame(IPV4[:-1] + bytes([n])) or b"")
    assert len(selector.select(1.0)) == 1
    started = time.monotonic()
    first = utun.read_packets(64)
    second = utun.read_packets(64)
    third = utun.read_packets(64)
    assert time.monotonic() - started < 0.5
    assert (len(first), len(second), third) == (64, 36, [])
    assert [p[-1] for p in first + second] == list(range(100))
    assert selector.select(0) == []
    selector.close()
    utun.close()
    with pytest.raises(ValueError, match="closed"):
        utun.fileno()
    utun.close()  # idempotent


# -- netstat and route get -----------------------------------------------------------------


def test_parse_netstat_reads_the_captured_sample() -> None:
    rows = parse_netstat(SAMPLE_NETSTAT)
    assert [(str(r.network), r.gateway, r.flags, r.netif) for r in rows] == [
        ("0.0.0.0/0", "192.168.1.1", "UGScg", "en0"),
        ("10.0.0.0/8", "192.168.1.1", "UGSc", "en0"),
        ("127.0.0.0/8", "127.0.0.1", "UCS", "lo0"),
        ("127.0.0.1/32", "127.0.0.1", "UH", "lo0"),
        ("169.254.0.0/16", "link#11", "UCS", "en0"),
        ("172.17.0.0/16", "192.168.251.1", "UGSc", "utun5"),
        ("192.168.1.0/24", "link#11", "UCS", "en0"),
        ("192.168.1.1/32", "link#11", "UCS", "en0"),
        ("192.168.1.1/32", "a4:2b:b0:c1:d2:e3", "UHLWIir", "en0"),
        ("192.168.1.23/32", "link#11", "UCS", "en0"),
        ("192.168.251.0/24", "192.168.251.1", "UGSc", "utun5"),
        ("192.168.251.1/32", "192.168.251.2", "UH", "utun5"),
        ("224.0.0.0/4", "link#11", "UmCS", "en0"),
        ("224.0.0.251/32", "1:0:5e:0:0:fb", "UHmLWI", "en0"),
        ("255.255.255.255/32", "link#11", "UCS", "en0"),
    ]
    assert rows[1].describe() == "10.0.0.0/8 via 192.168.1.1 on en0"
    assert rows[6].describe() == "192.168.1.0/24 on en0"


def test_parse_netstat_finds_columns_by_header_and_stops_at_the_next_family() -> None:
    rows = parse_netstat(SAMPLE_NETSTAT_OLD)
    assert rows == [
        RouteRow(IPv4Network("0.0.0.0/0"), "192.168.1.1", "UGSc", "en0"),
        RouteRow(IPv4Network("10.33.0.0/24"), "10.33.0.2", "UGSc", "utun2"),
        RouteRow(IPv4Network("192.168.1.0/24"), "link#4", "UCS", "en0"),
    ]


@pytest.mark.parametrize(
    ("text", "flags", "network"),
    [("default", "UGSc", "0.0.0.0/0"), ("10", "UGSc", "10.0.0.0/8"),
     ("172.17", "UGSc", "172.17.0.0/16"), ("192.168.65", "UCS", "192.168.65.0/24"),
     ("10.33/24", "UGSc", "10.33.0.0/24"), ("224.0.0/4", "UmCS", "224.0.0.0/4"),
     ("0/1", "UGSc", "0.0.0.0/1"), ("128.0/1", "UGSc", "128.0.0.0/1"),
     ("192.168.1.1/32", "UCS", "192.168.1.1/32"), ("127.0.0.1", "UH", "127.0.0.1/32"),
     ("link#11", "UCS", None), ("fe80::%utun0", "UCS", None), ("10.1/8", "UGSc", None)],
)
def test_parse_destination(text: str, flags: str, network: str | None) -> None:
    want = IPv4Network(network) if network else None
    assert parse_destination(text, flags) == want


@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_parse_destination_inverts_netstats_abbreviation(address: int, prefix: int) -> None:
    network = IPv4Network((address, prefix), strict=False)
    assert parse_destination(netname(network), "UGSc") == network


def test_the_fake_prints_netstat_as_the_capture_does() -> None:
    def destinations(text: str) -> list[str]:
        return [line.split()[0] for line in text.splitlines()[4:] if line.strip()]

    assert destinations(FakeMac(SAMPLE_NETSTAT).netstat()) == destinations(SAMPLE_NETSTAT)


def test_parse_route_get() -> None:
    info = parse_route_get(SAMPLE_ROUTE_GET)
    assert info["destination"] == "172.17.0.0"
    assert info["mask"] == "255.255.0.0"
    assert info["gateway"] == "192.168.251.1"
    assert info["interface"] == "utun5"
    assert parse_route_get("") == {}


# -- exact command sequences ---------------------------------------------------------------


def test_bring_up(adapter: MacOSAdapter, mac: FakeMac, system: RecordingSystem,
                  run_dir: Path) -> None:
    interface = bring_up(adapter)
    assert system.calls == EXPECTED_UTUN_CALLS
    assert mac.calls == [
        "ifconfig utun5 mtu 1400 up",
        "ifconfig utun5 inet 192.168.251.2 192.168.251.1 netmask 255.255.255.255 up",
        "route -n add -net 192.168.251.0/24 192.168.251.1",
        "route -n get 192.168.251.0/24",
    ]
    assert interface.name == UTUN
    assert adapter.interface is interface
    assert json.loads(state_file(run_dir).read_text()) == {
        "ifname": IFNAME, "pid": os.getpid(), "utun": UTUN, "peer": str(PEER),
        "routes": [str(TUNNEL)],
    }
    assert (run_dir / f"{IFNAME}.lock").exists()


def test_add_route(adapter: MacOSAdapter, mac: FakeMac, run_dir: Path) -> None:
    bring_up(adapter)
    mac.calls.clear()
    adapter.add_route(DOCKER)
    adapter.add_route(IPv4Network("10.99.0.0/16"), PEER)
    assert mac.calls == [
        "route -n add -net 172.17.0.0/16 192.168.251.1",
        "route -n get 172.17.0.0/16",
        "route -n add -net 10.99.0.0/16 192.168.251.1",
        "route -n get 10.99.0.0/16",
    ]
    assert json.loads(state_file(run_dir).read_text())["routes"] == [
        "10.99.0.0/16", "172.17.0.0/16", "192.168.251.0/24"]
    assert adapter.routes() == [IPv4Network("192.168.251.1/32"), TUNNEL, DOCKER,
                                IPv4Network("10.99.0.0/16")]


def test_adding_a_route_we_already_have_is_fine(adapter: MacOSAdapter, mac: FakeMac) -> None:
    bring_up(adapter)
    mac.calls.clear()
    adapter.add_route(TUNNEL)  # route says "File exists"; route get shows it is ours
    assert mac.calls == ["route -n add -net 192.168.251.0/24 192.168.251.1",
                         "route -n get 192.168.251.0/24"]


def test_a_route_before_the_address_goes_straight_into_the_interface(
    adapter: MacOSAdapter, mac: FakeMac
) -> None:
    adapter.open_interface(IFNAME, 1400)
    adapter.add_route(DOCKER)
    assert mac.calls == ["ifconfig utun5 mtu 1400 up",
                         "route -n add -net 172.17.0.0/16 -interface utun5",
                         "route -n get 172.17.0.0/16"]


def test_remove_route(adapter: MacOSAdapter, mac: FakeMac, run_dir: Path) -> None:
    bring_up(adapter)
    adapter.add_route(DOCKER)
    mac.calls.clear()
    adapter.remove_route(DOCKER)
    adapter.remove_route(DOCKER)  # not there any more: not an error
    adapter.remove_route(IPv4Network("10.0.0.0/8"))  # the LAN's, on en0: not ours to remove
    assert mac.calls == [
        NETSTAT, "route -n delete -net 172.17.0.0/16",
        NETSTAT,
        NETSTAT,
    ]
    assert mac.exact(IPv4Network("10.0.0.0/8")) is not None
    assert json.loads(state_file(run_dir).read_text())["routes"] == [str(TUNNEL)]


def test_replace_route_deletes_then_adds(adapter: MacOSAdapter, mac: FakeMac) -> None:
    bring_up(adapter)
    mac.rows.append(Row(IPv4Network("172.18.0.0/16"), "192.168.1.7", "UGSc", "en0"))
    mac.calls.clear()
    adapter.replace_route(IPv4Network("172.18.0.0/16"))
    adapter.replace_route(IPv4Network("172.19.0.0/16"))  # nothing to move: a plain add
    assert mac.calls == [
        NETSTAT,
        "route -n delete -net 172.18.0.0/16",
        "route -n add -net 172.18.0.0/16 192.168.251.1",
        "route -n get 172.18.0.0/16",
        NETSTAT,
        "route -n add -net 172.19.0.0/16 192.168.251.1",
        "route -n get 172.19.0.0/16",
    ]
    assert mac.exact(IPv4Network("172.18.0.0/16")) == Row(
        IPv4Network("172.18.0.0/16"), str(PEER), "UGSc", UTUN)


def test_mtu_change(adapter: MacOSAdapter, mac: FakeMac) -> None:
    bring_up(adapter)
    mac.calls.clear()
    adapter.set_mtu(1280)
    assert mac.calls == ["ifconfig utun5 mtu 1280"]
    assert mac.mtu[UTUN] == 1280


def test_teardown(adapter: MacOSAdapter, mac: FakeMac, system: RecordingSystem,
                  run_dir: Path) -> None:
    interface = bring_up(adapter)
    adapter.add_route(DOCKER)
    mac.calls.clear()
    adapter.close()
    assert mac.calls == [
        NETSTAT,
        "route -n delete -net 172.17.0.0/16",
        "route -n delete -net 192.168.251.0/24",
    ]
    assert isinstance(interface, MacUtun) and interface.closed  # the kernel drops utun5
    assert system.ours is not None and system.ours.fileno() == -1
    assert not state_file(run_dir).exists()
    assert not (run_dir / f"{IFNAME}.lock").exists()
    mac.calls.clear()
    adapter.close()  # idempotent
    assert mac.calls == []


def test_close_keeps_the_record_when_a_route_cannot_be_deleted(
    adapter: MacOSAdapter, mac: FakeMac, run_dir: Path
) -> None:
    bring_up(adapter)
    mac.fail["route -n delete -net 192.168.251.0/24"] = "route: must be root to alter " \
        "routing table"
    with pytest.raises(PlatformError, match=r"^route -n delete -net 192\.168\.251\.0/24 failed"):
        adapter.close()
    assert adapter.interface is None
    assert json.loads(state_file(run_dir).read_text())["routes"] == [str(TUNNEL)]
    assert not (run_dir / f"{IFNAME}.lock").exists()  # the name is free for the next run


# -- crash cleanup -------------------------------------------------------------------------


def crashed_run(run_dir: Path, mac: FakeMac, *, peer: str = str(PEER)) -> None:
    """What a ctun killed with SIGKILL on utun3 left: its record, and one route the kernel
    did not take away with the interface."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state_file(run_dir).write_text(json.dumps({
        "ifname": IFNAME, "pid": 4242, "utun": "utun3", "peer": peer,
        "routes": ["172.17.0.0/16", "192.168.251.0/24"],
    }))
    mac.rows.append(Row(DOCKER, peer, "UGSc", "utun3"))


def test_bring_up_after_a_crash_deletes_what_it_left_first(
    adapter: MacOSAdapter, mac: FakeMac, system: RecordingSystem, run_dir: Path
) -> None:
    crashed_run(run_dir, mac)
    interface = adapter.open_interface(IFNAME, 1400)
    assert mac.calls == [
        NETSTAT,
        "route -n delete -net 172.17.0.0/16",  # 192.168.251.0/24 went with utun3
        "ifconfig utun5 mtu 1400 up",
    ]
    assert system.calls == EXPECTED_UTUN_CALLS  # only after the leftovers were gone
    assert interface.name == UTUN
    assert mac.exact(DOCKER) is None
    assert json.loads(state_file(run_dir).read_text())["pid"] == os.getpid()


def test_cleanup_leftovers_reports_what_it_removed(
    adapter: MacOSAdapter, mac: FakeMac, run_dir: Path
) -> None:
    crashed_run(run_dir, mac)
    assert adapter.cleanup_leftovers(IFNAME) == [
        "deleted route 172.17.0.0/16 via 192.168.251.1 on utun3 left by a crashed ctun "
        "(pid 4242)",
        f"removed state file {state_file(run_dir)} left by a crashed ctun (pid 4242)",
    ]
    assert not state_file(run_dir).exists()
    mac.calls.clear()
    assert adapter.cleanup_leftovers(IFNAME) == []  # we hold the name now
    assert mac.calls == []


def test_cleanup_leaves_a_route_someone_else_now_has(
    adapter: MacOSAdapter, mac: FakeMac, run_dir: Path
) -> None:
    """utunN numbers are reused: a VPN's route for the same network is not a leftover."""
    crashed_run(run_dir, mac)
    mac.rows[-1] = Row(DOCKER, "10.8.0.1", "UGSc", "utun3")
    lines = adapter.cleanup_leftovers(IFNAME)
    assert mac.calls == [NETSTAT]
    assert mac.exact(DOCKER) is not None
    assert len(lines) == 1 and lines[0].startswith("removed state file")


def test_a_second_adapter_cannot_take_a_name_in_use(
    adapter: MacOSAdapter, mac: FakeMac, run_dir: Path
) -> None:
    bring_up(adapter)
    other = MacOSAdapter(runner=mac, system=RecordingSystem())
    with pytest.raises(PlatformError, match=rf"in use by another running ctun \(pid {os.getpid()}"):
        other.open_interface(IFNAME, 1400)


# -- messages ------------------------------------------------------------------------------


def test_not_root(adapter: MacOSAdapter, mac: FakeMac, system: RecordingSystem,
                  monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 501)
    with pytest.raises(PlatformError) as caught:
        adapter.open_interface(IFNAME, 1400)
    assert str(caught.value) == "creating a utun interface needs root on macOS: run ctun with sudo"
    with pytest.raises(PlatformError, match="needs root"):
        adapter.cleanup_leftovers(IFNAME)
    assert mac.calls == [] and system.calls == []
    assert not run_dir.exists()


def test_a_route_shadowed_by_a_vpn_names_the_interface(
    adapter: MacOSAdapter, mac: FakeMac, run_dir: Path
) -> None:
    bring_up(adapter)
    mac.rows.append(Row(DOCKER, "10.8.0.1", "UGSc", "utun3"))  # a VPN got there first
    mac.calls.clear()
    with pytest.raises(PlatformError) as caught:
        adapter.add_route(DOCKER)
    assert str(caught.value) == (
        "route 172.17.0.0/16 goes through utun3, not utun5: the route 172.17.0.0/16 via "
        "10.8.0.1 on utun3 shadows it (a VPN?); disconnect utun3 or stop routing 172.17.0.0/16"
    )
    assert mac.calls == ["route -n add -net 172.17.0.0/16 192.168.251.1",
                         "route -n get 172.17.0.0/16"]
    # Not ours: neither recorded for crash cleanup nor deleted on close.
    assert json.loads(state_file(run_dir).read_text())["routes"] == [str(TUNNEL)]
    mac.calls.clear()
    adapter.close()
    assert "route -n delete -net 172.17.0.0/16" not in mac.calls
    assert mac.exact(DOCKER) is not None


def test_a_route_the_kernel_did_not_add_is_reported(adapter: MacOSAdapter, mac: FakeMac) -> None:
    bring_up(adapter)
    mac.route = lambda args: (  # type: ignore[method-assign]
        "add net 172.17.0.0: gateway 192.168.251.1: Network is unreachable\n"
        if args[0] == "add" else "")
    with pytest.raises(PlatformError) as caught:
        adapter.add_route(DOCKER)
    assert str(caught.value) == (
        "route 172.17.0.0/16 was not added (add net 172.17.0.0: gateway 192.168.251.1: "
        "Network is unreachable) and `route -n get 172.17.0.0/16` finds no route for it"
    )


def test_a_failing_command_is_one_line_with_its_stderr(
    adapter: MacOSAdapter, mac: FakeMac
) -> None:
    bring_up(adapter)
    mac.fail["ifconfig utun5 mtu 70000"] = "ifconfig: ioctl (set mtu): Invalid argument"
    with pytest.raises(PlatformError) as caught:
        adapter.set_mtu(70000)
    assert str(caught.value) == (
        "ifconfig utun5 mtu 70000 failed: ifconfig: ioctl (set mtu): Invalid argument")


def test_run_reports_the_command_and_its_stderr_on_one_line() -> None:
    assert run([sys.executable, "-c", "print('ok')"]) == "ok\n"
    script = ("import sys; sys.stderr.write('ifconfig: ioctl (SIOCAIFADDR):\\n"
              "Operation not permitted\\n'); sys.exit(1)")
    with pytest.raises(PlatformError) as caught:
        run([sys.executable, "-c", script])
    message = str(caught.value)
    assert "\n" not in message
    assert message.endswith(" failed: ifconfig: ioctl (SIOCAIFADDR): Operation not permitted; "
                            "run ctun with sudo")
    with pytest.raises(PlatformError, match=r"^/nonexistent/ifconfig x failed: cannot run"):
        run(["/nonexistent/ifconfig", "x"])


def test_run_uses_fixed_paths_not_path(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_run(argv: list[str], **kwargs: Any) -> Any:
        seen.append(argv)
        assert kwargs["env"]["LC_ALL"] == "C"
        return type("Done", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr("subprocess.run", fake_run)
    for argv in (["ifconfig", "utun5", "mtu", "1400"], ["route", "-n", "get", "10.0.0.0/8"],
                 ["netstat", "-rn", "-f", "inet"]):
        run(argv)
    assert [a[0] for a in seen] == ["/sbin/ifconfig", "/sbin/route", "/usr/sbin/netstat"]


# -- conflicts and the route list -----------------------------------------------------------


def test_conflicting_route(adapter: MacOSAdapter, mac: FakeMac) -> None:
    assert adapter.conflicting_route(IPv4Network("10.33.0.0/24")) == (
        "10.0.0.0/8 via 192.168.1.1 on en0")
    assert adapter.conflicting_route(IPv4Network("192.168.1.128/25")) == "192.168.1.0/24 on en0"
    assert adapter.conflicting_route(DOCKER) is None  # default and 224/4 do not count
    assert mac.calls == [NETSTAT] * 3
    bring_up(adapter)
    adapter.add_route(DOCKER)
    assert adapter.conflicting_route(DOCKER) is None  # our own route is no conflict
    assert adapter.conflicting_route(TUNNEL) is None


def test_a_full_tunnel_vpns_half_defaults_are_not_conflicts(adapter: MacOSAdapter,
                                                            mac: FakeMac) -> None:
    mac.rows += [Row(IPv4Network("0.0.0.0/1"), "10.8.0.1", "UGSc", "utun3"),
                 Row(IPv4Network("128.0.0.0/1"), "10.8.0.1", "UGSc", "utun3"),
                 Row(IPv4Network("172.16.0.0/12"), "10.8.0.1", "UGSc", "utun3")]
    assert adapter.conflicting_route(IPv4Network("192.168.99.0/24")) is None
    assert adapter.conflicting_route(DOCKER) == "172.16.0.0/12 via 10.8.0.1 on utun3"


def test_routes_are_what_netstat_shows_on_our_utun(adapter: MacOSAdapter, mac: FakeMac) -> None:
    bring_up(adapter)
    mac.rows.append(Row(IPv4Network("172.17.0.2/32"), str(PEER), "UGHWIi", UTUN))  # cloned
    mac.rows.append(Row(IPv4Network("0.0.0.0/0"), str(PEER), "UGScI", UTUN))  # scoped
    mac.calls.clear()
    assert adapter.routes() == [IPv4Network("192.168.251.1/32"), TUNNEL]
    assert mac.calls == [NETSTAT]


def test_operations_need_an_open_interface(adapter: MacOSAdapter) -> None:
    for call in (lambda: adapter.set_address(LOCAL, PEER), lambda: adapter.set_mtu(1400),
                 lambda: adapter.add_route(DOCKER), lambda: adapter.remove_route(DOCKER),
                 adapter.routes):
        with pytest.raises(PlatformError, match="not open"):
            call()


@pytest.mark.parametrize(
    ("ifname", "message"),
    [("utun5", "must start with 'ctun'"), ("ctun0123456789ab", "too long"), ("ctun/x", "only")],
)
def test_bad_interface_names_are_refused(adapter: MacOSAdapter, run_dir: Path, ifname: str,
                                         message: str) -> None:
    with pytest.raises(PlatformError, match=message):
        adapter.open_interface(ifname, 1400)
    with pytest.raises(PlatformError, match=message):
        adapter.cleanup_leftovers(ifname)
    assert not run_dir.exists()


def test_the_default_run_dir_is_under_var_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTUN_RUN_DIR", raising=False)
    from ctun.plugins.platform_macos import adapter as module

    assert module.default_run_dir() == Path("/var/run/ctun")


# -- ctun access through this adapter ------------------------------------------------------


class _EngineFilter:
    """What `Access` asks of the engine: only its filter of what the tunnel may deliver."""

    def __init__(self) -> None:
        self.networks: list[tuple[str, list[IPv4Network], list[IPv4Network]]] = []

    def set_peer_networks(self, peer: str, allowed: Any, routes: Any) -> None:
        self.networks.append((peer, list(allowed), list(routes)))


def test_ctun_access_applies_the_hosts_settings_with_these_commands(
    adapter: MacOSAdapter, mac: FakeMac
) -> None:
    from ctun.core.access import Access

    adapter.open_interface("ctunacc0", 1400)
    engine = _EngineFilter()
    access = Access(adapter, engine, "192.0.2.10")  # type: ignore[arg-type]
    mac.calls.clear()
    access.apply({"addr": "192.168.251.10/24", "peer": "192.168.251.2", "mtu": 1400,
                  "routes": ["172.18.0.0/16", "172.19.0.0/16"]})
    assert mac.calls == [
        "ifconfig utun5 inet 192.168.251.10 192.168.251.2 netmask 255.255.255.255 up",
        "ifconfig utun5 mtu 1400",
        "route -n add -net 172.18.0.0/16 192.168.251.2",
        "route -n get 172.18.0.0/16",
        "route -n add -net 172.19.0.0/16 192.168.251.2",
        "route -n get 172.19.0.0/16",
    ]
    # The tunnel may deliver only from the exposed routes and the host's tunnel address.
    assert engine.networks[-1] == ("host", [IPv4Network("172.18.0.0/16"),
                                            IPv4Network("172.19.0.0/16"),
                                            IPv4Network("192.168.251.2/32")],
                                   [IPv4Network("0.0.0.0/0")])
    # A new config from the host (after its reload): only the difference is applied.
    mac.calls.clear()
    access.apply({"addr": "192.168.251.10/24", "peer": "192.168.251.2", "mtu": 1280,
                  "routes": ["172.18.0.0/16"]})
    assert mac.calls == [
        "ifconfig utun5 mtu 1280",
        "netstat -rn -f inet",
        "route -n delete -net 172.19.0.0/16",
    ]
