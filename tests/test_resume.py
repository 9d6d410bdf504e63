"""Issue 10: session resume and zero-downtime restarts, over real sockets and a real Redis.

Most tests run twice (``topology``): one process with the memory broker, and three
instances on Redis behind a round-robin balancer, where each new connection lands on the
next instance, so a resume is always on another instance than the dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.helpers import TIMEOUT, close_all, open_client, recv_json, send_json
from tests.rawws import OP_CLOSE, OP_TEXT, RawWS, close_code


def with_query(base: str, **query: str) -> str:
    return base + "?" + "&".join(f"{k}={v}" for k, v in query.items())


async def joined_client(base: str, room: str, meta: dict[str, Any] | None = None,
                        ) -> tuple[ClientConnection, dict[str, Any]]:
    ws, greeting = await open_client(base)
    await send_json(ws, {"type": "join", "room": room, "meta": meta or {}, "id": "j"})
    joined = await recv_json(ws)
    assert joined["type"] == "joined", joined
    return ws, greeting


def drop(ws: ClientConnection) -> None:
    """The network goes away: no close frame, the TCP connection is reset."""
    ws.transport.abort()


async def sync(ws: ClientConnection, skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Everything ``ws`` receives until the answer to a ping of ours (the server has handled
    all we sent before it), minus types in ``skip``."""
    ref = f"sync{random.random()}"
    await send_json(ws, {"type": "ping", "id": ref})
    seen = []
    while True:
        msg = await recv_json(ws)
        if msg == {"type": "pong", "ref": ref}:
            return seen
        if msg.get("type") not in skip:
            seen.append(msg)


async def wait_parked(where: Any, n: int = 1) -> None:
    """Until the server (every instance of a cluster) logs ``n`` parked sessions."""
    servers = where.cluster.instances if hasattr(where, "cluster") else [where]

    def parked() -> int:
        return sum(1 for s in servers for e in list(s.lines)
                   if e.get("event") == "disconnect" and e.get("parked"))

    await asyncio.to_thread(lambda: servers[0].wait_for(lambda e: parked() >= n, 10))


async def parked_pair(where: Any, url_a: str = "", url_b: str = "", meta_a: Any = None,
                      meta_b: Any = None) -> tuple[str, dict[str, Any], ClientConnection,
                                                   dict[str, Any]]:
    """Two members of a new room (a through ``url_a``, b through ``url_b``); a's network
    drops and ``where`` parks its session. Returns (room, a's greeting, b, b's greeting)."""
    room = f"r{random.randrange(10**9)}"
    a, ga = await joined_client(url_a or where.url(), room, meta_a)
    b, gb = await joined_client(url_b or where.url(), room, meta_b)
    assert (await recv_json(a))["type"] == "peer-joined"
    drop(a)
    await wait_parked(where)
    return room, ga, b, gb


async def test_greeting_carries_a_single_use_resume_token(topology):
    ws1, g1 = await open_client(topology.url())
    ws2, g2 = await open_client(topology.url())
    for g in (g1, g2):
        assert g["resumed"] is False
        assert isinstance(g["resumeToken"], str) and len(g["resumeToken"]) >= 43  # 256 bits
    assert g1["resumeToken"] != g2["resumeToken"]
    await close_all([ws1, ws2])


async def test_resume_keeps_peer_id_rooms_meta_and_delivers_the_gap_in_order(topology):
    room, ga, b, gb = await parked_pair(topology, meta_a={"name": "a"},
                                        meta_b={"name": "b"})
    # The gap: addressed messages and room messages, with and without ids.
    sent = []
    for n in range(6):
        msg = {"type": "offer" if n % 2 else "note", "n": n, "id": f"m{n}"}
        if n % 2:
            msg["to"] = ga["peerId"]
        sent.append(msg)
        await send_json(b, msg)
    await send_json(b, {"type": "note", "n": 6})  # no id
    assert await sync(b) == []  # nothing refused, no peer-left

    a2, g2 = await open_client(with_query(topology.url(), resume=ga["resumeToken"]))
    assert g2["resumed"] is True and g2["missed"] == 0
    assert g2["peerId"] == ga["peerId"]
    assert g2["resumeToken"] != ga["resumeToken"]
    got = [await recv_json(a2) for _ in range(7)]
    assert [m["n"] for m in got] == list(range(7))
    assert all(m["from"] == gb["peerId"] for m in got)
    assert await sync(a2) == []  # each exactly once

    # Still in the room, same meta and join order; the others saw no leave and no join.
    c, _ = await open_client(topology.url())
    await send_json(c, {"type": "join", "room": room, "id": "j"})
    snapshot = (await recv_json(c))["peers"]
    assert [(p["peerId"], p["meta"]) for p in snapshot] == [
        (ga["peerId"], {"name": "a"}), (gb["peerId"], {"name": "b"})]
    await send_json(a2, {"type": "answer", "to": gb["peerId"], "id": "back"})
    first = await recv_json(b)
    assert first["type"] == "peer-joined"  # c's join, and nothing about a before it
    assert await recv_json(b) == {"type": "answer", "to": gb["peerId"], "id": "back",
                                  "from": ga["peerId"]}
    await close_all([a2, b, c])


