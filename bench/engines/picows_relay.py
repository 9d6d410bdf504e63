"""The original design on picows + uvloop: frame once, send the same bytes to each transport."""

import json
import sys

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

clients: set = set()


class Client(WSListener):
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        clients.add(self)
        transport.send(WSMsgType.TEXT, json.dumps({
            "type": "connected", "message": "Connected to signaling server",
            "clientsCount": len(clients)}).encode())

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        clients.discard(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        data = frame.get_payload_as_bytes()
        try:
            json.loads(data)
        except ValueError:
            return
        for c in clients:
            if c is not self:
                c.transport.send(WSMsgType.TEXT, data)


async def main(port: int) -> None:
    server = await ws_create_server(lambda request: Client(), "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
