"""Kernel offloads end to end: TCP super-packets cross the tunnel whole (one DATA_GSO frame
each) and arrive intact, over UDP and over TCP, and everything still works forced off."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from ctun.lab import netns
from ctun.lab.topology import Lab
from ctun.lab.tunnel import HOST_IF, VM_IF, Tunnel, start_tunnel, status

pytestmark = pytest.mark.root
LAB_CONTAINERS = 1
PORT = 9100
SIZE = 24 * 1024 * 1024

# In the container: a sink that answers the SHA-256 of all it got, and a source that sends
# the SHA-256 of what follows, then SIZE random bytes.
SERVER = f"""
import hashlib, os, socket, threading
def sink(conn):
    digest = hashlib.sha256()
    while data := conn.recv(1 << 16):
        digest.update(data)
    conn.sendall(digest.digest()); conn.close()
def source(conn):
    data = os.urandom({SIZE})
    conn.sendall(hashlib.sha256(data).digest() + data); conn.close()
def serve(port, handler):
    s = socket.create_server((os.environ["ADDR"], port))
    while True:
        threading.Thread(target=handler, args=(s.accept()[0],)).start()
threading.Thread(target=serve, args=({PORT}, sink)).start()
serve({PORT + 1}, source)
"""


@pytest.fixture(scope="module")
def servers(lab: Lab) -> Lab:
    lab.spawn(lab.container_ns[0], [sys.executable, "-c", SERVER], "bulk",
              env={"ADDR": str(lab.container_ips[0])})
    return lab


def connect(lab: Lab, port: int) -> socket.socket:
    address = (str(lab.container_ips[0]), port)

    def attempt() -> socket.socket | None:
        try:
            return netns.call_in(lab.host_ns, socket.create_connection, address, timeout=5)
        except OSError:
            return None

    sock = lab.wait_until(attempt, 10, what=f"a connection to {address}")
    assert sock is not None  # wait_until only returns a true value
    return sock


def upload(lab: Lab) -> None:
    data = os.urandom(SIZE)
    with connect(lab, PORT) as sock:
        sock.settimeout(60)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(64):
            answer += chunk
    assert answer == hashlib.sha256(data).digest()


def download(lab: Lab) -> None:
    received = bytearray()
    with connect(lab, PORT + 1) as sock:
        sock.settimeout(60)
        while chunk := sock.recv(1 << 16):
            received += chunk
    assert len(received) == 32 + SIZE
    assert hashlib.sha256(received[32:]).digest() == received[:32]


@pytest.fixture(params=[("udp", True), ("tcp", True), ("udp", False)],
                ids=["udp-offload", "tcp-offload", "udp-forced-off"])
def tunnel(request: pytest.FixtureRequest, servers: Lab) -> Iterator[tuple[Tunnel, bool]]:
    transport, offload = request.param
    args = ("--transport", transport, *(() if offload else ("--no-offload",)))
    tun = start_tunnel(servers, daemon_args=args, agent_args=args)
    try:
        yield tun, offload
    finally:
        Lab.stop(tun.agent)
        Lab.stop(tun.daemon)


def lost(sender: dict[str, Any], receiver: dict[str, Any]) -> int:
    """Frames of any kind from `sender` to `receiver` that their transports counted as lost."""
    (out,), (into,) = ([t["stats"] for t in side["transports"]] for side in (sender, receiver))
    if "frames_out" in out:  # TCP: only the sender can lose a frame, by not queueing it
        return int(out["dropped_send_full"] + out["dropped_send_error"]
                   + out["dropped_no_connection"])
    return int(out["errors"] + into["dropped_rcvbuf"] + into["frames_incomplete"]
               + into["pieces_invalid"])


def test_bulk_data_arrives_intact_both_ways(tunnel: tuple[Tunnel, bool]) -> None:
    tun, offload = tunnel
    lab = tun.lab
    upload(lab)
    download(lab)

    last: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def settled() -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Both sides' counters once every super-packet sent has arrived or is counted as
        lost by a transport (TCP's full send queue, a full UDP receive buffer: the tunnel
        drops as any link does, and the flow's own TCP sends again). Until then, the last
        segments (a FIN, a delayed ACK) may still be crossing."""
        host, vm = status(lab, HOST_IF), status(lab, VM_IF)
        last[:] = [(host, vm)]
        for sender, receiver in ((host, vm), (vm, host)):
            missing = sender["peers"][0]["tx_super"] - receiver["peers"][0]["rx_super"]
            if not 0 <= missing <= lost(sender, receiver):
                return None
        return host, vm

    try:
        both = lab.wait_until(settled, 5, what="each super-packet sent to arrive")
    except AssertionError as error:
        host, vm = last[0]
        raise AssertionError(f"{error}; host: {host['peers']} {host['transports']}; "
                             f"vm: {vm['peers']} {vm['transports']}") from None
    assert both is not None  # wait_until only returns a true value
    host, vm = both
    if os.environ.get("CTUN_LAB_OFFLOAD") == "off":
        offload = False  # the lab added --no-offload to every tunnel
    for side, other in ((host, vm), (vm, host)):
        (peer,) = side["peers"]
        assert peer["drops"] == {} and side["drops"] == {}
        assert side["offload"] == {"available": offload, "on": offload}
        assert peer["gso"] is offload
        if offload:
            # Super-packets both ways, and far fewer frames than the segments they carry.
            assert peer["tx_super"] > 0 and other["peers"][0]["rx_super"] > 0
            assert peer["tx_packets"] < peer["tx_bytes"] / 4000
        else:
            assert peer["tx_super"] == peer["rx_super"] == 0
