"""The harness for tests against a real Docker engine.

    host ns `<prefix>-host` (10.252.0.2/30) ── veth ── root ns (10.252.0.1/30): dockerd, bridges
                                                         ├── br-… user network → containers
                                                         └── ctun's agent container (net=host)

This machine's root network namespace plays the Docker VM: dockerd lives there, and so do its
bridges and the agent container ctun starts (`--net host`). A "host" namespace plays the
developer's machine: it reaches the root namespace through one veth and has no route to any
Docker subnet, so containers are unreachable from it until the tunnel is up. The ctun daemon
runs there and still talks to dockerd through /var/run/docker.sock, a file that every network
namespace can see.

Every Docker object a test makes carries the label `io.ctun.test=<prefix>`; a DockerLab removes
exactly those (and never anything unlabelled: ctun must clean up its own agent container, and
the tests check that it does).

The docker SDK is imported lazily, so this module (and the test suite's conftest) loads on a
machine without it; docker_missing() then says what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator, Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from . import netns, processes
from .lock import PrefixLock
from .processes import Processes, pid_alive, stop
from .topology import _PREFIX_RE, Lab, _write_sysctl, wait_until

# The docker SDK ships no type information: its objects are Any here, named for the reader.
Client = Any
Network = Any
Container = Any

LABEL = "io.ctun.test"
BUSYBOX_IMAGE = "ctun-test/busybox:1"
PYTHON_BASE_IMAGE = "ctun-test/bookworm-python:1"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DOCKER_SOCKET = Path("/var/run/docker.sock")
DOCKER_PIDFILE = Path("/var/run/docker.pid")
DOCKERD_LOG = Path("/tmp/ctun-dockerd.log")

VM_ADDRESS = IPv4Address("10.252.0.1")  # root namespace side of the veth: "the Docker VM"
HOST_ADDRESS = IPv4Address("10.252.0.2")  # host namespace side: where the ctun daemon listens
UNDERLAY = IPv4Network("10.252.0.0/30")
TUNNEL_PORT = 2511
HTTP_PORT = 80

BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "httpd", "ping", "ip", "cat", "echo", "sleep", "hostname", "wget")
# busybox-static's wget segfaults on name lookups (static glibc NSS): give it IP addresses only.
HTTP_COMMAND = [
    "sh", "-c",
    "echo hello from $(hostname) > /www/index.html && exec httpd -f -p 80 -h /www",
]  # fmt: skip


def _sdk() -> Any:
    """The docker SDK module (imported on first use; see docker_missing())."""
    import docker

    return docker


def _errors() -> Any:
    import docker.errors

    return docker.errors


# ---- prerequisites


def docker_missing() -> str | None:
    """Why Docker tests cannot run here, or None when they can. Starts dockerd if needed."""
    if importlib.util.find_spec("docker") is None:
        return "needs the docker Python SDK (pip install docker)"
    if shutil.which("dockerd") is None:
        return "needs docker.io (dockerd)"
    if shutil.which("debootstrap") is None:
        return "needs debootstrap"
    reason = busybox_missing()
    if reason is not None:
        return reason
    try:
        ensure_dockerd()
    except Exception as exc:  # whatever the engine says, it is the reason to report
        return f"dockerd did not start: {exc}"
    return None


def busybox_missing() -> str | None:
    """Why /bin/busybox cannot be the whole of a container image, or None."""
    hint = "apt-get install busybox-static"
    if not BUSYBOX.is_file():
        return f"needs {BUSYBOX} ({hint})"
    if _elf_interpreter(BUSYBOX):
        return f"needs a statically linked {BUSYBOX} ({hint})"
    return None


def _elf_interpreter(path: Path) -> bool:
    """True if the ELF file `path` asks for a program interpreter (is dynamically linked)."""
    with open(path, "rb") as f:
        ident = f.read(16)
        if ident[:4] != b"\x7fELF":
            return False  # not ELF (a script?): let the image check find out
        is64, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
        f.seek(0)
        header = f.read(64)
        if is64:
            (phoff,) = struct.unpack_from(order + "Q", header, 0x20)
            phentsize, phnum = struct.unpack_from(order + "HH", header, 0x36)
        else:
            (phoff,) = struct.unpack_from(order + "I", header, 0x1C)
            phentsize, phnum = struct.unpack_from(order + "HH", header, 0x2A)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            (p_type,) = struct.unpack(order + "I", f.read(4))
            if p_type == 3:  # PT_INTERP
                return True
    return False


# ---- the engine


class Dockerd:
    """The Docker engine on this machine: whoever started it, this can stop and restart it.

    A restart runs dockerd again with the command line of the engine it stopped (read from
    /proc), in a session of its own, logging to DOCKERD_LOG; the new engine outlives the test
    process.
    """

    start_timeout: float = 30.0
    stop_timeout: float = 60.0
    """dockerd stops every container before it exits (10 s grace each, in parallel) and
    allows itself 15 s for that; the rest is margin."""

    def __init__(self) -> None:
        self.argv: list[str] = ["dockerd"]
        self.started_by_us = False
        """True if the engine did not answer when this process first looked: then
        stop_if_we_started() stops it at the end, else it is left running."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: Client = None
        self._lock = threading.Lock()

    # -- queries

    def client(self) -> Client:
        """A docker SDK client (the same one until the engine is restarted)."""
        with self._lock:
            if self._client is None:
                self._client = _sdk().from_env(version="auto")
            return self._client

    def answering(self, timeout: float = 2.0) -> bool:
        """True if the engine answers a ping on its socket right now (a fresh connection)."""
        try:
            client = _sdk().from_env(version="auto", timeout=timeout)
        except Exception:  # DockerException, or connection errors from the version probe
            return False
        try:
            return bool(client.ping())
        except Exception:
            return False
        finally:
            client.close()

    def pid(self) -> int | None:
        """The engine's pid from DOCKER_PIDFILE, if it names a live process."""
        try:
            pid = int(DOCKER_PIDFILE.read_text(encoding="ascii").strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    # -- life cycle

    def start(self) -> None:
        """Start dockerd unless the engine answers already; return once it answers."""
        if self.answering():
            return
        self._drop_client()
        with open(DOCKERD_LOG, "ab") as log:
            offset = log.tell()
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C at the terminal must not reach it
            )
        proc = self._proc

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{' '.join(self.argv)} exited with {proc.returncode}: "
                    f"{_log_tail(DOCKERD_LOG, offset)}"
                )
            return self.answering()

        try:
            wait_until(up, self.start_timeout, interval=0.2, what="dockerd to answer")
        except AssertionError as exc:
            raise RuntimeError(f"{exc}; {DOCKERD_LOG}: {_log_tail(DOCKERD_LOG, offset)}") from None

    def stop(self) -> None:
        """SIGTERM the engine, wait for it to exit and for its socket to stop answering."""
        pid = self.pid()
        if pid is None:
            if self.answering():
                raise RuntimeError(f"dockerd answers but {DOCKER_PIDFILE} names no live process")
            return
        self.argv = _restartable_argv(pid)
        self._drop_client()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        ours = self._proc if self._proc is not None and self._proc.pid == pid else None
        if ours is not None:
            try:
                ours.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"dockerd ({pid}) outlived SIGTERM by {self.stop_timeout}s"
                ) from None
            self._proc = None
        else:
            wait_until(lambda: not pid_alive(pid), self.stop_timeout, interval=0.1,
                       what=f"dockerd ({pid}) to exit")  # fmt: skip
        wait_until(lambda: not self.answering(timeout=0.5), self.start_timeout, interval=0.1,
                   what="the docker socket to stop answering")  # fmt: skip

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop_if_we_started(self) -> None:
        """For the end of a test session: stop the engine only if it was not running before."""
        if self.started_by_us:
            self.stop()
            self.started_by_us = False

    def _drop_client(self) -> None:
        with self._lock:
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()
                self._client = None


