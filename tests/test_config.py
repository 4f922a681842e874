"""Unit tests for ctun.core.config and ctun.core.keys: no root, no network, tmp files only."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from collections.abc import Callable, Mapping
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from ctun.core import config
from ctun.core.config import (
    AgentConfig,
    ConfigError,
    HostConfig,
    Timers,
    check_host_config,
    default_state_dir,
    encode_key,
    load_agent_config,
    load_host_config,
    load_or_create_key,
    read_key,
)
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Keep every test away from /etc/ctun and /var/lib/ctun and the caller's CTUN_KEY."""
    state = tmp_path / "state"
    monkeypatch.setenv("CTUN_STATE_DIR", str(state))
    monkeypatch.delenv("CTUN_KEY", raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "ctun.toml")
    return state


def write(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return str(path)


def write_key(path: Path, key: bytes, mode: int = 0o600) -> Path:
    path.write_text(encode_key(key) + "\n")
    path.chmod(mode)
    return path


def error_of(fn: Callable[[], object]) -> str:
    """The ConfigError message fn raises, checked to be a single line."""
    with pytest.raises(ConfigError) as info:
        fn()
    message = str(info.value)
    assert message and len(message.splitlines()) == 1, message
    return message


KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))


# --- defaults ------------------------------------------------------------------------------


@posix_only
def test_host_defaults_create_the_vm_key(isolated: Path) -> None:
    cfg = load_host_config(None, {})
    assert cfg.tunnel.network == IPv4Network("192.168.251.0/24")
    assert cfg.tunnel.vm_address == IPv4Address("192.168.251.1")
    assert cfg.tunnel.host_address == IPv4Address("192.168.251.2")
    assert (cfg.tunnel.mtu, cfg.tunnel.interface) == (1400, "ctun0")
    assert cfg.listen == ("127.0.0.1", 2511)
    assert cfg.transport == "auto"  # UDP with TCP fallback
    assert cfg.routes == ()
    assert cfg.timers == Timers(1.0, 3.0, 120.0, 600.0)
    assert cfg.source is None
    [vm] = cfg.peers
    assert (vm.name, vm.allowed, len(vm.key)) == ("vm", (), 32)
    key_file = isolated / "vm.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(isolated.stat().st_mode) == 0o700
    assert base64.b64decode(key_file.read_text().strip()) == vm.key
    # A second start reuses the key rather than making a new one.
    assert load_host_config(None, {}).peers[0].key == vm.key


def test_agent_defaults() -> None:
    cfg = load_agent_config(None, {}, {"CTUN_KEY": encode_key(KEY_A)})
    assert cfg == AgentConfig(
        tunnel=config.TunnelConfig(
            IPv4Network("192.168.251.0/24"),
            IPv4Address("192.168.251.1"),
            IPv4Address("192.168.251.2"),
            1400,
            "ctunvm0",
        ),
        host="host.docker.internal",
        port=2511,
        transport="auto",
        key=KEY_A,
        timers=Timers(),
        source=None,
    )


def test_keys_stay_out_of_reprs() -> None:
    cfg = load_agent_config(None, {}, {"CTUN_KEY": encode_key(KEY_A)})
    assert repr(KEY_A) not in repr(cfg)
    host = load_host_config(None, {})
    assert repr(host.peers[0].key) not in repr(host)


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert default_state_dir() == tmp_path / "state"
    monkeypatch.delenv("CTUN_STATE_DIR")
    assert default_state_dir() == Path("/var/lib/ctun")
    assert default_state_dir({"CTUN_STATE_DIR": "/x"}) == Path("/x")


