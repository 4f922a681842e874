"""docker-connector.conf read as is, its conversion to ctun TOML, the TOML forms of the keys it
brought (expose, accessors, links, hosts, proxy, loglevel, wire), and what a reload applies.
No root, no network: tmp files only."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from datetime import date
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from ctun.core import config, legacy_config
from ctun.core.config import (
    ConfigError,
    ExposeConfig,
    HostConfig,
    HostsSource,
    ProxyConfig,
    check_host_config,
    encode_key,
    load_agent_config,
    load_host_config,
    reload_host_config,
)
from ctun.lab.topology import CONTAINER_SUBNET, Lab, offload_args
from ctun.lab.tunnel import HOST_IF, Tunnel, reachable, status, wait_up
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DATA = Path(__file__).parent / "data"
SAMPLE = DATA / "docker-connector.conf"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Keep every test away from /etc/ctun and /var/lib/ctun."""
    state = tmp_path / "state"
    monkeypatch.setenv("CTUN_STATE_DIR", str(state))
    monkeypatch.delenv("CTUN_KEY", raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "ctun.toml")
    return state


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return str(path)


def error_of(path: str, overrides: dict[str, object] | None = None) -> str:
    """The ConfigError loading `path` raises, checked to be one line without a traceback."""
    with pytest.raises(ConfigError) as info:
        load_host_config(path, overrides or {})
    message = str(info.value)
    assert message and len(message.splitlines()) == 1, message
    assert "Traceback" not in message
    return message


def without_source(cfg: HostConfig) -> HostConfig:
    return dataclasses.replace(cfg, source=None)


# --- the sample file -----------------------------------------------------------------------


def directives_in(path: Path) -> set[str]:
    found = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            found.add(line.split()[0])
    return found


def test_sample_uses_every_directive() -> None:
    assert directives_in(SAMPLE) == set(legacy_config.DIRECTIVES)
    text = SAMPLE.read_text()
    # ... and every form: route with expose, link and unlink, a trailing comment, bare
    # subnet addresses as docker-connector writes them.
    assert re.search(r"^route \S+ expose$", text, re.M)
    assert re.search(r"^iptables [\d.]+\+[\d.]+$", text, re.M)
    assert re.search(r"^iptables \S+-\S+$", text, re.M)
    assert re.search(r"^\S+ \S+ +# ", text, re.M)


def test_sample_loads_every_key(isolated: Path) -> None:
    cfg = load_host_config(str(SAMPLE), {})
    t = cfg.tunnel
    assert (t.network, t.vm_address, t.host_address) == (
        IPv4Network("192.168.251.0/24"), IPv4Address("192.168.251.1"),
        IPv4Address("192.168.251.2"))
    assert t.mtu == 1400
    assert cfg.listen == ("127.0.0.1", 2511)
    assert cfg.loglevel == "warning"  # `warn`, as docker-connector users write it
    assert cfg.routes == tuple(map(IPv4Network, ["172.100.0.0/16", "172.18.0.0/16",
                                                 "10.9.0.0/24"]))
    assert cfg.expose == ExposeConfig(("0.0.0.0", 2512),
                                      (IPv4Network("172.18.0.0/16"), IPv4Network("10.9.0.0/24")),
                                      pong=True)
    accessors = {p.name: p for p in cfg.peers if p.ip is not None}
    assert {n: str(p.ip) for n, p in accessors.items()} == {
        "win10": "192.168.251.3", "mac": "192.168.251.4"}
    assert accessors["win10"].allowed == (IPv4Network("192.168.251.3/32"),)
    # 172.63.79.0+172.21.81.0 was unlinked again (written the other way round).
    assert cfg.links == (
        (IPv4Network("172.18.0.0/16"), IPv4Network("172.19.0.0/16")),
        (IPv4Network("172.22.0.0/32"), IPv4Network("172.23.0.0/32")),
    )
    assert cfg.hosts == (HostsSource(DATA / "hosts.sample", (".local", ".internal")),)
    assert cfg.proxies == (
        ProxyConfig(("127.0.0.1", 5432), 5432),
        ProxyConfig(("127.0.0.1", 6379), 16379),
        ProxyConfig(("10.0.0.5", 80), 8080),
    )
    assert cfg.wire == "ctun"  # legacy wire mode is never implied by the file's format


