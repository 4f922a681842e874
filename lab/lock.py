"""The lock file through which a lab owns its prefix (see Lab and DockerLab).

create() treats anything left under a prefix as debris of a crash and removes it, which must
never happen to a lab another process still uses. Two pytest sessions on one machine (or a test
and the demo) would otherwise tear down each other's namespaces as "stale"; the lock tells a
crashed owner (the kernel drops flocks of dead processes) from a live one, which we wait for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO


class PrefixLock:
    """An exclusive flock on `path`, which exists only while someone holds it.

    `busy` says who holds it when acquire() gives up: "<busy> (waited <timeout>s for <path>)".
    """

    def __init__(self, path: Path, busy: str) -> None:
        self.path = path
        self.busy = busy
        self._file: IO[bytes] | None = None

    def acquire(self, timeout: float) -> None:
        """Take the lock (at once if this object holds it already), waiting up to `timeout`
        seconds for a live holder; then RuntimeError."""
        if self._file is not None:
            return
        deadline = time.monotonic() + timeout
        while True:
            f = open(self.path, "a+b")  # noqa: SIM115 - held until release()
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"{self.busy} (waited {timeout}s for {self.path})") from None
                time.sleep(0.1)
                continue
            try:
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._file = f
                return
            # The owner unlinked the file between our open() and flock(): we hold a lock on
            # an orphaned inode that nobody else will ever see, so start over.
            f.close()

    def release(self) -> None:
        """Give the lock up and remove its file (nothing if not held)."""
        if self._file is None:
            return
        # Unlink while still holding the lock, so nothing remains behind; a waiter that opened
        # the old inode notices it in acquire() and retries on a fresh file.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._file.close()
        self._file = None

    @contextlib.contextmanager
    def holding(self, timeout: float) -> Iterator[None]:
        """acquire(timeout) for the block, and release() after it, even if held before."""
        self.acquire(timeout)
        try:
            yield
        finally:
            self.release()
