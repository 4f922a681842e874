"""Sharing with LAN machines: the expose listener and the accessor peers (a host feature).

An accessor is a LAN machine running `ctun access` with its own key. It gets a virtual
address in the tunnel network, may reach only the exposed routes, and its packets are relayed
by the engine to the VM peer without ever touching the host's interface (core/engine.py).

The peers in force are the config file's `[peers.*]` plus the peer store's (`ctun peer add`,
core/peer_store.py). A store entry that clashes with the config (same name, key or address)
is left out and reported in `ctun status`: the config file wins. Sharing is off unless
`expose.listen` is set; while it is off no accessor is admitted at all, whichever listener
it knocks on.

Every change (a reloaded config, a changed store, `ctun peer add/rm`) goes through one
`sync`, which compares what should be with what the engine has and changes only the
difference: peers added, revoked (or re-added with a new key or address), the listener
opened, closed or moved, and connected accessors told their new routes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from . import control, messages, peer_store, runtime
from .config import VM_PEER, HostConfig, PeerConfig, default_state_dir
from .contracts import Endpoint, Transport
from .engine import PeerSpec
from .host_context import HostContext
from .keys import ConfigError
from .session import Peer

log = logging.getLogger("ctun.access")


def spec_for(peer: PeerConfig) -> PeerSpec:
    """What the engine needs of a peer: an accessor owns exactly its one address."""
    if peer.ip is None:
        return PeerSpec(peer.name, peer.key, peer.allowed, peer.allowed)
    own = (IPv4Network(f"{peer.ip}/32"),)
    return PeerSpec(peer.name, peer.key, own, own, accessor=True)


def sharing(cfg: HostConfig) -> bool:
    return cfg.expose.listen is not None


def admitted(cfg: HostConfig, peers: list[PeerConfig]) -> list[PeerConfig]:
    """The peers the engine should know: accessors only while sharing is on."""
    return [p for p in peers if p.ip is None or sharing(cfg)]


@dataclass
class Merged:
    peers: dict[str, PeerConfig]  # every peer but the VM's, by name: config, then store
    problems: list[str] = field(default_factory=list)


def merge(cfg: HostConfig, stored: list[PeerConfig], store: Path) -> Merged:
    """The config's peers plus the store's; a store entry that clashes is left out."""
    network = cfg.tunnel.network
    reserved = {network.network_address, network.broadcast_address,
                cfg.tunnel.host_address, cfg.tunnel.vm_address}
    merged = Merged({p.name: p for p in cfg.peers if p.name != VM_PEER})
    keys = {p.key: p.name for p in cfg.peers}
    addresses = {p.ip: p.name for p in cfg.peers if p.ip is not None}
    for p in stored:
        where = f"{store}: peer {p.name!r}"
        assert p.ip is not None  # the store holds accessors only
        if p.name in merged.peers or p.name == VM_PEER:
            clash = f"is also in the config file; the config's is used ({p.name} in one of " \
                    f"them should be renamed)"
        elif p.key in keys:
            clash = f"has the same key as peer {keys[p.key]!r}; every peer needs its own key"
        elif p.ip not in network:
            clash = f"address {p.ip} is outside the tunnel network {network}"
        elif p.ip in reserved:
            clash = f"address {p.ip} is the tunnel's own (network, broadcast, host or VM)"
        elif p.ip in addresses:
            clash = f"address {p.ip} is also peer {addresses[p.ip]!r}'s"
        else:
            merged.peers[p.name] = p
            keys[p.key] = p.name
            addresses[p.ip] = p.name
            continue
        merged.problems.append(f"{where} {clash}; not admitted")
    return merged


class Accessors:
    """Keeps the engine's peers and the expose listener in step with config and store."""

    def __init__(self, ctx: HostContext, state_dir: Path) -> None:
        self._ctx = ctx
        self._engine = ctx.engine
        self.store = peer_store.store_path(state_dir)
        self._state_dir = state_dir
        self._lock = threading.RLock()  # one sync at a time: reload, watcher, control socket
        self._cfg = ctx.cfg
        # What the engine has now: the daemon built it with peer_specs(cfg).
        self._peers = {p.name: p for p in admitted(ctx.cfg, list(ctx.cfg.peers))
                       if p.name != VM_PEER}
        self._stored: list[PeerConfig] = []  # the last good store
        self._store_error = ""
        self._problems: list[str] = []
        self._listen: Endpoint | None = None
        self._transports: list[Transport] = []
        self._listen_error = ""
        self._sent: dict[str, dict[str, Any]] = {}  # the access_config last sent, per accessor

    # --- applying ----------------------------------------------------------------------

    def sync(self, cfg: HostConfig | None = None) -> dict[str, bool]:
        """Bring everything in line with `cfg` (default: the config in force) and the store
        as it is now. Returns the peers revoked, each with whether it was connected."""
        with self._lock:
            cfg = cfg or self._ctx.cfg
            self._read_store()
            merged = merge(cfg, self._stored, self.store)
            self._problems = merged.problems
            for problem in merged.problems:
                log.warning("%s", problem)
            desired = {p.name: p for p in admitted(cfg, list(merged.peers.values()))}
            self._sync_listener(cfg)
            # The policy first, so a peer added below never has a moment without it.
            self._engine.set_expose(cfg.expose.routes, cfg.tunnel.host_address, cfg.expose.pong)
            revoked = self._sync_peers(desired)
            self._cfg = cfg
            self._resend_changed()
            return revoked

    def _read_store(self) -> None:
        try:
            self._stored = peer_store.load(self._state_dir)
            self._store_error = ""
        except ConfigError as exc:
            # Like a bad config file: the last good store stays in force, and we say why.
            if str(exc) != self._store_error:
                log.error("peer store not applied, keeping the last good one: %s", exc)
            self._store_error = str(exc)

    def _sync_peers(self, desired: dict[str, PeerConfig]) -> dict[str, bool]:
        revoked: dict[str, bool] = {}
        for name, old in list(self._peers.items()):
            new = desired.get(name)
            if new is not None and (new.key, new.ip) == (old.key, old.ip):
                if new.allowed != old.allowed and new.ip is None:
                    self._engine.set_peer_networks(name, new.allowed, new.allowed)
                    log.info("peer %s: allowed networks now %s", name,
                             ", ".join(map(str, new.allowed)))
                self._peers[name] = new
                continue
            # Gone, or a new key or address: end it now; a changed one is added back below.
            why = "revoked" if new is None else "its key or address changed"
            revoked[name] = self._engine.remove_peer(name, why)
            del self._peers[name]
            self._sent.pop(name, None)
            log.info("peer %s %s%s", name, why,
                     "; its session ended" if revoked[name] else "")
        for name, new in desired.items():
            if name in self._peers:
                continue
            self._engine.add_peer(spec_for(new))
            self._peers[name] = new
            what = f"accessor at {new.ip}" if new.ip is not None else "peer"
            log.info("%s %s admitted (from the %s)", what, name,
                     "peer store" if new.origin == "store" else "config file")
        return revoked

    def _sync_listener(self, cfg: HostConfig) -> None:
        want = cfg.expose.listen
        if want == self._listen and not self._listen_error:
            return
        for transport in self._transports:
            self._engine.remove_transport(transport)
        if self._transports:
            assert self._listen is not None
            log.info("expose listener on %s:%d closed", *self._listen)
        self._transports, self._listen, self._listen_error = [], None, ""
        if want is None:
            return
        opened: list[Transport] = []
        assert self._ctx.pm is not None
        for cls in runtime.transport_classes(self._ctx.pm, cfg.transport):
            try:
                opened.append(cls.listen(want))
            except OSError as exc:
                for transport in opened:
                    transport.close()
                self._listen_error = (f"cannot listen on {cls.name} {want[0]}:{want[1]}: "
                                      f"{exc.strerror or exc}; change `expose`")
                log.error("sharing is off: %s", self._listen_error)
                return
        for transport in opened:
            self._engine.add_transport(transport, accessors=True)
        self._transports, self._listen = opened, want
        log.info("expose listener on %s %s:%d; exposed routes: %s",
                 "+".join(t.name for t in opened), *want,
                 ", ".join(map(str, cfg.expose.routes)) or "none")

    def close(self) -> None:
        """The daemon is stopping (its engine already stopped): release the listener."""
        with self._lock:
            for transport in self._transports:
                transport.close()
            self._transports = []

    # --- telling accessors -------------------------------------------------------------

    def access_config(self, peer: PeerConfig) -> dict[str, Any]:
        tunnel = self._cfg.tunnel
        routes = [str(r) for r in self._cfg.expose.routes]
        return {"addr": f"{peer.ip}/{tunnel.network.prefixlen}",
                "peer": str(tunnel.host_address), "mtu": tunnel.mtu,
                "routes": routes[:messages.ROUTES_PER_PART]}

    def peer_up(self, name: str) -> None:
        """Timer thread: an accessor logged in (or came back); tell it its settings."""
        peer = self._peers.get(name)
        if peer is not None and peer.ip is not None:
            self._send(name, peer)

    def _send(self, name: str, peer: PeerConfig) -> None:
        body = self.access_config(peer)
        self._engine.send_control(name, "access_config", **body)
        self._sent[name] = body

    def _resend_changed(self) -> None:
        connected = {p.name for p in self._engine.peers if p.state == "up"}
        for name, peer in self._peers.items():
            if peer.ip is None or name not in connected:
                continue
            if self._sent.get(name) != self.access_config(peer):
                self._send(name, peer)

    # --- control requests and status --------------------------------------------------

    def _named(self, request: dict[str, Any]) -> str:
        name = request.get("name")
        if not isinstance(name, str) or not peer_store.NAME_RE.fullmatch(name):
            raise control.RequestError("name must be a peer name, like alice")
        return name

    def request_add(self, request: dict[str, Any]) -> dict[str, Any]:
        """`ctun peer add` wrote the store: apply it now. Only the store says who is a peer,
        so this request can admit nobody the store does not name."""
        name = self._named(request)
        self.sync()
        if self._store_error:
            raise control.RequestError(f"peer store not applied: {self._store_error}")
        if name not in self._peers:
            why = [p for p in self._problems if f"peer {name!r}" in p]
            if why:
                raise control.RequestError(why[0])
            if not sharing(self._cfg):
                raise control.RequestError(
                    f"peer {name} is stored but sharing is off; set expose and reload")
            raise control.RequestError(f"no peer {name} in {self.store}")
        return {"peer": self._describe(name, self._peers[name], self._states())}

    def request_remove(self, request: dict[str, Any]) -> dict[str, Any]:
        """`ctun peer rm` took it out of the store: revoke it now."""
        name = self._named(request)
        revoked = self.sync()
        still = self._peers.get(name)
        if still is not None:
            where = "the config file" if still.origin == "config" else str(self.store)
            raise control.RequestError(f"peer {name} is still in {where}; remove it there")
        return {"peer": name, "was_admitted": name in revoked,
                "was_connected": revoked.get(name, False)}

    def _states(self) -> dict[str, Peer]:
        # The engine's own peers, not a snapshot: status is asked several times a second.
        return {p.name: p for p in self._engine.peers}

    def _describe(self, name: str, peer: PeerConfig, states: dict[str, Peer]
                  ) -> dict[str, Any]:
        state = states.get(name)
        endpoint = state.endpoint if state else None
        return {"name": name, "ip": str(peer.ip) if peer.ip else None, "origin": peer.origin,
                "state": state.state if state else "unknown",
                "endpoint": list(endpoint) if endpoint else None,
                "drops": state.counters.drops() if state else {}}

    def status(self) -> dict[str, Any]:
        cfg = self._cfg
        states = self._states()
        with self._lock:
            accessors = [self._describe(n, p, states) for n, p in self._peers.items()
                         if p.ip is not None]
            problems = list(self._problems)
            if self._store_error:
                problems.append(f"peer store not applied: {self._store_error}")
            if self._listen_error:
                problems.append(self._listen_error)
            if len(cfg.expose.routes) > messages.ROUTES_PER_PART:
                problems.append(f"only the first {messages.ROUTES_PER_PART} exposed routes "
                                f"are sent to accessors")
            listen = f"{self._listen[0]}:{self._listen[1]}" if self._listen else None
            return {"access": {
                "sharing": listen is not None,
                "network": str(cfg.tunnel.network),
                "host_address": str(cfg.tunnel.host_address),
                "vm_address": str(cfg.tunnel.vm_address),
                "expose": {"listen": listen,
                           "configured": (f"{cfg.expose.listen[0]}:{cfg.expose.listen[1]}"
                                          if cfg.expose.listen else None),
                           "transports": [t.name for t in self._transports],
                           "routes": [str(r) for r in cfg.expose.routes],
                           "pong": cfg.expose.pong},
                "accessors": accessors,
                "config_peers": sorted(p.name for p in cfg.peers),
                "taken": sorted({str(p.ip) for p in [*cfg.peers, *self._stored]
                                 if p.ip is not None}),
                "store": str(self.store),
                "problems": problems,
            }}


def setup(ctx: HostContext) -> None:
    """Host feature: admit stored accessors, open the expose listener, follow changes."""
    accessors = Accessors(ctx, default_state_dir())
    ctx.resources.callback(accessors.close)
    accessors.sync(ctx.cfg)
    ctx.on_peer_up.append(accessors.peer_up)

    def reconfigure(cfg: HostConfig) -> None:
        accessors.sync(cfg)

    ctx.on_reconfigure.append(reconfigure)
    ctx.watched_files.append(lambda: [accessors.store])
    ctx.status_parts.append(accessors.status)
    ctx.handlers["peer_add"] = accessors.request_add
    ctx.handlers["peer_remove"] = accessors.request_remove
