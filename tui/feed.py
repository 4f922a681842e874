"""A background thread that follows the daemon's snapshot stream and keeps only the latest.

The UI takes from it on its own timer, so a flood of snapshots is collapsed into one and never
queues up behind the screen. Events are the exception: the daemon sends each only once, so
they are kept (bounded) until taken, or the log pane would miss some."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import control

RETRY = 1.0  # seconds between attempts while the daemon is not there
MAX_EVENTS = 500


@dataclass
class Taken:
    """What changed since the last take(): a new status, or a new error, plus events."""

    status: dict[str, Any] | None = None
    at: float = 0.0
    error: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


class SnapshotFeed:
    def __init__(self, path: Path, interval: float) -> None:
        self.path = path
        self.interval = interval
        self._lock = threading.Lock()
        self._status: dict[str, Any] | None = None
        self._at = 0.0
        self._error: str | None = None
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._stop = threading.Event()
        # A daemon thread: it may sit in a blocking read for up to a few intervals, and
        # quitting the app must not wait for that.
        self._thread = threading.Thread(target=self._run, name="ctun-tui-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def take(self) -> Taken | None:
        """The newest status or error since the last call (None when nothing happened)."""
        with self._lock:
            if self._status is None and self._error is None and not self._events:
                return None
            taken = Taken(self._status, self._at, self._error, list(self._events))
            self._status, self._error = None, None
            self._events.clear()
            return taken

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for message in control.subscribe(self.path, self.interval):
                    self._offer(message)
                    if self._stop.is_set():
                        return
                self._fail("the daemon went away")
            except control.ControlError as exc:
                self._fail(str(exc))
            except (ValueError, KeyError, TypeError) as exc:  # a garbled line: reconnect
                self._fail(f"bad snapshot from the daemon: {exc}")
            self._stop.wait(RETRY)

    def _offer(self, message: dict[str, Any]) -> None:
        status = message.get("status")
        if not isinstance(status, dict):
            return
        with self._lock:
            self._events.extend(status.get("events") or [])
            self._status, self._at, self._error = status, time.monotonic(), None

    def _fail(self, reason: str) -> None:
        with self._lock:
            self._status, self._error = None, reason
