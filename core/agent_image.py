"""The agent image: `ctun-agent:<version>`, built on the user's engine from a local base.

Nothing is pulled but the base (and only when the engine lacks it): the runtime dependencies
are downloaded as wheels on the host, for the base's Python and machine, cached under the
state directory, and sent with the package's own source in the build context, so the build
itself runs offline (see vm/Dockerfile). The image holds no key: the agent gets its key at
run time.
"""

from __future__ import annotations

import email.parser
import hashlib
import importlib
import io
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from docker.errors import BuildError, DockerException, ImageNotFound

from .. import __version__
from .config import default_state_dir

if TYPE_CHECKING:
    from packaging.requirements import Requirement

__all__ = [
    "DEFAULT_BASE",
    "IMAGE",
    "ImageError",
    "base_python",
    "build_context",
    "download_wheels",
    "ensure_image",
    "image_tag",
    "runtime_requirements",
]

log = logging.getLogger("ctun.agent_image")

IMAGE = "ctun-agent"
DEFAULT_BASE = "python:3.11-slim-bookworm"
MIN_PYTHON = (3, 11)  # pyproject's requires-python

# The package's own directory: ctun/ in the image is made from its .py files.
PACKAGE_DIR = Path(__file__).resolve().parent.parent
DOCKERFILE = PACKAGE_DIR / "vm" / "Dockerfile"
# Never part of the image, even if one of them held an __init__.py.
_SKIP_DIRS = frozenset({"tests", "build", "dist", "__pycache__", ".venv", "venv"})

_PROBE = ("import platform, sys; print('%d.%d' % sys.version_info[:2], platform.machine(), "
          "platform.libc_ver()[1] or '0')")
# What only the host's user interface needs: the agent shows none, so its image goes without.
HOST_ONLY = frozenset({"textual"})
OLDEST_MANYLINUX = 17  # manylinux2014 = glibc 2.17: every wheel we accept is at least that
_PIP_TIMEOUT = 900  # seconds for one `pip download`: slow mirrors, but never a hung daemon


class ImageError(Exception):
    """The agent image could not be had; str() is one line: what failed and what to do."""


def image_tag(version: str = __version__) -> str:
    """`ctun-agent:<version>`: the image's tag is the package's version."""
    return f"{IMAGE}:{version}"


def _packaging(module: str) -> Any:
    """packaging.<module>, imported on first use: the agent image, which imports this module
    but builds nothing, has neither packaging nor pip."""
    try:
        return importlib.import_module(f"packaging.{module}")
    except ImportError:  # pip ships its own copy, and download_wheels needs pip anyway
        return importlib.import_module(f"pip._vendor.packaging.{module}")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _linux_env(python_version: str | None = None, machine: str | None = None) -> dict[str, str]:
    """Marker variables of the agent's platform (the rest default to this interpreter's)."""
    env = {
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    if python_version:
        env["python_version"] = python_version
        env["python_full_version"] = f"{python_version}.0"
    if machine:
        env["platform_machine"] = machine
    return env


def _applies(req: Requirement, env: Mapping[str, str], extras: Iterable[str] = ()) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in ("", *extras))


def _declared_requirements() -> list[str]:
    # A source checkout (editable installs included) declares them in its pyproject.toml; its
    # egg-info may be stale, and the image is made from this very source, so that file wins.
    pyproject = PACKAGE_DIR / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == "ctun":
            return list(project.get("dependencies", []))
    try:
        return metadata.requires("ctun") or []
    except metadata.PackageNotFoundError:
        raise ImageError(
            "cannot tell ctun's dependencies: no installed metadata and no pyproject.toml "
            f"in {PACKAGE_DIR}; install ctun with pip"
        ) from None


def runtime_requirements() -> list[str]:
    """The package's dependencies on Linux: markers evaluated for a Linux target (and dropped),
    extras left out. E.g. ["pluggy>=1.3", "cryptography>=41", "pyroute2>=0.7", ...]."""
    env = _linux_env()
    found: list[str] = []
    for line in _declared_requirements():
        req = _packaging("requirements").Requirement(line)
        if req.name.lower() in HOST_ONLY:
            continue
        if _applies(req, env):
            req.marker = None
            found.append(str(req))
    return found


