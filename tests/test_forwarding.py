"""The agent's route snapshots from the host (vm/forwarding.py): newest wins, in parts,
and a restarted host's snapshots (numbered from 1 again) are taken, not ignored as old."""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

from ctun.core import messages
from ctun.core.messages import MAX_EPOCH, ControlMessage
from ctun.core.status_text import format_agent
from ctun.vm.forwarding import Forwarding


class NoBridges:
    """The adapter calls Forwarding makes only from its own thread, never started here."""

    def interface_for(self, _network: IPv4Network) -> str | None:
        return None


def routes(epoch: int, gen: int, nets: list[str], part: int = 0, parts: int = 1
           ) -> ControlMessage:
    body: dict[str, Any] = {"gen": gen, "part": part, "parts": parts, "routes": nets}
    return ControlMessage("routes", seq=gen, body=body, epoch=epoch)


def subnets(forwarding: Forwarding) -> list[str]:
    return [str(s) for s in forwarding.subnets]


def test_newest_snapshot_wins_and_late_ones_are_ignored() -> None:
    forwarding = Forwarding(NoBridges(), None)  # type: ignore[arg-type]
    forwarding.on_control("host", routes(7, 2, ["10.1.0.0/16"]))
    forwarding.on_control("host", routes(7, 1, ["10.9.0.0/16"]))  # a late retransmit
    assert subnets(forwarding) == ["10.1.0.0/16"]


def test_a_snapshot_in_parts_applies_when_complete() -> None:
    forwarding = Forwarding(NoBridges(), None)  # type: ignore[arg-type]
    forwarding.on_control("host", routes(7, 1, ["10.1.0.0/16"], part=0, parts=2))
    assert subnets(forwarding) == []
    forwarding.on_control("host", routes(7, 1, ["10.2.0.0/16"], part=1, parts=2))
    assert subnets(forwarding) == ["10.1.0.0/16", "10.2.0.0/16"]


def test_a_restarted_host_starts_over_at_generation_one() -> None:
    forwarding = Forwarding(NoBridges(), None)  # type: ignore[arg-type]
    for gen in range(1, 6):
        forwarding.on_control("host", routes(7, gen, [f"10.{gen}.0.0/16"]))
    forwarding.on_control("host", routes(8, 1, ["172.30.0.0/16"]))
    assert subnets(forwarding) == ["172.30.0.0/16"]


def test_the_report_to_the_host_carries_feature_parts_and_only_changes() -> None:
    sent: list[dict[str, Any]] = []
    answered = [0]

    def broken() -> dict[str, Any]:
        raise RuntimeError("a feature's bug")

    parts = [lambda: {"dns": {"answered": answered[0]}}, broken]
    forwarding = Forwarding(NoBridges(), None, sent.append, parts)  # type: ignore[arg-type]
    forwarding._sync()  # what each round of its thread does
    forwarding._sync()
    answered[0] = 4
    forwarding._sync()
    assert [s["dns"] for s in sent] == [{"answered": 0}, {"answered": 4}]
    assert sent[0]["firewall"]["error"] == "not managed: no iptables in the agent"


class ManyBridges:
    def interface_for(self, network: IPv4Network) -> str | None:
        return f"br-{network.network_address.packed.hex()}{'0' * 4}"  # as long as Docker's


def test_a_report_for_many_networks_still_fits_one_control_message() -> None:
    """64 networks with Docker's 15-character bridge names are twice what fits: the host is
    told the first ones and how many there are."""
    sent: list[dict[str, Any]] = []
    dns = {"listen": "192.168.251.1:53", "error": "e" * 200, "names": 10**6, "redirects": 8,
           "redirect_error": "r" * 200, "answered": 2**62, "nxdomain": 2**62,
           "refused": 2**62, "malformed": 2**62}
    forwarding = Forwarding(ManyBridges(), None, sent.append,  # type: ignore[arg-type]
                            [lambda: {"dns": dns}])
    forwarding.on_control("host", routes(7, 1, [f"10.{i}.0.0/16" for i in range(40)],
                                         parts=2))
    forwarding.on_control("host", routes(7, 1, [f"10.{i}.0.0/16" for i in range(40, 64)],
                                         part=1, parts=2))
    forwarding._sync()
    (report,) = sent
    assert report["bridges_total"] == 64 and 0 < len(report["bridges"]) < 64
    message = messages.parse(messages.encode("agent_status", MAX_EPOCH - 1,
                                             epoch=MAX_EPOCH - 1, **report))
    assert message.body == report
    firewall_line = format_agent({"agent_view": report})[0]
    assert firewall_line.endswith(f" and {64 - len(report['bridges'])} more")
