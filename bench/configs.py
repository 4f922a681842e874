"""The configurations one run compares, the run's durations, and what each configuration got."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .attached import Record
from .search import Plan


@dataclass(frozen=True)
class Config:
    name: str
    transport: str | None = None
    """None: no tunnel, the plain route."""
    extra: tuple[str, ...] = ()
    """More flags for both `ctun up` and `ctun vm`."""
    tui: bool = False
    """Also measure TCP with the TUI attached against headless (attached.py)."""

    @property
    def tunnel_args(self) -> tuple[str, ...]:
        assert self.transport is not None
        return ("--transport", self.transport, *self.extra)


PLAIN = Config("plain")
NO_OFFLOAD = Config("udp no-offload", "udp", ("--no-offload",))


def configs(transports: Sequence[str]) -> list[Config]:
    """The plain route first (every ratio needs it), then ctun per transport, then UDP with
    offloads off, which shows what the offloads are worth (only when UDP is measured).
    The TUI's cost is measured once, on UDP, the default transport: what users run."""
    chosen = [PLAIN, *(Config(t, t, tui=t == "udp") for t in transports)]
    if "udp" in transports:
        chosen.append(NO_OFFLOAD)
    return chosen


@dataclass(frozen=True)
class Settings:
    seconds: int
    """Length of each TCP run."""
    probe_seconds: int
    """Length of each UDP probe: up to Plan.max_steps of them per configuration."""
    ping_count: int
    plan: Plan = field(default_factory=Plan)

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        if quick:
            return cls(seconds=2, probe_seconds=1, ping_count=50)
        return cls(seconds=5, probe_seconds=3, ping_count=300)


@dataclass
class ConfigResult:
    name: str
    figures: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    """metric key (or "teardown") -> one-line reason it has no figure."""
    failed: str | None = None
    """Why the whole configuration could not be measured (one line), or None."""
    raw: dict[str, Any] = field(default_factory=dict)
    tui: Record | None = None
    """Only for the configuration with Config.tui; its figures are once per run."""

    def to_json(self) -> dict[str, Any]:
        raw = self.raw if self.tui is None else {**self.raw, "tui_attached": self.tui.to_json()}
        return {"name": self.name, "failed": self.failed, "figures": self.figures,
                "errors": self.errors, "raw": raw}  # fmt: skip
