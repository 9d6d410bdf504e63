"""Per-address table: connect token bucket, failed-auth throttle, pruning and the cap."""

from __future__ import annotations

import gc
import random
import tracemalloc

from rtcsignal.core.ratelimit import TokenBucket
from rtcsignal.security.limits import FAIL_BLOCK, AddressTable, retry_after


def test_bucket_allows_burst_then_refuses() -> None:
    t = AddressTable(rate=2.0, burst=3.0, fail_limit=10)
    e = t.get("a", 0.0)
    assert [t.take(e, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = t.take(e, 0.0)
    assert wait == 0.5  # one token at 2/s


def test_bucket_refills_at_rate_and_caps_at_burst() -> None:
    t = AddressTable(rate=2.0, burst=3.0, fail_limit=10)
    e = t.get("a", 0.0)
    for _ in range(3):
        t.take(e, 0.0)
    assert t.take(e, 0.25) > 0  # half a token
    assert t.take(e, 0.5) == 0.0  # one full token by now
    assert t.take(e, 0.5) > 0
    # a long pause refills to burst, not beyond
    assert [t.take(e, 100.0) for _ in range(4)][-1] > 0


def test_refused_attempts_do_not_go_into_debt() -> None:
    t = AddressTable(rate=1.0, burst=1.0, fail_limit=10)
    e = t.get("a", 0.0)
    t.take(e, 0.0)
    for _ in range(100):
        t.take(e, 0.0)
    assert t.take(e, 1.0) == 0.0


def test_fail_throttle_blocks_after_limit_for_a_minute() -> None:
    t = AddressTable(rate=1.0, burst=1.0, fail_limit=3)
    e = t.get("a", 0.0)
    for i in range(3):
        t.fail(e, float(i))
        assert t.blocked(e, float(i)) == 0.0
    t.fail(e, 3.0)  # the 4th failure within 60 s
    assert t.blocked(e, 3.0) == FAIL_BLOCK
    assert t.blocked(e, 3.0 + FAIL_BLOCK - 1) == 1.0
    assert t.blocked(e, 3.0 + FAIL_BLOCK) == 0.0


def test_fail_window_resets() -> None:
    t = AddressTable(rate=1.0, burst=1.0, fail_limit=2)
    e = t.get("a", 0.0)
    t.fail(e, 0.0)
    t.fail(e, 1.0)
    t.fail(e, 61.0)  # a new window: count restarts
    assert t.blocked(e, 61.0) == 0.0


def test_blocked_on_unknown_address_is_zero() -> None:
    assert AddressTable.blocked(None, 5.0) == 0.0


def test_peek_does_not_create() -> None:
    t = AddressTable(rate=1.0, burst=1.0, fail_limit=1)
    assert t.peek("x") is None
    assert len(t) == 0


def test_idle_needs_no_connections_full_bucket_and_no_failures() -> None:
    t = AddressTable(rate=1.0, burst=2.0, fail_limit=5)
    e = t.get("a", 0.0)
    assert t.idle(e, 0.0)
    t.take(e, 0.0)
    assert not t.idle(e, 0.5)
    assert t.idle(e, 1.0)
    e.open = 1
    assert not t.idle(e, 10.0)
    e.open = 0
    t.fail(e, 10.0)
    assert not t.idle(e, 20.0)
    assert t.idle(e, 70.0)


def test_sweep_drops_idle_entries_only() -> None:
    t = AddressTable(rate=1.0, burst=1.0, fail_limit=5)
    busy = t.get("busy", 0.0)
    busy.open = 1
    for i in range(10):
        t.take(t.get(f"x{i}", 0.0), 0.0)
    assert len(t) == 11
    assert t.sweep(0.5) == 0
    assert t.sweep(1.0) == 10
    assert list(t.entries) == ["busy"]


def test_incremental_prune_keeps_table_small() -> None:
    t = AddressTable(rate=10.0, burst=1.0, fail_limit=5)
    for i in range(10_000):
        now = i * 1.0  # every earlier bucket has refilled by the next arrival
        t.take(t.get(f"10.0.{i // 256}.{i % 256}", now), now)
    assert len(t) < 10


def test_cap_evicts_oldest_without_connections() -> None:
    t = AddressTable(rate=1.0, burst=5.0, fail_limit=5, max_entries=3)
    keep = t.get("keep", 0.0)
    keep.open = 2
    for k in ("a", "b", "c", "d"):
        t.take(t.get(k, 0.0), 0.0)  # buckets not full: nothing is idle
    assert len(t) == 3
    assert "keep" in t.entries
    assert "d" in t.entries


def test_cap_may_be_exceeded_only_by_entries_with_connections() -> None:
    t = AddressTable(rate=1.0, burst=5.0, fail_limit=5, max_entries=2)
    for k in ("a", "b", "c"):
        t.get(k, 0.0).open = 1
    assert len(t) == 3  # nothing evictable: connections are never forgotten


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    assert retry_after(0.01) == {"Retry-After": "1"}
    assert retry_after(1.2) == {"Retry-After": "2"}
    assert retry_after(60.0) == {"Retry-After": "60"}


# --- one token bucket (issue 8, design): the entry's bucket is core.ratelimit.TokenBucket


def test_entry_bucket_is_the_core_token_bucket() -> None:
    t = AddressTable(rate=1.5, burst=4.0, fail_limit=5)
    e = t.get("a", 0.0)
    assert isinstance(e, TokenBucket)
    ref = TokenBucket(1.5, 4.0, 0.0)
    rng = random.Random(8)
    now = 0.0
    for _ in range(2000):
        now += rng.choice([0.0, 0.0, 0.1, 0.4, 1.0, 7.0])
        want = 0.0 if ref.take(now) else ref.retry_after()
        assert t.take(e, now) == want
        assert (e.tokens, e.last) == (ref.tokens, ref.last)
        assert t.idle(e, now + 0.5) == (ref.level(now + 0.5) >= ref.burst)


def test_level_refills_without_taking() -> None:
    b = TokenBucket(2.0, 3.0, 0.0)
    assert b.take(0.0) and b.take(0.0) and b.take(0.0)
    assert b.level(0.25) == 0.5
    assert b.level(100.0) == 3.0  # capped at burst
    assert (b.tokens, b.last) == (0.0, 0.0)  # nothing taken, clock not moved


def test_entry_memory_stays_small() -> None:
    """The bucket is the entry itself, not an object of its own (that would cost ~56 bytes
    more). Measured without the keys: ~186 bytes per entry here, ~211 at 100k entries (the
    figure in the module docstring; the OrderedDict's share depends on its fill)."""
    n = 20_000
    t = AddressTable(rate=1.0, burst=5.0, fail_limit=5, max_entries=n + 1)
    keys = [f"10.0.{i >> 8}.{i & 255}" for i in range(n)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k in keys:
            e = t.get(k, 0.0)
            t.take(e, 0.0)
            t.fail(e, 1.5)
        gc.collect()
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert len(t) == n
    assert per_entry < 225, per_entry
