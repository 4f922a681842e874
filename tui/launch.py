"""`ctun up` with its face on: start the daemon (through sudo when not root, as sshuttle
does), wait for its control socket, run the TUI on it, and stop the daemon when the TUI
quits. `ctun up --no-ui` is the daemon alone; this only ever runs that as a child."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..core import control

START_TIMEOUT = 30.0  # the daemon may build the agent image on its first start
STOP_TIMEOUT = 15.0  # it removes the agent container and its routes on the way out
# Settings that live in the environment; sudo would otherwise drop them (env_reset).
PASSED_ENV = ("CTUN_RUN_DIR", "CTUN_STATE_DIR", "CTUN_PLUGINS", "CTUN_KEY")


class LaunchError(Exception):
    """The daemon did not start; str() says why in one line (plus its log's tail)."""


def daemon_command(up_args: Sequence[str], root: bool, environ: dict[str, str] | None = None,
                   python: str = sys.executable) -> list[str]:
    """The command that runs `ctun up --no-ui` with the user's arguments, as root."""
    env = os.environ if environ is None else environ
    command = [python, "-m", "ctun", "up", "--no-ui", *up_args]
    if root:
        return command
    passed = [f"{name}={env[name]}" for name in PASSED_ENV if name in env]
    # sudo sets SUDO_UID: the daemon gives that user its control socket, so the TUI this
    # user runs can attach whether or not they are in the ctun group.
    return ["sudo", "--", "env", *passed, *command] if passed else ["sudo", "--", *command]


def log_path(interface: str) -> Path:
    return Path(os.environ.get("CTUN_LOG_DIR", "/tmp")) / f"ctun-{interface}-{os.getuid()}.log"


def up_with_tui(up_args: Sequence[str], interface: str, interval: float = 0.5) -> int:
    root = os.geteuid() == 0
    if not root and subprocess.run(["sudo", "-v"]).returncode != 0:
        raise LaunchError("ctun up needs root for its network interface, and sudo refused; "
                          "run it as root, or `sudo ctun up`")
    socket_path = control.socket_path(interface)
    log = log_path(interface)
    with open(log, "wb") as out:
        daemon = subprocess.Popen(daemon_command(up_args, root), stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True,  # Ctrl-C reaches the TUI only
                                  preexec_fn=_die_with_parent)
    try:
        _wait_ready(daemon, socket_path, log)
        from .app import CtunApp

        CtunApp(socket_path, interval).run()
    finally:
        _stop(daemon, socket_path)
    print(f"ctun stopped; its log is {log}")
    return 0


def _die_with_parent() -> None:
    """In the child: if `ctun up` itself is killed, the daemon (or sudo, which passes it on)
    gets SIGTERM and cleans up, instead of running on unseen with nobody to stop it."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _wait_ready(daemon: subprocess.Popen[bytes], path: Path, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if daemon.poll() is not None:
            raise LaunchError(f"the daemon exited with status {daemon.returncode}: "
                              f"{_tail(log)} (full log: {log})")
        try:
            control.request(path, "status", timeout=1.0)
            return
        except control.ControlError:
            pass
        if time.monotonic() > deadline:
            raise LaunchError(f"the daemon did not answer on {path} within "
                              f"{START_TIMEOUT:g} s: {_tail(log)} (full log: {log})")
        time.sleep(0.1)  # polling the socket with a deadline


def _stop(daemon: subprocess.Popen[bytes], path: Path) -> None:
    if daemon.poll() is not None:
        return
    try:
        control.request(path, "shutdown", timeout=2.0)
    except control.ControlError:
        daemon.terminate()  # as root ourselves; under sudo, sudo passes it on
    try:
        daemon.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def _tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(no output)"
