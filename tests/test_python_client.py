"""Issue 11, item 5: the Python client (rtcsignal.client) against real servers.

``rtcsignal serve`` subprocesses (one, a restarted one, and two instances on a real Redis
behind a round-robin balancer) for rooms, messages, request/response, resume, restarts and
refusals; a scripted websockets server (real sockets, the server's side written out step by
step) for the reconnect rules that a real server does not produce on demand: the delays
after 1006, 1013 and ``reconnect.after_ms``, the token sent back, and the rejoin after a
session that could not be resumed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from websockets.asyncio.server import ServerConnection, serve

from rtcsignal.client import Backoff, SignalingClient, SignalingError, backoff_delay
from tests.helpers import TIMEOUT, open_client
from tests.test_nginx import free_port

Event = dict[str, Any]
ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """Every event of ``kinds`` a client emits, in order, from the moment it is made."""

    def __init__(self, client: SignalingClient, *kinds: str) -> None:
        self.events: list[tuple[str, Any]] = []
        for kind in kinds:
            client.on(kind, lambda detail, kind=kind: self.events.append((kind, detail)))

    def of(self, kind: str) -> list[Any]:
        return [d for k, d in self.events if k == kind]


@contextlib.asynccontextmanager
async def clients(*urls: str, **options: Any) -> AsyncIterator[list[SignalingClient]]:
    """Connected clients, closed after the block."""
    made = [SignalingClient(url, **options) for url in urls]
    try:
        for client in made:
            await client.connect(timeout=TIMEOUT)
        yield made
    finally:
        for client in made:
            await asyncio.wait_for(client.close(), TIMEOUT)


def until(client: SignalingClient, kind: str, pred: Callable[[Any], bool] | None = None,
          timeout: float = TIMEOUT) -> asyncio.Future[Any]:
    """The client's next ``kind`` event (``pred`` accepts), subscribed now."""
    return client.wait_for(kind, pred, timeout=timeout)


async def until_true(client: SignalingClient, check: Callable[[], bool],
                     kinds: tuple[str, ...] = ("joined", "peer-joined", "peer-left", "open"),
                     timeout: float = TIMEOUT) -> None:
    """Until ``check()`` holds, looked at again after each of the client's ``kinds``
    events."""
    changed = asyncio.Event()
    offs = [client.on(kind, lambda _: changed.set()) for kind in kinds]
    try:
        async with asyncio.timeout(timeout):
            while not check():
                changed.clear()
                await changed.wait()
    finally:
        for off in offs:
            off()


async def next_message(client: SignalingClient, kind: str) -> Event:
    """The next message of type ``kind`` from ``async for``, skipping others."""
    async with asyncio.timeout(TIMEOUT):
        async for message in client:
            if message.get("type") == kind:
                return message
    raise AssertionError(f"the client closed before a {kind!r} message")


# --- one server --------------------------------------------------------------------------


