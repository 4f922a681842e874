"""The agent image: what goes into it (pure), and building it offline on a local base (docker)."""

from __future__ import annotations

import contextlib
import platform
import re
import subprocess
import tarfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ctun import __version__
from ctun.core import agent_image
from ctun.core.agent_image import ImageError
from ctun.lab.docker import Dockerd

ROOT = Path(__file__).resolve().parent.parent
SECRETISH = re.compile(r"(?i)key|secret|token|passw|psk|credential")
TEST_EXTRAS = {"pytest", "pytest-timeout", "hypothesis", "ruff", "mypy"}


def names_of(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s;<>=!~\[@]", r, maxsplit=1)[0].lower() for r in requirements}


def tar_names(wheels: Path) -> list[str]:
    with tarfile.open(fileobj=agent_image.build_context(wheels)) as context:
        return context.getnames()


def fake_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{name}-{version}.dist-info/METADATA",
                     f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}")
    return path


# --- pure ----------------------------------------------------------------------------------


def test_image_tag_is_the_package_version() -> None:
    assert agent_image.image_tag() == f"ctun-agent:{__version__}"
    assert agent_image.image_tag("9.9.9") == "ctun-agent:9.9.9"


def test_runtime_requirements_are_linux_ones_without_extras() -> None:
    requirements = agent_image.runtime_requirements()
    assert {"pluggy", "cryptography", "pyroute2", "python-pytun"} <= names_of(requirements)
    assert not names_of(requirements) & TEST_EXTRAS
    assert "textual" not in names_of(requirements)  # the agent has no user interface
    assert not [r for r in requirements if ";" in r], "markers are evaluated, not passed on"


def test_context_holds_dockerfile_package_and_wheels(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path, "pluggy", "1.5.0")
    names = tar_names(tmp_path)
    for needed in ("Dockerfile", "ctun/__init__.py", "ctun/core/protocol.py",
                   "ctun/vm/agent.py", f"wheels/{wheel.name}", "wheels/requirements.txt"):
        assert needed in names
    for name in names:
        assert not re.search(r"(^|/)(tests|\.venv|__pycache__|build)/", name), name
        assert name.startswith("wheels/") or name == "Dockerfile" or name.endswith(".py"), name
    with tarfile.open(fileobj=agent_image.build_context(tmp_path)) as context:
        member = context.extractfile("wheels/requirements.txt")
        assert member is not None
        assert member.read().decode().split() == agent_image.runtime_requirements()


def test_context_packages_are_the_ones_pyproject_lists(tmp_path: Path) -> None:
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]
    folders = {"/".join(n.split("/")[:-1]) for n in tar_names(tmp_path) if n.startswith("ctun/")}
    assert folders == {p.replace(".", "/") for p in packages}


def test_context_skips_tests_venvs_build_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "pkg"
    for rel in ("__init__.py", "core/__init__.py", "core/a.py", "tests/__init__.py",
                "tests/test_a.py", ".venv/lib/x/__init__.py", "build/lib/__init__.py",
                "core/__pycache__/a.cpython-311.pyc", "docs/conf.py", "vm/Dockerfile"):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text("# x\n")
    (pkg / "pyproject.toml").write_text('[project]\nname = "ctun"\ndependencies = ["a>=1"]\n')
    monkeypatch.setattr(agent_image, "PACKAGE_DIR", pkg)
    monkeypatch.setattr(agent_image, "DOCKERFILE", pkg / "vm" / "Dockerfile")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    names = set(tar_names(wheels))
    assert names == {"Dockerfile", "ctun/__init__.py", "ctun/core/__init__.py", "ctun/core/a.py",
                     "wheels/requirements.txt"}


def test_context_without_dockerfile_is_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_image, "DOCKERFILE", tmp_path / "nope" / "Dockerfile")
    with pytest.raises(ImageError, match="Dockerfile is missing") as caught:
        agent_image.build_context(tmp_path)
    assert "\n" not in str(caught.value)


def test_dockerfile_takes_no_secret() -> None:
    text = (ROOT / "vm" / "Dockerfile").read_text()
    instructions = [line.split("#")[0].strip() for line in text.splitlines()]
    args = {re.split(r"[=\s]", line.split(None, 1)[1])[0]
            for line in instructions if line.startswith("ARG ")}
    envs = {re.split(r"[=\s]", line.split(None, 1)[1])[0]
            for line in instructions if line.startswith("ENV ")}
    assert args == {"BASE", "VERSION", "SOURCE"}
    assert envs == {"PYTHONPATH"}
    assert not [n for n in args | envs if SECRETISH.search(n)]
    assert 'ENTRYPOINT ["/opt/ctun/venv/bin/python", "-m", "ctun", "vm"]' in instructions


