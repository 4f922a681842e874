"""The peer store: accessors made by `ctun peer add`, kept in STATE_DIR/peers.toml.

The store is ctun's own file, separate from the user's config: the command line adds and
removes entries without ever rewriting a file someone edits by hand. It holds secrets, so
it is written like a key file (mode 0600) and refused when other users can read it. Every
change rewrites it whole through a temporary file and a rename, so a reader (the daemon's
watcher) sees the old store or the new one, never half of one.

    [peers.alice]
    ip = "192.168.251.3"
    key = "BASE64 (44 characters)"
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import tomllib
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from .config import PeerConfig
from .keys import ConfigError, decode_key, encode_key, os_reason

STORE_NAME = "peers.toml"
NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # as [peers.NAME] in the config
RESERVED_NAMES = frozenset({"vm", "host"})  # the agent's peer; the accessor's name for us
_ENTRY_KEYS = frozenset({"ip", "key"})
_READ_LIMIT = 1 << 20  # a store of a thousand peers is ~100 KB; more is not our file
_HEADER = ("# Peers made by `ctun peer add`. Change it with `ctun peer add` / `ctun peer rm`;\n"
           "# it holds their secrets: keep it private (mode 0600).\n")

try:  # advisory lock between concurrent `ctun peer` commands; Windows has none to offer
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def store_path(state_dir: Path) -> Path:
    return state_dir / STORE_NAME


def load(state_dir: Path) -> list[PeerConfig]:
    """The stored peers (origin "store"), in file order; [] when there is no store yet.
    A bad store is a ConfigError: one line naming the file and what to fix."""
    path = store_path(state_dir)
    text = _read(path)
    if text is None:
        return []
    return _parse(path, text)


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"peer name {name!r}: use a lowercase letter, then up to 31 of "
                          f'a-z, 0-9, "_" and "-", like alice')
    if name in RESERVED_NAMES:
        raise ConfigError(f"peer name {name!r} is reserved; choose another")


def reserved_addresses(network: IPv4Network, host: IPv4Address, vm: IPv4Address,
                       taken: Iterable[IPv4Address | None]) -> set[IPv4Address]:
    """Addresses of `network` no new accessor may get."""
    reserved = {network.network_address, network.broadcast_address, host, vm}
    reserved.update(ip for ip in taken if ip is not None)
    return reserved


def check_ip(ip: IPv4Address, network: IPv4Network, reserved: set[IPv4Address]) -> None:
    if ip not in network:
        raise ConfigError(f"--ip {ip}: outside the tunnel network {network}; pick an address "
                          f"in it, or leave --ip out")
    if ip in reserved:
        raise ConfigError(f"--ip {ip}: already taken (the network or broadcast address, the "
                          f"host's or the VM's address, or another peer's); leave --ip out "
                          f"to get a free one")


def next_free(network: IPv4Network, host: IPv4Address, vm: IPv4Address,
              reserved: set[IPv4Address]) -> IPv4Address:
    """The first free address after the host's and the VM's (docker-connector's layout puts
    them at the start), else the first free one below them."""
    floor = max(host, vm)
    candidates = [a for a in network.hosts() if a not in reserved]
    above = [a for a in candidates if a > floor]
    if above or candidates:
        return (above or candidates)[0]
    raise ConfigError(f"no free address left in the tunnel network {network}; remove a peer "
                      f"(ctun peer rm NAME) or widen the network (addr)")


def new_key() -> bytes:
    return secrets.token_bytes(32)


def add(state_dir: Path, name: str, key: bytes, network: IPv4Network, host: IPv4Address,
        vm: IPv4Address, taken: Iterable[IPv4Address | None] = (),
        ip: IPv4Address | None = None) -> PeerConfig:
    """Add a peer with address `ip`, or the next free one when None. `taken`: addresses of
    peers outside the store (the config's). Checked and written under the store's lock, so
    two `ctun peer add` at once cannot pick the same address or lose an entry."""
    check_name(name)
    path = store_path(state_dir)
    with _locked(path):
        peers = load(state_dir)
        if any(other.name == name for other in peers):
            raise ConfigError(f"peer {name!r} exists already ({path}); remove it first "
                              f"(ctun peer rm {name}) or choose another name")
        reserved = reserved_addresses(network, host, vm, [*taken, *(p.ip for p in peers)])
        if ip is None:
            ip = next_free(network, host, vm, reserved)
        else:
            check_ip(ip, network, reserved)
        peer = PeerConfig(name, key, (), ip=ip, origin="store")
        _write(path, [*peers, peer])
    return peer


def remove(state_dir: Path, name: str) -> bool:
    """Delete a peer from the store; False when it was not there."""
    path = store_path(state_dir)
    with _locked(path):
        peers = load(state_dir)
        kept = [p for p in peers if p.name != name]
        if len(kept) == len(peers):
            return False
        _write(path, kept)
    return True


# --- the file ------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        # O_NONBLOCK: a FIFO put in its place must fail the regular-file check, not hang.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the peer store: {os_reason(exc)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: the peer store is not a regular file; move it away")
        if st.st_mode & 0o077 and os.name != "nt":
            raise ConfigError(f"{path}: the peer store holds keys but other users can access "
                              f"it (mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
        data = os.read(fd, _READ_LIMIT + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the peer store: {os_reason(exc)}") from None
    finally:
        os.close(fd)
    if len(data) > _READ_LIMIT:
        raise ConfigError(f"{path}: the peer store is over {_READ_LIMIT} bytes; not ours?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the peer store is not UTF-8 (byte {exc.start})") from None


def _parse(path: Path, text: str) -> list[PeerConfig]:
    fix = "fix it, or remove the entry (ctun peer rm NAME) and add it again"
    try:
        doc = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: invalid TOML in the peer store: {exc}") from None
    extra = [k for k in doc if k != "peers"]
    if extra:
        raise ConfigError(f"{path}: unknown key {extra[0]!r} in the peer store (only "
                          f"[peers.NAME] tables belong there)")
    tables = doc.get("peers", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: peers must be tables, one per peer: [peers.NAME]")
    peers: list[PeerConfig] = []
    seen_ips: dict[IPv4Address, str] = {}
    for name, table in tables.items():
        where = f"{path}: [peers.{name}]"
        try:
            check_name(name)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if not isinstance(table, dict) or set(table) != _ENTRY_KEYS:
            raise ConfigError(f'{where}: needs exactly ip = "A.B.C.D" and key = "BASE64"; '
                              f"{fix}")
        raw_ip = table["ip"]
        try:
            ip = IPv4Address(raw_ip if isinstance(raw_ip, str) else "")
        except ValueError:
            raise ConfigError(f"{where}: ip must be an IPv4 address like "
                              f'"192.168.251.3"; {fix}') from None
        if ip in seen_ips:
            raise ConfigError(f"{where}: ip {ip} is also peer {seen_ips[ip]!r}'s; {fix}")
        seen_ips[ip] = name
        if not isinstance(table["key"], str):
            raise ConfigError(f"{where}: key must be a string of base64; {fix}")
        key = decode_key(table["key"], f"{where}.key", fix)
        peers.append(PeerConfig(name, key, (), ip=ip, origin="store"))
    return peers


def _render(peers: list[PeerConfig]) -> str:
    blocks = [_HEADER]
    for p in peers:
        blocks.append(f'\n[peers.{p.name}]\nip = "{p.ip}"\nkey = "{encode_key(p.key)}"\n')
    return "".join(blocks)


def _write(path: Path, peers: list[PeerConfig]) -> None:
    """Replace the store with `peers`: a private temporary file, fsynced, renamed over it."""
    data = _render(peers).encode("utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        _private_dir(path.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o600)
        try:
            if hasattr(os, "fchmod"):  # the umask cannot widen 0600, but may narrow it
                os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the peer store: {os_reason(exc)}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _private_dir(directory: Path) -> None:
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the store's lock file: two `ctun peer add` at once must not both pick the same
    free address or lose each other's entry."""
    if fcntl is None:
        yield
        return
    try:
        _private_dir(path.parent)
        fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot lock the peer store: {os_reason(exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
