"""Issue 2, points 6-7: heartbeat termination and graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.helpers import close_all, get, open_client, recv_json, send_json
from tests.rawws import OP_CLOSE, OP_PING, Closed, RawWS, close_code

INTERVAL = 0.3


async def wait_exit(server, timeout: float) -> int:
    """The server process's exit status, awaited without blocking the loop."""
    return await asyncio.wait_for(asyncio.to_thread(server.proc.wait), timeout)


async def test_unanswered_pings_terminate_within_three_intervals(run_server):
    # Resume off: a dropped peer is announced at once (with it, after the window).
    server = run_server("--heartbeat-interval", str(INTERVAL), "--resume-window", "0")
    healthy, _ = await open_client(server.url("room=hb"))
    assert (await recv_json(healthy))["type"] == "joined"
    clock, _ = await RawWS.open(server.host, server.port, auto_pong=True)
    clock_task, clock_texts = clock.pump()
    dead, dead_greeting = await RawWS.open(server.host, server.port, "room=hb",
                                           auto_pong=False)
    dead_id = dead_greeting["peerId"]
    assert dead_greeting["clientsCount"] == 3
    joined = await recv_json(healthy)
    assert (joined["type"], joined["peerId"]) == ("peer-joined", dead_id)

    # The dead client reads pings and never answers; it must be dropped.
    first_ping = None

    async def read_until_dropped() -> None:
        nonlocal first_ping
        while True:
            try:
                op, _payload = await dead.recv_frame(timeout=10 * INTERVAL)
            except Closed:
                return
            if op == OP_PING and first_ping is None:
                first_ping = time.monotonic()
            assert op in (OP_PING, 0x1), op  # pings (and its own join reply), no close frame

    await asyncio.wait_for(read_until_dropped(), 10 * INTERVAL)
    dropped = time.monotonic()
    assert first_ping is not None, "the server never sent a WebSocket ping"
    assert dropped - first_ping <= 3 * INTERVAL, dropped - first_ping

    # Its room sees it gone, and the server logs it.
    left = await recv_json(healthy, timeout=3 * INTERVAL)
    assert left == {"type": "peer-left", "room": "hb", "peerId": dead_id, "reason": "timeout"}
    server.wait_for(lambda e: e.get("event") == "disconnect" and e.get("peer") == dead_id)

    # Healthy clients stay for well over three more intervals (counted by received pings).
    await clock.wait_pings(clock.pings + 4, timeout=10 * INTERVAL)
    assert not clock_task.done(), clock_task
    await send_json(healthy, {"type": "ping"})
    assert await recv_json(healthy) == {"type": "pong"}

    # clientsCount dropped: healthy + clock + the newcomer.
    newcomer, greeting = await open_client(server.url())
    assert greeting["clientsCount"] == 3
    await send_json(newcomer, {"type": "hello"})
    assert json.loads(await asyncio.wait_for(clock_texts.get(), 5)) == {
        "type": "hello", "from": greeting["peerId"]}
    clock_task.cancel()
    dead.close()
    clock.close()
    await close_all([healthy, newcomer])


async def test_sigterm_closes_50_clients_with_1001_and_exits_0(run_server):
    server = run_server()
    clients = await asyncio.gather(*(open_client(server.url()) for _ in range(50)))
    assert max(g["clientsCount"] for _, g in clients) == 50
    server.proc.send_signal(signal.SIGTERM)
    codes = []
    for ws, _ in clients:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.protocol.close_rcvd is not None, "no close frame from the server"
        codes.append(ws.protocol.close_rcvd.code)
    assert codes == [1001] * 50
    assert await wait_exit(server, 15) == 0
    server.wait_for(lambda e: e.get("event") == "stopped", timeout=2)


async def test_sigint_also_drains_gracefully(run_server):
    server = run_server()
    clients = await asyncio.gather(*(open_client(server.url()) for _ in range(3)))
    server.proc.send_signal(signal.SIGINT)
    for ws, _ in clients:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1001
    assert await wait_exit(server, 15) == 0


async def test_readyz_503_while_draining_and_drain_timeout_honoured(run_server):
    # close-timeout is long, so only --drain-timeout can end the wait for the stuck client.
    drain = 2.0
    server = run_server("--drain-timeout", str(drain), "--close-timeout", "60")
    status, _, body = await get(server, "/readyz")
    assert status == 200, body
    stuck, _ = await RawWS.open(server.host, server.port, auto_pong=False)
    polite, _ = await open_client(server.url())

    server.proc.send_signal(signal.SIGTERM)
    op, payload = await stuck.recv_frame(timeout=5)
    assert op == OP_CLOSE and close_code(payload) == 1001
    # The stuck client never answers the close frame: the server keeps draining.
    server.wait_for(lambda e: e.get("event") == "shutting down", timeout=5)
    status, _, body = await get(server, "/readyz")
    assert status == 503, (status, body)
    status, _, _ = await get(server, "/healthz")
    assert status == 200
    # No new WebSocket sessions while draining.
    with pytest.raises((InvalidStatus, OSError)):
        await open_client(server.url())
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(polite.recv(), 5)
    assert polite.protocol.close_rcvd is not None and polite.protocol.close_rcvd.code == 1001

    assert await wait_exit(server, drain + 8) == 0
    # The stuck client was dropped when the drain timed out.
    with pytest.raises(Closed):
        while True:
            await stuck.recv_frame(timeout=5)
    stuck.close()


async def test_drain_finishes_early_when_clients_answer(run_server):
    # With a drain timeout far beyond the test's timeout, prompt exit proves the server
    # stops waiting as soon as every client answered the close handshake.
    server = run_server("--drain-timeout", "300")
    clients = await asyncio.gather(*(open_client(server.url()) for _ in range(5)))
    server.proc.send_signal(signal.SIGTERM)
    for ws, _ in clients:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert await wait_exit(server, 15) == 0
