"""The plugin API stays documented, tested and inspectable.

Every hookspec has a section in docs/plugins.md and is exercised by some test; `ctun plugins`
shows what is loaded; CTUN_TRACE_HOOKS and CTUN_PLUGINS do what docs/plugins.md says.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ctun.core import hookspecs, plugins
from ctun.core.contracts import Transport

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"
# Where the manager helpers live: functions that call hooks on behalf of their callers.
HELPER_MODULES = (ROOT / "core" / "plugins.py", ROOT / "core" / "runtime.py")


def hookspec_names() -> list[str]:
    """Every function core/hookspecs.py marks as a hookspec."""
    marker = f"{hookspecs.PROJECT}_spec"  # the attribute pluggy's HookspecMarker sets
    return sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
                  if hasattr(fn, marker))


def test_hookspecs_are_found() -> None:
    # Guards the two tests below against passing vacuously.
    assert {"ctun_register_transports", "ctun_platform_adapter",
            "ctun_session_state_changed"} <= set(hookspec_names())


# --- documentation ----------------------------------------------------------------------


def documented_hooks() -> set[str]:
    """Hook names that head a section of docs/plugins.md: a heading holding `name` or name(."""
    found = set()
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            found.update(re.findall(r"`?\b(ctun_[a-z_]+)\s*[`(]", line))
    return found


def test_every_hookspec_is_documented() -> None:
    undocumented = sorted(set(hookspec_names()) - documented_hooks())
    assert not undocumented, f"hooks without a section in docs/plugins.md: {undocumented}"


def test_docs_describe_no_hook_that_does_not_exist() -> None:
    stale = sorted(documented_hooks() - set(hookspec_names()))
    assert not stale, f"docs/plugins.md has sections for hooks that are gone: {stale}"


# --- tests ------------------------------------------------------------------------------
#
# The rule: a hook counts as exercised when a test module under tests/ (other than this one)
#   * calls it through a plugin manager, `<anything>.hook.<name>(...)`, or
#   * calls, by name, a function of core/plugins.py or core/runtime.py that calls it that way,
#     directly or through other functions of those two modules (plugins.transports(),
#     runtime.event_sink(), ...): these are how ctun itself calls hooks.
# Only real calls in the syntax tree count; a hook name in a string or comment does not.


def _hook_calls(node: ast.AST) -> set[str]:
    return {
        call.func.attr
        for call in ast.walk(node)
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
        and isinstance(call.func.value, ast.Attribute) and call.func.value.attr == "hook"
    }


def _called_names(node: ast.AST) -> set[str]:
    names = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            if isinstance(call.func, ast.Name):
                names.add(call.func.id)
            elif isinstance(call.func, ast.Attribute):
                names.add(call.func.attr)
    return names


def hook_helpers() -> dict[str, set[str]]:
    """Helper function name -> the hooks it calls, directly or through other helpers."""
    functions: dict[str, ast.AST] = {}
    for path in HELPER_MODULES:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        functions.update((node.name, node) for node in tree.body
                         if isinstance(node, ast.FunctionDef))
    hooks = {name: _hook_calls(node) for name, node in functions.items()}
    calls = {name: _called_names(node) & set(functions) for name, node in functions.items()}
    changed = True
    while changed:  # propagate through helpers calling helpers until nothing changes
        changed = False
        for name, callees in calls.items():
            merged = hooks[name].union(*(hooks[c] for c in callees))
            if merged != hooks[name]:
                hooks[name], changed = merged, True
    return {name: found for name, found in hooks.items() if found}


def exercised_hooks() -> set[str]:
    helpers = hook_helpers()
    found: set[str] = set()
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found |= _hook_calls(tree)
        for name in _called_names(tree) & set(helpers):
            found |= helpers[name]
    return found


def test_the_helper_rule_sees_the_helpers() -> None:
    helpers = hook_helpers()
    assert "ctun_register_transports" in helpers["transport"]  # through transports()
    assert helpers["event_sink"] == {"ctun_session_state_changed"}


def test_every_hookspec_is_exercised_by_a_test() -> None:
    untested = sorted(set(hookspec_names()) - exercised_hooks())
    assert not untested, (
        f"hooks no test under tests/ calls (see the rule in {Path(__file__).name}): {untested}")


# --- `ctun plugins` ---------------------------------------------------------------------


def ctun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if k not in (plugins.ONLY_ENV, plugins.TRACE_ENV)}
    return subprocess.run([sys.executable, "-m", "ctun", *args], capture_output=True,
                          text=True, timeout=60, env={**full_env, **(env or {})})


def builtin_hooks() -> dict[str, list[str]]:
    pm = plugins.create_manager(load_entry_points=False)
    return {name: sorted(c.name for c in pm.get_hookcallers(pm.get_plugin(name)) or ())
            for name in plugins.DEFAULT_PLUGINS}


def test_ctun_plugins_lists_the_builtins_with_their_hooks() -> None:
    result = ctun("plugins")
    assert result.returncode == 0, result.stderr
    blocks = {block.splitlines()[0].split()[0]: block
              for block in re.split(r"\n(?=\S)", result.stdout.strip())}
    for name, hooks in builtin_hooks().items():
        assert hooks, f"{name} implements no hook"
        assert name in blocks, result.stdout
        assert f"{name}  built-in" in blocks[name]
        assert f"hooks:      {', '.join(hooks)}" in blocks[name]
    assert "transports: udp" in blocks["ctun.plugins.transport_udp"]
    if sys.platform.startswith("linux"):
        assert "platform adapter: linux" in blocks["ctun.plugins.platform_linux"]


def test_ctun_plugins_json_parses() -> None:
    result = ctun("plugins", "--json")
    assert result.returncode == 0, result.stderr
    described = {p["name"]: p for p in json.loads(result.stdout)}
    for name, hooks in builtin_hooks().items():
        assert described[name]["version"] == "built-in"
        assert described[name]["hooks"] == hooks
        assert described[name]["file"].endswith("__init__.py")
        assert described[name]["errors"] == []
    assert described["ctun.plugins.transport_udp"]["transports"] == ["udp"]


def test_ctun_plugins_with_everything_filtered_out_says_so() -> None:
    result = ctun("plugins", env={plugins.ONLY_ENV: "nothing-by-this-name"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no plugins are loaded (CTUN_PLUGINS=nothing-by-this-name)"


def test_describe_a_plugin_registered_in_code_and_a_broken_one() -> None:
    from types import SimpleNamespace

    from ctun.core.hookspecs import hookimpl
    from ctun.plugins.transport_udp import UdpTransport

    def register(register: Callable[[type[Transport]], None]) -> None:
        register(UdpTransport)

    def broken(platform: str) -> None:
        raise RuntimeError("no adapter today")

    pm = plugins.create_manager(load_entry_points=False)
    pm.register(SimpleNamespace(ctun_register_transports=hookimpl(register)), name="in-code")
    pm.register(SimpleNamespace(ctun_platform_adapter=hookimpl(broken)), name="broken")
    described = {p["name"]: p for p in plugins.describe(pm)}
    assert described["in-code"] == {
        "name": "in-code", "version": None, "distribution": None, "module": __name__,
        "file": __file__, "hooks": ["ctun_register_transports"], "transports": ["udp"],
        "platform_adapter": None, "errors": [],
    }
    assert described["broken"]["errors"] == [
        "ctun_platform_adapter: RuntimeError: no adapter today"]
    # Each plugin is asked alone: the broken adapter hook does not spoil the built-in's answer.
    if sys.platform.startswith("linux"):
        assert described["ctun.plugins.platform_linux"]["platform_adapter"] == "linux"


# --- CTUN_TRACE_HOOKS -------------------------------------------------------------------


LOOK_UP_UDP = ("from ctun.core import plugins; "
               "print(plugins.transport(plugins.create_manager(), 'udp'))")


def test_trace_hooks_traces_a_hook_call_to_stderr() -> None:
    def look_up(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", LOOK_UP_UDP], capture_output=True,
                              text=True, timeout=60, env={**os.environ, **env})

    result = look_up({plugins.TRACE_ENV: "1"})
    assert result.returncode == 0, result.stderr
    # pluggy's trace: the call with its arguments, then what it returned.
    assert re.search(r"^ *ctun_register_transports \[hook\]$", result.stderr, re.M), result.stderr
    assert re.search(r"^ +register: <function ", result.stderr, re.M)
    assert re.search(r"^ *finish ctun_register_transports --> \[\] \[hook\]$", result.stderr,
                     re.M)
    assert "[hook]" not in result.stdout  # the output itself stays clean for scripts
    assert look_up({plugins.TRACE_ENV: "0"}).stderr == ""


def test_trace_hooks_in_process(monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(plugins.TRACE_ENV, raising=False)
    plugins.transports(plugins.create_manager(load_entry_points=False))
    assert capsys.readouterr().err == "", "no tracing unless asked for"
    monkeypatch.setenv(plugins.TRACE_ENV, "1")
    plugins.platform_adapter(plugins.create_manager(load_entry_points=False), "linux")
    err = capsys.readouterr().err
    assert "ctun_platform_adapter [hook]" in err and "platform: linux" in err


# --- third-party plugins through entry points, and CTUN_PLUGINS -------------------------

ECHO_PLUGIN = '''
from ctun.core.hookspecs import hookimpl
from ctun.plugins.transport_udp import UdpTransport


class FakeEcho(UdpTransport):
    name = "fake-echo"


@hookimpl
def ctun_register_transports(register):
    register(FakeEcho)
'''


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A distribution `ctun-fake` 1.2.3 on sys.path, as pip would install it, with two entry
    points in the group `ctun`: a working plugin and one whose import fails."""
    (tmp_path / "ctun_fake_echo.py").write_text(ECHO_PLUGIN)
    (tmp_path / "ctun_fake_broken.py").write_text("raise ImportError('needs libfrobnicate')\n")
    info = tmp_path / "ctun_fake-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ctun-fake\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(
        "[ctun]\nfake-echo = ctun_fake_echo\nfake-broken = ctun_fake_broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(plugins.ONLY_ENV, raising=False)
    yield tmp_path
    for module in ("ctun_fake_echo", "ctun_fake_broken"):
        sys.modules.pop(module, None)


def test_entry_point_plugins_load_with_their_distribution(
    installed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pm = plugins.create_manager()
    assert capsys.readouterr().err == (
        "ctun: plugin 'fake-broken' failed to load and is skipped: needs libfrobnicate\n")
    assert plugins.transport(pm, "fake-echo").name == "fake-echo"
    described = {p["name"]: p for p in plugins.describe(pm)}
    assert "fake-broken" not in described
    echo = described["fake-echo"]
    assert echo["version"] == "1.2.3" and echo["distribution"] == "ctun-fake"
    assert echo["hooks"] == ["ctun_register_transports"]
    assert echo["transports"] == ["fake-echo"]
    assert echo["file"] == str(installed / "ctun_fake_echo.py")


def test_ctun_plugins_shows_an_installed_plugin(installed: Path) -> None:
    path = os.pathsep.join(p for p in (str(installed), os.environ.get("PYTHONPATH")) if p)
    result = ctun("plugins", env={"PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
    assert "fake-echo  1.2.3\n" in result.stdout
    assert f"from:       ctun-fake 1.2.3, {installed / 'ctun_fake_echo.py'}" in result.stdout
    assert "transports: fake-echo" in result.stdout
    assert "'fake-broken' failed to load" in result.stderr


@pytest.mark.parametrize(("only", "expected"), [
    ("fake-echo", ["fake-echo"]),
    ("transport_udp", ["ctun.plugins.transport_udp"]),
    ("ctun.plugins.platform_linux, fake-echo", ["ctun.plugins.platform_linux", "fake-echo"]),
    ("", [*plugins.DEFAULT_PLUGINS, "fake-echo"]),
])
def test_ctun_plugins_env_limits_loading(installed: Path, monkeypatch: pytest.MonkeyPatch,
                                         only: str, expected: list[str]) -> None:
    monkeypatch.setenv(plugins.ONLY_ENV, only)
    loaded = [name for name, _ in plugins.create_manager().list_name_plugin()]
    if only:
        assert loaded == expected
    else:  # unfiltered: whatever else this Python has installed loads too
        assert loaded[:len(expected)] == expected
