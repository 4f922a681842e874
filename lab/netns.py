"""Network-namespace helpers for the lab and the tests.

setns(2) moves only the calling thread, so work "inside" a namespace runs on a short-lived
thread; sockets and tun devices keep the namespace they were created in after it ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def _enter(name: str) -> None:
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(name: str, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run fn(*args, **kwargs) on a thread inside namespace `name` and return its result."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            _enter(name)
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed back to the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def add(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    # Loopback is down in a new namespace; nearly everything expects it up.
    run(name, ["ip", "link", "set", "lo", "up"])


def delete(name: str) -> None:
    if exists(name):
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def run(
    name: str, argv: list[str], check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a command inside namespace `name`, capturing its output as text."""
    return subprocess.run(
        ["ip", "netns", "exec", name, *argv],
        check=check,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextlib.contextmanager
def temporary(name: str) -> Iterator[str]:
    """A fresh namespace that is deleted afterwards, whatever happens inside."""
    delete(name)
    add(name)
    try:
        yield name
    finally:
        delete(name)
