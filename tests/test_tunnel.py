"""End to end in the namespace lab: a real daemon and agent, real tun devices, real traffic."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ctun.core import messages, protocol
from ctun.core.protocol import FrameType
from ctun.lab import netns
from ctun.lab.snapshot import net_state
from ctun.lab.topology import Lab
from ctun.lab.tunnel import (
    HOST_IF,
    VM_IF,
    Tunnel,
    all_drops,
    counters,
    delta,
    is_up,
    peer,
    reachable,
    seconds_until,
    start_tunnel,
    status,
)

pytestmark = pytest.mark.root

INTRUDER = "intruder"
INTRUDER_IP = "192.168.251.9"
PORT = 2511


def _write_config(lab: Lab, key: bytes) -> Path:
    path = lab.workdir / "ctun.toml"
    path.touch(mode=0o600)  # it holds a key: ctun refuses a config others can read
    path.write_text(
        f'[peers.{INTRUDER}]\nkey = "{base64.b64encode(key).decode()}"\n'
        f'allowed = ["{INTRUDER_IP}/32"]\n'
    )
    return path


@pytest.fixture(scope="module")
def intruder_key() -> bytes:
    """The key of a second, legitimate peer: it may send only from 192.168.251.9."""
    return os.urandom(32)


@pytest.fixture(scope="module")
def tunnel(lab: Lab, intruder_key: bytes) -> Iterator[Tunnel]:
    config = _write_config(lab, intruder_key)
    started = start_tunnel(lab, daemon_args=("--config", str(config)))
    yield started
    for proc in (started.agent, started.daemon):
        lab.stop(proc)


# --- reachability ------------------------------------------------------------------------


def test_containers_are_unreachable_without_the_tunnel(lab: Lab) -> None:
    result = lab.http_get(lab.host_ns, f"http://{lab.container_ips[0]}/", timeout=1)
    assert isinstance(result, str) and "unreachable" in result
    assert lab.ping(lab.host_ns, lab.container_ips[0], timeout=1).returncode != 0


def test_ping_and_http_reach_every_container(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    for index, ip in enumerate(lab.container_ips):
        assert lab.http_get(lab.host_ns, f"http://{ip}/") == (200, lab.greeting(index) + "\n")
        assert lab.ping(lab.host_ns, ip, count=3).returncode == 0
    # Containers reach the host's tunnel address too (replies route back through the VM).
    assert lab.ping(lab.container_ns[0], "192.168.251.2").returncode == 0


def test_counters_on_both_ends_match_what_was_sent(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    host0, vm0 = counters(lab, HOST_IF, "vm"), counters(lab, VM_IF)
    # 10 echo requests of 100 bytes of data: 128-byte IP packets, and as many replies.
    assert lab.ping(lab.host_ns, lab.container_ips[0], count=10, size=100).returncode == 0
    host, vm = delta(counters(lab, HOST_IF, "vm"), host0), delta(counters(lab, VM_IF), vm0)
    assert host == {"tx_packets": 10, "tx_bytes": 1280, "rx_packets": 10, "rx_bytes": 1280}
    assert vm == {"rx_packets": 10, "rx_bytes": 1280, "tx_packets": 10, "tx_bytes": 1280}

    # A TCP exchange: whatever one end sent, the other end received, byte for byte.
    host0, vm0 = counters(lab, HOST_IF, "vm"), counters(lab, VM_IF)
    for _ in range(5):
        assert lab.http_get(lab.host_ns, f"http://{lab.container_ips[1]}/")[0] == 200
    lab.wait_until(
        lambda: delta(counters(lab, HOST_IF, "vm"), host0)["rx_bytes"]
        == delta(counters(lab, VM_IF), vm0)["tx_bytes"],
        5, what="the last segments to arrive",
    )
    host, vm = delta(counters(lab, HOST_IF, "vm"), host0), delta(counters(lab, VM_IF), vm0)
    assert host["tx_packets"] == vm["rx_packets"] > 0
    assert host["tx_bytes"] == vm["rx_bytes"]
    assert host["rx_packets"] == vm["tx_packets"] > 0
    assert host["rx_bytes"] == vm["tx_bytes"]


def test_mtu_edges(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    target = lab.container_ips[0]
    # 1372 bytes of ICMP data + 28 bytes of headers = exactly the 1400-byte MTU.
    assert lab.ping(lab.host_ns, target, size=1372, df=True).returncode == 0
    assert lab.ping(lab.container_ns[0], "192.168.251.2", size=1372, df=True).returncode == 0
    # One byte more from the host: refused locally with the MTU named, not lost silently.
    too_big = _ping_df(lab.host_ns, str(target), 1373)
    assert too_big.returncode != 0
    assert "message too long, mtu=1400" in too_big.stderr
    # From a container, the VM forwards into the tunnel: an ICMP "fragmentation needed".
    frag = _ping_df(lab.container_ns[0], "192.168.251.2", 1400)
    assert frag.returncode != 0
    assert "Frag needed and DF set (mtu = 1400)" in frag.stdout


def _ping_df(ns: str, target: str, size: int) -> subprocess.CompletedProcess[str]:
    """One don't-fragment ping, not quiet: its per-packet errors are what we check."""
    return netns.run(ns, ["ping", "-n", "-c", "1", "-W", "1", "-M", "do", "-s", str(size),
                          target], check=False)


