"""Issue 2, points 8-9: HTTP endpoints on the WebSocket port, metrics that move, and logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from rtcsignal import logs
from tests.helpers import close_all, get, metrics, open_client, recv_json, send_json
from tests.rawws import HttpAnswer, RawWS, parse_head

# --- 8. HTTP -------------------------------------------------------------------------------


async def test_healthz(server):
    status, hdrs, body = await get(server, "/healthz")
    assert status == 200
    assert hdrs["content-type"].startswith("application/json")
    assert json.loads(body) == {"status": "ok"}


async def test_readyz_when_serving(server):
    status, _, body = await get(server, "/readyz")
    assert status == 200, body


async def test_test_page_is_served(server):
    status, hdrs, body = await get(server, "/test-signaling.html")
    assert status == 200
    assert hdrs["content-type"].startswith("text/html")
    page = body.decode()
    assert "<html" in page.lower() and "WebSocket" in page


@pytest.mark.parametrize("path", ["/", "/nope", "/signaling/extra", "/healthz/x",
                                  "/test-signaling.htm", "/metrics.txt", "/../etc/passwd"])
async def test_unknown_paths_are_404(server, path):
    status, _, _ = await get(server, path)
    assert status == 404


async def test_signaling_without_upgrade_is_426(server):
    status, hdrs, _ = await get(server, "/signaling")
    assert status == 426
    assert hdrs.get("upgrade", "").lower() == "websocket"
    # The same path still upgrades for a WebSocket client.
    ws, greeting = await open_client(server.url())
    assert greeting["clientsCount"] == 1
    await close_all([ws])


async def raw_http(server, request: bytes) -> HttpAnswer:
    """Send ``request`` as is; the answer with everything after its head as the body (the
    server closes after answering, so this also shows a HEAD answer carries no body)."""
    ws = await RawWS.connect(server.host, server.port)
    try:
        ws.send_raw(request)
        data = await ws.expect_eof()
    finally:
        ws.close()
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete HTTP answer: {data!r}"
    answer = parse_head(head)
    answer.body = body
    return answer


async def test_head_healthz_has_get_headers_and_no_body(server):
    status, get_hdrs, get_body = await get(server, "/healthz")
    assert status == 200
    answer = await raw_http(server, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 200
    assert answer.body == b""
    assert int(answer.headers["content-length"]) == len(get_body)  # what GET would send
    assert answer.headers["content-type"] == get_hdrs["content-type"]
    refused = await raw_http(server, b"HEAD /no-such-page HTTP/1.1\r\nHost: x\r\n\r\n")
    assert refused.status == 404 and refused.body == b"", refused  # errors too: no body
    assert int(refused.headers["content-length"]) > 0, refused.headers


@pytest.mark.parametrize("request_head,status", [
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nAccept: */*\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Probe: a\x00b\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Probe: \x1b[31mred\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pro\x7fbe: v\r\n\r\n", 400),
    (b"GET /health\x01z HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /healthz HTTP/1.2\r\nHost: x\r\n\r\n", 505),
    (b"GET /healthz HTTP/x\r\nHost: x\r\n\r\n", 400),
])
async def test_malformed_request_heads_are_refused(server, request_head, status):
    answer = await raw_http(server, request_head)
    assert answer.status == status, (request_head, answer)
    # The server is still fine, and HTTP/1.0 may leave Host out.
    assert (await raw_http(server, b"GET /healthz HTTP/1.0\r\n\r\n")).status == 200


async def test_two_host_headers_via_client_are_400(server):
    status, _, body = await get(server, "/healthz", headers={"Host": "other.example"})
    assert status == 400, body
    assert b"Host" in body


@pytest.mark.parametrize("query", ["room=a&room=b", "room=a&room=a", "token=t&room=a&token=u"])
async def test_duplicate_query_parameter_is_400_before_upgrade(server, query):
    ws = await RawWS.connect(server.host, server.port)
    try:
        answer = await ws.handshake(query)
    finally:
        ws.close()
    key = query.split("&")[-1].split("=")[0]
    assert answer.status == 400, answer
    assert answer.body == f"duplicate query parameter {key}\n".encode()
    # No one joined anything: a clean client still gets in alone.
    ws2, greeting = await open_client(server.url("room=a"))
    assert greeting["clientsCount"] == 1
    await close_all([ws2])


async def test_metrics_counters_move_with_traffic(server):
    before = await metrics(server)
    for name in ("rtcsignal_connections_open", "rtcsignal_connections_total",
                 "rtcsignal_bytes_received_total", "rtcsignal_bytes_sent_total"):
        assert name in before, sorted(before)
    assert before["rtcsignal_connections_open"] == 0

    (a, ga), (b, _), (c, _) = [await open_client(server.url()) for _ in range(3)]
    now = await metrics(server)
    assert now["rtcsignal_connections_open"] == 3
    assert now["rtcsignal_connections_total"] - before["rtcsignal_connections_total"] == 3

    for i in range(4):
        await send_json(a, {"type": "metric-probe", "n": i})
    for ws in (b, c):
        for _ in range(4):
            assert (await recv_json(ws))["type"] == "metric-probe"
    await send_json(b, {"type": "other-probe"})
    await recv_json(a)
    await recv_json(c)
    await a.send("not json")
    await a.send(b"binary")
    await send_json(a, {"type": "pong"})
    for code in ("invalid-json", "binary-not-supported", "reserved-type"):
        assert (await recv_json(a))["code"] == code

    after = await metrics(server)
    assert after['rtcsignal_messages_received_total{type="metric-probe"}'] == 4
    assert after['rtcsignal_messages_received_total{type="other-probe"}'] == 1
    assert after['rtcsignal_messages_relayed_total{type="metric-probe"}'] == 4
    assert after['rtcsignal_messages_relayed_total{type="other-probe"}'] == 1
    # Refused messages are not counted as relayed.
    assert 'rtcsignal_messages_relayed_total{type="pong"}' not in after
    for code in ("invalid-json", "binary-not-supported", "reserved-type"):
        assert after[f'rtcsignal_errors_total{{code="{code}"}}'] == 1, code
    assert after["rtcsignal_bytes_received_total"] > now["rtcsignal_bytes_received_total"]
    assert after["rtcsignal_bytes_sent_total"] > now["rtcsignal_bytes_sent_total"]
    # At least the 8 + 2 relayed copies and 3 errors went out, each over 20 bytes.
    assert after["rtcsignal_bytes_sent_total"] - now["rtcsignal_bytes_sent_total"] > 13 * 20

    await a.close()
    server.wait_for(lambda e: e.get("event") == "disconnect" and e.get("peer") == ga["peerId"])
    gone = await metrics(server)
    assert gone["rtcsignal_connections_open"] == 2
    assert gone["rtcsignal_connections_total"] == after["rtcsignal_connections_total"]
    await close_all([b, c])


async def test_documented_types_keep_their_metric_label_after_junk(run_server):
    server = run_server("--metrics-max-types", "2")
    (a, _), (b, _) = [await open_client(server.url()) for _ in range(2)]
    kinds = [f"junk-{i}" for i in range(5)] + ["offer", "answer", "ice-candidate"]
    for kind in kinds:
        await send_json(a, {"type": kind})
    for kind in kinds:
        assert (await recv_json(b))["type"] == kind
    after = await metrics(server)
    for table in ("received", "relayed"):
        name = f"rtcsignal_messages_{table}_total"
        for kind in ("offer", "answer", "ice-candidate"):
            assert after[f'{name}{{type="{kind}"}}'] == 1, (kind, after)
        assert after[f'{name}{{type="junk-0"}}'] == after[f'{name}{{type="junk-1"}}'] == 1
        assert after[f'{name}{{type="_other"}}'] == 3
        assert f'{name}{{type="junk-2"}}' not in after
    await close_all([a, b])


async def test_metrics_is_prometheus_text(server):
    status, _, body = await get(server, "/metrics")
    assert status == 200
    text = body.decode()
    declared = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            declared.add(name)
    for name in ("rtcsignal_connections_open", "rtcsignal_connections_total",
                 "rtcsignal_messages_received_total", "rtcsignal_messages_relayed_total",
                 "rtcsignal_errors_total"):
        assert name in declared, name


# --- 9. logs ---------------------------------------------------------------------------------


def _addr(entry):
    return entry.get("addr", entry.get("address"))


async def test_log_lines_for_connect_and_disconnect(server):
    (a, ga), (b, _) = [await open_client(server.url()) for _ in range(2)]
    connect = server.wait_for(lambda e: e.get("event") == "connect"
                              and e.get("peer") == ga["peerId"])
    assert _addr(connect) == "127.0.0.1"
    assert connect["level"] == "info" and "ts" in connect
    await a.close(code=1000)
    disconnect = server.wait_for(lambda e: e.get("event") == "disconnect"
                                 and e.get("peer") == ga["peerId"])
    assert disconnect["code"] == 1000
    assert _addr(disconnect) == "127.0.0.1"
    assert isinstance(disconnect["duration_s"], int | float) and disconnect["duration_s"] >= 0
    await close_all([b])


async def test_log_line_per_error_with_code_and_address(server):
    ws, greeting = await open_client(server.url())
    await ws.send("not json")
    assert (await recv_json(ws))["code"] == "invalid-json"
    await ws.send(b"bin")
    assert (await recv_json(ws))["code"] == "binary-not-supported"
    for code in ("invalid-json", "binary-not-supported"):
        line = server.wait_for(lambda e, code=code: e.get("code") == code, timeout=2)
        assert _addr(line) == "127.0.0.1", line
        assert line.get("peer") in (None, greeting["peerId"]), line
    await close_all([ws])


async def test_debug_log_lines_for_message_received_and_relayed(server):
    (a, ga), (b, _) = [await open_client(server.url()) for _ in range(2)]
    await send_json(a, {"type": "log-probe"})
    assert (await recv_json(b))["type"] == "log-probe"
    debug = lambda e: e.get("level") == "debug" and _addr(e) == "127.0.0.1"  # noqa: E731
    # Received (names the sender) and relayed (names the type), each with the address.
    server.wait_for(lambda e: debug(e) and e.get("peer") == ga["peerId"], timeout=2)
    server.wait_for(lambda e: debug(e) and "log-probe" in json.dumps(e), timeout=2)
    await close_all([a, b])


async def test_disconnect_line_records_client_close_code(server):
    ws, greeting = await open_client(server.url())
    await ws.close(code=4001, reason="bye")
    line = server.wait_for(lambda e: e.get("event") == "disconnect"
                           and e.get("peer") == greeting["peerId"])
    assert line["code"] == 4001


async def test_text_log_escapes_client_chosen_type(make_service):
    """The text format (what a terminal shows) over a real socket: a message ``type`` with a
    newline and ANSI escapes, logged by the debug "relayed" line, stays on one line with its
    control characters escaped. In process (``make_service``) because the subprocess fixture
    reads JSON logs only."""
    logger = logging.getLogger("rtcsignal")
    saved = logger.handlers[:], logger.level, logger.propagate
    out = io.StringIO()
    logs.configure("debug", "text", out)
    try:
        svc = await make_service()
        url = f"ws://127.0.0.1:{svc.port}/signaling"
        (a, ga), (b, _) = [await open_client(url) for _ in range(2)]
        forged = "probe\n12:00:00 info    connect peer=forged\x1b[2J\x1b[31m"
        await send_json(a, {"type": forged})
        assert (await recv_json(b))["type"] == forged
        await close_all([a, b])
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    text = out.getvalue()
    assert "\x1b" not in text
    relayed = [line for line in text.splitlines() if " relayed " in line]
    assert len(relayed) == 1, text
    assert f"peer={ga['peerId']} " in relayed[0]
    assert ' type="probe\\n12:00:00 info    connect peer=forged\\x1b[2J\\x1b[31m" ' in relayed[0]
    assert not [line for line in text.splitlines() if "peer=forged" in line
                and " relayed " not in line], text


async def test_no_debug_lines_at_info_level(run_server):
    server = run_server("--log-level", "info")
    (a, ga), (b, _) = [await open_client(server.url()) for _ in range(2)]
    await send_json(a, {"type": "quiet"})
    assert (await recv_json(b))["type"] == "quiet"
    await a.close()
    server.wait_for(lambda e: e.get("event") == "disconnect" and e.get("peer") == ga["peerId"])
    assert [e for e in server.lines if e.get("level") == "debug"] == []
    assert any(e.get("event") == "connect" for e in server.lines)
    await close_all([b])


async def test_many_http_requests_do_not_leak_or_break_websocket(server):
    results = await asyncio.gather(*(get(server, "/healthz") for _ in range(50)))
    assert [s for s, _, _ in results] == [200] * 50
    ws, greeting = await open_client(server.url())
    assert greeting["clientsCount"] == 1
    await close_all([ws])
