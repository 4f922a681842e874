"""The plugin manager: built-in plugins and third-party ones load through the same hooks."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import pluggy

from . import hookspecs
from .contracts import PlatformAdapter, Transport

# Registered exactly like third-party plugins are, through the hooks they implement.
DEFAULT_PLUGINS = (
    "ctun.plugins.transport_udp",
    "ctun.plugins.platform_linux",
)

ENTRY_POINT_GROUP = "ctun"
# Comma-separated plugin names; when set, only these load (built-ins included).
ONLY_ENV = "CTUN_PLUGINS"


class PluginError(Exception):
    """A plugin is missing, broken or ambiguous; str() says which and what to do."""


def _allowed(name: str) -> bool:
    only = os.environ.get(ONLY_ENV)
    if not only:
        return True
    wanted = {n.strip() for n in only.split(",") if n.strip()}
    return name in wanted or name.rsplit(".", 1)[-1] in wanted


def create_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for modname in DEFAULT_PLUGINS:
        if _allowed(modname):
            pm.register(importlib.import_module(modname), name=modname)
    if load_entry_points:
        _load_entry_points(pm)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if not _allowed(ep.name) or pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take ctun down
            print(f"ctun: plugin {ep.name!r} failed to load and is skipped: {exc}", file=sys.stderr)
            continue
        pm.register(plugin, name=ep.name)


def transports(pm: pluggy.PluginManager) -> dict[str, type[Transport]]:
    found: dict[str, type[Transport]] = {}

    def register(cls: type[Transport]) -> None:
        if cls.name in found and found[cls.name] is not cls:
            raise PluginError(f"two plugins register a transport named {cls.name!r}")
        found[cls.name] = cls

    pm.hook.ctun_register_transports(register=register)
    return found


def transport(pm: pluggy.PluginManager, name: str) -> type[Transport]:
    available = transports(pm)
    if name not in available:
        names = ", ".join(sorted(available)) or "none"
        raise PluginError(f"no transport named {name!r} is loaded (available: {names})")
    return available[name]


def platform_adapter(pm: pluggy.PluginManager, platform: str | None = None) -> PlatformAdapter:
    cls: Any = pm.hook.ctun_platform_adapter(platform=platform or sys.platform)
    if cls is None:
        raise PluginError(f"no platform adapter supports {platform or sys.platform!r}")
    adapter: PlatformAdapter = cls()
    return adapter
