"""`ctun tui`: a live view of a running daemon, and a few ways to steer it.

Snapshots arrive on a background thread (see feed.py); the app applies the newest one on a
timer, so the screen refreshes at most APPLY_EVERY no matter how fast the daemon talks.
Requests (add/remove route, reconnect) run on worker threads: a slow daemon never freezes
the UI, and every failure becomes a one-line notification."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input, RichLog, Static, TabbedContent, TabPane

from ..core import control
from ..core.status_text import format_sharing
from . import model
from .feed import SnapshotFeed
from .screens.dialogs import AddRouteScreen, ConfirmScreen
from .screens.help import HelpScreen
from .widgets.counters import CountersPanel
from .widgets.header import StateLine
from .widgets.table import SnapshotTable

APPLY_EVERY = 0.25  # seconds: at most four screen updates a second

TUNNEL_COLUMNS = ("peer", "transport", "local endpoint", "peer endpoint", "state",
                  "handshake age", "RTT", "uptime")
PEER_COLUMNS = ("name", "remote", "endpoint", "state", "last seen", "rx packets", "rx bytes",
                "tx packets", "tx bytes")
ROUTE_COLUMNS = ("subnet", "source", "state", "detail")


class CtunApp(App[None]):
    CSS_PATH = "ctun.tcss"
    TITLE = "ctun"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "add_route", "Add route"),
        Binding("d", "remove_route", "Remove route"),
        Binding("r", "reconnect", "Reconnect"),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
        Binding("1", "show_tab('tunnels')", "Tunnels", show=False),
        Binding("2", "show_tab('peers')", "Peers", show=False),
        Binding("3", "show_tab('routes')", "Routes", show=False),
        Binding("4", "show_tab('counters')", "Counters", show=False),
        Binding("5", "show_tab('sharing')", "Sharing", show=False),
    ]

    def __init__(self, path: Path, interval: float = 0.5) -> None:
        super().__init__()
        self.path = path
        self.interval = interval
        self.status: dict[str, Any] | None = None
        self.error: str | None = None
        self.rates = model.Rates()
        self.applied = 0  # snapshots shown: tests check the throttle with it
        self._feed = SnapshotFeed(path, interval)
        # Held here rather than queried: App.query_one searches the active screen, which is a
        # dialog while one is open, and the snapshot timer keeps running under it.
        self.state_line = StateLine("ctun  starting", id="state")
        self.tabs = TabbedContent(initial="tunnels")
        self.tunnel_table = SnapshotTable(TUNNEL_COLUMNS, id="tunnel-table")
        self.peer_table = SnapshotTable(PEER_COLUMNS, id="peer-table")
        self.route_table = SnapshotTable(ROUTE_COLUMNS, sortable=True, id="route-table")
        self.route_problems = Static(id="route-problems", markup=False)
        self.counters_panel = CountersPanel(id="counters-panel")
        # The daemon's words (accessor names, file paths): never markup.
        self.sharing_view = Static(id="sharing-view", markup=False)
        self.event_log = RichLog(id="log", max_lines=1000, wrap=True)

    def compose(self) -> ComposeResult:
        yield self.state_line
        with self.tabs:
            with TabPane("Tunnels", id="tunnels"):
                yield self.tunnel_table
            with TabPane("Peers", id="peers"):
                yield self.peer_table
            with TabPane("Routes", id="routes"):
                yield Input(placeholder="filter routes", id="route-filter")
                yield self.route_table
                yield self.route_problems
            with TabPane("Counters", id="counters"):
                yield self.counters_panel
            with TabPane("Sharing", id="sharing"):
                yield self.sharing_view
        yield self.event_log
        yield Footer()

    def on_mount(self) -> None:
        self._feed.start()
        self.set_interval(APPLY_EVERY, self._apply)

    def on_unmount(self) -> None:
        self._feed.stop()

    # -- applying snapshots ------------------------------------------------------------------

    def _apply(self) -> None:
        taken = self._feed.take()
        if taken is None:
            return
        log = self.event_log
        for event in taken.events:
            log.write(model.event_line(event))
        if taken.status is not None:
            if self.status is None:
                log.write("daemon connected")
            self._show(taken.status, taken.at)
        elif taken.error is not None:
            if self.status is not None or self.error is None:
                log.write(f"daemon not running: {taken.error}")
            self.status, self.error = None, taken.error
            self.rates.reset()  # the next daemon's counters start again from zero
            self.state_line.show(None, taken.error)
            # The last figures stay readable but dimmed: they are no longer live.
            self.tabs.add_class("stale")

    def _show(self, status: dict[str, Any], at: float) -> None:
        self.status, self.error = status, None
        self.applied += 1
        self.state_line.show(status, None)
        self.tabs.remove_class("stale")
        # Rates need every sample; the widgets only the view on screen. Redrawing hidden
        # tables cost the tunnel measurable throughput on a 2-core machine (bench/).
        self.rates.add(model.totals(status), at)
        self._render_active()

    def _render_active(self) -> None:
        status = self.status
        if status is None:
            return
        active = self.tabs.active
        if active == "tunnels":
            self.tunnel_table.show(model.tunnel_rows(status))
        elif active == "peers":
            self.peer_table.show(model.peer_rows(status))
        elif active == "routes":
            self.route_table.show(model.route_rows(status))
            problems = status.get("route_problems") or []
            self.route_problems.update("\n".join(f"! {p}" for p in problems))
        elif active == "counters":
            self.counters_panel.update_counters(self.rates, model.totals(status),
                                                model.drops(status))
        elif active == "sharing":
            self.sharing_view.update("\n".join(format_sharing(status)))

    def on_tabbed_content_tab_activated(self, _event: TabbedContent.TabActivated) -> None:
        self._render_active()  # at once, not at the next snapshot

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "route-filter":
            self.route_table.set_filter(event.value)

    # -- actions -----------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # The main view's keys do nothing while a dialog or the help is open: "d" under a
        # confirmation must not stack a second one.
        return not (action in _MAIN_VIEW_ACTIONS and isinstance(self.screen, ModalScreen))

    def action_show_tab(self, tab: str) -> None:
        self.tabs.active = tab

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_add_route(self) -> None:
        def add(network: str | None) -> None:
            if network:
                self._request("add_route", _added(network), network=network)

        self.push_screen(AddRouteScreen(), add)

    def action_remove_route(self) -> None:
        subnet = self.route_table.selected_key()
        if subnet is None:
            self.notify("select a route in the Routes tab first", severity="warning")
            return
        route: dict[str, Any] = next((r for r in (self.status or {}).get("route_table") or []
                      if r.get("subnet") == subnet), {})
        source = route.get("source", "?")
        if source != "control":
            self.notify(f"{subnet} comes from {source}; only routes added here or with "
                        "`ctun routes add` can be removed", severity="warning")
            return

        def remove(yes: bool | None) -> None:
            if yes:
                self._request("remove_route", lambda _a: f"{subnet}: removed", network=subnet)

        self.push_screen(ConfirmScreen(f"Remove route {subnet}?"), remove)

    def action_reconnect(self) -> None:
        peer = self._selected_peer()
        if peer is None:
            self.notify("select a peer in the Peers or Tunnels tab first", severity="warning")
            return

        def reconnect(yes: bool | None) -> None:
            if yes:
                self._request("reconnect", _reconnected, peer=peer)

        self.push_screen(ConfirmScreen(f"End peer {peer}'s session so it reconnects?"),
                         reconnect)

    def _selected_peer(self) -> str | None:
        table = self.tunnel_table if self.tabs.active == "tunnels" else self.peer_table
        selected = table.selected_key()
        if selected is not None:
            return selected
        peers = (self.status or {}).get("peers") or []
        return str(peers[0]["name"]) if len(peers) == 1 else None

    def _request(self, cmd: str, done: Callable[[dict[str, Any]], str], **args: Any) -> None:
        """Ask the daemon off the UI thread; the answer or the error line is a notification."""

        def work() -> None:
            try:
                answer = control.request(self.path, cmd, **args)
                message, severity = done(answer), "information"
            except control.ControlError as exc:
                message, severity = str(exc), "error"
            except Exception as exc:  # a garbled answer: still one line, never a traceback
                message, severity = f"{cmd}: {exc}", "error"
            # markup=False: error lines such as "[Errno 111] ..." are text, not Rich markup.
            self.call_from_thread(self.notify, message, severity=severity, markup=False)

        self.run_worker(work, thread=True, group="requests", exit_on_error=False)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Add route", "Route a network into the tunnel",
                            self.action_add_route)
        yield SystemCommand("Remove route", "Remove the selected route",
                            self.action_remove_route)
        yield SystemCommand("Reconnect peer", "End the selected peer's session",
                            self.action_reconnect)
        yield SystemCommand("Help", "Keys and states", self.action_help)


_MAIN_VIEW_ACTIONS = {"add_route", "remove_route", "reconnect", "show_tab", "help"}


def _added(network: str) -> Callable[[dict[str, Any]], str]:
    def message(answer: dict[str, Any]) -> str:
        route = answer.get("route") or {}
        detail = f": {route['detail']}" if route.get("detail") else ""
        return f"{network}: {route.get('state', 'added')}{detail}"

    return message


def _reconnected(answer: dict[str, Any]) -> str:
    return f"peer {answer.get('peer')}: " + ("session ended; it reconnects now"
                                             if answer.get("was_connected")
                                             else "was not connected")
