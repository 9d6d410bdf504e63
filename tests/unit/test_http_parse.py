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
    assert parse_request(head("GET ?a=1 HTTP/1.1", "Host: x")).path == "/"


@pytest.mark.parametrize("line", [
    "GET /", "GET / HTTP/1.1 extra", "", "GET  / HTTP/1.1", "GET / SPDY/3", "GET / HTTP/x",
    "GET / FOO", "GET / http/1.1", "GET / HTTP/1.1.1",
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
    req = parse_request(b"GET /\xff HTTP/1.1\r\nHost: x\r\nX: \xe9")
    assert req.path == "/\xff" and req.header("x") == "\xe9"


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/1.2", "HTTP/0.9", "HTTP/3", "HTTP/10.0"])
def test_parse_request_other_http_versions_are_505(version: str) -> None:
    with pytest.raises(HttpError) as info:
        parse_request(head(f"GET / {version}", "Host: x"))
    assert info.value.status == 505
    assert response(505).startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")


@pytest.mark.parametrize("lines", [
    ("GET / HTTP/1.1", "Host: x", "Host: x"),
    ("GET / HTTP/1.1", "Host: a", "host: b"),
    ("GET / HTTP/1.0", "HOST: a", "X: y", "Host: a"),
])
def test_parse_request_two_host_headers_are_400(lines: tuple[str, ...]) -> None:
    with pytest.raises(HttpError) as info:
        parse_request(head(*lines))
    assert info.value.status == 400
    assert "Host" in info.value.reason


def test_parse_request_http11_needs_host_http10_does_not() -> None:
    with pytest.raises(HttpError) as info:
        parse_request(head("GET /healthz HTTP/1.1", "Accept: */*"))
    assert info.value.status == 400 and "Host" in info.value.reason
    assert parse_request(head("GET /healthz HTTP/1.0", "Accept: */*")).path == "/healthz"
    assert parse_request(head("GET /healthz HTTP/1.1", "Host:")).header("host") == ""


CONTROLS = [chr(c) for c in [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F]]


@pytest.mark.parametrize("ctl", CONTROLS, ids=lambda c: f"0x{ord(c):02x}")
@pytest.mark.parametrize("where", ["name", "value", "target", "method", "version"])
def test_parse_request_control_bytes_are_400(ctl: str, where: str) -> None:
    method, target, version, name, value = "GET", "/signaling", "HTTP/1.1", "X-Probe", "v"
    if where == "name":
        name = f"X-{ctl}Probe"
    elif where == "value":
        value = f"a{ctl}b"
    elif where == "target":
        target = f"/sig{ctl}naling"
    elif where == "method":
        method = f"G{ctl}ET"
    else:
        version = f"HTTP/1.1{ctl}"
    raw = head(f"{method} {target} {version}", "Host: x", f"{name}: {value}")
    with pytest.raises(HttpError) as info:
        parse_request(raw)
    assert info.value.status == 400


def test_parse_request_tab_in_header_value_is_allowed() -> None:
    assert parse_request(head("GET / HTTP/1.1", "Host: x", "X: a\tb")).header("x") == "a\tb"


@pytest.mark.parametrize("query,key", [
    ("room=a&room=b", "room"),
    ("room=a&room=a", "room"),
    ("token=t1&room=r&token=t2", "token"),
    ("x&x", "x"),
    ("room=a&ro%6Fm=b", "room"),  # the same key once decoded
])
def test_parse_request_duplicate_query_parameter_is_400(query: str, key: str) -> None:
    with pytest.raises(HttpError) as info:
        parse_request(head(f"GET /signaling?{query} HTTP/1.1", "Host: x"))
    assert info.value.status == 400
    assert info.value.reason == f"duplicate query parameter {key}"


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


@pytest.mark.parametrize("body", [b'{"status":"ok"}', "ok ✓\n", b""])
def test_head_response_has_get_headers_and_no_body(body: str | bytes) -> None:
    get_answer = response(200, body, "application/json", {"X-A": "1"})
    head_answer = response(200, body, "application/json", {"X-A": "1"}, head=True)
    get_head, _, _ = get_answer.partition(b"\r\n\r\n")
    assert head_answer == get_head + b"\r\n\r\n"  # same headers, Content-Length included
    want = len(body.encode() if isinstance(body, str) else body)
    assert f"\r\nContent-Length: {want}\r\n".encode() in head_answer
