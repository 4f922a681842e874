"""Done-when 4 on a real Docker engine: two bridge networks can't talk before `iptables A+B`,
can after, and can't after the line is removed again.

This machine's root namespace plays the Docker VM (lab/docker.py): dockerd 20.10 keeps its
networks apart with DOCKER-ISOLATION-STAGE-1/2 under a FORWARD DROP policy. The ctun daemon
runs in the host namespace, started the way a user starts it, with a config file; it runs
the agent container (`--net host`, so in the root namespace) itself. The test only edits the
config file: the daemon's watcher reloads it, the daemon sends the pairs to the agent, and the
agent puts its rules into DOCKER-USER.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from ctun.core import agent_image, control
from ctun.core.agent_container import LABEL_AGENT
from ctun.core.config import default_state_dir
from ctun.lab.docker import DockerLab, container_ip, iptables_dump

pytestmark = [pytest.mark.root, pytest.mark.docker]

HOST_IF = "ctun0"
UP_TIMEOUT = 90.0  # the first start may build the agent image
CHANGE_TIMEOUT = 10.0  # the issue asks for 2 s; measured and reported below
SUBNET_A, SUBNET_B = "10.216.1.0/24", "10.216.2.0/24"
# As docker-connector users write them: each network's gateway address, no prefix.
LINK = "10.216.1.1+10.216.2.1"


@pytest.fixture(scope="session")
def agent_tag(dockerd: Any, python_base_image: str) -> str:
    """The agent image of this checkout, built from the local base (nothing is pulled)."""
    return str(agent_image.ensure_image(dockerd.client(), base=python_base_image))


def status(lab: DockerLab) -> dict[str, Any]:
    answer: dict[str, Any] = control.request(lab.run_dir / f"{HOST_IF}.sock", "status")["status"]
    return answer


def vm_up(lab: DockerLab) -> bool:
    try:
        return bool(status(lab)["peers"][0]["state"] == "up")
    except control.ControlError:
        return False


class Daemon:
    """`ctun up --no-ui --config FILE` in the host namespace; `ctun down` stops it."""

    def __init__(self, lab: DockerLab, base: str, config: Path) -> None:
        self.lab = lab
        self.config = config
        # Should the checkout change after agent_tag built the image, the daemon builds it
        # again: let it find the wheels agent_tag downloaded (nothing can be fetched here).
        wheels = lab.state_dir / "wheels"
        if not wheels.exists():
            lab.state_dir.mkdir(parents=True, exist_ok=True)
            wheels.symlink_to(default_state_dir() / "wheels", target_is_directory=True)
        self.proc = lab.spawn(
            [sys.executable, "-m", "ctun", "up", "--no-ui", "--config", str(config),
             "--listen", str(lab.host_address), "--agent-host", str(lab.host_address),
             "--agent-base", base, "--key-file", str(lab.workdir / "vm.key")],
            "daemon",
        )
        try:
            lab.wait_until(lambda: vm_up(lab), UP_TIMEOUT, what="the agent to connect")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def agents(self) -> list[Any]:
        return list(self.lab.client().containers.list(
            all=True, filters={"label": f"{LABEL_AGENT}={HOST_IF}"}))

    def logs(self) -> str:
        agents = "\n".join(c.logs().decode(errors="replace") for c in self.agents())
        return f"daemon:\n{self.lab.log('daemon')}\nagent:\n{agents}"

    def write_links(self, links: list[str]) -> None:
        """Change the config as a user's editor does: a new file renamed over the old."""
        text = "".join(f"{line}\n" for line in (
            "# ctun test config",
            "links = [" + ", ".join(f'"{link}"' for link in links) + "]",
        ))
        temporary = self.config.with_suffix(".new")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(self.config)

    def down(self) -> None:
        result = subprocess.run([sys.executable, "-m", "ctun", "down"], capture_output=True,
                                text=True, timeout=60,
                                env={**os.environ, "CTUN_RUN_DIR": str(self.lab.run_dir)})
        assert result.returncode == 0, result.stderr
        assert self.proc.wait(timeout=30) == 0, self.logs()
        assert self.agents() == []


@pytest.fixture
def config_file(docker_lab: DockerLab) -> Path:
    path = docker_lab.workdir / "ctun.toml"
    path.write_text("# ctun test config\nlinks = []\n", encoding="utf-8")
    return path


def http(container: Any, ip: IPv4Address) -> bool:
    """A GET from inside `container` to the busybox httpd at `ip`, given 1 s. (Not with
    `wget -T`: busybox-static's wget segfaults on it.)"""
    script = (f"wget -q -O - http://{ip}/ & p=$!; (sleep 1; kill $p) >/dev/null 2>&1 & "
              "wait $p")
    result = container.exec_run(["sh", "-c", script])
    return bool(result.exit_code == 0 and b"hello from" in result.output)


