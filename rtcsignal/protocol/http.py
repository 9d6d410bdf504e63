"""HTTP/1.1 request heads and responses, and the WebSocket opening handshake; pure functions.

The server answers one request per connection (``Connection: close``) unless it upgrades;
signaling clients open one long-lived WebSocket, so keep-alive buys nothing here.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

REASONS = {
    101: "Switching Protocols",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_VERSIONS = ("HTTP/1.0", "HTTP/1.1")
_VERSION_SYNTAX = re.compile(r"HTTP/[0-9]+(\.[0-9]+)?")  # well formed, maybe unsupported
# Control characters a request head must not carry: C0 except HTAB, and DEL. CR and LF only
# appear as the CRLF line ends the head is split on; a bare one inside a line is refused too.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HttpError(Exception):
    """A request we refuse; ``status`` and a short plain-text ``reason`` go back to the client."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


@dataclass(slots=True)
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)


def parse_request(head: bytes) -> Request:
    """Parse a request head (everything before the blank line). Raises HttpError: 400 for a
    malformed head (control characters, repeated or missing ``Host``, a repeated query
    parameter), 505 for an HTTP version other than 1.0 and 1.1."""
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    for line in lines:
        if _CONTROL.search(line):
            raise HttpError(400, "control character in request head")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise HttpError(400, "malformed request line") from None
    if version not in _VERSIONS:
        if _VERSION_SYNTAX.fullmatch(version):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise HttpError(400, "malformed HTTP version")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, "malformed header line")
        key = name.lower()
        value = value.strip()
        if key in headers:
            if key == "host":
                raise HttpError(400, "more than one Host header")
            headers[key] = f"{headers[key]}, {value}"
        else:
            headers[key] = value
    if "host" not in headers and version == "HTTP/1.1":
        raise HttpError(400, "missing Host header")
    try:
        parts = urlsplit(target)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        raise HttpError(400, "malformed request target") from None
    query = dict(pairs)
    if len(query) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                # One reading for everyone: a proxy in front may keep the other value.
                raise HttpError(400, f"duplicate query parameter {key}")
            seen.add(key)
    return Request(method, target, parts.path or "/", query, headers)


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",")}


def is_upgrade(req: Request) -> bool:
    return "websocket" in _tokens(req.header("upgrade")) and "upgrade" in _tokens(
        req.header("connection")
    )


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()


def check_websocket_request(req: Request) -> str:
    """Validate the upgrade request; return the Sec-WebSocket-Accept value."""
    if req.method != "GET":
        raise HttpError(405, "WebSocket upgrade needs GET", {"Allow": "GET"})
    if req.header("sec-websocket-version") != "13":
        raise HttpError(426, "unsupported WebSocket version", {"Sec-WebSocket-Version": "13"})
    key = req.header("sec-websocket-key")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise HttpError(400, "invalid Sec-WebSocket-Key") from None
    return accept_key(key)


def upgrade_response(accept: str) -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
    ).encode()


def response(
    status: int,
    body: bytes | str = b"",
    content_type: str = "text/plain; charset=utf-8",
    headers: dict[str, str] | None = None,
    *,
    head: bool = False,
) -> bytes:
    """A complete response. With ``head`` (the answer to a HEAD request) the headers are
    those GET would get, Content-Length included (RFC 9110 section 9.3.2), and no body."""
    if isinstance(body, str):
        body = body.encode()
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
    lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    lines.append("Cache-Control: no-store")
    lines.append("X-Content-Type-Options: nosniff")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return out if head else out + body
