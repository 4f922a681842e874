"""SVG snapshots of every view of the TUI (pytest-textual-snapshot), at 80x24 and 160x48.

Everything on screen is made deterministic from the test side, not in the product: the fake
daemon's counters never move (so every rate is exactly 0 however many snapshots arrive, and
timing cannot change the figures), its ages and uptime are fixed numbers, its one event has a
fixed timestamp shown in UTC, and the "not running" path is a fixed one that cannot exist.
Update the baselines with --snapshot-update after a deliberate change, and look at them."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ctun.tests.tui_fakes import FakeDaemon, running_fake, sample_status, until
from ctun.tui.app import CtunApp
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static

pytest.importorskip("pytest_textual_snapshot")

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((160, 48), id="160x48")]
INTERVAL = 0.05  # fast, so the screen settles quickly; the figures do not depend on it
EVENT_AT = 1_700_000_000.0  # 22:13:20 UTC
# Where no daemon can ever be listening; its path is part of the error line on screen.
ABSENT = Path("/nonexistent/ctun-snapshots/ctun0.sock")

SnapCompare = Callable[..., bool]
RunBefore = Callable[[Pilot[Any]], Awaitable[None]]


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    """The event log shows local time: pin the zone so the baselines hold everywhere."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


@pytest.fixture
def fake() -> Iterator[FakeDaemon]:
    with running_fake(sample_status(event_at=EVENT_AT)) as daemon:
        yield daemon


def no_blink(pilot: Pilot[Any]) -> None:
    # A blinking cursor is visible or not depending on when the screenshot falls.
    for each in pilot.app.screen.query(Input):
        each.cursor_blink = False


def measured(table: DataTable[Any]) -> bool:
    """Whether the table has measured its rows (it does so when next idle, not on add_row).

    A screen pushed before that hides the table still drawn with header-wide columns."""
    widths = [column.content_width for column in table.ordered_columns]
    return all(len(str(cell)) <= width for i in range(table.row_count)
               for width, cell in zip(widths, table.get_row_at(i), strict=True))


async def settled(pilot: Pilot[Any]) -> None:
    """Wait until a few snapshots have been applied and the event log is written.

    The Counters sparklines draw an empty history, one sample and many samples differently;
    from the third snapshot on the history holds two or more zeros and the drawing is fixed."""
    app = pilot.app
    assert isinstance(app, CtunApp)
    await until(pilot, lambda: app.applied >= 3, "the fake's snapshots")
    # "daemon connected" and the event are written with the first snapshot.
    await until(pilot, lambda: len(app.event_log.lines) >= 2, "the event log")


async def drawn(pilot: Pilot[Any], table: DataTable[Any], rows: int) -> None:
    """Wait until the table shows its rows, measured and painted.

    Only the active view is redrawn from snapshots, so this is asked of the one on screen."""
    await until(pilot, lambda: table.row_count == rows and measured(table), f"{table.id}")
    # Painted too: a dialog pushed now would cover a screen no longer repainted behind it.
    await pilot.app.screen.wait_for_refresh()


async def still(pilot: Pilot[Any], timeout: float = 10.0) -> None:
    """Wait until two screenshots a refresh and 0.1 s apart agree: a DataTable measures its
    columns on idle and a screen under a dialog repaints late, so "data arrived" is not yet
    "drawn as it will stay"."""
    deadline = time.monotonic() + timeout
    before = pilot.app.export_screenshot()
    while True:
        await pilot.app.screen.wait_for_refresh()
        await pilot.pause(0.1)
        now = pilot.app.export_screenshot()
        if now == before:
            return
        assert time.monotonic() < deadline, "the screen never settled"
        before = now


def keys(*pressed: str, table: str = "#tunnel-table", rows: int = 1,
         wait_for: str | None = None) -> RunBefore:
    """Settle, make sure `table` is drawn, press the keys (and wait for screen `wait_for`)."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await settled(pilot)
        if wait_for is None:
            await pilot.press(*pressed)
            await drawn(pilot, pilot.app.query_one(table, DataTable), rows)
        else:
            await drawn(pilot, pilot.app.query_one(table, DataTable), rows)
            # A screen covered by a dialog is not repainted: it must be final before (a
            # column still as wide as its header once showed up cut under the dialog).
            await still(pilot)
            await pilot.press(*pressed)
            await until(pilot, lambda: type(pilot.app.screen).__name__ == wait_for, wait_for)
        no_blink(pilot)
        await still(pilot)

    return run_before


async def counters(pilot: Pilot[Any]) -> None:
    await settled(pilot)
    await pilot.press("4")
    app = pilot.app
    assert isinstance(app, CtunApp)
    totals = app.query_one("#totals", Static)
    await until(pilot, lambda: "in 100 packets" in str(totals.content), "the totals")
    # Two samples or more: from then on the zero-rate sparklines are drawn the same.
    await until(pilot, lambda: len(app.rates.history.get("rx_packets", ())) >= 2, "history")
    await still(pilot)


async def sharing(pilot: Pilot[Any]) -> None:
    await settled(pilot)
    await pilot.press("5")
    view = pilot.app.query_one("#sharing-view", Static)
    await until(pilot, lambda: "accessor alice" in str(view.content), "the sharing view")
    await still(pilot)


VIEWS = [
    pytest.param(keys("1"), id="tunnels"),
    pytest.param(keys("2", table="#peer-table"), id="peers"),
    pytest.param(keys("3", table="#route-table", rows=3), id="routes"),
    pytest.param(counters, id="counters"),
    pytest.param(sharing, id="sharing"),
    pytest.param(keys("question_mark", wait_for="HelpScreen"), id="help"),
    pytest.param(keys("a", *"10.5.0.0/16", wait_for="AddRouteScreen"), id="add-route"),
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("run_before", VIEWS)
def test_view(snap_compare: SnapCompare, fake: FakeDaemon, run_before: RunBefore,
              size: tuple[int, int]) -> None:
    assert snap_compare(CtunApp(fake.path, INTERVAL), terminal_size=size,
                        run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_daemon_not_running(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    assert not ABSENT.exists()
    app = CtunApp(ABSENT, INTERVAL)

    async def run_before(pilot: Pilot[Any]) -> None:
        await until(pilot, lambda: app.error is not None, "the error line")
        no_blink(pilot)
        await still(pilot)

    assert snap_compare(app, terminal_size=size, run_before=run_before)
