"""Windows: a service registered with the service control manager (SCM) through sc.exe.

LIMITATION: the SCM expects the service process to answer it (StartServiceCtrlDispatcher,
then SERVICE_RUNNING and stop requests). `python -m ctun up --no-ui` is a plain console
program that does not, so `sc.exe start ctun` ends in error 1053 ("did not respond in a
timely fashion"): the SCM counts the start as failed. The registration, recovery policy and
removal here are complete; the missing piece is a service entry point (pywin32's
servicemanager / win32serviceutil.ServiceFramework, or a small ctypes dispatcher) that
runs the daemon and turns SERVICE_CONTROL_STOP into its stop event. See docs/services.md.
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
)

SERVICE = "ctun"
DISPLAY_NAME = "ctun"
DESCRIPTION = "Reach Docker Desktop containers by IP (ctun host daemon)"
ERROR_SERVICE_DOES_NOT_EXIST = 1060
ERROR_SERVICE_NOT_ACTIVE = 1062

SCM_LIMITATION = (
    "warning: ctun does not answer the Windows service control manager yet, so the "
    "service fails to start (error 1053); see docs/services.md")


def run(argv: Sequence[str]) -> Completed:
    """The one runner of this backend: every sc.exe call goes through here."""
    return execute(argv)


def bin_path(options: ServiceOptions) -> str:
    """The service's command line, interpreter quoted, as the SCM stores it."""
    argv = options.argv()
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
        if options.environment:
            raise ServiceError("environment variables for the Windows service are not "
                               "supported: set them system-wide instead")

    def _show(self, argv: Sequence[str]) -> str:
        return subprocess.list2cmdline(argv)

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
            return "updated its definition (restart it to apply: ctun service stop, then start)"
        self._run(["sc.exe", "start", SERVICE])
        return "registered it (automatic start) and asked the SCM to start it"

    def _notes(self, options: ServiceOptions) -> list[str]:
        return [SCM_LIMITATION]

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
        return "Event Viewer, Windows Logs > System (source: Service Control Manager)"
