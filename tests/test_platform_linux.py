"""The Linux platform adapter against the real kernel, each test in a throwaway namespace."""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, TypeVar

import ctun
import pluggy
import pytest
from ctun.core import hookspecs
from ctun.core.contracts import PlatformError
from ctun.lab import netns
from ctun.plugins import platform_linux
from ctun.plugins.platform_linux.adapter import LinuxAdapter, LinuxTun

F = TypeVar("F", bound=Callable[..., Any])


def _why_no_root_lab() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the Linux adapter needs Linux"
    if os.geteuid() != 0:
        return "needs root (tun devices, network namespaces, sysctls)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (modprobe tun, or pass --device /dev/net/tun)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is needed to make network namespaces"
    return None


_SKIP_REASON = _why_no_root_lab()


def needs_root(fn: F) -> F:
    marked = pytest.mark.root(fn)
    return pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "")(marked)  # type: ignore[no-any-return]


IFNAME = "ctuntest0"
LOCAL = IPv4Address("10.99.0.1")
PEER = IPv4Address("10.99.0.2")
_ns_counter = itertools.count()


@pytest.fixture
def run_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ctun-run-") as d:
        monkeypatch.setenv("CTUN_RUN_DIR", d)
        yield Path(d)


@pytest.fixture
def ns() -> Iterator[str]:
    with netns.temporary(f"ctun-t{os.getpid()}-{next(_ns_counter)}") as name:
        yield name


@pytest.fixture
def adapter(ns: str, run_dir: Path) -> Iterator[LinuxAdapter]:
    """An adapter born inside `ns` (it stays bound to that namespace); closed afterwards."""
    a = netns.call_in(ns, LinuxAdapter)
    try:
        yield a
    finally:
        netns.call_in(ns, a.close)


def ip_json(ns: str, *args: str) -> Any:
    return json.loads(netns.run(ns, ["ip", "-j", *args]).stdout or "[]")


def sysctl(ns: str, path: str) -> str:
    return netns.run(ns, ["cat", path]).stdout.strip()


def set_sysctl(ns: str, path: str, value: str) -> None:
    netns.run(ns, ["sh", "-c", f"echo {value} > {path}"])


def link_names(ns: str) -> set[str]:
    return {link["ifname"] for link in ip_json(ns, "link", "show")}


def open_configured(ns: str, adapter: LinuxAdapter, mtu: int = 1500) -> LinuxTun:
    tun = netns.call_in(ns, adapter.open_interface, IFNAME, mtu)
    assert isinstance(tun, LinuxTun)
    netns.call_in(ns, adapter.set_address, LOCAL, PEER)
    return tun


def read_some(tun: LinuxTun, want: int, timeout: float = 5.0) -> list[bytes]:
    """Packets from the tun until `want` arrived or the deadline passed."""
    deadline = time.monotonic() + timeout
    got: list[bytes] = []
    while len(got) < want:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        select.select([tun.fileno()], [], [], remaining)
        got += tun.read_packets(want - len(got))
    return got


def _checksum(data: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes, ttl: int = 64) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # checksum 0: none
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + len(udp), 0x1234, 0x4000, ttl, socket.IPPROTO_UDP, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def run_python_in(ns: str, code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    package_parent = str(Path(ctun.__file__).resolve().parent.parent)
    # `ctun` may be importable only through a symlinked parent (PYTHONPATH); keep that too.
    paths = [p for p in sys.path if p and (Path(p) / "ctun").exists()] or [package_parent]
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=60, env=full_env,
    )  # fmt: skip


# -- no root needed -----------------------------------------------------------------------


def test_hook_returns_linux_adapter_only_for_linux() -> None:
    assert platform_linux.ctun_platform_adapter(platform="linux") is LinuxAdapter
    assert platform_linux.ctun_platform_adapter(platform="darwin") is None
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(platform_linux)
    assert pm.hook.ctun_platform_adapter(platform="linux") is LinuxAdapter
    assert pm.hook.ctun_platform_adapter(platform="win32") is None
    assert LinuxAdapter.name == "linux"


@pytest.mark.parametrize(
    ("ifname", "message"),
    [("eth7", "must start with 'ctun'"), ("ctun0123456789ab", "too long"), ("ctun/x", "only")],
)
def test_bad_interface_names_are_refused(run_dir: Path, ifname: str, message: str) -> None:
    a = LinuxAdapter()
    with pytest.raises(PlatformError, match=message):
        a.open_interface(ifname, 1400)
    with pytest.raises(PlatformError, match=message):
        a.cleanup_leftovers(ifname)
    a.close()
    assert list(run_dir.iterdir()) == []


