"""Configuration: a TOML file plus command-line overrides, validated into frozen objects.

Everything the engine needs is checked here, up front, so that a bad setting stops ctun
before it touches an interface or a route. Every problem is a ConfigError whose one-line
message says where the value came from (`--mtu 99999: ...` or `FILE: mtu = 99999: ...`),
what is wrong with it and what to do instead.

Precedence, highest first: command-line flags, the config file, built-in defaults
(docker-connector's addressing: the VM side takes `addr`, the host side the next address).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shlex
import stat
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time
from ipaddress import AddressValueError, IPv4Address, IPv4Interface, IPv4Network, ip_address
from pathlib import Path
from typing import Any, Literal

from .contracts import Endpoint
from .docker_policy import DEFAULT_AGENT_BASE, DockerConfig, Selector
from .keys import ConfigError, decode_key, encode_key, load_or_create_key, read_key

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_STATE_DIR",
    "AgentConfig",
    "ConfigError",
    "ExposeConfig",
    "HostConfig",
    "HostsSource",
    "Link",
    "PeerConfig",
    "ProxyConfig",
    "Timers",
    "TunnelConfig",
    "decode_key",
    "default_state_dir",
    "encode_key",
    "load_agent_config",
    "load_host_config",
    "load_or_create_key",
    "read_key",
]

if sys.platform == "win32":  # no /etc or /var there: the machine-wide data folder
    _PROGRAM_DATA = Path(os.environ.get("PROGRAMDATA", "C:\\ProgramData")) / "ctun"
    DEFAULT_CONFIG_PATH = _PROGRAM_DATA / "ctun.toml"
    DEFAULT_STATE_DIR = _PROGRAM_DATA / "state"
else:
    DEFAULT_CONFIG_PATH = Path("/etc/ctun/ctun.toml")
    DEFAULT_STATE_DIR = Path("/var/lib/ctun")
STATE_DIR_ENV = "CTUN_STATE_DIR"
# The agent container gets its key this way: environment, never argv (visible in ps).
KEY_ENV = "CTUN_KEY"
VM_PEER = "vm"

DEFAULT_ADDR = "192.168.251.1/24"
DEFAULT_PORT = 2511
DEFAULT_LISTEN = "127.0.0.1"
DEFAULT_MTU = 1400
DEFAULT_TRANSPORT = "auto"  # UDP, falling back to TCP (and back) as needed
DEFAULT_HOST_INTERFACE = "ctun0"
DEFAULT_AGENT_INTERFACE = "ctunvm0"
DEFAULT_AGENT_HOST = "host.docker.internal"

MTU_MIN, MTU_MAX = 576, 9000  # IPv4's minimum reassembly size .. common jumbo frames
# /8 keeps a typo like /4 from claiming a huge slice of the address space; /30 is the
# smallest network with the two usable addresses the tunnel needs.
PREFIX_MIN, PREFIX_MAX = 8, 30

# How the CLI spells the flag behind each override key, for error messages. Routes are a
# repeated `--route NET` flag collected into a list; everything else is `--key-name`.
FLAG_NAMES: dict[str, str] = {"routes": "--route"}

_COMMON_KEYS = frozenset(
    {
        "addr",
        "port",
        "mtu",
        "offload",
        "interface",
        "transport",
        "key_file",
        "keepalive",
        "dead_after",
        "rekey_after",
        "handshake_skew",
    }
)
_HOST_KEYS = _COMMON_KEYS | {"listen", "routes", "peers", "docker", "control_group"}
# Flags that set a key inside a table ([docker]) rather than a top-level key.
_HOST_FLAG_ONLY = frozenset({"docker_enabled", "docker_agent", "agent_host", "agent_base"})
_AGENT_KEYS = _COMMON_KEYS | {"host"}
_PEER_KEYS = frozenset({"key", "key_file", "allowed"})

_INTERFACE_RE = re.compile(r"ctun[a-z0-9_-]{0,11}")  # 15 characters at most: Linux IFNAMSIZ
_TRANSPORT_RE = re.compile(r"[a-z][a-z0-9_-]*")
_PEER_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_GROUP_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_DOTTED_RE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_CIDR_RE = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3})(?:/(\d{1,2}))?")
# RFC 1123 labels, plus "_" because Docker resolves container names that contain it.
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_DIGITS_RE = re.compile(r"[0-9]{1,10}")  # more digits can only be out of range anyway

# Networks the tunnel must not live in: routing them into a tun device breaks the host or
# cannot work at all.
_SPECIAL_NETWORKS = (
    (IPv4Network("0.0.0.0/8"), "the 'this network' range 0.0.0.0/8"),
    (IPv4Network("127.0.0.0/8"), "the loopback range 127.0.0.0/8"),
    (IPv4Network("224.0.0.0/4"), "the multicast range 224.0.0.0/4"),
    (IPv4Network("240.0.0.0/4"), "the reserved range 240.0.0.0/4"),
)


# --- the configuration objects -------------------------------------------------------------


@dataclass(frozen=True)
class TunnelConfig:
    network: IPv4Network  # e.g. 192.168.251.0/24
    vm_address: IPv4Address  # the `addr` itself, e.g. 192.168.251.1 (VM/agent side)
    host_address: IPv4Address  # vm_address + 1 (host side), as docker-connector does
    mtu: int  # 576..9000
    interface: str  # ^ctun[a-z0-9_-]{0,11}$
    offload: bool = True  # kernel offloads (super-packets, UDP_SEGMENT/GRO) where available


@dataclass(frozen=True)
class PeerConfig:
    name: str  # ^[a-z][a-z0-9_-]{0,31}$
    key: bytes = field(repr=False)  # 32-byte pre-shared secret; kept out of logged reprs
    allowed: tuple[IPv4Network, ...]  # inner source networks beyond what the role implies
    # An accessor (a LAN machine running `ctun access`): its virtual address in the tunnel
    # network. It is told this address, the MTU and the exposed routes when it logs in, and
    # may reach only the exposed routes. None: a plain peer (allowed networks only).
    ip: IPv4Address | None = None
    origin: str = "config"  # "config" (the config file) or "store" (`ctun peer add`)


@dataclass(frozen=True)
class ExposeConfig:
    """Sharing with LAN machines (docker-connector's `expose`); off unless `listen` is set."""

    listen: Endpoint | None = None  # e.g. ("0.0.0.0", 2512): where accessors log in
    routes: tuple[IPv4Network, ...] = ()  # what accessors may reach (`route CIDR expose`)
    pong: bool = False  # the host answers accessors' pings to its tunnel address itself


@dataclass(frozen=True)
class HostsSource:
    """`hosts FILE SUFFIX...`: entries of FILE whose names end in a suffix are served to
    containers by the agent's DNS responder."""

    file: Path
    suffixes: tuple[str, ...]


@dataclass(frozen=True)
class ProxyConfig:
    """`proxy [IP:]PORT[:PORT]`: a host service at `target` (127.0.0.1 unless given) that
    containers reach at the host's tunnel address and `port`."""

    target: Endpoint
    port: int


# `iptables A+B`: two Docker subnets that may reach each other through the agent's rules.
Link = tuple[IPv4Network, IPv4Network]
WIRES = ("ctun", "legacy")  # legacy: docker-connector's own unauthenticated UDP format
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Timers:
    # No validation here on purpose: the loaders enforce the user-facing ranges, while the
    # engine's own tests build Timers directly with values far below them (fast rekeys).
    keepalive: float = 1.0  # seconds between keepalives when idle; 0.1..60
    dead_after: float = 3.0  # no authenticated frame for this long: peer is dead; <= 600
    rekey_after: float = 120.0  # the initiator rekeys after this key age; 1..3600
    handshake_skew: float = 600.0  # max |peer clock - our clock| in a handshake; 1..86400


@dataclass(frozen=True)
class HostConfig:
    tunnel: TunnelConfig
    listen: Endpoint  # default ("127.0.0.1", 2511)
    transport: str  # default "udp"
    routes: tuple[IPv4Network, ...]  # default ()
    peers: tuple[PeerConfig, ...]  # the VM agent's peer, "vm", first, then the [peers.*]
    timers: Timers
    source: str | None  # the config file it came from, if any
    docker: DockerConfig = field(default_factory=DockerConfig)
    control_group: str = "ctun"  # may use the control socket (ctun status, ctun tui)
    expose: ExposeConfig = field(default_factory=ExposeConfig)
    links: tuple[Link, ...] = ()  # sorted pairs, each pair (lower, higher)
    hosts: tuple[HostsSource, ...] = ()
    proxies: tuple[ProxyConfig, ...] = ()
    loglevel: str | None = None  # one of LOG_LEVELS; None: as the command line set it
    wire: str = "ctun"  # one of WIRES
    # The command line's part, kept so a reload reads the file again under the same flags.
    overrides: Mapping[str, object] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class AgentConfig:
    tunnel: TunnelConfig
    host: str  # a name or an IP literal; resolved later, not here
    port: int
    transport: str
    key: bytes = field(repr=False)  # kept out of logged reprs
    timers: Timers
    source: str | None
    wire: str = "ctun"  # one of WIRES; legacy needs no key


def default_state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where ctun keeps its keys: $CTUN_STATE_DIR, else /var/lib/ctun."""
    return Path(environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


# --- where a value came from, and how to blame it ----------------------------------------

_FILE, _FLAG, _DEFAULT = "file", "flag", "default"
_Role = Literal["host", "agent"]


@dataclass(frozen=True)
class _Value:
    """A raw setting together with its origin, so that any error can point at it."""

    raw: object
    origin: str  # _FILE, _FLAG or _DEFAULT
    label: str  # its name in the file: "mtu", "routes[1]", "peers.db.allowed[0]"
    flag: str = ""  # its flag: "--mtu"
    file: str | None = None

    @property
    def given(self) -> bool:
        return self.origin != _DEFAULT

    def error(self, problem: str) -> ConfigError:
        if self.origin == _FLAG:
            return ConfigError(f"{self.flag} {_show_flag(self.raw)}: {problem}")
        if self.origin == _FILE:
            return ConfigError(f"{self.file}: {self.label} = {_show_toml(self.raw)}: {problem}")
        return ConfigError(f"{self.label} (default {_show_toml(self.raw)}): {problem}")

    def item(self, index: int, raw: object) -> _Value:
        return replace(self, raw=raw, label=f"{self.label}[{index}]")

    def base_dir(self) -> Path | None:
        """Relative paths in a file are relative to that file, not to ctun's cwd."""
        return Path(self.file).parent if self.origin == _FILE and self.file else None


class _Settings:
    """The file's top-level keys and the overrides, checked against one role's key set."""

    def __init__(
        self,
        doc: Mapping[str, object],
        overrides: Mapping[str, object],
        source: str | None,
        role: _Role,
    ) -> None:
        self.doc = doc
        self.source = source
        known = _HOST_KEYS if role == "host" else _AGENT_KEYS
        other = _AGENT_KEYS if role == "host" else _HOST_KEYS
        for key in doc:
            if key not in known:
                raise ConfigError(f"{source}: {_misplaced(key, known, other, role)}")
        # The CLI may hand over every flag with None for "not given"; that means absent.
        self.overrides = {k: v for k, v in overrides.items() if v is not None}
        flag_only = _HOST_FLAG_ONLY if role == "host" else frozenset()
        for key in self.overrides:
            if key in flag_only:
                continue
            if key not in known or key in ("peers", "docker"):
                flag = _flag_name(key) if isinstance(key, str) else repr(key)
                if isinstance(key, str) and key in other:
                    raise ConfigError(f"{flag}: {_wrong_role(role)}")
                raise ConfigError(
                    f"{flag}: not a setting ctun knows (internal error, please report)"
                )

    def get(self, name: str, default: object) -> _Value:
        if name in self.overrides:
            return _Value(self.overrides[name], _FLAG, name, flag=_flag_name(name))
        if name in self.doc:
            return _Value(self.doc[name], _FILE, name, file=self.source)
        return _Value(default, _DEFAULT, name)


def _flag_name(key: str) -> str:
    return FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def _wrong_role(role: _Role) -> str:
    if role == "host":
        return "only for `ctun vm` (the VM side); remove it from the host's settings"
    return "only for `ctun up` (the host side); remove it from the VM side's settings"


def _misplaced(key: str, known: frozenset[str], other: frozenset[str], role: _Role) -> str:
    if key in other:
        return f"{key}: {_wrong_role(role)}"
    message = f"unknown key {key!r} (known: {', '.join(sorted(known))})"
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return message + (f"; did you mean {close[0]!r}?" if close else "")


# --- loading -------------------------------------------------------------------------------


def load_host_config(path: str | None, overrides: Mapping[str, object]) -> HostConfig:
    """The host side's configuration: `path` (or /etc/ctun/ctun.toml if it exists), then
    `overrides` from the command line. Creates the VM peer's key file if it is missing."""
    doc, source, file_mode = _read_file(path)
    s = _Settings(doc, overrides, source, "host")
    tunnel = _tunnel(s, DEFAULT_HOST_INTERFACE)
    listen = _ipv4(s.get("listen", DEFAULT_LISTEN), "an IPv4 address to listen on", "127.0.0.1")
    port = _int(s.get("port", DEFAULT_PORT), 1, 65535)
    transport = _transport(s.get("transport", DEFAULT_TRANSPORT))
    routes = _routes(s.get("routes", []), tunnel)
    timers = _timers(s)
    vm_key_file = _path(s.get("key_file", str(default_state_dir() / "vm.key")))
    extra = _peer_specs(s.get("peers", {}), file_mode)
    docker = docker_config(s.get("docker", {}), s.overrides)
    group_v = s.get("control_group", "ctun")
    control_group = _str(group_v, '"ctun"')
    if not _GROUP_RE.fullmatch(control_group):
        raise group_v.error('must be a group name (letters, digits, "_", "-"), like "ctun"')

    # The file system comes last, so that a config with a typo creates no key file.
    peers = [PeerConfig(VM_PEER, load_or_create_key(vm_key_file), ())]
    where = {VM_PEER: str(vm_key_file)}
    for spec in extra:
        key = spec.key if spec.key is not None else read_key(spec.key_path())
        for other in peers:
            if other.key == key:
                # Peers are told apart by their keys; a shared key would let one pose as
                # the other (and their allowed networks would blur together).
                raise ConfigError(
                    f"{spec.where}: same key as peer {other.name!r} ({where[other.name]}); "
                    f"every peer needs its own key"
                )
        peers.append(PeerConfig(spec.name, key, spec.allowed))
        where[spec.name] = spec.where
    return HostConfig(
        tunnel=tunnel,
        listen=(str(listen), port),
        transport=transport,
        routes=routes,
        peers=tuple(peers),
        timers=timers,
        source=source,
        docker=docker,
        control_group=control_group,
        overrides=dict(overrides),
    )


def load_agent_config(
    path: str | None,
    overrides: Mapping[str, object],
    environ: Mapping[str, str] = os.environ,
) -> AgentConfig:
    """The VM side's configuration. Its key comes from --key-file, else $CTUN_KEY, else the
    file's key_file; it is only ever read here, never created (the host makes it)."""
    doc, source, _mode = _read_file(path)
    s = _Settings(doc, overrides, source, "agent")
    tunnel = _tunnel(s, DEFAULT_AGENT_INTERFACE)
    host = _host(s.get("host", DEFAULT_AGENT_HOST))
    port = _int(s.get("port", DEFAULT_PORT), 1, 65535)
    transport = _transport(s.get("transport", DEFAULT_TRANSPORT))
    timers = _timers(s)
    key_file_value = s.get("key_file", None)
    key_file = _path(key_file_value) if key_file_value.given else None

    if key_file is not None and key_file_value.origin == _FLAG:
        key = read_key(key_file)
    elif KEY_ENV in environ:
        key = decode_key(
            environ[KEY_ENV], f"${KEY_ENV}", "set it to the one line in the host's vm.key"
        )
    elif key_file is not None:
        key = read_key(key_file)
    else:
        raise ConfigError(
            f"no key: pass --key-file FILE or set {KEY_ENV} "
            f"(the host's key is in {default_state_dir(environ) / 'vm.key'})"
        )
    return AgentConfig(
        tunnel=tunnel,
        host=host,
        port=port,
        transport=transport,
        key=key,
        timers=timers,
        source=source,
    )


def _read_file(path: str | os.PathLike[str] | None) -> tuple[dict[str, Any], str | None, int]:
    """The parsed TOML document, its path, and its st_mode (0 when there is no file)."""
    if path is None:
        # lexists, not is_file: a default file we cannot read must be an error, not ignored.
        if not os.path.lexists(DEFAULT_CONFIG_PATH):
            return {}, None, 0
        path = DEFAULT_CONFIG_PATH
    name = os.fspath(path)
    try:
        # A FIFO is fine here (`--config <(...)`); it just is not a regular file below.
        with open(name, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(f"{name}: cannot read config file: {_reason(exc)}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message carries the line and column
        raise ConfigError(f"{name}: invalid TOML: {exc}") from None
    except ValueError as exc:  # e.g. an integer literal too long for int()
        raise ConfigError(f"{name}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{name}: invalid TOML: arrays or tables nested too deeply") from None
    return doc, name, mode if stat.S_ISREG(mode) else 0


# --- individual settings -------------------------------------------------------------------


def _tunnel(s: _Settings, default_interface: str) -> TunnelConfig:
    addr = s.get("addr", DEFAULT_ADDR)
    mtu = _int(s.get("mtu", DEFAULT_MTU), MTU_MIN, MTU_MAX)
    offload = _bool(s.get("offload", True))
    interface_v = s.get("interface", default_interface)
    interface = _str(interface_v, f'"{default_interface}"')
    if not _INTERFACE_RE.fullmatch(interface):
        raise interface_v.error(
            f'must be "ctun" followed by up to 11 of a-z, 0-9, "_" and "-", '
            f'like "{default_interface}"'
        )
    iface = _cidr(addr)
    network, vm = iface.network, iface.ip
    use = f"use {network[1]}/{network.prefixlen}"
    if not PREFIX_MIN <= network.prefixlen <= PREFIX_MAX:
        raise addr.error(
            f"the prefix length must be between /{PREFIX_MIN} and /{PREFIX_MAX} "
            f"(the tunnel needs two usable addresses), like {DEFAULT_ADDR}"
        )
    for special, what in _SPECIAL_NETWORKS:
        if network.subnet_of(special):
            raise addr.error(f"{network} is in {what}; use a private range like {DEFAULT_ADDR}")
    if vm == network.network_address:
        raise addr.error(f"{vm} is the network address of {network}; {use}")
    if vm == network.broadcast_address:
        raise addr.error(f"{vm} is the broadcast address of {network}; {use}")
    host = vm + 1  # cannot overflow: vm is below the broadcast address
    if host == network.broadcast_address:
        raise addr.error(
            f"the host side takes the next address, {host}, which is the broadcast "
            f"address of {network}; {use}"
        )
    return TunnelConfig(
        network=network, vm_address=vm, host_address=host, mtu=mtu, interface=interface,
        offload=offload,
    )


def _cidr(value: _Value) -> IPv4Interface:
    text = _str(value, f'"{DEFAULT_ADDR}"')
    match = _CIDR_RE.fullmatch(text)
    if match and match.group(2) is None:
        raise value.error(f'needs a prefix length, like "{text}/24"')
    if not match:
        raise value.error(f'must be an IPv4 address with a prefix length, like "{DEFAULT_ADDR}"')
    try:
        return IPv4Interface(text)
    except ValueError as exc:  # an octet over 255, a prefix over 32
        raise value.error(f"{_reason(exc)}; write it like {DEFAULT_ADDR}") from None


def _network(value: _Value, example: str) -> IPv4Network:
    """An IPv4 network, strictly: host bits set is almost always a typo for the network."""
    text = _str(value, f'"{example}"')
    if not _CIDR_RE.fullmatch(text):
        raise value.error(f'must be an IPv4 network, like "{example}"')
    try:
        net = IPv4Network(text, strict=False)
    except ValueError as exc:
        raise value.error(f"{_reason(exc)}; write it like {example}") from None
    if str(net.network_address) != text.split("/")[0]:
        raise value.error(f"has host bits set; use {net}")
    return net


def _routes(value: _Value, tunnel: TunnelConfig) -> tuple[IPv4Network, ...]:
    routes: list[IPv4Network] = []
    for i, raw in enumerate(_list(value, '["172.17.0.0/16"]')):
        item = value.item(i, raw)
        net = _network(item, "172.17.0.0/16")
        if net.prefixlen == 0:
            raise item.error(
                "would swallow the host's default route; list the container networks "
                "instead, like 172.17.0.0/16"
            )
        if net.overlaps(tunnel.network):
            raise item.error(
                f"overlaps the tunnel network {tunnel.network} (addr); route something "
                f"outside it, or move the tunnel with addr"
            )
        if net in routes:
            raise item.error("listed twice; remove the duplicate")
        routes.append(net)
    return tuple(routes)


def _timers(s: _Settings) -> Timers:
    d = Timers()
    keepalive_v = s.get("keepalive", d.keepalive)
    dead_v = s.get("dead_after", d.dead_after)
    keepalive = _float(keepalive_v, 0.1, 60)
    if keepalive >= d.dead_after and keepalive_v.given and not dead_v.given:
        # Raising only keepalive past the default dead_after is a keepalive problem: blame
        # the setting the user actually wrote.
        raise keepalive_v.error(
            f"must be less than dead_after ({d.dead_after:g}); raise dead_after too"
        )
    dead_after = _float(
        dead_v, keepalive, 600, low_open=True, low_name=f"keepalive ({keepalive:g})"
    )
    return Timers(
        keepalive=keepalive,
        dead_after=dead_after,
        rekey_after=_float(s.get("rekey_after", d.rekey_after), 1, 3600),
        handshake_skew=_float(s.get("handshake_skew", d.handshake_skew), 1, 86400),
    )


def _transport(value: _Value) -> str:
    name = _str(value, '"udp"')
    if not _TRANSPORT_RE.fullmatch(name):
        raise value.error('must be a transport name like "udp" (a-z, 0-9, "_" and "-")')
    return name


def _host(value: _Value) -> str:
    text = _str(value, f'"{DEFAULT_AGENT_HOST}"')
    try:
        ip_address(text)
        return text
    except ValueError:
        pass
    # Four dotted numbers that are no IP (999.1.1.1) would pass as a name and fail later.
    if _DOTTED_RE.fullmatch(text) or not _HOSTNAME_RE.fullmatch(text):
        raise value.error(f'must be a host name or an IP address, like "{DEFAULT_AGENT_HOST}"')
    return text


def _ipv4(value: _Value, what: str, example: str) -> IPv4Address:
    text = _str(value, f'"{example}"')
    try:
        return IPv4Address(text)
    except AddressValueError:
        raise value.error(f'must be {what}, like "{example}"') from None


def _path(value: _Value) -> Path:
    text = _str(value, '"/var/lib/ctun/vm.key"')
    if not text or "\0" in text:
        raise value.error("must be a file path")
    path = Path(os.path.expanduser(text))
    base = value.base_dir()
    return base / path if base is not None and not path.is_absolute() else path


# --- peers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PeerSpec:
    """A validated [peers.NAME] table whose key file, if any, has not been read yet."""

    name: str
    key: bytes | None
    key_file: Path | None
    allowed: tuple[IPv4Network, ...]
    where: str  # where its key comes from, for the duplicate-key error

    def key_path(self) -> Path:
        assert self.key_file is not None  # _peer_specs sets exactly one of key, key_file
        return self.key_file


def _peer_specs(value: _Value, file_mode: int) -> list[_PeerSpec]:
    if not value.given:
        return []
    file = value.file
    tables = value.raw
    if not isinstance(tables, dict):
        raise value.error("must be tables, one per peer: [peers.NAME]")
    specs = []
    for name, table in tables.items():
        label = f"peers.{_toml_key(name)}"
        entry = replace(value, raw=table, label=label)
        if name == VM_PEER:
            raise ConfigError(
                f"{file}: [{label}]: the VM agent's peer {VM_PEER!r} is built in and uses "
                f"key_file; remove this table"
            )
        if not _PEER_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"{file}: [{label}]: a peer name is a lowercase letter, then up to 31 of "
                f'a-z, 0-9, "_" and "-"'
            )
        if not isinstance(table, dict):
            raise entry.error(f"must be a table: [{label}] with key and allowed")
        for k in table:
            if k not in _PEER_KEYS:
                raise ConfigError(
                    f"{file}: [{label}]: unknown key {k!r} (known: {', '.join(sorted(_PEER_KEYS))})"
                )
        if ("key" in table) == ("key_file" in table):
            raise ConfigError(
                f'{file}: [{label}]: needs exactly one of key = "BASE64" or key_file = "PATH"'
            )
        if "allowed" not in table:
            raise ConfigError(
                f'{file}: [{label}]: needs allowed = ["NETWORK/PREFIX", ...], the inner '
                f"source networks this peer may send from"
            )
        allowed_v = replace(value, raw=table["allowed"], label=f"{label}.allowed")
        allowed: list[IPv4Network] = []
        for i, raw in enumerate(_list(allowed_v, '["192.168.251.9/32"]')):
            item = allowed_v.item(i, raw)
            net = _network(item, "192.168.251.9/32")
            if net in allowed:
                raise item.error("listed twice; remove the duplicate")
            allowed.append(net)
        if not allowed:
            raise allowed_v.error('must list at least one network, like ["192.168.251.9/32"]')

        if "key" in table:
            key_v = replace(value, raw=table["key"], label=f"{label}.key")
            # Never echo the value: a key that is nearly right is still a secret.
            if not isinstance(table["key"], str):
                raise ConfigError(f"{file}: {label}.key: must be a string of base64")
            if file_mode & 0o077 and os.name != "nt":
                raise ConfigError(
                    f"{file}: {label}.key: this file holds a key but other users can read it "
                    f"(mode {stat.S_IMODE(file_mode):04o}); run: chmod 600 {file}, "
                    f"or move the key into a key_file"
                )
            key = decode_key(
                table["key"], f"{file}: {label}.key", "set it to the peer's 44-character key"
            )
            specs.append(_PeerSpec(name, key, None, tuple(allowed), f"{file}: {key_v.label}"))
        else:
            path = _path(replace(value, raw=table["key_file"], label=f"{label}.key_file"))
            specs.append(_PeerSpec(name, None, path, tuple(allowed), str(path)))
    return specs


# --- [docker] ------------------------------------------------------------------------------

_DOCKER_KEYS = frozenset(
    {"enabled", "url", "include", "exclude", "internal", "agent", "agent_host", "agent_base"}
)
# flag override key -> key in the [docker] table
_DOCKER_FLAGS = {"docker_enabled": "enabled", "docker_agent": "agent",
                 "agent_host": "agent_host", "agent_base": "agent_base"}


def docker_config(value: _Value, overrides: Mapping[str, object]) -> DockerConfig:
    """The [docker] table: which networks to follow and how to run the agent."""
    table = value.raw
    if not isinstance(table, dict):
        raise value.error("must be a table: [docker]")
    for key in table:
        if key not in _DOCKER_KEYS:
            known = ", ".join(sorted(_DOCKER_KEYS))
            raise ConfigError(f"{value.file}: [docker]: unknown key {key!r} (known: {known})")

    def get(key: str, default: object) -> _Value:
        for flag, target in _DOCKER_FLAGS.items():
            if target == key and flag in overrides:
                return _Value(overrides[flag], _FLAG, f"docker.{key}", flag=_flag_name(flag))
        if key in table:
            return replace(value, raw=table[key], label=f"docker.{key}")
        return _Value(default, _DEFAULT, f"docker.{key}")

    url = get("url", None)
    return DockerConfig(
        enabled=_bool(get("enabled", True)),
        url=None if url.raw is None else _str(url, '"unix:///var/run/docker.sock"'),
        include=_selectors(get("include", [])),
        exclude=_selectors(get("exclude", [])),
        internal=_bool(get("internal", False)),
        agent=_bool(get("agent", True)),
        agent_host=_host(get("agent_host", DEFAULT_AGENT_HOST)),
        agent_base=_str(get("agent_base", DEFAULT_AGENT_BASE), '"python:3.11-slim-bookworm"'),
    )


def _bool(value: _Value) -> bool:
    if not isinstance(value.raw, bool):
        raise value.error("must be true or false")
    return value.raw


def _selectors(value: _Value) -> tuple[Selector, ...]:
    example = '["name:kafka-*", "label:com.example.tunnel=yes", "subnet:172.20.0.0/16"]'
    found = []
    for i, raw in enumerate(_list(value, example)):
        item = value.item(i, raw)
        try:
            found.append(Selector.parse(_str(item, example)))
        except ValueError as exc:
            raise item.error(str(exc)) from None
    return tuple(found)


# --- raw value checks ----------------------------------------------------------------------


def _str(value: _Value, example: str) -> str:
    if not isinstance(value.raw, str):
        raise value.error(f"must be a string, like {example}")
    return value.raw


def _list(value: _Value, example: str) -> list[object]:
    if not isinstance(value.raw, (list, tuple)):
        raise value.error(f"must be a list of strings, like {example}")
    return list(value.raw)


def _int(value: _Value, low: int, high: int) -> int:
    raw = value.raw
    if value.origin == _FLAG and isinstance(raw, str) and _DIGITS_RE.fullmatch(raw.strip()):
        raw = int(raw.strip())
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise value.error(f"must be a whole number between {low} and {high}")
    if not low <= raw <= high:
        raise value.error(f"must be between {low} and {high}")
    return raw


def _float(
    value: _Value, low: float, high: float, *, low_open: bool = False, low_name: str = ""
) -> float:
    low_name = low_name or f"{low:g}"
    raw = value.raw
    if value.origin == _FLAG and isinstance(raw, str):
        try:
            raw = float(raw) if len(raw) <= 32 else None
        except ValueError:
            raw = None
    if not isinstance(raw, (int, float)) or isinstance(raw, bool):
        raise value.error(f"must be a number of seconds between {low_name} and {high:g}")
    try:
        number = float(raw)
    except OverflowError:  # an integer past 1e308: out of range like any other
        number = math.inf
    too_low = number <= low if low_open else number < low
    if not math.isfinite(number) or too_low or number > high:
        bound = f"more than {low_name}" if low_open else f"at least {low_name}"
        raise value.error(f"must be {bound} and at most {high:g} seconds")
    return number


# --- showing values in messages ------------------------------------------------------------

_SHOW_MAX = 60


def _clip(text: str) -> str:
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."


def _show_flag(raw: object) -> str:
    """A flag value as the user would have typed it."""
    if isinstance(raw, (list, tuple)):
        return " ".join(_show_flag(x) for x in raw)
    return _clip(shlex.quote(raw) if isinstance(raw, str) else _show_scalar(raw))


def _show_toml(raw: object) -> str:
    """A file value as TOML spells it, shortened."""
    return _clip(_toml(raw, depth=0))


def _toml(raw: object, depth: int) -> str:
    if depth > 3:
        return "..."
    if isinstance(raw, str):
        return json.dumps(raw, ensure_ascii=False)  # a TOML basic string, escapes included
    if isinstance(raw, (list, tuple)):
        return "[" + ", ".join(_toml(x, depth + 1) for x in raw[:8]) + "]"
    if isinstance(raw, dict):
        items = (f"{_toml_key(str(k))} = {_toml(v, depth + 1)}" for k, v in list(raw.items())[:8])
        return "{ " + ", ".join(items) + " }"
    return _show_scalar(raw)


def _show_scalar(raw: object) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, (datetime, date, time)):
        return raw.isoformat()
    if isinstance(raw, int) and raw.bit_length() > 64:
        return "<a very large number>"  # repr() refuses ints past 4300 digits
    return repr(raw)


def _toml_key(name: str) -> str:
    return name if _BARE_KEY_RE.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


# What a reload can apply to a running daemon; anything else takes a restart.
RELOADABLE = ("routes", "docker")


def reload_host_config(current: HostConfig) -> tuple[HostConfig, list[str]]:
    """The config file read again (same flags): the settings a running daemon can take, and
    the names of the changed ones it cannot (they wait for a restart). ConfigError as ever."""
    fresh = load_host_config(current.source, current.overrides)
    applied = replace(current, routes=fresh.routes, docker=fresh.docker)
    pending = [name for name in ("tunnel", "listen", "transport", "peers", "timers",
                                 "control_group")
               if getattr(fresh, name) != getattr(current, name)]
    # Turning Docker integration or the agent on or off changes what runs, not a filter.
    if (fresh.docker.enabled, fresh.docker.agent) != (current.docker.enabled,
                                                      current.docker.agent):
        pending.append("docker.enabled/agent")
        applied = replace(applied, docker=replace(fresh.docker, enabled=current.docker.enabled,
                                                  agent=current.docker.agent))
    return applied, pending
