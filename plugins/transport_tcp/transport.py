"""TCP transport: sealed frames, each behind a 2-byte length, over TCP connections.

The fallback for when UDP is blocked. One epoll holds the listener (or the client's socket),
every connection and a timerfd; its fd is fileno(), so the engine's pump polls one fd and
calls receive(), which does all the work: accept, read and split frames, flush output,
(re)connect, and close connections whose deadline passed. The timerfd is armed for the
earliest deadline, so fileno() polls readable when a deadline passes even if no byte
arrives, and also at once while complete frames are still waiting to be taken (receive()
returns at most `limit`). Nothing blocks, and nothing a peer does raises: it closes that
peer's connection and bumps a counter.
"""

from __future__ import annotations

import errno
import math
import select
import socket
import threading
import time
from collections import Counter

from ...core.contracts import Endpoint, Transport
from .connection import HEADER, Connection, Timeouts
from .timer import Timer

DEFAULT_PORT = 2511  # the UDP transport's number, over TCP
RECV_SIZE = 64 * 1024
ACCEPT_BATCH = 64  # per receive(): a connection flood cannot hold the pump for long
ACCEPT_PAUSE = 1.0  # after EMFILE and friends: the listener stays readable, do not spin on it
SLACK = 1e-3  # a deadline this close counts as passed: the timer never fires a hair early

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
# accept() failures that say "out of resources", not "that one peer went away".
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

COUNTERS = (
    "accepted", "refused_per_source", "refused_total", "accept_errors",
    "closed_eof", "closed_truncated", "closed_zero_length", "closed_oversize",
    "closed_handshake_timeout", "closed_frame_timeout", "closed_idle", "closed_error",
    "connects", "connected", "connect_failed", "closed_connect_timeout", "reconnects",
    "frames_in", "frames_out", "dropped_send_full", "dropped_no_connection",
    "dropped_send_error",
)