# -- against the kernel -------------------------------------------------------------------


@needs_root
def test_open_sets_mtu_address_and_routes(ns: str, adapter: LinuxAdapter) -> None:
    tun = open_configured(ns, adapter, mtu=1400)
    assert tun.name == IFNAME
    assert not os.get_blocking(tun.fileno())
    netns.call_in(ns, adapter.add_route, IPv4Network("10.20.0.0/24"))
    netns.call_in(ns, adapter.add_route, IPv4Network("10.21.0.0/16"), PEER)

    (link,) = ip_json(ns, "-d", "link", "show", IFNAME)
    assert link["mtu"] == 1400
    assert link["txqlen"] == 1000
    assert "UP" in link["flags"]
    assert link["linkinfo"]["info_kind"] == "tun"
    assert sysctl(ns, f"/proc/sys/net/ipv6/conf/{IFNAME}/disable_ipv6") == "1"

    (addrs,) = ip_json(ns, "addr", "show", "dev", IFNAME)
    got = [(a["family"], a["local"], a.get("address"), a["prefixlen"]) for a in addrs["addr_info"]]
    assert got == [("inet", str(LOCAL), str(PEER), 32)]  # and no inet6 link-local address

    kernel = {r["dst"]: r for r in ip_json(ns, "route", "show", "dev", IFNAME)}
    assert "10.20.0.0/24" in kernel
    assert kernel["10.21.0.0/16"]["gateway"] == str(PEER)
    routes = netns.call_in(ns, adapter.routes)
    assert {IPv4Network("10.20.0.0/24"), IPv4Network("10.21.0.0/16")} <= set(routes)
    assert IPv4Network("0.0.0.0/0") not in routes

    netns.call_in(ns, adapter.set_mtu, 1300)
    assert ip_json(ns, "link", "show", IFNAME)[0]["mtu"] == 1300

    # Setting the address again is harmless; a new one replaces the old pair.
    netns.call_in(ns, adapter.set_address, LOCAL, PEER)
    netns.call_in(ns, adapter.set_address, IPv4Address("10.98.0.1"), IPv4Address("10.98.0.2"))
    (addrs,) = ip_json(ns, "addr", "show", "dev", IFNAME)
    assert [(a["local"], a.get("address")) for a in addrs["addr_info"]] == [
        ("10.98.0.1", "10.98.0.2")
    ]


@needs_root
def test_packets_flow_both_ways_through_the_kernel(ns: str, adapter: LinuxAdapter) -> None:
    tun = open_configured(ns, adapter)
    netns.call_in(ns, adapter.add_route, IPv4Network("10.20.0.0/24"))

    # Kernel -> tun: a datagram to a routed address comes out of the device.
    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"hello", ("10.20.0.5", 9999))

    netns.call_in(ns, send)
    (packet,) = read_some(tun, 1)
    assert packet[0] >> 4 == 4 and packet[9] == socket.IPPROTO_UDP
    assert socket.inet_ntoa(packet[12:16]) == str(LOCAL)
    assert socket.inet_ntoa(packet[16:20]) == "10.20.0.5"
    assert packet.endswith(b"hello")

    # Tun -> kernel: a datagram written to the device reaches a socket in the namespace.
    def bind() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((str(LOCAL), 0))
        return s

    with netns.call_in(ns, bind) as receiver:
        receiver.settimeout(5)
        port = receiver.getsockname()[1]
        tun.write_packet(ipv4_udp("10.20.0.5", str(LOCAL), 9999, port, b"reply"))
        data, sender = receiver.recvfrom(100)
    assert (data, sender) == (b"reply", ("10.20.0.5", 9999))

    # Tun -> kernel -> tun: with forwarding on, a packet for a routed address is routed
    # back out (TTL one less). Redirects off, or the kernel would also send an ICMP one.
    netns.call_in(ns, adapter.enable_forwarding)
    for conf in ("all", IFNAME):
        set_sysctl(ns, f"/proc/sys/net/ipv4/conf/{conf}/send_redirects", "0")
    tun.write_packet(ipv4_udp(str(PEER), "10.20.0.7", 1000, 2000, b"transit", ttl=9))
    (forwarded,) = read_some(tun, 1)
    assert socket.inet_ntoa(forwarded[16:20]) == "10.20.0.7"
    assert forwarded[8] == 8 and forwarded.endswith(b"transit")

    # Exact counts: nothing else (no IPv6 router solicitation, no ICMP) came out.
    assert tun.read_packets(64) == []
    # A packet the kernel refuses is dropped and counted, never raised.
    tun.write_packet(b"")
    assert tun.write_drops == 1


