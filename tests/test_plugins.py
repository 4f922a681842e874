"""The plugin manager: built-ins through the same hooks as third parties, chosen as documented."""

from __future__ import annotations

import sys
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from types import SimpleNamespace

import pytest
from ctun.core import plugins
from ctun.core.contracts import Endpoint, PlatformAdapter, Transport, VirtualInterface
from ctun.core.hookspecs import hookimpl
from ctun.plugins.platform_linux.adapter import LinuxAdapter
from ctun.plugins.transport_tcp import TcpTransport
from ctun.plugins.transport_udp import UdpTransport


class FakeAdapter(PlatformAdapter):
    """Stands in for an adapter of an OS that is not this one."""

    name = "fake"

    @classmethod
    def is_supported(cls) -> bool:
        return True

    def cleanup_leftovers(self, ifname: str) -> list[str]:
        return []

    def open_interface(self, ifname: str, mtu: int) -> VirtualInterface:
        raise NotImplementedError

    def set_address(self, local: IPv4Address, peer: IPv4Address) -> None: ...
    def set_mtu(self, mtu: int) -> None: ...
    def add_route(self, network: IPv4Network, via: IPv4Address | None = None) -> None: ...
    def replace_route(self, network: IPv4Network, via: IPv4Address | None = None) -> None: ...
    def remove_route(self, network: IPv4Network) -> None: ...

    def routes(self) -> list[IPv4Network]:
        return []

    def close(self) -> None: ...


class EchoTransport(UdpTransport):
    name = "echo"


def _plugin(**hooks: Callable[..., object]) -> SimpleNamespace:
    return SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


def test_builtins_load_through_the_hooks() -> None:
    pm = plugins.create_manager(load_entry_points=False)
    assert set(plugins.DEFAULT_PLUGINS) <= {name for name, _ in pm.list_name_plugin()}
    assert plugins.transports(pm) == {"udp": UdpTransport, "tcp": TcpTransport}
    assert plugins.transport(pm, "udp") is UdpTransport
    assert isinstance(plugins.platform_adapter(pm, "linux"), LinuxAdapter)


def test_platform_adapter_follows_sys_platform() -> None:
    pm = plugins.create_manager(load_entry_points=False)
    with pytest.raises(plugins.PluginError, match="no platform adapter supports 'sunos5'"):
        plugins.platform_adapter(pm, "sunos5")
    from ctun.plugins.platform_macos.adapter import MacOSAdapter

    assert isinstance(plugins.platform_adapter(pm, "darwin"), MacOSAdapter)
    assert isinstance(plugins.platform_adapter(pm), LinuxAdapter) == sys.platform.startswith(
        "linux")


def test_a_third_party_adapter_takes_precedence() -> None:
    pm = plugins.create_manager(load_entry_points=False)
    pm.register(_plugin(ctun_platform_adapter=lambda platform: FakeAdapter))
    assert isinstance(plugins.platform_adapter(pm, "linux"), FakeAdapter)
    assert isinstance(plugins.platform_adapter(pm, "darwin"), FakeAdapter)


def test_third_party_transports_are_chosen_by_name() -> None:
    pm = plugins.create_manager(load_entry_points=False)

    def register_echo(register: Callable[[type[Transport]], None]) -> None:
        register(EchoTransport)

    pm.register(_plugin(ctun_register_transports=register_echo))
    assert plugins.transport(pm, "echo") is EchoTransport
    with pytest.raises(plugins.PluginError, match=r"no transport named 'quic' .*echo, tcp, udp"):
        plugins.transport(pm, "quic")


def test_two_transports_with_one_name_are_refused() -> None:
    pm = plugins.create_manager(load_entry_points=False)

    class Impostor(UdpTransport):
        name = "udp"

    def register_impostor(register: Callable[[type[Transport]], None]) -> None:
        register(Impostor)

    pm.register(_plugin(ctun_register_transports=register_impostor))
    with pytest.raises(plugins.PluginError, match="two plugins register a transport named"):
        plugins.transports(pm)


def test_ctun_plugins_limits_what_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plugins.ONLY_ENV, "transport_udp")
    pm = plugins.create_manager(load_entry_points=False)
    assert plugins.transports(pm) == {"udp": UdpTransport}
    with pytest.raises(plugins.PluginError):
        plugins.platform_adapter(pm, "linux")


def test_state_change_events_reach_plugins() -> None:
    from ctun.core.runtime import event_sink

    pm = plugins.create_manager(load_entry_points=False)
    seen: list[tuple[str, str, str]] = []

    def record(peer: str, state: str, reason: str) -> None:
        seen.append((peer, state, reason))

    pm.register(_plugin(ctun_session_state_changed=record))
    event_sink(pm)("vm", "up", "handshake complete")
    assert seen == [("vm", "up", "handshake complete")]


def test_udp_transport_moves_frames_both_ways() -> None:
    server = UdpTransport.listen(("127.0.0.1", 0))
    client = UdpTransport.connect(server.local_endpoint)
    try:
        client.send(b"hello", server.local_endpoint)
        frames = _receive(server)
        assert frames == [(b"hello", client.local_endpoint)]
        server.send(b"back", frames[0][1])
        assert _receive(client) == [(b"back", server.local_endpoint)]
    finally:
        client.close()
        server.close()


def _receive(transport: Transport) -> list[tuple[bytes, Endpoint]]:
    import select

    poller = select.poll()
    poller.register(transport.fileno(), select.POLLIN)
    assert poller.poll(2000), "nothing arrived within 2 s"
    return transport.receive()


def test_auto_is_udp_then_tcp_and_degrades_to_what_is_loaded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ctun.core.runtime import transport_classes

    pm = plugins.create_manager(load_entry_points=False)
    assert transport_classes(pm, "auto") == [UdpTransport, TcpTransport]
    assert transport_classes(pm, "tcp") == [TcpTransport]
    # Where TCP cannot load (it needs Linux's epoll for now), auto means UDP alone, said once.
    monkeypatch.setenv(plugins.ONLY_ENV, "transport_udp")
    pm = plugins.create_manager(load_entry_points=False)
    assert transport_classes(pm, "auto") == [UdpTransport]
    assert "transport tcp is not available here" in caplog.text
    with pytest.raises(plugins.PluginError, match="no transport named 'tcp'"):
        transport_classes(pm, "tcp")