async def test_rooms_messages_and_requests(server):
    room = "py-" + os.urandom(3).hex()
    async with clients(server.url(), server.url(), server.url()) as (a, b, c):
        assert a.state == "open" and a.peer_id == a.greeting["peerId"]
        assert a.greeting["resumed"] is False
        assert await a.join(room, {"name": "a"}) == {"room": room, "peers": []}
        seen = Recorder(a, "peer-joined", "peer-left")
        joined = until(a, "peer-joined")
        snapshot = await b.join(room, {"name": "b"})
        assert snapshot == {"room": room, "peers": [
            {"peerId": a.peer_id, "meta": {"name": "a"}, "polite": True}]}
        await joined
        assert seen.of("peer-joined")[0]["peerId"] == b.peer_id
        assert a.peers(room) == [{"peerId": b.peer_id, "meta": {"name": "b"}, "polite": False}]
        assert a.polite(b.peer_id) is False and b.polite(a.peer_id) is True
        assert await a.join(room) == {"room": room, "peers": []}  # the same join, once

        # To one peer, to the room, and the original broadcast; all through `async for`.
        ref = b.send(a.peer_id, {"type": "offer", "sdp": "v=0"})
        got = await next_message(a, "offer")
        assert (got["from"], got["sdp"], got["id"], got["to"]) == (b.peer_id, "v=0", ref, a.peer_id)
        b.broadcast(room, {"type": "chat", "text": "hi all"})
        assert (await next_message(a, "chat"))["text"] == "hi all"
        # The server's error about a message nobody awaits is an `error` event, by ref.
        error = until(b, "error")
        ref = b.send(a.peer_id, {"type": "peer-left", "room": room, "peerId": c.peer_id})
        assert ((await error).code, (await error).ref) == ("reserved-type", ref)

        # Request/response by id/ref.
        async def answer() -> None:
            async for message in b:
                if message["type"] == "get-status":
                    b.reply(message, {"type": "status", "ok": True, "n": message["n"] + 1})

        answering = asyncio.create_task(answer())
        try:
            reply = await a.request(b.peer_id, {"type": "get-status", "n": 41}, timeout=TIMEOUT)
            assert (reply["type"], reply["n"], reply["from"]) == ("status", 42, b.peer_id)
            # The server's error about a request is the request's error.
            with pytest.raises(SignalingError) as err:
                await a.request(c.peer_id, {"type": "get-status", "n": 0}, timeout=TIMEOUT)
            assert err.value.code == "unknown-peer" and err.value.ref is not None
            with pytest.raises(SignalingError) as err:
                await a.request(b.peer_id, {"type": "nobody-answers"}, timeout=0.3)
            assert err.value.code == "timeout"
        finally:
            answering.cancel()
        with pytest.raises(SignalingError) as err:
            await a.join("bad room!")
        assert err.value.code == "invalid-room"
        assert "bad room!" not in a.rooms
        assert await a.ping() < 1

        # c leaves the default room by joining; a leaves; b sees it go.
        gone = until(b, "peer-left")
        await a.leave(room)
        left = await gone
        assert (left["peerId"], left["reason"]) == (a.peer_id, "left")
        assert a.rooms == [] and b.peers(room) == []


async def test_close_ends_the_session_and_the_iteration(server):
    room = "py-" + os.urandom(3).hex()
    async with clients(server.url()) as (b,):
        a = SignalingClient(server.url())
        await a.connect()
        await a.join(room)
        await b.join(room)
        b.send(a.peer_id, {"type": "one"})
        b.send(a.peer_id, {"type": "two"})
        assert (await next_message(a, "one"))["from"] == b.peer_id
        gone = until(b, "peer-left")
        await a.close()
        assert a.state == "closed"
        assert (await gone)["reason"] == "closed"  # at once, not after a resume window
        # Iteration gives what had arrived, then ends.
        assert [m["type"] async for m in a] == ["two"]
        with pytest.raises(SignalingError):
            a.send(b.peer_id, {"type": "late"})


async def test_dropped_socket_resumes_same_peer_and_delivers_both_ways(server):
    room = "py-" + os.urandom(3).hex()
    async with clients(server.url(), server.url()) as (a, b):
        await a.join(room, {"name": "a"})
        sees_b = until(a, "peer-joined")
        await b.join(room)
        await sees_b
        watch_b = Recorder(b, "peer-left")
        events = Recorder(a, "close", "open", "state")
        peer = a.peer_id
        token = a.greeting["resumeToken"]

        # The network goes: no close frame. Both sides keep sending meanwhile.
        sent_while_away: list[str] = []
        a.on("close", lambda _: sent_while_away.append(a.send(b.peer_id, {"type": "from-a"})))
        reopened = until(a, "open")
        a.socket.transport.abort()
        # Once the server knows (what it wrote to the dead socket before is lost with it),
        # it keeps what is sent to a for the resume.
        await asyncio.to_thread(server.wait_for, lambda e: e.get("event") == "disconnect"
                                and e.get("peer") == peer and e.get("parked"))
        b.send(a.peer_id, {"type": "while-away"})
        opened = await reopened
        assert (opened["resumed"], opened["peerId"], opened["previousPeerId"]) == (True, peer, peer)
        assert a.greeting["resumeToken"] != token  # single use: a new one each greeting
        [close] = events.of("close")
        assert close["code"] == 1006 and close["willReconnect"] is True
        assert 0.25 <= close["delay"] <= 0.5  # the first retry after a working connection
        assert [s["state"] for s in events.of("state")] == ["reconnecting", "open"]
        assert (await next_message(a, "while-away"))["from"] == b.peer_id
        assert len(sent_while_away) == 1
        assert (await next_message(b, "from-a"))["id"] == sent_while_away[0]
        assert a.rooms == [room] and a.peers(room)[0]["peerId"] == b.peer_id
        assert watch_b.of("peer-left") == []  # nobody saw a leave

        # reconnect(): the same, asked for.
        again = await a.reconnect(timeout=TIMEOUT)
        assert again["resumed"] is True and a.peer_id == peer


