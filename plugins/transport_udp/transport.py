"""UDP transport: non-blocking socket, drained in batches by the engine's pump."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Callable

from ...core.contracts import Endpoint, Transport

DEFAULT_PORT = 2511
# Large buffers absorb bursts from the tun while the other thread is busy sealing.
SOCKET_BUFFER = 4 * 1024 * 1024
# Read one byte more than the largest frame we accept, so oversized datagrams are seen as such.
RECV_SIZE = 65536

# Errors that mean "this datagram did not go", not "the transport is broken".
_TRANSIENT = frozenset(
    {errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
     errno.EHOSTDOWN, errno.ENETDOWN, errno.EPERM, errno.EMSGSIZE}
)


class UdpTransport(Transport):
    name = "udp"
    max_frame = 65507  # the largest UDP payload over IPv4

    def __init__(self, sock: socket.socket, connected: bool) -> None:
        self._sock = sock
        self._connected = connected
        self.errors = 0  # transient send/receive errors, for the status view
        self._closed = False
        sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            # A smaller buffer still works, it just drops bursts sooner.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)

    @classmethod
    def listen(cls, bind: Endpoint) -> UdpTransport:
        return cls(_socket(socket.socket.bind, bind), connected=False)

    @classmethod
    def connect(cls, remote: Endpoint) -> UdpTransport:
        # connect() filters out datagrams from anyone but the host, in the kernel.
        return cls(_socket(socket.socket.connect, remote), connected=True)

    @property
    def local_endpoint(self) -> Endpoint:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self, limit: int = 64) -> list[tuple[bytes, Endpoint]]:
        frames: list[tuple[bytes, Endpoint]] = []
        if self._closed:
            return frames
        recvfrom = self._sock.recvfrom
        while len(frames) < limit:
            try:
                data, addr = recvfrom(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                # A connected socket reports ICMP errors from earlier sends here; not fatal.
                if exc.errno in _TRANSIENT:
                    self.errors += 1
                    continue
                raise
            frames.append((data, (addr[0], addr[1])))
        return frames

    def send(self, frame: bytes, to: Endpoint) -> None:
        if len(frame) > self.max_frame:
            raise ValueError(f"frame of {len(frame)} bytes is over {self.max_frame}")
        if self._closed:
            return
        try:
            if self._connected:
                self._sock.send(frame)
            else:
                self._sock.sendto(frame, to)
        except OSError as exc:
            if exc.errno not in _TRANSIENT:
                raise
            self.errors += 1

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def stats(self) -> dict[str, int]:
        return {"errors": self.errors}


def _socket(action: Callable[[socket.socket, Endpoint], None], endpoint: Endpoint
            ) -> socket.socket:
    """A UDP socket bound or connected to `endpoint`; closed again if that fails."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        action(sock, endpoint)
    except OSError:
        sock.close()
        raise
    return sock
