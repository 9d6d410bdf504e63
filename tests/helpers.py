"""Client helpers shared by the integration tests: websockets clients, plain HTTP requests
and a /metrics parser. The raw-socket WebSocket client is ``tests.rawws.RawWS``.

Every await here has a short timeout so a server bug fails a test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

TIMEOUT = 5.0


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
