"""What the host daemon and the VM agent share: signals, the control socket, orderly teardown."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network
from types import FrameType
from typing import Any

import pluggy

from . import control, plugins
from .contracts import PlatformAdapter, PlatformError, Transport
from .engine import Engine, EngineTimers

log = logging.getLogger("ctun")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM (and SIGHUP: the terminal went away)."""
    stop = threading.Event()
    # SIGHUP does not exist on Windows.
    signals = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
               if hasattr(signal, name)]

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def platform(
    pm: pluggy.PluginManager, interface: str
) -> Iterator[tuple[PlatformAdapter, contextlib.ExitStack]]:
    """The platform adapter, after cleaning what a crashed run left, and a stack of what to
    close on the way out (the adapter itself last: it takes the interface and routes along).
    """
    adapter = plugins.platform_adapter(pm)
    for line in adapter.cleanup_leftovers(interface):
        log.warning("cleaned up after a previous run: %s", line)
    with contextlib.ExitStack() as resources:
        resources.callback(log.info, "stopped; interface %s and its routes removed", interface)
        resources.callback(adapter.close)
        yield adapter, resources


def check_tunnel_network(adapter: PlatformAdapter, network: IPv4Network) -> None:
    """Refuse a tunnel network that overlaps a route the host has already: traffic for one
    of them would go to the other."""
    conflict = adapter.conflicting_route(network)
    if conflict is not None:
        raise PlatformError(
            f"the tunnel network {network} overlaps the host route {conflict}; "
            "choose another `addr`"
        )


AUTO = "auto"
AUTO_ORDER = ("udp", "tcp")  # UDP first; TCP when Docker Desktop's UDP forwarding fails


def transport_classes(pm: pluggy.PluginManager, name: str) -> list[type[Transport]]:
    """The transports to use, in order of preference: "auto" is UDP with TCP fallback;
    any other name pins that one transport."""
    if name == AUTO:
        available = plugins.transports(pm)
        chosen = [available[each] for each in AUTO_ORDER if each in available]
        if not chosen:
            raise plugins.PluginError("no udp or tcp transport is loaded; check CTUN_PLUGINS")
        missing = [each for each in AUTO_ORDER if each not in available]
        if missing:
            log.warning("transport %s is not available here: no fallback to it",
                        ", ".join(missing))
        return chosen
    return [plugins.transport(pm, name)]


def engine_timers(cfg: Any) -> EngineTimers:
    """The engine's timers from a host or agent config."""
    t = cfg.timers
    return EngineTimers(t.keepalive, t.dead_after, t.rekey_after, t.handshake_skew)


# What a peer's session can be in; the engine's other events ("hello", "transport") are news
# for the log, not states.
SESSION_STATES = frozenset({"waiting", "connecting", "up", "down"})


def event_sink(pm: pluggy.PluginManager) -> Callable[[str, str, str], None]:
    def sink(peer: str, state: str, reason: str) -> None:
        if state in SESSION_STATES:
            pm.hook.ctun_session_state_changed(peer=peer, state=state, reason=reason)

    return sink


def serve(
    engine: Engine,
    name: str,
    stop: threading.Event,
    extra_status: Callable[[], dict[str, Any]],
    handlers: dict[str, control.Handler] | None = None,
    group: str | None = None,
    owner: int | None = None,
) -> None:
    """Run the engine and its control socket until a signal or a shutdown request.

    The socket is named after the configured interface (`name`), which is what `ctun status
    --interface` asks for; the OS may call the interface itself something else (utunN).
    """

    def shutdown(_request: dict[str, Any]) -> dict[str, Any]:
        log.info("shutdown requested over the control socket")
        stop.set()
        return {}

    def status(_request: dict[str, Any]) -> dict[str, Any]:
        return {"status": {**engine.snapshot(), **extra_status()}}

    def peer_of(request: dict[str, Any]) -> str:
        """The peer a request names; the only one when it names none and there is one."""
        peer = request.get("peer")
        names = [p.name for p in engine.peers]
        if peer is None and len(names) == 1:
            peer = names[0]
        if peer not in names:
            raise control.RequestError(f"peer must be one of {', '.join(names)}")
        return str(peer)

    def disconnect(why: str) -> control.Handler:
        def handler(request: dict[str, Any]) -> dict[str, Any]:
            peer = peer_of(request)
            log.info("peer %s: %s over the control socket", peer, why)
            return {"peer": peer, "was_connected": engine.disconnect(peer, why)}

        return handler

    def switch(request: dict[str, Any]) -> dict[str, Any]:
        peer, to = peer_of(request), request.get("to")
        try:
            engine.switch_transport(peer, str(to))
        except ValueError as exc:
            raise control.RequestError(str(exc)) from None
        return {"peer": peer, "to": to}

    handlers = {
        "status": status,
        "switch_transport": switch,
        "shutdown": shutdown,
        "peers": lambda _req: {"peers": engine.snapshot()["peers"]},
        "transports": lambda _req: {"transports": engine.snapshot()["transports"]},
        "reconnect": disconnect("reconnect requested"),
        "kick": disconnect("disconnected by an administrator"),
        **(handlers or {}),
    }
    server = control.ControlServer(control.socket_path(name), handlers, group=group,
                                   stream=status, owner=owner)
    engine.start()
    server.start()
    log.info("control socket at %s", server.path)
    try:
        while not stop.wait(0.2):
            if engine.stopped:
                raise RuntimeError("the tunnel engine stopped unexpectedly (see above)")
    finally:
        server.close()
        engine.stop()


def sudo_user() -> int | None:
    """The uid of the user who ran us through sudo (their TUI may use our socket), if any."""
    uid = os.environ.get("SUDO_UID", "")
    return int(uid) if uid.isdigit() and int(uid) != 0 else None
