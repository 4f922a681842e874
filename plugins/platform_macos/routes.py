"""Reading macOS's routing table from `netstat -rn -f inet` and `route -n get` output.

netstat prints destinations the BSD way: trailing zero octets are left out up to the
address's class (`10` is 10.0.0.0, `172.17` is 172.17.0.0, `192.168.65` is 192.168.65.0),
and `/bits` follows only when the mask is not that class's (`10.33/24`, `224.0.0/4`,
`192.168.1.1/32`). A bare four-octet destination is a host, as is anything flagged `H`.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

# Flags (netstat(1)) that make a row irrelevant to what ctun routes: `W` rows are host
# entries cloned from a network route (the network route is listed too), `I` rows are
# scoped to one interface and only steer sockets bound to it.
CLONED = "W"
SCOPED = "I"
HOST = "H"


@dataclass(frozen=True)
class RouteRow:
    network: IPv4Network
    gateway: str
    flags: str
    netif: str

    @property
    def via(self) -> IPv4Address | None:
        """The gateway when it is an address (not `link#N` or a MAC address)."""
        try:
            return IPv4Address(self.gateway)
        except ValueError:
            return None

    @property
    def incidental(self) -> bool:
        """A cloned or interface-scoped entry, not a route anyone configured."""
        return CLONED in self.flags or SCOPED in self.flags

    def describe(self) -> str:
        """`10.0.0.0/8 via 192.168.1.1 on en0`; `192.168.1.0/24 on en0` without a gateway."""
        via = f" via {self.via}" if self.via is not None else ""
        return f"{self.network}{via} on {self.netif}"


def class_prefix(first_octet: int) -> int:
    """The prefix length of an address's old class (C for D and E too, as netstat does)."""
    if first_octet < 128:
        return 8
    if first_octet < 192:
        return 16
    return 24


def parse_destination(text: str, flags: str = "") -> IPv4Network | None:
    """A netstat destination as a network; None for what is not an IPv4 destination."""
    if text == "default":
        return IPv4Network("0.0.0.0/0")
    address, slash, bits = text.partition("/")
    octets = address.split(".")
    if not 1 <= len(octets) <= 4 or not all(o.isdigit() and int(o) < 256 for o in octets):
        return None
    full = ".".join(octets + ["0"] * (4 - len(octets)))
    if slash:
        if not bits.isdigit():
            return None
        prefix = int(bits)
    elif HOST in flags or len(octets) == 4:
        prefix = 32
    else:
        prefix = class_prefix(int(octets[0]))
    try:
        return IPv4Network(f"{full}/{prefix}")
    except ValueError:
        return None  # host bits set: not a destination we can reason about


def parse_netstat(text: str) -> list[RouteRow]:
    """The rows of `netstat -rn -f inet`, in the order printed.

    Columns are found from the header, which differs between macOS releases (older ones
    print Refs and Use between Flags and Netif); the Expire column is often empty.
    """
    rows: list[RouteRow] = []
    columns: dict[str, int] | None = None
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "Destination":
            columns = {name: index for index, name in enumerate(fields)}
            continue
        if columns is None:
            continue  # "Routing tables", "Internet:"
        if line.rstrip().endswith(":"):
            break  # the next family's table ("Internet6:")
        try:
            destination = fields[columns["Destination"]]
            gateway = fields[columns["Gateway"]]
            flags = fields[columns["Flags"]]
            netif = fields[columns["Netif"]]
        except (KeyError, IndexError):
            continue
        network = parse_destination(destination, flags)
        if network is not None:
            rows.append(RouteRow(network, gateway, flags, netif))
    return rows


def parse_route_get(text: str) -> dict[str, str]:
    """The `key: value` lines of `route -n get` (`destination`, `mask`, `gateway`,
    `interface`, `flags`, ...). Empty when the kernel had no route to report."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        key = key.strip()
        if colon and key and " " not in key:
            info[key] = value.strip()
    return info


def route_get_network(info: dict[str, str]) -> IPv4Network | None:
    """The network `route -n get` answered with, from its destination and mask."""
    destination, mask = info.get("destination"), info.get("mask")
    if destination == "default":
        return IPv4Network("0.0.0.0/0")
    if destination is None:
        return None
    try:
        if mask is None:
            return IPv4Network(f"{destination}/32")
        return IPv4Network(f"{destination}/{mask}", strict=False)
    except ValueError:
        return None
