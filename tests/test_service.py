"""`ctun service`: the exact commands each backend runs (through its one runner, replaced
here), the files it writes under a tmp root, and that uninstall leaves the tree as it was."""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import pytest
from ctun import cli
from ctun.core import service
from ctun.core.service import (
    MANIFEST_NAME,
    Completed,
    ServiceError,
    ServiceManager,
    ServiceOptions,
    default_options,
    launchd,
    manager_for,
    systemd,
    windows,
)
from ctun.core.service.launchd import LaunchdManager
from ctun.core.service.systemd import SystemdManager
from ctun.core.service.windows import WindowsManager

STATE = PurePosixPath("/var/lib/ctun")
UNIT = "/etc/systemd/system/ctun.service"
PLIST = "/Library/LaunchDaemons/io.ctun.daemon.plist"
WIN_PYTHON = r"C:\Program Files\Python311\python.exe"
PY = "/usr/bin/python3"  # the default in opts(); verify needs a real one
MAC_PYTHON = "/Library/Frameworks/Python.framework/Versions/3.11/bin/python3"


class FakeRunner:
    """Stands in for a backend's runner: records each command, answers from a script."""

    def __init__(self, answers: dict[str, int | Completed] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.answers = answers or {}

    def __call__(self, argv: Sequence[str]) -> Completed:
        self.calls.append(list(argv))
        answer = self.answers.get(" ".join(argv), 0)
        if isinstance(answer, Completed):
            return answer
        return Completed(tuple(argv), answer, f"output of {argv[0]}",
                         "it went wrong" if answer else "")

    def take(self) -> list[list[str]]:
        calls, self.calls = self.calls, []
        return calls


def tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every file and directory under root: mode and content."""
    found: dict[str, tuple[int, bytes | None]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
        found[str(path.relative_to(root))] = (stat.S_IMODE(st.st_mode), content)
    return found


def make(cls: type[ServiceManager], root: Path, runner: FakeRunner,
         admin: bool = True) -> ServiceManager:
    return cls(root=root, state_dir=STATE, runner=runner, is_admin=lambda: admin)


def opts(python: str = "/usr/bin/python3", **kwargs: object) -> ServiceOptions:
    return ServiceOptions(python=python, **kwargs)  # type: ignore[arg-type]


def manifest(root: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((root / "var/lib/ctun" / MANIFEST_NAME).read_text())
    return doc


@pytest.fixture
def linux_root(tmp_path: Path) -> Path:
    """A tmp root on which systemd runs (sd_booted: /run/systemd/system exists)."""
    root = tmp_path / "root"
    (root / "run/systemd/system").mkdir(parents=True)
    return root


# --- systemd -------------------------------------------------------------------------------


def test_systemd_install_runs_exactly_these_commands_and_writes_the_unit(linux_root: Path) -> None:
    runner = FakeRunner()
    message = make(SystemdManager, linux_root, runner).install(opts())
    assert runner.calls == [["systemctl", "daemon-reload"],
                            ["systemctl", "enable", "--now", "ctun.service"]]
    unit = linux_root / UNIT.lstrip("/")
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    if os.geteuid() == 0:
        assert (unit.stat().st_uid, unit.stat().st_gid) == (0, 0)
    recorded = manifest(linux_root)
    assert recorded["backend"] == "systemd" and recorded["files"] == [UNIT]
    assert recorded["command"] == [PY, "-m", "ctun", "up", "--no-ui"]
    # Everything install had to create is recorded, so that uninstall can remove it.
    assert recorded["dirs"] == ["/var", "/var/lib", "/var/lib/ctun", "/etc", "/etc/systemd",
                                "/etc/systemd/system"]
    assert stat.S_IMODE((linux_root / "var/lib/ctun").stat().st_mode) == 0o700
    assert message.splitlines()[0] == f"installed ctun.service ({UNIT}); enabled and started it"
    assert "logs: journalctl -u ctun.service" in message


def test_systemd_install_over_an_install_updates_and_restarts(linux_root: Path) -> None:
    runner = FakeRunner()
    manager = make(SystemdManager, linux_root, runner)
    manager.install(opts())
    first = manifest(linux_root)
    runner.take()
    message = manager.install(opts(extra_args=("--log-level", "DEBUG")))
    assert runner.calls == [["systemctl", "daemon-reload"],
                            ["systemctl", "enable", "ctun.service"],
                            ["systemctl", "restart", "ctun.service"]]
    assert message.startswith("updated ctun.service")
    unit = (linux_root / UNIT.lstrip("/")).read_text()
    assert f"ExecStart={PY} -m ctun up --no-ui --log-level DEBUG\n" in unit
    assert manifest(linux_root)["dirs"] == first["dirs"]


def test_systemd_uninstall_removes_exactly_what_install_created(linux_root: Path) -> None:
    before = tree(linux_root)
    runner = FakeRunner()
    manager = make(SystemdManager, linux_root, runner)
    manager.install(opts())
    assert tree(linux_root) != before
    runner.take()
    message = manager.uninstall()
    assert runner.calls == [["systemctl", "disable", "--now", "ctun.service"],
                            ["systemctl", "daemon-reload"]]
    assert tree(linux_root) == before
    assert message == f"removed ctun.service ({UNIT})"


def test_uninstall_keeps_a_state_dir_that_the_daemon_filled(linux_root: Path) -> None:
    manager = make(SystemdManager, linux_root, FakeRunner())
    manager.install(opts())
    key = linux_root / "var/lib/ctun/vm.key"
    key.write_text("secret\n")  # as the daemon does on its first start
    message = manager.uninstall()
    assert key.read_text() == "secret\n"
    assert sorted(p.name for p in (linux_root / "var/lib/ctun").iterdir()) == ["vm.key"]
    assert not (linux_root / "etc").exists()
    assert "kept /var/lib/ctun: it holds files ctun made while running" in message


def test_systemd_start_stop_status(linux_root: Path) -> None:
    runner = FakeRunner({"systemctl status ctun.service": 3})
    manager = make(SystemdManager, linux_root, runner)
    manager.install(opts())
    runner.take()
    assert manager.start() == "started ctun.service"
    assert manager.stop() == "stopped ctun.service"
    # Exit status 3 is systemctl's "inactive": an answer, not a failure.
    assert manager.status() == "output of systemctl\nit went wrong"
    assert runner.calls == [["systemctl", "start", "ctun.service"],
                            ["systemctl", "stop", "ctun.service"],
                            ["systemctl", "status", "ctun.service"]]


def test_status_needs_no_root_but_the_others_do(linux_root: Path) -> None:
    make(SystemdManager, linux_root, FakeRunner()).install(opts())
    before = tree(linux_root)
    runner = FakeRunner()
    manager = make(SystemdManager, linux_root, runner, admin=False)
    for action in ("uninstall", "start", "stop"):
        with pytest.raises(ServiceError, match=f"^ctun service {action} needs root: "
                                               f"run it with sudo$"):
            getattr(manager, action)()
    with pytest.raises(ServiceError, match=r"^ctun service install needs root"):
        manager.install(opts())
    assert runner.calls == [] and tree(linux_root) == before
    manager.status()
    assert runner.calls == [["systemctl", "status", "ctun.service"]]


def test_not_installed_is_a_message_for_uninstall_and_status_an_error_for_start(
        linux_root: Path) -> None:
    runner = FakeRunner()
    manager = make(SystemdManager, linux_root, runner)
    assert manager.uninstall() == (f"ctun service is not installed (no {STATE}/{MANIFEST_NAME})"
                                   f": nothing to remove")
    assert manager.status() == f"ctun service is not installed (no {STATE}/{MANIFEST_NAME})"
    for action in ("start", "stop"):
        with pytest.raises(ServiceError, match=r"not installed .*run `ctun service install`"):
            getattr(manager, action)()
    assert runner.calls == []


def test_systemd_install_refuses_a_system_without_systemd(tmp_path: Path) -> None:
    runner = FakeRunner()
    with pytest.raises(ServiceError, match=r"does not run systemd \(no /run/systemd/system\)"):
        make(SystemdManager, tmp_path, runner).install(opts())
    assert runner.calls == [] and list(tmp_path.iterdir()) == []


def test_install_never_overwrites_a_file_it_did_not_create(linux_root: Path) -> None:
    unit = linux_root / UNIT.lstrip("/")
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\nExecStart=/usr/bin/someone-elses\n")
    before = tree(linux_root)
    runner = FakeRunner()
    with pytest.raises(ServiceError, match=f"{UNIT} exists but `ctun service install` did not "
                                           f"create it"):
        make(SystemdManager, linux_root, runner).install(opts())
    assert runner.calls == [] and tree(linux_root) == before


def test_a_failed_start_is_one_line_and_uninstall_still_cleans_up(linux_root: Path) -> None:
    before = tree(linux_root)
    runner = FakeRunner({"systemctl enable --now ctun.service": 1})
    manager = make(SystemdManager, linux_root, runner)
    with pytest.raises(ServiceError) as caught:
        manager.install(opts())
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith("`systemctl enable --now ctun.service` failed (exit 1): "
                           "it went wrong; journalctl -u ctun.service")
    assert text.endswith("or remove everything with `ctun service uninstall`")
    manager.uninstall()
    assert tree(linux_root) == before


def test_uninstall_goes_on_when_systemctl_fails(linux_root: Path) -> None:
    before = tree(linux_root)
    runner = FakeRunner({"systemctl disable --now ctun.service": 1})
    manager = make(SystemdManager, linux_root, runner)
    manager.install(opts())
    message = manager.uninstall()
    assert "warning: `systemctl disable --now ctun.service` failed: it went wrong" in message
    assert tree(linux_root) == before


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a setting: {line}"
        current.setdefault(key, []).append(value)
    return sections


def test_the_unit_has_the_sections_privileges_and_sandbox_ctun_needs() -> None:
    options = opts(config="/etc/ctun/ctun.toml", package_dir="/usr/lib/python3/dist-packages/ctun",
                   docker_socket="/var/run/docker.sock")
    unit = parse_unit(SystemdManager().render_unit(options))
    assert list(unit) == ["Unit", "Service", "Install"]
    s = {key: values[-1] for key, values in unit["Service"].items()}
    assert s["ExecStart"] == f"{PY} -m ctun up --no-ui --config /etc/ctun/ctun.toml"
    assert s["Type"] == "simple" and s["Restart"] == "on-failure"
    # Root with one capability; none given to non-root processes, none regained.
    assert s["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert "AmbientCapabilities" not in s and "User" not in s
    assert s["NoNewPrivileges"] == "yes"
    assert s["ProtectSystem"] == "strict" and s["ProtectHome"] == "yes"
    assert s["PrivateTmp"] == "yes"
    assert s["ReadWritePaths"].split() == ["/var/lib/ctun", "/run/ctun"]
    assert s["StateDirectory"] == "ctun" and s["RuntimeDirectory"] == "ctun"
    assert s["DevicePolicy"] == "closed" and s["DeviceAllow"] == "/dev/net/tun rw"
    assert set(s["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6",
                                                         "AF_NETLINK"}
    # What would break the daemon: read-only /proc/sys, no /dev/net/tun, no host network.
    for forbidden in ("ProtectKernelTunables", "PrivateDevices", "PrivateNetwork",
                      "SystemCallFilter", "Environment"):
        assert forbidden not in s
    assert unit["Install"] == {"WantedBy": ["multi-user.target"]}
    # No relative paths anywhere a path goes.
    paths = [s["ExecStart"].split()[0], *s["ReadWritePaths"].split(), s["DeviceAllow"].split()[0]]
    assert all(p.startswith("/") for p in paths)


def test_exec_start_and_environment_are_quoted_for_systemd() -> None:
    options = opts(python="/opt/my env/bin/python",
                   extra_args=("--route", "10.0.0.0/8", "--log-level", "DEBUG"),
                   environment=(("HTTPS_PROXY", "http://proxy:3128/%x"),))
    unit = SystemdManager().render_unit(options)
    assert ('ExecStart="/opt/my env/bin/python" -m ctun up --no-ui --route 10.0.0.0/8 '
            "--log-level DEBUG\n") in unit
    assert 'Environment="HTTPS_PROXY=http://proxy:3128/%%x"\n' in unit
    assert systemd.quote_arg("a$b%c") == "a$$b%%c"
    assert systemd.quote_arg('say "hi"\\') == '"say \\"hi\\"\\\\"'


def test_python_in_a_home_directory_makes_home_read_only_not_hidden() -> None:
    options = opts(python="/home/alice/.venvs/ctun/bin/python")
    manager = SystemdManager()
    assert parse_unit(manager.render_unit(options))["Service"]["ProtectHome"] == ["read-only"]
    assert manager.sandbox(options)[2] == [
        "ProtectHome=read-only, not yes: the daemon needs /home/alice/.venvs/ctun/bin/python"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a directory to another user")
def test_a_path_closed_to_root_without_dac_override_adds_that_capability(tmp_path: Path) -> None:
    home = tmp_path / "alice"  # like an Ubuntu home directory: alice's, 0750
    package = home / "venv/lib/ctun"
    package.mkdir(parents=True)
    os.chown(home, 1000, 1000)
    home.chmod(0o750)
    manager = SystemdManager()
    options = opts(package_dir=str(package))
    _, caps, notes = manager.sandbox(options)
    assert caps == ["CAP_NET_ADMIN", "CAP_DAC_OVERRIDE"]
    assert notes == [f"added CAP_DAC_OVERRIDE: root without it cannot reach {package} because "
                     f"of {home} (owner uid 1000, mode 0750); install ctun and its config "
                     f"outside home directories to avoid it"]
    home.chmod(0o755)
    assert manager.sandbox(options)[1] == ["CAP_NET_ADMIN"]
    # A socket: root needs write permission on it to connect.
    assert systemd.blocked_without_dac(str(home), 2) == f"{home} (owner uid 1000, mode 0755)"
    assert systemd.blocked_without_dac(str(tmp_path / "missing/docker.sock"), 2) is None


def _require_systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        reason = "systemd-analyze is not installed (apt-get install systemd)"
        if os.environ.get("CI") == "true" or os.environ.get("CTUN_REQUIRE_ALL") == "1":
            pytest.fail(f"{reason} (CI=true or CTUN_REQUIRE_ALL=1: missing prerequisites fail)")
        pytest.skip(reason)
    return found


@pytest.mark.parametrize("variant", ["default", "spaces-env-home"])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, variant: str) -> None:
    analyze = _require_systemd_analyze()
    python = sys.executable
    options = opts(python=python, config="/etc/ctun/ctun.toml")
    if variant != "default":
        # A real executable whose path needs quoting; verify checks that it exists.
        python = str(tmp_path / "my env" / "python")
        Path(python).parent.mkdir()
        os.symlink(sys.executable, python)
        options = opts(python=python, extra_args=("--log-level", "DEBUG"),
                       environment=(("HTTPS_PROXY", "http://proxy:3128"),),
                       package_dir="/home/alice/ctun")
    unit = tmp_path / "ctun.service"
    unit.write_text(SystemdManager().render_unit(options))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # verify exits 0 even for unknown keys: those are warnings that name the file.
    assert str(unit) not in done.stderr, done.stderr


# --- launchd -------------------------------------------------------------------------------


def test_launchd_install_writes_a_plist_and_bootstraps_it(tmp_path: Path) -> None:
    runner = FakeRunner()
    message = make(LaunchdManager, tmp_path, runner).install(
        opts(python=MAC_PYTHON, config="/etc/ctun/ctun.toml"))
    assert runner.calls == [["launchctl", "bootstrap", "system", PLIST]]
    path = tmp_path / PLIST.lstrip("/")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    if os.geteuid() == 0:
        assert (path.stat().st_uid, path.stat().st_gid) == (0, 0)
    job = plistlib.loads(path.read_bytes())
    assert job == {
        "Label": "io.ctun.daemon",
        "ProgramArguments": [MAC_PYTHON, "-m", "ctun", "up", "--no-ui",
                             "--config", "/etc/ctun/ctun.toml"],
        "RunAtLoad": True,
        "KeepAlive": True,
        "StandardOutPath": "/var/log/ctun.log",
        "StandardErrorPath": "/var/log/ctun.log",
    }
    assert all(PurePosixPath(p).is_absolute() for p in
               (job["ProgramArguments"][0], job["ProgramArguments"][-1], job["StandardOutPath"]))
    assert manifest(tmp_path)["files"] == [PLIST]
    assert message.splitlines()[0] == (f"installed io.ctun.daemon ({PLIST}); loaded it (it "
                                       f"starts now and at every boot)")
    assert "logs: tail -f /var/log/ctun.log" in message


def test_launchd_environment_only_when_asked(tmp_path: Path) -> None:
    make(LaunchdManager, tmp_path, FakeRunner()).install(
        opts(python=MAC_PYTHON, environment=(("HTTPS_PROXY", "http://proxy:3128"),)))
    job = plistlib.loads((tmp_path / PLIST.lstrip("/")).read_bytes())
    assert job["EnvironmentVariables"] == {"HTTPS_PROXY": "http://proxy:3128"}


def test_launchd_update_unloads_first_and_uninstall_restores_the_tree(tmp_path: Path) -> None:
    before = tree(tmp_path)
    runner = FakeRunner()
    manager = make(LaunchdManager, tmp_path, runner)
    manager.install(opts(python=MAC_PYTHON))
    manager.install(opts(python=MAC_PYTHON, extra_args=("--log-level", "DEBUG")))
    assert runner.take() == [
        ["launchctl", "bootstrap", "system", PLIST],
        ["launchctl", "bootout", "system/io.ctun.daemon"],
        ["launchctl", "bootstrap", "system", PLIST],
    ]
    job = plistlib.loads((tmp_path / PLIST.lstrip("/")).read_bytes())
    assert job["ProgramArguments"][-2:] == ["--log-level", "DEBUG"]
    assert manager.uninstall() == f"removed io.ctun.daemon ({PLIST})"
    assert runner.calls == [["launchctl", "bootout", "system/io.ctun.daemon"]]
    assert tree(tmp_path) == before


def test_launchd_start_stop_status(tmp_path: Path) -> None:
    loaded = FakeRunner()
    manager = make(LaunchdManager, tmp_path, loaded)
    manager.install(opts(python=MAC_PYTHON))
    loaded.take()
    assert manager.start() == "restarted io.ctun.daemon"
    assert manager.stop().startswith("stopped io.ctun.daemon (unloaded until")
    assert manager.status() == "output of launchctl"
    assert loaded.calls == [
        ["launchctl", "print", "system/io.ctun.daemon"],
        ["launchctl", "kickstart", "-k", "system/io.ctun.daemon"],
        ["launchctl", "print", "system/io.ctun.daemon"],
        ["launchctl", "bootout", "system/io.ctun.daemon"],
        ["launchctl", "print", "system/io.ctun.daemon"],
    ]
    unloaded = FakeRunner({"launchctl print system/io.ctun.daemon": 113})
    manager = make(LaunchdManager, tmp_path, unloaded)
    assert manager.start() == "loaded and started io.ctun.daemon"
    assert manager.stop() == "io.ctun.daemon is not loaded (already stopped)"
    assert manager.status() == (f"io.ctun.daemon is installed ({PLIST}) but not loaded: "
                                f"start it with `sudo ctun service start`")
    assert unloaded.calls == [
        ["launchctl", "print", "system/io.ctun.daemon"],
        ["launchctl", "bootstrap", "system", PLIST],
        ["launchctl", "print", "system/io.ctun.daemon"],
        ["launchctl", "print", "system/io.ctun.daemon"],
    ]


# --- Windows -------------------------------------------------------------------------------

WIN_BIN = f'"{WIN_PYTHON}" -m ctun.core.service.winsvc --no-ui'


def test_windows_install_creates_the_service_with_sc_exe(tmp_path: Path) -> None:
    runner = FakeRunner()
    message = make(WindowsManager, tmp_path, runner).install(opts(python=WIN_PYTHON))
    assert runner.calls == [
        ["sc.exe", "create", "ctun", "binPath=", WIN_BIN, "start=", "auto",
         "DisplayName=", "ctun"],
        ["sc.exe", "description", "ctun",
         "Reach Docker Desktop containers by IP (ctun host daemon)"],
        ["sc.exe", "failure", "ctun", "reset=", "60", "actions=", "restart/5000"],
        ["sc.exe", "start", "ctun"],
    ]
    # The command line Windows gets: the interpreter quoted inside the quoted binPath.
    assert subprocess.list2cmdline(runner.calls[0]) == (
        r'sc.exe create ctun binPath= "\"C:\Program Files\Python311\python.exe\" -m '
        r'ctun.core.service.winsvc --no-ui" start= auto DisplayName= ctun')
    assert manifest(tmp_path)["files"] == []
    # The entry point answers the SCM: no 1053 warning any more, and the log file is named.
    assert "1053" not in message and "warning" not in message
    assert (r'runs: "C:\Program Files\Python311\python.exe" -m ctun.core.service.winsvc '
            r'--no-ui') in message.splitlines()
    assert r"logs: %ProgramData%\ctun\ctun.log;" in message


def test_windows_update_uninstall_start_stop_status(tmp_path: Path) -> None:
    before = tree(tmp_path)
    runner = FakeRunner({"sc.exe stop ctun": windows.ERROR_SERVICE_NOT_ACTIVE})
    manager = make(WindowsManager, tmp_path, runner)
    manager.install(opts(python=WIN_PYTHON))
    runner.take()
    config = r"C:\ProgramData\ctun\ctun.toml"
    message = manager.install(opts(python=WIN_PYTHON, config=config))
    assert runner.take() == [
        ["sc.exe", "config", "ctun", "binPath=", f"{WIN_BIN} --config {config}", "start=",
         "auto", "DisplayName=", "ctun"],
        ["sc.exe", "description", "ctun",
         "Reach Docker Desktop containers by IP (ctun host daemon)"],
        ["sc.exe", "failure", "ctun", "reset=", "60", "actions=", "restart/5000"],
    ]
    assert "restart it to apply" in message
    assert manager.start() == "asked the SCM to start ctun"
    assert manager.stop() == "ctun is not running"
    assert manager.status() == "output of sc.exe"
    assert runner.take() == [["sc.exe", "start", "ctun"], ["sc.exe", "stop", "ctun"],
                             ["sc.exe", "query", "ctun"]]
    assert manager.uninstall() == "removed ctun"
    assert runner.calls == [["sc.exe", "stop", "ctun"], ["sc.exe", "delete", "ctun"]]
    assert tree(tmp_path) == before


def test_windows_needs_administrator_and_windows_paths(tmp_path: Path) -> None:
    runner = FakeRunner()
    with pytest.raises(ServiceError, match=r"^ctun service install needs Administrator rights: "
                                           r"run it from an elevated prompt"):
        make(WindowsManager, tmp_path, runner, admin=False).install(opts(python=WIN_PYTHON))
    manager = make(WindowsManager, tmp_path, runner)
    for python in ("python.exe", r"\Python311\python.exe", "/usr/bin/python3"):
        with pytest.raises(ServiceError, match="must be an absolute path"):
            manager.install(opts(python=python))
    with pytest.raises(ServiceError, match="environment variables for the Windows service"):
        manager.install(opts(python=WIN_PYTHON, environment=(("HTTPS_PROXY", "http://p:1"),)))
    assert runner.calls == [] and list(tmp_path.iterdir()) == []


# --- common --------------------------------------------------------------------------------


@pytest.mark.parametrize(("platform", "cls"), [("linux", SystemdManager),
                                                ("darwin", LaunchdManager),
                                                ("win32", WindowsManager)])
def test_the_backend_follows_sys_platform(platform: str, cls: type[ServiceManager]) -> None:
    assert type(manager_for(platform)) is cls


def test_an_unsupported_platform_is_a_clear_error() -> None:
    with pytest.raises(ServiceError, match="no service manager support for freebsd14"):
        manager_for("freebsd14")


def test_each_backend_has_one_runner_that_tests_can_replace(
        linux_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = FakeRunner()
    monkeypatch.setattr(systemd, "run", runner)
    SystemdManager(root=linux_root, state_dir=STATE, is_admin=lambda: True).install(opts())
    assert len(runner.calls) == 2
    assert {launchd.run, systemd.run, windows.run} - {runner} == {launchd.run, windows.run}


def test_relative_paths_secrets_and_line_breaks_are_refused(linux_root: Path) -> None:
    manager = make(SystemdManager, linux_root, FakeRunner())
    cases: list[tuple[ServiceOptions, str]] = [
        (opts(python="venv/bin/python"), "interpreter must be an absolute path"),
        (opts(config="ctun.toml"), "config file must be an absolute path"),
        (opts(extra_args=("--route", "10.0.0.0/8\nExecStartPre=/bin/sh")), "line breaks"),
        (opts(environment=(("CTUN_KEY", "x"),)), "never put a key in a service file"),
        (opts(environment=(("API_TOKEN", "x"),)), "looks like a secret"),
        (opts(environment=(("HTTPS_PROXY", "http://bob:hunter2@proxy:3128"),)),
         "looks like a secret"),
        (opts(environment=(("CTUN_STATE_DIR", "/srv"),)), "always uses /var/lib/ctun"),
        (opts(environment=(("BAD NAME", "x"),)), "letters, digits and _"),
    ]
    for options, message in cases:
        with pytest.raises(ServiceError, match=message):
            manager.install(options)
    assert not (linux_root / "etc").exists()


def test_a_damaged_manifest_is_a_one_line_error(linux_root: Path) -> None:
    manager = make(SystemdManager, linux_root, FakeRunner())
    manager.install(opts())
    (linux_root / "var/lib/ctun" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ServiceError, match=f"{STATE}/{MANIFEST_NAME} is damaged"):
        manager.uninstall()
    (linux_root / "var/lib/ctun" / MANIFEST_NAME).write_text(json.dumps(
        {"format": 1, "backend": "launchd", "service": "x", "files": [], "dirs": []}))
    with pytest.raises(ServiceError, match="records a launchd install, but this system uses "
                                           "systemd"):
        manager.uninstall()


def _script(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_default_options_use_absolute_paths_and_keep_a_venvs_symlink(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv_python = tmp_path / "venv/bin/python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    config = tmp_path / "ctun.toml"
    config.write_text('[docker]\nurl = "unix:///home/alice/.docker/desktop/docker.sock"\n')
    monkeypatch.chdir(tmp_path)
    seen: list[str] = []

    def probe(python: str) -> str:
        seen.append(python)
        return "/srv/site-packages/ctun"

    options = default_options(python="venv/bin/python", config="ctun.toml",
                              extra_args=["--log-level", "DEBUG"], probe=probe)
    # Not resolved: the venv's python finds the venv's packages, its target does not.
    assert seen == [str(venv_python)]
    assert options == ServiceOptions(
        python=str(venv_python), config=str(config), extra_args=("--log-level", "DEBUG"),
        package_dir="/srv/site-packages/ctun",
        docker_socket="/home/alice/.docker/desktop/docker.sock")
    assert options.argv() == [str(venv_python), "-m", "ctun", "up", "--no-ui",
                              "--config", str(config), "--log-level", "DEBUG"]
    with pytest.raises(ServiceError, match=r"missing\.toml: no such config file"):
        default_options(config="missing.toml", probe=probe)
    with pytest.raises(ServiceError, match=r"nothing/python: not an executable file"):
        default_options(python="nothing/python", probe=probe)
    (tmp_path / "bad.toml").write_text("[docker\n")
    with pytest.raises(ServiceError, match=r"bad\.toml: invalid TOML"):
        default_options(config="bad.toml", probe=probe)


def test_the_interpreter_must_import_ctun_without_pythonpath(tmp_path: Path) -> None:
    fails = _script(tmp_path / "python-without-ctun", "exit 1")
    with pytest.raises(ServiceError, match="cannot import ctun the way the service starts it"):
        service.probe_interpreter(fails)
    works = _script(tmp_path / "python-with-ctun",
                    '[ "$1" = -I ] && [ "$(pwd)" = / ] && echo /opt/ctun/lib/ctun')
    assert service.probe_interpreter(works) == "/opt/ctun/lib/ctun"


def test_docker_socket_comes_from_config_then_docker_host_then_the_default(
        tmp_path: Path) -> None:
    off = tmp_path / "off.toml"
    off.write_text("[docker]\nenabled = false\n")
    tcp = tmp_path / "tcp.toml"
    tcp.write_text('[docker]\nurl = "tcp://127.0.0.1:2375"\n')
    plain = tmp_path / "plain.toml"
    plain.write_text("port = 2511\n")
    assert service.docker_socket(str(off), {}) is None
    assert service.docker_socket(str(tcp), {}) is None
    assert service.docker_socket(str(plain), {}) == "/var/run/docker.sock"
    assert service.docker_socket(str(plain), {"DOCKER_HOST": "unix:///run/user/1000/d.sock"}) \
        == "/run/user/1000/d.sock"


# --- the command line ----------------------------------------------------------------------


def ctun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctun", *args], capture_output=True, text=True,
                          timeout=60)


def test_service_install_help() -> None:
    result = ctun("service", "install", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ctun service install [-h] [--config FILE]")
    assert "--env NAME=VALUE" in result.stdout
    assert ctun("service", "--help").returncode == 0


@pytest.mark.parametrize(("args", "expected"), [
    (("service",), "the following arguments are required: ACTION"),
    (("service", "restart"), "invalid choice: 'restart'"),
    (("service", "install", "--bogus"), "unrecognized arguments: --bogus"),
])
def test_service_usage_errors_are_one_line(args: tuple[str, ...], expected: str) -> None:
    result = ctun(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


@pytest.fixture
def cli_service(linux_root: Path, monkeypatch: pytest.MonkeyPatch) -> FakeRunner:
    """`ctun service ...` in this process, on a tmp root, with a fake runner and probe."""
    runner = FakeRunner()

    def fake_manager(platform: str = sys.platform, **kwargs: object) -> ServiceManager:
        return SystemdManager(root=linux_root, state_dir=STATE, runner=runner,
                              is_admin=lambda: os.geteuid() == 0)

    monkeypatch.setattr(service, "manager_for", fake_manager)
    monkeypatch.setattr(service, "probe_interpreter", lambda python: "/srv/ctun")
    return runner


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_install_status_uninstall(cli_service: FakeRunner, linux_root: Path,
                                      capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    before = tree(linux_root)
    code, out, err = run_cli(capsys, "service", "install", "--env", "HTTPS_PROXY=http://p:3128",
                             "--", "--log-level", "DEBUG", "--route", "172.30.0.0/16")
    assert (code, err) == (0, "")
    assert out.startswith(f"installed ctun.service ({UNIT})")
    unit = (linux_root / UNIT.lstrip("/")).read_text()
    assert (f"ExecStart={sys.executable} -m ctun up --no-ui --log-level DEBUG "
            f"--route 172.30.0.0/16\n") in unit
    assert 'Environment="HTTPS_PROXY=http://p:3128"\n' in unit
    assert run_cli(capsys, "service", "status")[:2] == (0, "output of systemctl\n")
    code, out, _ = run_cli(capsys, "service", "uninstall")
    assert (code, out) == (0, f"removed ctun.service ({UNIT})\n")
    assert tree(linux_root) == before
    code, out, _ = run_cli(capsys, "service", "uninstall")
    assert code == 0 and out.startswith("ctun service is not installed")


@pytest.mark.parametrize(("args", "expected"), [
    (("install", "--env", "NOVALUE"), "--env NOVALUE: use NAME=VALUE"),
    (("install", "--env", "DB_PASSWORD=x"), "looks like a secret"),
    (("install", "--config", "/nonexistent/ctun.toml"), "/nonexistent/ctun.toml: no such"),
    (("install", "--", "--bogus"), "`ctun up` arguments after --: unrecognized arguments: "
                                   "--bogus"),
    (("install", "--", "--log-level", "LOUD"), "invalid choice: 'LOUD'"),
    (("install", "--", "--config", "/etc/ctun/ctun.toml"), "ctun service install --config"),
    (("install", "--", "--key-file", "vm.key"), "--key-file vm.key: use an absolute path"),
    (("start",), "not installed"),
])
def test_cli_service_errors_are_one_line(cli_service: FakeRunner, linux_root: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch,
                                         args: tuple[str, ...], expected: str) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    before = tree(linux_root)
    code, out, err = run_cli(capsys, "service", *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctun service: error: "), err
    assert expected in lines[0]
    assert cli_service.calls == [] and tree(linux_root) == before


def test_cli_not_root_is_one_line_before_anything_else(
        cli_service: FakeRunner, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, _, err = run_cli(capsys, "service", "install", "--config", "/nonexistent")
    assert code == 2
    assert err == "ctun service: error: ctun service install needs root: run it with sudo\n"


def test_the_real_backend_says_so_when_not_root(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """No fakes but the uid: the check comes before any file or command."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    runs: list[Callable[..., object]] = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: runs.append(a))
    for action in ("install", "uninstall", "start", "stop"):
        code, _, err = run_cli(capsys, "service", action)
        assert code == 2
        assert err == f"ctun service: error: ctun service {action} needs root: run it with sudo\n"
    assert runs == []