class TcpTransport(Transport):
    """Server (`bind`) or client (`remote`) side of the TCP transport.

    Limits, all keyword arguments so tests can shrink them:
      handshake_timeout  server: a new connection's first frame must be complete by then
      frame_timeout      a frame that has started must be complete by then (slow senders)
      idle_timeout       no complete frame for this long closes (keepalives come every 1 s)
      connect_timeout    client: a connect() still pending after this is abandoned
      max_per_source     server: connections from one IP; more are accepted and closed
      max_connections    server: connections in total; likewise
      send_buffer        bytes a connection may hold unsent; a frame that does not fit is
                         dropped (datagram semantics: never block, never grow unbounded)
      backoff_min/max    client: delay before reconnecting, doubling from min up to max
      frame_limit        the largest frame sent or accepted (default and most: max_frame)

    The client connects on demand: the first send() starts a non-blocking connect, and it
    reconnects (after the backoff) only while frames were sent within idle_timeout, so a
    standby transport holds no connection the server would time out. Frames sent during a
    connect wait behind it (within send_buffer) so a handshake is not lost to the connect;
    if it fails they count as dropped_no_connection, as do frames sent while there is no
    connection at all (backing off, or after close()).
    """

    name = "tcp"
    max_frame = 65535  # what the 16-bit length can say: offload super-packets fit

    def __init__(
        self,
        *,
        bind: Endpoint | None = None,
        remote: Endpoint | None = None,
        handshake_timeout: float = 5.0,
        frame_timeout: float = 5.0,
        idle_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_per_source: int = 8,
        max_connections: int = 256,
        send_buffer: int = 256 * 1024,
        backoff_min: float = 0.5,
        backoff_max: float = 5.0,
        frame_limit: int | None = None,
    ) -> None:
        if (bind is None) == (remote is None):
            raise ValueError("give exactly one of bind (server) or remote (client)")
        # Frames above this are refused on send and close the connection on receipt.
        self.frame_limit = self.max_frame if frame_limit is None else \
            min(frame_limit, self.max_frame)
        self._timeouts = Timeouts(handshake_timeout, frame_timeout, idle_timeout,
                                  connect_timeout)
        self._max_per_source = max_per_source
        self._max_connections = max_connections
        self._send_buffer = send_buffer
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        # One lock for all state: send() runs on several engine threads, receive() on one.
        # Held only for non-blocking work, so a sender never waits long.
        self._lock = threading.Lock()
        self._closed = False
        self._counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._conns: dict[int, Connection] = {}  # by fd: what epoll reports
        self._by_peer: dict[Endpoint, Connection] = {}  # server: where send() finds them
        self._per_source: Counter[str] = Counter()
        # Connections with complete frames not yet taken, in round-robin order (a dict is an
        # ordered set): one busy peer cannot starve the others.
        self._ready: dict[Connection, None] = {}
        self._next_check = math.inf  # no connection deadline is earlier than this
        self._armed: float | None = None  # what the timer is set to
        self._listener: socket.socket | None = None
        self._accept_paused_until: float | None = None
        self._remote: Endpoint | None = remote
        self._client: Connection | None = None
        self._backoff = 0.0
        self._next_attempt = 0.0
        self._last_send = -math.inf  # client: reconnect only while someone wants to send
        self._epoll = select.epoll()
        self._timer: Timer | None = None
        try:
            self._timer = Timer()
            self._epoll.register(self._timer.fileno(), _IN)
            if bind is not None:
                self._listener = _listener(bind)
                self._epoll.register(self._listener.fileno(), _IN)
        except BaseException:
            self._release()
            raise

    @classmethod
    def listen(cls, bind: Endpoint) -> TcpTransport:
        return cls(bind=bind)

    @classmethod
    def connect(cls, remote: Endpoint) -> TcpTransport:
        """Connects lazily, on the first send(): a transport kept as a standby costs nothing.
        `remote` should be a literal IP address: a name would be resolved, blocking."""
        return cls(remote=remote)

    # --- contract ----------------------------------------------------------------------

    @property
    def local_endpoint(self) -> Endpoint:
        with self._lock:
            sock = self._listener or (self._client.sock if self._client else None)
            if sock is None or self._closed:
                return ("0.0.0.0", 0)
            try:
                host, port = sock.getsockname()[:2]
            except OSError:
                return ("0.0.0.0", 0)
            return str(host), int(port)

    def fileno(self) -> int:
        return -1 if self._closed else self._epoll.fileno()

    def receive(self, limit: int = 64) -> list[tuple[bytes, Endpoint]]:
        with self._lock:
            if self._closed:
                return []
            now = time.monotonic()
            if self._timer is not None and self._timer.drain():
                self._armed = None  # it fired: whatever comes next must be armed afresh
            for fd, events in self._epoll.poll(0):
                if self._listener is not None and fd == self._listener.fileno():
                    self._accept(now)
                    continue
                conn = self._conns.get(fd)
                if conn is None:
                    continue  # the timer, or a connection closed earlier in this loop
                if conn.connecting:
                    self._finish_connect(conn, now)
                    continue
                if events & _OUT:
                    self._flush(conn, now)
                # A connection whose frames are not all taken yet is not read: that bounds
                # its buffer, and the kernel's window pushes back on the peer.
                if events & _READABLE and not conn.closed and conn.complete == 0:
                    self._read(conn, now)
            frames = self._take(limit)
            if now + SLACK >= self._next_check:
                self._expire(now)
            self._maybe_dial(now)
            self._arm(now)
            return frames

    def send(self, frame: bytes, to: Endpoint) -> None:
        """Server: to the connection whose peer is `to`. Client: to the remote (`to` is
        ignored, as a connected UDP socket does)."""
        size = len(frame)
        if size > self.frame_limit:
            raise ValueError(f"frame of {size} bytes is over {self.frame_limit}")
        if size == 0:
            # On the wire a zero length is a protocol violation the far end closes on.
            raise ValueError("an empty frame cannot be sent over TCP")
        with self._lock:
            if self._closed:
                self._counters["dropped_no_connection"] += 1
                return
            now = time.monotonic()
            if self._remote is None:
                conn = self._by_peer.get(to)
            else:
                self._last_send = now
                if self._client is None:
                    self._maybe_dial(now)
                    self._arm(now)
                conn = self._client
            if conn is None or conn.closed:
                self._counters["dropped_no_connection"] += 1
                return
            header = size.to_bytes(HEADER, "big")
            if conn.out or conn.connecting:
                # Order matters: behind bytes already waiting, or until the connect is done.
                if len(conn.out) + HEADER + size > self._send_buffer:
                    self._counters["dropped_send_full"] += 1
                    return
                conn.out += header
                conn.out += frame
                if conn.connecting:
                    conn.queued += 1
                self._counters["frames_out"] += 1
                return
            try:
                sent = conn.sock.sendmsg([header, frame])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._counters["dropped_send_error"] += 1
                self._drop(conn, "closed_error", now)
                self._arm(now)
                return
            self._counters["frames_out"] += 1
            if sent < HEADER + size:
                # The rest of this frame must go before anything else: keep it, whatever
                # the limit (it is at most one frame), and wait for EPOLLOUT.
                conn.out += (header + frame)[sent:]
                self._want_write(conn, True)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for conn in list(self._conns.values()):
                conn.sock.close()
            self._conns.clear()
            self._by_peer.clear()
            self._per_source.clear()
            self._ready.clear()
            self._client = None
            self._release()

    def stats(self) -> dict[str, int]:
        with self._lock:
            result = dict(self._counters)
            result["connections"] = len(self._conns)
            return result

    # --- server side -------------------------------------------------------------------

    def _accept(self, now: float) -> None:
        assert self._listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._counters["accept_errors"] += 1
                if exc.errno in _RESOURCE_ERRORS:
                    # Level-triggered: left registered, the listener would spin the pump.
                    self._epoll.unregister(self._listener.fileno())
                    self._accept_paused_until = now + ACCEPT_PAUSE
                    self._next_check = min(self._next_check, self._accept_paused_until)
                    return
                continue  # that peer gave up before we got to it (ECONNABORTED, ...)
            peer = (str(addr[0]), int(addr[1]))
            # Over a cap: accepted and closed at once, so the peer learns (EOF) rather
            # than hanging in the backlog, and the cap costs no descriptor.
            if self._per_source[peer[0]] >= self._max_per_source:
                self._counters["refused_per_source"] += 1
                sock.close()
                continue
            if len(self._conns) >= self._max_connections:
                self._counters["refused_total"] += 1
                sock.close()
                continue
            try:
                _tune(sock)
            except OSError:  # reset already: nothing to keep
                self._counters["accept_errors"] += 1
                sock.close()
                continue
            conn = Connection(sock, peer, now, self.frame_limit)
            self._add(conn, _IN)
            self._by_peer[peer] = conn
            self._per_source[peer[0]] += 1
            self._counters["accepted"] += 1

    # --- client side -------------------------------------------------------------------

    def _maybe_dial(self, now: float) -> None:
        """Client: start a connection if none exists, the backoff allows it, and a frame was
        sent recently (a standby transport, or one left idle, stays unconnected)."""
        if (self._remote is None or self._client is not None or now < self._next_attempt
                or now - self._last_send > self._timeouts.idle):
            return
        remote = self._remote
        first = self._counters["connects"] == 0
        self._counters["connects"] += 1
        if not first:
            self._counters["reconnects"] += 1
        try:
            sock = socket.socket(_family(remote[0]), socket.SOCK_STREAM)
        except OSError:
            self._counters["connect_failed"] += 1
            self._schedule_retry(now)
            return
        try:
            _tune(sock)
            err = sock.connect_ex(remote)
        except OSError as exc:  # e.g. an unresolvable name
            err = exc.errno or errno.EINVAL
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._counters["connect_failed"] += 1
            self._schedule_retry(now)
            return
        conn = Connection(sock, remote, now, self.frame_limit, connecting=True)
        self._client = conn
        # EPOLLOUT reports the end of a non-blocking connect, whichever way it went.
        self._add(conn, _IN | _OUT)
        conn.writing = True
        if err == 0:
            self._finish_connect(conn, now)

    def _finish_connect(self, conn: Connection, now: float) -> None:
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._drop(conn, "connect_failed", now)
            return
        conn.connecting = False
        conn.opened = now  # the idle timeout counts from here, not from the SYN
        conn.queued = 0
        self._counters["connected"] += 1
        if conn.out:
            self._flush(conn, now)
        else:
            self._want_write(conn, False)

    def _schedule_retry(self, now: float) -> None:
        self._backoff = min(self._backoff_max, max(self._backoff_min, self._backoff * 2))
        self._next_attempt = now + self._backoff

    # --- both sides --------------------------------------------------------------------

    def _add(self, conn: Connection, events: int) -> None:
        self._conns[conn.fd] = conn
        self._epoll.register(conn.fd, events)
        first_deadline, _ = conn.deadline_reason(self._timeouts, self._is_server)
        self._next_check = min(self._next_check, first_deadline)

    @property
    def _is_server(self) -> bool:
        return self._listener is not None

    def _read(self, conn: Connection, now: float) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset, or a pending error after EPOLLERR
            self._drop(conn, "closed_error", now)
            return
        if not data:
            # Only read once every complete frame was taken, so nothing whole is lost here.
            self._drop(conn, "closed_truncated" if conn.mid_frame else "closed_eof", now)
            return
        had_frame = conn.last_frame is not None
        violation = conn.feed(data, now)
        if violation is not None:
            self._drop(conn, violation, now)
            return
        if conn.complete:
            self._ready[conn] = None
            if conn is self._client and not had_frame:
                self._backoff = 0.0  # this host answers: the next failure retries quickly
        if conn.partial_since is not None:
            self._next_check = min(self._next_check, conn.partial_since + self._timeouts.frame)

    def _take(self, limit: int) -> list[tuple[bytes, Endpoint]]:
        frames: list[tuple[bytes, Endpoint]] = []
        while self._ready and len(frames) < limit:
            for conn in list(self._ready):
                frames.append((conn.pop(), conn.peer))
                if conn.complete == 0:
                    del self._ready[conn]
                elif len(self._ready) > 1:
                    # Round robin: to the back of the queue behind the others.
                    del self._ready[conn]
                    self._ready[conn] = None
                if len(frames) >= limit:
                    break
        self._counters["frames_in"] += len(frames)
        return frames

    def _flush(self, conn: Connection, now: float) -> None:
        if conn.closed or not conn.out:
            if not conn.closed:
                self._want_write(conn, False)
            return
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn, "closed_error", now)
            return
        del conn.out[:sent]
        if not conn.out:
            self._want_write(conn, False)

    def _want_write(self, conn: Connection, wanted: bool) -> None:
        # EPOLLOUT only while something waits: level-triggered, it would otherwise keep
        # fileno() readable all the time and spin the pump.
        if conn.writing != wanted and not conn.closed:
            self._epoll.modify(conn.fd, (_IN | _OUT) if wanted else _IN)
            conn.writing = wanted

    def _expire(self, now: float) -> None:
        """Close every connection whose deadline passed; work out the next deadline."""
        if self._accept_paused_until is not None and now + SLACK >= self._accept_paused_until:
            assert self._listener is not None
            self._accept_paused_until = None
            self._epoll.register(self._listener.fileno(), _IN)
        next_check = self._accept_paused_until or math.inf
        for conn in list(self._conns.values()):
            deadline, reason = conn.deadline_reason(self._timeouts, self._is_server)
            if conn.complete:
                # Frames we have not taken yet: the delay is ours, not the peer's. Checked
                # again once they are taken (the timer is armed at once meanwhile).
                next_check = min(next_check, deadline)
                continue
            if now + SLACK >= deadline:
                self._drop(conn, reason, now)
            else:
                next_check = min(next_check, deadline)
        self._next_check = next_check

    def _drop(self, conn: Connection, reason: str, now: float) -> None:
        """Close a connection at once, count why, and forget frames it had not delivered."""
        if conn.closed:
            return
        conn.closed = True
        self._counters[reason] += 1
        self._conns.pop(conn.fd, None)
        self._epoll.unregister(conn.fd)  # before close(): the fd number may be reused
        conn.sock.close()
        conn.out.clear()
        if self._by_peer.get(conn.peer) is conn:
            del self._by_peer[conn.peer]
            self._per_source[conn.peer[0]] -= 1
            if self._per_source[conn.peer[0]] <= 0:
                del self._per_source[conn.peer[0]]
        self._ready.pop(conn, None)
        if conn is self._client:
            self._client = None
            # Frames queued behind a connect that never completed did not go either.
            self._counters["dropped_no_connection"] += conn.queued
            conn.queued = 0
            self._schedule_retry(now)

    def _arm(self, now: float) -> None:
        if self._ready:
            target: float | None = now  # frames are waiting: fileno() must stay readable
        else:
            target = self._next_check
            if (self._remote is not None and self._client is None
                    and now - self._last_send <= self._timeouts.idle):
                target = min(target, self._next_attempt)
            if math.isinf(target):
                target = None
        if target != self._armed and self._timer is not None:
            self._timer.set(target)
            self._armed = target

    def _release(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._timer is not None:
            self._timer.close()
        self._epoll.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    # Each frame is a whole packet of the tunnel: Nagle would only add latency.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _listener(bind: Endpoint) -> socket.socket:
    sock = socket.socket(_family(bind[0]), socket.SOCK_STREAM)
    try:
        # A restarted daemon must get its port back while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(bind)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
