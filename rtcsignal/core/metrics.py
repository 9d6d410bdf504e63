"""Counters for ``GET /metrics`` (Prometheus text format 0.0.4), plain ints on the hot path."""

from __future__ import annotations

from collections.abc import Callable, Iterable

OTHER_TYPE = "_other"

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
        self.rejected: dict[int, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.heartbeat_timeouts = 0
        self.resumes: dict[str, int] = {}  # outcome -> count (resumed, fresh, taken)
        self.resume_expired = 0  # senders told `expired` (window over or mailbox full)
        self.reloads = {"applied": 0, "failed": 0}  # SIGHUP reloads of the settings
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.counters: dict[str, tuple[str, Callable[[], float]]] = {}

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

    def count_rejected(self, status: int) -> None:
        self.rejected[status] = self.rejected.get(status, 0) + 1

    def count_disconnect(self, reason: str) -> None:
        self.disconnects[reason] = self.disconnects.get(reason, 0) + 1

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def counter(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A counter kept elsewhere (the broker's), read at scrape time."""
        self.counters[name] = (help_text, read)

    def render(self) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{labels} {value:g}" if isinstance(value, float) else
                           f"{name}{labels} {value}")

        def by(label: str, table: dict) -> list[tuple[str, float]]:
            return [(f'{{{label}="{_escape(str(k))}"}}', v) for k, v in sorted(table.items())]

        for name, (help_text, read) in sorted(self.gauges.items()):
            metric(name, "gauge", help_text, [("", read())])
        for name, (help_text, read) in sorted(self.counters.items()):
            metric(name, "counter", help_text, [("", read())])
        metric("rtcsignal_connections_total", "counter", "WebSocket connections accepted",
               [("", self.connections_total)])
        metric("rtcsignal_disconnects_total", "counter", "Closed connections by reason",
               by("reason", self.disconnects))
        metric("rtcsignal_rejected_total", "counter", "HTTP requests refused before upgrade",
               by("status", self.rejected))
        metric("rtcsignal_messages_received_total", "counter", "Client messages by type",
               by("type", self.received))
        metric("rtcsignal_messages_relayed_total", "counter", "Messages relayed by type",
               by("type", self.relayed))
        metric("rtcsignal_deliveries_total", "counter", "Relayed copies written to receivers",
               [("", self.deliveries)])
        metric("rtcsignal_errors_total", "counter", "Error messages sent by code",
               by("code", self.errors))
        metric("rtcsignal_heartbeat_timeouts_total", "counter",
               "Connections dropped for a missed ping", [("", self.heartbeat_timeouts)])
        metric("rtcsignal_resumes_total", "counter",
               "Reconnects with ?resume=: resumed, or a fresh session (token unknown)",
               by("outcome", self.resumes))
        metric("rtcsignal_resume_expired_total", "counter",
               "Messages a dropped peer never got; their senders were told expired",
               [("", self.resume_expired)])
        metric("rtcsignal_config_reloads_total", "counter",
               "Settings reloads (SIGHUP): applied, or failed and the old settings kept",
               by("outcome", self.reloads))
        metric("rtcsignal_bytes_received_total", "counter", "WebSocket bytes read",
               [("", self.bytes_in)])
        metric("rtcsignal_bytes_sent_total", "counter", "WebSocket bytes written",
               [("", self.bytes_out)])
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
