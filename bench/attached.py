"""TCP throughput with the TUI attached against headless, side by side in one run.

The TUI is the real app in a real terminal (a detached tmux session) on the same machine as
the tunnel, so whatever CPU its redraws take from the tunnel shows in the figure: that is
what the requirement (with the TUI attached, >= 95% of headless) is about.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORDER = (False, True, True, False)
"""True: TUI attached. ABBA rather than ABAB: a drift that is linear in time (a warming CPU, a
neighbour's load ramping) then weighs the same on both sides; ABAB would hand the attached
runs one slot more of it."""
CONNECT_TIMEOUT = 20.0
SETTLE = 0.5
"""After "connected": one snapshot period, so the one-off work of filling every table is over
before iperf3 starts and the run sees only the TUI's steady redraws."""
EXIT_TIMEOUT = 5.0
SOCKET = "ctun-bench"
"""tmux -L: a server of our own, so we never touch (or get confused by) anyone's sessions."""
WIDTH, HEIGHT = 160, 48

# The header reads "ctun  connected  transport udp ..."; "connecting" must not count.
_CONNECTED = re.compile(r"\bctun\s+connected\b")
_HEADER = re.compile(r"\bctun {2}\S.*")


@dataclass
class Record:
    """The runs in ORDER as far as they got, and why there is no figure (if so)."""

    headless_mbps: list[float] = field(default_factory=list)
    attached_mbps: list[float] = field(default_factory=list)
    note: str = ""
    """"n/a (...)" or "failed: ..."; empty when every run was measured."""

    def add(self, with_tui: bool, mbps: float) -> None:
        (self.attached_mbps if with_tui else self.headless_mbps).append(mbps)

    @property
    def attached(self) -> float | None:
        """Mean Mbit/s with the TUI attached, once every run is in."""
        return _mean(self.attached_mbps) if self._complete else None

    @property
    def percent(self) -> float | None:
        return share(self.headless_mbps, self.attached_mbps) if self._complete else None

    @property
    def _complete(self) -> bool:
        # A run that failed halfway leaves unpaired runs: a ratio of those would hide drift.
        return not self.note and len(self.headless_mbps) + len(self.attached_mbps) == len(ORDER)

    def to_json(self) -> dict[str, Any]:
        return {"order": ["attached" if t else "headless" for t in ORDER],
                "headless_mbps": self.headless_mbps, "attached_mbps": self.attached_mbps,
                "percent": self.percent, "note": self.note}  # fmt: skip


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def share(headless: list[float], attached: list[float]) -> float | None:
    """Attached as a percentage of headless, mean over mean (None without a positive base)."""
    if not headless or not attached:
        return None
    base = _mean(headless)
    return _mean(attached) / base * 100 if base > 0 else None


def shows_connected(pane: str) -> bool:
    return _CONNECTED.search(pane) is not None


def last_line(pane: str) -> str:
    lines = [line.strip() for line in pane.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(blank screen)"


def header(pane: str) -> str:
    """The TUI's header line (what it says of the daemon), else the screen's last line."""
    found = _HEADER.search(pane)
    return found.group().strip()[:200] if found else last_line(pane)


def package_root() -> Path | None:
    """The directory holding this `ctun`, so the TUI imports the very code being measured
    (not symlinks resolved: the package may be a link named ctun). None when the package's
    directory is not named ctun (an editable install of a checkout): then the interpreter
    already finds this very code by itself."""
    package = Path(__file__).parent.parent
    return package.parent if package.name == "ctun" else None


def tui_argv(run_dir: Path, interface: str) -> list[str]:
    root = package_root()
    paths = [*([str(root)] if root else []), *filter(None, [os.environ.get("PYTHONPATH")])]
    return ["env", f"CTUN_RUN_DIR={run_dir}", f"PYTHONPATH={os.pathsep.join(paths)}",
            sys.executable, "-m", "ctun", "tui", "--interface", interface]  # fmt: skip


def _tmux(*args: str, check: bool = True) -> str:
    result = subprocess.run(["tmux", "-L", SOCKET, *args], capture_output=True, text=True,
                            timeout=10)  # fmt: skip
    if check and result.returncode != 0:
        raise RuntimeError(f"tmux {args[0]}: {last_line(result.stderr or result.stdout)}")
    return result.stdout


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@contextlib.contextmanager
def tui_in_tmux(run_dir: Path, interface: str) -> Iterator[None]:
    """The TUI running in a detached tmux session and showing the daemon connected; killed
    (and waited for, so its exit cannot overlap the next run) on leaving."""
    name = f"ctun-bench-{os.getpid()}"
    _tmux("kill-session", "-t", name, check=False)  # a crashed run's leftover
    # Several command words: tmux runs them without a shell. remain-on-exit keeps the pane
    # of a TUI that crashed, so its last words can be reported.
    _tmux("new-session", "-d", "-s", name, "-x", str(WIDTH), "-y", str(HEIGHT),
          *tui_argv(run_dir, interface), ";", "set-option", "-w", "-t", name,
          "remain-on-exit", "on")  # fmt: skip
    pid = 0
    try:
        pid = int(_tmux("display-message", "-p", "-t", name, "#{pane_pid}").strip() or 0)
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            pane = _tmux("capture-pane", "-p", "-t", name)
            if shows_connected(pane):
                break
            if _tmux("display-message", "-p", "-t", name, "#{pane_dead}").strip() == "1":
                raise RuntimeError(f"the TUI exited: {last_line(pane)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the TUI did not show the daemon connected within "
                                   f"{CONNECT_TIMEOUT:.0f} s: {header(pane)}")  # fmt: skip
            time.sleep(0.1)
        time.sleep(SETTLE)
        yield
    finally:
        _tmux("kill-session", "-t", name, check=False)
        deadline = time.monotonic() + EXIT_TIMEOUT
        while pid and not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
