"""What `ctun peer add / rm / list` do: edit the peer store, tell a running daemon, and say
what the colleague runs. Errors are ConfigError or ControlError, one line each.

The command writes the store itself (it runs as root) and only then asks the daemon to apply
it: the control socket is open to a group, and a request over it can make the daemon re-read
the store, never add a peer of its own choosing.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from . import config, control, peer_store
from .access import DEFAULT_PORT, parse_remote
from .contracts import Endpoint
from .keys import ConfigError, encode_key

ANY = "0.0.0.0"
TEST_NET = ("192.0.2.1", 9)
UNKNOWN_HOST = "THIS-HOST"  # connecting a UDP socket sends nothing; it picks the route


@dataclass(frozen=True)
class HostView:
    """What adding a peer must know of this host: from the running daemon if there is one
    (it may run with flags the config file does not show), else from the config file."""

    network: IPv4Network
    host_address: IPv4Address
    vm_address: IPv4Address
    names: frozenset[str]  # peers of the config file
    taken: tuple[IPv4Address, ...]  # addresses of config (and, from a daemon, store) peers
    expose: Endpoint | None
    config_source: str | None
    running: dict[str, Any] | None  # the daemon's "access" status, None when not running


def running_status(interface: str) -> dict[str, Any] | None:
    """The running daemon's status, None when none answers on `interface`'s socket."""
    try:
        status: dict[str, Any] = control.request(control.socket_path(interface),
                                                 "status")["status"]
    except control.ControlError:
        return None
    return status


def host_view(config_path: str | None, interface: str) -> HostView:
    status = running_status(interface)
    part = status.get("access") if status else None
    if isinstance(part, dict):
        configured = part["expose"]["configured"]
        source = status.get("config") if status else None
        if isinstance(source, dict):
            source = source.get("source") or source.get("file")
        return HostView(
            IPv4Network(part["network"]), IPv4Address(part["host_address"]),
            IPv4Address(part["vm_address"]), frozenset(part.get("config_peers", [])),
            tuple(IPv4Address(a) for a in part.get("taken", [])),
            parse_remote(configured) if configured else None,
            source if isinstance(source, str) else None, part)
    cfg = config.check_host_config(config_path)
    return HostView(
        cfg.tunnel.network, cfg.tunnel.host_address, cfg.tunnel.vm_address,
        frozenset(p.name for p in cfg.peers),
        tuple(p.ip for p in cfg.peers if p.ip is not None),
        cfg.expose.listen, cfg.source, None)


def lan_address() -> str | None:
    """This machine's address on the way to the rest of the world (its primary LAN one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect(TEST_NET)
        address: str = sock.getsockname()[0]
        return None if address == ANY else address
    except OSError:
        return None
    finally:
        sock.close()


def remote_for(view: HostView, remote: str | None) -> str:
    """Where the colleague connects: --remote, else the expose address, else this machine's
    LAN address and the expose port."""
    if remote:
        host, port = parse_remote(remote)
        return f"{host}:{port}"
    port = view.expose[1] if view.expose else DEFAULT_PORT
    if view.expose and view.expose[0] != ANY:
        return f"{view.expose[0]}:{port}"
    return f"{lan_address() or UNKNOWN_HOST}:{port}"


def sharing_hint(view: HostView) -> str:
    where = view.config_source or str(config.DEFAULT_CONFIG_PATH)
    return (f'sharing is off here: add  [expose] listen = "{ANY}:{DEFAULT_PORT}"  and the '
            f"routes to expose to {where}, then `sudo ctun reload`")


def add(name: str, ip_text: str | None, remote: str | None, config_path: str | None,
        interface: str) -> list[str]:
    """Store a new accessor and return the lines to print: the command first."""
    peer_store.check_name(name)
    ip = None
    if ip_text is not None:
        try:
            ip = IPv4Address(ip_text)
        except ValueError:
            raise ConfigError(f"--ip {ip_text}: not an IPv4 address, like 192.168.251.10"
                              ) from None
    view = host_view(config_path, interface)
    if name in view.names or name == config.VM_PEER:
        raise ConfigError(f"peer {name!r} is already in the config file "
                          f"({view.config_source}); choose another name")
    where = remote_for(view, remote)  # checked before anything is written
    state_dir = config.default_state_dir()
    peer = peer_store.add(state_dir, name, peer_store.new_key(), view.network,
                          view.host_address, view.vm_address, view.taken, ip)
    # The key goes in through a pipe from the shell's own echo: never an argument of a
    # process, so other users of the colleague's machine cannot read it in `ps`.
    lines = [f"echo {encode_key(peer.key)} | sudo ctun access --remote {where} --key-file -"]
    if where.startswith(UNKNOWN_HOST + ":"):
        lines.append(f"this machine's LAN address is unknown (no route out): replace "
                     f"{UNKNOWN_HOST} with it, or pass --remote HOST:PORT")
    if view.expose is None:
        lines.append(sharing_hint(view))
    if view.running is None:
        lines.append(f"ctun is not running here: {name} ({peer.ip}) is admitted when it starts")
        return lines
    try:
        control.request(control.socket_path(interface), "peer_add", name=name)
    except control.ControlError as exc:
        if view.expose is not None:
            lines.append(f"stored, but the running ctun did not admit {name}: {exc}")
    return lines


def remove(name: str, interface: str) -> str:
    """Delete from the store, then revoke in the running daemon at once."""
    peer_store.check_name(name)
    state_dir = config.default_state_dir()
    removed = peer_store.remove(state_dir, name)
    try:
        answer: dict[str, Any] | None = control.request(
            control.socket_path(interface), "peer_remove", name=name)
    except control.ControlError as exc:
        if "no ctun" not in str(exc):
            raise
        answer = None
    if not removed and not (answer and answer.get("was_admitted")):
        raise ConfigError(f"no peer {name} in {peer_store.store_path(state_dir)} (peers of "
                          f"the config file are removed there)")
    if answer is None:
        return f"peer {name} removed (ctun is not running here)"
    ended = "; its session was ended" if answer.get("was_connected") else ""
    return f"peer {name} removed and revoked{ended}"


def listing(config_path: str | None, interface: str) -> list[dict[str, Any]]:
    """The accessors: as the running daemon sees them, else from the store and config."""
    status = running_status(interface)
    part = status.get("access") if status else None
    if isinstance(part, dict):
        rows = [dict(a) for a in part["accessors"]]
        rows += [{"name": "", "ip": None, "origin": "", "state": "", "problem": p}
                 for p in part.get("problems", [])]
        return rows
    cfg = config.check_host_config(config_path)
    stored = peer_store.load(config.default_state_dir())
    return [{"name": p.name, "ip": str(p.ip), "origin": p.origin, "state": "not running"}
            for p in [*cfg.peers, *stored] if p.ip is not None]


def format_listing(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'NAME':<16} {'IP':<16} {'FROM':<7} STATE"]
    for r in rows:
        if r.get("problem"):
            lines.append(f"problem: {r['problem']}")
            continue
        endpoint = r.get("endpoint")
        at = f" from {endpoint[0]}:{endpoint[1]}" if endpoint and r["state"] == "up" else ""
        lines.append(f"{r['name']:<16} {r['ip'] or '-':<16} {r['origin']:<7} {r['state']}{at}")
    return lines


def store_file() -> Path:
    return peer_store.store_path(config.default_state_dir())
