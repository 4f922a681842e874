"""The Windows platform adapter: a TAP-windows6 adapter in TUN mode, set up with netsh/route.

Two seams, both replaced by the tests (sshuttle's house style):

* every change to the network configuration is a command line handed to ONE runner,
  `run(argv) -> str` (argv[0] is "netsh" or "route");
* every call into Windows itself (registry, CreateFileW, DeviceIoControl, ReadFile/WriteFile,
  IsUserAnAdmin, the run directory's lock) goes through ONE `WinApi` object (winapi.py).

Addressing. CONFIG_TUN makes the driver answer ARP only for the "remote network" it was given,
and pass up only packets sent to the MAC it answered with. Windows, for its part, only takes
a route through a gateway that is on-link. So the adapter gets the smallest subnet holding
both ends, neither being that subnet's network or broadcast address (the "link": a /30 for
ctun's default 192.168.251.2 <-> .1), given to both CONFIG_TUN and `netsh ... set address`,
and every route goes *via the peer*: `route add NET mask MASK PEER`. That includes the tunnel
network itself (e.g. 192.168.251.0/24), of which only the link is on-link. No default
gateway is configured: netsh's fifth positional argument would be one, and it would put a
0.0.0.0/0 route on the adapter that competes with the real one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, ClassVar

from ...core.contracts import PlatformAdapter, PlatformError, VirtualInterface
from ...core.crash_record import CrashRecord
from .tap import (
    MIN_VERSION,
    TapAdapterInfo,
    TapDevice,
    TapInterface,
    find_tap_adapters,
    open_first,
    preference_order,
)
from .winapi import WinApi, WinApiError, system_api

__all__ = [
    "RouteEntry",
    "WindowsAdapter",
    "WindowsRunState",
    "link_network",
    "parse_route_print",
    "run",
]

log = logging.getLogger("ctun.platform.windows")

Runner = Callable[[Sequence[str]], str]

NAME_PREFIX = "ctun"
_NAME_RE = re.compile(r"ctun[A-Za-z0-9_.-]{0,11}")
RUN_DIR_ENV = "CTUN_RUN_DIR"
ADDRESS_TIMEOUT = 10.0  # seconds for netsh's address to show up on the adapter
ADDRESS_POLL = 0.2
RUN_TIMEOUT = 30.0  # for one netsh/route command
LINK_PREFIX_MIN = 8  # the widest link subnet accepted (ctun's addr is at most a /8 too)

NOT_ADMIN = (
    "ctun needs an elevated (Administrator) prompt on Windows: right-click Windows Terminal "
    "or Command Prompt, choose \"Run as administrator\", and run ctun again"
)


def default_run_dir() -> Path:
    """CTUN_RUN_DIR, else %ProgramData%\\ctun."""
    configured = os.environ.get(RUN_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("PROGRAMDATA") or "C:\\ProgramData") / "ctun"


def check_ifname(ifname: str) -> None:
    # ctun's own name for the interface: the state files and the control socket use it.
    if not _NAME_RE.fullmatch(ifname):
        raise PlatformError(
            f"interface name {ifname!r} must start with {NAME_PREFIX!r} and have at most 15 "
            "letters, digits, '_', '.' or '-'"
        )


# --- the runner --------------------------------------------------------------------------


def _system_tool(name: str) -> str:
    # Never found through the current directory or PATH: ctun runs elevated.
    if sys.platform == "win32":
        root = os.environ.get("SYSTEMROOT") or "C:\\Windows"
        return os.path.join(root, "System32", f"{name}.exe")
    return name


def _decode(data: bytes) -> str:
    # Console tools write in the OEM code page; only numbers and addresses are parsed.
    if sys.platform == "win32":
        return data.decode("oem", errors="replace")
    return data.decode("utf-8", errors="replace")


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return "no output"


def run(argv: Sequence[str]) -> str:
    """Run one netsh/route command line; its output, or PlatformError when it fails."""
    command = " ".join(argv)
    no_window = 0x08000000 if sys.platform == "win32" else 0  # CREATE_NO_WINDOW
    try:
        proc = subprocess.run(
            [_system_tool(argv[0]), *argv[1:]],
            capture_output=True,
            timeout=RUN_TIMEOUT,
            creationflags=no_window,
            check=False,
        )
    except FileNotFoundError as exc:
        raise PlatformError(f"{command}: {argv[0]} not found ({exc.filename})") from exc
    except subprocess.TimeoutExpired as exc:
        raise PlatformError(f"{command} did not finish within {RUN_TIMEOUT:g} s") from exc
    output = _decode(proc.stdout) + _decode(proc.stderr)
    if proc.returncode != 0:
        raise PlatformError(f"{command} failed (exit {proc.returncode}): {_first_line(output)}")
    return output


# --- what `route print -4` says --------------------------------------------------------

_IP = r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"
# Active routes: destination, netmask, gateway ("On-link", in the system's language, or an
# address), interface address, metric. Persistent routes have no interface column.
_ROUTE_LINE = re.compile(rf"^\s*({_IP})\s+({_IP})\s+(\S.*?)\s+({_IP})\s+(\d+)\s*$")
_IP_ONLY = re.compile(_IP)
_MULTICAST = IPv4Network("224.0.0.0/4")
_LIMITED_BROADCAST = IPv4Network("255.255.255.255/32")


@dataclass(frozen=True)
class RouteEntry:
    network: IPv4Network
    gateway: IPv4Address | None  # None: on-link
    interface: IPv4Address  # the address of the interface it goes out of
    metric: int

    @property
    def housekeeping(self) -> bool:
        """Multicast and limited-broadcast entries every interface has."""
        return self.network.subnet_of(_MULTICAST) or self.network == _LIMITED_BROADCAST

    def __str__(self) -> str:
        via = "on-link" if self.gateway is None else f"via {self.gateway}"
        return f"{self.network} {via} (interface {self.interface})"


def parse_route_print(text: str) -> list[RouteEntry]:
    """The active IPv4 routes in `route print -4` output (any display language)."""
    entries: list[RouteEntry] = []
    for line in text.splitlines():
        match = _ROUTE_LINE.match(line)
        if match is None:
            continue
        dest, mask, gateway, interface, metric = match.groups()
        try:
            entries.append(
                RouteEntry(
                    IPv4Network(f"{dest}/{mask}", strict=False),
                    IPv4Address(gateway) if _IP_ONLY.fullmatch(gateway) else None,
                    IPv4Address(interface),
                    int(metric),
                )
            )
        except ValueError:  # a non-contiguous mask, or not an address after all
            continue
    return entries


def link_network(local: IPv4Address, peer: IPv4Address) -> IPv4Network:
    """The smallest subnet holding both ends where neither is its network or broadcast
    address (prefix /30 at most): what the adapter's address and CONFIG_TUN use."""
    if local == peer:
        raise PlatformError(f"the local and peer addresses are both {local}")
    for prefix in range(30, LINK_PREFIX_MIN - 1, -1):
        net = IPv4Network(f"{local}/{prefix}", strict=False)
        ends = (net.network_address, net.broadcast_address)
        if peer in net and local not in ends and peer not in ends:
            return net
    raise PlatformError(
        f"{local} and {peer} are too far apart for one point-to-point link: use two "
        "neighbouring addresses (ctun's addr setting does)"
    )