async def test_session_taken_over_4409_stops_the_client(server):
    async with clients(server.url()) as (a,):
        url = server.url("resume=" + a.greeting["resumeToken"])
        closed = until(a, "close")
        other, greeting = await open_client(url)
        try:
            assert (greeting["resumed"], greeting["peerId"]) == (True, a.peer_id)
            detail = await closed
            assert (detail["code"], detail["willReconnect"]) == (4409, False)
            assert a.state == "closed"
            assert [m async for m in a] == []
        finally:
            await other.close()


async def test_refusals_that_a_retry_cannot_cure_are_final(run_server):
    room_required = run_server("--no-default-room")
    a = SignalingClient(room_required.url())
    events = Recorder(a, "error", "close")
    ended = until(a, "close", lambda d: not d["willReconnect"])
    await a.connect(timeout=TIMEOUT)  # the greeting comes first, then the refusal
    await ended
    assert events.of("error")[0].code == "room-required"
    assert events.of("close")[-1]["code"] == 1008 and a.state == "closed"

    secret = base64.b64encode(os.urandom(32)).decode()
    server = run_server("--auth", "jwt", "--jwt-secret", secret)
    with pytest.raises(SignalingError) as err:
        await SignalingClient(server.url()).connect(timeout=TIMEOUT)
    assert err.value.code == "http-401"

    # A token (a fresh one per connection from a callable) goes in the Authorization header.
    minted: list[str] = []

    def token() -> str:
        minted.append(jwt.encode({"sub": f"bot{len(minted)}", "exp": int(time.time()) + 60},
                                 secret, algorithm="HS256"))
        return minted[-1]

    async with clients(server.url(), server.url(), token=token) as (x, y):
        await x.join("jwt-room")
        snapshot = await y.join("jwt-room")
        assert snapshot["peers"][0]["meta"]["user"] == "bot0"
        await x.reconnect(timeout=TIMEOUT)  # a new token for the new connection
        assert len(minted) == 3 and "token=" not in x.socket.request.path


async def test_crash_without_a_broker_rejoins_as_a_new_peer(run_server):
    """Without a broker a server that crashed and came back cannot resume: the clients come
    back as new peers, get `peer-left` (session-lost) for those they knew, join their rooms again with
    their meta and see each other again; what the old session had pending fails."""
    port = free_port()
    first = run_server("--port", str(port))
    room = "py-" + os.urandom(3).hex()
    fast = Backoff(initial=0.2, max=0.5)
    async with clients(first.url(), first.url(), backoff=fast) as (a, b):
        await a.join(room, {"name": "a"})
        await b.join(room, {"name": "b"})
        old_a, old_b = a.peer_id, b.peer_id
        seen = Recorder(a, "peer-left", "joined", "expired", "open")
        pending = asyncio.ensure_future(a.request(b.peer_id, {"type": "never"}, timeout=30))
        await a.ping()  # the request is out
        queued: list[str] = []
        a.on("close", lambda d: d["willReconnect"] and not queued and queued.append(
            a.send(old_b, {"type": "queued"})))
        reopened = until(a, "open", timeout=15)
        first.stop(signal.SIGKILL)  # a crash: no close frame, no peer-left from it
        run_server("--port", str(port))
        opened = await reopened
        assert (opened["resumed"], opened["previousPeerId"]) == (False, old_a)
        assert a.peer_id != old_a
        with pytest.raises(SignalingError) as err:
            await pending
        assert err.value.code == "session-lost"
        [left] = seen.of("peer-left")
        assert (left["peerId"], left["reason"]) == (old_b, "session-lost")
        [expired] = seen.of("expired")
        assert (expired["ref"], expired["reason"]) == (queued[0], "session-lost")
        # Both are back in the room as new peers, with their meta.
        await until_true(b, lambda: b.peer_id != old_b and b.state == "open", timeout=15)
        for me, other, name in ((a, b, "b"), (b, a, "a")):
            await until_true(me, lambda me=me, other=other: [
                p["peerId"] for p in me.peers(room)] == [other.peer_id])
            assert me.peers(room)[0]["meta"] == {"name": name}
        assert {a.polite(b.peer_id), b.polite(a.peer_id)} == {True, False}
        assert seen.of("joined")[0]["room"] == room


