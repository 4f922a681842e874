"""A lab shaped like Docker Desktop, built from network namespaces.

    atk (10.251.1.2) ── host (10.251.1.1 | 10.251.0.1) ── vm (10.251.0.2, br0 172.18.0.1/16)
                                                                  ├── c1 172.18.0.2 :80
                                                                  └── c2 172.18.0.3 :80 ...

The host namespace has no default route and no route to 172.18.0.0/16, so the containers are
unreachable from it until a tunnel is up: that is the situation ctun exists to fix. The
"attacker" sits on the host's LAN and may talk to the host's addresses, never to containers.

Every link is created directly inside the namespaces (never in the root namespace), so a lab
leaves no trace in the root namespace even if it crashes half-way; interface names still carry
a short hash of the prefix so two labs are easy to tell apart in `ip` output.

A lab owns its prefix through a lock file: create() treats anything left under the prefix as
debris of a crash and removes it, which must never happen to a lab another process still uses.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import TypeVar
from urllib.parse import urlsplit

from . import netns, processes
from .lock import PrefixLock
from .processes import Processes
from .processes import stop as stop  # still public here, as it always was

T = TypeVar("T")

CONTAINER_SUBNET = IPv4Network("172.18.0.0/16")
BRIDGE_ADDRESS = IPv4Address("172.18.0.1")
HOST_UNDERLAY = IPv4Address("10.251.0.1")
VM_UNDERLAY = IPv4Address("10.251.0.2")
HOST_LAN = IPv4Address("10.251.1.1")
ATK_ADDRESS = IPv4Address("10.251.1.2")
HTTP_PORT = 80
MAX_CONTAINERS = 250

# Prefixes are used verbatim in namespace names, file names and regexes: keep them boring.
_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# The last Lab per prefix whose create() ran in this process, for the test session's leak
# guard: it can then destroy a forgotten lab through the object that holds its lock.
_created: dict[str, Lab] = {}
_created_lock = threading.Lock()


def created_labs() -> list[Lab]:
    """The last Lab created by this process for each prefix (for leak checks)."""
    with _created_lock:
        return list(_created.values())


def created_prefixes() -> frozenset[str]:
    """Prefixes of every Lab created by this process so far (for leak checks)."""
    with _created_lock:
        return frozenset(_created)


def namespace_pattern(prefix: str) -> re.Pattern[str]:
    """Namespaces that belong to the lab `prefix`.

    Only the exact role names match, not `<prefix>-*`: lab "ctunlab" must not sweep away
    "ctunlab-test_x-host", which belongs to another lab whose prefix merely starts the same.
    """
    return re.compile(rf"{re.escape(prefix)}-(?:host|vm|atk|c[0-9]+)")


def lab_namespaces(prefix: str) -> list[str]:
    """Existing namespaces of the lab `prefix` (whoever created them)."""
    try:
        names = os.listdir(netns.NETNS_DIR)
    except FileNotFoundError:
        return []
    pattern = namespace_pattern(prefix)
    return sorted(n for n in names if pattern.fullmatch(n))


def wait_until(
    pred: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll pred() until it returns something truthy, and return that; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Lab:
    """Namespaces `<prefix>-host`, `-vm`, `-c1..cN` and `-atk`, wired like Docker Desktop."""

    stop_timeout: float = 5.0
    """How long destroy() lets processes handle SIGTERM before SIGKILL."""
    lock_timeout: float = 120.0
    """How long create()/destroy() wait for another live process using the same prefix."""

    def __init__(self, prefix: str = "ctunlab", containers: int = 1) -> None:
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"lab prefix must match {_PREFIX_RE.pattern}: {prefix!r}")
        if not 1 <= containers <= MAX_CONTAINERS:
            raise ValueError(f"containers must be 1..{MAX_CONTAINERS}: {containers}")
        self.prefix = prefix
        self.host_ns = f"{prefix}-host"
        self.vm_ns = f"{prefix}-vm"
        self.atk_ns = f"{prefix}-atk"
        self.container_ns: list[str] = [f"{prefix}-c{i}" for i in range(1, containers + 1)]
        self.container_ips: list[IPv4Address] = [
            BRIDGE_ADDRESS + i for i in range(1, containers + 1)
        ]
        self.container_subnet = CONTAINER_SUBNET
        self.host_underlay = HOST_UNDERLAY
        self.vm_underlay = VM_UNDERLAY
        self.atk_address = ATK_ADDRESS
        self._workdir_stem = f"{prefix}.lab."
        # Placeholder until create() makes the real temp dir; nothing is written before that.
        self.workdir = processes.placeholder_workdir(self._workdir_stem)
        self._processes = Processes()
        # Not "<prefix>.lab.*": that pattern is the workdirs, which cleanup deletes wholesale.
        self._lock = PrefixLock(
            Path(tempfile.gettempdir()) / f"{prefix}.lablock",
            busy=f"lab {prefix} is in use by another live process",
        )

        tag = hashlib.sha256(prefix.encode()).hexdigest()[:6]
        # At most 12 characters (vc250-xxxxxx), inside IFNAMSIZ (15).
        self.host_vm_if = f"hv-{tag}"  # host ns, faces the VM
        self.vm_host_if = f"vh-{tag}"  # vm ns, faces the host
        self.host_atk_if = f"ha-{tag}"  # host ns, faces the attacker
        self.atk_host_if = f"ah-{tag}"  # atk ns, faces the host
        self.bridge_if = "br0"
        self.vm_container_ifs = [f"vc{i}-{tag}" for i in range(1, containers + 1)]

    # ---- paths

    @property
    def key_file(self) -> Path:
        return self.workdir / "vm.key"

    @property
    def run_dir(self) -> Path:
        return processes.run_dir(self.workdir)

    @property
    def state_dir(self) -> Path:
        return processes.state_dir(self.workdir)

    def greeting(self, index: int) -> str:
        """The body container `index` (0-based) serves at /."""
        return f"hello from c{index + 1} ({self.container_ips[index]})"

    # ---- life cycle

    def __enter__(self) -> Lab:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def create(self) -> None:
        """Remove whatever an earlier lab with this prefix left, then build a fresh one."""
        self._lock.acquire(self.lock_timeout)
        self._cleanup()
        with _created_lock:
            _created[self.prefix] = self
        try:
            self.workdir = processes.make_workdir(self._workdir_stem)
            self._build_network()
            self._start_http_servers()
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        """Stop every process in the lab, delete its namespaces and its workdir. Idempotent,
        and works whatever a failed create() or a crashed process left with this prefix.
        """
        with self._lock.holding(self.lock_timeout):
            self._cleanup()

    def _cleanup(self) -> None:
        namespaces = lab_namespaces(self.prefix)
        errors = self._processes.kill(namespaces, self.stop_timeout)
        for name in namespaces:
            netns.delete(name)
        still = lab_namespaces(self.prefix)
        if still:
            errors.append(f"could not delete namespaces: {still}")
        # Our own workdir, and any left by a crashed lab with the same prefix.
        processes.remove_workdirs(self._workdir_stem)
        if errors:
            raise RuntimeError(f"lab {self.prefix}: " + "; ".join(errors))

    def _build_network(self) -> None:
        host, vm, atk = self.host_ns, self.vm_ns, self.atk_ns
        for name in (host, vm, atk, *self.container_ns):
            netns.add(name)

        # New namespaces copy init_net's IPv4 settings (net.core.devconf_inherit_init_net=0),
        # so set forwarding explicitly: on in the VM like Docker's VM, off on the host and the
        # attacker so the host can never become a router into the tunnel by accident.
        for name, value in ((host, "0"), (atk, "0"), (vm, "1")):
            netns.call_in(name, _write_sysctl, "net/ipv4/ip_forward", value)

        # host <-> vm underlay; the peer is created straight in the other namespace.
        self._ip(host, "link", "add", self.host_vm_if, "type", "veth",
                 "peer", "name", self.vm_host_if, "netns", vm)  # fmt: skip
        self._ip(host, "addr", "add", f"{HOST_UNDERLAY}/30", "dev", self.host_vm_if)
        self._ip(host, "link", "set", self.host_vm_if, "up")
        self._ip(vm, "addr", "add", f"{VM_UNDERLAY}/30", "dev", self.vm_host_if)
        self._ip(vm, "link", "set", self.vm_host_if, "up")

        # host <-> attacker LAN.
        self._ip(host, "link", "add", self.host_atk_if, "type", "veth",
                 "peer", "name", self.atk_host_if, "netns", atk)  # fmt: skip
        self._ip(host, "addr", "add", f"{HOST_LAN}/30", "dev", self.host_atk_if)
        self._ip(host, "link", "set", self.host_atk_if, "up")
        self._ip(atk, "addr", "add", f"{ATK_ADDRESS}/30", "dev", self.atk_host_if)
        self._ip(atk, "link", "set", self.atk_host_if, "up")
        self._ip(atk, "route", "add", "default", "via", str(HOST_LAN))

        # The docker network: a bridge in the VM, one veth per container named eth0 inside.
        prefixlen = CONTAINER_SUBNET.prefixlen
        self._ip(vm, "link", "add", self.bridge_if, "type", "bridge")
        self._ip(vm, "addr", "add", f"{BRIDGE_ADDRESS}/{prefixlen}", "dev", self.bridge_if)
        self._ip(vm, "link", "set", self.bridge_if, "up")
        for cns, ip, vif in zip(self.container_ns, self.container_ips, self.vm_container_ifs,
                                strict=True):  # fmt: skip
            self._ip(vm, "link", "add", vif, "type", "veth", "peer", "name", "eth0", "netns", cns)
            self._ip(vm, "link", "set", vif, "master", self.bridge_if)
            self._ip(vm, "link", "set", vif, "up")
            self._ip(cns, "addr", "add", f"{ip}/{prefixlen}", "dev", "eth0")
            self._ip(cns, "link", "set", "eth0", "up")
            self._ip(cns, "route", "add", "default", "via", str(BRIDGE_ADDRESS))

    @staticmethod
    def _ip(ns: str, *args: str) -> None:
        result = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ip -n {ns} {' '.join(args)}: {result.stderr.strip()}")

    def _start_http_servers(self) -> None:
        servers: list[tuple[int, subprocess.Popen[bytes]]] = []
        for i, (cns, ip) in enumerate(zip(self.container_ns, self.container_ips, strict=True)):
            root = self.workdir / f"www-c{i + 1}"
            root.mkdir()
            (root / "index.html").write_text(self.greeting(i) + "\n", encoding="utf-8")
            argv = [sys.executable, "-m", "http.server", str(HTTP_PORT),
                    "--bind", str(ip), "--directory", str(root)]  # fmt: skip
            servers.append((i, self.spawn(cns, argv, f"http-c{i + 1}")))
        # Start them all first and wait afterwards: the interpreters boot in parallel.
        for i, proc in servers:
            self.wait_until(
                functools.partial(self._serving, i, proc),
                timeout=15,
                what=f"the HTTP server in {self.container_ns[i]} to accept connections",
            )

    def _serving(self, index: int, proc: subprocess.Popen[bytes]) -> bool:
        if proc.poll() is not None:
            name = f"http-c{index + 1}"
            raise RuntimeError(f"{name} exited with {proc.returncode}: {self.log(name)}")
        address = (str(self.container_ips[index]), HTTP_PORT)
        try:
            sock = netns.call_in(
                self.container_ns[index], socket.create_connection, address, timeout=1
            )
        except OSError:
            return False
        sock.close()
        return True

    # ---- processes

    def spawn(
        self, ns: str, argv: list[str], name: str, env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> subprocess.Popen[bytes]:
        """Run argv inside `ns`, output to workdir/<name>.log (replacing an older one)."""
        return self._processes.spawn(self.workdir, ns, argv, name, env, stdin)

    def start_daemon(
        self, *extra_args: str, name: str = "daemon", python: str | None = None
    ) -> subprocess.Popen[bytes]:
        """Start the daemon in the host namespace; `python` picks the interpreter (and so the
        installed ctun and plugins), e.g. a venv's. None: sys.executable, read at call time
        (not bound when this module loads), so tests can stand something in for it."""
        # --no-docker: the lab's "VM" has no engine; the machine's own one is not ours.
        argv = [python or sys.executable, "-m", "ctun", "up", "--no-ui", "--no-docker",
                "--listen", str(HOST_UNDERLAY), "--route", str(CONTAINER_SUBNET),
                "--key-file", str(self.key_file), *offload_args(), *extra_args]  # fmt: skip
        return self.spawn(self.host_ns, argv, name)

    def start_agent(
        self,
        *extra_args: str,
        name: str = "agent",
        key_timeout: float = 10.0,
        python: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start the agent in the VM once the daemon has written the shared key file; `python`
        as for start_daemon()."""
        try:
            self.wait_until(self.key_file.exists, key_timeout, what=f"{self.key_file}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; daemon log:\n{self.log('daemon')}") from None
        argv = [python or sys.executable, "-m", "ctun", "vm", "--host", str(HOST_UNDERLAY),
                "--key-file", str(self.key_file), *offload_args(), *extra_args]  # fmt: skip
        return self.spawn(self.vm_ns, argv, name)

    def log(self, name: str) -> str:
        """What process `name` has written so far ("" if it never started)."""
        return processes.read_log(self.workdir, name)

    stop = staticmethod(stop)

    wait_until = staticmethod(wait_until)

    # ---- probes

    @staticmethod
    def http_get(ns: str, url: str, timeout: float = 2.0) -> tuple[int, str] | str:
        """GET `url` from inside `ns`: (status, body), or the error as text."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or HTTP_PORT
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        deadline = time.monotonic() + timeout
        try:
            # Only the socket has to be born in the namespace; it stays there afterwards.
            sock = netns.call_in(ns, socket.create_connection, (host, port), timeout=timeout)
            with sock:
                request = f"GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                sock.sendall(request.encode("ascii"))
                chunks: list[bytes] = []
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError("timed out reading the response")
                    sock.settimeout(remaining)
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        fields = status_line.split()
        if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
            return f"bad HTTP response: {status_line!r}"
        return int(fields[1]), body.decode("utf-8", errors="replace")

    @staticmethod
    def ping(
        ns: str,
        dst: str | IPv4Address,
        count: int = 1,
        size: int = 56,
        df: bool = False,
        timeout: float = 2,
    ) -> subprocess.CompletedProcess[str]:
        """iputils ping from `ns`; `timeout` is how long to wait for each reply."""
        argv = ["ping", "-n", "-q", "-c", str(count), "-s", str(size), "-W", str(timeout)]
        if count > 1:
            argv += ["-i", "0.2"]  # root may ping faster than the 1 s default
        if df:
            argv += ["-M", "do"]  # forbid fragmentation: oversize packets must fail
        argv.append(str(dst))
        return netns.run(ns, argv, check=False, timeout=count * 0.2 + timeout + 10)


OFFLOAD_ENV = "CTUN_LAB_OFFLOAD"


def offload_args() -> tuple[str, ...]:
    """`CTUN_LAB_OFFLOAD=off` runs every lab tunnel without kernel offloads, so the whole
    end-to-end suite can be run once each way (./dev test does)."""
    return ("--no-offload",) if os.environ.get(OFFLOAD_ENV) == "off" else ()


def _write_sysctl(key: str, value: str) -> None:
    # /proc/sys/net resolves against the network namespace of the thread that opens it.
    with open(f"/proc/sys/{key}", "w", encoding="ascii") as f:
        f.write(value)
