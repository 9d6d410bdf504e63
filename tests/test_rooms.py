"""Rooms, presence and addressed messages over real sockets (issue 3).

Every test talks to a real server (a ``rtcsignal serve`` subprocess, or an in-process
SignalingService for the Python API) with the ``websockets`` client. The subprocess tests
run twice: against one instance, and against three instances sharing one real Redis behind
a round-robin balancer (``topology``, tests/cluster.py), so consecutive clients land on
different instances and every rule here must hold across them. Nothing sleeps: each
expectation awaits a message with a timeout, and "nothing was delivered" is shown by sending
a later marker through the same path and asserting the marker is the next thing received.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from typing import Any
from urllib.parse import quote

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.rawws import OP_PING, Closed, RawWS

TIMEOUT = 5.0
_serial = itertools.count(1)


@pytest.fixture
def server(topology: Any) -> Any:
    """One instance, or a three-instance cluster on Redis (both, by parametrization)."""
    return topology


@pytest.fixture
def run_server(run_topology: Any) -> Any:
    return run_topology


def unique(prefix: str) -> str:
    """A fresh value (room name, marker tag, request id) that no other step used."""
    return f"{prefix}-{next(_serial)}-{os.urandom(3).hex()}"


class Client:
    """A websockets client that reads the greeting and decodes JSON messages."""

    def __init__(self, ws: ClientConnection, greeting: dict[str, Any], name: str) -> None:
        self.ws = ws
        self.greeting = greeting
        self.id: str = greeting["peerId"]
        self.name = name

    def __repr__(self) -> str:
        return f"<Client {self.name} {self.id}>"

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(obj))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(raw, str), f"{self.name} got a binary frame"
        return json.loads(raw)

    async def expect(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        msg = await self.recv(timeout)
        assert msg.get("type") == kind, f"{self.name} expected {kind!r}, got {msg}"
        return msg

    async def request(self, obj: dict[str, Any], reply: str) -> dict[str, Any]:
        await self.send(obj)
        return await self.expect(reply)

    async def expect_closed(self, timeout: float = TIMEOUT) -> ConnectionClosed:
        """The next event is the server's close (no more messages before it)."""
        try:
            msg = await asyncio.wait_for(self.ws.recv(), timeout)
        except ConnectionClosed as exc:
            return exc
        raise AssertionError(f"{self.name}: expected close, got message {msg!r}")

    async def close(self) -> None:
        await self.ws.close()


async def open_client(url: str, name: str = "") -> Client:
    ws = await asyncio.wait_for(connect(url, open_timeout=TIMEOUT, close_timeout=2), TIMEOUT)
    raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
    greeting = json.loads(raw)
    assert greeting["type"] == "connected", greeting
    assert isinstance(greeting["peerId"], str) and greeting["peerId"]
    return Client(ws, greeting, name or greeting["peerId"])


def room_url(base: str, room: str | None) -> str:
    return base if room is None else f"{base}?room={quote(room, safe='')}"


async def relay_marker(sender: Client, receivers: list[Client], **route: Any) -> None:
    """``sender`` relays a fresh marker; each receiver's NEXT message must be exactly it.

    Used after a step that must not have delivered anything to ``receivers``: the marker
    travels the same path (hub routing, the receiver's outbound queue) after that step.
    """
    tag = unique("marker")
    await sender.send({"type": "marker", "tag": tag, **route})
    for r in receivers:
        msg = await r.recv()
        assert msg == {"type": "marker", "tag": tag, "from": sender.id, **route}, (
            f"{r.name}: expected {sender.name}'s marker {tag}, got {msg}"
        )


async def assert_room_quiet(members: list[Client], room: str | None = None) -> None:
    """No member of a room has anything pending: every member receives the others' markers
    next. (Each member sends one marker; all others must read exactly those, in order.)"""
    route = {"room": room} if room is not None else {}
    for sender in members:
        await relay_marker(sender, [m for m in members if m is not sender], **route)


async def join(c: Client, room: str, meta: dict[str, Any] | None = None,
               req_id: Any = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "join", "room": room}
    if meta is not None:
        msg["meta"] = meta
    if req_id is not None:
        msg["id"] = req_id
    joined = await c.request(msg, "joined")
    assert joined["room"] == room
    if req_id is not None:
        assert joined["ref"] == req_id
    return joined


