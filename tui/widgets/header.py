"""The top line: the overall state, coloured, with transport and interface."""

from __future__ import annotations

from typing import Any

from textual.widgets import Static

from ..model import header_line, overall_state


class StateLine(Static):
    """Not markup: the error line it shows may hold brackets ("[Errno 111] ...")."""

    def __init__(self, text: str, id: str | None = None) -> None:
        super().__init__(text, id=id, markup=False)

    def show(self, status: dict[str, Any] | None, error: str | None) -> None:
        state = overall_state(status, error)
        self.update(header_line(status, error))
        # One class per kind of state, so the stylesheet alone decides the colours.
        self.set_class(state == "connected", "ok")
        self.set_class(state == "connecting", "pending")
        self.set_class(state not in ("connected", "connecting"), "bad")
