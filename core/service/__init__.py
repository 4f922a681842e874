"""Run the host daemon as a system service: systemd (Linux), launchd (macOS), the Windows SCM.

One interface, ServiceManager, with a backend per service manager; manager_for() picks the
one for this OS. The service runs `PYTHON -m ctun up --no-ui [--config FILE] [EXTRA...]`
with absolute paths, never through PATH.

House rules, as everywhere in ctun: every command a backend runs goes through its ONE runner
(the module-level `run` of the backend, or the `runner` given to the manager, which tests
replace), and uninstall undoes exactly what install created. Install records what it
created in a manifest (MANIFEST_NAME in the state dir); uninstall removes exactly that, and
a file that exists but is not in the manifest is never overwritten.

`root` relocates every file the manager touches (tests write under a tmp dir); the paths in
commands, in the manifest and in messages stay the real ones.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, ClassVar

from ... import __version__
from ..config import DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIR

__all__ = [
    "MANIFEST_NAME",
    "Completed",
    "Manifest",
    "Runner",
    "ServiceError",
    "ServiceFile",
    "ServiceManager",
    "ServiceOptions",
    "default_options",
    "execute",
    "manager_for",
    "probe_interpreter",
]

MANIFEST_NAME = "service-install.json"
MANIFEST_FORMAT = 1
DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"
COMMAND_TIMEOUT = 120.0  # `systemctl enable --now` waits for the start; docker may be slow

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Service files are world-readable (0644, the registry): no secrets in them.
_SECRET_NAME_RE = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL", re.IGNORECASE)
_URL_CREDENTIALS_RE = re.compile(r"://[^/@\s]*:[^/@\s]*@")
# The service uses the built-in state and run dirs, which its sandbox is made for.
_FIXED_ENV = {
    "CTUN_KEY": "the VM key is read from the state dir; never put a key in a service file",
    "CTUN_STATE_DIR": "the service always uses /var/lib/ctun",
    "CTUN_RUN_DIR": "the service always uses /run/ctun",
}


class ServiceError(Exception):
    """Something the user can fix; str() is the one-line message."""


# --- the runner ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Completed:
    """What a command did: its exit status and output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def output(self) -> str:
        return "\n".join(s for s in (self.stdout.strip(), self.stderr.strip()) if s)

    def reason(self) -> str:
        lines = [line.strip() for line in (self.stderr + "\n" + self.stdout).splitlines()]
        # stderr first: that is where the reason usually is.
        found = [line for line in lines if line]
        return found[0] if found else "no output"


Runner = Callable[[Sequence[str]], Completed]


