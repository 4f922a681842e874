"""The agent's firewall rules: exact iptables commands against a recording fake, then real
iptables (nft) in throwaway namespaces with a Docker-like firewall and real forwarded traffic.

The root namespace's iptables belong to the machine's dockerd: every real command here runs
through `ip netns exec` inside a namespace the test created.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network

import pytest
from ctun.lab import netns
from ctun.lab.topology import wait_until
from ctun.vm.firewall import Firewall, FirewallError

TUN = "ctunvm0"
TAG = "ctun:ctunvm0"
NET_A = IPv4Network("172.18.0.0/16")
NET_B = IPv4Network("172.19.0.0/16")
IPT = ["iptables", "-w", "5"]

# What `iptables -S` prints on a Docker host: Docker's chains, a user's DROP at the end.
DOCKER_FILTER = """\
-P INPUT ACCEPT
-P FORWARD DROP
-P OUTPUT ACCEPT
-N DOCKER
-N DOCKER-ISOLATION-STAGE-1
-N DOCKER-ISOLATION-STAGE-2
-N DOCKER-USER
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -j DOCKER
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
-A DOCKER-ISOLATION-STAGE-2 -j RETURN
-A DOCKER-USER -j DROP
"""
PLAIN_FILTER = """\
-P INPUT ACCEPT
-P FORWARD DROP
-P OUTPUT ACCEPT
"""
DOCKER_RAW = """\
-P PREROUTING ACCEPT
-P OUTPUT ACCEPT
-A PREROUTING -d 172.18.0.2/32 ! -i br-a -j DROP
"""


def cp(
    argv: list[str], rc: int = 0, out: str = "", err: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(argv, rc, out, err)


class FakeIptables:
    """A recording runner that also models the tables, so -C/-I/-D/-S answer consistently.

    Rules compare as multisets of tokens: real iptables prints options in its own order.
    """

    def __init__(self, filter_text: str = DOCKER_FILTER, raw_text: str = DOCKER_RAW) -> None:
        self.calls: list[list[str]] = []
        self.policies: dict[str, dict[str, str]] = {}
        self.chains: dict[str, dict[str, list[list[str]]]] = {}
        self.load("filter", filter_text)
        self.load("raw", raw_text)

    def load(self, table: str, text: str) -> None:
        self.policies[table] = {}
        self.chains[table] = {}
        for line in text.splitlines():
            tokens = shlex.split(line)
            if tokens[0] == "-P":
                self.policies[table][tokens[1]] = tokens[2]
                self.chains[table][tokens[1]] = []
            elif tokens[0] == "-N":
                self.chains[table][tokens[1]] = []
            else:
                self.chains[table][tokens[1]].append(tokens[2:])

    def render(self, table: str) -> str:
        lines = [f"-P {c} {p}" for c, p in self.policies[table].items()]
        lines += [f"-N {c}" for c in self.chains[table] if c not in self.policies[table]]
        for chain, rules in self.chains[table].items():
            for tokens in rules:
                # iptables quotes comments (and puts addresses first; order is not modelled).
                text = " ".join(f'"{t}"' if i and tokens[i - 1] == "--comment" else t
                                for i, t in enumerate(tokens))
                lines.append(f"-A {chain} {text}")
        return "\n".join(lines) + "\n"

    def rules(self, table: str, chain: str) -> list[str]:
        return [" ".join(r) for r in self.chains[table][chain]]

    def _find(self, table: str, chain: str, spec: list[str]) -> int | None:
        for index, tokens in enumerate(self.chains[table][chain]):
            if sorted(tokens) == sorted(spec):
                return index
        return None

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        assert argv[1:3] == ["-w", "5"] and argv[3] == "-t", argv
        table, op, rest = argv[4], argv[5], argv[6:]
        if op == "-S":
            return cp(argv, out=self.render(table))
        chain, spec = rest[0], rest[1:]
        if chain not in self.chains[table]:
            return cp(argv, 1, err="iptables: No chain/target/match by that name.\n")
        if op == "-I":
            self.chains[table][chain].insert(int(spec[0]) - 1, spec[1:])
            return cp(argv)
        found = self._find(table, chain, spec)
        if found is None:
            return cp(argv, 1, err="iptables: Bad rule (does a matching rule exist in that "
                                   "chain?).\n")
        if op == "-D":
            del self.chains[table][chain][found]
        return cp(argv)

    def take(self) -> list[list[str]]:
        calls, self.calls = self.calls, []
        return calls


def in_spec(bridge: str = "br-a", net: IPv4Network = NET_A) -> list[str]:
    return ["-i", TUN, "-o", bridge, "-d", str(net), "-m", "comment", "--comment", TAG,
            "-j", "ACCEPT"]


def out_spec(bridge: str = "br-a", net: IPv4Network = NET_A) -> list[str]:
    return ["-i", bridge, "-o", TUN, "-s", str(net), "-m", "conntrack", "--ctstate",
            "RELATED,ESTABLISHED", "-m", "comment", "--comment", TAG, "-j", "ACCEPT"]


def raw_spec(net: IPv4Network = NET_A) -> list[str]:
    return ["-i", TUN, "-d", str(net), "-m", "comment", "--comment", TAG, "-j", "ACCEPT"]


def adds(chain: str, bridge: str = "br-a", net: IPv4Network = NET_A) -> list[list[str]]:
    """-C then -I 1 for each of the three rules of (net, bridge), in apply's order."""
    calls = []
    for table, ch, spec in (("filter", chain, in_spec(bridge, net)),
                            ("filter", chain, out_spec(bridge, net)),
                            ("raw", "PREROUTING", raw_spec(net))):
        calls += [[*IPT, "-t", table, "-C", ch, *spec], [*IPT, "-t", table, "-I", ch, "1", *spec]]
    return calls


