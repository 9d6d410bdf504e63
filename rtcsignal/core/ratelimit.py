"""Token bucket: ``rate`` tokens per second up to ``burst``; time is passed in, so it is pure."""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are that many (a byte budget spends a message's
        size; a cost over ``burst`` is never admitted, so configs keep burst >= the
        largest cost)."""
        tokens = self.tokens + (now - self.last) * self.rate
        self.last = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens >= cost:
            self.tokens = tokens - cost
            return True
        self.tokens = tokens
        return False

    def retry_after(self) -> float:
        """Seconds until the next token."""
        return max(0.0, (1.0 - self.tokens) / self.rate)

    def level(self, now: float) -> float:
        """Tokens the bucket holds at ``now`` (refilled, capped at ``burst``), taking none."""
        tokens = self.tokens + (now - self.last) * self.rate
        return self.burst if tokens > self.burst else tokens