async def test_resume_on_the_same_instance_of_a_cluster(make_cluster):
    cluster = make_cluster(2)
    _, ga, b, _ = await parked_pair(cluster.front, cluster.urls[0], cluster.urls[1])
    await send_json(b, {"type": "offer", "to": ga["peerId"], "id": "gap"})
    assert await sync(b) == []
    a2, g2 = await open_client(with_query(cluster.urls[0], resume=ga["resumeToken"]))
    assert (g2["resumed"], g2["peerId"], g2["missed"]) == (True, ga["peerId"], 0)
    assert (await recv_json(a2))["id"] == "gap"
    await send_json(b, {"type": "offer", "to": ga["peerId"], "id": "after"})
    assert (await recv_json(a2))["id"] == "after"
    assert await sync(b) == []
    await close_all([a2, b])


async def test_restart_tells_clients_to_reconnect_and_relays_what_they_send_meanwhile(
        make_cluster):
    """SIGTERM with a broker: `reconnect`, then 1012; a message the client sends after the
    close frame left the server, before it answers it, is still relayed."""
    cluster = make_cluster(2, "--drain-spread", "0.2")
    room = f"r{random.randrange(10**9)}"
    inst = cluster.instance(0)
    raw, g = await RawWS.open(inst.host, inst.port)
    raw.send_json({"type": "join", "room": room, "id": "j"})
    assert (await raw.recv_json())["type"] == "joined"
    b, gb = await joined_client(cluster.urls[1], room)
    assert (await raw.recv_json())["type"] == "peer-joined"
    inst.proc.send_signal(signal.SIGTERM)
    reconnect = await raw.recv_json()
    assert reconnect["type"] == "reconnect" and 0 <= reconnect["after_ms"] < 1000
    op, payload = await raw.recv_frame()
    assert (op, close_code(payload)) == (OP_CLOSE, 1012)
    raw.send(OP_TEXT, b'{"type":"late","to":"%s","id":1}' % gb["peerId"].encode())
    raw.send(OP_CLOSE, (1012).to_bytes(2, "big"))
    assert await recv_json(b) == {"type": "late", "to": gb["peerId"], "id": 1,
                                  "from": g["peerId"]}
    a2, g2 = await open_client(with_query(cluster.urls[1], resume=g["resumeToken"]))
    assert (g2["resumed"], g2["peerId"]) == (True, g["peerId"])
    assert await sync(b) == []  # no peer-left, no peer-joined
    raw.close()
    await close_all([a2, b])


async def test_past_the_window_senders_get_expired_and_one_peer_left(run_topology):
    srv = run_topology("--resume-window", "1")
    room, ga, b, _ = await parked_pair(srv)
    for n in range(3):
        await send_json(b, {"type": "offer", "to": ga["peerId"], "id": n})
    await send_json(b, {"type": "note"})  # a room message without id: nobody to tell
    assert await sync(b) == []
    seen = [await recv_json(b) for _ in range(4)]
    expired = [m for m in seen if m["type"] == "expired"]
    left = [m for m in seen if m["type"] == "peer-left"]
    assert sorted(m["ref"] for m in expired) == [0, 1, 2]
    assert all(m["to"] == ga["peerId"] for m in expired)
    assert left == [{"type": "peer-left", "room": room, "peerId": ga["peerId"],
                     "reason": "timeout"}]
    assert await sync(b) == []  # once each
    late, g = await open_client(with_query(srv.url(), resume=ga["resumeToken"]))
    assert g["resumed"] is False and g["peerId"] != ga["peerId"]
    await close_all([b, late])