LIST_FILTER = [*IPT, "-t", "filter", "-S"]
LIST_RAW = [*IPT, "-t", "raw", "-S"]


# -- pure tests: exact commands --------------------------------------------------------------


def test_apply_inserts_three_rules_into_docker_user_exactly() -> None:
    fake = FakeIptables()
    Firewall(TUN, runner=fake, binary="iptables").apply({NET_A: "br-a"})
    tagged = ["-m", "comment", "--comment", "ctun:ctunvm0"]
    assert fake.take() == [
        ["iptables", "-w", "5", "-t", "filter", "-S"],
        ["iptables", "-w", "5", "-t", "raw", "-S"],
        ["iptables", "-w", "5", "-t", "filter", "-C", "DOCKER-USER", "-i", "ctunvm0",
         "-o", "br-a", "-d", "172.18.0.0/16", *tagged, "-j", "ACCEPT"],
        ["iptables", "-w", "5", "-t", "filter", "-I", "DOCKER-USER", "1", "-i", "ctunvm0",
         "-o", "br-a", "-d", "172.18.0.0/16", *tagged, "-j", "ACCEPT"],
        ["iptables", "-w", "5", "-t", "filter", "-C", "DOCKER-USER", "-i", "br-a",
         "-o", "ctunvm0", "-s", "172.18.0.0/16", "-m", "conntrack", "--ctstate",
         "RELATED,ESTABLISHED", *tagged, "-j", "ACCEPT"],
        ["iptables", "-w", "5", "-t", "filter", "-I", "DOCKER-USER", "1", "-i", "br-a",
         "-o", "ctunvm0", "-s", "172.18.0.0/16", "-m", "conntrack", "--ctstate",
         "RELATED,ESTABLISHED", *tagged, "-j", "ACCEPT"],
        ["iptables", "-w", "5", "-t", "raw", "-C", "PREROUTING", "-i", "ctunvm0",
         "-d", "172.18.0.0/16", *tagged, "-j", "ACCEPT"],
        ["iptables", "-w", "5", "-t", "raw", "-I", "PREROUTING", "1", "-i", "ctunvm0",
         "-d", "172.18.0.0/16", *tagged, "-j", "ACCEPT"],
    ]
    # Inserted above the user's DROP and above Docker's raw DROP, never appended below them.
    assert fake.rules("filter", "DOCKER-USER")[-1] == "-j DROP"
    assert fake.rules("raw", "PREROUTING")[-1] == "-d 172.18.0.2/32 ! -i br-a -j DROP"


def test_apply_uses_forward_without_docker_user() -> None:
    fake = FakeIptables(filter_text=PLAIN_FILTER)
    Firewall(TUN, runner=fake, binary="iptables").apply({NET_A: "br-a"})
    assert fake.take() == [LIST_FILTER, LIST_RAW, *adds("FORWARD")]
    assert fake.rules("filter", "FORWARD") == [" ".join(out_spec()), " ".join(in_spec())]