def test_tokens_become_keyed_peers_with_key_files_made_like_vm_key(isolated: Path) -> None:
    cfg = load_host_config(str(SAMPLE), {})
    for name in ("win10", "mac"):
        key_file = isolated / "peers" / f"{name}.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        peer = next(p for p in cfg.peers if p.name == name)
        assert encode_key(peer.key) == key_file.read_text().strip()
        assert peer.origin == "config"
    assert len({p.key for p in cfg.peers}) == 3
    # Loading again keeps them.
    again = load_host_config(str(SAMPLE), {})
    assert again == cfg


def test_flags_still_override_a_legacy_file() -> None:
    cfg = load_host_config(str(SAMPLE), {"mtu": "1500", "routes": ["10.50.0.0/16"]})
    assert cfg.tunnel.mtu == 1500 and cfg.routes == (IPv4Network("10.50.0.0/16"),)


def test_check_host_config_touches_no_key_file(isolated: Path) -> None:
    cfg = check_host_config(str(SAMPLE))
    assert not isolated.exists()
    assert {p.name for p in cfg.peers} == {"vm", "win10", "mac"}
    loaded = load_host_config(str(SAMPLE), {})
    strip = [dataclasses.replace(p, key=b"") for p in loaded.peers]
    assert dataclasses.replace(loaded, peers=tuple(strip)) == cfg


# --- conversion ----------------------------------------------------------------------------


def convert(path: Path) -> str:
    return legacy_config.to_toml(check_host_config(str(path)), str(path),
                                 config.default_state_dir(), date(2026, 1, 2))


def test_converted_toml_loads_to_the_same_config(tmp_path: Path) -> None:
    text = convert(SAMPLE)
    assert not legacy_config.looks_legacy(text)
    # Elsewhere on purpose: the relative hosts file must not depend on the folder.
    out = tmp_path / "elsewhere" / "ctun.toml"
    out.parent.mkdir()
    converted = load_host_config(write(out, text), {})
    assert without_source(load_host_config(str(SAMPLE), {})) == without_source(converted)


def test_converted_toml_is_readable(isolated: Path) -> None:
    text = convert(SAMPLE)
    lines = text.splitlines()
    assert lines[0] == f"# ctun configuration converted from {SAMPLE} on 2026-01-02"
    keys = [line.split(" = ")[0] for line in lines if re.match(r"^[a-z_]+ = ", line)]
    assert keys[:4] == ["addr", "mtu", "listen", "port"]
    assert text.index("[expose]") < text.index("[[hosts]]") < text.index("[peers.win10]")
    key_file = isolated / "peers" / "win10.key"
    comment = text[:text.index("[peers.win10]")].rsplit("\n\n", 1)[1]
    assert f"# token win10: an accessor with its own key, kept in {key_file}" in comment
    assert "172.22.0.0+172.23.0.0" in text  # bare addresses stay bare
    assert "key =" not in text  # never a secret in a converted file


@pytest.mark.parametrize("text", [
    "addr 10.33.0.5/16\nroute 172.20.0.0/16 expose\nexpose :4000\n",
    "mtu 9000\nhost 0.0.0.0\nport 4000\npong off\nloglevel DEBUG\n",
    'token a-1 192.168.251.200\nhosts "my hosts" local\nproxy 8080:80\n',
    "iptables 10.1.0.0/16-10.2.0.0/16\niptables 10.3.0.1+10.4.0.0/16\n",
    "# only a comment, then one directive\n\nport 2600\n",
])
def test_round_trip_of_smaller_files(tmp_path: Path, text: str) -> None:
    conf = Path(write(tmp_path / "docker-connector.conf", text))
    (tmp_path / "my hosts").write_text("127.0.0.1 a.local\n")
    out = tmp_path / "sub" / "out.toml"
    out.parent.mkdir()
    converted = load_host_config(write(out, convert(conf)), {})
    assert without_source(load_host_config(str(conf), {})) == without_source(converted)


