"""Session resume: tokens, and the mailbox that keeps a dropped peer's messages.

A peer whose connection drops without a clean close is *parked*: it stays in its rooms
(nobody sees ``peer-left``) and its sink becomes a ``Mailbox`` that keeps what it would have
been sent, within ``--resume-queue-messages`` and ``--resume-queue-bytes``. A reconnect with
the session's token gets the mailbox in order, then the live stream. What cannot be kept
(overflow, or the window ends) is reported to each sender that gave an ``id``, as
``{"type":"expired","ref":id,"to":peer}`` — nothing vanishes silently.

The mailbox holds the frames exactly as they would have been written; the sender and the
``id`` of a dropped one are read back from it only on that rare path, so the relay path
pays nothing for resume.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from typing import Any

import orjson

#: 32 random bytes: 256 bits, URL-safe (43 characters).
TOKEN_BYTES = 32


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_key(token: str) -> str:
    """What is stored for a token: its SHA-256, so a leaked store does not leak sessions."""
    return hashlib.sha256(token.encode()).hexdigest()


def sender_and_ref(payload: bytes) -> tuple[str, Any] | None:
    """``(from, id)`` of a relayed message, None for the server's own messages (presence,
    errors) and for relays without an ``id`` (nobody to tell)."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict:
        return None
    sender, ref = obj.get("from"), obj.get("id")
    if type(sender) is not str or ref is None:
        return None
    return sender, ref


def expired(ref: Any, peer_id: str) -> bytes:
    return orjson.dumps({"type": "expired", "ref": ref, "to": peer_id})


class Mailbox:
    """The sink of a parked peer: keeps frames up to a message and a byte bound.

    ``dropped(frame)`` is called for each frame that does not fit; ``missed`` counts them
    (the resumed greeting's ``"missed"``). Cost: the frames themselves, at most
    ``max_bytes`` plus one list slot per message.
    """

    __slots__ = ("bytes", "dropped", "frames", "max_bytes", "max_messages", "missed")

    def __init__(self, max_messages: int, max_bytes: int,
                 dropped: Callable[[bytes], None]) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.dropped = dropped
        self.frames: list[bytes] = []
        self.bytes = 0
        self.missed = 0

    def send(self, frame: bytes) -> None:
        size = len(frame)
        if len(self.frames) < self.max_messages and self.bytes + size <= self.max_bytes:
            self.frames.append(frame)
            self.bytes += size
        else:
            self.missed += 1
            self.dropped(frame)

    def close(self, code: int, reason: str) -> None:
        """Nothing to close: the connection is already gone."""

    def take(self) -> list[bytes]:
        frames, self.frames, self.bytes = self.frames, [], 0
        return frames


class Holding:
    """The sink of a peer whose resume is being completed on this node: frames wait here
    until the greeting and the handed-over mailbox have gone out (unbounded only for that
    moment, at most the handover timeout)."""

    __slots__ = ("closed", "frames")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed: tuple[int, str] | None = None

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
