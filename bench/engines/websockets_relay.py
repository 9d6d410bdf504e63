"""The original design on python-websockets + uvloop, using websockets.broadcast."""

import json
import sys

import uvloop
import websockets
from websockets.asyncio.server import broadcast, serve
from websockets.exceptions import ConnectionClosed

clients: set = set()


async def handler(ws: websockets.asyncio.server.ServerConnection) -> None:
    clients.add(ws)
    await ws.send(json.dumps({"type": "connected", "message": "Connected to signaling server",
                              "clientsCount": len(clients)}))
    try:
        async for message in ws:
            try:
                json.loads(message)
            except ValueError:
                continue
            broadcast([c for c in clients if c is not ws], message)
    except ConnectionClosed:
        pass
    finally:
        clients.discard(ws)


async def main(port: int) -> None:
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=65536) as server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
