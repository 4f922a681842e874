"""The built-in transports pass the same conformance suite third-party transports use."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import socket

import pytest
from ctun.core.contracts import Endpoint, Transport
from ctun.plugins.transport_udp import UdpTransport
from ctun.testing import TransportConformance


def _tcp_transport() -> tuple[type[Transport] | None, str]:
    """TcpTransport, or None and why not (it is written alongside this suite)."""
    try:
        module = importlib.import_module("ctun.plugins.transport_tcp")
        # Looked up, not imported by name, so type checking passes before it exists too.
        cls: type[Transport] = module.TcpTransport
    except (ImportError, AttributeError) as exc:
        return None, f"no TCP transport to test: ctun.plugins.transport_tcp.TcpTransport ({exc})"
    return cls, ""


_TCP, _NO_TCP = _tcp_transport()


class TestUdp(TransportConformance):
    transport_class = UdpTransport


@pytest.mark.skipif(_TCP is None, reason=_NO_TCP)
class TestTcp(TransportConformance):
    if _TCP is not None:
        transport_class = _TCP
    raw_socket_type = socket.SOCK_STREAM


# --- the suite itself: each broken transport below must fail the test named with it -------


class _Shouting(UdpTransport):
    name = "UDP"  # deliberately not lowercase


class _NoLimit(UdpTransport):
    max_frame = 100

    def send(self, frame: bytes, to: Endpoint) -> None:  # no length check
        with contextlib.suppress(OSError):
            self._sock.sendto(frame, to)


class _Duplicating(UdpTransport):
    def receive(self, limit: int = 64) -> list[tuple[bytes, Endpoint]]:
        frames = super().receive(max(1, limit // 2))
        return [f for f in frames for _ in range(2)]


class _Truncating(UdpTransport):
    def receive(self, limit: int = 64) -> list[tuple[bytes, Endpoint]]:
        return [(data[:4096], sender) for data, sender in super().receive(limit)]


class _Forgetful(UdpTransport):
    """Loses one frame in ten on send, and counts nothing."""

    sent = 0

    def send(self, frame: bytes, to: Endpoint) -> None:
        self.sent += 1
        if self.sent % 10:
            super().send(frame, to)


class _FragileClose(UdpTransport):
    def close(self) -> None:
        if self._closed:
            raise RuntimeError("closed twice")
        super().close()


class _LeakyClose(UdpTransport):
    def close(self) -> None:  # the socket stays open, and keeps delivering
        self._closed = True

    def receive(self, limit: int = 64) -> list[tuple[bytes, Endpoint]]:
        self._closed = False
        try:
            return super().receive(limit)
        finally:
            self._closed = True


class _JunkIntolerant(UdpTransport):
    def receive(self, limit: int = 64) -> list[tuple[bytes, Endpoint]]:
        frames = super().receive(limit)
        if any(not data for data, _ in frames):
            raise ValueError("empty datagram")
        return frames


class _Blocking(UdpTransport):
    def receive(self, limit: int = 64) -> list[tuple[bytes, Endpoint]]:
        # Blocks for a while, not forever: the helper thread it blocks must end some time.
        self._sock.settimeout(3)
        return super().receive(limit)


class _OverLimit(UdpTransport):
    def receive(self, limit: int = 64) -> list[tuple[bytes, Endpoint]]:
        return super().receive(limit + 1)


BROKEN = [
    (_Shouting, "test_name_is_a_lowercase_word"),
    (_NoLimit, "test_frame_over_max_frame_is_a_value_error"),
    (_Duplicating, "test_many_frames_arrive_complete_and_once"),
    (_Truncating, "test_smallest_and_largest_frames_arrive_intact"),
    (_Forgetful, "test_many_frames_arrive_complete_and_once"),
    (_Forgetful, "test_sends_from_several_threads_lose_nothing"),
    (_FragileClose, "test_close_is_idempotent_and_final"),
    (_LeakyClose, "test_close_is_idempotent_and_final"),
    (_JunkIntolerant, "test_junk_at_the_listening_endpoint_is_survived"),
    (_Blocking, "test_receive_does_not_block_and_fileno_polls_readable"),
    (_OverLimit, "test_receive_does_not_block_and_fileno_polls_readable"),
]


def test_the_suite_checks_names_as_the_config_does() -> None:
    from ctun.core import config
    from ctun.testing import transport

    assert transport.NAME_RE.pattern == config._TRANSPORT_RE.pattern


@pytest.mark.parametrize(("transport_class", "test_name"), BROKEN,
                         ids=[f"{cls.__name__[1:]}-{test}" for cls, test in BROKEN])
def test_the_suite_catches_a_broken_transport(transport_class: type[Transport],
                                              test_name: str) -> None:
    suite_class = type("Suite", (TransportConformance,),
                       {"transport_class": transport_class, "wait_seconds": 0.5})
    suite = suite_class()
    server, client = suite.make_pair()
    try:
        method = getattr(suite, test_name)
        arguments = [(server, client)] if "transport_pair" in inspect.signature(method).parameters \
            else []
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            method(*arguments)
    finally:
        for transport in (client, server):
            # UDP's own close(), not the broken ones: this test is about the suite.
            assert isinstance(transport, UdpTransport)
            UdpTransport.close(transport)
