"""docker-connector's config file (`docker-connector.conf`), read as is, and its conversion.

One directive per line (`route 172.18.0.0/16 expose`), `#` comments. This module checks
only the shape of each line and turns the file into the document a ctun TOML file parses
to, together with a map from every value back to its line. config.py then validates that
document with the very rules it applies to TOML, and its errors name FILE:LINE.

`to_toml` writes a loaded configuration back out as ctun TOML for `ctun config import`.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .keys import ConfigError

if TYPE_CHECKING:  # config.py imports this module; the types are all it needs from there
    from .config import HostConfig

__all__ = [
    "LegacyDocument", "SourceLine", "line_error", "locate", "looks_legacy", "parse", "quote",
    "to_toml", "toml_key",
]


@dataclass(frozen=True)
class SourceLine:
    """Where a value was written: its line number, the line itself, and a correct example
    of its directive (for the "what to write instead" half of an error)."""

    number: int
    text: str
    example: str


@dataclass(frozen=True)
class LegacyDocument:
    doc: dict[str, Any]  # the same shape tomllib gives for the equivalent ctun TOML
    lines: dict[str, SourceLine] = field(repr=False)  # "routes[2]" -> where it was written


@dataclass(frozen=True)
class _Directive:
    least: int  # arguments after the directive's name
    most: int | None  # None: any number
    example: str
    scalar: bool = True  # set at most once per file


DIRECTIVES: dict[str, _Directive] = {
    "addr": _Directive(1, 1, "addr 192.168.251.1/24"),
    "port": _Directive(1, 1, "port 2511"),
    "mtu": _Directive(1, 1, "mtu 1400"),
    "host": _Directive(1, 1, "host 127.0.0.1"),
    "route": _Directive(1, 2, "route 172.18.0.0/16 expose", scalar=False),
    "expose": _Directive(1, 2, "expose 0.0.0.0:2512"),
    "token": _Directive(2, 2, "token laptop 192.168.251.10", scalar=False),
    "iptables": _Directive(1, 1, "iptables 172.18.0.0+172.19.0.0", scalar=False),
    "hosts": _Directive(2, None, "hosts /etc/hosts .local", scalar=False),
    "proxy": _Directive(1, 1, "proxy 127.0.0.1:5432:5432", scalar=False),
    "loglevel": _Directive(1, 1, "loglevel info"),
    "pong": _Directive(1, 1, "pong on"),
}
_PONG = {"on": True, "true": True, "off": False, "false": False}

# The first directive line decides the format: `word value` is docker-connector's,
# `key = value` and `[table]` are TOML's.
_DIRECTIVE_LINE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*[ \t]+[^=\s]")
# A token is a double-quoted string (docker-connector allows one for the hosts file, e.g. a
# Windows path with spaces) or a run of non-space characters.
_TOKEN_RE = re.compile(r'"([^"]*)"|(\S+)')
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_DIGITS_RE = re.compile(r"[0-9]+")
_SHOW_MAX = 60


def looks_legacy(text: str) -> bool:
    """True when the first directive line of `text` is `word value...` (no `=`, no `[`)."""
    for raw in text.removeprefix("\ufeff").split("\n"):
        line = raw.strip()
        if line and not line.startswith("#"):
            return _DIRECTIVE_LINE_RE.match(line) is not None
    return False


def toml_key(name: str) -> str:
    """A TOML key as written in a file: bare when it can be, quoted otherwise."""
    return name if _BARE_KEY_RE.fullmatch(name) else json.dumps(name, ensure_ascii=False)


_Where = TypeVar("_Where")


def line_error(file: str | None, line: SourceLine, problem: str) -> ConfigError:
    """`FILE:LINE: the line: what is wrong; what to write instead` on one line."""
    # Problems that say no fix after a "; " get the directive's own example: any example in
    # them is in TOML's spelling.
    fix = "" if "; " in problem else f"; write it like: {line.example}"
    return ConfigError(f"{file}:{line.number}: {_show(line.text)}: {problem}{fix}")


def locate(lines: Mapping[str, _Where], label: str) -> _Where | None:
    """The line behind a value's label ("hosts[0].suffixes[1]"), or behind the nearest
    enclosing one ("hosts[0]") when the line set the whole thing. A docker-connector.conf's
    lines are SourceLines; a TOML file's, line numbers (core/toml_lines.py)."""
    while label:
        if label in lines:
            return lines[label]
        cut = max(label.rfind("."), label.rfind("["))
        if cut <= 0:
            return None
        label = label[:cut]
    return None


def quote(word: str, limit: int = 30) -> str:
    """A word of the user's inside a message: quoted, escaped, and short."""
    return repr(word if len(word) <= limit else word[: limit - 3] + "...")


def _show(text: str) -> str:
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return shown if len(shown) <= _SHOW_MAX else shown[: _SHOW_MAX - 3] + "..."


