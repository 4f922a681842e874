"""Zero-config Docker, end to end on a real engine: this machine's root namespace plays the
Docker VM, a network namespace plays the developer's host, and ctun runs the agent itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from ctun.core import agent_image, control
from ctun.core.agent_container import LABEL_AGENT
from ctun.lab import netns
from ctun.lab.docker import DockerLab, container_ip, iptables_dump

pytestmark = [pytest.mark.root, pytest.mark.docker]

HOST_IF = "ctun0"
UP_TIMEOUT = 60.0  # the first start may build the agent image


@pytest.fixture(scope="session")
def agent_tag(dockerd: Any, python_base_image: str) -> str:
    """The agent image, built once from the local base (nothing can be pulled here)."""
    return str(agent_image.ensure_image(dockerd.client(), base=python_base_image))


def status(lab: DockerLab) -> dict[str, Any]:
    result: dict[str, Any] = control.request(lab.run_dir / f"{HOST_IF}.sock", "status")["status"]
    return result


def vm_up(lab: DockerLab) -> bool:
    try:
        return bool(status(lab)["peers"][0]["state"] == "up")
    except control.ControlError:
        return False


def host_routes(lab: DockerLab) -> list[str]:
    out = netns.run(lab.host_ns, ["ip", "-4", "route", "show"]).stdout
    return sorted(line.strip() for line in out.splitlines())


def routed(lab: DockerLab, subnet: str) -> bool:
    return any(line.startswith(f"{subnet} dev {HOST_IF}") for line in host_routes(lab))


def reachable(lab: DockerLab, ip: object) -> bool:
    result = lab.http_get(f"http://{ip}/", timeout=1)
    return isinstance(result, tuple) and result[0] == 200


class Ctun:
    """The daemon in the host namespace, started the way a user would, with the agent."""

    def __init__(self, lab: DockerLab, base: str) -> None:
        self.lab = lab
        self.proc = lab.spawn(
            [sys.executable, "-m", "ctun", "up", "--no-ui", "--listen", str(lab.host_address),
             "--agent-host", str(lab.host_address), "--agent-base", base,
             "--key-file", str(lab.workdir / "vm.key")],
            "daemon",
        )
        try:
            lab.wait_until(lambda: vm_up(lab), UP_TIMEOUT, what="the agent to connect")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{lab.log('daemon')}\n{self.agent_logs()}") from None

    def agents(self) -> list[Any]:
        return list(self.lab.client().containers.list(
            all=True, filters={"label": f"{LABEL_AGENT}={HOST_IF}"}))

    def agent_logs(self) -> str:
        return "\n".join(c.logs().decode(errors="replace") for c in self.agents())

    def down(self) -> None:
        """`ctun down`: the daemon stops, and removes the agent (which removes its rules)."""
        env = {"CTUN_RUN_DIR": str(self.lab.run_dir)}
        result = subprocess.run([sys.executable, "-m", "ctun", "down"], capture_output=True,
                                text=True, timeout=60, env={**_environ(), **env})
        assert result.returncode == 0, result.stderr
        assert self.proc.wait(timeout=30) == 0, self.lab.log("daemon")
        assert self.agents() == []


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


@pytest.fixture
def ctun(docker_lab: DockerLab, agent_tag: str, python_base_image: str) -> Iterator[Ctun]:
    running = None
    try:
        running = Ctun(docker_lab, python_base_image)
        yield running
    finally:
        if running is not None and running.proc.poll() is None:
            running.down()


def test_containers_on_every_network_are_reachable_without_a_route_by_hand(
    docker_lab: DockerLab, agent_tag: str, python_base_image: str
) -> None:
    lab = docker_lab
    one = lab.network("one", "10.210.1.0/24")
    two = lab.network("two", "10.210.2.0/24")
    bridge = lab.client().networks.get("bridge")
    containers = [(lab.container(one, "a"), one), (lab.container(two, "b"), two),
                  (lab.container(bridge, "c"), bridge)]
    ips = [container_ip(c, n) for c, n in containers]
    for ip in ips:
        assert not reachable(lab, ip)
    running = Ctun(lab, python_base_image)
    try:
        for (container, _), ip in zip(containers, ips, strict=True):
            lab.wait_until(partial(reachable, lab, ip), 10, what=f"HTTP to {ip}")
            assert lab.http_get(f"http://{ip}/")[1].strip() == f"hello from {container.name}"
        table = {d["subnet"]: d for d in status(lab)["route_table"]}
        for subnet, name in (("10.210.1.0/24", one.name), ("10.210.2.0/24", two.name)):
            assert table[subnet]["state"] == "active"
            assert table[subnet]["source"] == f"docker:{name}"
        assert status(lab)["docker"]["state"] == "up"
        # What the agent sees inside the VM reaches the host's status.
        lab.wait_until(lambda: len(status(lab).get("agent_view", {}).get("bridges", {})) == 3,
                       10, what="the agent's report")
        view = status(lab)["agent_view"]
        assert view["bridges"]["172.17.0.0/16"] == "docker0"
        assert view["bridges"]["10.210.1.0/24"] == f"br-{one.id[:12]}"
        assert view["firewall"] == {"backend": "iptables-nft", "rules": 9, "error": ""}
    finally:
        running.down()


def test_a_new_network_is_routed_within_2s_and_unrouted_within_2s(ctun: Ctun) -> None:
    lab = ctun.lab
    network = lab.network("new", "10.211.0.0/24")
    container = lab.container(network, "n")  # returns once `docker run` has it running
    started = time.monotonic()
    ip = container_ip(container, network)
    lab.wait_until(lambda: reachable(lab, ip), 2, interval=0.02, what=f"HTTP to {ip}")
    took = time.monotonic() - started
    assert took < 2
    container.remove(force=True)
    network.remove()
    started = time.monotonic()
    lab.wait_until(lambda: not routed(lab, "10.211.0.0/24"), 2, interval=0.02,
                   what="the route to go")
    assert time.monotonic() - started < 2


def test_engine_restart_brings_everything_back_without_duplicates(ctun: Ctun) -> None:
    lab = ctun.lab
    network = lab.network("rs", "10.212.0.0/24")
    container = lab.container(network, "r", restart_policy={"Name": "always"})
    ip = container_ip(container, network)
    lab.wait_until(lambda: reachable(lab, ip), 10, what="HTTP before the restart")
    routes_before = host_routes(lab)
    rules_before = iptables_dump()

    lab.dockerd.stop()
    lab.wait_until(lambda: status(lab)["docker"]["state"] == "down", 10, what="docker down")
    assert not routed(lab, "10.212.0.0/24")  # withdrawn while the engine is gone
    lab.dockerd.start()
    back = time.monotonic()
    container.reload()
    lab.wait_until(lambda: reachable(lab, container_ip(container, network)), 10,
                   what="HTTP after the restart")
    assert time.monotonic() - back < 10
    assert host_routes(lab) == routes_before
    # Docker may rebuild its chains in another order; the same rules, none twice, must hold.
    lab.wait_until(lambda: _rules(iptables_dump()) == _rules(rules_before), 10,
                   what="the firewall to hold the same rules as before the restart")
    assert len(set(_rules(iptables_dump()))) == len(_rules(iptables_dump()))


def _rules(dump: str) -> list[str]:
    return sorted(line for line in dump.splitlines() if line.startswith("-A "))


def test_docker_28_style_firewall_is_handled_and_restored_exactly(
    docker_lab: DockerLab, agent_tag: str, python_base_image: str
) -> None:
    lab = docker_lab
    network = lab.network("fw", "10.213.0.0/24")
    container = lab.container(network, "f")
    ip = container_ip(container, network)
    bridge = f"br-{network.id[:12]}"
    # What Engine 28 and Docker Desktop add: direct-access filtering, and a DROP in DOCKER-USER.
    # (The DROP goes first: Docker 20.10 ends DOCKER-USER with a RETURN.)
    added = [["-t", "raw", "-I", "PREROUTING", "-d", str(ip), "!", "-i", bridge, "-j", "DROP"],
             ["-t", "filter", "-I", "DOCKER-USER", "-j", "DROP"]]
    for rule in added:
        subprocess.run(["iptables", "-w", "5", *rule], check=True)
    try:
        # The rules bite: forwarded traffic that bypasses ctun (a plain route over the veth)
        # is dropped, and by the raw rule first.
        _forward_directly(lab, "10.213.0.0/24", add=True)
        assert not reachable(lab, ip)
        assert _raw_drops(ip) > 0
        _forward_directly(lab, "10.213.0.0/24", add=False)
        before = iptables_dump()
        running = Ctun(lab, python_base_image)
        try:
            lab.wait_until(lambda: reachable(lab, ip), 10, what="HTTP through Docker's DROPs")
        finally:
            running.down()
        assert iptables_dump() == before
    finally:
        for rule in added:
            delete = [part if part not in ("-I", "-A") else "-D" for part in rule]
            subprocess.run(["iptables", "-w", "5", *delete], check=False)


def _forward_directly(lab: DockerLab, subnet: str, add: bool) -> None:
    netns.run(lab.host_ns, ["ip", "route", "add" if add else "del", subnet,
                            "via", str(lab.vm_address)])


def _raw_drops(ip: object) -> int:
    """Packets the test's raw-table DROP for `ip` has counted."""
    out = subprocess.run(["iptables", "-w", "5", "-t", "raw", "-S", "PREROUTING", "-v"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if f"-d {ip}/32" in line and "-j DROP" in line:
            return int(line.split("-c ")[1].split()[0])
    raise AssertionError(f"no raw DROP rule for {ip} in:\n{out}")


def test_a_subnet_that_overlaps_a_host_route_is_a_conflict(docker_lab: DockerLab,
                                                           agent_tag: str,
                                                           python_base_image: str) -> None:
    lab = docker_lab
    # A route the host already has (a VPN, say) that covers the Docker network's subnet.
    netns.run(lab.host_ns, ["ip", "route", "add", "10.214.0.0/16", "via", str(lab.vm_address)])
    vpn_route = "10.214.0.0/16 via 10.252.0.1"
    lab.network("clash", "10.214.5.0/24")
    running = Ctun(lab, python_base_image)
    try:
        lab.wait_until(lambda: any(d["subnet"] == "10.214.5.0/24"
                                   for d in status(lab)["route_table"]), 10,
                       what="the network to be seen")
        decision = next(d for d in status(lab)["route_table"] if d["subnet"] == "10.214.5.0/24")
        assert decision["state"] == "conflict"
        assert "10.214.0.0/16" in decision["detail"]
        assert any("10.214.5.0/24" in p and "10.214.0.0/16" in p
                   for p in status(lab)["route_problems"])
        assert not routed(lab, "10.214.5.0/24")
        assert any(line.startswith(vpn_route) for line in host_routes(lab))
    finally:
        running.down()
    assert any(line.startswith(vpn_route) for line in host_routes(lab))


def test_the_secret_reaches_the_agent_only_through_its_environment(ctun: Ctun) -> None:
    lab = ctun.lab
    key = (lab.workdir / "vm.key").read_text().strip()
    (agent,) = ctun.agents()
    attrs = agent.attrs
    assert f"CTUN_KEY={key}" in attrs["Config"]["Env"]
    without_env = json.dumps({**attrs, "Config": {**attrs["Config"], "Env": []}})
    assert key not in without_env  # not in its command line, labels or anything else
    client = lab.client()
    others = [client.images.get(agent_tag_of(agent)).attrs,
              client.images.get(agent_tag_of(agent)).history()]
    others += [n.attrs for n in client.networks.list()]
    others += [c.attrs for c in client.containers.list(all=True) if c.id != agent.id]
    assert key not in json.dumps(others)
    assert "--key" not in " ".join(attrs["Args"])


def agent_tag_of(container: Any) -> str:
    return str(container.attrs["Config"]["Image"])


def test_routes_follow_the_policy(docker_lab: DockerLab, agent_tag: str,
                                  python_base_image: str) -> None:
    lab = docker_lab
    internal = lab.client().networks.create(
        f"{lab.prefix}-int", driver="bridge", internal=True, labels=dict(lab.labels),
        ipam=_ipam("10.215.1.0/24"))
    running = Ctun(lab, python_base_image)
    try:
        lab.wait_until(lambda: any(d["subnet"] == "10.215.1.0/24"
                                   for d in status(lab)["route_table"]), 10,
                       what="the internal network to be seen")
        decision = next(d for d in status(lab)["route_table"] if d["subnet"] == "10.215.1.0/24")
        assert decision["state"] == "internal"
        assert not routed(lab, "10.215.1.0/24")
    finally:
        running.down()
        internal.remove()


def _ipam(subnet: str) -> Any:
    import docker

    return docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)])


