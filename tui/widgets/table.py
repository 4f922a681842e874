"""A DataTable refreshed from whole snapshots without losing the user's place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from rich.text import Text
from textual.widgets import DataTable
from textual.widgets.data_table import RowDoesNotExist, RowKey

from ..model import Row


class SnapshotTable(DataTable[Text]):
    """Rows are keyed by their first cell (peer name, subnet). Rebuilt only when the rows
    change, so an idle daemon costs nothing and the cursor does not flicker; the cursor stays
    on the same key across a rebuild. With `sortable`, clicking a header sorts by it.

    Cells are plain Text: a str cell would be parsed as Rich markup, and the daemon's details
    (an "[Errno 13]", a docker network name) are data, not markup."""

    def __init__(self, columns: tuple[str, ...], *, sortable: bool = False,
                 id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._columns = columns
        self._sortable = sortable
        self._rows: list[Row] = []
        self._shown: list[Row] | None = None
        self._filter = ""
        self._sort: tuple[int, bool] | None = None  # column index, descending

    def on_mount(self) -> None:
        self.add_columns(*self._columns)

    def show(self, rows: list[Row]) -> None:
        self._rows = rows
        self._render_rows()

    def set_filter(self, text: str) -> None:
        self._filter = text.strip().lower()
        self._render_rows()

    def selected_key(self) -> str | None:
        if self.row_count == 0:
            return None
        with contextlib.suppress(RowDoesNotExist, IndexError):
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        return None

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        if not self._sortable:
            return
        index = event.column_index
        # A second click on the same header reverses the order.
        descending = self._sort == (index, False)
        self._sort = (index, descending)
        self._render_rows()

    def _update_dimensions(self, new_rows: Iterable[RowKey]) -> None:
        super()._update_dimensions(new_rows)
        # Textual measures new rows when idle. Repaint from scratch once measured, so that a
        # table nothing else redraws (an idle daemon) never keeps lines painted before: CI
        # snapshots twice caught such a table with header-wide columns and cut cells.
        self._clear_caches()
        self.refresh()

    def _render_rows(self) -> None:
        rows = [r for r in self._rows
                if not self._filter or any(self._filter in cell.lower() for cell in r)]
        if self._sort is not None:
            index, descending = self._sort
            rows.sort(key=lambda r: r[index], reverse=descending)
        if rows == self._shown:
            return
        keep = self.selected_key()
        self.clear()
        for row in rows:
            self.add_row(*(Text(cell) for cell in row), key=row[0])
        self._shown = rows
        if keep is not None:
            with contextlib.suppress(RowDoesNotExist):
                self.move_cursor(row=self.get_row_index(keep))