async def test_queue_overflow_is_reported_to_senders_and_in_missed(run_topology):
    srv = run_topology("--resume-queue-messages", "3")
    _, ga, b, _ = await parked_pair(srv)
    for n in range(5):
        await send_json(b, {"type": "offer", "to": ga["peerId"], "id": n})
    refused = await sync(b)
    for _ in range(2 - len(refused)):  # from another instance they may come after the pong
        refused.append(await recv_json(b))
    assert sorted((m["type"], m["ref"]) for m in refused) == [("expired", 3), ("expired", 4)]
    a2, g2 = await open_client(with_query(srv.url(), resume=ga["resumeToken"]))
    assert (g2["resumed"], g2["missed"], g2["peerId"]) == (True, 2, ga["peerId"])
    assert [(await recv_json(a2))["id"] for _ in range(3)] == [0, 1, 2]
    assert await sync(a2) == []
    await close_all([a2, b])


async def test_two_connections_racing_with_one_token_end_with_one_session(topology):
    a, ga = await open_client(topology.url())
    drop(a)
    await wait_parked(topology)
    url = with_query(topology.url(), resume=ga["resumeToken"])
    (w1, g1), (w2, g2) = await asyncio.gather(open_client(url), open_client(url))
    outcomes = sorted([(g1["resumed"], g1["peerId"] == ga["peerId"]),
                       (g2["resumed"], g2["peerId"] == ga["peerId"])])
    assert outcomes == [(False, False), (True, True)]  # the loser: a fresh session
    await close_all([w1, w2])


async def test_resuming_a_live_session_closes_the_old_connection_4409(topology):
    room = f"r{random.randrange(10**9)}"
    a, ga = await joined_client(topology.url(), room)
    a2, g2 = await open_client(with_query(topology.url(), resume=ga["resumeToken"]))
    assert (g2["resumed"], g2["peerId"]) == (True, ga["peerId"])
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(a.recv(), TIMEOUT)
    assert a.protocol.close_rcvd is not None and a.protocol.close_rcvd.code == 4409
    await send_json(a2, {"type": "note", "room": room})  # still a member
    assert await sync(a2) == []
    await close_all([a2])


async def test_clean_close_is_announced_at_once_and_ends_the_token(topology):
    room = f"r{random.randrange(10**9)}"
    a, ga = await joined_client(topology.url(), room)
    b, _ = await joined_client(topology.url(), room)
    await recv_json(a)
    await a.close(1000)
    assert await recv_json(b) == {"type": "peer-left", "room": room, "peerId": ga["peerId"],
                                  "reason": "closed"}
    a2, g2 = await open_client(with_query(topology.url(), resume=ga["resumeToken"]))
    assert g2["resumed"] is False and g2["peerId"] != ga["peerId"]
    await close_all([a2, b])


async def test_failed_resumes_are_throttled_per_address(run_server):
    srv = run_server("--auth-fail-limit", "3")
    for n in range(4):
        ws, g = await open_client(with_query(srv.url(), resume=f"guess{n}"))
        assert g["resumed"] is False
        await ws.close()
    with pytest.raises(InvalidStatus) as refused:
        await open_client(srv.url())
    assert refused.value.response.status_code == 429


async def test_resume_after_sigkill_of_the_owning_instance(make_cluster):
    cluster = make_cluster(3, "--presence-ttl", "2")
    room = f"r{random.randrange(10**9)}"
    a, ga = await joined_client(cluster.urls[0], room, {"k": 1})
    b, gb = await joined_client(cluster.urls[1], room)
    assert (await recv_json(a))["type"] == "peer-joined"
    cluster.kill(0)
    # While nobody holds a, what b sends it is refused: b is told.
    await send_json(b, {"type": "offer", "to": ga["peerId"], "id": "gap"})
    told = await recv_json(b)
    assert (told["type"], told["code"], told["ref"]) == ("error", "broker-unavailable", "gap")
    # The lease runs out and another instance takes note (parked, not announced).
    await asyncio.to_thread(cluster.logged, lambda e: e.get("event") == "node lost")
    a2, g2 = await open_client(with_query(cluster.urls[2], resume=ga["resumeToken"]))
    assert (g2["resumed"], g2["peerId"], g2["missed"]) == (True, ga["peerId"], 0)
    await send_json(b, {"type": "offer", "to": ga["peerId"], "id": "after"})
    got = await recv_json(a2)
    assert (got["id"], got["from"]) == ("after", gb["peerId"])
    assert await sync(b) == []  # no peer-left, no peer-joined, nothing refused
    c, _ = await open_client(cluster.urls[1])
    await send_json(c, {"type": "join", "room": room})
    peers = (await recv_json(c))["peers"]
    assert [(p["peerId"], p["meta"]) for p in peers] == [(ga["peerId"], {"k": 1}),
                                                         (gb["peerId"], {})]
    await close_all([a2, b, c])


