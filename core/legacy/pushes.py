"""What the host tells the VM side in legacy mode, and when: subnet links and hosts entries.

docker-connector's VM side applies `connect`/`disconnect` one by one and keeps what it was
told, but replaces its whole set of hosts entries with each push's `host` lines. So every
push carries the full hosts snapshot; links go in full to a new VM side and as the
difference afterwards (`disconnect` for a removed pair, so its rules go).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from ..config import HostConfig, Link
from ..hosts_file import HostsEntries, read_entries
from . import wire

log = logging.getLogger("ctun.legacy")

HOSTS_EVERY = 1.0  # how often the hosts files are looked at for changes


def suffix(text: str) -> str:
    # A leading dot: docker-connector turns a suffix into a string match on the query's
    # labels; ".dev.local" then matches whole labels, where "dev.local" also hits "mydev.local".
    return f".{text}"


def hosts_commands(hosts: HostsEntries | None) -> list[wire.Command]:
    """`dns SUFFIX...` and one `host IP NAME...` per address, names in file order."""
    if hosts is None:
        return []
    commands = [wire.dns(map(suffix, hosts.suffixes))] if hosts.suffixes else []
    by_address: dict[str, list[str]] = {}
    for name, address in hosts.entries:
        by_address.setdefault(address, []).append(name)
    commands += [wire.host(address, names) for address, names in by_address.items()]
    return commands


class PushState:
    """What the VM side has been told. One instance per daemon; not thread-safe."""

    def __init__(self) -> None:
        self._told: set[Link] = set()  # linked pairs the current VM side knows
        self._unlinked: set[Link] = set()  # pairs some VM side was told and that went since
        self._suffixes: set[str] = set()  # suffixes told, whose DNS redirects it holds
        self._hosts: list[wire.Command] | None = None  # the snapshot last sent

    def full(self, links: Iterable[Link], hosts: HostsEntries | None) -> list[wire.Command]:
        """Everything, for a VM side that is new (or came back): our links, the removal of
        pairs an earlier VM side may still hold rules for, and the hosts snapshot."""
        wanted = set(links)
        self._unlinked = (self._unlinked | (self._told - wanted)) - wanted
        commands = [wire.connect(a, b) for a, b in sorted(wanted)]
        commands += [wire.connect(a, b, linked=False) for a, b in sorted(self._unlinked)]
        self._told = wanted
        return commands + self._hosts_part(hosts)

    def changes(self, links: Iterable[Link], hosts: HostsEntries | None) -> list[wire.Command]:
        """What changed since the last push (with the hosts snapshot), or [] for nothing."""
        wanted = set(links)
        added, removed = wanted - self._told, self._told - wanted
        if not added and not removed and hosts_commands(hosts) == self._hosts:
            return []
        self._unlinked = (self._unlinked | removed) - wanted
        commands = [wire.connect(a, b) for a, b in sorted(added)]
        commands += [wire.connect(a, b, linked=False) for a, b in sorted(removed)]
        self._told = wanted
        return commands + self._hosts_part(hosts)

    def _hosts_part(self, hosts: HostsEntries | None) -> list[wire.Command]:
        """The snapshot, after `dns -SUFFIX` for suffixes no longer wanted: docker-connector
        removes a redirect only when told so, and clears its entries on a push without any."""
        snapshot = hosts_commands(hosts)
        wanted = set(hosts.suffixes) if hosts is not None else set()
        gone = sorted(self._suffixes - wanted)
        self._suffixes, self._hosts = wanted, snapshot
        removal = [wire.dns(f"-{suffix(s)}" for s in gone)] if gone else []
        return removal + snapshot


class Pusher:
    """On the timer thread: follows the hosts files, and says when the VM side needs a push
    and what its datagrams are."""

    def __init__(self, mtu: int) -> None:
        self._mtu = mtu
        self._state = PushState()
        self._hosts: HostsEntries | None = None
        self._stamp: object = None
        self._checked = 0.0
        self.count = 0
        self.problem = ""

    def reread_hosts(self) -> None:
        """A reloaded config: read the hosts files at the next round, changed or not."""
        self._stamp = None

    def refresh_hosts(self, cfg: HostConfig, now: float) -> None:
        if now - self._checked < HOSTS_EVERY and self._stamp is not None:
            return
        self._checked = now
        sources = cfg.hosts
        stamp = (sources, [_stamp(s.file) for s in sources])
        if stamp == self._stamp:
            return
        self._stamp = stamp
        self._hosts = read_entries(sources, cfg.tunnel.host_address) if sources else None
        for problem in self._hosts.problems if self._hosts else []:
            log.warning("hosts: %s", problem)

    def next_push(self, cfg: HostConfig, full: bool) -> list[bytes]:
        """The datagrams of the push the VM side needs now: everything for a new one (`full`),
        else what changed; [] for nothing."""
        commands = (self._state.full if full else self._state.changes)(cfg.links, self._hosts)
        if not commands:
            return []
        body, left_out = wire.encode_body(commands)
        self.problem = (f"{left_out} commands did not fit in one push ({wire.MAX_BODY} "
                        "bytes) and were left out" if left_out else "")
        if left_out:
            log.error("control push: %s", self.problem)
        datagrams = wire.push_datagrams(body, self._mtu)
        self.count += 1
        log.info("control push to the VM side: %d commands, %d bytes in %d datagrams",
                 len(commands) - left_out, len(body), len(datagrams))
        log.debug("control push body: %s", body.decode("ascii"))
        return datagrams


def _stamp(path: os.PathLike[str] | str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size
