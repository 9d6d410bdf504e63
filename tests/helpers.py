"""Client helpers shared by the integration tests: websockets clients, a raw WebSocket
client that can refuse to answer pings, plain HTTP requests and a /metrics parser.

Every await here has a short timeout so a server bug fails a test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import struct
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

TIMEOUT = 5.0

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


async def open_client(url: str, **kwargs: Any) -> tuple[ClientConnection, dict[str, Any]]:
    """A websockets client (auto-pong, no client pings) and its greeting."""
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("open_timeout", TIMEOUT)
    kwargs.setdefault("compression", None)
    kwargs.setdefault("max_queue", None)
    ws = await connect(url, **kwargs)
    greeting = await recv_json(ws)
    assert greeting.get("type") == "connected", greeting
    return ws, greeting


async def recv_text(ws: ClientConnection, timeout: float = TIMEOUT) -> str:
    data = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(data, str), f"expected a text frame, got {data!r}"
    return data


async def recv_json(ws: ClientConnection, timeout: float = TIMEOUT) -> dict[str, Any]:
    return json.loads(await recv_text(ws, timeout))


async def send_json(ws: ClientConnection, obj: Any) -> None:
    await asyncio.wait_for(ws.send(json.dumps(obj)), TIMEOUT)


async def close_all(clients: list[ClientConnection]) -> None:
    await asyncio.gather(*(asyncio.wait_for(c.close(), TIMEOUT) for c in clients),
                         return_exceptions=True)


# --- a raw WebSocket client over asyncio streams ---------------------------------------


class RawClient:
    """A hand-rolled RFC 6455 client. With ``auto_pong=False`` it never answers pings
    (python ``websockets`` always does) and it never answers close frames either."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 auto_pong: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.auto_pong = auto_pong
        self.pings = 0
        self.ping_seen = asyncio.Condition()

    @classmethod
    async def open(cls, host: str, port: int, path: str = "/signaling",
                   auto_pong: bool = False) -> tuple[RawClient, dict[str, Any]]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101"), head
        client = cls(reader, writer, auto_pong)
        greeting = json.loads(await client.recv_text())
        assert greeting.get("type") == "connected", greeting
        return client, greeting

    async def recv_frame(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        """The next frame (opcode, payload); raises EOFError when the server dropped us."""
        async def read() -> tuple[int, bytes]:
            try:
                b0, b1 = await self.reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
                assert not b1 & 0x80, "server frames must not be masked"
                payload = await self.reader.readexactly(n)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise EOFError from exc
            return b0 & 0x0F, payload

        return await asyncio.wait_for(read(), timeout)

    async def recv_text(self, timeout: float = TIMEOUT) -> str:
        """The next text message, answering pings on the way if ``auto_pong``."""
        while True:
            op, payload = await self.recv_frame(timeout)
            if op == OP_PING:
                if self.auto_pong:
                    self.send_frame(OP_PONG, payload)
                async with self.ping_seen:
                    self.pings += 1
                    self.ping_seen.notify_all()
                continue
            assert op == OP_TEXT, (op, payload)
            return payload.decode()

    def pump(self) -> tuple[asyncio.Task[None], asyncio.Queue[str]]:
        """Read in the background (answering pings if ``auto_pong``); texts go to a queue."""
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

    def send_frame(self, op: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | op, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | op, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | op, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    def send_text(self, text: str) -> None:
        self.send_frame(OP_TEXT, text.encode())

    def close(self) -> None:
        self.writer.transport.abort()


def parse_close(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005


# --- plain HTTP ------------------------------------------------------------------------


async def http_request(host: str, port: int, path: str, method: str = "GET",
                       headers: dict[str, str] | None = None
                       ) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a fresh connection: (status, lower-case headers, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}"
                     "Connection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        hdrs: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        if "content-length" in hdrs:
            body = await asyncio.wait_for(reader.readexactly(int(hdrs["content-length"])),
                                          TIMEOUT)
        else:
            body = await asyncio.wait_for(reader.read(), TIMEOUT)
        return status, hdrs, body
    finally:
        writer.transport.abort()


async def get(server: Any, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    return await http_request(server.host, server.port, path, **kw)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; fails on a malformed sample line."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"malformed metrics line: {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


async def metrics(server: Any) -> dict[str, float]:
    status, hdrs, body = await get(server, "/metrics")
    assert status == 200, (status, body)
    assert hdrs.get("content-type", "").startswith("text/plain"), hdrs
    return parse_metrics(body.decode())