def test_chains_that_cannot_drop_get_no_rules() -> None:
    """No DROP policy, no rules: nothing to open, and a rule would create the table."""
    fake = FakeIptables(filter_text=PLAIN_FILTER.replace("FORWARD DROP", "FORWARD ACCEPT"),
                        raw_text="-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n")
    Firewall(TUN, runner=fake, binary="iptables").apply({NET_A: "br-a"})
    assert fake.take() == [LIST_FILTER, LIST_RAW]


def test_only_the_raw_rule_goes_where_only_raw_can_drop() -> None:
    fake = FakeIptables(filter_text=PLAIN_FILTER.replace("FORWARD DROP", "FORWARD ACCEPT"))
    Firewall(TUN, runner=fake, binary="iptables").apply({NET_A: "br-a"})
    assert [c[5:7] for c in fake.take()] == [["-S"], ["-S"], ["-C", "PREROUTING"],
                                            ["-I", "PREROUTING"]]


def test_reapply_is_a_noop() -> None:
    fake = FakeIptables()
    fw = Firewall(TUN, runner=fake, binary="iptables")
    fw.apply({NET_A: "br-a", NET_B: "br-b"})
    fake.take()
    fw.apply({NET_B: "br-b", NET_A: "br-a"})
    calls = fake.take()
    assert [c[5] for c in calls] == ["-S", "-S"] + ["-C"] * 6  # looks, never changes anything
    assert len(fake.chains["filter"]["DOCKER-USER"]) == 5  # 2 x 2 of ours + the user's DROP


def test_apply_without_a_subnet_deletes_exactly_its_three_rules() -> None:
    fake = FakeIptables()
    fw = Firewall(TUN, runner=fake, binary="iptables")
    fw.apply({NET_A: "br-a", NET_B: "br-b"})
    fake.take()
    fw.apply({NET_A: "br-a"})
    calls = fake.take()
    assert [c for c in calls if c[5] in ("-I", "-D")] == [
        [*IPT, "-t", "filter", "-D", "DOCKER-USER", *in_spec("br-b", NET_B)],
        [*IPT, "-t", "filter", "-D", "DOCKER-USER", *out_spec("br-b", NET_B)],
        [*IPT, "-t", "raw", "-D", "PREROUTING", *raw_spec(NET_B)],
    ]
    assert fake.rules("filter", "DOCKER-USER") == [
        " ".join(out_spec()), " ".join(in_spec()), "-j DROP"]
    assert fake.rules("raw", "PREROUTING") == [
        " ".join(raw_spec()), "-d 172.18.0.2/32 ! -i br-a -j DROP"]


def test_apply_follows_a_subnet_to_a_new_bridge() -> None:
    fake = FakeIptables()
    fw = Firewall(TUN, runner=fake, binary="iptables")
    fw.apply({NET_A: "br-a"})
    fw.apply({NET_A: "br-new"})
    assert fake.rules("filter", "DOCKER-USER") == [
        " ".join(out_spec("br-new")), " ".join(in_spec("br-new")), "-j DROP"]


def test_close_removes_exactly_what_it_added_and_is_idempotent() -> None:
    fake = FakeIptables()
    before = {t: fake.render(t) for t in ("filter", "raw")}
    fw = Firewall(TUN, runner=fake, binary="iptables")
    fw.apply({NET_A: "br-a"})
    fake.take()
    fw.close()
    specs = [("raw", "PREROUTING", raw_spec()), ("filter", "DOCKER-USER", out_spec()),
             ("filter", "DOCKER-USER", in_spec())]
    assert fake.take() == [call for table, chain, spec in specs for call in (
        [*IPT, "-t", table, "-C", chain, *spec], [*IPT, "-t", table, "-D", chain, *spec])]
    assert {t: fake.render(t) for t in ("filter", "raw")} == before
    fw.close()
    assert fake.take() == []


