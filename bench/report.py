"""The printed report: a header naming the machine, one table row per metric, then the
once-per-run figures and a note for everything that failed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import metrics
from .configs import ConfigResult
from .metrics import Kind, Metric

FAILED = "failed"
NA = "n/a"


@dataclass
class Once:
    """A figure taken once per run, not per configuration."""

    key: str
    label: str
    unit: str
    value: float | None = None
    note: str = ""
    """Why there is no value ("n/a (...)" or "failed: ...")."""
    decimals: int = 3

    @property
    def text(self) -> str:
        if self.value is None:
            return self.note
        gap = "" if self.unit == "%" else " "  # "98%", but "1.500 s"
        return f"{self.value:,.{self.decimals}f}{gap}{self.unit}"

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "unit": self.unit, "value": self.value, "note": self.note}

    @property
    def failed(self) -> bool:
        return self.note.startswith(FAILED)


def format_value(metric: Metric, value: float | None) -> str:
    if value is None:
        return NA
    return f"{value:,.{metric.decimals}f}"


def ratio(metric: Metric, value: float | None, plain: float | None) -> str:
    """ctun against the plain route: share of its rate, or the latency it adds."""
    if value is None or plain is None:
        return ""
    if metric.kind is Kind.RATE:
        return f"{value / plain * 100:.0f}%" if plain > 0 else ""
    if metric.kind is Kind.LATENCY:
        return f"{value - plain:+.{metric.decimals}f} ms"
    return ""


def cell(result: ConfigResult, metric: Metric) -> str:
    if result.failed is not None or metric.key in result.errors:
        return FAILED
    return format_value(metric, result.figures.get(metric.key))


def _figure(result: ConfigResult, metric: Metric) -> float | None:
    if result.failed is not None or metric.key in result.errors:
        return None
    return result.figures.get(metric.key)


def table(results: Sequence[ConfigResult]) -> list[str]:
    """Rows of text: metric | plain | <config> | ratio | ... (the first result is the baseline)."""
    plain, others = results[0], results[1:]
    head = ["metric", plain.name]
    for each in others:
        head += [each.name, "ratio"]
    rows = [head]
    for metric in metrics.ALL:
        row = [metric.label, cell(plain, metric)]
        base = _figure(plain, metric)
        for each in others:
            row += [cell(each, metric), ratio(metric, _figure(each, metric), base)]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for i, row in enumerate(rows):
        cells = zip(row[1:], widths[1:], strict=True)
        parts = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in cells)]
        lines.append("  ".join(parts).rstrip())
        if i == 0:
            lines.append("-" * len(lines[0]))
    return lines


def notes(results: Sequence[ConfigResult]) -> list[str]:
    """One line per failure, so every "failed" cell has its reason below the table; figures
    lost to the same failure (a probe yields several) share a line."""
    labels = {m.key: m.label.strip() for m in metrics.ALL}
    out = []
    for result in results:
        if result.failed is not None:
            out.append(f"{result.name}: failed: {result.failed}")
            continue
        by_reason: dict[str, list[str]] = {}
        for key, reason in result.errors.items():
            by_reason.setdefault(reason, []).append(labels.get(key, key))
        for reason, names in by_reason.items():
            out.append(f"{result.name}: {', '.join(names)}: failed: {reason}")
    return out


def once_lines(figures: Sequence[Once]) -> list[str]:
    width = max((len(f.label) for f in figures), default=0)
    out = []
    for f in figures:
        out.append(f"{f.label.ljust(width)}  {f.text}")
    return out


def render(header: Sequence[tuple[str, str]], results: Sequence[ConfigResult],
           once: Sequence[Once]) -> str:  # fmt: skip
    width = max(len(k) for k, _ in header)
    lines = [f"{k.ljust(width)}  {v}" for k, v in header]
    lines += ["", *table(results), "", *once_lines(once)]
    failures = notes(results)
    if failures:
        lines += ["", *failures]
    return "\n".join(lines)
