"""UDP where every datagram on the wire has one of a few sizes: multiples of BUCKET bytes.

Wire format of one datagram (everything big-endian):

    +--------+----------------------+---------------------------------+
    | length |  frame (length bytes) |  random padding                |
    | 2 bytes|                      |  up to the next multiple of 512 |
    +--------+----------------------+---------------------------------+

The frames are ctun's sealed frames, already encrypted and authenticated; this transport only
hides how long they are. Padding is random rather than zero so that nothing in the datagram
marks where the frame ends. See the README for what that does and does not hide.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from collections.abc import Callable

from ctun.core.contracts import Endpoint, Transport

BUCKET = 512
HEADER = 2
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4
# Large buffers absorb bursts while the engine's other thread is busy sealing.
SOCKET_BUFFER = 4 * 1024 * 1024
RECV_SIZE = 65536  # more than any datagram: a truncated read can never look whole

# Errors that mean "this datagram did not go (or an earlier one bounced)", not "the socket is
# broken": an ICMP error from an earlier send, a full buffer, a route that is down for now.
_TRANSIENT = frozenset(
    {errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
     errno.EHOSTDOWN, errno.ENETDOWN, errno.EPERM, errno.EMSGSIZE}
)


def padded_size(frame_length: int) -> int:
    """The size on the wire of a frame of `frame_length` bytes: header included, rounded up
    to a whole number of buckets."""
    return -(-(frame_length + HEADER) // BUCKET) * BUCKET


class PaddedUdpTransport(Transport):
    """One UDP socket; send() pads, receive() checks and strips the padding.

    stats(): "errors" (sends or receives that failed for a network reason, the frame lost) and
    "malformed" (datagrams dropped because they cannot be this transport's: shorter than the
    header, a length beyond the datagram, or a size that is no whole number of buckets).
    """

    name = "padded-udp"
    # The largest frame whose padded datagram still fits in one UDP payload.
    max_frame = MAX_DATAGRAM // BUCKET * BUCKET - HEADER

    def __init__(self, sock: socket.socket, connected: bool) -> None:
        self._sock = sock
        self._connected = connected
        self._closed = False
        # send() runs on several threads at once; the counters are the only shared state.
        self._lock = threading.Lock()
        self._errors = 0
        self._malformed = 0
        sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            # A smaller buffer still works, it just drops bursts sooner.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)

    @classmethod
    def listen(cls, bind: Endpoint) -> PaddedUdpTransport:
        return cls(_socket(socket.socket.bind, bind), connected=False)

    @classmethod
    def connect(cls, remote: Endpoint) -> PaddedUdpTransport:
        # A connected socket: the kernel drops datagrams from anyone but `remote`.
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
        while len(frames) < limit:
            try:
                data, addr = self._sock.recvfrom(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _TRANSIENT:  # e.g. ICMP "port unreachable" for a past send
                    self._count_error()
                    continue
                raise
            frame = unpad(data)
            if frame is None:
                with self._lock:
                    self._malformed += 1
                continue
            frames.append((frame, (str(addr[0]), int(addr[1]))))
        return frames

    def send(self, frame: bytes, to: Endpoint) -> None:
        if len(frame) > self.max_frame:
            raise ValueError(f"frame of {len(frame)} bytes is over {self.max_frame}")
        if self._closed:
            return
        datagram = pad(frame)
        try:
            if self._connected:
                self._sock.send(datagram)
            else:
                self._sock.sendto(datagram, to)
        except OSError as exc:
            # EBADF: closed by another thread between the check above and the send.
            if exc.errno not in _TRANSIENT and not self._closed:
                raise
            self._count_error()

    def close(self) -> None:
        self._closed = True
        self._sock.close()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"errors": self._errors, "malformed": self._malformed}

    def _count_error(self) -> None:
        with self._lock:
            self._errors += 1


def pad(frame: bytes) -> bytes:
    """One datagram carrying `frame`."""
    length = len(frame)
    # os.urandom, not the random module: a predictable generator's output can be told apart
    # from ciphertext, which would show where the frame ends.
    padding = os.urandom(padded_size(length) - HEADER - length)
    return length.to_bytes(HEADER, "big") + frame + padding


def unpad(datagram: bytes) -> bytes | None:
    """The frame in `datagram`, or None when no padded-udp sender could have sent it."""
    size = len(datagram)
    if size < HEADER or size % BUCKET:
        return None
    length = int.from_bytes(datagram[:HEADER], "big")
    if length > size - HEADER:
        return None
    return datagram[HEADER:HEADER + length]


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
