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

    def spend(self, now: float, size: int) -> bool:
        """A message's admission: one token; ``size`` is ignored here (see MessageBudget)."""
        return self.take(now)


#: Messages up to this size spend only a message token: the message rate already bounds
#: their bytes (``rate`` x 1 KiB per second at most), and the byte arithmetic would cost
#: every small signaling message (an ICE candidate is ~250 bytes) about 3% of its relay.
SMALL_MESSAGE = 1024


class MessageBudget(TokenBucket):
    """A connection's two budgets in one object, so a message costs one call: the inherited
    bucket counts messages, the second counts bytes (``byte_rate`` per second up to
    ``byte_burst``). ``spend`` takes from both or from neither; callers use ``take`` for
    messages of at most SMALL_MESSAGE bytes. 32 bytes more than a TokenBucket per
    connection."""

    __slots__ = ("byte_burst", "byte_rate", "byte_tokens")

    def __init__(
        self, rate: float, burst: float, byte_rate: float, byte_burst: float, now: float
    ) -> None:
        super().__init__(rate, burst, now)
        self.byte_rate = byte_rate
        self.byte_burst = byte_burst
        self.byte_tokens = byte_burst

    def spend(self, now: float, size: int) -> bool:
        """One message token and ``size`` byte tokens, or nothing if either falls short."""
        elapsed = now - self.last
        self.last = now
        tokens = self.tokens + elapsed * self.rate
        if tokens > self.burst:
            tokens = self.burst
        nbytes = self.byte_tokens + elapsed * self.byte_rate
        if nbytes > self.byte_burst:
            nbytes = self.byte_burst
        if tokens >= 1.0 and nbytes >= size:
            self.tokens = tokens - 1.0
            self.byte_tokens = nbytes - size
            return True
        self.tokens = tokens
        self.byte_tokens = nbytes
        return False