def test_default_config_file_is_used_when_present(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "etc.toml"
    write(path, "mtu = 1300\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", path)
    cfg = load_host_config(None, {})
    assert (cfg.tunnel.mtu, cfg.source) == (1300, str(path))


# --- file and overrides --------------------------------------------------------------------

FULL_HOST = """
addr = "10.33.0.5/16"
port = 4000
listen = "0.0.0.0"
mtu = 1280
interface = "ctun-dev"
transport = "tcp"
routes = ["172.17.0.0/16", "10.9.0.0/24"]
key_file = "keys/vm.key"
keepalive = 2
dead_after = 9.5
rekey_after = 60.0
handshake_skew = 30.0

[peers.laptop]
key_file = "keys/laptop.key"
allowed = ["10.33.0.9/32"]

[peers."db-1"]
key = "KEY_B"
allowed = ["10.33.1.0/24", "192.168.7.0/24"]
"""


def test_full_host_file(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    write_key(tmp_path / "keys" / "laptop.key", KEY_A)
    path = write(tmp_path / "ctun.toml", FULL_HOST.replace("KEY_B", encode_key(KEY_B)))
    cfg = load_host_config(path, {})
    assert cfg.tunnel == config.TunnelConfig(
        IPv4Network("10.33.0.0/16"),
        IPv4Address("10.33.0.5"),
        IPv4Address("10.33.0.6"),
        1280,
        "ctun-dev",
    )
    assert cfg.listen == ("0.0.0.0", 4000)
    assert cfg.transport == "tcp"
    assert cfg.routes == (IPv4Network("172.17.0.0/16"), IPv4Network("10.9.0.0/24"))
    assert cfg.timers == Timers(2.0, 9.5, 60.0, 30.0)
    assert cfg.source == path
    assert [p.name for p in cfg.peers] == ["vm", "laptop", "db-1"]
    # Relative key files are relative to the config file, not to the working directory.
    assert (tmp_path / "keys" / "vm.key").exists()
    assert cfg.peers[1].key == KEY_A and cfg.peers[1].allowed == (IPv4Network("10.33.0.9/32"),)
    assert cfg.peers[2].key == KEY_B and len(cfg.peers[2].allowed) == 2


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "ctun.toml",
        'mtu = 1300\nport = 1000\nroutes = ["172.17.0.0/16", "172.18.0.0/16"]\nkeepalive = 2.0\n'
        "dead_after = 10.0\n",
    )
    cfg = load_host_config(
        path,
        {
            "mtu": "1500",
            "port": 2000,
            "routes": ["10.1.0.0/16"],
            "keepalive": "0.5",
            "listen": "127.0.0.2",
            "interface": "ctun7",
            "transport": "tcp",
            "rekey_after": 5,
        },
    )
    assert cfg.tunnel.mtu == 1500
    assert cfg.listen == ("127.0.0.2", 2000)
    assert cfg.routes == (IPv4Network("10.1.0.0/16"),)  # replaced, not merged
    assert cfg.timers == Timers(0.5, 10.0, 5.0, 600.0)  # dead_after still from the file
    assert (cfg.tunnel.interface, cfg.transport) == ("ctun7", "tcp")


def test_empty_routes_override_clears_file_routes(tmp_path: Path) -> None:
    path = write(tmp_path / "ctun.toml", 'routes = ["172.17.0.0/16"]\n')
    assert load_host_config(path, {"routes": []}).routes == ()


def test_none_override_means_flag_not_given(tmp_path: Path) -> None:
    path = write(tmp_path / "ctun.toml", "mtu = 1300\n")
    assert load_host_config(path, {"mtu": None, "host": None}).tunnel.mtu == 1300


def test_addr_override_moves_both_ends() -> None:
    cfg = load_host_config(None, {"addr": "10.0.0.1/30"})
    assert (cfg.tunnel.vm_address, cfg.tunnel.host_address) == (
        IPv4Address("10.0.0.1"),
        IPv4Address("10.0.0.2"),
    )


# --- validation: file-origin errors name the file and the key -------------------------------

FILE_ERRORS = [
    ("mtu = 99999", "mtu = 99999: must be between 576 and 9000"),
    ("mtu = 575", "mtu = 575: must be between 576 and 9000"),
    ('mtu = "1400"', 'mtu = "1400": must be a whole number'),
    ("mtu = true", "mtu = true: must be a whole number"),
    ("port = 0", "port = 0: must be between 1 and 65535"),
    ("port = 65536", "port = 65536: must be between 1 and 65535"),
    ("port = 25.5", "port = 25.5: must be a whole number"),
    ("addr = 5", 'addr = 5: must be a string, like "192.168.251.1/24"'),
    ('addr = "192.168.251.1"', 'needs a prefix length, like "192.168.251.1/24"'),
    ('addr = "fd00::1/64"', "must be an IPv4 address with a prefix length"),
    ('addr = "300.1.1.1/24"', "300.1.1.1/24"),
    ('addr = "10.0.0.1/31"', "prefix length must be between /8 and /30"),
    ('addr = "10.0.0.1/7"', "prefix length must be between /8 and /30"),
    ('addr = "192.168.251.0/24"', "network address of 192.168.251.0/24; use 192.168.251.1/24"),
    ('addr = "192.168.251.255/24"', "broadcast address of 192.168.251.0/24"),
    ('addr = "192.168.251.254/24"', "the host side takes the next address, 192.168.251.255"),
    ('addr = "127.0.0.1/24"', "loopback"),
    ('addr = "224.0.0.1/24"', "multicast"),
    ('listen = "::1"', 'listen = "::1": must be an IPv4 address to listen on'),
    ('listen = "localhost"', "must be an IPv4 address"),
    ('interface = "eth0"', 'interface = "eth0": must be "ctun" followed by'),
    ('interface = "ctun_much_too_long"', "up to 11"),
    ('transport = "UDP"', 'transport = "UDP": must be a transport name'),
    ('transport = ""', "must be a transport name"),
    ('routes = "172.17.0.0/16"', "must be a list of strings"),
    ("routes = [17]", "routes[0] = 17: must be a string"),
    (
        'routes = ["172.17.0.1/16"]',
        'routes[0] = "172.17.0.1/16": has host bits set; use 172.17.0.0/16',
    ),
    ('routes = ["172.17.0.0/33"]', "172.17.0.0/33"),
    ('routes = ["bogus"]', "must be an IPv4 network"),
    ('routes = ["0.0.0.0/0"]', "would swallow the host's default route"),
    ('routes = ["192.168.0.0/16"]', "overlaps the tunnel network 192.168.251.0/24"),
    ('routes = ["192.168.251.128/25"]', "overlaps the tunnel network"),
    ('routes = ["10.0.0.0/8", "10.0.0.0/8"]', 'routes[1] = "10.0.0.0/8": listed twice'),
    ("keepalive = 0.05", "keepalive = 0.05: must be at least 0.1 and at most 60 seconds"),
    ("keepalive = nan", "keepalive = nan: must be at least 0.1"),
    ('keepalive = "1"', "must be a number of seconds"),
    (
        "dead_after = 601",
        "dead_after = 601: must be more than keepalive (1) and at most 600 seconds",
    ),
    ("dead_after = 1.0", "dead_after = 1.0: must be more than keepalive (1)"),
    ("keepalive = 5", "keepalive = 5: must be less than dead_after (3); raise dead_after too"),
    ("keepalive = 5\ndead_after = 4", "dead_after = 4: must be more than keepalive (5)"),
    ("rekey_after = 0.5", "rekey_after = 0.5: must be at least 1 and at most 3600 seconds"),
    ("rekey_after = inf", "rekey_after = inf"),
    ("handshake_skew = 86401", "handshake_skew = 86401: must be at least 1 and at most 86400"),
    ("keepalive = 1" + "0" * 400, "keepalive = <a very large number>: must be at least 0.1"),
    ("key_file = 3", "key_file = 3: must be a string"),
    ('key_file = ""', 'key_file = "": must be a file path'),
    ("muu = 1", "unknown key 'muu' (known: addr, control_group, dead_after,"),
    ("muu = 1", "did you mean 'mtu'?"),
    ('host = "x"', "host: only for `ctun vm`"),
]


@pytest.mark.parametrize(("text", "expected"), FILE_ERRORS)
def test_file_errors_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "ctun.toml", text + "\n")
    message = error_of(lambda: load_host_config(path, {}))
    line = text.count("\n") + 1  # every wrong value here is on the last line
    assert message.startswith(f"{path}:{line}: ")
    assert expected in message