def test_missing_wheels_follows_dependencies_and_markers(tmp_path: Path) -> None:
    fake_wheel(tmp_path, "a", "1.0", ("b>=2", "c; sys_platform == 'win32'", "d; extra == 'x'"))
    old_b = fake_wheel(tmp_path, "b", "1.0")
    (tmp_path / "broken-1.0-py3-none-any.whl").write_text("not a zip")
    missing = agent_image._missing_wheels(tmp_path, ["a>=1", "broken"], "3.11", "x86_64")
    assert sorted(missing) == ["b>=2", "broken"]
    old_b.unlink()
    fake_wheel(tmp_path, "b", "2.1")
    assert agent_image._missing_wheels(tmp_path, ["a>=1"], "3.11", "x86_64") == []
    assert agent_image._missing_wheels(tmp_path, ["a[x]>=1"], "3.11", "x86_64") == ["d"]


def test_download_is_skipped_when_the_cache_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_wheel(tmp_path, "a", "1.0", ("b",))
    fake_wheel(tmp_path, "b", "1.0")

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip ran although the cache was complete")

    monkeypatch.setattr(subprocess, "run", no_pip)
    agent_image.download_wheels(tmp_path, ["a>=1"], "3.11", "x86_64")


def test_download_failure_names_the_requirement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No index at all: pip fails offline, the way it does when PyPI is out of reach.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(ImageError) as caught:
        agent_image.download_wheels(tmp_path / "w", ["pluggy>=1.3"], "3.11", "x86_64")
    message = str(caught.value)
    assert message.startswith("pip download of pluggy>=1.3 (Python 3.11, x86_64) failed: ")
    assert "put the wheels in" in message and "\n" not in message
    assert not list((tmp_path / "w").iterdir()), "no partial download left behind"


def test_failed_step_is_named_with_its_last_line() -> None:
    lines = ["Step 1/9 : ARG BASE", "Step 2/9 : FROM ctun-test/x:1", " ---> 0123456789ab",
             "Step 5/9 : RUN python3 -m venv /opt/ctun/venv && pip install -r r.txt",
             " ---> Running in abcdefabcdef", "Looking in links: /tmp/wheels",
             "ERROR: No matching distribution found for pluggy>=1.3",
             "Removing intermediate container abcdefabcdef"]
    assert agent_image._failed_step("returned a non-zero code: 1", lines) == (
        "step 5/9 (RUN python3 -m venv /opt/ctun/venv && pip install -r r.txt): "
        "ERROR: No matching distribution found for pluggy>=1.3")
    assert agent_image._failed_step("no such file", []) == "no such file"


# --- docker ----------------------------------------------------------------------------------


class _OfflineImages:
    """client.images whose builds run without any network (RUN steps get --network none)."""

    def __init__(self, images: Any) -> None:
        self._images = images
        self.builds = 0

    def build(self, **kwargs: Any) -> Any:
        self.builds += 1
        return self._images.build(network_mode="none", **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._images, name)


class _Offline:
    def __init__(self, client: Any) -> None:
        self._client = client
        self.images = _OfflineImages(client.images)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def _dangling(client: Any) -> set[str]:
    return {image.id for image in client.images.list(filters={"dangling": True})}


def _descends_from(client: Any, image_id: str, ancestor: str) -> bool:
    with contextlib.suppress(Exception):
        while image_id:
            if image_id == ancestor:
                return True
            image_id = client.images.get(image_id).attrs.get("Parent", "")
    return False