# --- the rolling restart -------------------------------------------------------------------

class Resilient:
    """A client that keeps its session: on ``reconnect`` or a close it connects again
    (to a live instance that is not draining) with its resume token, and checks that it
    got its own session back. It sends numbered ``to`` messages to its roommates while
    connected and counts what it receives."""

    def __init__(self, test: RollingRestart, index: int, room: str) -> None:
        self.test = test
        self.index = index
        self.room = room
        self.peer_id = ""
        self.token = ""
        self.ws: ClientConnection | None = None
        self.mates: list[str] = []
        self.seq = 0
        self.resumes = 0
        self.connected = asyncio.Event()

    async def start(self) -> None:
        ws, g = await self._open(None)
        self.peer_id = g["peerId"]
        await send_json(ws, {"type": "join", "room": self.room, "id": "j"})
        joined = await recv_json(ws)
        assert joined["type"] == "joined"
        self.ws = ws
        self.connected.set()

    async def _open(self, token: str | None) -> tuple[ClientConnection, dict[str, Any]]:
        while True:
            url = self.test.pick_url()
            try:
                ws, g = await open_client(url if token is None else
                                          with_query(url, resume=token))
            except (InvalidStatus, OSError):  # a draining or dead instance: the next one
                await asyncio.sleep(0.05)  # backoff before the next attempt, not a sync
                continue
            self.token = g["resumeToken"]
            return ws, g

    async def run(self) -> None:
        while not self.test.done:
            ws = self.ws
            assert ws is not None
            try:
                msg = await recv_json(ws, timeout=30)
            except ConnectionClosed:
                await self._reconnect()
                continue
            self.test.receive(self, msg)
            if msg.get("type") == "reconnect":
                with contextlib.suppress(ConnectionClosed):
                    while True:  # read to the close; what comes before it counts
                        self.test.receive(self, await recv_json(ws, timeout=30))
                await self._reconnect()

    async def _reconnect(self) -> None:
        self.connected.clear()
        ws, g = await self._open(self.token)
        assert g["resumed"] is True and g["peerId"] == self.peer_id, (self.peer_id, g)
        self.resumes += 1
        self.test.missed += g["missed"]
        self.ws = ws
        self.connected.set()

    async def send_loop(self) -> None:
        while not self.test.stop_sending:
            await self.connected.wait()
            to = random.choice(self.mates)
            self.seq += 1
            key = (self.peer_id, to)
            msg = {"type": "candidate", "to": to, "id": self.seq, "seq": self.seq}
            try:
                await send_json(self.ws, msg)
            except ConnectionClosed:
                self.seq -= 1  # never reached the server: not sent
                self.connected.clear()
                continue
            self.test.sent[key].append(self.seq)
            self.test.total_sent += 1
            await asyncio.sleep(self.test.interval)  # the load's pace


