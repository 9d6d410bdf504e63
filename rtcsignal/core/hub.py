"""Peers, rooms, presence and routing: the whole signaling state machine, with no I/O.

Each peer carries a ``sink`` (the connection adapter, or a recorder in tests) that takes
ready-to-write frames. The hub frames each outgoing message once with the ``frame``
function it was given and hands the same bytes to every recipient.

Routing costs: a message with ``to`` is one dict lookup plus a check over the sender's
rooms (at most ``max_rooms_per_peer``), whatever the number of peers or room size; a room
message visits that room's members only.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import orjson

from rtcsignal.core import messages
from rtcsignal.core.messages import ErrorCode, MessageError
from rtcsignal.core.metrics import Metrics
from rtcsignal.core.ratelimit import SMALL_MESSAGE, TokenBucket

log = logging.getLogger("rtcsignal")

ROOM_NAME = re.compile(r"[A-Za-z0-9._~:@-]{1,128}")

#: A connection refused for this long without pause is closed with 1008.
RATE_LIMIT_CLOSE_AFTER = 5.0

CLOSE_POLICY = 1008


class Sink(Protocol):
    def send(self, frame: bytes) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class Peer:
    """One connected client. ``rooms`` maps room name -> Room for the named rooms it is in."""

    __slots__ = (
        "address",
        "allowed_rooms",
        "bucket",
        "fixed_meta",
        "id",
        "limited_since",
        "rooms",
        "sink",
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

    def __repr__(self) -> str:
        return f"<Peer {self.id}>"


class Room:
    """Members in join order. ``presence`` is off for the default room (O(1) connects)."""

    __slots__ = ("members", "meta", "name", "presence")

    def __init__(self, name: str, presence: bool = True) -> None:
        self.name = name
        self.presence = presence
        self.members: dict[str, Peer] = {}
        self.meta: dict[str, dict[str, Any]] = {}


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
        clock: Callable[[], float],
        metrics: Metrics | None = None,
        default_room: bool = True,
        max_rooms_per_peer: int = 8,
        max_peers_per_room: int = 0,
        max_meta_size: int = 1024,
        hooks: Hooks | None = None,
    ) -> None:
        self.frame = frame
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.max_rooms_per_peer = max_rooms_per_peer
        self.max_peers_per_room = max_peers_per_room
        self.max_meta_size = max_meta_size
        self.hooks = hooks or Hooks()
        self.debug = False  # log every message received and relayed (costly; set at start)
        self.peers: dict[str, Peer] = {}
        self.rooms: dict[str, Room] = {}
        self.lobby: Room | None = Room("", presence=False) if default_room else None

    # --- membership -------------------------------------------------------------------

    def add(self, peer: Peer) -> None:
        """Register a connected peer; it starts in the default room (if there is one)."""
        self.peers[peer.id] = peer
        if self.lobby is not None:
            self.lobby.members[peer.id] = peer

    def remove(self, peer: Peer, reason: str) -> None:
        """The peer is gone (``closed`` or ``timeout``): tell its rooms, forget it."""
        if self.peers.pop(peer.id, None) is None:
            return
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
        room = self.rooms.get(name)
        if room is not None and 0 < self.max_peers_per_room <= len(room.members):
            raise MessageError(ErrorCode.ROOM_FULL, f"room {name} is full", ref)
        if self.hooks.on_join is not None and self.hooks.on_join(peer, name, meta) is False:
            raise MessageError(ErrorCode.FORBIDDEN, f"not allowed to join {name}", ref)
        if room is None:
            room = self.rooms[name] = Room(name)
        snapshot = [
            {"peerId": pid, "meta": room.meta[pid], "polite": True} for pid in room.members
        ]
        joined = {"type": "joined", "room": name, "peers": snapshot}
        peer.sink.send(self.frame(messages.reply(joined, ref)))
        if room.members:
            self._send_many(
                room.members.values(),
                {"type": "peer-joined", "room": name, "peerId": peer.id, "meta": meta,
                 "polite": False},
            )
        room.members[peer.id] = peer
        room.meta[peer.id] = meta
        peer.rooms[name] = room
        if self.lobby is not None:
            self.lobby.members.pop(peer.id, None)

    def leave(self, peer: Peer, name: Any, ref: Any = None) -> None:
        room = peer.rooms.get(name) if type(name) is str else None
        if room is None:
            raise MessageError(ErrorCode.NOT_IN_ROOM, f"not in room {name}", ref)
        self._leave(peer, room, "left")
        peer.sink.send(self.frame(messages.reply({"type": "left", "room": room.name}, ref)))

    def _leave(self, peer: Peer, room: Room, reason: str) -> None:
        del room.members[peer.id]
        del room.meta[peer.id]
        del peer.rooms[room.name]
        if room.members:
            self._send_many(
                room.members.values(),
                {"type": "peer-left", "room": room.name, "peerId": peer.id, "reason": reason},
            )
        else:
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
        if not self.admit_rate(peer, len(text), text):
            return
        try:
            obj = messages.parse(text)
            kind: str = obj["type"]
            self.metrics.count_received(kind)
            if kind in messages.COMMAND_TYPES:
                self._command(peer, kind, obj)
                return
            if kind in messages.RESERVED_TYPES:
                raise MessageError(
                    ErrorCode.RESERVED_TYPE, f"type {kind!r} is reserved for the server",
                    obj.get("id"),
                )
            targets = self.route(peer, obj)
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
        frame = self.frame(data)
        n = 0
        for target in targets:
            if target is not peer:
                target.sink.send(frame)
                n += 1
        self.metrics.count_relayed(kind, n)
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
        quiet = peer.limited_since is not None  # log the start of a flood, not every refusal
        if peer.limited_since is None:
            peer.limited_since = now
        elif now - peer.limited_since >= RATE_LIMIT_CLOSE_AFTER:
            self.metrics.count_error(ErrorCode.RATE_LIMITED)
            peer.sink.close(CLOSE_POLICY, ErrorCode.RATE_LIMITED)
            return False
        if text is not None or not quiet:  # control frames and fragments: once per flood
            self.send_error(peer, MessageError(
                ErrorCode.RATE_LIMITED, "too many messages or bytes; slow down", _ref_of(text)
            ), quiet)
        return False

    def _command(self, peer: Peer, kind: str, obj: dict[str, Any]) -> None:
        ref = obj.get("id")
        if kind == "ping":
            pong = messages.PONG if ref is None else messages.reply({"type": "pong"}, ref)
            peer.sink.send(self.frame(pong))
        elif kind == "join":
            self.join(peer, obj.get("room"), obj.get("meta"), ref)
        else:
            self.leave(peer, obj.get("room"), ref)

    def route(self, sender: Peer, obj: dict[str, Any]) -> Iterable[Peer]:
        """The peers a relayed message goes to (the caller skips the sender)."""
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
            return room.members.values()  # type: ignore[union-attr]
        if type(to) is not str:
            raise MessageError(ErrorCode.INVALID_MESSAGE, "to must be a peer id string", ref)
        target = self.peers.get(to)
        if target is None or target is sender or not self._share_room(sender, target, room):
            raise MessageError(ErrorCode.UNKNOWN_PEER, "no such peer in your rooms", ref)
        return (target,)

    def _share_room(self, a: Peer, b: Peer, room: Room | None) -> bool:
        if room is not None:
            return b.id in room.members
        if not a.rooms:
            return self.lobby is not None and not b.rooms and a.id in self.lobby.members
        return any(name in b.rooms for name in a.rooms)

    # --- sending ----------------------------------------------------------------------

    def send_error(self, peer: Peer, exc: MessageError, quiet: bool = False) -> None:
        """Answer ``peer`` with an error message; logged unless ``quiet`` (floods)."""
        self.metrics.count_error(exc.code)
        if not quiet:
            log.info("error", extra={"fields": {
                "peer": peer.id, "addr": peer.address, "code": exc.code}})
        peer.sink.send(self.frame(messages.error(exc.code, exc.message, exc.ref)))

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
        room = self.rooms.get(name)
        if room is None:
            return []
        return [{"peerId": pid, "meta": room.meta[pid]} for pid in room.members]


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
