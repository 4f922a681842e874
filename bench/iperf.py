"""iperf3: command lines, running the client in a namespace, and reading its JSON (`-J`)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Any

from ..lab import netns
from ..lab.topology import wait_until

PORT = 5201
UDP_PAYLOAD = 1372  # + 8 (UDP) + 20 (IPv4) = 1400, the tunnel MTU: the largest unfragmented
CONNECT_TIMEOUT_MS = 3000
# How much longer than the sender a receiver may run before its lag counts as packets that
# could not keep up: more than a path's latency (ms here), much less than the queue a rate
# 30% over capacity (the search's step) builds in a 1 s probe.
LATE_ALLOWANCE = 0.05
# The server needs a moment between tests; a client arriving too soon is told to come back.
BUSY_RETRY_FOR = 10.0


class IperfError(Exception):
    """iperf3 failed; str() is one line."""


@dataclass(frozen=True)
class TcpResult:
    mbps: float
    """What the receiving side counted, in Mbit/s."""
    retransmits: int | None
    """The sender's retransmitted segments (None when iperf3 could not read them)."""
    seconds: float
    raw: dict[str, Any]


@dataclass(frozen=True)
class UdpResult:
    target_pps: int
    sent_pps: float
    delivered_pps: float
    """Packets that arrived, per second of the receiver's run."""
    lost_percent: float
    """iperf3's own figure: gaps in the sequence numbers the receiver saw."""
    sent_seconds: float
    received_seconds: float
    raw: dict[str, Any]

    @property
    def late_percent(self) -> float:
        """How much longer than the sender the receiver ran, beyond LATE_ALLOWANCE, as a share
        of the sender's run.

        A tunnel that queues (the TCP transport does) loses nothing at a rate it cannot keep
        up with, it only delivers later and later, which iperf3's loss figure cannot show: the
        receiver's run then outlasts the sender's by the queue it built up.
        """
        if self.sent_seconds <= 0:
            return 100.0
        lag = self.received_seconds - self.sent_seconds - LATE_ALLOWANCE
        return max(0.0, 100 * lag / self.sent_seconds)

    @property
    def shortfall_percent(self) -> float:
        """Lost plus late: what the search holds under its limit."""
        return self.lost_percent + self.late_percent


def server_argv(bind: str) -> list[str]:
    return ["iperf3", "-s", "-B", bind, "-p", str(PORT)]


def client_argv(
    server: str,
    seconds: int,
    *,
    reverse: bool = False,
    streams: int = 1,
    udp_pps: int | None = None,
) -> list[str]:
    argv = ["iperf3", "-c", server, "-p", str(PORT), "-t", str(seconds), "-J",
            "--connect-timeout", str(CONNECT_TIMEOUT_MS)]  # fmt: skip
    if reverse:
        argv.append("-R")
    if streams != 1:
        argv += ["-P", str(streams)]
    if udp_pps is not None:
        argv += ["-u", "-l", str(UDP_PAYLOAD), "-b", str(udp_pps * UDP_PAYLOAD * 8)]
    return argv


def load(text: str) -> dict[str, Any]:
    """iperf3's JSON document; IperfError for garbage or for the error it reports."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        first = text.strip().splitlines()[:1]
        raise IperfError(f"iperf3 printed no JSON: {first[0] if first else '(nothing)'}") from None
    if not isinstance(doc, dict):
        raise IperfError("iperf3 printed JSON that is not an object")
    if doc.get("error"):
        raise IperfError(f"iperf3: {doc['error']}")
    return doc


def _end(doc: dict[str, Any], *keys: str) -> dict[str, Any]:
    end = doc.get("end") or {}
    for key in keys:
        section = end.get(key)
        if isinstance(section, dict) and section:
            return section
    raise IperfError(f"iperf3 JSON has none of end.{'/'.join(keys)}")


def raw_figures(doc: dict[str, Any]) -> dict[str, Any]:
    """What --json keeps of a run: the summary (`end`), without the per-second intervals."""
    return {"test_start": doc.get("start", {}).get("test_start"), "end": doc.get("end")}


def parse_tcp(doc: dict[str, Any]) -> TcpResult:
    received = _end(doc, "sum_received")
    sent = _end(doc, "sum_sent")
    retransmits = sent.get("retransmits")
    return TcpResult(
        mbps=float(received["bits_per_second"]) / 1e6,
        retransmits=int(retransmits) if retransmits is not None else None,
        seconds=float(sent.get("seconds") or received["seconds"]),
        raw=raw_figures(doc),
    )


def parse_udp(doc: dict[str, Any], target_pps: int) -> UdpResult:
    sent = _end(doc, "sum_sent", "sum")
    # iperf3 before 3.10 has only `sum`, which already holds the receiver's loss figures.
    received = _end(doc, "sum_received", "sum")
    sent_seconds = float(sent["seconds"])
    received_seconds = float(received["seconds"])
    if sent_seconds <= 0 or received_seconds <= 0:
        raise IperfError("iperf3 reports a UDP run of 0 seconds")
    packets = int(received["packets"])
    lost = int(received["lost_packets"])
    return UdpResult(
        target_pps=target_pps,
        sent_pps=int(sent["packets"]) / sent_seconds,
        delivered_pps=(packets - lost) / received_seconds,
        lost_percent=float(received["lost_percent"]),
        sent_seconds=sent_seconds,
        received_seconds=received_seconds,
        raw=raw_figures(doc),
    )


def run_client(ns: str, argv: list[str], seconds: int) -> dict[str, Any]:
    """Run an iperf3 client in `ns` and return its JSON, retrying while the server is busy."""
    last_busy: list[str] = []

    def attempt() -> dict[str, Any]:
        try:
            result = netns.run(ns, argv, check=False, timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            raise IperfError(f"iperf3 did not finish within {seconds + 30} s") from None
        try:
            return load(result.stdout)
        except IperfError as exc:
            if "busy" not in str(exc):
                raise
            last_busy[:] = [str(exc)]
            return {}  # falsy: try again

    try:
        return wait_until(attempt, BUSY_RETRY_FOR, interval=0.2, what="a free iperf3 server")
    except AssertionError:
        raise IperfError(f"{last_busy[0]} (for {BUSY_RETRY_FOR:.0f} s)") from None
