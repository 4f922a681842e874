"""Frames bigger than a datagram may be: cut into pieces on the way out, put back together
on the way in.

Only offload super-packets (core/gso.py) are ever that big. Cutting them here, into pieces
no bigger than a full-size ordinary frame, means the tunnel never relies on IP fragmentation
(which NATs, firewalls and Docker Desktop's port forwarders handle badly), and the pieces of
one frame are equal in size, so one sendmsg() with UDP_SEGMENT sends them all.

A piece is an 8-byte header and a slice of the frame:
  0: 0xFF (never a frame type)   1: index   2: count   3: 0   4..7: frame id (big-endian)
The pieces are not authenticated one by one: the frame they rebuild is, so a forged or
damaged piece only ever costs that one frame (counted where the frame fails its checks).
"""

from __future__ import annotations

import struct
from collections import OrderedDict

from ...core.contracts import Endpoint

MARKER = 0xFF
HEADER = struct.Struct(">BBBxI")
HEADER_LEN = HEADER.size
MAX_PIECES = 255  # the index is one byte; a 576-byte MTU still needs only ~110
MAX_PARTIAL = 16  # frames being put together at once; the oldest is dropped beyond that


Piece = tuple[bytes, memoryview]  # header, slice of the frame: sent without joining them


def split(frame: bytes, piece_size: int, frame_id: int) -> list[Piece]:
    """The pieces of `frame`, each at most `piece_size` bytes including its header; each
    left as its header and a view of the frame, for a gathering sendmsg()."""
    room = piece_size - HEADER_LEN
    count = -(-len(frame) // room)
    if count > MAX_PIECES or count < 2:
        raise ValueError(f"a frame of {len(frame)} bytes cannot be cut into {piece_size}-byte "
                         "pieces")
    view = memoryview(frame)
    return [
        (HEADER.pack(MARKER, index, count, frame_id), view[index * room:(index + 1) * room])
        for index in range(count)
    ]


def whole_frames(view: memoryview, size: int, segment: int) -> list[bytes] | None:
    """The frames in one GRO read of `size` bytes in datagrams of `segment` bytes, when that
    read holds whole frames' pieces in order (what one sender's burst gives): each frame is
    joined straight from the buffer, skipping the per-piece bookkeeping. None otherwise, and
    the caller takes the pieces one by one."""
    frames: list[bytes] = []
    start = 0
    while start < size:
        if view[start] != MARKER or size - start <= HEADER_LEN:
            return None
        _marker, index, count, frame_id = HEADER.unpack_from(view, start)
        if index != 0 or count < 2:
            return None
        end = start + count * segment
        if end > size:
            # Only the batch's last datagram may be short, so only the last frame may end so.
            if start + (count - 1) * segment >= size:
                return None
            end = size
        parts = []
        for k in range(count):
            at = start + k * segment
            if view[at:at + HEADER_LEN] != HEADER.pack(MARKER, k, count, frame_id):
                return None
            parts.append(view[at + HEADER_LEN:min(at + segment, end)])
        frames.append(b"".join(parts))
        start = end
    return frames


class Reassembly:
    """Pieces in, whole frames out; bounded, so a flood of pieces costs memory only up to
    MAX_PARTIAL unfinished frames."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        # (sender, frame id) -> (count, pieces by index); insertion order = age
        self._partial: OrderedDict[tuple[Endpoint, int], tuple[int, dict[int, bytes]]] = (
            OrderedDict()
        )
        self.invalid = 0  # pieces whose header makes no sense
        self.incomplete = 0  # frames given up on, because newer ones pushed them out

    def add(self, piece: bytes, sender: Endpoint) -> bytes | None:
        """The whole frame once `piece` completes it, else None."""
        if len(piece) <= HEADER_LEN:
            self.invalid += 1
            return None
        _marker, index, count, frame_id = HEADER.unpack_from(piece)
        if not 2 <= count <= MAX_PIECES or index >= count:
            self.invalid += 1
            return None
        key = (sender, frame_id)
        entry = self._partial.get(key)
        if entry is None:
            if len(self._partial) >= MAX_PARTIAL:
                self._partial.popitem(last=False)
                self.incomplete += 1
            entry = (count, {})
            self._partial[key] = entry
        elif entry[0] != count:
            self.invalid += 1
            return None
        pieces = entry[1]
        pieces[index] = piece[HEADER_LEN:]
        if len(pieces) < count:
            return None
        del self._partial[key]
        frame = b"".join(pieces[i] for i in range(count))
        if len(frame) > self.max_frame:
            self.invalid += 1
            return None
        return frame
