"""The TCP transport: framing, backpressure, reconnects and caps on loopback; abuse by an
attacker in its own network namespace while a legitimate client keeps exchanging frames.

Transports are driven the way the engine's network pump drives them: poll fileno(), and call
receive() only when it polls readable. So a timeout can only close a connection if the
transport's own timer makes fileno() readable in time.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pluggy
import pytest
from ctun.core import hookspecs, plugins
from ctun.core.contracts import Endpoint
from ctun.lab import netns
from ctun.plugins import transport_tcp
from ctun.plugins.transport_tcp import TcpTransport

Frame = tuple[bytes, Endpoint]
LOOPBACK = ("127.0.0.1", 0)
LIMIT = 9216  # a 9000-byte MTU plus overhead: what tests of oversize lengths use


# --- helpers ---------------------------------------------------------------------------


class Pump:
    """Engine-style driver: poll the transports' fileno(), receive() only from readable ones."""

    def __init__(self, *transports: TcpTransport, limit: int = 64) -> None:
        self.transports = transports
        self.limit = limit
        self.frames: dict[TcpTransport, list[Frame]] = {t: [] for t in transports}
        self.batches: dict[TcpTransport, list[list[Frame]]] = {t: [] for t in transports}
        self.calls: Counter[TcpTransport] = Counter()

    def _once(self, timeout: float) -> None:
        poller = select.poll()
        by_fd = {}
        for t in self.transports:
            if t.fileno() >= 0:
                poller.register(t.fileno(), select.POLLIN)
                by_fd[t.fileno()] = t
        for fd, _ in poller.poll(max(0.0, timeout) * 1000):
            t = by_fd[fd]
            self.calls[t] += 1
            batch = t.receive(self.limit)
            assert len(batch) <= self.limit
            self.batches[t].append(batch)
            self.frames[t] += batch

    def until(self, done: Callable[[], bool], timeout: float = 5.0, what: str = "it") -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self._once(min(left, 0.05))  # short slices: `done` may watch a raw socket

    def idle_for(self, seconds: float) -> None:
        """Pump for a while; for checking that something does NOT happen."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._once(left)

    def take(self, t: TcpTransport) -> list[Frame]:
        frames, self.frames[t] = self.frames[t], []
        return frames


def frame_of(seq: int, size: int) -> bytes:
    """A recognisable frame: its number, then a pattern derived from it."""
    unit = bytes(range(256))
    turn = seq & 0xFF
    body = (unit[turn:] + unit[:turn]) * (size // 256 + 1)
    return (struct.pack(">Q", seq) + body)[:size]


def wire(*frames: bytes) -> bytes:
    return b"".join(len(f).to_bytes(2, "big") + f for f in frames)


def raw_client(server: TcpTransport, source: str = "127.0.0.1", rcvbuf: int | None = None
               ) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(server.local_endpoint)
    return sock


def state(sock: socket.socket) -> str:
    """'eof', 'reset' or 'open' right now, without blocking; data that arrived is discarded."""
    previous = sock.gettimeout()
    sock.settimeout(0)  # with a timeout set, even MSG_DONTWAIT would wait for data
    try:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return "open"
            except ConnectionResetError:
                return "reset"
            if not data:
                return "eof"
    finally:
        sock.settimeout(previous)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(LOOPBACK)
        return int(s.getsockname()[1])


@pytest.fixture
def server() -> Iterator[TcpTransport]:
    t = TcpTransport(bind=LOOPBACK)
    yield t
    t.close()


def connected_pair(server: TcpTransport) -> tuple[TcpTransport, Endpoint, Pump]:
    """A client that has delivered one frame; returns it, its endpoint at the server, a pump."""
    client = TcpTransport(remote=server.local_endpoint)
    pump = Pump(server, client)
    client.send(b"hello", server.local_endpoint)
    pump.until(lambda: bool(pump.frames[server]), what="the first frame")
    ((frame, endpoint),) = pump.take(server)
    assert frame == b"hello"
    return client, endpoint, pump


# --- registration and basics -----------------------------------------------------------


def test_registers_through_the_hook_and_classmethods_use_defaults() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(transport_tcp)
    assert plugins.transports(pm) == {"tcp": TcpTransport}
    # The 16-bit length's limit: offload super-packets (up to 64 KB) fit.
    assert (TcpTransport.name, TcpTransport.max_frame) == ("tcp", 65535)
    server = TcpTransport.listen(LOOPBACK)
    client = TcpTransport.connect(server.local_endpoint)
    try:
        assert server.local_endpoint[0] == "127.0.0.1" and server.local_endpoint[1] > 0
        # Lazy: a client nobody sends through has no connection (and costs the server none).
        assert client.stats()["connects"] == 0
        with pytest.raises(ValueError, match="exactly one"):
            TcpTransport()
    finally:
        client.close()
        server.close()


def test_round_trip_both_ways_with_the_smallest_and_largest_frames(server: TcpTransport) -> None:
    client, endpoint, pump = connected_pair(server)
    try:
        assert endpoint == client.local_endpoint
        sizes = [1, 2, 100, 1400, TcpTransport.max_frame - 1, TcpTransport.max_frame]
        up = [frame_of(i, n) for i, n in enumerate(sizes)]
        down = [frame_of(100 + i, n) for i, n in enumerate(sizes)]
        for f in up:
            client.send(f, server.local_endpoint)
        for f in down:
            server.send(f, endpoint)  # the endpoint receive() reported
        pump.until(lambda: len(pump.frames[server]) == len(up)
                   and len(pump.frames[client]) == len(down), what="both directions")
        assert pump.take(server) == [(f, endpoint) for f in up]
        assert pump.take(client) == [(f, server.local_endpoint) for f in down]
        assert client.stats()["connects"] == 1
    finally:
        client.close()


def test_many_frames_in_one_write_come_out_whole_and_in_order(server: TcpTransport) -> None:
    sock = raw_client(server)
    with sock:
        frames = [frame_of(i, 1 + i % 50) for i in range(500)]
        sock.sendall(wire(*frames))
        # A small limit leaves complete frames buffered after each receive(): fileno() must
        # stay readable until they are all taken, or the pump would stall here.
        pump = Pump(server, limit=7)
        pump.until(lambda: len(pump.frames[server]) == len(frames), what="500 frames")
        assert [f for f, _ in pump.frames[server]] == frames
        assert {ep for _, ep in pump.frames[server]} == {sock.getsockname()}
        assert all(len(b) <= 7 for b in pump.batches[server])


def test_a_frame_split_across_many_writes_is_reassembled(server: TcpTransport) -> None:
    sock = raw_client(server)
    with sock:
        frame = frame_of(7, 600)
        data = wire(frame)
        pump = Pump(server)
        # The header itself is split too; each piece is pumped on its own.
        pieces = [data[:1], data[1:2]] + [data[i:i + 29] for i in range(2, len(data), 29)]
        for piece in pieces[:-1]:
            sock.sendall(piece)
            pump.idle_for(0.01)
            assert pump.frames[server] == []
        sock.sendall(pieces[-1])
        pump.until(lambda: bool(pump.frames[server]), what="the reassembled frame")
        assert pump.take(server) == [(frame, sock.getsockname())]


def test_a_frame_limit_refuses_bigger_sends_and_caps_at_max_frame() -> None:
    server = TcpTransport(bind=LOOPBACK, frame_limit=LIMIT)
    try:
        assert server.frame_limit == LIMIT
        with pytest.raises(ValueError, match=f"over {LIMIT}"):
            server.send(b"x" * (LIMIT + 1), ("127.0.0.1", 1))
    finally:
        server.close()
    capped = TcpTransport(bind=LOOPBACK, frame_limit=10**6)
    assert capped.frame_limit == TcpTransport.max_frame
    capped.close()


def test_oversized_and_empty_sends_raise_and_the_connection_goes_on(server: TcpTransport) -> None:
    client, endpoint, pump = connected_pair(server)
    try:
        for t, to in ((client, server.local_endpoint), (server, endpoint)):
            with pytest.raises(ValueError, match="over 65535"):
                t.send(b"x" * (TcpTransport.max_frame + 1), to)
            with pytest.raises(ValueError, match="empty"):
                t.send(b"", to)
        client.send(b"still fine", server.local_endpoint)
        pump.until(lambda: bool(pump.frames[server]), what="a frame after the errors")
        assert pump.take(server) == [(b"still fine", endpoint)]
        assert server.stats()["closed_oversize"] == server.stats()["closed_zero_length"] == 0
    finally:
        client.close()


def test_send_to_an_unknown_endpoint_is_dropped_and_counted(server: TcpTransport) -> None:
    server.send(b"nobody", ("127.0.0.1", 9))
    server.send(b"nobody", ("192.0.2.1", 2511))
    assert server.stats()["dropped_no_connection"] == 2


def test_a_client_without_a_server_drops_counts_and_backs_off() -> None:
    remote = ("127.0.0.1", free_port())  # nobody listens there
    client = TcpTransport(remote=remote)
    try:
        pump = Pump(client)
        client.send(b"one", remote)  # starts the connect; queued behind it
        pump.until(lambda: client.stats()["connect_failed"] == 1, what="the refused connect")
        stats = client.stats()
        assert stats["dropped_no_connection"] == 1 and stats["connects"] == 1
        for _ in range(5):  # within the backoff: no new attempt, each frame counted
            client.send(b"more", remote)
        stats = client.stats()
        assert stats["dropped_no_connection"] == 6 and stats["connects"] == 1
        # Someone still wants to send, so the timer brings the retry after the backoff.
        pump.until(lambda: client.stats()["connect_failed"] == 2, what="the retry")
        assert client.stats()["reconnects"] == 1
        assert pump.calls[client] <= 10  # woken by the timer, not spinning
    finally:
        client.close()


def test_backpressure_drops_whole_frames_and_never_blocks() -> None:
    server = TcpTransport(bind=LOOPBACK, send_buffer=64 * 1024)
    sock = raw_client(server, rcvbuf=4096)  # a peer that reads nothing, with a small window
    try:
        sock.sendall(wire(b"hi"))
        pump = Pump(server)
        pump.until(lambda: bool(pump.frames[server]), what="the peer's first frame")
        ((_, endpoint),) = pump.take(server)
        sent, slowest = 0, 0.0
        while server.stats()["dropped_send_full"] < 10:
            assert sent < 20_000, "the buffers never filled up"
            started = time.monotonic()
            server.send(frame_of(sent, 4000), endpoint)
            slowest = max(slowest, time.monotonic() - started)
            sent += 1
        assert slowest < 0.5  # non-blocking: a full peer costs a counter, not a stall
        dropped = server.stats()["dropped_send_full"]
        # Now the peer reads; the server flushes what it kept when the socket is writable.
        # Every frame that was not dropped arrives whole, in order (datagram semantics).
        received = bytearray()
        expected_bytes = (sent - dropped) * (2 + 4000)

        def read_all() -> bool:
            with contextlib.suppress(BlockingIOError):
                while chunk := sock.recv(1 << 20):
                    received.extend(chunk)
            return len(received) >= expected_bytes

        sock.settimeout(0)
        pump.until(read_all, timeout=20, what="the kept frames")
        seqs = []
        for pos in range(0, len(received), 4002):
            assert received[pos:pos + 2] == (4000).to_bytes(2, "big")
            frame = bytes(received[pos + 2:pos + 4002])
            seq = struct.unpack(">Q", frame[:8])[0]
            assert frame == frame_of(seq, 4000)
            seqs.append(seq)
        assert len(seqs) == sent - dropped and seqs == sorted(seqs)
        assert server.stats()["closed_error"] == 0
    finally:
        sock.close()
        server.close()


def test_a_flooding_peer_does_not_starve_another(server: TcpTransport) -> None:
    quiet, flood = raw_client(server), raw_client(server)
    with quiet, flood:
        quiet.sendall(wire(b"quiet"))
        flood.sendall(wire(*[b"flood"] * 2000))
        pump = Pump(server, limit=16)
        pump.until(lambda: len(pump.frames[server]) == 2001, what="all frames")
        position = [f for f, _ in pump.frames[server]].index(b"quiet")
        assert position < 32


def test_client_reconnects_after_the_server_restarts_on_the_same_port() -> None:
    first = TcpTransport(bind=LOOPBACK)
    port = first.local_endpoint[1]
    client, _, pump = connected_pair(first)
    second: TcpTransport | None = None
    try:
        first.close()
        remote = ("127.0.0.1", port)

        def keep_sending(done: Callable[[], bool]) -> Callable[[], bool]:
            # The engine sends a keepalive every second; a frame per slice stands in for it.
            def check() -> bool:
                client.send(b"ping", remote)
                return done()
            return check

        pump = Pump(client)
        pump.until(keep_sending(lambda: client.stats()["connect_failed"] >= 1),
                   what="the client to notice and fail a reconnect")
        assert client.stats()["closed_eof"] == 1
        # The old server's side of the connection sits in TIME_WAIT: SO_REUSEADDR rebinds.
        second = TcpTransport(bind=remote)
        pump = Pump(second, client)
        pump.until(keep_sending(lambda: bool(pump.frames[second])), timeout=10,
                   what="a frame through the new server")
        _, endpoint = pump.frames[second][-1]
        second.send(b"welcome back", endpoint)
        pump.until(lambda: (b"welcome back", remote) in pump.frames[client],
                   what="the answer over the new connection")
        assert client.stats()["reconnects"] >= 2 and client.stats()["connected"] == 2
    finally:
        client.close()
        if second is not None:
            second.close()


def test_close_is_idempotent_and_final(server: TcpTransport) -> None:
    client, endpoint, pump = connected_pair(server)
    peer = raw_client(server)
    pump.until(lambda: server.stats()["accepted"] == 2, what="the raw peer's accept")
    client.close()
    client.close()
    assert client.fileno() == -1 and client.receive() == []
    client.send(b"after close", server.local_endpoint)  # dropped, no exception
    assert client.stats()["dropped_no_connection"] == 1
    pump = Pump(server)
    pump.until(lambda: server.stats()["closed_eof"] == 1, what="the server to see the EOF")
    server.close()
    server.close()
    server.send(b"x", endpoint)
    assert server.receive() == [] and server.fileno() == -1
    with peer:
        peer.settimeout(2)
        assert peer.recv(10) == b""  # closing the server closed its connections


def test_an_idle_transport_does_not_wake_the_pump(server: TcpTransport) -> None:
    client, _, pump = connected_pair(server)
    try:
        pump.calls.clear()
        pump.idle_for(0.3)
        assert pump.calls == Counter()
    finally:
        client.close()


# --- timeouts, violations and caps on loopback -----------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "counter", "timeout"),
    [
        ("silent", "closed_handshake_timeout", 0.4),
        ("half a first frame", "closed_handshake_timeout", 0.4),
        ("half a later frame", "closed_frame_timeout", 0.6),
        ("silent after a frame", "closed_idle", 0.8),
    ],
)
def test_timeouts_close_without_any_traffic(behaviour: str, counter: str, timeout: float
                                            ) -> None:
    server = TcpTransport(bind=LOOPBACK, handshake_timeout=0.4, frame_timeout=0.6,
                          idle_timeout=0.8)
    sock = raw_client(server)
    try:
        pump = Pump(server)
        pump.until(lambda: server.stats()["accepted"] == 1, what="the accept")
        if behaviour in ("half a later frame", "silent after a frame"):
            sock.sendall(wire(b"first"))
            pump.until(lambda: bool(pump.frames[server]), what="the first frame")
        if behaviour.startswith("half"):
            sock.sendall(wire(b"x" * 100)[:50])
        started = time.monotonic()
        pump.calls.clear()
        pump.until(lambda: state(sock) != "open", timeout=timeout + 2, what="the close")
        took = time.monotonic() - started
        stats = server.stats()
        assert stats[counter] == 1, stats
        assert stats["connections"] == 0
        assert took <= timeout + 0.3
        # The timer made fileno() readable: a handful of receive() calls, not a busy loop.
        assert pump.calls[server] <= 5
    finally:
        sock.close()
        server.close()


@pytest.mark.parametrize(
    ("data", "counter"),
    [
        (b"\x00\x00", "closed_zero_length"),
        (wire(b"ok") + b"\x00\x00", "closed_zero_length"),
        (b"\x24\x01" + b"x" * 100, "closed_oversize"),  # 9217: one over the frame limit
        (b"\xff\xff", "closed_oversize"),
        (b"\x00", "closed_truncated"),  # then EOF: half a header
        (b"\x00\x10abc", "closed_truncated"),  # then EOF: half a frame
    ],
)
def test_protocol_violations_close_at_once(data: bytes, counter: str) -> None:
    # A frame limit below what 16 bits can say, so that a length can be over it.
    server = TcpTransport(bind=LOOPBACK, frame_limit=LIMIT)
    sock = raw_client(server)
    try:
        sock.sendall(data)
        if counter == "closed_truncated":
            sock.shutdown(socket.SHUT_WR)
        pump = Pump(server)
        pump.until(lambda: state(sock) != "open", timeout=1, what="the close")
        assert state(sock) == "eof"
        assert server.stats()[counter] == 1
    finally:
        sock.close()
        server.close()


def test_per_source_and_total_caps() -> None:
    server = TcpTransport(bind=LOOPBACK, max_per_source=2, max_connections=3)
    socks: list[socket.socket] = []
    try:
        pump = Pump(server)

        def connect(source: str) -> socket.socket:
            sock = raw_client(server, source)
            socks.append(sock)
            seen = sum(server.stats()[k] for k in ("accepted", "refused_per_source",
                                                   "refused_total"))
            pump.until(lambda: sum(server.stats()[k] for k in (
                "accepted", "refused_per_source", "refused_total")) == seen + 1,
                what="the accept")
            return sock

        a1, a2, a3 = (connect("127.0.0.2") for _ in range(3))
        b1, b2 = connect("127.0.0.3"), connect("127.0.0.3")
        stats = server.stats()
        assert (stats["accepted"], stats["refused_per_source"], stats["refused_total"]) == (
            3, 1, 1)
        pump.until(lambda: state(a3) == "eof" and state(b2) == "eof", timeout=1,
                   what="the refused ones to see EOF")
        for sock in (a1, a2, b1):
            sock.sendall(wire(b"alive"))
        pump.until(lambda: len(pump.frames[server]) == 3, what="frames from the kept ones")
        assert {ep for _, ep in pump.frames[server]} == {s.getsockname() for s in (a1, a2, b1)}
        a1.close()  # frees a slot, for its source and in total
        pump.until(lambda: server.stats()["closed_eof"] == 1, what="the close")
        connect("127.0.0.2")
        assert server.stats()["accepted"] == 4
    finally:
        for sock in socks:
            sock.close()
        server.close()


# --- abuse from another network namespace ----------------------------------------------

PORT = 2511
SERVER_FOR_LEGIT, LEGIT = "10.231.1.1", "10.231.1.2"
SERVER_FOR_ATK, ATK, ATK2 = "10.231.2.1", "10.231.2.2", "10.231.2.3"
INTERVAL = 0.01  # the legitimate client sends a frame this often
_arenas = itertools.count()


class EchoServer:
    """The server's pump thread: every frame goes back to where it came from."""

    def __init__(self, server: TcpTransport) -> None:
        self.server = server
        self.by_source: dict[Endpoint, list[bytes]] = {}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-echo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            poller = select.poll()
            poller.register(self.server.fileno(), select.POLLIN)
            while not self._stop.is_set():
                if not poller.poll(50):
                    continue
                for frame, source in self.server.receive():
                    self.by_source.setdefault(source, []).append(frame)
                    self.server.send(frame, source)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.error is not None:
            raise self.error