def test_value_errors_point_at_their_line_anywhere_in_a_file(tmp_path: Path) -> None:
    """Values in arrays across lines, in tables and in arrays of tables."""
    head = (
        "# ctun\n"
        'addr = "192.168.251.1/24"\n'
        "routes = [\n"
        '  "172.17.0.0/16",  # the default bridge\n'
        "\n"
        '  "{route}",\n'
        "]\n"
        "[docker]\n"
        "{docker}\n"
        '[peers."bob"]\n'
        'ip = "{ip}"\n'
        "[[hosts]]\n"
        'file = "/etc/hosts"\n'
        "suffixes = ['.dev.local',\n"
        "            '{suffix}']\n"
        "[expose]\n"
        'listen = "{listen}"\n'
    )
    good = {"route": "172.18.0.0/16", "docker": "", "ip": "192.168.251.9",
            "suffix": ".test", "listen": "0.0.0.0:2512"}
    cases = [("route", "10.0.0.1/8", 6, 'routes[1] = "10.0.0.1/8": has host bits set'),
             ("docker", "colour = 1", 9, "[docker]: unknown key 'colour'"),
             ("ip", "10.9.9.9", 11, "outside the tunnel network"),
             ("suffix", "", 15, "hosts[0].suffixes[1]"),
             ("listen", "0.0.0.0", 17, 'expose.listen = "0.0.0.0"')]
    for field, bad, line, expected in cases:
        path = write(tmp_path / "ctun.toml", head.format_map({**good, field: bad}), mode=0o600)
        message = error_of(lambda: check_host_config(path))  # noqa: B023 (called at once)
        assert message.startswith(f"{path}:{line}: "), (field, message)
        assert expected in message, (field, message)


def test_agent_rejects_host_only_keys(tmp_path: Path) -> None:
    for text in ('routes = ["172.17.0.0/16"]', 'listen = "0.0.0.0"', "[peers.x]\n"):
        path = write(tmp_path / "vm.toml", text + "\n")
        message = error_of(partial(load_agent_config, path, {}, {}))
        assert message.startswith(path + ":1: ")
        assert "only for `ctun up` (the host side)" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('host = "999.1.1.1"', 'host = "999.1.1.1": must be a host name or an IP address'),
        ('host = "a b"', "must be a host name"),
        ('host = ""', "must be a host name"),
        ("host = 1", "must be a string"),
    ],
)
def test_agent_file_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "vm.toml", text + "\n")
    message = error_of(lambda: load_agent_config(path, {}, {"CTUN_KEY": encode_key(KEY_A)}))
    assert message.startswith(path + ":1: ") and expected in message


