"""`ctun tui` in a real terminal: the installed command under tmux, against the fake daemon.

The pilot tests drive the app inside pytest; this one checks what they cannot: that
`python -m ctun tui` starts from the command line, finds the socket through CTUN_RUN_DIR and
--interface, draws in a real terminal, takes real key presses and exits cleanly on `q`."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import ctun
import pytest
from ctun.tests.tui_fakes import FakeDaemon, running_fake, sample_status

WIDTH, HEIGHT = 120, 40
INTERFACE = "ctmx0"
NETWORK = "10.5.0.0/16"
POLL = 0.05  # between looks at the screen; every wait is bounded by a deadline


def tmux_or_skip() -> str:
    found = shutil.which("tmux")
    if found is not None:
        return found
    reason = "needs tmux (apt-get install tmux)"
    # As in conftest: CI must run everything, so there a missing tmux is a failure.
    if os.environ.get("CI") == "true" or os.environ.get("CTUN_REQUIRE_ALL") == "1":
        pytest.fail(f"{reason} (CI=true or CTUN_REQUIRE_ALL=1: missing prerequisites fail)")
    pytest.skip(reason)


class Terminal:
    """One tmux session on a server of its own: the user's tmux is never touched, and the
    server (and so the pane) inherits exactly the environment given here."""

    def __init__(self, tmux: str, where: Path) -> None:
        self.tmux = tmux
        self.socket = where / "tmux.sock"
        self.config = where / "tmux.conf"
        self.status_file = where / "exit-status"
        # remain-on-exit: the pane outlives the app, so its exit status and any traceback
        # can still be read. escape-time 0: tmux would otherwise hold Escape for 500 ms.
        # No status line: the app gets the whole WIDTH x HEIGHT.
        self.config.write_text("set -g remain-on-exit on\nset -g status off\n"
                               "set -g escape-time 0\n")
        self.started = False

    def run(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run([self.tmux, "-S", str(self.socket), "-f", str(self.config),
                               *args], capture_output=True, text=True, check=True,
                              timeout=10, env=env)
        return done.stdout

    def start(self, command: list[str], env: dict[str, str]) -> None:
        # A shell records the exit status in a file: tmux (3.3a here) sometimes leaves the
        # ended app unreaped for a long while, so the pane does not read as dead.
        self.status_file.unlink(missing_ok=True)
        wrapped = f"{shlex.join(command)}; echo $? > {shlex.quote(str(self.status_file))}"
        self.run("new-session", "-d", "-s", "ctun", "-x", str(WIDTH), "-y", str(HEIGHT),
                 wrapped, env=env)
        self.started = True

    def kill(self) -> None:
        if self.started:
            subprocess.run([self.tmux, "-S", str(self.socket), "kill-server"],
                           capture_output=True, check=False, timeout=10)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "ctun")

    def keys(self, *names: str) -> None:
        self.run("send-keys", "-t", "ctun", *names)

    def type(self, text: str) -> None:
        self.run("send-keys", "-t", "ctun", "-l", text)  # -l: characters, not key names

    def exit_status(self) -> int | None:
        """The app's exit status once it has ended, else None."""
        try:
            text = self.status_file.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text else None  # empty: the shell is still writing it

    def wait(self, predicate: Callable[[str], bool], what: str, timeout: float = 15.0) -> str:
        """The screen once predicate(screen) holds; fails with the screen after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen()
            if predicate(shown):
                return shown
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; the screen:\n{shown}")
            time.sleep(POLL)

    def wait_for(self, *texts: str, timeout: float = 15.0) -> str:
        return self.wait(lambda s: all(t in s for t in texts), " and ".join(map(repr, texts)),
                         timeout)


def poll(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL)


@pytest.fixture
def fake() -> Iterator[FakeDaemon]:
    with running_fake(sample_status(), interface=INTERFACE) as daemon:
        yield daemon


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    tmux = tmux_or_skip()
    # Short: the tmux socket path has the same ~100 byte limit as the daemon's.
    where = Path(tempfile.mkdtemp(prefix="ctmx", dir="/tmp"))
    term = Terminal(tmux, where)
    try:
        yield term
    finally:
        term.kill()
        shutil.rmtree(where, ignore_errors=True)


def test_tui_in_tmux(fake: FakeDaemon, terminal: Terminal) -> None:
    # The directory `ctun` is imported from, so the child imports this very tree.
    import_root = str(Path(ctun.__file__).parent.parent)
    env = dict(os.environ, CTUN_RUN_DIR=str(fake.path.parent),
               PYTHONPATH=os.pathsep.join(
                   p for p in (import_root, os.environ.get("PYTHONPATH")) if p))
    terminal.start([sys.executable, "-m", "ctun", "tui", "--interface", INTERFACE,
                    "--interval", "0.2"], env)

    # The Tunnels view: the state line and the peer's row.
    shown = terminal.wait_for("ctun  connected  transport udp  interface ctun0",
                              "127.0.0.1:40000")
    assert any(line.split()[:2] == ["vm", "udp"] for line in shown.splitlines()
               if "│" not in line[:2]), shown

    terminal.keys("2")
    terminal.wait_for("last seen", "vm 0.1.0", "9.8 KiB")

    terminal.type("?")
    terminal.wait_for("watch and steer a running ctun daemon")
    terminal.keys("Escape")
    terminal.wait(lambda s: "watch and steer" not in s, "the help to close")

    terminal.keys("a")
    terminal.wait_for("Route this network into the tunnel")
    terminal.type(NETWORK)
    terminal.wait_for(NETWORK)
    terminal.keys("Enter")
    poll(lambda: fake.requests != [], "the add_route request")
    assert fake.requests == [{"cmd": "add_route", "network": NETWORK}]
    # The answer comes back as a notification, and the next snapshot has the route.
    terminal.wait_for(f"{NETWORK}: active")
    terminal.keys("3")
    terminal.wait(lambda s: any(NETWORK in line and "control" in line
                                for line in s.splitlines()), "the new route's row")

    terminal.keys("q")
    shown = terminal.wait(lambda _s: terminal.exit_status() is not None, "the app to exit")
    assert terminal.exit_status() == 0, shown
    assert "Traceback" not in shown, shown
