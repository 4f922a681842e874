"""Legacy wire mode in the namespace lab (Done-when 6): a peer written only from
docs/legacy.md talks to a ctun host in legacy mode, as docker-connector's VM side and as an
accessor; the ctun agent in legacy mode works against the ctun host and against the
documented host format."""

from __future__ import annotations

import functools
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ctun.lab import netns
from ctun.lab.topology import HOST_LAN, HOST_UNDERLAY, Lab, offload_args
from ctun.lab.tunnel import HOST_IF, VM_IF, status

pytestmark = pytest.mark.root
LAB_CONTAINERS = 1

PORT = 2511
EXPOSE_PORT = 2512
VM_ADDR, HOST_ADDR, ALICE = "192.168.251.1", "192.168.251.2", "192.168.251.9"
CONTAINER = "172.18.0.2"
HOSTS_ENTRIES = 200  # makes the control push several datagrams long


# --- the test peer: written from docs/legacy.md, nothing of ctun's code ----------------------


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_packet(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:]
    return header + payload


def icmp_echo(src: str, dst: str, ident: int, seq: int, reply: bool = False,
              data: bytes = b"legacy-test") -> bytes:
    body = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + data
    body = body[:2] + struct.pack("!H", inet_checksum(body)) + body[4:]
    return ipv4_packet(src, dst, 1, body)


def parse_echo(datagram: bytes) -> tuple[str, str, int, int, int] | None:
    """(src, dst, type, id, seq) of an ICMP echo packet, else None."""
    if len(datagram) < 28 or datagram[0] != 0x45 or datagram[9] != 1:
        return None
    kind, _code, _sum, ident, seq = struct.unpack("!BBHHH", datagram[20:28])
    if kind not in (0, 8):
        return None
    return (socket.inet_ntoa(datagram[12:16]), socket.inet_ntoa(datagram[16:20]), kind, ident,
            seq)


def echo_is(*expected: object) -> Callable[[bytes], bool]:
    return lambda datagram: parse_echo(datagram) == expected


def is_packet(datagram: bytes) -> bool:
    return len(datagram) >= 20 and datagram[0] >> 4 == 4 and \
        struct.unpack("!H", datagram[2:4])[0] == len(datagram)