def ctun(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CTUN_STATE_DIR": str(state)}
    return subprocess.run([sys.executable, "-m", "ctun", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_cli_config_import(tmp_path: Path, isolated: Path) -> None:
    result = ctun("config", "import", str(SAMPLE), state=isolated)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# ctun configuration converted from ")
    assert not isolated.exists()  # no root needed, no key file made

    out = tmp_path / "ctun.toml"
    result = ctun("config", "import", str(SAMPLE), "-o", str(out), state=isolated)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == result_text(isolated)
    converted = load_host_config(str(out), {})
    assert without_source(converted) == without_source(load_host_config(str(SAMPLE), {}))

    out.write_text("keep me\n")
    refused = ctun("config", "import", str(SAMPLE), "-o", str(out), state=isolated)
    assert refused.returncode == 2 and out.read_text() == "keep me\n"
    assert refused.stderr.strip() == (f"ctun config: error: {out} exists; pass --force to "
                                      f"overwrite it")
    forced = ctun("config", "import", str(SAMPLE), "-o", str(out), "--force", state=isolated)
    assert forced.returncode == 0 and out.read_text().startswith("# ctun configuration")

    toml_again = ctun("config", "import", str(out), state=isolated)
    assert toml_again.returncode == 2 and "already ctun TOML" in toml_again.stderr


def result_text(state: Path) -> str:
    return ctun("config", "import", str(SAMPLE), state=state).stdout


def test_cli_config_import_of_a_bad_file_is_one_line(tmp_path: Path, isolated: Path) -> None:
    bad = write(tmp_path / "docker-connector.conf", "addr 192.168.251.1/24\nrout 10.0.0.0/8\n")
    result = ctun("config", "import", bad, state=isolated)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"ctun config: error: {bad}:2: rout 10.0.0.0/8: unknown "
                             f"directive 'rout'; did you mean 'route'?\n")
    missing = ctun("config", "import", str(tmp_path / "nope.conf"), state=isolated)
    assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1
    assert "cannot read config file" in missing.stderr


# --- malformed lines: one line each, with the file and line number --------------------------

PRELUDE = "# docker-connector.conf\nroute 172.100.0.0/16   # the first directive\n"
MALFORMED = [
    ("rout 172.18.0.0/16", "unknown directive 'rout'; did you mean 'route'?"),
    ("Route 172.18.0.0/16", "did you mean 'route'?"),
    ("frobnicate 1", "unknown directive 'frobnicate'; use one of addr, expose, host, hosts"),
    ("mtu 99999", "mtu 99999: must be between 576 and 9000; write it like: mtu 1400"),
    ("mtu big", "must be a whole number between 576 and 9000"),
    ("mtu 1400 1500", "mtu takes one value; write it like: mtu 1400"),
    ("port 0", "must be between 1 and 65535; write it like: port 2511"),
    ("port 2511x", "must be a whole number between 1 and 65535"),
    ("addr 192.168.251.1", 'needs a prefix length, like "192.168.251.1/24"'),
    ("addr 192.168.251.0/24", "network address of 192.168.251.0/24"),
    ("addr 10.0.0.1/31", "prefix length must be between /8 and /30"),
    ("addr 127.0.0.1/8", "loopback"),
    ("host localhost", "must be an IPv4 address to listen on"),
    ("route 172.18.0.1/16", "has host bits set; use 172.18.0.0/16"),
    ("route 192.168.251.0/25", "overlaps the tunnel network 192.168.251.0/24"),
    ("route 0.0.0.0/0", "would swallow the host's default route"),
    ("route 224.0.0.0/8", "multicast"),
    ("route 172.18.0.0/16 share", "'share' after a route: the only word allowed there"),
    ("route 172.100.0.0/16 expose", "172.100.0.0/16 is routed twice (first on line 2)"),
    ("route", "route takes 1 or 2 values; write it like: route 172.18.0.0/16 expose"),
    ("expose 0.0.0.0", 'must be an IPv4 address and a port, like "0.0.0.0:2512"'),
    ("expose 0.0.0.0:99999", "the port must be between 1 and 65535"),
    ("expose 0.0.0.0:2511", "clashes with where the VM side's frames arrive"),
    ("expose 0.0.0.0:2512 now", "'now' after the expose address: only restart may follow"),
    ("token win10", "token takes 2 values; write it like: token laptop 192.168.251.10"),
    ("token Win10 192.168.251.3", "a peer name is a lowercase letter"),
    ("token vm 192.168.251.3", "the VM agent's peer 'vm' is built in"),
    ("token pc 10.0.0.3", "outside the tunnel network 192.168.251.0/24 (addr)"),
    ("token pc 192.168.251.2", "is this host's tunnel address; pick a free address"),
    ("token pc 192.168.251.255", "broadcast address"),
    ("token a 192.168.251.3\ntoken b 192.168.251.3", "is also peer 'a''s address"),
    ("token a 192.168.251.3\ntoken a 192.168.251.4", "token a is given twice (first on line 3)"),
    ("iptables 172.18.0.0", "a link is two subnets written A+B (A-B unlinks)"),
    ("iptables 172.18.0.0+172.18.0.0", "links 172.18.0.0/32 with itself"),
    ("iptables 172.18.0.0/16+172.18.5.0/24", "overlap; a link joins two separate subnets"),
    ("iptables 172.18.0.0+bogus", "'bogus' is not a subnet"),
    ("iptables 172.18.0.1/16+172.19.0.0/16", "has host bits set; use 172.18.0.0/16"),
    ("hosts /etc/hosts", "hosts takes at least 2 values"),
    ("hosts /etc/hosts bad!suffix", "must be the end of a DNS name"),
    ("hosts /etc/hosts a b c d e f g h i", "more than 8 suffixes in all"),
    ("hosts /etc/hosts ." + "x" * 40, "longer than 40 characters"),
    ('hosts "C:\\My hosts .local', "a quote without its partner"),
    ("proxy 70000", "'70000' is not a port (1..65535)"),
    ("proxy localhost:80", "'localhost' is not an IPv4 address"),
    ("proxy 1:2:3:4", "must be [IP:]PORT[:PORT]"),
    ("proxy 5432\nproxy 6000:5432", "listening port 5432 is already proxied by line 3"),
    ("proxy 0.0.0.0:80", "0.0.0.0 is no service address"),
    ("loglevel loud", "must be one of debug, info, warning, error; write it like: loglevel"),
    ("pong maybe", "pong takes on or off, not 'maybe'"),
    ("mtu 1400\nmtu 1500", "mtu is set twice (first on line 3); keep one of the two lines"),
    ("mtu = 1500", "TOML syntax in a docker-connector.conf; write it the docker-connector "
                   "way, like: mtu 1400"),
    ("[peers.x]", "TOML syntax in a docker-connector.conf"),
]


@pytest.mark.parametrize(("case", "expected"), MALFORMED, ids=[c for c, _ in MALFORMED])
def test_malformed_line(tmp_path: Path, case: str, expected: str) -> None:
    text = PRELUDE + case + "\niptables 10.20.0.0+10.21.0.0\n"  # a good line after it
    path = write(tmp_path / "docker-connector.conf", text)
    bad_line = case.splitlines()[-1]
    number = PRELUDE.count("\n") + len(case.splitlines())
    message = error_of(path)
    assert message.startswith(f"{path}:{number}: {bad_line}: "), message
    assert expected in message
    # "<what is wrong>; <what to write instead>"
    assert "; " in message.split(f"{bad_line}: ", 1)[1]


def test_enough_distinct_malformed_lines() -> None:
    assert len({case for case, _ in MALFORMED}) >= 20


def test_long_and_odd_lines_are_shown_clipped_and_escaped(tmp_path: Path) -> None:
    path = write(tmp_path / "c.conf", "mtu 1400\nroute " + "1" * 200 + "\n")
    message = error_of(path)
    assert message.startswith(f"{path}:2: route 1111") and "... : " not in message
    assert len(message) < 300
    path = write(tmp_path / "c.conf", "mtu 1400\nroute \x1b[31m\n")
    message = error_of(path)
    assert "\x1b" not in message and "\\x1b" in message


def test_comments_blank_lines_crlf_and_bom(tmp_path: Path) -> None:
    text = "\ufeff# header\r\n\r\n   # indented comment\r\nmtu 1500 # trailing\r\n\r\n" \
           "route 172.18.0.0/16 expose   #share it\r\n"
    cfg = load_host_config(write(tmp_path / "c.conf", text), {})
    assert cfg.tunnel.mtu == 1500 and cfg.expose.routes == (IPv4Network("172.18.0.0/16"),)


def test_a_bad_line_after_crlf_keeps_its_number(tmp_path: Path) -> None:
    path = write(tmp_path / "c.conf", "mtu 1500\r\n\x0c\r\nport 0\r\n")
    assert error_of(path).startswith(f"{path}:3: port 0: ")


@pytest.mark.parametrize(("text", "legacy"), [
    ("addr 192.168.251.1/24\n", True),
    ("# comment\n\n  route 172.18.0.0/16 expose\n", True),
    ("\ufeffmtu 1400", True),
    ('addr = "192.168.251.1/24"\n', False),
    ('addr="192.168.251.1/24"\n', False),
    ("# comment\n[peers.db]\n", False),
    ("mtu\n", False),  # no value: not docker-connector's either; TOML says where
    ("", False),
    ("# only comments\n", False),
])
def test_format_is_told_by_content(text: str, legacy: bool) -> None:
    assert legacy_config.looks_legacy(text) is legacy


def test_the_vm_side_refuses_a_docker_connector_conf() -> None:
    with pytest.raises(ConfigError, match=r"docker-connector\.conf is the host's config"):
        load_agent_config(str(SAMPLE), {}, {"CTUN_KEY": encode_key(bytes(32))})


LEGACY_LINE = st.one_of(
    st.text(max_size=60).map(lambda t: t.replace("\n", " ")),
    st.builds(lambda d, v: f"{d} {v}", st.sampled_from(sorted(legacy_config.DIRECTIVES)),
              st.text(st.characters(codec="utf-8", blacklist_characters="\n"),
                      max_size=40)),
    st.builds(lambda d, a, b: f"{d} {a} {b}", st.sampled_from(["route", "token", "hosts",
                                                               "iptables", "proxy"]),
              st.from_regex(r"[0-9./+:-]{1,20}", fullmatch=True),
              st.sampled_from(["expose", "192.168.251.9", ".local", "x"])),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LEGACY_LINE, min_size=1, max_size=6))
def test_arbitrary_legacy_lines_only_raise_one_line_config_errors(
    tmp_path: Path, lines: list[str]
) -> None:
    path = write(tmp_path / "c.conf", "mtu 1400\n" + "\n".join(lines) + "\n")
    try:
        cfg = load_host_config(path, {})
    except ConfigError as exc:
        message = str(exc)
        assert len(message.splitlines()) == 1
        assert message.startswith(f"{path}:") or message.startswith(str(tmp_path))
    else:
        assert 576 <= cfg.tunnel.mtu <= 9000


# --- the TOML forms of the new keys --------------------------------------------------------

def toml_ok(tmp_path: Path, text: str) -> HostConfig:
    return load_host_config(write(tmp_path / "ctun.toml", text), {})


def test_toml_forms_of_every_new_key(tmp_path: Path, isolated: Path) -> None:
    cfg = toml_ok(tmp_path, """
loglevel = "WARN"
wire = "legacy"
links = ["172.19.0.0/16+172.18.0.0/16", "10.1.0.0/16+10.2.0.1"]
proxy = ["127.0.0.1:5432:5432", "8080", "6000:16000", "10.0.0.7:80"]

[expose]
listen = "0.0.0.0:2512"
routes = ["172.18.0.0/16"]
pong = false

[[hosts]]
file = "hosts"
suffixes = [".LOCAL", "internal"]

[[hosts]]
file = "/etc/hosts"
suffixes = [".local"]

[peers.alice]
ip = "192.168.251.10"

[peers.bob]
ip = "192.168.251.11"
allowed = ["192.168.251.11/32", "10.77.0.0/16"]
""")
    assert cfg.loglevel == "warning" and cfg.wire == "legacy"
    assert cfg.links == (
        (IPv4Network("10.1.0.0/16"), IPv4Network("10.2.0.1/32")),
        (IPv4Network("172.18.0.0/16"), IPv4Network("172.19.0.0/16")),
    )
    assert cfg.proxies == (
        ProxyConfig(("127.0.0.1", 5432), 5432), ProxyConfig(("127.0.0.1", 8080), 8080),
        ProxyConfig(("127.0.0.1", 6000), 16000), ProxyConfig(("10.0.0.7", 80), 80))
    assert cfg.expose == ExposeConfig(("0.0.0.0", 2512), (IPv4Network("172.18.0.0/16"),))
    assert cfg.hosts == (HostsSource(tmp_path / "hosts", (".local", "internal")),
                         HostsSource(Path("/etc/hosts"), (".local",)))
    alice, bob = cfg.peers[1:]
    assert (alice.ip, alice.allowed) == (IPv4Address("192.168.251.10"),
                                         (IPv4Network("192.168.251.10/32"),))
    assert bob.allowed == (IPv4Network("192.168.251.11/32"), IPv4Network("10.77.0.0/16"))
    assert (isolated / "peers" / "alice.key").exists()


def test_new_keys_default_off(tmp_path: Path) -> None:
    cfg = toml_ok(tmp_path, "mtu = 1400\n")
    assert (cfg.expose, cfg.links, cfg.hosts, cfg.proxies, cfg.loglevel, cfg.wire) == (
        ExposeConfig(), (), (), (), None, "ctun")


def test_accessor_with_its_own_key(tmp_path: Path, isolated: Path) -> None:
    key = encode_key(bytes(range(1, 33)))
    cfg = toml_ok(tmp_path, f'[peers.carol]\nip = "192.168.251.12"\nkey = "{key}"\n')
    assert encode_key(cfg.peers[1].key) == key
    assert not (isolated / "peers").exists()


TOML_ERRORS = [
    ('[expose]\nlisten = "0.0.0.0"', 'expose.listen = "0.0.0.0": must be an IPv4 address and a'),
    ('[expose]\nlisten = "::1:2512"', "must be an IPv4 address and a port"),
    ("[expose]\nlisten = 2512", 'expose.listen = 2512: must be a string, like "0.0.0.0:2512"'),
    ('[expose]\nlisten = "0.0.0.0:2511"', "clashes with where the VM side's frames arrive"),
    ('[expose]\nroutes = ["192.168.251.0/24"]', 'expose.routes[0] = "192.168.251.0/24": '
                                                "overlaps the tunnel network"),
    ('[expose]\nroutes = ["127.0.0.0/16"]', "loopback"),
    ('[expose]\nroutes = ["10.0.0.0/8", "10.0.0.0/8"]', "expose.routes[1]"),
    ("[expose]\nroutes = [" + ", ".join(f'"10.{i}.0.0/16"' for i in range(41)) + "]",
     "more than 40 networks"),
    ('[expose]\npong = "on"', 'expose.pong = "on": must be true or false'),
    ("[expose]\npang = true", "[expose]: unknown key 'pang' (known: listen, pong, routes); "
                              "did you mean 'pong'?"),
    ("expose = 1", "expose = 1: must be a table"),
    ('links = ["172.18.0.0/16"]', "a link is two subnets written A+B, like"),
    ('links = ["172.18.0.0/16-172.19.0.0/16"]', "a link is two subnets written A+B, like"),
    ('links = ["172.18.0.0/16+172.18.0.0/16"]', "links 172.18.0.0/16 with itself"),
    ('links = ["172.18.0.0/16+172.18.1.0/24"]', "overlap"),
    ('links = ["172.18.0.0/16+192.168.251.0/28"]', "overlaps the tunnel network"),
    ('links = ["172.18.0.0/16+172.19.0.0/16", "172.19.0.0/16+172.18.0.0/16"]',
     'links[1] = "172.19.0.0/16+172.18.0.0/16": listed twice'),
    ("links = [" + ", ".join(f'"10.{i}.0.0/16+10.99.{i}.0/24"' for i in range(17)) + "]",
     "links[16] = \"10.16.0.0/16+10.99.16.0/24\": more than 16 links"),
    ("links = [5]", "links[0] = 5: must be a string"),
    ('links = ["0.0.0.0/0+10.0.0.0/8"]', "is every address"),
    ('[hosts]\nfile = "/etc/hosts"', "must be [[hosts]] tables"),
    ("[[hosts]]\nsuffixes = [\".local\"]", "needs file = \"/etc/hosts\" and suffixes"),
    ('[[hosts]]\nfile = "/etc/hosts"\nsuffixes = []', "must list at least one suffix"),
    ('[[hosts]]\nfile = "/etc/hosts"\nsuffixes = ["a b"]', "must be the end of a DNS name"),
    ('[[hosts]]\nfile = "/etc/hosts"\nsuffixes = ["' + "a" * 41 + '"]', "longer than 40"),
    ('[[hosts]]\nfile = "/etc/hosts"\nsuffixes = [".a", ".a"]', "hosts[0].suffixes[1]"),
    ('[[hosts]]\nfile = "/etc/hosts"\nsuffixes = [".a", ".b", ".c", ".d", ".e"]\n'
     '[[hosts]]\nfile = "/etc/h2"\nsuffixes = [".f", ".g", ".h", ".i"]',
     'hosts[1].suffixes[3] = ".i": more than 8 suffixes in all'),
    ('[[hosts]]\nfile = "/etc/hosts"\nsuffixes = [".a"]\n[[hosts]]\nfile = "/etc/hosts"\n'
     'suffixes = [".b"]', "hosts[1].file"),
    ('[[hosts]]\nfile = ""\nsuffixes = [".a"]', "must be a file path"),
    ('[[hosts]]\nfile = "/etc/hosts"\nsuffixes = [".a"]\nsufixes = 1', "did you mean 'suffixes'?"),
    ('proxy = "8080"', "must be a list of strings"),
    ("proxy = [8080]", 'proxy[0] = 8080: must be a string, like "127.0.0.1:5432:5432" or'),
    ('proxy = ["8080", "127.0.0.1:9090:8080"]', "proxy[1] = \"127.0.0.1:9090:8080\": listening "
                                                "port 8080 is already proxied by proxy[0]"),
    ('proxy = ["0"]', "'0' is not a port"),
    ('proxy = ["65535", "1:65535"]', "is already proxied by proxy[0]; give this proxy another, "
                                     "like 127.0.0.1:1:1024"),
    ('proxy = ["fe80::1:80"]', "must be [IP:]PORT[:PORT]"),
    ('proxy = ["224.0.0.1:80"]', "224.0.0.1 is no service address"),
    ('listen = "0.0.0.0"\nproxy = ["2511"]', "listening port 2511 is ctun's own"),
    ('loglevel = "loud"', 'loglevel = "loud": must be one of debug, info, warning, error'),
    ("loglevel = 3", "must be a string"),
    ('wire = "docker-connector"', 'must be "ctun" (the default) or "legacy"'),
    ('[peers.alice]\nip = "10.0.0.1"', 'peers.alice.ip = "10.0.0.1": outside the tunnel network'),
    ('[peers.alice]\nip = "192.168.251.1"', "is the VM side's tunnel address"),
    ('[peers.alice]\nip = "192.168.251.0"', "is the network address of the tunnel"),
    ('[peers.alice]\nip = "nope"', "must be an IPv4 address in the tunnel network, like "
                                   '"192.168.251.3"'),
    ('[peers.a]\nip = "192.168.251.3"\n[peers.b]\nip = "192.168.251.3"',
     "peers.b.ip = \"192.168.251.3\": is also peer 'a''s address; every accessor needs its "
     "own, like 192.168.251.4"),
    ('[peers.a]\nip = "192.168.251.3"\nallowed = ["10.0.0.0/8"]',
     "must include the peer's own ip 192.168.251.3"),
    ('[peers.a]\nip = "192.168.251.3"\nkey = "x"\nkey_file = "y"', "needs at most one of key"),
    ('[peers.host]\nip = "192.168.251.3"', "[peers.host]: the name 'host' is reserved"),
]


@pytest.mark.parametrize(("text", "expected"), TOML_ERRORS)
def test_toml_errors_of_new_keys(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "ctun.toml", text + "\n")
    message = error_of(path)
    assert re.match(re.escape(path) + r":\d+: ", message), message
    assert expected in message


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"wire": "legacy"}, None),
    ({"wire": "bogus"}, '--wire bogus: must be "ctun" (the default) or "legacy"'),
])
def test_wire_flag(overrides: dict[str, object], expected: str | None) -> None:
    if expected is None:
        assert load_host_config(None, overrides).wire == "legacy"
    else:
        with pytest.raises(ConfigError) as info:
            load_host_config(None, overrides)
        assert str(info.value).startswith(expected)


