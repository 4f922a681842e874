"""launchd (macOS): a LaunchDaemon, /Library/LaunchDaemons/io.ctun.daemon.plist.

launchd starts it at boot (RunAtLoad) and again whenever it exits (KeepAlive); its output
goes to /var/log/ctun.log. The plist holds no secrets: it is world-readable, as launchd
wants (root-owned, 0644, or launchd refuses it).
"""

from __future__ import annotations

import plistlib
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from . import Completed, Runner, ServiceFile, ServiceManager, ServiceOptions, execute

LABEL = "io.ctun.daemon"
PLIST_PATH = PurePosixPath("/Library/LaunchDaemons") / f"{LABEL}.plist"
LOG_PATH = "/var/log/ctun.log"
TARGET = f"system/{LABEL}"


def run(argv: Sequence[str]) -> Completed:
    """The one runner of this backend: every launchctl call goes through here."""
    return execute(argv)


def render_plist(options: ServiceOptions) -> bytes:
    job: dict[str, Any] = {
        "Label": LABEL,
        "ProgramArguments": options.argv(),
        "RunAtLoad": True,
        "KeepAlive": True,
        "StandardOutPath": LOG_PATH,
        "StandardErrorPath": LOG_PATH,
    }
    if options.environment:
        job["EnvironmentVariables"] = dict(options.environment)
    return plistlib.dumps(job, fmt=plistlib.FMT_XML, sort_keys=True)


class LaunchdManager(ServiceManager):
    backend = "launchd"
    service = LABEL

    def _default_runner(self) -> Runner:
        return run

    def _render(self, options: ServiceOptions) -> list[ServiceFile]:
        return [ServiceFile(PLIST_PATH, render_plist(options), 0o644)]

    def _loaded(self) -> bool:
        return self._call(["launchctl", "print", TARGET]).returncode == 0

    def _activate(self, options: ServiceOptions, updating: bool) -> str:
        if updating:
            # launchd keeps the old definition while the job is loaded; unload it first.
            # Not loaded (stopped with `ctun service stop`) is fine.
            self._call(["launchctl", "bootout", TARGET])
        self._run(["launchctl", "bootstrap", "system", str(PLIST_PATH)])
        return "loaded it (it starts now and at every boot)"

    def _deactivate(self) -> list[str]:
        # Fails when the job is not loaded, which is all the same here.
        self._call(["launchctl", "bootout", TARGET])
        return []

    def _start(self) -> str:
        if self._loaded():
            self._run(["launchctl", "kickstart", "-k", TARGET])
            return f"restarted {LABEL}"
        self._run(["launchctl", "bootstrap", "system", str(PLIST_PATH)])
        return f"loaded and started {LABEL}"

    def _stop(self) -> str:
        if not self._loaded():
            return f"{LABEL} is not loaded (already stopped)"
        # Killing it is not enough: KeepAlive would start it again. Unloading stops it
        # until `ctun service start` or the next boot.
        self._run(["launchctl", "bootout", TARGET])
        return f"stopped {LABEL} (unloaded until `ctun service start` or the next boot)"

    def _status(self) -> str:
        done = self._call(["launchctl", "print", TARGET])
        if done.returncode != 0:
            return (f"{LABEL} is installed ({PLIST_PATH}) but not loaded: "
                    f"start it with `sudo ctun service start`")
        return done.output

    def _logs_hint(self) -> str:
        return f"tail -f {LOG_PATH}"
