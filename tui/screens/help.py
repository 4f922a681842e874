"""The `?` screen: what the keys do and what the header states mean."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
[b]ctun tui[/b]: watch and steer a running ctun daemon

[b]Keys[/b]
  a        add a route (a network such as 10.5.0.0/16) until the daemon stops
  d        remove the selected route (only routes added from here or `ctun routes add`)
  r        reconnect the selected peer (the agent handshakes again at once)
  1-5      Tunnels, Peers, Routes, Counters, Sharing (accessors, links, hosts, proxy)
  ctrl+p   command palette
  ?        this help        q  quit

[b]Header[/b]
  connected           a peer is up: containers are reachable by IP
  connecting          the daemon runs; no peer is up yet
  docker down         the daemon cannot reach the Docker engine
  agent missing       the agent container is not running
  daemon not running  nothing answers on the control socket; retried every second

Click a Routes column header to sort by it; type in the filter box to narrow the rows.

Press escape or ? to close."""


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "close", "Close"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog help"):
            yield Static(HELP)

    def action_close(self) -> None:
        self.dismiss(None)
