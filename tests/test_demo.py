"""`ctun demo`, as a newcomer runs it: proof of reachability, live counters, Ctrl-C cleans up."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from ctun.lab.topology import lab_namespaces

pytestmark = pytest.mark.root


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """Lines of output up to and including the first that holds `marker`."""
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} within {timeout} s in:\n{''.join(seen)}")


def test_demo_proves_reachability_and_cleans_up_on_ctrl_c() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "ctun", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        shown = _read_until(proc, "Network is unreachable", 60)
        shown += _read_until(proc, "GET http://172.18.0.3/ -> HTTP 200: hello from c2", 30)
        assert "GET http://172.18.0.2/ -> HTTP 200: hello from c1 (172.18.0.2)" in shown
        counters = _read_until(proc, "s  up ", 15)  # the first live counter line
        assert "rx pkts" in counters
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "nothing of the demo is left" in rest
    assert lab_namespaces("ctun-demo") == []