async def expect_error(c: Client, code: str, ref: Any = None) -> dict[str, Any]:
    err = await c.expect("error")
    assert err["code"] == code, err
    assert isinstance(err.get("message"), str) and err["message"]
    if ref is None:
        assert "ref" not in err, err
    else:
        assert err["ref"] == ref, err
    return err


def entry(c: Client, meta: dict[str, Any]) -> dict[str, Any]:
    return {"peerId": c.id, "meta": meta, "polite": True}


async def close_all(*clients: Client) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# --- 1 presenter + 3 viewers beside a room of 2 --------------------------------------------


async def test_presence_addressing_and_isolation_two_rooms(server: Any) -> None:
    base = server.url()
    show, call = unique("show"), unique("call")
    meta_p = {"name": "Pat", "role": "presenter"}
    meta_v2 = {"name": "Vi Two", "role": "viewer"}
    meta_v3 = {"name": "Vi Three", "role": "viewer", "seat": 3}
    meta_b = {"name": "Bea"}

    # Two default-room clients, connected first.
    d1 = await open_client(base, "d1")
    d2 = await open_client(base, "d2")

    # The presenter connects without a room and joins by message (with meta and an id).
    p = await open_client(base, "p")
    req = unique("req")
    joined = await join(p, show, meta_p, req)
    assert joined["peers"] == []

    # Viewer 1 joins at connect (?room=): greeting, then a snapshot listing the presenter.
    v1 = await open_client(room_url(base, show), "v1")
    joined = await v1.expect("joined")
    assert joined == {"type": "joined", "room": show, "peers": [entry(p, meta_p)]}
    pj = await p.expect("peer-joined")
    assert pj == {"type": "peer-joined", "room": show, "peerId": v1.id, "meta": {},
                  "polite": False}

    # Viewers 2 and 3 join by message; snapshots list earlier members in join order.
    v2 = await open_client(base, "v2")
    joined = await join(v2, show, meta_v2)
    assert joined["peers"] == [entry(p, meta_p), entry(v1, {})]
    assert "ref" not in joined
    for c in (p, v1):
        assert await c.expect("peer-joined") == {
            "type": "peer-joined", "room": show, "peerId": v2.id, "meta": meta_v2,
            "polite": False}
    v3 = await open_client(base, "v3")
    joined = await join(v3, show, meta_v3)
    assert joined["peers"] == [entry(p, meta_p), entry(v1, {}), entry(v2, meta_v2)]
    for c in (p, v1, v2):
        assert await c.expect("peer-joined") == {
            "type": "peer-joined", "room": show, "peerId": v3.id, "meta": meta_v3,
            "polite": False}

    # The room of 2: one at connect, one by message.
    a = await open_client(room_url(base, call), "a")
    assert (await a.expect("joined"))["peers"] == []
    b = await open_client(base, "b")
    assert (await join(b, call, meta_b))["peers"] == [entry(a, {})]
    assert await a.expect("peer-joined") == {
        "type": "peer-joined", "room": call, "peerId": b.id, "meta": meta_b, "polite": False}

    # clientsCount keeps counting every connected client.
    assert [c.greeting["clientsCount"] for c in (d1, d2, p, v1, v2, v3, a, b)] == list(
        range(1, 9))

    # Screen share: the presenter sends one offer to each viewer with `to`. Each viewer's
    # next message is its own offer, so no viewer saw another viewer's offer.
    viewers = [v1, v2, v3]
    sdp = {v.id: unique("offer-sdp") for v in viewers}
    for v in viewers:
        await p.send({"type": "offer", "to": v.id, "sdp": sdp[v.id]})
    for v in viewers:
        assert await v.recv() == {"type": "offer", "from": p.id, "to": v.id,
                                  "sdp": sdp[v.id]}

    # Answers back, each addressed to the presenter.
    answers = {v.id: unique("answer-sdp") for v in viewers}
    for v in viewers:
        await v.send({"type": "answer", "to": p.id, "sdp": answers[v.id]})
    got = {}
    for _ in viewers:
        m = await p.expect("answer")
        assert m["to"] == p.id
        got[m["from"]] = m["sdp"]
    assert got == answers

    # ICE candidates both ways; the addressed room too (`to` plus `room`).
    for v in viewers:
        cand = unique("candidate")
        await p.send({"type": "ice-candidate", "to": v.id, "room": show, "candidate": cand})
        assert await v.recv() == {"type": "ice-candidate", "from": p.id, "to": v.id,
                                  "room": show, "candidate": cand}
        cand = unique("candidate")
        await v.send({"type": "ice-candidate", "to": p.id, "candidate": cand})
        assert await p.recv() == {"type": "ice-candidate", "from": v.id, "to": p.id,
                                  "candidate": cand}

    # A message without `to`/`room` goes to the sender's only room, minus the sender;
    # with `room` it goes to that room. A `from` written by the client is overwritten.
    for route in ({}, {"room": show}):
        tag = unique("chat")
        await v2.send({"type": "chat", "text": tag, "from": "spoofed", **route})
        for c in (p, v1, v3):
            assert await c.recv() == {"type": "chat", "text": tag, "from": v2.id, **route}

    # A message addressed with `to` inside the room of 2 reaches only that peer.
    tag = unique("call-offer")
    await a.send({"type": "offer", "to": b.id, "sdp": tag})
    assert await b.recv() == {"type": "offer", "from": a.id, "to": b.id, "sdp": tag}

    # Isolation: nothing above reached the other room or the default room, and the sender
    # of a room message did not get its own copy back.
    await assert_room_quiet([p, v1, v2, v3], show)
    await assert_room_quiet([a, b])
    await assert_room_quiet([d1, d2])

    # A default-room broadcast does not reach anyone in a named room.
    tag = unique("lobby")
    await d1.send({"type": "hello", "text": tag})
    assert await d2.recv() == {"type": "hello", "text": tag, "from": d1.id}
    await assert_room_quiet([p, v1, v2, v3], show)
    await assert_room_quiet([a, b], call)

    await close_all(d1, d2, p, v1, v2, v3, a, b)