def _fake_old_agent(lab: DockerLab, busybox_image: str) -> Any:
    """What an older ctun (or a crashed daemon) leaves: a labelled agent container."""
    return lab.client().containers.run(
        busybox_image, ["sleep", "600"], detach=True, name=f"{lab.prefix}-old-agent",
        labels={LABEL_AGENT: HOST_IF, "io.ctun.version": "0.0.1", "io.ctun.config": "stale"},
        stop_signal="SIGKILL")


def test_an_agent_of_another_version_is_replaced(docker_lab: DockerLab, agent_tag: str,
                                                 python_base_image: str,
                                                 busybox_image: str) -> None:
    old = _fake_old_agent(docker_lab, busybox_image)
    running = Ctun(docker_lab, python_base_image)
    try:
        (agent,) = running.agents()
        assert agent.id != old.id
        assert agent.labels["io.ctun.version"] == agent_tag.split(":")[1]
    finally:
        running.down()


def test_ctun_down_without_a_daemon_removes_a_crashed_daemons_agent(
    docker_lab: DockerLab, busybox_image: str
) -> None:
    _fake_old_agent(docker_lab, busybox_image)
    result = subprocess.run([sys.executable, "-m", "ctun", "down"], capture_output=True,
                            text=True, timeout=60,
                            env={**_environ(), "CTUN_RUN_DIR": str(docker_lab.run_dir)})
    assert result.returncode == 0, result.stderr
    assert f"removed {docker_lab.prefix}-old-agent" in result.stdout
    assert docker_lab.client().containers.list(
        all=True, filters={"label": f"{LABEL_AGENT}={HOST_IF}"}) == []