@dataclass
class Exchange:
    """The legitimate client's steady traffic, on a thread inside its namespace: a numbered
    frame every INTERVAL, each checked when the server's echo comes back."""

    client: TcpTransport
    ns: str
    remote: Endpoint
    sent: int = 0
    echoed: list[int] = field(default_factory=list)
    corrupt: int = 0
    error: BaseException | None = None
    flowing: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        # Inside the namespace, so a reconnect (there should be none) would dial from there.
        self._thread = threading.Thread(target=netns.call_in, args=(self.ns, self._run),
                                        daemon=True)
        self._thread.start()
        assert self.flowing.wait(5), "the legitimate client's frames do not come back"

    def _run(self) -> None:
        try:
            poller = select.poll()
            poller.register(self.client.fileno(), select.POLLIN)
            next_send = time.monotonic()
            drain_until: float | None = None
            while True:
                now = time.monotonic()
                if not self.stopping.is_set():
                    if now >= next_send:
                        self.client.send(frame_of(self.sent, 8 + self.sent * 37 % 1400),
                                         self.remote)
                        self.sent += 1
                        next_send += INTERVAL
                    wait = max(0.0, next_send - now)
                else:
                    drain_until = drain_until or now + 5
                    if len(self.echoed) >= self.sent or now >= drain_until:
                        return
                    wait = drain_until - now
                if not poller.poll(wait * 1000):
                    continue
                for frame, source in self.client.receive():
                    seq = struct.unpack(">Q", frame[:8])[0]
                    if source != self.remote or frame != frame_of(seq, len(frame)):
                        self.corrupt += 1
                    self.echoed.append(seq)
                    self.flowing.set()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.halt()
        if self.error is not None:
            raise self.error

    def halt(self) -> None:
        self.stopping.set()
        self._thread.join(timeout=10)