async def test_leave_close_and_default_room_has_no_presence(server: Any) -> None:
    base = server.url()
    show = unique("show")
    p = await open_client(room_url(base, show), "p")
    await p.expect("joined")
    v1 = await open_client(base, "v1")
    await join(v1, show, {"n": 1})
    await p.expect("peer-joined")
    v2 = await open_client(base, "v2")
    await join(v2, show)
    for c in (p, v1):
        await c.expect("peer-joined")

    # Default-room clients get no presence when others connect or close.
    d1 = await open_client(base, "d1")
    d2 = await open_client(base, "d2")
    d3 = await open_client(base, "d3")
    await d3.close()
    await relay_marker(d2, [d1])  # d1's next message is d2's broadcast: no presence
    await relay_marker(d1, [d2])

    # v1 leaves explicitly: it gets `left` (with ref), the others `peer-left` reason left.
    req = {"n": unique("leave")}
    await v1.send({"type": "leave", "room": show, "id": req})
    assert await v1.recv() == {"type": "left", "room": show, "ref": req}
    for c in (p, v2):
        assert await c.recv() == {"type": "peer-left", "room": show, "peerId": v1.id,
                                  "reason": "left"}

    # Having left its last room, v1 is back in the default room: it receives default-room
    # broadcasts again, and its own plain messages go to the default room.
    tag = unique("lobby")
    await d1.send({"type": "hello", "text": tag})
    for c in (d2, v1):
        assert await c.recv() == {"type": "hello", "text": tag, "from": d1.id}
    tag = unique("back")
    await v1.send({"type": "hello", "text": tag})
    for c in (d1, d2):
        assert await c.recv() == {"type": "hello", "text": tag, "from": v1.id}
    # ... and the room no longer lists it; it did not get the room's traffic.
    await assert_room_quiet([p, v2], show)
    await assert_room_quiet([d1, d2, v1])
    v3 = await open_client(room_url(base, show), "v3")
    joined = await v3.expect("joined")
    assert [e["peerId"] for e in joined["peers"]] == [p.id, v2.id]
    for c in (p, v2):
        await c.expect("peer-joined")

    # A peer that joins a named room leaves the default room (no more broadcasts).
    await join(d2, show)
    for c in (p, v2, v3):
        await c.expect("peer-joined")
    tag = unique("lobby")
    await d1.send({"type": "hello", "text": tag})
    assert await v1.recv() == {"type": "hello", "text": tag, "from": d1.id}
    await assert_room_quiet([p, v2, v3, d2], show)

    # Closing the socket: peer-left with reason closed to the rest of the room.
    await v2.close()
    for c in (p, v3, d2):
        assert await c.recv() == {"type": "peer-left", "room": show, "peerId": v2.id,
                                  "reason": "closed"}
    # Leaving a room the peer is not in.
    await v1.send({"type": "leave", "room": show, "id": 7})
    await expect_error(v1, "not-in-room", 7)
    await assert_room_quiet([p, v3, d2], show)
    await close_all(p, v1, v3, d1, d2)


