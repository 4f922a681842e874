"""Sharing without a lab: which peers are admitted, what an accessor takes from the host,
and the command lines' one-line errors. The lab tests (test_access_lab.py) do the rest."""

from __future__ import annotations

import getpass
import io
import os
import subprocess
import sys
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
from ctun import cli
from ctun.core import access, accessors, peer_admin, peer_store, status_text
from ctun.core.config import (
    ExposeConfig,
    HostConfig,
    PeerConfig,
    Timers,
    TunnelConfig,
    encode_key,
)
from ctun.core.keys import ConfigError

NET = IPv4Network("192.168.251.0/24")
STORE = Path("/state/peers.toml")


def key(n: int) -> bytes:
    return bytes([n]) * 32


def host_config(*peers: PeerConfig, listen: tuple[str, int] | None = ("0.0.0.0", 2512)
                ) -> HostConfig:
    tunnel = TunnelConfig(NET, IPv4Address("192.168.251.1"), IPv4Address("192.168.251.2"),
                          1400, "ctun0")
    return HostConfig(tunnel=tunnel, listen=("127.0.0.1", 2511), transport="auto", routes=(),
                      peers=(PeerConfig("vm", key(1), ()), *peers), timers=Timers(),
                      source="/etc/ctun/ctun.toml",
                      expose=ExposeConfig(listen, (IPv4Network("172.18.0.2/32"),)))


def stored(name: str, ip: str, k: int) -> PeerConfig:
    return PeerConfig(name, key(k), (), ip=IPv4Address(ip), origin="store")


# --- who is admitted -----------------------------------------------------------------------


def test_store_peers_join_the_config_peers_and_clashes_are_reported() -> None:
    db = PeerConfig("db", key(2), (IPv4Network("10.0.0.0/24"),))
    alice = PeerConfig("alice", key(3), (), ip=IPv4Address("192.168.251.10"))
    cfg = host_config(db, alice)
    merged = accessors.merge(cfg, [
        stored("bob", "192.168.251.11", 4),
        stored("alice", "192.168.251.12", 5),  # the config's alice wins
        stored("carol", "192.168.251.13", 3),  # alice's key
        stored("dave", "192.168.251.10", 6),  # alice's address
        stored("erin", "10.1.1.1", 7),  # outside the tunnel network
        stored("frank", "192.168.251.2", 8),  # the host's address
        stored("vm", "192.168.251.14", 9),
    ], STORE)
    assert list(merged.peers) == ["db", "alice", "bob"]
    assert merged.peers["alice"].origin == "config"
    assert merged.problems == [
        "/state/peers.toml: peer 'alice' is also in the config file; the config's is used "
        "(alice in one of them should be renamed); not admitted",
        "/state/peers.toml: peer 'carol' has the same key as peer 'alice'; every peer needs "
        "its own key; not admitted",
        "/state/peers.toml: peer 'dave' address 192.168.251.10 is also peer 'alice''s; "
        "not admitted",
        "/state/peers.toml: peer 'erin' address 10.1.1.1 is outside the tunnel network "
        "192.168.251.0/24; not admitted",
        "/state/peers.toml: peer 'frank' address 192.168.251.2 is the tunnel's own (network, "
        "broadcast, host or VM); not admitted",
        "/state/peers.toml: peer 'vm' is also in the config file; the config's is used "
        "(vm in one of them should be renamed); not admitted",
    ]


def test_accessors_are_admitted_only_while_sharing_is_on() -> None:
    db = PeerConfig("db", key(2), (IPv4Network("10.0.0.0/24"),))
    alice = PeerConfig("alice", key(3), (), ip=IPv4Address("192.168.251.10"))
    on = host_config(db, alice)
    off = replace(on, expose=ExposeConfig())
    assert [p.name for p in accessors.admitted(on, list(on.peers))] == ["vm", "db", "alice"]
    assert [p.name for p in accessors.admitted(off, list(off.peers))] == ["vm", "db"]
    spec = accessors.spec_for(alice)
    assert spec.accessor and spec.allowed_sources == spec.routes == \
        (IPv4Network("192.168.251.10/32"),)
    assert not accessors.spec_for(db).accessor


# --- what an accessor takes from the host ------------------------------------------------