def test_cleanup_leftovers_deletes_tagged_lines_and_leaves_the_rest() -> None:
    # As real iptables prints them: addresses first, comments quoted.
    filter_text = DOCKER_FILTER.replace("-A DOCKER-USER -j DROP\n", """\
-A DOCKER-USER -s 172.18.0.0/16 -i br-a -o ctunvm0 -m conntrack --ctstate RELATED,ESTABLISHED \
-m comment --comment "ctun:ctunvm0" -j ACCEPT
-A DOCKER-USER -d 10.0.0.0/8 -m comment --comment "ctun:ctunvm01" -j ACCEPT
-A DOCKER-USER -s 10.1.0.0/16 -m comment --comment "not ctun:ctunvm0" -j ACCEPT
-A DOCKER-USER -j DROP
""") + '-A FORWARD -d 172.19.0.0/16 -i ctunvm0 -o br-b -m comment --comment "ctun:ctunvm0" ' \
       '-j ACCEPT\n'
    raw_text = DOCKER_RAW + '-A PREROUTING -d 172.18.0.0/16 -i ctunvm0 -m comment --comment ' \
                            '"ctun:ctunvm0" -j ACCEPT\n'
    fake = FakeIptables(filter_text, raw_text)
    removed = Firewall(TUN, runner=fake, binary="iptables").cleanup_leftovers()
    assert fake.take() == [
        LIST_FILTER,
        [*IPT, "-t", "filter", "-D", "DOCKER-USER", "-s", "172.18.0.0/16", "-i", "br-a",
         "-o", TUN, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-m", "comment",
         "--comment", TAG, "-j", "ACCEPT"],
        [*IPT, "-t", "filter", "-D", "FORWARD", "-d", "172.19.0.0/16", "-i", TUN, "-o", "br-b",
         "-m", "comment", "--comment", TAG, "-j", "ACCEPT"],
        LIST_RAW,
        [*IPT, "-t", "raw", "-D", "PREROUTING", "-d", "172.18.0.0/16", "-i", TUN, "-m",
         "comment", "--comment", TAG, "-j", "ACCEPT"],
    ]
    assert len(removed) == 3
    assert all(TAG in line for line in removed)
    assert removed[0].endswith('-A DOCKER-USER -s 172.18.0.0/16 -i br-a -o ctunvm0 -m '
                               'conntrack --ctstate RELATED,ESTABLISHED -m comment --comment '
                               '"ctun:ctunvm0" -j ACCEPT')
    # Another tunnel's tag, and a comment that merely contains ours, stay.
    assert fake.rules("filter", "DOCKER-USER") == [
        "-d 10.0.0.0/8 -m comment --comment ctun:ctunvm01 -j ACCEPT",
        "-s 10.1.0.0/16 -m comment --comment not ctun:ctunvm0 -j ACCEPT",
        "-j DROP",
    ]
    assert fake.render("filter") == FakeIptables(DOCKER_FILTER).render("filter").replace(
        "-A DOCKER-USER -j DROP\n",
        '-A DOCKER-USER -d 10.0.0.0/8 -m comment --comment "ctun:ctunvm01" -j ACCEPT\n'
        '-A DOCKER-USER -s 10.1.0.0/16 -m comment --comment "not ctun:ctunvm0" -j ACCEPT\n'
        "-A DOCKER-USER -j DROP\n")
    assert fake.render("raw") == FakeIptables().render("raw")


def test_ensure_is_a_noop_when_the_rules_are_in_place() -> None:
    fake = FakeIptables()
    fw = Firewall(TUN, runner=fake, binary="iptables")
    assert fw.ensure() is False and fake.take() == []  # nothing applied: nothing to check
    fw.apply({NET_A: "br-a"})
    fake.take()
    assert fw.ensure() is False
    assert fake.take() == [LIST_FILTER, LIST_RAW]


def test_ensure_recognises_rules_as_iptables_prints_them() -> None:
    # Our rules already there, in iptables' own option order, with an address it normalised.
    filter_text = DOCKER_FILTER.replace("-A DOCKER-USER -j DROP\n", """\
-A DOCKER-USER -s 172.18.0.0/16 -i br-a -o ctunvm0 -m conntrack --ctstate ESTABLISHED,RELATED \
-m comment --comment "ctun:ctunvm0" -j ACCEPT
-A DOCKER-USER -d 172.18.0.0/16 -i ctunvm0 -o br-a -m comment --comment "ctun:ctunvm0" -j ACCEPT
-A DOCKER-USER -j DROP
""")
    raw_text = ('-P PREROUTING ACCEPT\n-A PREROUTING -d 172.18.0.0/16 -i ctunvm0 -m comment '
                '--comment "ctun:ctunvm0" -j ACCEPT\n-A PREROUTING -d 172.18.0.2/32 ! -i br-a '
                '-j DROP\n')
    fake = FakeIptables(filter_text, raw_text)
    fw = Firewall(TUN, runner=fake, binary="iptables")
    fw.apply({NET_A: "br-a"})
    fake.take()
    assert fw.ensure() is False
    assert fake.take() == [LIST_FILTER, LIST_RAW]