async def test_peer_in_two_rooms(server: Any) -> None:
    base = server.url()
    r1, r2 = unique("r1"), unique("r2")
    x = await open_client(room_url(base, r1), "x")
    await x.expect("joined")
    y = await open_client(room_url(base, r2), "y")
    await y.expect("joined")
    z = await open_client(room_url(base, r1), "z")
    await z.expect("joined")
    await x.expect("peer-joined")
    joined = await join(z, r2, {"two": True})
    assert joined["peers"] == [entry(y, {})]
    assert (await y.expect("peer-joined"))["meta"] == {"two": True}

    # Without `room`, a peer in two rooms gets room-required; nothing is delivered.
    await z.send({"type": "chat", "id": "q1"})
    await expect_error(z, "room-required", "q1")
    await relay_marker(z, [x], room=r1)
    await relay_marker(z, [y], room=r2)
    # With `room`, only that room gets it.
    tag = unique("chat")
    await z.send({"type": "chat", "room": r2, "tag": tag})
    assert await y.recv() == {"type": "chat", "room": r2, "tag": tag, "from": z.id}
    await relay_marker(z, [x], room=r1)
    # `to` alone works for a peer in two rooms (delivered to a peer sharing either room).
    tag = unique("direct")
    await z.send({"type": "direct", "to": y.id, "tag": tag})
    assert await y.recv() == {"type": "direct", "to": y.id, "tag": tag, "from": z.id}
    # `to` with a room the addressee is not in: unknown-peer, nothing delivered.
    await z.send({"type": "direct", "to": y.id, "room": r1, "id": "q2"})
    await expect_error(z, "unknown-peer", "q2")
    await relay_marker(z, [y], room=r2)
    # x and y share no room: `to` between them is unknown-peer.
    await x.send({"type": "direct", "to": y.id, "id": ["q", 3]})
    await expect_error(x, "unknown-peer", ["q", 3])
    await relay_marker(z, [y], room=r2)

    # Leaving one of two rooms does not put z back into the default room.
    await z.send({"type": "leave", "room": r1})
    assert await z.recv() == {"type": "left", "room": r1}
    assert await x.recv() == {"type": "peer-left", "room": r1, "peerId": z.id,
                              "reason": "left"}
    d = await open_client(base, "d")
    d2 = await open_client(base, "d2")
    await relay_marker(d, [d2])
    await relay_marker(y, [z])  # z's next message is y's room message, not d's broadcast
    # Now in one room, a plain message needs no `room`.
    await relay_marker(z, [y])
    await close_all(x, y, z, d, d2)


async def test_error_codes_carry_ref_and_deliver_nothing(server: Any) -> None:
    base = server.url()
    room, other = unique("room"), unique("other")
    a = await open_client(room_url(base, room), "a")
    await a.expect("joined")
    b = await open_client(room_url(base, room), "b")
    await b.expect("joined")
    await a.expect("peer-joined")
    c = await open_client(room_url(base, other), "c")
    await c.expect("joined")
    d = await open_client(base, "d")

    # unknown-peer: no such peer at all; a peer in another room; a default-room peer.
    for target in ("no-such-peer", c.id, d.id):
        rid = unique("id")
        await a.send({"type": "offer", "to": target, "id": rid})
        await expect_error(a, "unknown-peer", rid)
    # not-in-room: sending to a room the sender is not in.
    await a.send({"type": "chat", "room": other, "id": 41})
    await expect_error(a, "not-in-room", 41)
    # invalid-room: bad names in join messages (and the error ref may be any JSON value).
    for bad in ("bad name", "", "x" * 129, "sl/ash", "é", 5, None):
        rid = {"req": unique("id")}
        await a.send({"type": "join", "room": bad, "id": rid})
        await expect_error(a, "invalid-room", rid)
    # meta-too-large: a meta object over 1 KiB (the limit counts its JSON bytes).
    await a.send({"type": "join", "room": unique("big"), "meta": {"x": "y" * 1100},
                  "id": "m1"})
    await expect_error(a, "meta-too-large", "m1")
    # Without an id, the error has no ref.
    await a.send({"type": "offer", "to": "no-such-peer"})
    await expect_error(a, "unknown-peer")
    # None of that reached anyone; the refused joins created no rooms and left `a` in its
    # room (its plain message still goes there).
    await relay_marker(a, [b])
    await relay_marker(b, [a])
    big_ok = {"x": "y" * 900}
    await b.send({"type": "join", "room": other, "meta": big_ok})
    assert (await b.expect("joined"))["peers"] == [entry(c, {})]
    assert (await c.expect("peer-joined"))["meta"] == big_ok
    # d (default room) got nothing from any of this.
    d2 = await open_client(base, "d2")
    await relay_marker(d2, [d])
    await close_all(a, b, c, d, d2)