def base_python(client: Any, base: str) -> tuple[str, str, str]:
    """(Python version like "3.11", machine like "x86_64", glibc like "2.36" or "0" when it
    has none) of the base image's `python3`, asked in a throwaway container (no network;
    removed afterwards). The glibc decides which manylinux wheels will run there."""
    try:
        client.images.get(base)
    except ImageNotFound:
        try:
            log.info("pulling the agent's base image %s", base)
            client.images.pull(base)
        except (DockerException, OSError) as exc:
            log.debug("pulling %s failed: %s", base, _one_line(exc))
            raise ImageError(
                f"base image {base} not found: pass a local base (e.g. --agent-base) "
                "or make sure the engine can pull"
            ) from None
    try:
        container = client.containers.create(
            base, entrypoint=["python3", "-c", _PROBE], network_disabled=True,
            labels={"io.ctun.component": "probe"},
        )
    except (DockerException, OSError) as exc:
        raise ImageError(f"cannot start a container of {base}: {_one_line(exc)}") from None
    try:
        container.start()
        status = container.wait(timeout=120).get("StatusCode")
        out = container.logs(stdout=True, stderr=True).decode(errors="replace").strip()
    except (DockerException, OSError) as exc:
        raise ImageError(
            f"base image {base} cannot run python3 ({_one_line(exc)}): "
            "use a base with Python 3.11 or newer"
        ) from None
    finally:
        try:
            container.remove(force=True)
        except (DockerException, OSError):
            log.debug("removing the probe container of %s failed", base, exc_info=True)
    match = re.fullmatch(r"(\d+)\.(\d+) (\S+) (\S+)", out)
    if status != 0 or match is None:
        raise ImageError(
            f"base image {base}: python3 failed ({_one_line(out)[-200:] or f'status {status}'})"
            ": use a base with Python 3.11 or newer"
        )
    version = (int(match[1]), int(match[2]))
    if version < MIN_PYTHON:
        raise ImageError(
            f"base image {base} has Python {version[0]}.{version[1]}; "
            f"ctun needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer: pass another base"
        )
    return f"{version[0]}.{version[1]}", match[3], match[4]


def _wheel_requires(path: Path) -> list[str] | None:
    """Requires-Dist of a wheel; None when it is not a readable wheel."""
    try:
        with zipfile.ZipFile(path) as whl:
            name = next(
                n for n in whl.namelist()
                if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
            )
            text = whl.read(name).decode("utf-8", errors="replace")
    except (OSError, zipfile.BadZipFile, StopIteration):
        return None
    return email.parser.HeaderParser().parsestr(text).get_all("Requires-Dist") or []


