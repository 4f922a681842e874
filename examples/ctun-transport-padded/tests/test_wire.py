# ctun's own type check walks into this example without it installed, so the package
# under test cannot be found there; installed (or with MYPYPATH set), it is checked fully.
# mypy: disable-error-code="import-not-found"
"""What padded-udp puts on the wire, and what it does with datagrams it did not send."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest
from ctun.core import plugins
from ctun_transport_padded import BUCKET, HEADER, PaddedUdpTransport, padded_size
from ctun_transport_padded.transport import pad, unpad


@pytest.fixture
def server() -> Iterator[PaddedUdpTransport]:
    transport = PaddedUdpTransport.listen(("127.0.0.1", 0))
    yield transport
    transport.close()


@pytest.fixture
def observer() -> Iterator[socket.socket]:
    """A plain UDP socket: it sees datagrams as anyone on the path does."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


def _wait(fd: int) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    assert poller.poll(2000), "nothing arrived within 2 s"


@pytest.mark.parametrize(("length", "size"), [
    (0, 512), (1, 512), (510, 512), (511, 1024), (1400, 1536), (9216, 9728),
    (PaddedUdpTransport.max_frame, 65024),
])
def test_sizes_on_the_wire_are_whole_buckets(length: int, size: int) -> None:
    assert padded_size(length) == size
    assert len(pad(os.urandom(length))) == size


def test_an_observer_sees_only_bucket_sizes(observer: socket.socket) -> None:
    client = PaddedUdpTransport.connect(observer.getsockname())
    try:
        frames = [os.urandom(n) for n in (1, 37, 148, 509, 510, 1200, 1400)]
        for frame in frames:
            client.send(frame, observer.getsockname())
        seen = []
        for _ in frames:
            _wait(observer.fileno())
            seen.append(len(observer.recv(65536)))
    finally:
        client.close()
    assert seen == [512, 512, 512, 512, 512, 1536, 1536]


def test_padding_is_random_not_a_marker() -> None:
    frame = b"\x00" * 10
    first, second = pad(frame), pad(frame)
    assert first[:HEADER + 10] == second[:HEADER + 10]
    # Equal padding twice in a row: 1 chance in 2**(8*500).
    assert first[HEADER + 10:] != second[HEADER + 10:]


@pytest.mark.parametrize("datagram", [
    b"",                                          # shorter than the header
    b"\x01",                                      # shorter than the header
    (511).to_bytes(2, "big") + bytes(510),        # length beyond the datagram
    (0xFFFF).to_bytes(2, "big") + bytes(510),     # length beyond the datagram
    (3).to_bytes(2, "big") + b"abc",              # unpadded: no whole bucket
    (3).to_bytes(2, "big") + bytes(600),          # no whole number of buckets
], ids=["empty", "one-byte", "length+1", "length-max", "unpadded", "ragged"])
def test_malformed_datagrams_are_dropped_and_counted(
    server: PaddedUdpTransport, datagram: bytes
) -> None:
    assert unpad(datagram) is None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        raw.sendto(datagram, server.local_endpoint)
        raw.sendto(pad(b"after"), server.local_endpoint)  # a good one behind the bad one
        frames: list[tuple[bytes, tuple[str, int]]] = []
        while len(frames) < 1:
            _wait(server.fileno())
            frames += server.receive()
    assert [f for f, _ in frames] == [b"after"]
    assert server.stats()["malformed"] == 1


def test_more_padding_than_needed_is_accepted() -> None:
    # A sender may pad further, e.g. every datagram to 1536 bytes: still a valid datagram.
    datagram = (5).to_bytes(2, "big") + b"hello" + os.urandom(3 * BUCKET - HEADER - 5)
    assert unpad(datagram) == b"hello"


def test_the_plugin_registers_padded_udp() -> None:
    import ctun_transport_padded

    pm = plugins.create_manager(load_entry_points=False)
    pm.register(ctun_transport_padded, name="padded")
    assert plugins.transport(pm, "padded-udp") is PaddedUdpTransport