def test_ensure_reinserts_rules_a_drop_now_precedes() -> None:
    fake = FakeIptables()
    fw = Firewall(TUN, runner=fake, binary="iptables")
    fw.apply({NET_A: "br-a"})
    fake.chains["filter"]["DOCKER-USER"].insert(0, ["-j", "DROP"])  # a user's new DROP on top
    fake.take()
    assert fw.ensure() is True
    assert fake.take() == [
        LIST_FILTER, LIST_RAW,
        [*IPT, "-t", "filter", "-D", "DOCKER-USER", *in_spec()],
        [*IPT, "-t", "filter", "-D", "DOCKER-USER", *out_spec()],
        [*IPT, "-t", "filter", "-I", "DOCKER-USER", "1", *out_spec()],
        [*IPT, "-t", "filter", "-I", "DOCKER-USER", "1", *in_spec()],
    ]
    assert fake.rules("filter", "DOCKER-USER") == [
        " ".join(in_spec()), " ".join(out_spec()), "-j DROP", "-j DROP"]
    assert fw.ensure() is False


def test_ensure_moves_rules_above_a_jump_to_a_dropping_chain() -> None:
    fake = FakeIptables(filter_text=PLAIN_FILTER + "-N LOGGING\n-A LOGGING -j LOG\n"
                        "-N ISOLATION\n-N ISOLATION-2\n-A ISOLATION -j ISOLATION-2\n"
                        "-A ISOLATION-2 -o br-x -j DROP\n")
    fw = Firewall(TUN, runner=fake, binary="iptables")
    fw.apply({NET_A: "br-a"})
    # A jump to a chain that only logs does not shadow ours...
    fake.chains["filter"]["FORWARD"].insert(0, ["-j", "LOGGING"])
    assert fw.ensure() is False
    # ...a jump to one that drops (two levels down, like Docker's isolation chains) does.
    fake.chains["filter"]["FORWARD"].insert(0, ["-j", "ISOLATION"])
    # And a raw DROP Docker inserts on top when a container starts.
    fake.chains["raw"]["PREROUTING"].insert(0, ["-d", "172.18.0.3/32", "!", "-i", "br-a",
                                                "-j", "DROP"])
    assert fw.ensure() is True
    assert fake.rules("filter", "FORWARD") == [
        " ".join(in_spec()), " ".join(out_spec()), "-j ISOLATION", "-j LOGGING"]
    assert fake.rules("raw", "PREROUTING")[0] == " ".join(raw_spec())
    assert fw.ensure() is False


def test_ensure_restores_rules_a_docker_restart_flushed() -> None:
    fake = FakeIptables()
    fw = Firewall(TUN, runner=fake, binary="iptables")
    fw.apply({NET_A: "br-a"})
    fake.chains["filter"]["DOCKER-USER"] = [["-j", "DROP"]]
    fake.take()
    assert fw.ensure() is True
    assert fake.take() == [
        LIST_FILTER, LIST_RAW,
        [*IPT, "-t", "filter", "-C", "DOCKER-USER", *in_spec()],
        [*IPT, "-t", "filter", "-C", "DOCKER-USER", *out_spec()],
        [*IPT, "-t", "filter", "-I", "DOCKER-USER", "1", *out_spec()],
        [*IPT, "-t", "filter", "-I", "DOCKER-USER", "1", *in_spec()],
    ]


def test_ensure_moves_rules_into_docker_user_when_docker_creates_it() -> None:
    fake = FakeIptables(filter_text=PLAIN_FILTER)
    fw = Firewall(TUN, runner=fake, binary="iptables")
    fw.apply({NET_A: "br-a"})
    fake.chains["filter"]["DOCKER-USER"] = []  # Docker started after the agent
    fake.chains["filter"]["FORWARD"].insert(0, ["-j", "DOCKER-USER"])
    assert fw.ensure() is True
    assert fake.rules("filter", "FORWARD") == ["-j DOCKER-USER"]
    assert fake.rules("filter", "DOCKER-USER") == [" ".join(in_spec()), " ".join(out_spec())]
    assert fw.ensure() is False
    fw.close()
    assert fake.rules("filter", "DOCKER-USER") == []
    assert fake.rules("raw", "PREROUTING") == ["-d 172.18.0.2/32 ! -i br-a -j DROP"]