def test_agent_accepts_names_and_literals() -> None:
    env = {"CTUN_KEY": encode_key(KEY_A)}
    for host in ("192.168.65.254", "gateway.docker.internal", "my_host", "fd00::1", "a.b."):
        assert load_agent_config(None, {"host": host}, env).host == host


# --- validation: flag-origin errors name the flag ------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"mtu": 99999}, "--mtu 99999: must be between 576 and 9000"),
        ({"mtu": "99999"}, "--mtu 99999: must be between 576 and 9000"),
        ({"mtu": "1e3"}, "--mtu 1e3: must be a whole number"),
        ({"mtu": "9" * 5000}, "--mtu 9999"),
        ({"port": "http"}, "--port http: must be a whole number between 1 and 65535"),
        ({"port": -1}, "--port -1: must be between 1 and 65535"),
        ({"addr": "10.0.0.1"}, '--addr 10.0.0.1: needs a prefix length, like "10.0.0.1/24"'),
        ({"addr": 10}, "--addr 10: must be a string"),
        ({"listen": "1.2.3"}, "--listen 1.2.3: must be an IPv4 address"),
        ({"interface": "tun0"}, "--interface tun0: must be"),
        ({"transport": "u dp"}, "--transport 'u dp': must be a transport name"),
        (
            {"routes": ["172.17.0.1/16"]},
            "--route 172.17.0.1/16: has host bits set; use 172.17.0.0/16",
        ),
        ({"routes": "172.17.0.0/16"}, "--route 172.17.0.0/16: must be a list of strings"),
        ({"routes": ["0.0.0.0/0"]}, "--route 0.0.0.0/0: would swallow"),
        ({"keepalive": "fast"}, "--keepalive fast: must be a number of seconds"),
        ({"keepalive": "inf"}, "--keepalive inf: must be at least 0.1"),
        ({"dead_after": "0.5"}, "--dead-after 0.5: must be more than keepalive (1)"),
        ({"rekey_after": 7200}, "--rekey-after 7200: must be at least 1 and at most 3600"),
        ({"key_file": ""}, "--key-file '': must be a file path"),
        ({"host": "x"}, "--host: only for `ctun vm`"),
        ({"nonsense": 1}, "--nonsense: not a setting"),
    ],
)
def test_flag_errors_name_the_flag(
    tmp_path: Path, overrides: dict[str, Any], expected: str
) -> None:
    path = write(tmp_path / "ctun.toml", "mtu = 1400\n")  # a file must not change the blame
    message = error_of(lambda: load_host_config(path, overrides))
    assert message.startswith(expected)


def test_flag_overlap_with_file_addr_blames_the_route(tmp_path: Path) -> None:
    path = write(tmp_path / "ctun.toml", 'addr = "10.5.0.1/16"\n')
    message = error_of(lambda: load_host_config(path, {"routes": ["10.5.3.0/24"]}))
    assert message.startswith("--route 10.5.3.0/24: overlaps the tunnel network 10.5.0.0/16")


def test_agent_flag_errors() -> None:
    env = {"CTUN_KEY": encode_key(KEY_A)}
    assert error_of(lambda: load_agent_config(None, {"routes": []}, env)).startswith(
        "--route: only for `ctun up`"
    )
    assert error_of(lambda: load_agent_config(None, {"host": "-x"}, env)).startswith(
        "--host -x: must be a host name"
    )


# --- reading the file ----------------------------------------------------------------------


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "ctun.toml", 'mtu = 1400\naddr = "10.0.0.1/24\n')
    message = error_of(lambda: load_host_config(path, {}))
    assert message.startswith(f"{path}: invalid TOML: ") and "line 2" in message


@pytest.mark.parametrize(
    "text", ["a = 1" + "0" * 5000, "a = " + "[" * 5000, "a = 1\na = 2", "= 1", "[peers"]
)
def test_toml_that_tomllib_rejects_oddly_is_still_a_config_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "ctun.toml", text)
    assert error_of(lambda: load_host_config(path, {})).startswith(f"{path}: invalid TOML: ")


def test_unreadable_config_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    assert error_of(lambda: load_host_config(missing, {})).startswith(
        f"{missing}: cannot read config file: No such file"
    )
    assert error_of(lambda: load_host_config(str(tmp_path), {})).startswith(
        f"{tmp_path}: cannot read config file"
    )
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"mtu = 1400\n\xff\xfe")
    assert "not UTF-8 text" in error_of(lambda: load_host_config(str(binary), {}))


@posix_only
def test_unreadable_default_config_is_not_silently_skipped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dangling = tmp_path / "ctun.toml"
    dangling.symlink_to(tmp_path / "gone")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", dangling)
    assert error_of(lambda: load_host_config(None, {})).startswith(f"{dangling}: cannot read")


