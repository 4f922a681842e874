"""What a configuration is measured on: one table row each, keyed like the JSON figures."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    RATE = "rate"
    """More is better; ctun's figure is shown as a percentage of the plain route's."""
    LATENCY = "latency"
    """ctun's figure is shown as the time it adds to the plain route's."""
    OTHER = "other"
    """No comparison column (counts, or figures the plain route does not have)."""


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    kind: Kind
    decimals: int = 0


TCP_UP = Metric("tcp1_up_mbps", "tcp 1 stream host->ctr Mbit/s", Kind.RATE)
TCP_UP_RETRANSMITS = Metric("tcp1_up_retransmits", "  retransmits", Kind.OTHER)
TCP_DOWN = Metric("tcp1_down_mbps", "tcp 1 stream ctr->host Mbit/s", Kind.RATE)
TCP_DOWN_RETRANSMITS = Metric("tcp1_down_retransmits", "  retransmits", Kind.OTHER)
TCP4_UP = Metric("tcp4_up_mbps", "tcp 4 streams host->ctr Mbit/s", Kind.RATE)
TCP4_DOWN = Metric("tcp4_down_mbps", "tcp 4 streams ctr->host Mbit/s", Kind.RATE)
UDP_PPS = Metric("udp_pps", "udp 1372 B host->ctr pkt/s", Kind.RATE)
UDP_LOSS = Metric("udp_loss_percent", "  loss %", Kind.OTHER, 2)
PING_AVG = Metric("ping_avg_ms", "ping rtt avg ms", Kind.LATENCY, 3)
PING_P99 = Metric("ping_p99_ms", "ping rtt p99 ms", Kind.LATENCY, 3)
CPU = Metric("cpu_percent_per_gbit", "ctun cpu %/Gbit/s (tcp 1 up)", Kind.OTHER, 1)
HANDSHAKE = Metric("handshake_ms", "handshake ms", Kind.OTHER, 1)
FIRST_PACKET = Metric("first_packet_ms", "agent start -> 1st reply ms", Kind.OTHER, 1)

ALL: tuple[Metric, ...] = (
    TCP_UP, TCP_UP_RETRANSMITS, TCP_DOWN, TCP_DOWN_RETRANSMITS, TCP4_UP, TCP4_DOWN,
    UDP_PPS, UDP_LOSS, PING_AVG, PING_P99, CPU, HANDSHAKE, FIRST_PACKET,
)  # fmt: skip
TUNNEL_ONLY = frozenset({CPU.key, HANDSHAKE.key, FIRST_PACKET.key})
"""Figures that exist only with ctun in the path: n/a for the plain route."""