# --- the run directory ---------------------------------------------------------------------


def _fs_error(action: str, path: Path, exc: OSError) -> PlatformError:
    return PlatformError(
        f"cannot {action} {path}: {exc.strerror or exc}; run ctun from an elevated prompt, "
        f"or set {RUN_DIR_ENV} to a writable directory"
    )


class WindowsRunState(CrashRecord):
    """`<run_dir>/<ifname>.lock`, locked (api.lock_file) while an adapter owns `ifname`, and
    `<run_dir>/<ifname>.json`, what the owner changed. Windows drops the lock when the process
    dies; a record found while holding the lock was left by a crash. The lock file itself
    stays: Windows cannot delete a file that is open, and an unlocked one means nothing."""

    def _fs_error(self, action: str, path: Path, exc: OSError) -> PlatformError:
        return _fs_error(action, path, exc)

    def __init__(self, api: WinApi, run_dir: Path, ifname: str, fd: int) -> None:
        self.api = api
        self.run_dir = run_dir
        self.ifname = ifname
        self._fd = fd

    @property
    def lock_path(self) -> Path:
        return self.run_dir / f"{self.ifname}.lock"

    @property
    def state_path(self) -> Path:
        return self.run_dir / f"{self.ifname}.json"

    @classmethod
    def acquire(cls, api: WinApi, run_dir: Path, ifname: str) -> WindowsRunState:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _fs_error("create", run_dir, exc) from exc
        path = run_dir / f"{ifname}.lock"
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOINHERIT", 0) | getattr(
            os, "O_CLOEXEC", 0
        )
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise _fs_error("open", path, exc) from exc
        try:
            locked = api.lock_file(fd)
            if not locked:
                raise PlatformError(
                    f"interface {ifname} is in use by another running ctun "
                    f"(pid {_read_pid(fd)}); stop it or pick another interface name"
                )
            # Fixed width, so it overwrites an earlier owner's pid without truncating a
            # file that has a lock on it.
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid():<20}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        return cls(api, run_dir, ifname, fd)

    def release(self) -> None:
        if self._fd < 0:
            return
        self.api.unlock_file(self._fd)
        os.close(self._fd)
        self._fd = -1


