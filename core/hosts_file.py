"""Which entries of the user's hosts files the agent's DNS responder serves to containers.

docker-connector's `hosts FILE SUFFIX...`: an entry is served when one of its names ends in
one of the suffixes, or when its line carries a `docker-connector:resolve` comment; a
`docker-connector:ignore` comment skips the line. 127.0.0.0/8 means "this host" in a hosts
file, and a container reaches this host at the host's tunnel address, so that is what it gets.

Files are the user's own: anything wrong in them is reported as `FILE:LINE: what`, skipped,
and never stops the rest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from pathlib import Path

from .config import HostsSource
from .messages import HOSTS_PER_PART, MAX_NAME, MAX_PARTS, MAX_SUFFIX, MAX_SUFFIXES

RESOLVE_MARK = "docker-connector:resolve"
IGNORE_MARK = "docker-connector:ignore"
MAX_ENTRIES = HOSTS_PER_PART * MAX_PARTS  # what one `hosts` snapshot can carry
MAX_FILE_BYTES = 16 << 20  # ad-blocking hosts files run to megabytes; beyond this, refuse
MAX_PROBLEMS = 50  # a file of garbage must not flood the status

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_LOOPBACK = IPv4Network("127.0.0.0/8")  # "this host" in a hosts file


@dataclass(frozen=True)
class HostsEntries:
    suffixes: tuple[str, ...]  # lower case, no leading or trailing dot: "dev.local"
    entries: tuple[tuple[str, str], ...]  # (name, IPv4 address), names lower case, unique
    problems: list[str] = field(default_factory=list, compare=False)


def valid_name(name: str) -> bool:
    """A DNS name (lower case, no trailing dot) the responder can serve."""
    if not 0 < len(name) <= MAX_NAME:
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def normalise_suffix(suffix: str) -> str:
    """".Dev.Local." -> "dev.local": suffixes match whole labels."""
    return suffix.strip().strip(".").lower()


def under(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def read_entries(sources: Sequence[HostsSource], host_address: IPv4Address) -> HostsEntries:
    """The entries of every source, in file order; the first address given for a name wins."""
    problems: list[str] = []
    suffixes = _suffixes(sources, problems)
    entries: dict[str, str] = {}
    for source in sources:
        wanted = tuple(s for s in map(normalise_suffix, source.suffixes) if s in suffixes)
        for name, address in _read_file(source.file, wanted, host_address, problems):
            entries.setdefault(name, address)
    if len(entries) > MAX_ENTRIES:
        problems.append(f"{len(entries)} names match; only the first {MAX_ENTRIES} are served")
    if len(problems) > MAX_PROBLEMS:
        problems[MAX_PROBLEMS:] = [f"... and {len(problems) - MAX_PROBLEMS} more problems"]
    return HostsEntries(suffixes, tuple(entries.items())[:MAX_ENTRIES], problems)


def _suffixes(sources: Sequence[HostsSource], problems: list[str]) -> tuple[str, ...]:
    found: list[str] = []
    for source in sources:
        for raw in source.suffixes:
            suffix = normalise_suffix(raw)
            if suffix in found:
                continue
            if not valid_name(suffix) or len(suffix) > MAX_SUFFIX:
                problems.append(f"{source.file}: suffix {raw!r} is not a DNS name of at most "
                                f"{MAX_SUFFIX} characters; ignored")
            elif len(found) >= MAX_SUFFIXES:
                problems.append(f"{source.file}: suffix {raw!r} ignored: at most "
                                f"{MAX_SUFFIXES} suffixes in all")
            else:
                found.append(suffix)
    return tuple(found)


def _read_file(path: Path, suffixes: tuple[str, ...], host_address: IPv4Address,
               problems: list[str]) -> list[tuple[str, str]]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        problems.append(f"{path}: cannot read it ({exc.strerror or exc}); no names from it")
        return []
    if len(data) > MAX_FILE_BYTES:
        problems.append(f"{path}: over {MAX_FILE_BYTES >> 20} MiB; no names from it")
        return []
    found: list[tuple[str, str]] = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        found += _parse_line(line, suffixes, host_address, f"{path}:{number}", problems)
    return found


def _parse_line(line: str, suffixes: tuple[str, ...], host_address: IPv4Address, where: str,
                problems: list[str]) -> list[tuple[str, str]]:
    text, _, comment = line.partition("#")
    fields = text.split()
    if not fields or IGNORE_MARK in comment:
        return []
    try:
        address = ip_address(fields[0])
    except ValueError:
        problems.append(f"{where}: {_short(fields[0])} is not an IP address; line skipped")
        return []
    if isinstance(address, IPv6Address):
        return []  # the responder serves A records only
    if len(fields) < 2:
        problems.append(f"{where}: an address without a name; line skipped")
        return []
    if address in _LOOPBACK:
        address = host_address
    resolve_all = RESOLVE_MARK in comment
    found = []
    for raw in fields[1:]:
        name = raw.rstrip(".").lower()
        if not valid_name(name):
            problems.append(f"{where}: {_short(raw)} is not a host name of at most "
                            f"{MAX_NAME} characters; name skipped")
        elif resolve_all or any(under(name, s) for s in suffixes):
            found.append((name, str(address)))
    return found


def _short(text: str) -> str:
    # Long enough to show a name just over the limit whole; a megabyte "name" is cut.
    return repr(text if len(text) <= 80 else text[:77] + "...")