def test_an_accessor_refuses_routes_that_would_hijack_it() -> None:
    address = IPv4Interface("192.168.251.10/24")
    routes, refused = access.checked_routes(
        ["172.18.0.2/32", "0.0.0.0/0", "10.251.1.0/24", "192.168.251.0/25", "172.18.0.2/32",
         "10.5.0.0/16"], address, IPv4Address("10.251.1.1"))
    assert routes == [IPv4Network("10.5.0.0/16"), IPv4Network("172.18.0.2/32")]
    assert refused == [
        "0.0.0.0/0 (would take this machine's default route)",
        "10.251.1.0/24 (holds the host 10.251.1.1 itself: the tunnel would run through "
        "itself)",
        "192.168.251.0/25 (overlaps the tunnel network 192.168.251.0/24)",
    ]


@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.10:2512", ("192.0.2.10", 2512)),
    ("build-box.lan:7000", ("build-box.lan", 7000)),
])
def test_remote(text: str, expected: tuple[str, int]) -> None:
    assert access.parse_remote(text) == expected


@pytest.mark.parametrize("text", ["192.0.2.10", "192.0.2.10:0", "192.0.2.10:65536", ":2512",
                                  "a b:1", "host:port"])
def test_bad_remote(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--remote .*: "):
        access.parse_remote(text)


def test_the_key_comes_from_exactly_one_place(tmp_path: Path) -> None:
    text = encode_key(key(7))
    assert access.load_key(text, None, {}) == key(7)
    assert access.load_key(None, None, {"CTUN_KEY": text}) == key(7)
    key_file = tmp_path / "k"
    key_file.write_text(text + "\n")
    key_file.chmod(0o600)
    assert access.load_key(None, str(key_file), {}) == key(7)
    with pytest.raises(ConfigError, match="give the key once"):
        access.load_key(text, str(key_file), {})
    with pytest.raises(ConfigError, match="no key: pass --key KEY, --key-file FILE or set "
                                          "CTUN_KEY"):
        access.load_key(None, None, {})
    with pytest.raises(ConfigError, match=r"^--key: not a key") as caught:
        access.load_key(text[:-2], None, {})
    assert text[:-2] not in str(caught.value)


def test_the_key_from_standard_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """`echo KEY | ctun access ... --key-file -`, the command `ctun peer add` prints."""
    text = encode_key(key(7))
    monkeypatch.setattr(sys, "stdin", io.StringIO(text + "\n"))
    assert access.load_key(None, "-", {}) == key(7)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(ConfigError, match=r"^--key-file - \(standard input\): "):
        access.load_key(None, "-", {})

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    # At a terminal it is asked for, not echoed (getpass), rather than read as typed.
    asked: list[str] = []

    def ask(prompt: str) -> str:
        asked.append(prompt)
        return text

    monkeypatch.setattr(sys, "stdin", Terminal("not this\n"))
    monkeypatch.setattr(getpass, "getpass", ask)
    assert access.load_key(None, "-", {}) == key(7) and asked == ["key: "]


# --- the command lines --------------------------------------------------------------------


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    paths = [str(Path(cli.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)), **env}
    return subprocess.run([sys.executable, "-m", "ctun", *args], capture_output=True,
                          text=True, env=full, timeout=30)


@pytest.fixture
def host_dirs(tmp_path: Path) -> dict[str, str]:
    """A host with a config file (sharing off) and no daemon running."""
    config = tmp_path / "ctun.toml"
    config.write_text('addr = "192.168.251.1/24"\n')
    return {"CTUN_STATE_DIR": str(tmp_path / "state"), "CTUN_RUN_DIR": str(tmp_path / "run"),
            "CONFIG": str(config)}


@pytest.mark.skipif(os.name == "nt" or os.geteuid() != 0, reason="writes as root")
def test_peer_add_rm_list_without_a_daemon(host_dirs: dict[str, str]) -> None:
    config = host_dirs["CONFIG"]
    added = run_cli(["peer", "add", "alice", "--config", config, "--remote", "198.51.100.7:2512"],
                    host_dirs)
    assert added.returncode == 0, added.stderr
    command, *notes = added.stdout.splitlines()
    (alice,) = peer_store.load(Path(host_dirs["CTUN_STATE_DIR"]))
    assert alice.ip == IPv4Address("192.168.251.3")
    assert command == (f"echo {encode_key(alice.key)} | sudo ctun access --remote "
                       "198.51.100.7:2512 --key-file -")
    assert notes[0].startswith('sharing is off here: add  [expose] listen = "0.0.0.0:2512"')
    assert notes[1] == "ctun is not running here: alice (192.168.251.3) is admitted when it starts"
    # Only the store is written: no vm.key or other key file appears as a side effect.
    assert sorted(p.name for p in Path(host_dirs["CTUN_STATE_DIR"]).iterdir()) == [
        ".peers.toml.lock", "peers.toml"]

    listed = run_cli(["peer", "list", "--config", config], host_dirs)
    assert listed.stdout.splitlines()[1].split() == ["alice", "192.168.251.3", "store",
                                                     "not", "running"]
    taken = run_cli(["peer", "add", "alice", "--config", config], host_dirs)
    assert taken.returncode == 2 and taken.stderr.count("\n") == 1
    assert "peer 'alice' exists already" in taken.stderr
    outside = run_cli(["peer", "add", "bob", "--config", config, "--ip", "10.0.0.1"], host_dirs)
    assert outside.returncode == 2 and outside.stderr.count("\n") == 1
    assert "outside the tunnel network 192.168.251.0/24" in outside.stderr
    removed = run_cli(["peer", "rm", "alice"], host_dirs)
    assert removed.stdout.strip() == "peer alice removed (ctun is not running here)"
    again = run_cli(["peer", "rm", "alice"], host_dirs)
    assert again.returncode == 2 and "no peer alice in " in again.stderr


@pytest.mark.skipif(os.name == "nt" or os.geteuid() != 0, reason="writes as root")
def test_an_unreadable_store_is_one_line(host_dirs: dict[str, str]) -> None:
    store = Path(host_dirs["CTUN_STATE_DIR"]) / "peers.toml"
    store.parent.mkdir()
    store.write_text("[peers.alice\n")
    store.chmod(0o600)
    result = run_cli(["peer", "add", "bob", "--config", host_dirs["CONFIG"]], host_dirs)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"{store}: invalid TOML in the peer store" in result.stderr


def test_peer_commands_need_root(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "_is_admin", lambda: False)
    assert cli.main(["peer", "add", "alice"]) == 2
    assert cli.main(["peer", "rm", "alice"]) == 2
    key_text = encode_key(key(3))
    assert cli.main(["access", "--remote", "192.0.2.1:2512", "--key", key_text]) == 2
    lines = capsys.readouterr().err.splitlines()
    store = peer_admin.store_file()
    assert lines == [
        f"ctun peer: error: ctun peer add needs root: the peer store ({store}) holds the "
        "accessors' keys; run it with sudo",
        f"ctun peer: error: ctun peer rm needs root: the peer store ({store}) holds the "
        "accessors' keys; run it with sudo",
        "ctun access: error: ctun access needs root (it creates a network interface): "
        "run it with sudo",
    ]


@pytest.mark.parametrize(("args", "message"), [
    (["access", "--remote", "192.0.2.1", "--key", "x"], "--remote 192.0.2.1: use HOST:PORT"),
    (["access", "--remote", "192.0.2.1:2512"], "no key: pass --key KEY"),
    (["access", "--remote", "192.0.2.1:2512", "--key", "short"], "--key: not a key"),
    (["access", "--remote", "192.0.2.1:2512", "--key", encode_key(key(1)), "--interface",
      "eth0"], '--interface eth0: must be "ctun" followed by'),
])
def test_access_bad_input_is_one_line(args: list[str], message: str,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CTUN_KEY", raising=False)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_the_remote_printed_for_the_colleague(monkeypatch: pytest.MonkeyPatch) -> None:
    view = peer_admin.HostView(NET, IPv4Address("192.168.251.2"), IPv4Address("192.168.251.1"),
                               frozenset(), (), ("10.251.1.1", 2600), None, None)
    assert peer_admin.remote_for(view, None) == "10.251.1.1:2600"
    assert peer_admin.remote_for(view, "box.lan:7000") == "box.lan:7000"
    monkeypatch.setattr(peer_admin, "lan_address", lambda: "192.0.2.55")
    assert peer_admin.remote_for(replace(view, expose=("0.0.0.0", 2600)), None) == \
        "192.0.2.55:2600"
    assert peer_admin.remote_for(replace(view, expose=None), None) == "192.0.2.55:2512"


def test_status_shows_sharing() -> None:
    host = {"expose": {"listen": "10.251.1.1:2512", "transports": ["udp", "tcp"],
                       "routes": ["172.18.0.2/32"]},
            "accessors": [{"name": "alice", "ip": "192.168.251.3", "origin": "store",
                           "state": "up"}],
            "problems": ["x"]}
    assert status_text.format_access(host) == [
        "sharing: listening on udp+tcp 10.251.1.1:2512, exposed: 172.18.0.2/32",
        "  accessor alice 192.168.251.3 (store): up",
        "warning: x",
    ]
    assert status_text.format_access({"address": None}) == \
        ["access: waiting for the host's settings (nothing routed yet)"]
