"""Done-when 5a on a real Docker engine: a container resolves a name from the host's hosts
file to the right address, and an edit of the file changes the answer within seconds.

The root namespace plays the Docker VM (dockerd, its bridges, and the agent, run here as a
plain process as the agent container would with `--net host`); the DockerLab's host
namespace runs the daemon with a config file naming a hosts file. Containers ask with
busybox's nslookup: one on a user-defined network (Docker's embedded DNS forwards from the
container's namespace), one on the default bridge (asks the machine's resolver directly);
both queries are redirected to the agent's responder by its nat rule.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from ctun.core import control
from ctun.lab.docker import DockerLab, iptables_dump
from ctun.lab.topology import offload_args

pytestmark = [pytest.mark.root, pytest.mark.docker]

HOST_IF = "ctun0"  # in the host namespace
VM_IF = "ctunvmdns"  # in the root namespace: a name no other test uses
HOST_TUNNEL = "192.168.251.2"  # where 127.0.0.1 entries point
SUBNET = "10.216.0.0/24"
PATTERN = "03646576056c6f63616c00"  # dev.local, as in a query
UP_TIMEOUT = 20.0
CHANGE_TIMEOUT = 5.0


def status(lab: DockerLab, interface: str) -> dict[str, Any]:
    result: dict[str, Any] = control.request(lab.run_dir / f"{interface}.sock",
                                             "status")["status"]
    return result


def up(lab: DockerLab, interface: str) -> bool:
    try:
        return bool(status(lab, interface)["peers"][0]["state"] == "up")
    except control.ControlError:
        return False


def our_nat_rules() -> list[str]:
    out = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if f"ctun:{VM_IF}" in line]


def resolve(container: Any, name: str) -> list[str]:
    """The A records busybox nslookup gets for `name` in `container` ([] if none)."""
    result = container.exec_run(["busybox", "nslookup", "-type=a", name])
    text = result.output.decode(errors="replace")
    _, _, answer = text.partition(f"Name:\t{name}")
    return re.findall(r"Address: (\d+\.\d+\.\d+\.\d+)", answer)


@dataclass
class Agent:
    """`ctun vm` in the root namespace (the VM), as the agent container runs it."""

    lab: DockerLab
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None

    def start(self) -> None:
        self.lab.wait_until((self.lab.workdir / "vm.key").exists, 10, what="the key file")
        self.log = open(self.lab.workdir / "agent.log", "ab")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctun", "vm", "--host", str(self.lab.host_address),
             "--key-file", str(self.lab.workdir / "vm.key"), "--interface", VM_IF,
             *offload_args()],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "CTUN_RUN_DIR": str(self.lab.run_dir),
                 "CTUN_STATE_DIR": str(self.lab.state_dir), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        code = 0
        if self.proc is not None:
            code = DockerLab.stop(self.proc, sig)
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None
        return code

    def output(self) -> str:
        return (self.lab.workdir / "agent.log").read_text(errors="replace")


@pytest.fixture
def hosts_file(docker_lab: DockerLab) -> Path:
    path = docker_lab.workdir / "hosts"
    path.write_text("127.0.0.1 localhost\n"
                    "127.0.0.1 api.dev.local\n"
                    "10.1.2.3  db.dev.local\n"
                    "10.1.2.4  other.example.com\n")
    return path


@pytest.fixture
def agent(docker_lab: DockerLab) -> Iterator[Agent]:
    running = Agent(docker_lab)
    try:
        yield running
    finally:
        running.stop()


def start_daemon(lab: DockerLab, hosts: Path) -> subprocess.Popen[bytes]:
    config = lab.workdir / "ctun.toml"
    config.write_text(f'[[hosts]]\nfile = "{hosts}"\nsuffixes = [".dev.local"]\n')
    return lab.spawn([sys.executable, "-m", "ctun", "up", "--no-ui", "--no-docker",
                      "--listen", str(lab.host_address), "--config", str(config),
                      "--key-file", str(lab.workdir / "vm.key"), *offload_args()], "daemon")


def wait_tunnel(lab: DockerLab, agent: Agent) -> None:
    try:
        lab.wait_until(lambda: up(lab, HOST_IF) and up(lab, VM_IF), UP_TIMEOUT,
                       what="both ends of the tunnel")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- daemon ---\n{lab.log('daemon')}\n"
                             f"--- agent ---\n{agent.output()}") from None


def seconds_until(lab: DockerLab, predicate: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    lab.wait_until(predicate, timeout, interval=0.05, what=what)
    return time.monotonic() - started


def test_a_container_resolves_the_hosts_file_names(docker_lab: DockerLab, hosts_file: Path,
                                                   agent: Agent) -> None:
    lab = docker_lab
    network = lab.network("dns", SUBNET)
    user = lab.container(network, "user")
    default = lab.container(lab.client().networks.get("bridge"), "default")
    # Before ctun: the names do not resolve (the machine's resolver knows nothing of them).
    assert resolve(user, "db.dev.local") == []
    rules_before = iptables_dump()

    daemon = start_daemon(lab, hosts_file)
    agent.start()
    wait_tunnel(lab, agent)
    took = {}
    for container in (user, default):
        took[container.name] = seconds_until(
            lab, lambda c=container: resolve(c, "api.dev.local") == [HOST_TUNNEL],
            UP_TIMEOUT, f"api.dev.local in {container.name}")
        assert resolve(container, "db.dev.local") == ["10.1.2.3"]
        assert resolve(container, "API.Dev.Local") == [HOST_TUNNEL]
        assert resolve(container, "missing.dev.local") == []
    print(f"\nfirst answer after the tunnel came up: {took}")
    assert [r for r in our_nat_rules() if PATTERN in r and "--to-destination" in r] == \
        our_nat_rules()
    assert len(our_nat_rules()) == 1
    host_view = status(lab, HOST_IF)["hosts"]
    assert host_view["names"] == [["api.dev.local", HOST_TUNNEL], ["db.dev.local", "10.1.2.3"]]
    assert host_view["problems"] == []
    dns = status(lab, VM_IF)["dns"]
    assert dns["names"] == 2 and dns["suffixes"] == ["dev.local"]
    assert dns["listen"] == "192.168.251.1:53"
    assert dns["redirect"] == {"managed": True, "rules": 1, "error": ""}
    assert dns["counters"]["answered"] >= 6
    # The host's own status tells the same, from the agent's reports.
    reported = lab.wait_until(
        lambda: (status(lab, HOST_IF).get("agent_view", {}).get("dns") or {}).get(
            "answered", 0) >= 6 and status(lab, HOST_IF)["agent_view"]["dns"],
        5, what="the agent's DNS report at the host")
    assert reported["listen"] == "192.168.251.1:53" and reported["names"] == 2
    assert reported["redirects"] == 1 and reported["error"] == reported["redirect_error"] == ""
    # Only names that end in the suffix are redirected: this one goes to its own resolver.
    assert resolve(user, "db.dev.local.example.com") == []
    assert status(lab, VM_IF)["dns"]["counters"] == dns["counters"]

    # An edit of the hosts file: a changed address, a new name, a removed name.
    hosts_file.write_text("127.0.0.1 localhost\n"
                          "10.1.2.30 db.dev.local\n"
                          "10.1.2.5  new.dev.local\n")
    changed = seconds_until(lab, lambda: resolve(user, "db.dev.local") == ["10.1.2.30"],
                            CHANGE_TIMEOUT, "the edited address")
    print(f"edit seen by a container after {changed:.2f} s")
    assert resolve(default, "new.dev.local") == ["10.1.2.5"]
    assert resolve(user, "api.dev.local") == []

    # Docker (or a user) flushes our rule: it comes back.
    rule = our_nat_rules()[0].split(" ", 2)[2]  # "-A PREROUTING <spec>" -> "<spec>"
    subprocess.run(f"iptables -w 5 -t nat -D PREROUTING {rule}", shell=True, check=True)
    assert our_nat_rules() == []
    back = seconds_until(lab, lambda: len(our_nat_rules()) == 1, 5, "the rule to come back")
    print(f"flushed rule back after {back:.2f} s")
    assert resolve(user, "new.dev.local") == ["10.1.2.5"]

    # The agent crashes: its rule stays behind; the next agent removes it and adds its own.
    agent.stop(signal.SIGKILL)
    assert len(our_nat_rules()) == 1
    agent.start()
    wait_tunnel(lab, agent)
    try:
        lab.wait_until(lambda: resolve(user, "new.dev.local") == ["10.1.2.5"], UP_TIMEOUT,
                       what="answers from the restarted agent")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- daemon ---\n{lab.log('daemon')}\n"
                             f"--- agent ---\n{agent.output()}") from None
    assert len(our_nat_rules()) == 1
    assert "cleaned up after a previous run: DNS redirect" in agent.output()

    # A clean stop removes everything it added.
    assert agent.stop() == 0
    assert DockerLab.stop(daemon) == 0
    assert our_nat_rules() == []
    assert iptables_dump() == rules_before