def quick_http(container: Any, ip: IPv4Address) -> bool:
    """The same GET, from the container's network namespace but with a 0.3 s limit: what
    the timings poll with (busybox wget waits at least a second for a dropped SYN)."""
    pid = str(container.attrs["State"]["Pid"])
    result = subprocess.run(["nsenter", "--target", pid, "--net", "curl", "-sS", "--max-time",
                             "0.3", f"http://{ip}/"], capture_output=True, text=True,
                            check=False)
    return result.returncode == 0 and "hello from" in result.stdout


def ping(container: Any, ip: IPv4Address) -> bool:
    return bool(container.exec_run(["ping", "-c", "1", "-W", "1", str(ip)]).exit_code == 0)


def link_rules() -> list[str]:
    out = subprocess.run(["iptables", "-w", "5", "-S", "DOCKER-USER"], capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if "ctun:" in line and "-o ctun" not in line
            and "-i ctun" not in line]


def test_two_networks_talk_only_while_linked(docker_lab: DockerLab, agent_tag: str,
                                             python_base_image: str,
                                             config_file: Path) -> None:
    lab = docker_lab
    one, two = lab.network("la", SUBNET_A), lab.network("lb", SUBNET_B)
    a, b = lab.container(one, "a"), lab.container(two, "b")
    a.reload()  # for its pid
    ip_a, ip_b = container_ip(a, one), container_ip(b, two)
    bridge_a, bridge_b = f"br-{one.id[:12]}", f"br-{two.id[:12]}"
    # Docker's own isolation: each network reaches only itself.
    assert not http(a, ip_b) and not ping(a, ip_b)
    assert not http(b, ip_a) and not ping(b, ip_a)
    before = iptables_dump()
    running = Daemon(lab, python_base_image, config_file)
    try:
        assert not http(a, ip_b), "the tunnel alone must link nothing"

        running.write_links([LINK])
        changed = time.monotonic()
        lab.wait_until(lambda: quick_http(a, ip_b), CHANGE_TIMEOUT, interval=0.02,
                       what=f"HTTP {ip_a} -> {ip_b} after adding `{LINK}`")
        linked_after = time.monotonic() - changed
        assert http(a, ip_b) and http(b, ip_a) and ping(a, ip_b) and ping(b, ip_a)
        assert status(lab)["links"] == [["10.216.1.1/32", "10.216.2.1/32"]]
        # The bare addresses became the bridges' routed subnets, both ways.
        assert sorted(link_rules()) == sorted([
            f'-A DOCKER-USER -s {SUBNET_A} -d {SUBNET_B} -i {bridge_a} -o {bridge_b} '
            f'-m comment --comment "ctun:ctunvm0" -j ACCEPT',
            f'-A DOCKER-USER -s {SUBNET_B} -d {SUBNET_A} -i {bridge_b} -o {bridge_a} '
            f'-m comment --comment "ctun:ctunvm0" -j ACCEPT',
        ]), running.logs()

        running.write_links([])
        changed = time.monotonic()
        lab.wait_until(lambda: not quick_http(a, ip_b), CHANGE_TIMEOUT, interval=0.02,
                       what=f"HTTP {ip_a} -> {ip_b} to stop after removing `{LINK}`")
        unlinked_after = time.monotonic() - changed
        assert not http(a, ip_b) and not http(b, ip_a)
        assert not ping(a, ip_b) and not ping(b, ip_a)
        assert link_rules() == []
        assert status(lab)["links"] == []
        print(f"\nlinked {linked_after:.2f} s after the config change, "
              f"unlinked {unlinked_after:.2f} s after")
    finally:
        running.down()
    assert iptables_dump() == before


def test_a_link_to_a_network_created_later_works_once_it_exists(
        docker_lab: DockerLab, agent_tag: str, python_base_image: str,
        config_file: Path) -> None:
    """Linked in the config from the start (sent as the agent comes up), while the second
    network does not exist yet: the agent links it once Docker creates it."""
    lab = docker_lab
    one = lab.network("la", SUBNET_A)
    a = lab.container(one, "a")
    a.reload()
    config_file.write_text(f'links = ["{SUBNET_A}+{SUBNET_B}"]\n', encoding="utf-8")
    before = iptables_dump()
    running = Daemon(lab, python_base_image, config_file)
    try:
        assert status(lab)["links"] == [[SUBNET_A, SUBNET_B]]
        two = lab.network("lb", SUBNET_B)
        b = lab.container(two, "b")  # returns once it runs and serves
        started = time.monotonic()
        ip_b = container_ip(b, two)
        lab.wait_until(lambda: quick_http(a, ip_b), CHANGE_TIMEOUT, interval=0.02,
                       what=f"HTTP -> {ip_b} once its network exists")
        took = time.monotonic() - started
        assert http(a, ip_b) and http(b, container_ip(a, one))
        print(f"\nlinked {took:.2f} s after the network's container was up")
        b.remove(force=True)
        two.remove()
        # Its rules go with its bridge (and the pair waits again).
        lab.wait_until(lambda: link_rules() == [], CHANGE_TIMEOUT, what="the rules to go")
    finally:
        running.down()
    assert iptables_dump() == before
