"""One TCP connection of the transport: framing, the times its deadlines derive from, and
its output buffer. No locking here: the transport's lock covers every connection."""

from __future__ import annotations

import socket

from ...core.contracts import Endpoint

HEADER = 2  # big-endian length before every frame
# Consumed input is only moved out of the buffer once this much has piled up, so popping
# thousands of small frames from one read costs no quadratic memmove.
COMPACT_AFTER = 64 * 1024

# Reasons a connection's input breaks the framing; also the names of their stats counters.
ZERO_LENGTH = "closed_zero_length"
OVERSIZE = "closed_oversize"


class Connection:
    """Bytes in, whole frames out; bytes that could not be sent yet wait in `out`."""

    __slots__ = (
        "closed", "complete", "connecting", "fd", "inbuf", "last_frame", "max_frame", "opened",
        "out", "partial_since", "peer", "queued", "rpos", "scan", "sock", "writing",
    )

    def __init__(self, sock: socket.socket, peer: Endpoint, now: float, max_frame: int,
                 connecting: bool = False) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.max_frame = max_frame
        self.opened = now
        self.connecting = connecting  # client side: a non-blocking connect() in progress
        self.closed = False
        # Input: inbuf[rpos:scan] holds `complete` whole frames, inbuf[scan:] a partial one.
        self.inbuf = bytearray()
        self.rpos = 0
        self.scan = 0
        self.complete = 0
        self.last_frame: float | None = None  # when the latest complete frame arrived
        self.partial_since: float | None = None  # when the first byte of the partial arrived
        self.out = bytearray()
        self.writing = False  # EPOLLOUT registered, because `out` (or a connect) is pending
        self.queued = 0  # frames put in `out` while connecting (lost if the connect fails)

    @property
    def mid_frame(self) -> bool:
        """Bytes of an incomplete frame (or header) are buffered."""
        return self.scan < len(self.inbuf)

    def feed(self, data: bytes, now: float) -> str | None:
        """Append received bytes and validate every header now complete, so a bad length is
        caught the moment it arrives, not when the frames before it are taken. Returns the
        violation (a counter name) or None."""
        buf = self.inbuf
        buf += data
        scan, end, found = self.scan, len(buf), 0
        while end - scan >= HEADER:
            length = (buf[scan] << 8) | buf[scan + 1]
            if length == 0:
                return ZERO_LENGTH
            if length > self.max_frame:
                return OVERSIZE
            if end - scan - HEADER < length:
                break
            scan += HEADER + length
            found += 1
        self.scan = scan
        if found:
            self.complete += found
            self.last_frame = now
        if scan == end:
            self.partial_since = None
        elif found or self.partial_since is None:
            # A new frame started in this read (any earlier partial one just completed).
            self.partial_since = now
        return None

    def pop(self) -> bytes:
        """The oldest complete frame; only call while `complete` > 0."""
        buf, start = self.inbuf, self.rpos
        length = (buf[start] << 8) | buf[start + 1]
        end = start + HEADER + length
        frame = bytes(buf[start + HEADER:end])
        self.complete -= 1
        if end == len(buf):
            buf.clear()
            self.rpos = self.scan = 0
        elif end >= COMPACT_AFTER:
            del buf[:end]
            self.scan -= end
            self.rpos = 0
        else:
            self.rpos = end
        return frame

    def deadline_reason(self, timeouts: Timeouts, server: bool) -> tuple[float, str]:
        """The earliest deadline this connection has, and the counter to bump if it passes."""
        if self.connecting:
            return self.opened + timeouts.connect, "closed_connect_timeout"
        candidates = [
            ((self.last_frame if self.last_frame is not None else self.opened) + timeouts.idle,
             "closed_idle"),
        ]
        if server and self.last_frame is None:
            # The client side is exempt: a host that rejects our handshake says nothing, and
            # reconnecting every few seconds would not make it answer.
            candidates.append((self.opened + timeouts.handshake, "closed_handshake_timeout"))
        if self.partial_since is not None:
            candidates.append((self.partial_since + timeouts.frame, "closed_frame_timeout"))
        return min(candidates)


class Timeouts:
    """Seconds: see TcpTransport for what each one bounds."""

    __slots__ = ("connect", "frame", "handshake", "idle")

    def __init__(self, handshake: float, frame: float, idle: float, connect: float) -> None:
        for name, value in (("handshake", handshake), ("frame", frame), ("idle", idle),
                            ("connect", connect)):
            if not value > 0:
                raise ValueError(f"{name} timeout must be positive, not {value!r}")
        self.handshake = handshake
        self.frame = frame
        self.idle = idle
        self.connect = connect