def _missing_wheels(
    dest: Path, requirements: list[str], python_version: str, machine: str
) -> list[str]:
    """The requirements (dependencies of dependencies included) that no wheel in dest meets."""
    requirements_mod, utils = _packaging("requirements"), _packaging("utils")
    wheels: dict[str, list[tuple[Any, list[str]]]] = {}
    for path in dest.glob("*.whl"):
        try:
            name, version, _, _ = utils.parse_wheel_filename(path.name)
        except utils.InvalidWheelFilename:
            continue
        requires = _wheel_requires(path)
        if requires is not None:
            wheels.setdefault(name, []).append((version, requires))
    env = _linux_env(python_version, machine)
    missing: list[str] = []
    seen: set[str] = set()
    todo: list[Requirement] = [requirements_mod.Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if str(req) in seen:
            continue
        seen.add(str(req))
        fits = [w for w in wheels.get(utils.canonicalize_name(req.name), [])
                if req.specifier.contains(w[0], prereleases=True)]
        if not fits:
            missing.append(str(req))
            continue
        _, requires = max(fits, key=lambda w: w[0])  # the one pip would install
        for line in requires:
            try:
                dep = requirements_mod.Requirement(line)
            except requirements_mod.InvalidRequirement:
                continue
            if _applies(dep, env, req.extras):
                dep.marker = None
                todo.append(dep)
    return missing


def _pip_failure(stderr: str, requirements: list[str]) -> tuple[str, str]:
    """(the requirement pip failed on, pip's last error line)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    last = (errors or lines or ["no output"])[-1].removeprefix("ERROR:").strip()
    for line in errors:
        named = re.search(r"(?:the requirement|distribution found for) (\S+)", line)
        if named:
            return named[1], last
    return " ".join(requirements), last


def manylinux_platforms(machine: str, glibc: str) -> list[str]:
    """pip --platform tags for wheels that run on this glibc: every manylinux_2_N from the
    base's own glibc down to 2.17 (newest first), plus the legacy manylinux2014 name."""
    found = re.fullmatch(r"2\.(\d+)", glibc)
    newest = int(found[1]) if found else OLDEST_MANYLINUX
    tags = [f"manylinux_2_{minor}_{machine}"
            for minor in range(max(newest, OLDEST_MANYLINUX), OLDEST_MANYLINUX - 1, -1)]
    return [*tags, f"manylinux2014_{machine}"]


def download_wheels(
    dest: Path, requirements: list[str], python_version: str, machine: str,
    glibc: str = "2.17",
) -> None:
    """Fill dest with wheels of the requirements and their dependencies for CPython
    python_version on Linux/machine. Nothing is fetched when dest already holds them."""
    dest.mkdir(parents=True, exist_ok=True)
    if not _missing_wheels(dest, requirements, python_version, machine):
        log.debug("wheels for %s in %s are complete", python_version, dest)
        return
    # pip downloads into a private folder, so an interrupted run leaves no half a wheel
    # and a concurrent build sees only complete files.
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        argv = [
            sys.executable, "-m", "pip", "download", "--only-binary=:all:",
            *(arg for tag in manylinux_platforms(machine, glibc)
              for arg in ("--platform", tag)),
            "--python-version", python_version, "--implementation", "cp",
            "--disable-pip-version-check", "--no-input", "-d", tmp, *requirements,
        ]
        log.info("downloading the agent's dependencies for Python %s on %s", python_version,
                 machine)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False,
                                  timeout=_PIP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ImageError(
                f"pip download of {' '.join(requirements)} took over {_PIP_TIMEOUT} s: "
                f"check pip's index and network, or put the wheels in {dest}"
            ) from None
        if done.returncode != 0:
            which, why = _pip_failure(done.stderr, requirements)
            raise ImageError(
                f"pip download of {which} (Python {python_version}, {machine}) failed: "
                f"{why}; check that pip can reach its index, or put the wheels in {dest}"
            )
        for whl in Path(tmp).glob("*.whl"):
            os.replace(whl, dest / whl.name)
    still = _missing_wheels(dest, requirements, python_version, machine)
    if still:
        raise ImageError(
            f"pip download left out {', '.join(sorted(still))} for Python {python_version} "
            f"on {machine}: put their wheels in {dest}"
        )


def _package_files() -> list[Path]:
    """The package's .py files: its own folder and the sub-packages (folders with an
    __init__.py) under it; tests, build output, venvs and caches are not packages."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(PACKAGE_DIR):
        here = Path(dirpath)
        dirnames[:] = sorted(
            name for name in dirnames
            if name not in _SKIP_DIRS and not name.startswith(".")
            and (here / name / "__init__.py").is_file()
        )
        found += [here / name for name in sorted(filenames) if name.endswith(".py")]
    return found


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed owner, mode and time: the same source gives the same context, so the engine's
    # layer cache holds across builds.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


SOURCE_LABEL = "io.ctun.source"


def source_hash() -> str:
    """A digest of the package's own files: what the image must be rebuilt for."""
    digest = hashlib.sha256()
    for path in sorted(_package_files()):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    digest.update(DOCKERFILE.read_bytes() if DOCKERFILE.exists() else b"")
    return digest.hexdigest()[:16]


def build_context(wheels: Path) -> io.BytesIO:
    """The build context as an uncompressed tar: Dockerfile, ctun/ (the package's .py files)
    and wheels/ (*.whl and requirements.txt, the runtime requirements)."""
    try:
        dockerfile = DOCKERFILE.read_bytes()
    except OSError:
        raise ImageError(
            f"{DOCKERFILE} is missing: this ctun install lacks the agent's Dockerfile; "
            "reinstall ctun (pip install ctun) or run it from a source checkout"
        ) from None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "Dockerfile", dockerfile)
        for path in _package_files():
            _add(tar, f"ctun/{path.relative_to(PACKAGE_DIR).as_posix()}", path.read_bytes())
        for whl in sorted(wheels.glob("*.whl")):
            _add(tar, f"wheels/{whl.name}", whl.read_bytes())
        _add(tar, "wheels/requirements.txt", "".join(
            f"{req}\n" for req in runtime_requirements()).encode())
    buf.seek(0)
    return buf


