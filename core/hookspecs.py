"""pluggy hook specifications for ctun plugins; implementations use `hookimpl`.

Hooks are called with keyword arguments only, and never once per packet.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from .contracts import PlatformAdapter, Transport

PROJECT = "ctun"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def ctun_register_transports(register: Callable[[type[Transport]], None]) -> None:
    """Register transport classes by calling `register(cls)` once for each.

    Every plugin's implementation is called (collect-all); the engine then picks one by its
    `name` class attribute. Registering two transports with the same name is an error.
    """


@hookspec(firstresult=True)
def ctun_platform_adapter(platform: str) -> type[PlatformAdapter] | None:
    """Return the adapter class for `platform` (a `sys.platform` value), or None.

    The first non-None answer wins, so a third-party adapter registered later than the
    built-ins takes precedence over them.
    """


@hookspec
def ctun_session_state_changed(peer: str, state: str, reason: str) -> None:
    """Called when a peer's session changes state: "waiting" (host side, before its first
    handshake), "connecting" (VM side, handshaking), "up", or "down" (host side, gone quiet).

    Called from the engine's timer thread, never from the packet path: keep it quick.
    """
