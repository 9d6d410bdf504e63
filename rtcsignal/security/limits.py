"""Per-address state: open connections, a connect-rate token bucket and failed-auth throttling.

All of it lives in one bounded table. An entry only matters while it holds information (open
connections, a bucket that is not yet full, recent auth failures or an active block); once it
is back to the state a fresh entry would have, it is dropped. Pruning is incremental (a few
entries per call, oldest-touched first) so no single connection pays for a full scan, and the
table is capped: beyond ``max_entries`` the oldest entries without open connections are
evicted, which at worst forgets some rate/failure history of addresses not seen for longer
than anyone else. Entries with open connections are never evicted; there are at most
``max_connections`` of those.

The connect-rate bucket is ``core.ratelimit.TokenBucket`` itself (the one the per-connection
message limit uses): an ``Entry`` is a bucket with the address's counters in extra slots, so
the bucket costs no object of its own; ``rate`` and ``burst`` point at the table's two floats.

Cost (measured on CPython 3.11 with tracemalloc, 100k entries each with a partly spent bucket
and a failure): ~211 bytes per entry (slotted object with eight fields, its floats, the
OrderedDict slot) plus the key string (~55 bytes for IPv4, ~70 for an IPv6 /64): about 270
bytes, so ~27 MB for a table full at the 100k cap.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from rtcsignal.core.ratelimit import TokenBucket

FAIL_WINDOW = 60.0  # seconds over which failed token checks are counted
FAIL_BLOCK = 60.0  # seconds an address is refused after too many failures
MAX_ENTRIES = 100_000
PRUNE_STEP = 4  # entries examined per touch: keeps the table trimmed at O(1) per connection


class Entry(TokenBucket):
    """One address: its connect-rate bucket (``tokens`` at ``last``) and its counters."""

    __slots__ = ("blocked_until", "fail_start", "fails", "open")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        super().__init__(rate, burst, now)
        self.open = 0
        self.fails = 0  # failed token checks since ``fail_start``
        self.fail_start = 0.0
        self.blocked_until = 0.0


def retry_after(seconds: float) -> dict[str, str]:
    """A Retry-After header for a wait of ``seconds`` (whole seconds, at least 1)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class AddressTable:
    """Per-address counters; ``now`` is always a monotonic clock reading in seconds."""

    def __init__(
        self,
        rate: float,
        burst: float,
        fail_limit: int,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.fail_limit = fail_limit
        self.max_entries = max_entries
        self.entries: OrderedDict[str, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def peek(self, key: str) -> Entry | None:
        """The entry if there is one; never creates (lookups alone must not grow the table)."""
        return self.entries.get(key)

    def get(self, key: str, now: float) -> Entry:
        """The entry for ``key``, created with a full bucket; marks it most recently touched."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            return entry
        self.prune(now, PRUNE_STEP)
        if len(self.entries) >= self.max_entries:
            self._evict(now)
        entry = self.entries[key] = Entry(self.rate, self.burst, now)
        return entry

    # --- connect-rate bucket

    def take(self, entry: Entry, now: float) -> float:
        """Take one connect token. Returns 0 on success, else the seconds until one is due."""
        return 0.0 if entry.take(now) else entry.retry_after()

    # --- failed-auth throttle

    @staticmethod
    def blocked(entry: Entry | None, now: float) -> float:
        """Seconds the address is still refused for failing auth; 0 if it is not."""
        return max(0.0, entry.blocked_until - now) if entry is not None else 0.0

    def fail(self, entry: Entry, now: float) -> None:
        """Count a failed token check; past the limit within the window, block the address."""
        if now - entry.fail_start >= FAIL_WINDOW:
            entry.fails, entry.fail_start = 0, now
        entry.fails += 1
        if entry.fails > self.fail_limit:
            entry.blocked_until = now + FAIL_BLOCK
            entry.fails = 0

    # --- memory

    def idle(self, entry: Entry, now: float) -> bool:
        """True when the entry says nothing a fresh one would not: safe to drop."""
        return (
            entry.open == 0
            and entry.blocked_until <= now
            and (entry.fails == 0 or now - entry.fail_start >= FAIL_WINDOW)
            and entry.level(now) >= entry.burst
        )

    def prune(self, now: float, budget: int) -> int:
        """Look at up to ``budget`` of the least recently touched entries; drop idle ones."""
        dropped = 0
        for _ in range(min(budget, len(self.entries))):
            key, entry = next(iter(self.entries.items()))
            if self.idle(entry, now):
                del self.entries[key]
                dropped += 1
            else:
                self.entries.move_to_end(key)
        return dropped

    def sweep(self, now: float) -> int:
        """Drop every idle entry (O(n)); for a periodic timer, not the connection path."""
        stale = [k for k, e in self.entries.items() if self.idle(e, now)]
        for k in stale:
            del self.entries[k]
        return len(stale)

    def _evict(self, now: float) -> None:
        """Make room at the cap: drop the least recently touched entry without connections."""
        for _ in range(min(64, len(self.entries))):
            key, entry = next(iter(self.entries.items()))
            if entry.open == 0:
                del self.entries[key]
                return
            self.entries.move_to_end(key)
        # Only entries with open connections near the front: let the table exceed the cap;
        # such entries are bounded by max_connections.
