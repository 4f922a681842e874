"""A budget of failed handshakes per source address, so wrong logins cost the host nothing.

Each address that failed a handshake (unknown key, bad MAC, stale) gets a token bucket: a
burst of LOGIN_BURST failures, refilled at LOGIN_REFILL per second. An address out of tokens
has its handshakes dropped before any check that costs anything. Only failures spend tokens,
and only addresses that failed are kept (at most MAX_SOURCES, the least recently failed go
first), so peers that log in correctly from their own addresses never meet the limit.
Used by the packet pump alone: no lock.
"""

from __future__ import annotations

from collections import OrderedDict

LOGIN_BURST = 10.0
LOGIN_REFILL = 1.0  # per second: a client retrying a wrong key (every 1-4 s) stays under it
MAX_SOURCES = 4096


class FailedLogins:
    def __init__(self, burst: float = LOGIN_BURST, refill: float = LOGIN_REFILL,
                 max_sources: int = MAX_SOURCES) -> None:
        self._burst, self._refill, self._max = burst, refill, max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, source: str, now: float) -> float:
        bucket = self._buckets.get(source)
        if bucket is None:
            return self._burst
        tokens, when = bucket
        return min(self._burst, tokens + (now - when) * self._refill)

    def allowed(self, source: str, now: float) -> bool:
        """May a handshake from `source` be looked at now? Changes nothing."""
        return self._tokens(source, now) >= 1.0

    def failed(self, source: str, now: float) -> None:
        """A handshake from `source` failed: spend one of its tokens."""
        self._buckets[source] = (self._tokens(source, now) - 1.0, now)
        self._buckets.move_to_end(source)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)

    def limited(self, now: float) -> int:
        """How many addresses are out of budget right now (for the status view; any thread:
        the copy is taken in one step, the pump may change the table meanwhile)."""
        buckets = list(self._buckets.values())
        return sum(1 for tokens, when in buckets
                   if min(self._burst, tokens + (now - when) * self._refill) < 1.0)