def test_config_error_is_always_one_line() -> None:
    assert str(ConfigError("a\nb\rc\u2028d")) == "a\\nb\\rc\\u2028d"


# --- peers ---------------------------------------------------------------------------------


KEY = f'key = "{encode_key(KEY_B)}"'
ALLOWED = 'allowed = ["10.0.0.0/8"]'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"[peers.vm]\n{KEY}\n{ALLOWED}", "[peers.vm]: the VM agent's peer 'vm' is built in"),
        (f"[peers.Bad]\n{KEY}\n{ALLOWED}", "[peers.Bad]: a peer name is a lowercase letter"),
        (f'[peers."x y"]\n{KEY}', '[peers."x y"]: a peer name'),
        ("peers = 5", "peers = 5: must be tables"),
        ("peers.db = 5", "peers.db = 5: must be a table"),
        (f"[peers.db]\n{ALLOWED}", "[peers.db]: needs exactly one of key"),
        (f'[peers.db]\n{KEY}\nkey_file = "f"\n{ALLOWED}', "needs exactly one of"),
        (f"[peers.db]\n{KEY}", "[peers.db]: needs allowed = "),
        (f"[peers.db]\n{KEY}\nallowed = []", "peers.db.allowed = []: must list at least one"),
        (
            f'[peers.db]\n{KEY}\nallowed = ["10.0.0.1/8"]',
            'peers.db.allowed[0] = "10.0.0.1/8": has host bits set; use 10.0.0.0/8',
        ),
        (f'[peers.db]\n{KEY}\nallowed = ["10.0.0.0/8", "10.0.0.0/8"]', "peers.db.allowed[1]"),
        (f"[peers.db]\n{KEY}\n{ALLOWED}\nallow = 1", "[peers.db]: unknown key 'allow'"),
        (f"[peers.db]\nkey = 5\n{ALLOWED}", "peers.db.key: must be a string"),
        (f'[peers.db]\nkey = "c2VjcmV0"\n{ALLOWED}', "peers.db.key: not a key (expected 44"),
        (f'[peers.db]\nkey_file = "nope.key"\n{ALLOWED}', "nope.key: key file not found"),
    ],
)
def test_peer_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "ctun.toml", text + "\n")
    message = error_of(lambda: load_host_config(path, {}))
    assert expected in message and message.startswith(str(tmp_path))
    assert encode_key(KEY_B) not in message and "c2VjcmV0" not in message  # no secrets echoed


def test_peer_sharing_a_key_with_the_vm_is_rejected(isolated: Path, tmp_path: Path) -> None:
    isolated.mkdir(mode=0o700)
    write_key(isolated / "vm.key", KEY_A)
    path = write(
        tmp_path / "ctun.toml",
        f'[peers.db]\nkey = "{encode_key(KEY_A)}"\nallowed = ["10.0.0.0/8"]\n',
    )
    message = error_of(lambda: load_host_config(path, {}))
    assert message.startswith(f"{path}:2: peers.db.key: same key as peer 'vm'")
    assert "every peer needs its own key" in message


@posix_only
def test_inline_peer_key_needs_a_private_config_file(tmp_path: Path) -> None:
    text = f'[peers.db]\nkey = "{encode_key(KEY_B)}"\nallowed = ["10.0.0.0/8"]\n'
    path = write(tmp_path / "ctun.toml", text, mode=0o644)
    message = error_of(lambda: load_host_config(path, {}))
    assert message.startswith(f"{path}:2: peers.db.key: this file holds a key")
    assert f"chmod 600 {path}" in message
    Path(path).chmod(0o600)
    assert load_host_config(path, {}).peers[1].key == KEY_B


def test_bad_config_creates_no_key_file(isolated: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "ctun.toml", "mtu = 1\n")
    error_of(lambda: load_host_config(path, {}))
    assert not isolated.exists()


# --- key files -----------------------------------------------------------------------------


