"""Windows: a service registered with the service control manager (SCM) through sc.exe.

The service runs `PYTHON -m ctun.core.service.winsvc --no-ui [--config FILE] [EXTRA...]`,
not `-m ctun up`: the SCM needs a process that connects to it (StartServiceCtrlDispatcherW),
reports its state and answers SERVICE_CONTROL_STOP, which winsvc does around the same daemon
(a plain console program would end in error 1053). See docs/services.md.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import PurePath, PureWindowsPath
from typing import ClassVar

from . import (
    Completed,
    Runner,
    ServiceError,
    ServiceFile,
    ServiceManager,
    ServiceOptions,
    execute,
    winsvc,
)

SERVICE = "ctun"
DISPLAY_NAME = "ctun"
DESCRIPTION = "Reach Docker Desktop containers by IP (ctun host daemon)"
ERROR_SERVICE_DOES_NOT_EXIST = 1060
ERROR_SERVICE_NOT_ACTIVE = 1062

ENTRY_MODULE = "ctun.core.service.winsvc"


def run(argv: Sequence[str]) -> Completed:
    """The one runner of this backend: every sc.exe call goes through here."""
    return execute(argv)


def service_argv(argv: Sequence[str]) -> list[str]:
    """`PYTHON -m ctun up --no-ui ...` (ServiceOptions.argv) as the service runs it: the
    same `ctun up` arguments behind the entry point that speaks to the SCM."""
    if list(argv[1:5]) == ["-m", "ctun", "up", "--no-ui"]:
        return [argv[0], "-m", ENTRY_MODULE, *argv[4:]]
    return list(argv)


def bin_path(options: ServiceOptions) -> str:
    """The service's command line, interpreter quoted, as the SCM stores it."""
    argv = service_argv(options.argv())
    return f'"{argv[0]}" ' + subprocess.list2cmdline(argv[1:])


class WindowsManager(ServiceManager):
    backend = "windows"
    service = SERVICE
    admin_word = "Administrator rights"
    admin_hint = "run it from an elevated prompt (Run as administrator)"
    path_type: ClassVar[type[PurePath]] = PureWindowsPath

    def _default_runner(self) -> Runner:
        return run

    def _check_options(self, options: ServiceOptions) -> None:
        super()._check_options(options)
        if '"' in options.python:
            raise ServiceError(f"the interpreter path {options.python!r} contains a quote")
        # sc.exe cannot set a service's environment (that is the registry value
        # Services\ctun\Environment), whatever the entry point.
        if options.environment:
            raise ServiceError("environment variables for the Windows service are not "
                               "supported: set them system-wide instead")

    def _show(self, argv: Sequence[str]) -> str:
        # install's "runs:" line shows options.argv(); show what the SCM really runs.
        return subprocess.list2cmdline(service_argv(argv))

    def _render(self, options: ServiceOptions) -> list[ServiceFile]:
        return []  # the SCM keeps the definition in the registry

    def _activate(self, options: ServiceOptions, updating: bool) -> str:
        spec = ["binPath=", bin_path(options), "start=", "auto", "DisplayName=", DISPLAY_NAME]
        if updating:
            self._run(["sc.exe", "config", SERVICE, *spec])
        else:
            self._run(["sc.exe", "create", SERVICE, *spec])
        self._run(["sc.exe", "description", SERVICE, DESCRIPTION])
        # Restart 5 s after a crash; the failure count resets after 60 s of running.
        self._run(["sc.exe", "failure", SERVICE, "reset=", "60", "actions=", "restart/5000"])
        if updating:
            # Not restarted here: `sc.exe stop` only asks (STOP_PENDING), and a `sc.exe start`
            # right after it fails (1056) until the daemon has torn down.
            return "updated its definition (restart it to apply: ctun service stop, then start)"
        self._run(["sc.exe", "start", SERVICE])
        return "registered it (automatic start) and asked the SCM to start it"

    def _deactivate(self) -> list[str]:
        self._call(["sc.exe", "stop", SERVICE])  # fails when it is not running: fine
        done = self._call(["sc.exe", "delete", SERVICE])
        if done.returncode not in (0, ERROR_SERVICE_DOES_NOT_EXIST):
            return [f"`sc.exe delete {SERVICE}` failed (exit {done.returncode}): "
                    f"{done.reason()}"]
        return []

    def _start(self) -> str:
        self._run(["sc.exe", "start", SERVICE])
        return f"asked the SCM to start {SERVICE}"

    def _stop(self) -> str:
        done = self._run(["sc.exe", "stop", SERVICE], ok=(0, ERROR_SERVICE_NOT_ACTIVE))
        if done.returncode == ERROR_SERVICE_NOT_ACTIVE:
            return f"{SERVICE} is not running"
        return f"asked the SCM to stop {SERVICE}"

    def _status(self) -> str:
        done = self._run(["sc.exe", "query", SERVICE], ok=(0, ERROR_SERVICE_DOES_NOT_EXIST))
        return done.output

    def _logs_hint(self) -> str:
        return (f"{winsvc.LOG_HINT}; the SCM's own events in Event Viewer, "
                f"Windows Logs > System (source: Service Control Manager)")
