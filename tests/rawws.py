"""A raw-socket WebSocket client for crafting arbitrary frames in tests.

Unlike a WebSocket library it does exactly what it is told: the opening handshake is
written by hand (any path, query and extra headers; or any bytes at all), frames are built
with a chosen opcode, FIN/RSV bits, mask (or none) and declared length (which may differ from
the payload actually sent), and incoming frames, close codes and HTTP refusals are returned
as they arrive. Pings met while waiting for a text message are answered unless the client
was made with ``auto_pong=False`` (python ``websockets`` always answers them), and they are
counted either way. Close frames are never answered. Every read has a timeout so a server bug
fails a test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

TIMEOUT = 5.0

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def build_frame(
    op: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """One frame. ``length`` overrides the declared payload length (the payload bytes given
    are still what follows the header), so a header can claim more than is ever sent."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv & 0x7) << 4 | (op & 0x0F)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def split_frame(data: bytes) -> tuple[int, bytes, bytes]:
    """``(opcode, payload, rest)`` of the unmasked server frame at the start of ``data``."""
    n = data[1] & 0x7F
    head = 2
    if n == 126:
        (n,) = struct.unpack("!H", data[2:4])
        head = 4
    elif n == 127:
        (n,) = struct.unpack("!Q", data[2:10])
        head = 10
    return data[0] & 0x0F, data[head:head + n], data[head + n:]


def close_code(payload: bytes) -> int | None:
    """The status code of a close frame body (None when the body is empty)."""
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