def test_agent_wire(tmp_path: Path) -> None:
    assert load_agent_config(None, {"wire": "legacy"}, {}).key == b""  # no key to read
    path = write(tmp_path / "vm.toml", 'wire = "legacy"\n')
    assert load_agent_config(path, {}, {}).wire == "legacy"
    with pytest.raises(ConfigError, match="no key"):
        load_agent_config(None, {"wire": "ctun"}, {})
    key = encode_key(bytes(32))
    assert load_agent_config(None, {}, {"CTUN_KEY": key}).wire == "ctun"


# --- reload: what a running daemon takes, what waits for a restart --------------------------

BASE = """\
addr 192.168.251.1/24
route 172.18.0.0/16
loglevel info
"""


@pytest.mark.parametrize("added", [
    "route 172.19.0.0/16 expose",
    "token pc 192.168.251.9",
    "expose 0.0.0.0:2512",
    "pong on",
    "iptables 172.18.0.0+172.19.0.0",
    "hosts /etc/hosts .local",
    "proxy 5432",
])
def test_reload_applies_without_restart(tmp_path: Path, added: str) -> None:
    path = tmp_path / "docker-connector.conf"
    write(path, BASE)
    current = load_host_config(str(path), {})
    write(path, BASE + added + "\n")
    applied, pending = reload_host_config(current)
    assert pending == []
    assert without_source(applied) == without_source(load_host_config(str(path), {}))
    assert applied != current