def docker_run(*argv: str) -> str:
    result = subprocess.run(["docker", "run", "--rm", "--network", "none", *argv],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@dataclass(frozen=True)
class Built:
    client: Any
    base: str
    cache: Path
    tag: str
    seconds: float


@pytest.fixture(scope="module")
def built(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
    dockerd: Dockerd, python_base_image: str,
) -> Iterator[Built]:
    """The agent image, rebuilt (force) with no network during the build; the wheels cache
    survives runs in pytest's cache. The image and the base stay: other tests use them."""
    client = dockerd.client()
    pytest_cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    cache = (pytest_cache.mkdir("ctun-agent-wheels") if pytest_cache is not None
             else tmp_path_factory.mktemp("wheels"))
    before = _dangling(client)
    offline = _Offline(client)
    start = time.monotonic()
    tag = agent_image.ensure_image(offline, base=python_base_image, cache_dir=Path(cache),
                                   force=True)
    seconds = time.monotonic() - start
    assert offline.images.builds == 1
    print(f"\nbuilt {tag} in {seconds:.1f} s, "
          f"{client.images.get(tag).attrs['Size'] / 1e6:.0f} MB")
    yield Built(client, python_base_image, Path(cache), tag, seconds)
    for image_id in _dangling(client) - before:  # e.g. the agent image a force build replaced
        if _descends_from(client, image_id, client.images.get(python_base_image).id):
            with contextlib.suppress(Exception):
                client.images.remove(image_id)


@pytest.mark.docker
def test_ensure_image_builds_offline_and_then_reuses(built: Built) -> None:
    assert built.tag == f"ctun-agent:{__version__}"
    image_id = built.client.images.get(built.tag).id
    offline = _Offline(built.client)
    start = time.monotonic()
    again = agent_image.ensure_image(offline, base=built.base, cache_dir=built.cache)
    assert again == built.tag
    assert offline.images.builds == 0
    assert time.monotonic() - start < 5
    assert built.client.images.get(built.tag).id == image_id


@pytest.mark.docker
def test_image_runs_the_agent_with_its_dependencies(built: Built) -> None:
    probe = "import ctun.vm.agent, pytun, pyroute2, cryptography; print('ok')"
    out = docker_run("--entrypoint", "/opt/ctun/venv/bin/python", built.tag, "-c", probe)
    assert out == "ok\n"
    help_text = docker_run(built.tag, "--help")
    assert help_text.startswith("usage: ctun vm") and "--host" in help_text
    listing = docker_run("--entrypoint", "sh", built.tag, "-c",
                         "cd /opt/ctun/lib/ctun && find . -name '*' -type d | sort")
    assert "./vm" in listing.split() and "./tests" not in listing.split()


@pytest.mark.docker
def test_image_is_labelled_and_holds_no_secret(built: Built) -> None:
    image = built.client.images.get(built.tag)
    assert image.labels["io.ctun.component"] == "agent"
    assert image.labels["io.ctun.version"] == __version__
    config = image.attrs["Config"]
    assert config["Entrypoint"] == ["/opt/ctun/venv/bin/python", "-m", "ctun", "vm"]
    env_names = {entry.split("=", 1)[0] for entry in config["Env"]}
    assert "PYTHONPATH=/opt/ctun/lib" in config["Env"]
    assert not [n for n in env_names if SECRETISH.search(n)]
    history = subprocess.run(["docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}",
                              built.tag], capture_output=True, text=True, check=True).stdout
    # Build args show in history as `|N NAME=value ...`: BASE, VERSION and SOURCE (a digest of
    # the package's files) may be there, nothing secret.
    assert set(re.findall(r"\b([A-Z][A-Z0-9_]*)=", history)) <= {"BASE", "VERSION", "SOURCE",
                                                                  "PATH", "PYTHONPATH"}
    assert not re.search(r"(?i)(secret|token|passw|psk|--key)", history)
    keys = docker_run("--entrypoint", "sh", built.tag, "-c",
                      "find / -xdev \\( -name '*.key' -o -path '/etc/ctun*' "
                      "-o -path '/var/lib/ctun*' \\) 2>/dev/null; true")
    assert keys == ""


@pytest.mark.docker
def test_base_python_reports_version_and_machine(dockerd: Dockerd, python_base_image: str) -> None:
    client = dockerd.client()

    def probes() -> set[str]:
        found = client.containers.list(all=True, filters={"label": "io.ctun.component=probe"})
        return {container.id for container in found}

    before = probes()
    version, machine, glibc = agent_image.base_python(client, python_base_image)
    assert re.fullmatch(r"3\.\d+", version) and int(version.split(".")[1]) >= 11
    assert glibc == "2.36"  # Debian bookworm
    assert machine == platform.machine()  # a local engine: the host's own machine
    assert probes() <= before, "the probe container is removed"


@pytest.mark.docker
def test_missing_base_is_one_line_error(dockerd: Dockerd) -> None:
    with pytest.raises(ImageError) as caught:
        agent_image.base_python(dockerd.client(), "ctun-test/no-such-base:1")
    assert str(caught.value) == (
        "base image ctun-test/no-such-base:1 not found: pass a local base (e.g. --agent-base) "
        "or make sure the engine can pull")


@pytest.mark.docker
def test_failed_build_names_the_step_and_leaves_no_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dockerd: Dockerd, python_base_image: str,
) -> None:
    client = dockerd.client()
    tag = "ctun-test/agent-broken:1"
    # An empty wheels folder: the pip step finds nothing to install.
    monkeypatch.setattr(agent_image, "image_tag", lambda version=__version__: tag)
    monkeypatch.setattr(agent_image, "download_wheels", lambda *args: None)
    before = _dangling(client)
    with pytest.raises(ImageError) as caught:
        agent_image.ensure_image(client, base=python_base_image, cache_dir=tmp_path)
    message = str(caught.value)
    assert message.startswith(f"building {tag} failed at step "), message
    assert "RUN python3 -m venv" in message
    assert "No matching distribution found for pluggy" in message and "\n" not in message
    with pytest.raises(Exception, match="No such image"):
        client.images.get(tag)
    base_id = client.images.get(python_base_image).id
    left = [i for i in _dangling(client) - before if _descends_from(client, i, base_id)]
    assert left == []


def test_wheels_match_the_base_glibc() -> None:
    """A bookworm base (glibc 2.36) takes manylinux_2_34 wheels, the newest some projects ship
    (cryptography does); an older base never gets wheels newer than its glibc."""
    tags = agent_image.manylinux_platforms("x86_64", "2.36")
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_34_x86_64" in tags
    assert tags[-2:] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    assert "manylinux_2_34_aarch64" not in agent_image.manylinux_platforms("aarch64", "2.31")
    assert agent_image.manylinux_platforms("x86_64", "0") == [
        "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