@dataclass
class HttpAnswer:
    """An HTTP response head (and body, when the server sent one)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""


def parse_head(head: bytes) -> HttpAnswer:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    assert len(parts) >= 2 and parts[0].startswith("HTTP/1."), f"not an HTTP response: {head!r}"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return HttpAnswer(int(parts[1]), headers)


class Closed(Exception):
    """The server closed the TCP connection (EOF or reset)."""


class RawWS:
    """One TCP connection to the server, spoken to byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 auto_pong: bool = True) -> None:
        self.reader = reader
        self.writer = writer
        self.answer: HttpAnswer | None = None
        self.auto_pong = auto_pong
        self.pings = 0  # pings seen by recv_text / recv_json (answered or not)
        self.ping_seen = asyncio.Condition()

    # --- connecting

    @classmethod
    async def connect(cls, host: str, port: int, auto_pong: bool = True, **kw: Any) -> RawWS:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, **kw), TIMEOUT)
        return cls(reader, writer, auto_pong)

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        query: str = "",
        headers: dict[str, str] | None = None,
        path: str = "/signaling",
        expect_greeting: bool = True,
        auto_pong: bool = True,
    ) -> tuple[RawWS, dict[str, Any]]:
        """Connect and upgrade; fails unless the answer is 101. Returns the greeting."""
        ws = await cls.connect(host, port, auto_pong)
        answer = await ws.handshake(query, headers, path, host=f"{host}:{port}")
        assert answer.status == 101, f"upgrade refused: {answer}"
        greeting: dict[str, Any] = {}
        if expect_greeting:
            greeting = await ws.recv_json()
            assert greeting.get("type") == "connected", greeting
        return ws, greeting

    @staticmethod
    def request_bytes(query: str = "", headers: dict[str, str] | None = None,
                      path: str = "/signaling", host: str = "localhost",
                      key: str | None = None) -> bytes:
        key = key or base64.b64encode(os.urandom(16)).decode()
        target = path + (f"?{query}" if query else "")
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        return (f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()

    async def handshake(self, query: str = "", headers: dict[str, str] | None = None,
                        path: str = "/signaling", host: str = "localhost") -> HttpAnswer:
        """Send an upgrade request; return the answer (the body too, for a refusal). On 101
        the Sec-WebSocket-Accept value is checked against the key sent."""
        key = base64.b64encode(os.urandom(16)).decode()
        self.send_raw(self.request_bytes(query, headers, path, host, key))
        answer = await self.read_answer()
        if answer.status == 101:
            expected = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
            assert answer.headers.get("sec-websocket-accept") == expected, answer
        self.answer = answer
        return answer

    async def read_answer(self, timeout: float = TIMEOUT) -> HttpAnswer:
        """Read an HTTP response head, plus its body unless it is a 101."""
        try:
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.IncompleteReadError as exc:
            raise Closed(f"closed before an HTTP answer: {exc.partial!r}") from exc
        answer = parse_head(head[:-4])
        if answer.status != 101:
            n = int(answer.headers.get("content-length", "0"))
            answer.body = await asyncio.wait_for(self.reader.readexactly(n), timeout)
        return answer

    # --- sending

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, op: int, payload: bytes = b"", **kw: Any) -> None:
        self.send_raw(build_frame(op, payload, **kw))

    def send_text(self, text: str | bytes) -> None:
        self.send(OP_TEXT, text.encode() if isinstance(text, str) else text)

    def send_json(self, obj: Any) -> None:
        self.send_text(json.dumps(obj))

    async def drain(self) -> None:
        await asyncio.wait_for(self.writer.drain(), TIMEOUT)

    # --- receiving

    async def recv_frame(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        """The next frame as (opcode, payload); raises Closed at EOF or reset."""
        async def read() -> tuple[int, bytes]:
            try:
                b0, b1 = await self.reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
                assert not b1 & 0x80, "a server frame was masked"
                assert b0 & 0x80, "this server never fragments its frames"
                payload = await self.reader.readexactly(n)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise Closed(str(exc)) from exc
            return b0 & 0x0F, payload

        return await asyncio.wait_for(read(), timeout)

    async def recv_text(self, timeout: float = TIMEOUT) -> str:
        """The next text message; pings on the way are counted, and answered if
        ``auto_pong``. Fails on any other frame (a close included)."""
        while True:
            op, payload = await self.recv_frame(timeout)
            if op == OP_PING:
                if self.auto_pong:
                    self.send(OP_PONG, payload)
                async with self.ping_seen:
                    self.pings += 1
                    self.ping_seen.notify_all()
                continue
            assert op == OP_TEXT, f"expected a text frame, got opcode {op}: {payload!r}"
            return payload.decode()

    async def recv_json(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next text message as JSON (pings handled as by ``recv_text``)."""
        return json.loads(await self.recv_text(timeout))

    def pump(self) -> tuple[asyncio.Task[None], asyncio.Queue[str]]:
        """Read in the background (pings handled as by ``recv_text``); texts go to a
        queue. The task ends with the reading error (``Closed``, a non-text frame)."""
        queue: asyncio.Queue[str] = asyncio.Queue()

        async def run() -> None:
            while True:
                queue.put_nowait(await self.recv_text(timeout=3600))

        return asyncio.ensure_future(run()), queue

    async def wait_pings(self, count: int, timeout: float) -> None:
        """Until ``pings`` reaches ``count`` (needs a running ``pump``)."""
        async def wait() -> None:
            async with self.ping_seen:
                await self.ping_seen.wait_for(lambda: self.pings >= count)

        await asyncio.wait_for(wait(), timeout)

    async def expect_close(self, timeout: float = TIMEOUT) -> tuple[int | None, str]:
        """Read until the server's close frame; returns (code, reason). Text frames before it
        are skipped (the caller checks them first if it cares); fails on EOF without a close."""
        async def read() -> tuple[int | None, str]:
            while True:
                op, payload = await self.recv_frame(timeout)
                if op == OP_CLOSE:
                    return close_code(payload), payload[2:].decode("utf-8", "replace")
        return await asyncio.wait_for(read(), timeout)

    async def expect_eof(self, timeout: float = TIMEOUT) -> bytes:
        """Wait until the server closes the TCP connection; returns what came before it."""
        async def read() -> bytes:
            data = b""
            try:
                while chunk := await self.reader.read(65536):
                    data += chunk
            except ConnectionError:
                pass
            return data
        return await asyncio.wait_for(read(), timeout)

    def close(self) -> None:
        self.writer.transport.abort()
