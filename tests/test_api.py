"""Issue 2, point 10: the server-side Python API, in-process, over real sockets."""

from __future__ import annotations

import asyncio
import socket

import pytest
from websockets.exceptions import ConnectionClosed

import rtcsignal
from rtcsignal import Config, SignalingService
from tests.helpers import close_all, open_client, recv_json, send_json


def url(svc: SignalingService) -> str:
    return f"ws://127.0.0.1:{svc.port}/signaling"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_closed_by_server(ws) -> int:
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 10)
    assert ws.protocol.close_rcvd is not None, "no close frame from the server"
    return ws.protocol.close_rcvd.code


async def test_clients_count_tracks_connects_and_disconnects(make_service):
    svc = await make_service()
    assert svc.clients_count() == 0
    gone = asyncio.Event()
    svc.hooks.on_disconnect = lambda peer, reason: gone.set()
    clients = [await open_client(url(svc)) for _ in range(3)]
    assert svc.clients_count() == 3
    assert [g["clientsCount"] for _, g in clients] == [1, 2, 3]
    await clients[0][0].close()
    await asyncio.wait_for(gone.wait(), 5)
    assert svc.clients_count() == 2
    await close_all([ws for ws, _ in clients])


async def test_broadcast_to_all_reaches_every_client(make_service):
    svc = await make_service()
    clients = [await open_client(url(svc)) for _ in range(4)]
    # One client joined a named room: broadcast_to_all still reaches it.
    await send_json(clients[3][0], {"type": "join", "room": "side"})
    assert (await recv_json(clients[3][0]))["type"] == "joined"
    message = {"type": "announcement", "text": "maintenance at 5", "n": [1, 2]}
    assert svc.broadcast_to_all(message) == 4
    for ws, _ in clients:
        assert await recv_json(ws) == message
    await close_all([ws for ws, _ in clients])


async def test_send_to_peer_reaches_only_that_peer(make_service):
    svc = await make_service()
    (a, _), (b, gb), (c, _) = [await open_client(url(svc)) for _ in range(3)]
    assert svc.send_to_peer(gb["peerId"], {"type": "private", "secret": 42}) is True
    assert await recv_json(b) == {"type": "private", "secret": 42}
    assert svc.send_to_peer("no-such-peer-id", {"type": "private"}) is False
    # a and c got nothing: the next thing they see is this broadcast.
    svc.broadcast_to_all({"type": "marker"})
    for ws in (a, c):
        assert await recv_json(ws) == {"type": "marker"}
    assert await recv_json(b) == {"type": "marker"}
    await close_all([a, b, c])


async def test_api_and_client_relay_together(make_service):
    svc = await make_service()
    (a, ga), (b, _) = [await open_client(url(svc)) for _ in range(2)]
    await send_json(a, {"type": "offer", "sdp": "x"})
    assert await recv_json(b) == {"type": "offer", "sdp": "x", "from": ga["peerId"]}
    await close_all([a, b])


async def test_shutdown_closes_clients_with_1001_and_stops_listening(make_service):
    svc = await make_service()
    clients = [await open_client(url(svc)) for _ in range(5)]
    port = svc.port
    await asyncio.wait_for(svc.shutdown(), 15)
    codes = [await wait_closed_by_server(ws) for ws, _ in clients]
    assert codes == [1001] * 5
    assert svc.clients_count() == 0
    assert svc.draining
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    # shutdown is idempotent
    await asyncio.wait_for(svc.shutdown(), 5)


async def test_serve_inside_an_existing_loop_with_service():
    config = Config(port=free_port())
    svc = SignalingService(config)
    task = asyncio.ensure_future(rtcsignal.serve(config, service=svc))
    try:
        ws, greeting = await connect_when_listening(config.port)
        assert greeting["clientsCount"] == 1
        assert svc.clients_count() == 1
        assert not task.done()
        await asyncio.wait_for(svc.shutdown(), 15)
        assert await wait_closed_by_server(ws) == 1001
        await asyncio.wait_for(task, 5)  # serve() returns once shutdown completes
    finally:
        if not task.done():
            task.cancel()


async def test_serve_config_only_then_cancel_stops_the_server():
    """``await rtcsignal.serve(config)`` is the documented form; the only way to stop it from
    the embedding program is to cancel it, which must stop the server (no leaked listener)."""
    config = Config(port=free_port())
    task = asyncio.ensure_future(rtcsignal.serve(config))
    ws, greeting = await connect_when_listening(config.port)
    assert greeting["clientsCount"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 15)
    # The listener is gone and the client was disconnected.
    try:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 3)
        with pytest.raises(OSError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", config.port), 5)
    finally:
        await close_all([ws])


async def connect_when_listening(port: int):
    """Connect once ``serve`` has bound its port (it has no readiness callback)."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        try:
            return await open_client(f"ws://127.0.0.1:{port}/signaling")
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.02)
