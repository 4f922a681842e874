"""The sustainable UDP rate: the highest offered packet rate delivered with a shortfall (lost
or late packets, see iperf.UdpResult.late_percent) under 1%.

Offered rates grow geometrically from `start_pps` until a probe goes over the limit (the one
before it is the answer), the sender itself falls short of the offer (a higher offer would
only measure iperf3 again), or a bound is reached. When the very first probe is already over
the limit, the rates shrink by the same factor instead until one is under it. Either way the
search never takes more than `max_steps` runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Probe(Protocol):
    @property
    def target_pps(self) -> int: ...

    @property
    def sent_pps(self) -> float: ...

    @property
    def shortfall_percent(self) -> float: ...


P = TypeVar("P", bound=Probe)


@dataclass(frozen=True)
class Plan:
    start_pps: int = 20_000
    factor: float = 1.3
    max_steps: int = 8
    max_pps: int = 400_000
    min_pps: int = 1_000
    retry_failures: int = 1
    """After a rate has passed, a failing probe is run again this many times before the
    search stops: on a small machine one probe in several is hit by a burst of other work."""
    shortfall_limit: float = 1.0
    """Percent of shortfall; a probe at or above it is not sustainable."""
    sender_reach: float = 0.9
    """A sender that reaches less than this share of the offer is the bottleneck."""


@dataclass
class Outcome(Generic[P]):
    best: P | None
    """The fastest probe under the shortfall limit (None: none was)."""
    probes: list[P] = field(default_factory=list)
    stopped: str = ""
    """Why the search ended, for the JSON."""


def search(measure: Callable[[int], P], plan: Plan = Plan()) -> Outcome[P]:
    outcome: Outcome[P] = Outcome(best=None)
    rate = plan.start_pps
    retries = plan.retry_failures
    for _ in range(plan.max_steps):
        probe = measure(rate)
        outcome.probes.append(probe)
        descending = len(outcome.probes) > 1 and outcome.best is None
        if probe.shortfall_percent >= plan.shortfall_limit:
            if outcome.best is not None and retries > 0:
                retries -= 1
                continue
            if outcome.best is not None:
                outcome.stopped = f"{probe.shortfall_percent:.2f}% short at {rate} pps"
                return outcome
            if rate <= plan.min_pps:
                outcome.stopped = f"{probe.shortfall_percent:.2f}% short even at {rate} pps"
                return outcome
            rate = max(plan.min_pps, round(rate / plan.factor))
            continue
        outcome.best = probe
        retries = plan.retry_failures
        if descending:
            outcome.stopped = f"the first rate under the limit below {plan.start_pps} pps"
            return outcome
        if probe.sent_pps < plan.sender_reach * rate:
            outcome.stopped = f"the sender reached only {probe.sent_pps:.0f} of {rate} pps"
            return outcome
        if rate >= plan.max_pps:
            outcome.stopped = f"reached the bound of {plan.max_pps} pps"
            return outcome
        rate = min(plan.max_pps, round(rate * plan.factor))
    outcome.stopped = f"ran the maximum of {plan.max_steps} probes"
    return outcome
