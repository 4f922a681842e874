"""The proxy relay on loopback: real sockets, real TCP, no namespaces needed."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ctun.core import proxy as proxy_module
from ctun.core.config import ProxyConfig
from ctun.core.proxy import BUFFER_LIMIT, Proxies
from ctun.lab.topology import wait_until

LOOPBACK = "127.0.0.1"
CHUNK = 1 << 16


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes that differ all along, so a lost, doubled or reordered chunk changes the hash."""
    block = b"".join(hashlib.sha256(b"%d:%d" % (seed, i)).digest() for i in range(2048))
    return (block * (size // len(block) + 1))[:size]


class Server:
    """A TCP service on loopback: every connection gets a thread running `handle`."""

    def __init__(self, handle: Callable[[socket.socket], None], backlog: int = 16,
                 rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(backlog)
        self.port = int(self.sock.getsockname()[1])
        self.handle = handle
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self.accepted = 0

    def start(self) -> Server:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handle(conn)
            except OSError as exc:
                self.errors.append(exc)

    @property
    def target(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for thread in self.threads:
            thread.join(10)


def echo(conn: socket.socket) -> None:
    while data := conn.recv(CHUNK):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(handle: Callable[[socket.socket], None], **kwargs: Any) -> Server:
        server = Server(handle, **kwargs).start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def proxies() -> Iterator[Callable[..., Proxies]]:
    made: list[Proxies] = []

    def make(**kwargs: Any) -> Proxies:
        made.append(Proxies(LOOPBACK, **kwargs))
        return made[-1]

    yield make
    for each in made:
        each.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection((LOOPBACK, port), timeout=10)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


def send_and_finish(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def entry(p: Proxies, port: int) -> dict[str, Any]:
    found: list[dict[str, Any]] = [e for e in p.status()["proxies"]
                                   if e["listen"] == f"{LOOPBACK}:{port}"]
    assert len(found) == 1, p.status()
    return found[0]


def roundtrip(sock: socket.socket, data: bytes = b"ping") -> bytes:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(CHUNK)
        if not chunk:
            break
        received += chunk
    return received


def cut_off(sock: socket.socket) -> str:
    """What the client sees when the relay drops it: a reset (or, at worst, an EOF)."""
    sock.settimeout(5)
    try:
        data = sock.recv(CHUNK)
    except ConnectionResetError:
        return "reset"
    return "eof" if data == b"" else f"data {data!r}"


def connect_and_cut_off(port: int) -> str:
    """A connection the relay accepts and resets at once; on loopback the reset may come
    before connect() returns."""
    try:
        sock = connect(port)
    except ConnectionResetError:
        return "reset"
    with sock:
        return cut_off(sock)


# ---- relaying


def test_large_transfers_both_ways_at_once(proxies: Callable[..., Proxies],
                                           servers: Callable[..., Server]) -> None:
    target = servers(echo)
    port = free_port()
    p = proxies()
    p.apply([ProxyConfig(target.target, port)])
    size = 64 << 20
    payload = pattern(size)
    with connect(port) as sock:
        started = time.monotonic()
        sender = threading.Thread(target=send_and_finish, args=(sock, payload))
        sender.start()
        received = recv_all(sock)
        elapsed = time.monotonic() - started
        sender.join()
    assert len(received) == size
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    print(f"relayed {size >> 20} MiB each way in {elapsed:.2f} s "
          f"({2 * size / elapsed / 1e6:.0f} MB/s both ways together)")
    stats = wait_until(lambda: (e := entry(p, port))["active"] == 0 and e, 5,
                       what="the connection to end")
    assert stats["bytes_to_target"] == stats["bytes_from_target"] == size
    assert (stats["connections"], stats["failed"], stats["rejected"]) == (1, 0, 0)


def test_many_connections_at_once_keep_their_bytes_apart(
        proxies: Callable[..., Proxies], servers: Callable[..., Server]) -> None:
    target = servers(echo)
    port = free_port()
    p = proxies()
    p.apply([ProxyConfig(target.target, port)])
    results: dict[int, bool] = {}

    def one(seed: int) -> None:
        payload = pattern(1 << 20, seed)
        with connect(port) as sock:
            sender = threading.Thread(target=send_and_finish, args=(sock, payload))
            sender.start()
            results[seed] = recv_all(sock) == payload
            sender.join()

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == dict.fromkeys(range(40), True)
    assert entry(p, port)["connections"] == 40


def test_half_close_from_the_container(proxies: Callable[..., Proxies],
                                       servers: Callable[..., Server]) -> None:
    """The client's FIN reaches the service, which answers only after it: like `nc -N`."""

    def digest_after_eof(conn: socket.socket) -> None:
        conn.sendall(hashlib.sha256(recv_all(conn)).hexdigest().encode())
        conn.shutdown(socket.SHUT_WR)

    target = servers(digest_after_eof)
    port = free_port()
    p = proxies()
    p.apply([ProxyConfig(target.target, port)])
    payload = pattern(5 << 20)
    with connect(port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == hashlib.sha256(payload).hexdigest().encode()


def test_half_close_from_the_service(proxies: Callable[..., Proxies],
                                     servers: Callable[..., Server]) -> None:
    """The service finishes sending first; the container's bytes still reach it after that."""
    late: list[bytes] = []

    def send_then_listen(conn: socket.socket) -> None:
        conn.sendall(pattern(3 << 20))
        conn.shutdown(socket.SHUT_WR)
        late.append(recv_all(conn))

    target = servers(send_then_listen)
    port = free_port()
    p = proxies()
    p.apply([ProxyConfig(target.target, port)])
    with connect(port) as sock:
        assert recv_all(sock) == pattern(3 << 20)  # the service's FIN came through
        sock.sendall(b"still here after your FIN")
        sock.shutdown(socket.SHUT_WR)
        wait_until(lambda: late, 5, what="the service to read the client's last bytes")
    assert late == [b"still here after your FIN"]
    wait_until(lambda: entry(p, port)["active"] == 0, 5, what="an orderly end")


def test_backpressure_bounds_what_the_relay_holds(proxies: Callable[..., Proxies],
                                                  servers: Callable[..., Server]) -> None:
    """A service that does not read stops the relay reading the container: the container's
    sends block after a bounded amount, and nothing is lost once the service reads again."""
    go = threading.Event()
    got: list[bytes] = []

    def slow_reader(conn: socket.socket) -> None:
        go.wait(30)
        got.append(hashlib.sha256(recv_all(conn)).digest())

    target = servers(slow_reader, rcvbuf=BUFFER_LIMIT)
    port = free_port()
    p = proxies()
    p.apply([ProxyConfig(target.target, port)])
    limit = 128 << 20
    payload = pattern(limit)
    with connect(port) as sock:
        sock.setblocking(False)
        sent = 0
        # Send until 0.5 s pass without the socket becoming writable: the chain is full.
        while sent < limit:
            try:
                sent += sock.send(payload[sent:sent + CHUNK])
            except BlockingIOError:
                if not select.select([], [sock], [], 0.5)[1]:
                    break
        assert sent < 48 << 20, f"{sent} bytes went in: nothing held the container back"
        assert entry(p, port)["buffered"] <= BUFFER_LIMIT
        print(f"the container could send {sent / 1e6:.1f} MB before it was held back")
        go.set()
        sock.setblocking(True)
        sock.sendall(payload[sent:])
        sock.shutdown(socket.SHUT_WR)
        wait_until(lambda: got, 30, what="the service to read everything")
    assert got == [hashlib.sha256(payload).digest()]


# ---- failures


def test_a_refused_target_resets_the_container(proxies: Callable[..., Proxies]) -> None:
    port, nothing_there = free_port(), free_port()
    p = proxies()
    p.apply([ProxyConfig((LOOPBACK, nothing_there), port)])
    assert connect_and_cut_off(port) == "reset"
    stats = wait_until(lambda: (e := entry(p, port))["failed"] and e, 5, what="the failure")
    assert stats["failed"] == 1 and stats["active"] == 0
    assert stats["last_error"] == f"{LOOPBACK}:{nothing_there}: Connection refused"
    assert stats["state"] == "listening"  # the proxy itself carries on


def test_a_silent_target_times_out(proxies: Callable[..., Proxies]) -> None:
    # A listener whose accept queue is full drops further SYNs: the connect never completes.
    silent = socket.socket()
    silent.bind((LOOPBACK, 0))
    silent.listen(0)
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(silent.getsockname())
    port = free_port()
    p = proxies(connect_timeout=0.3)
    p.apply([ProxyConfig(silent.getsockname(), port)])
    try:
        with connect(port) as sock:
            started = time.monotonic()
            assert cut_off(sock) == "reset"
            waited = time.monotonic() - started
        assert 0.2 < waited < 2.0
        stats = entry(p, port)
        assert stats["failed"] == 1
        assert stats["last_error"].endswith("no answer within 0.3 s")
    finally:
        for each in (*fillers, silent):
            each.close()


def test_an_idle_connection_is_reset(proxies: Callable[..., Proxies],
                                     servers: Callable[..., Server]) -> None:
    target = servers(echo)
    port = free_port()
    p = proxies(idle_timeout=0.3)
    p.apply([ProxyConfig(target.target, port)])
    with connect(port) as sock:
        assert roundtrip(sock) == b"ping"
        started = time.monotonic()
        assert cut_off(sock) == "reset"
        assert time.monotonic() - started < 2.0
    assert entry(p, port)["idle_closed"] == 1


def test_the_cap_closes_new_connections_and_counts_them(
        proxies: Callable[..., Proxies], servers: Callable[..., Server],
        caplog: pytest.LogCaptureFixture) -> None:
    target = servers(echo)
    port = free_port()
    p = proxies(max_connections=2)
    p.apply([ProxyConfig(target.target, port)])
    first, second = connect(port), connect(port)
    try:
        assert roundtrip(first) == roundtrip(second) == b"ping"
        with caplog.at_level(logging.WARNING, logger="ctun.proxy"):
            for _ in range(3):
                assert connect_and_cut_off(port) == "reset"
        assert len([r for r in caplog.records if "the most there may be" in r.message]) == 1
        stats = entry(p, port)
        assert (stats["active"], stats["rejected"], stats["connections"]) == (2, 3, 2)
        assert roundtrip(first, b"still fine") == b"still fine"
        first.close()
        wait_until(lambda: entry(p, port)["active"] == 1, 5, what="a slot to come free")
        with connect(port) as again:
            assert roundtrip(again) == b"ping"
    finally:
        first.close()
        second.close()


# ---- listeners


def test_apply_opens_and_closes_only_the_difference(proxies: Callable[..., Proxies],
                                                    servers: Callable[..., Server]) -> None:
    target = servers(echo)
    a, b, c = (ProxyConfig(target.target, free_port()) for _ in range(3))
    p = proxies()
    p.apply([a, b])
    on_a, on_b = connect(a.port), connect(b.port)
    try:
        assert roundtrip(on_a) == roundtrip(on_b) == b"ping"
        p.apply([b, c])
        assert cut_off(on_a) == "reset"  # a removed proxy takes its connections along
        with pytest.raises(ConnectionRefusedError):
            connect(a.port)
        assert roundtrip(on_b, b"untouched") == b"untouched"
        with connect(c.port) as on_c:
            assert roundtrip(on_c) == b"ping"
        listed = [e["listen"] for e in p.status()["proxies"]]
        assert listed == [f"{LOOPBACK}:{b.port}", f"{LOOPBACK}:{c.port}"]
        p.apply([c, b])  # the same set: nothing changes
        assert roundtrip(on_b, b"still untouched") == b"still untouched"
        assert entry(p, b.port)["connections"] == 1
        # A proxy's target changes: the port is reopened at once (SO_REUSEADDR).
        moved = ProxyConfig((LOOPBACK, free_port()), c.port)
        p.apply([b, moved])
        assert entry(p, c.port)["target"] == f"{LOOPBACK}:{moved.target[1]}"
        p.apply([])
        assert p.status()["proxies"] == []
        assert cut_off(on_b) == "reset"
    finally:
        on_a.close()
        on_b.close()


def test_a_taken_port_fails_alone_and_is_retried(proxies: Callable[..., Proxies],
                                                 servers: Callable[..., Server],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    target = servers(echo)
    squatter = socket.socket()
    squatter.bind((LOOPBACK, 0))
    squatter.listen(1)
    taken = ProxyConfig(target.target, squatter.getsockname()[1])
    fine = ProxyConfig(target.target, free_port())
    p = proxies()
    with caplog.at_level(logging.WARNING, logger="ctun.proxy"):
        p.apply([taken, fine])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "Address already in use" in lines[0], lines
    assert "\n" not in lines[0]
    failed = entry(p, taken.port)
    assert failed["state"] == "failed"
    assert "Address already in use; another program uses it" in failed["error"]
    with connect(fine.port) as sock:
        assert roundtrip(sock) == b"ping"
    squatter.close()
    p.apply([taken, fine])  # a reload tries a failed proxy again
    assert entry(p, taken.port)["state"] == "listening"
    with connect(taken.port) as sock:
        assert roundtrip(sock) == b"ping"


def test_two_proxies_on_one_port(proxies: Callable[..., Proxies],
                                 servers: Callable[..., Server]) -> None:
    target = servers(echo)
    port = free_port()
    first, second = ProxyConfig(target.target, port), ProxyConfig((LOOPBACK, 1), port)
    p = proxies()
    p.apply([first, second])
    states = {e["target"]: (e["state"], e["error"]) for e in p.status()["proxies"]}
    assert states[f"{LOOPBACK}:{target.port}"] == ("listening", None)
    assert states[f"{LOOPBACK}:1"][0] == "failed"
    assert "already the proxy to" in str(states[f"{LOOPBACK}:1"][1])


def test_status_says_tcp_and_the_address(proxies: Callable[..., Proxies]) -> None:
    p = proxies()
    assert p.status() == {"protocol": "tcp", "address": LOOPBACK, "interface": None,
                          "active": 0, "max_connections": proxy_module.MAX_CONNECTIONS,
                          "proxies": []}
    assert p._thread is None  # nothing to listen on: no thread either
    port = free_port()
    p.apply([ProxyConfig((LOOPBACK, 9), port)])
    (only,) = p.status()["proxies"]
    assert only["protocol"] == "tcp" and only["listen"] == f"{LOOPBACK}:{port}"


def test_close_ends_everything(proxies: Callable[..., Proxies],
                               servers: Callable[..., Server]) -> None:
    target = servers(echo)
    port = free_port()
    p = proxies()
    p.apply([ProxyConfig(target.target, port)])
    sock = connect(port)
    try:
        assert roundtrip(sock) == b"ping"
        thread = p._thread
        assert thread is not None
        p.close()
        assert not thread.is_alive()
        assert cut_off(sock) == "reset"
        with pytest.raises(ConnectionRefusedError):
            connect(port)
        p.close()  # idempotent
        p.apply([ProxyConfig(target.target, port)])  # after close: ignored
        with pytest.raises(ConnectionRefusedError):
            connect(port)
    finally:
        sock.close()
