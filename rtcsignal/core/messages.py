"""The signaling message format: parsing client messages and building server messages.

A client message is a JSON object with a string ``type`` of 1-64 characters. It is parsed
once (orjson), and what is relayed is that reading written out again (``stamp_from``), never
the client's own bytes: a receiver then cannot read a different ``type`` or ``to`` than the
server routed on, whatever its parser does with duplicate keys (see docs/design.md, "Relayed
text: re-serialised, not spliced").
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

MAX_TYPE_LENGTH = 64

#: Types only the server sends; a client sending one gets ``reserved-type``.
RESERVED_TYPES = frozenset(
    {"connected", "error", "expired", "joined", "left", "peer-joined", "peer-left", "pong",
     "reconnect"}
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
    BROKER_UNAVAILABLE = "broker-unavailable"


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
    """The relayed text: ``obj`` (the server's reading of ``text``) re-serialised, with
    ``"from":"<peer_id>"`` as the first field (a client-written ``from`` is dropped).

    Re-serialising means a key the client repeated arrives once, with the value the server
    read (orjson keeps the last), so parsers that keep the first and parsers that keep the
    last agree with the routing. Numbers keep their values, with one exception orjson would
    hide: an integer outside [-2**63, 2**64) was read as a float, so it is refused
    (``invalid-message``) instead of arriving as a different number. Raises MessageError.
    """
    if "from" in obj:
        obj = {k: v for k, v in obj.items() if k != "from"}
    try:  # one dict and one dumps: cheaper than dumping obj and splicing "from" in
        body = orjson.dumps({"from": peer_id, **obj})
    except orjson.JSONEncodeError:
        reencode(obj)  # raises the MessageError that says why
        raise
    # orjson writes every float of magnitude >= 1e16 as "<digits>e+<digits>", and an integer
    # out of range became such a float; so no "e+<digit>" in the output (nearly always: a
    # '+' at all is rare outside base64 strings) proves there was none. One memchr for '+',
    # a regex only from the first '+' on; see docs/design.md for the measurements.
    plus = body.find(b"+")
    if plus > 0 and _EXPONENT.search(body, plus - 1) is not None:
        check_integers(text, obj.get("id"))
    return body


_EXPONENT = re.compile(rb"e\+[0-9]")

#: Integers orjson reads as integers; outside this it silently makes floats of them.
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1


class _OutOfRange(Exception):
    pass


def _int_in_range(digits: str) -> int:
    # JSON integers have no leading zeros, so more than 20 characters is out of range (and
    # int() of thousands of digits would be slow, or refused by Python's digit limit).
    if len(digits) > 20:
        raise _OutOfRange
    n = int(digits)
    if not MIN_INT <= n <= MAX_INT:
        raise _OutOfRange
    return n


def check_integers(text: bytes, ref: Any = None) -> None:
    """Refuse ``text`` (already valid JSON for orjson) if any integer in it is outside
    [-2**63, 2**64): orjson read it as a float, and relaying that would change the number.
    Exact and slow (a second parse), so only called when a cheap filter says it may be so."""
    try:
        json.loads(text, parse_int=_int_in_range)
    except _OutOfRange:
        raise MessageError(
            ErrorCode.INVALID_MESSAGE,
            f"integer out of range: integers must be within [{MIN_INT}, {MAX_INT}]",
            ref,
        ) from None
    except RecursionError:  # deeper than the stdlib parser goes (orjson reads 1024 levels)
        raise MessageError(ErrorCode.INVALID_MESSAGE, "message is nested too deeply",
                           ref) from None


def encode(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj)


def reencode(obj: Any, what: str = "message") -> bytes:
    """Serialise client-supplied JSON again. orjson reads deeper nesting than it writes
    (1024 vs 254 levels), so a valid message can be impossible to write back."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError as exc:
        # Client JSON can only be too deep; an object rewritten by an application hook may
        # also hold an integer beyond 64 bits or a non-JSON type.
        problem = "is nested too deeply" if "Recursion" in str(exc) else "cannot be written as JSON"
        raise MessageError(ErrorCode.INVALID_MESSAGE, f"{what} {problem}") from None


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