def _restartable_argv(pid: int) -> list[str]:
    """The command line of the running dockerd `pid`, to start its successor the same way."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ["dockerd"]
    argv = [a.decode() for a in raw.split(b"\0") if a]
    # Socket activation (systemd's `-H fd://`) cannot be repeated from here.
    if not argv or any("fd://" in a for a in argv):
        return ["dockerd"]
    return argv


def _log_tail(path: Path, offset: int = 0, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return text[-limit:].strip() or "(empty log)"


_dockerd: Dockerd | None = None
_dockerd_lock = threading.Lock()


def ensure_dockerd() -> Dockerd:
    """The engine, answering: started (and remembered as ours) if it was not running."""
    global _dockerd
    with _dockerd_lock:
        if _dockerd is None:
            engine = Dockerd()
            if not engine.answering():
                engine.started_by_us = True
                engine.start()
            _dockerd = engine
        else:
            _dockerd.start()  # no-op while it answers; after a test stopped it, start again
        return _dockerd


def stop_if_we_started() -> None:
    """Session teardown: stop dockerd if this process started it (see ensure_dockerd())."""
    if _dockerd is not None:
        _dockerd.stop_if_we_started()


# ---- images


def image_exists(client: Client, tag: str) -> bool:
    try:
        client.images.get(tag)
    except _errors().ImageNotFound:
        return False
    return True


def _split_tag(tag: str) -> tuple[str, str]:
    repository, sep, version = tag.rpartition(":")
    if not sep or "/" in version:
        return tag, "latest"
    return repository, version


def ensure_busybox_image(client: Client, tag: str = BUSYBOX_IMAGE) -> str:
    """`tag`: /bin/busybox, its applet links and /www, built from this machine's busybox-static
    (once: an existing tag is reused)."""
    if image_exists(client, tag):
        return tag
    reason = busybox_missing()
    if reason is not None:
        raise RuntimeError(reason)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, mode in (("bin", 0o755), ("www", 0o755), ("tmp", 0o1777)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        tar.add(str(BUSYBOX), arcname="bin/busybox")
        for applet in BUSYBOX_APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
    repository, version = _split_tag(tag)
    client.api.import_image_from_data(
        buf.getvalue(), repository=repository, tag=version,
        changes=["ENV PATH=/bin", 'CMD ["sh"]'],
    )  # fmt: skip
    return tag


def http_container(
    client: Client,
    network: Network,
    name: str,
    labels: Mapping[str, str],
    image: str = BUSYBOX_IMAGE,
    wait_http: bool = True,
    timeout: float = 20.0,
    **run_kwargs: Any,
) -> Container:
    """Run busybox httpd as `name` (also its hostname) on `network`; it serves
    "hello from <name>" at / on port 80. Returns once it runs and, with `wait_http`, accepts
    connections from the calling thread's namespace (the root namespace, where dockerd's
    bridges are). Extra keyword arguments go to containers.run (e.g. restart_policy)."""
    run_kwargs.setdefault("stop_signal", "SIGKILL")  # httpd as PID 1 ignores SIGTERM
    container = client.containers.run(
        image, HTTP_COMMAND, name=name, hostname=name, network=network.name,
        labels=dict(labels), detach=True, **run_kwargs,
    )  # fmt: skip

    def running() -> bool:
        container.reload()
        if container.status in ("exited", "dead"):
            logs = container.logs().decode(errors="replace")
            raise RuntimeError(f"container {name} {container.status}: {logs}")
        return bool(container.status == "running")

    wait_until(running, timeout, what=f"container {name} to run")
    if wait_http:
        address = (str(container_ip(container, network)), HTTP_PORT)
        wait_until(functools.partial(_accepts, address), timeout,
                   what=f"httpd in {name} to accept connections")  # fmt: skip
    return container


def container_ip(container: Container, network: Network) -> IPv4Address:
    """The address of `container` on `network`."""
    container.reload()
    return IPv4Address(container.attrs["NetworkSettings"]["Networks"][network.name]["IPAddress"])


def _accepts(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=0.5).close()
    except OSError:
        return False
    return True


def ensure_python_base_image(
    client: Client, tag: str = PYTHON_BASE_IMAGE, mirror: str = DEBIAN_MIRROR
) -> str:
    """`tag`: Debian bookworm (minbase) with python3, python3-venv, iptables and
    ca-certificates, made by debootstrap (about a minute) unless the tag exists already.
    The base of ctun's agent image."""
    if image_exists(client, tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="ctun-bookworm.") as tmp:
        rootfs = Path(tmp) / "rootfs"
        try:
            _debootstrap(rootfs, mirror, Path(tmp) / "debootstrap.log")
            _import_rootfs(client, rootfs, tag, changes=[f"ENV PATH={BASE_PATH}"])
        finally:
            _unmount_under(rootfs)  # a failed debootstrap may leave /proc mounted inside
    try:
        client.containers.run(
            tag, ["sh", "-c", "python3 -m venv /tmp/venv && /tmp/venv/bin/python -c "
                              "'import venv' && iptables --version"],
            remove=True, labels={LABEL: "image-check"},
        )  # fmt: skip
    except Exception as exc:
        with contextlib.suppress(Exception):
            client.images.remove(tag, force=True)  # rebuild next time rather than reuse it
        raise RuntimeError(f"{tag} is unusable (removed): {exc}") from exc
    return tag


