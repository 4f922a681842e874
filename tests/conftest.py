"""Shared fixtures: prerequisite handling for `root` and `docker` tests, the namespace lab, the
Docker lab and its engine and images, leak guards."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator

import pytest
from ctun.lab.docker import (
    Dockerd,
    DockerLab,
    created_docker_labs,
    docker_missing,
    ensure_busybox_image,
    ensure_dockerd,
    ensure_python_base_image,
)
from ctun.lab.topology import Lab, created_labs, lab_namespaces

LAB_PREFIX = "ctunlab"
DOCKER_LAB_PREFIX = "ctundk"


def _strict() -> bool:
    """CI must run everything: there a missing prerequisite is a failure, not a skip."""
    return os.environ.get("CI") == "true" or os.environ.get("CTUN_REQUIRE_ALL") == "1"


@functools.cache
def missing_prerequisite() -> str | None:
    """Why `root` tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError:
        return "needs /dev/net/tun"
    os.close(fd)
    if shutil.which("ip") is None:
        return "needs `ip netns` (iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, check=False)
    if probe.returncode != 0:  # busybox ip, or a kernel without network namespaces
        return "needs `ip netns` (iproute2)"
    if shutil.which("ping") is None:
        return "needs iputils ping"
    version = subprocess.run(["ping", "-V"], capture_output=True, text=True, check=False)
    # busybox/inetutils pings lack -M (don't fragment) and -W, which the lab relies on.
    if "iputils" not in version.stdout + version.stderr:
        return "needs iputils ping"
    return None


def _require(reason: str | None) -> None:
    if reason is None:
        return
    if _strict():
        pytest.fail(f"{reason} (CI=true or CTUN_REQUIRE_ALL=1: missing prerequisites fail)")
    pytest.skip(reason)


def require_root_prerequisites() -> None:
    _require(missing_prerequisite())


@functools.cache
def missing_docker_prerequisite() -> str | None:
    """Why `docker` tests cannot run here, or None (asked once: it may start dockerd)."""
    return docker_missing()


def require_docker_prerequisites() -> None:
    _require(missing_docker_prerequisite())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # A hook rather than an autouse fixture: it runs before any fixture is set up, so a
    # module-scoped `lab` is never even attempted on a machine that cannot host it.
    if item.get_closest_marker("root") is not None:
        require_root_prerequisites()
    if item.get_closest_marker("docker") is not None:
        require_docker_prerequisites()


def _prefix(*parts: str) -> str:
    """A stable lab prefix: the same test gets the same namespaces on every run, so leftovers
    of a crashed run are found and removed by the next create()."""
    text = "-".join(re.sub(r"[^A-Za-z0-9_]+", "_", p) for p in parts)
    if len(text) > 40:  # keep namespace names readable; the hash keeps them distinct
        text = text[:31] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{LAB_PREFIX}-{text}"


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """One lab per test module; a module may set LAB_CONTAINERS (default 2)."""
    require_root_prerequisites()
    module_name = request.module.__name__.rpartition(".")[2]
    the_lab = Lab(_prefix(module_name), containers=getattr(request.module, "LAB_CONTAINERS", 2))
    try:
        the_lab.create()
        yield the_lab
    finally:
        the_lab.destroy()


@pytest.fixture
def fresh_lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A lab of its own for a test that breaks things (one container)."""
    require_root_prerequisites()
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    the_lab = Lab(_prefix("f", digest))
    try:
        the_lab.create()
        yield the_lab
    finally:
        the_lab.destroy()


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Dockerd]:
    """The Docker engine, answering; stopped at the end only if this session started it.

    Before that, any DockerLab this session created and did not clean up fails the session
    (after being destroyed), as _no_leftovers does for namespace labs.
    """
    require_docker_prerequisites()
    engine = ensure_dockerd()
    try:
        yield engine
        leaked: list[str] = []
        for each in created_docker_labs():
            found = each.leftovers()
            if found:
                leaked += found
                each.destroy()
        assert not leaked, f"test session left behind Docker lab objects: {leaked} (now removed)"
    finally:
        engine.stop_if_we_started()


@pytest.fixture(scope="session")
def busybox_image(dockerd: Dockerd) -> str:
    """Tag of the busybox HTTP image (built from /bin/busybox the first time)."""
    return ensure_busybox_image(dockerd.client())


@pytest.fixture(scope="session")
def python_base_image(dockerd: Dockerd) -> str:
    """Tag of the Debian bookworm + python3 image (debootstrap, about a minute, the first time)."""
    return ensure_python_base_image(dockerd.client())


@pytest.fixture
def docker_lab(
    request: pytest.FixtureRequest, dockerd: Dockerd, busybox_image: str
) -> Iterator[DockerLab]:
    """A DockerLab of the test's own (stable prefix, so a crashed run's debris is removed)."""
    require_root_prerequisites()
    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    the_lab = DockerLab(f"{DOCKER_LAB_PREFIX}-{digest}", dockerd=dockerd)
    try:
        the_lab.create()
        yield the_lab
    finally:
        the_lab.destroy()


def _root_ctun_links() -> set[str]:
    # if_nameindex() lists the namespace of the calling thread: the main thread stays in the
    # root namespace (netns.call_in only moves short-lived helper threads).
    return {name for _, name in socket.if_nameindex() if name.startswith("ctun")}


@pytest.fixture(scope="session", autouse=True)
def _no_leftovers() -> Iterator[None]:
    """Fail the session if it leaves a lab namespace or a new ctun* link in the root namespace.

    Only labs this process created are checked and cleaned: another pytest session may be
    running on the same machine, and its labs are alive, not leaked.
    """
    links_before = _root_ctun_links()
    yield
    leaked_ns: list[str] = []
    for each in created_labs():
        namespaces = lab_namespaces(each.prefix)
        if namespaces:
            leaked_ns += namespaces
            each.destroy()  # clean up before failing, so the next run starts clean
    # Links are reported but not deleted: a daemon of a concurrent session may own one.
    leaked_links = _root_ctun_links() - links_before
    problems = []
    if leaked_ns:
        problems.append(f"network namespaces {sorted(leaked_ns)} (now removed)")
    if leaked_links:
        problems.append(f"links in the root namespace {sorted(leaked_links)}")
    assert not problems, "test session left behind: " + "; ".join(problems)