@posix_only
def test_load_or_create_key_creates_private_file_and_dirs(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "vm.key"
    old = os.umask(0o777)  # even a hostile umask must leave us a readable 0600 key
    try:
        key = load_or_create_key(path)
    finally:
        os.umask(old)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=\n", path.read_text())
    assert load_or_create_key(path) == key == read_key(path)
    assert [p.name for p in path.parent.iterdir()] == ["vm.key"]  # no temp files left


@posix_only
def test_load_or_create_key_leaves_existing_dirs_alone(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    load_or_create_key(tmp_path / "vm.key")
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_load_or_create_key_never_overwrites_a_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "vm.key"
    write(path, "garbage\n")
    message = error_of(lambda: load_or_create_key(path))
    assert message.startswith(f"{path}: not a key") and "delete it" in message
    assert path.read_text() == "garbage\n"


def test_read_key_never_creates(tmp_path: Path) -> None:
    path = tmp_path / "vm.key"
    assert error_of(lambda: read_key(path)).startswith(f"{path}: key file not found")
    assert not path.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty"),
        (b"\n", "empty"),
        (b"c2VjcmV0\n", "not a key (expected 44 base64 characters, got 8)"),
        (b"!" * 44, "not valid base64"),
        (b"AA=A" + b"A" * 40, "not valid base64"),
        (b"A" * 40 + b"====", "decodes to 30 bytes, expected 32"),
        (b"QUFB" * 11 + b"\n" + b"QUFB" * 11 + b"\n", "more than one line"),
        (b"\x00\xff" * 22, "binary data"),
    ],
)
def test_bad_key_files(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "vm.key"
    path.write_bytes(content)
    path.chmod(0o600)
    message = error_of(lambda: read_key(path))
    assert message.startswith(f"{path}: ") and expected in message


def test_key_file_tolerates_surrounding_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "vm.key"
    write(path, f"  {encode_key(KEY_A)}\r\n")
    assert read_key(path) == KEY_A


@posix_only
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write_key(tmp_path / "vm.key", KEY_A, mode)
    for load in (read_key, load_or_create_key):
        message = error_of(partial(load, path))
        assert message == (
            f"{path}: key file is accessible by other users (mode {mode:04o}); "
            f"run: chmod 600 {path}"
        )


@posix_only
def test_key_path_that_is_not_a_file(tmp_path: Path) -> None:
    assert "not a regular file" in error_of(lambda: read_key(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    assert "not a regular file" in error_of(lambda: read_key(fifo))  # and does not hang


def test_encode_key() -> None:
    assert len(encode_key(KEY_A)) == 44
    assert base64.b64decode(encode_key(KEY_A)) == KEY_A
    with pytest.raises(ValueError):
        encode_key(b"short")


# --- agent key precedence: --key-file > $CTUN_KEY > key_file in the file ---------------------


def test_agent_key_precedence(tmp_path: Path) -> None:
    flag_file = write_key(tmp_path / "flag.key", KEY_A)
    file_file = write_key(tmp_path / "file.key", KEY_B)
    env_key = bytes(32)
    path = write(tmp_path / "vm.toml", 'key_file = "file.key"\n')  # relative to the file
    env = {"CTUN_KEY": encode_key(env_key)}
    assert load_agent_config(path, {"key_file": str(flag_file)}, env).key == KEY_A
    assert load_agent_config(path, {}, env).key == env_key
    assert load_agent_config(path, {}, {}).key == KEY_B
    assert load_agent_config(None, {"key_file": str(file_file)}, {}).key == KEY_B


def test_agent_key_errors(tmp_path: Path) -> None:
    message = error_of(lambda: load_agent_config(None, {}, {"CTUN_STATE_DIR": "/srv/ctun"}))
    assert message == (
        "no key: pass --key-file FILE or set CTUN_KEY (the host's key is in /srv/ctun/vm.key)"
    )
    message = error_of(lambda: load_agent_config(None, {}, {"CTUN_KEY": "not-a-key"}))
    assert message.startswith("$CTUN_KEY: not a key") and "not-a-key" not in message
    assert error_of(lambda: load_agent_config(None, {}, {"CTUN_KEY": ""})).startswith(
        "$CTUN_KEY: empty"
    )
    missing = tmp_path / "missing.key"
    assert error_of(lambda: load_agent_config(None, {"key_file": str(missing)}, {})).startswith(
        f"{missing}: key file not found"
    )
    assert not missing.exists()  # the agent never makes keys


# --- properties ----------------------------------------------------------------------------

# Fixtures persist across examples here; that is fine, each example rewrites what it uses.
PROPERTY = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def check_host_invariants(cfg: HostConfig, overrides: Mapping[str, object]) -> None:
    t = cfg.tunnel
    assert 8 <= t.network.prefixlen <= 30
    assert t.host_address == t.vm_address + 1
    for a in (t.vm_address, t.host_address):
        assert a in t.network and a not in (t.network.network_address, t.network.broadcast_address)
    assert 576 <= t.mtu <= 9000
    assert re.fullmatch(r"ctun[a-z0-9_-]{0,11}", t.interface)
    assert IPv4Address(cfg.listen[0]) and 1 <= cfg.listen[1] <= 65535
    assert len(set(cfg.routes)) == len(cfg.routes)
    for r in cfg.routes:
        assert r.prefixlen > 0 and not r.overlaps(t.network)
    tm = cfg.timers
    assert 0.1 <= tm.keepalive < tm.dead_after <= 600
    assert 1 <= tm.rekey_after <= 3600 and 1 <= tm.handshake_skew <= 86400
    assert cfg.peers[0].name == "vm"
    assert all(len(p.key) == 32 for p in cfg.peers)
    assert len({p.key for p in cfg.peers}) == len({p.name for p in cfg.peers}) == len(cfg.peers)
    # Precedence: a flag that was accepted is what the config holds.
    if overrides.get("mtu") is not None:
        assert t.mtu == int(str(overrides["mtu"]))
    if overrides.get("routes") is not None:
        assert [str(r) for r in cfg.routes] == list(overrides["routes"])  # type: ignore[call-overload]


def to_toml(cfg: HostConfig) -> str:
    """What a user would write to get `cfg` back (its extra peers aside)."""
    t, tm = cfg.tunnel, cfg.timers
    return "\n".join(
        [
            f'addr = "{t.vm_address}/{t.network.prefixlen}"',
            f"mtu = {t.mtu}",
            f'interface = "{t.interface}"',
            f'listen = "{cfg.listen[0]}"',
            f"port = {cfg.listen[1]}",
            f'transport = "{cfg.transport}"',
            f"routes = {json.dumps([str(r) for r in cfg.routes])}",
            f"keepalive = {tm.keepalive!r}",
            f"dead_after = {tm.dead_after!r}",
            f"rekey_after = {tm.rekey_after!r}",
            f"handshake_skew = {tm.handshake_skew!r}",
        ]
    )


def check_round_trip(cfg: HostConfig, tmp_path: Path) -> None:
    again = load_host_config(write(tmp_path / "again.toml", to_toml(cfg)), {})
    assert (again.tunnel, again.listen, again.transport, again.routes, again.timers) == (
        cfg.tunnel,
        cfg.listen,
        cfg.transport,
        cfg.routes,
        cfg.timers,
    )


# A small TOML writer: enough for the values below, and tomli_w is not a dependency.
def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)  # int, float (repr spells inf and nan the TOML way)


def toml_doc(doc: Mapping[str, Any]) -> str:
    peers = doc.get("peers")
    tables = peers if isinstance(peers, dict) else {}
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if k != "peers" or not tables]
    for name, table in tables.items():
        lines.append(f"[peers.{json.dumps(name)}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


octet = st.integers(0, 255)
ipv4 = st.builds(lambda a, b, c, d: f"{a}.{b}.{c}.{d}", octet, octet, octet, octet)
cidr = st.builds(lambda ip, p: f"{ip}/{p}", ipv4, st.integers(0, 33))
nice_addr = st.sampled_from(["192.168.251.1/24", "10.33.0.5/16", "10.0.0.1/30", "172.31.9.1/28"])
nice_route = st.sampled_from(["172.17.0.0/16", "10.9.0.0/24", "192.168.251.0/24", "0.0.0.0/0"])
routes = st.lists(st.one_of(nice_route, cidr), max_size=4, unique=True)
junk = st.one_of(st.text(max_size=20), st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans())
seconds = st.one_of(st.floats(0, 700), st.integers(0, 4000))


def either(*options: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(options)


# Per key: values that are plausible (valid on their own, though combinations may still
# clash, e.g. a route inside the tunnel network) and values that are wrong.
peer_table = st.fixed_dictionaries(
    {"allowed": st.lists(st.one_of(nice_route, cidr), min_size=1, max_size=3)},
    optional={
        "key": either(encode_key(KEY_A), encode_key(KEY_B)),  # two peers may share one
        "key_file": either("peer.key", "missing.key"),
    },
)
bad_peer_table = st.fixed_dictionaries(
    {},
    optional={
        "allowed": st.one_of(st.lists(st.one_of(cidr, junk), max_size=2), junk),
        "key": st.one_of(st.text(max_size=50), junk),
        "key_file": either("bad.key", "missing.key"),
        "junk": junk,
    },
)
GOOD: dict[str, st.SearchStrategy[Any]] = {
    "addr": nice_addr,
    "port": st.integers(1, 65535),
    "listen": ipv4,
    "mtu": st.integers(576, 9000),
    "interface": st.from_regex(r"ctun[a-z0-9_-]{0,11}", fullmatch=True),
    "transport": either("udp", "tcp"),
    "routes": routes,
    "key_file": either("vm.key", "sub/dir/new.key"),
    "keepalive": st.one_of(either(0.1, 1, 2.5), st.floats(0.1, 60)),
    "dead_after": st.one_of(either(3, 30.0, 600), st.floats(60, 600)),
    "rekey_after": st.one_of(either(1, 120, 3600), st.floats(1, 3600)),
    "handshake_skew": st.one_of(either(1, 600, 86400), st.floats(1, 86400)),
    "peers": st.dictionaries(either("db", "laptop", "ci-1"), peer_table, max_size=3),
}
BAD: dict[str, st.SearchStrategy[Any]] = {
    "addr": st.one_of(cidr, ipv4, junk),
    "port": st.one_of(st.integers(-1, 70000), junk),
    "listen": st.one_of(either("::1", "localhost"), junk),
    "mtu": st.one_of(st.integers(500, 9100), junk),
    "interface": st.one_of(st.from_regex(r"ctun[a-z0-9_-]{0,13}", fullmatch=True), junk),
    "transport": st.one_of(either("Udp", "x y", ""), junk),
    "routes": st.one_of(st.lists(nice_route, min_size=2, max_size=3), st.lists(junk), junk),
    "key_file": st.one_of(either("bad.key", ""), junk),
    "keepalive": st.one_of(seconds, junk),
    "dead_after": st.one_of(seconds, junk),
    "rekey_after": st.one_of(seconds, junk),
    "handshake_skew": st.one_of(seconds, junk),
    "peers": st.one_of(
        st.dictionaries(st.one_of(either("vm", "db"), st.text()), bad_peer_table, max_size=2),
        junk,
    ),
}
# Half the documents are all plausible, so that the accepting path is well exercised.
host_doc = st.one_of(
    st.fixed_dictionaries({}, optional=GOOD),
    st.fixed_dictionaries({}, optional={k: st.one_of(GOOD[k], BAD[k]) for k in GOOD}),
)

flag_text = st.one_of(
    st.text(max_size=30), st.from_regex(r"-?[0-9]{1,6}(\.[0-9]{1,3})?", fullmatch=True)
)
# Flags arrive as the CLI parsed them: strings, or ints/floats/lists where it converted.
GOOD_FLAGS: dict[str, st.SearchStrategy[Any]] = {
    "addr": nice_addr,
    "port": st.one_of(st.integers(1, 65535), st.integers(1, 65535).map(str)),
    "listen": ipv4,
    "mtu": st.one_of(st.integers(576, 9000), st.integers(576, 9000).map(str)),
    "interface": either("ctun9", "ctun-x"),
    "routes": routes,
    "transport": either("udp", "tcp"),
    "keepalive": st.one_of(GOOD["keepalive"], GOOD["keepalive"].map(str)),
    "dead_after": st.one_of(GOOD["dead_after"], GOOD["dead_after"].map(str)),
    "rekey_after": st.one_of(GOOD["rekey_after"], GOOD["rekey_after"].map(str)),
}
BAD_FLAGS: dict[str, st.SearchStrategy[Any]] = {
    k: st.one_of(flag_text, junk, st.lists(flag_text, max_size=2), st.integers())
    for k in GOOD_FLAGS
}
# None is "flag not given".
overrides_st = st.one_of(
    st.fixed_dictionaries({}, optional=GOOD_FLAGS),
    st.fixed_dictionaries(
        {},
        optional={k: st.one_of(GOOD_FLAGS[k], BAD_FLAGS[k], st.none()) for k in GOOD_FLAGS},
    ),
)


def property_files(tmp_path: Path) -> None:
    """Key files the generated configs may point at, in the config's own directory."""
    if not (tmp_path / "peer.key").exists():
        write_key(tmp_path / "peer.key", bytes([7]) * 32)
        write(tmp_path / "bad.key", "nope\n")


@PROPERTY
@given(text=st.text(max_size=300))
def test_arbitrary_toml_text_only_raises_config_error(tmp_path: Path, text: str) -> None:
    assume("key_file" not in text)  # never let a generated file make keys outside tmp_path
    path = write(tmp_path / "ctun.toml", text)
    try:
        cfg = load_host_config(path, {})
    except ConfigError as exc:
        assert len(str(exc).splitlines()) == 1
    else:
        check_host_invariants(cfg, {})


@PROPERTY
@given(doc=host_doc, overrides=overrides_st)
def test_generated_host_configs(
    tmp_path: Path, doc: dict[str, object], overrides: dict[str, object]
) -> None:
    property_files(tmp_path)
    path = write(tmp_path / "ctun.toml", toml_doc(doc))
    try:
        cfg = load_host_config(path, overrides)
    except ConfigError as exc:
        assert len(str(exc).splitlines()) == 1
        event("rejected")
    else:
        event("accepted")  # --hypothesis-show-statistics: the accepting path gets exercised
        check_host_invariants(cfg, overrides)
        check_round_trip(cfg, tmp_path)


@PROPERTY
@given(overrides=overrides_st)
def test_arbitrary_overrides_only_raise_config_error(
    tmp_path: Path, overrides: dict[str, object]
) -> None:
    try:
        cfg = load_host_config(None, overrides)
    except ConfigError as exc:
        message = str(exc)
        assert len(message.splitlines()) == 1
        assert message.startswith("--")  # no file: every error is a flag's
        event("rejected")
    else:
        event("accepted")
        check_host_invariants(cfg, overrides)
        check_round_trip(cfg, tmp_path)


def test_control_group_and_offload_settings(tmp_path: Path) -> None:
    key = tmp_path / "vm.key"
    cfg = load_host_config(None, {"key_file": str(key)})
    assert cfg.control_group == "ctun" and cfg.tunnel.offload is True
    cfg = load_host_config(None, {"key_file": str(key), "control_group": "docker",
                                  "offload": False})
    assert cfg.control_group == "docker" and cfg.tunnel.offload is False
    with pytest.raises(ConfigError, match="--control-group"):
        load_host_config(None, {"key_file": str(key), "control_group": "Bad Group"})
