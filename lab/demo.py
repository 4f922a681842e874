"""`ctun demo`: a Docker-Desktop-shaped lab, the tunnel across it, and proof that it works.

The host namespace cannot reach the containers' bridge until ctun is up; the demo shows the
failure first, then the same request succeeding through the tunnel, then live counters.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from ..core import control
from .topology import Lab, wait_until
from .tunnel import HOST_IF, VM_IF, is_up, status

PREFIX = "ctun-demo"
START_TIMEOUT = 15.0


def say(text: str = "") -> None:
    print(text, flush=True)


def _describe(result: tuple[int, str] | str) -> str:
    if isinstance(result, str):
        return result
    return f"HTTP {result[0]}: {result[1].strip()}"


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(containers: int = 2, duration: float | None = None) -> int:
    # SIGTERM and a closed terminal clean up exactly like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    lab = Lab(PREFIX, containers=containers)
    try:
        return _run(lab, duration)
    except KeyboardInterrupt:
        say()
        return 0
    finally:
        say("removing the lab: processes, interfaces, namespaces ...")
        lab.destroy()
        say("done: nothing of the demo is left on this machine")


def _run(lab: Lab, duration: float | None) -> int:
    say(f"building the lab: namespaces {lab.host_ns} (your machine), {lab.vm_ns} (the Docker "
        f"VM, bridge {lab.container_subnet}) and {len(lab.container_ns)} containers")
    lab.create()
    target = lab.container_ips[0]
    url = f"http://{target}/"
    say(f"\n1. before ctun, from the host: GET {url}")
    say(f"   -> {_describe(lab.http_get(lab.host_ns, url, timeout=1))}"
        "  (as on Docker Desktop: only published ports reach the host)")

    say("\n2. starting the ctun daemon on the host and the agent in the VM")
    daemon = lab.start_daemon()
    agent = lab.start_agent()
    try:
        wait_until(lambda: is_up(lab, HOST_IF) and is_up(lab, VM_IF),
                   START_TIMEOUT, what="the tunnel to come up")
    except AssertionError as exc:
        say(f"   the tunnel did not come up: {exc}")
        for name, proc in (("daemon", daemon), ("agent", agent)):
            say(f"\n--- {name} log (exit status {proc.poll()}) ---\n{lab.log(name)}")
        return 1
    transport = status(lab, VM_IF)["peers"][0]["transport"]
    say(f"   tunnel up: encrypted, over {transport.upper()} to 10.251.0.1:2511; "
        f"route {lab.container_subnet} -> {HOST_IF}")

    say("\n3. through ctun, from the host:")
    ok = True
    for ip in lab.container_ips:
        result = lab.http_get(lab.host_ns, f"http://{ip}/")
        say(f"   GET http://{ip}/ -> {_describe(result)}")
        ok = ok and isinstance(result, tuple) and result[0] == 200
    if not ok:
        say("   a container could not be reached through the tunnel; daemon log:")
        say(lab.log("daemon"))
        return 1

    if sys.stdout.isatty() and duration is None:
        say("\n4. the ctun TUI on this tunnel, with a request per container every 0.2 s: "
            "q ends the demo")
        _show_tui(lab)
        return 0
    say("\n4. live counters (one request per container each second); Ctrl-C ends the demo")
    _show_counters(lab, duration)
    return 0


def _show_tui(lab: Lab) -> None:
    """The same TUI `ctun up` shows, on the lab's daemon, while traffic flows through it."""
    from ..tui.app import CtunApp

    stop = threading.Event()

    def traffic() -> None:
        while not stop.wait(0.2):  # pacing the demo's traffic, not synchronisation
            for ip in lab.container_ips:
                lab.http_get(lab.host_ns, f"http://{ip}/", timeout=1)

    thread = threading.Thread(target=traffic, name="demo-traffic", daemon=True)
    thread.start()
    try:
        CtunApp(lab.run_dir / f"{HOST_IF}.sock").run()
    finally:
        stop.set()
        thread.join(timeout=5)


def _show_counters(lab: Lab, duration: float | None) -> None:
    started = time.monotonic()
    previous: dict[str, Any] | None = None
    say(f"   {'time':>5}  {'state':<6} {'rtt ms':>7}  {'rx pkts':>8} {'rx bytes':>10}  "
        f"{'tx pkts':>8} {'tx bytes':>10}  {'pkts/s':>7}  drops")
    while duration is None or time.monotonic() - started < duration:
        for ip in lab.container_ips:
            lab.http_get(lab.host_ns, f"http://{ip}/", timeout=1)
        try:
            host, agent = status(lab, HOST_IF), status(lab, VM_IF)
        except control.ControlError as exc:
            say(f"   the daemon or the agent stopped ({exc}); see their logs")
            return
        peer = host["peers"][0]
        rtt = agent["peers"][0]["rtt_ms"]
        rate = 0
        if previous is not None:
            rate = (peer["rx_packets"] + peer["tx_packets"]
                    - previous["rx_packets"] - previous["tx_packets"])
        drops = sum(peer["drops"].values()) + sum(host["drops"].values())
        say(f"   {time.monotonic() - started:>4.0f}s  {peer['state']:<6} "
            f"{rtt if rtt is not None else '-':>7}  {peer['rx_packets']:>8} "
            f"{peer['rx_bytes']:>10}  {peer['tx_packets']:>8} {peer['tx_bytes']:>10}  "
            f"{rate:>7}  {drops}")
        previous = peer
        time.sleep(1)  # pacing the display, not synchronisation


if __name__ == "__main__":
    sys.exit(run_demo())
