"""The plugin manager: built-in plugins and third-party ones load through the same hooks.

Third-party plugins are modules (or objects) named by an entry point in the group `ctun`
(`[project.entry-points.ctun]`). Two environment variables change what happens here:

CTUN_PLUGINS=a,b
    Only the plugins named load, built-ins included. A name is an entry point name or a
    built-in module name, full (`ctun.plugins.transport_udp`) or its last part
    (`transport_udp`). Unset or empty: everything loads.
CTUN_TRACE_HOOKS=1
    Every hook call (and every plugin registration) is traced to stderr through pluggy's
    tracing: the hook, its arguments, and what it returned.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .contracts import PlatformAdapter, Transport

# Registered exactly like third-party plugins are, through the hooks they implement.
DEFAULT_PLUGINS = (
    "ctun.plugins.transport_udp",
    "ctun.plugins.transport_tcp",
    "ctun.plugins.platform_linux",
)

ENTRY_POINT_GROUP = "ctun"
# Comma-separated plugin names; when set, only these load (built-ins included).
ONLY_ENV = "CTUN_PLUGINS"
# "1" traces every hook call to stderr (any other value, or unset, does not).
TRACE_ENV = "CTUN_TRACE_HOOKS"
# describe()'s version for plugins that ship inside ctun itself.
BUILTIN = "built-in"


class PluginError(Exception):
    """A plugin is missing, broken or ambiguous; str() says which and what to do."""


def _allowed(name: str) -> bool:
    only = os.environ.get(ONLY_ENV)
    if not only:
        return True
    wanted = {n.strip() for n in only.split(",") if n.strip()}
    return name in wanted or name.rsplit(".", 1)[-1] in wanted


def _write_trace(line: str) -> None:
    # sys.stderr is looked up on every call, not bound once: whoever replaced it since the
    # manager was made (pytest's capture, a log redirect) gets the trace.
    sys.stderr.write(line)


def create_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    if os.environ.get(TRACE_ENV) == "1":
        # Before anything registers, so the trace also shows which plugins loaded.
        pm.trace.root.setwriter(_write_trace)
        pm.enable_tracing()
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
            # pluggy's own loader, one name at a time: it records the distribution for
            # list_plugin_distinfo() (versions in `ctun plugins`), and a plugin that fails
            # to import or to register fails alone.
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not take ctun down
            print(f"ctun: plugin {ep.name!r} failed to load and is skipped: {exc}", file=sys.stderr)


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


def describe(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """One dict per loaded plugin, in load order, for `ctun plugins`.

    Keys: name; version ("built-in" for ctun's own, the distribution's version for an
    entry point, None for a plugin registered in code); distribution (its project name, or
    None); module and file (where its code is; file may be None); hooks (the hook names it
    implements); transports (names it registers); platform_adapter (the name of the adapter
    it offers for this machine's sys.platform, or None); errors (one line per hook that
    raised while being asked: a broken plugin is shown, not fatal).
    """
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    return [
        _describe_one(pm, name, plugin, dists.get(id(plugin)))
        for name, plugin in pm.list_name_plugin()
        if plugin is not None  # None is a blocked name: pluggy keeps it as a placeholder
    ]


def _describe_one(pm: pluggy.PluginManager, name: str, plugin: object, dist: Any
                  ) -> dict[str, Any]:
    hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or ())
    module = plugin if isinstance(plugin, ModuleType) else sys.modules.get(
        type(plugin).__module__)
    if name in DEFAULT_PLUGINS:
        version: str | None = BUILTIN
    else:
        version = str(dist.version) if dist is not None else None
    entry: dict[str, Any] = {
        "name": name,
        "version": version,
        "distribution": str(dist.project_name) if dist is not None else None,
        "module": module.__name__ if module is not None else type(plugin).__module__,
        "file": getattr(module, "__file__", None),
        "hooks": hooks,
        "transports": [],
        "platform_adapter": None,
        "errors": [],
    }
    # Each question goes to this plugin alone: the other plugins are left out of the call.
    others = [p for _, p in pm.list_name_plugin() if p is not None and p is not plugin]
    errors: list[str] = entry["errors"]
    if "ctun_register_transports" in hooks:
        names: list[str] = entry["transports"]
        _ask(errors, lambda: pm.subset_hook_caller("ctun_register_transports", others)(
            register=lambda cls: names.append(str(cls.name))))
    if "ctun_platform_adapter" in hooks:
        def adapter() -> None:
            cls = pm.subset_hook_caller("ctun_platform_adapter", others)(platform=sys.platform)
            entry["platform_adapter"] = None if cls is None else str(cls.name)

        _ask(errors, adapter)
    return entry


def _ask(errors: list[str], question: Callable[[], object]) -> None:
    try:
        question()
    except Exception as exc:  # describing a broken plugin must not break `ctun plugins`
        errors.append(f"{type(exc).__name__}: {exc}")
