"""HTTP request heads and the WebSocket opening handshake (pure functions)."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest

from rtcsignal.protocol.http import (
    HttpError,
    accept_key,
    check_websocket_request,
    is_upgrade,
    parse_request,
    response,
    upgrade_response,
)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def head(*lines: str) -> bytes:
    return "\r\n".join(lines).encode("latin-1")


def ws_head(key: str | None = None, method: str = "GET", version: str = "13",
            extra: tuple[str, ...] = ()) -> bytes:
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    return head(f"{method} /signaling?room=a HTTP/1.1", "Host: x", "Upgrade: websocket",
                "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                f"Sec-WebSocket-Version: {version}", *extra)


def status_of(exc: pytest.ExceptionInfo[HttpError]) -> int:
    return exc.value.status


# --- parse_request ------------------------------------------------------------------------


def test_parse_request_fields() -> None:
    req = parse_request(head(
        "GET /signaling?room=r%201&token=a+b&empty= HTTP/1.1",
        "Host: example.com:8080",
        "X-Custom:   spaced value  ",
        "Accept: a",
        "ACCEPT: b",
    ))
    assert req.method == "GET"
    assert req.target == "/signaling?room=r%201&token=a+b&empty="
    assert req.path == "/signaling"
    assert req.query == {"room": "r 1", "token": "a b", "empty": ""}
    assert req.header("host") == "example.com:8080"
    assert req.header("x-custom") == "spaced value"
    assert req.header("accept") == "a, b"  # repeated headers are combined
    assert req.header("missing", "dflt") == "dflt"
    assert set(req.headers) == {"host", "x-custom", "accept"}


def test_parse_request_http10_and_no_query() -> None:
    req = parse_request(head("POST /x HTTP/1.0"))
    assert (req.method, req.path, req.query, req.headers) == ("POST", "/x", {}, {})
    assert parse_request(head("GET ?a=1 HTTP/1.1")).path == "/"


@pytest.mark.parametrize("line", [
    "GET /", "GET / HTTP/1.1 extra", "", "GET  / HTTP/1.1", "GET / HTTP/2.0", "GET / SPDY/3",
])
def test_parse_request_bad_request_line(line: str) -> None:
    with pytest.raises(HttpError) as info:
        parse_request(head(line, "Host: x"))
    assert info.value.status == 400


@pytest.mark.parametrize("bad", ["no colon here", ": empty name", "Host : space before colon",
                                 " Host: leading space"])
def test_parse_request_bad_header_line(bad: str) -> None:
    with pytest.raises(HttpError) as info:
        parse_request(head("GET / HTTP/1.1", "Host: x", bad))
    assert info.value.status == 400


def test_parse_request_non_ascii_bytes_do_not_crash() -> None:
    req = parse_request(b"GET /\xff HTTP/1.1\r\nX: \xe9")
    assert req.path == "/\xff" and req.header("x") == "\xe9"


# --- upgrade checks ----------------------------------------------------------------------


@pytest.mark.parametrize("upgrade,connection,ok", [
    ("websocket", "Upgrade", True),
    ("WebSocket", "keep-alive, Upgrade", True),
    ("websocket, h2c", "upgrade,keep-alive", True),
    ("h2c", "Upgrade", False),
    ("websocket", "keep-alive", False),
    (None, "Upgrade", False),
    ("websocket", None, False),
])
def test_is_upgrade(upgrade: str | None, connection: str | None, ok: bool) -> None:
    lines = ["GET /signaling HTTP/1.1", "Host: x"]
    if upgrade is not None:
        lines.append(f"Upgrade: {upgrade}")
    if connection is not None:
        lines.append(f"Connection: {connection}")
    assert is_upgrade(parse_request(head(*lines))) is ok


def test_accept_key_rfc6455_example() -> None:
    # The worked example of RFC 6455 section 1.3.
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_check_websocket_request_returns_accept() -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    want = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
    assert check_websocket_request(parse_request(ws_head(key))) == want
    resp = upgrade_response(want).decode()
    assert resp.startswith("HTTP/1.1 101 ")
    assert f"\r\nSec-WebSocket-Accept: {want}\r\n" in resp
    assert resp.endswith("\r\n\r\n")


@pytest.mark.parametrize("method", ["POST", "HEAD", "get"])
def test_upgrade_needs_get(method: str) -> None:
    with pytest.raises(HttpError) as info:
        check_websocket_request(parse_request(ws_head(method=method)))
    assert info.value.status == 405
    assert info.value.headers.get("Allow") == "GET"


@pytest.mark.parametrize("version", ["8", "12", "14", ""])
def test_upgrade_needs_version_13(version: str) -> None:
    with pytest.raises(HttpError) as info:
        check_websocket_request(parse_request(ws_head(version=version)))
    assert info.value.status == 426
    assert info.value.headers.get("Sec-WebSocket-Version") == "13"


@pytest.mark.parametrize("key", [
    "",
    "not base64!!",
    base64.b64encode(os.urandom(15)).decode(),
    base64.b64encode(os.urandom(17)).decode(),
    base64.b64encode(os.urandom(16)).decode()[:-2],  # padding removed
    "dGhlIHNhbXBsZSBub25jZQ==dGhl",
])
def test_bad_websocket_keys_are_400(key: str) -> None:
    with pytest.raises(HttpError) as info:
        check_websocket_request(parse_request(ws_head(key)))
    assert info.value.status == 400


def test_missing_key_is_400() -> None:
    lines = ws_head().decode().split("\r\n")
    no_key = [line for line in lines if not line.startswith("Sec-WebSocket-Key")]
    with pytest.raises(HttpError) as info:
        check_websocket_request(parse_request("\r\n".join(no_key).encode()))
    assert info.value.status == 400


# --- responses ---------------------------------------------------------------------------


@pytest.mark.parametrize("status,body", [(200, "ok ✓\n"), (400, b"bad"), (429, ""),
                                         (503, "full")])
def test_response_framing(status: int, body: str | bytes) -> None:
    raw = response(status, body, headers={"Retry-After": "7"})
    head_part, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} ")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    want = body.encode() if isinstance(body, str) else body
    assert payload == want
    assert int(fields["content-length"]) == len(want)
    assert fields["connection"] == "close"
    assert fields["retry-after"] == "7"
    assert fields["x-content-type-options"] == "nosniff"