def execute(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> Completed:
    """Run one command for real; what every backend's `run` does."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, errors="replace",
                              timeout=timeout, check=False)
    except FileNotFoundError:
        raise ServiceError(f"{argv[0]} not found: is this the right system for it?") from None
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`{shlex.join(argv)}` did not finish within {timeout:.0f} s") \
            from None
    except OSError as exc:
        raise ServiceError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    return Completed(tuple(argv), done.returncode, done.stdout, done.stderr)


# --- what to run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceOptions:
    """How the service starts the daemon. Paths are absolute, in the target OS's spelling."""

    python: str  # the interpreter, e.g. /usr/bin/python3 or a venv's bin/python (unresolved)
    config: str | None = None  # --config FILE; None: the daemon's default (/etc/ctun/ctun.toml)
    extra_args: tuple[str, ...] = ()  # more `ctun up` arguments
    environment: tuple[tuple[str, str], ...] = ()  # only when needed, e.g. HTTPS_PROXY
    # Where that interpreter imports ctun from, and the Docker engine's socket: paths the
    # daemon must reach, which decide the Linux sandbox. None: unknown, nothing to check.
    package_dir: str | None = None
    docker_socket: str | None = None

    def argv(self) -> list[str]:
        config = ["--config", self.config] if self.config else []
        return [self.python, "-m", "ctun", "up", "--no-ui", *config, *self.extra_args]


@dataclass(frozen=True)
class ServiceFile:
    """A file a backend installs: its real path, content and mode."""

    path: PurePath
    content: bytes
    mode: int = 0o644


@dataclass
class Manifest:
    """What an install created; read back by uninstall and by the next install."""

    backend: str
    service: str
    files: list[str] = field(default_factory=list)  # real paths
    dirs: list[str] = field(default_factory=list)  # created by install; removed when empty
    command: list[str] = field(default_factory=list)
    ctun_version: str = __version__

    def to_json(self) -> str:
        return json.dumps({"format": MANIFEST_FORMAT, "backend": self.backend,
                           "service": self.service, "files": self.files, "dirs": self.dirs,
                           "command": self.command, "ctun_version": self.ctun_version},
                          indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not a format {MANIFEST_FORMAT} manifest")
        files, dirs = doc.get("files"), doc.get("dirs")
        if not (isinstance(files, list) and isinstance(dirs, list)
                and all(isinstance(p, str) for p in files + dirs)):
            raise ValueError("files and dirs must be lists of paths")
        return cls(backend=str(doc["backend"]), service=str(doc["service"]), files=files,
                   dirs=dirs, command=[str(a) for a in doc.get("command", [])],
                   ctun_version=str(doc.get("ctun_version", "")))


# --- the common interface ------------------------------------------------------------------


class ServiceManager(abc.ABC):
    """Install, remove, start, stop and query the ctun service; each returns what to print."""

    backend: ClassVar[str]  # "systemd", "launchd", "windows"
    service: ClassVar[str]  # what the service manager calls it
    admin_word: ClassVar[str] = "root"
    admin_hint: ClassVar[str] = "run it with sudo"
    path_type: ClassVar[type[PurePath]] = PurePosixPath  # how the target OS spells paths

    def __init__(
        self,
        *,
        root: str | os.PathLike[str] | None = None,
        state_dir: PurePath | None = None,
        runner: Runner | None = None,
        is_admin: Callable[[], bool] | None = None,
    ) -> None:
        self.root = Path(root) if root is not None else None
        # The fixed default, not $CTUN_STATE_DIR: the service's daemon never sees that.
        self.state_dir = state_dir if state_dir is not None else DEFAULT_STATE_DIR
        self._runner = runner
        self._is_admin = is_admin

    # -- the interface ---------------------------------------------------------------------

    @property
    def manifest_path(self) -> PurePath:
        return self.state_dir / MANIFEST_NAME

    def check(self, action: str) -> None:
        """Raise ServiceError unless `action` can go ahead here: privileges, the OS."""
        if action != "status" and not self.is_admin():
            raise ServiceError(f"ctun service {action} needs {self.admin_word}: "
                               f"{self.admin_hint}")
        if action == "install":
            self._preflight()

    def install(self, options: ServiceOptions) -> str:
        """Install (or update) and start the service."""
        self.check("install")
        self._check_options(options)
        old = self._read_manifest()
        files = self._render(options)
        known = set(old.files) if old else set()
        for spec in files:
            if self._exists(spec.path) and str(spec.path) not in known:
                raise ServiceError(
                    f"{spec.path} exists but `ctun service install` did not create it (no "
                    f"record in {self.manifest_path}): move it away first")
        # The record goes first, so that even an interrupted install can be uninstalled.
        dirs = list(old.dirs) if old else []
        dirs += self._make_dirs(self.state_dir, 0o700)
        planned = [str(d) for spec in files for d in self._missing_dirs(spec.path.parent)]
        manifest = Manifest(self.backend, self.service, [str(f.path) for f in files],
                            _unique(dirs + planned), options.argv())
        self._write(self.manifest_path, manifest.to_json().encode(), 0o600)
        for spec in files:
            self._make_dirs(spec.path.parent, 0o755)
            self._write(spec.path, spec.content, spec.mode)
        for stale in known - set(manifest.files):
            self._remove(self.path_type(stale))
        try:
            done = self._activate(options, updating=old is not None)
        except ServiceError as exc:
            raise ServiceError(f"{exc}; {self._logs_hint()}, fix it and install again, "
                               f"or remove everything with `ctun service uninstall`") from None
        wrote = ", ".join(str(f.path) for f in files) or "no files"
        lines = [f"{'updated' if old else 'installed'} {self.service} ({wrote}); {done}",
                 f"runs: {self._show(options.argv())}", *self._notes(options),
                 f"logs: {self._logs_hint()}"]
        return "\n".join(lines)

    def uninstall(self) -> str:
        """Stop the service and remove exactly what install created."""
        self.check("uninstall")
        manifest = self._read_manifest()
        if manifest is None:
            return (f"ctun service is not installed (no {self.manifest_path}): "
                    f"nothing to remove")
        warnings = self._deactivate()
        removed = [p for p in manifest.files if self._remove(self.path_type(p))]
        warnings += self._after_removal()
        self._remove(self.manifest_path)
        kept = []
        for d in sorted(manifest.dirs, key=lambda p: len(self.path_type(p).parts), reverse=True):
            if not self._remove_empty_dir(self.path_type(d)):
                kept.append(d)
        lines = [f"removed {self.service}" + (f" ({', '.join(removed)})" if removed else "")]
        lines += [f"warning: {w}" for w in warnings]
        lines += [f"kept {d}: it holds files ctun made while running (keys, caches)"
                  for d in kept]
        return "\n".join(lines)

    def start(self) -> str:
        self.check("start")
        self._require_installed()
        return self._start()

    def stop(self) -> str:
        self.check("stop")
        self._require_installed()
        return self._stop()

    def status(self) -> str:
        """The service manager's view; needs no privileges when the manifest is readable."""
        self.check("status")
        try:
            installed = self._read_manifest() is not None
        except ServiceError:  # e.g. a 0700 state dir and no root: ask the service manager
            installed = True
        if not installed:
            return f"ctun service is not installed (no {self.manifest_path})"
        return self._status()

    def is_admin(self) -> bool:
        if self._is_admin is not None:
            return self._is_admin()
        return _running_as_admin()

    # -- for the backends ------------------------------------------------------------------

    @abc.abstractmethod
    def _render(self, options: ServiceOptions) -> list[ServiceFile]:
        """The files this install writes."""

    @abc.abstractmethod
    def _activate(self, options: ServiceOptions, updating: bool) -> str:
        """Register and start it once the files are written; says what it did."""

    @abc.abstractmethod
    def _deactivate(self) -> list[str]:
        """Stop and unregister it, before its files go; warnings, never errors."""

    def _after_removal(self) -> list[str]:
        return []

    @abc.abstractmethod
    def _start(self) -> str: ...

    @abc.abstractmethod
    def _stop(self) -> str: ...

    @abc.abstractmethod
    def _status(self) -> str: ...

    @abc.abstractmethod
    def _logs_hint(self) -> str: ...

    @abc.abstractmethod
    def _default_runner(self) -> Runner:
        """The backend module's `run`, looked up at call time so tests may replace it."""

    def _preflight(self) -> None:
        """Raise ServiceError when this system cannot host the service at all."""
        return None

    def _notes(self, options: ServiceOptions) -> list[str]:
        return []

    def _show(self, argv: Sequence[str]) -> str:
        return shlex.join(argv)

    def _check_options(self, options: ServiceOptions) -> None:
        if not self._is_absolute(options.python):
            raise ServiceError(f"the interpreter must be an absolute path, not {options.python!r}")
        if options.config is not None and not self._is_absolute(options.config):
            raise ServiceError(f"the config file must be an absolute path, not {options.config!r}")
        for arg in (options.python, options.config or "", *options.extra_args):
            if "\n" in arg or "\r" in arg or "\0" in arg:
                raise ServiceError(f"argument {arg!r}: line breaks and NUL cannot go into a "
                                   f"service definition")
        for name, value in options.environment:
            check_environment(name, value)

    def _is_absolute(self, path: str) -> bool:
        return self.path_type(path).is_absolute()

    def _call(self, argv: Sequence[str]) -> Completed:
        """Run a command through the runner; whatever its exit status."""
        runner = self._runner or self._default_runner()
        return runner(list(argv))

    def _run(self, argv: Sequence[str], ok: Sequence[int] = (0,)) -> Completed:
        """Run a command through the runner; an exit status outside `ok` is a ServiceError."""
        done = self._call(argv)
        if done.returncode not in ok:
            raise ServiceError(f"`{self._show(argv)}` failed (exit {done.returncode}): "
                               f"{done.reason()}")
        return done

    def _require_installed(self) -> None:
        if self._read_manifest() is None:
            raise ServiceError(f"ctun service is not installed (no {self.manifest_path}): "
                               f"run `ctun service install` first")

    # -- files, relocated under self.root -----------------------------------------------

    def _real(self, path: PurePath) -> Path:
        if self.root is None:
            return Path(path)
        return self.root.joinpath(*path.parts[1:])  # drop the anchor: "/", "C:\\"

    def _exists(self, path: PurePath) -> bool:
        return os.path.lexists(self._real(path))

    def _missing_dirs(self, path: PurePath) -> list[PurePath]:
        """path and its ancestors that do not exist yet, outermost first."""
        missing: list[PurePath] = []
        while not self._exists(path) and path != path.parent:
            missing.insert(0, path)
            path = path.parent
        return missing

    def _make_dirs(self, path: PurePath, mode: int) -> list[str]:
        """Create path with `mode` (its missing parents 0755); what was created."""
        created = []
        for d in self._missing_dirs(path):
            real = self._real(d)
            each = mode if d == path else 0o755
            try:
                real.mkdir(mode=each)
                real.chmod(each)  # mkdir's mode went through the umask
            except OSError as exc:
                raise ServiceError(f"cannot create {d}: {exc.strerror or exc}") from None
            created.append(str(d))
        return created

    def _write(self, path: PurePath, content: bytes, mode: int) -> None:
        """Replace path atomically with content, owned by root (gid 0) where that exists."""
        real = self._real(path)
        tmp = real.with_name(f".{real.name}.ctun-tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.chmod(tmp, mode)  # the umask may have narrowed it
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                os.chown(tmp, 0, 0)
            os.replace(tmp, real)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ServiceError(f"cannot write {path}: {exc.strerror or exc}") from None

    def _remove(self, path: PurePath) -> bool:
        try:
            self._real(path).unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise ServiceError(f"cannot remove {path}: {exc.strerror or exc}") from None
        return True

    def _remove_empty_dir(self, path: PurePath) -> bool:
        """True when it is gone (removed now, or already); False when it holds something."""
        try:
            self._real(path).rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    def _read_manifest(self) -> Manifest | None:
        real = self._real(self.manifest_path)
        try:
            text = real.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ServiceError(f"cannot read {self.manifest_path}: {exc.strerror or exc}") \
                from None
        try:
            manifest = Manifest.from_json(text)
        except (ValueError, KeyError) as exc:
            raise ServiceError(f"{self.manifest_path} is damaged ({exc}): remove what it "
                               f"lists by hand, then the file") from None
        if manifest.backend != self.backend:
            raise ServiceError(f"{self.manifest_path} records a {manifest.backend} install, "
                               f"but this system uses {self.backend}")
        return manifest


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _running_as_admin() -> bool:
    if sys.platform == "win32":
        import ctypes

        return bool(ctypes.windll.shell32.IsUserAnAdmin())
    return os.geteuid() == 0


def check_environment(name: str, value: str) -> None:
    """An environment variable for the service: a plain name, no secrets, one line."""
    if not _ENV_NAME_RE.fullmatch(name):
        raise ServiceError(f"environment variable name {name!r}: use letters, digits and _")
    if name in _FIXED_ENV:
        raise ServiceError(f"environment variable {name}: {_FIXED_ENV[name]}")
    if _SECRET_NAME_RE.search(name) or _URL_CREDENTIALS_RE.search(value):
        raise ServiceError(f"environment variable {name}: looks like a secret, and service "
                           f"files are readable by every user; keep secrets out of them")
    if "\n" in value or "\r" in value or "\0" in value:
        raise ServiceError(f"environment variable {name}: line breaks and NUL are not allowed")


# --- choosing a backend and the options ----------------------------------------------------


def manager_for(platform: str = sys.platform, **kwargs: Any) -> ServiceManager:
    """The backend for this OS; kwargs go to its constructor (root, state_dir, runner...)."""
    if platform.startswith("linux"):
        from .systemd import SystemdManager

        return SystemdManager(**kwargs)
    if platform == "darwin":
        from .launchd import LaunchdManager

        return LaunchdManager(**kwargs)
    if platform == "win32":
        from .windows import WindowsManager

        return WindowsManager(**kwargs)
    raise ServiceError(f"no service manager support for {platform}: run `ctun up --no-ui` "
                       f"from your init system")


Probe = Callable[[str], str]


def probe_interpreter(python: str) -> str:
    """Where `python` imports ctun from when started as the service starts it: no PYTHONPATH,
    no current directory, no user site (-I). Raises ServiceError when it cannot."""
    code = "import os, ctun; print(os.path.dirname(os.path.abspath(ctun.__file__)))"
    try:
        done = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True,
                              timeout=60, check=False, cwd=os.path.abspath(os.sep))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServiceError(f"cannot run {python}: {exc}") from None
    if done.returncode != 0 or not done.stdout.strip():
        raise ServiceError(
            f"{python} cannot import ctun the way the service starts it (no PYTHONPATH, no "
            f"current directory): install ctun into that interpreter first "
            f"(`{python} -m pip install ...`), or pass --python")
    return done.stdout.strip().splitlines()[-1]


def default_options(
    *,
    python: str | None = None,
    config: str | None = None,
    extra_args: Sequence[str] = (),
    environment: Mapping[str, str] | None = None,
    probe: Probe | None = None,
) -> ServiceOptions:
    """Options for this machine: this interpreter unless told otherwise, absolute paths
    (a venv's python stays as it is: resolving its symlink would leave the venv)."""
    python = os.path.abspath(python or sys.executable)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise ServiceError(f"{python}: not an executable file")
    package_dir = (probe or probe_interpreter)(python)
    env = dict(environment or {})
    for name, value in env.items():
        check_environment(name, value)
    if config is not None:
        config = os.path.abspath(config)
        if not os.path.isfile(config):
            raise ServiceError(f"{config}: no such config file")
    return ServiceOptions(
        python=python,
        config=config,
        extra_args=tuple(extra_args),
        environment=tuple(sorted(env.items())),
        package_dir=package_dir,
        docker_socket=docker_socket(config, env),
    )


def docker_socket(config: str | None, environment: Mapping[str, str]) -> str | None:
    """The Unix socket the daemon will talk to Docker through: [docker] url in the config,
    else DOCKER_HOST, else Docker's default. None for a TCP engine or no Docker at all."""
    path = config or (str(DEFAULT_CONFIG_PATH) if os.path.isfile(DEFAULT_CONFIG_PATH) else None)
    table: Any = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f).get("docker", {})
        except OSError as exc:
            raise ServiceError(f"{path}: cannot read config file: {exc.strerror or exc}") \
                from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ServiceError(f"{path}: invalid TOML: {exc}") from None
    if not isinstance(table, dict) or table.get("enabled") is False:
        return None
    url = table.get("url") or environment.get("DOCKER_HOST") or f"unix://{DEFAULT_DOCKER_SOCKET}"
    if isinstance(url, str) and url.startswith("unix://"):
        return url.removeprefix("unix://")
    return None
