"""The TCP transport: length-prefixed sealed frames over TCP, for when UDP is blocked."""

from __future__ import annotations

from collections.abc import Callable

from ...core.contracts import Transport
from ...core.hookspecs import hookimpl
from .transport import TcpTransport

__all__ = ["TcpTransport"]


@hookimpl
def ctun_register_transports(register: Callable[[type[Transport]], None]) -> None:
    register(TcpTransport)