@dataclass
class Arena:
    server: TcpTransport
    echo: EchoServer
    client: TcpTransport
    exchange: Exchange
    atk_ns: str

    def attacker(self) -> socket.socket:
        sock: socket.socket = netns.call_in(
            self.atk_ns, socket.create_connection, (SERVER_FOR_ATK, PORT), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def attackers(self, count: int, source: str = ATK) -> list[socket.socket]:
        def make() -> list[socket.socket]:
            return [socket.create_connection((SERVER_FOR_ATK, PORT), timeout=5,
                                             source_address=(source, 0))
                    for _ in range(count)]
        socks: list[socket.socket] = netns.call_in(self.atk_ns, make)
        return socks

    def finish(self) -> None:
        """Stop the legitimate exchange and check that it lost nothing, either way."""
        legit_endpoint = self.client.local_endpoint
        ran = time.monotonic() - self.exchange.started
        self.exchange.stop()
        ex = self.exchange
        assert ex.corrupt == 0
        assert ex.sent >= 0.3 * ran / INTERVAL, (ex.sent, ran)  # it kept going all along
        assert ex.echoed == list(range(ex.sent)), "the legitimate client lost frames"
        got = [struct.unpack(">Q", f[:8])[0] for f in self.echo.by_source[legit_endpoint]]
        assert got == list(range(ex.sent))
        stats = self.client.stats()
        assert (stats["connects"], stats["connected"], stats["reconnects"]) == (1, 1, 0)
        assert sum(v for k, v in stats.items() if k.startswith(("dropped", "closed"))) == 0


def _veth(ns_a: str, if_a: str, ip_a: str, ns_b: str, ip_b: str) -> None:
    # Made inside ns_a, so the names never meet the root namespace's (or a parallel run's).
    netns.run(ns_a, ["ip", "link", "add", if_a, "type", "veth", "peer", "name", "eth0",
                     "netns", ns_b])
    for ns, dev, ip in ((ns_a, if_a, ip_a), (ns_b, "eth0", ip_b)):
        netns.run(ns, ["ip", "addr", "add", f"{ip}/24", "dev", dev])
        netns.run(ns, ["ip", "link", "set", dev, "up"])


@contextlib.contextmanager
def arena(**limits: float) -> Iterator[Arena]:
    """Server, legitimate client and attacker, each in a throwaway namespace; the server
    echoes, the client exchanges frames with it all along."""
    base = f"ctuntcp{os.getpid()}-{next(_arenas)}"
    with contextlib.ExitStack() as stack:
        srv, legit, atk = (stack.enter_context(netns.temporary(f"{base}-{role}"))
                           for role in ("srv", "legit", "atk"))
        _veth(srv, "vlegit", SERVER_FOR_LEGIT, legit, LEGIT)
        _veth(srv, "vatk", SERVER_FOR_ATK, atk, ATK)
        netns.run(atk, ["ip", "addr", "add", f"{ATK2}/24", "dev", "eth0"])  # a 2nd source
        server: TcpTransport = netns.call_in(srv, TcpTransport, bind=("0.0.0.0", PORT),
                                             **limits)
        stack.callback(server.close)
        echo = EchoServer(server)
        stack.callback(echo.stop)
        remote = (SERVER_FOR_LEGIT, PORT)
        client: TcpTransport = netns.call_in(legit, TcpTransport, remote=remote)
        stack.callback(client.close)
        exchange = Exchange(client, legit, remote)
        exchange.start()
        stack.callback(exchange.halt)
        yield Arena(server, echo, client, exchange, atk)


def wait_closed(sock: socket.socket, timeout: float) -> str:
    """'eof' or 'reset' once the server closed the connection, 'open' if not within `timeout`.
    Data the server sends (echoes) is read and discarded."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return "eof"
        except TimeoutError:
            break
        except ConnectionResetError:
            return "reset"
    return "open"


def closed_at_once(socks: list[socket.socket], expected: int, within: float = 1.0
                   ) -> tuple[list[socket.socket], list[socket.socket]]:
    """Wait (up to `within`, far below any timeout) until `expected` of the sockets saw EOF;
    then split them into those closed and those still open at that moment."""
    deadline = time.monotonic() + within
    closed: set[socket.socket] = set()
    while len(closed) < expected and (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([s for s in socks if s not in closed], [], [], left)
        closed.update(s for s in readable if state(s) == "eof")
    return ([s for s in socks if s in closed],
            [s for s in socks if s not in closed and state(s) == "open"])


FAST = {"handshake_timeout": 1.5, "frame_timeout": 2.0, "idle_timeout": 2.5,
        "frame_limit": LIMIT}


@pytest.mark.root
@pytest.mark.parametrize(
    ("data", "counter"),
    [
        (b"\x00\x00", "closed_zero_length"),
        (b"\x24\x01" + b"x" * 100, "closed_oversize"),
        (b"\xff\xff", "closed_oversize"),
        (b"\x00", "closed_truncated"),
    ],
    ids=["zero-length", "one-over-max", "65535", "partial-header-then-eof"],
)
def test_bad_input_from_an_attacker_closes_at_once(data: bytes, counter: str) -> None:
    with arena(**FAST) as a:
        sock = a.attacker()
        with sock:
            started = time.monotonic()
            sock.sendall(data)
            if counter == "closed_truncated":
                sock.shutdown(socket.SHUT_WR)
            assert wait_closed(sock, 1.0) == "eof"  # well before any timeout could fire
            assert time.monotonic() - started < 1.0
        assert a.server.stats()[counter] == 1
        a.finish()


def _one_byte_per_second(sock: socket.socket, limit: float) -> tuple[str, float]:
    """Send a byte, then wait a second for the server to close (the attacker's own pace)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            sock.send(b"\x10")  # a header and body of a 4112-byte frame, byte by byte
        except OSError:
            return "reset", time.monotonic() - started
        outcome = wait_closed(sock, 1.0)
        if outcome != "open":
            return outcome, time.monotonic() - started
    return "open", time.monotonic() - started


@pytest.mark.root
@pytest.mark.parametrize("after_a_frame", [False, True], ids=["from-the-start", "mid-stream"])
def test_one_byte_per_second_is_cut_off(after_a_frame: bool) -> None:
    with arena(**FAST) as a:
        sock = a.attacker()
        with sock:
            if after_a_frame:
                sock.sendall(wire(b"a perfectly good first frame"))
            outcome, took = _one_byte_per_second(sock, 10)
        # A byte still unread when the server closes turns its FIN into a RST: both are closed.
        assert outcome in ("eof", "reset")
        stats = a.server.stats()
        if after_a_frame:
            assert stats["closed_frame_timeout"] == 1
            assert took < FAST["frame_timeout"] + 1.0
        else:
            assert stats["closed_handshake_timeout"] == 1
            assert took < FAST["handshake_timeout"] + 1.0
        a.finish()


@pytest.mark.root
def test_a_silent_attacker_is_closed_after_the_idle_timeout() -> None:
    with arena(**FAST) as a:
        sock = a.attacker()
        with sock:
            sock.sendall(wire(b"hello, then nothing"))
            started = time.monotonic()
            assert wait_closed(sock, FAST["idle_timeout"] + 2) == "eof"
            assert time.monotonic() - started < FAST["idle_timeout"] + 1
        assert a.server.stats()["closed_idle"] == 1
        a.finish()


@pytest.mark.root
def test_a_hundred_connections_from_one_address_leave_only_the_cap() -> None:
    # A long handshake timeout, so the survivors stay until they prove themselves.
    with arena(handshake_timeout=30) as a:
        socks = a.attackers(100)
        try:
            closed, survivors = closed_at_once(socks, 92)
            assert (len(closed), len(survivors)) == (92, 8)
            stats = a.server.stats()
            assert stats["refused_per_source"] == 92 and stats["accepted"] == 1 + 8
            for i, sock in enumerate(survivors):  # still served: each gets its echo
                sock.sendall(wire(b"survivor %d" % i))
            for i, sock in enumerate(survivors):
                sock.settimeout(5)
                assert sock.recv(100) == wire(b"survivor %d" % i)
            # And the cap still holds against a 101st.
            extra = a.attacker()
            with extra:
                assert wait_closed(extra, 1.0) == "eof"
        finally:
            for sock in socks:
                sock.close()
        a.finish()


@pytest.mark.root
def test_everything_at_once() -> None:
    """All the attacks together, concurrently, while the legitimate exchange runs."""
    with arena(**FAST) as a:
        results: dict[str, str] = {}

        def bad(name: str, data: bytes, then_eof: bool = False) -> None:
            with a.attacker() as sock:
                sock.sendall(data)
                if then_eof:
                    sock.shutdown(socket.SHUT_WR)
                results[name] = wait_closed(sock, 1.0)

        def slow() -> None:
            with a.attacker() as sock:
                results["slow"], _ = _one_byte_per_second(sock, 10)

        def many() -> None:
            socks = a.attackers(30, source=ATK2)  # its own per-source cap
            try:
                closed, open_ = closed_at_once(socks, 22)
                results["many"] = f"{len(closed)} eof, {len(open_)} open"
            finally:
                for s in socks:
                    s.close()

        threads = [
            threading.Thread(target=bad, args=("zero", b"\x00\x00")),
            threading.Thread(target=bad, args=("oversize", b"\xff\xff")),
            threading.Thread(target=bad, args=("partial", b"\x00", True)),
            threading.Thread(target=slow),
            threading.Thread(target=many),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert results["zero"] == results["oversize"] == results["partial"] == "eof"
        assert results["slow"] in ("eof", "reset")
        assert results["many"] == "22 eof, 8 open"  # 30 from one address against a cap of 8
        stats = a.server.stats()
        assert stats["closed_zero_length"] == stats["closed_oversize"] == 1
        assert stats["closed_truncated"] == 1 and stats["closed_handshake_timeout"] == 1
        assert stats["refused_per_source"] == 22
        a.finish()
