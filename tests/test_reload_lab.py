"""Hot reload against a real daemon in the namespace lab: a `route` appended to the running
daemon's config file (docker-connector.conf or TOML) makes the containers reachable within
2 s, deleting it takes the route away within 2 s, and a malformed line leaves the tunnel
carrying traffic on the last good config while `ctun status` says which file and line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ctun.lab import netns
from ctun.lab.topology import Lab, offload_args
from ctun.lab.tunnel import HOST_IF, Tunnel, reachable, seconds_until, status, wait_up

pytestmark = pytest.mark.root
LAB_CONTAINERS = 1
DEADLINE = 2.0  # the figure for both directions
SUBNET = "172.18.0.0/16"  # the lab's container network; unrouted until the config says so


@dataclass(frozen=True)
class Format:
    name: str
    file: str
    base: str  # the config the daemon starts with: no route to the containers
    route: str  # the line appended
    bad: str  # a malformed line appended after it
    bad_at: str  # how the error names its line
    loglevel: str  # the line that asks for debug logging


FORMATS = [
    # Line 1 mtu, line 2 the route, line 3 the broken line.
    Format("toml", "ctun.toml", "mtu = 1400\n", f'routes = ["{SUBNET}"]\n', "mtu = = 1400\n",
           "line 3", 'loglevel = "debug"\n'),
    Format("legacy", "docker-connector.conf", "# docker-connector.conf\nmtu 1400\n",
           f"route {SUBNET}\n", "route 172.18.0.0/33\n", ":4: ", "loglevel debug\n"),
]


def ctun(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CTUN_RUN_DIR": str(lab.run_dir)}
    return subprocess.run([sys.executable, "-m", "ctun", *args], capture_output=True,
                          text=True, env=env, timeout=30)


def kernel_routes(lab: Lab) -> list[str]:
    out = netns.run(lab.host_ns, ["ip", "-j", "route", "show", "dev", HOST_IF]).stdout
    return [r["dst"] for r in json.loads(out or "[]")]


def append(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:  # `echo LINE >> FILE`
        f.write(line)


def save_as_editor(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")  # write aside, rename over: how editors save
    tmp.write_text(text)
    os.replace(tmp, path)


def config_error(lab: Lab) -> str | None:
    part = status(lab, HOST_IF).get("config") or {}
    return part.get("error") if isinstance(part, dict) else None


@pytest.fixture(params=FORMATS, ids=[f.name for f in FORMATS])
def running(request: pytest.FixtureRequest, lab: Lab) -> Iterator[tuple[Tunnel, Path, Format]]:
    fmt: Format = request.param
    path = lab.workdir / fmt.file
    path.write_text(fmt.base)
    # Not lab.start_daemon(): its --route flag would route the containers from the start.
    daemon = lab.spawn(lab.host_ns, [
        sys.executable, "-m", "ctun", "up", "--no-ui", "--no-docker",
        "--listen", str(lab.host_underlay), "--key-file", str(lab.key_file),
        "--config", str(path), *offload_args()], "daemon")
    tunnel = Tunnel(lab, daemon, lab.start_agent())
    try:
        wait_up(lab)
        yield tunnel, path, fmt
    finally:
        Lab.stop(tunnel.agent)
        Lab.stop(tunnel.daemon)


def test_a_route_appended_and_deleted_is_applied_within_two_seconds(
        running: tuple[Tunnel, Path, Format]) -> None:
    tunnel, path, fmt = running
    lab = tunnel.lab
    assert SUBNET not in kernel_routes(lab) and not reachable(lab)

    append(path, fmt.route)
    added = seconds_until(lab, lambda: reachable(lab), DEADLINE,
                          f"HTTP 200 from {lab.container_ips[0]} after appending the route")
    assert SUBNET in kernel_routes(lab)

    save_as_editor(path, fmt.base)  # the line deleted
    removed = seconds_until(lab, lambda: SUBNET not in kernel_routes(lab), DEADLINE,
                            f"{SUBNET} to leave the host's routing table")
    assert not reachable(lab)
    print(f"\n[{fmt.name}] route line appended -> HTTP 200 in {added:.2f} s; "
          f"line deleted -> route gone in {removed:.2f} s")
    # The log is written by its own thread: wait for the second line, then count.
    lab.wait_until(lambda: lab.log("daemon").count("config reloaded") >= 2, 2,
                   what="the second reload in the log")
    log = lab.log("daemon")
    assert log.count("config reloaded") == 2, log  # once each: no reload storm
    assert "Traceback" not in log


def test_a_malformed_line_keeps_the_last_good_config_running(
        running: tuple[Tunnel, Path, Format]) -> None:
    tunnel, path, fmt = running
    lab = tunnel.lab
    append(path, fmt.route)
    seconds_until(lab, lambda: reachable(lab), DEADLINE, "the route")

    append(path, fmt.bad)
    found = seconds_until(lab, lambda: config_error(lab), DEADLINE, "the config error")
    error = config_error(lab)
    assert error is not None and str(path) in error and fmt.bad_at in error, error
    shown = ctun(lab, "status")
    assert shown.returncode == 0, shown
    line = shown.stdout.splitlines()[1]
    assert line.startswith(f"CONFIG ERROR: {path}") and fmt.bad_at in line, shown.stdout
    assert "still running the config loaded at" in shown.stdout.splitlines()[2]
    # The tunnel goes on carrying traffic on the old routes, poll after poll.
    until = time.monotonic() + 1.5
    while time.monotonic() < until:
        assert reachable(lab) and SUBNET in kernel_routes(lab)
    log = lab.log("daemon")  # 1.5 s after the error showed: long written, six polls later
    assert log.count("config not reloaded") == 1, log  # said once, not on every poll

    save_as_editor(path, fmt.base + fmt.route)  # fixed
    cleared = seconds_until(lab, lambda: config_error(lab) is None, DEADLINE,
                            "the config error to clear")
    assert "CONFIG ERROR" not in ctun(lab, "status").stdout
    assert reachable(lab) and SUBNET in kernel_routes(lab)
    print(f"\n[{fmt.name}] malformed line reported in {found:.2f} s, fixed file cleared "
          f"it in {cleared:.2f} s; the tunnel kept carrying traffic")


def test_a_reloaded_loglevel_changes_what_the_daemon_logs(
        running: tuple[Tunnel, Path, Format]) -> None:
    tunnel, path, fmt = running
    lab = tunnel.lab
    marker = "log level now INFO (default)"

    def reloads() -> int:
        return lab.log("daemon").count("config reloaded")

    def after_marker() -> str:
        return lab.log("daemon").partition(marker)[2]

    append(path, fmt.loglevel)  # no --log-level flag: the file decides
    lab.wait_until(lambda: "log level now debug (config loglevel)" in lab.log("daemon"),
                   DEADLINE, what="the daemon to take loglevel debug")
    append(path, "# a comment, to make the watcher say something at debug level\n")
    lab.wait_until(lambda: reloads() == 2, DEADLINE, what="the second reload")
    assert " ctun.config DEBUG " in lab.log("daemon")

    save_as_editor(path, fmt.base)  # the loglevel line deleted: back to INFO
    lab.wait_until(lambda: marker in lab.log("daemon"), DEADLINE,
                   what="the daemon to go back to INFO")
    append(path, "# another comment\n")
    lab.wait_until(lambda: "config reloaded" in after_marker(), DEADLINE,
                   what="the reload after the loglevel line went")
    assert " DEBUG " not in after_marker(), lab.log("daemon")