def test_rules_lists_ours_as_they_are_in_the_tables() -> None:
    fake = FakeIptables()
    fw = Firewall(TUN, runner=fake, binary="iptables")
    assert fw.rules() == []
    fw.apply({NET_A: "br-a"})
    assert fw.rules() == [
        '-t filter -A DOCKER-USER -i br-a -o ctunvm0 -s 172.18.0.0/16 -m conntrack --ctstate '
        'RELATED,ESTABLISHED -m comment --comment "ctun:ctunvm0" -j ACCEPT',
        '-t filter -A DOCKER-USER -i ctunvm0 -o br-a -d 172.18.0.0/16 -m comment --comment '
        '"ctun:ctunvm0" -j ACCEPT',
        '-t raw -A PREROUTING -i ctunvm0 -d 172.18.0.0/16 -m comment --comment "ctun:ctunvm0" '
        '-j ACCEPT',
    ]


@pytest.mark.parametrize(
    ("legacy", "nft", "expected"),
    [
        ("-P FORWARD DROP\n-N DOCKER\n", "-P FORWARD ACCEPT\n", "iptables-legacy"),
        ("-P FORWARD ACCEPT\n", "-N DOCKER-USER\n", "iptables-nft"),
        (None, "-N DOCKER\n", "iptables-nft"),  # None: that variant is not installed
        ("-N DOCKER\n", "-N DOCKER\n", "iptables"),
        ("-P FORWARD ACCEPT\n", None, "iptables"),
    ],
)
def test_backend_detection(legacy: str | None, nft: str | None, expected: str) -> None:
    calls: list[list[str]] = []
    listings = {"iptables-legacy": legacy, "iptables-nft": nft}

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        text = listings.get(argv[0], "")
        if text is None:
            raise FileNotFoundError(argv[0])
        return cp(argv, out=text)

    fw = Firewall(TUN, runner=runner, legacy_loaded=lambda: True)
    assert calls == []  # detection waits for the first use
    assert fw.backend == expected
    assert calls == [["iptables-legacy", "-w", "5", "-t", "filter", "-S"],
                     ["iptables-nft", "-w", "5", "-t", "filter", "-S"]]
    fw.rules()
    assert calls[2][0] == expected and len(calls) == 4  # detected once, then used


def test_legacy_is_not_asked_when_no_legacy_tables_exist() -> None:
    """Listing with iptables-legacy would load legacy tables into the kernel: a side effect."""
    calls: list[list[str]] = []

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return cp(argv, out="-N DOCKER-USER\n")

    fw = Firewall(TUN, runner=runner, legacy_loaded=lambda: False)
    assert fw.backend == "iptables-nft"
    assert [c[0] for c in calls] == ["iptables-nft"]


def test_missing_iptables_says_to_install_it() -> None:
    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(argv[0])

    with pytest.raises(FirewallError, match=r"^iptables is not installed in the agent image; "):
        Firewall(TUN, runner=runner).apply({NET_A: "br-a"})


def test_a_failing_command_is_one_line_with_command_and_stderr() -> None:
    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return cp(argv, 4, err="Another app is currently holding the xtables lock.\n"
                               "Stopped waiting after 5s.\n")

    with pytest.raises(FirewallError) as info:
        Firewall(TUN, runner=runner, binary="iptables-nft").apply({NET_A: "br-a"})
    message = str(info.value)
    assert "\n" not in message
    assert "`iptables-nft -w 5 -t filter -S` failed (exit 4)" in message
    assert "holding the xtables lock. Stopped waiting after 5s." in message


def test_bad_names_are_refused_before_any_command() -> None:
    fake = FakeIptables()
    with pytest.raises(ValueError, match="tun"):
        Firewall("", runner=fake)
    with pytest.raises(ValueError, match="bridge"):
        Firewall(TUN, runner=fake, binary="iptables").apply({NET_A: "br a"})
    assert fake.calls == []


# -- root tests: real iptables and real forwarded traffic, in throwaway namespaces ------------

CONTAINER_IP = "172.30.0.2"
SUBNET = IPv4Network("172.30.0.0/24")
BRIDGE = "br-ctun"
TAGGED = re.compile(r'--comment "?ctun:ctunvm0"?(\s|$)')