def test_reload_applies_loglevel_and_removals(tmp_path: Path) -> None:
    path = tmp_path / "docker-connector.conf"
    write(path, BASE + "token pc 192.168.251.9\nproxy 5432\n")
    current = load_host_config(str(path), {})
    write(path, "addr 192.168.251.1/24\nloglevel debug\n")
    applied, pending = reload_host_config(current)
    assert pending == []
    assert applied.loglevel == "debug" and applied.routes == () and applied.proxies == ()
    assert [p.name for p in applied.peers] == ["vm"]


@pytest.mark.parametrize(("change", "needs"), [
    ("mtu 1500", ["tunnel"]),
    ("addr 10.9.0.1/24", ["tunnel"]),
    ("port 2600", ["listen"]),
    ("host 0.0.0.0", ["listen"]),
])
def test_reload_names_what_waits_for_a_restart(tmp_path: Path, change: str,
                                               needs: list[str]) -> None:
    path = tmp_path / "docker-connector.conf"
    write(path, BASE)
    current = load_host_config(str(path), {})
    write(path, BASE.replace("addr 192.168.251.1/24\n", "") + change + "\n")
    applied, pending = reload_host_config(current)
    assert pending == needs
    assert (applied.tunnel, applied.listen) == (current.tunnel, current.listen)


