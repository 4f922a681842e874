"""UDP transport: non-blocking socket, drained in batches by the engine's pump.

On Linux it sends runs of equal-sized datagrams with one sendmsg() (UDP_SEGMENT) and takes
them in with one recvmsg() (UDP_GRO), so a burst costs a few system calls, not one per
packet; both fall back to one datagram per call where the kernel lacks them. Frames bigger
than the engine's datagram size (offload super-packets) travel as pieces (fragments.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import sys
from collections.abc import Callable

from ...core.contracts import Endpoint, Transport
from ...core.protocol import MAX_FRAME
from . import fragments

log = logging.getLogger("ctun.udp")

DEFAULT_PORT = 2511
# Large buffers absorb bursts while the pump is busy sealing or opening a batch. They are
# forced past net.core.[rw]mem_max where we may (root): the default cap of 208 KB holds
# only ~150 full-size frames, which one burst of a fast TCP flow overruns.
SOCKET_BUFFER = 4 * 1024 * 1024
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
# Asks the kernel to say, with a received datagram, how many it dropped for a full receive
# buffer: the one loss of the tunnel's that nothing else would show.
SO_RXQ_OVFL = 40
GSO_MAX_SEGMENTS = 64  # per sendmsg(): the kernel's UDP_MAX_SEGMENTS on older kernels
GSO_MAX_BYTES = 65507  # per sendmsg(): what one IPv4 packet's UDP payload may be
DEFAULT_DATAGRAM = 1432  # the default MTU (1400) plus the tunnel's 32 bytes
# The largest datagram (or GRO batch of them) that can arrive, and one byte more, so that
# anything bigger shows up as truncated rather than as a damaged frame.
RECV_SIZE = 65536
_ANC_SPACE = 2 * socket.CMSG_SPACE(4)  # a GRO segment size and a drop count
_GRO_SIZE = struct.Struct("=i")
_DROP_COUNT = struct.Struct("=I")
_SEGMENT_SIZE = struct.Struct("=H")
# What sendmsg() says when the kernel or the device cannot segment UDP.
_NO_GSO = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP})

# Errors that mean "this datagram did not go", not "the transport is broken".
_TRANSIENT = frozenset(
    {errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
     errno.EHOSTDOWN, errno.ENETDOWN, errno.EPERM, errno.EMSGSIZE}
)


class UdpTransport(Transport):
    name = "udp"
    max_frame = MAX_FRAME  # bigger than a datagram: such frames travel in pieces

    def __init__(self, sock: socket.socket, connected: bool) -> None:
        self._sock = sock
        self._connected = connected
        self.errors = 0  # transient send/receive errors, for the status view
        self.truncated = 0  # datagrams bigger than any frame
        self.dropped_rcvbuf = 0  # datagrams the kernel dropped, our receive buffer full
        self._closed = False
        self._datagram = DEFAULT_DATAGRAM
        self._frame_id = 0
        self._reassembly = fragments.Reassembly(self.max_frame)
        self._buffer = bytearray(RECV_SIZE)
        self._view = memoryview(self._buffer)
        sock.setblocking(False)
        for force, opt in ((SO_RCVBUFFORCE, socket.SO_RCVBUF),
                           (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
            # A smaller buffer still works, it just drops bursts sooner.
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        self.gso = sys.platform.startswith("linux")
        self.gro = False
        if self.gso:
            with contextlib.suppress(OSError):  # only the counter is missing without it
                sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass

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

    def use_offloads(self, enabled: bool) -> None:
        if enabled:
            return  # on from the start where the kernel has them
        self.gso = False
        if self.gro:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(SOL_UDP, UDP_GRO, 0)
            self.gro = False

    def set_datagram_size(self, size: int) -> None:
        self._datagram = max(size, fragments.HEADER_LEN + 64)

    def receive(self, limit: int = 64) -> list[tuple[bytes, Endpoint]]:
        frames: list[tuple[bytes, Endpoint]] = []
        if self._closed:
            return frames
        # Windows has no recvmsg(): one datagram per call there.
        read = self._read_batch if hasattr(self._sock, "recvmsg_into") else self._read_one
        while len(frames) < limit:
            try:
                datagrams, source = read()
            except BlockingIOError:
                break
            except OSError as exc:
                # A connected socket reports ICMP errors from earlier sends here; not fatal.
                if exc.errno in _TRANSIENT:
                    self.errors += 1
                    continue
                raise
            for datagram in datagrams:
                self._take(datagram, source, frames)
        return frames

    def _read_batch(self) -> tuple[list[bytes], Endpoint]:
        """One recvmsg(): with GRO, a run of datagrams, all `segment` long but the last."""
        size, ancillary, flags, addr = self._sock.recvmsg_into([self._buffer], _ANC_SPACE)
        source = (addr[0], addr[1])
        if flags & socket.MSG_TRUNC:
            self.truncated += 1
            return [], source
        if size == 0:
            return [b""], source  # the engine counts it as too short
        segment = size
        for level, kind, data in ancillary:
            if level == SOL_UDP and kind == UDP_GRO and len(data) >= _GRO_SIZE.size:
                segment = _GRO_SIZE.unpack_from(data)[0] or size
            elif level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and \
                    len(data) >= _DROP_COUNT.size:
                # The socket's total so far; the kernel sends it only once it is not zero.
                self.dropped_rcvbuf = _DROP_COUNT.unpack_from(data)[0]
        view = self._view
        if segment < size and view[0] == fragments.MARKER:
            frames = fragments.whole_frames(view, size, segment)
            if frames is not None:
                if any(len(f) > self.max_frame for f in frames):
                    self._reassembly.invalid += 1
                    return [], source
                # Whole frames, not pieces: _take() sees their own type byte first.
                return frames, source
        return [bytes(view[start:min(start + segment, size)])
                for start in range(0, size, segment)], source

    def _read_one(self) -> tuple[list[bytes], Endpoint]:
        data, addr = self._sock.recvfrom(RECV_SIZE)
        return [data], (addr[0], addr[1])

    def _take(self, datagram: bytes, source: Endpoint, frames: list[tuple[bytes, Endpoint]]
              ) -> None:
        if datagram and datagram[0] == fragments.MARKER:
            frame = self._reassembly.add(datagram, source)
            if frame is not None:
                frames.append((frame, source))
        else:
            frames.append((datagram, source))

    def send(self, frame: bytes, to: Endpoint) -> None:
        if len(frame) > self._datagram:
            self.send_many([frame], to)
            return
        if self._closed:
            return
        self._send_one(frame, to)

    def send_many(self, frames: list[bytes], to: Endpoint) -> None:
        if self._closed:
            return
        # Each datagram as the buffers it is made of: a frame, or a piece's header and slice.
        datagrams: list[tuple[bytes | memoryview, ...]] = []
        for frame in frames:
            if len(frame) > self.max_frame:
                raise ValueError(f"frame of {len(frame)} bytes is over {self.max_frame}")
            if len(frame) > self._datagram:
                self._frame_id = (self._frame_id + 1) & 0xFFFFFFFF
                datagrams += fragments.split(frame, self._datagram, self._frame_id)
            else:
                datagrams.append((frame,))
        if not self.gso or len(datagrams) == 1:
            for datagram in datagrams:
                self._send_one(b"".join(datagram), to)
            return
        sizes = [sum(map(len, datagram)) for datagram in datagrams]
        start, count = 0, len(datagrams)
        while start < count:
            # A run of equal sizes, optionally ended by one shorter datagram: what one
            # UDP_SEGMENT send can carry.
            size = sizes[start]
            end, total = start + 1, size
            while end < count and end - start < GSO_MAX_SEGMENTS:
                following = sizes[end]
                if following > size or total + following > GSO_MAX_BYTES:
                    break
                total += following
                end += 1
                if following < size:
                    break
            if end - start == 1:
                self._send_one(b"".join(datagrams[start]), to)
            else:
                self._send_segmented(datagrams[start:end], size, to)
            start = end

    def _send_segmented(self, run: list[tuple[bytes | memoryview, ...]], size: int,
                        to: Endpoint) -> None:
        ancillary = [(SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(size))]
        # The kernel cuts the gathered bytes every `size` bytes: no need to join a piece's
        # header and slice first.
        buffers = [part for datagram in run for part in datagram]
        try:
            if self._connected:
                self._sock.sendmsg(buffers, ancillary)
            else:
                self._sock.sendmsg(buffers, ancillary, 0, to)
        except OSError as exc:
            if exc.errno in _NO_GSO:
                log.info("UDP segmentation offload unavailable here (%s); sending one "
                         "datagram per call", exc.strerror)
                self.gso = False
                for datagram in run:
                    self._send_one(b"".join(datagram), to)
                return
            if exc.errno not in _TRANSIENT:
                raise
            self.errors += 1

    def _send_one(self, frame: bytes, to: Endpoint) -> None:
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
        return {
            "errors": self.errors,
            "truncated": self.truncated,
            "dropped_rcvbuf": self.dropped_rcvbuf,
            "pieces_invalid": self._reassembly.invalid,
            "frames_incomplete": self._reassembly.incomplete,
            "gso": int(self.gso),
            "gro": int(self.gro),
        }


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
