"""Echo server for the Autobahn TestSuite, built from the engine's real classes.

The listener takes the server's own ``Connection`` (HTTP head, opening handshake, transport
glue) with its pure ``protocol.session.Session`` (framing, fragmentation, UTF-8, control
frames, closing handshake); only the owner differs from the signaling service: every
complete message goes back as one frame of its own kind, text or binary, and there is no
greeting. Limits are raised past what the fuzzing cases send (16 MiB messages).

    python -m tests.conformance.echo_server --port 0     # prints "listening <port>"
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from rtcsignal.config import Config
from rtcsignal.core.metrics import Metrics
from rtcsignal.protocol.frames import OP_BINARY, OP_TEXT, encode_frame
from rtcsignal.protocol.http import HttpError, Request
from rtcsignal.server.connection import Answer, Connection, Handlers

BIG_MESSAGE = 64 * 1024 * 1024

HARNESS_CONFIG = Config(
    host="127.0.0.1",
    max_message_size=BIG_MESSAGE,
    max_send_buffer=256 * 1024 * 1024,
    rate_burst_bytes=BIG_MESSAGE,
    close_timeout=2.0,
)


ECHO = Handlers(
    text=lambda conn, payload: conn.send(encode_frame(OP_TEXT, payload)),
    binary=lambda conn, payload: conn.send(encode_frame(OP_BINARY, payload)),
    admit=lambda conn, nbytes: True,
    closed=lambda conn, reason: None,
)


class EchoOwner:
    """The ``Owner`` of each connection: echo every message, answer plain HTTP with 404."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.metrics = Metrics()
        self.live: set[Connection] = set()

    def connection_made(self, conn: Connection) -> HttpError | None:
        self.live.add(conn)
        return None

    def connection_lost(self, conn: Connection) -> None:
        self.live.discard(conn)

    def http(self, conn: Connection, request: Request) -> Answer:
        return 404, b"echo server: WebSocket only\n", "text/plain", {}

    def upgrade(self, conn: Connection, request: Request) -> Handlers:
        conn.accept()
        conn.context = conn
        return ECHO

    def mark_dirty(self, conn: Connection) -> None:
        self.loop.call_soon(conn.flush)

    def sampled(self, started: float) -> None:
        pass  # no relay latency here


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    owner = EchoOwner(HARNESS_CONFIG, loop)
    server = await loop.create_server(lambda: Connection(owner), owner.config.host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()
    for conn in list(owner.live):
        conn.transport.abort()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9001, help="TCP port; 0 picks a free one")
    port = parser.parse_args().port
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(port))
    else:
        uvloop.run(main(port))


if __name__ == "__main__":
    run()