def _debootstrap(rootfs: Path, mirror: str, log_path: Path) -> None:
    argv = ["debootstrap", "--variant=minbase",
            "--include=python3,python3-venv,iptables,ca-certificates",
            "bookworm", str(rootfs), mirror]  # fmt: skip
    with open(log_path, "wb") as log:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, check=False)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"debootstrap exited with {result.returncode}: {_log_tail(log_path)}")
    # Downloaded packages and package lists are half the size and of no use in the image.
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (rootfs / leftover).glob("*"):
            if path.is_file():
                path.unlink()


def _import_rootfs(client: Client, rootfs: Path, tag: str, changes: list[str]) -> None:
    """`docker import` the directory `rootfs` as `tag`, streamed through tar."""
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", "-", "."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert tar.stdout is not None

    def chunks(stream: IO[bytes]) -> Iterator[bytes]:
        while chunk := stream.read(1 << 20):
            yield chunk

    repository, version = _split_tag(tag)
    try:
        # A client without a read timeout: dockerd answers only once the layer is stored.
        importer = _sdk().from_env(version="auto", timeout=600)
        try:
            importer.api.import_image(src=chunks(tar.stdout), repository=repository,
                                      tag=version, changes=changes, stream_src=True)  # fmt: skip
        finally:
            importer.close()
    finally:
        tar.stdout.close()
        _, err = tar.communicate()
    if tar.returncode != 0:
        with contextlib.suppress(Exception):
            client.images.remove(tag, force=True)
        raise RuntimeError(f"tar of {rootfs} failed: {err.decode(errors='replace')}")


