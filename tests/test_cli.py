"""User errors on the command line: one line saying what to fix, exit status 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def ctun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctun", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


@pytest.fixture
def state(tmp_path: Path) -> dict[str, str]:
    return {"CTUN_STATE_DIR": str(tmp_path / "state"), "CTUN_RUN_DIR": str(tmp_path / "run")}


def test_version() -> None:
    result = ctun("version")
    assert result.returncode == 0 and result.stdout.startswith("ctun 0.")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("up", "--no-ui", "--mtu", "abc"), "--mtu abc"),
        (("up", "--no-ui", "--mtu", "99999"), "--mtu 99999"),
        (("up", "--no-ui", "--port", "0"), "--port 0"),
        (("up", "--no-ui", "--addr", "192.168.251.1"), "--addr"),
        (("up", "--no-ui", "--route", "172.17.0.1/16"), "172.17.0.0/16"),
        (("up", "--no-ui", "--route", "192.168.251.0/25"), "--route"),
        (("up", "--no-ui", "--listen", "not-an-ip"), "--listen"),
        (("up", "--no-ui", "--interface", "eth0"), "--interface"),
        (("up", "--no-ui", "--transport", "carrier-pigeon"), "carrier-pigeon"),
        (("up", "--no-ui", "--config", "/nonexistent/ctun.toml"), "/nonexistent/ctun.toml"),
        (("vm", "--host", "bad host!"), "--host"),
        (("vm",), "CTUN_KEY"),
        (("up",), "--no-ui"),  # no terminal here: the TUI cannot show, say what to run
        (("up", "--bogus"), "--bogus"),
        (("frobnicate",), "frobnicate"),
        (("status", "--interface", "ctun9"), "no ctun is running"),
    ],
)
def test_user_errors_are_one_line(args: tuple[str, ...], expected: str,
                                  state: dict[str, str]) -> None:
    result = ctun(*args, env=state)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_bad_config_file_names_file_and_key(tmp_path: Path, state: dict[str, str]) -> None:
    config = tmp_path / "ctun.toml"
    config.write_text('mtu = 1400\nroutes = ["10.0.0.0/8", "nonsense"]\n')
    result = ctun("up", "--no-ui", "--config", str(config), env=state)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert str(config) in result.stderr and "routes[1]" in result.stderr


def test_not_root_is_told_to_use_sudo(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str],
                                      state: dict[str, str]) -> None:
    from ctun import cli

    for name, value in state.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["up", "--no-ui"]) == 2
    assert capsys.readouterr().err == (
        "ctun up: error: ctun up needs root (it creates a network interface): run it with sudo\n")
    assert not Path(state["CTUN_STATE_DIR"]).exists()  # checked before any key is created


def test_status_formats_a_snapshot() -> None:
    from ctun.core.status_text import format_status

    text = format_status({
        "role": "host", "version": "0.1.0", "interface": "ctun0", "transport": "udp",
        "local_endpoint": ["127.0.0.1", 2511], "uptime": 12.0, "drops": {"short": 2},
        "routes": ["172.18.0.0/16"],
        "transports": [{"name": "udp", "stats": {"errors": 0, "dropped_rcvbuf": 7}},
                       {"name": "tcp", "stats": {"dropped_send_full": 0, "frames_out": 9}}],
        "peers": [{"name": "vm", "state": "up", "endpoint": ["127.0.0.1", 40000],
                   "handshake_age": 3.0, "rtt_ms": 0.25, "rx_packets": 1, "rx_bytes": 84,
                   "tx_packets": 2, "tx_bytes": 168, "drops": {"replay": 1},
                   "transport": "tcp", "switch_count": 1,
                   "switches": [{"from": "udp", "to": "tcp",
                                 "reason": "keepalives stopped coming back over udp"}]}],
    })
    assert "vm       up" in text and "0.25" in text and "replay 1" in text
    assert "over tcp; 1 switch(es), last udp -> tcp: keepalives stopped coming back over udp" \
        in text
    assert "unauthenticated drops: short 2" in text and "172.18.0.0/16" in text
    assert "transport udp lost: rcvbuf 7" in text and "transport tcp" not in text
    with_docker = format_status({
        "role": "host", "version": "0.1.0", "interface": "ctun0", "transport": "udp",
        "local_endpoint": ["127.0.0.1", 2511], "uptime": 1.0, "drops": {}, "peers": [],
        "docker": {"state": "down", "error": "cannot reach the engine"}, "agent": "running",
        "route_table": [{"subnet": "10.9.0.0/24", "source": "docker:kafka",
                         "state": "conflict", "detail": "overlaps the host route 10.0.0.0/8"}],
    })
    assert "docker: down (cannot reach the engine)   agent: running" in with_docker
    viewed = format_status({
        "role": "host", "version": "0.1.0", "interface": "ctun0", "transport": "udp",
        "local_endpoint": ["127.0.0.1", 2511], "uptime": 1.0, "drops": {}, "peers": [],
        "agent_view": {"firewall": {"backend": "iptables-nft", "rules": 4, "error": ""},
                       "bridges": {"172.17.0.0/16": "docker0"}},
    })
    assert "agent firewall: iptables-nft, 4 rules; bridges: 172.17.0.0/16 -> docker0" in viewed
    broken = format_status({
        "role": "host", "version": "0.1.0", "interface": "ctun0", "transport": "udp",
        "local_endpoint": ["127.0.0.1", 2511], "uptime": 1.0, "drops": {}, "peers": [],
        "agent_view": {"firewall": {"backend": None, "rules": 0,
                                    "error": "iptables is not installed"}, "bridges": {}},
    })
    assert "agent firewall: error: iptables is not installed" in broken
    dns = {"listen": "192.168.251.1:53", "error": "", "names": 2, "redirects": 2,
           "redirect_error": "", "answered": 5, "nxdomain": 1, "refused": 0, "malformed": 3}
    firewall = {"backend": "iptables-nft", "rules": 4, "error": ""}
    serving = format_status({
        "role": "host", "version": "0.1.0", "interface": "ctun0", "transport": "udp",
        "local_endpoint": ["127.0.0.1", 2511], "uptime": 1.0, "drops": {}, "peers": [],
        "agent_view": {"firewall": firewall, "bridges": {}, "dns": dns}})
    assert ("agent DNS: listening on 192.168.251.1:53, 2 names, 2 redirect rules; "
            "answered 5, nxdomain 1, refused 0, malformed 3") in serving
    failing = format_status({
        "role": "host", "version": "0.1.0", "interface": "ctun0", "transport": "udp",
        "local_endpoint": ["127.0.0.1", 2511], "uptime": 1.0, "drops": {}, "peers": [],
        "agent_view": {"firewall": firewall, "bridges": {}, "dns": {
            **dns, "listen": None, "error": "cannot listen on 192.168.251.1:53: in use",
            "redirect_error": "iptables: No chain/target/match by that name"}}})
    assert ("agent DNS: error: cannot listen on 192.168.251.1:53: in use; redirect error: "
            "iptables: No chain/target/match by that name; answered 5") in failing
    assert "10.9.0.0/24" in with_docker and "docker:kafka" in with_docker
    assert "overlaps the host route 10.0.0.0/8" in with_docker
    extras = format_status({
        "role": "host", "version": "0.1.0", "interface": "ctun0", "transport": "udp",
        "local_endpoint": ["127.0.0.1", 2511], "uptime": 1.0, "drops": {}, "peers": [],
        "links": [["172.18.0.0/16", "172.19.0.0/16"]],
        "hosts": {"files": ["/etc/hosts"], "suffixes": [".dev.local"],
                  "names": [["api.dev.local", "192.168.251.2"]],
                  "problems": ["/etc/hosts:7: not an address: 300.1.1.1"]},
        "proxy": {"proxies": [{"listen": "192.168.251.2:5432", "target": "127.0.0.1:5432",
                               "protocol": "tcp", "state": "failed",
                               "error": "port in use", "active": 0}]},
    })
    assert "links: 172.18.0.0/16+172.19.0.0/16" in extras
    assert "hosts: 1 name for .dev.local from /etc/hosts" in extras
    assert "warning: hosts: /etc/hosts:7: not an address: 300.1.1.1" in extras
    assert "proxy: 192.168.251.2:5432 -> 127.0.0.1:5432 tcp, failed (port in use), 0 open" \
        in extras
