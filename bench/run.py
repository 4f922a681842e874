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


def measure_all(
    transports: Sequence[str], settings: Settings, progress: Progress
) -> list[ConfigResult]:
    """Every configuration, in order, in one lab (removed afterwards, also on Ctrl-C)."""
    progress(f"building the lab {PREFIX} (host, VM with bridge, 1 container)")
    with Lab(PREFIX, containers=1) as lab:
        return [measure(lab, config, settings, progress) for config in configs(transports)]


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
