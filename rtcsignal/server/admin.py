"""The admin API: ``/admin/...`` on the HTTP port, for operators, guarded by a bearer token.

    GET  /admin/stats                       instances, connections, rooms and sizes, rates
    GET  /admin/rooms/{room}                members with their meta, in join order
    POST /admin/rooms/{room}/close          every member disconnected (close 1008)
    POST /admin/peers/{peerId}/disconnect   one peer disconnected (close 1008)

Without ``--admin-token`` (or ``--admin-token-file``) every ``/admin/`` path is 404, as any
unknown path. With one, a request needs ``Authorization: Bearer <token>``: the token is
compared in constant time, and a missing or wrong one is a failed attempt of the client's
address, throttled like a failed JWT (401, then 429 for a minute past ``--auth-fail-limit``;
``security/admission.py``).

Cluster-wide with ``--broker``: the instance that gets the request asks every node of the
deployment (``P:nodes`` in Redis) over their node channels, a request/reply of kind ``Q``
(``redis/broker.py``), waits at most ``QUERY_TIMEOUT`` for the answers and merges them; nodes
that did not answer are listed in ``unreachable``. Every node answers for its own peers, so a
peer or room on another instance (or another worker) is found and closed there, also after it
resumed on a node other than the one its id names. Stats come from the same request/reply
rather than Redis's per-node counts: rooms with their sizes and message rates are only known
by the nodes themselves.

A disconnected peer's session ends for good: close 1008 with reason ``disconnected by admin``
(or ``room closed``), which the browser and Python clients treat as final (no reconnect), and
its rooms get ``peer-left`` (reason ``closed``). A parked session (waiting for a resume) is
ended at once (``peer-left`` reason ``timeout``, its kept messages' senders told ``expired``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable
from typing import Any

import orjson

from rtcsignal.core.hub import ROOM_NAME, Peer
from rtcsignal.core.resume import Mailbox
from rtcsignal.protocol import frames
from rtcsignal.protocol.http import HttpError, Request
from rtcsignal.server import workers

log = logging.getLogger("rtcsignal")

JSON = "application/json"
#: Seconds to wait for the other nodes' answers.
QUERY_TIMEOUT = 2.0
#: Message rates are taken over the last RATE_WINDOW seconds, sampled every RATE_STEP.
RATE_WINDOW = 60.0
RATE_STEP = 5.0
CLOSE_REASON_PEER = "disconnected by admin"
CLOSE_REASON_ROOM = "room closed"

_ROOM = re.compile(r"/admin/rooms/([^/]+)")
_CLOSE = re.compile(r"/admin/rooms/([^/]+)/close")
_DISCONNECT = re.compile(r"/admin/peers/([A-Za-z0-9_-]{1,64})/disconnect")

Answer = tuple[int, bytes, str, dict[str, str]]


def _json(obj: Any, status: int = 200) -> Answer:
    return status, orjson.dumps(obj) + b"\n", JSON, {"Cache-Control": "no-store"}


def _method(request: Request, allowed: str) -> None:
    if request.method != allowed and not (allowed == "GET" and request.method == "HEAD"):
        raise HttpError(405, "method not allowed", {"Allow": allowed})


def _room(name: str) -> str:
    if not ROOM_NAME.fullmatch(name):
        raise HttpError(404, "no such room")
    return name


class Admin:
    def __init__(self, service: Any) -> None:
        self.service = service
        self.started = time.monotonic()
        self._samples: collections.deque[tuple[float, int, int, int]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._waiting: dict[str, tuple[set[str], dict[str, Any], asyncio.Future[None]]] = {}
        broker = service.broker
        if broker is not None:
            broker.on_query = self._on_query

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Sample the message counters every RATE_STEP (for the rates in the stats)."""
        self._sample()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _counters(self) -> tuple[int, int, int]:
        m = self.service.metrics
        return sum(m.received.values()), sum(m.relayed.values()), m.deliveries

    def _sample(self) -> None:
        now = time.monotonic()
        self._samples.append((now, *self._counters()))
        while self._samples and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        self._timer = self.service.loop.call_later(RATE_STEP, self._sample)

    def rates(self) -> dict[str, float]:
        """Messages per second over the last minute (since the start, if shorter)."""
        now = time.monotonic()
        then, *before = self._samples[0] if self._samples else (self.started, 0, 0, 0)
        span = max(now - then, 1e-3)
        current = self._counters()
        return {name: round((c - b) / span, 3) for name, c, b in
                zip(("received", "relayed", "deliveries"), current, before, strict=True)}

    # --- HTTP ---------------------------------------------------------------------------

    def answer(self, request: Request, address: str) -> Answer | Awaitable[Answer] | None:
        """The answer to an ``/admin/`` request (HttpError to refuse); None for other paths."""
        path = request.path
        if path != "/admin" and not path.startswith("/admin/"):
            return None
        service = self.service
        service.admission.admin(request, address, service.loop.time())  # 404/401/429
        if path == "/admin/stats":
            _method(request, "GET")
            return self._cluster("stats", {}, address)
        m = _CLOSE.fullmatch(path)
        if m:
            _method(request, "POST")
            return self._cluster("close-room", {"room": _room(m.group(1))}, address)
        m = _DISCONNECT.fullmatch(path)
        if m:
            _method(request, "POST")
            return self._cluster("disconnect", {"peer": m.group(1)}, address)
        m = _ROOM.fullmatch(path)
        if m:
            _method(request, "GET")
            return self._cluster("room", {"room": _room(m.group(1))}, address)
        raise HttpError(404, "not found")

    def _cluster(self, op: str, args: dict[str, Any], address: str,
                 ) -> Answer | Awaitable[Answer]:
        """Run ``op`` here, and with a broker on every node; the answer merges
        {node: result} and names the nodes that did not answer."""
        if op != "stats":  # what changes something is logged, with who asked
            log.info("admin", extra={"fields": {"op": op, **args, "addr": address}})
        merge = functools.partial(MERGE[op], args)
        local = self._local(op, args)
        broker = self.service.broker
        if broker is None:
            return merge({"": local}, [])
        return self._gather(op, args, local, merge)

    async def _gather(self, op: str, args: dict[str, Any], local: Any, merge: Any) -> Answer:
        broker = self.service.broker
        me = broker.node
        try:
            nodes = await asyncio.wait_for(broker.nodes(), QUERY_TIMEOUT)
        except Exception as exc:  # Redis unreachable: what this node knows, said so
            return merge({me: local}, [f"broker: {exc or type(exc).__name__}"])
        others = {n for n in nodes if n != me}
        results: dict[str, Any] = {me: local}
        if others:
            rid = secrets.token_hex(8)
            done = self.service.loop.create_future()
            self._waiting[rid] = (others, results, done)
            for node in sorted(others):
                broker.query(node, {"op": op, "id": rid, "from": me, **args})
            try:
                await asyncio.wait_for(done, QUERY_TIMEOUT)
            except TimeoutError:
                pass
            finally:
                self._waiting.pop(rid, None)
        return merge(results, sorted(others - results.keys()))

    def _on_query(self, head: dict[str, Any], data: bytes) -> None:
        """A request from another node (answered on its channel), or a reply to ours."""
        op = head.get("op")
        if op == "reply":
            waiting = self._waiting.get(head.get("id", ""))
            if waiting is not None:
                expected, results, done = waiting
                node = head.get("node", "")
                if node in expected:
                    results[node] = orjson.loads(data)
                    if expected <= results.keys() and not done.done():
                        done.set_result(None)
            return
        try:
            result = self._local(op, head)
        except HttpError:
            return
        broker = self.service.broker
        broker.query(head["from"], {"op": "reply", "id": head["id"], "node": broker.node},
                     orjson.dumps(result))

    # --- what one node does -------------------------------------------------------------

    def _local(self, op: Any, args: dict[str, Any]) -> Any:
        if op == "stats":
            return self.local_stats()
        if op == "room":
            return self.members(str(args["room"]))
        if op == "close-room":
            return {"closed": self.close_room(str(args["room"]))}
        if op == "disconnect":
            return {"disconnected": self.disconnect(str(args["peer"]), CLOSE_REASON_PEER)}
        raise HttpError(404, "not found")

    def local_stats(self) -> dict[str, Any]:
        service = self.service
        hub = service.hub
        broker = service.broker
        return {
            "node": broker.node if broker is not None else "",
            "worker": workers.worker_index(),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "ready": service.unready() is None,
            "connections": hub.connected(),
            "parked": hub.away,
            "rooms": {name: len(room.members) for name, room in hub.rooms.items()
                      if room.members},
            "messages_per_s": self.rates(),
        }

    def members(self, name: str) -> list[dict[str, Any]]:
        room = self.service.hub.rooms.get(name)
        if room is None:
            return []
        node = self.service.broker.node if self.service.broker is not None else ""
        return [{"peerId": pid, "meta": room.meta[pid], "node": node, "seq": room.seq[pid],
                 "connected": type(peer.sink) is not Mailbox}
                for pid, peer in room.members.items()]

    def close_room(self, name: str) -> int:
        room = self.service.hub.rooms.get(name)
        if room is None:
            return 0
        return sum(self.disconnect(pid, CLOSE_REASON_ROOM) for pid in list(room.members))

    def disconnect(self, peer_id: str, reason: str) -> bool:
        """End ``peer_id``'s session here: its connection closed with 1008, or its parked
        session expired. False if it has no session on this node."""
        service = self.service
        hub = service.hub
        peer: Peer | None = hub.peers.get(peer_id)
        if peer is None:
            return False
        conn = next((c for c in service.connections if c.context is peer), None)
        if conn is not None:
            conn.close(frames.CLOSE_POLICY, reason)
            return True
        if type(peer.sink) is Mailbox:
            timer = service.parked.pop(peer_id, None)
            if timer is not None:
                timer.cancel()
            hub.expire(peer)
            service.connection_gone()
            return True
        return False


