"""The Counters view: rates with a minute of history, totals, and drops by reason."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Sparkline, Static

from ..model import Rates, human_bytes

# (counter key, label, is bytes)
SERIES = (
    ("rx_packets", "in packets/s", False),
    ("tx_packets", "out packets/s", False),
    ("rx_bytes", "in bytes/s", True),
    ("tx_bytes", "out bytes/s", True),
)


class CountersPanel(VerticalScroll):
    def compose(self) -> ComposeResult:
        for key, _label, _is_bytes in SERIES:
            with Vertical(classes="series"):
                yield Label(id=f"rate-{key}", classes="rate", markup=False)
                yield Sparkline([], id=f"spark-{key}")
        yield Static(id="totals", markup=False)
        yield Static(id="drops", markup=False)  # drop reasons are the daemon's words

    def update_counters(self, rates: Rates, totals: dict[str, int],
                        drops: dict[str, int]) -> None:
        for key, label, is_bytes in SERIES:
            rate = rates.current.get(key, 0.0)
            text = f"{human_bytes(rate)}/s" if is_bytes else f"{rate:.1f}"
            self.query_one(f"#rate-{key}", Label).update(f"{label}: {text}")
            self.query_one(f"#spark-{key}", Sparkline).data = list(rates.history.get(key, []))
        self.query_one("#totals", Static).update(
            f"totals: in {totals['rx_packets']} packets ({human_bytes(totals['rx_bytes'])}), "
            f"out {totals['tx_packets']} packets ({human_bytes(totals['tx_bytes'])})")
        lines = [f"  {reason}: {n}" for reason, n in sorted(drops.items())]
        self.query_one("#drops", Static).update(
            "drops:\n" + "\n".join(lines) if lines else "drops: none")
