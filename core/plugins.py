"""The plugin manager: built-in plugins and third-party ones load through the same hooks.

Third-party plugins are modules (or objects) named by an entry point in the group `ctun`
(`[project.entry-points.ctun]`). Two environment variables change what happens here:

CTUN_PLUGINS=a,b
    Only the plugins named load, built-ins included. A name is an entry point name or a
    built-in module name, full (`ctun.plugins.transport_udp`) or its last part
    (`transport_udp`). Unset or empty: everything loads.
CTUN_TRACE_HOOKS=1
    Every hook call is traced to stderr through pluggy's tracing: the hook and its arguments
    when it is called, and what it returned.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any

import pluggy
from pluggy import HookImpl

from . import hookspecs
from .contracts import PlatformAdapter, Transport

# Registered exactly like third-party plugins are, through the hooks they implement.
DEFAULT_PLUGINS = (
    "ctun.plugins.transport_udp",
    "ctun.plugins.transport_tcp",
    "ctun.plugins.platform_linux",
    "ctun.plugins.platform_macos",
    "ctun.plugins.platform_windows",
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
    callers = pm.get_hookcallers(plugin) or []
    hooks = sorted(caller.name for caller in callers)
    module = plugin if isinstance(plugin, ModuleType) else _defining_module(plugin, callers)
    if name in DEFAULT_PLUGINS:
        version: str | None = BUILTIN
    else:
        version = str(dist.version) if dist is not None else None
    entry: dict[str, Any] = {
        "name": name,
        "version": version,
        "distribution": str(dist.project_name) if dist is not None else None,
        "module": module.__name__ if module is not None else None,
        "file": getattr(module, "__file__", None),
        "hooks": hooks,
        "transports": [],
        "platform_adapter": None,
        "errors": [],
    }
    names: list[str] = entry["transports"]
    for impl in _impls(callers, plugin, "ctun_register_transports"):
        _ask(entry, "ctun_register_transports", impl,
             register=lambda cls: names.append(str(cls.name)))
    for impl in _impls(callers, plugin, "ctun_platform_adapter"):
        cls = _ask(entry, "ctun_platform_adapter", impl, platform=sys.platform)
        entry["platform_adapter"] = None if cls is None else str(getattr(cls, "name", cls))
    return entry


def _impls(callers: list[pluggy.HookCaller], plugin: object, hook: str) -> list[HookImpl]:
    """The plugin's own implementations of `hook`; wrappers provide nothing, so not those."""
    return [impl for caller in callers if caller.name == hook
            for impl in caller.get_hookimpls()
            if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper)]


def _defining_module(plugin: object, callers: list[pluggy.HookCaller]) -> ModuleType | None:
    """Where a plugin that is not a module has its code: the module of its hook functions
    (an object's class may come from elsewhere, as types.SimpleNamespace does)."""
    for caller in callers:
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin:
                return sys.modules.get(getattr(impl.function, "__module__", "") or "")
    return sys.modules.get(type(plugin).__module__)


def _ask(entry: dict[str, Any], hook: str, impl: HookImpl, **kwargs: object) -> object:
    """Call one plugin's implementation alone, as pluggy would: with the arguments it names.
    (Not through the manager, which would call every plugin's and combine the answers.)"""
    try:
        return impl.function(*(kwargs[name] for name in impl.argnames))
    except Exception as exc:  # describing a broken plugin must not break `ctun plugins`
        entry["errors"].append(f"{hook}: {type(exc).__name__}: {exc}")
        return None
