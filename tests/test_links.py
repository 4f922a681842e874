"""Subnet links (`iptables A+B`) without Docker: the exact iptables commands against the
recording fake of test_firewall, the agent's resolution of pairs to bridges, its `links`
message handling, and the host feature that sends the pairs. (On real interfaces, in a
namespace with Docker 20.10's firewall: the end of this file; with a real dockerd:
test_links_lab.py.)
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any, cast

import pytest
from ctun.core import agent_push, messages
from ctun.core.config import HostConfig, PeerConfig, Timers, TunnelConfig
from ctun.core.host_context import HostContext
from ctun.core.protocol import Dropped
from ctun.lab import netns
from ctun.lab.topology import wait_until
from ctun.tests.test_firewall import IPT, TAG, TUN
from ctun.tests.test_firewall import FakeIptables as _FakeIptables
from ctun.vm import links as links_module
from ctun.vm.agent_context import AgentContext
from ctun.vm.firewall import BridgeLink, Firewall, rule_key
from ctun.vm.links import LinksWorker, SubnetLinks

NET_A = IPv4Network("172.18.0.0/16")
NET_B = IPv4Network("172.19.0.0/16")
HOST = IPv4Address("192.168.251.2")
COMMENT = ["-m", "comment", "--comment", TAG]


def n(text: str) -> IPv4Network:
    return IPv4Network(text)


def link_spec(i: str, o: str, s: str | None, d: str | None) -> list[str]:
    match = (["-s", s] if s else []) + (["-d", d] if d else [])
    return ["-i", i, "-o", o, *match, *COMMENT, "-j", "ACCEPT"]


def raw_link_spec(i: str, s: str | None, d: str) -> list[str]:
    return ["-i", i, *(["-s", s] if s else []), "-d", d, *COMMENT, "-j", "ACCEPT"]


LINK_AB = BridgeLink("br-a", NET_A, "br-b", NET_B)


class FakeIptables(_FakeIptables):
    """test_firewall's fake, matching rules by (option, value): a link's two directions hold
    the same tokens, and only which follows -i and which -o tells them apart."""

    def _find(self, table: str, chain: str, spec: list[str]) -> int | None:
        for index, tokens in enumerate(self.chains[table][chain]):
            if rule_key(tokens) == rule_key(spec):
                return index
        return None


# -- the firewall's link rules: exact commands -----------------------------------------------


def test_a_link_inserts_both_directions_into_docker_user_and_raw_exactly() -> None:
    fake = FakeIptables()
    fw = Firewall(TUN, runner=fake, binary="iptables")
    assert fw.link_bridges([LINK_AB]) is True
    calls = []
    for table, chain, spec in (
        ("filter", "DOCKER-USER", link_spec("br-a", "br-b", str(NET_A), str(NET_B))),
        ("raw", "PREROUTING", raw_link_spec("br-a", str(NET_A), str(NET_B))),
        ("filter", "DOCKER-USER", link_spec("br-b", "br-a", str(NET_B), str(NET_A))),
        ("raw", "PREROUTING", raw_link_spec("br-b", str(NET_B), str(NET_A))),
    ):
        calls += [[*IPT, "-t", table, "-C", chain, *spec],
                  [*IPT, "-t", table, "-I", chain, "1", *spec]]
    assert fake.take() == [[*IPT, "-t", "filter", "-S"], [*IPT, "-t", "raw", "-S"], *calls]
    # Above the user's DROP (and Docker's raw DROP), never below.
    assert fake.rules("filter", "DOCKER-USER") == [
        " ".join(link_spec("br-b", "br-a", str(NET_B), str(NET_A))),
        " ".join(link_spec("br-a", "br-b", str(NET_A), str(NET_B))),
        "-j DROP",
    ]
    assert fake.rules("raw", "PREROUTING")[-1] == "-d 172.18.0.2/32 ! -i br-a -j DROP"


def test_the_same_links_again_run_no_command() -> None:
    fake = FakeIptables()
    fw = Firewall(TUN, runner=fake, binary="iptables")
    fw.link_bridges([LINK_AB])
    fake.take()
    assert fw.link_bridges([LINK_AB, LINK_AB]) is False
    assert fake.take() == []


def test_a_side_without_a_known_subnet_matches_the_bridge_alone() -> None:
    """As docker-connector does (`-i IFA -o IFB`); no raw rule, which would need a -d."""
    fake = FakeIptables()
    fw = Firewall(TUN, runner=fake, binary="iptables")
    fw.link_bridges([BridgeLink("br-a", None, "br-b", NET_B)])
    assert fake.rules("filter", "DOCKER-USER") == [
        " ".join(link_spec("br-b", "br-a", str(NET_B), None)),
        " ".join(link_spec("br-a", "br-b", None, str(NET_B))),
        "-j DROP",
    ]
    assert fake.rules("raw", "PREROUTING") == [
        " ".join(raw_link_spec("br-a", None, str(NET_B))),
        "-d 172.18.0.2/32 ! -i br-a -j DROP",
    ]


def test_unlinking_deletes_exactly_the_link_rules_and_keeps_the_routed_ones() -> None:
    fake = FakeIptables()
    fw = Firewall(TUN, runner=fake, binary="iptables")
    fw.apply({NET_A: "br-a"})
    routed_only = {t: fake.render(t) for t in ("filter", "raw")}
    fw.link_bridges([LINK_AB])
    # The forwarding thread's next round keeps the link rules.
    fw.apply({NET_A: "br-a"})
    assert len(fake.rules("filter", "DOCKER-USER")) == 5
    fake.take()
    assert fw.link_bridges([]) is True
    deleted = [c for c in fake.take() if c[5] in ("-I", "-D")]
    assert deleted == [
        [*IPT, "-t", "filter", "-D", "DOCKER-USER", *link_spec("br-a", "br-b", str(NET_A),
                                                                str(NET_B))],
        [*IPT, "-t", "raw", "-D", "PREROUTING", *raw_link_spec("br-a", str(NET_A), str(NET_B))],
        [*IPT, "-t", "filter", "-D", "DOCKER-USER", *link_spec("br-b", "br-a", str(NET_B),
                                                                str(NET_A))],
        [*IPT, "-t", "raw", "-D", "PREROUTING", *raw_link_spec("br-b", str(NET_B), str(NET_A))],
    ]
    assert {t: fake.render(t) for t in ("filter", "raw")} == routed_only


def test_ensure_moves_link_rules_back_above_a_new_drop_and_close_removes_them() -> None:
    fake = FakeIptables()
    before = {t: fake.render(t) for t in ("filter", "raw")}
    fw = Firewall(TUN, runner=fake, binary="iptables")
    fw.link_bridges([LINK_AB])
    fake.chains["filter"]["DOCKER-USER"].insert(0, ["-j", "DROP"])
    assert fw.ensure() is True
    assert fake.rules("filter", "DOCKER-USER")[:2] == [
        " ".join(link_spec("br-a", "br-b", str(NET_A), str(NET_B))),
        " ".join(link_spec("br-b", "br-a", str(NET_B), str(NET_A))),
    ]
    assert fw.ensure() is False
    fake.chains["filter"]["DOCKER-USER"] = [["-j", "DROP"]]  # a Docker restart flushed them
    assert fw.ensure() is True
    assert len(fake.rules("filter", "DOCKER-USER")) == 3
    fw.close()
    assert {t: fake.render(t) for t in ("filter", "raw")} == before


def test_link_rules_of_a_crashed_run_are_found_by_their_tag() -> None:
    fake = FakeIptables()
    before = {t: fake.render(t) for t in ("filter", "raw")}
    Firewall(TUN, runner=fake, binary="iptables").link_bridges([LINK_AB])  # never closed
    removed = Firewall(TUN, runner=fake, binary="iptables").cleanup_leftovers()
    assert len(removed) == 4
    assert {t: fake.render(t) for t in ("filter", "raw")} == before


def test_links_go_to_forward_without_docker_user() -> None:
    fake = FakeIptables(filter_text="-P INPUT ACCEPT\n-P FORWARD DROP\n-P OUTPUT ACCEPT\n")
    Firewall(TUN, runner=fake, binary="iptables").link_bridges([LINK_AB])
    assert fake.rules("filter", "FORWARD") == [
        " ".join(link_spec("br-b", "br-a", str(NET_B), str(NET_A))),
        " ".join(link_spec("br-a", "br-b", str(NET_A), str(NET_B))),
    ]


def test_containers_may_open_connections_to_the_hosts_tunnel_address() -> None:
    fake = FakeIptables()
    Firewall(TUN, runner=fake, binary="iptables", host_address=HOST).apply({NET_A: "br-a"})
    to_host = ["-i", "br-a", "-o", TUN, "-s", str(NET_A), "-d", "192.168.251.2/32", *COMMENT,
               "-j", "ACCEPT"]
    assert [*IPT, "-t", "filter", "-I", "DOCKER-USER", "1", *to_host] in fake.take()
    assert " ".join(to_host) in fake.rules("filter", "DOCKER-USER")
    # Without the address: replies only, as before.
    plain = FakeIptables()
    Firewall(TUN, runner=plain, binary="iptables").apply({NET_A: "br-a"})
    assert not any("192.168.251.2" in rule for rule in plain.rules("filter", "DOCKER-USER"))


def test_bad_bridge_names_are_refused_before_any_command() -> None:
    fake = FakeIptables()
    with pytest.raises(ValueError, match="bridge"):
        Firewall(TUN, runner=fake, binary="iptables").link_bridges(
            [BridgeLink("br a", NET_A, "br-b", NET_B)])
    assert fake.calls == []


# -- the agent: pairs -> bridges ----------------------------------------------------------


class FakeAdapter:
    """interface_for as the Linux adapter answers it: the longest non-default route that
    holds the whole network, through another interface than the tunnel."""

    def __init__(self, routes: dict[str, str]) -> None:
        self.routes = {n(k): v for k, v in routes.items()}

    def interface_for(self, network: IPv4Network) -> str | None:
        best = [(r.prefixlen, dev) for r, dev in self.routes.items() if network.subnet_of(r)]
        return max(best)[1] if best else None


def links_on(fake: FakeIptables, adapter: FakeAdapter,
             routed: dict[IPv4Network, str] | None = None) -> tuple[SubnetLinks, Firewall]:
    fw = Firewall(TUN, runner=fake, binary="iptables")
    if routed is not None:
        fw.apply(routed)
    return SubnetLinks(cast(Any, adapter), fw), fw


def test_bare_addresses_resolve_to_their_bridges_routed_subnets() -> None:
    fake = FakeIptables()
    adapter = FakeAdapter({"172.18.0.0/16": "br-a", "172.19.0.0/16": "br-b",
                           "10.0.2.0/24": "eth0"})
    links, _ = links_on(fake, adapter, {NET_A: "br-a", NET_B: "br-b"})
    links.apply([(n("172.19.0.1/32"), n("172.18.0.1/32"))])
    assert links.status()["links"] == {
        "pairs": [["172.18.0.1/32", "172.19.0.1/32"]],
        "active": [{"pair": ["172.18.0.1/32", "172.19.0.1/32"], "bridges": ["br-a", "br-b"],
                    "subnets": ["172.18.0.0/16", "172.19.0.0/16"]}],
        "pending": [], "error": ""}
    assert " ".join(link_spec("br-a", "br-b", "172.18.0.0/16", "172.19.0.0/16")) in \
        fake.rules("filter", "DOCKER-USER")


def test_a_subnet_side_is_used_as_given() -> None:
    fake = FakeIptables()
    links, _ = links_on(fake, FakeAdapter({"172.18.0.0/16": "br-a", "172.19.0.0/16": "br-b"}))
    links.apply([(n("172.18.5.0/24"), NET_B)])
    assert " ".join(link_spec("br-a", "br-b", "172.18.5.0/24", str(NET_B))) in \
        fake.rules("filter", "DOCKER-USER")


def test_an_unrouted_bridge_is_matched_by_name_alone() -> None:
    fake = FakeIptables()
    links, _ = links_on(fake, FakeAdapter({"172.18.0.0/16": "br-a", "172.19.0.0/16": "br-b"}),
                        {NET_A: "br-a"})  # br-b's subnet is not routed (an internal network)
    links.apply([(n("172.18.0.1/32"), n("172.19.0.1/32"))])
    assert links.status()["links"]["active"][0]["subnets"] == ["172.18.0.0/16", "any"]
    assert " ".join(link_spec("br-a", "br-b", "172.18.0.0/16", None)) in \
        fake.rules("filter", "DOCKER-USER")


def test_a_pair_waits_for_its_network_and_follows_it() -> None:
    fake = FakeIptables()
    adapter = FakeAdapter({"172.18.0.0/16": "br-a"})
    links, fw = links_on(fake, adapter)
    links.apply([(NET_A, NET_B)])
    status = links.status()["links"]
    assert status["active"] == []
    assert status["pending"] == [{"pair": [str(NET_A), str(NET_B)],
                                  "reason": "no bridge routes 172.19.0.0/16 (yet)"}]
    assert fw.rules() == []
    links.refresh()  # nothing changed: no command
    assert [c[5] for c in fake.take() if c[5] in ("-I", "-D")] == []
    adapter.routes[NET_B] = "br-b"  # `docker network create`
    links.refresh()
    assert links.status()["links"]["pending"] == []
    assert len(fw.rules()) == 4
    adapter.routes[NET_B] = "br-new"  # removed and created again: a new bridge
    links.refresh()
    assert all("br-b " not in rule for rule in fw.rules())
    # Both filter rules, and the raw rule for what comes in from br-new.
    assert sum("br-new" in rule for rule in fw.rules()) == 3
    assert len(fw.rules()) == 4
    del adapter.routes[NET_B]  # gone: its rules go, the pair waits again
    links.refresh()
    assert fw.rules() == []
    assert len(links.status()["links"]["pending"]) == 1


def test_removing_a_pair_removes_its_rules_and_close_removes_only_link_rules() -> None:
    fake = FakeIptables()
    adapter = FakeAdapter({"172.18.0.0/16": "br-a", "172.19.0.0/16": "br-b",
                           "172.20.0.0/16": "br-c"})
    links, fw = links_on(fake, adapter, {NET_A: "br-a"})
    routed_rules = fw.rules()
    links.apply([(NET_A, NET_B), (NET_A, n("172.20.0.0/16"))])
    assert len(fw.rules()) == len(routed_rules) + 8
    links.apply([(NET_B, NET_A)])  # the same pair written the other way round stays
    assert len(fw.rules()) == len(routed_rules) + 4
    assert not any("br-c" in rule for rule in fw.rules())
    links.close()
    assert fw.rules() == routed_rules
    assert links.status()["links"]["pairs"] == []


def test_both_sides_on_one_bridge_need_no_rule() -> None:
    fake = FakeIptables()
    links, fw = links_on(fake, FakeAdapter({"172.18.0.0/16": "br-a"}))
    links.apply([(n("172.18.1.0/24"), n("172.18.2.0/24"))])
    assert fw.rules() == []
    assert "both on br-a" in links.status()["links"]["pending"][0]["reason"]


def test_without_iptables_the_pairs_are_kept_and_the_status_says_why() -> None:
    links = SubnetLinks(cast(Any, FakeAdapter({"172.18.0.0/16": "br-a",
                                               "172.19.0.0/16": "br-b"})), None)
    links.apply([(NET_A, NET_B)])
    status = links.status()["links"]
    assert status["error"] == "not managed: no iptables in the agent"
    assert status["active"][0]["bridges"] == ["br-a", "br-b"]
    links.close()


def test_a_failing_iptables_is_reported_and_retried() -> None:
    fake = FakeIptables()
    broken = {"on": True}

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        if broken["on"] and "-I" in argv:
            return subprocess.CompletedProcess(argv, 4, "", "xtables lock held\n")
        return fake(argv)

    fw = Firewall(TUN, runner=runner, binary="iptables")
    links = SubnetLinks(cast(Any, FakeAdapter({"172.18.0.0/16": "br-a",
                                               "172.19.0.0/16": "br-b"})), fw)
    links.apply([(NET_A, NET_B)])
    assert "exit 4" in links.status()["links"]["error"]
    broken["on"] = False
    links.refresh()  # the same set: done again because the last sync failed
    assert links.status()["links"]["error"] == ""
    assert len(fw.rules()) == 4


# -- the agent: `links` messages ------------------------------------------------------------


def message(pairs: list[list[str]], seq: int, epoch: int = 7) -> messages.ControlMessage:
    """Through the real encoder and parser, so only what the schema accepts gets here."""
    return messages.parse(messages.encode("links", seq, epoch=epoch, pairs=pairs))


class RecordingLinks:
    def __init__(self) -> None:
        self.applied: list[tuple[tuple[IPv4Network, IPv4Network], ...]] = []
        self.refreshes = 0
        self.closed = False
        self.applied_event = threading.Event()

    def apply(self, pairs: Any) -> None:
        self.applied.append(tuple(pairs))
        self.applied_event.set()

    def refresh(self) -> None:
        self.refreshes += 1

    def close(self) -> None:
        self.closed = True

    def status(self) -> dict[str, Any]:
        return {"links": {}}


def test_messages_are_stashed_newest_first_and_applied_on_the_worker() -> None:
    recording = RecordingLinks()
    worker = LinksWorker(cast(Any, recording))
    worker.on_control("host", message([["172.18.0.0/16", "172.19.0.0/16"]], seq=5))
    worker.on_control("host", message([], seq=4))  # a late retransmit of an older set
    worker.on_control("host", message([["10.0.0.0/8", "10.1.0.0/16"]], seq=9, epoch=8))
    worker.on_control("accessor", message([], seq=99, epoch=8))  # not from the host
    worker.on_control("host", messages.ControlMessage("routes", 10, {}, 8))  # not links
    assert recording.applied == []  # nothing runs on the network thread
    worker.start()
    try:
        wait_until(recording.applied_event.is_set, 5, what="the worker to apply")
        assert recording.applied == [((n("10.0.0.0/8"), n("10.1.0.0/16")),)]
    finally:
        worker.stop()
    assert recording.closed


def test_a_links_message_with_a_bad_pair_is_dropped_by_the_schema() -> None:
    for pairs in ([["172.18.0.1/16", "172.19.0.0/16"]], [["172.18.0.0/16"]],
                  [["x", "y"]], [["172.18.0.0/16", "172.19.0.0/16"]] * 17):
        with pytest.raises(Dropped):
            message(pairs, seq=1)


def test_setup_registers_the_feature_and_tears_it_down() -> None:
    fake = FakeIptables()
    fw = Firewall(TUN, runner=fake, binary="iptables")
    with contextlib.ExitStack() as resources:
        ctx = AgentContext(cast(Any, None), cast(Any, FakeAdapter(
            {"172.18.0.0/16": "br-a", "172.19.0.0/16": "br-b"})), cast(Any, None), fw,
            resources)
        links_module.setup(ctx)
        ctx.control_message("host", message([["172.18.0.0/16", "172.19.0.0/16"]], seq=1))
        wait_until(lambda: len(fw.rules()) == 4, 5, what="the link rules")
        assert ctx.status()["links"]["active"][0]["bridges"] == ["br-a", "br-b"]
    assert fw.rules() == []  # teardown removed them


# -- the host: sending the pairs ---------------------------------------------------------------


class RecordingEngine:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def send_control(self, peer: str, kind: str, **body: Any) -> None:
        messages.encode(kind, 1, **body)  # it must fit a control message
        self.sent.append((peer, kind, body))


class NoRoutes:
    def reconfigure(self, _cfg: HostConfig) -> None:
        pass


def host_config(links: tuple[tuple[str, str], ...] = ()) -> HostConfig:
    tunnel = TunnelConfig(n("192.168.251.0/24"), IPv4Address("192.168.251.1"), HOST, 1400,
                          "ctun0")
    return HostConfig(tunnel, ("127.0.0.1", 2511), "udp", (),
                      (PeerConfig("vm", b"k" * 32, ()),), Timers(), None,
                      links=tuple((n(a), n(b)) for a, b in links))


@dataclass
class HostSide:
    ctx: HostContext
    engine: RecordingEngine

    def sent(self) -> list[tuple[str, str, dict[str, Any]]]:
        sent, self.engine.sent = self.engine.sent, []
        return sent


@pytest.fixture
def host_side() -> Iterator[HostSide]:
    engine = RecordingEngine()
    with contextlib.ExitStack() as resources:
        ctx = HostContext(host_config((("172.18.0.0/16", "172.19.0.0/16"),)),
                          cast(Any, None), cast(Any, engine), cast(Any, NoRoutes()), resources)
        agent_push.setup(ctx)
        yield HostSide(ctx, engine)


def test_the_agent_gets_the_pairs_when_it_comes_up(host_side: HostSide) -> None:
    assert host_side.sent() == []
    host_side.ctx.peer_up("alice")  # an accessor: not for it
    assert host_side.sent() == []
    host_side.ctx.peer_up("vm")
    assert host_side.sent() == [("vm", "links", {"pairs": [["172.18.0.0/16",
                                                            "172.19.0.0/16"]]})]
    assert host_side.ctx.status() == {"links": [["172.18.0.0/16", "172.19.0.0/16"]]}


def test_a_reload_sends_only_when_the_links_change(host_side: HostSide) -> None:
    ctx = host_side.ctx
    ctx.apply(replace(ctx.cfg, routes=(n("10.9.0.0/16"),)))  # other changes: nothing sent
    assert host_side.sent() == []
    two = host_config((("172.18.0.0/16", "172.19.0.0/16"), ("172.18.0.0/16", "172.20.0.1/32")))
    ctx.apply(two)
    assert host_side.sent() == [("vm", "links", {"pairs": [
        ["172.18.0.0/16", "172.19.0.0/16"], ["172.18.0.0/16", "172.20.0.1/32"]]})]
    ctx.apply(host_config((("172.18.0.0/16", "172.19.0.0/16"),)))  # a line removed
    assert host_side.sent() == [("vm", "links", {"pairs": [["172.18.0.0/16",
                                                            "172.19.0.0/16"]]})]
    ctx.apply(host_config())
    assert host_side.sent() == [("vm", "links", {"pairs": []})]
    assert ctx.status() == {"links": []}


def test_more_links_than_a_message_holds_are_cut_and_reported(host_side: HostSide) -> None:
    many = tuple((f"10.{i}.0.0/16", f"10.{i + 100}.0.0/16") for i in range(20))
    host_side.ctx.apply(host_config(many))
    ((_, _, body),) = host_side.sent()
    assert len(body["pairs"]) == messages.MAX_LINKS
    assert "20 subnet links configured" in host_side.ctx.status()["links_problem"]


# -- real iptables and real forwarded traffic: Docker 20.10's firewall in a namespace ----------

# What dockerd 20.10 programs for two user networks (iptables-save, filter table), br-a and
# br-b standing in for its br-<id> names.
DOCKER_2010 = [
    ["-N", "DOCKER"], ["-N", "DOCKER-ISOLATION-STAGE-1"], ["-N", "DOCKER-ISOLATION-STAGE-2"],
    ["-N", "DOCKER-USER"], ["-P", "FORWARD", "DROP"],
    ["-A", "FORWARD", "-j", "DOCKER-USER"],
    ["-A", "FORWARD", "-j", "DOCKER-ISOLATION-STAGE-1"],
    *[rule for br in ("br-b", "br-a") for rule in (
        ["-A", "FORWARD", "-o", br, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
         "-j", "ACCEPT"],
        ["-A", "FORWARD", "-o", br, "-j", "DOCKER"],
        ["-A", "FORWARD", "-i", br, "!", "-o", br, "-j", "ACCEPT"],
        ["-A", "FORWARD", "-i", br, "-o", br, "-j", "ACCEPT"])],
    *[["-A", "DOCKER-ISOLATION-STAGE-1", "-i", br, "!", "-o", br, "-j",
       "DOCKER-ISOLATION-STAGE-2"] for br in ("br-b", "br-a")],
    ["-A", "DOCKER-ISOLATION-STAGE-1", "-j", "RETURN"],
    *[["-A", "DOCKER-ISOLATION-STAGE-2", "-o", br, "-j", "DROP"] for br in ("br-b", "br-a")],
    ["-A", "DOCKER-ISOLATION-STAGE-2", "-j", "RETURN"],
    ["-A", "DOCKER-USER", "-j", "RETURN"],
]


@dataclass
class TwoBridges:
    vm: str
    a: str
    b: str
    t: str  # the host's end of the tunnel (a veth named like the agent's tun)

    def runner(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return netns.run(self.vm, argv, check=False)

    def saved(self) -> list[str]:
        text = netns.run(self.vm, ["iptables-save"]).stdout
        return [re.sub(r"\s*\[\d+:\d+\]", "", line) for line in text.splitlines()
                if line.strip() and not line.startswith("#")]

    def ping(self, src: str, dst: str) -> bool:
        return netns.run(src, ["ping", "-n", "-c", "1", "-W", "1", dst],
                         check=False).returncode == 0

    def connects(self, src: str, server: socket.socket) -> bool:
        """A TCP connection from `src` to `server` (listening in t), data both ways."""
        try:
            client = netns.call_in(src, socket.create_connection, server.getsockname(), 1.0)
        except OSError:
            return False
        with client:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"ok")
                return client.recv(2) == b"ok"


@pytest.fixture
def two_bridges() -> Iterator[TwoBridges]:
    """vm: bridges br-a (172.31.1.0/24) and br-b (172.31.2.0/24) with Docker 20.10's rules;
    a container namespace on each (.2); t, the host, at 10.77.0.2 behind the vm's TUN."""
    base = f"ctunlk{os.getpid()}"
    with contextlib.ExitStack() as stack:
        vm, a, b, t = (stack.enter_context(netns.temporary(f"{base}-{role}"))
                       for role in ("vm", "a", "b", "t"))
        netns.run(vm, ["ip", "link", "add", TUN, "type", "veth", "peer", "name", "eth0",
                       "netns", t])
        netns.run(vm, ["ip", "addr", "add", "10.77.0.1/30", "dev", TUN])
        netns.run(vm, ["ip", "link", "set", TUN, "up"])
        netns.run(t, ["ip", "addr", "add", "10.77.0.2/30", "dev", "eth0"])
        netns.run(t, ["ip", "link", "set", "eth0", "up"])
        netns.run(t, ["ip", "route", "add", "172.31.0.0/16", "via", "10.77.0.1"])
        for ns, br, third in ((a, "br-a", 1), (b, "br-b", 2)):
            netns.run(vm, ["ip", "link", "add", br, "type", "bridge"])
            netns.run(vm, ["ip", "addr", "add", f"172.31.{third}.1/24", "dev", br])
            netns.run(vm, ["ip", "link", "set", br, "up"])
            netns.run(vm, ["ip", "link", "add", f"v{br}", "type", "veth", "peer", "name",
                           "eth0", "netns", ns])
            netns.run(vm, ["ip", "link", "set", f"v{br}", "master", br, "up"])
            netns.run(ns, ["ip", "addr", "add", f"172.31.{third}.2/24", "dev", "eth0"])
            netns.run(ns, ["ip", "link", "set", "eth0", "up"])
            netns.run(ns, ["ip", "route", "add", "default", "via", f"172.31.{third}.1"])
        netns.run(vm, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        for rule in DOCKER_2010:
            netns.run(vm, ["iptables", "-w", "5", *rule])
        yield TwoBridges(vm, a, b, t)


@pytest.mark.root
def test_docker_2010_isolation_holds_until_linked_and_again_after(
        two_bridges: TwoBridges) -> None:
    topo = two_bridges
    before = topo.saved()
    # Each reaches its own gateway, but Docker's isolation keeps the bridges apart.
    assert topo.ping(topo.a, "172.31.1.1") and topo.ping(topo.b, "172.31.2.1")
    assert not topo.ping(topo.a, "172.31.2.2")
    assert not topo.ping(topo.b, "172.31.1.2")
    fw = Firewall(TUN, runner=topo.runner, binary="iptables")
    links = SubnetLinks(cast(Any, FakeAdapter({"172.31.1.0/24": "br-a",
                                               "172.31.2.0/24": "br-b"})), fw)
    links.apply([(n("172.31.1.1/32"), n("172.31.2.1/32"))])  # as docker-connector writes it
    assert topo.ping(topo.a, "172.31.2.2")
    assert topo.ping(topo.b, "172.31.1.2")
    links.apply([])
    assert not topo.ping(topo.a, "172.31.2.2")
    assert not topo.ping(topo.b, "172.31.1.2")
    assert topo.saved() == before
    links.apply([(n("172.31.1.0/24"), n("172.31.2.0/24"))])
    assert topo.ping(topo.a, "172.31.2.2")
    links.close()
    assert not topo.ping(topo.a, "172.31.2.2")
    assert topo.saved() == before


@pytest.mark.root
def test_containers_reach_the_hosts_tunnel_address_past_a_drop(
        two_bridges: TwoBridges) -> None:
    """Proxy listeners and the host's services live at its tunnel address: containers open
    connections to it, which Docker Desktop's DROP in DOCKER-USER would stop."""
    topo = two_bridges
    netns.run(topo.vm, ["iptables", "-w", "5", "-I", "DOCKER-USER", "-j", "DROP"])
    before = topo.saved()
    with netns.call_in(topo.t, socket.create_server, ("10.77.0.2", 0)) as server:
        server.settimeout(5)
        replies_only = Firewall(TUN, runner=topo.runner, binary="iptables")
        replies_only.apply({n("172.31.1.0/24"): "br-a"})
        with _server_in(topo.a, 1) as in_container:  # host -> container, as ever
            assert topo.connects(topo.t, in_container)
        assert not topo.connects(topo.a, server)
        replies_only.close()
        fw = Firewall(TUN, runner=topo.runner, binary="iptables",
                      host_address=IPv4Address("10.77.0.2"))
        fw.apply({n("172.31.1.0/24"): "br-a"})
        assert topo.connects(topo.a, server)
        assert not topo.connects(topo.b, server)  # br-b is not routed: nothing for it
        fw.close()
        assert not topo.connects(topo.a, server)
    assert topo.saved() == before


def _server_in(ns: str, third: int) -> socket.socket:
    server = netns.call_in(ns, socket.create_server, (f"172.31.{third}.2", 0))
    server.settimeout(5)
    return server
