"""Measuring one configuration in a lab: set up its path, run every probe, tear it down.

A probe that fails costs only its own figures; a path that cannot be set up (say, a flag the
daemon does not know) costs the configuration, never the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

from ..lab import netns
from ..lab.topology import Lab
from ..lab.tunnel import HOST_IF, VM_IF, status, wait_up
from . import attached, cpu, iperf, metrics, ping
from .configs import Config, ConfigResult, Settings
from .report import FAILED
from .search import search

START_TIMEOUT = 15.0
FIRST_REPLY_TIMEOUT = 20.0
REACH_TIMEOUT = 10.0

Progress = Callable[[str], None]


def one_line(exc: BaseException) -> str:
    """An exception as one short line: lab errors append whole logs after the first."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _alive(lab: Lab, proc: subprocess.Popen[bytes], name: str) -> bool:
    """True while `proc` runs; raises with its last log line once it has exited."""
    if proc.poll() is None:
        return True
    raise RuntimeError(f"the {name} exited with {proc.returncode}: {_last_line(lab.log(name))}")


def _has_socket(pid: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):  # closed between listing and reading
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                return True
    return False


class Measurement:
    def __init__(self, lab: Lab, config: Config, settings: Settings, progress: Progress) -> None:
        self.lab = lab
        self.config = config
        self.settings = settings
        self.progress = progress
        self.result = ConfigResult(config.name)
        self.target = str(lab.container_ips[0])
        self.tunnel_pids: list[int] = []

    # ---- the whole configuration

    def run(self) -> ConfigResult:
        try:
            with contextlib.ExitStack() as stack:
                try:
                    self._setup(stack)
                    self._probes()
                except Exception as exc:
                    self.result.failed = one_line(exc)
        except Exception as exc:  # tearing down; the figures above still stand
            self.result.errors["teardown"] = one_line(exc)
        return self.result

    def _say(self, what: str) -> None:
        self.progress(f"[{self.config.name}] {what}")

    def _setup(self, stack: contextlib.ExitStack) -> None:
        if self.config.transport is None:
            self._plain_route(stack)
        else:
            self._start_tunnel(stack)
        self.lab.wait_until(
            lambda: self.lab.ping(self.lab.host_ns, self.target, timeout=1).returncode == 0,
            REACH_TIMEOUT,
            what=f"{self.target} to answer ping from the host",
        )
        self._start_iperf_server(stack)

    def _probes(self) -> None:
        m = metrics
        self._attempt("ping", (m.PING_AVG, m.PING_P99), self._ping)
        self._attempt("tcp 1 stream host->ctr", (m.TCP_UP, m.TCP_UP_RETRANSMITS, m.CPU),
                      self._tcp_up_with_cpu)  # fmt: skip
        self._attempt("tcp 1 stream ctr->host", (m.TCP_DOWN, m.TCP_DOWN_RETRANSMITS),
                      lambda: self._tcp("tcp1_down", m.TCP_DOWN, m.TCP_DOWN_RETRANSMITS,
                                        reverse=True))  # fmt: skip
        self._attempt("tcp 4 streams host->ctr", (m.TCP4_UP,),
                      lambda: self._tcp("tcp4_up", m.TCP4_UP, None, streams=4))  # fmt: skip
        self._attempt("tcp 4 streams ctr->host", (m.TCP4_DOWN,),
                      lambda: self._tcp("tcp4_down", m.TCP4_DOWN, None, reverse=True,
                                        streams=4))  # fmt: skip
        self._attempt("udp rate search", (m.UDP_PPS, m.UDP_LOSS), self._udp)
        if self.config.tui:
            self._tui_side_by_side()

    def _attempt(
        self, what: str, produces: tuple[metrics.Metric, ...], probe: Callable[[], object]
    ) -> None:
        self._say(what)
        try:
            probe()
        except Exception as exc:
            reason = one_line(exc)
            for metric in produces:
                self.result.figures.pop(metric.key, None)
                self.result.errors[metric.key] = reason

    # ---- paths

    def _plain_route(self, stack: contextlib.ExitStack) -> None:
        lab = self.lab
        route = [str(lab.container_subnet), "via", str(lab.vm_underlay), "mtu", "1400"]
        self._say(f"ip route add {' '.join(route)}")
        netns.run(lab.host_ns, ["ip", "route", "add", *route])
        stack.callback(netns.run, lab.host_ns, ["ip", "route", "del", *route])
        for key in metrics.TUNNEL_ONLY:
            self.result.figures[key] = None

    def _routed(self) -> bool:
        out = netns.run(self.lab.host_ns, ["ip", "-4", "route", "show",
                                           str(self.lab.container_subnet)]).stdout  # fmt: skip
        return f"dev {HOST_IF}" in out

    def _start_tunnel(self, stack: contextlib.ExitStack) -> None:
        lab, args = self.lab, self.config.tunnel_args
        self._say(f"starting the daemon and the agent ({' '.join(args)})")
        daemon = lab.start_daemon(*args)
        stack.callback(lab.stop, daemon)
        # ping needs the route to exist, or it quits at once with "Network is unreachable".
        lab.wait_until(
            lambda: _alive(lab, daemon, "daemon") and lab.key_file.exists() and self._routed(),
            START_TIMEOUT,
            what=f"the daemon's key file and its route to {lab.container_subnet}",
        )
        pinger = lab.spawn(lab.host_ns, ["ping", "-n", "-D", "-i", "0.005", "-W", "1",
                                         self.target], "first-ping")  # fmt: skip
        stack.callback(lab.stop, pinger)
        # Its socket open means ping is past start-up and sending; its output cannot say so,
        # as ping buffers the header line until the first reply.
        lab.wait_until(lambda: _alive(lab, pinger, "first-ping") and _has_socket(pinger.pid),
                       5, interval=0.005, what="ping to open its socket")  # fmt: skip
        started = time.time()  # wall clock, like ping's -D stamps
        agent = lab.start_agent(*args)
        stack.callback(lab.stop, agent)

        def replied() -> float:
            _alive(lab, agent, "agent")
            return ping.first_reply_at(lab.log("first-ping")) or 0.0  # falsy: no reply yet

        first = lab.wait_until(
            replied,
            FIRST_REPLY_TIMEOUT,
            interval=0.02,
            what="the first ping reply through the tunnel",
        )
        self.result.figures[metrics.FIRST_PACKET.key] = (first - started) * 1000
        lab.stop(pinger)
        wait_up(lab)
        handshake = status(lab, VM_IF)["peers"][0].get("handshake_ms")
        self.result.figures[metrics.HANDSHAKE.key] = (
            float(handshake) if handshake is not None else None
        )
        self.tunnel_pids = [daemon.pid, agent.pid]

    def _start_iperf_server(self, stack: contextlib.ExitStack) -> None:
        lab, ns = self.lab, self.lab.container_ns[0]
        server = lab.spawn(ns, iperf.server_argv(self.target), "iperf3-server")
        stack.callback(lab.stop, server)

        def listening() -> bool:
            _alive(lab, server, "iperf3-server")
            out = netns.run(ns, ["ss", "-Hltn", f"sport = :{iperf.PORT}"]).stdout
            return bool(out.strip())

        lab.wait_until(listening, 5, what="the iperf3 server to listen")

    # ---- probes

    def _client(self, seconds: int, **options: Any) -> dict[str, Any]:
        argv = iperf.client_argv(self.target, seconds, **options)
        return iperf.run_client(self.lab.host_ns, argv, seconds)

    def _tcp(
        self,
        name: str,
        rate: metrics.Metric,
        retransmits: metrics.Metric | None,
        **options: Any,
    ) -> iperf.TcpResult:
        result = iperf.parse_tcp(self._client(self.settings.seconds, **options))
        self.result.figures[rate.key] = result.mbps
        if retransmits is not None:
            self.result.figures[retransmits.key] = result.retransmits
        self.result.raw[name] = result.raw
        return result

    def _tcp_up_with_cpu(self) -> None:
        before = cpu.cpu_seconds(self.tunnel_pids)
        result = self._tcp("tcp1_up", metrics.TCP_UP, metrics.TCP_UP_RETRANSMITS)
        if self.tunnel_pids:
            used = cpu.cpu_seconds(self.tunnel_pids) - before
            # Per second of transfer (iperf3's own clock): outside it the tunnel idles.
            self.result.raw["cpu_seconds_tcp1_up"] = used
            self.result.figures[metrics.CPU.key] = cpu.percent_per_gbit(
                used, result.seconds, result.mbps
            )

    def _tui_side_by_side(self) -> None:
        """TCP host->ctr headless and with the TUI attached, interleaved (attached.ORDER),
        after everything else so the table's figures stay comparable with older runs."""
        record = self.result.tui = attached.Record()
        if shutil.which("tmux") is None:
            record.note = "n/a (tmux not installed)"
            return
        self._say("tcp 1 stream host->ctr: headless, TUI attached (tmux), attached, headless")
        try:
            for with_tui in attached.ORDER:
                with (attached.tui_in_tmux(self.lab.run_dir, HOST_IF) if with_tui
                      else contextlib.nullcontext()):  # fmt: skip
                    result = iperf.parse_tcp(self._client(self.settings.seconds))
                record.add(with_tui, result.mbps)
        except Exception as exc:
            record.note = f"{FAILED}: {one_line(exc)}"

    def _udp(self) -> None:
        seconds = self.settings.probe_seconds

        def measure(pps: int) -> iperf.UdpResult:
            return iperf.parse_udp(self._client(seconds, udp_pps=pps), pps)

        outcome = search(measure, self.settings.plan)
        # Even the slowest offer fell short: report that probe anyway (the JSON says so).
        chosen = outcome.best or outcome.probes[-1]
        self.result.figures[metrics.UDP_PPS.key] = chosen.delivered_pps
        self.result.figures[metrics.UDP_LOSS.key] = chosen.lost_percent
        self.result.raw["udp_search"] = {
            "stopped": outcome.stopped,
            "chosen_target_pps": chosen.target_pps,
            "probes": [
                {
                    "target_pps": p.target_pps,
                    "sent_pps": p.sent_pps,
                    "delivered_pps": p.delivered_pps,
                    "lost_percent": p.lost_percent,
                    "late_percent": p.late_percent,
                    "raw": p.raw,
                }
                for p in outcome.probes
            ],
        }

    def _ping(self) -> None:
        count = self.settings.ping_count
        argv = ["ping", "-n", "-i", "0.01", "-c", str(count), "-W", "1", self.target]
        out = netns.run(self.lab.host_ns, argv, check=False, timeout=count * 0.01 + 15).stdout
        values = ping.rtts(out)
        summary = ping.stats(out)
        self.result.figures[metrics.PING_AVG.key] = summary.avg_ms
        self.result.figures[metrics.PING_P99.key] = summary.p99_ms
        self.result.raw["ping"] = {"sent": count, "received": summary.count, "rtt_ms": values}


def measure(lab: Lab, config: Config, settings: Settings, progress: Progress) -> ConfigResult:
    return Measurement(lab, config, settings, progress).run()