@needs_root
def test_route_operations_are_idempotent(ns: str, adapter: LinuxAdapter) -> None:
    open_configured(ns, adapter)
    net = IPv4Network("10.20.0.0/24")
    netns.call_in(ns, adapter.add_route, net)
    netns.call_in(ns, adapter.add_route, net)
    assert netns.call_in(ns, adapter.routes).count(net) == 1
    netns.call_in(ns, adapter.replace_route, net, PEER)
    (route,) = ip_json(ns, "route", "show", str(net))
    assert route["gateway"] == str(PEER)

    netns.call_in(ns, adapter.remove_route, IPv4Network("10.77.0.0/16"))  # never added
    netns.call_in(ns, adapter.remove_route, net)
    netns.call_in(ns, adapter.remove_route, net)
    assert net not in netns.call_in(ns, adapter.routes)
    assert ip_json(ns, "route", "show", str(net)) == []


@needs_root
def test_close_undoes_everything(ns: str, run_dir: Path) -> None:
    set_sysctl(ns, "/proc/sys/net/ipv4/ip_forward", "0")
    adapter = netns.call_in(ns, LinuxAdapter)
    tun = open_configured(ns, adapter)
    netns.call_in(ns, adapter.add_route, IPv4Network("10.20.0.0/24"))
    netns.call_in(ns, adapter.enable_forwarding)
    assert sysctl(ns, "/proc/sys/net/ipv4/ip_forward") == "1"
    state = json.loads((run_dir / f"{IFNAME}.json").read_text())
    assert state == {"pid": os.getpid(), "ifname": IFNAME, "ip_forward_before": 0}
    assert (run_dir / f"{IFNAME}.lock").read_text().strip() == str(os.getpid())

    netns.call_in(ns, adapter.close)
    assert IFNAME not in link_names(ns)
    assert ip_json(ns, "route", "show", "10.20.0.0/24") == []
    assert sysctl(ns, "/proc/sys/net/ipv4/ip_forward") == "0"
    assert list(run_dir.iterdir()) == []
    with pytest.raises(ValueError):
        tun.fileno()
    netns.call_in(ns, adapter.close)  # idempotent
    tun.close()


@needs_root
def test_close_from_another_thread_acts_in_the_adapters_namespace(ns: str, run_dir: Path) -> None:
    adapter = netns.call_in(ns, LinuxAdapter)
    open_configured(ns, adapter)
    # Called from this (host-namespace) thread: still the namespace's interface and routes.
    adapter.add_route(IPv4Network("10.20.0.0/24"))
    assert ip_json(ns, "route", "show", "10.20.0.0/24") != []
    adapter.close()
    assert IFNAME not in link_names(ns)
    assert list(run_dir.iterdir()) == []


@needs_root
def test_close_is_safe_after_partial_setup(ns: str, run_dir: Path) -> None:
    adapter = netns.call_in(ns, LinuxAdapter)
    assert netns.call_in(ns, adapter.cleanup_leftovers, IFNAME) == []
    netns.call_in(ns, adapter.close)
    netns.call_in(ns, adapter.close)
    assert list(run_dir.iterdir()) == []
    LinuxAdapter().close()  # never used at all


@needs_root
def test_second_adapter_on_the_same_name_is_refused(ns: str, adapter: LinuxAdapter) -> None:
    open_configured(ns, adapter)
    second = netns.call_in(ns, LinuxAdapter)
    with pytest.raises(PlatformError, match=rf"in use by .* \(pid {os.getpid()}\)"):
        netns.call_in(ns, second.open_interface, IFNAME, 1500)
    with pytest.raises(PlatformError, match=f"pid {os.getpid()}"):
        netns.call_in(ns, second.cleanup_leftovers, IFNAME)
    # The refused adapter changed nothing: the first one's interface is intact.
    assert IFNAME in link_names(ns)
    netns.call_in(ns, second.close)
    assert IFNAME in link_names(ns)

    # Once the first is closed, the name is free again.
    netns.call_in(ns, adapter.close)
    netns.call_in(ns, second.open_interface, IFNAME, 1500)
    netns.call_in(ns, second.close)