@dataclass
class Topology:
    """tun side (t) -- veth -- vm (router + bridge, Docker-like firewall) -- veth -- container."""

    t: str
    vm: str
    c: str
    server: socket.socket

    def runner(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return netns.run(self.vm, argv, check=False)

    def firewall(self, binary: str | None = "iptables") -> Firewall:
        return Firewall(TUN, runner=self.runner, binary=binary)

    def iptables(self, *args: str) -> None:
        netns.run(self.vm, ["iptables", "-w", "5", *args])

    def saved(self) -> list[str]:
        """iptables-save of the vm, without counters and comment/timestamp lines."""
        text = netns.run(self.vm, ["iptables-save"]).stdout
        return [re.sub(r"\s*\[\d+:\d+\]", "", line) for line in text.splitlines()
                if line.strip() and not line.startswith("#")]

    def tagged(self) -> int:
        return sum(1 for line in self.saved() if TAGGED.search(line))

    def ping(self, wait: int = 1) -> bool:
        result = netns.run(self.t, ["ping", "-n", "-c", "1", "-W", str(wait), CONTAINER_IP],
                           check=False)
        return result.returncode == 0

    def tcp(self, timeout: float = 1.0) -> bool:
        """A TCP connection from the tun side to the container, with data both ways."""
        port = self.server.getsockname()[1]
        try:
            client = netns.call_in(self.t, socket.create_connection, (CONTAINER_IP, port),
                                   timeout)
        except OSError:
            return False
        with client:
            conn, _ = self.server.accept()
            with conn:
                conn.sendall(b"pong")
                return client.recv(4) == b"pong"

    def reachable(self) -> bool:
        # Poll with a deadline: the first packet may wait for ARP, never for a fixed sleep.
        wait_until(lambda: self.ping(wait=2), timeout=10, what=f"ping {CONTAINER_IP}")
        return self.tcp(timeout=5)

    def unreachable(self) -> bool:
        return not self.ping() and not self.tcp()


def _need_iptables() -> None:
    missing = [b for b in ("iptables", "iptables-save") if shutil.which(b) is None]
    if not missing:
        return
    reason = f"needs {', '.join(missing)}"
    if os.environ.get("CI") == "true" or os.environ.get("CTUN_REQUIRE_ALL") == "1":
        pytest.fail(f"{reason} (CI=true or CTUN_REQUIRE_ALL=1: missing prerequisites fail)")
    pytest.skip(reason)


def _ip(ns: str, *args: str) -> None:
    netns.run(ns, ["ip", *args])


@pytest.fixture(params=["docker-user"])
def topo(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """The topology with a Docker-like firewall in the vm; param "forward" makes one without
    DOCKER-USER whose FORWARD jumps first to an isolation chain that drops tunnel traffic."""
    _need_iptables()
    base = f"ctunfw{os.getpid()}"
    with contextlib.ExitStack() as stack:
        t, vm, c = (stack.enter_context(netns.temporary(f"{base}-{role}"))
                    for role in ("t", "vm", "c"))
        _ip(vm, "link", "add", TUN, "type", "veth", "peer", "name", "eth0", "netns", t)
        _ip(vm, "addr", "add", "10.77.0.1/30", "dev", TUN)
        _ip(vm, "link", "set", TUN, "up")
        _ip(t, "addr", "add", "10.77.0.2/30", "dev", "eth0")
        _ip(t, "link", "set", "eth0", "up")
        _ip(t, "route", "add", str(SUBNET), "via", "10.77.0.1")
        _ip(vm, "link", "add", BRIDGE, "type", "bridge")
        _ip(vm, "addr", "add", "172.30.0.1/24", "dev", BRIDGE)
        _ip(vm, "link", "set", BRIDGE, "up")
        _ip(vm, "link", "add", "vc0", "type", "veth", "peer", "name", "eth0", "netns", c)
        _ip(vm, "link", "set", "vc0", "master", BRIDGE)
        _ip(vm, "link", "set", "vc0", "up")
        _ip(c, "addr", "add", f"{CONTAINER_IP}/24", "dev", "eth0")
        _ip(c, "link", "set", "eth0", "up")
        _ip(c, "route", "add", "default", "via", "172.30.0.1")
        netns.run(vm, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        server = netns.call_in(c, socket.create_server, (CONTAINER_IP, 0))
        stack.enter_context(server)
        server.settimeout(5)
        topology = Topology(t, vm, c, server)
        topology.iptables("-P", "FORWARD", "DROP")
        if request.param == "docker-user":
            topology.iptables("-N", "DOCKER-USER")
            topology.iptables("-I", "FORWARD", "-j", "DOCKER-USER")
            topology.iptables("-A", "DOCKER-USER", "-j", "DROP")  # a user's DROP
        else:
            topology.iptables("-N", "ISOLATION")
            topology.iptables("-A", "ISOLATION", "-i", TUN, "-j", "DROP")
            topology.iptables("-A", "FORWARD", "-j", "ISOLATION")
        # Engine 28's direct access filtering.
        topology.iptables("-t", "raw", "-A", "PREROUTING", "-d", CONTAINER_IP, "!", "-i",
                          BRIDGE, "-j", "DROP")
        yield topology
    assert not any(netns.exists(f"{base}-{role}") for role in ("t", "vm", "c"))


@pytest.mark.root
def test_traffic_flows_only_while_applied_and_close_restores_the_tables(
    topo: Topology,
) -> None:
    before = topo.saved()
    assert topo.unreachable()
    fw = topo.firewall()
    fw.apply({SUBNET: BRIDGE})
    assert topo.reachable()
    assert topo.tagged() == 3
    assert len(fw.rules()) == 3
    fw.close()
    assert topo.unreachable()
    assert topo.saved() == before
    fw.close()  # idempotent
    assert topo.saved() == before


@pytest.mark.root
def test_a_crash_leaves_tagged_rules_that_the_next_run_removes(topo: Topology) -> None:
    before = topo.saved()
    crashed = topo.firewall()
    crashed.apply({SUBNET: BRIDGE})
    del crashed  # no close(): as if the agent had been killed
    assert topo.tagged() == 3
    removed = topo.firewall().cleanup_leftovers()
    assert len(removed) == 3 and all("ctun:ctunvm0" in line for line in removed)
    assert topo.saved() == before
    assert topo.unreachable()


@pytest.mark.root
def test_ensure_puts_the_rules_back_above_a_new_drop(topo: Topology) -> None:
    fw = topo.firewall()
    fw.apply({SUBNET: BRIDGE})
    assert topo.reachable()
    assert fw.ensure() is False
    topo.iptables("-I", "DOCKER-USER", "1", "-j", "DROP")
    assert topo.unreachable()
    assert fw.ensure() is True
    assert topo.reachable()
    # Docker starting another container puts its raw DROP on top.
    topo.iptables("-t", "raw", "-I", "PREROUTING", "1", "-d", CONTAINER_IP, "!", "-i", BRIDGE,
                  "-j", "DROP")
    assert topo.unreachable()
    assert fw.ensure() is True
    assert topo.reachable()
    assert fw.ensure() is False
    fw.close()
    assert topo.tagged() == 0


@pytest.mark.root
@pytest.mark.parametrize("topo", ["forward"], indirect=True)
def test_without_docker_user_the_rules_go_to_forward_above_a_dropping_jump(
    topo: Topology,
) -> None:
    fw = topo.firewall()
    fw.apply({SUBNET: BRIDGE})
    assert any(" -A FORWARD " in line for line in fw.rules())
    assert topo.reachable()
    # A Docker restart re-inserts its jump to the isolation chain on top.
    topo.iptables("-I", "FORWARD", "1", "-j", "ISOLATION")
    assert topo.unreachable()
    assert fw.ensure() is True
    assert topo.reachable()
    fw.close()
    assert topo.unreachable()


@pytest.mark.root
def test_nothing_is_duplicated_by_repeated_apply_and_ensure(topo: Topology) -> None:
    fw = topo.firewall()
    for round_ in range(5):
        fw.apply({SUBNET: BRIDGE})
        fw.ensure()
        if round_ % 2:
            topo.iptables("-I", "DOCKER-USER", "1", "-j", "DROP")
        fw.ensure()
        fw.apply({SUBNET: BRIDGE})
        assert topo.tagged() == 3
    assert topo.reachable()
    fw.close()
    assert topo.tagged() == 0


@pytest.mark.root
def test_backend_detection_finds_the_nft_tables_docker_uses(topo: Topology) -> None:
    fw = topo.firewall(binary=None)
    assert fw.backend == "iptables-nft"
    fw.apply({SUBNET: BRIDGE})
    assert topo.reachable()
    fw.close()
    assert topo.tagged() == 0