async def test_invalid_room_in_url_is_http_400(server: Any) -> None:
    for bad in ("bad name", "", "x" * 129, "a/b", "ü"):
        with pytest.raises(InvalidStatus) as info:
            await asyncio.wait_for(connect(room_url(server.url(), bad)), TIMEOUT)
        assert info.value.response.status_code == 400
    # The server still serves a valid room afterwards.
    ok = await open_client(room_url(server.url(), "x" * 128))
    assert (await ok.expect("joined"))["peers"] == []
    await ok.close()


async def test_room_full_and_too_many_rooms(run_server: Any) -> None:
    srv = run_server("--max-peers-per-room", "2", "--max-rooms-per-peer", "2")
    base = srv.url()
    full = unique("full")
    a = await open_client(room_url(base, full), "a")
    await a.expect("joined")
    b = await open_client(base, "b")
    await join(b, full)
    await a.expect("peer-joined")

    # Joining a full room by message: room-full with ref; the members hear nothing.
    c = await open_client(base, "c")
    await c.send({"type": "join", "room": full, "meta": {"k": 1}, "id": "j-full"})
    await expect_error(c, "room-full", "j-full")
    await assert_room_quiet([a, b], full)
    # c is not in that room: it cannot send there.
    await c.send({"type": "x", "room": full, "id": "s"})
    await expect_error(c, "not-in-room", "s")

    # Joining a full room at connect: greeting, error, close 1008 with the code as reason.
    ws = await asyncio.wait_for(connect(room_url(base, full)), TIMEOUT)
    greeting = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert greeting["type"] == "connected"
    refused = Client(ws, greeting, "refused")
    await expect_error(refused, "room-full")
    closed = await refused.expect_closed()
    assert closed.rcvd is not None
    assert (closed.rcvd.code, closed.rcvd.reason) == (1008, "room-full")
    await assert_room_quiet([a, b], full)

    # Once a member leaves there is room again.
    await b.send({"type": "leave", "room": full})
    await b.expect("left")
    assert (await a.expect("peer-left"))["peerId"] == b.id
    assert (await join(c, full, {"k": 1}))["peers"] == [entry(a, {})]
    await a.expect("peer-joined")

    # too-many-rooms: at most 2 rooms per peer.
    r2, r3 = unique("second"), unique("third")
    await join(c, r2)
    await c.send({"type": "join", "room": r3, "id": 99})
    await expect_error(c, "too-many-rooms", 99)
    # The refused join created nothing: a new peer joining r3 finds it empty.
    e = await open_client(room_url(base, r3), "e")
    assert (await e.expect("joined"))["peers"] == []
    await c.send({"type": "x", "room": r3, "id": 100})
    await expect_error(c, "not-in-room", 100)
    await close_all(a, b, c, e)


async def test_no_default_room(run_server: Any) -> None:
    srv = run_server("--no-default-room")
    ws = await asyncio.wait_for(connect(srv.url()), TIMEOUT)
    greeting = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert greeting["type"] == "connected"
    c = Client(ws, greeting, "roomless")
    err = await c.expect("error")
    closed = await c.expect_closed()
    assert closed.rcvd is not None
    assert closed.rcvd.code == 1008
    assert closed.rcvd.reason == err["code"]

    # With a room the same server works, and leaving the last room leaves the peer in no
    # room at all: a plain message is refused.
    room = unique("room")
    a = await open_client(room_url(srv.url(), room), "a")
    await a.expect("joined")
    b = await open_client(room_url(srv.url(), room), "b")
    await b.expect("joined")
    await a.expect("peer-joined")
    await relay_marker(a, [b])
    await b.send({"type": "leave", "room": room})
    await b.expect("left")
    await a.expect("peer-left")
    await b.send({"type": "chat", "id": "nr"})
    await expect_error(b, "not-in-room", "nr")
    await close_all(a, b)


