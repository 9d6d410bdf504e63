"""Counters for ``GET /metrics`` (Prometheus text format 0.0.4), plain ints on the hot path.

The hot path only adds to integers and dicts; everything else (histograms of room sizes, the
send buffers, the broker's figures) is read when ``/metrics`` is scraped. ``families()`` is
the page as data (so the workers of one machine can be merged into one page,
``server/scrape.py``); ``render()`` is the text.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

OTHER_TYPE = "_other"

#: One sample: (metric name with its suffix, labels, value); one family: (name, type, help,
#: samples). Counters are named with their ``_total``, as they appear on the page.
Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, Labels, float]
Family = tuple[str, str, str, list[Sample]]

#: Relay latency, read -> write, in seconds: 50 us .. 1 s.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0)
#: Broker round trips (a pipeline of queued commands to Redis and back), in seconds.
BROKER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5)
#: Peers per room.
ROOM_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 16, 32, 64, 128, 256, 1024)
#: The relay latency is measured on one read in READ_SAMPLE (a power of two): the other
#: reads pay one integer increment and one bit test. docs/benchmarks.md has its cost.
READ_SAMPLE = 32
READ_SAMPLE_MASK = READ_SAMPLE - 1
#: Distinct (status, reason) pairs of refusals with a label of their own; the rest count
#: under reason ``_other`` (a reason can carry client text: a query parameter's name).
MAX_REJECT_REASONS = 64


class Histogram:
    """Counts per bucket (``le`` upper bounds, then +Inf), their sum and count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    @classmethod
    def of(cls, values: Iterable[float], bounds: Sequence[float]) -> Histogram:
        h = cls(bounds)
        for v in values:
            h.observe(v)
        return h

    def samples(self, name: str, labels: Labels = ()) -> list[Sample]:
        out: list[Sample] = []
        total = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            out.append((f"{name}_bucket", (*labels, ("le", _number(float(bound)))), total))
        out.append((f"{name}_sum", labels, self.sum))
        out.append((f"{name}_count", labels, self.count))
        return out

#: The message types docs/protocol.md defines: relayed (offer, answer, ice-candidate), the
#: commands, and the server-only types (counted as received when a client sends one and is
#: refused with ``reserved-type``). They always get a label of their own.
DOCUMENTED_TYPES = frozenset({
    "offer", "answer", "ice-candidate",
    "join", "leave", "ping",
    "connected", "error", "joined", "left", "peer-joined", "peer-left", "pong",
})


