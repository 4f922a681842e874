"""The peer store (STATE_DIR/peers.toml): private, rewritten atomically, checked on every read."""

from __future__ import annotations

import os
import stat
import threading
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from ctun.core import peer_store
from ctun.core.config import encode_key
from ctun.core.keys import ConfigError

NET = IPv4Network("192.168.251.0/24")
KEY = bytes(range(32))


def add(state: Path, name: str, ip: str | None = None, taken: tuple[str, ...] = (),
        key: bytes | None = None, net: IPv4Network = NET) -> IPv4Address:
    # The VM takes the network's first address and the host the next, as in the config.
    peer = peer_store.add(state, name, key or peer_store.new_key(), net, net[2], net[1],
                          [IPv4Address(t) for t in taken], IPv4Address(ip) if ip else None)
    assert peer.ip is not None
    return peer.ip


def test_no_store_is_no_peers(tmp_path: Path) -> None:
    assert peer_store.load(tmp_path) == []
    assert peer_store.load(tmp_path / "missing") == []


def test_add_picks_free_addresses_and_round_trips(tmp_path: Path) -> None:
    assert add(tmp_path, "alice", key=KEY) == IPv4Address("192.168.251.3")
    # .4 belongs to a peer of the config file, .5 is asked for: bob gets .6.
    assert add(tmp_path, "carol", ip="192.168.251.5") == IPv4Address("192.168.251.5")
    assert add(tmp_path, "bob", taken=("192.168.251.4",)) == IPv4Address("192.168.251.6")
    peers = peer_store.load(tmp_path)
    assert [(p.name, str(p.ip), p.origin) for p in peers] == [
        ("alice", "192.168.251.3", "store"), ("carol", "192.168.251.5", "store"),
        ("bob", "192.168.251.6", "store")]
    assert peers[0].key == KEY and peers[0].allowed == ()
    path = peer_store.store_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f'[peers.alice]\nip = "192.168.251.3"\nkey = "{encode_key(KEY)}"\n' in path.read_text()
    # Atomic rewrites leave no temporary files behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".peers.toml.lock", "peers.toml"]


def test_remove(tmp_path: Path) -> None:
    add(tmp_path, "alice")
    add(tmp_path, "bob")
    assert peer_store.remove(tmp_path, "alice") is True
    assert peer_store.remove(tmp_path, "alice") is False
    assert [p.name for p in peer_store.load(tmp_path)] == ["bob"]
    # A freed address is given out again.
    assert add(tmp_path, "carol") == IPv4Address("192.168.251.3")


@pytest.mark.parametrize(("name", "ip", "message"), [
    ("alice", None, "peer 'alice' exists already"),
    ("Alice", None, "peer name 'Alice': use a lowercase letter"),
    ("vm", None, "peer name 'vm' is reserved"),
    ("bob", "10.0.0.5", "--ip 10.0.0.5: outside the tunnel network 192.168.251.0/24"),
    ("bob", "192.168.251.2", "--ip 192.168.251.2: already taken"),
    ("bob", "192.168.251.255", "--ip 192.168.251.255: already taken"),
    ("bob", "192.168.251.3", "--ip 192.168.251.3: already taken"),
])
def test_bad_additions_are_one_line_errors(tmp_path: Path, name: str, ip: str | None,
                                           message: str) -> None:
    add(tmp_path, "alice")
    before = peer_store.store_path(tmp_path).read_bytes()
    with pytest.raises(ConfigError) as caught:
        add(tmp_path, name, ip=ip)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert peer_store.store_path(tmp_path).read_bytes() == before  # nothing written


def test_a_full_network_says_so(tmp_path: Path) -> None:
    small = IPv4Network("10.9.0.0/29")  # .1 vm .2 host, .3-.6 free
    assert [add(tmp_path, f"p{i}", net=small) for i in range(4)] == \
        [IPv4Address(f"10.9.0.{i}") for i in range(3, 7)]
    with pytest.raises(ConfigError, match="no free address left in the tunnel network"):
        add(tmp_path, "p9", net=small)


def test_next_free_wraps_below_the_host(tmp_path: Path) -> None:
    net = IPv4Network("10.9.0.0/29")
    reserved = peer_store.reserved_addresses(net, IPv4Address("10.9.0.5"),
                                             IPv4Address("10.9.0.4"), [IPv4Address("10.9.0.6")])
    assert peer_store.next_free(net, IPv4Address("10.9.0.5"), IPv4Address("10.9.0.4"),
                                reserved) == IPv4Address("10.9.0.1")


def test_concurrent_adds_get_distinct_addresses(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            add(tmp_path, f"peer{i}")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    peers = peer_store.load(tmp_path)
    assert len(peers) == 20 and len({p.ip for p in peers}) == 20


GOOD = f'[peers.alice]\nip = "192.168.251.3"\nkey = "{encode_key(KEY)}"\n'


@pytest.mark.parametrize(("text", "message"), [
    ("[peers.alice\n", "invalid TOML in the peer store"),
    ("name = 1\n", "unknown key 'name' in the peer store"),
    ("peers = 3\n", "peers must be tables"),
    ('[peers.alice]\nip = "192.168.251.3"\n', "needs exactly ip"),
    (GOOD.replace("ip =", "allowed = 1\nip ="), "needs exactly ip"),
    (GOOD.replace("192.168.251.3", "300.1.1.1"), "ip must be an IPv4 address"),
    (GOOD.replace(encode_key(KEY), "short"), "not a key"),
    (GOOD.replace("alice", "Alice"), "use a lowercase letter"),
    (GOOD + GOOD.replace("alice", "bob"), "ip 192.168.251.3 is also peer 'alice'"),
    ("\xff", "not UTF-8"),
])
def test_a_bad_store_is_one_line_naming_it(tmp_path: Path, text: str, message: str) -> None:
    path = peer_store.store_path(tmp_path)
    path.write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff" else b"\xff")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        peer_store.load(tmp_path)
    text_of = str(caught.value)
    assert text_of.startswith(str(path)) and message in text_of and "\n" not in text_of
    assert encode_key(KEY) not in text_of  # never quote a secret


def test_a_readable_store_is_refused(tmp_path: Path) -> None:
    path = peer_store.store_path(tmp_path)
    path.write_text(GOOD)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"other users can access it \(mode 0644\); run: "
                                          r"chmod 600"):
        peer_store.load(tmp_path)
    # Adding refuses too, rather than rewriting a store someone may have meant to share.
    with pytest.raises(ConfigError, match="mode 0644"):
        add(tmp_path, "bob")


def test_a_directory_in_its_place_is_refused(tmp_path: Path) -> None:
    peer_store.store_path(tmp_path).mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        peer_store.load(tmp_path)


def test_store_is_created_in_a_private_directory(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    add(state, "alice")
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