@needs_root
def test_cleanup_restores_what_a_crashed_run_recorded(ns: str, run_dir: Path) -> None:
    set_sysctl(ns, "/proc/sys/net/ipv4/ip_forward", "1")
    # What a run killed after enabling forwarding leaves: its record and, had its tun
    # been persistent, the interface.
    (run_dir / f"{IFNAME}.json").write_text(
        json.dumps({"pid": 999999, "ifname": IFNAME, "ip_forward_before": 0})
    )
    netns.run(ns, ["ip", "tuntap", "add", "mode", "tun", IFNAME])

    adapter = netns.call_in(ns, LinuxAdapter)
    try:
        cleaned = netns.call_in(ns, adapter.cleanup_leftovers, IFNAME)
        assert any("ip_forward to 0" in line and "999999" in line for line in cleaned)
        assert any(f"deleted interface {IFNAME}" in line for line in cleaned)
        assert all("\n" not in line for line in cleaned)
        assert sysctl(ns, "/proc/sys/net/ipv4/ip_forward") == "0"
        assert IFNAME not in link_names(ns)
        assert not (run_dir / f"{IFNAME}.json").exists()
        # The adapter now owns the name and can open it.
        netns.call_in(ns, adapter.open_interface, IFNAME, 1500)
    finally:
        netns.call_in(ns, adapter.close)
    assert list(run_dir.iterdir()) == []


