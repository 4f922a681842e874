"""plugins/platform_linux: the Linux platform adapter (tun device + netlink)."""

from __future__ import annotations

from ...core.contracts import PlatformAdapter
from ...core.hookspecs import hookimpl


@hookimpl
def ctun_platform_adapter(platform: str) -> type[PlatformAdapter] | None:
    if not platform.startswith("linux"):
        return None
    # Imported here, not at module level: this plugin is registered on every OS, and
    # pytun/pyroute2 exist only on Linux.
    from .adapter import LinuxAdapter

    return LinuxAdapter
