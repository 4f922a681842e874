"""The `ctun` command line. User errors end in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import __version__
from .core.status_text import (
    format_peers,
    format_route_table,
    format_status,
)

EXIT_USAGE = 2


class UserError(Exception):
    """Something the user can fix; str() is the one-line message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line that says what to fix, instead of argparse's usage dump.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _tunnel_flags(p: argparse.ArgumentParser, interface: str) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="TOML config file (default /etc/ctun/ctun.toml)")
    p.add_argument("--addr", metavar="CIDR",
                   help="VM-side tunnel address (default 192.168.251.1/24)")
    p.add_argument("--port", metavar="N", help="tunnel port (default 2511)")
    p.add_argument("--mtu", metavar="N", help="tunnel MTU (default 1400)")
    p.add_argument("--no-offload", dest="offload", action="store_const", const=False,
                   help="do not use kernel offloads (TSO super-packets, UDP_SEGMENT/GRO)")
    p.add_argument("--interface", metavar="NAME", help=f"interface name (default {interface})")
    p.add_argument("--transport", metavar="NAME", help="transport plugin (default udp)")
    p.add_argument("--key-file", metavar="FILE", help="pre-shared key file of the VM peer")
    p.add_argument("--wire", choices=["ctun", "legacy"],
                   help="wire format (default ctun); legacy: docker-connector's own, "
                        "UNAUTHENTICATED and unencrypted (see docs/legacy.md)")
    p.add_argument("--keepalive", metavar="SECONDS", help=argparse.SUPPRESS)
    p.add_argument("--dead-after", metavar="SECONDS", help=argparse.SUPPRESS)
    p.add_argument("--rekey-after", metavar="SECONDS", help=argparse.SUPPRESS)
    # No default here: an unset flag lets the config file's `loglevel` decide.
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level (default: the config's loglevel, else INFO)")


def _instance_flag(p: argparse.ArgumentParser, verb: str = "ask", agent: bool = False) -> None:
    """--interface for the commands that talk to a running daemon over its socket."""
    hint = "; the agent's is ctunvm0" if agent else ""
    p.add_argument("--interface", default="ctun0", metavar="NAME",
                   help=f"which instance to {verb} (default ctun0{hint})")


class _CheckingParser(_Parser):
    """Raises UserError instead of exiting: for checking arguments meant for later use."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def build_parser(parser_class: type[_Parser] = _Parser) -> argparse.ArgumentParser:
    parser = parser_class(prog="ctun", description="Reach Docker Desktop containers by IP.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=parser_class)

    sub.add_parser("version", help="print the version")

    up = sub.add_parser("up", help="run the host daemon")
    up.add_argument("--no-ui", action="store_true", help="run headless in the foreground")
    up.add_argument("--listen", metavar="IP", help="address to listen on (default 127.0.0.1)")
    up.add_argument("--route", action="append", metavar="CIDR",
                    help="route this subnet into the tunnel (repeatable)")
    up.add_argument("--no-docker", dest="docker_enabled", action="store_const", const=False,
                    help="do not follow the Docker engine's networks")
    up.add_argument("--no-agent", dest="docker_agent", action="store_const", const=False,
                    help="do not run the agent container (run `ctun vm` yourself)")
    up.add_argument("--agent-host", metavar="HOST",
                    help="how the agent reaches this host (default host.docker.internal)")
    up.add_argument("--agent-base", metavar="IMAGE",
                    help="base image for the agent (default python:3.11-slim-bookworm)")
    up.add_argument("--control-group", metavar="GROUP",
                    help="group whose members may use `ctun status`/`ctun tui` (default ctun)")
    _tunnel_flags(up, "ctun0")

    down = sub.add_parser("down", help="stop the daemon; it removes the agent container")
    _instance_flag(down, verb="stop")

    vm = sub.add_parser("vm", help="run the agent inside the Docker VM")
    vm.add_argument("--host", metavar="HOST", help="the host to connect to "
                    "(default host.docker.internal)")
    _tunnel_flags(vm, "ctunvm0")

    status = sub.add_parser("status", help="show the running tunnel's state and counters")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    _instance_flag(status, agent=True)

    routes = sub.add_parser("routes", help="show the route table; add or remove a route")
    routes.add_argument("action", nargs="?", choices=["list", "add", "remove"], default="list",
                        help="list (default), or add/remove NETWORK until the daemon stops")
    routes.add_argument("network", nargs="?", metavar="NETWORK", help="e.g. 10.5.0.0/16")
    routes.add_argument("--json", action="store_true", help="print the answer as JSON")
    _instance_flag(routes)

    peers = sub.add_parser("peers", help="show the peers: state, endpoint, counters")
    peers.add_argument("--json", action="store_true", help="print the peers as JSON")
    _instance_flag(peers, agent=True)

    reconnect = sub.add_parser("reconnect", help="end a peer's session; the agent connects "
                               "again at once with a fresh handshake")
    reconnect.add_argument("peer", nargs="?", help="which peer (default: the only one)")
    _instance_flag(reconnect)

    reload = sub.add_parser("reload", help="apply the config file now (the daemon also "
                            "applies a saved change by itself); tunnel, listen, transport and "
                            "timers wait for a restart")
    _instance_flag(reload)

    transport = sub.add_parser("transport", help="show the transports; with NAME, move the "
                               "agent onto that transport (it stays there until it fails)")
    transport.add_argument("to", nargs="?", metavar="NAME", help="udp or tcp")
    transport.add_argument("--peer", help="which peer (default: the agent)")
    _instance_flag(transport)

    tui = sub.add_parser("tui", help="a live view of the running daemon: peers, routes, "
                         "counters; add or remove routes, reconnect peers")
    _instance_flag(tui, verb="watch")
    tui.add_argument("--interval", type=float, default=0.5, metavar="SECONDS",
                     help="how often the daemon sends a snapshot (default 0.5)")

    plugins = sub.add_parser("plugins", help="list the loaded plugins: versions, hooks, "
                             "transports and platform adapters")
    plugins.add_argument("--json", action="store_true", help="print the list as JSON")

    config_cmd = sub.add_parser("config", help="config files: import a docker-connector.conf")
    config_actions = config_cmd.add_subparsers(dest="config_action", metavar="ACTION",
                                               required=True, parser_class=parser_class)
    config_import = config_actions.add_parser(
        "import", help="convert a docker-connector.conf to ctun's TOML",
        description="Convert a docker-connector.conf to ctun TOML that loads to the same "
                    "configuration (ctun also reads the original as it is).")
    config_import.add_argument("file", metavar="FILE", help="the docker-connector.conf")
    config_import.add_argument("-o", "--output", metavar="OUT",
                               help="write the TOML here (default: standard output)")
    config_import.add_argument("--force", action="store_true", help="overwrite OUT")

    demo = sub.add_parser("demo", help="build a local lab in network namespaces and show "
                          "a container reached by IP through ctun")
    demo.add_argument("--duration", type=float, metavar="SECONDS",
                      help="stop after this long instead of waiting for Ctrl-C")
    demo.add_argument("--containers", type=int, default=2, metavar="N",
                      help="container namespaces to create (default 2)")

    _sharing_parsers(sub, parser_class)

    service = sub.add_parser("service", help="run the host daemon as a system service "
                             "(systemd, launchd, Windows SCM)")
    actions = service.add_subparsers(dest="service_action", metavar="ACTION", required=True,
                                     parser_class=parser_class)
    install = actions.add_parser(
        "install", help="install (or update) the service and start it",
        description="Install the service that runs `PYTHON -m ctun up --no-ui` as root at "
                    "boot, or update it, then start it. Arguments after `--` go to `ctun up`.")
    install.add_argument("--config", metavar="FILE",
                         help="config file for the service (default: /etc/ctun/ctun.toml "
                              "when the daemon starts, if it exists)")
    install.add_argument("--python", metavar="PATH",
                         help="interpreter that runs ctun (default: this one, "
                              f"{sys.executable})")
    install.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                         help="environment variable for the daemon, e.g. HTTPS_PROXY "
                              "(repeatable; no secrets: service files are readable by all)")
    install.add_argument("up_args", nargs="*", metavar="-- UP-ARG",
                         help="more `ctun up` arguments, e.g. -- --log-level DEBUG")
    actions.add_parser("uninstall", help="stop the service and remove what install created")
    actions.add_parser("start", help="start the service")
    actions.add_parser("stop", help="stop the service")
    actions.add_parser("status", help="show the service manager's view of the service")
    return parser


def _sharing_parsers(sub: Any, parser_class: type[_Parser]) -> None:
    """`ctun peer` (on the host: who may log in from the LAN) and `ctun access` (on the LAN
    machine: log in)."""
    peer = sub.add_parser("peer", help="share containers with LAN machines: add, remove and "
                          "list accessors (see docs/access.md)")
    actions = peer.add_subparsers(dest="peer_action", metavar="ACTION", required=True,
                                  parser_class=parser_class)
    add = actions.add_parser("add", help="create an accessor with its own key and address; "
                             "prints the command to run on its machine")
    add.add_argument("name", metavar="NAME", help="e.g. alice")
    add.add_argument("--ip", metavar="IP", help="its address in the tunnel network "
                     "(default: the next free one)")
    add.add_argument("--remote", metavar="HOST:PORT", help="where its machine reaches this "
                     "host (default: the expose address, else this machine's LAN address)")
    add.add_argument("--config", metavar="FILE", help="config file, when ctun is not running "
                     "(default /etc/ctun/ctun.toml)")
    _instance_flag(add, verb="tell")
    rm = actions.add_parser("rm", help="delete an accessor and cut it off at once")
    rm.add_argument("name", metavar="NAME")
    _instance_flag(rm, verb="tell")
    listing = actions.add_parser("list", help="list the accessors and their state")
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.add_argument("--config", metavar="FILE", help="config file, when ctun is not "
                         "running (default /etc/ctun/ctun.toml)")
    _instance_flag(listing)

    access = sub.add_parser("access", help="reach a host's shared containers from this "
                            "machine (the command `ctun peer add` prints)")
    access.add_argument("--remote", required=True, metavar="HOST:PORT",
                        help="the host's expose address, e.g. 192.0.2.10:2512")
    access.add_argument("--key", metavar="KEY", help="the key `ctun peer add` printed "
                        "(or --key-file, or $CTUN_KEY: not visible to other users)")
    access.add_argument("--key-file", metavar="FILE",
                        help="a file holding the key (mode 0600); - reads it from standard input")
    access.add_argument("--interface", default="ctunacc0", metavar="NAME",
                        help="interface name (default ctunacc0)")
    access.add_argument("--transport", default="auto", choices=["auto", "udp", "tcp"],
                        help="auto (default): UDP, falling back to TCP")
    access.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level (default INFO)")


def _overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    found = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            found[name] = value
    if getattr(args, "route", None):
        found["routes"] = args.route
    return found


_DOCKER_FLAGS = ("docker_enabled", "docker_agent", "agent_host", "agent_base")
_COMMON = ("addr", "port", "mtu", "offload", "interface", "transport", "key_file", "keepalive",
           "dead_after", "rekey_after", "wire")


def _is_admin() -> bool:
    if sys.platform == "win32":
        import ctypes

        return bool(ctypes.windll.shell32.IsUserAnAdmin())
    return os.geteuid() == 0


def _require_root(what: str) -> None:
    if not _is_admin():
        if sys.platform == "win32":
            raise UserError(f"{what} needs an elevated (Administrator) prompt: it creates "
                            f"routes and configures the TAP adapter")
        raise UserError(f"{what} needs root (it creates a network interface): "
                        f"run it with sudo")


def _run_tunnel(args: argparse.Namespace) -> int:
    from .core import config, logs, plugins, runtime

    if args.command == "up" and not args.no_ui:
        if sys.platform == "win32":
            raise UserError("the terminal UI runs on Linux and macOS; on Windows run "
                            "`ctun up --no-ui` in an Administrator prompt and `ctun tui`")
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            # From a script or a service there is no screen to show: say what to run.
            raise UserError("ctun up shows a terminal UI and needs a terminal; for the daemon "
                            "alone run `ctun up --no-ui`")
        from .tui import launch

        try:
            return launch.up_with_tui(args.raw_up_args, args.interface or "ctun0")
        except launch.LaunchError as exc:
            raise UserError(str(exc)) from None
    # Before the config: loading it may create the key file, which only root may do.
    _require_root(f"ctun {args.command}")
    if args.command == "up":
        cfg: Any = config.load_host_config(
            args.config, _overrides(args, (*_COMMON, "listen", "control_group", *_DOCKER_FLAGS)))
        from .core.daemon import run
    else:
        cfg = config.load_agent_config(args.config, _overrides(args, (*_COMMON, "host")))
        from .vm.agent import run  # type: ignore[assignment]
    pm = plugins.create_manager()
    # An unknown transport is a user error: say so now, not from inside the engine.
    runtime.transport_classes(pm, cfg.transport)
    listener = logs.setup(args.log_level)
    logs.apply_config_level(getattr(cfg, "loglevel", None))  # the VM side has none (yet)
    try:
        with runtime.stop_on_signals() as stop:
            run(cfg, pm, stop)
    finally:
        listener.stop()
    return 0


def _peer(args: argparse.Namespace) -> int:
    from .core import peer_admin

    if args.peer_action == "list":
        rows = peer_admin.listing(args.config, args.interface)
        print(json.dumps(rows, indent=2) if args.json
              else "\n".join(peer_admin.format_listing(rows)))
        return 0
    if not _is_admin():
        raise UserError(f"ctun peer {args.peer_action} needs root: the peer store "
                        f"({peer_admin.store_file()}) holds the accessors' keys; run it with sudo")
    if args.peer_action == "add":
        print("\n".join(peer_admin.add(args.name, args.ip, args.remote, args.config,
                                       args.interface)))
    else:
        print(peer_admin.remove(args.name, args.interface))
    return 0


def _access(args: argparse.Namespace) -> int:
    from .core import access, logs, plugins, runtime

    cfg = access.AccessConfig(
        remote=access.parse_remote(args.remote), key=access.load_key(args.key, args.key_file),
        interface=access.check_interface(args.interface), transport=args.transport)
    _require_root("ctun access")
    pm = plugins.create_manager()
    runtime.transport_classes(pm, cfg.transport)
    listener = logs.setup(args.log_level)
    try:
        with runtime.stop_on_signals() as stop:
            access.run(cfg, pm, stop)
    finally:
        listener.stop()
    return 0


def _config(args: argparse.Namespace) -> int:
    """`ctun config import`: checked like `ctun up` would, but reading no key file."""
    import datetime

    from .core import config, legacy_config

    cfg = config.check_host_config(args.file)
    if not legacy_config.looks_legacy(_read_text(args.file)):
        raise UserError(f"{args.file}: already ctun TOML; use it as it is "
                        f"(ctun up --config {args.file})")
    text = legacy_config.to_toml(cfg, os.path.abspath(args.file), config.default_state_dir(),
                                 datetime.date.today())
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:  # "x": refuse a file that exists, even one made since we looked
        with open(args.output, "w" if args.force else "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise UserError(f"{args.output} exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise UserError(f"{args.output}: cannot write: {exc.strerror or exc}") from None
    print(f"wrote {args.output}; check it, then: ctun up --config {args.output}",
          file=sys.stderr)
    return 0


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, ValueError) as exc:  # read once already: only a race gets here
        raise UserError(f"{path}: cannot read: {exc}") from None


def _status(args: argparse.Namespace) -> int:
    from .core import control

    answer = control.request(control.socket_path(args.interface), "status")
    status = answer["status"]
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0


def _routes(args: argparse.Namespace) -> int:
    from .core import control

    path = control.socket_path(args.interface)
    if args.action == "list":
        if args.network:
            raise UserError("`ctun routes` lists all routes; to add one: ctun routes add NETWORK")
        answer = control.request(path, "routes")
        print(json.dumps(answer["route_table"], indent=2) if args.json
              else "\n".join(format_route_table(answer["route_table"])))
        return 0
    if not args.network:
        raise UserError(f"ctun routes {args.action} needs a NETWORK, like 10.5.0.0/16")
    cmd = "add_route" if args.action == "add" else "remove_route"
    answer = control.request(path, cmd, network=args.network)
    if args.json:
        print(json.dumps({k: v for k, v in answer.items() if k not in ("v", "ok")}))
    elif args.action == "add":
        route = answer.get("route") or {}
        detail = f": {route['detail']}" if route.get("detail") else ""
        print(f"{args.network}: {route.get('state', 'added')}{detail}")
    else:
        print(f"{args.network}: removed")
    return 0


def _peers(args: argparse.Namespace) -> int:
    from .core import control

    answer = control.request(control.socket_path(args.interface), "peers")
    print(json.dumps(answer["peers"], indent=2) if args.json
          else "\n".join(format_peers(answer["peers"])))
    return 0


def _reconnect(args: argparse.Namespace) -> int:
    from .core import control

    extra = {"peer": args.peer} if args.peer else {}
    answer = control.request(control.socket_path(args.interface), "reconnect", **extra)
    print(f"peer {answer['peer']}: " + ("session ended; it reconnects now"
                                         if answer["was_connected"] else "was not connected"))
    return 0


def _reload(args: argparse.Namespace) -> int:
    from .core import control

    answer = control.request(control.socket_path(args.interface), "reload")
    print(f"reloaded {answer['source'] or '(no config file: flags only)'}")
    if answer["restart_needed"]:
        print("changed, applied at the next start: " + ", ".join(answer["restart_needed"]))
    return 0


def _transport(args: argparse.Namespace) -> int:
    from .core import control

    path = control.socket_path(args.interface)
    if args.to is None:
        status = control.request(path, "status")["status"]
        for t in status["transports"]:
            host, port = t["local_endpoint"]
            users = [p["name"] for p in status["peers"] if p.get("transport") == t["name"]]
            print(f"{t['name']:<6} {host}:{port:<6} peers: {', '.join(users) or '-'}")
        return 0
    extra = {"peer": args.peer} if args.peer else {}
    answer = control.request(path, "switch_transport", to=args.to, **extra)
    print(f"asked peer {answer['peer']} to move to {answer['to']}")
    return 0


def _tui(args: argparse.Namespace) -> int:
    from .core import control

    if not control.MIN_INTERVAL <= args.interval <= control.MAX_INTERVAL:
        raise UserError(f"--interval must be from {control.MIN_INTERVAL} to "
                        f"{control.MAX_INTERVAL} seconds")
    try:  # imported here: Textual is only needed by this command
        from .tui.app import CtunApp
    except ImportError as exc:
        raise UserError(f"the TUI needs Textual ({exc}); pip install textual") from None
    CtunApp(control.socket_path(args.interface), args.interval).run()
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from .core import plugins

    described = plugins.describe(plugins.create_manager())
    if args.json:
        print(json.dumps(described, indent=2))
    else:
        print(format_plugins(described, os.environ.get(plugins.ONLY_ENV)))
    return 0


def format_plugins(described: list[dict[str, Any]], only: str | None = None) -> str:
    """`ctun plugins` as text: a heading line per plugin, then what it is and offers."""
    if not described:
        why = f" (CTUN_PLUGINS={only})" if only else ""
        return f"no plugins are loaded{why}"
    blocks = []
    for p in described:
        version = p["version"] or "registered in code"
        lines = [f"{p['name']}  {version}"]
        source = p["file"] or p["module"] or "unknown"
        if p["distribution"]:
            source = f"{p['distribution']} {p['version']}, {source}"
        lines.append(f"  from:       {source}")
        lines.append(f"  hooks:      {', '.join(p['hooks']) or 'none'}")
        if p["transports"]:
            lines.append(f"  transports: {', '.join(p['transports'])}")
        if p["platform_adapter"]:
            lines.append(f"  platform adapter: {p['platform_adapter']} (for {sys.platform})")
        lines.extend(f"  error:      {e}" for e in p["errors"])
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def _down(args: argparse.Namespace) -> int:
    from .core import control

    path = control.socket_path(args.interface)
    try:
        control.request(path, "shutdown")
    except control.ControlError:
        return _remove_leftover_agents(args.interface)
    # The daemon removes its routes and the agent container on its way out; wait for that.
    import time

    deadline = time.monotonic() + 30
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # polling for the daemon's exit; there is nothing to wait on instead
    if path.exists():
        raise UserError(f"the daemon did not stop within 30 s; see its log ({path} remains)")
    print("ctun stopped")
    return 0


def _remove_leftover_agents(interface: str) -> int:
    """No daemon answers: remove what a crashed one may have left in Docker."""
    from .core.agent_container import remove_agents
    from .core.docker_watch import connect

    try:
        client = connect(None)
        removed = remove_agents(client, interface)
    except Exception as exc:  # no engine either: nothing of ours can be running there
        print(f"ctun is not running; Docker not reachable ({exc})")
        return 0
    print("ctun is not running" + (f"; removed {', '.join(removed)}" if removed else ""))
    return 0


def _demo(args: argparse.Namespace) -> int:
    _require_root("ctun demo")
    from .lab.demo import run_demo

    return run_demo(containers=args.containers, duration=args.duration)


def _service(args: argparse.Namespace) -> int:
    from .core import service

    manager = service.manager_for()
    action: str = args.service_action
    manager.check(action)  # root and a usable service manager, before anything else
    if action == "install":
        print(manager.install(service.default_options(
            python=args.python, config=args.config, extra_args=_checked_up_args(args.up_args),
            environment=_environment(args.env))))
    else:
        print(getattr(manager, action)())
    return 0


def _checked_up_args(extra: list[str]) -> list[str]:
    """The arguments the service adds to `ctun up --no-ui`, checked now: a typo found at
    boot is a service that never starts."""
    for arg in extra:
        if arg == "--config" or arg.startswith("--config="):
            raise UserError("pass the config file as `ctun service install --config FILE`")
        if arg in ("-h", "--help"):
            raise UserError(f"{arg} after `--` would go to `ctun up`; leave it out")
    try:
        parsed = build_parser(_CheckingParser).parse_args(["up", "--no-ui", *extra])
    except UserError as exc:
        raise UserError(f"`ctun up` arguments after --: {exc}") from None
    if parsed.key_file and not os.path.isabs(parsed.key_file):
        raise UserError(f"--key-file {parsed.key_file}: use an absolute path (the service "
                        f"does not run in this directory)")
    return extra


def _environment(pairs: list[str]) -> dict[str, str]:
    found = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UserError(f"--env {pair}: use NAME=VALUE")
        found[name] = value
    return found


def _version(_args: argparse.Namespace) -> int:
    print(f"ctun {__version__}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "version": _version,
    "up": _run_tunnel,
    "vm": _run_tunnel,
    "status": _status,
    "routes": _routes,
    "peers": _peers,
    "reconnect": _reconnect,
    "transport": _transport,
    "reload": _reload,
    "tui": _tui,
    "down": _down,
    "plugins": _plugins,
    "demo": _demo,
    "service": _service,
    "config": _config,
    "peer": _peer,
    "access": _access,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    # `ctun up` with the TUI runs `ctun up --no-ui` with the same arguments as its daemon.
    args.raw_up_args = raw[raw.index("up") + 1:] if args.command == "up" else []
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = _user_message(exc)
        if message is None:
            raise
        print(f"ctun {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


# Modules whose exceptions are user errors, with the exception class each defines.
_USER_ERRORS = (
    ("ctun.core.keys", "ConfigError"),
    ("ctun.core.contracts", "PlatformError"),
    ("ctun.core.control", "ControlError"),
    ("ctun.core.plugins", "PluginError"),
    ("ctun.core.service", "ServiceError"),
)


def _user_message(exc: Exception) -> str | None:
    """The one-line message for errors a user can cause and fix; None for bugs."""
    if isinstance(exc, UserError):
        return str(exc)
    # Only modules already imported can have raised: importing more here could fail itself.
    for module, name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return str(exc)
    return None
