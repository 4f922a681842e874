"""Hot reload: the config file, and the files features read (hosts files, the peer store),
watched by polling and applied to the running daemon when they change.

Polling by stat, not inotify: it sees an editor that replaces the file by a rename as well as
`cat >>`, works alike on every platform, and a few stat() calls four times a second cost
nothing. A change is applied once the files have held still for one poll, so a half-written
file is never loaded. An invalid file keeps the last good config running; its one-line error
goes to the log once and into `ctun status` until a good version arrives. `ctun reload`
goes through the same function. Nothing here reads the network: only files change the config.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from . import config, control, logs
from .config import HostConfig
from .host_context import HostContext

log = logging.getLogger("ctun.config")

POLL_INTERVAL = 0.25
# A change made within the file system's timestamp granularity of our last read leaves size
# and mtime as they were: keep re-reading a file while its mtime is this recent.
RECENT_NS = 2_000_000_000

Digest = bytes | None  # a file's content hash; None: the file does not exist
Snapshot = dict[Path, Digest]


@dataclass
class _Seen:
    key: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
    digest: bytes
    read_at_ns: int


class ConfigWatch:
    """Watches the files, reloads on a change, and keeps the state `ctun status` shows."""

    def __init__(self, ctx: HostContext, interval: float = POLL_INTERVAL) -> None:
        self._ctx = ctx
        self._interval = interval
        self._lock = threading.Lock()  # one reload at a time: the watcher's or a request's
        self._seen: dict[Path, _Seen] = {}
        self._known: set[Path] = set()  # seen existing: if one goes, that is an error
        self._unwatched: set[Path] = set()  # not regular files: never read again
        self._applied: Snapshot = self._snapshot(ctx.files())
        self._candidate: Snapshot | None = None  # changed at the last poll; not applied yet
        self._logged: tuple[str, frozenset[tuple[Path, Digest]]] | None = None
        self._problem: str | None = None  # our entry in ctx.problems
        self.loaded_at = time.time()
        self.error: str | None = None
        self.restart_needed: list[str] = []
        self.reloads = 0  # reloads attempted, good or bad (tests check there is no storm)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the watcher thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="config-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except Exception:  # a bug here must not end hot reload for the daemon's life
                log.exception("watching the config files failed")

    def poll(self) -> bool:
        """One look at the files; True when it tried a reload (good or bad)."""
        with self._lock:
            snap = self._snapshot(self._ctx.files())
            # A file that joins the list (a feature set up after this one, a hosts file the
            # reloaded config names) is taken as it is; one that leaves it, dropped.
            self._applied = {p: self._applied.get(p, digest) for p, digest in snap.items()}
            if snap == self._applied:
                self._candidate = None
                return False
            if snap != self._candidate:
                self._candidate = snap  # wait until it holds still for one poll
                log.debug("%s changed; applied once it holds still for %.2f s",
                          ", ".join(str(p) for p, d in snap.items() if d != self._applied[p]),
                          self._interval)
                return False
            self._candidate = None
            changed = sorted(p for p, digest in snap.items() if digest != self._applied[p])
            # A bad file is logged and shown in status; the last good config keeps running.
            with contextlib.suppress(config.ConfigError):
                self._reload(snap, "changed: " + ", ".join(map(str, changed)))
            return True

    # ---- reloading, for the watcher and the `reload` request alike

    def request(self, _request: dict[str, Any]) -> dict[str, Any]:
        """The `reload` control request: read the files now, whatever changed."""
        with self._lock:
            self._candidate = None
            try:
                pending = self._reload(self._snapshot(self._ctx.files()), "asked for")
            except config.ConfigError as exc:
                raise control.RequestError(f"config not reloaded: {exc}") from None
        cfg = self._ctx.cfg
        return {"source": cfg.source, "restart_needed": pending,
                "route_table": self._ctx.routes.status()["route_table"]}

    def _reload(self, snap: Snapshot, why: str) -> list[str]:
        before = self._applied
        # Taken as the files were before reading them: a change made meanwhile is seen next.
        self._applied = snap
        self.reloads += 1
        old = self._ctx.cfg
        try:
            self._check_nothing_gone(snap, before, old)
            cfg, pending = config.reload_host_config(old)
        except config.ConfigError as exc:
            self._fail(str(exc), snap)
            raise
        self._ctx.apply(cfg)
        self._succeed(old, cfg, pending, why)
        return pending

    def _check_nothing_gone(self, snap: Snapshot, before: Snapshot, cfg: HostConfig) -> None:
        """A file that disappears is an error, not an empty config (or an empty peer store);
        unless the config file itself changed: it may no longer name the missing file."""
        gone = [p for p, digest in snap.items() if digest is None and p in self._known]
        if not gone:
            return
        source = Path(cfg.source) if cfg.source else None
        config_changed = source is not None and snap.get(source) != before.get(source)
        if source in gone or not config_changed:
            what = "put it back" if gone[0] == source else \
                "put it back, or stop naming it in the config file"
            raise config.ConfigError(f"{gone[0]}: the file is gone (deleted or renamed?); "
                                     f"the last good config keeps running: {what}")

    # ---- outcomes

    def _fail(self, message: str, snap: Snapshot) -> None:
        self.error = message
        self._set_problem(f"config: {message}")
        seen = (message, frozenset(snap.items()))
        if seen != self._logged:  # once per distinct content, however often it is asked
            self._logged = seen
            log.error("config not reloaded, the last good config keeps running: %s", message)

    def _succeed(self, old: HostConfig, new: HostConfig, pending: list[str], why: str) -> None:
        self.error, self._logged = None, None
        self._set_problem(None)
        self.loaded_at = time.time()
        self.restart_needed = pending
        settings = [f.name for f in fields(HostConfig)
                    if f.compare and getattr(old, f.name) != getattr(new, f.name)]
        log.info("config reloaded (%s): %s%s", why,
                 f"changed {', '.join(settings)}" if settings else "no setting changed",
                 f"; needs a restart: {', '.join(pending)}" if pending else "")

    def _set_problem(self, problem: str | None) -> None:
        problems = self._ctx.problems
        if self._problem is not None and self._problem in problems:
            problems.remove(self._problem)
        self._problem = problem
        if problem is not None:
            problems.append(problem)

    def status(self) -> dict[str, Any]:
        return {"config": {"source": self._ctx.cfg.source, "loaded_at": self.loaded_at,
                           "error": self.error, "restart_needed": list(self.restart_needed)},
                "problems": list(self._ctx.problems)}

    # ---- reading the files

    def _snapshot(self, paths: list[Path]) -> Snapshot:
        digests = {p: self._digest(p) for p in paths if p not in self._unwatched}
        snap = {p: d for p, d in digests.items() if p not in self._unwatched}
        self._known.update(p for p, d in snap.items() if d is not None)
        return snap

    def _digest(self, path: Path) -> Digest:
        try:
            st = os.stat(path)
        except (OSError, ValueError):  # gone, or a path the OS cannot even take
            self._seen.pop(path, None)
            return None
        if not stat.S_ISREG(st.st_mode):
            # A FIFO (`--config <(...)`), a device: reading it again would block or take
            # what is meant for someone else. It was read once, at the start; that is all.
            self._unwatched.add(path)
            log.info("%s is not a regular file: changes to it are not watched", path)
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        seen = self._seen.get(path)
        if seen is not None and seen.key == key and seen.read_at_ns - st.st_mtime_ns > RECENT_NS:
            return seen.digest
        now = time.time_ns()
        try:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").digest()
        except OSError:  # unreadable now: a change of its own, which the reload will report
            self._seen.pop(path, None)
            return b"unreadable"
        self._seen[path] = _Seen(key, digest, now)
        return digest


def apply_loglevel(cfg: HostConfig) -> None:
    logs.apply_config_level(cfg.loglevel)


def setup(ctx: HostContext) -> None:
    watch = ConfigWatch(ctx)
    ctx.handlers["reload"] = watch.request
    ctx.status_parts.append(watch.status)
    ctx.on_reconfigure.append(apply_loglevel)
    watch.start()
    ctx.resources.callback(watch.stop)
