"""The TUI driven by Textual's pilot: against an in-process control server with canned
answers (fast, no root), and once against a real daemon in the lab."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from ctun.core import control
from ctun.tests.tui_fakes import FakeDaemon, running_fake, sample_status, until
from ctun.tui import model
from ctun.tui.app import CtunApp
from ctun.tui.widgets.table import SnapshotTable
from textual.pilot import Pilot
from textual.widgets import Label, RichLog, Static

SIZE = (120, 40)
INTERVAL = 0.05  # the fake streams fast, so the tests wait for the UI, not for snapshots


@pytest.fixture
def fake() -> Iterator[FakeDaemon]:
    with running_fake() as daemon:
        yield daemon


def run(app: CtunApp, scenario: Callable[[Pilot[None]], Awaitable[None]]) -> None:
    """pytest-asyncio is not a dependency: each test runs its own event loop."""

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await scenario(pilot)

    asyncio.run(main())


def text(app: CtunApp, selector: str) -> str:
    return str(app.query_one(selector, Static).content)


def rows(app: CtunApp, selector: str) -> list[list[str]]:
    table = app.query_one(selector, SnapshotTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def test_counters_appear_and_update(fake: FakeDaemon) -> None:
    app = CtunApp(fake.path, INTERVAL)

    async def scenario(pilot: Pilot[None]) -> None:
        await pilot.press("4")
        await until(pilot, lambda: "in 100 packets" in text(app, "#totals"), "totals")
        assert text(app, "#state").startswith("ctun  connected  transport udp")
        assert "no_route: 2" in text(app, "#drops") and "bad_mac: 1" in text(app, "#drops")
        peer = fake.status["peers"][0]
        peer["rx_packets"], peer["tx_packets"] = 600, 700
        await until(pilot, lambda: "in 600 packets" in text(app, "#totals"), "new totals")
        assert "out 700 packets" in text(app, "#totals")
        # The jump shows up as a rate and in the sparkline's history.
        assert app.rates.history["rx_packets"] and max(app.rates.history["rx_packets"]) > 0
        assert str(app.query_one("#rate-rx_packets", Label).content).startswith("in packets/s")
        # Hidden views are not redrawn (it costs the tunnel throughput on a small machine)...
        assert rows(app, "#peer-table") == []
        # ...and are filled the moment they are shown.
        await pilot.press("2")
        await until(pilot, lambda: rows(app, "#peer-table")[0][5] == "600", "peer rx")
        await pilot.press("1")
        await until(pilot, lambda: rows(app, "#tunnel-table") != [], "tunnel rows")
        assert rows(app, "#tunnel-table")[0][:5] == \
            ["vm", "udp", "127.0.0.1:2511", "127.0.0.1:40000", "up"]

    run(app, scenario)


def test_routes_add_and_remove(fake: FakeDaemon) -> None:
    app = CtunApp(fake.path, INTERVAL)

    async def scenario(pilot: Pilot[None]) -> None:
        await pilot.press("3")
        await until(pilot, lambda: len(rows(app, "#route-table")) == 3, "the route rows")
        await pilot.press("a")
        await pilot.press(*"10.5.0.0/16", "enter")
        await until(pilot, lambda: fake.requests != [], "the add_route request")
        assert fake.requests[0]["cmd"] == "add_route"
        assert fake.requests[0]["network"] == "10.5.0.0/16"
        await until(pilot, lambda: len(rows(app, "#route-table")) == 4, "the new route")

        table = app.query_one("#route-table", SnapshotTable)
        table.focus()
        # A config route cannot be removed: a notification says so and nothing is sent.
        table.move_cursor(row=table.get_row_index("10.9.0.0/24"))
        await pilot.press("d")
        await pilot.pause()
        assert len(fake.requests) == 1
        assert any("comes from config" in str(n.message) for n in app._notifications)

        table.move_cursor(row=table.get_row_index("10.5.0.0/16"))
        await pilot.press("d")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", "confirm")
        await pilot.press("y")
        await until(pilot, lambda: len(fake.requests) == 2, "the remove_route request")
        assert fake.requests[1] == {"cmd": "remove_route", "network": "10.5.0.0/16"}
        await until(pilot, lambda: len(rows(app, "#route-table")) == 3, "the route gone")

        # Sorting by a header click and filtering narrow and order the rows.
        await pilot.click("#route-table", offset=(2, 0))
        await until(pilot, lambda: [r[0] for r in rows(app, "#route-table")] ==
                    ["10.8.0.0/24", "10.9.0.0/24", "172.17.0.0/16"], "sorted rows")
        app.query_one("#route-filter").focus()
        await pilot.press(*"docker")
        await until(pilot, lambda: len(rows(app, "#route-table")) == 1, "filtered rows")

    run(app, scenario)


def test_request_errors_are_one_line_notifications(fake: FakeDaemon) -> None:
    app = CtunApp(fake.path, INTERVAL)

    async def scenario(pilot: Pilot[None]) -> None:
        await until(pilot, lambda: app.status is not None, "a snapshot")
        fake.stop()  # gone: the request fails with the ControlError's line
        await pilot.press("a", *"10.6.0.0/16", "enter")
        await until(pilot, lambda: any(n.severity == "error" for n in app._notifications),
                    "an error notification")
        (note,) = [n for n in app._notifications if n.severity == "error"]
        assert "no ctun is running here" in note.message and "\n" not in note.message

    run(app, scenario)


def test_daemon_goes_away_and_comes_back(fake: FakeDaemon) -> None:
    app = CtunApp(fake.path, INTERVAL)

    async def scenario(pilot: Pilot[None]) -> None:
        await until(pilot, lambda: "connected" in text(app, "#state"), "connected")
        fake.stop()
        await until(pilot, lambda: "daemon not running" in text(app, "#state"), "down")
        fake.status["peers"][0]["state"] = "connecting"
        fake.start()  # a new server at the same path: the app finds it by itself
        await until(pilot, lambda: "ctun  connecting" in text(app, "#state"), "back again")
        await pilot.press("2")
        await until(pilot, lambda: rows(app, "#peer-table")[0][3] == "connecting", "peers")

    run(app, scenario)


def test_a_flood_of_snapshots_is_collapsed(fake: FakeDaemon) -> None:
    # Events still reach the log even though most snapshots are never shown.
    app = CtunApp(fake.path, control.MIN_INTERVAL)

    async def scenario(pilot: Pilot[None]) -> None:
        await until(pilot, lambda: app.status is not None, "a snapshot")
        fake.status["events"] = [{"id": 2, "at": 0, "peer": "vm", "state": "down",
                                  "reason": "timeout"}]
        log = app.query_one("#log", RichLog)
        await until(pilot, lambda: any("vm down (timeout)" in str(line.text)
                                       for line in log.lines), "the event in the log")
        # About 20 snapshots a second arrive; at most about 4 a second are shown.
        shown, started = app.applied, time.monotonic()
        await pilot.pause(1.0)
        assert app.applied - shown <= 4 * (time.monotonic() - started) + 2

    run(app, scenario)


def test_reconnect_help_and_palette(fake: FakeDaemon) -> None:
    app = CtunApp(fake.path, INTERVAL)

    async def scenario(pilot: Pilot[None]) -> None:
        await pilot.press("2")
        await until(pilot, lambda: len(rows(app, "#peer-table")) == 1, "the peer row")
        await pilot.press("question_mark")
        await until(pilot, lambda: type(app.screen).__name__ == "HelpScreen", "help")
        await pilot.press("d", "r")  # the main view's keys are off under the help
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")
        await until(pilot, lambda: type(app.screen).__name__ != "HelpScreen", "help closed")
        await pilot.press("2", "r")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", "confirm")
        await pilot.press("n")  # no: nothing is sent
        await pilot.press("r")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", "confirm")
        await pilot.press("y")
        await until(pilot, lambda: fake.requests != [], "the reconnect request")
        assert fake.requests == [{"cmd": "reconnect", "peer": "vm"}]
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert {"Add route", "Remove route", "Reconnect peer"} <= set(titles)

    run(app, scenario)


def test_daemon_text_is_never_markup(fake: FakeDaemon) -> None:
    # Brackets in the daemon's words ("[Errno 13]", "[bold]") are shown as they are.
    fake.status["route_table"][0]["detail"] = "[Errno 13] [bold]x"
    fake.status["route_problems"] = ["10.9.0.0/24 [conflict] with eth0"]
    fake.status["drops"] = {"[red]odd": 1}
    app = CtunApp(fake.path, INTERVAL)

    async def scenario(pilot: Pilot[None]) -> None:
        await pilot.press("3")
        await until(pilot, lambda: len(rows(app, "#route-table")) == 3, "the route rows")
        assert rows(app, "#route-table")[0][3] == "[Errno 13] [bold]x"
        assert "[conflict]" in text(app, "#route-problems")
        await pilot.press("4")
        await until(pilot, lambda: "[red]odd: 1" in text(app, "#drops"), "the drops")

    run(app, scenario)


def test_the_tui_command_checks_its_interval(capsys: pytest.CaptureFixture[str]) -> None:
    from ctun import cli

    assert cli.main(["tui", "--interval", "0"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("ctun tui: error: --interval must be") and err.count("\n") == 1


def test_model_states() -> None:
    status = sample_status()
    assert model.overall_state(None, "boom") == "daemon not running: boom"
    assert model.overall_state(status, None) == "connected"
    status["agent"] = "no image: x"
    assert model.overall_state(status, None) == "agent missing (no image: x)"
    status["docker"] = {"state": "down", "error": "refused"}
    assert model.overall_state(status, None) == "docker down: refused"
    rates = model.Rates()
    rates.add({"rx_packets": 10}, at=1.0)
    rates.add({"rx_packets": 30}, at=3.0)
    assert rates.current == {"rx_packets": 10.0}


def test_the_sharing_tab_says_what_ctun_status_says(fake: FakeDaemon) -> None:
    app = CtunApp(fake.path, INTERVAL)

    async def scenario(pilot: Pilot[None]) -> None:
        await pilot.press("5")
        await until(pilot, lambda: "accessor alice" in text(app, "#sharing-view"), "sharing")
        shown = text(app, "#sharing-view").splitlines()
        assert shown[0] == ("sharing: listening on udp 0.0.0.0:2512, exposed: 172.17.0.0/16")
        assert "  accessor alice 192.168.251.9 (peers.toml): up" in shown
        assert "links: 172.18.0.0/16+172.19.0.0/16" in shown
        assert shown[-1].startswith(
            "agent DNS: listening on 192.168.251.1:53, 1 name, 1 redirect rule;")
        for key in ("access", "links", "hosts", "proxy", "agent_view"):
            del fake.status[key]
        await until(pilot, lambda: text(app, "#sharing-view").startswith("nothing shared"),
                    "nothing shared")

    run(app, scenario)


def test_drops_include_what_transports_lost() -> None:
    status = sample_status()
    status["drops"] = {"short": 1}
    status["peers"][0]["drops"] = {"short": 2, "replay": 1}
    status["transports"] = [{"name": "udp", "stats": {"errors": 3, "dropped_rcvbuf": 4}},
                            {"name": "tcp", "stats": {"dropped_send_full": 0}}]
    assert model.drops(status) == {"short": 3, "replay": 1, "udp rcvbuf": 4}


# -- against a real daemon ----------------------------------------------------------------------

LAB_CONTAINERS = 1
EXTRA = "10.78.0.0/24"


@pytest.mark.root
def test_against_a_real_daemon(lab: Any) -> None:
    from ctun.lab import netns
    from ctun.lab.topology import Lab
    from ctun.lab.tunnel import HOST_IF, start_tunnel

    tun = start_tunnel(lab)
    path = lab.run_dir / f"{HOST_IF}.sock"

    def kernel_routes() -> list[str]:
        out = netns.run(lab.host_ns, ["ip", "-j", "route", "show", "dev", HOST_IF]).stdout
        return [r["dst"] for r in json.loads(out or "[]")]

    def daemon_peer() -> dict[str, Any]:
        peer: dict[str, Any] = control.request(path, "status")["status"]["peers"][0]
        return peer

    app = CtunApp(path, 0.1)

    async def scenario(pilot: Pilot[None]) -> None:
        await until(pilot, lambda: "connected" in text(app, "#state"), "connected")
        assert lab.ping(lab.host_ns, lab.container_ips[0], count=20).returncode == 0
        await pilot.press("2")

        def agrees() -> bool:
            table = rows(app, "#peer-table")
            want = daemon_peer()
            return bool(table) and (table[0][5], table[0][7]) == \
                (str(want["rx_packets"]), str(want["tx_packets"]))

        await until(pilot, agrees, "the app's counters to match the daemon's")
        assert int(rows(app, "#peer-table")[0][7]) >= 20
        await pilot.press("4")
        await until(pilot, lambda: f"in {daemon_peer()['rx_packets']} packets"
                    in text(app, "#totals"), "the totals to match the daemon's")

        await pilot.press("a", *EXTRA, "enter")
        await until(pilot, lambda: EXTRA in kernel_routes(), "the route in the kernel")
        await pilot.press("3")
        await until(pilot, lambda: EXTRA in [r[0] for r in rows(app, "#route-table")],
                    "the route in the table")
        table = app.query_one("#route-table", SnapshotTable)
        table.focus()
        table.move_cursor(row=table.get_row_index(EXTRA))
        await pilot.press("d")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", "confirm")
        await pilot.press("y")
        await until(pilot, lambda: EXTRA not in kernel_routes(), "the route gone")

        # The daemon dies: the app says so; it comes back: the view fills again by itself.
        Lab.stop(daemons[0], signal.SIGKILL)
        await until(pilot, lambda: "daemon not running" in text(app, "#state"), "not running",
                    timeout=15)
        daemons.append(lab.start_daemon())
        await until(pilot, lambda: "connected" in text(app, "#state"), "connected again",
                    timeout=30)
        await pilot.press("2")
        await until(pilot, lambda: rows(app, "#peer-table") != [] and
                    rows(app, "#peer-table")[0][3] == "up", "the peer up again")

    daemons = [tun.daemon]
    try:
        run(app, scenario)
    finally:
        Lab.stop(tun.agent)
        for daemon in daemons:
            Lab.stop(daemon)