class RollingRestart:
    def __init__(self, cluster: Any, interval: float) -> None:
        self.cluster = cluster
        self.interval = interval
        self.draining: set[int] = set()
        self.done = False
        self.stop_sending = False
        from collections import defaultdict
        self.sent: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.delivered: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.expired: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.total_sent = 0
        self.accounted = 0
        self.duplicates = 0
        self.other: list[dict[str, Any]] = []
        self.missed = 0
        self.reconnects = 0
        self.progress = asyncio.Event()

    def pick_url(self) -> str:
        live = [i for i in self.cluster.live() if i not in self.draining]
        return self.cluster.urls[random.choice(live)]

    def receive(self, client: Resilient, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "candidate":
            key = (msg["from"], client.peer_id)
            got = self.delivered[key]
            if msg["seq"] in got:
                self.duplicates += 1
            got.append(msg["seq"])
            self.accounted += 1
        elif kind == "expired":
            self.expired[(client.peer_id, msg["to"])].append(msg["ref"])
            self.accounted += 1
        elif kind == "reconnect":
            self.reconnects += 1
        elif kind not in ("peer-joined", "pong"):
            self.other.append(msg)
        self.progress.set()

    async def settled(self, timeout: float) -> None:
        """Until every message sent is delivered or expired (or ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.accounted < self.total_sent and loop.time() < deadline:
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), deadline - loop.time())


async def test_rolling_restart_loses_nothing_and_keeps_every_peer_id(make_cluster):
    """Three instances, 200 peers in 50 rooms sending `to` messages with ids all along;
    each instance in turn is drained (SIGTERM: reconnect + 1012) and started again.
    Every peer keeps its peerId; every message is delivered once, in order per sender,
    or its sender got `expired`."""
    cluster = make_cluster(3, "--drain-timeout", "10", "--drain-spread", "1")
    test = RollingRestart(cluster, interval=0.25)
    clients = [Resilient(test, i, f"rr{i // 4}") for i in range(200)]
    await asyncio.gather(*(c.start() for c in clients))
    for c in clients:
        c.mates = [m.peer_id for m in clients if m.room == c.room and m is not c]
    readers = [asyncio.ensure_future(c.run()) for c in clients]
    senders = [asyncio.ensure_future(c.send_loop()) for c in clients]

    async def restarts() -> None:
        for i in range(3):
            test.draining.add(i)
            status = await asyncio.to_thread(cluster.instance(i).stop, signal.SIGTERM, 30)
            assert status == 0
            await asyncio.to_thread(cluster.add, 1)

    try:
        # A client that fails (a resume that did not resume) fails the test at once.
        restarting = asyncio.ensure_future(restarts())
        await asyncio.wait([restarting, *readers], return_when=asyncio.FIRST_COMPLETED)
        for t in [restarting, *readers]:
            if t.done():
                t.result()  # raises what failed
        assert restarting.done(), "a client stopped before the restarts ended"
        test.stop_sending = True
        await asyncio.gather(*senders)
        await test.settled(20)
    finally:
        test.done = True
        for t in senders + readers:
            t.cancel()
        await asyncio.gather(*senders, *readers, return_exceptions=True)
        await close_all([c.ws for c in clients if c.ws is not None])

    sent = sum(len(v) for v in test.sent.values())
    delivered = sum(len(v) for v in test.delivered.values())
    expired = sum(len(v) for v in test.expired.values())
    print(f"rolling restart: sent {sent}, delivered {delivered}, expired {expired}, "
          f"duplicates {test.duplicates}, reconnects {test.reconnects}, "
          f"resumes {sum(c.resumes for c in clients)}, missed {test.missed}")
    assert test.other == []
    assert test.duplicates == 0
    assert sent > 2000 and test.reconnects >= 200
    assert delivered + expired == sent, (delivered, expired, sent)
    for key, seqs in test.sent.items():  # each message exactly one fate, order per sender
        got = test.delivered[key]
        assert got == sorted(got), key
        assert sorted(got + test.expired[key]) == seqs, key
    assert all(c.resumes >= 1 for c in clients)


async def test_parked_sessions_are_capped_at_max_connections(run_server):
    """Parked sessions hold memory without a socket: at most --max-connections of them; a
    drop past that ends its session at once."""
    srv = run_server("--max-connections", "2")
    room = f"r{random.randrange(10**9)}"
    watcher, _ = await joined_client(srv.url(), room)
    ids = []
    for n in range(3):
        ws, g = await joined_client(srv.url(), room)
        ids.append(g["peerId"])
        assert (await recv_json(watcher))["type"] == "peer-joined"
        drop(ws)
        if n < 2:
            await wait_parked(srv, n + 1)
    left = await recv_json(watcher)
    assert left == {"type": "peer-left", "room": room, "peerId": ids[2], "reason": "closed"}
    assert await sync(watcher) == []  # the first two are parked: no peer-left
    await close_all([watcher])


async def test_resume_while_redis_is_down_opens_a_fresh_session(make_cluster, redis_server):
    cluster = make_cluster(2)
    _, ga, b, _ = await parked_pair(cluster.front, cluster.urls[0], cluster.urls[1])
    redis_server.stop()
    try:
        a2, g2 = await open_client(with_query(cluster.urls[1], resume=ga["resumeToken"]))
        assert g2["resumed"] is False and g2["peerId"] != ga["peerId"]
    finally:
        redis_server.start()
    await close_all([a2, b])