def test_reload_toml_only_settings_that_wait(tmp_path: Path) -> None:
    path = tmp_path / "ctun.toml"
    write(path, "mtu = 1400\n")
    current = load_host_config(str(path), {})
    write(path, 'wire = "legacy"\ntransport = "udp"\nkeepalive = 2\ndead_after = 10\n'
                'control_group = "wheel"\n')
    applied, pending = reload_host_config(current)
    assert pending == ["transport", "timers", "control_group", "wire"]
    assert applied.wire == "ctun" and applied.timers == current.timers


def test_reload_of_a_bad_line_raises_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "docker-connector.conf"
    write(path, BASE)
    current = load_host_config(str(path), {})
    before = dataclasses.replace(current)
    write(path, BASE + "route 172.19.0.0/16\nmtu 99999\n")
    with pytest.raises(ConfigError) as info:
        reload_host_config(current)
    assert str(info.value).startswith(f"{path}:5: mtu 99999: must be between 576 and 9000")
    assert current == before  # frozen: the caller keeps running it
    assert config.RELOADABLE == ("routes", "docker", "peers", "expose", "links", "hosts",
                                 "proxies", "loglevel")


# --- Done-when 1 in the namespace lab: a running daemon and every malformed line ------------

LAB_CONTAINERS = 1


