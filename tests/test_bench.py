"""The benchmark (`python -m ctun.bench`): its parsers, its UDP rate search and its report,
tested pure; then one quick end-to-end run in a lab."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ctun.bench import attached, cli, cpu, iperf, machine, metrics, ping, report, routes, run
from ctun.bench.configs import ConfigResult, configs
from ctun.bench.search import Plan, search
from ctun.lab import netns
from ctun.lab.topology import lab_namespaces

# ---- iperf3 JSON (trimmed from real iperf 3.12 output)

TCP_DOC: dict[str, Any] = {
    "start": {"test_start": {"protocol": "TCP", "num_streams": 1, "duration": 2}},
    "intervals": [{"sum": {"bits_per_second": 1.0}}],
    "end": {
        "sum_sent": {"seconds": 2.000153, "bytes": 275251200, "bits_per_second": 1100936800.5,
                     "retransmits": 17, "sender": True},
        "sum_received": {"seconds": 2.001002, "bytes": 274989056,
                         "bits_per_second": 1099421016.2, "sender": True},
    },
}  # fmt: skip

UDP_DOC: dict[str, Any] = {
    "start": {"test_start": {"protocol": "UDP", "num_streams": 1, "duration": 1}},
    "end": {
        "sum": {"seconds": 1.000302, "packets": 27320, "lost_packets": 27,
                "lost_percent": 0.0988, "sender": True},
        "sum_sent": {"seconds": 1.000132, "bytes": 37483040, "packets": 27320,
                     "lost_packets": 0, "lost_percent": 0, "sender": True},
        "sum_received": {"seconds": 1.000302, "bytes": 37445996, "packets": 27320,
                         "lost_packets": 27, "lost_percent": 0.0988, "sender": False},
    },
}  # fmt: skip


def test_tcp_figures_are_the_receivers_rate_and_the_senders_retransmits() -> None:
    result = iperf.parse_tcp(iperf.load(json.dumps(TCP_DOC)))
    assert result.mbps == pytest.approx(1099.421016)
    assert result.retransmits == 17
    assert result.seconds == pytest.approx(2.000153)
    # The summary is kept for --json, the per-second intervals are not.
    assert result.raw["end"] == TCP_DOC["end"]
    assert "intervals" not in result.raw


def test_tcp_without_retransmit_figures_says_none() -> None:
    doc = json.loads(json.dumps(TCP_DOC))
    del doc["end"]["sum_sent"]["retransmits"]
    assert iperf.parse_tcp(doc).retransmits is None


def test_udp_delivered_rate_counts_only_packets_that_arrived() -> None:
    result = iperf.parse_udp(iperf.load(json.dumps(UDP_DOC)), target_pps=27000)
    assert result.delivered_pps == pytest.approx((27320 - 27) / 1.000302)
    assert result.sent_pps == pytest.approx(27320 / 1.000132)
    assert result.lost_percent == pytest.approx(0.0988)
    # Lag of 0.2 ms behind the sender: latency, not lateness.
    assert result.late_percent == 0.0
    assert result.shortfall_percent == pytest.approx(0.0988)
    assert result.target_pps == 27000


def test_udp_packets_that_arrive_late_are_a_shortfall_though_none_is_lost() -> None:
    # Real figures of the TCP transport offered 20000 pps for 1 s: nearly everything arrived,
    # but the receiver needed 1.24 s for it: it kept up with only 80% of the rate.
    doc = {"end": {
        "sum_sent": {"seconds": 1.000112, "packets": 19985, "lost_packets": 0},
        "sum_received": {"seconds": 1.237928, "packets": 19985, "lost_packets": 149,
                         "lost_percent": 0.7455},
    }}  # fmt: skip
    result = iperf.parse_udp(doc, target_pps=20000)
    assert result.lost_percent == pytest.approx(0.7455)
    assert result.delivered_pps == pytest.approx(16024, abs=1)
    # 0.238 s behind, 0.05 s of it allowed: 18.8% of the second late, plus 0.75% lost.
    assert result.late_percent == pytest.approx(18.78, abs=0.01)
    assert result.shortfall_percent == pytest.approx(19.53, abs=0.01)


def test_udp_from_an_iperf3_with_only_the_combined_sum() -> None:
    doc = {"end": {"sum": UDP_DOC["end"]["sum_received"]}}
    result = iperf.parse_udp(doc, target_pps=27000)
    assert result.lost_percent == pytest.approx(0.0988)
    assert result.delivered_pps == pytest.approx(27293 / 1.000302)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"start": {}, "end": {}, "error": "unable to connect to server: Connection refused"}',
         "iperf3: unable to connect to server: Connection refused"),
        ("iperf3: error - the server is busy\n", "iperf3 printed no JSON: iperf3: error - the"),
        ("", "iperf3 printed no JSON: (nothing)"),
        ("[1, 2]", "not an object"),
    ],
)  # fmt: skip
def test_iperf3_failures_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(iperf.IperfError, match=re.escape(message)) as caught:
        iperf.load(text)
    assert "\n" not in str(caught.value)


def test_a_document_without_the_summary_is_an_error() -> None:
    with pytest.raises(iperf.IperfError, match="sum_received"):
        iperf.parse_tcp({"end": {}})


def test_client_command_lines() -> None:
    assert iperf.client_argv("172.18.0.2", 5) == [
        "iperf3", "-c", "172.18.0.2", "-p", "5201", "-t", "5", "-J", "--connect-timeout", "3000",
    ]  # fmt: skip
    argv = iperf.client_argv("172.18.0.2", 2, reverse=True, streams=4)
    assert argv[-3:] == ["-R", "-P", "4"]
    udp = iperf.client_argv("172.18.0.2", 1, udp_pps=20000)
    # Bits per second for 20000 datagrams of 1372 bytes: 1400-byte packets, the tunnel MTU.
    assert udp[-5:] == ["-u", "-l", "1372", "-b", str(20000 * 1372 * 8)]


# ---- ping


PING_OUT = """PING 172.18.0.2 (172.18.0.2) 56(84) bytes of data.
64 bytes from 172.18.0.2: icmp_seq=1 ttl=63 time=0.481 ms
64 bytes from 172.18.0.2: icmp_seq=2 ttl=63 time=1.20 ms
64 bytes from 172.18.0.2: icmp_seq=4 ttl=63 time=12 ms

