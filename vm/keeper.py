"""Worker threads for the agent's iptables features: the network thread hands them work and
never waits; they do it at once and again every few seconds, because Docker rewrites its
chains and networks come and go without telling us.

Ticker runs one function every `every` seconds (sooner when woken). Keeper builds on it for
features fed full-state snapshots: the newest offered one is applied, older ones are dropped
unseen, and a round with nothing new refreshes what is in place.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

JOIN_TIMEOUT = 10.0  # seconds stop() waits for a round in progress (iptables can be slow)


class Ticker:
    """A daemon thread that calls `tick` at once, then every `every` seconds or on wake()."""

    def __init__(self, name: str, tick: Callable[[], None], *, every: float,
                 log: logging.Logger, what: str) -> None:
        self._tick = tick
        self._every = every
        self._log, self._what = log, what
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end and wait for its round in progress."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=JOIN_TIMEOUT)

    def wake(self) -> None:
        """Run a round now instead of at the next interval."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # one bad round must not end the feature for the agent's life
                self._log.exception("%s: update failed", self._what)
            self._wake.wait(self._every)
            self._wake.clear()


class Keeper(Ticker, Generic[T]):
    """A Ticker that applies the newest offered state, else refreshes the one in place."""

    def __init__(self, name: str, *, apply: Callable[[T], None], refresh: Callable[[], None],
                 every: float, log: logging.Logger, what: str) -> None:
        super().__init__(name, self._round, every=every, log=log, what=what)
        self._apply, self._refresh = apply, refresh
        self._lock = threading.Lock()
        self._offered: tuple[T] | None = None  # boxed: a state may itself be None or empty

    def offer(self, state: T) -> None:
        """Any thread (the network thread): keep `state` in place of any not yet applied,
        and wake the worker. Nothing slow happens here."""
        with self._lock:
            self._offered = (state,)
        self.wake()

    def _round(self) -> None:
        with self._lock:
            offered, self._offered = self._offered, None
        if offered is not None:
            self._apply(offered[0])
        else:
            self._refresh()