class Metrics:
    """Message types are client-chosen, so besides the ``always_labelled`` ones (the
    documented types) only the first ``max_types`` distinct types get a label of their own;
    the rest count as ``_other`` (bounded memory and scrape size). The documented types never
    count against ``max_types``: junk types sent first cannot push ``offer`` into ``_other``."""

    __slots__ = (
        "_received_extra",
        "_relayed_extra",
        "always_labelled",
        "auth_failures",
        "bytes_in",
        "bytes_out",
        "closes",
        "connections_total",
        "counters",
        "deliveries",
        "disconnects",
        "errors",
        "gauges",
        "heartbeat_timeouts",
        "histograms",
        "max_types",
        "rate_limited",
        "reads",
        "received",
        "rejected",
        "relay_latency",
        "relayed",
        "reloads",
        "resume_expired",
        "resumes",
        "stamp",
    )

    def __init__(self, max_types: int = 64,
                 always_labelled: Iterable[str] = DOCUMENTED_TYPES) -> None:
        self.max_types = max_types
        self.always_labelled = frozenset(always_labelled)
        self._received_extra = 0  # labelled types in ``received`` not in always_labelled
        self._relayed_extra = 0
        self.connections_total = 0
        self.disconnects: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.relayed: dict[str, int] = {}
        self.deliveries = 0
        self.errors: dict[str, int] = {}
        self.rejected: dict[tuple[int, str], int] = {}  # (status, reason) -> refusals
        self.closes: dict[str, int] = {}  # close code (3xxx/4xxx grouped) -> sessions
        self.rate_limited = 0  # messages and frames refused by a connection's rate limit
        self.auth_failures: dict[str, int] = {}  # the Admission's, shared by the service
        self.relay_latency = Histogram(LATENCY_BUCKETS)
        self.reads = 0  # WebSocket reads; one in READ_SAMPLE is timed
        self.stamp = 0.0  # perf_counter of a sampled read whose writes are pending
        self.bytes_in = 0
        self.bytes_out = 0
        self.heartbeat_timeouts = 0
        self.resumes: dict[str, int] = {}  # outcome -> count (resumed, fresh, taken)
        self.resume_expired = 0  # senders told `expired` (window over or mailbox full)
        self.reloads = {"applied": 0, "failed": 0}  # SIGHUP reloads of the settings
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}
        self.histograms: dict[str, tuple[str, Callable[[], Histogram]]] = {}

    def count_received(self, kind: str) -> None:
        table = self.received
        if kind not in table and kind not in self.always_labelled:
            if self._received_extra < self.max_types:
                self._received_extra += 1
            else:
                kind = OTHER_TYPE
        table[kind] = table.get(kind, 0) + 1

    def count_relayed(self, kind: str, deliveries: int) -> None:
        table = self.relayed
        if kind not in table and kind not in self.always_labelled:
            if self._relayed_extra < self.max_types:
                self._relayed_extra += 1
            else:
                kind = OTHER_TYPE
        table[kind] = table.get(kind, 0) + 1
        self.deliveries += deliveries

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def count_rejected(self, status: int, reason: str = "") -> None:
        if reason.startswith("duplicate query parameter"):
            reason = "duplicate query parameter"  # the rest is the client's parameter name
        key = (status, reason)
        if key not in self.rejected and len(self.rejected) >= MAX_REJECT_REASONS:
            key = (status, OTHER_TYPE)
        self.rejected[key] = self.rejected.get(key, 0) + 1

    def count_close(self, code: int) -> None:
        """A session's close code; a client's own 3000-4999 codes count as ``3xxx``/``4xxx``
        (bounded labels), but for the server's 4409."""
        key = str(code) if code < 3000 or code == 4409 else f"{code // 1000}xxx"
        self.closes[key] = self.closes.get(key, 0) + 1

    def count_disconnect(self, reason: str) -> None:
        self.disconnects[reason] = self.disconnects.get(reason, 0) + 1

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def counter(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A counter kept elsewhere (the broker's), read at scrape time."""
        self.counters[name] = (help_text, read)

    def histogram(self, name: str, help_text: str, read: Callable[[], Histogram]) -> None:
        """A histogram kept elsewhere or computed at scrape time."""
        self.histograms[name] = (help_text, read)

    def render(self) -> str:
        return render(self.families())

    def families(self) -> list[Family]:
        out: list[Family] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[Labels, float]],
                   ) -> None:
            out.append((name, kind, help_text, [(name, labels, v) for labels, v in samples]))

        def by(label: str, table: dict, second: str = "") -> list[tuple[Labels, float]]:
            """Samples labelled by ``table``'s keys (pairs with ``second``)."""
            if second:
                return [(((label, str(k[0])), (second, str(k[1]))), v)
                        for k, v in sorted(table.items())]
            return [(((label, str(k)),), v) for k, v in sorted(table.items())]

        for name, (help_text, read) in sorted(self.gauges.items()):
            metric(name, "gauge", help_text, [((), read())])
        for name, (help_text, read) in sorted(self.counters.items()):
            metric(name, "counter", help_text, [((), read())])
        metric("rtcsignal_connections_total", "counter", "WebSocket connections accepted",
               [((), self.connections_total)])
        metric("rtcsignal_disconnects_total", "counter", "Closed connections by reason",
               by("reason", self.disconnects))
        metric("rtcsignal_close_codes_total", "counter",
               "Closed WebSocket sessions by close code (1006: no close frame)",
               by("code", self.closes))
        metric("rtcsignal_rejected_total", "counter", "HTTP requests refused before upgrade",
               by("status", self.rejected, "reason"))
        metric("rtcsignal_messages_received_total", "counter", "Client messages by type",
               by("type", self.received))
        metric("rtcsignal_messages_relayed_total", "counter", "Messages relayed by type",
               by("type", self.relayed))
        metric("rtcsignal_deliveries_total", "counter", "Relayed copies written to receivers",
               [((), self.deliveries)])
        metric("rtcsignal_errors_total", "counter", "Error messages sent by code",
               by("code", self.errors))
        metric("rtcsignal_rate_limited_total", "counter",
               "Messages, pings, pongs and fragments refused by a connection's rate limit",
               [((), self.rate_limited)])
        metric("rtcsignal_auth_failures_total", "counter",
               "Failed credentials: a JWT, a resume token, the admin API's token",
               by("kind", self.auth_failures))
        metric("rtcsignal_heartbeat_timeouts_total", "counter",
               "Connections dropped for a missed ping", [((), self.heartbeat_timeouts)])
        metric("rtcsignal_resumes_total", "counter",
               "Reconnects with ?resume=: resumed, or a fresh session (token unknown)",
               by("outcome", self.resumes))
        metric("rtcsignal_resume_expired_total", "counter",
               "Messages a dropped peer never got; their senders were told expired",
               [((), self.resume_expired)])
        metric("rtcsignal_config_reloads_total", "counter",
               "Settings reloads (SIGHUP): applied, or failed and the old settings kept",
               by("outcome", self.reloads))
        metric("rtcsignal_bytes_received_total", "counter", "WebSocket bytes read",
               [((), self.bytes_in)])
        metric("rtcsignal_bytes_sent_total", "counter", "WebSocket bytes written",
               [((), self.bytes_out)])
        out.append(("rtcsignal_relay_latency_seconds", "histogram",
                    f"From a WebSocket read to the write of what it produced (1 read in "
                    f"{READ_SAMPLE} sampled)", self.relay_latency.samples(
                        "rtcsignal_relay_latency_seconds")))
        for name, (help_text, read) in sorted(self.histograms.items()):
            out.append((name, "histogram", help_text, read().samples(name)))
        return out


def render(families: Iterable[Family]) -> str:
    """Prometheus text format 0.0.4."""
    out: list[str] = []
    for name, kind, help_text, samples in families:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for sample, labels, value in samples:
            if labels:
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                out.append(f"{sample}{{{text}}} {_number(value)}")
            else:
                out.append(f"{sample} {_number(value)}")
    return "\n".join(out) + "\n"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