--- 172.18.0.2 ping statistics ---
4 packets transmitted, 3 received, 25% packet loss, time 31ms
rtt min/avg/max/mdev = 0.481/4.560/12.000/5.300 ms
"""


def test_every_reply_time_is_read_and_the_summary_line_is_not() -> None:
    assert ping.rtts(PING_OUT) == [0.481, 1.2, 12.0]
    stats = ping.stats(PING_OUT)
    assert stats.count == 3
    assert stats.avg_ms == pytest.approx((0.481 + 1.2 + 12) / 3)
    assert stats.p99_ms == 12.0


def test_p99_is_a_measured_value_by_nearest_rank() -> None:
    values = [float(v) for v in range(1, 301)]  # 300 pings, 1..300 ms, shuffled below
    values = values[150:] + values[:150]
    assert ping.percentile(values, 99) == 297.0  # ceil(0.99 * 300) = 297th smallest
    assert ping.percentile([5.0], 99) == 5.0
    assert ping.percentile([float(v) for v in range(1, 101)], 99) == 99.0
    with pytest.raises(ValueError):
        ping.percentile([], 99)


def test_no_replies_is_an_error_naming_pings_last_words() -> None:
    out = "PING 172.18.0.2 (172.18.0.2) 56(84) bytes of data.\n\n--- 172.18.0.2 ping statistics " \
          "---\n3 packets transmitted, 0 received, 100% packet loss, time 20ms\n"
    with pytest.raises(ValueError, match="no replies: 3 packets transmitted, 0 received"):
        ping.stats(out)


def test_first_reply_timestamp_skips_lines_that_are_not_replies() -> None:
    out = ("PING 172.18.0.2 (172.18.0.2) 56(84) bytes of data.\n"
           "[1700000000.100000] From 10.251.0.1 icmp_seq=1 Destination Host Unreachable\n"
           "[1700000000.523456] 64 bytes from 172.18.0.2: icmp_seq=9 ttl=63 time=0.9 ms\n"
           "[1700000000.528000] 64 bytes from 172.18.0.2: icmp_seq=10 ttl=63 time=0.5 ms\n")
    assert ping.first_reply_at(out) == pytest.approx(1700000000.523456)
    assert ping.first_reply_at(out.splitlines()[0]) is None


# ---- the UDP rate search


@dataclass(frozen=True)
class FakeProbe:
    target_pps: int
    sent_pps: float
    shortfall_percent: float


class FakePath:
    """Loses everything above `capacity` pps; its sender tops out at `sender_max`."""

    def __init__(self, capacity: float, sender_max: float = 1e9) -> None:
        self.capacity = capacity
        self.sender_max = sender_max
        self.offered: list[int] = []

    def __call__(self, pps: int) -> FakeProbe:
        self.offered.append(pps)
        sent = min(pps, self.sender_max)
        lost = max(0.0, sent - self.capacity) / sent * 100
        return FakeProbe(pps, sent, lost)


def test_search_steps_up_until_the_loss_limit_and_reports_the_rate_before() -> None:
    path = FakePath(capacity=50_000)
    outcome = search(path)
    # The failing rate is tried twice: one bad probe is not enough to stop on.
    assert path.offered == [20_000, 26_000, 33_800, 43_940, 57_122, 57_122]
    assert outcome.best is not None and outcome.best.target_pps == 43_940
    assert "short at 57122 pps" in outcome.stopped


def test_one_noisy_probe_does_not_end_the_search() -> None:
    path = FakePath(capacity=50_000)
    noisy = {26_000}

    def flaky(pps: int) -> FakeProbe:
        probe = path(pps)
        if pps in noisy:
            noisy.discard(pps)
            return FakeProbe(pps, probe.sent_pps, 9.0)
        return probe

    outcome = search(flaky)
    assert path.offered == [20_000, 26_000, 26_000, 33_800, 43_940, 57_122, 57_122]
    assert outcome.best is not None and outcome.best.target_pps == 43_940


def test_search_stops_after_max_steps() -> None:
    path = FakePath(capacity=10**9)
    outcome = search(path, Plan(max_pps=10**9))
    assert len(path.offered) == 8
    assert outcome.best is not None and outcome.best.target_pps == path.offered[-1]
    assert "maximum of 8" in outcome.stopped


def test_search_never_offers_more_than_max_pps() -> None:
    path = FakePath(capacity=10**9)
    outcome = search(path, Plan(start_pps=200_000, max_pps=400_000))
    assert path.offered == [200_000, 260_000, 338_000, 400_000]
    assert outcome.best is not None and outcome.best.target_pps == 400_000


def test_search_stops_when_the_sender_cannot_keep_up() -> None:
    path = FakePath(capacity=10**9, sender_max=30_000)
    outcome = search(path)
    assert path.offered == [20_000, 26_000, 33_800]
    assert outcome.best is not None and outcome.best.target_pps == 33_800
    assert "sender" in outcome.stopped


def test_search_steps_down_when_the_start_is_already_too_fast() -> None:
    path = FakePath(capacity=12_000)
    outcome = search(path)
    assert path.offered == [20_000, 15_385, 11_835]
    assert outcome.best is not None and outcome.best.target_pps == 11_835


def test_search_that_finds_nothing_under_the_limit_has_no_best() -> None:
    path = FakePath(capacity=0.0)
    outcome = search(path, Plan(max_steps=3))
    assert len(path.offered) == 3 and outcome.best is None
    outcome = search(FakePath(capacity=0.0), Plan(start_pps=1_200, min_pps=1_000))
    assert [p.target_pps for p in outcome.probes] == [1_200, 1_000]
    assert "short even at 1000 pps" in outcome.stopped


# ---- the report


def _result(name: str, **figures: float | None) -> ConfigResult:
    return ConfigResult(name, figures=dict(figures))


def test_ratios_compare_rates_as_a_share_and_latency_as_time_added() -> None:
    assert report.ratio(metrics.TCP_UP, 850.0, 1000.0) == "85%"
    assert report.ratio(metrics.UDP_PPS, 40_000.0, 20_000.0) == "200%"
    assert report.ratio(metrics.PING_AVG, 0.5, 0.125) == "+0.375 ms"
    assert report.ratio(metrics.PING_P99, 0.1, 0.125) == "-0.025 ms"
    assert report.ratio(metrics.UDP_LOSS, 2.0, 1.0) == ""
    assert report.ratio(metrics.TCP_UP, None, 1000.0) == ""
    assert report.ratio(metrics.TCP_UP, 10.0, None) == ""
    assert report.ratio(metrics.TCP_UP, 10.0, 0.0) == ""


def test_values_are_formatted_per_metric() -> None:
    assert report.format_value(metrics.TCP_UP, 9412.4) == "9,412"
    assert report.format_value(metrics.UDP_LOSS, 0.0988) == "0.10"
    assert report.format_value(metrics.PING_AVG, 0.08412) == "0.084"
    assert report.format_value(metrics.HANDSHAKE, None) == "n/a"


def test_table_has_one_row_per_metric_and_marks_failures() -> None:
    plain = _result("plain", tcp1_up_mbps=1000.0, ping_avg_ms=0.1, cpu_percent_per_gbit=None)
    udp = _result("udp", tcp1_up_mbps=900.0, ping_avg_ms=0.35, cpu_percent_per_gbit=55.25)
    udp.errors["udp_pps"] = "iperf3: unable to connect"
    udp.errors["udp_loss_percent"] = "iperf3: unable to connect"
    broken = ConfigResult("udp no-offload", failed="the daemon exited with 2: unknown flag")
    lines = report.table([plain, udp, broken])
    assert lines[0].split() == ["metric", "plain", "udp", "ratio", "udp", "no-offload", "ratio"]
    assert set(lines[1]) == {"-"}
    rows = {line[:32].strip(): line[32:].split() for line in lines[2:]}
    assert len(lines) == 2 + len(metrics.ALL)
    assert rows["tcp 1 stream host->ctr Mbit/s"] == ["1,000", "900", "90%", "failed"]
    assert rows["ping rtt avg ms"] == ["0.100", "0.350", "+0.250", "ms", "failed"]
    assert rows["udp 1372 B host->ctr pkt/s"] == ["n/a", "failed", "failed"]
    assert rows["ctun cpu %/Gbit/s (tcp 1 up)"] == ["n/a", "55.2", "failed"]
    assert report.notes([plain, udp, broken]) == [
        "udp: udp 1372 B host->ctr pkt/s, loss %: failed: iperf3: unable to connect",
        "udp no-offload: failed: the daemon exited with 2: unknown flag",
    ]


def test_render_puts_the_machine_first_and_the_once_figures_last() -> None:
    once = [report.Once("routes_1000_s", "1000 routes via the Linux adapter", "s", value=1.5),
            report.Once("docker_ready_s", "docker network create -> reachable", "s",
                        note="n/a (--docker not given)")]  # fmt: skip
    text = report.render([("machine", "Linux 6.1, AMD EPYC, 2 CPUs"), ("date", "today")],
                         [_result("plain"), _result("udp")], once)  # fmt: skip
    lines = text.splitlines()
    assert lines[0] == "machine  Linux 6.1, AMD EPYC, 2 CPUs"
    assert lines[1] == "date     today"
    assert lines[-2] == "1000 routes via the Linux adapter   1.500 s"
    assert lines[-1] == "docker network create -> reachable  n/a (--docker not given)"


def test_once_figures_are_formatted_with_their_own_decimals() -> None:
    assert report.Once("k", "l", "s", value=1.5).text == "1.500 s"
    assert report.Once("k", "l", "Mbit/s", value=1234.4, decimals=0).text == "1,234 Mbit/s"
    assert report.Once("k", "l", "%", value=97.6, decimals=0).text == "98%"
    assert report.Once("k", "l", "%", note="n/a (tmux not installed)").text == (
        "n/a (tmux not installed)"
    )


# ---- the TUI attached against headless


def _tui_record(headless: list[float], with_tui: list[float], note: str = "") -> attached.Record:
    record = attached.Record(note=note)
    for with_it, values in ((False, headless), (True, with_tui)):
        for mbps in values:
            record.add(with_it, mbps)
    return record


def test_tui_runs_interleave_so_linear_drift_cancels() -> None:
    # Slot i carries drift i: both sides must get the same total (ABBA does, ABAB does not).
    slots = list(enumerate(attached.ORDER))
    assert sum(i for i, t in slots if t) == sum(i for i, t in slots if not t)
    assert attached.ORDER.count(True) == attached.ORDER.count(False) >= 1


def test_tui_share_is_mean_attached_over_mean_headless() -> None:
    assert attached.share([1000.0, 1200.0], [990.0, 1100.0]) == pytest.approx(95.0)
    assert attached.share([], [1.0]) is None
    assert attached.share([0.0, 0.0], [1.0]) is None
    record = _tui_record([1000.0, 1200.0], [990.0, 1100.0])
    assert record.attached == pytest.approx(1045.0)
    assert record.percent == pytest.approx(95.0)
    doc = record.to_json()
    assert doc["order"] == ["headless", "attached", "attached", "headless"]
    assert doc["attached_mbps"] == [990.0, 1100.0] and doc["percent"] == pytest.approx(95.0)


def test_tui_runs_that_stopped_halfway_give_no_figure() -> None:
    assert _tui_record([1000.0], [990.0], note="failed: iperf3: busy").percent is None
    assert _tui_record([1000.0], [990.0]).attached is None  # unpaired: drift not cancelled
    assert _tui_record([], [], note="n/a (tmux not installed)").percent is None


def test_tui_connected_is_read_from_the_header_line() -> None:
    pane = "ctun  connected  transport udp  interface ctun0\n\n Peers  Routes\n"
    assert attached.shows_connected(" │ " + pane)
    assert not attached.shows_connected("ctun  connecting  transport udp  interface ctun0")
    assert not attached.shows_connected("ctun  daemon not running\n daemon connected\n")
    assert attached.last_line("Traceback\n  ImportError: no textual\n\n") == (
        "ImportError: no textual"
    )
    assert attached.last_line("  \n") == "(blank screen)"
    waiting = " ctun  daemon not running: no socket\n\n q Quit  ^p palette\n"
    assert attached.header(waiting) == "ctun  daemon not running: no socket"
    assert attached.header("Traceback\n  Error: x\n") == "Error: x"


def test_tui_command_imports_the_ctun_being_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    argv = attached.tui_argv(Path("/tmp/lab/run"), "ctun0")
    assert argv[:2] == ["env", "CTUN_RUN_DIR=/tmp/lab/run"]
    root = attached.package_root()
    if root is None:  # an editable install of a checkout not named ctun: found by itself
        assert argv[2] == "PYTHONPATH=/elsewhere"
    else:
        assert argv[2] == f"PYTHONPATH={root}{os.pathsep}/elsewhere"
        assert (root / "ctun" / "bench" / "attached.py").exists()
    assert argv[3:] == [sys.executable, "-m", "ctun", "tui", "--interface", "ctun0"]


def test_tui_figures_come_from_the_udp_configuration_or_say_why_not() -> None:
    udp = _result("udp")
    udp.tui = _tui_record([1000.0, 1200.0], [990.0, 1100.0])
    rate, share = run.tui_figures([_result("plain"), udp])
    assert (rate.key, rate.text) == ("tcp1_up_tui_mbps", "1,045 Mbit/s")
    assert (share.key, share.text) == ("tui_attached_percent", "95%")
    assert "tui_attached" in udp.to_json()["raw"]
    assert "tui_attached" not in _result("plain").to_json()["raw"]

    def notes(*results: ConfigResult) -> list[str]:
        return [f.note for f in run.tui_figures(results)]

    udp.tui = _tui_record([], [], note="n/a (tmux not installed)")
    assert notes(_result("plain"), udp) == ["n/a (tmux not installed)"] * 2
    assert not any(f.failed for f in run.tui_figures([_result("plain"), udp]))
    udp.tui = _tui_record([1000.0], [], note="failed: the TUI exited: ImportError")
    assert notes(_result("plain"), udp) == ["failed: the TUI exited: ImportError"] * 2
    assert all(f.failed for f in run.tui_figures([_result("plain"), udp]))
    assert notes(_result("plain"), ConfigResult("udp", failed="no daemon")) == [
        "failed: the udp configuration failed"
    ] * 2
    assert notes(_result("plain"), _result("tcp")) == ["n/a (udp not measured)"] * 2


# ---- configurations, CPU accounting, machine, routes


def test_offloads_off_is_measured_only_with_udp() -> None:
    assert [c.name for c in configs(["udp", "tcp"])] == ["plain", "udp", "tcp", "udp no-offload"]
    assert [c.name for c in configs(["tcp"])] == ["plain", "tcp"]
    no_offload = configs(["udp"])[-1]
    assert no_offload.tunnel_args == ("--transport", "udp", "--no-offload")
    # The TUI's cost is measured once, on the default transport.
    assert [c.name for c in configs(["udp", "tcp"]) if c.tui] == ["udp"]


def test_cpu_ticks_survive_a_command_name_with_a_parenthesis() -> None:
    fields = ["S"] + ["0"] * 10 + ["150", "42"] + ["0"] * 30
    assert cpu.stat_ticks("1234 (ctun) evil) " + " ".join(fields)) == 192
    assert cpu.thread_ticks(2**22 + 12345) == 0  # no such process
    assert cpu.thread_ticks(os.getpid()) >= 0


def test_cpu_per_gbit() -> None:
    # One core busy for the whole run while carrying 2 Gbit/s: 50 % per Gbit/s.
    assert cpu.percent_per_gbit(5.0, 5.0, 2000.0) == pytest.approx(50.0)
    assert cpu.percent_per_gbit(1.0, 0.0, 2000.0) is None
    assert cpu.percent_per_gbit(1.0, 5.0, 0.0) is None


def test_cpu_model_from_cpuinfo() -> None:
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: other\n"
    assert machine.cpu_model(x86) == "AMD EPYC 7B13"
    assert machine.cpu_model("processor\t: 0\nHardware\t: BCM2835\n") == "BCM2835"


def test_route_networks_are_distinct() -> None:
    networks = {routes.network(i) for i in range(1000)}
    assert len(networks) == 1000
    assert routes.network(0).with_prefixlen == "10.200.0.0/32"
    assert routes.network(257).with_prefixlen == "10.200.1.1/32"


# ---- bad input


def test_transports_must_be_known_and_named_once() -> None:
    known = ["tcp", "udp"]
    assert cli.parse_transports("udp,tcp", known) == ["udp", "tcp"]
    assert cli.parse_transports(" tcp ", known) == ["tcp"]
    for bad, message in (("udp,quic", "unknown transport 'quic' (available: tcp, udp)"),
                         ("udp,,tcp", "empty name"), ("udp,udp", "named twice")):  # fmt: skip
        with pytest.raises(cli.UsageError, match=re.escape(message)):
            cli.parse_transports(bad, known)


def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--transports", "udp,quic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ctun.bench: error: --transports: unknown transport 'quic'")
    assert err.count("\n") == 1
    for target in (tmp_path, tmp_path / "missing" / "out.json"):
        assert cli.main(["--json", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ctun.bench: error: --json {target}: ")
        assert err.count("\n") == 1
    assert not (tmp_path / "missing").exists()


def test_bad_input_from_the_command_line_prints_no_traceback(tmp_path: Path) -> None:
    for args in (["--transports", "bogus"], ["--json", str(tmp_path / "no" / "such.json")],
                 ["--no-such-flag"]):  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "ctun.bench", *args],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert result.stdout == ""


def test_a_writable_json_path_is_not_left_behind_by_the_check(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    cli.check_writable(target)
    assert not target.exists()


# ---- end to end


@pytest.mark.root
def test_quick_run_measures_the_plain_route_and_ctun_udp(tmp_path: Path) -> None:
    missing = [tool for tool in ("iperf3", "tmux") if shutil.which(tool) is None]
    if missing:
        reason = f"needs {' and '.join(missing)} (apt-get install {' '.join(missing)})"
        if os.environ.get("CI") == "true" or os.environ.get("CTUN_REQUIRE_ALL") == "1":
            pytest.fail(f"{reason} (CI=true or CTUN_REQUIRE_ALL=1: missing prerequisites fail)")
        pytest.skip(reason)
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "ctun.bench", "--quick", "--transports", "udp", "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    # 1 would only mean some figure failed (the checks below say which matter).
    assert result.returncode in (0, 1), result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    doc = json.loads(out.read_text())
    by_name = {c["name"]: c for c in doc["configs"]}
    assert list(by_name) == ["plain", "udp", "udp no-offload"]
    for name in ("plain", "udp"):
        config = by_name[name]
        assert config["failed"] is None, config
        for key in ("tcp1_up_mbps", "tcp1_down_mbps", "tcp4_up_mbps", "tcp4_down_mbps",
                    "udp_pps", "ping_avg_ms", "ping_p99_ms"):  # fmt: skip
            assert config["figures"][key] > 0, (name, key, config["errors"].get(key))
        assert config["raw"]["tcp1_up"]["end"]["sum_received"]["bytes"] > 0
    udp = by_name["udp"]["figures"]
    assert udp["cpu_percent_per_gbit"] > 0
    assert udp["first_packet_ms"] > 0
    assert by_name["plain"]["figures"]["first_packet_ms"] is None
    assert doc["once"]["routes_1000_s"]["value"] > 0
    assert doc["once"]["docker_ready_s"]["note"] == "n/a (--docker not given)"
    # The TUI, attached in tmux, was measured side by side with headless runs.
    for key in ("tcp1_up_tui_mbps", "tui_attached_percent"):
        assert doc["once"][key]["value"] > 0, doc["once"][key]["note"]
    assert len(by_name["udp"]["raw"]["tui_attached"]["attached_mbps"]) == 2
    assert re.search(r"^tui attached / headless +\d+%$", result.stdout, re.MULTILINE)
    # The printed table names every configuration; nothing of the run is left.
    assert "udp no-offload" in result.stdout.splitlines()[5]
    assert lab_namespaces("ctunbn") == []
    assert not netns.exists(routes.SCRATCH_NS)
