"""The agent container: started by the daemon through the engine, replaced when stale.

It runs `ctun vm` with the host network and NET_ADMIN; its key arrives in the environment
only (never on a command line, a label or a build argument), and it is removed when the
daemon stops or `ctun down` runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from .. import __version__
from .agent_image import ImageError, ensure_image
from .config import HostConfig
from .keys import encode_key
from .protocol import key_id

log = logging.getLogger("ctun.agent")

LABEL_AGENT = "io.ctun.agent"  # value: the host interface it serves (one agent per daemon)
LABEL_VERSION = "io.ctun.version"
LABEL_CONFIG = "io.ctun.config"  # fingerprint of image, arguments and key id
STOP_TIMEOUT = 10  # seconds the agent gets to remove its interface and firewall rules


class AgentError(Exception):
    """The agent container could not be started; str() says what to do."""


def agent_args(cfg: HostConfig) -> list[str]:
    tunnel, timers = cfg.tunnel, cfg.timers
    return [
        "--host", cfg.docker.agent_host,
        "--port", str(cfg.listen[1]),
        "--addr", f"{tunnel.vm_address}/{tunnel.network.prefixlen}",
        "--mtu", str(tunnel.mtu),
        "--transport", cfg.transport,
        "--keepalive", f"{timers.keepalive:g}",
        "--dead-after", f"{timers.dead_after:g}",
        "--rekey-after", f"{timers.rekey_after:g}",
    ]


def container_name(cfg: HostConfig) -> str:
    return f"ctun-agent-{cfg.tunnel.interface}"


class AgentContainer:
    def __init__(self, cfg: HostConfig, key: bytes) -> None:
        self._cfg = cfg
        self._key = key
        self.state = "not started"
        self.container_id = ""

    def _fingerprint(self, image: str) -> str:
        parts = [image, *agent_args(self._cfg), key_id(self._key).hex()]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def ensure(self, client: Any) -> None:
        """Make sure exactly one current agent runs; called whenever the engine (re)appears.
        Failures are reported in the status and the log, and tried again next time."""
        import docker

        try:
            self._ensure(client)
        except (AgentError, docker.errors.DockerException) as exc:
            self.state = f"failed: {exc}"
            log.error("cannot start the agent container: %s", exc)

    def _ensure(self, client: Any) -> None:
        try:
            image = ensure_image(client, self._cfg.docker.agent_base)
        except ImageError as exc:
            self.state = f"no image: {exc}"
            log.error("cannot build the agent image: %s", exc)
            return
        # The image's ID, not its tag: a rebuilt image of the same version replaces the agent.
        fingerprint = self._fingerprint(client.images.get(image).id)
        instance = self._cfg.tunnel.interface
        current = None
        for container in client.containers.list(
            all=True, filters={"label": f"{LABEL_AGENT}={instance}"}
        ):
            if container.labels.get(LABEL_CONFIG) == fingerprint and container.status in (
                "running", "restarting", "created"
            ):
                current = container
                continue
            log.info("replacing agent container %s (other version, settings or key)",
                     container.name)
            container.remove(force=True)
        if current is None:
            current = self._run(client, image, fingerprint)
        self.container_id = current.id
        self.state = "running"

    def _run(self, client: Any, image: str, fingerprint: str) -> Any:
        import docker

        name = container_name(self._cfg)
        try:
            squatter = client.containers.get(name)
        except docker.errors.NotFound:
            squatter = None
        if squatter is not None:
            raise AgentError(f"a container named {name} exists and is not ctun's; "
                             f"remove it (docker rm -f {name})")
        container = client.containers.run(
            image,
            agent_args(self._cfg),
            name=name,
            detach=True,
            network_mode="host",
            cap_add=["NET_ADMIN"],
            devices=["/dev/net/tun:/dev/net/tun:rwm"],
            environment={"CTUN_KEY": encode_key(self._key)},
            restart_policy={"Name": "always"},
            stop_signal="SIGTERM",
            labels={
                LABEL_AGENT: self._cfg.tunnel.interface,
                LABEL_VERSION: __version__,
                LABEL_CONFIG: fingerprint,
            },
        )
        log.info("started agent container %s from %s", name, image)
        return container

    def remove(self, client: Any) -> None:
        remove_agents(client, self._cfg.tunnel.interface)
        self.state = "removed"


def remove_agents(client: Any, instance: str | None = None) -> list[str]:
    """Stop (letting each clean up) and remove ctun's agent containers; return their names."""
    selector = f"{LABEL_AGENT}={instance}" if instance else LABEL_AGENT
    removed = []
    for container in client.containers.list(all=True, filters={"label": selector}):
        try:
            container.stop(timeout=STOP_TIMEOUT)
        finally:
            container.remove(force=True)
        removed.append(container.name)
        log.info("removed agent container %s", container.name)
    return removed