# --- reading -------------------------------------------------------------------------------


def parse(text: str, file: str | None) -> LegacyDocument:
    """The document and line map of a docker-connector.conf; ConfigError for a line whose
    shape is wrong (unknown directive, wrong number of values, a scalar set twice)."""
    reader = _Reader(file)
    # split("\n"), not splitlines(): form feeds and the like must not shift line numbers.
    for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        reader.line(number, raw.strip())
    return LegacyDocument(reader.doc, reader.lines)


class _Reader:
    def __init__(self, file: str | None) -> None:
        self.file = file
        self.doc: dict[str, Any] = {}
        self.lines: dict[str, SourceLine] = {}
        self.first: dict[str, int] = {}  # scalar directive, route, token -> its first line

    def line(self, number: int, text: str) -> None:
        if not text or text.startswith("#"):
            return
        here = SourceLine(number, text, "DIRECTIVE VALUE, like: route 172.18.0.0/16")
        words = self.tokens(here)
        if not words:  # cannot happen to a stripped line that is no comment; never crash
            return
        name, args = words[0], words[1:]
        if name.find("=") > 0 or (args and args[0].startswith("=")) or name.startswith("["):
            key = name.split("=", 1)[0]
            example = DIRECTIVES[key].example if key in DIRECTIVES else "route 172.18.0.0/16"
            raise self.error(here, f"TOML syntax in a docker-connector.conf; write it the "
                                   f"docker-connector way, like: {example}")
        directive = DIRECTIVES.get(name)
        if directive is None:
            raise self.error(here, _unknown(name))
        here = SourceLine(number, text, directive.example)
        if len(args) < directive.least or (directive.most is not None
                                           and len(args) > directive.most):
            raise self.error(here, f"{name} takes {_arity(directive)}")
        if directive.scalar:
            self.once(here, name, f"{name} is set twice")
        getattr(self, f"_{name}")(here, *args)

    def tokens(self, here: SourceLine) -> list[str]:
        words = []
        for match in _TOKEN_RE.finditer(here.text):
            quoted, bare = match.groups()
            if bare is not None:
                if bare.startswith("#"):
                    break  # a trailing comment
                if '"' in bare:
                    raise self.error(here, 'a quote without its partner; put the whole '
                                           'value in double quotes, like: "C:\\My hosts"')
                words.append(bare)
            else:
                words.append(quoted)
        return words

    def error(self, here: SourceLine, problem: str) -> ConfigError:
        return line_error(self.file, here, problem)

    def once(self, here: SourceLine, key: str, what: str) -> None:
        if key in self.first:
            raise self.error(here, f"{what} (first on line {self.first[key]}); keep one of "
                                   f"the two lines")
        self.first[key] = here.number

    def put(self, here: SourceLine, key: str, value: object) -> None:
        self.doc[key] = value
        self.lines[key] = here

    def append(self, here: SourceLine, key: str, value: object) -> None:
        items = self.doc.setdefault(key, [])
        self.lines[f"{key}[{len(items)}]"] = here
        items.append(value)

    def expose(self) -> dict[str, Any]:
        table: dict[str, Any] = self.doc.setdefault("expose", {})
        return table

    # One method per directive; each gets the line and its values (counts already checked).

    def _addr(self, here: SourceLine, value: str) -> None:
        self.put(here, "addr", value)

    def _port(self, here: SourceLine, value: str) -> None:
        self.put(here, "port", _number(value))

    def _mtu(self, here: SourceLine, value: str) -> None:
        self.put(here, "mtu", _number(value))

    def _host(self, here: SourceLine, value: str) -> None:
        self.put(here, "listen", value)  # docker-connector's host side listens there

    def _route(self, here: SourceLine, network: str, *flag: str) -> None:
        if flag and flag[0] != "expose":
            raise self.error(here, f"{quote(flag[0])} after a route: the only word allowed there "
                                   f"is expose (share it with accessors)")
        self.once(here, f"route {network}", f"{network} is routed twice")
        self.append(here, "routes", network)
        if flag:
            table = self.expose()
            routes = table.setdefault("routes", [])
            self.lines[f"expose.routes[{len(routes)}]"] = here
            routes.append(network)

    def _expose(self, here: SourceLine, listen: str, *flag: str) -> None:
        # `restart` is what `docker-connector config expose ADDR restart` appends to force
        # the listener open again; ctun reopens it whenever the address changes anyway.
        if flag and flag[0] != "restart":
            raise self.error(here, f"{quote(flag[0])} after the expose address: only restart may "
                                   f"follow it (and ctun does not need it)")
        self.expose()["listen"] = listen
        self.lines["expose.listen"] = here

    def _token(self, here: SourceLine, name: str, ip: str) -> None:
        self.once(here, f"token {name}", f"token {name} is given twice")
        peers: dict[str, Any] = self.doc.setdefault("peers", {})
        peers[name] = {"ip": ip}
        self.lines[f"peers.{toml_key(name)}"] = here

    def _iptables(self, here: SourceLine, pair: str) -> None:
        # Links and unlinks stay in file order: the last word on a pair wins (config.py).
        self.append(here, "links", pair)

    def _hosts(self, here: SourceLine, file: str, *suffixes: str) -> None:
        self.append(here, "hosts", {"file": file, "suffixes": list(suffixes)})

    def _proxy(self, here: SourceLine, spec: str) -> None:
        self.append(here, "proxy", spec)

    def _loglevel(self, here: SourceLine, level: str) -> None:
        self.put(here, "loglevel", level)

    def _pong(self, here: SourceLine, value: str) -> None:
        if value.lower() not in _PONG:
            raise self.error(here, f"pong takes on or off, not {quote(value)}")
        self.expose()["pong"] = _PONG[value.lower()]
        self.lines["expose.pong"] = here


