"""The lab itself: it must look like Docker Desktop before any tunnel test can mean anything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import ctun
import pytest
from ctun.lab import netns
from ctun.lab.snapshot import net_state
from ctun.lab.topology import Lab, lab_namespaces, wait_until

pytestmark = pytest.mark.root

LAB_CONTAINERS = 2


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie holds nothing any more


def _all_pids(lab: Lab) -> set[int]:
    pids: set[int] = set()
    for name in lab_namespaces(lab.prefix):
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        pids.update(int(p) for p in out.stdout.split())
    return pids


def _netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _sysctl(ns: str, key: str) -> str:
    return netns.run(ns, ["cat", f"/proc/sys/{key}"]).stdout.strip()


# ---- the shape of the lab


def test_containers_answer_http_from_the_vm(lab: Lab) -> None:
    assert len(lab.container_ips) == LAB_CONTAINERS
    for i, ip in enumerate(lab.container_ips):
        assert lab.greeting(i) == f"hello from c{i + 1} ({ip})"
        assert lab.http_get(lab.vm_ns, f"http://{ip}/") == (200, lab.greeting(i) + "\n")


def test_containers_route_through_the_vm(lab: Lab) -> None:
    for cns in lab.container_ns:
        assert lab.ping(cns, "172.18.0.1").returncode == 0
        assert "default via 172.18.0.1" in netns.run(cns, ["ip", "-4", "route"]).stdout
    assert _sysctl(lab.vm_ns, "net/ipv4/ip_forward") == "1"
    assert _sysctl(lab.host_ns, "net/ipv4/ip_forward") == "0"


def test_underlay_connects_host_and_vm(lab: Lab) -> None:
    assert lab.ping(lab.vm_ns, lab.host_underlay).returncode == 0
    assert lab.ping(lab.host_ns, lab.vm_underlay).returncode == 0
    # A full-size frame crosses unfragmented: tunnel MTU tests rely on a 1500-byte underlay.
    assert lab.ping(lab.vm_ns, lab.host_underlay, size=1472, df=True).returncode == 0
    assert lab.ping(lab.vm_ns, lab.host_underlay, size=1473, df=True, timeout=0.5).returncode != 0


def test_host_cannot_reach_containers(lab: Lab) -> None:
    routes = net_state(lab.host_ns)["routes"]
    assert not [r for r in routes if r.startswith("default")]
    assert not [r for r in routes if "172.18." in r]
    for ip in lab.container_ips:
        started = time.monotonic()
        result = lab.http_get(lab.host_ns, f"http://{ip}/")
        assert isinstance(result, str), result
        assert "unreachable" in result
        assert time.monotonic() - started < 1.0  # no route: fails at once, no timeout
        assert lab.ping(lab.host_ns, ip, timeout=0.5).returncode != 0


def test_attacker_reaches_the_host_but_not_containers(lab: Lab) -> None:
    assert lab.ping(lab.atk_ns, "10.251.0.1").returncode == 0
    assert lab.ping(lab.atk_ns, lab.atk_address).returncode == 0
    for ip in lab.container_ips:
        assert isinstance(lab.http_get(lab.atk_ns, f"http://{ip}/", timeout=0.5), str)
        assert lab.ping(lab.atk_ns, ip, timeout=0.5).returncode != 0


def test_two_labs_coexist(lab: Lab, fresh_lab: Lab) -> None:
    assert lab.host_vm_if != fresh_lab.host_vm_if
    for each in (lab, fresh_lab):
        ip = each.container_ips[0]
        assert each.http_get(each.vm_ns, f"http://{ip}/") == (200, each.greeting(0) + "\n")


# ---- processes


def test_spawn_runs_in_the_namespace_with_env_and_log(lab: Lab) -> None:
    script = 'echo "run=$CTUN_RUN_DIR state=$CTUN_STATE_DIR"; exec sleep 60'
    proc = lab.spawn(lab.vm_ns, ["sh", "-c", script], "probe")
    expected = f"run={lab.workdir}/run state={lab.workdir}/state"
    lab.wait_until(lambda: expected in lab.log("probe"), 5, what="probe output")
    assert _netns_of(proc.pid) == os.stat(f"{netns.NETNS_DIR}/{lab.vm_ns}").st_ino
    assert lab.stop(proc) == -signal.SIGTERM
    assert lab.log("never-started") == ""


def test_stop_escalates_to_sigkill(lab: Lab) -> None:
    code = textwrap.dedent("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready")
        time.sleep(60)
    """)
    proc = lab.spawn(lab.host_ns, [sys.executable, "-c", code], "stubborn")
    lab.wait_until(lambda: "ready" in lab.log("stubborn"), 10, what="SIGTERM to be ignored")
    started = time.monotonic()
    assert lab.stop(proc, timeout=0.3) == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert lab.stop(proc) == -signal.SIGKILL  # stopping again just reports the exit code


