"""RedisBroker: rooms, direct messages and presence across instances through one Redis.

Channels (``P`` = ``--broker-prefix``): ``P:r:<room>`` carries a room's relays and presence
events and is subscribed by the instances with members in it; ``P:l`` the default room's
relays; ``P:n:<node>`` messages for one instance (``to`` a peer there, errors, its own
readiness probe, the admin API's requests and replies: kind ``Q``). Keys: ``P:p:<room>`` a
hash of the room's members (peer -> node, join order, meta); ``P:v`` the counter that orders joins and leaves; ``P:nr:<node>`` the rooms
where a node has members; ``P:node:<node>`` the node's lease (``--presence-ttl``);
``P:nodes`` the known nodes; ``P:c`` each node's client count.

With Redis 7 or newer the channels are sharded (``SPUBLISH``/``SSUBSCRIBE``), so a Redis
Cluster could spread them; with an older Redis, plain ``PUBLISH``/``SUBSCRIBE``. Every
instance asks the server, so all of one deployment agree.

Every write goes through one ordered queue, sent as a pipeline per loop turn, so what one
sender does reaches Redis, and every subscriber, in order. Joins and leaves are Lua scripts:
the member is added or removed, the join order assigned and the event published in one
atomic step, so two instances joining the same room at once agree on who is ``polite``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from rtcsignal.core import messages
from rtcsignal.core.broker import JoinDone, JoinFailed, Member
from rtcsignal.core.hub import MOVED, Hub, Peer
from rtcsignal.core.messages import ErrorCode
from rtcsignal.core.metrics import BROKER_BUCKETS, Histogram
from rtcsignal.core.resume import Holding, Mailbox
from rtcsignal.protocol.frames import split_frames
from rtcsignal.redis.wire import Commands, Subscriber

log = logging.getLogger("rtcsignal")

#: Seconds between readiness probes on the node's own channel; a probe not back within
#: PROBE_TIMEOUT marks the node unready and rebuilds the subscriptions.
PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 3.0
#: Reconnect backoff: doubles from RETRY_MIN to RETRY_MAX, with +-50% jitter.
RETRY_MIN = 0.1
RETRY_MAX = 2.0
#: Seconds ``start`` waits for Redis before the server listens anyway, unready.
STARTUP_WAIT = 3.0
#: Seconds a resume waits for its claim's marker, then for the old node's handover (a
#: live node answers in milliseconds; only a dead one whose lease still runs is waited for).
HANDOVER_TIMEOUT = 5.0
#: The close a connection gets when its session was resumed on another node.
CLOSE_SESSION_TAKEN = 4409

JOIN = """
local max = tonumber(ARGV[6])
if max > 0 and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0
   and redis.call('HLEN', KEYS[1]) >= max then
  return {-1, {}}
end
local v = redis.call('INCR', KEYS[2])
local entry = '{"n":"' .. ARGV[3] .. '","s":' .. v .. ',"m":' .. ARGV[2] .. '}'
redis.call('HSET', KEYS[1], ARGV[1], entry)
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[4])
local all = redis.call('HGETALL', KEYS[1])
redis.call(ARGV[7], ARGV[5], '{"k":"J","o":"' .. ARGV[3] .. '","r":"' .. ARGV[4] ..
  '","p":"' .. ARGV[1] .. '","v":' .. v .. ',"e":' .. entry .. '}\\n')