def _number(text: str) -> int | str:
    """Digits become a number; anything else stays text for the validator to reject."""
    return int(text) if _DIGITS_RE.fullmatch(text) and len(text) <= 10 else text


def _arity(d: _Directive) -> str:
    if d.most is None:
        return f"at least {d.least} values"
    if d.least == d.most:
        return "one value" if d.least == 1 else f"{d.least} values"
    return f"{d.least} or {d.most} values"


def _unknown(name: str) -> str:
    names = sorted(DIRECTIVES)
    close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.6)
    if close:
        return f"unknown directive {quote(name)}; did you mean {close[0]!r}?"
    return f"unknown directive {quote(name)}; use one of {', '.join(names)}"


# --- writing ctun TOML ---------------------------------------------------------------------


def to_toml(cfg: HostConfig, source: str, state_dir: Path, written: date) -> str:
    """ctun TOML that loads to the same configuration as `cfg` (read from the
    docker-connector.conf `source`): what that file can set, in a readable order."""
    t = cfg.tunnel
    out = [
        f"# ctun configuration converted from {source} on {written.isoformat()}",
        "# by `ctun config import`. ctun also reads the original as it is.",
        "",
        f"addr = {_str(f'{t.vm_address}/{t.network.prefixlen}')}",
        f"mtu = {t.mtu}",
        f"listen = {_str(cfg.listen[0])}   # where the VM side's frames arrive",
        f"port = {cfg.listen[1]}",
    ]
    if cfg.loglevel is not None:
        out.append(f"loglevel = {_str(cfg.loglevel)}")
    if cfg.wire != "ctun":
        out.append(f"wire = {_str(cfg.wire)}")
    out += _array("routes", [str(r) for r in cfg.routes])
    out += _array("links", [_link(a, b) for a, b in cfg.links],
                  "# iptables A+B: subnets the agent lets reach each other")
    out += _array("proxy", [f"{p.target[0]}:{p.target[1]}:{p.port}" for p in cfg.proxies],
                  "# host service IP:PORT, reached by containers at the tunnel address:PORT")
    e = cfg.expose
    if e.listen is not None or e.routes or e.pong:
        out += ["", "[expose]   # sharing with LAN machines (ctun access)"]
        if e.listen is not None:
            out.append(f"listen = {_str(f'{e.listen[0]}:{e.listen[1]}')}")
        out += _array("routes", [str(r) for r in e.routes])
        out.append(f"pong = {'true' if e.pong else 'false'}")
    for source_ in cfg.hosts:
        out += ["", "[[hosts]]", f"file = {_str(str(source_.file))}",
                f"suffixes = [{', '.join(_str(s) for s in source_.suffixes)}]"]
    port = e.listen[1] if e.listen is not None else 2512
    for peer in cfg.peers:
        if peer.ip is None:
            continue  # the VM's own peer; a docker-connector.conf has no other kind
        key_file = state_dir / "peers" / f"{peer.name}.key"
        out += ["", f"# token {peer.name}: an accessor with its own key, kept in {key_file}",
                "# (ctun up creates it when missing). On that machine, with a copy of it:",
                f"#   ctun access --remote THIS-HOST:{port} --key-file {peer.name}.key",
                f"[peers.{toml_key(peer.name)}]", f"ip = {_str(str(peer.ip))}"]
    return "\n".join(out) + "\n"


def _str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a TOML basic string, escapes included


def _array(key: str, items: list[str], comment: str = "") -> list[str]:
    if not items:
        return []
    head = [comment] if comment else []
    one_line = f"{key} = [{', '.join(_str(i) for i in items)}]"
    if len(one_line) <= 80:
        return [*head, one_line]
    return [*head, f"{key} = [", *(f"    {_str(i)}," for i in items), "]"]


def _link(a: Any, b: Any) -> str:
    # A /32 is how a bare subnet address (docker-connector's own spelling) is kept.
    return "+".join(str(n.network_address) if n.prefixlen == 32 else str(n) for n in (a, b))
