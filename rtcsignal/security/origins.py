"""Browser Origin allow-list.

Browsers send ``Origin`` on every WebSocket handshake and scripts cannot forge it, so it is
what stops a page on some other site from opening a socket with the visitor's cookies or
network position (cross-site WebSocket hijacking). Non-browser clients may omit it.

Patterns: ``*`` (any), an exact origin ``https://app.example.com[:port]``, or a subdomain
wildcard ``https://*.example.com[:port]`` which matches any strictly deeper host with the same
scheme and port, never ``example.com`` itself nor ``example.com.evil.com``.
"""

from __future__ import annotations

from dataclasses import dataclass

from rtcsignal.config import ConfigError

_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_[]:")


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str  # lower-case; IPv6 keeps its brackets
    port: str  # "" when it is the scheme's default


def parse_origin(text: str) -> Origin | None:
    """Parse ``scheme://host[:port]`` (the whole of an Origin header); None if it is not one."""
    scheme, sep, rest = text.strip().lower().partition("://")
    if not sep or not scheme.isascii() or not scheme.isalpha() or not rest:
        return None
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            return None
        host, tail = rest[: end + 1], rest[end + 1 :]
        if tail and not tail.startswith(":"):
            return None
        port = tail[1:]
    else:
        host, _, port = rest.partition(":")
    if not host or not set(host) <= _HOST_CHARS or (port and not port.isdigit()):
        return None
    if port and (not port.isascii() or int(port) > 65535):
        return None
    if port == _DEFAULT_PORTS.get(scheme):
        port = ""
    return Origin(scheme, host, port)


class OriginPolicy:
    """Compiled ``allowed_origins``; ``allows(header)`` is what the handshake asks."""

    def __init__(self, patterns: tuple[str, ...], require_origin: bool = False) -> None:
        self.require_origin = require_origin
        self.any = not patterns or "*" in patterns
        self.exact: set[Origin] = set()
        self.wild: list[Origin] = []  # host holds the suffix, starting with "."
        for p in patterns:
            if p == "*":
                continue
            wildcard = "://*." in p
            o = parse_origin(p.replace("://*.", "://", 1) if wildcard else p)
            if o is None:
                raise ConfigError(
                    f"allowed_origins: {p!r} is not an origin; use *, "
                    "https://app.example.com or https://*.example.com"
                )
            if wildcard:
                self.wild.append(Origin(o.scheme, "." + o.host, o.port))
            else:
                self.exact.add(o)

    def allows(self, header: str | None) -> bool:
        """Whether a request carrying this Origin header (None = absent) may connect."""
        if header is None or header == "":
            return not self.require_origin
        if self.any:
            return True
        o = parse_origin(header)
        if o is None:
            return False
        if o in self.exact:
            return True
        return any(
            o.scheme == w.scheme
            and o.port == w.port
            and o.host.endswith(w.host)
            and len(o.host) > len(w.host)
            and not o.host.startswith(".")
            for w in self.wild
        )
