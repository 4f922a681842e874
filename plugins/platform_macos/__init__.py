"""plugins/platform_macos: the macOS platform adapter (utun + ifconfig/route/netstat)."""

from __future__ import annotations

from ...core.contracts import PlatformAdapter
from ...core.hookspecs import hookimpl


@hookimpl
def ctun_platform_adapter(platform: str) -> type[PlatformAdapter] | None:
    if platform != "darwin":
        return None
    # Imported on demand, like the Linux plugin: this plugin may be registered on every OS.
    from .adapter import MacOSAdapter

    return MacOSAdapter
