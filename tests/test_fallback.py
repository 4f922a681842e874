"""UDP with automatic TCP fallback, end to end in the namespace lab; and TCP under abuse."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from ctun.lab import netns
from ctun.lab.topology import Lab
from ctun.lab.tunnel import HOST_IF, VM_IF, is_up, peer, reachable, start_tunnel, status

pytestmark = pytest.mark.root

PORT = 2511
BLOCK_UDP = ["INPUT", "-p", "udp", "--dport", str(PORT), "-j", "DROP"]


@contextmanager
def udp_blocked(lab: Lab) -> Iterator[Callable[[], None]]:
    """Drop UDP to the host's tunnel port in the host namespace; yields a function to lift it."""
    netns.run(lab.host_ns, ["iptables", "-w", "5", "-I", *BLOCK_UDP])
    lifted = False

    def lift() -> None:
        nonlocal lifted
        if not lifted:
            netns.run(lab.host_ns, ["iptables", "-w", "5", "-D", *BLOCK_UDP])
            lifted = True

    try:
        yield lift
    finally:
        lift()


def transport_of(lab: Lab, interface: str) -> str:
    return str(peer(lab, interface)["transport"])


def ping_works(lab: Lab) -> bool:
    return lab.ping(lab.host_ns, lab.container_ips[0], timeout=1).returncode == 0


def test_blocked_udp_from_the_start_falls_back_to_tcp_within_5s(fresh_lab: Lab) -> None:
    lab = fresh_lab
    with udp_blocked(lab):
        lab.start_daemon()
        started = time.monotonic()
        lab.start_agent()
        # Poll the agent's state finely (a failing HTTP probe would block a whole second),
        # then prove the traffic and count that time too.
        lab.wait_until(lambda: is_up(lab, VM_IF), 5, interval=0.02, what="the agent up")
        assert reachable(lab) and ping_works(lab)
        took = time.monotonic() - started
        assert took < 5
        assert transport_of(lab, VM_IF) == "tcp" and transport_of(lab, HOST_IF) == "tcp"
        (switch,) = peer(lab, VM_IF)["switches"]
        assert (switch["from"], switch["to"]) == ("udp", "tcp")
        assert switch["reason"] == "no authenticated answer over udp within 3 s"


def test_udp_dropped_mid_session_moves_to_tcp_and_back(fresh_lab: Lab) -> None:
    lab = fresh_lab
    start_tunnel(lab)
    assert transport_of(lab, VM_IF) == "udp"
    with udp_blocked(lab) as lift:
        blocked = time.monotonic()
        lab.wait_until(lambda: is_up(lab, VM_IF) and transport_of(lab, VM_IF) == "tcp", 5,
                       interval=0.02, what="the session over TCP")
        assert reachable(lab)
        assert time.monotonic() - blocked < 5
        assert transport_of(lab, VM_IF) == "tcp"
        assert peer(lab, VM_IF)["switches"][-1]["reason"] == \
            "keepalives stopped coming back over udp"
        lift()
        lifted = time.monotonic()
        lab.wait_until(lambda: transport_of(lab, VM_IF) == "udp", 30, interval=0.2,
                       what="the session to return to UDP")
        assert time.monotonic() - lifted < 30
    lab.wait_until(lambda: transport_of(lab, HOST_IF) == "udp", 5, what="the host to follow")
    assert peer(lab, VM_IF)["switches"][-1]["reason"] == "udp works again"
    assert [s["to"] for s in peer(lab, VM_IF)["switches"]] == ["tcp", "udp"]
    assert reachable(lab)


def test_a_pinned_transport_never_switches(fresh_lab: Lab) -> None:
    lab = fresh_lab
    start_tunnel(lab, agent_args=("--transport", "udp"))
    with udp_blocked(lab):
        lab.wait_until(lambda: peer(lab, VM_IF)["state"] == "connecting", 10,
                       what="the pinned agent to notice")
        assert transport_of(lab, VM_IF) == "udp"
        assert peer(lab, VM_IF)["switch_count"] == 0


# --- TCP under abuse ---------------------------------------------------------------------


def _atk_connect(lab: Lab) -> socket.socket:
    sock: socket.socket = netns.call_in(
        lab.atk_ns, socket.create_connection, (str(lab.host_underlay), PORT), timeout=5)
    return sock


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True once the daemon closed the connection (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def test_tcp_bad_input_is_closed_while_the_tunnel_keeps_working(fresh_lab: Lab) -> None:
    lab = fresh_lab
    # The agent uses TCP too, so the abuse hits the very listener the tunnel depends on.
    start_tunnel(lab, agent_args=("--transport", "tcp"))
    assert transport_of(lab, HOST_IF) == "tcp"
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", lab.host_ns, "ping", "-n", "-q", "-c", "100", "-i", "0.1",
         "-W", "1", str(lab.container_ips[0])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results: dict[str, bool] = {}

    def attack(name: str, payload: bytes, then_close: bool = False, timeout: float = 3) -> None:
        sock = _atk_connect(lab)
        try:
            sock.sendall(payload)
            if then_close:
                sock.shutdown(socket.SHUT_WR)
            results[name] = _closed_by_peer(sock, timeout)
        finally:
            sock.close()

    def one_byte_per_second() -> None:
        sock = _atk_connect(lab)
        try:
            started = time.monotonic()
            closed = False
            while time.monotonic() - started < 10:
                try:
                    sock.send(b"\x00")
                except OSError:
                    closed = True
                    break
                if _closed_by_peer(sock, 1.0):  # the sender's own pace, 1 byte a second
                    closed = True
                    break
            results["slow"] = closed and time.monotonic() - started < 7
        finally:
            sock.close()

    def many_connections() -> None:
        socks = [_atk_connect(lab) for _ in range(100)]
        try:
            closed = sum(_closed_by_peer(s, 2) for s in socks)
            results["many"] = closed >= 90  # the per-source cap lets only a few stay
        finally:
            for s in socks:
                s.close()

    threads = [
        threading.Thread(target=attack, args=("zero", b"\x00\x00")),
        # The longest length there is (any length fits the limit now that super-packets
        # travel whole), then silence: the first frame never completes.
        threading.Thread(target=attack, args=("stalled", b"\xff\xff" + b"x" * 100, False, 8)),
        threading.Thread(target=attack, args=("partial", b"\x00", True)),
        threading.Thread(target=one_byte_per_second),
        threading.Thread(target=many_connections),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    output, _ = pinger.communicate(timeout=60)
    assert results == {"zero": True, "stalled": True, "partial": True, "slow": True,
                       "many": True}
    assert " 0% packet loss" in output, output
    stats = next(t["stats"] for t in status(lab, HOST_IF)["transports"] if t["name"] == "tcp")
    assert stats["closed_zero_length"] >= 1 and stats["closed_handshake_timeout"] >= 1
    assert stats["refused_per_source"] >= 90
    assert reachable(lab) and transport_of(lab, VM_IF) == "tcp"