@needs_root
def test_a_killed_process_is_cleaned_up_by_the_next_run(ns: str, run_dir: Path) -> None:
    set_sysctl(ns, "/proc/sys/net/ipv4/ip_forward", "0")
    crashed = run_python_in(
        ns,
        f"""
        import os, signal
        from ipaddress import IPv4Network
        from ctun.plugins.platform_linux.adapter import LinuxAdapter
        a = LinuxAdapter()
        a.open_interface({IFNAME!r}, 1500)
        a.add_route(IPv4Network("10.20.0.0/24"))
        a.enable_forwarding()
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        env={"CTUN_RUN_DIR": str(run_dir)},
    )
    assert crashed.returncode == -9, crashed.stderr
    assert sysctl(ns, "/proc/sys/net/ipv4/ip_forward") == "1"
    assert (run_dir / f"{IFNAME}.json").exists()

    adapter = netns.call_in(ns, LinuxAdapter)
    try:
        # open_interface runs the cleanup itself when nobody called it.
        netns.call_in(ns, adapter.open_interface, IFNAME, 1500)
        assert sysctl(ns, "/proc/sys/net/ipv4/ip_forward") == "0"
    finally:
        netns.call_in(ns, adapter.close)
    assert list(run_dir.iterdir()) == []


@needs_root
def test_conflicting_route_on_another_interface(ns: str, adapter: LinuxAdapter) -> None:
    other = "ctdum0"
    made = netns.run(ns, ["ip", "link", "add", other, "type", "dummy"], check=False)
    if made.returncode != 0:
        # Kernels built without the dummy driver: one end of a veth pair serves as well.
        netns.run(ns, ["ip", "link", "add", other, "type", "veth", "peer", "name", "ctdum1"])
        netns.run(ns, ["ip", "link", "set", "ctdum1", "up"])
    netns.run(ns, ["ip", "link", "set", other, "up"])
    netns.run(ns, ["ip", "addr", "add", "172.18.0.1/16", "dev", other])
    netns.run(ns, ["ip", "route", "add", "default", "dev", other])
    netns.run(ns, ["ip", "route", "add", "10.30.0.0/24", "dev", other])

    open_configured(ns, adapter)
    netns.call_in(ns, adapter.add_route, IPv4Network("10.60.0.0/24"))
    conflict = netns.call_in(ns, adapter.conflicting_route, IPv4Network("172.18.5.0/24"))
    assert conflict == f"172.18.0.0/16 dev {other}"
    assert netns.call_in(ns, adapter.conflicting_route, IPv4Network("172.0.0.0/8")) == conflict
    # Not the default route, not our own routes, not disjoint ones.
    assert netns.call_in(ns, adapter.conflicting_route, IPv4Network("10.50.0.0/16")) is None
    assert netns.call_in(ns, adapter.conflicting_route, IPv4Network("10.60.0.0/16")) is None

    # Adding a route another interface already has is refused with what is in the way...
    with pytest.raises(PlatformError, match=f"10.30.0.0/24 dev {other}"):
        netns.call_in(ns, adapter.add_route, IPv4Network("10.30.0.0/24"))
    # ...and replace_route moves it onto the tunnel.
    netns.call_in(ns, adapter.replace_route, IPv4Network("10.30.0.0/24"))
    (route,) = ip_json(ns, "route", "show", "10.30.0.0/24")
    assert route["dev"] == IFNAME


@needs_root
def test_unprivileged_user_gets_a_one_line_error(ns: str, run_dir: Path) -> None:
    os.chmod(run_dir, 0o777)  # so the run dir is not what fails
    result = run_python_in(
        ns,
        f"""
        import os
        from ctun.core.contracts import PlatformError
        from ctun.plugins.platform_linux.adapter import LinuxAdapter
        os.setgid(65534)
        os.setuid(65534)
        a = LinuxAdapter()
        try:
            a.open_interface({IFNAME!r}, 1500)
        except PlatformError as exc:
            print(exc)
        finally:
            a.close()
        """,
        env={"CTUN_RUN_DIR": str(run_dir)},
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert "\n" not in message and "run ctun as root" in message
    assert IFNAME not in link_names(ns)
    assert list(run_dir.iterdir()) == []


@needs_root
def test_a_batch_adds_routes_fast_and_the_same_as_one_at_a_time(
        ns: str, adapter: LinuxAdapter) -> None:
    other = "ctdum0"
    netns.run(ns, ["ip", "link", "add", other, "type", "veth", "peer", "name", "ctdum1"])
    netns.run(ns, ["ip", "link", "set", other, "up"])
    netns.run(ns, ["ip", "route", "add", "10.30.0.0/24", "dev", other])
    open_configured(ns, adapter)
    alone = IPv4Network("10.61.0.0/24")
    netns.call_in(ns, adapter.add_route, alone)
    many = [IPv4Network(f"10.62.{i // 256}.{i % 256}/32") for i in range(500)]
    results: dict[str, Any] = {}

    def batched() -> None:
        with adapter.batch():
            for network in many:
                adapter.add_route(network)
            adapter.add_route(many[0])  # again: still not an error
            adapter.add_route(IPv4Network("10.63.0.0/24"), via=PEER)
            results["conflict"] = adapter.conflicting_route(IPv4Network("10.30.0.0/16"))
            results["free"] = adapter.conflicting_route(IPv4Network("10.62.0.0/16"))
            try:
                adapter.add_route(IPv4Network("10.30.0.0/24"))
            except PlatformError as exc:
                results["error"] = str(exc)

    netns.call_in(ns, batched)
    assert results == {"conflict": f"10.30.0.0/24 dev {other}", "free": None,
                       "error": f"cannot add route 10.30.0.0/24: the route 10.30.0.0/24 dev "
                                f"{other} already exists; remove it or replace it"}
    routes = netns.call_in(ns, adapter.routes)
    assert set(many) <= set(routes) and routes.count(many[0]) == 1
    shape = ("protocol", "scope", "type", "flags")
    (one,) = ip_json(ns, "-d", "route", "show", str(alone))
    (fast,) = ip_json(ns, "-d", "route", "show", str(many[7]))
    assert {k: one.get(k) for k in shape} == {k: fast.get(k) for k in shape}
    assert fast["dev"] == IFNAME
    (via,) = ip_json(ns, "route", "show", "10.63.0.0/24")
    assert via["gateway"] == str(PEER)
    # close() removes them all, batched or not.
    netns.call_in(ns, adapter.close)
    assert ip_json(ns, "route", "show", "10.62.0.0/16", "root", "10.62.0.0/16") == []


@needs_root
def test_offload_tun_switches_tso_on_and_off(ns: str, adapter: LinuxAdapter) -> None:
    adapter.offload = True
    tun = open_configured(ns, adapter)
    assert tun.vnet and not tun.offload

    def features() -> str:
        return netns.run(ns, ["ethtool", "-k", IFNAME], check=False).stdout

    if shutil.which("ethtool"):
        assert "tcp-segmentation-offload: off" in features()
    tun.set_offload(True)
    assert tun.offload
    if shutil.which("ethtool"):
        assert "tcp-segmentation-offload: on" in features()
    tun.set_offload(False)
    assert not tun.offload
