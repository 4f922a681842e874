"""plugins/platform_windows: the Windows platform adapter (TAP-windows6 + netsh/route)."""

from __future__ import annotations

from ...core.contracts import PlatformAdapter
from ...core.hookspecs import hookimpl


@hookimpl
def ctun_platform_adapter(platform: str) -> type[PlatformAdapter] | None:
    if platform != "win32":
        return None
    # Imported here, not at module level, like the other platform plugins: only the
    # platform that needs an adapter pays for importing it.
    from .adapter import WindowsAdapter

    return WindowsAdapter
