"""One benchmark run: the lab and every configuration in it, then the once-per-run figures."""

from __future__ import annotations

from collections.abc import Sequence

from ..lab.topology import Lab
from . import routes
from .configs import ConfigResult, Settings, configs
from .measure import Progress, measure, one_line
from .report import FAILED, Once

PREFIX = "ctunbn"
ROUTE_COUNT = 1000
TUI_MBPS = "tcp1_up_tui_mbps"
TUI_PERCENT = "tui_attached_percent"


def measure_all(
    transports: Sequence[str], settings: Settings, progress: Progress
) -> list[ConfigResult]:
    """Every configuration, in order, in one lab (removed afterwards, also on Ctrl-C)."""
    progress(f"building the lab {PREFIX} (host, VM with bridge, 1 container)")
    with Lab(PREFIX, containers=1) as lab:
        return [measure(lab, config, settings, progress) for config in configs(transports)]


def tui_figures(results: Sequence[ConfigResult]) -> list[Once]:
    """TCP with the TUI attached and its share of headless, from the configuration that
    measured them (the udp one), or why there are none."""
    rate = Once(TUI_MBPS, "tcp 1 stream with TUI attached", "Mbit/s", decimals=0)
    share = Once(TUI_PERCENT, "tui attached / headless", "%", decimals=0)
    record = next((r.tui for r in results if r.tui is not None), None)
    if record is None:
        measured = next((r for r in results if r.name == "udp"), None)
        note = (f"{FAILED}: the udp configuration failed" if measured is not None
                else "n/a (udp not measured)")  # fmt: skip
    else:
        rate.value, share.value = record.attached, record.percent
        note = record.note or f"{FAILED}: no figure"  # only read when a value is missing
    for figure in (rate, share):
        if figure.value is None:
            figure.note = note
    return [rate, share]


def route_figure(progress: Progress) -> Once:
    figure = Once("routes_1000_s", f"{ROUTE_COUNT} routes via the Linux adapter", "s")
    progress(f"adding {ROUTE_COUNT} routes through the Linux adapter in a scratch namespace")
    try:
        figure.value = routes.time_routes(ROUTE_COUNT)
    except Exception as exc:
        figure.note = f"{FAILED}: {one_line(exc)}"
    return figure


def docker_figure(wanted: bool, progress: Progress) -> Once:
    figure = Once("docker_ready_s", "docker network create -> reachable", "s")
    if not wanted:
        figure.note = "n/a (--docker not given)"
        return figure
    try:  # imported only when asked for: it needs the docker SDK
        from .docker_ready import Unavailable, time_network_ready
    except ImportError as exc:
        figure.note = f"n/a (needs the docker Python SDK: {exc})"
        return figure

    try:
        figure.value = time_network_ready(progress)
    except Unavailable as exc:
        figure.note = f"n/a ({exc})"
    except Exception as exc:
        figure.note = f"{FAILED}: {one_line(exc)}"
    return figure