async def test_peer_left_timeout_when_pings_go_unanswered(run_server: Any) -> None:
    # The dropped peer's session is kept for the resume window, then announced left.
    srv = run_server("--heartbeat-interval", "0.3", "--resume-window", "0.5")
    room = unique("hb")
    a = await open_client(room_url(srv.url(), room), "a")  # answers pings (websockets)
    await a.expect("joined")
    raw, greeting = await RawWS.open("127.0.0.1", srv.port, f"room={room}", auto_pong=False)
    assert greeting["type"] == "connected"
    raw_id = greeting["peerId"]
    joined = await raw.recv_json()
    assert joined == {"type": "joined", "room": room, "peers": [entry(a, {})]}
    assert await a.recv() == {"type": "peer-joined", "room": room, "peerId": raw_id,
                              "meta": {}, "polite": False}

    # The server pings the raw client, which never answers.
    op, _ = await raw.recv_frame()
    assert op == OP_PING
    left = await a.recv()
    assert left == {"type": "peer-left", "room": room, "peerId": raw_id, "reason": "timeout"}
    # The raw client's socket was dropped; the answering client is still served.
    with pytest.raises(Closed):
        while True:
            await raw.recv_frame()
    raw.close()
    await a.send({"type": "ping", "id": "alive"})
    assert await a.recv() == {"type": "pong", "ref": "alive"}
    b = await open_client(room_url(srv.url(), room), "b")
    assert (await b.expect("joined"))["peers"] == [entry(a, {})]
    await a.expect("peer-joined")
    await close_all(a, b)


# --- the server-side Python API (in-process service) --------------------------------------


def service_url(svc: Any, room: str | None = None) -> str:
    return room_url(f"ws://127.0.0.1:{svc.port}/signaling", room)


async def test_service_room_api(make_service: Any) -> None:
    svc = await make_service()
    show, call = unique("show"), unique("call")
    p = await open_client(service_url(svc, show), "p")
    await p.expect("joined")
    v = await open_client(service_url(svc), "v")
    await join(v, show, {"role": "viewer"})
    await p.expect("peer-joined")
    a = await open_client(service_url(svc, call), "a")
    await a.expect("joined")
    a2 = await open_client(service_url(svc, call), "a2")
    await a2.expect("joined")
    await a.expect("peer-joined")
    d = await open_client(service_url(svc), "d")
    d2 = await open_client(service_url(svc), "d2")

    assert svc.room_peers(show) == [{"peerId": p.id, "meta": {}},
                                    {"peerId": v.id, "meta": {"role": "viewer"}}]
    assert svc.room_peers(call) == [{"peerId": a.id, "meta": {}},
                                    {"peerId": a2.id, "meta": {}}]
    assert svc.room_peers(unique("nope")) == []
    assert sorted(svc.rooms()) == sorted([show, call])

    note = {"type": "announce", "text": unique("note")}
    assert svc.send_to_room(show, note) == 2
    for c in (p, v):
        assert await c.recv() == note
    assert svc.send_to_room(unique("empty"), note) == 0
    # Neither the other room nor the default room got it.
    await assert_room_quiet([a, a2], call)
    await assert_room_quiet([d, d2])
    await assert_room_quiet([p, v], show)

    # A room is gone once its last member has gone; the other room stays.
    await a.close()
    assert (await a2.expect("peer-left"))["peerId"] == a.id
    assert sorted(svc.rooms()) == sorted([show, call])
    assert svc.room_peers(call) == [{"peerId": a2.id, "meta": {}}]
    gone = asyncio.Event()
    svc.hooks.on_disconnect = lambda peer, reason: peer.id == a2.id and gone.set()
    await a2.close()
    await asyncio.wait_for(gone.wait(), TIMEOUT)
    assert svc.rooms() == [show]
    assert svc.room_peers(call) == []
    await close_all(p, v, d, d2)


