"""`proxy`: host services listening on 127.0.0.1, reachable from containers at the host's
tunnel address.

docker-connector's `proxy [IP:]PORT[:PORT]`: a container connects to the host's end of the
tunnel (e.g. 192.168.251.2) at the second PORT, and talks to the service at IP:PORT on the
host. TCP only: UDP services are not relayed.

The listeners sit on the tunnel address only, never 0.0.0.0, and on Linux and macOS they are
also tied to the tunnel interface: those kernels accept packets for any local address on any
interface, so a LAN machine that routes the tunnel network via the host would otherwise reach
the host-local services too. (Windows' strong host model already refuses that.)

One thread relays every connection with a selector. Each direction of a connection holds at
most BUFFER_LIMIT bytes: when the receiving side does not keep up, the sending side is no
longer read, so TCP's own flow control slows the sender down (backpressure, bounded memory).
A FIN is passed on as a FIN (shutdown of the write side) once the buffered bytes have gone,
so half-closed protocols work; errors, timeouts and removed proxies reset both sides.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import logging
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, TypeVar

from .config import HostConfig, ProxyConfig
from .contracts import Endpoint
from .host_context import HostContext

log = logging.getLogger("ctun.proxy")

MAX_CONNECTIONS = 256  # relayed at once, all proxies together (two descriptors each)
BUFFER_LIMIT = 64 * 1024  # bytes held per direction of a connection; beyond it, stop reading
CONNECT_TIMEOUT = 5.0  # the target must accept within this, or the container is reset
IDLE_TIMEOUT = 1800.0  # no byte either way for this long: reset (gives a vanished peer's slot back)
BACKLOG = 128
ACCEPT_BATCH = 32  # accepts per readiness event: one busy listener must not starve the rest
PAUSE_ON_EXHAUSTION = 1.0  # out of descriptors/memory: stop accepting a while, do not spin
CALL_TIMEOUT = 10.0  # apply/status/close wait this long for the relay thread
TICK = 1.0  # the longest the relay thread sleeps without looking at its timers
PROTOCOL = "tcp"

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_CONNECTING = frozenset({0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK})
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_IP_BOUND_IF = 25  # macOS <netinet/in.h>; Python has no constant for it
T = TypeVar("T")


@dataclass
class _Stats:
    connections: int = 0  # accepted and relayed (a connection to the target was tried)
    rejected: int = 0  # over the cap: accepted and closed at once
    failed: int = 0  # the target refused, or did not answer within the connect timeout
    idle_closed: int = 0
    bytes_to_target: int = 0
    bytes_from_target: int = 0
    last_error: str | None = None


class _Pipe:
    """One direction of a connection: bytes read from `src`, waiting to be written to `dst`."""

    __slots__ = ("buffer", "dst", "eof", "shut", "src")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.buffer = bytearray()
        self.eof = False  # src sent its FIN
        self.shut = False  # ... and dst got it: its write side is shut down

    def wants_read(self) -> bool:
        return not self.eof and len(self.buffer) < BUFFER_LIMIT


class _Listener:
    def __init__(self, proxy: ProxyConfig, listen: Endpoint) -> None:
        self.proxy = proxy
        self.listen = listen
        self.sock: socket.socket | None = None
        self.error: str | None = None  # why it does not listen
        self.paused_until = 0.0
        self.connections: set[_Connection] = set()
        self.stats = _Stats()

    @property
    def name(self) -> str:
        return f"{_show(self.listen)} -> {_show(self.proxy.target)}"

    def status(self) -> dict[str, Any]:
        state = "failed" if self.sock is None else "paused" if self.paused_until else "listening"
        return {"listen": _show(self.listen), "target": _show(self.proxy.target),
                "protocol": PROTOCOL, "state": state, "error": self.error,
                "active": len(self.connections),
                "buffered": sum(len(c.up.buffer) + len(c.down.buffer) for c in self.connections),
                **dataclasses.asdict(self.stats)}


class _Connection:
    def __init__(self, listener: _Listener, client: socket.socket, target: socket.socket,
                 deadline: float) -> None:
        self.listener = listener
        self.client, self.target = client, target
        self.up = _Pipe(client, target)  # container -> service
        self.down = _Pipe(target, client)  # service -> container
        self.connecting = True
        self.deadline = deadline  # the connect deadline, then the idle one
        self.closed = False


class Proxies:
    """TCP listeners on `bind_address` (tied to `interface` when given), each relaying to a
    host service. apply() opens and closes listeners; everything else runs on one thread,
    started by the first apply() that has something to listen on."""

    def __init__(self, bind_address: IPv4Address | str, interface: str | None = None, *,
                 max_connections: int = MAX_CONNECTIONS,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.address = str(bind_address)
        self.interface = interface
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()  # one caller at a time: apply, status, close
        self._closed = False
        self._thread: threading.Thread | None = None
        self._calls: collections.deque[tuple[Callable[[], Any], Future[Any]]] = (
            collections.deque())
        # Everything below belongs to the relay thread once it runs.
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._running = False
        self._listeners: dict[ProxyConfig, _Listener] = {}
        self._masks: dict[socket.socket, int] = {}
        self._active = 0
        self._now = time.monotonic()
        self._next_check = self._now + TICK

    # -- the API (any thread) ----------------------------------------------------------------

    def apply(self, proxies: Iterable[ProxyConfig]) -> None:
        """Listen for exactly `proxies`: open the new ones (and retry those that failed), close
        the removed ones along with their connections, leave the others alone."""
        wanted = tuple(dict.fromkeys(proxies))
        with self._lock:
            if self._closed:
                log.debug("proxies closed; not applying %d proxies", len(wanted))
                return
            if self._thread is None:
                if not wanted:
                    return
                self._start()
            self._call(lambda: self._apply(wanted))

    def status(self) -> dict[str, Any]:
        with self._lock:
            if self._thread is not None and self._running:
                return self._call(self._status)
            return self._status()  # never started, or stopped: nothing moves any more

    def close(self) -> None:
        """Close every listener and connection and stop the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._thread is None or not self._thread.is_alive():
                return  # a relay thread that ended has dropped everything on its way out
            self._call(self._stop)
            self._thread.join(CALL_TIMEOUT)

    # -- plumbing between the callers and the relay thread ------------------------------------

    def _start(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, _READ, None)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="ctun-proxy", daemon=True)
        self._thread.start()

    def _call(self, fn: Callable[[], T]) -> T:
        """Run fn on the relay thread and return its result (or raise its exception)."""
        assert self._thread is not None and self._wake_w is not None
        if not self._thread.is_alive():
            raise RuntimeError("the proxy relay thread has stopped")
        future: Future[T] = Future()
        self._calls.append((fn, future))
        with contextlib.suppress(BlockingIOError):  # full of wake-ups already
            self._wake_w.send(b"\0")
        return future.result(CALL_TIMEOUT)

    def _run_calls(self) -> None:
        while self._calls:
            fn, future = self._calls.popleft()
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    # -- the relay thread ----------------------------------------------------------------------

    def _run(self) -> None:
        assert self._selector is not None and self._wake_r is not None
        try:
            while self._running:
                timeout = min(max(self._next_check - time.monotonic(), 0.0), TICK)
                events = self._selector.select(timeout)
                self._now = time.monotonic()
                for key, mask in events:
                    self._dispatch(key.data, key.fileobj, mask)
                self._run_calls()
                if self._now >= self._next_check:
                    self._check_timers()
        finally:
            self._running = False
            self._drop_everything()  # already done, unless a bug ended the loop
            self._run_calls()  # nobody waits in vain: the state is final now
            self._selector.close()
            self._wake_r.close()
            if self._wake_w is not None:
                self._wake_w.close()

    def _dispatch(self, target: Any, fileobj: Any, mask: int) -> None:
        if target is None:
            self._drain_wakeups()
        elif isinstance(target, _Listener):
            try:
                self._accept(target)
            except Exception:
                log.exception("proxy %s: accepting failed", target.name)
        elif isinstance(target, _Connection) and not target.closed:
            try:
                self._relay(target, fileobj, mask)
            except Exception:
                log.exception("proxy %s: relaying failed", target.listener.name)
                self._close(target, reset=True)

    def _drain_wakeups(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _watch(self, sock: socket.socket, mask: int, data: Any) -> None:
        """Make the selector wait for `mask` on sock (0: not at all)."""
        assert self._selector is not None
        current = self._masks.get(sock, 0)
        if mask == current:
            return
        if not current:
            self._selector.register(sock, mask, data)
        elif not mask:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, mask, data)
        if mask:
            self._masks[sock] = mask
        else:
            del self._masks[sock]

    # -- listeners -------------------------------------------------------------------------

    def _apply(self, wanted: tuple[ProxyConfig, ...]) -> None:
        for proxy in [p for p in self._listeners if p not in wanted]:
            self._remove(self._listeners.pop(proxy))
        for proxy in wanted:
            listener = self._listeners.get(proxy)
            if listener is None:
                listener = self._listeners[proxy] = _Listener(proxy, (self.address, proxy.port))
            if listener.sock is None:  # new, or it failed before: try (again)
                self._listen(listener)

    def _listen(self, listener: _Listener) -> None:
        port = listener.proxy.port
        other = next((p for p, each in self._listeners.items()
                      if p.port == port and each is not listener and each.sock is not None),
                     None)
        if other is not None:
            self._listen_failed(listener, f"port {port} is already the proxy to "
                                          f"{_show(other.target)}; give each proxy its own port")
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Reopening a port at once after a reload must not wait for TIME_WAITs to expire.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.interface:
                _bind_to_interface(sock, self.interface)
            sock.bind(listener.listen)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            hint = ("another program uses it; choose another port"
                    if exc.errno == errno.EADDRINUSE else "check the tunnel is up")
            self._listen_failed(listener, f"cannot listen on {_show(listener.listen)}: "
                                          f"{exc.strerror or exc}; {hint}")
            return
        listener.sock, listener.error = sock, None
        self._watch(sock, _READ, listener)
        log.info("proxy %s (TCP) listening", listener.name)

    @staticmethod
    def _listen_failed(listener: _Listener, error: str) -> None:
        listener.error = listener.stats.last_error = error
        log.warning("proxy %s: %s", listener.name, error)

    def _remove(self, listener: _Listener) -> None:
        if listener.sock is not None:
            self._watch(listener.sock, 0, None)
            listener.sock.close()
            listener.sock = None
        cut = len(listener.connections)
        for conn in list(listener.connections):
            self._close(conn, reset=True)
        log.info("proxy %s closed%s", listener.name,
                 f"; {cut} connections reset" if cut else "")

    def _stop(self) -> None:
        for listener in self._listeners.values():
            self._remove(listener)
        self._listeners.clear()
        self._running = False

    def _drop_everything(self) -> None:
        for listener in self._listeners.values():
            if listener.sock is not None:
                listener.sock.close()
                listener.sock = None
            for conn in list(listener.connections):
                conn.closed = True
                _reset(conn.client)
                _reset(conn.target)
            listener.connections.clear()
        self._masks.clear()
        self._active = 0

    def _accept(self, listener: _Listener) -> None:
        assert listener.sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                client, _address = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._pause(listener, f"cannot accept: {exc.strerror}")
                    return
                continue  # the client gave up before we got to it (ECONNABORTED ...)
            if self._active >= self.max_connections:
                if not listener.stats.rejected:
                    log.warning("proxy %s: %d connections relayed at once, the most there "
                                "may be; closing new ones until some end", listener.name,
                                self._active)
                listener.stats.rejected += 1
                _reset(client)
                continue
            self._open(listener, client)

    def _pause(self, listener: _Listener, error: str) -> None:
        assert listener.sock is not None
        listener.stats.last_error = error
        listener.paused_until = self._now + PAUSE_ON_EXHAUSTION
        self._next_check = min(self._next_check, listener.paused_until)
        self._watch(listener.sock, 0, None)
        log.warning("proxy %s: %s; not accepting for %g s", listener.name, error,
                    PAUSE_ON_EXHAUSTION)

    # -- connections -----------------------------------------------------------------------

    def _open(self, listener: _Listener, client: socket.socket) -> None:
        listener.stats.connections += 1
        try:
            target = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            _reset(client)
            self._note_failure(listener, f"cannot open a socket: {exc.strerror or exc}")
            return
        conn = _Connection(listener, client, target, self._now + self.connect_timeout)
        listener.connections.add(conn)
        self._active += 1
        for sock in (client, target):
            sock.setblocking(False)
            # We pass on bytes as they come: delaying small writes is for the endpoints to do.
            # (A client that reset already may refuse it; the first recv tells us so.)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = target.connect_ex(listener.proxy.target)
        if code not in _CONNECTING:
            self._connect_failed(conn, os.strerror(code))
            return
        self._next_check = min(self._next_check, conn.deadline)
        self._update(conn)

    def _relay(self, conn: _Connection, sock: Any, mask: int) -> None:
        if conn.connecting and sock is conn.target:
            code = conn.target.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._connect_failed(conn, os.strerror(code))
                return
            conn.connecting = False
            conn.deadline = self._now + self.idle_timeout
        try:
            if mask & _READ:
                self._read(conn, conn.up if sock is conn.client else conn.down)
            if not conn.connecting:
                self._flush(conn, conn.up)
            self._flush(conn, conn.down)
        except OSError:
            # A reset, or a write to a side that has gone: pass the reset on to the other.
            self._close(conn, reset=True)
            return
        if conn.up.shut and conn.down.shut:
            self._close(conn, reset=False)  # both FINs passed on: an orderly end
        else:
            self._update(conn)

    def _read(self, conn: _Connection, pipe: _Pipe) -> None:
        room = BUFFER_LIMIT - len(pipe.buffer)
        if room <= 0 or pipe.eof:
            return
        try:
            data = pipe.src.recv(room)
        except (BlockingIOError, InterruptedError):
            return
        if data:
            pipe.buffer += data
            if not conn.connecting:
                conn.deadline = self._now + self.idle_timeout
        else:
            pipe.eof = True

    def _flush(self, conn: _Connection, pipe: _Pipe) -> None:
        if pipe.buffer:
            try:
                sent = pipe.dst.send(pipe.buffer)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent:
                del pipe.buffer[:sent]
                conn.deadline = self._now + self.idle_timeout
                stats = conn.listener.stats
                if pipe is conn.up:
                    stats.bytes_to_target += sent
                else:
                    stats.bytes_from_target += sent
        if pipe.eof and not pipe.buffer and not pipe.shut:
            pipe.dst.shutdown(socket.SHUT_WR)
            pipe.shut = True

    def _update(self, conn: _Connection) -> None:
        """Wait for what can move: never read a side whose peer's buffer is full."""
        client = (_READ if conn.up.wants_read() else 0) | (_WRITE if conn.down.buffer else 0)
        if conn.connecting:
            target = _WRITE  # writable (or an error) is how a connect ends
        else:
            target = (_READ if conn.down.wants_read() else 0) | (_WRITE if conn.up.buffer else 0)
        self._watch(conn.client, client, conn)
        self._watch(conn.target, target, conn)

    def _connect_failed(self, conn: _Connection, reason: str) -> None:
        self._note_failure(conn.listener, f"{_show(conn.listener.proxy.target)}: {reason}")
        self._close(conn, reset=True)

    @staticmethod
    def _note_failure(listener: _Listener, error: str) -> None:
        listener.stats.failed += 1
        # One line per new kind of failure: a container retrying a stopped service would
        # otherwise fill the log.
        if error != listener.stats.last_error:
            log.warning("proxy %s: %s", listener.name, error)
        listener.stats.last_error = error

    def _close(self, conn: _Connection, reset: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        for sock in (conn.client, conn.target):
            self._watch(sock, 0, None)
            if reset:
                _reset(sock)
            else:
                sock.close()
        conn.listener.connections.discard(conn)
        self._active -= 1

    def _check_timers(self) -> None:
        now = self._now
        next_check = now + TICK
        for listener in self._listeners.values():
            if listener.paused_until and listener.sock is not None:
                if now >= listener.paused_until:
                    listener.paused_until = 0.0
                    self._watch(listener.sock, _READ, listener)
                else:
                    next_check = min(next_check, listener.paused_until)
            for conn in list(listener.connections):
                if now < conn.deadline:
                    next_check = min(next_check, conn.deadline)
                elif conn.connecting:
                    self._connect_failed(conn, f"no answer within {self.connect_timeout:g} s")
                else:
                    listener.stats.idle_closed += 1
                    self._close(conn, reset=True)
        self._next_check = next_check

    def _status(self) -> dict[str, Any]:
        return {"protocol": PROTOCOL, "address": self.address, "interface": self.interface,
                "active": self._active, "max_connections": self.max_connections,
                "proxies": [listener.status() for listener in self._listeners.values()]}


def _show(endpoint: Endpoint) -> str:
    return f"{endpoint[0]}:{endpoint[1]}"


def _reset(sock: socket.socket) -> None:
    """Close with a RST rather than a FIN: the other side must not take a cut-off relay for
    a complete answer."""
    with contextlib.suppress(OSError):  # cannot fail on a socket that is still open
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _bind_to_interface(sock: socket.socket, interface: str) -> None:
    if sys.platform.startswith("linux"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
    elif sys.platform == "darwin":
        sock.setsockopt(socket.IPPROTO_IP, _IP_BOUND_IF, socket.if_nametoindex(interface))


# -- the host feature -------------------------------------------------------------------------


def setup(ctx: HostContext) -> None:
    """Listen for the configured proxies on the host's tunnel address; follow reloads."""
    proxies = Proxies(ctx.cfg.tunnel.host_address, ctx.engine.interface.name)
    ctx.resources.callback(proxies.close)
    proxies.apply(ctx.cfg.proxies)

    def reconfigure_proxies(cfg: HostConfig) -> None:
        proxies.apply(cfg.proxies)

    def proxy_status() -> dict[str, Any]:
        return {"proxy": proxies.status()}

    ctx.on_reconfigure.append(reconfigure_proxies)
    ctx.status_parts.append(proxy_status)
