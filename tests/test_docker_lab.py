"""The Docker test harness itself: engine, images, the host namespace and labelled objects."""

from __future__ import annotations

import os
import socket
import tempfile
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import docker
import pytest
from ctun.lab import netns
from ctun.lab.docker import (
    BUSYBOX_APPLETS,
    LABEL,
    Dockerd,
    DockerLab,
    container_ip,
    ensure_busybox_image,
    image_exists,
    iptables_dump,
)
from ctun.lab.topology import wait_until

pytestmark = [pytest.mark.root, pytest.mark.docker]

SUBNET = "10.253.1.0/24"
SELFTEST_PREFIX = "ctundk-selftest"


def root_http_get(ip: IPv4Address, timeout: float = 5.0) -> tuple[int, str]:
    """GET / on port 80 from the root namespace (the main thread's: the "Docker VM")."""
    with socket.create_connection((str(ip), 80), timeout=timeout) as sock:
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode("ascii"))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def test_container_answers_from_the_vm_only(docker_lab: DockerLab) -> None:
    net = docker_lab.network("net", SUBNET)
    web = docker_lab.container(net, "web")
    assert net.attrs["Labels"] == {LABEL: docker_lab.prefix}
    assert web.labels == {LABEL: docker_lab.prefix}
    ip = container_ip(web, net)
    assert ip in IPv4Network(SUBNET)

    assert root_http_get(ip) == (200, f"hello from {docker_lab.prefix}-web\n")

    # The host reaches the VM over the veth, and nothing behind it.
    assert docker_lab.ping(docker_lab.vm_address).returncode == 0
    reply = docker_lab.http_get(f"http://{ip}/")
    assert isinstance(reply, str), reply
    assert "unreachable" in reply.lower(), reply
    assert docker_lab.ping(ip).returncode != 0


def test_spawn_runs_in_the_host_namespace(docker_lab: DockerLab) -> None:
    """A listener spawned in the host namespace is reached from the VM at the host address."""
    port = 2511
    script = (
        "import os, socket\n"
        f"s = socket.create_server(('{docker_lab.host_address}', {port}))\n"
        "print(os.environ['CTUN_RUN_DIR'], os.environ['CTUN_STATE_DIR'], flush=True)\n"
        "c, _ = s.accept(); c.sendall(b'hi from the host'); c.close()\n"
    )
    proc = docker_lab.spawn(["python3", "-c", script], "listener")

    def connect() -> socket.socket | None:
        try:
            return socket.create_connection((str(docker_lab.host_address), port), timeout=1)
        except OSError:
            assert proc.poll() is None, docker_lab.log("listener")
            return None

    sock = wait_until(connect, 10, what="the listener in the host namespace")
    assert sock is not None
    with sock:
        assert sock.recv(100) == b"hi from the host"
    assert proc.wait(timeout=10) == 0, docker_lab.log("listener")
    assert docker_lab.log("listener").split() == [
        str(docker_lab.run_dir),
        str(docker_lab.state_dir),
    ]


def test_busybox_image_has_the_applets(dockerd: Dockerd) -> None:
    """The builder from scratch (a throwaway tag), then reuse by tag."""
    client = dockerd.client()
    tag = "ctun-test/busybox:selftest"
    if image_exists(client, tag):
        client.images.remove(tag, force=True)
    try:
        assert ensure_busybox_image(client, tag) == tag
        image_id = client.images.get(tag).id
        assert ensure_busybox_image(client, tag) == tag
        assert client.images.get(tag).id == image_id
        script = "for a in " + " ".join(BUSYBOX_APPLETS) + "; do [ -x /bin/$a ] || exit 1; done"
        out = client.containers.run(
            tag, ["sh", "-c", script + " && test -d /www && echo ok"],
            remove=True, network_mode="none", labels={LABEL: SELFTEST_PREFIX},
        )  # fmt: skip
        assert out == b"ok\n"
    finally:
        if image_exists(client, tag):
            client.images.remove(tag, force=True)


def test_python_base_image(dockerd: Dockerd, python_base_image: str) -> None:
    client = dockerd.client()
    outputs = [
        client.containers.run(
            python_base_image,
            argv,
            remove=True,
            network_mode="none",
            labels={LABEL: SELFTEST_PREFIX},
        )
        for argv in (["python3", "-c", "import venv"], ["iptables", "--version"])
    ]
    assert outputs[0] == b""
    assert outputs[1].startswith(b"iptables v"), outputs[1]


def test_destroy_removes_labelled_objects_only(dockerd: Dockerd, busybox_image: str) -> None:
    client = dockerd.client()
    rules_before = iptables_dump()
    bystander = client.networks.create(f"{SELFTEST_PREFIX}-unlabelled", driver="bridge")
    try:
        lab = DockerLab(SELFTEST_PREFIX, dockerd=dockerd)
        with lab:
            net = lab.network("net", SUBNET)
            lab.container(net, "web")
            workdir = lab.workdir
            assert netns.exists(lab.host_ns)
            assert Path(f"/sys/class/net/{lab.vm_if}").exists()
            assert len(lab.leftovers()) == 4  # namespace, link, container, network
        assert lab.leftovers() == []
        assert not workdir.exists()
        client.networks.get(bystander.id)  # still there
    finally:
        bystander.remove()
    assert iptables_dump() == rules_before


def test_create_removes_debris_of_a_crash(dockerd: Dockerd, busybox_image: str) -> None:
    """What a crashed lab with the same prefix left: namespace, workdir, labelled objects."""
    client = dockerd.client()
    labels = {LABEL: SELFTEST_PREFIX}
    host_ns = f"{SELFTEST_PREFIX}-host"
    netns.delete(host_ns)
    netns.add(host_ns)
    old_workdir = Path(tempfile.mkdtemp(prefix=f"{SELFTEST_PREFIX}.dlab."))
    net = client.networks.create(f"{SELFTEST_PREFIX}-old", driver="bridge", labels=labels)
    old = client.containers.create(busybox_image, ["sleep", "60"], labels=labels,
                                   name=f"{SELFTEST_PREFIX}-old", network=net.name)  # fmt: skip
    lab = DockerLab(SELFTEST_PREFIX, dockerd=dockerd)
    with lab:
        assert not old_workdir.exists()
        assert lab.workdir.exists()
        names = {c.name for c in client.containers.list(all=True)}
        assert old.name not in names
        assert net.name not in {n.name for n in client.networks.list()}
        assert lab.leftovers() == [f"namespace {host_ns}", f"link {lab.vm_if}"]
    assert lab.leftovers() == []


def _answers() -> bool:
    """A ping through a new client and connection, errors counting as "no"."""
    try:
        fresh = docker.from_env(version="auto", timeout=2)
    except docker.errors.DockerException:
        return False
    try:
        return bool(fresh.ping() and isinstance(fresh.containers.list(), list))
    except (docker.errors.DockerException, OSError):
        return False
    finally:
        fresh.close()


def test_dockerd_restarts_whoever_started_it(dockerd: Dockerd) -> None:
    """The first restart stops an engine started elsewhere (by hand, here), the second one
    ours; each time a fresh client gets answers again."""
    for _ in range(2):
        before = dockerd.pid()
        assert before is not None
        dockerd.restart()
        wait_until(_answers, 30, what="the restarted engine to answer")
        after = dockerd.pid()
        assert after is not None and after != before
        assert os.path.exists(f"/proc/{after}")
        assert dockerd.client().ping()
