"""Threads whose death must stop the daemon: a pump that dies quietly would leave a tunnel
that looks up and carries nothing."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("ctun.threads")


def start_guarded(target: Callable[[], None], name: str,
                  on_crash: Callable[[], None]) -> threading.Thread:
    """Start `target` on a daemon thread; if it raises, log it and call `on_crash` (which
    stops the whole)."""

    def run() -> None:
        try:
            target()
        except Exception:
            log.exception("thread %s failed; stopping", name)
            on_crash()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
