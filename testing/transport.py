"""The transport conformance suite: the rules of `Transport` as tests any transport must pass.

Subclass `TransportConformance` in a test module (its name starts with "Test" so pytest
collects it) and set `transport_class`; every test method here then runs against it:

    class TestPadded(TransportConformance):
        transport_class = PaddedUdpTransport

What the suite assumes, and no more than the contract says:

* Frames may arrive in any order: sets of frames are compared as multisets.
* Waiting is done as the engine's loop does it: poll `fileno()` with a deadline and call
  `receive()` when it polls readable, servicing the other end of the pair meanwhile (a
  transport may need its `receive()` called to finish a connect or flush a buffer). Only the
  tests about `receive()` itself call it unpolled: that it does not block, that it does not
  raise once a peer went away, that it returns [] after close(). A transport whose descriptor
  stays readable while `receive()` keeps returning nothing fails: the engine would spin.
* Loopback is lossless for the modest numbers used here, except that frames sent from
  several threads at once may be missing when, and only when, the sending transport's
  `stats()` counted as many failed sends (see `drop_counters`).

Every wait is bounded (`wait_seconds`), so a broken transport fails instead of hanging, and a
working one passes the whole suite in a second or two.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import pytest

from ..core.contracts import Endpoint, Transport

Frames = list[tuple[bytes, Endpoint]]
Pair = tuple[Transport, Transport]

# What ctun's config accepts as a transport name (core/config.py): anything else could be
# registered but never selected.
NAME_RE = re.compile(r"[a-z][a-z0-9_-]*")
# Large enough to need more than one Ethernet MTU (and more than one padding bucket), small
# enough for any transport's buffers; transports with a smaller max_frame use theirs.
LARGE_FRAME = 9216
MANY = 200
THREADS = 4
PER_THREAD = 25
# How long to keep listening once all expected frames are in, to see duplicates arrive.
LATE = 0.05
# Poll wakeups with nothing received, in one wait, after which the transport is judged to
# spin; a stream transport legitimately has a few (accepts, partial frames), never hundreds.
SPIN_LIMIT = 200


class TransportConformance:
    """Base class of a transport's conformance tests; set `transport_class` in a subclass."""

    transport_class: ClassVar[type[Transport]]
    """The transport under test (required)."""

    listen_endpoint: ClassVar[Endpoint] = ("127.0.0.1", 0)
    """Where the server side listens; port 0 takes a free port."""

    raw_socket_type: ClassVar[int] = socket.SOCK_DGRAM
    """The kind of plain socket that can reach the listening endpoint, for the junk test:
    socket.SOCK_DGRAM for UDP-based transports, socket.SOCK_STREAM for TCP-based ones."""

    drop_counters: ClassVar[tuple[str, ...] | None] = None
    """The sender's stats() keys that count frames it dropped. None: every key containing
    "drop", "error", "fail" or "lost"."""

    wait_seconds: ClassVar[float] = 2.0
    """How long to wait for something that should happen (only failures wait this long)."""

    # ---- hooks for subclasses

    def make_pair(self) -> Pair:
        """A connected (server, client): the server from listen(listen_endpoint), the client
        from connect() to the server's endpoint. Override for transports that need more; the
        suite closes both after each test."""
        server = self.transport_class.listen(self.listen_endpoint)
        try:
            client = self.transport_class.connect(reachable(server.local_endpoint))
        except BaseException:
            server.close()
            raise
        return server, client

    @pytest.fixture
    def transport_pair(self) -> Iterator[Pair]:
        server, client = self.make_pair()
        try:
            yield server, client
        finally:
            client.close()
            server.close()

    # ---- identity

    def test_name_is_a_lowercase_word(self) -> None:
        name = self.transport_class.name
        assert isinstance(name, str) and name, f"name must be a non-empty string: {name!r}"
        # It is typed on command lines (--transport NAME) and in config files.
        assert NAME_RE.fullmatch(name), (
            f"name must be lowercase: a letter, then letters, digits, '_' or '-': {name!r}")
        max_frame = self.transport_class.max_frame
        assert isinstance(max_frame, int) and max_frame > 0, f"max_frame: {max_frame!r}"

    def test_local_endpoint_is_host_and_port(self, transport_pair: Pair) -> None:
        for transport in transport_pair:
            assert_endpoint(transport.local_endpoint, "local_endpoint")
        if self.listen_endpoint[1] == 0:
            assert transport_pair[0].local_endpoint[1] > 0, "listen on port 0 picks a port"

    def test_fileno_stays_the_same(self, transport_pair: Pair) -> None:
        # The engine registers fileno() in its poller once, when it starts.
        server, client = transport_pair
        before = server.fileno(), client.fileno()
        sender = self._send_and_expect(client, server, b"ping")
        self._send_and_expect(server, client, b"pong", to=sender)
        assert (server.fileno(), client.fileno()) == before, "fileno() changed with traffic"

    def test_stats_are_counters(self, transport_pair: Pair) -> None:
        for transport in transport_pair:
            stats = transport.stats()
            assert isinstance(stats, dict)
            assert all(isinstance(k, str) and isinstance(v, int) for k, v in stats.items()), (
                f"stats() must map names to ints: {stats!r}")

    # ---- moving frames

    def test_round_trip_both_ways(self, transport_pair: Pair) -> None:
        server, client = transport_pair
        sender = self._send_and_expect(client, server, b"ping")
        # The server answers to the endpoint receive() reported, as the engine does.
        self._send_and_expect(server, client, b"pong", to=sender)

    def test_smallest_and_largest_frames_arrive_intact(self, transport_pair: Pair) -> None:
        server, client = transport_pair
        largest = min(self.transport_class.max_frame, LARGE_FRAME)
        for size in (1, largest):
            frame = os.urandom(size)
            sender = self._send_and_expect(client, server, frame)
            self._send_and_expect(server, client, frame[::-1], to=sender)

    def test_frame_over_max_frame_is_a_value_error(self, transport_pair: Pair) -> None:
        server, client = transport_pair
        max_frame = self.transport_class.max_frame
        # Exactly max_frame is allowed (whether it arrives is the network's business).
        client.send(bytes(max_frame), self._server_endpoint(server))
        try:
            client.send(bytes(max_frame + 1), self._server_endpoint(server))
        except ValueError:
            return
        pytest.fail(f"send() of max_frame + 1 = {max_frame + 1} bytes must raise ValueError")

    def test_many_frames_arrive_complete_and_once(self, transport_pair: Pair) -> None:
        server, client = transport_pair
        sent = [b"%03d|" % i + os.urandom(i % 50) for i in range(MANY)]
        received: Frames = []
        to = self._server_endpoint(server)
        for i, frame in enumerate(sent):
            client.send(frame, to)
            if i % 25 == 24:
                # Drain as the engine would, so a datagram socket's buffer never overflows.
                received += self.collect(server, MANY, timeout=0, pump=[client])
        received += self.collect(server, MANY - len(received), pump=[client])
        received += self.collect(server, MANY, timeout=LATE, pump=[client])  # any extras
        assert_same_frames(sent, [data for data, _ in received])

    def test_receive_does_not_block_and_fileno_polls_readable(
        self, transport_pair: Pair
    ) -> None:
        server, client = transport_pair
        for transport in (server, client):
            frames = self._call_bounded(transport.receive, "receive() with nothing sent")
            assert isinstance(frames, list)
        client.send(b"wake", self._server_endpoint(server))
        assert self.wait_readable(server, pump=[client]), (
            f"fileno() did not poll readable within {self.wait_seconds} s of a frame sent")
        assert [data for data, _ in self.collect(server, 1, pump=[client])] == [b"wake"]
        # receive(limit) returns at most `limit` frames, whatever is waiting.
        for i in range(5):
            client.send(b"%d" % i, self._server_endpoint(server))
        got = self.collect(server, 5, limit=2, pump=[client])
        assert sorted(data for data, _ in got) == [b"0", b"1", b"2", b"3", b"4"]

    def test_sends_from_several_threads_lose_nothing(self, transport_pair: Pair) -> None:
        server, client = transport_pair
        to = self._server_endpoint(server)
        self._send_and_expect(client, server, b"hello")  # any connection setup is done
        before = self._dropped(client)
        start = threading.Barrier(THREADS)
        failures: list[BaseException] = []

        def sender(thread: int) -> None:
            try:
                start.wait()
                for i in range(PER_THREAD):
                    client.send(b"t%d-%02d|" % (thread, i) + bytes(i), to)
            except BaseException as exc:  # reported by the main thread, not lost in this one
                failures.append(exc)

        threads = [threading.Thread(target=sender, args=(t,)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        expected = [b"t%d-%02d|" % (t, i) + bytes(i) for t in range(THREADS)
                    for i in range(PER_THREAD)]
        received = self.collect(server, len(expected), pump=[client])
        received += self.collect(server, len(expected), timeout=LATE, pump=[client])
        for thread in threads:
            thread.join(self.wait_seconds)
        assert not failures, f"send() raised in a thread: {failures[0]!r}"
        assert not any(thread.is_alive() for thread in threads), "send() blocked"
        dropped = self._dropped(client) - before
        # Datagrams may be dropped under load, but never silently: the sender counts them.
        assert_same_frames(expected, [d for d, _ in received], allowed_missing=dropped)

    # ---- closing

    def test_close_is_idempotent_and_final(self, transport_pair: Pair) -> None:
        server, client = transport_pair
        to = self._server_endpoint(server)
        sender = self._send_and_expect(client, server, b"before")
        client.send(b"unread", to)  # waiting in the server when it closes
        self.wait_readable(server, pump=[client])
        for transport, peer in ((server, sender), (client, to)):
            transport.close()
            with _must_not_raise("a second close() (close() is idempotent)"):
                transport.close()
            with _must_not_raise("send() after close() (it drops the frame)"):
                transport.send(b"after close", peer)
            with _must_not_raise("receive() after close()"):
                frames = transport.receive()
            assert frames == [], f"receive() after close() must return [], not {len(frames)}"

    def test_one_end_closing_does_not_break_the_other(self, transport_pair: Pair) -> None:
        server, client = transport_pair
        to = self._server_endpoint(server)
        self._send_and_expect(client, server, b"hello")
        server.close()
        for i in range(5):
            with _must_not_raise("the client's send() after the server closed"):
                client.send(b"anyone? %d" % i, to)
            # Time for an ICMP "port unreachable" (or a TCP reset) to come back: the next
            # send() or receive() is where it would surface.
            time.sleep(0.02)
            with _must_not_raise("the client's receive() after the server closed"):
                client.receive()
        server2, client2 = self.make_pair()
        try:
            sender = self._send_and_expect(client2, server2, b"hello")
            client2.close()
            for i in range(5):
                with _must_not_raise("the server's send() after the client closed"):
                    server2.send(b"still there? %d" % i, sender)
                time.sleep(0.02)
                with _must_not_raise("the server's receive() after the client closed"):
                    server2.receive()
        finally:
            client2.close()
            server2.close()

    # ---- bad input

    def test_junk_at_the_listening_endpoint_is_survived(self, transport_pair: Pair) -> None:
        server, client = transport_pair
        target = self._server_endpoint(server)
        with contextlib.ExitStack() as open_sockets:
            if self.raw_socket_type == socket.SOCK_STREAM:
                send_stream_junk(target, open_sockets)
            else:
                send_datagram_junk(target)
            # Whatever the junk did, receive() keeps answering (junk may even come out as
            # frames: telling junk from frames is the tunnel's job, not the transport's).
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:
                self.collect(server, 1, timeout=deadline - time.monotonic(), what="junk",
                             pump=[client])
            # A legitimate exchange still works, junk connections still open or not.
            sender = self._send_and_expect(client, server, b"legit", skip_others=True)
            self._send_and_expect(server, client, b"legit reply", to=sender)

    # ---- helpers (public ones are meant for subclasses' own tests too)

    def collect(self, transport: Transport, count: int, timeout: float | None = None,
                limit: int = 64, what: str = "frames", pump: Sequence[Transport] = ()
                ) -> Frames:
        """Receive from `transport` until `count` frames arrived or `timeout` (default
        wait_seconds) passed, polling its fileno() and calling receive(limit) only when it
        polls readable.

        The transports in `pump` are serviced meanwhile, as the engine's loop services every
        transport it has: a transport may need its receive() called to make progress (finish
        a connect, flush a send buffer). What they receive is kept for their next collect().
        """
        deadline = time.monotonic() + (self.wait_seconds if timeout is None else timeout)
        frames = self._stash.pop(id(transport), [])
        empty_wakeups = 0
        polled = False
        while len(frames) < count:
            # Poll at least once, even with no time left: timeout=0 takes what is ready now.
            if polled and time.monotonic() >= deadline:
                break
            polled = True
            ready = self._poll([transport, *pump], deadline)
            if not ready:
                break
            received = False
            for each in ready:
                batch = self._receive(each, limit, what)
                if each is transport:
                    frames += batch
                else:
                    self._stash.setdefault(id(each), []).extend(batch)
                received = received or bool(batch)
            empty_wakeups = 0 if received else empty_wakeups + 1
            assert empty_wakeups < SPIN_LIMIT, (
                f"fileno() polled readable {SPIN_LIMIT} times in a row while receive() returned "
                "nothing: the engine's loop would spin")
        return frames

    def wait_readable(self, transport: Transport, timeout: float | None = None,
                      pump: Sequence[Transport] = ()) -> bool:
        """Wait until transport.fileno() polls readable (without receiving from it), servicing
        the transports in `pump` as collect() does; False after `timeout`."""
        deadline = time.monotonic() + (self.wait_seconds if timeout is None else timeout)
        while True:
            ready = self._poll([transport, *pump], deadline)
            if transport in ready:
                return True
            if not ready or time.monotonic() >= deadline:
                return False
            for each in ready:
                self._stash.setdefault(id(each), []).extend(self._receive(each, 64, "frames"))

    @property
    def _stash(self) -> dict[int, Frames]:
        """Frames a pumped transport received while another one was being waited for."""
        stash: dict[int, Frames] = self.__dict__.setdefault("_stashed_frames", {})
        return stash

    @staticmethod
    def _poll(transports: Sequence[Transport], deadline: float) -> list[Transport]:
        """The transports whose fileno() polls readable by `deadline` (at once if it passed);
        [] if none did."""
        poller = select.poll()
        by_fd: dict[int, Transport] = {}
        for transport in transports:
            fd = transport.fileno()
            if fd >= 0:  # a closed transport may answer -1: nothing to poll
                poller.register(fd, select.POLLIN)
                by_fd[fd] = transport
        if not by_fd:
            return []
        timeout_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
        return [by_fd[fd] for fd, _ in poller.poll(timeout_ms)]

    @staticmethod
    def _receive(transport: Transport, limit: int, what: str) -> Frames:
        try:
            batch = transport.receive(limit)
        except Exception as exc:
            pytest.fail(f"receive() raised while waiting for {what}: {exc!r}")
        assert len(batch) <= limit, f"receive({limit}) returned {len(batch)} frames"
        for data, sender in batch:
            assert isinstance(data, bytes), f"a frame is {type(data).__name__}, not bytes"
            assert_endpoint(sender, "a sender from receive()")
        return batch

    def _send_and_expect(self, src: Transport, dst: Transport, frame: bytes,
                         to: Endpoint | None = None, skip_others: bool = False) -> Endpoint:
        """Send `frame` from src to dst and check it arrives intact; return its sender as dst
        reported it. With skip_others, other frames arriving first are ignored."""
        src.send(frame, to if to is not None else self._server_endpoint(dst))
        deadline = time.monotonic() + self.wait_seconds
        while True:
            got = self.collect(dst, 1, timeout=deadline - time.monotonic(), pump=[src])
            if not got:
                pytest.fail(f"a {len(frame)}-byte frame did not arrive in {self.wait_seconds} s")
            for data, sender in got:
                if data == frame:
                    return sender
            if not skip_others:
                summary = [f"{len(d)} bytes" for d, _ in got]
                pytest.fail(f"expected one {len(frame)}-byte frame, got {summary}")

    def _server_endpoint(self, transport: Transport) -> Endpoint:
        return reachable(transport.local_endpoint)

    def _dropped(self, transport: Transport) -> int:
        stats = transport.stats()
        if self.drop_counters is not None:
            return sum(stats.get(key, 0) for key in self.drop_counters)
        words = ("drop", "error", "fail", "lost")
        return sum(v for k, v in stats.items() if any(w in k.lower() for w in words))

    def _call_bounded(self, call: Callable[[], Frames], what: str) -> Frames:
        """call() in a helper thread: a blocking receive() fails the test instead of hanging
        it (the thread is released when the fixture closes the transport)."""
        result: list[Frames] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                result.append(call())
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(1.0)
        assert not thread.is_alive(), f"{what} blocked for more than 1 s"
        if errors:
            raise errors[0]
        return result[0]


@contextlib.contextmanager
def _must_not_raise(what: str) -> Iterator[None]:
    """Turn an exception into a failure that says which rule it broke."""
    try:
        yield
    except Exception as exc:
        pytest.fail(f"{what} raised {exc!r}")


def reachable(endpoint: Endpoint) -> Endpoint:
    """Where to send to reach a transport listening on `endpoint` from this machine."""
    host, port = endpoint
    # A wildcard bind is reachable through loopback.
    return ("127.0.0.1" if host in ("0.0.0.0", "") else host), port


def assert_endpoint(endpoint: object, what: str) -> None:
    assert isinstance(endpoint, tuple) and len(endpoint) == 2, f"{what}: {endpoint!r}"
    host, port = endpoint
    assert isinstance(host, str) and isinstance(port, int), (
        f"{what} must be (str host, int port): {endpoint!r}")


def assert_same_frames(sent: list[bytes], received: list[bytes], allowed_missing: int = 0
                       ) -> None:
    """Compare as multisets: order is free, but nothing extra, nothing twice, nothing lost
    (beyond `allowed_missing`)."""
    missing = Counter(sent) - Counter(received)
    extra = Counter(received) - Counter(sent)
    problems = []
    if extra:
        duplicates = sum(n for frame, n in extra.items() if frame in sent)
        problems.append(f"{duplicates} duplicated and {sum(extra.values()) - duplicates} "
                        "unexpected (corrupt?) frames")
    if sum(missing.values()) > allowed_missing:
        problems.append(f"{sum(missing.values())} of {len(sent)} frames missing "
                        f"({allowed_missing} counted as dropped by the sender)")
    assert not problems, "; ".join(problems)


def send_datagram_junk(target: Endpoint) -> None:
    """Datagrams no transport could have sent: empty, tiny, random, and large random."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for junk in (b"", b"\x00", b"\xff\xff", b"\xff" * 3, os.urandom(7), os.urandom(600),
                     os.urandom(1400), os.urandom(LARGE_FRAME)):
            with contextlib.suppress(OSError):  # the kernel may refuse one; others still go
                sock.sendto(junk, target)


def send_stream_junk(target: Endpoint, keep_open: contextlib.ExitStack) -> None:
    """Connections no transport could have made: random bytes, a huge length prefix, an
    immediate close, and one that stops in the middle and stays open (`keep_open` owns it)."""
    for junk in (os.urandom(1000), b"\xff\xff\xff\xff" + os.urandom(64), b"", b"\x00"):
        sock = keep_open.enter_context(socket.create_connection(target, timeout=2))
        with contextlib.suppress(OSError):  # the transport may hang up on us: that is fine
            sock.sendall(junk)
        if junk != b"\x00":
            sock.close()
