"""The TCP transport: length-prefixed sealed frames over TCP, for when UDP is blocked."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ...core.contracts import Transport
from ...core.hookspecs import hookimpl

# Built on epoll and timerfd: Linux only for now (the macOS/Windows hosts fall back to
# UDP alone until a selectors-based variant exists; `ctun up` says so in its log).
if sys.platform.startswith("linux"):
    from .transport import TcpTransport

    __all__ = ["TcpTransport"]


@hookimpl
def ctun_register_transports(register: Callable[[type[Transport]], None]) -> None:
    if sys.platform.startswith("linux"):
        register(TcpTransport)