async def test_service_on_connect_can_reject(make_service: Any) -> None:
    svc = await make_service()
    seen: list[tuple[str, str]] = []

    def on_connect(peer: Any, request: Any) -> tuple[int, str] | None:
        seen.append((peer.id, request.query.get("who", "")))
        return (4001, "nope") if request.query.get("who") == "mallory" else None

    svc.on_connect = on_connect
    ws = await asyncio.wait_for(connect(service_url(svc) + "?who=mallory"), TIMEOUT)
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(ws.recv(), TIMEOUT)  # no greeting: straight to the close
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "nope")
    ok = await open_client(service_url(svc) + "?who=alice", "alice")
    assert [who for _, who in seen] == ["mallory", "alice"]
    assert seen[1][0] == ok.id
    assert svc.clients_count() == 1
    await ok.close()


async def test_service_hooks(make_service: Any) -> None:
    svc = await make_service()
    room, vip = unique("room"), unique("vip")
    joins: list[tuple[str, str, dict[str, Any]]] = []
    gone: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def on_join(peer: Any, name: str, meta: dict[str, Any]) -> bool:
        joins.append((peer.id, name, meta))
        return name != vip

    def on_message(peer: Any, msg: dict[str, Any]) -> dict[str, Any] | None:
        if msg["type"] == "secret":
            return None
        if msg["type"] == "shout":
            return {**msg, "text": msg["text"].upper(), "checked": True}
        return msg

    svc.hooks.on_join = on_join
    svc.hooks.on_message = on_message
    svc.hooks.on_disconnect = lambda peer, reason: gone.put_nowait((peer.id, reason))

    a = await open_client(service_url(svc, room), "a")
    await a.expect("joined")
    b = await open_client(service_url(svc), "b")
    await join(b, room, {"n": "b"})
    await a.expect("peer-joined")
    assert joins == [(a.id, room, {}), (b.id, room, {"n": "b"})]

    # on_join returning False refuses with `forbidden`; nobody hears of it.
    await b.send({"type": "join", "room": vip, "meta": {"n": "b"}, "id": "v"})
    await expect_error(b, "forbidden", "v")
    assert joins[-1] == (b.id, vip, {"n": "b"})
    assert vip not in svc.rooms()
    # ... and at connect: greeting, error, close 1008 "forbidden".
    ws = await asyncio.wait_for(connect(service_url(svc, vip)), TIMEOUT)
    greeting = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    refused = Client(ws, greeting, "refused")
    await expect_error(refused, "forbidden")
    closed = await refused.expect_closed()
    assert closed.rcvd is not None
    assert (closed.rcvd.code, closed.rcvd.reason) == (1008, "forbidden")
    assert await asyncio.wait_for(gone.get(), TIMEOUT) == (refused.id, "closed")

    # on_message returning None drops the message (`dropped`), nothing is relayed.
    await b.send({"type": "secret", "id": "s1"})
    await expect_error(b, "dropped", "s1")
    await relay_marker(b, [a])
    # Returning a modified dict relays the rewrite, with `from` still server-stamped.
    text = unique("hello")
    await b.send({"type": "shout", "text": text, "from": "forged"})
    assert await a.recv() == {"type": "shout", "text": text.upper(), "checked": True,
                              "from": b.id}
    # Unchanged messages pass through.
    await relay_marker(a, [b])

    # on_disconnect gets the reason.
    await b.close()
    assert await asyncio.wait_for(gone.get(), TIMEOUT) == (b.id, "closed")
    assert await a.recv() == {"type": "peer-left", "room": room, "peerId": b.id,
                              "reason": "closed"}
    await a.close()
    assert await asyncio.wait_for(gone.get(), TIMEOUT) == (a.id, "closed")


async def test_service_on_disconnect_timeout(make_service: Any) -> None:
    svc = await make_service(heartbeat_interval=0.2, resume_window=0.2)
    gone: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    svc.hooks.on_disconnect = lambda peer, reason: gone.put_nowait((peer.id, reason))
    room = unique("hb")
    raw, greeting = await RawWS.open("127.0.0.1", svc.port, f"room={room}", auto_pong=False)
    raw_id = greeting["peerId"]
    assert await asyncio.wait_for(gone.get(), TIMEOUT) == (raw_id, "timeout")
    assert svc.room_peers(room) == []
    raw.close()
