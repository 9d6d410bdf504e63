"""The broker's two Redis connections, spoken in raw RESP and read in bulk with hiredis.

redis-py costs about 10 µs of CPU per publication received (``PubSub.get_message``: an
await, a timeout context and a response object each) and about 4 µs per pipelined command
sent (packing and reply objects); here a read of many publications, or of a batch's
replies, costs one await and one hiredis pass (measured: docs/benchmarks.md). Each
connection is still made by redis-py (TLS, ``unix://``, AUTH, the client name), so every
URL the broker accepts works here too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import hiredis
import redis.asyncio as aioredis

#: Bytes asked of the socket per read.
READ_SIZE = 1 << 16

#: ``on_message(kind, channel, data)``: kind is ``message``/``smessage`` (data: bytes),
#: ``subscribe``/``ssubscribe``/``unsubscribe``/``sunsubscribe`` (data: the count).
OnMessage = Callable[[str, bytes, Any], None]


def pack(*args: bytes | str | int) -> bytes:
    """One command in RESP."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class Subscriber:
    """One dedicated subscriber connection; ``run`` reads until it drops (then raises)."""

    def __init__(self, client: aioredis.Redis, on_message: OnMessage) -> None:
        self.conn = client.connection_pool.make_connection()
        self.on_message = on_message

    async def connect(self) -> None:
        await self.conn.connect()

    def send(self, *args: bytes | str) -> None:
        """A (un)subscribe command; its confirmation comes through ``on_message``."""
        writer = self.conn._writer  # redis-py's stream, after its handshake
        if writer is None:
            raise ConnectionError("subscriber not connected")
        writer.write(pack(*args))

    async def run(self) -> None:
        reader = self.conn._reader
        if reader is None:
            raise ConnectionError("subscriber not connected")
        parser = hiredis.Reader()
        on_message = self.on_message
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                raise ConnectionError("subscriber connection closed")
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                if isinstance(reply, list) and len(reply) == 3:
                    on_message(reply[0].decode(), reply[1], reply[2])
                elif isinstance(reply, hiredis.ReplyError):
                    raise ConnectionError(f"subscriber: {reply}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.conn.disconnect(), 2)


class Commands:
    """A dedicated connection for the broker's ordered queue: each batch is packed and
    written at once and its replies parsed as they arrive. An error reply comes back as an
    exception object in its slot; a lost connection raises (and is made again next time)."""

    def __init__(self, client: aioredis.Redis, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self.conn: Any = None
        self.parser = hiredis.Reader()
        self.stale = False  # make a fresh connection before the next use (Redis restarted)

    async def connect(self) -> None:
        """A fresh connection (the old one, if any, is closed)."""
        await self.close()
        self.stale = False
        conn = self.client.connection_pool.make_connection()
        await asyncio.wait_for(conn.connect(), self.timeout)
        self.conn, self.parser = conn, hiredis.Reader()

    async def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        conn = self.conn
        if self.stale or conn is None or conn._reader.at_eof() or conn._writer.is_closing():
            await self.connect()  # never used, or Redis closed it while it was idle
        try:
            reader, writer = self.conn._reader, self.conn._writer  # after redis-py's handshake
            writer.write(b"".join([pack(*c) for c in commands]))
            out: list[Any] = []
            n = len(commands)
            parser = self.parser
            while True:
                while len(out) < n and (reply := parser.gets()) is not False:
                    out.append(reply)
                if len(out) == n:
                    return out
                data = await asyncio.wait_for(reader.read(READ_SIZE), self.timeout)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                parser.feed(data)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.disconnect(), 2)
