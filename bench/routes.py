"""How long the Linux platform adapter takes to add many routes: what a host with a lot of
Docker networks pays at start-up, one netlink request per network."""

from __future__ import annotations

import tempfile
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from ..lab import netns

SCRATCH_NS = "ctunbn-routes"
"""Not a Lab role name (host/vm/atk/cN), so no Lab cleanup ever sweeps it; routes() removes it."""
IFNAME = "ctunbn0"
MTU = 1400
LOCAL = IPv4Address("10.199.0.1")
PEER = IPv4Address("10.199.0.2")


def network(index: int) -> IPv4Network:
    """The index-th distinct /32 under 10.200.0.0/16."""
    if not 0 <= index < 65536:
        raise ValueError(f"route index out of range: {index}")
    return IPv4Network(f"10.200.{index // 256}.{index % 256}/32")


def time_routes(count: int = 1000) -> float:
    """Seconds to add `count` routes through a tun the adapter opened in a scratch namespace."""
    with (
        tempfile.TemporaryDirectory(prefix="ctunbn-routes.") as run_dir,
        netns.temporary(SCRATCH_NS),
    ):
        # One thread does it all: the adapter pins the namespace of the thread that first
        # uses it, and call_in's thread is inside the scratch namespace.
        return netns.call_in(SCRATCH_NS, _add_routes, Path(run_dir), count)


def _add_routes(run_dir: Path, count: int) -> float:
    # Imported here: pyroute2 and pytun exist only on Linux, and only this figure needs them.
    from ..plugins.platform_linux.adapter import LinuxAdapter

    adapter = LinuxAdapter(run_dir)
    try:
        adapter.open_interface(IFNAME, MTU)
        adapter.set_address(LOCAL, PEER)
        networks = [network(i) for i in range(count)]
        started = time.perf_counter()
        with adapter.batch():  # as the daemon applies a plan
            for each in networks:
                adapter.add_route(each)
        took = time.perf_counter() - started
        if len(adapter.routes()) < count:
            raise RuntimeError(f"only {len(adapter.routes())} of {count} routes are in place")
        return took
    finally:
        adapter.close()
