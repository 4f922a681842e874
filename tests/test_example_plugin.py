"""The example plugin (examples/ctun-transport-padded) as a user meets it: installed with pip
into a fresh virtual environment next to ctun, listed by `ctun plugins`, passing its own tests,
carrying a real tunnel in the namespace lab, and gone again after `pip uninstall`.

ctun and the example are installed from a copy of the working tree in tmp, dependencies from
PyPI (pip's cache is the only thing reused between runs): building in the checkout itself would
leave build/ and *.egg-info behind there, and race with any other build of it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from ctun.core import plugins
from ctun.core.config import DEFAULT_PORT
from ctun.lab import netns
from ctun.lab.topology import Lab
from ctun.lab.tunnel import HOST_IF, VM_IF, status, wait_up

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = Path("examples") / "ctun-transport-padded"
BUCKET = 512
ETH_P_ALL = 0x0003
# Everything a checkout may hold that is not source: never copied.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis",
    ".benchmarks")


def _env() -> dict[str, str]:
    """This environment, minus what would make the venv's Python see anything but itself."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", plugins.ONLY_ENV,
            plugins.TRACE_ENV}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _run(*argv: str | Path, cwd: Path, timeout: float = 300) -> str:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=_env(), capture_output=True,
                            text=True, timeout=timeout, check=False)
    assert result.returncode == 0, (
        f"{' '.join(map(str, argv))} exited {result.returncode}\n{result.stdout}{result.stderr}")
    return result.stdout


def _described(ctun: Path, cwd: Path) -> dict[str, dict[str, object]]:
    return {p["name"]: p for p in json.loads(_run(ctun, "plugins", "--json", cwd=cwd))}


def _capture(lab: Lab) -> socket.socket:
    """A packet socket on the VM's side of the underlay: it sees datagrams as the path does."""
    sock: socket.socket = netns.call_in(
        lab.vm_ns, socket.socket, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((lab.vm_host_if, 0))
    sock.setblocking(False)
    return sock


def _tunnel_datagram_sizes(sock: socket.socket) -> list[int]:
    """UDP payload sizes of the captured tunnel datagrams, both directions."""
    sizes: list[int] = []
    while True:
        try:
            frame = sock.recv(65536)
        except BlockingIOError:
            return sizes
        if frame[12:14] != b"\x08\x00":  # not IPv4 (ARP, IPv6 neighbour discovery)
            continue
        ip = frame[14:]
        header = (ip[0] & 0x0F) * 4
        if ip[9] != socket.IPPROTO_UDP:
            continue
        udp = ip[header:header + 8]
        ports = {int.from_bytes(udp[0:2], "big"), int.from_bytes(udp[2:4], "big")}
        if DEFAULT_PORT in ports:
            sizes.append(int.from_bytes(udp[4:6], "big") - 8)


def test_example_plugin_from_install_to_uninstall(fresh_lab: Lab, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    lab = fresh_lab
    source = tmp_path / "ctun-source"
    venv = tmp_path / "venv"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    example = source / EXAMPLE
    python, ctun = venv / "bin" / "python", venv / "bin" / "ctun"
    # The lab starts processes with this process's environment: without PYTHONPATH, the
    # venv's Python finds the ctun installed in it, not this checkout.
    for name in ("PYTHONPATH", plugins.ONLY_ENV, plugins.TRACE_ENV):
        monkeypatch.delenv(name, raising=False)
    daemon: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None
    try:
        _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
        _run(python, "-m", "pip", "install", "-q", source, cwd=tmp_path)
        _run(python, "-m", "pip", "install", "-q", example, "pytest", cwd=tmp_path)
        installed = _run(python, "-c", "import ctun; print(ctun.__file__)", cwd=tmp_path)
        assert installed.startswith(str(venv)), installed

        # `ctun plugins` lists the plugin, its version and its transport.
        text = _run(ctun, "plugins", cwd=tmp_path)
        assert "padded  0.1.0\n" in text, text
        assert "from:       ctun-transport-padded 0.1.0, " in text
        assert "transports: padded-udp" in text
        padded = _described(ctun, tmp_path)["padded"]
        assert padded["distribution"] == "ctun-transport-padded"
        assert padded["hooks"] == ["ctun_register_transports"]
        assert padded["transports"] == ["padded-udp"]

        # Its own test suite passes against the installed package (cwd is not the example,
        # so the copy next to the tests cannot stand in for it).
        report = _run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", example / "tests",
                      cwd=tmp_path, timeout=120)
        assert " passed" in report and "failed" not in report, report

        # A real tunnel over it: the venv's ctun, --transport padded-udp on both ends.
        capture = _capture(lab)
        with capture:
            daemon = lab.start_daemon("--transport", "padded-udp", python=str(python))
            agent = lab.start_agent("--transport", "padded-udp", python=str(python))
            wait_up(lab)
            for interface in (HOST_IF, VM_IF):
                state = status(lab, interface)
                assert state["transport"] == "padded-udp"
                assert state["transports"][0]["stats"]["malformed"] == 0
            target = lab.container_ips[0]
            assert lab.ping(lab.host_ns, target, count=3).returncode == 0
            assert lab.http_get(lab.host_ns, f"http://{target}/") == (200,
                                                                      lab.greeting(0) + "\n")
            # Big packets too: a 1400-byte ping makes 1400 + 32 bytes of frame.
            assert lab.ping(lab.host_ns, target, size=1372).returncode == 0
            sizes = _tunnel_datagram_sizes(capture)
        # The point of the plugin: every tunnel datagram on the wire is whole buckets.
        assert len(sizes) >= 10, sizes
        assert all(size % BUCKET == 0 for size in sizes), sorted(set(sizes))
        assert {BUCKET, 3 * BUCKET} <= set(sizes), sorted(set(sizes))

        # Uninstalled, it is gone.
        lab.stop(agent)
        lab.stop(daemon)
        _run(python, "-m", "pip", "uninstall", "-y", "-q", "ctun-transport-padded", cwd=tmp_path)
        text = _run(ctun, "plugins", cwd=tmp_path)
        assert "padded" not in text, text
        assert "padded" not in _described(ctun, tmp_path)
    finally:
        for proc in (agent, daemon):
            if proc is not None:
                lab.stop(proc)
        # Hundreds of megabytes each: not left for tmp_path's retention of the last runs.
        shutil.rmtree(venv, ignore_errors=True)
        shutil.rmtree(source, ignore_errors=True)