def _unmount_under(path: Path) -> None:
    prefix = str(path)
    with open("/proc/self/mounts", encoding="utf-8") as f:
        points = [line.split()[1] for line in f]
    inside = [p for p in points if p == prefix or p.startswith(prefix + "/")]
    for point in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


# ---- iptables


_CHAIN_COUNTERS = re.compile(r"\s*\[\d+:\d+\]$")
_RULE_COUNTERS = re.compile(r"^\[\d+:\d+\]\s*")


def iptables_dump() -> str:
    """`iptables-save` of the calling thread's namespace (the root namespace from the main
    thread) for filter, nat and raw, without counters or comment/timestamp lines: equal
    before and after something that leaves the rules as it found them."""
    lines: list[str] = []
    for table in ("filter", "nat", "raw"):
        result = subprocess.run(["iptables-save", "-t", table], capture_output=True,
                                text=True, check=False)  # fmt: skip
        if result.returncode != 0:
            lines.append(f"# {table}: iptables-save failed: {result.stderr.strip()}")
            continue
        for line in result.stdout.splitlines():
            if not line.startswith("#"):
                lines.append(_RULE_COUNTERS.sub("", _CHAIN_COUNTERS.sub("", line)))
    return "\n".join(lines) + "\n"


# ---- the lab


_created: dict[str, DockerLab] = {}
_created_lock = threading.Lock()


def created_docker_labs() -> list[DockerLab]:
    """The last DockerLab created by this process for each prefix (for leak checks)."""
    with _created_lock:
        return list(_created.values())