def test_start_daemon_and_agent_argv(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    # The ctun CLI is not what is under test here: an echo stands in for the interpreter.
    monkeypatch.setattr(sys, "executable", "/bin/echo")
    monkeypatch.delenv("CTUN_LAB_OFFLOAD", raising=False)
    lab.key_file.unlink(missing_ok=True)
    with pytest.raises(AssertionError, match=r"timed out after 0.2s waiting for .*vm\.key"):
        lab.start_agent(key_timeout=0.2)

    daemon = lab.start_daemon("--verbose")
    assert daemon.wait(timeout=10) == 0
    assert lab.log("daemon").split() == [
        "-m", "ctun", "up", "--no-ui", "--no-docker",
        "--listen", "10.251.0.1", "--route", "172.18.0.0/16",
        "--key-file", str(lab.key_file), "--verbose",
    ]  # fmt: skip

    # The agent must wait for the key the daemon writes at its first start.
    writer = threading.Timer(0.2, lab.key_file.write_bytes, args=(b"k" * 32,))
    writer.start()
    try:
        agent = lab.start_agent("--verbose")
    finally:
        writer.join()
    assert agent.wait(timeout=10) == 0
    assert lab.log("agent").split() == [
        "-m", "ctun", "vm", "--host", "10.251.0.1", "--key-file", str(lab.key_file), "--verbose",
    ]  # fmt: skip
    # The switch that runs the end-to-end suite a second time without kernel offloads.
    monkeypatch.setenv("CTUN_LAB_OFFLOAD", "off")
    assert lab.start_agent().wait(timeout=10) == 0
    assert lab.log("agent").split()[-1] == "--no-offload"
    assert lab.start_daemon().wait(timeout=10) == 0
    assert lab.log("daemon").split()[-1] == "--no-offload"
    lab.key_file.unlink()


def test_wait_until_returns_the_value_or_times_out() -> None:
    assert wait_until(lambda: 42, 1) == 42
    with pytest.raises(AssertionError, match=r"^timed out after 0.1s waiting for nothing$"):
        wait_until(lambda: None, 0.1, what="nothing")


# ---- life cycle


def test_destroy_leaves_nothing_behind() -> None:
    before = net_state(None)
    lab = Lab("ctunlab-test_lab-destroy")
    lab.create()
    try:
        lab.spawn(lab.host_ns, ["sleep", "60"], "sleeper-host")
        lab.spawn(lab.atk_ns, ["sleep", "60"], "sleeper-atk")
        # `ip netns exec` enters the namespace a moment after it starts.
        pids = lab.wait_until(lambda: p if len(p := _all_pids(lab)) >= 3 else None, 5,
                              what="the HTTP server and both sleepers in the lab")
        assert pids is not None
    finally:
        workdir = lab.workdir
        lab.destroy()
    assert lab_namespaces(lab.prefix) == []
    assert not [p for p in pids if _pid_alive(p)]
    assert not workdir.exists()
    lab.destroy()  # idempotent
    assert net_state(None) == before  # nothing was ever created in the root namespace


def test_destroy_handles_a_half_built_lab() -> None:
    lab = Lab("ctunlab-test_lab-half", containers=3)
    # What a crash half-way through create() leaves: some namespaces, a process in one.
    netns.add(lab.host_ns)
    netns.add(lab.container_ns[0])
    stray = subprocess.Popen(["ip", "netns", "exec", lab.host_ns, "sleep", "60"])
    try:
        lab.wait_until(lambda: _all_pids(lab), 5, what="the stray process to enter the ns")
        lab.destroy()
        assert stray.wait(timeout=5) == -signal.SIGTERM
        assert lab_namespaces(lab.prefix) == []
    finally:
        stray.kill()
        stray.wait()
        lab.destroy()


def test_failed_create_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab("ctunlab-test_lab-fail")

    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(lab, "_start_http_servers", broken)
    with pytest.raises(RuntimeError, match="boom"):
        lab.create()
    assert lab_namespaces(lab.prefix) == []
    assert not lab.workdir.exists()


def test_create_after_a_crash_cleans_up_and_rebuilds() -> None:
    prefix = "ctunlab-test_lab-crash"
    # A real crash: another process builds the lab and dies without any cleanup.
    crash = "from ctun.lab.topology import Lab; Lab({!r}, 2).create(); import os; os._exit(3)"
    # The child must import this very ctun (a checkout, a link to one, or an installation).
    paths = [str(Path(ctun.__path__[0]).parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))
    crashed = subprocess.run([sys.executable, "-c", crash.format(prefix)], env=env, timeout=60)
    assert crashed.returncode == 3

    stale = Lab(prefix, containers=2)
    try:
        assert lab_namespaces(prefix) == sorted(
            [stale.host_ns, stale.vm_ns, stale.atk_ns, *stale.container_ns]
        )
        orphans = _all_pids(stale)
        assert len(orphans) == 2  # the HTTP servers still run, owned by nobody
        ip = stale.container_ips[1]
        assert stale.http_get(stale.vm_ns, f"http://{ip}/") == (200, stale.greeting(1) + "\n")
        stale_workdirs = list(Path(stale.workdir.parent).glob(f"{prefix}.lab.*"))
        assert stale_workdirs

        stale.create()
        assert not [p for p in orphans if _pid_alive(p)]
        assert not [d for d in stale_workdirs if d.exists()]
        assert not orphans & _all_pids(stale)
        for i, ip in enumerate(stale.container_ips):
            assert stale.http_get(stale.vm_ns, f"http://{ip}/") == (200, stale.greeting(i) + "\n")
    finally:
        stale.destroy()
    assert lab_namespaces(prefix) == []