@pytest.mark.root
def test_every_malformed_line_leaves_the_daemon_on_its_last_good_config(lab: Lab) -> None:
    """Each malformed line, saved into the running daemon's docker-connector.conf, is
    reported with its file and line while the tunnel keeps carrying traffic on the last
    good config; the fixed file is taken again."""
    path = lab.workdir / "docker-connector.conf"
    # The file says where to listen: a --listen flag would hide its `host` line.
    good = PRELUDE + f"route {CONTAINER_SUBNET}\nhost {lab.host_underlay}\n"
    save_as_editor(path, good)
    # Not lab.start_daemon(): its flags would hide the file's route and host.
    daemon = lab.spawn(lab.host_ns, [
        sys.executable, "-m", "ctun", "up", "--no-ui", "--no-docker", "--key-file",
        str(lab.key_file), "--config", str(path), *offload_args()], "daemon")
    tunnel = Tunnel(lab, daemon, lab.start_agent())
    try:
        wait_up(lab)
        lab.wait_until(lambda: reachable(lab), 5, what="the container over the tunnel")

        def error() -> str:
            part = status(lab, HOST_IF).get("config") or {}
            return (part.get("error") if isinstance(part, dict) else None) or ""

        def reports(where: str) -> bool:
            return error().startswith(where)

        started = time.monotonic()
        for case, _expected in MALFORMED:
            number = good.count("\n") + len(case.splitlines())
            where = f"{path}:{number}: {case.splitlines()[-1]}: "
            save_as_editor(path, good + case + "\n")
            lab.wait_until(partial(reports, where), 3, interval=0.05,
                           what=f"the daemon to report {where!r}")
            assert "\n" not in error()
            assert reachable(lab), f"traffic stopped after {case!r}"
            assert daemon.poll() is None
        save_as_editor(path, good)
        lab.wait_until(lambda: not error(), 3, what="the error to clear")
        assert reachable(lab)
        print(f"\n{len(MALFORMED)} malformed lines each reported by the running daemon with "
              f"file and line in {time.monotonic() - started:.1f} s; traffic never stopped")
        log = lab.log("daemon")
        assert "Traceback" not in log, log
    finally:
        Lab.stop(tunnel.agent)
        Lab.stop(tunnel.daemon)


def save_as_editor(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")  # write aside, rename over: how editors save
    tmp.write_text(text)
    os.replace(tmp, path)