class DockerLab:
    """A host namespace wired to the root namespace (the "VM"), and labelled Docker objects.

    The underlay addresses are fixed, so one DockerLab at a time runs on a machine: create()
    waits for a lock held until destroy(). Under that lock anything left with this prefix is
    debris of a crash, which create() removes.
    """

    stop_timeout: float = 5.0
    """How long destroy() lets processes handle SIGTERM before SIGKILL."""
    lock_timeout: float = 300.0
    """How long create() waits for a DockerLab of another process to be destroyed."""

    wait_until = staticmethod(wait_until)

    def __init__(self, prefix: str = "ctundk", dockerd: Dockerd | None = None) -> None:
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"lab prefix must match {_PREFIX_RE.pattern}: {prefix!r}")
        self.prefix = prefix
        self.host_ns = f"{prefix}-host"
        self.vm_address = VM_ADDRESS
        self.host_address = HOST_ADDRESS
        self.labels: dict[str, str] = {LABEL: prefix}
        tag = hashlib.sha256(prefix.encode()).hexdigest()[:6]
        self.vm_if = f"dkv-{tag}"  # root namespace, faces the host
        self.host_if = f"dkh-{tag}"  # host namespace, faces the VM
        self._workdir_stem = f"{prefix}.dlab."
        self.workdir = processes.placeholder_workdir(self._workdir_stem)
        self._dockerd = dockerd
        self._processes = Processes()
        # One lock for every prefix: the underlay addresses in the root namespace are shared.
        self._lock = PrefixLock(
            Path(tempfile.gettempdir()) / "ctun-dockerlab.lock", busy="another DockerLab is alive"
        )

    # -- paths and docker

    @property
    def run_dir(self) -> Path:
        return processes.run_dir(self.workdir)

    @property
    def state_dir(self) -> Path:
        return processes.state_dir(self.workdir)

    @property
    def dockerd(self) -> Dockerd:
        if self._dockerd is None:
            self._dockerd = ensure_dockerd()
        return self._dockerd

    def client(self) -> Client:
        return self.dockerd.client()

    # -- life cycle

    def __enter__(self) -> DockerLab:
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
        """Remove what a crashed lab with this prefix left, then build the namespace."""
        self._lock.acquire(self.lock_timeout)
        try:
            self._cleanup()
        except BaseException:
            self._lock.release()
            raise
        with _created_lock:
            _created[self.prefix] = self
        try:
            self.workdir = processes.make_workdir(self._workdir_stem)
            self._build_network()
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        """Stop the lab's processes, remove its labelled containers and networks (force), its
        namespace, veth and workdir. Idempotent; leaves unlabelled Docker objects alone."""
        with self._lock.holding(self.lock_timeout):
            self._cleanup()

    def leftovers(self) -> list[str]:
        """What of this lab exists now (for leak checks): namespace, link, Docker objects."""
        found = [f"namespace {self.host_ns}"] if netns.exists(self.host_ns) else []
        if _link_exists(self.vm_if):
            found.append(f"link {self.vm_if}")
        client = self.client()
        found += [f"container {c.name}" for c in self._labelled(client.containers, all=True)]
        found += [f"network {n.name}" for n in self._labelled(client.networks)]
        return found

    def _labelled(self, collection: Any, **kwargs: Any) -> list[Any]:
        return list(collection.list(filters={"label": f"{LABEL}={self.prefix}"}, **kwargs))

    def _cleanup(self) -> None:
        namespaces = [self.host_ns] if netns.exists(self.host_ns) else []
        errors = self._processes.kill(namespaces, self.stop_timeout)
        try:
            self._remove_docker_objects()
        except Exception as exc:
            errors.append(f"docker: {exc}")
        # The veth first: deleting one end removes both at once, whereas a deleted namespace
        # takes its links with it only later, in the kernel's own time.
        if _link_exists(self.vm_if):
            subprocess.run(["ip", "link", "del", self.vm_if], capture_output=True, check=False)
            if _link_exists(self.vm_if):
                errors.append(f"could not delete link {self.vm_if}")
        netns.delete(self.host_ns)
        if netns.exists(self.host_ns):
            errors.append(f"could not delete namespace {self.host_ns}")
        processes.remove_workdirs(self._workdir_stem)
        if errors:
            raise RuntimeError(f"docker lab {self.prefix}: " + "; ".join(errors))

    def _remove_docker_objects(self) -> None:
        client = self.client()
        not_found = _errors().NotFound
        for container in self._labelled(client.containers, all=True):
            with contextlib.suppress(not_found):  # e.g. an --rm container that just went
                container.remove(force=True, v=True)
        for network in self._labelled(client.networks):
            with contextlib.suppress(not_found):
                network.remove()

    def _build_network(self) -> None:
        holder = _address_holder(self.vm_address)
        if holder is not None:
            raise RuntimeError(
                f"{self.vm_address} is already on {holder} in the root namespace "
                f"(left by a lab with another prefix?): delete it first"
            )
        netns.add(self.host_ns)
        # Like lab.topology: a host is no router, whatever the root namespace's setting.
        netns.call_in(self.host_ns, _write_sysctl, "net/ipv4/ip_forward", "0")
        prefixlen = UNDERLAY.prefixlen
        _ip("link", "add", self.vm_if, "type", "veth",
            "peer", "name", self.host_if, "netns", self.host_ns)  # fmt: skip
        _ip("addr", "add", f"{self.vm_address}/{prefixlen}", "dev", self.vm_if)
        _ip("link", "set", self.vm_if, "up")
        _ip("-n", self.host_ns, "addr", "add", f"{self.host_address}/{prefixlen}",
            "dev", self.host_if)  # fmt: skip
        _ip("-n", self.host_ns, "link", "set", self.host_if, "up")

    # -- docker objects (labelled, named `<prefix>-<name>`)

    def network(self, name: str, subnet: str | IPv4Network) -> Network:
        """A labelled bridge network `<prefix>-<name>` with `subnet`."""
        sdk = _sdk()
        ipam = sdk.types.IPAMConfig(pool_configs=[sdk.types.IPAMPool(subnet=str(subnet))])
        return self.client().networks.create(
            f"{self.prefix}-{name}", driver="bridge", ipam=ipam, labels=dict(self.labels)
        )

    def container(self, network: Network, name: str, **run_kwargs: Any) -> Container:
        """A labelled busybox HTTP container `<prefix>-<name>` on `network` (see
        http_container), serving "hello from <prefix>-<name>"."""
        return http_container(self.client(), network, f"{self.prefix}-{name}", self.labels,
                              **run_kwargs)  # fmt: skip

    # -- processes in the host namespace

    def spawn(
        self, argv: list[str], name: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Run argv in the host namespace, output to workdir/<name>.log (like Lab.spawn)."""
        return self._processes.spawn(self.workdir, self.host_ns, argv, name, env)

    def log(self, name: str) -> str:
        """What process `name` has written so far ("" if it never started)."""
        return processes.read_log(self.workdir, name)

    stop = staticmethod(stop)

    # -- probes from the host namespace

    def http_get(self, url: str, timeout: float = 2.0) -> tuple[int, str] | str:
        """GET `url` from the host namespace: (status, body), or the error as text."""
        return Lab.http_get(self.host_ns, url, timeout)

    def ping(
        self,
        dst: str | IPv4Address,
        count: int = 1,
        size: int = 56,
        df: bool = False,
        timeout: float = 2,
    ) -> subprocess.CompletedProcess[str]:
        """iputils ping from the host namespace."""
        return Lab.ping(self.host_ns, dst, count, size, df, timeout)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _link_exists(name: str) -> bool:
    """Whether link `name` exists in the calling thread's (the root) namespace."""
    return os.path.exists(f"/sys/class/net/{name}")


def _address_holder(address: IPv4Address) -> str | None:
    """The root namespace link that has `address`, if any."""
    result = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True,
                            text=True, check=True)  # fmt: skip
    for link in json.loads(result.stdout or "[]"):
        for info in link.get("addr_info", []):
            if info.get("local") == str(address):
                return str(link.get("ifname"))
    return None