def test_a_second_daemon_is_refused_in_one_line(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    second = lab.start_daemon(name="second")
    assert second.wait(timeout=30) == 2
    lines = lab.log("second").strip().splitlines()
    assert len(lines) == 1, lines
    assert "ctun0 is in use by another running ctun" in lines[0]
    assert f"pid {tunnel.daemon.pid}" in lines[0]
    assert reachable(lab)


# --- bad input from the network ----------------------------------------------------------


class Attacker:
    """A UDP socket in the attacker's namespace aimed at the daemon's port."""

    def __init__(self, lab: Lab) -> None:
        self.sock: socket.socket = netns.call_in(
            lab.atk_ns, socket.socket, socket.AF_INET, socket.SOCK_DGRAM
        )
        self.sock.bind((str(lab.atk_address), 0))
        self.sock.connect((str(lab.host_underlay), PORT))
        self.sent = 0

    def send(self, data: bytes) -> None:
        self.sock.send(data)
        self.sent += 1

    def receive(self, timeout: float = 3.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(65536)

    def close(self) -> None:
        self.sock.close()


def _handshake(attacker: Attacker, psk: bytes) -> tuple[protocol.Sealer, protocol.Opener, bytes]:
    pending = protocol.create_init(psk, 4242, time.time_ns())
    attacker.sock.send(pending.message)
    keys = protocol.consume_response(pending, attacker.receive())
    sealer = protocol.Sealer(keys.send, keys.remote_index)
    opener = protocol.Opener(keys.receive)
    # The first frame under the new keys confirms the session to the host, which echoes the
    # keepalive and greets us with a control message that we acknowledge like an agent does.
    attacker.sock.send(sealer.seal(FrameType.KEEPALIVE, b""))
    seen: set[int] = set()
    while seen != {FrameType.KEEPALIVE, FrameType.CONTROL}:
        frame = attacker.receive()
        payload = opener.open(frame)
        seen.add(frame[0])
        if frame[0] == FrameType.CONTROL:
            hello = messages.parse(payload)
            assert hello.kind == "hello" and hello.body["role"] == "host"
            attacker.sock.send(sealer.seal(FrameType.CONTROL, messages.encode("ack", hello.seq)))
    return sealer, opener, pending.message


def _icmp_echo(src: str, dst: str, ident: int) -> bytes:
    icmp = bytearray(b"\x08\x00\x00\x00" + ident.to_bytes(2, "big") + b"\x00\x01" + b"x" * 32)
    icmp[2:4] = _checksum(bytes(icmp)).to_bytes(2, "big")
    header = bytearray(20)
    header[0], header[8], header[9] = 0x45, 64, 1
    header[2:4] = (20 + len(icmp)).to_bytes(2, "big")
    header[12:16] = socket.inet_aton(src)
    header[16:20] = socket.inet_aton(dst)
    header[10:12] = _checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + bytes(icmp)


def _checksum(data: bytes) -> int:
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data) - 1, 2))
    if len(data) % 2:
        total += data[-1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_bad_network_input_is_dropped_silently_and_counted(
    tunnel: Tunnel, intruder_key: bytes
) -> None:
    lab = tunnel.lab
    # Traffic keeps flowing through the tunnel the whole time.
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", lab.host_ns, "ping", "-n", "-q", "-c", "60", "-i", "0.05",
         "-W", "1", str(lab.container_ips[0])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    attacker = Attacker(lab)
    try:
        sealer, opener, first_init = _handshake(attacker, intruder_key)
        drops0 = all_drops(lab, HOST_IF)
        intruder0 = counters(lab, HOST_IF, INTRUDER)
        vm0 = counters(lab, HOST_IF, "vm")
        attacker.sent = 0
        expected: dict[str, int] = {}

        def expect(reason: str, n: int = 1) -> None:
            expected[reason] = expected.get(reason, 0) + n

        # Empty and 1..19-byte datagrams: each too short for whatever its first byte says,
        # or of a type the host never accepts (responses only ever go to the VM side).
        attacker.send(b"")
        expect("short")
        for size in range(1, 20):
            first = (1, 2, 3, 4, 5, 6, 0, 99)[size % 8]
            attacker.send(bytes([first]) + os.urandom(size - 1))
            expect("short" if first in (1, 3, 4, 5, 6) else "unknown_type")
        # Random bytes of many sizes under an unknown type byte.
        for size in (20, 64, 500, 1400):
            attacker.send(b"\xee" + os.urandom(size - 1))
            expect("unknown_type")
        # Oversized: bigger than any frame a 1400-byte MTU can produce.
        attacker.send(b"\x03" + bytes(3) + os.urandom(1996))
        attacker.send(b"\x03" + bytes(3) + os.urandom(60000))
        expect("oversize", 2)
        # A frame from a peer nobody configured, and a replayed initiation.
        attacker.send(protocol.create_init(os.urandom(32), 1, time.time_ns()).message)
        expect("unknown_peer")
        attacker.send(first_init)
        expect("stale_handshake")
        # Every byte of a valid sealed frame flipped in turn.
        packet = _icmp_echo(INTRUDER_IP, "192.168.251.2", 7)
        frame = sealer.seal(FrameType.DATA, packet)
        for i in range(len(frame)):
            broken = bytearray(frame)
            broken[i] ^= 0xFF
            attacker.send(bytes(broken))
        expect("unknown_type")
        expect("malformed", 3)
        expect("unknown_session", 4)
        expect("auth_failed", len(frame) - 8)
        # The untouched frame is accepted once (an authenticated peer gets its echo reply) ...
        attacker.sock.send(frame)
        reply = opener.open(attacker.receive())
        assert reply[20] == 0 and reply[12:16] == socket.inet_aton("192.168.251.2")
        # ... and refused when replayed.
        attacker.send(frame)
        expect("replay")
        # An authenticated peer may not use an address it does not own.
        attacker.send(sealer.seal(FrameType.DATA, _icmp_echo(str(lab.container_ips[0]),
                                                             "192.168.251.2", 8)))
        expect("source_not_allowed")

        # UDP keeps order on this path: if the next thing we receive is the echo of this
        # keepalive, nothing at all was sent back for the bad frames above.
        attacker.sock.send(sealer.seal(FrameType.KEEPALIVE, b"last"))
        assert opener.open(attacker.receive()) == b"last"

        drops = delta(all_drops(lab, HOST_IF), {k: drops0.get(k, 0)
                                                for k in all_drops(lab, HOST_IF)})
        assert {k: v for k, v in drops.items() if v} == expected
        assert sum(expected.values()) == attacker.sent
        # Exactly one packet of the intruder's reached the interface: the valid echo.
        assert delta(counters(lab, HOST_IF, INTRUDER), intruder0)["rx_packets"] == 1
        assert is_up(lab, HOST_IF) and is_up(lab, VM_IF)
    finally:
        attacker.close()
        output, _ = pinger.communicate(timeout=30)
    assert " 0% packet loss" in output, output
    # The pings overlapped the attack (they started before it and were all answered).
    assert delta(counters(lab, HOST_IF, "vm"), vm0)["tx_packets"] > 0
    assert reachable(lab)


# --- restarts, crashes and cleanup ---------------------------------------------------------


def _dumps(lab: Lab) -> tuple[object, object]:
    return net_state(lab.host_ns), net_state(lab.vm_ns)


def test_sigterm_removes_everything(fresh_lab: Lab) -> None:
    lab = fresh_lab
    before = _dumps(lab)
    tunnel = start_tunnel(lab)
    assert reachable(lab)
    assert lab.stop(tunnel.daemon) == 0
    assert not reachable(lab)
    assert lab.stop(tunnel.agent) == 0
    assert _dumps(lab) == before
    assert sorted(p.name for p in lab.run_dir.iterdir()) == []


def test_agent_killed_and_restarted_resumes_within_5s(fresh_lab: Lab) -> None:
    lab = fresh_lab
    tunnel = start_tunnel(lab)
    assert lab.stop(tunnel.agent, signal.SIGKILL) == -signal.SIGKILL
    # The kernel removes a non-persistent tun with its last file descriptor.
    lab.wait_until(lambda: "ctunvm0" not in net_state(lab.vm_ns)["links"], 5,
                   what="the dead agent's interface to go")
    assert not reachable(lab)
    lab.start_agent(name="agent2")
    took = seconds_until(lab, lambda: reachable(lab), 5, "traffic through a restarted agent")
    assert took < 5
    assert "cleaned up after a previous run" in lab.log("agent2")
    assert peer(lab, HOST_IF)["handshakes"] == 2


def test_daemon_restart_agent_reconnects_within_5s(fresh_lab: Lab) -> None:
    lab = fresh_lab
    tunnel = start_tunnel(lab)
    assert lab.stop(tunnel.daemon) == 0
    daemon2 = lab.start_daemon(name="daemon2")
    took = seconds_until(lab, lambda: reachable(lab), 5, "the agent to reconnect")
    assert took < 5
    # And after a crash of the daemon: the next start cleans up, the agent comes back.
    assert lab.stop(daemon2, signal.SIGKILL) == -signal.SIGKILL
    lab.start_daemon(name="daemon3")
    took = seconds_until(lab, lambda: reachable(lab), 5, "the agent to reconnect again")
    assert took < 5
    assert "cleaned up after a previous run" in lab.log("daemon3")


def test_kill9_leftovers_are_cleaned_by_the_next_start(fresh_lab: Lab) -> None:
    lab = fresh_lab
    # The agent turns forwarding on and must put back what it found, even after a crash.
    netns.call_in(lab.vm_ns, Path("/proc/sys/net/ipv4/ip_forward").write_text, "0")
    before = _dumps(lab)
    tunnel = start_tunnel(lab)
    for proc in (tunnel.agent, tunnel.daemon):
        assert lab.stop(proc, signal.SIGKILL) == -signal.SIGKILL
    assert {p.suffix for p in lab.run_dir.iterdir()} >= {".json"}  # crash state left behind
    second = start_tunnel(lab, daemon_args=(), agent_args=())
    assert "cleaned up after a previous run" in lab.log("agent")
    for proc in (second.agent, second.daemon):
        assert lab.stop(proc) == 0
    assert _dumps(lab) == before
    assert netns.call_in(lab.vm_ns, Path("/proc/sys/net/ipv4/ip_forward").read_text) == "0\n"
    assert sorted(p.name for p in lab.run_dir.iterdir()) == []


def test_rekeying_never_interrupts_traffic(fresh_lab: Lab) -> None:
    lab = fresh_lab
    fast = ("--rekey-after", "1")
    start_tunnel(lab, daemon_args=fast, agent_args=fast)
    result = lab.ping(lab.host_ns, lab.container_ips[0], count=25)  # 5 s at 0.2 s
    assert " 0% packet loss" in result.stdout, result.stdout
    assert peer(lab, VM_IF)["handshakes"] >= 4
    assert status(lab, HOST_IF)["drops"] == {}


def test_an_agent_with_the_wrong_key_is_told_what_to_check(fresh_lab: Lab) -> None:
    lab = fresh_lab
    lab.start_daemon()
    wrong = lab.workdir / "wrong.key"
    wrong.touch(mode=0o600)
    wrong.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    lab.start_agent("--key-file", str(wrong))
    # Three unanswered handshakes on each path (UDP, then the TCP fallback).
    lab.wait_until(lambda: "no answer from 10.251.0.1:2511 to 6 handshakes" in lab.log("agent"),
                   15, what="the agent's warning")
    assert "use the host's vm.key" in lab.log("agent")
    assert status(lab, HOST_IF)["drops"].get("unknown_peer", 0) >= 3
    assert peer(lab, VM_IF)["state"] == "connecting"
    assert peer(lab, HOST_IF)["state"] == "waiting"
