"""Host feature: hand the hosts-file entries to the agent's DNS responder.

The entries (core.hosts_file) go to the VM peer as a full snapshot in `hosts` messages:
when the agent comes up, and whenever a reload finds them changed. The hosts files are
watched like the config file (`ctx.watched_files`), so editing one means a reload, which
reads them again here.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from . import messages
from .config import VM_PEER, HostConfig
from .host_context import HostContext
from .hosts_file import HostsEntries, read_entries

log = logging.getLogger("ctun.hosts")


class HostsPush:
    def __init__(self, ctx: HostContext) -> None:
        self._ctx = ctx
        self._lock = threading.Lock()  # one snapshot at a time, in order
        self._generation = 0
        self.current = self._read(ctx.cfg, HostsEntries((), ()))

    def files(self) -> list[Path]:
        return [source.file for source in self._ctx.cfg.hosts]

    def peer_up(self, peer: str) -> None:
        # Also when it restarted too quickly to look down: the engine says "up" again then.
        if peer == VM_PEER:
            with self._lock:
                self._push()  # a new agent knows nothing yet

    def reconfigure(self, cfg: HostConfig) -> None:
        fresh = self._read(cfg, self.current)  # outside the lock: the network thread takes it
        with self._lock:
            changed = (fresh.suffixes, fresh.entries) != (self.current.suffixes,
                                                          self.current.entries)
            self.current = fresh
            if changed:
                log.info("hosts entries changed: %d names under %s", len(fresh.entries),
                         ", ".join(fresh.suffixes) or "no suffix")
                if self._vm_up():  # otherwise peer_up sends the newest snapshot
                    self._push()

    def status(self) -> dict[str, Any]:
        current = self.current
        return {"hosts": {
            "files": [str(p) for p in self.files()],
            "suffixes": list(current.suffixes),
            "names": [list(entry) for entry in current.entries],
            "problems": list(current.problems),
        }}

    def _read(self, cfg: HostConfig, previous: HostsEntries) -> HostsEntries:
        fresh = read_entries(cfg.hosts, cfg.tunnel.host_address)
        for problem in fresh.problems:
            if problem not in previous.problems:
                log.warning("hosts: %s", problem)
        return fresh

    def _vm_up(self) -> bool:
        return any(p.name == VM_PEER and p.state == "up" for p in self._ctx.engine.peers)

    def _push(self) -> None:
        self._generation += 1
        parts = messages.hosts_parts(list(self.current.entries))
        for index, part in enumerate(parts):
            self._ctx.engine.send_control(
                VM_PEER, "hosts", gen=self._generation, part=index, parts=len(parts),
                suffixes=list(self.current.suffixes), entries=part,
            )


def setup(ctx: HostContext) -> None:
    push = HostsPush(ctx)
    ctx.watched_files.append(push.files)
    ctx.on_peer_up.append(push.peer_up)
    ctx.on_reconfigure.append(push.reconfigure)
    ctx.status_parts.append(push.status)