def _stream_lines(build_log: Iterable[Mapping[str, Any]]) -> list[str]:
    text = "".join(str(chunk.get("stream", "")) for chunk in build_log)
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # the engine colours some lines
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def _failed_step(reason: str, lines: list[str]) -> str:
    """`step 5/9 (RUN ...): <its last output line>`, or the engine's reason."""
    steps = [i for i, line in enumerate(lines) if line.startswith("Step ")]
    if not steps:
        return _one_line(reason)
    step = lines[steps[-1]]
    output = [line for line in lines[steps[-1] + 1:]
              if not line.lstrip().startswith("--->")
              and not line.startswith("Removing intermediate container")]
    number, _, instruction = step.removeprefix("Step ").partition(" : ")
    instruction = _one_line(instruction)
    if len(instruction) > 60:
        instruction = instruction[:57] + "..."
    last = _one_line(output[-1]) if output else _one_line(reason)
    return f"step {number} ({instruction}): {last}"


def _remove_partial(client: Any, lines: list[str]) -> None:
    """Remove the untagged images a failed build left (the last one takes its untagged
    parents with it); the base and any tagged or shared one (a cached layer) stay."""
    ids: list[str] = []
    after_from = False
    for line in lines:
        if line.startswith("Step "):
            after_from = " : FROM " in line
        elif (m := re.fullmatch(r"\s*---> ([0-9a-f]{12,64})", line)) and not after_from:
            ids.append(m[1])  # the image a step committed (the base, after FROM, is not one)
    if not ids:
        return
    try:
        if not client.images.get(ids[-1]).tags:
            client.images.remove(ids[-1])
    except (DockerException, OSError):
        log.debug("leaving the layers of the failed build", exc_info=True)


def _build(client: Any, context: io.BytesIO, tag: str, buildargs: dict[str, str]) -> Any:
    try:
        image, logs = client.images.build(
            fileobj=context, custom_context=True, tag=tag, buildargs=buildargs,
            rm=True, forcerm=True,
        )
    except BuildError as exc:
        lines = _stream_lines(exc.build_log)
        _remove_partial(client, lines)
        raise ImageError(
            f"building {tag} failed at {_failed_step(exc.msg, lines)}"
        ) from None
    except (DockerException, OSError) as exc:
        raise ImageError(f"building {tag} failed: {_one_line(exc)}") from None
    for line in _stream_lines(logs):
        log.debug("build: %s", line)
    return image


def ensure_image(
    client: Any, base: str = DEFAULT_BASE, cache_dir: Path | None = None, force: bool = False
) -> str:
    """The agent image's tag, building it first when the engine lacks it (or when forced).

    The wheels are cached in cache_dir/<python>-<machine> (default: <state dir>/wheels).
    Raises ImageError.
    """
    tag = image_tag()
    source = source_hash()
    old_id = None
    try:
        old = client.images.get(tag)
        old_id = old.id
        # Same version, other code (a source checkout, a local change): build again.
        current = (old.labels or {}).get(SOURCE_LABEL) == source
    except ImageNotFound:
        current = False
    except (DockerException, OSError) as exc:
        raise ImageError(f"cannot ask the engine for {tag}: {_one_line(exc)}") from None
    if current and not force:
        return tag
    python_version, machine, glibc = base_python(client, base)
    wheels = (cache_dir or default_state_dir() / "wheels") / \
        f"{python_version}-{machine}-glibc{glibc}"
    download_wheels(wheels, runtime_requirements(), python_version, machine, glibc)
    log.info("building %s on %s (Python %s, %s)", tag, base, python_version, machine)
    image = _build(client, build_context(wheels), tag,
                   {"BASE": base, "VERSION": __version__, "SOURCE": source})
    if old_id is not None and old_id != image.id:
        try:  # the image it replaces; one a container still runs stays until that is gone
            client.images.remove(old_id)
        except (DockerException, OSError):
            log.debug("keeping the replaced image %s", old_id, exc_info=True)
    return tag
