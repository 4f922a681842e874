"""ctun plugin: the "padded-udp" transport (UDP with every datagram padded to a bucket size).

This module is the plugin: the entry point `padded` in the group `ctun` names it, and ctun
registers it with its plugin manager, which then calls the hook implementations below.
"""

from __future__ import annotations

from collections.abc import Callable

from ctun.core.contracts import Transport
from ctun.core.hookspecs import hookimpl

from .transport import BUCKET, HEADER, PaddedUdpTransport, padded_size

__all__ = ["BUCKET", "HEADER", "PaddedUdpTransport", "ctun_register_transports", "padded_size"]
__version__ = "0.1.0"


@hookimpl
def ctun_register_transports(register: Callable[[type[Transport]], None]) -> None:
    register(PaddedUdpTransport)
