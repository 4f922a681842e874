"""Keep an adapter's work in the network namespace it started in, whichever thread calls it.

Network namespaces are per thread: /proc/sys/net writes, new tun devices and pyroute2 0.9's
netlink sockets (opened lazily, one per calling thread) all land in the calling thread's
namespace. An adapter set up inside a namespace and closed from another thread would
otherwise tear down the wrong namespace's state.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from ...core.contracts import PlatformError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_THREAD_NS = "/proc/thread-self/ns/net"


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise PlatformError(f"cannot enter the adapter's network namespace: {os.strerror(err)}")


class NetnsPin:
    """The network namespace current when this was made; run() executes work inside it."""

    def __init__(self) -> None:
        self._fd = os.open(_THREAD_NS, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        self._id = (st.st_dev, st.st_ino)

    def is_current(self) -> bool:
        st = os.stat(_THREAD_NS)
        return (st.st_dev, st.st_ino) == self._id

    def run(self, fn: Callable[[], T]) -> T:
        """fn() in the pinned namespace: directly when already there, else on a helper thread."""
        if self._fd < 0:
            raise PlatformError("the adapter is closed")
        if self.is_current():
            return fn()
        box: dict[str, object] = {}

        def work() -> None:
            try:
                _setns(self._fd)
                box["result"] = fn()
            except BaseException as exc:  # re-raised on the caller's thread below
                box["error"] = exc

        # A fresh thread, because setns() would otherwise move the caller's thread for good.
        thread = threading.Thread(target=work, name="ctun-netns", daemon=True)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["result"]  # type: ignore[return-value]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
