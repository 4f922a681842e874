"""Follow the Docker engine's local networks: a full listing, then network events.

Subscribes to events before listing, so a network created in between is never missed (a
duplicate is harmless: state is keyed by network ID). Any error, an engine restart included,
ends the stream: the watcher reports "docker down", backs off, and resyncs from scratch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import docker

from .docker_policy import NetworkInfo

log = logging.getLogger("ctun.docker")

MIN_BACKOFF = 0.25
MAX_BACKOFF = 2.0  # small: the engine coming back must be noticed within seconds

Networks = dict[str, NetworkInfo]
# Called with the full set of networks after every change, or None when the engine is gone.
OnChange = Callable[[Networks | None, str], None]


def connect(url: str | None) -> Any:
    """A client that negotiates the API version, so old and new engines both work."""
    if url:
        return docker.DockerClient(base_url=url, version="auto", timeout=10)
    return docker.from_env(version="auto", timeout=10)


class DockerWatcher:
    def __init__(self, url: str | None, on_change: OnChange,
                 on_connect: Callable[[Any], None] | None = None) -> None:
        self._url = url
        self._on_change = on_change
        self._on_connect = on_connect
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream: Any = None
        self._client: Any = None
        self.state = "connecting"
        self.error = ""
        self.api_version = ""
        self._thread = threading.Thread(target=self._run, name="ctun-docker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._close()
        self._thread.join(timeout=10)

    def _close(self) -> None:
        with self._lock:
            stream, client, self._stream, self._client = self._stream, self._client, None, None
        for thing in (stream, client):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # closing a broken connection may fail; it is gone anyway
                    log.debug("closing the docker connection failed", exc_info=True)

    def _run(self) -> None:
        backoff = MIN_BACKOFF
        while not self._stop.is_set():
            try:
                self._follow()
                reason = "the engine closed the event stream"
            except Exception as exc:  # any failure means: resync from scratch
                reason = _describe(exc)
            self._close()
            if self._stop.is_set():
                return
            # A connection that worked for a while starts the backoff over.
            backoff = MIN_BACKOFF if self.state == "up" else min(backoff * 2, MAX_BACKOFF)
            if self.state != "down" or self.error != reason:
                log.warning("docker is down: %s; retrying", reason)
            self.state, self.error = "down", reason
            self._on_change(None, reason)
            if self._stop.wait(backoff):
                return

    def _follow(self) -> None:
        client = connect(self._url)
        with self._lock:
            self._client = client
        if self._stop.is_set():
            return
        stream = client.api.events(filters={"type": ["network"]}, decode=True)
        with self._lock:
            self._stream = stream
        networks: Networks = {}
        for attrs in client.api.networks(filters={"scope": "local"}):
            info = NetworkInfo.from_api(attrs)
            networks[info.id] = info
        self.api_version = str(client.api.api_version)
        self.state, self.error = "up", ""
        log.info("docker is up (API %s): %d local networks", self.api_version, len(networks))
        self._on_change(dict(networks), "resync")
        if self._on_connect is not None:
            self._on_connect(client)
        for event in stream:
            if self._stop.is_set():
                return
            if self._apply(client, networks, event):
                self._on_change(dict(networks), f"network {event.get('Action')}")

    @staticmethod
    def _apply(client: Any, networks: Networks, event: dict[str, Any]) -> bool:
        action = event.get("Action")
        network_id = str((event.get("Actor") or {}).get("ID", ""))
        if not network_id:
            return False
        if action == "destroy":
            return networks.pop(network_id, None) is not None
        if action == "create":
            try:
                attrs = client.api.inspect_network(network_id)
            except docker.errors.NotFound:  # already gone again
                return False
            if attrs.get("Scope", "local") != "local":
                return False
            networks[network_id] = NetworkInfo.from_api(attrs)
            return True
        return False  # connect/disconnect do not change which subnets exist


def _describe(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    if "No such file or directory" in first or "Connection refused" in first:
        return f"cannot reach the engine ({first})"
    return first[:200]
