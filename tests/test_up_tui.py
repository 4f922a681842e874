"""`ctun up` with its TUI: the daemon runs as a child (through sudo when not root), the TUI
attaches, and quitting the TUI stops the daemon and takes its interface along."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ctun.core import control
from ctun.lab import netns
from ctun.lab.topology import CONTAINER_SUBNET, HOST_UNDERLAY, Lab
from ctun.tui import launch

LAB_CONTAINERS = 1


def test_the_daemon_command_runs_up_headless_with_the_same_arguments() -> None:
    args = ["--route", "10.5.0.0/16", "--log-level", "DEBUG"]
    assert launch.daemon_command(args, root=True, environ={}, python="/py") == \
        ["/py", "-m", "ctun", "up", "--no-ui", *args]
    # Through sudo, which drops the environment: ctun's own settings are passed on.
    env = {"CTUN_RUN_DIR": "/tmp/r", "HOME": "/home/u", "CTUN_STATE_DIR": "/tmp/s"}
    assert launch.daemon_command(args, root=False, environ=env, python="/py") == \
        ["sudo", "--", "env", "CTUN_RUN_DIR=/tmp/r", "CTUN_STATE_DIR=/tmp/s",
         "/py", "-m", "ctun", "up", "--no-ui", *args]
    assert launch.daemon_command([], root=False, environ={}, python="/py")[:2] == \
        ["sudo", "--"]


def test_the_user_behind_sudo_gets_the_socket(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from ctun.core import runtime

    monkeypatch.setenv("SUDO_UID", "4242")
    assert runtime.sudo_user() == 4242
    for value in ("0", "", "x"):
        monkeypatch.setenv("SUDO_UID", value)
        assert runtime.sudo_user() is None
    if os.geteuid() == 0:
        srv = control.ControlServer(tmp_path / "o.sock", {}, owner=4242)
        try:
            assert (tmp_path / "o.sock").stat().st_uid == 4242
        finally:
            srv.close()


def _screen(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                          capture_output=True, text=True).stdout


@pytest.mark.root
def test_up_shows_the_tui_and_quitting_it_stops_the_daemon(lab: Lab) -> None:
    if not shutil.which("tmux"):
        if os.environ.get("CTUN_REQUIRE_ALL"):
            pytest.fail("tmux is missing (CTUN_REQUIRE_ALL=1)")
        pytest.skip("tmux is not installed")
    session = f"ctunup{os.getpid()}"
    pythonpath = os.pathsep.join(p for p in sys.path if p)
    command = (f"ip netns exec {lab.host_ns} env CTUN_RUN_DIR={lab.run_dir} "
               f"CTUN_LOG_DIR={lab.workdir} PYTHONPATH={pythonpath} {sys.executable} -m ctun up "
               f"--no-docker --listen {HOST_UNDERLAY} --route {CONTAINER_SUBNET} "
               f"--key-file {lab.key_file}; echo EXITED $?; sleep 60")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "140", "-y", "40",
                    command], check=True)
    try:
        agent = lab.start_agent()
        lab.wait_until(lambda: "connected" in _screen(session), 30,
                       what=f"the TUI to say connected; screen:\n{_screen(session)}")
        assert lab.ping(lab.host_ns, lab.container_ips[0], count=3).returncode == 0
        assert "ctun0" in netns.run(lab.host_ns, ["ip", "link"]).stdout
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        lab.wait_until(lambda: "EXITED 0" in _screen(session), 30,
                       what=f"ctun up to exit; screen:\n{_screen(session)}")
        assert "ctun stopped; its log is" in _screen(session)
        assert "ctun0" not in netns.run(lab.host_ns, ["ip", "link"]).stdout
        assert not (lab.run_dir / "ctun0.sock").exists()
        Lab.stop(agent)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