def _read_pid(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def _recorded_routes(record: dict[str, Any]) -> list[tuple[IPv4Network, IPv4Address]]:
    routes = []
    for item in record.get("routes") or []:
        try:
            network, gateway = item
            routes.append((IPv4Network(network), IPv4Address(gateway)))
        except (TypeError, ValueError):
            continue  # a damaged record: skip what cannot be read
    return routes


# --- the adapter ---------------------------------------------------------------------------


class WindowsAdapter(PlatformAdapter):
    """One TAP-windows6 adapter and everything configured on it, undone by close()."""

    name: ClassVar[str] = "windows"

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        api: WinApi | None = None,
        runner: Runner | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
        address_timeout: float = ADDRESS_TIMEOUT,
        address_poll: float = ADDRESS_POLL,
    ) -> None:
        self._run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
        self._api_obj = api
        self._runner = runner
        self._clock = clock or time.monotonic
        self._sleep = sleep or time.sleep
        self._address_timeout = address_timeout
        self._address_poll = address_poll
        self._admin = False
        self._run: WindowsRunState | None = None
        self._tap: TapInterface | None = None
        self._mtu: int | None = None
        self._driver_mtu: int | None = None
        self._local: IPv4Address | None = None
        self._peer: IPv4Address | None = None
        self._link: IPv4Network | None = None
        self._routes: dict[IPv4Network, IPv4Address] = {}  # network -> gateway, ours
        self._stale: list[tuple[IPv4Network, IPv4Address]] = []  # a crashed run's, unseen

    @classmethod
    def is_supported(cls) -> bool:
        return sys.platform == "win32"

    @property
    def interface(self) -> TapInterface | None:
        """The open TAP interface, if any."""
        return self._tap

    # -- plumbing ---------------------------------------------------------------------

    @property
    def _api(self) -> WinApi:
        if self._api_obj is None:
            self._api_obj = system_api()
        return self._api_obj

    def _run_cmd(self, argv: Sequence[str]) -> str:
        runner = self._runner or run
        return runner(list(argv))

    def _check_admin(self) -> None:
        if not self._admin:
            if not self._api.is_admin():
                raise PlatformError(NOT_ADMIN)
            self._admin = True

    def _require_tap(self) -> TapInterface:
        if self._tap is None:
            raise PlatformError("the interface is not open: call open_interface() first")
        return self._tap

    def _connection(self) -> str:
        return self._require_tap().device.info.name

    def _save_state(self) -> None:
        # Called before each change, so a crash right after it still leaves a record.
        assert self._run is not None
        record: dict[str, Any] = {"pid": os.getpid(), "ifname": self._run.ifname}
        if self._tap is not None:
            record["guid"] = self._tap.device.info.guid
            record["connection"] = self._tap.device.info.name
        if self._local is not None and self._peer is not None:
            record["local"], record["peer"] = str(self._local), str(self._peer)
        record["routes"] = [[str(n), str(g)] for n, g in sorted(self._routes.items())]
        self._run.write_record(record)

    def _route_table(self) -> list[RouteEntry]:
        return parse_route_print(self._run_cmd(["route", "print", "-4"]))

    # -- ownership and crash cleanup ----------------------------------------------------

    def cleanup_leftovers(self, ifname: str) -> list[str]:
        check_ifname(ifname)
        self._check_admin()
        if self._run is not None:
            if self._run.ifname != ifname:
                raise PlatformError(
                    f"this adapter already manages {self._run.ifname}; "
                    f"use a separate adapter for {ifname}"
                )
            return []  # we hold the lock, so whatever is recorded is ours, not a crash's
        run_state = WindowsRunState.acquire(self._api, self._run_dir, ifname)
        try:
            cleaned = self._undo_crashed_run(run_state)
        except BaseException:
            run_state.release()
            raise
        self._run = run_state
        return cleaned

    def _undo_crashed_run(self, run_state: WindowsRunState) -> list[str]:
        record = run_state.read_record()
        if record is None:
            return []
        who = f"a crashed ctun (pid {record.get('pid', 'unknown')})"
        cleaned: list[str] = []
        recorded = _recorded_routes(record)
        if recorded:
            table = self._route_table()
            for network, gateway in recorded:
                if any(e.network == network and e.gateway == gateway for e in table):
                    self._route_delete(network, gateway)
                    cleaned.append(f"deleted route {network} via {gateway} left by {who}")
                else:
                    # Not active now (the adapter is unplugged), but Windows may bring it
                    # back with the adapter: set_address() looks again.
                    self._stale.append((network, gateway))
        guid, connection = record.get("guid"), record.get("connection")
        if isinstance(guid, str) and guid:
            info = TapAdapterInfo(guid, connection if isinstance(connection, str) else guid)
            try:
                device = TapDevice.open(self._api, info)
            except WinApiError:
                pass  # removed, disabled, or another program's now: nothing of ours to reset
            else:
                try:
                    device.set_media_status(False)
                    cleaned.append(
                        f"reset the media status of TAP adapter {info} left by {who}"
                    )
                except PlatformError as exc:
                    # Not fatal: closing the handle unplugs it, and the next open resets it.
                    log.warning("%s", exc)
                finally:
                    device.close()
        run_state.remove_record()
        cleaned.append(f"removed state file {run_state.state_path} left by {who}")
        return cleaned

    # -- the interface ------------------------------------------------------------------

    def open_interface(self, ifname: str, mtu: int) -> VirtualInterface:
        """Open a free TAP-windows6 adapter and check its driver. The virtual cable stays
        unplugged until set_address() has put the driver in TUN mode, so no Ethernet frame
        of TAP mode ever reaches the engine; the MTU is applied there too."""
        check_ifname(ifname)
        self._check_admin()
        if self._tap is not None:
            raise PlatformError(
                f"interface {self._tap.name} is already open; one adapter serves one interface"
            )
        if self._run is None or self._run.ifname != ifname:
            self.cleanup_leftovers(ifname)
        api = self._api
        device = open_first(api, preference_order(find_tap_adapters(api), ifname))
        try:
            version = device.version()
            if version[:2] < MIN_VERSION:
                raise PlatformError(
                    f"TAP adapter {device.info.name} has driver version "
                    f"{version[0]}.{version[1]}; ctun needs {MIN_VERSION[0]}.{MIN_VERSION[1]} "
                    "or later: install a current tap-windows6 (OpenVPN ships one)"
                )
            driver_mtu = device.mtu()
            _check_mtu(mtu, driver_mtu, device.info.name)
            tap = TapInterface(ifname, device)
        except BaseException:
            device.close()
            raise
        self._tap, self._mtu, self._driver_mtu = tap, mtu, driver_mtu
        self._save_state()  # the adapter's GUID, before anything about it changes
        return tap

    def set_address(self, local: IPv4Address, peer: IPv4Address) -> None:
        tap = self._require_tap()
        link = link_network(local, peer)
        self._local, self._peer, self._link = local, peer, link
        self._save_state()
        device = tap.device
        name = device.info.name
        device.config_tun(local, link.network_address, link.netmask)
        device.set_media_status(True)
        tap.start()  # reads fail while the cable is unplugged, so only now
        try:
            # netsh's positional order: name, source, address, mask[, gateway]. No gateway.
            self._run_cmd(
                ["netsh", "interface", "ip", "set", "address", name, "static", str(local),
                 str(link.netmask)]
            )
        except PlatformError as exc:
            # Some Windows versions refuse to set an address the adapter already has.
            if not _address_applied(self._show_addresses(name), local, link):
                raise PlatformError(
                    f"cannot set address {local}/{link.prefixlen} on TAP adapter {name}: {exc}"
                ) from exc
        else:
            self._wait_for_address(name, local, link)
        if self._mtu is not None:
            self._apply_mtu(self._mtu)
        for kind in ("dns", "wins"):  # nothing to resolve names with on the tunnel
            with contextlib.suppress(PlatformError):  # "none configured" is an error to netsh
                self._run_cmd(["netsh", "interface", "ip", "delete", kind, name, "all"])
        if self._stale:
            self._remove_stale_routes()

    def _show_addresses(self, name: str) -> str:
        try:
            return self._run_cmd(["netsh", "interface", "ip", "show", "addresses", name])
        except PlatformError:
            return ""

    def _wait_for_address(self, name: str, local: IPv4Address, link: IPv4Network) -> None:
        """Windows applies netsh's address asynchronously: poll until it shows, or give up."""
        deadline = self._clock() + self._address_timeout
        while not _address_applied(self._show_addresses(name), local, link):
            if self._clock() >= deadline:
                raise PlatformError(
                    f"the address {local} never appeared on TAP adapter {name} within "
                    f"{self._address_timeout:g} s (netsh interface ip show addresses "
                    f'"{name}"): check that the adapter is enabled and that no other adapter '
                    f"has {local}"
                )
            self._sleep(self._address_poll)

    def _remove_stale_routes(self) -> None:
        table = self._route_table()
        for network, gateway in self._stale:
            if any(e.network == network and e.gateway == gateway for e in table):
                with contextlib.suppress(PlatformError):
                    self._route_delete(network, gateway)
                    log.info("deleted route %s via %s left by a crashed run", network, gateway)
        self._stale.clear()

    def set_mtu(self, mtu: int) -> None:
        """Applied at once when the adapter has its address, else by set_address()."""
        tap = self._require_tap()
        assert self._driver_mtu is not None
        _check_mtu(mtu, self._driver_mtu, tap.device.info.name)
        self._mtu = mtu
        if self._local is not None:
            self._apply_mtu(mtu)

    def _apply_mtu(self, mtu: int) -> None:
        self._run_cmd(
            ["netsh", "interface", "ipv4", "set", "subinterface", self._connection(),
             f"mtu={mtu}", "store=persistent"]
        )

    # -- routes -------------------------------------------------------------------------

    def _gateway(self, via: IPv4Address | None) -> IPv4Address:
        if self._peer is None:
            raise PlatformError("the interface has no address: call set_address() first")
        return via if via is not None else self._peer

    def _route_delete(self, network: IPv4Network, gateway: IPv4Address) -> None:
        self._run_cmd(
            ["route", "delete", str(network.network_address), "mask", str(network.netmask),
             str(gateway)]
        )

    def add_route(self, network: IPv4Network, via: IPv4Address | None = None) -> None:
        gateway = self._gateway(via)
        previous = self._routes.get(network)
        self._routes[network] = gateway
        self._save_state()  # recorded before the change
        try:
            self._run_cmd(
                ["route", "add", str(network.network_address), "mask", str(network.netmask),
                 str(gateway)]
            )
        except PlatformError as exc:
            table = self._route_table()
            if any(e.network == network and e.gateway == gateway for e in table):
                return  # it was there already: not an error
            if previous is None:
                del self._routes[network]
            else:
                self._routes[network] = previous
            self._save_state()
            for entry in table:
                if entry.network == network:
                    raise PlatformError(
                        f"cannot add route {network}: the route {entry} already exists; "
                        "remove it or replace it"
                    ) from exc
            raise PlatformError(f"cannot add route {network} via {gateway}: {exc}") from exc

    def replace_route(self, network: IPv4Network, via: IPv4Address | None = None) -> None:
        """Delete every route for `network` (whichever interface it uses), then add ours."""
        self._gateway(via)
        try:
            self._run_cmd(
                ["route", "delete", str(network.network_address), "mask", str(network.netmask)]
            )
        except PlatformError as exc:
            for entry in self._route_table():
                if entry.network == network:
                    raise PlatformError(
                        f"cannot replace route {network}: deleting {entry} failed: {exc}"
                    ) from exc
        self.add_route(network, via)

    def remove_route(self, network: IPv4Network) -> None:
        gateway = self._routes.get(network, self._peer)
        if gateway is None:
            return  # no address yet, so no route of ours
        try:
            self._route_delete(network, gateway)
        except PlatformError as exc:
            table = self._route_table()
            if any(e.network == network and e.gateway == gateway for e in table):
                raise PlatformError(f"cannot remove route {network}: {exc}") from exc
        if self._routes.pop(network, None) is not None:
            self._save_state()

    def routes(self) -> list[IPv4Network]:
        """Routes out of the adapter's address: ours via the peer, and the on-link link
        subnet; not Windows' own host, broadcast and multicast entries."""
        if self._local is None:
            return []
        networks: list[IPv4Network] = []
        for entry in self._route_table():
            if entry.interface != self._local or entry.housekeeping:
                continue
            if entry.network.prefixlen == 0:
                continue
            if entry.gateway is None and entry.network.prefixlen == 32:
                continue  # the address's own and the link's broadcast host entries
            if entry.network not in networks:
                networks.append(entry.network)
        return networks

    def conflicting_route(self, network: IPv4Network) -> str | None:
        for entry in self._route_table():
            # 0.0.0.0/0, and a full-tunnel VPN's 0.0.0.0/1 + 128.0.0.0/1, overlap everything
            # by design; more specific routes (ours) win over them.
            if entry.network.prefixlen <= 1 or entry.housekeeping:
                continue
            if self._local is not None and entry.interface == self._local:
                continue
            if entry.network.overlaps(network):
                return str(entry)
        return None

    # -- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        """Delete our routes, unplug the virtual cable, close the device, drop the record.
        The address stays configured on the (now disconnected) adapter, as Windows keeps
        it; it carries nothing while the adapter is unplugged."""
        if self._run is None and self._tap is None:
            return  # never started, or already closed
        failures: list[str] = []
        if self._tap is not None:
            for network, gateway in sorted(self._routes.items()):
                try:
                    self._route_delete(network, gateway)
                except PlatformError as exc:
                    if any(e.network == network and e.gateway == gateway
                           for e in self._route_table()):
                        failures.append(f"cannot remove route {network}: {exc}")
            tap, self._tap = self._tap, None
            try:
                tap.close()
            except (PlatformError, OSError) as exc:
                failures.append(f"cannot close TAP adapter {tap.device.info.name}: {exc}")
        if self._run is not None:
            if not failures:
                self._run.remove_record()
            # On failure the record stays, so the next run's cleanup_leftovers retries.
            self._run.release()
            self._run = None
        self._routes.clear()
        self._local = self._peer = self._link = None
        if failures:
            raise PlatformError("; ".join(failures))


def _check_mtu(mtu: int, driver_mtu: int, name: str) -> None:
    if mtu > driver_mtu:
        raise PlatformError(
            f"MTU {mtu} is larger than TAP adapter {name}'s own MTU of {driver_mtu}: set ctun's "
            f"mtu to {driver_mtu} or less (or raise the adapter's MTU under its Properties, "
            "Configure, Advanced)"
        )


def _address_applied(output: str, local: IPv4Address, link: IPv4Network) -> bool:
    """Does `netsh interface ip show addresses` list `local` with the link's prefix? Matched
    as tokens, not by the (translated) labels around them."""

    def has(token: str) -> bool:
        return re.search(rf"(?<![\d.]){re.escape(token)}(?![\d.])", output) is not None

    prefix = f"{link.network_address}/{link.prefixlen}"
    return has(str(local)) and (has(prefix) or has(str(link.netmask)))
