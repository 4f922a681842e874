"""Which Docker subnets the host routes into the tunnel, and for the rest, why not.

Pure: the watcher supplies the networks, the platform adapter answers "does the host
already route this elsewhere?", and plan() returns one decision per subnet for the routing
table and the status view alike.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network

DEFAULT_AGENT_BASE = "python:3.11-slim-bookworm"

ACTIVE = "active"
CONFLICT = "conflict"
EXCLUDED = "excluded"
INTERNAL = "internal"
IPV6 = "ipv6-not-routed"
DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Selector:
    """`name:GLOB`, `label:KEY` / `label:KEY=VALUE`, or `subnet:CIDR` (subnets inside it)."""

    kind: str
    pattern: str
    value: str | None = None

    @classmethod
    def parse(cls, text: str) -> Selector:
        kind, sep, rest = text.partition(":")
        if not sep or not rest:
            raise ValueError('must be "name:GLOB", "label:KEY[=VALUE]" or "subnet:CIDR"')
        if kind == "name":
            return cls("name", rest)
        if kind == "label":
            key, eq, value = rest.partition("=")
            return cls("label", key, value if eq else None)
        if kind == "subnet":
            try:
                ip_network(rest)
            except ValueError:
                raise ValueError(f"{rest!r} is not a network like 172.20.0.0/16") from None
            return cls("subnet", rest)
        raise ValueError(f"unknown selector kind {kind!r}: use name:, label: or subnet:")

    def matches(self, network: NetworkInfo, subnet: IPv4Network | IPv6Network) -> bool:
        if self.kind == "name":
            return fnmatch.fnmatchcase(network.name, self.pattern)
        if self.kind == "label":
            if self.pattern not in network.labels:
                return False
            return self.value is None or network.labels[self.pattern] == self.value
        outer = ip_network(self.pattern)
        return subnet.version == outer.version and subnet.subnet_of(outer)  # type: ignore[arg-type]

    def __str__(self) -> str:
        suffix = f"={self.value}" if self.value is not None else ""
        return f"{self.kind}:{self.pattern}{suffix}"


@dataclass(frozen=True)
class DockerConfig:
    enabled: bool = True  # follow the engine's networks
    url: str | None = None  # None: DOCKER_HOST or the default socket
    include: tuple[Selector, ...] = ()  # when set, only matching networks are routed
    exclude: tuple[Selector, ...] = ()
    internal: bool = False  # route `internal` networks too
    agent: bool = True  # run the agent as a container through the engine
    agent_host: str = "host.docker.internal"  # how the agent reaches this host
    agent_base: str = DEFAULT_AGENT_BASE


@dataclass(frozen=True)
class NetworkInfo:
    id: str
    name: str
    driver: str
    internal: bool
    labels: Mapping[str, str]
    subnets: tuple[IPv4Network | IPv6Network, ...]

    @classmethod
    def from_api(cls, attrs: Mapping[str, object]) -> NetworkInfo:
        """From the engine's JSON for a network (list or inspect); bad subnets are skipped."""
        ipam = attrs.get("IPAM") or {}
        configs = ipam.get("Config") or [] if isinstance(ipam, dict) else []
        subnets: list[IPv4Network | IPv6Network] = []
        for entry in configs:
            try:
                subnets.append(ip_network(str(entry.get("Subnet")), strict=False))
            except (ValueError, AttributeError):
                continue
        labels = attrs.get("Labels") or {}
        return cls(
            id=str(attrs.get("Id", "")),
            name=str(attrs.get("Name", "")),
            driver=str(attrs.get("Driver", "")),
            internal=bool(attrs.get("Internal", False)),
            labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
            subnets=tuple(subnets),
        )


@dataclass(frozen=True)
class RouteDecision:
    subnet: str
    source: str  # "config", or "docker:<network name>"
    state: str  # ACTIVE, CONFLICT, EXCLUDED, INTERNAL, IPV6, DUPLICATE
    detail: str = ""

    @property
    def routed(self) -> bool:
        return self.state == ACTIVE


@dataclass
class Plan:
    decisions: list[RouteDecision] = field(default_factory=list)

    @property
    def routes(self) -> tuple[IPv4Network, ...]:
        return tuple(IPv4Network(d.subnet) for d in self.decisions if d.routed)


def plan(
    networks: Iterable[NetworkInfo],
    cfg: DockerConfig,
    static_routes: Iterable[IPv4Network],
    tunnel: IPv4Network,
    conflict: Callable[[IPv4Network], str | None],
    runtime_routes: Iterable[IPv4Network] = (),
) -> Plan:
    """Decide every subnet: config routes first, then those added over the control socket,
    then Docker's, in a stable order."""
    result = Plan()
    taken: dict[IPv4Network, str] = {}

    def claim(subnet: IPv4Network, source: str) -> RouteDecision:
        if subnet.overlaps(tunnel):
            return RouteDecision(str(subnet), source, CONFLICT,
                                 f"overlaps the tunnel network {tunnel}")
        for other, owner in taken.items():
            if subnet.overlaps(other):
                return RouteDecision(str(subnet), source, DUPLICATE,
                                     f"overlaps {other}, already routed for {owner}")
        existing = conflict(subnet)
        if existing is not None:
            return RouteDecision(str(subnet), source, CONFLICT,
                                 f"overlaps the host route {existing}; not routed")
        taken[subnet] = source
        return RouteDecision(str(subnet), source, ACTIVE)

    for route in static_routes:
        result.decisions.append(claim(route, "config"))
    for route in runtime_routes:
        result.decisions.append(claim(route, "control"))
    for network in sorted(networks, key=lambda n: (n.name, n.id)):
        source = f"docker:{network.name}"
        for subnet in network.subnets:
            result.decisions.append(_decide(network, subnet, cfg, source, claim))
    return result


def _decide(
    network: NetworkInfo,
    subnet: IPv4Network | IPv6Network,
    cfg: DockerConfig,
    source: str,
    claim: Callable[[IPv4Network, str], RouteDecision],
) -> RouteDecision:
    if isinstance(subnet, IPv6Network):
        return RouteDecision(str(subnet), source, IPV6, "IPv6 is not routed yet")
    if cfg.include and not any(s.matches(network, subnet) for s in cfg.include):
        return RouteDecision(str(subnet), source, EXCLUDED, "not matched by docker.include")
    for selector in cfg.exclude:
        if selector.matches(network, subnet):
            return RouteDecision(str(subnet), source, EXCLUDED, f"docker.exclude {selector}")
    if network.internal and not cfg.internal:
        return RouteDecision(str(subnet), source, INTERNAL,
                             "an internal network; set docker.internal = true to route it")
    return claim(subnet, source)
