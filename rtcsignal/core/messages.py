"""The signaling message format: parsing client messages and building server messages.

A client message is a JSON object with a string ``type`` of 1-64 characters. It is parsed
once (orjson); the relayed bytes are the client's own text with ``"from"`` inserted, so
nothing is re-serialised unless the client wrote a ``from`` of its own.
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_TYPE_LENGTH = 64

#: Types only the server sends; a client sending one gets ``reserved-type``.
RESERVED_TYPES = frozenset(
    {"connected", "error", "joined", "left", "peer-joined", "peer-left", "pong"}
)

#: Types the server acts on instead of relaying.
COMMAND_TYPES = frozenset({"join", "leave", "ping"})


class ErrorCode:
    """Every ``code`` an ``error`` message can carry (documented in docs/protocol.md)."""

    INVALID_JSON = "invalid-json"
    INVALID_MESSAGE = "invalid-message"
    RESERVED_TYPE = "reserved-type"
    BINARY_NOT_SUPPORTED = "binary-not-supported"
    UNKNOWN_PEER = "unknown-peer"
    NOT_IN_ROOM = "not-in-room"
    ROOM_REQUIRED = "room-required"
    ROOM_FULL = "room-full"
    TOO_MANY_ROOMS = "too-many-rooms"
    INVALID_ROOM = "invalid-room"
    ALREADY_IN_ROOM = "already-in-room"
    META_TOO_LARGE = "meta-too-large"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate-limited"
    DROPPED = "dropped"


class MessageError(Exception):
    """A client message we refuse; the client gets an ``error`` message, nothing is relayed."""

    def __init__(self, code: str, message: str, ref: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


def parse(text: bytes) -> dict[str, Any]:
    """Bytes of a text frame -> the message object. Raises MessageError."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise MessageError(ErrorCode.INVALID_JSON, "message is not valid JSON") from None
    if type(obj) is not dict:
        raise MessageError(ErrorCode.INVALID_MESSAGE, "message must be a JSON object")
    kind = obj.get("type")
    if type(kind) is not str or not 0 < len(kind) <= MAX_TYPE_LENGTH:
        raise MessageError(
            ErrorCode.INVALID_MESSAGE,
            f"message needs a string 'type' of 1-{MAX_TYPE_LENGTH} characters",
            obj.get("id"),
        )
    return obj


def stamp_from(text: bytes, obj: dict[str, Any], peer_id: str) -> bytes:
    """The relayed text: the client's bytes with ``"from":"<peer_id>"`` as the first field.

    When the client wrote its own ``from`` we re-serialise, because a duplicate key would
    leave which one wins to the receiver's parser.
    """
    if "from" in obj:
        obj["from"] = peer_id
        return reencode(obj)
    i = text.find(b"{") + 1
    return b"".join((text[:i], b'"from":"', peer_id.encode(), b'",', text[i:]))


def encode(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj)


def reencode(obj: Any, what: str = "message") -> bytes:
    """Serialise client-supplied JSON again. orjson reads deeper nesting than it writes
    (1024 vs 254 levels), so a valid message can be impossible to write back."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        raise MessageError(ErrorCode.INVALID_MESSAGE, f"{what} is nested too deeply") from None


def reply(body: dict[str, Any], ref: Any = None) -> bytes:
    """A server message, echoing the client's ``id`` as ``ref`` when it can be written back."""
    if ref is not None:
        body["ref"] = ref
        try:
            return orjson.dumps(body)
        except orjson.JSONEncodeError:
            del body["ref"]
    return orjson.dumps(body)


def error(code: str, message: str, ref: Any = None) -> bytes:
    return reply({"type": "error", "code": code, "message": message}, ref)


PONG = orjson.dumps({"type": "pong"})