async def test_the_guide_example_runs_verbatim(server):
    """docs/python-client.md's first program, as written, with only its URL pointed here."""
    doc = (ROOT / "docs" / "python-client.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    assert 'URL = "ws://127.0.0.1:8083/signaling"' in code
    code = code.replace("ws://127.0.0.1:8083/signaling", server.url())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert (proc.returncode, out.decode()) == (0, "load: 0.42 from the bot\n")


# --- two instances on Redis ----------------------------------------------------------------


async def test_resume_on_the_other_instance_and_follow_a_restart(make_cluster):
    """Behind a round-robin balancer over two instances on Redis: a dropped socket resumes on
    the other instance with the same peer id; then that instance is stopped (SIGTERM:
    `reconnect` with after_ms, close 1012) and the client waits exactly after_ms and resumes
    on the first one. The peer in the room sees no one leave and gets every message."""
    cluster = make_cluster(2, "--drain-spread", "1")
    front = cluster.front
    room = "py-" + os.urandom(3).hex()
    # a through the balancer (its connections alternate between the instances), b on one
    # instance directly.
    async with clients(front.url(), cluster.urls[0]) as (a, b):
        await a.join(room)
        await b.join(room)
        peer = a.peer_id
        home = await asyncio.to_thread(cluster.instance_of, peer)
        watch_b = Recorder(b, "peer-left")

        reopened = until(a, "open")
        a.socket.transport.abort()
        opened = await reopened
        assert opened["resumed"] and a.peer_id == peer
        resumed_on, _ = await asyncio.to_thread(
            cluster.logged, lambda e: e.get("event") == "resume" and e.get("peer") == peer)
        assert resumed_on == 1 - home

        raw = Recorder(a, "raw", "close")
        got: list[int] = []

        async def count() -> None:
            async for message in a:
                if message["type"] == "seq":
                    got.append(message["n"])

        counting = asyncio.create_task(count())
        try:
            for n in range(5):
                b.send(peer, {"type": "seq", "n": n})
            reopened = until(a, "open", timeout=30)
            status = await asyncio.to_thread(cluster.terminate, resumed_on, 30)
            assert status == 0  # drained: its sessions resumed elsewhere
            for n in range(5, 10):
                b.send(peer, {"type": "seq", "n": n})
            opened = await reopened
            assert opened["resumed"] and a.peer_id == peer
            await asyncio.to_thread(cluster.instance(home).wait_for, lambda e: e.get(
                "event") == "resume" and e.get("peer") == peer, 5)
            [told] = [r["message"] for r in raw.of("raw") if r["direction"] == "in"
                      and r["message"].get("type") == "reconnect"]
            [close] = raw.of("close")
            assert close["code"] == 1012 and close["delay"] == told["after_ms"] / 1000
            await until_true(a, lambda: len(got) >= 10, kinds=("message",))
            assert got == list(range(10))
        finally:
            counting.cancel()
        assert watch_b.of("peer-left") == []


# --- the reconnect rules, against a scripted server -------------------------------------------


class Scripted:
    """A websockets server on loopback whose every connection runs ``script(ws, n)`` (n
    counts connections from 0); records each connection's query and time."""

    def __init__(self, script: Callable[[ServerConnection, int], Awaitable[None]]) -> None:
        self.script = script
        self.queries: list[dict[str, list[str]]] = []
        self.times: list[float] = []
        self.received: list[list[Event]] = []

    async def handler(self, ws: ServerConnection) -> None:
        n = len(self.queries)
        self.queries.append(parse_qs(urlsplit(ws.request.path).query))
        self.times.append(time.monotonic())
        self.received.append([])
        await self.script(ws, n)

    async def recv(self, ws: ServerConnection, n: int) -> Event:
        message = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        self.received[n].append(message)
        return message


def greeting(peer: str, token: str, resumed: bool = False) -> str:
    return json.dumps({"type": "connected", "message": "Connected to signaling server",
                       "clientsCount": 1, "peerId": peer, "resumeToken": token,
                       "resumed": resumed})


@contextlib.asynccontextmanager
async def scripted(script: Callable[[ServerConnection, int], Awaitable[None]],
                   ) -> AsyncIterator[tuple[Scripted, str]]:
    s = Scripted(script)
    async with serve(s.handler, "127.0.0.1", 0) as srv:
        port = srv.sockets[0].getsockname()[1]
        yield s, f"ws://127.0.0.1:{port}/signaling"


async def test_reconnect_rules_delays_token_and_rejoin():
    """1: a greeting, then `reconnect` after_ms 300 and close 1012; 2: resumed, then 1013;
    3: resumed, then a drop (no close frame); 4: a fresh session (not resumed): the client
    joins its room again; 5: 4409, the end."""
    async def script(ws: ServerConnection, n: int) -> None:
        resumed = n in (1, 2)
        await ws.send(greeting("P" if n < 3 else "Q", f"t{n}", resumed))
        if n == 0:
            join = await s.recv(ws, n)
            await ws.send(json.dumps({"type": "joined", "room": join["room"], "peers": [],
                                      "ref": join["id"]}))
            await ws.send(json.dumps({"type": "reconnect", "after_ms": 300}))
            await ws.close(1012, "restart")
        elif n == 1:
            await ws.close(1013, "try again later")
        elif n == 2:
            ws.transport.abort()
        elif n == 3:
            join = await s.recv(ws, n)
            await ws.send(json.dumps({"type": "joined", "room": join["room"], "peers": [],
                                      "ref": join["id"]}))
            await ws.close(4409, "session taken")

    async with scripted(script) as (s, url):
        backoff = Backoff(initial=0.04, max=10, factor=2, jitter=0.5)
        client = SignalingClient(url, backoff=backoff)
        events = Recorder(client, "close", "open", "joined")
        final = until(client, "close", lambda d: not d["willReconnect"], timeout=10)
        await client.connect(timeout=TIMEOUT)
        await client.join("lobby", {"name": "py"})
        await final

    closes = events.of("close")
    assert [c["code"] for c in closes] == [1012, 1013, 1006, 4409]
    assert [c["willReconnect"] for c in closes] == [True, True, True, False]
    # after_ms exactly; 1013 at least the fourth backoff step; a drop from the first step.
    assert closes[0]["delay"] == 0.3
    assert 0.16 <= closes[1]["delay"] <= 0.32
    assert 0.02 <= closes[2]["delay"] <= 0.04
    gaps = [b - a for a, b in zip(s.times, s.times[1:], strict=False)]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.16, gaps
    # Each reconnect sends back the last greeting's token.
    assert [q.get("resume") for q in s.queries] == [None, ["t0"], ["t1"], ["t2"]]
    opens = events.of("open")
    assert [(o["resumed"], o["peerId"]) for o in opens] == [
        (False, "P"), (True, "P"), (True, "P"), (False, "Q")]
    # The fresh session joined the room again, with its meta; resumed ones did not.
    assert s.received[3] == [{"type": "join", "room": "lobby", "id": s.received[3][0]["id"],
                              "meta": {"name": "py"}}]
    assert s.received[1] == s.received[2] == []
    assert [j["room"] for j in events.of("joined")] == ["lobby", "lobby"]
    assert client.state == "closed"


def test_backoff_grows_to_its_cap_with_jitter_below_the_step():
    b = Backoff(initial=0.5, max=30, factor=2, jitter=0.5)
    for attempt, step in [(0, 0.5), (1, 1), (3, 4), (6, 30), (20, 30)]:
        delays = [backoff_delay(attempt, b) for _ in range(200)]
        assert all(step * 0.5 <= d <= step for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > step * 0.2  # jittered, not one value
    assert backoff_delay(3, Backoff(jitter=0)) == 4