return {v, all}
"""

LEAVE = """
local e = redis.call('HGET', KEYS[1], ARGV[1])
-- only this node's own entry: a member that resumed elsewhere is not ours to remove
if not e or string.sub(e, 7, 6 + #ARGV[5]) ~= ARGV[5] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[3])
local v = redis.call('INCR', KEYS[2])
redis.call(ARGV[7], ARGV[4], '{"k":"L","o":"' .. ARGV[5] .. '","r":"' .. ARGV[3] ..
  '","p":"' .. ARGV[1] .. '","v":' .. v .. ',"why":"' .. ARGV[2] .. '"}\\n')
if ARGV[6] == '1' then redis.call('SREM', KEYS[3], ARGV[3]) end
return v
"""

#: Claim a dead node's cleanup: atomic, so when several nodes notice at once exactly one
#: announces each lost peer; a node whose lease is back is left alone.
REAP = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local prefix = ARGV[2]
local now = tonumber(redis.call('TIME')[1])
local n = 0
for _, peer in ipairs(redis.call('SMEMBERS', KEYS[6])) do
  redis.call('ZADD', KEYS[7], now + tonumber(ARGV[4]), peer)
  n = n + 1
end
redis.call('DEL', KEYS[6])
local rooms = redis.call('SMEMBERS', KEYS[2])
for _, room in ipairs(rooms) do
  local key = prefix .. ':p:' .. room
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    local e = cjson.decode(all[i + 1])
    if e['n'] == ARGV[1] and redis.call('EXISTS', prefix .. ':s:' .. all[i]) == 0 then
      redis.call('HDEL', key, all[i])
      local v = redis.call('INCR', KEYS[3])
      redis.call(ARGV[3], prefix .. ':r:' .. room, '{"k":"L","o":"' .. ARGV[1] ..
        '","r":"' .. room .. '","p":"' .. all[i] .. '","v":' .. v .. ',"why":"timeout"}\\n')
      n = n + 1
    end
  end
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
return n
"""

#: A session: its resume token (a hash) -> peer, and the peer's owner and user.
SESSION = """
local old = redis.call('HGET', KEYS[2], 't')
if old and old ~= ARGV[2] then redis.call('DEL', ARGV[5] .. ':t:' .. old) end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 't', ARGV[2], 'u', ARGV[3], 'n', ARGV[4])
redis.call('SADD', KEYS[3], ARGV[1])
"""

#: A session over (clean close, or its window ended), unless it moved to another node.
END = """
if redis.call('HGET', KEYS[1], 'n') ~= ARGV[2] then return 0 end
local t = redis.call('HGET', KEYS[1], 't')
if t then redis.call('DEL', ARGV[3] .. ':t:' .. t) end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""

#: Where a token's session is (its rooms), without taking it: the new node subscribes
#: to them first, so it hears everything from the moment of the claim.
PEEK = """
local peer = redis.call('GET', KEYS[1])
if not peer then return false end
local out = redis.call('SMEMBERS', ARGV[1] .. ':pr:' .. peer)
table.insert(out, 1, peer)
return out
"""

#: Take a session for this node, atomically (one winner per token): its room entries
#: move here, the old node is told (T, then hands over its mailbox), every room's
#: mirrors learn the move (M), and this node gets a marker (C) with the rooms' snapshots,
#: after the room messages that were the old node's to keep and before the ones that are
#: ours.
CLAIM = """
local peer = redis.call('GET', KEYS[1])
if not peer then return false end
local p = ARGV[3]
local s = p .. ':s:' .. peer
if (redis.call('HGET', s, 'u') or '') ~= ARGV[1] then return false end
local old = redis.call('HGET', s, 'n') or ''
local me = ARGV[2]
redis.call('DEL', KEYS[1])
redis.call('HDEL', s, 't')
redis.call('HSET', s, 'n', me)
redis.call('SREM', p .. ':ns:' .. old, peer)
redis.call('SADD', p .. ':ns:' .. me, peer)
redis.call('ZREM', p .. ':parked', peer)
local alive = redis.call('EXISTS', p .. ':node:' .. old)
if old ~= me then
  redis.call(ARGV[4], p .. ':n:' .. old, '{"k":"T","p":"' .. peer .. '","to":"' .. me .. '"}\\n')
end
local parts = {}
for _, room in ipairs(redis.call('SMEMBERS', p .. ':pr:' .. peer)) do
  local key = p .. ':p:' .. room
  local e = redis.call('HGET', key, peer)
  if e then
    local o = string.sub(e, 7, string.find(e, '"', 7, true) - 1)
    e = '{"n":"' .. me .. string.sub(e, 7 + #o)
    redis.call('HSET', key, peer, e)
    redis.call('SADD', p .. ':nr:' .. me, room)
    local v = redis.call('INCR', p .. ':v')
    redis.call(ARGV[4], p .. ':r:' .. room, '{"k":"M","o":"' .. me .. '","r":"' .. room ..
      '","p":"' .. peer .. '","v":' .. v .. ',"e":' .. e .. '}\\n')
    local all = redis.call('HGETALL', key)
    local members = {}
    for i = 1, #all, 2 do members[#members + 1] = '"' .. all[i] .. '":' .. all[i + 1] end
    parts[#parts + 1] = '["' .. room .. '",' .. v .. ',{' .. table.concat(members, ',') .. '}]'
  end
end
redis.call(ARGV[4], p .. ':n:' .. me, '{"k":"C","p":"' .. peer .. '","key":"' ..
  string.sub(KEYS[1], #p + 4) .. '","old":"' .. old ..
  '","alive":' .. alive .. ',"rooms":[' .. table.concat(parts, ',') .. ']}\\n')
return 1
"""

#: A message for a peer whose node did not receive it: to the node that owns its session
#: now (it resumed there and the sender's node has not heard of the move yet).
FORWARD = """
local owner = redis.call('HGET', KEYS[1], 'n')
if not owner or owner == ARGV[3] then return 0 end
return redis.call(ARGV[4], ARGV[1] .. ':n:' .. owner, ARGV[2])
"""

#: Sessions of lost nodes whose window ended: announced left (each exactly once).
EXPIRE_DUE = """
local p = ARGV[1]
local now = tonumber(redis.call('TIME')[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)
for _, peer in ipairs(due) do
  redis.call('ZREM', KEYS[1], peer)
  for _, room in ipairs(redis.call('SMEMBERS', p .. ':pr:' .. peer)) do
    if redis.call('HDEL', p .. ':p:' .. room, peer) == 1 then
      local v = redis.call('INCR', p .. ':v')
      redis.call(ARGV[2], p .. ':r:' .. room, '{"k":"L","o":"","r":"' .. room ..
        '","p":"' .. peer .. '","v":' .. v .. ',"why":"timeout"}\\n')
    end
  end
  local t = redis.call('HGET', p .. ':s:' .. peer, 't')
  if t then redis.call('DEL', p .. ':t:' .. t) end
  redis.call('DEL', p .. ':s:' .. peer, p .. ':pr:' .. peer)
end
return #due
"""

#: Count a client in (or out) and return the total over every node.
COUNT = """
redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
local t = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do t = t + tonumber(v) end
return t
"""

Done = Callable[[Any], None]


class RedisBroker:
    """The Broker of an instance in a Redis deployment (see the module docstring)."""

    shared = True

    def __init__(self, url: str, prefix: str = "rtcsignal", presence_ttl: float = 15.0,
                 max_peers_per_room: int = 0) -> None:
        self.url = url
        self.max_peers_per_room = max_peers_per_room
        self.prefix = prefix
        self.presence_ttl = presence_ttl
        self.node = secrets.token_urlsafe(6)  # 8 URL-safe characters
        self.hub: Hub = None  # type: ignore[assignment]
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.redis: aioredis.Redis = None  # type: ignore[assignment]
        self.pubsub: Any = None
        self.ready = False
        self.problem = "not started"
        self.stats = {"publishes": 0, "received": 0, "publish_errors": 0, "reconnects": 0,
                      "reaped": 0}
        self.probe_rtt = 0.0
        self.latency = Histogram(BROKER_BUCKETS)  # round trips of the command pipelines
        self.lease_held = False
        self.subscribed: set[bytes] = set()  # channels Redis confirmed
        self._ops: list[tuple[tuple[Any, ...], Done | None]] = []
        self._wake: asyncio.Event | None = None
        self._channels: set[bytes] = set()
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._local: dict[str, int] = {}  # rooms -> local members (joins done or in flight)
        self._tasks: list[asyncio.Task[None]] = []
        self._probe_sent = 0.0
        self._probe_seen = 0.0
        self._others = 0  # clients on the other nodes, from the last count refresh
        self._stopping = False
        self._connected: asyncio.Event | None = None
        self.sharded: bool | None = None  # SPUBLISH/SSUBSCRIBE (Redis >= 7); None: not asked
        self._pub = "PUBLISH"
        self._epoch = b""  # Redis's P:epoch as last seen; a new one means Redis restarted
        self._retry: list[tuple[Any, ...]] = []  # leaves that failed: run again on reconnect
        self._absent: dict[tuple[str, str], float] = {}  # (room, peer) -> missing since
        self.resume_window = 0.0  # the REAP keeps a lost node's sessions this long
        self._live = False  # subscribed and registered: probes (and repairs) may run
        self._commands: Commands = None  # type: ignore[assignment]  # the ordered queue's
        self.on_release: Callable[[str], None] | None = None  # a peer of ours resumed elsewhere
        self.on_query: Callable[[dict[str, Any], bytes], None] | None = None  # admin (Q)
        # Resumes in flight: token key -> (placeholder, done) until the claim's marker;
        # then adopted peers waiting for their old node's handover.
        self._claiming: dict[str, tuple[Peer, Callable[[Any], None]]] = {}
        self._handover: dict[str, tuple[Callable[[Any], None], asyncio.TimerHandle]] = {}

    # --- names --------------------------------------------------------------------------

    def _room_channel(self, room: str) -> bytes:
        return f"{self.prefix}:r:{room}".encode() if room else f"{self.prefix}:l".encode()

    def _node_channel(self, node: str) -> bytes:
        return f"{self.prefix}:n:{node}".encode()

    # --- lifecycle ----------------------------------------------------------------------

    def attach(self, hub: Hub) -> None:
        self.hub = hub

    async def start(self) -> None:
        """Connect and subscribe; the server serves local traffic even while Redis is
        unreachable (``ready`` stays False and ``/readyz`` says why)."""
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.redis = aioredis.from_url(
            self.url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=5,
            client_name=f"rtcsignal:{self.prefix}:{self.node}",  # CLIENT LIST tells us apart
        )
        self._commands = Commands(self.redis, timeout=5)
        self._channels = {self._node_channel(self.node)}
        if self.hub.lobby is not None:
            self._channels.add(self._room_channel(""))
        self._connected = asyncio.Event()
        self._tasks = [
            asyncio.ensure_future(self._writer()),
            asyncio.ensure_future(self._reader()),
            asyncio.ensure_future(self._housekeeping()),
        ]
        # Listen only once subscribed, so the first clients' joins and relays are heard;
        # if Redis is down, start anyway (unready) and serve local traffic.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), STARTUP_WAIT)

    async def stop(self) -> None:
        """Leave cleanly: the lease and counts go, so no other node reaps us later."""
        self._stopping = True
        with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self._flush_now(), 2)  # the drained peers' leaves
            p = self.prefix
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(f"{p}:node:{self.node}", f"{p}:nr:{self.node}")
            pipe.srem(f"{p}:nodes", self.node)
            pipe.hdel(f"{p}:c", self.node)
            await asyncio.wait_for(pipe.execute(), 2)
        for t in self._tasks:
            t.cancel()
        # Every wait is bounded: a stop must end even if a redis-py connection is stuck.
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 2)
        if self.pubsub is not None:
            await self.pubsub.close()
        await self._commands.close()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self.redis.aclose(), 2)

    # --- the Broker interface (synchronous; work is queued) ------------------------------

    def publish_room(self, room: str, data: bytes, sender: str, ref: Any, nodes: int) -> None:
        header = orjson.dumps({"k": "R", "o": self.node, "r": room})
        # Every instance with members in the room, ourselves included, must receive it; the
        # default room has no presence, so there nothing is expected.
        expected = 1 + nodes if nodes else 0

        def check(result: Any) -> None:
            if isinstance(result, Exception) or int(result) < expected:
                self._refuse(sender, ref, result)

        self._queue(("PUBLISH", self._room_channel(room), header + b"\n" + data), check)

    def publish_peer(
        self, node: str, target: str, data: bytes, sender: str, rooms: list[str], ref: Any
    ) -> None:
        header = orjson.dumps({"k": "D", "o": self.node, "t": target, "f": sender,
                               "rooms": rooms, "ref": ref})
        message = header + b"\n" + data

        def forwarded(result: Any) -> None:
            if isinstance(result, Exception) or int(result) < 1:
                self._refuse(sender, ref, result)

        def check(result: Any) -> None:
            if isinstance(result, Exception):
                self._refuse(sender, ref, result)
            elif int(result) < 1:  # nobody there: has the peer resumed elsewhere?
                self._queue(("EVAL", FORWARD, 1, f"{self.prefix}:s:{target}", self.prefix,
                             message, node, "PUBLISH"), forwarded)

        self._queue(("PUBLISH", self._node_channel(node), message), check)

    def publish_error(self, node: str, peer: str, data: bytes) -> None:
        header = orjson.dumps({"k": "E", "o": self.node, "t": peer})
        self._queue(("PUBLISH", self._node_channel(node), header + b"\n" + data), None)

    def join(
        self, room: str, peer: str, meta: dict[str, Any], done: JoinDone, failed: JoinFailed
    ) -> None:
        self._local[room] = self._local.get(room, 0) + 1
        channel = self._room_channel(room)
        p = self.prefix
        args = ("EVAL", JOIN, 4, f"{p}:p:{room}", f"{p}:v", f"{p}:nr:{self.node}",
                f"{p}:pr:{peer}", peer, orjson.dumps(meta), self.node, room, channel,
                self.max_peers_per_room, "PUBLISH")

        def finish(result: Any) -> None:
            if isinstance(result, Exception) or int(result[0]) < 0:
                if self.leave_local(room) <= 0:
                    self._unsubscribe(channel)
                if isinstance(result, Exception):
                    failed(ErrorCode.BROKER_UNAVAILABLE, "the cluster is unreachable; try again")
                else:
                    failed(ErrorCode.ROOM_FULL, f"room {room} is full")
                return
            version, flat = int(result[0]), result[1]
            members = []
            for i in range(0, len(flat), 2):
                pid = flat[i].decode()
                if pid == peer:
                    continue
                e = orjson.loads(flat[i + 1])
                members.append(Member(pid, e["m"], e["n"], int(e["s"])))
            done(members, version, version)

        self._subscribe(channel)
        self._queue(args, finish)

    def leave_local(self, room: str) -> int:
        """One local member fewer in ``room``; returns how many are left."""
        left = self._local.get(room, 1) - 1
        if left > 0:
            self._local[room] = left
        else:
            self._local.pop(room, None)
        return left

    def leave(self, room: str, peer: str, reason: str) -> None:
        left = self.leave_local(room)
        p = self.prefix
        channel = self._room_channel(room)
        self._queue(("EVAL", LEAVE, 4, f"{p}:p:{room}", f"{p}:v", f"{p}:nr:{self.node}",
                     f"{p}:pr:{peer}", peer, reason, room, channel, self.node,
                     "1" if left <= 0 else "0", "PUBLISH"), None)
        if left <= 0:
            self._unsubscribe(channel)

    def forget(self, room: str) -> None:
        if self.leave_local(room) <= 0:
            self._unsubscribe(self._room_channel(room))

    # --- sessions (resume) ----------------------------------------------------------------

    def session(self, peer: Peer) -> None:
        """Record ``peer``'s session (its current token, user, this node) for a resume on
        any node, even after this one dies."""
        p = self.prefix
        self._queue(("EVAL", SESSION, 3, f"{p}:t:{peer.token}", f"{p}:s:{peer.id}",
                     f"{p}:ns:{self.node}", peer.id, peer.token, peer.user or "", self.node,
                     p), None)

    def ended(self, peer: str) -> None:
        p = self.prefix
        self._queue(("EVAL", END, 3, f"{p}:s:{peer}", f"{p}:ns:{self.node}", f"{p}:pr:{peer}",
                     peer, self.node, p), None)

    def resume(self, key: str, user: str | None, peer: Peer,
               done: Callable[[Any], None]) -> None:
        """Take the session of token ``key`` for ``peer`` (a new connection's placeholder).
        ``done`` gets None (no such session: a fresh one), the local Peer that has it (it
        was ours), or ``(frames, missed)`` once ``peer`` was adopted here under its old id
        and its old node handed over what it kept."""
        p = self.prefix
        channels: list[bytes] = []

        def claimed(result: Any) -> None:
            if isinstance(result, Exception) or not result:
                if self._claiming.pop(key, None) is not None:
                    for ch in channels:
                        if ch not in self._wanted():
                            self._unsubscribe(ch)
                    done(None)
            elif key in self._claiming:  # the marker (C) is on its way
                self.loop.call_later(HANDOVER_TIMEOUT, self._marker_lost, key)

        def peeked(result: Any) -> None:
            if isinstance(result, Exception) or not result:
                done(None)
                return
            for raw in result[1:]:  # the peer id, then its rooms
                ch = self._room_channel(raw.decode())
                if ch not in self._channels:
                    channels.append(ch)
                    self._subscribe(ch)
            self._claiming[key] = (peer, done)
            self._queue(("EVAL", CLAIM, 1, f"{p}:t:{key}", user or "", self.node, p,
                         "PUBLISH"), claimed)

        self._queue(("EVAL", PEEK, 1, f"{p}:t:{key}", p), peeked)

    def _wanted(self) -> set[bytes]:
        """The channels this node needs for its own members."""
        wanted = {self._node_channel(self.node)}
        if self.hub.lobby is not None:
            wanted.add(self._room_channel(""))
        wanted.update(self._room_channel(r) for r in self._local)
        return wanted

    def _marker_lost(self, key: str) -> None:
        """The claim succeeded but its marker never came (our subscriber was down): the
        session stays in Redis, parked, until its window ends; this client starts fresh."""
        entry = self._claiming.pop(key, None)
        if entry is not None:
            entry[1](None)

    def _claimed(self, head: dict[str, Any]) -> None:
        """The marker of a claim of ours, in the stream of publications: room messages
        before it were the old node's to keep, the ones after it are ours to deliver."""
        entry = self._claiming.pop(head["key"], None)
        if entry is None:
            return
        peer, done = entry
        hub = self.hub
        peer_id = head["p"]
        if head["old"] == self.node:  # it was ours: the service swaps the connection
            done(hub.peers.get(peer_id))  # None if it ended meanwhile: a fresh session
            return
        rooms = []
        for name, version, members in head["rooms"]:
            me = members[peer_id]
            others = [Member(pid, e["m"], e["n"], int(e["s"])) for pid, e in members.items()
                      if pid != peer_id]
            rooms.append((name, Member(peer_id, me["m"], self.node, int(me["s"])), others,
                          int(version)))
            self._local[name] = self._local.get(name, 0) + 1
            self._subscribe(self._room_channel(name))
        peer.id = peer_id
        peer.sink = Holding()
        hub.adopt(peer, rooms)
        if not head["alive"]:  # its node is gone: nothing to hand over
            done(([], 0))
            return
        timer = self.loop.call_later(HANDOVER_TIMEOUT, self._handover_lost, peer_id)
        self._handover[peer_id] = (done, timer)

    def _handed_over(self, head: dict[str, Any], data: bytes) -> None:
        waiting = self._handover.pop(head["p"], None)
        if waiting is not None:
            done, timer = waiting
            timer.cancel()
            done(([data] if data else [], int(head["missed"])))
        elif data:  # too late: the peer is live since; delivering now could reorder
            for frame in split_frames(data):
                self.hub.report_dropped(head["p"], frame)

    def _handover_lost(self, peer_id: str) -> None:
        """The old node did not hand over in time (dead, its lease not yet expired): what
        it held is gone, and its senders were refused while it was unreachable."""
        waiting = self._handover.pop(peer_id, None)
        if waiting is not None:
            waiting[0](([], 0))

    def _take(self, head: dict[str, Any]) -> None:
        """Another node resumed one of our peers: it leaves here without a peer-left, its
        live connection (if any) gets 4409, and what it kept goes to the new node."""
        released = self.hub.release(head["p"], head["to"])
        frames: list[bytes] = []
        missed = 0
        if released is not None:
            sink, frames, missed = released
            if self.on_release is not None:
                self.on_release(head["p"])
            if not isinstance(sink, (Mailbox, Holding)):
                sink.close(CLOSE_SESSION_TAKEN, "session taken")
        header = orjson.dumps({"k": "H", "o": self.node, "p": head["p"], "missed": missed})
        self._queue(("PUBLISH", self._node_channel(head["to"]), header + b"\n" + b"".join(frames)),
                    None)

    def clients(self, local: int) -> int:
        return local + self._others

    def query(self, node: str, head: dict[str, Any], data: bytes = b"") -> None:
        """An admin request or reply (kind ``Q``, server/admin.py) for ``node``."""
        self._queue(("PUBLISH", self._node_channel(node),
                     orjson.dumps({**head, "k": "Q"}) + b"\n" + data), None)

    async def nodes(self) -> list[str]:
        """The nodes of the deployment (those with a lease, and dead ones not yet reaped)."""
        return sorted(n.decode() for n in await self.redis.smembers(f"{self.prefix}:nodes"))

    def connected(self, done: Callable[[int], None]) -> None:
        """Count a new client cluster-wide; ``done(total)`` gets the exact count with it
        (the greeting's clientsCount), or the cached estimate if Redis is unreachable."""
        local = self.hub.connected()

        def finish(result: Any) -> None:
            done(local + self._others if isinstance(result, Exception) else int(result))

        self._queue(("EVAL", COUNT, 1, f"{self.prefix}:c", self.node, 1), finish)

    def disconnected(self) -> None:
        self._queue(("HINCRBY", f"{self.prefix}:c", self.node, -1), None)

    # --- internals: the ordered write queue -----------------------------------------------

    def _queue(self, args: tuple[Any, ...], done: Done | None) -> None:
        self._ops.append((args, done))
        if self._wake is not None:
            self._wake.set()

    def _subscribe(self, channel: bytes) -> None:
        """In queue order: commands queued after it run once Redis confirmed it."""
        if channel not in self._channels:
            self._channels.add(channel)
            self._queue(("SUBSCRIBE", channel), None)

    def _unsubscribe(self, channel: bytes) -> None:
        if channel in self._channels:
            self._channels.discard(channel)
            self._queue(("UNSUBSCRIBE", channel), None)

    def _refuse(self, sender: str, ref: Any, result: Any) -> None:
        self.stats["publish_errors"] += 1
        self.hub.remote_error(sender, messages.error(
            ErrorCode.BROKER_UNAVAILABLE, "the message could not reach another instance", ref))
        if isinstance(result, Exception):
            self._unready(f"publish failed: {result}")

    async def _writer(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                if self._commands.stale:
                    await self._commands.connect()
                await self._flush_now()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the writer die
                log.warning("broker writer error", extra={"fields": {"error": repr(exc)}})

    async def _flush_now(self) -> None:
        """Send the queued operations in order: subscription changes take effect (and are
        confirmed) before the commands queued after them run."""
        while self._ops:
            ops, self._ops = self._ops, []
            batch: list[tuple[tuple[Any, ...], Done | None]] = []
            for args, done in ops:
                if args[0] in ("SUBSCRIBE", "UNSUBSCRIBE"):
                    await self._run(batch)
                    batch = []
                    await self._subscription(args[0], args[1])
                else:
                    batch.append((args, done))
            await self._run(batch)

    async def _detect(self) -> None:
        """Sharded pub/sub if the server has it (Redis >= 7), asked once."""
        if self.sharded is None:
            info = await self.redis.info("server")
            self.sharded = int(str(info.get("redis_version", "0")).split(".")[0]) >= 7
            self._pub = "SPUBLISH" if self.sharded else "PUBLISH"

    def _command(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Queued commands name "PUBLISH" and scripts end with it; send the mode's own."""
        if args[0] == "PUBLISH":
            return (self._pub, *args[1:])
        if args[0] == "EVAL":
            return (*args[:-1], self._pub) if args[-1] == "PUBLISH" else args
        return args

    async def _run(self, batch: list[tuple[tuple[Any, ...], Done | None]]) -> None:
        if not batch:
            return
        try:
            await self._detect()
            started = time.monotonic()
            results = await self._commands.execute([self._command(args) for args, _ in batch])
            self.latency.observe(time.monotonic() - started)
        except (RedisError, OSError) as exc:
            results = [exc] * len(batch)
            self._unready(f"Redis unreachable: {exc}")
            # A leave must reach Redis eventually, or the peer stays a ghost elsewhere.
            self._retry += [args for args, _ in batch if args[:2] == ("EVAL", LEAVE)]
        self.stats["publishes"] += len(batch)
        for (_, done), result in zip(batch, results, strict=True):
            if done is not None:
                done(result)

    async def _subscription(self, command: str, channel: bytes) -> None:
        if self.pubsub is None:
            return  # the reader subscribes to self._channels when it connects
        try:
            if command == "SUBSCRIBE":
                fut = self.loop.create_future()
                self._confirmed[channel] = fut
                self.pubsub.send("SSUBSCRIBE" if self.sharded else "SUBSCRIBE", channel)
                await asyncio.wait_for(fut, 2)
            else:
                self.pubsub.send("SUNSUBSCRIBE" if self.sharded else "UNSUBSCRIBE", channel)
        except (RedisError, OSError, TimeoutError) as exc:
            self._unready(f"subscription failed: {exc}")
        finally:
            self._confirmed.pop(channel, None)

    # --- internals: the subscriber --------------------------------------------------------

    async def _reader(self) -> None:
        delay = RETRY_MIN
        while not self._stopping:
            reading: asyncio.Future[None] | None = None
            try:
                await self._detect()
                self.pubsub = Subscriber(self.redis, self._dispatch)
                await self.pubsub.connect()
                reading = asyncio.ensure_future(self.pubsub.run())
                await self._connect_pubsub(reading)
                delay = RETRY_MIN
                await reading  # until the connection drops
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._live = False
                self._unready(f"subscriber lost: {exc}")
                self.stats["reconnects"] += 1
                if reading is not None:
                    reading.cancel()
                if self.pubsub is not None:
                    await self.pubsub.close()
                self.pubsub = None
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, RETRY_MAX)

    async def _connect_pubsub(self, reading: asyncio.Future[None]) -> None:
        """Subscribe the fresh subscriber connection to every channel this node needs, then
        register presence again (Redis may have restarted empty)."""
        self.subscribed = set()
        channels = sorted(self._channels)
        waits = {}
        for ch in channels:
            waits[ch] = self._confirmed[ch] = self.loop.create_future()
        self.pubsub.send("SSUBSCRIBE" if self.sharded else "SUBSCRIBE", *channels)
        confirmed = asyncio.gather(*waits.values())
        try:
            done, _ = await asyncio.wait([reading, confirmed], timeout=5,
                                         return_when=asyncio.FIRST_COMPLETED)
            if reading in done:
                reading.result()  # the connection dropped: raise why
            if confirmed not in done:
                raise TimeoutError("subscriptions not confirmed")
        finally:
            confirmed.cancel()
            for ch in waits:
                self._confirmed.pop(ch, None)
        await self._register()
        self._live = True
        self._probe_seen = time.monotonic()
        self._connected.set()  # type: ignore[union-attr]
        # Subscriptions confirmed and presence registered: ready; the probe keeps checking.
        if not self.ready:
            self.ready = True
            self.problem = ""
            log.info("broker ready", extra={"fields": {"node": self.node}})

    async def _register(self) -> None:
        """The lease, and this node's members in every room it has (idempotent); leaves
        that failed while Redis was away; and, if Redis restarted empty (a new epoch), every
        mirror starts over from version 0 and is repaired from the presence hashes."""
        p = self.prefix
        hub = self.hub
        self._commands.stale = True  # Redis may have restarted: the writer reconnects
        await self.redis.set(f"{p}:epoch", secrets.token_hex(8), nx=True)
        epoch = await self.redis.get(f"{p}:epoch")
        if self._epoch and epoch != self._epoch:
            log.warning("broker: Redis restarted; presence re-registered",
                        extra={"fields": {"node": self.node}})
            for room in hub.rooms.values():
                room.version = 0
                for pid in room.since:
                    room.since[pid] = 0
        self._epoch = epoch or b""
        retry, self._retry = self._retry, []
        for args in retry:
            self._ops.insert(0, (args, None))
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(f"{p}:node:{self.node}", b"1", px=int(self.presence_ttl * 1000))
        pipe.sadd(f"{p}:nodes", self.node)
        pipe.hset(f"{p}:c", self.node, hub.connected())
        for room in hub.rooms.values():
            for pid in room.members:
                entry = b'{"n":"%s","s":%d,"m":%s}' % (
                    self.node.encode(), room.seq[pid], orjson.dumps(room.meta[pid]))
                pipe.hsetnx(f"{p}:p:{room.name}", pid, entry)
                pipe.sadd(f"{p}:nr:{self.node}", room.name)
        await pipe.execute()
        if self._wake is not None:
            self._wake.set()
        await self._repair()

    async def _repair(self) -> None:
        """Anti-entropy: make each room's mirror match the presence hash, announcing what
        events missed (a subscriber that was down, a Redis restart). Idempotent with the
        events themselves: an event that arrives after its repair changes nothing."""
        p = self.prefix
        hub = self.hub
        rooms = [r for r in hub.rooms.values() if r.members and r.loading is None]
        if not rooms:
            return
        pipe = self.redis.pipeline(transaction=False)
        for room in rooms:
            pipe.hgetall(f"{p}:p:{room.name}")
        snapshots = await pipe.execute()
        absent: dict[tuple[str, str], float] = {}
        now = time.monotonic()
        for room, flat in zip(rooms, snapshots, strict=True):
            present: dict[str, Member] = {}
            for k, raw in flat.items():
                e = orjson.loads(raw)
                if e["n"] != self.node:
                    present[k.decode()] = Member(k.decode(), e["m"], e["n"], int(e["s"]))
            # A member missing from the hash is dropped only once it has been missing for a
            # lease period: its node may still be re-registering after a Redis restart (a
            # node that died is reaped, with its peer-left events, within the same period).
            grace = set()
            for pid in room.remote:
                if pid not in present:
                    since = absent[room.name, pid] = self._absent.get((room.name, pid), now)
                    if now - since < self.presence_ttl:
                        grace.add(pid)
            hub.repair_room(room.name, present, grace)
        self._absent = absent

    def _dispatch(self, kind: str, channel: bytes, raw: Any) -> None:
        """What the subscriber connection brings: a publication, or a (un)subscription's
        confirmation."""
        if kind in ("unsubscribe", "sunsubscribe"):
            self.subscribed.discard(channel)
            return
        if kind in ("subscribe", "ssubscribe"):
            fut = self._confirmed.get(channel)
            if fut is not None and not fut.done():
                fut.set_result(None)
            self.subscribed.add(channel)
            return
        if kind not in ("message", "smessage"):
            return
        self.stats["received"] += 1
        nl = raw.find(b"\n")
        head = orjson.loads(raw[:nl])
        data = raw[nl + 1:]
        k = head["k"]
        hub = self.hub
        if k == "R":
            if head["o"] != self.node:
                hub.remote_relay(head["r"], data)
        elif k == "D":
            hub.remote_direct(head["t"], data, head["f"], head["rooms"], head["ref"], head["o"])
        elif k == "E":
            hub.remote_error(head["t"], data)
        elif k == "J":
            e = head["e"]
            hub.remote_presence(head["r"], int(head["v"]),
                                Member(head["p"], e["m"], e["n"], int(e["s"])), head["p"])
        elif k == "L":
            hub.remote_presence(head["r"], int(head["v"]), None, head["p"], head["why"])
        elif k == "M":
            e = head["e"]
            hub.remote_presence(head["r"], int(head["v"]),
                                Member(head["p"], e["m"], e["n"], int(e["s"])), head["p"],
                                MOVED)
        elif k == "C":
            self._claimed(head)
        elif k == "T":
            self._take(head)
        elif k == "H":
            self._handed_over(head, data)
        elif k == "Q":  # the admin API's requests and replies between nodes
            if self.on_query is not None:
                self.on_query(head, data)
        elif k == "P":
            now = time.monotonic()
            self._probe_seen = now
            self.probe_rtt = now - float(head["t"])
            if not self.ready:
                self.ready = True
                self.problem = ""
                log.info("broker ready", extra={"fields": {"node": self.node}})

    # --- internals: lease, reaping, counts, probe -----------------------------------------

    async def _housekeeping(self) -> None:
        p = self.prefix
        last_lease = 0.0
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            now = time.monotonic()
            try:
                if self._live:
                    if self._probe_sent > self._probe_seen and now - self._probe_sent > PROBE_TIMEOUT:
                        self._unready("readiness probe did not come back")
                        self._probe_sent = 0.0
                        await self.pubsub.close()  # the reader reconnects
                    elif self._probe_sent <= self._probe_seen:
                        self._probe_sent = now
                        await self.redis.execute_command(
                            self._pub, self._node_channel(self.node),
                            orjson.dumps({"k": "P", "t": now}) + b"\n")
                if now - last_lease >= self.presence_ttl / 3:
                    last_lease = now
                    await self.redis.set(f"{p}:node:{self.node}", b"1",
                                         px=int(self.presence_ttl * 1000))
                    self.lease_held = True
                    await self.redis.sadd(f"{p}:nodes", self.node)
                    await self._reap()
                    await self.redis.eval(EXPIRE_DUE, 1, f"{p}:parked", p, self._pub)
                    if self._live:
                        await self._repair()
                await self.redis.hset(f"{p}:c", self.node, self.hub.connected())
                counts = await self.redis.hgetall(f"{p}:c")
                self._others = sum(int(v) for k, v in counts.items() if k.decode() != self.node)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._unready(f"Redis unreachable: {exc}")

    async def _reap(self) -> None:
        """Announce the peers of nodes whose lease expired (each exactly once)."""
        p = self.prefix
        for raw in await self.redis.smembers(f"{p}:nodes"):
            node = raw.decode()
            if node == self.node:
                continue
            n = await self.redis.eval(
                REAP, 7, f"{p}:node:{node}", f"{p}:nr:{node}", f"{p}:v", f"{p}:nodes",
                f"{p}:c", f"{p}:ns:{node}", f"{p}:parked", node, p, self._pub,
                max(0, int(self.resume_window - self.presence_ttl)))
            if n:
                self.stats["reaped"] += int(n)
                log.info("node lost", extra={"fields": {"node": node, "peers": int(n)}})

    def _unready(self, why: str) -> None:
        """One log line per outage (the first reason); /readyz shows the latest one."""
        if "unreachable" in why or "failed" in why:
            self.lease_held = False
        if self.ready:
            log.warning("broker unready", extra={"fields": {"reason": why}})
        self.ready = False
        self.problem = why
