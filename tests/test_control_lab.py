"""The control socket against a real daemon in the lab: the route table steered from the
command line, peers, reconnect, and a subscription whose counters follow real traffic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from ctun.core import control
from ctun.lab import netns
from ctun.lab.topology import Lab, offload_args
from ctun.lab.tunnel import HOST_IF, Tunnel, peer, reachable, start_tunnel, wait_up

pytestmark = pytest.mark.root
LAB_CONTAINERS = 1
EXTRA = "10.77.0.0/24"


@pytest.fixture(scope="module")
def tunnel(lab: Lab) -> Iterator[Tunnel]:
    tun = start_tunnel(lab)
    yield tun
    Lab.stop(tun.agent)
    Lab.stop(tun.daemon)


def ctun(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CTUN_RUN_DIR": str(lab.run_dir)}
    return subprocess.run([sys.executable, "-m", "ctun", *args], capture_output=True,
                          text=True, env=env, timeout=30)


def kernel_routes(lab: Lab) -> list[str]:
    out = netns.run(lab.host_ns, ["ip", "-j", "route", "show", "dev", HOST_IF]).stdout
    return [r["dst"] for r in json.loads(out or "[]")]


def test_a_route_added_and_removed_from_the_command_line(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    added = ctun(lab, "routes", "add", EXTRA)
    assert added.returncode == 0 and added.stdout.strip() == f"{EXTRA}: active", added
    assert EXTRA in kernel_routes(lab)
    listed = json.loads(ctun(lab, "routes", "--json").stdout)
    assert {"subnet": EXTRA, "source": "control", "state": "active", "detail": ""} in listed
    assert ctun(lab, "routes", "add", EXTRA).stderr.strip() == \
        f"ctun routes: error: {EXTRA} is already a configured route"
    removed = ctun(lab, "routes", "remove", EXTRA)
    assert removed.returncode == 0 and EXTRA not in kernel_routes(lab)
    # The configured route cannot be removed this way, and nonsense gets one line.
    config_route = str(lab.container_subnet)
    refused = ctun(lab, "routes", "remove", config_route)
    assert refused.returncode == 2 and "comes from the config file" in refused.stderr
    bad = ctun(lab, "routes", "add", "10.1.2.3/99")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "network must be an IPv4 network like 10.1.0.0/24" in bad.stderr
    assert reachable(lab)


def test_peers_and_reconnect(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    (vm,) = json.loads(ctun(lab, "peers", "--json").stdout)
    assert vm["name"] == "vm" and vm["state"] == "up"
    table = ctun(lab, "peers").stdout
    assert table.splitlines()[0].startswith("PEER") and "\nvm " in table
    before = vm["handshakes"]
    done = ctun(lab, "reconnect")
    assert done.stdout.strip() == "peer vm: session ended; it reconnects now", done
    lab.wait_until(lambda: peer(lab, HOST_IF)["handshakes"] > before
                   and peer(lab, HOST_IF)["state"] == "up", 10, what="a fresh handshake")
    assert reachable(lab)
    unknown = ctun(lab, "reconnect", "nobody")
    assert unknown.returncode == 2 and "peer must be one of vm" in unknown.stderr


def test_a_subscription_follows_the_traffic(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    feed = control.subscribe(lab.run_dir / f"{HOST_IF}.sock", interval=0.1)
    first = next(feed)["status"]["peers"][0]["tx_packets"]
    assert lab.ping(lab.host_ns, lab.container_ips[0], count=5).returncode == 0
    for snapshot in feed:
        tx = snapshot["status"]["peers"][0]["tx_packets"]
        if tx >= first + 5:
            break
    feed.close()
    # The daemon's own answer agrees with what the stream last said (or is a little ahead).
    assert peer(lab, HOST_IF)["tx_packets"] >= tx >= first + 5


def test_the_agent_moves_to_the_transport_asked_for_and_stays(tunnel: Tunnel) -> None:
    lab = tunnel.lab
    from ctun.lab.tunnel import VM_IF

    listing = ctun(lab, "transport").stdout
    assert listing.startswith("udp ") and "peers: vm" in listing.splitlines()[0]
    moved = ctun(lab, "transport", "tcp")
    assert moved.stdout.strip() == "asked peer vm to move to tcp", moved
    lab.wait_until(lambda: peer(lab, HOST_IF)["transport"] == "tcp", 10,
                   what="the host to see the agent over tcp")
    assert peer(lab, VM_IF)["pinned"] is True
    assert reachable(lab)
    bad = ctun(lab, "transport", "quic")
    assert bad.returncode == 2 and "does not listen on 'quic'" in bad.stderr
    ctun(lab, "transport", "udp")
    lab.wait_until(lambda: peer(lab, HOST_IF)["transport"] == "udp"
                   and peer(lab, VM_IF)["pinned"] is False, 10, what="back on udp")
    assert reachable(lab)


def test_reload_applies_routes_and_says_what_waits_for_a_restart(fresh_lab: Lab) -> None:
    # A lab and daemon of its own, started from a config file (the module's has none).
    lab = fresh_lab
    config = lab.workdir / "ctun.toml"
    bridge = str(lab.container_subnet)
    config.write_text(f'routes = ["{bridge}", "10.79.0.0/24"]\n')
    # Not lab.start_daemon(): its --route flag would override the file's routes.
    daemon = lab.spawn(lab.host_ns, [
        sys.executable, "-m", "ctun", "up", "--no-ui", "--no-docker",
        "--listen", str(lab.host_underlay), "--key-file", str(lab.key_file),
        "--config", str(config), *offload_args()], "daemon")
    tun = Tunnel(lab, daemon, lab.start_agent())
    wait_up(lab)
    try:
        assert "10.79.0.0/24" in kernel_routes(lab)
        config.write_text(f'routes = ["{bridge}", "10.80.0.0/24"]\nmtu = 1300\n')
        done = ctun(lab, "reload")
        assert done.returncode == 0, done
        assert done.stdout.splitlines() == [f"reloaded {config}",
                                            "changed, applied at the next start: tunnel"]
        lab.wait_until(lambda: "10.80.0.0/24" in kernel_routes(lab)
                       and "10.79.0.0/24" not in kernel_routes(lab), 5, what="new routes")
        config.write_text(f'routes = ["{bridge}", "10.80.0.0/33"]\n')
        bad = ctun(lab, "reload")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1
        assert "config not reloaded" in bad.stderr and "10.80.0.0/33" in bad.stderr
        assert "10.80.0.0/24" in kernel_routes(lab)  # a bad file changes nothing
        assert reachable(lab)
    finally:
        Lab.stop(tun.agent)
        Lab.stop(tun.daemon)