# --- merging the nodes' answers: (the request's args, {node: result}, unreachable nodes) ---


def _merge_stats(args: dict[str, Any], results: dict[str, Any], unreachable: list[str]) -> Answer:
    instances = [r for _, r in sorted(results.items())]
    rooms: dict[str, int] = {}
    rates = {"received": 0.0, "relayed": 0.0, "deliveries": 0.0}
    for r in instances:
        for name, n in r["rooms"].items():
            rooms[name] = rooms.get(name, 0) + n
        for k in rates:
            rates[k] = round(rates[k] + r["messages_per_s"][k], 3)
    return _json({
        "instances": instances,
        "connections": sum(r["connections"] for r in instances),
        "parked": sum(r["parked"] for r in instances),
        "rooms": [{"room": name, "peers": n} for name, n in
                  sorted(rooms.items(), key=lambda item: (-item[1], item[0]))],
        "messages_per_s": rates,
        "unreachable": unreachable,
    })


def _merge_room(args: dict[str, Any], results: dict[str, Any], unreachable: list[str]) -> Answer:
    peers = sorted((p for r in results.values() for p in r), key=lambda p: p["seq"])
    if not peers and not unreachable:
        raise HttpError(404, "no such room")
    for p in peers:
        del p["seq"]
    return _json({"room": args["room"], "peers": peers, "size": len(peers),
                  "unreachable": unreachable})


def _merge_closed(args: dict[str, Any], results: dict[str, Any], unreachable: list[str],
                  ) -> Answer:
    return _json({"room": args["room"], "closed": sum(r["closed"] for r in results.values()),
                  "unreachable": unreachable})


def _merge_disconnect(args: dict[str, Any], results: dict[str, Any], unreachable: list[str],
                      ) -> Answer:
    found = any(r["disconnected"] for r in results.values())
    if not found and not unreachable:
        raise HttpError(404, "no such peer")
    return _json({"peer": args["peer"], "disconnected": found, "unreachable": unreachable})


MERGE = {"stats": _merge_stats, "room": _merge_room, "close-room": _merge_closed,
         "disconnect": _merge_disconnect}
