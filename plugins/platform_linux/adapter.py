"""The Linux platform adapter: a tun device configured over netlink (pyroute2), no `ip` calls."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pyroute2 import IPRoute, NetlinkError

from ...core.contracts import PlatformAdapter, PlatformError, VirtualInterface
from .netns_pin import NetnsPin
from .rtnl import RouteSocket
from .runstate import RunState, default_run_dir
from .tun import LinuxTun, open_tun

__all__ = ["LinuxAdapter", "LinuxTun"]

T = TypeVar("T")

NAME_PREFIX = "ctun"
IFNAMSIZ = 16  # including the NUL, so names are at most 15 characters
TXQUEUELEN = 1000  # the original's 100 drops bursts
MAIN_TABLE = 254
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]+")
_ROUTE_TYPES = {6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw"}


def check_ifname(ifname: str) -> None:
    if not ifname.startswith(NAME_PREFIX):
        raise PlatformError(f"interface name {ifname!r} must start with {NAME_PREFIX!r}")
    if len(ifname) >= IFNAMSIZ:
        raise PlatformError(
            f"interface name {ifname!r} is too long: use at most {IFNAMSIZ - 1} characters"
        )
    # The name also becomes a file name under the run dir and /proc/sys.
    if not _NAME_CHARS.fullmatch(ifname):
        raise PlatformError(
            f"interface name {ifname!r} may only use letters, digits, '_', '.' and '-'"
        )


@contextlib.contextmanager
def _netlink(action: str) -> Iterator[Any]:
    """A short-lived IPRoute in the calling thread; netlink errors become PlatformError.

    Short-lived because pyroute2 0.9 opens one socket and event loop per calling thread
    behind a single IPRoute, and only the thread that opened them can release them.
    """
    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise PlatformError(_netlink_message(action, exc.code)) from exc


def _netlink_message(action: str, code: int) -> str:
    hint = "; run ctun as root (or with CAP_NET_ADMIN)" if code == errno.EPERM else ""
    return f"cannot {action}: {os.strerror(code)}{hint}"


def _ignoring(exc: NetlinkError, *codes: int) -> None:
    if exc.code not in codes:
        raise exc


def _route_network(rt: Any) -> IPv4Network:
    return IPv4Network(f"{rt.get_attr('RTA_DST') or '0.0.0.0'}/{int(rt['dst_len'])}")


def _main_routes(ipr: Any) -> list[Any]:
    routes = []
    for rt in ipr.route("dump", family=socket.AF_INET):
        # Tables above 255 only appear in RTA_TABLE; the header field then says 252.
        table = rt.get_attr("RTA_TABLE")
        if rt["family"] == socket.AF_INET and (table or rt["table"]) == MAIN_TABLE:
            routes.append(rt)
    return routes


def _read_sysctl(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except OSError as exc:
        raise PlatformError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _write_sysctl(path: str, value: int) -> None:
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
    except OSError as exc:
        hint = ""
        if exc.errno in (errno.EACCES, errno.EPERM):
            hint = "; run ctun as root"
        elif exc.errno == errno.EROFS:
            hint = "; /proc/sys is read-only here (in a container, run it privileged)"
        raise PlatformError(f"cannot write {path}: {exc.strerror or exc}{hint}") from exc


class _Batch:
    __slots__ = ("ipr", "others", "routes", "thread")

    def __init__(self, ipr: Any, routes: RouteSocket, thread: int) -> None:
        self.ipr = ipr
        self.routes = routes  # the fast path for adding routes
        self.thread = thread
        self.others: list[tuple[IPv4Network, str]] | None = None


class LinuxAdapter(PlatformAdapter):
    """One tun interface and everything configured on it, undone by close().

    All work happens in the network namespace of the thread that first used the adapter,
    even when later calls come from threads elsewhere.
    """

    name: ClassVar[str] = "linux"

    def __init__(self, run_dir: str | os.PathLike[str] | None = None) -> None:
        self._run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
        self._pin: NetnsPin | None = None
        self._run: RunState | None = None
        self._tun: LinuxTun | None = None
        self._ifindex: int | None = None
        self._routes: set[IPv4Network] = set()
        self._forward_before: int | None = None
        self._batch: _Batch | None = None

    @classmethod
    def is_supported(cls) -> bool:
        return sys.platform.startswith("linux")

    @property
    def interface(self) -> LinuxTun | None:
        """The open tun device, if any."""
        return self._tun

    # -- plumbing ---------------------------------------------------------------------

    def _in_ns(self, fn: Callable[[], T]) -> T:
        if self._pin is None:
            self._pin = NetnsPin()
        return self._pin.run(fn)

    def _index(self) -> int:
        if self._ifindex is None:
            raise PlatformError("the interface is not open: call open_interface() first")
        return self._ifindex

    def _save_state(self) -> None:
        # Called before each change, so a crash right after it still leaves a record.
        assert self._run is not None
        record: dict[str, Any] = {"pid": os.getpid(), "ifname": self._run.ifname}
        if self._forward_before is not None:
            record["ip_forward_before"] = self._forward_before
        self._run.write_record(record)

    # -- ownership and crash cleanup ----------------------------------------------------

    def cleanup_leftovers(self, ifname: str) -> list[str]:
        check_ifname(ifname)
        if self._run is not None:
            if self._run.ifname != ifname:
                raise PlatformError(
                    f"this adapter already manages {self._run.ifname}; "
                    f"use a separate adapter for {ifname}"
                )
            return []  # we hold the lock, so whatever is recorded is ours, not a crash's
        run = RunState.acquire(self._run_dir, ifname)
        try:
            cleaned = self._in_ns(lambda: self._undo_crashed_run(run))
        except BaseException:
            run.release()
            raise
        self._run = run
        return cleaned

    def _undo_crashed_run(self, run: RunState) -> list[str]:
        record = run.read_record()
        if record is None:
            return []
        ifname = run.ifname
        who = f"a crashed ctun (pid {record.get('pid', 'unknown')})"
        cleaned: list[str] = []
        before = record.get("ip_forward_before")
        if before in (0, 1):
            now = _read_sysctl(IP_FORWARD)
            if now != before:
                _write_sysctl(IP_FORWARD, int(before))
                cleaned.append(f"restored net.ipv4.ip_forward to {before} ({who} had set it)")
        # Our tun devices are not persistent, so the kernel usually removed it already.
        with _netlink(f"delete leftover interface {ifname}") as ipr:
            for index in ipr.link_lookup(ifname=ifname):
                ipr.link("del", index=index)
                cleaned.append(f"deleted interface {ifname} left by {who}")
        run.remove_record()
        cleaned.append(f"removed state file {run.state_path} left by {who}")
        return cleaned

    # -- the interface ------------------------------------------------------------------

    def open_interface(self, ifname: str, mtu: int) -> VirtualInterface:
        check_ifname(ifname)
        if self._tun is not None:
            raise PlatformError(
                f"interface {self._tun.name} is already open; one adapter serves one interface"
            )
        if self._run is None or self._run.ifname != ifname:
            self.cleanup_leftovers(ifname)
        self._save_state()
        self._tun, self._ifindex = self._in_ns(lambda: self._create(ifname, mtu))
        return self._tun

    def _create(self, ifname: str, mtu: int) -> tuple[LinuxTun, int]:
        tun = open_tun(ifname, vnet=self.offload)
        try:
            self._disable_ipv6(ifname)
            with _netlink(f"configure {ifname} (MTU {mtu})") as ipr:
                index = int(ipr.link_lookup(ifname=ifname)[0])
                ipr.link("set", index=index, mtu=mtu, txqlen=TXQUEUELEN, state="up")
        except BaseException:
            tun.close()
            raise
        return tun, index

    @staticmethod
    def _disable_ipv6(ifname: str) -> None:
        # Before the link goes up, so the kernel never sends router solicitations or MLD
        # reports into the tunnel: it carries IPv4 only and packet counts stay exact.
        path = f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"
        if os.path.exists(path):
            # Best effort: a read-only /proc/sys (some containers) only costs stray packets.
            with contextlib.suppress(OSError), open(path, "w") as f:
                f.write("1\n")

    def set_address(self, local: IPv4Address, peer: IPv4Address) -> None:
        index = self._index()

        def work() -> None:
            with _netlink(f"set address {local} peer {peer}") as ipr:
                for addr in ipr.addr("dump", family=socket.AF_INET):
                    if addr["index"] != index or addr["family"] != socket.AF_INET:
                        continue
                    have = (addr.get_attr("IFA_LOCAL"), addr.get_attr("IFA_ADDRESS"))
                    if have != (str(local), str(peer)):  # replace, don't accumulate
                        ipr.addr(
                            "del",
                            index=index,
                            local=have[0],
                            address=have[1],
                            prefixlen=int(addr["prefixlen"]),
                        )
                try:
                    ipr.addr("add", index=index, local=str(local), address=str(peer), prefixlen=32)
                except NetlinkError as exc:
                    _ignoring(exc, errno.EEXIST)

        self._in_ns(work)

    def set_mtu(self, mtu: int) -> None:
        index = self._index()

        def work() -> None:
            with _netlink(f"set MTU {mtu} (tun accepts 68..65535)") as ipr:
                ipr.link("set", index=index, mtu=mtu)

        self._in_ns(work)

    # -- routes -------------------------------------------------------------------------

    def _route_args(self, network: IPv4Network, via: IPv4Address | None) -> dict[str, Any]:
        args: dict[str, Any] = {
            "dst": str(network.network_address),
            "dst_len": network.prefixlen,
            "oif": self._index(),
            "table": MAIN_TABLE,
        }
        if via is not None:
            args["gateway"] = str(via)
        return args

    def add_route(self, network: IPv4Network, via: IPv4Address | None = None) -> None:
        args = self._route_args(network, via)

        def work() -> None:
            batch = self._batch_here()
            if batch is not None:
                code = batch.routes.add(self._index(), MAIN_TABLE, network, via)
                if code not in (0, errno.EEXIST):
                    raise PlatformError(_netlink_message(f"add route {network}", code))
                if code == 0:
                    return
            with self._nl(f"add route {network}") as ipr:
                try:
                    ipr.route("add", **args)
                except NetlinkError as exc:
                    _ignoring(exc, errno.EEXIST)
                    # EEXIST also means "the same route on another interface": say so.
                    other = self._describe_route_elsewhere(ipr, network)
                    if other is not None:
                        raise PlatformError(
                            f"cannot add route {network}: the route {other} already exists; "
                            "remove it or replace it"
                        ) from exc

        self._in_ns(work)
        self._routes.add(network)

    def _describe_route_elsewhere(self, ipr: Any, network: IPv4Network) -> str | None:
        names = {int(link["index"]): link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for rt in _main_routes(ipr):
            if _route_network(rt) == network and rt.get_attr("RTA_OIF") != self._ifindex:
                return _describe(rt, names)
        return None

    def replace_route(self, network: IPv4Network, via: IPv4Address | None = None) -> None:
        args = self._route_args(network, via)

        def work() -> None:
            with self._nl(f"replace route {network}") as ipr:
                ipr.route("replace", **args)

        self._in_ns(work)
        self._routes.add(network)

    def remove_route(self, network: IPv4Network) -> None:
        # Only our interface's route: a same-network route elsewhere is not ours to remove.
        args = self._route_args(network, None)

        def work() -> None:
            with self._nl(f"remove route {network}") as ipr:
                try:
                    ipr.route("del", **args)
                except NetlinkError as exc:
                    _ignoring(exc, errno.ESRCH, errno.ENOENT)

        self._in_ns(work)
        self._routes.discard(network)

    def routes(self) -> list[IPv4Network]:
        index = self._index()

        def work() -> list[IPv4Network]:
            with _netlink("list routes") as ipr:
                return [
                    _route_network(rt)
                    for rt in _main_routes(ipr)
                    if rt.get_attr("RTA_OIF") == index and int(rt["dst_len"]) > 0
                ]

        return self._in_ns(work)

    def conflicting_route(self, network: IPv4Network) -> str | None:
        def work() -> str | None:
            batch = self._batch_here()
            if batch is not None:
                if batch.others is None:
                    batch.others = self._other_routes(batch.ipr)
                others = batch.others
            else:
                with _netlink("list routes") as ipr:
                    others = self._other_routes(ipr)
            for other, description in others:
                if other.overlaps(network):
                    return description
            return None

        return self._in_ns(work)

    def _other_routes(self, ipr: Any) -> list[tuple[IPv4Network, str]]:
        """Routes of the main table not through our interface, that can conflict with ours."""
        names = {int(link["index"]): link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        found = []
        for rt in _main_routes(ipr):
            if int(rt["dst_len"]) <= 1:
                # The default route, or a full-tunnel VPN's 0/1 + 128/1 pair: both overlap
                # everything by design, and our more specific routes win.
                continue
            if self._ifindex is not None and rt.get_attr("RTA_OIF") == self._ifindex:
                continue
            found.append((_route_network(rt), _describe(rt, names)))
        return found

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Calls inside share one netlink socket and one look at the other routes: opening a
        socket costs more than adding a route, and a conflict check per route would read
        the whole table each time (1000 routes: minutes instead of a fraction of a second).
        Only for calls from this thread, inside the adapter's namespace; others go on alone.
        """
        if self._pin is None:
            self._pin = NetnsPin()
        if self._batch is not None or not self._pin.is_current():
            yield
            return
        try:
            with IPRoute() as ipr:
                routes = RouteSocket()
                try:
                    self._batch = _Batch(ipr, routes, threading.get_ident())
                    yield
                finally:
                    routes.close()
        except NetlinkError as exc:
            raise PlatformError(_netlink_message("talk to the kernel", exc.code)) from exc
        finally:
            self._batch = None

    def _batch_here(self) -> _Batch | None:
        batch = self._batch
        if batch is not None and batch.thread == threading.get_ident():
            return batch
        return None

    @contextlib.contextmanager
    def _nl(self, action: str) -> Iterator[Any]:
        """The batch's netlink socket when one is open for this thread, else a new one."""
        batch = self._batch_here()
        if batch is None:
            with _netlink(action) as ipr:
                yield ipr
            return
        try:
            yield batch.ipr
        except NetlinkError as exc:
            raise PlatformError(_netlink_message(action, exc.code)) from exc

    def interface_for(self, network: IPv4Network) -> str | None:
        def work() -> str | None:
            with _netlink("list routes") as ipr:
                names = {
                    int(link["index"]): link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                }
                best: tuple[int, int] | None = None  # (prefix length, interface index)
                for rt in _main_routes(ipr):
                    oif = rt.get_attr("RTA_OIF")
                    if int(rt["dst_len"]) == 0 or oif is None or oif == self._ifindex:
                        continue
                    route = _route_network(rt)
                    if network.subnet_of(route) and (best is None or route.prefixlen > best[0]):
                        best = (route.prefixlen, int(oif))
            return None if best is None else str(names.get(best[1]))

        return self._in_ns(work)

    # -- forwarding ---------------------------------------------------------------------

    def enable_forwarding(self) -> None:
        if self._run is None:
            raise PlatformError(
                "call cleanup_leftovers() or open_interface() before enable_forwarding()"
            )

        def work() -> None:
            current = _read_sysctl(IP_FORWARD)
            if self._forward_before is None:
                self._forward_before = current
                self._save_state()  # record the old value before changing it
            if current != 1:
                _write_sysctl(IP_FORWARD, 1)

        self._in_ns(work)

    # -- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        if self._pin is None and self._run is None:
            return  # never started, or already closed
        failures: list[str] = []
        if self._tun is not None or self._forward_before is not None:
            try:
                self._in_ns(lambda: self._undo(failures))
            except Exception as exc:  # keep going: the lock must still be released
                failures.append(str(exc))
        if self._run is not None:
            if not failures:
                self._run.remove_record()
            # On failure the record stays, so the next run's cleanup_leftovers retries.
            self._run.release()
            self._run = None
        if self._pin is not None:
            self._pin.close()
            self._pin = None
        if failures:
            raise PlatformError("; ".join(failures))

    def _undo(self, failures: list[str]) -> None:
        if self._tun is not None:
            ifname = self._tun.name
            index = self._ifindex
            # Routes and the address vanish with the interface; removing routes first is
            # just tidy. Errors here are ignored for that reason.
            with contextlib.suppress(PlatformError), _netlink("remove routes") as ipr:
                for network in self._routes:
                    with contextlib.suppress(NetlinkError):
                        ipr.route(
                            "del",
                            dst=str(network.network_address),
                            dst_len=network.prefixlen,
                            oif=index,
                            table=MAIN_TABLE,
                        )
            self._routes.clear()
            self._tun.close()
            self._tun = None
            self._ifindex = None
            # Closing a non-persistent tun removes the link; a persistent one survives it.
            try:
                with _netlink(f"delete interface {ifname}") as ipr:
                    for left in ipr.link_lookup(ifname=ifname):
                        ipr.link("del", index=left)
            except PlatformError as exc:
                failures.append(str(exc))
        if self._forward_before is not None:
            try:
                _write_sysctl(IP_FORWARD, self._forward_before)
                self._forward_before = None
            except PlatformError as exc:
                failures.append(str(exc))


def _describe(rt: Any, names: dict[int, str]) -> str:
    text = str(_route_network(rt))
    gateway = rt.get_attr("RTA_GATEWAY")
    if gateway:
        text += f" via {gateway}"
    oif = rt.get_attr("RTA_OIF")
    if oif is not None:
        text += f" dev {names.get(int(oif), f'#{oif}')}"
    elif int(rt["type"]) in _ROUTE_TYPES:
        text = f"{_ROUTE_TYPES[int(rt['type'])]} {text}"
    return text
