"""The macOS platform adapter: a utun interface configured with ifconfig, route and netstat.

Every change to the system goes through one function, `run(argv) -> stdout` (sshuttle's
pattern): the adapter takes it as `runner=`, and the tests replace it to assert the exact
command lines. The commands, in order of use:

    ifconfig utunN mtu MTU up                                  open_interface()
    ifconfig utunN inet LOCAL PEER netmask 255.255.255.255 up  set_address()
    ifconfig utunN mtu MTU                                     set_mtu()
    route -n add -net CIDR PEER   then  route -n get CIDR      add_route()
    netstat -rn -f inet           then  route -n delete -net CIDR (if ours)   remove_route()
    netstat -rn -f inet, route -n delete -net CIDR (if present), then add     replace_route()
    netstat -rn -f inet                                        routes(), conflicting_route()

`route` on macOS exits 0 even when the kernel refused the change (it prints the error), so
its exit status proves nothing: every add is checked with `route -n get`, and deletions
only ever touch a route `netstat` shows on our interface (or through our peer).

The config's interface name ("ctun0") names the lock and state file under the run dir (as
on Linux); the kernel names the interface itself (`utunN`) when it is created.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, ClassVar

from ...core.contracts import PlatformAdapter, PlatformError, VirtualInterface
from ..platform_linux.runstate import RUN_DIR_ENV, RunState
from .routes import RouteRow, parse_netstat, parse_route_get, route_get_network
from .utun import MacUtun, UtunSystem, open_utun

__all__ = ["DEFAULT_RUN_DIR", "MacOSAdapter", "MacUtun", "Runner", "run"]

log = logging.getLogger("ctun.platform.macos")

Runner = Callable[[list[str]], str]

DEFAULT_RUN_DIR = "/var/run/ctun"  # /run does not exist on macOS
NAME_PREFIX = "ctun"
MAX_NAME = 15  # the same names as on Linux, so one config works on both
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]+")
HOST_MASK = "255.255.255.255"
NOT_ROOT = "creating a utun interface needs root on macOS: run ctun with sudo"
NETSTAT = ["netstat", "-rn", "-f", "inet"]
EXISTS = "File exists"  # what route prints when the kernel already has the route

# Where the commands live on every macOS; run() never looks them up in $PATH, which under
# sudo or launchd may be anything.
COMMAND_PATHS = {
    "ifconfig": "/sbin/ifconfig",
    "route": "/sbin/route",
    "netstat": "/usr/sbin/netstat",
}


def run(argv: list[str]) -> str:
    """Run one system command; its stdout, or PlatformError with the command and stderr."""
    command = " ".join(argv)
    log.debug(">> %s", command)
    executable = COMMAND_PATHS.get(argv[0], argv[0])
    try:
        done = subprocess.run(
            [executable, *argv[1:]],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except OSError as exc:
        raise PlatformError(
            f"{command} failed: cannot run {executable}: {exc.strerror or exc}"
        ) from exc
    if done.returncode != 0:
        detail = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        hint = "; run ctun with sudo" if "not permitted" in detail.lower() else ""
        raise PlatformError(f"{command} failed: {detail}{hint}")
    return done.stdout


def check_ifname(ifname: str) -> None:
    if not ifname.startswith(NAME_PREFIX):
        raise PlatformError(f"interface name {ifname!r} must start with {NAME_PREFIX!r}")
    if len(ifname) > MAX_NAME:
        raise PlatformError(
            f"interface name {ifname!r} is too long: use at most {MAX_NAME} characters"
        )
    if not _NAME_CHARS.fullmatch(ifname):
        raise PlatformError(
            f"interface name {ifname!r} may only use letters, digits, '_', '.' and '-'"
        )


def default_run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise PlatformError(NOT_ROOT)


def _find(rows: Iterable[RouteRow], network: IPv4Network) -> RouteRow | None:
    """The unscoped route for exactly `network`; the kernel holds at most one."""
    for row in rows:
        if row.network == network and not row.incidental:
            return row
    return None


class MacOSAdapter(PlatformAdapter):
    """One utun interface and the routes into it, undone by close()."""

    name: ClassVar[str] = "macos"

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        runner: Runner = run,
        system: UtunSystem | None = None,
    ) -> None:
        self._run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
        self._runner = runner
        self._system = system or UtunSystem()
        self._lock = threading.RLock()  # routes change from the Docker watcher's thread
        self._state: RunState | None = None
        self._utun: MacUtun | None = None
        self._local: IPv4Address | None = None
        self._peer: IPv4Address | None = None
        self._routes: set[IPv4Network] = set()

    @classmethod
    def is_supported(cls) -> bool:
        return sys.platform == "darwin"

    @property
    def interface(self) -> MacUtun | None:
        """The open utun interface, if any."""
        return self._utun

    # -- plumbing ---------------------------------------------------------------------

    def _run(self, *argv: str) -> str:
        return self._runner(list(argv))

    def _table(self) -> list[RouteRow]:
        return parse_netstat(self._run(*NETSTAT))

    def _device(self) -> str:
        if self._utun is None:
            raise PlatformError("the interface is not open: call open_interface() first")
        return self._utun.name

    def _save_state(self) -> None:
        # Called before each change, so a crash right after it still leaves a record.
        assert self._state is not None
        record: dict[str, Any] = {
            "pid": os.getpid(),
            "ifname": self._state.ifname,
            "utun": self._utun.name if self._utun is not None else None,
            "peer": str(self._peer) if self._peer is not None else None,
            "routes": sorted(str(n) for n in self._routes),
        }
        self._state.write_record(record)

    def _ours(self, row: RouteRow) -> bool:
        """Routed into our interface, or through our peer (a route the kernel put on another
        interface still dies with ours only if we delete it)."""
        if self._utun is not None and row.netif == self._utun.name:
            return True
        return self._peer is not None and row.via == self._peer

    # -- ownership and crash cleanup ----------------------------------------------------

    def cleanup_leftovers(self, ifname: str) -> list[str]:
        check_ifname(ifname)
        with self._lock:
            if self._state is not None:
                if self._state.ifname != ifname:
                    raise PlatformError(
                        f"this adapter already manages {self._state.ifname}; "
                        f"use a separate adapter for {ifname}"
                    )
                return []  # we hold the lock: what is recorded is ours, not a crash's
            _require_root()
            state = RunState.acquire(self._run_dir, ifname)
            try:
                cleaned = self._undo_crashed_run(state)
            except BaseException:
                state.release()
                raise
            self._state = state
            return cleaned

    def _undo_crashed_run(self, state: RunState) -> list[str]:
        record = state.read_record()
        if record is None:
            return []
        who = f"a crashed ctun (pid {record.get('pid', 'unknown')})"
        utun = record.get("utun")
        peer = _address(record.get("peer"))
        recorded = [n for n in map(_network, record.get("routes") or []) if n is not None]
        cleaned: list[str] = []
        if recorded:
            # The crashed run's utun died with it, and the kernel usually took its routes
            # along; a route still there is deleted only if it goes through the recorded
            # peer (its utunN may be some VPN's by now), or, with no peer, that utunN.
            rows = self._table()
            for network in recorded:
                row = _find(rows, network)
                if row is None:
                    continue
                if (row.via == peer) if peer is not None else (row.netif == utun):
                    self._run("route", "-n", "delete", "-net", str(network))
                    cleaned.append(f"deleted route {row.describe()} left by {who}")
        state.remove_record()
        cleaned.append(f"removed state file {state.state_path} left by {who}")
        return cleaned

    # -- the interface ------------------------------------------------------------------

    def open_interface(self, ifname: str, mtu: int) -> VirtualInterface:
        check_ifname(ifname)
        _require_root()
        with self._lock:
            if self._utun is not None:
                raise PlatformError(
                    f"interface {self._utun.name} is already open; "
                    "one adapter serves one interface"
                )
            if self._state is None or self._state.ifname != ifname:
                self.cleanup_leftovers(ifname)
            utun = open_utun(self._system)
            try:
                self._run("ifconfig", utun.name, "mtu", str(mtu), "up")
            except BaseException:
                utun.close()
                raise
            self._utun = utun
            self._save_state()
            log.debug("%s is %s", ifname, utun.name)
            return utun

    def set_address(self, local: IPv4Address, peer: IPv4Address) -> None:
        with self._lock:
            device = self._device()
            # Without `alias`, ifconfig replaces the interface's address rather than adding.
            self._run("ifconfig", device, "inet", str(local), str(peer), "netmask", HOST_MASK,
                      "up")
            self._local, self._peer = local, peer
            self._save_state()

    def set_mtu(self, mtu: int) -> None:
        with self._lock:
            self._run("ifconfig", self._device(), "mtu", str(mtu))

    # -- routes -------------------------------------------------------------------------

    def _gateway(self, via: IPv4Address | None) -> list[str]:
        gateway = via or self._peer
        if gateway is None:  # no address yet: route straight into the interface
            return ["-interface", self._device()]
        return [str(gateway)]

    def add_route(self, network: IPv4Network, via: IPv4Address | None = None) -> None:
        with self._lock:
            device = self._device()
            gateway = self._gateway(via)
            self._routes.add(network)
            self._save_state()  # recorded before the change; a crash may follow it
            self._add(network, device, gateway)

    def _add(self, network: IPv4Network, device: str, gateway: list[str]) -> None:
        try:
            output = self._run("route", "-n", "add", "-net", str(network), *gateway)
        except PlatformError as exc:
            # Apple's route exits 0 even then, but a route that exists is checked, not fatal.
            if EXISTS not in str(exc):
                raise
            output = str(exc)
        self._check_added(network, device, output)

    def _check_added(self, network: IPv4Network, device: str, add_output: str) -> None:
        """The kernel now routes `network` into `device`, or PlatformError saying where."""
        info = parse_route_get(self._run("route", "-n", "get", str(network)))
        interface = info.get("interface")
        got = route_get_network(info)
        if interface == device and got in (None, network):
            return
        if not (self._peer is not None and info.get("gateway") == str(self._peer)):
            self._routes.discard(network)  # not ours: close() must not delete it
            self._save_state()
        if interface is None or interface == device:
            said = " ".join(add_output.split()) or "route printed nothing"
            found = f"finds {got} instead" if got is not None else "finds no route for it"
            raise PlatformError(
                f"route {network} was not added ({said}) and `route -n get {network}` {found}"
            )
        other = str(got) if got is not None else str(network)
        gateway = info.get("gateway")
        where = f"{other} via {gateway} on {interface}" if gateway else f"{other} on {interface}"
        raise PlatformError(
            f"route {network} goes through {interface}, not {device}: the route {where} "
            f"shadows it (a VPN?); disconnect {interface} or stop routing {network}"
        )

    def replace_route(self, network: IPv4Network, via: IPv4Address | None = None) -> None:
        # Delete then add rather than `route change`: change fails (and exits 0) when no
        # route exists, and moving a route to another gateway with it can leave the kernel's
        # interface pointer on the old interface. The cost is a moment without the route.
        with self._lock:
            device = self._device()
            gateway = self._gateway(via)
            self._routes.add(network)
            self._save_state()
            if _find(self._table(), network) is not None:
                self._run("route", "-n", "delete", "-net", str(network))
            self._add(network, device, gateway)

    def remove_route(self, network: IPv4Network) -> None:
        with self._lock:
            self._device()
            row = _find(self._table(), network)
            # Only ours: `route delete` takes whatever route the network has, a VPN's too.
            if row is not None and self._ours(row):
                self._run("route", "-n", "delete", "-net", str(network))
            if network in self._routes:
                self._routes.discard(network)
                self._save_state()

    def routes(self) -> list[IPv4Network]:
        device = self._device()
        return [
            row.network
            for row in self._table()
            if row.netif == device and row.network.prefixlen > 0 and not row.incidental
        ]

    def conflicting_route(self, network: IPv4Network) -> str | None:
        for row in self._table():
            # 0/0, and the 0/1 + 128.0/1 pair that VPNs (WireGuard, OpenVPN) install instead
            # of replacing the default route, overlap everything by design: a more specific
            # route wins over them.
            if row.network.prefixlen <= 1 or row.incidental or self._ours(row):
                continue
            if row.network.overlaps(network):
                return row.describe()
        return None

    # -- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._state is None and self._utun is None:
                return  # never started, or already closed
            failures: list[str] = []
            if self._utun is not None:
                if self._routes:
                    try:
                        rows = self._table()
                        for network in sorted(self._routes):
                            row = _find(rows, network)
                            if row is not None and self._ours(row):
                                self._run("route", "-n", "delete", "-net", str(network))
                        self._routes.clear()
                    except PlatformError as exc:  # keep going: the utun must still close
                        failures.append(str(exc))
                self._utun.close()  # the kernel removes utunN and whatever still uses it
                self._utun = None
                self._local = self._peer = None
            if self._state is not None:
                if not failures:
                    self._state.remove_record()
                # On failure the record stays, so the next run's cleanup_leftovers retries.
                self._state.release()
                self._state = None
            if failures:
                raise PlatformError("; ".join(failures))


def _address(value: object) -> IPv4Address | None:
    try:
        return IPv4Address(str(value)) if value else None
    except ValueError:
        return None


def _network(value: object) -> IPv4Network | None:
    try:
        return IPv4Network(str(value))
    except ValueError:
        return None
