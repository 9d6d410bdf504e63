"""Issue 12: the admin API (``--admin-token``): absent -> 404; with it, a bearer token compared
in constant time, refused attempts throttled like failed tokens; stats, room members,
closing a room, disconnecting a peer, on one instance and across two sharing Redis."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.helpers import close_all, http_request, open_client, recv_json, send_json

TOKEN = "admin-" + "k" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def admin(where: Any, path: str, method: str = "GET", token: str | None = TOKEN,
                ) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    status, hdrs, body = await http_request(where.host, where.port, path, method=method,
                                            headers=headers)
    if hdrs.get("content-type") == "application/json":
        return status, json.loads(body)
    return status, body.decode()


async def member(url: str, meta: dict[str, Any] | None = None) -> tuple[Any, str]:
    """A client in room ``demo`` (joined with ``meta``), once its join is done."""
    ws, greeting = await open_client(url)
    await send_json(ws, {"type": "join", "room": "demo", "meta": meta or {}})
    while (await recv_json(ws))["type"] != "joined":
        pass
    return ws, greeting["peerId"]


async def closed_with(ws: Any) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.protocol.close_rcvd is not None
    return ws.protocol.close_rcvd.code, ws.protocol.close_rcvd.reason


async def next_of(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        msg = await recv_json(ws)
        if msg["type"] == kind:
            return msg


PATHS = [("GET", "/admin/stats"), ("GET", "/admin/rooms/demo"),
         ("POST", "/admin/rooms/demo/close"), ("POST", "/admin/peers/abc/disconnect"),
         ("GET", "/admin"), ("GET", "/admin/anything")]


async def test_without_an_admin_token_there_is_no_admin_api(server):
    for method, path in PATHS:
        for token in (None, "anything"):
            status, body = await admin(server, path, method, token)
            assert (status, body) == (404, "not found\n"), (method, path)


async def test_admin_api_with_and_without_the_token(run_server):
    server = run_server("--admin-token", TOKEN, "--auth-fail-limit", "100")
    url = server.url()
    a, a_id = await member(url, {"name": "Ann"})
    b, b_id = await member(url, {"name": "Bob"})
    c, c_id = await member(url, {"name": "Cy"})
    await send_json(a, {"type": "offer", "to": b_id})
    await next_of(b, "offer")

    for method, path in PATHS:  # no token, a wrong one, another scheme: 401, nothing done
        assert (await admin(server, path, method, None))[0] == 401
        assert (await admin(server, path, method, TOKEN + "x"))[0] == 401
        status, _, _ = await http_request(server.host, server.port, path, method,
                                          headers={"Authorization": f"Basic {TOKEN}"})
        assert status == 401

    status, stats = await admin(server, "/admin/stats")
    assert status == 200
    assert stats["connections"] == 3 and stats["unreachable"] == []
    assert stats["rooms"] == [{"room": "demo", "peers": 3}]
    (instance,) = stats["instances"]
    assert instance["connections"] == 3 and instance["rooms"] == {"demo": 3}
    assert instance["ready"] is True and instance["messages_per_s"]["received"] > 0

    status, room = await admin(server, "/admin/rooms/demo")
    assert status == 200 and room["size"] == 3
    assert [(p["peerId"], p["meta"]) for p in room["peers"]] == [
        (a_id, {"name": "Ann"}), (b_id, {"name": "Bob"}), (c_id, {"name": "Cy"})]
    assert all(p["connected"] for p in room["peers"])

    # Wrong methods, unknown things.
    assert (await admin(server, "/admin/stats", "POST"))[0] == 405
    assert (await admin(server, "/admin/rooms/demo/close"))[0] == 405
    assert (await admin(server, "/admin/rooms/nobody-here"))[0] == 404
    assert (await admin(server, "/admin/rooms/bad%20name"))[0] == 404
    assert (await admin(server, "/admin/peers/nobody/disconnect", "POST"))[0] == 404
    assert (await admin(server, "/admin/rooms/nobody-here/close", "POST")) == (200, {
        "room": "nobody-here", "closed": 0, "unreachable": []})

    # Disconnect one peer: close 1008, a final close; the room hears it left.
    status, done = await admin(server, f"/admin/peers/{c_id}/disconnect", "POST")
    assert (status, done) == (200, {"peer": c_id, "disconnected": True, "unreachable": []})
    assert await closed_with(c) == (1008, "disconnected by admin")
    left = await next_of(a, "peer-left")
    assert (left["peerId"], left["reason"]) == (c_id, "closed")
    line = await asyncio.to_thread(server.wait_for, lambda e: e.get("event") == "admin"
                                   and e.get("peer") == c_id)
    assert (line["op"], line["peer"], line["addr"]) == ("disconnect", c_id, "127.0.0.1")

    # A parked session (its connection dropped, waiting for a resume) is ended too.
    d, d_id = await member(url)
    d.transport.abort()
    await asyncio.to_thread(server.wait_for, lambda e: e.get("event") == "disconnect"
                            and e.get("peer") == d_id and e.get("parked"))
    _, room = await admin(server, "/admin/rooms/demo")
    assert [p["connected"] for p in room["peers"] if p["peerId"] == d_id] == [False]
    assert (await admin(server, f"/admin/peers/{d_id}/disconnect", "POST"))[0] == 200
    assert (await next_of(a, "peer-left"))["peerId"] == d_id

    # Close the room: every member is disconnected.
    status, done = await admin(server, "/admin/rooms/demo/close", "POST")
    assert (status, done) == (200, {"room": "demo", "closed": 2, "unreachable": []})
    assert await closed_with(a) == (1008, "room closed")
    assert await closed_with(b) == (1008, "room closed")
    assert (await admin(server, "/admin/rooms/demo"))[0] == 404
    _, stats = await admin(server, "/admin/stats")
    assert stats["connections"] == 0 and stats["rooms"] == []
    assert TOKEN not in "".join(server.raw)  # the token is never logged


async def test_refused_attempts_are_throttled_like_failed_tokens(run_server):
    server = run_server("--admin-token", TOKEN, "--auth-fail-limit", "3")
    for _ in range(4):
        assert (await admin(server, "/admin/stats", token="guess"))[0] == 401
    # Blocked: the right token too, and WebSocket connections from the address.
    status, body = await admin(server, "/admin/stats")
    assert (status, body) == (429, "too many failed logins\n")
    status, _, _ = await http_request(server.host, server.port, "/admin/stats",
                                      headers=AUTH)
    assert status == 429
    _, metrics_page = await admin(server, "/metrics", token=None)
    assert 'rtcsignal_auth_failures_total{kind="admin"} 4' in metrics_page
    assert ('rtcsignal_rejected_total{status="429",reason="too many failed logins"} 2'
            in metrics_page)


async def test_admin_token_file_and_its_reload(run_server, tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    server = run_server("--admin-token-file", str(token_file))
    assert (await admin(server, "/admin/stats"))[0] == 200
    token_file.write_text("rotated-" + "r" * 32 + "\n")
    server.proc.send_signal(signal.SIGHUP)
    await asyncio.to_thread(server.wait_for, lambda e: e.get("event") == "reloaded")
    assert (await admin(server, "/admin/stats"))[0] == 401
    assert (await admin(server, "/admin/stats", token="rotated-" + "r" * 32))[0] == 200
    token_file.write_text("")  # an empty file is a bad setting: the token in use stays
    server.proc.send_signal(signal.SIGHUP)
    failed = await asyncio.to_thread(server.wait_for,
                                     lambda e: e.get("event") == "reload failed")
    assert "admin_token_file" in failed["reason"]
    assert (await admin(server, "/admin/stats", token="rotated-" + "r" * 32))[0] == 200


async def test_admin_across_two_instances(make_cluster):
    cluster = make_cluster(2, "--admin-token", TOKEN)
    one, two = cluster.instance(0), cluster.instance(1)
    a, a_id = await member(one.url(), {"name": "Ann"})
    b, b_id = await member(two.url(), {"name": "Bob"})
    c, c_id = await member(two.url(), {"name": "Cy"})
    solo, _ = await open_client(two.url("room=solo"))
    await next_of(solo, "joined")
    await next_of(a, "peer-joined")
    await next_of(a, "peer-joined")

    for where in (one, two):  # the same picture from either instance
        status, stats = await admin(where, "/admin/stats")
        assert status == 200 and stats["unreachable"] == []
        assert stats["connections"] == 4
        assert sorted((i["connections"], sorted(i["rooms"].items()))
                      for i in stats["instances"]) == [
            (1, [("demo", 1)]), (3, [("demo", 2), ("solo", 1)])]
        assert stats["rooms"] == [{"room": "demo", "peers": 3}, {"room": "solo", "peers": 1}]
        status, room = await admin(where, "/admin/rooms/demo")
        assert [(p["peerId"], p["meta"]["name"]) for p in room["peers"]] == [
            (a_id, "Ann"), (b_id, "Bob"), (c_id, "Cy")]
        assert {p["node"] for p in room["peers"]} == {a_id[:8], b_id[:8]}

    # A peer of the other instance, disconnected through this one.
    status, done = await admin(one, f"/admin/peers/{c_id}/disconnect", "POST")
    assert (status, done["disconnected"]) == (200, True)
    assert await closed_with(c) == (1008, "disconnected by admin")
    assert (await next_of(a, "peer-left"))["peerId"] == c_id
    assert (await admin(one, f"/admin/peers/{c_id}/disconnect", "POST"))[0] == 404

    # A room on both instances, closed through the second.
    status, done = await admin(two, "/admin/rooms/demo/close", "POST")
    assert (status, done) == (200, {"room": "demo", "closed": 2, "unreachable": []})
    assert await closed_with(a) == (1008, "room closed")
    assert await closed_with(b) == (1008, "room closed")
    _, stats = await admin(one, "/admin/stats")
    assert stats["connections"] == 1 and stats["rooms"] == [{"room": "solo", "peers": 1}]

    # An instance that does not answer is named, and the answer still comes.
    two.proc.send_signal(signal.SIGSTOP)
    try:
        status, stats = await admin(one, "/admin/stats")
        assert status == 200 and stats["unreachable"] == [b_id[:8]]
        assert [i["node"] for i in stats["instances"]] == [a_id[:8]]
    finally:
        two.proc.send_signal(signal.SIGCONT)
    await close_all([solo])
