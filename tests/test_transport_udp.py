"""The UDP transport's own parts: frames in pieces, and batched sends with and without
the kernel's segmentation offload."""

from __future__ import annotations

import random
import select
import socket
import time

import pytest
from ctun.plugins.transport_udp import fragments
from ctun.plugins.transport_udp.transport import UdpTransport
from hypothesis import given, settings
from hypothesis import strategies as st

SENDER = ("10.0.0.1", 2511)


@given(st.integers(1500, 66000), st.integers(600, 9000), st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_pieces_rebuild_the_frame_in_any_order(length: int, size: int, seed: int) -> None:
    rnd = random.Random(seed)  # the bytes from a seed: hypothesis need not draw 66 KB
    frame = rnd.randbytes(length)
    if len(frame) <= size:
        return
    pieces = [b"".join(piece) for piece in fragments.split(frame, size, 7)]
    assert all(len(p) <= size for p in pieces)
    # Equal sizes but the last: what one UDP_SEGMENT send needs.
    assert len({len(p) for p in pieces[:-1]}) == 1
    rnd.shuffle(pieces)
    reassembly = fragments.Reassembly(70000)
    out = [reassembly.add(p, SENDER) for p in pieces]
    assert out[:-1] == [None] * (len(pieces) - 1) and out[-1] == frame
    assert reassembly.invalid == reassembly.incomplete == 0


def test_bad_pieces_are_counted_and_partial_frames_are_bounded() -> None:
    reassembly = fragments.Reassembly(70000)
    header = fragments.HEADER
    for bad in (b"\xff", header.pack(0xFF, 0, 1, 1) + b"x",  # a frame of one piece
                header.pack(0xFF, 5, 3, 1) + b"x",  # index past the count
                header.pack(0xFF, 0, 0, 1) + b"x"):
        assert reassembly.add(bad, SENDER) is None
    assert reassembly.invalid == 4
    # A piece that disagrees on the count of a frame under way.
    assert reassembly.add(header.pack(0xFF, 0, 3, 9) + b"a", SENDER) is None
    assert reassembly.add(header.pack(0xFF, 1, 4, 9) + b"b", SENDER) is None
    assert reassembly.invalid == 5
    # A flood of first pieces keeps at most MAX_PARTIAL frames around.
    for frame_id in range(100, 100 + 3 * fragments.MAX_PARTIAL):
        reassembly.add(header.pack(0xFF, 0, 2, frame_id) + b"x", SENDER)
    assert len(reassembly._partial) == fragments.MAX_PARTIAL
    assert reassembly.incomplete == 2 * fragments.MAX_PARTIAL + 1
    # Pieces from another sender never complete someone else's frame.
    assert reassembly.add(header.pack(0xFF, 1, 2, 147) + b"y", ("10.6.6.6", 1)) is None
    # A rebuilt frame over the limit is refused.
    small = fragments.Reassembly(10)
    pieces = [b"".join(piece) for piece in fragments.split(bytes(100), 40, 1)]
    for piece in pieces[:-1]:
        assert small.add(piece, SENDER) is None
    assert small.add(pieces[-1], SENDER) is None
    assert small.invalid == 1


def gro_read(*frames: bytes, size: int = 600, frame_id: int = 1) -> tuple[memoryview, int]:
    """What one GRO read holds after a burst of these frames' pieces."""
    data = b"".join(b"".join(piece) for i, f in enumerate(frames)
                    for piece in fragments.split(f, size, frame_id + i))
    return memoryview(data), len(data)


@given(st.lists(st.integers(1, 40), min_size=1, max_size=3), st.integers(0, 2**32))
@settings(max_examples=50, deadline=None)
def test_whole_frames_come_straight_out_of_a_gro_read(pieces: list[int], seed: int) -> None:
    rnd = random.Random(seed)  # the bytes from a seed: hypothesis need not draw 60 KB
    room = 600 - fragments.HEADER_LEN
    # Full pieces for all frames but the last, which may end short (as GRO allows).
    frames = [rnd.randbytes(room * (n + 1)) for n in pieces[:-1]]
    frames.append(rnd.randbytes(room * pieces[-1] + rnd.randrange(1, room)))
    view, size = gro_read(*frames)
    assert fragments.whole_frames(view, size, 600) == frames


def test_anything_but_whole_frames_in_order_is_left_to_the_slow_path() -> None:
    frame = bytes(range(256)) * 10
    view, size = gro_read(frame)
    assert fragments.whole_frames(view, size, 600) == [frame]
    # A piece missing, pieces swapped, a foreign frame id, a short piece mid-way: None.
    assert fragments.whole_frames(view[600:], size - 600, 600) is None
    swapped = bytes(view[600:1200]) + bytes(view[:600]) + bytes(view[1200:])
    assert fragments.whole_frames(memoryview(swapped), size, 600) is None
    mixed = bytearray(view)
    mixed[1200 + 4:1200 + 8] = (99).to_bytes(4, "big")
    assert fragments.whole_frames(memoryview(bytes(mixed)), size, 600) is None
    assert fragments.whole_frames(view[:size - 1], size - 1, 600) is not None  # last short
    assert fragments.whole_frames(view[:1100], 1100, 600) is None  # ends mid-frame
    assert fragments.whole_frames(memoryview(b"\x03" + bytes(700)), 701, 600) is None


def receive_all(transport: UdpTransport, want: int, timeout: float = 5.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        select.select([transport.fileno()], [], [], 0.1)
        got += [frame for frame, _ in transport.receive(1000)]
    return got


@pytest.mark.parametrize("offloads", [True, False], ids=["offloads", "plain"])
def test_batches_of_mixed_frames_arrive_whole_and_in_order(offloads: bool) -> None:
    server = UdpTransport.listen(("127.0.0.1", 0))
    client = UdpTransport.connect(server.local_endpoint)
    try:
        for t in (server, client):
            t.use_offloads(offloads)
            t.set_datagram_size(1432)
        assert client.gso == server.gro == (offloads and server.stats()["gro"] == 1)
        rnd = random.Random(5)
        sizes = [1432] * 70 + [600, 1432, 1432, 64000, 32, 1432, 65577, 1433, 1431]
        frames = [rnd.randbytes(n) for n in sizes]
        client.send_many(frames, server.local_endpoint)
        client.send(rnd.randbytes(20000), server.local_endpoint)
        got = receive_all(server, len(frames) + 1)
        assert got[:-1] == frames and len(got[-1]) == 20000
        stats = server.stats()
        assert stats["pieces_invalid"] == stats["frames_incomplete"] == stats["truncated"] == 0
    finally:
        client.close()
        server.close()


def test_junk_pieces_at_the_listener_are_counted_and_harmless() -> None:
    server = UdpTransport.listen(("127.0.0.1", 0))
    client = UdpTransport.connect(server.local_endpoint)
    try:
        client.send_many([b"\xff\x00\x01\x00junk", b"\xff\x09\x02\x00\x00\x00\x00\x01x",
                          b"real"], server.local_endpoint)
        assert receive_all(server, 1) == [b"real"]
        assert server.stats()["pieces_invalid"] == 2
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("offloads", [True, False], ids=["offloads", "plain"])
def test_datagrams_dropped_for_a_full_receive_buffer_are_counted(offloads: bool) -> None:
    """The kernel's own drops, the only loss in the tunnel nothing else would show."""
    server = UdpTransport.listen(("127.0.0.1", 0))
    client = UdpTransport.connect(server.local_endpoint)
    try:
        server.use_offloads(offloads)
        # A buffer far smaller than the burst: most of it overflows before anything is read.
        server._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sent = 400
        for n in range(sent):
            client.send(n.to_bytes(4, "big") * 300, server.local_endpoint)
        got = receive_all(server, sent, timeout=0.5)
        assert 0 < len(got) < sent
        # The kernel tells the count with the next datagram it queues after the drops.
        client.send(b"after", server.local_endpoint)
        assert receive_all(server, 1) == [b"after"]
        assert server.stats()["dropped_rcvbuf"] == sent - len(got)
    finally:
        client.close()
        server.close()