class LegacyPeer:
    """One UDP socket in a lab namespace speaking docker-connector's format."""

    def __init__(self, ns: str, remote: tuple[str, int], bind: tuple[str, int] | None = None
                 ) -> None:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            if bind is not None:
                sock.bind(bind)
            else:
                sock.connect(remote)
            return sock

        self.sock = netns.call_in(ns, make)
        self.remote = remote
        self.pushes: list[str] = []
        self.piece_sizes: list[int] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.remote)

    def recv(self, timeout: float) -> bytes | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, source = self.sock.recvfrom(65535)
        except TimeoutError:
            return None
        self.remote = (source[0], source[1])
        return data

    def next_datagram(self, timeout: float) -> bytes | None:
        """The next datagram that is not part of a control push; pushes are collected."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            data = self.recv(remaining)
            if data is None:
                return None
            if data[:1] == b"\x01" and len(data) == 3:  # a push header: 01 LL LL
                self._collect_push(data, deadline)
                continue
            return data
        return None

    def _collect_push(self, header: bytes, deadline: float) -> None:
        length = struct.unpack("!H", header[1:3])[0]
        body = b""
        while len(body) < length:
            piece = self.recv(deadline - time.monotonic())
            assert piece is not None, f"push cut short: {len(body)} of {length} bytes"
            assert not is_packet(piece), "a packet inside a push"
            self.piece_sizes.append(len(piece))
            body += piece
        assert len(body) == length
        self.pushes.append(body.decode("ascii"))

    def wait_push(self, timeout: float = 5.0) -> list[str]:
        """The commands of the next control push."""
        deadline = time.monotonic() + timeout
        count = len(self.pushes)
        while len(self.pushes) == count and time.monotonic() < deadline:
            self.next_datagram(min(0.2, deadline - time.monotonic()))
        assert len(self.pushes) > count, "no control push arrived"
        return [c for c in self.pushes[count].split(",") if c]

    def wait_packet(self, match: Callable[[bytes], bool], timeout: float = 3.0) -> bytes:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            data = self.next_datagram(remaining)
            if data is not None and match(data):
                return data
        raise AssertionError("the expected packet did not arrive")


class EchoResponder:
    """The VM side's network: answers echo requests for 172.18.0.0/16 as a container would,
    and keeps what else arrives (to see what was relayed, and what not)."""

    def __init__(self, peer: LegacyPeer) -> None:
        self.peer = peer
        self.seen: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EchoResponder:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            data = self.peer.next_datagram(0.2)
            if data is None:
                continue
            self.seen.append(data)
            echo = parse_echo(data)
            if echo and echo[2] == 8 and echo[1].startswith("172.18."):
                src, dst, _kind, ident, seq = echo
                # The request's data back unchanged, as a real host does (ping's timestamp).
                self.peer.send(icmp_echo(dst, src, ident, seq, reply=True, data=data[28:]))


# --- the lab around it -----------------------------------------------------------------------


def ctun(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CTUN_RUN_DIR": str(lab.run_dir)}
    return subprocess.run([sys.executable, "-m", "ctun", *args], capture_output=True,
                          text=True, env=env, timeout=30)


def all_drops(lab: Lab) -> dict[str, int]:
    s = status(lab, HOST_IF)
    total = dict(s["drops"])
    for p in s["peers"]:
        for reason, count in p["drops"].items():
            total[reason] = total.get(reason, 0) + count
    return total


def write_config(lab: Lab, links: bool = True) -> Path:
    path = lab.workdir / "docker-connector.conf"
    lines = [
        "# docker-connector's own config file, read as it is",
        "route 172.18.0.0/16 expose",
        "route 10.99.0.0/16",
        f"expose {HOST_LAN}:{EXPOSE_PORT}",
        f"token alice {ALICE}",
        f"hosts {lab.workdir / 'hosts'} .test",
        "pong on",
    ]
    if links:
        lines.insert(5, "iptables 172.18.0.0+172.19.0.0")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_hosts(lab: Lab, extra: str = "") -> None:
    names = [f"10.1.{i // 250}.{i % 250 + 1} name{i}.test" for i in range(HOSTS_ENTRIES)]
    (lab.workdir / "hosts").write_text("\n".join(
        ["127.0.0.1 db.test", "10.7.7.7 other.example", *names, extra]) + "\n")


@pytest.fixture(scope="module")
def legacy_host(lab: Lab) -> Iterator[Lab]:
    """A ctun host in legacy mode, configured by a docker-connector.conf."""
    write_hosts(lab)
    config = write_config(lab)
    argv = [sys.executable, "-m", "ctun", "up", "--no-ui", "--no-docker", "--wire", "legacy",
            "--listen", str(HOST_UNDERLAY), "--config", str(config),
            "--key-file", str(lab.key_file), *offload_args()]
    daemon = lab.spawn(lab.host_ns, argv, "daemon")
    lab.wait_until(lambda: (lab.run_dir / f"{HOST_IF}.sock").exists() or daemon.poll(), 15,
                   what="the legacy daemon's control socket")
    assert daemon.poll() is None, lab.log("daemon")
    yield lab
    Lab.stop(daemon)
    log = lab.log("daemon")
    assert "Traceback" not in log, log
    assert "stopped; interface ctun0 and its routes removed" in log
    assert HOST_IF not in netns.run(lab.host_ns, ["ip", "-o", "link"]).stdout


@pytest.fixture
def vm_peer(legacy_host: Lab) -> Iterator[LegacyPeer]:
    peer = LegacyPeer(legacy_host.vm_ns, (str(HOST_UNDERLAY), PORT))
    peer.send(b"\x00")  # hello: from now on this socket is the VM side
    yield peer
    peer.close()


@pytest.fixture
def accessor(legacy_host: Lab) -> Iterator[LegacyPeer]:
    peer = LegacyPeer(legacy_host.atk_ns, (str(HOST_LAN), EXPOSE_PORT))
    yield peer
    peer.close()


def expected_hosts() -> list[str]:
    names = [f"host 10.1.{i // 250}.{i % 250 + 1} name{i}.test" for i in range(HOSTS_ENTRIES)]
    return ["dns .test", f"host {HOST_ADDR} db.test", *names]


# --- (a) the test peer as the VM side: ping both ways ----------------------------------------


def test_status_says_legacy_and_unauthenticated(legacy_host: Lab) -> None:
    shown = ctun(legacy_host, "status")
    assert shown.returncode == 0, shown.stderr
    assert "wire: legacy (unauthenticated)" in shown.stdout
    assert "LEGACY WIRE MODE" in legacy_host.log("daemon")


def test_vm_side_pings_the_host_and_the_host_pings_behind_it(vm_peer: LegacyPeer,
                                                             legacy_host: Lab) -> None:
    vm_peer.wait_push()  # the host has taken us as its VM side
    started = time.monotonic()
    for seq in range(1, 6):
        vm_peer.send(icmp_echo(VM_ADDR, HOST_ADDR, 0x4C47, seq))
        reply = vm_peer.wait_packet(echo_is(HOST_ADDR, VM_ADDR, 0, 0x4C47, seq))
        assert is_packet(reply)
    rtt = (time.monotonic() - started) / 5
    with EchoResponder(vm_peer):
        result = legacy_host.ping(legacy_host.host_ns, CONTAINER, count=5)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0% packet loss" in result.stdout
    print(f"\nVM side -> host echo: 5/5, {rtt * 1000:.2f} ms avg; host -> {CONTAINER}: "
          f"{result.stdout.strip().splitlines()[-1]}")


# --- (b) the test peer as an accessor --------------------------------------------------------


def test_accessor_login_pong_and_relay(vm_peer: LegacyPeer, accessor: LegacyPeer,
                                       legacy_host: Lab) -> None:
    vm_peer.wait_push()
    accessor.send(b"\x00mallory")
    assert accessor.recv(2) == b"\x02"
    accessor.send(b"\x00alice")
    assert accessor.recv(2) == (
        f"\x01addr {ALICE}/24,peer {HOST_ADDR},mtu 1400,route 172.18.0.0/16".encode())
    # pong on: the host answers the accessor's ping of its tunnel address itself.
    accessor.send(icmp_echo(ALICE, HOST_ADDR, 7, 1))
    assert parse_echo(accessor.wait_packet(lambda d: parse_echo(d) is not None)) == (
        HOST_ADDR, ALICE, 0, 7, 1)
    with EchoResponder(vm_peer) as vm:
        for seq in range(1, 4):
            accessor.send(icmp_echo(ALICE, CONTAINER, 8, seq))
            got = accessor.wait_packet(lambda d: parse_echo(d) is not None)
            assert parse_echo(got) == (CONTAINER, ALICE, 0, 8, seq)
        # Not exposed, and not its own address: neither reaches the VM side.
        accessor.send(icmp_echo(ALICE, "10.99.0.5", 9, 1))
        accessor.send(icmp_echo("192.168.251.10", CONTAINER, 10, 1))
        accessor.send(icmp_echo(ALICE, CONTAINER, 11, 1))  # a marker that does get through
        accessor.wait_packet(lambda d: (parse_echo(d) or ())[3:4] == (11,))
    relayed = [e[3] for e in map(parse_echo, vm.seen) if e and e[2] == 8]
    assert relayed == [8, 8, 8, 11]
    peers = {p["name"]: p for p in status(legacy_host, HOST_IF)["peers"]}
    assert peers["alice"]["state"] == "up"
    assert peers["alice"]["drops"] == {"not_exposed": 1, "source_not_allowed": 1}


def log_in(lab: Lab, accessor: LegacyPeer) -> None:
    """Log in as alice (again), however long a reload or the reply budget takes."""

    def accepted() -> bool:
        accessor.send(b"\x01alice")
        return (accessor.recv(0.2) or b"")[:1] == b"\x01"

    lab.wait_until(accepted, 5, what="alice to log in")


def test_a_token_removed_from_the_config_is_cut_off(vm_peer: LegacyPeer, accessor: LegacyPeer,
                                                   legacy_host: Lab) -> None:
    vm_peer.wait_push()
    accessor.send(b"\x00alice")
    assert (accessor.recv(2) or b"")[:1] == b"\x01"
    config = legacy_host.workdir / "docker-connector.conf"
    original = config.read_text()
    seq = iter(range(1, 10_000))

    def refused() -> bool:
        accessor.send(icmp_echo(ALICE, HOST_ADDR, 31, next(seq)))
        return accessor.recv(0.1) == b"\x02"

    try:
        with EchoResponder(vm_peer):
            assert not refused()  # pong: still logged in
            config.write_text(original.replace(f"token alice {ALICE}\n", ""))
            started = time.monotonic()
            legacy_host.wait_until(refused, 5, interval=0.01, what="alice to be cut off")
            took = time.monotonic() - started
            bad_logins = all_drops(legacy_host).get("bad_login", 0)
            accessor.send(b"\x01alice")
            # The token is gone: no way back in (0x02, or silence once over the rate limit).
            assert accessor.recv(1) in (b"\x02", None)
            assert all_drops(legacy_host)["bad_login"] == bad_logins + 1
    finally:
        config.write_text(original)
    log_in(legacy_host, accessor)
    print(f"\ntoken removed from the config file: accessor cut off after {took:.2f} s")
    assert took < 2.0


SECOND_LAN_ADDRESS = "10.251.2.2"  # a legitimate accessor beside the flooding one


@pytest.fixture
def second_address(legacy_host: Lab) -> Iterator[str]:
    lab = legacy_host
    netns.run(lab.atk_ns, ["ip", "addr", "add", f"{SECOND_LAN_ADDRESS}/32", "dev",
                           lab.atk_host_if])
    netns.run(lab.host_ns, ["ip", "route", "add", f"{SECOND_LAN_ADDRESS}/32", "dev",
                            lab.host_atk_if])
    yield SECOND_LAN_ADDRESS
    netns.run(lab.host_ns, ["ip", "route", "del", f"{SECOND_LAN_ADDRESS}/32"], check=False)
    netns.run(lab.atk_ns, ["ip", "addr", "del", f"{SECOND_LAN_ADDRESS}/32", "dev",
                           lab.atk_host_if], check=False)


def relay_rtts(accessor: LegacyPeer, count: int, first_seq: int) -> list[float]:
    rtts = []
    for seq in range(first_seq, first_seq + count):
        sent = time.monotonic()
        accessor.send(icmp_echo(ALICE, CONTAINER, 21, seq))
        accessor.wait_packet(echo_is(CONTAINER, ALICE, 0, 21, seq))
        rtts.append(time.monotonic() - sent)
    return rtts


def test_wrong_logins_are_rate_limited_and_cost_an_accessor_nothing(
        vm_peer: LegacyPeer, legacy_host: Lab, second_address: str) -> None:
    vm_peer.wait_push()
    accessor = LegacyPeer(legacy_host.atk_ns, (str(HOST_LAN), EXPOSE_PORT),
                          bind=(second_address, 0))
    flood = LegacyPeer(legacy_host.atk_ns, (str(HOST_LAN), EXPOSE_PORT))
    flooding = threading.Event()

    def send_flood() -> None:
        # 1000 wrong logins in about 2 s (the issue allows 10): load, not synchronisation.
        for i in range(1000):
            flood.send(b"\x00wrong" + str(i).encode())
            if i % 50 == 49:
                time.sleep(0.1)
        flooding.set()

    try:
        log_in(legacy_host, accessor)
        with EchoResponder(vm_peer):
            quiet = relay_rtts(accessor, 20, 1)
            before = all_drops(legacy_host).get("rate_limited", 0)
            sender = threading.Thread(target=send_flood)
            started = time.monotonic()
            sender.start()
            loaded: list[float] = []
            while not flooding.is_set():
                loaded += relay_rtts(accessor, 5, 100 + len(loaded))
            sender.join()
            elapsed = time.monotonic() - started
        replies = 0
        while (data := flood.recv(0.5)) is not None:
            assert data == b"\x02"
            replies += 1
        limited = all_drops(legacy_host).get("rate_limited", 0) - before
    finally:
        flood.close()
        accessor.close()
    avg = sum(quiet) / len(quiet) * 1000
    avg_loaded = sum(loaded) / len(loaded) * 1000
    print(f"\n1000 wrong logins in {elapsed:.2f} s: {replies} replies (0x02), {limited} "
          f"rate-limited; accessor relay RTT {avg:.2f} ms quiet, {avg_loaded:.2f} ms during "
          f"the flood ({len(loaded)} pings, all answered)")
    assert 1 <= replies <= 3 + elapsed + 1
    assert limited == 1000 - replies
    assert avg_loaded < max(5 * avg, 5.0)


# --- (c) control pushes ----------------------------------------------------------------------


def test_the_push_carries_links_and_hosts_as_documented(vm_peer: LegacyPeer,
                                                        legacy_host: Lab) -> None:
    commands = vm_peer.wait_push()
    assert commands == ["connect 172.18.0.0 172.19.0.0", *expected_hosts()]
    assert len(vm_peer.piece_sizes) > 1 and max(vm_peer.piece_sizes) <= 1400
    print(f"\nfull push: {len(commands)} commands, {sum(vm_peer.piece_sizes)} bytes in "
          f"1 + {len(vm_peer.piece_sizes)} datagrams")


def test_reload_and_hosts_changes_push_the_difference(vm_peer: LegacyPeer,
                                                      legacy_host: Lab) -> None:
    vm_peer.wait_push()
    try:
        write_config(legacy_host, links=False)
        started = time.monotonic()
        assert vm_peer.wait_push() == ["disconnect 172.18.0.0 172.19.0.0", *expected_hosts()]
        took = time.monotonic() - started
        write_hosts(legacy_host, "10.8.8.8 new.test")
        assert vm_peer.wait_push() == [*expected_hosts(), "host 10.8.8.8 new.test"]
    finally:
        write_hosts(legacy_host)
        write_config(legacy_host)
    assert vm_peer.wait_push()[0] == "connect 172.18.0.0 172.19.0.0"
    print(f"\nlink removed from the config file: pushed after {took:.2f} s")


# --- (d) the network cannot write the config -------------------------------------------------


def test_config_writes_from_the_network_change_nothing(vm_peer: LegacyPeer,
                                                        legacy_host: Lab) -> None:
    vm_peer.wait_push()
    config = legacy_host.workdir / "docker-connector.conf"
    before = config.read_bytes()
    counted = all_drops(legacy_host).get("config_write_refused", 0)
    stranger = LegacyPeer(legacy_host.vm_ns, (str(HOST_UNDERLAY), PORT))
    try:
        vm_peer.send(b"\x01route 10.200.0.0/16")
        stranger.send(b"\x01token mallory 192.168.251.66")
        stranger.send(icmp_echo(VM_ADDR, HOST_ADDR, 1, 1))  # a packet, but not from the VM side
        legacy_host.wait_until(
            lambda: all_drops(legacy_host).get("config_write_refused", 0) == counted + 2,
            5, what="both config writes to be counted")
        assert stranger.recv(0.5) is None  # no answer either
    finally:
        stranger.close()
    # The pump has handled both (they are counted): docker-connector would have written by now.
    assert config.read_bytes() == before
    assert ctun(legacy_host, "reload").returncode == 0
    shown = json.loads(ctun(legacy_host, "status", "--json").stdout)
    assert "10.200.0.0/16" not in shown["routes"]
    assert all_drops(legacy_host)["not_peer"] >= 1


def test_malformed_input_gets_silence_and_a_counter(vm_peer: LegacyPeer,
                                                    legacy_host: Lab) -> None:
    vm_peer.wait_push()
    before = all_drops(legacy_host)
    garbage = {
        b"\x00\x00": "malformed",  # not a heartbeat (1 byte), not a packet
        b"\x02": "malformed",
        b"\x60" + bytes(39): "malformed",  # IPv6
        icmp_echo("10.50.0.1", HOST_ADDR, 1, 1): "source_not_allowed",  # not a routed source
        ipv4_packet(VM_ADDR, HOST_ADDR, 17, bytes(1480)): "inner_too_big",  # over the MTU
    }
    for datagram in garbage:
        vm_peer.send(datagram)
    expected = dict(before)
    for reason in garbage.values():
        expected[reason] = expected.get(reason, 0) + 1
    legacy_host.wait_until(lambda: all_drops(legacy_host) == expected, 5,
                           what=f"the drops to be counted: {expected}")
    assert vm_peer.next_datagram(0.3) is None  # and nothing was answered
    vm_peer.send(icmp_echo(VM_ADDR, HOST_ADDR, 0x99, 1))  # the daemon carries on
    vm_peer.wait_packet(echo_is(HOST_ADDR, VM_ADDR, 0, 0x99, 1))


# --- the ctun agent in legacy mode -----------------------------------------------------------


def test_ctun_agent_and_host_in_legacy_mode(fresh_lab: Lab) -> None:
    lab = fresh_lab
    daemon = lab.start_daemon("--wire", "legacy")
    agent = lab.start_agent("--wire", "legacy")
    try:
        lab.wait_until(lambda: _http_ok(lab), 20, what="HTTP 200 through legacy mode")
        started = time.monotonic()
        result = lab.http_get(lab.host_ns, f"http://{CONTAINER}/")
        took = time.monotonic() - started
        assert result == (200, lab.greeting(0) + "\n")
        host_view = status(lab, HOST_IF)
        assert host_view["wire"] == "legacy (unauthenticated)"
        assert host_view["peers"][0]["state"] == "up"
        assert status(lab, VM_IF)["legacy"]["bridge_subnets"] == ["172.18.0.0/16"]
    finally:
        code = Lab.stop(agent)
        Lab.stop(daemon)
    assert_agent_cleaned_up(lab, code)
    assert "Traceback" not in lab.log("daemon"), lab.log("daemon")
    print(f"\nctun agent <-> ctun host, legacy: HTTP 200 in {took * 1000:.1f} ms")


def assert_agent_cleaned_up(lab: Lab, code: int) -> None:
    """The agent stopped by itself on SIGTERM (not killed) and removed its interface and
    every rule it added (filter and nat)."""
    assert "Traceback" not in lab.log("agent"), lab.log("agent")
    assert code == 0, f"agent exit code {code}\n{lab.log('agent')}"
    assert VM_IF not in netns.run(lab.vm_ns, ["ip", "-o", "link"]).stdout
    for table in ("filter", "nat"):
        rules = netns.run(lab.vm_ns, ["iptables", "-t", table, "-S"], check=False).stdout
        assert "ctun" not in rules, f"{rules}\n{lab.log('agent')}"


def _http_ok(lab: Lab) -> bool:
    result = lab.http_get(lab.host_ns, f"http://{CONTAINER}/", timeout=1)
    return isinstance(result, tuple) and result[0] == 200


def test_ctun_agent_against_the_documented_host_format(fresh_lab: Lab) -> None:
    """The test peer plays docker-connector's host: the agent says hello, answers pings
    through its tun and forwards to a container, and applies a pushed `dns`/`host`."""
    lab = fresh_lab
    host = LegacyPeer(lab.host_ns, ("0.0.0.0", 0), bind=(str(HOST_UNDERLAY), PORT))
    agent = lab.spawn(lab.vm_ns, [sys.executable, "-m", "ctun", "vm", "--wire", "legacy",
                                  "--host", str(HOST_UNDERLAY), *offload_args()], "agent")
    try:
        assert host.recv(15) == b"\x00", lab.log("agent")
        for target in (VM_ADDR, CONTAINER):  # the agent itself, then through its bridge
            lab.wait_until(functools.partial(_pinged, host, target), 10,
                           what=f"an echo reply from {target}")
        push = b"dns .test,host 192.168.251.2 db.test api.test"
        host.send(struct.pack("!BH", 1, len(push)))
        host.send(push)
        answer = lab.wait_until(lambda: _resolve(lab, "api.test"), 10,
                                what="the agent's DNS responder to answer api.test")
        assert answer == HOST_ADDR
        # Idle now: a heartbeat every 5 s while the agent has nothing else to send.
        beats: list[float] = []
        while len(beats) < 2 and (data := host.recv(8)) is not None:
            if data == b"\x00":
                beats.append(time.monotonic())
    finally:
        code = Lab.stop(agent)
        host.close()
    assert_agent_cleaned_up(lab, code)
    assert len(beats) == 2, "no heartbeats while idle"
    print(f"\nctun agent vs the documented host: hello, pings to itself and through its "
          f"bridge, DNS from a push; idle heartbeat interval {beats[1] - beats[0]:.2f} s")
    assert 4.5 <= beats[1] - beats[0] <= 6.0


def _pinged(host: LegacyPeer, target: str) -> bool:
    host.send(icmp_echo(HOST_ADDR, target, 0x77, 1))
    deadline = time.monotonic() + 1
    while (remaining := deadline - time.monotonic()) > 0:
        data = host.recv(remaining)
        if data is not None and parse_echo(data) == (target, HOST_ADDR, 0, 0x77, 1):
            return True
    return False


def _resolve(lab: Lab, name: str) -> str | None:
    """An A query from the container to the agent's tunnel address, port 53."""
    query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    query += struct.pack("!HH", 1, 1)

    def ask() -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1)
            sock.sendto(query, (VM_ADDR, 53))
            try:
                return sock.recv(512)
            except OSError:
                return None

    reply = netns.call_in(lab.container_ns[0], ask)
    if reply is None or len(reply) < len(query) + 16 or reply[3] & 0x0F:
        return None
    return socket.inet_ntoa(reply[-4:])
