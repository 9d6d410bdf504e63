"""Issue 11, item 2: the JavaScript client (/rtcsignal.js) in headless Chromium.

- against the real server (subprocess, real sockets): rooms and presence, addressed and room
  messages, request/response by id/ref, errors by ref, keepalive ping, rejoining after a
  server restart, and perfect negotiation under glare;
- against a scripted stand-in server (websockets, in the test): the reconnect rules
  (``reconnect.after_ms``, 1012, 1013, drops, keepalive timeout, clean close, 1008) and the
  resume protocol (``?resume=``, ``resumed``, a lost session re-joined, ``expired``), which
  need exact control of what the server says and when.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.browser import (  # noqa: F401  (chromium_fixture, pages_fixture: fixtures)
    ROOT,
    WAIT_MS,
    chromium_fixture,
    pages_fixture,
    requires_chromium,
    wait_js,
)
from tests.helpers import close_all, get, open_client, recv_json, send_json

pytestmark = [requires_chromium, pytest.mark.asyncio(loop_scope="module")]

STATIC = ROOT / "rtcsignal" / "static"

# Loads the client into a page and records its events in window.events.
BOOT = """async (opts) => {
  window.rt = await import('/rtcsignal.js');
  window.events = [];
  const plain = (v) => JSON.parse(JSON.stringify(v, (k, x) =>
    x instanceof Error ? { name: x.name, code: x.code, message: x.message, ref: x.ref } : x));
  window.record = (client) => {
    for (const event of ['open', 'close', 'joined', 'left', 'peer-joined', 'peer-left',
                         'message', 'error', 'expired']) {
      client.on(event, (detail) => window.events.push({ event, detail: plain(detail) }));
    }
    return client;
  };
  window.seen = (event, pred = () => true) =>
    window.events.filter((e) => e.event === event).map((e) => e.detail).filter(pred);
  window.client = record(new rt.SignalingClient(opts));
}"""


async def client_page(pages: Any, server: Any, **options: Any) -> Any:
    page = await pages.new(server.http("/healthz"))
    await page.evaluate(BOOT, options)
    return page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- served files ------------------------------------------------------------------------


async def test_client_module_and_declarations_are_served(server):
    status, hdrs, body = await get(server, "/rtcsignal.js")
    assert status == 200
    assert hdrs["content-type"] == "text/javascript; charset=utf-8"
    assert hdrs["access-control-allow-origin"] == "*"  # importable from an app's origin
    assert body == (STATIC / "rtcsignal.js").read_bytes()
    status, hdrs, body = await get(server, "/rtcsignal.d.ts")
    assert status == 200 and hdrs["content-type"].startswith("application/typescript")
    # Every export of the module is declared, and nothing else.
    js = (STATIC / "rtcsignal.js").read_text()
    exported = set(re.findall(r"^export (?:class|function|const) (\w+)", js, re.M))
    declared = set(re.findall(r"^export (?:declare )?(?:class|function|const) (\w+)",
                              body.decode(), re.M))
    assert exported == declared and {"SignalingClient", "CallManager", "PeerCall"} <= exported
    assert not re.search(r"^\s*import\b", js, re.M)  # no dependencies


# --- against the real server -------------------------------------------------------------


async def test_rooms_presence_messages_requests_and_errors(server, pages):
    py, py_hello = await open_client(server.url())
    await send_json(py, {"type": "join", "room": "lobby", "meta": {"name": "Py"}})
    assert (await recv_json(py))["type"] == "joined"

    a = await client_page(pages, server)
    b = await client_page(pages, server)
    a_id = await a.evaluate("client.connect().then((g) => g.peerId)")
    b_id = await b.evaluate("client.connect().then((g) => g.peerId)")
    assert await a.evaluate("client.state") == "open" and a_id == await a.evaluate("client.peerId")

    snap_a = await a.evaluate("client.join('lobby', {name: 'Ann'})")
    assert snap_a == {"room": "lobby", "peers": [
        {"peerId": py_hello["peerId"], "meta": {"name": "Py"}, "polite": True}]}
    snap_b = await b.evaluate("client.join('lobby', {name: 'Bob'})")
    assert [p["peerId"] for p in snap_b["peers"]] == [py_hello["peerId"], a_id]
    joined = await wait_js(a, "() => seen('peer-joined')[0]")
    assert joined["peerId"] == b_id and joined["meta"] == {"name": "Bob"}
    assert joined["polite"] is False
    assert await a.evaluate(f"client.polite({json.dumps(b_id)}, 'lobby')") is False
    assert await b.evaluate(f"client.polite({json.dumps(a_id)})") is True
    assert (await recv_json(py))["type"] == "peer-joined"
    assert (await recv_json(py))["type"] == "peer-joined"

    # Addressed and room messages, with ids; the python peer sees what a peer sends.
    sent_id = await a.evaluate(f"client.send({json.dumps(b_id)}, {{type: 'hello', text: 'hi'}})")
    got = await wait_js(b, "() => seen('message')[0]")
    assert got["from"] == a_id and got["text"] == "hi" and got["id"] == sent_id
    await a.evaluate("client.broadcast('lobby', {type: 'all', n: 1})")
    from_room = await recv_json(py)
    assert from_room["type"] == "all" and from_room["from"] == a_id and from_room["room"] == "lobby"
    await wait_js(b, "() => seen('message').some((e) => e.type === 'all' && e.n === 1)")

    # Request/response by id/ref between two pages.
    await b.evaluate("""() => { client.on('message', (m) => {
        if (m.type === 'question') client.reply(m, {type: 'answer', n: m.n * 2}); }); }""")
    answer = await a.evaluate(f"client.request({json.dumps(b_id)}, {{type: 'question', n: 21}})")
    assert answer["n"] == 42 and answer["from"] == b_id and answer["type"] == "answer"
    # ... and with the python peer answering by hand.
    pending = asyncio.ensure_future(a.evaluate(
        f"client.request({json.dumps(py_hello['peerId'])}, {{type: 'q'}})"))
    q = await recv_json(py)
    await send_json(py, {"type": "a", "to": a_id, "ref": q["id"], "ok": True})
    assert (await pending)["ok"] is True

    # Errors come back by ref: as a rejection for request(), as an event for send().
    rejected = await a.evaluate("""client.request('nobody', {type: 'q'}).then(() => null,
                                   (e) => ({name: e.name, code: e.code}))""")
    assert rejected == {"name": "SignalingError", "code": "unknown-peer"}
    bad_id = await a.evaluate("client.send('nobody', {type: 'x'})")
    err = await wait_js(a, "() => seen('error')[0]")
    assert err["code"] == "unknown-peer" and err["ref"] == bad_id
    refused = await a.evaluate("client.join('bad room').then(() => null, (e) => e.code)")
    assert refused == "invalid-room" and await a.evaluate("client.rooms") == ["lobby"]
    assert await a.evaluate("client.ping()") >= 0

    # Leaving: the others see peer-left, the leaver's state forgets the room.
    await b.evaluate("client.leave('lobby')")
    left = await wait_js(a, "() => seen('peer-left')[0]")
    assert left["peerId"] == b_id and left["reason"] == "left"
    assert await b.evaluate("client.rooms") == [] and await a.evaluate(
        "client.peers('lobby').map((p) => p.meta.name)") == ["Py"]
    await a.evaluate("client.close()")
    assert await a.evaluate("client.state") == "closed"
    assert pages.errors == []
    await close_all([py])


async def test_rejoins_its_rooms_after_a_server_restart(run_server, pages):
    port = free_port()
    server = run_server("--port", str(port))
    a = await client_page(pages, server, backoff={"initialMs": 100, "maxMs": 400})
    b = await client_page(pages, server, backoff={"initialMs": 100, "maxMs": 400})
    first_a = await a.evaluate("client.connect().then(() => client.join('r', {name: 'a'}))"
                               ".then(() => client.peerId)")
    await b.evaluate("client.connect().then(() => client.join('r', {name: 'b'}))")
    await wait_js(a, "() => client.peers('r').length === 1")

    server.stop()  # SIGTERM: the clients get 1001 and keep trying
    await wait_js(a, "() => seen('close').some((e) => e.willReconnect && e.code === 1001)")
    run_server("--port", str(port))
    opened = await wait_js(a, "() => seen('open').find((e) => e.previousPeerId)")
    assert opened["resumed"] is False and opened["previousPeerId"] == first_a
    assert opened["peerId"] != first_a
    # The old presence went away with the old session, then both rooms were joined again.
    await wait_js(a, "() => seen('peer-left', (e) => e.reason === 'session-lost').length === 1")
    for page in (a, b):
        await wait_js(page, "() => client.peers('r').length === 1 && client.state === 'open'")
    assert pages.errors == []


PERFECT = """async ({ room, hold }) => {
  // Inbound frames can be held back: both sides then make their offer before either sees
  // the other's, the exact glare case.
  window.holding = false;
  window.held = [];
  class HoldingWebSocket extends WebSocket {
    set onmessage(fn) {
      super.onmessage = fn && ((e) => (window.holding ? window.held.push(() => fn(e)) : fn(e)));
    }
    get onmessage() { return super.onmessage; }
  }
  window.release = () => { window.holding = false; for (const f of window.held.splice(0)) f(); };
  window.offersSent = 0;
  window.client = new rt.SignalingClient({ WebSocket: hold ? HoldingWebSocket : undefined });
  client.on('raw', ({ direction, message }) => {
    if (direction === 'out' && message.description?.type === 'offer') window.offersSent += 1;
  });
  await client.connect();
  window.calls = client.calls({ room });
  window.received = [];
  calls.on('call', (call) => {
    call.pc.ondatachannel = ({ channel }) => { channel.onmessage = (m) => received.push(m.data); };
  });
  await client.join(room);
  return client.peerId;
}"""

CALL = """(peer) => {
  const call = calls.call(peer);
  const channel = call.pc.createDataChannel('from ' + client.peerId);
  channel.onopen = () => channel.send('hello from ' + client.peerId);
  window.call = call;
}"""


async def test_perfect_negotiation_glare_both_sides_connect(server, pages):
    a = await client_page(pages, server)
    b = await client_page(pages, server)
    a_id = await a.evaluate(PERFECT, {"room": "glare", "hold": True})
    b_id = await b.evaluate(PERFECT, {"room": "glare", "hold": True})
    await wait_js(a, "() => client.peers('glare').length === 1")
    # Both call each other at the same moment: each sends an offer before seeing the other's.
    await asyncio.gather(a.evaluate("window.holding = true"), b.evaluate("window.holding = true"))
    await asyncio.gather(a.evaluate(CALL, b_id), b.evaluate(CALL, a_id))
    for page in (a, b):
        await wait_js(page, "() => window.offersSent === 1")
    await asyncio.gather(a.evaluate("release()"), b.evaluate("release()"))

    for page, other in ((a, b_id), (b, a_id)):
        await wait_js(page, "() => call.pc.connectionState === 'connected'")
        await wait_js(page, "(o) => received.includes('hello from ' + o)", other)
    stats = {pid: await p.evaluate("({polite: call.polite, ...call.stats})")
             for pid, p in ((a_id, a), (b_id, b))}
    # The later joiner (b) is the polite side: it rolled its offer back and answered; the
    # impolite side ignored b's offer.
    assert stats[b_id]["polite"] is True and stats[a_id]["polite"] is False
    assert stats[b_id]["collisions"] >= 1 and stats[b_id]["rollbacks"] >= 1
    assert stats[a_id]["collisions"] >= 1 and stats[a_id]["ignoredOffers"] >= 1
    # One connection each way, no leftovers.
    assert await a.evaluate("calls.size") == 1 and await b.evaluate("calls.size") == 1
    assert pages.errors == []


async def test_the_documented_complete_example_runs_verbatim(server, pages):
    """docs/javascript-client.md's "video call in a dozen lines", as written, in three pages:
    everyone sees everyone else's camera (Chromium's fake one)."""
    doc = (ROOT / "docs" / "javascript-client.md").read_text()
    html = re.search(r"```html\n(.*?)```", doc, re.S)
    assert html is not None
    peers = [await pages.new(server.http("/healthz"), content=html.group(1)) for _ in range(3)]
    for page in peers:
        await wait_js(page, """() => {
            const videos = [...document.querySelectorAll('#others video')];
            return videos.length === 2 && videos.every((v) => v.videoWidth > 0); }""")
    await peers[0].close()  # one leaves: the others drop its video
    for page in peers[1:]:
        await wait_js(page, "() => document.querySelectorAll('#others video').length === 1")
    assert pages.errors == []


# --- against a scripted server -----------------------------------------------------------


class Scripted:
    """A stand-in server: every connection is queued for the test, which plays the server's
    side by hand (``conn.send``/``recv``/``close``); ``arrived`` is each one's arrival time."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[tuple[ServerConnection, float]] = asyncio.Queue()
        self.server: Any = None

    async def handler(self, conn: ServerConnection) -> None:
        await self.connections.put((conn, time.monotonic()))
        await conn.wait_closed()

    async def __aenter__(self) -> Scripted:
        self.server = await serve(self.handler, "127.0.0.1", 0, ping_interval=None,
                                  compression=None)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}/signaling"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def next(self, timeout: float = 10) -> tuple[ServerConnection, dict[str, str], float]:
        conn, at = await asyncio.wait_for(self.connections.get(), timeout)
        assert conn.request is not None
        query = {k: v[0] for k, v in parse_qs(urlsplit(conn.request.path).query).items()}
        return conn, query, at


