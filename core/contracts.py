"""The two contracts every plugin implements: a platform adapter and a transport.

The engine only ever talks to these; nothing OS- or wire-specific leaks past them.
Optional operations do nothing by default, required ones are abstract (sshuttle's pattern).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from ipaddress import IPv4Address, IPv4Network
from typing import ClassVar

Endpoint = tuple[str, int]
"""A transport address: (host, port). Host is a literal IP address once resolved."""


class PlatformError(Exception):
    """An OS operation failed in a way the user can act on; str() is a one-line message."""


class VirtualInterface(ABC):
    """An open L3 virtual interface (tun/utun/TAP) carrying bare IP packets."""

    name: str
    vnet: bool = False
    """True when every packet read_packets() returns starts with a 10-byte offload header
    (core/gso.py, virtio byte order) and write_gso() works: Linux tun with offloads."""

    @abstractmethod
    def fileno(self) -> int:
        """A descriptor that polls readable when read_packets() may return packets."""

    @abstractmethod
    def read_packets(self, limit: int) -> list[bytes]:
        """Up to `limit` packets that are ready now, without blocking; [] when none are."""

    @abstractmethod
    def write_packet(self, packet: bytes) -> None:
        """Hand one IP packet to the OS; a full queue drops it rather than blocking."""

    @abstractmethod
    def close(self) -> None:
        """Close the device; the OS removes the interface and its routes with it."""

    # Optional: only interfaces with vnet set implement these.

    def set_offload(self, enabled: bool) -> None:
        """Let the OS hand over TCP super-packets and unfinished checksums (or stop it)."""
        return None  # optional: nothing to do by default

    def write_gso(self, header: bytes, packet: bytes | memoryview) -> None:
        """Hand one super-packet with its offload header (virtio byte order) to the OS."""
        raise NotImplementedError(f"{type(self).__name__} takes no offload packets")


class PlatformAdapter(ABC):
    """Owns one virtual interface and everything configured on it.

    One adapter instance serves one interface. Every change it makes is undone by close(),
    and cleanup_leftovers() undoes what a crashed earlier run with the same name left.
    """

    name: ClassVar[str]
    offload: bool = False
    """Set before open_interface(): ask for kernel offloads where the platform has them (the
    interface then says so with its `vnet`). Adapters without offloads ignore it."""

    @classmethod
    @abstractmethod
    def is_supported(cls) -> bool:
        """True when this adapter can run on this machine (OS, privileges aside)."""

    @abstractmethod
    def cleanup_leftovers(self, ifname: str) -> list[str]:
        """Remove what a crashed run named `ifname` left behind; describe each thing removed."""

    @abstractmethod
    def open_interface(self, ifname: str, mtu: int) -> VirtualInterface:
        """Create the interface, set its MTU and bring it up."""

    @abstractmethod
    def set_address(self, local: IPv4Address, peer: IPv4Address) -> None:
        """Give the interface a point-to-point address: `local` here, `peer` at the far end."""

    @abstractmethod
    def set_mtu(self, mtu: int) -> None: ...

    @abstractmethod
    def add_route(self, network: IPv4Network, via: IPv4Address | None = None) -> None:
        """Route `network` into the interface; adding an existing route is not an error."""

    @abstractmethod
    def replace_route(self, network: IPv4Network, via: IPv4Address | None = None) -> None:
        """Add the route, or move an existing route for `network` onto this interface."""

    @abstractmethod
    def remove_route(self, network: IPv4Network) -> None:
        """Remove the route; removing a route that is not there is not an error."""

    @abstractmethod
    def routes(self) -> list[IPv4Network]:
        """The IPv4 networks currently routed into this interface, as the OS reports them."""

    @abstractmethod
    def close(self) -> None:
        """Undo everything this adapter did: routes, addresses, the interface, sysctls."""

    # Optional operations: adapters for hosts that never forward leave these as they are.

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Group many calls (a thousand routes): the adapter may share one OS handle and one
        reading of the routing table among them. Calls behave the same either way."""
        return contextlib.nullcontext()

    def enable_forwarding(self) -> None:
        """Let the OS forward packets between interfaces (needed on the VM side only)."""
        raise PlatformError(f"the {self.name} adapter cannot forward packets")

    def conflicting_route(self, network: IPv4Network) -> str | None:
        """Describe an existing route on another interface that overlaps `network`, if any."""
        return None

    def interface_for(self, network: IPv4Network) -> str | None:
        """The other interface this machine reaches `network` through (on the VM side: the
        Docker bridge of a routed subnet), or None."""
        return None


class Transport(ABC):
    """Moves whole sealed frames between two endpoints; knows nothing of what is inside.

    Datagram semantics: a frame is delivered whole or not at all, and send() never blocks
    the packet path (a full buffer drops the frame; the tunnel's own counters notice).
    """

    name: ClassVar[str]
    max_frame: ClassVar[int] = 65535

    @classmethod
    @abstractmethod
    def listen(cls, bind: Endpoint) -> Transport:
        """Server side: accept frames from any endpoint at `bind`."""

    @classmethod
    @abstractmethod
    def connect(cls, remote: Endpoint) -> Transport:
        """Client side: exchange frames with `remote` only."""

    @property
    @abstractmethod
    def local_endpoint(self) -> Endpoint: ...

    @abstractmethod
    def fileno(self) -> int:
        """A descriptor that polls readable when receive() may return frames."""

    @abstractmethod
    def receive(self, limit: int = 64) -> list[tuple[bytes, Endpoint]]:
        """Up to `limit` frames that are ready now, with their senders, without blocking."""

    @abstractmethod
    def send(self, frame: bytes, to: Endpoint) -> None:
        """Send one frame to `to`; never raises for a network error (the frame is dropped and
        counted instead). A frame longer than max_frame is a caller's bug: ValueError."""

    @abstractmethod
    def close(self) -> None:
        """Release everything; idempotent. Afterwards send() drops, receive() returns []."""

    def send_many(self, frames: list[bytes], to: Endpoint) -> None:
        """Send frames in order; transports that can batch them into fewer system calls
        override this (the UDP transport uses UDP_SEGMENT)."""
        for frame in frames:
            self.send(frame, to)

    def use_offloads(self, enabled: bool) -> None:
        """Whether to use the OS's batching offloads where it has them (on by default);
        False forces the plain one-frame-per-call path."""
        return None  # optional: nothing to do by default

    def set_datagram_size(self, size: int) -> None:
        """The largest frame the engine sends in the normal course (MTU plus overhead). A
        datagram transport may split bigger frames (offload super-packets) into pieces of at
        most this size, so they never need IP fragmentation where full packets do not."""
        return None  # optional: nothing to do by default

    def stats(self) -> dict[str, int]:
        """Counters for the status view (errors, connections closed by reason, ...). Those
        named `dropped_...` count frames the transport lost; `ctun status` shows them."""
        return {}
