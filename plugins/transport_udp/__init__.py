"""The UDP transport: one sealed frame per datagram (the default, as docker-connector)."""

from __future__ import annotations

from collections.abc import Callable

from ...core.contracts import Transport
from ...core.hookspecs import hookimpl
from .transport import UdpTransport

__all__ = ["UdpTransport"]


@hookimpl
def ctun_register_transports(register: Callable[[type[Transport]], None]) -> None:
    register(UdpTransport)
