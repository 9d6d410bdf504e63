"""SIGHUP: read the settings again and apply them to the running server, dropping nothing.

What a reload changes: the allowed origins, the limits, the JWT keys (and audience, issuer,
auth mode), the admin token, the log level, TURN/STUN, timeouts and the resume settings:
everything except the settings in ``RESTART_ONLY``, which decide what the process listens
on or talks to (a change to one of them is logged as needing a restart and not applied).
The new settings are read exactly as at start (flags > environment > file > default: the
flags and environment of the start, the file as it is now). If the file is unreadable or a
setting is bad, nothing changes and one line says why (``reload failed``, with the same
text ``rtcsignal config check`` prints).

Open connections stay: they are not re-admitted (an origin no longer allowed keeps its
open connections, and is refused from the next connection on). Limits that live per
connection take effect on open connections too: the message and byte rates, the message
size and the send buffer; room limits apply from the next join.

The log file (``--log-file``) is reopened first, so the reload's own line is in the new
file: ``logrotate`` moves the file, sends SIGHUP, and nothing is lost or written to the
moved file afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from rtcsignal import logs
from rtcsignal.config import SETTINGS, Config, ConfigError

log = logging.getLogger("rtcsignal")

#: Settings a reload does not change: the listening socket, the process model, the
#: broker connection, TLS, and where and how logs are written.
RESTART_ONLY = frozenset({
    "host", "port", "path", "workers", "broker", "broker_prefix", "presence_ttl",
    "certfile", "keyfile", "log_format", "log_file",
})


def apply(service: Any, new: Config) -> list[str]:
    """Make ``new`` the service's settings (those outside RESTART_ONLY); returns the names
    of the settings that changed and were applied. Raises ConfigError, with nothing
    changed, if the new origins, keys or admin token cannot be used."""
    old: Config = service.config
    kept = {name: getattr(old, name) for name in RESTART_ONLY}
    merged = new.replace(**kept)  # validated again (ConfigError)
    service.admission.reconfigure(merged)  # builds everything first: may raise, then commits
    service.config = merged
    hub = service.hub
    hub.max_rooms_per_peer = merged.max_rooms_per_peer
    hub.max_peers_per_room = merged.max_peers_per_room
    hub.max_meta_size = merged.max_meta_size
    service.metrics.max_types = merged.metrics_max_types
    if service.broker is not None:
        service.broker.max_peers_per_room = merged.max_peers_per_room
        service.broker.resume_window = merged.resume_window
    logs.set_level(merged.log_level)
    hub.debug = log.isEnabledFor(logging.DEBUG)
    for conn in list(service.connections):
        peer = conn.context
        if conn.session is not None:
            conn.session.max_size = merged.max_message_size
        if peer is not None:
            budget = peer.bucket
            budget.rate, budget.burst = merged.rate_limit, merged.rate_burst
            budget.byte_rate = merged.rate_limit_bytes
            budget.byte_burst = merged.rate_burst_bytes
        transport = conn.transport
        if transport is not None and not transport.is_closing():
            transport.set_write_buffer_limits(high=merged.max_send_buffer)
    return [s.name for s in SETTINGS
            if s.name not in RESTART_ONLY and getattr(old, s.name) != getattr(merged, s.name)]


def reload(service: Any, load: Callable[[], Config]) -> bool:
    """Reopen the log file, read the settings with ``load`` and apply them; one log line
    either way (``reloaded`` or ``reload failed``). Returns whether they were applied."""
    try:
        logs.reopen()
    except ConfigError as exc:  # the old file is kept; the settings may still reload
        log.error("log file not reopened", extra={"fields": {"reason": str(exc)}})
    old: Config = service.config
    try:
        new = load()
        changed = apply(service, new)
    except ConfigError as exc:
        service.metrics.reloads["failed"] += 1
        log.error("reload failed", extra={"fields": {
            "reason": str(exc), "kept": "the settings in use"}})
        return False
    service.metrics.reloads["applied"] += 1
    restart = sorted(name for name in RESTART_ONLY
                     if getattr(old, name) != getattr(new, name))
    fields: dict[str, Any] = {"changed": changed}
    if restart:
        fields["needs_restart"] = restart
    log.info("reloaded", extra={"fields": fields})
    return True