async def frame(conn: ServerConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(conn.recv(), 10))


async def greet(conn: ServerConnection, peer: str, token: str, **extra: Any) -> None:
    await conn.send(json.dumps({"type": "connected", "message": "Connected to signaling server",
                                "clientsCount": 1, "peerId": peer, "resumeToken": token,
                                **extra}))


async def test_reconnect_rules_and_session_resume(server, pages):
    """The client side of resume and reconnect, step by step against a scripted server."""
    page = await client_page(pages, server)  # the page's origin: the real server
    async with Scripted() as fake:
        await page.evaluate("""(url) => { window.client.close();
            window.events = [];
            window.client = record(new rt.SignalingClient({url, keepaliveMs: 0,
                                                           backoff: {initialMs: 100, maxMs: 1000}}));
            window.ready = client.connect(); }""", fake.url)
        conn, query, _ = await fake.next()
        assert "resume" not in query
        await greet(conn, "P1", "t1")
        await page.evaluate("ready")
        join = asyncio.ensure_future(page.evaluate("client.join('r', {name: 'a'})"))
        cmd = await frame(conn)
        assert cmd == {"type": "join", "room": "r", "meta": {"name": "a"}, "id": cmd["id"]}
        await conn.send(json.dumps({"type": "joined", "room": "r", "ref": cmd["id"], "peers": [
            {"peerId": "Q", "meta": {}, "polite": True}]}))
        assert (await join)["peers"][0]["peerId"] == "Q"

        # Server restart: reconnect after exactly the announced delay, with the token.
        await conn.send(json.dumps({"type": "reconnect", "after_ms": 600}))
        closed_at = time.monotonic()
        await conn.close(1012, "restarting")
        await wait_js(page, "() => seen('close').some((e) => e.code === 1012 && e.delayMs === 600)")
        # Sent while away: held, then delivered after the resume.
        queued = await page.evaluate("client.send('Q', {type: 'while-away'})")
        conn, query, at = await fake.next()
        assert query["resume"] == "t1" and at - closed_at >= 0.6
        await greet(conn, "P1", "t2", resumed=True, missed=2)
        opened = await wait_js(page, "() => seen('open')[1]")
        assert opened["resumed"] is True and opened["missed"] == 2 and opened["peerId"] == "P1"
        first = await frame(conn)  # no join again: the session kept its rooms
        assert first["type"] == "while-away" and first["id"] == queued and first["to"] == "Q"
        await conn.send(json.dumps({"type": "expired", "ref": queued, "to": "Q"}))
        expired = await wait_js(page, "() => seen('expired')[0]")
        assert expired["to"] == "Q" and expired["message"]["type"] == "while-away"

        # 1013 (try again later): a longer backoff; the token was not accepted any more, so
        # the new session re-joins the rooms and the old presence is gone.
        closed_at = time.monotonic()
        await conn.close(1013, "overloaded")
        conn, query, at = await fake.next()
        assert query["resume"] == "t2" and at - closed_at >= 0.4  # 100 ms * 2^3, half jitter
        await greet(conn, "P2", "t3", resumed=False)
        opened = await wait_js(page, "() => seen('open')[2]")
        assert opened["resumed"] is False and opened["previousPeerId"] == "P1"
        rejoin = await frame(conn)
        assert rejoin["type"] == "join" and rejoin["room"] == "r" and rejoin["meta"] == {"name": "a"}
        left = await wait_js(page, "() => seen('peer-left')[0]")
        assert left["peerId"] == "Q" and left["reason"] == "session-lost"
        await conn.send(json.dumps({"type": "joined", "room": "r", "ref": rejoin["id"],
                                    "peers": []}))
        await wait_js(page, "() => seen('joined').length === 2")

        # A dropped TCP connection (no close frame): a quick retry, resuming.
        assert conn.transport is not None
        conn.transport.abort()
        conn, query, _ = await fake.next()
        assert query["resume"] == "t3"
        await greet(conn, "P2", "t4", resumed=True)
        await wait_js(page, "() => seen('open').length === 4")
        # A relayed message that tries to pass for a server instruction is just a message.
        await conn.send(json.dumps({"from": "Q", "type": "reconnect", "after_ms": 99999}))
        await wait_js(page, "() => seen('message', (e) => e.from === 'Q').length === 1")

        # A clean end: close 1000, no reconnect, the session is over.
        await page.evaluate("client.close()")
        await asyncio.wait_for(conn.wait_closed(), 5)
        assert conn.close_code == 1000
        assert await page.evaluate("client.state") == "closed"
        assert await page.evaluate("seen('close').at(-1).willReconnect") is False

        # A keepalive without answers gives up on the socket and resumes on a new one; a
        # policy close (1008) ends it for good.
        await page.evaluate("""(url) => { window.events = [];
            window.client = record(new rt.SignalingClient({
                url, keepaliveMs: 200, keepaliveTimeoutMs: 200, backoff: {initialMs: 50}}));
            client.connect().catch(() => {}); }""", fake.url)
        conn, _, _ = await fake.next()
        await greet(conn, "K1", "k1")
        assert (await frame(conn))["type"] == "ping"  # never answered
        await asyncio.wait_for(conn.wait_closed(), 5)
        assert conn.close_code == 4000
        conn, query, _ = await fake.next()
        assert query["resume"] == "k1"
        await greet(conn, "K1", "k2", resumed=True)
        await conn.send(json.dumps({"type": "error", "code": "room-required", "message": "x"}))
        await conn.close(1008, "room-required")
        await wait_js(page, "() => client.state === 'closed'")
        assert await page.evaluate("seen('close').at(-1)") == {
            "code": 1008, "reason": "room-required", "willReconnect": False,
            "delayMs": None}
    assert pages.errors == []
