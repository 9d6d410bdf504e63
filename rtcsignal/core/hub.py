"""Peers, rooms, presence and routing: the whole signaling state machine, with no I/O.

Each peer carries a ``sink`` (the connection adapter, or a recorder in tests) that takes
ready-to-write frames. The hub frames each outgoing message once with the ``frame``
function it was given and hands the same bytes to every recipient.

Routing costs: a message with ``to`` is one dict lookup plus a check over the sender's
rooms (at most ``max_rooms_per_peer``), whatever the number of peers or room size; a room
message visits that room's members only.

Across nodes (``core/broker.py``): each room keeps a mirror of its members on other nodes
(``Room.remote``), fed by the broker's presence events; a relay reaches the broker only when
the room has such members (or, for the default room, when the broker is shared), and a
message ``to`` a peer of another node goes to that node alone. Joins complete through the
broker, which orders them cluster-wide; messages a peer sends while its join is in flight
wait in its backlog, so per-sender order holds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import orjson

from rtcsignal.core import messages, resume
from rtcsignal.core.broker import Broker, Member, MemoryBroker
from rtcsignal.core.messages import ErrorCode, MessageError
from rtcsignal.core.metrics import Metrics
from rtcsignal.core.ratelimit import SMALL_MESSAGE, TokenBucket
from rtcsignal.core.resume import Mailbox

log = logging.getLogger("rtcsignal")

ROOM_NAME = re.compile(r"[A-Za-z0-9._~:@-]{1,128}")

#: Types the server acts on or refuses (one set lookup for the relayed types).
_SERVER_TYPES = messages.COMMAND_TYPES | messages.RESERVED_TYPES


def _compiled_relay() -> Any:
    """``core/_speedups.pyx`` when it is built from the .pyx beside it and
    ``RTCSIGNAL_PURE`` is not set (the rules of ``protocol.frames.load_speedups``)."""
    if os.environ.get("RTCSIGNAL_PURE", "") not in ("", "0"):
        return None
    try:
        from rtcsignal.core import _speedups  # type: ignore[attr-defined]
    except ImportError:
        return None
    source = os.path.join(os.path.dirname(__file__), "_speedups.pyx")
    try:
        digest = hashlib.sha256()
        for path in (source, os.path.join(os.path.dirname(os.path.dirname(source)),
                                          "_slots.pxd")):
            with open(path, "rb") as f:
                digest.update(f.read())
        want = digest.hexdigest()[:16]
    except OSError:  # an installed wheel need not carry the .pyx
        want = _speedups.SOURCE_HASH
    if want != _speedups.SOURCE_HASH:
        warnings.warn(f"{_speedups.__file__} was built from another version of {source}: "
                      "using the pure-Python code (rebuild: pip install -e .)", RuntimeWarning,
                      stacklevel=2)
        return None
    return _speedups  # type: ignore[no-any-return]


_compiled = _compiled_relay()
#: The compiled common case of ``Hub._handle`` (a ``to`` message to a local peer), or None.
RELAY: Callable[[Hub, Peer, bytes], Any] | None = _compiled.relay if _compiled else None
_TEXT_HANDLER: Any = _compiled.TextHandler if _compiled else None
_DELIVER: Any = _compiled.deliver if _compiled else None


def compiled_sink(cls: type, capsule: Any) -> None:
    """The transport's connection class and its compiled ``send`` (a PyCapsule): the
    compiled relay hands frames for that class's sinks straight to it (no-op when the relay
    is not compiled)."""
    if _compiled is not None:
        _compiled.set_sink(cls, capsule)

#: A connection refused for this long without pause is closed with 1008.
RATE_LIMIT_CLOSE_AFTER = 5.0

CLOSE_POLICY = 1008

#: The ``reason`` of a presence event that moves a member to another node (a resume).
MOVED = "moved"
#: Seconds a node remembers that a peer resumed elsewhere (see ``Hub.moved``).
MOVED_MEMORY = 60.0


class Sink(Protocol):
    def send(self, frame: bytes) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class Peer:
    """One connected client. ``rooms`` maps room name -> Room for the named rooms it is in."""

    __slots__ = (
        "address",
        "allowed_rooms",
        "backlog",
        "bucket",
        "fixed_meta",
        "id",
        "joining",
        "limited_since",
        "rooms",
        "sink",
        "token",
        "user",
    )

    def __init__(
        self,
        sink: Sink,
        bucket: TokenBucket,
        *,
        peer_id: str | None = None,
        address: str = "",
        user: str | None = None,
        allowed_rooms: tuple[str, ...] | None = None,
        fixed_meta: dict[str, Any] | None = None,
    ) -> None:
        self.id = peer_id or secrets.token_urlsafe(12)  # 96 random bits, URL-safe
        self.sink = sink
        self.bucket = bucket  # messages (a MessageBudget also counts bytes) per second
        self.address = address
        self.user = user
        self.allowed_rooms = allowed_rooms
        self.fixed_meta = fixed_meta
        self.rooms: dict[str, Room] = {}
        self.limited_since: float | None = None
        self.joining: set[str] | None = None  # rooms whose join the broker has not completed
        self.backlog: list[bytes] | None = None  # messages held until those joins complete
        self.token: str | None = None  # the key (hash) of its current resume token

    def __repr__(self) -> str:
        return f"<Peer {self.id}>"


if _compiled is not None:  # the compiled relay reads Peer's slots in C
    _compiled.install(Peer)


class Room:
    """Local members in join order; ``remote`` mirrors the members on other nodes.
    ``presence`` is off for the default room (O(1) connects).

    ``version`` is the last presence event applied; each local member's ``since`` is the
    version it joined at, so it is told only of events after its own snapshot. While the
    first local join is in flight, events wait in ``loading`` for the snapshot."""

    __slots__ = ("joining", "loading", "members", "meta", "name", "nodes", "presence", "remote",
                 "seq", "since", "version")

    def __init__(self, name: str, presence: bool = True) -> None:
        self.name = name
        self.presence = presence
        self.members: dict[str, Peer] = {}
        self.meta: dict[str, dict[str, Any]] = {}
        self.seq: dict[str, int] = {}
        self.since: dict[str, int] = {}
        self.remote: dict[str, Member] = {}
        self.nodes: dict[str, int] = {}  # other nodes with members here -> how many
        self.version = 0
        self.loading: list[tuple[int, Member | None, str, str]] | None = None
        # Local peers whose join is in flight, with what the room's members got meanwhile
        # (version 0: after their join for sure; else a remote event's version), handed to
        # them right after their `joined`: they miss nothing issued after their join.
        self.joining: dict[str, list[tuple[int, bytes]]] = {}

    def add_remote(self, member: Member) -> None:
        self.remote[member.peer_id] = member
        self.nodes[member.node] = self.nodes.get(member.node, 0) + 1

    def drop_remote(self, peer_id: str) -> bool:
        member = self.remote.pop(peer_id, None)
        if member is None:
            return False
        left = self.nodes[member.node] - 1
        if left:
            self.nodes[member.node] = left
        else:
            del self.nodes[member.node]
        return True

    def in_join_order(self, others: Iterable[Member] = ()) -> list[tuple[str, dict[str, Any]]]:
        """``(peer id, meta)`` of the local members and ``others``, in cluster join order."""
        entries = [(self.seq[pid], pid, self.meta[pid]) for pid in self.members]
        extra = [(m.seq, m.peer_id, m.meta) for m in others]
        if extra:
            entries += extra
            entries.sort(key=lambda e: e[0])
        return [(pid, meta) for _, pid, meta in entries]


class Hooks:
    """Callbacks an embedding application may set; all synchronous, called on the loop.

    - ``on_join(peer, room, meta) -> bool | None``: return False to refuse (``forbidden``).
    - ``on_message(peer, message) -> dict | None``: return None to drop the message (the
      sender gets ``dropped``), or the message to relay (re-serialised, possibly rewritten).
    - ``on_disconnect(peer, reason)``: after the peer left every room.
    ``on_connect`` runs before the upgrade and lives on the service.
    """

    def __init__(self) -> None:
        self.on_join: Callable[[Peer, str, dict[str, Any]], bool | None] | None = None
        self.on_message: Callable[[Peer, dict[str, Any]], dict[str, Any] | None] | None = None
        self.on_disconnect: Callable[[Peer, str], None] | None = None


def _identity(data: bytes) -> bytes:
    return data


class Hub:
    def __init__(
        self,
        *,
        frame: Callable[[bytes], bytes] = _identity,
        unframe: Callable[[bytes], bytes] = _identity,
        clock: Callable[[], float],
        metrics: Metrics | None = None,
        default_room: bool = True,
        max_rooms_per_peer: int = 8,
        max_peers_per_room: int = 0,
        max_meta_size: int = 1024,
        hooks: Hooks | None = None,
        broker: Broker | None = None,
    ) -> None:
        self.frame = frame
        self.unframe = unframe  # a frame's payload back (only to report dropped messages)
        self.broker: Broker = broker or MemoryBroker()
        self.shared = self.broker.shared
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.max_rooms_per_peer = max_rooms_per_peer
        self.max_peers_per_room = max_peers_per_room
        self.max_meta_size = max_meta_size
        self.hooks = hooks or Hooks()
        self.debug = False  # log every message received and relayed (costly; set at start)
        self.peers: dict[str, Peer] = {}
        self.rooms: dict[str, Room] = {}
        self.tokens: dict[str, Peer] = {}  # resume token key -> local peer (live or parked)
        self.away = 0  # parked peers (their sink is a Mailbox)
        # Peers that resumed on another node -> when: a message still addressed here gets
        # `expired` (delivering it late could reorder it after newer ones). Bounded by age.
        self.moved: dict[str, float] = {}
        self.lobby: Room | None = Room("", presence=False) if default_room else None
        self.fast: Callable[[Hub, Peer, bytes], Any] | None = None
        self.use_compiled(True)

    def use_compiled(self, on: bool) -> None:
        """Run messages through core/_speedups.pyx when it is built (``on``), or through
        the Python methods alone: ``fast`` relays the common case of ``_handle`` (or hands
        the parsed message back), and a compiled ``handle_text`` stands in for the method."""
        self.fast = RELAY if on else None
        if on and RELAY is not None:
            self.handle_text = _TEXT_HANDLER(self).handle_text  # type: ignore[method-assign]
            self._deliver = _DELIVER  # type: ignore[method-assign]
        else:
            self.__dict__.pop("handle_text", None)
            self.__dict__.pop("_deliver", None)

    # --- membership -------------------------------------------------------------------

    def new_peer_id(self) -> str:
        """96 random bits, URL-safe; behind a shared broker prefixed with the node's id."""
        return self.broker.node + secrets.token_urlsafe(12)

    def connected(self) -> int:
        """Peers here with a connection (not parked)."""
        return len(self.peers) - self.away

    def clients_count(self) -> int:
        """Connected clients on every node (the greeting's ``clientsCount``)."""
        return self.broker.clients(self.connected())

    def add(self, peer: Peer) -> None:
        """Register a connected peer; it starts in the default room (if there is one)."""
        self.peers[peer.id] = peer
        if self.lobby is not None:
            self.lobby.members[peer.id] = peer

    def remove(self, peer: Peer, reason: str) -> None:
        """The peer is gone (``closed`` or ``timeout``): tell its rooms, forget it."""
        if self.peers.get(peer.id) is not peer:
            return
        del self.peers[peer.id]
        if type(peer.sink) is Mailbox:
            self.away -= 1
        if peer.token is not None:
            self.tokens.pop(peer.token, None)
            self.broker.ended(peer.id)
        for room in list(peer.rooms.values()):
            self._leave(peer, room, reason)
        if self.lobby is not None:
            self.lobby.members.pop(peer.id, None)
        if self.hooks.on_disconnect is not None:
            self.hooks.on_disconnect(peer, reason)

    def join(self, peer: Peer, name: Any, meta: Any = None, ref: Any = None) -> None:
        """Put ``peer`` in room ``name``; raises MessageError if refused."""
        if type(name) is not str or not ROOM_NAME.fullmatch(name):
            raise MessageError(
                ErrorCode.INVALID_ROOM, "room must be 1-128 of [A-Za-z0-9._~:@-]", ref
            )
        if name in peer.rooms:
            raise MessageError(ErrorCode.ALREADY_IN_ROOM, f"already in room {name}", ref)
        if len(peer.rooms) >= self.max_rooms_per_peer:
            raise MessageError(
                ErrorCode.TOO_MANY_ROOMS, f"at most {self.max_rooms_per_peer} rooms", ref
            )
        meta = self._check_meta(peer, meta, ref)
        if not room_allowed(peer.allowed_rooms, name):
            raise MessageError(ErrorCode.FORBIDDEN, f"not allowed to join {name}", ref)
        if peer.joining is not None and name in peer.joining:
            raise MessageError(ErrorCode.ALREADY_IN_ROOM, f"already joining room {name}", ref)
        room = self.rooms.get(name)
        if room is not None and 0 < self.max_peers_per_room <= len(room.members) + len(
            room.remote
        ):
            raise MessageError(ErrorCode.ROOM_FULL, f"room {name} is full", ref)
        if self.hooks.on_join is not None and self.hooks.on_join(peer, name, meta) is False:
            raise MessageError(ErrorCode.FORBIDDEN, f"not allowed to join {name}", ref)
        if room is None:
            room = self.rooms[name] = Room(name)
            if self.shared:
                room.loading = []  # the snapshot decides the mirror; events wait for it
        if self.shared:
            self.hold(peer, name)
            room.joining[peer.id] = []

        def done(remote: list[Member], seq: int, version: int) -> None:
            self._join_done(peer, room, meta, ref, remote, seq, version)

        def failed(code: str, message: str) -> None:
            self._join_failed(peer, room, MessageError(code, message, ref))

        self.broker.join(name, peer.id, meta, done, failed)

    def _join_done(self, peer: Peer, room: Room, meta: dict[str, Any], ref: Any,
                   remote: list[Member], seq: int, version: int) -> None:
        name = room.name
        self.unblock(peer, name)
        if self.peers.get(peer.id) is not peer:  # gone while the join was in flight
            room.joining.pop(peer.id, None)
            self.broker.leave(name, peer.id, "closed")
            self._drop_if_empty(room)
            return
        node = self.broker.node
        others = [m for m in remote if m.node != node]
        if room.loading is not None:  # first local member: the snapshot starts the mirror
            for m in others:
                room.add_remote(m)
            room.version = version
            pending, room.loading = room.loading, None
            for v, member, peer_id, reason in pending:
                self._apply(room, v, member, peer_id, reason)
        snapshot = [{"peerId": pid, "meta": m, "polite": True}
                    for pid, m in room.in_join_order(others)]
        joined = {"type": "joined", "room": name, "peers": snapshot}
        peer.sink.send(self.frame(messages.reply(joined, ref)))
        for v, frame in room.joining.pop(peer.id, ()):
            if v == 0 or v > version:
                peer.sink.send(frame)
        if room.members or room.joining:  # joiners whose snapshot has this one skip it
            self._announce(room, peer_joined(name, peer.id, meta), version)
        room.members[peer.id] = peer
        room.meta[peer.id] = meta
        room.seq[peer.id] = seq
        room.since[peer.id] = version
        peer.rooms[name] = room
        if self.lobby is not None:
            self.lobby.members.pop(peer.id, None)
        self.replay(peer)

    def _join_failed(self, peer: Peer, room: Room, exc: MessageError) -> None:
        room.joining.pop(peer.id, None)
        self.unblock(peer, room.name)
        self._drop_if_empty(room)
        if self.peers.get(peer.id) is peer:
            self.send_error(peer, exc)
            self.replay(peer)

    def hold(self, peer: Peer, key: str) -> None:
        """Hold ``peer``'s messages in its backlog until ``unblock(peer, key)`` and
        ``replay(peer)`` (a join in flight; the greeting of a shared broker)."""
        if peer.joining is None:
            peer.joining = set()
        peer.joining.add(key)

    def unblock(self, peer: Peer, name: str) -> None:
        if peer.joining is not None:
            peer.joining.discard(name)
            if not peer.joining:
                peer.joining = None

    def replay(self, peer: Peer) -> None:
        """Handle the messages held while joins were in flight, in order."""
        while peer.joining is None and peer.backlog:
            text = peer.backlog.pop(0)
            self._handle(peer, text)
        if not peer.backlog:
            peer.backlog = None

    def _drop_if_empty(self, room: Room) -> None:
        if not room.members and not room.joining and self.rooms.get(room.name) is room:
            del self.rooms[room.name]

    def leave(self, peer: Peer, name: Any, ref: Any = None) -> None:
        room = peer.rooms.get(name) if type(name) is str else None
        if room is None:
            raise MessageError(ErrorCode.NOT_IN_ROOM, f"not in room {name}", ref)
        self._leave(peer, room, "left")
        peer.sink.send(self.frame(messages.reply({"type": "left", "room": room.name}, ref)))

    def _leave(self, peer: Peer, room: Room, reason: str) -> None:
        del room.members[peer.id]
        del room.meta[peer.id]
        del room.seq[peer.id]
        del room.since[peer.id]
        del peer.rooms[room.name]
        self.broker.leave(room.name, peer.id, reason)
        if room.members or room.joining:
            self._announce(room, peer_left(room.name, peer.id, reason))
        if not room.members and not room.joining and room.loading is None:
            del self.rooms[room.name]
        if not peer.rooms and self.lobby is not None and peer.id in self.peers:
            self.lobby.members[peer.id] = peer

    def _check_meta(self, peer: Peer, meta: Any, ref: Any) -> dict[str, Any]:
        if meta is None:
            meta = {}
        elif type(meta) is not dict:
            raise MessageError(ErrorCode.INVALID_MESSAGE, "meta must be a JSON object", ref)
        elif len(messages.reencode(meta, "meta")) > self.max_meta_size:
            raise MessageError(
                ErrorCode.META_TOO_LARGE, f"meta is over {self.max_meta_size} bytes", ref
            )
        if peer.fixed_meta or peer.user is not None:
            meta = {**meta, **(peer.fixed_meta or {})}
            if peer.user is not None:
                meta["user"] = peer.user
        return meta

    # --- messages ---------------------------------------------------------------------

    def handle_text(self, peer: Peer, text: bytes) -> None:
        """One text message from ``peer``: rate-limit, parse once, act or relay."""
        if self.debug:
            log.debug("message", extra={"fields": {
                "peer": peer.id, "addr": peer.address, "bytes": len(text)}})
        # admit_rate's admission, inline: the common case costs no call of its own
        now = self.clock()
        bucket = peer.bucket
        size = len(text)
        if bucket.take(now) if size <= SMALL_MESSAGE else bucket.spend(now, size):
            if peer.limited_since is not None and bucket.tokens >= 1.0:
                peer.limited_since = None
        else:
            self._refuse(peer, now, text)
            return
        if peer.joining is not None:  # a join is in flight: keep order, handle after it
            if peer.backlog is None:
                peer.backlog = []
            peer.backlog.append(text)
            return
        self._handle(peer, text)

    def _handle(self, peer: Peer, text: bytes) -> None:
        obj = None
        if self.fast is not None:  # compiled: relays a `to` message to a local peer ...
            obj = self.fast(self, peer, text)
            if obj is True:
                return
        self._handle_parsed(peer, text, obj)  # ... else the rest, with the message if parsed

    def _handle_parsed(self, peer: Peer, text: bytes, obj: dict[str, Any] | None) -> None:
        metrics = self.metrics
        try:
            if obj is None:
                obj = messages.parse(text)
            kind: str = obj["type"]
            received = metrics.received
            if kind in received:  # count_received's common case, inline
                received[kind] += 1
            else:
                metrics.count_received(kind)
            if kind in _SERVER_TYPES:
                if kind in messages.COMMAND_TYPES:
                    self._command(peer, kind, obj)
                    return
                raise MessageError(
                    ErrorCode.RESERVED_TYPE, f"type {kind!r} is reserved for the server",
                    obj.get("id"),
                )
            room, target = self.route(peer, obj)
            if self.hooks.on_message is not None:
                rewritten = self.hooks.on_message(peer, obj)
                if rewritten is None:
                    raise MessageError(ErrorCode.DROPPED, "message dropped by the server",
                                       obj.get("id"))
                data = messages.stamp_from(text, rewritten, peer.id)
            else:
                data = messages.stamp_from(text, obj, peer.id)
        except MessageError as exc:
            self.send_error(peer, exc)
            return
        if target is None:  # a room: local members here, the other nodes' through the broker
            assert room is not None
            n = self._deliver(room, self.frame(data), peer)
            if room.nodes or (self.shared and room is self.lobby):
                self.broker.publish_room(room.name, data, peer.id, obj.get("id"),
                                         len(room.nodes))
        elif type(target) is tuple:  # (node, peer id): a peer of another node
            self.broker.publish_peer(target[0], target[1], data, peer.id, list(peer.rooms),
                                     obj.get("id"))
            n = 1
        else:
            target.sink.send(self.frame(data))  # type: ignore[union-attr]
            n = 1
        relayed = metrics.relayed
        if kind in relayed:  # count_relayed's common case, inline
            relayed[kind] += 1
            metrics.deliveries += n
        else:
            metrics.count_relayed(kind, n)
        if self.debug:
            log.debug("relayed", extra={"fields": {
                "peer": peer.id, "addr": peer.address, "type": kind, "recipients": n}})

    def handle_binary(self, peer: Peer, payload: bytes = b"") -> None:
        if self.admit_rate(peer, len(payload)):
            self.send_error(peer, MessageError(
                ErrorCode.BINARY_NOT_SUPPORTED, "binary frames are not supported; send JSON text"
            ))

    def admit_rate(self, peer: Peer, size: int = 0, text: bytes | None = None) -> bool:
        """Spend one message token and ``size`` byte tokens of the peer's budgets (text,
        binary, WebSocket pings and pongs, and each fragment of a message all count).

        A refused message (``text`` given) is answered ``rate-limited`` with its ``id`` as
        ``ref``; refused pings, pongs and fragments get one such error when their flood
        starts, not one each (no amplification). A flood lasting RATE_LIMIT_CLOSE_AFTER
        seconds closes the connection with 1008.
        """
        now = self.clock()
        bucket = peer.bucket
        if bucket.take(now) if size <= SMALL_MESSAGE else bucket.spend(now, size):
            # A flood ends when the client is back under the rate (a spare token left), not
            # when one message slips through on a refilled token.
            if peer.limited_since is not None and bucket.tokens >= 1.0:
                peer.limited_since = None
            return True
        self._refuse(peer, now, text)
        return False

    def _refuse(self, peer: Peer, now: float, text: bytes | None) -> None:
        """A message or frame over ``peer``'s budget (see ``admit_rate``)."""
        self.metrics.rate_limited += 1
        quiet = peer.limited_since is not None  # log the start of a flood, not every refusal
        if peer.limited_since is None:
            peer.limited_since = now
        elif now - peer.limited_since >= RATE_LIMIT_CLOSE_AFTER:
            self.metrics.count_error(ErrorCode.RATE_LIMITED)
            peer.sink.close(CLOSE_POLICY, ErrorCode.RATE_LIMITED)
            return
        if text is not None or not quiet:  # control frames and fragments: once per flood
            self.send_error(peer, MessageError(
                ErrorCode.RATE_LIMITED, "too many messages or bytes; slow down", _ref_of(text)
            ), quiet)

    def _command(self, peer: Peer, kind: str, obj: dict[str, Any]) -> None:
        ref = obj.get("id")
        if kind == "ping":
            pong = messages.PONG if ref is None else messages.reply({"type": "pong"}, ref)
            peer.sink.send(self.frame(pong))
        elif kind == "join":
            self.join(peer, obj.get("room"), obj.get("meta"), ref)
        else:
            self.leave(peer, obj.get("room"), ref)

    def route(
        self, sender: Peer, obj: dict[str, Any]
    ) -> tuple[Room | None, Peer | tuple[str, str] | None]:
        """Where a relayed message goes: ``(room, None)`` for a room's members (the caller
        skips the sender), ``(room_or_None, peer)`` for one local peer, or
        ``(room_or_None, (node, peer_id))`` for a peer of another node."""
        room_name = obj.get("room")
        to = obj.get("to")
        ref = obj.get("id")
        if room_name is not None:
            if type(room_name) is not str:
                raise MessageError(ErrorCode.INVALID_ROOM, "room must be a string", ref)
            room = sender.rooms.get(room_name)
            if room is None:
                raise MessageError(ErrorCode.NOT_IN_ROOM, f"not in room {room_name}", ref)
        elif to is None:
            rooms = sender.rooms
            if len(rooms) == 1:
                room = next(iter(rooms.values()))
            elif rooms:
                raise MessageError(ErrorCode.ROOM_REQUIRED, "in several rooms: name one", ref)
            elif self.lobby is not None:
                room = self.lobby
            else:
                raise MessageError(ErrorCode.NOT_IN_ROOM, "not in any room; join one", ref)
        else:
            room = None
        if to is None:
            return room, None
        if type(to) is not str:
            raise MessageError(ErrorCode.INVALID_MESSAGE, "to must be a peer id string", ref)
        target = self.peers.get(to)
        if target is None:
            node = self._remote_node(sender, to, room) if self.shared else None
            if node is not None:
                return room, (node, to)
            raise MessageError(ErrorCode.UNKNOWN_PEER, "no such peer in your rooms", ref)
        if target is sender or not self._share_room(sender, target, room):
            raise MessageError(ErrorCode.UNKNOWN_PEER, "no such peer in your rooms", ref)
        return room, target

    def _remote_node(self, sender: Peer, to: str, room: Room | None) -> str | None:
        """The node of ``to`` if it may be a peer of another node sharing a room with
        ``sender``: from the mirror of ``room`` or of the sender's rooms, or (default room:
        no presence) from its id's node prefix; that node checks."""
        for r in (room,) if room is not None else sender.rooms.values():
            member = r.remote.get(to)
            if member is not None:
                return member.node
        node = self.broker.node
        if room is None and not sender.rooms and self.lobby is not None and len(to) > len(
            node
        ) and not to.startswith(node):
            return to[: len(node)]
        return None

    def _share_room(self, a: Peer, b: Peer, room: Room | None) -> bool:
        if room is not None:
            return b.id in room.members
        if not a.rooms:
            return self.lobby is not None and not b.rooms and a.id in self.lobby.members
        theirs = b.rooms
        for name in a.rooms:  # noqa: SIM110 (a loop: no generator object per message)
            if name in theirs:
                return True
        return False

    # --- what the broker brings from other nodes -----------------------------------------

    def remote_relay(self, room_name: str, data: bytes) -> int:
        """A message relayed on another node to a room with members here."""
        room = self.lobby if room_name == "" else self.rooms.get(room_name)
        if room is None:
            return 0
        return self._deliver(room, self.frame(data))

    def remote_direct(self, target: str, data: bytes, sender: str, rooms: list[str],
                      ref: Any, origin: str) -> bool:
        """A message ``to`` a peer of this node from a peer of ``origin``; refused (the
        sender gets ``unknown-peer``) unless they share a room."""
        peer = self.peers.get(target)
        if peer is not None and (
            any(name in peer.rooms for name in rooms)
            or (not rooms and not peer.rooms and self.lobby is not None)
        ):
            peer.sink.send(self.frame(data))
            return True
        if peer is None and target in self.moved:  # sent before the sender knew it moved
            if ref is not None:
                self.metrics.resume_expired += 1
                self.broker.publish_error(origin, sender, resume.expired(ref, target))
            return False
        self.broker.publish_error(origin, sender, messages.error(
            ErrorCode.UNKNOWN_PEER, "no such peer in your rooms", ref))
        return False

    def remote_error(self, peer_id: str, data: bytes) -> None:
        """An error for a local peer, decided on another node (or by the broker)."""
        peer = self.peers.get(peer_id)
        if peer is not None:
            obj = orjson.loads(data)
            if "code" in obj:
                self.metrics.count_error(obj["code"])
            peer.sink.send(self.frame(data))

    def remote_presence(self, room_name: str, version: int, member: Member | None,
                        peer_id: str, reason: str = "") -> None:
        """A join (``member``) or leave (``peer_id``, ``reason``) on another node."""
        room = self.rooms.get(room_name)
        if room is None:
            return
        if room.loading is not None:
            room.loading.append((version, member, peer_id, reason))
            return
        self._apply(room, version, member, peer_id, reason)

    def _apply(self, room: Room, version: int, member: Member | None, peer_id: str,
               reason: str) -> None:
        if version <= room.version:
            return  # already in the snapshot this mirror started from
        room.version = version
        if reason == MOVED:  # resumed on member.node: the mirror follows, nobody is told
            assert member is not None
            if member.node != self.broker.node and peer_id not in room.members:
                room.drop_remote(peer_id)
                room.add_remote(member)
            return
        if member is not None:
            if member.node == self.broker.node or member.peer_id in room.remote:
                return
            room.add_remote(member)
            event = peer_joined(room.name, member.peer_id, member.meta)
        else:
            if not room.drop_remote(peer_id):
                return
            event = peer_left(room.name, peer_id, reason)
        self._announce(room, event, version)

    def repair_room(self, room_name: str, present: dict[str, Member],
                    grace: set[str] | frozenset[str] = frozenset()) -> None:
        """Make a room's mirror match the cluster's presence (``present``: its members on
        other nodes; members in ``grace`` are kept one more round), telling local members
        what their events missed."""
        room = self.rooms.get(room_name)
        if room is None or room.loading is not None:
            return
        for pid in [p for p in room.remote if p not in present and p not in grace]:
            room.drop_remote(pid)
            self._announce(room, peer_left(room_name, pid, "timeout"))
        for pid, member in present.items():
            if pid not in room.remote:
                room.add_remote(member)
                self._announce(room, peer_joined(room_name, pid, member.meta))

    # --- resume (core/resume.py) ----------------------------------------------------------

    def new_token(self, peer: Peer) -> str:
        """A fresh resume token for ``peer``; the previous one stops working."""
        token = resume.new_token()
        if peer.token is not None:
            self.tokens.pop(peer.token, None)
        peer.token = resume.token_key(token)
        self.tokens[peer.token] = peer
        return token

    def park(self, peer: Peer, max_messages: int, max_bytes: int) -> Mailbox:
        """``peer``'s connection dropped: it stays in its rooms (no ``peer-left``) and what
        it is sent waits in a mailbox, until ``resume_local`` or ``expire``."""
        mailbox = Mailbox(max_messages, max_bytes,
                          lambda frame: self.report_dropped(peer.id, frame))
        if type(peer.sink) is not Mailbox:
            self.away += 1
        peer.sink = mailbox  # what it sent before the drop is still handled, in order
        peer.limited_since = None
        return mailbox

    def expire(self, peer: Peer) -> None:
        """The resume window ended: each sender of a kept message with an ``id`` gets
        ``expired``, then the peer leaves its rooms (``peer-left``, reason ``timeout``)."""
        if type(peer.sink) is Mailbox:
            for frame in peer.sink.take():
                self.report_dropped(peer.id, frame)
        self.remove(peer, "timeout")

    def resume_local(self, peer: Peer, sink: Sink) -> tuple[Sink, list[bytes], int]:
        """Give a local peer (parked, or still connected) a new sink; returns the old sink
        and what its mailbox kept, in order, with how many messages it had to drop."""
        old = peer.sink
        peer.sink = sink
        if type(old) is Mailbox:
            self.away -= 1
            return old, old.take(), old.missed
        return old, [], 0

    def release(self, peer_id: str, node: str) -> tuple[Sink, list[bytes], int] | None:
        """``peer_id`` resumed on ``node``: it leaves this node without a ``peer-left``
        (it is still in its rooms, now mirrored as a member of ``node``). Returns its old
        sink and its mailbox, as ``resume_local`` does."""
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return None
        now = self.clock()
        self.moved[peer_id] = now
        for old, when in list(self.moved.items()):  # oldest first
            if now - when < MOVED_MEMORY:
                break
            del self.moved[old]
        if peer.token is not None:
            self.tokens.pop(peer.token, None)
        for room in list(peer.rooms.values()):
            moved = Member(peer_id, room.meta.pop(peer_id), node, room.seq.pop(peer_id))
            del room.members[peer_id]
            del room.since[peer_id]
            self.broker.forget(room.name)
            if room.members or room.joining:
                room.add_remote(moved)
            elif room.loading is None:
                del self.rooms[room.name]
        peer.rooms = {}
        if self.lobby is not None:
            self.lobby.members.pop(peer_id, None)
        sink = peer.sink
        if type(sink) is Mailbox:
            self.away -= 1
            return sink, sink.take(), sink.missed
        return sink, [], 0

    def adopt(self, peer: Peer, rooms: list[tuple[str, Member, list[Member], int]]) -> None:
        """``peer`` resumed here from another node: it becomes a local member of its
        rooms, keeping its join order and meta, without a ``peer-joined``. Each room comes
        with the cluster's other members and the presence version at the moment of the
        move, for a room this node had no mirror of."""
        self.peers[peer.id] = peer
        node = self.broker.node
        for name, me, others, version in rooms:
            room = self.rooms.get(name)
            if room is None or room.loading is not None:
                room = self.rooms[name] = Room(name)
                for m in others:
                    if m.node != node:
                        room.add_remote(m)
                room.version = max(room.version, version)
            room.drop_remote(peer.id)
            room.members[peer.id] = peer
            room.meta[peer.id] = me.meta
            room.seq[peer.id] = me.seq
            room.since[peer.id] = room.version
            peer.rooms[name] = room
        if not peer.rooms and self.lobby is not None:
            self.lobby.members[peer.id] = peer

    def notify(self, peer_id: str, data: bytes) -> None:
        """A server message (unframed) for one peer, here or on its node."""
        peer = self.peers.get(peer_id)
        if peer is not None:
            peer.sink.send(self.frame(data))
        elif self.shared:
            node = self._node_of(peer_id)
            if node:
                self.broker.publish_error(node, peer_id, data)

    def report_dropped(self, peer_id: str, frame: bytes) -> None:
        """A frame ``peer_id`` will never get: its sender, if it gave an ``id``, is told."""
        found = resume.sender_and_ref(self.unframe(frame))
        if found is not None:
            self.metrics.resume_expired += 1
            self.notify(found[0], resume.expired(found[1], peer_id))

    def _node_of(self, peer_id: str) -> str:
        """The node of a peer of another node: from a room mirror, else its id's prefix."""
        for room in self.rooms.values():
            member = room.remote.get(peer_id)
            if member is not None:
                return member.node
        return peer_id[: len(self.broker.node)]

    # --- sending ----------------------------------------------------------------------

    def send_error(self, peer: Peer, exc: MessageError, quiet: bool = False) -> None:
        """Answer ``peer`` with an error message; logged unless ``quiet`` (floods)."""
        self.metrics.count_error(exc.code)
        if not quiet:
            log.info("error", extra={"fields": {
                "peer": peer.id, "addr": peer.address, "code": exc.code}})
        peer.sink.send(self.frame(messages.error(exc.code, exc.message, exc.ref)))

    def _deliver(self, room: Room, frame: bytes, skip: Peer | None = None) -> int:
        """A relayed frame to a room's local members (but ``skip``) and to its local
        joiners in flight; returns how many members got it."""
        n = 0
        for member in room.members.values():
            if member is not skip:
                member.sink.send(frame)
                n += 1
        if room.joining:
            for queued in room.joining.values():
                queued.append((0, frame))
        return n

    def _announce(self, room: Room, obj: dict[str, Any], version: int = 0) -> None:
        """A presence event for a room's local members (those who joined before
        ``version``, for a remote event) and its local joiners in flight."""
        frame = self.frame(orjson.dumps(obj))
        since = room.since
        for pid, p in room.members.items():
            if version == 0 or since[pid] < version:
                p.sink.send(frame)
        for queued in room.joining.values():
            queued.append((version, frame))

    def _send_many(self, peers: Iterable[Peer], obj: dict[str, Any]) -> int:
        frame = self.frame(orjson.dumps(obj))
        n = 0
        for p in peers:
            p.sink.send(frame)
            n += 1
        return n

    def send_to_peer(self, peer_id: str, message: dict[str, Any]) -> bool:
        peer = self.peers.get(peer_id)
        if peer is None:
            return False
        peer.sink.send(self.frame(orjson.dumps(message)))
        return True

    def send_to_room(self, name: str, message: dict[str, Any]) -> int:
        room = self.lobby if name == "" else self.rooms.get(name)
        if room is None:
            return 0
        return self._send_many(room.members.values(), message)

    def broadcast(self, message: dict[str, Any]) -> int:
        return self._send_many(self.peers.values(), message)

    def room_peers(self, name: str) -> list[dict[str, Any]]:
        """A named room's members on this node and (mirrored) on others, in join order."""
        room = self.rooms.get(name)
        if room is None:
            return []
        return [{"peerId": pid, "meta": meta}
                for pid, meta in room.in_join_order(room.remote.values())]


def peer_joined(room: str, peer_id: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "peer-joined", "room": room, "peerId": peer_id, "meta": meta,
            "polite": False}


def peer_left(room: str, peer_id: str, reason: str) -> dict[str, Any]:
    return {"type": "peer-left", "room": room, "peerId": peer_id, "reason": reason}


def _ref_of(text: bytes | None) -> Any:
    """The ``id`` of a refused message, parsed only on the refusal path."""
    if text is None:
        return None
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return obj.get("id") if type(obj) is dict else None


def room_allowed(patterns: tuple[str, ...] | None, room: str) -> bool:
    """A token's rooms claim: exact names or 'prefix*' patterns; None allows every room."""
    if patterns is None:
        return True
    return any(room.startswith(p[:-1]) if p.endswith("*") else room == p for p in patterns)
