"""With a real Docker engine: seconds from `docker network create` to a container on the new
network answering HTTP from the host through ctun.

Built on the Docker test harness (ctun.lab.docker.DockerLab): the root namespace plays the
Docker VM, a namespace plays the host, and the daemon runs exactly as a user starts it, so
the agent container, the Docker watcher and the route updates are all on the measured path.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from typing import Any

from ..core import agent_image, control
from ..core.agent_container import remove_agents
from ..lab import docker as docker_lab
from ..lab.tunnel import HOST_IF

PREFIX = "ctunbn-dk"
SUBNET = "10.213.0.0/24"
UP_TIMEOUT = 120.0  # the first start may build the agent image
READY_TIMEOUT = 30.0


class Unavailable(Exception):
    """Docker cannot be used here; str() says why, in one line."""


def _vm_up(lab: docker_lab.DockerLab) -> bool:
    try:
        answer = control.request(lab.run_dir / f"{HOST_IF}.sock", "status")
    except control.ControlError:
        return False
    peers = answer["status"]["peers"]
    return bool(peers) and peers[0]["state"] == "up"


def _reachable(lab: docker_lab.DockerLab, ip: object) -> bool:
    result = lab.http_get(f"http://{ip}/", timeout=1)
    return isinstance(result, tuple) and result[0] == 200


def time_network_ready(progress: Any = print) -> float:
    """Seconds from creating a network to reaching a container on it; Unavailable if Docker
    is missing. Starts dockerd if it is not running, and stops it again afterwards."""
    reason = docker_lab.docker_missing()  # starts the engine when it can
    if reason is not None:
        raise Unavailable(reason)
    engine = docker_lab.ensure_dockerd()
    try:
        client = engine.client()
        progress("docker: images (the first time builds a Debian base: about a minute)")
        docker_lab.ensure_busybox_image(client)
        base = docker_lab.ensure_python_base_image(client)
        agent_image.ensure_image(client, base=base)
        with docker_lab.DockerLab(PREFIX, dockerd=engine) as lab:
            return _measure(lab, base, progress)
    finally:
        engine.stop_if_we_started()


def _measure(lab: docker_lab.DockerLab, base: str, progress: Any) -> float:
    daemon = lab.spawn(
        [sys.executable, "-m", "ctun", "up", "--no-ui", "--listen", str(lab.host_address),
         "--agent-host", str(lab.host_address), "--agent-base", base,
         "--key-file", str(lab.workdir / "vm.key")],
        "daemon",
    )  # fmt: skip
    try:
        progress("docker: waiting for ctun's agent container to connect")
        lab.wait_until(lambda: _vm_up(lab) or daemon.poll() is not None, UP_TIMEOUT,
                       what="the agent to connect")  # fmt: skip
        if daemon.poll() is not None:
            tail = lab.log("daemon").strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"the daemon exited with {daemon.returncode}: {tail[0]}")
        started = time.monotonic()
        network = lab.network("bench", SUBNET)
        container = lab.container(network, "ready")
        ip = docker_lab.container_ip(container, network)
        lab.wait_until(lambda: _reachable(lab, ip), READY_TIMEOUT, interval=0.02,
                       what=f"HTTP to {ip} through ctun")  # fmt: skip
        return time.monotonic() - started
    finally:
        _shutdown(lab, daemon)


def _shutdown(lab: docker_lab.DockerLab, daemon: subprocess.Popen[bytes]) -> None:
    # Asked over the control socket, as `ctun down` does, the daemon removes its agent itself;
    # remove_agents() then only catches what a daemon that died first left behind.
    with contextlib.suppress(control.ControlError):
        control.request(lab.run_dir / f"{HOST_IF}.sock", "shutdown")
    with contextlib.suppress(subprocess.TimeoutExpired):
        daemon.wait(timeout=30)
    lab.stop(daemon)
    remove_agents(lab.client(), HOST_IF)
