"""`proxy` end to end in the namespace lab: a container reaches a service the host runs on
127.0.0.1, through the tunnel, at the host's tunnel address; the LAN does not; removing the
line from the config takes it away."""

from __future__ import annotations

import functools
import hashlib
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ctun.core import control
from ctun.lab import netns
from ctun.lab.topology import Lab
from ctun.lab.tunnel import HOST_IF, Tunnel, start_tunnel, status

pytestmark = pytest.mark.root
LAB_CONTAINERS = 1

HOST_ADDRESS = "192.168.251.2"  # the host's end of the tunnel (default addr)
SERVICE_PORT = 8080  # the host service, on 127.0.0.1 only
PROXY_PORT = 18080  # where containers reach it
BIG = 4 << 20


def write_config(lab: Lab, proxy: bool) -> Path:
    """A docker-connector.conf, as its users have it."""
    path = lab.workdir / "docker-connector.conf"
    lines = ["# the host service, shared with the containers",
             f"proxy 127.0.0.1:{SERVICE_PORT}:{PROXY_PORT}" if proxy else "# (no proxy)"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def fetch(ns: str, port: int, path: str = "/", address: str = HOST_ADDRESS) -> bytes | str:
    """An HTTP/1.0 GET from inside `ns`: the body, or the error as text."""
    try:
        sock = netns.call_in(ns, socket.create_connection, (address, port), timeout=10)
    except OSError as exc:
        return type(exc).__name__
    with sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200"):
        return f"bad response {head[:40]!r}"
    return body


def proxy_status(lab: Lab) -> dict[str, Any]:
    result: dict[str, Any] = status(lab, HOST_IF)["proxy"]
    return result


def _serving(lab: Lab) -> bool:
    try:
        sock = netns.call_in(lab.host_ns, socket.create_connection,
                             ("127.0.0.1", SERVICE_PORT), timeout=1)
    except OSError:
        return False
    sock.close()
    return True


@pytest.fixture(scope="module")
def tunnel(lab: Lab) -> Iterator[Tunnel]:
    root = lab.workdir / "host-www"
    root.mkdir()
    (root / "index.html").write_text("hello from the host's 127.0.0.1\n", encoding="utf-8")
    (root / "big.bin").write_bytes(hashlib.sha256(b"big").digest() * (BIG // 32))
    service = lab.spawn(lab.host_ns, [sys.executable, "-m", "http.server", str(SERVICE_PORT),
                                      "--bind", "127.0.0.1", "--directory", str(root)],
                        "host-service")
    lab.wait_until(functools.partial(_serving, lab), 15, what="the host service on 127.0.0.1")
    config = write_config(lab, proxy=True)
    tun = start_tunnel(lab, daemon_args=("--config", str(config)))
    yield tun
    Lab.stop(tun.agent)
    Lab.stop(tun.daemon)
    Lab.stop(service)


def test_a_container_reaches_a_host_service_on_loopback(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    c1 = lab.container_ns[0]
    # The service itself listens on 127.0.0.1 only: without the proxy nothing reaches it.
    assert fetch(c1, SERVICE_PORT) == "ConnectionRefusedError"
    started = time.monotonic()
    body = lab.wait_until(lambda: isinstance(b := fetch(c1, PROXY_PORT), bytes) and b, 10,
                          what="the host service through the proxy")
    assert body == b"hello from the host's 127.0.0.1\n"
    big = fetch(c1, PROXY_PORT, "/big.bin")
    assert isinstance(big, bytes) and len(big) == BIG
    assert big == hashlib.sha256(b"big").digest() * (BIG // 32)
    elapsed = time.monotonic() - started
    (entry,) = proxy_status(lab)["proxies"]
    assert entry["listen"] == f"{HOST_ADDRESS}:{PROXY_PORT}"
    assert entry["target"] == f"127.0.0.1:{SERVICE_PORT}"
    assert entry["protocol"] == "tcp" and entry["state"] == "listening"
    assert entry["connections"] >= 2 and entry["failed"] == entry["rejected"] == 0
    assert entry["bytes_from_target"] > BIG
    print(f"relayed {entry['bytes_from_target']} bytes to the container and "
          f"{entry['bytes_to_target']} to the service in {elapsed:.2f} s")


def test_the_lan_does_not_reach_it(tunnel: Tunnel) -> None:
    """Only the tunnel: not the host's LAN address, and not the tunnel address routed in
    from the LAN (Linux would deliver that to a listener not tied to the tunnel interface)."""
    lab = tunnel.lab
    assert fetch(lab.atk_ns, PROXY_PORT, address="10.251.1.1") == "ConnectionRefusedError"
    assert fetch(lab.atk_ns, PROXY_PORT) == "ConnectionRefusedError"
    assert isinstance(fetch(lab.container_ns[0], PROXY_PORT), bytes)  # still there for c1


def test_removing_the_line_takes_it_away(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    c1 = lab.container_ns[0]
    assert isinstance(fetch(c1, PROXY_PORT), bytes)

    started = time.monotonic()
    write_config(lab, proxy=False)
    control.request(lab.run_dir / f"{HOST_IF}.sock", "reload")
    lab.wait_until(lambda: fetch(c1, PROXY_PORT) == "ConnectionRefusedError", 2,
                   interval=0.02, what="the proxy to go after `reload`")
    gone = time.monotonic() - started
    assert proxy_status(lab)["proxies"] == []
    name = f"proxy {HOST_ADDRESS}:{PROXY_PORT} -> 127.0.0.1:{SERVICE_PORT}"
    assert f"{name} (TCP) listening" in lab.log("daemon")
    assert f"{name} closed" in lab.log("daemon")

    # Back again, this time by the file alone: the daemon watches its config.
    started = time.monotonic()
    write_config(lab, proxy=True)
    lab.wait_until(lambda: isinstance(fetch(c1, PROXY_PORT), bytes), 2, interval=0.02,
                   what="the proxy to come back after the file changed")
    back = time.monotonic() - started
    print(f"proxy gone {gone:.3f} s after removing the line + reload; "
          f"back {back:.3f} s after adding it again (hot reload)")
