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
import itertools
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

from . import legacy_config
from .contracts import Endpoint
from .docker_policy import DEFAULT_AGENT_BASE, DockerConfig, Selector
from .keys import ConfigError, decode_key, encode_key, load_or_create_key, os_reason, read_key
from .legacy_config import SourceLine, line_error, quote
from .messages import MAX_LINKS, MAX_SUFFIX, MAX_SUFFIXES, ROUTES_PER_PART
from .toml_lines import value_lines

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_STATE_DIR",
    "LOG_LEVELS",
    "WIRES",
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
    "check_host_config",
    "decode_key",
    "default_state_dir",
    "encode_key",
    "load_agent_config",
    "load_host_config",
    "load_or_create_key",
    "read_key",
    "reload_host_config",
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
        "wire",
    }
)
_HOST_KEYS = _COMMON_KEYS | {
    "listen", "routes", "peers", "docker", "control_group",
    "expose", "links", "hosts", "proxy", "loglevel",
}
# Flags that set a key inside a table ([docker]) rather than a top-level key.
_HOST_FLAG_ONLY = frozenset({"docker_enabled", "docker_agent", "agent_host", "agent_base"})
_AGENT_KEYS = _COMMON_KEYS | {"host"}
_PEER_KEYS = frozenset({"key", "key_file", "allowed", "ip"})
_EXPOSE_KEYS = frozenset({"listen", "routes", "pong"})
_HOSTS_KEYS = frozenset({"file", "suffixes"})
RESERVED_PEER_NAMES = frozenset({VM_PEER, "host"})  # "host": what an accessor calls us
DEFAULT_EXPOSE_PORT = 2512  # docker-connector's
# docker-connector's spellings (go-logging's level names, any case) and the usual short ones.
_LOG_LEVEL_NAMES = {
    "debug": "debug", "trace": "debug", "info": "info", "notice": "info",
    "warning": "warning", "warn": "warning", "error": "error", "err": "error",
    "critical": "error", "fatal": "error",
}
# A hosts-file suffix as docker-connector matches it (`.local` or `local`): DNS name labels.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_SUFFIX_RE = re.compile(rf"\.?{_LABEL}(?:\.{_LABEL})*")

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
    # A docker-connector.conf: label -> the line that set it, so errors say FILE:LINE.
    lines: Mapping[str, SourceLine] | None = field(default=None, repr=False)
    # A TOML file: label -> the line it was written on (core/toml_lines.py), likewise.
    toml_lines: Mapping[str, int] | None = field(default=None, repr=False)

    @property
    def given(self) -> bool:
        return self.origin != _DEFAULT

    def error(self, problem: str) -> ConfigError:
        if self.origin == _FLAG:
            return ConfigError(f"{self.flag} {_show_flag(self.raw)}: {problem}")
        if self.origin == _FILE:
            line = self.line()
            if line is not None:
                return line_error(self.file, line, problem)
            return ConfigError(f"{self.where()}: {self.label} = {_show_toml(self.raw)}: {problem}")
        return ConfigError(f"{self.label} (default {_show_toml(self.raw)}): {problem}")

    def where(self) -> str:
        """FILE:LINE of a value from a TOML file; FILE alone if its line is not known."""
        number = legacy_config.locate(self.toml_lines, self.label) if self.toml_lines else None
        return f"{self.file}:{number}" if number else str(self.file)

    def table_error(self, problem: str) -> ConfigError:
        """About a whole table ([peers.db]) rather than one value in it."""
        line = self.line()
        if line is not None:
            return line_error(self.file, line, problem)
        return ConfigError(f"{self.where()}: [{self.label}]: {problem}")

    def line(self) -> SourceLine | None:
        if self.lines is None or self.origin != _FILE:
            return None
        return legacy_config.locate(self.lines, self.label)

    def item(self, index: int, raw: object) -> _Value:
        return replace(self, raw=raw, label=f"{self.label}[{index}]")

    def child(self, key: str, raw: object) -> _Value:
        return replace(self, raw=raw, label=f"{self.label}.{_toml_key(key)}")

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
        lines: Mapping[str, SourceLine] | None = None,
        toml_lines: Mapping[str, int] | None = None,
    ) -> None:
        self.doc = doc
        self.source = source
        self.lines = lines
        self.toml_lines = toml_lines
        known = _HOST_KEYS if role == "host" else _AGENT_KEYS
        other = _AGENT_KEYS if role == "host" else _HOST_KEYS
        for key in doc:
            if key not in known:
                where = _Value(doc[key], _FILE, _toml_key(key), file=source,
                               toml_lines=toml_lines).where()
                raise ConfigError(f"{where}: {_misplaced(key, known, other, role)}")
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
            return _Value(self.doc[name], _FILE, name, file=self.source, lines=self.lines,
                          toml_lines=self.toml_lines)
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
    `overrides` from the command line. `path` may be ctun TOML or a docker-connector.conf
    (told apart by content). Creates the VM peer's key file if it is missing, and the key
    files of accessors that name none."""
    return _host_config(_read_file(path), overrides, with_keys=True)


def check_host_config(path: str | None,
                      overrides: Mapping[str, object] | None = None) -> HostConfig:
    """Validated exactly like load_host_config, but without reading or creating any key
    file (every peer's key is left empty): for `ctun config import`, which needs no root,
    and `ctun peer`, which needs only the addresses."""
    return _host_config(_read_file(path), overrides or {}, with_keys=False)


def _host_config(
    file: _File, overrides: Mapping[str, object], *, with_keys: bool
) -> HostConfig:
    s = _Settings(file.doc, overrides, file.source, "host", file.lines, file.toml_lines)
    tunnel = _tunnel(s, DEFAULT_HOST_INTERFACE)
    listen = _ipv4(s.get("listen", DEFAULT_LISTEN), "an IPv4 address to listen on", "127.0.0.1")
    port = _int(s.get("port", DEFAULT_PORT), 1, 65535)
    endpoint = (str(listen), port)
    transport = _transport(s.get("transport", DEFAULT_TRANSPORT))
    routes = _routes(s.get("routes", []), tunnel)
    timers = _timers(s)
    vm_key_file = _path(s.get("key_file", str(default_state_dir() / "vm.key")))
    extra = _peer_specs(s.get("peers", {}), file.mode, tunnel)
    docker = docker_config(s.get("docker", {}), s.overrides)
    group_v = s.get("control_group", "ctun")
    control_group = _str(group_v, '"ctun"')
    if not _GROUP_RE.fullmatch(control_group):
        raise group_v.error('must be a group name (letters, digits, "_", "-"), like "ctun"')
    expose = _expose(s.get("expose", {}), tunnel, endpoint)
    links = _links(s.get("links", []), tunnel)
    hosts = _hosts(s.get("hosts", []))
    proxies = _proxies(s.get("proxy", []), tunnel, endpoint)
    loglevel = _loglevel(s.get("loglevel", None))
    wire = _wire(s.get("wire", WIRES[0]))

    # The file system comes last, so that a config with a typo creates no key file.
    peers = _peer_keys(vm_key_file, extra) if with_keys else [
        PeerConfig(VM_PEER, b"", ()), *(PeerConfig(p.name, b"", p.allowed, p.ip) for p in extra)
    ]
    return HostConfig(
        tunnel=tunnel,
        listen=endpoint,
        transport=transport,
        routes=routes,
        peers=tuple(peers),
        timers=timers,
        source=file.source,
        docker=docker,
        control_group=control_group,
        expose=expose,
        links=links,
        hosts=hosts,
        proxies=proxies,
        loglevel=loglevel,
        wire=wire,
        overrides=dict(overrides),
    )


def _peer_keys(vm_key_file: Path, extra: list[_PeerSpec]) -> list[PeerConfig]:
    peers = [PeerConfig(VM_PEER, load_or_create_key(vm_key_file), ())]
    where = {VM_PEER: str(vm_key_file)}
    for spec in extra:
        if spec.key is not None:
            key = spec.key
        elif spec.create:  # an accessor's default key file, made like vm.key
            key = load_or_create_key(spec.key_path())
        else:
            key = read_key(spec.key_path())
        for other in peers:
            if other.key == key:
                # Peers are told apart by their keys; a shared key would let one pose as
                # the other (and their allowed networks would blur together).
                raise ConfigError(
                    f"{spec.where}: same key as peer {other.name!r} ({where[other.name]}); "
                    f"every peer needs its own key"
                )
        peers.append(PeerConfig(spec.name, key, spec.allowed, spec.ip))
        where[spec.name] = spec.where
    return peers


def load_agent_config(
    path: str | None,
    overrides: Mapping[str, object],
    environ: Mapping[str, str] = os.environ,
) -> AgentConfig:
    """The VM side's configuration. Its key comes from --key-file, else $CTUN_KEY, else the
    file's key_file; it is only ever read here, never created (the host makes it).
    With wire = "legacy" (docker-connector's unauthenticated format) it needs none."""
    file = _read_file(path)
    source = file.source
    if file.lines is not None:
        raise ConfigError(
            f"{source}: a docker-connector.conf is the host's config (ctun up --config "
            f"{source}); give the VM side flags, or a ctun TOML file"
        )
    s = _Settings(file.doc, overrides, source, "agent", toml_lines=file.toml_lines)
    tunnel = _tunnel(s, DEFAULT_AGENT_INTERFACE)
    host = _host(s.get("host", DEFAULT_AGENT_HOST))
    port = _int(s.get("port", DEFAULT_PORT), 1, 65535)
    transport = _transport(s.get("transport", DEFAULT_TRANSPORT))
    timers = _timers(s)
    wire = _wire(s.get("wire", WIRES[0]))
    key_file_value = s.get("key_file", None)
    key_file = _path(key_file_value) if key_file_value.given else None

    if wire == "legacy" and key_file is None and KEY_ENV not in environ:
        key = b""  # docker-connector's format has no keys; there is nothing to read
    elif key_file is not None and key_file_value.origin == _FLAG:
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
        wire=wire,
    )


@dataclass(frozen=True)
class _File:
    doc: dict[str, Any]  # as tomllib parses it (a docker-connector.conf: the equivalent)
    source: str | None  # its path; None when there is no file
    mode: int  # its st_mode; 0 when there is no file or it is no regular file
    lines: Mapping[str, SourceLine] | None = None  # a docker-connector.conf's, by label
    toml_lines: Mapping[str, int] | None = None  # a TOML file's, by label


def _read_file(path: str | os.PathLike[str] | None) -> _File:
    """The parsed document: ctun TOML, or a docker-connector.conf (told by its content)."""
    if path is None:
        # lexists, not is_file: a default file we cannot read must be an error, not ignored.
        if not os.path.lexists(DEFAULT_CONFIG_PATH):
            return _File({}, None, 0)
        path = DEFAULT_CONFIG_PATH
    name = os.fspath(path)
    try:
        # A FIFO is fine here (`--config <(...)`); it just is not a regular file below.
        with open(name, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(f"{name}: cannot read config file: {os_reason(exc)}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    mode = mode if stat.S_ISREG(mode) else 0
    if legacy_config.looks_legacy(text):
        legacy = legacy_config.parse(text, name)
        return _File(legacy.doc, name, mode, legacy.lines)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message carries the line and column
        raise ConfigError(f"{name}: invalid TOML: {exc}") from None
    except ValueError as exc:  # e.g. an integer literal too long for int()
        raise ConfigError(f"{name}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{name}: invalid TOML: arrays or tables nested too deeply") from None
    return _File(doc, name, mode, toml_lines=value_lines(text))


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
        raise value.error(f"{os_reason(exc)}; write it like {DEFAULT_ADDR}") from None


def _network(value: _Value, example: str) -> IPv4Network:
    """An IPv4 network, strictly: host bits set is almost always a typo for the network."""
    text = _str(value, f'"{example}"')
    if not _CIDR_RE.fullmatch(text):
        raise value.error(f'must be an IPv4 network, like "{example}"')
    try:
        net = IPv4Network(text, strict=False)
    except ValueError as exc:
        raise value.error(f"{os_reason(exc)}; write it like {example}") from None
    if str(net.network_address) != text.split("/")[0]:
        raise value.error(f"has host bits set; use {net}")
    return net


def _routes(
    value: _Value, tunnel: TunnelConfig, limit: int | None = None
) -> tuple[IPv4Network, ...]:
    routes: list[IPv4Network] = []
    for i, raw in enumerate(_list(value, '["172.17.0.0/16"]')):
        item = value.item(i, raw)
        net = _network(item, "172.17.0.0/16")
        if net.prefixlen == 0:
            raise item.error(
                "would swallow the host's default route; list the container networks "
                "instead, like 172.17.0.0/16"
            )
        _not_special(item, net)
        if net.overlaps(tunnel.network):
            raise item.error(
                f"overlaps the tunnel network {tunnel.network} (addr); route something "
                f"outside it, or move the tunnel with addr"
            )
        if net in routes:
            raise item.error("listed twice; remove the duplicate")
        routes.append(net)
        if limit is not None and len(routes) > limit:
            raise item.error(f"more than {limit} networks; list at most {limit}")
    return tuple(routes)


def _not_special(value: _Value, net: IPv4Network) -> None:
    for special, what in _SPECIAL_NETWORKS:
        if net.subnet_of(special):
            raise value.error(f"{net} is in {what}; name a container network, like "
                              f"172.17.0.0/16")


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


def _path(value: _Value, example: str = '"/var/lib/ctun/vm.key"') -> Path:
    text = _str(value, example)
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
    ip: IPv4Address | None = None  # an accessor's address in the tunnel network
    create: bool = False  # key_file is an accessor's default: made when missing, like vm.key

    def key_path(self) -> Path:
        assert self.key_file is not None  # _peer_specs sets exactly one of key, key_file
        return self.key_file


def accessor_key_file(name: str) -> Path:
    """Where an accessor's key lives when its table names none (`token NAME IP`)."""
    return default_state_dir() / "peers" / f"{name}.key"


def _peer_specs(value: _Value, file_mode: int, tunnel: TunnelConfig) -> list[_PeerSpec]:
    if not value.given:
        return []
    file = value.file
    tables = value.raw
    if not isinstance(tables, dict):
        raise value.error("must be tables, one per peer: [peers.NAME]")
    specs: list[_PeerSpec] = []
    addresses: dict[IPv4Address, str] = {}
    for name, table in tables.items():
        entry = value.child(name, table)
        label = entry.label
        if name == VM_PEER:
            fix = "choose another name" if entry.line() else "remove this table"
            raise entry.table_error(f"the VM agent's peer {VM_PEER!r} is built in and uses "
                                    f"key_file; {fix}")
        if name in RESERVED_PEER_NAMES:
            raise entry.table_error(f"the name {name!r} is reserved: it is what accessors "
                                    f"call this host; choose another")
        if not _PEER_NAME_RE.fullmatch(name):
            raise entry.table_error(
                'a peer name is a lowercase letter, then up to 31 of a-z, 0-9, "_" and "-"'
            )
        if not isinstance(table, dict):
            raise entry.error(f"must be a table: [{label}] with key and allowed")
        for k in table:
            if k not in _PEER_KEYS:
                known = ", ".join(sorted(_PEER_KEYS))
                raise entry.table_error(f"unknown key {k!r} (known: {known})")
        ip = _peer_ip(entry.child("ip", table["ip"]), tunnel, addresses) if "ip" in table else None
        if ip is not None:
            addresses[ip] = name
            if "key" in table and "key_file" in table:
                raise entry.table_error('needs at most one of key = "BASE64" or key_file = '
                                        '"PATH" (neither: a key file in the state directory)')
        elif ("key" in table) == ("key_file" in table):
            raise entry.table_error('needs exactly one of key = "BASE64" or key_file = "PATH"')
        allowed = _allowed(entry, table, ip)

        if "key" in table:
            key_v = entry.child("key", table["key"])
            # Never echo the value: a key that is nearly right is still a secret.
            if not isinstance(table["key"], str):
                raise ConfigError(f"{key_v.where()}: {label}.key: must be a string of base64")
            if file_mode & 0o077 and os.name != "nt":
                raise ConfigError(
                    f"{key_v.where()}: {label}.key: this file holds a key but other users can "
                    f"read it (mode {stat.S_IMODE(file_mode):04o}); run: chmod 600 {file}, "
                    f"or move the key into a key_file"
                )
            key = decode_key(
                table["key"], f"{key_v.where()}: {label}.key",
                "set it to the peer's 44-character key"
            )
            specs.append(_PeerSpec(name, key, None, allowed, f"{key_v.where()}: {key_v.label}", ip))
        elif "key_file" in table:
            path = _path(entry.child("key_file", table["key_file"]))
            specs.append(_PeerSpec(name, None, path, allowed, str(path), ip))
        else:
            path = accessor_key_file(name)
            specs.append(_PeerSpec(name, None, path, allowed, str(path), ip, create=True))
    return specs


def _peer_ip(
    value: _Value, tunnel: TunnelConfig, taken: Mapping[IPv4Address, str]
) -> IPv4Address:
    """An accessor's address: in the tunnel network, and nobody else's."""
    network = tunnel.network
    example = _free_address(tunnel, taken)
    ip = _ipv4(value, "an IPv4 address in the tunnel network", example)
    if ip not in network:
        raise value.error(f"outside the tunnel network {network} (addr); pick an address "
                          f"in it, like {example}")
    own = {network.network_address: "the network address of the tunnel",
           network.broadcast_address: "the broadcast address of the tunnel",
           tunnel.host_address: "this host's tunnel address",
           tunnel.vm_address: "the VM side's tunnel address"}
    if ip in own:
        raise value.error(f"is {own[ip]}; pick a free address, like {example}")
    if ip in taken:
        raise value.error(f"is also peer {taken[ip]!r}'s address; every accessor needs its "
                          f"own, like {example}")
    return ip


def _free_address(tunnel: TunnelConfig, taken: Mapping[IPv4Address, str]) -> str:
    """An example address for messages: the first one no one has (docker-connector's
    layout puts the VM and the host at the start, accessors after them)."""
    used = {tunnel.vm_address, tunnel.host_address, *taken}
    for ip in tunnel.network.hosts():
        if ip > tunnel.host_address and ip not in used:
            return str(ip)
    return str(tunnel.host_address + 1)


def _allowed(entry: _Value, table: Mapping[str, object],
             ip: IPv4Address | None) -> tuple[IPv4Network, ...]:
    """The inner source networks a peer may send from; an accessor's own address alone
    unless it says otherwise."""
    if "allowed" not in table:
        if ip is not None:
            return (IPv4Network(f"{ip}/32"),)
        raise entry.table_error(
            'needs allowed = ["NETWORK/PREFIX", ...], the inner source networks this peer '
            'may send from'
        )
    allowed_v = entry.child("allowed", table["allowed"])
    allowed: list[IPv4Network] = []
    for i, raw in enumerate(_list(allowed_v, '["192.168.251.9/32"]')):
        item = allowed_v.item(i, raw)
        net = _network(item, "192.168.251.9/32")
        if net in allowed:
            raise item.error("listed twice; remove the duplicate")
        allowed.append(net)
    if not allowed:
        raise allowed_v.error('must list at least one network, like ["192.168.251.9/32"]')
    if ip is not None and not any(ip in net for net in allowed):
        raise allowed_v.error(f"must include the peer's own ip {ip}, like [\"{ip}/32\"] "
                              f"(or leave allowed out)")
    return tuple(allowed)


# --- sharing, links, hosts, proxy, log level, wire -----------------------------------------


def _table(value: _Value, known: frozenset[str], example: str) -> dict[str, Any]:
    """A table's keys, checked against `known`."""
    if not isinstance(value.raw, dict):
        raise value.error(f"must be a table with {example}")
    for key in value.raw:
        if key not in known:
            message = f"unknown key {key!r} (known: {', '.join(sorted(known))})"
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise value.table_error(message + (f"; did you mean {close[0]!r}?" if close else ""))
    return value.raw


def _entry(value: _Value, table: Mapping[str, Any], key: str, default: object) -> _Value:
    if key in table:
        return value.child(key, table[key])
    return _Value(default, _DEFAULT, f"{value.label}.{key}")


def _expose(value: _Value, tunnel: TunnelConfig, listen: Endpoint) -> ExposeConfig:
    """[expose]: where LAN machines log in, what they may reach, and pong."""
    table = _table(value, _EXPOSE_KEYS, 'listen = "0.0.0.0:2512", routes = [...], pong')
    listen_v = _entry(value, table, "listen", None)
    endpoint = None
    if listen_v.given:
        endpoint = _endpoint(listen_v, f"0.0.0.0:{DEFAULT_EXPOSE_PORT}")
        ip, port = endpoint
        if (port == listen[1] and "0.0.0.0" in (ip, listen[0])) or endpoint == listen:
            raise listen_v.error(
                f"clashes with where the VM side's frames arrive ({listen[0]}:{listen[1]}); "
                f"share on another port, like 0.0.0.0:{DEFAULT_EXPOSE_PORT}"
            )
    return ExposeConfig(
        listen=endpoint,
        # An accessor is told every exposed route in one access_config message.
        routes=_routes(_entry(value, table, "routes", []), tunnel, limit=ROUTES_PER_PART),
        pong=_bool(_entry(value, table, "pong", False)),
    )


def _endpoint(value: _Value, example: str) -> Endpoint:
    """ADDRESS:PORT, or :PORT for every address (as docker-connector's Go accepts it)."""
    text = _str(value, f'"{example}"')
    host, sep, port_text = text.rpartition(":")
    if not sep or not _DIGITS_RE.fullmatch(port_text):
        raise value.error(f'must be an IPv4 address and a port, like "{example}"')
    try:
        ip = IPv4Address(host or "0.0.0.0")
    except AddressValueError:
        raise value.error(f'must be an IPv4 address and a port, like "{example}"') from None
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise value.error(f'the port must be between 1 and 65535, like "{example}"')
    return (str(ip), port)


_LINK_EXAMPLE = "172.18.0.0/16+172.19.0.0/16"


def _links(value: _Value, tunnel: TunnelConfig) -> tuple[Link, ...]:
    """links: subnet pairs the agent lets reach each other, as sorted (lower, higher) pairs.
    A docker-connector.conf also unlinks (`iptables A-B`): the last line on a pair wins."""
    legacy = value.lines is not None
    linked: dict[Link, int] = {}  # pair -> index of the entry that linked it
    items = _list(value, f'["{_LINK_EXAMPLE}"]')
    for i, raw in enumerate(items):
        item = value.item(i, raw)
        text = _str(item, f'"{_LINK_EXAMPLE}"')
        if "+" in text:
            sides, on = text.split("+", 1), True
        elif legacy and "-" in text:
            sides, on = text.split("-", 1), False
        else:
            how = "A+B (A-B unlinks)" if legacy else "A+B"
            raise item.error(f"a link is two subnets written {how}, like {_LINK_EXAMPLE}")
        a, b = (_link_side(item, side, tunnel) for side in sides)
        if a == b:
            raise item.error(f"links {a} with itself; name two different subnets")
        if a.overlaps(b):
            raise item.error(f"{a} and {b} overlap; a link joins two separate subnets")
        pair = (min(a, b), max(a, b))
        if on:
            if pair in linked and not legacy:
                raise item.error("listed twice; remove the duplicate")
            linked[pair] = i
        else:
            linked.pop(pair, None)
    if len(linked) > MAX_LINKS:
        last = max(linked.values())
        raise value.item(last, items[last]).error(
            f"more than {MAX_LINKS} links; the agent takes at most {MAX_LINKS} pairs"
        )
    return tuple(sorted(linked))


def _link_side(item: _Value, text: str, tunnel: TunnelConfig) -> IPv4Network:
    """One side of a link: a subnet, or a bare address in it as docker-connector writes it
    (kept as a /32: the agent links the bridge whose subnet holds it)."""
    match = _CIDR_RE.fullmatch(text.strip())
    if not match:
        raise item.error(f"{quote(text)} is not a subnet; write two subnets joined by +, like "
                         f"{_LINK_EXAMPLE}")
    try:
        net = IPv4Network(text.strip(), strict=False)
    except ValueError as exc:
        raise item.error(f"{os_reason(exc)}; write it like {_LINK_EXAMPLE}") from None
    if match.group(2) is not None and net.network_address != IPv4Address(match.group(1)):
        raise item.error(f"{text} has host bits set; use {net}")
    if net.prefixlen == 0:
        raise item.error(f"{net} is every address; name a container subnet, like 172.18.0.0/16")
    _not_special(item, net)
    if net.overlaps(tunnel.network):
        raise item.error(f"{net} overlaps the tunnel network {tunnel.network} (addr); link "
                         f"container subnets, like {_LINK_EXAMPLE}")
    return net


def _hosts(value: _Value) -> tuple[HostsSource, ...]:
    """[[hosts]]: hosts files whose entries with these name suffixes the agent serves."""
    example = '[[hosts]] tables: file = "/etc/hosts", suffixes = [".local"]'
    if not isinstance(value.raw, list):
        raise value.error(f"must be {example} (note the double brackets)")
    sources: list[HostsSource] = []
    every: list[str] = []  # all suffixes: the agent gets them in one message
    for i, raw in enumerate(value.raw):
        entry = value.item(i, raw)
        table = _table(entry, _HOSTS_KEYS, 'file = "/etc/hosts" and suffixes = [".local"]')
        if "file" not in table or "suffixes" not in table:
            raise entry.table_error('needs file = "/etc/hosts" and suffixes = [".local"] '
                                    "(names ending in a suffix are served)")
        file_v = entry.child("file", table["file"])
        file = _path(file_v, '"/etc/hosts"')
        if any(s.file == file for s in sources):
            raise file_v.error("listed twice; give each hosts file one [[hosts]] table")
        suffixes_v = entry.child("suffixes", table["suffixes"])
        own: list[str] = []
        for j, raw_suffix in enumerate(_list(suffixes_v, '[".local"]')):
            item = suffixes_v.item(j, raw_suffix)
            suffix = _suffix(item)
            if suffix in own:
                raise item.error("listed twice; remove the duplicate")
            own.append(suffix)
            if suffix not in every:
                every.append(suffix)
            if len(every) > MAX_SUFFIXES:
                raise item.error(f"more than {MAX_SUFFIXES} suffixes in all; the agent's DNS "
                                 f"responder takes at most {MAX_SUFFIXES}")
        if not own:
            raise suffixes_v.error('must list at least one suffix, like [".local"]')
        sources.append(HostsSource(file, tuple(own)))
    return tuple(sources)


def _suffix(value: _Value) -> str:
    text = _str(value, '".local"').lower()  # DNS names are case-insensitive
    if len(text) > MAX_SUFFIX:
        raise value.error(f"longer than {MAX_SUFFIX} characters; use a shorter suffix")
    if not _SUFFIX_RE.fullmatch(text):
        raise value.error('must be the end of a DNS name, like ".local" (letters, digits, '
                          '"-", "_" and dots)')
    return text


_PROXY_EXAMPLE = '"127.0.0.1:5432:5432" or "8080"'


def _proxies(value: _Value, tunnel: TunnelConfig, listen: Endpoint) -> tuple[ProxyConfig, ...]:
    """proxy: host services containers reach at the host's tunnel address and a port."""
    found: list[ProxyConfig] = []
    ports: dict[int, _Value] = {}
    for i, raw in enumerate(_list(value, f"[{_PROXY_EXAMPLE.replace(' or ', ', ')}]")):
        item = value.item(i, raw)
        proxy = _proxy(item)
        ctun_own = listen[0] in ("0.0.0.0", str(tunnel.host_address))
        taken = {*ports, *([listen[1]] if ctun_own else [])}
        if proxy.port in taken:
            whose = (f"already proxied by {_name(ports[proxy.port])}" if proxy.port in ports
                     else f"ctun's own ({listen[0]}:{listen[1]})")
            free = (p for p in itertools.chain(range(proxy.port + 1, 65536), range(1024, 65536))
                    if p not in taken)
            raise item.error(f"listening port {proxy.port} is {whose}; give this proxy "
                             f"another, like {proxy.target[0]}:{proxy.target[1]}:{next(free)}")
        ports[proxy.port] = item
        found.append(proxy)
    return tuple(found)


def _proxy(value: _Value) -> ProxyConfig:
    """[IP:]PORT[:PORT]: the service at IP:PORT (IP 127.0.0.1 unless given), reached at the
    second PORT (the first unless given). Two parts are IP:PORT, or PORT:PORT if all digits."""
    text = _str(value, _PROXY_EXAMPLE)
    parts = text.split(":")
    if len(parts) == 1:
        ip, target, port = DEFAULT_LISTEN, parts[0], parts[0]
    elif len(parts) == 2 and _DIGITS_RE.fullmatch(parts[0]):
        ip, target, port = DEFAULT_LISTEN, parts[0], parts[1]
    elif len(parts) == 2:
        ip, target, port = parts[0], parts[1], parts[1]
    elif len(parts) == 3:
        ip, target, port = parts
    else:
        raise value.error(f"must be [IP:]PORT[:PORT], like {_PROXY_EXAMPLE}")
    try:
        address = IPv4Address(ip)
    except AddressValueError:
        raise value.error(f"{quote(ip)} is not an IPv4 address; write [IP:]PORT[:PORT], like "
                          f"{_PROXY_EXAMPLE}") from None
    if address.is_unspecified or address.is_multicast or address == IPv4Address(
            "255.255.255.255"):
        raise value.error(f"{address} is no service address; name the service's own, like "
                          f"127.0.0.1")
    numbers = []
    for part in (target, port):
        if not _DIGITS_RE.fullmatch(part) or not 1 <= int(part) <= 65535:
            raise value.error(f"{quote(part)} is not a port (1..65535); write [IP:]PORT[:PORT], "
                              f"like {_PROXY_EXAMPLE}")
        numbers.append(int(part))
    return ProxyConfig((str(address), numbers[0]), numbers[1])


def _name(value: _Value) -> str:
    """How to point at an earlier value: its line in a docker-connector.conf, else its key."""
    line = value.line()
    return f"line {line.number}" if line is not None else value.label


def _loglevel(value: _Value) -> str | None:
    if not value.given:
        return None  # as the command line says
    text = _str(value, '"info"')
    level = _LOG_LEVEL_NAMES.get(text.strip().lower())
    if level is None:
        raise value.error(f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def _wire(value: _Value) -> str:
    text = _str(value, '"ctun"')
    if text not in WIRES:
        raise value.error('must be "ctun" (the default) or "legacy" (docker-connector\'s '
                          'own format: no authentication, no encryption)')
    return text


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
            where = value.child(key, table[key]).where()
            raise ConfigError(f"{where}: [docker]: unknown key {key!r} (known: {known})")

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
    return legacy_config.toml_key(name)


# What a reload can apply to a running daemon; anything else takes a restart.
RELOADABLE = ("routes", "docker", "peers", "expose", "links", "hosts", "proxies", "loglevel")
RESTART_NEEDED = ("tunnel", "listen", "transport", "timers", "control_group", "wire")


def reload_host_config(current: HostConfig) -> tuple[HostConfig, list[str]]:
    """The config file read again (same flags): the settings a running daemon can take, and
    the names of the changed ones it cannot (they wait for a restart). ConfigError as ever."""
    fresh = load_host_config(current.source, current.overrides)
    applied = replace(current, **{name: getattr(fresh, name) for name in RELOADABLE})
    pending = [name for name in RESTART_NEEDED if getattr(fresh, name) != getattr(current, name)]
    # Turning Docker integration or the agent on or off changes what runs, not a filter.
    if (fresh.docker.enabled, fresh.docker.agent) != (current.docker.enabled,
                                                      current.docker.agent):
        pending.append("docker.enabled/agent")
        applied = replace(applied, docker=replace(fresh.docker, enabled=current.docker.enabled,
                                                  agent=current.docker.agent))
    return applied, pending
