"""Issue 2 "Done when": 1,000 concurrent clients all greeted, one message reaches the 999 others."""

from __future__ import annotations

import asyncio
import json
import resource

from tests.helpers import close_all, open_client, recv_json

CLIENTS = 1000


def raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == resource.RLIM_INFINITY or soft >= 2 * CLIENTS + 100, soft


async def test_1000_clients_greeted_and_one_message_reaches_999(run_server):
    raise_open_files()  # before the server starts, so the child inherits it too
    server = run_server("--log-level", "info")
    clients = []
    sem = asyncio.Semaphore(100)

    async def one():
        async with sem:
            return await open_client(server.url(), open_timeout=20)

    results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(CLIENTS))), 60)
    clients = [ws for ws, _ in results]
    greetings = [g for _, g in results]
    # The server handles connects one at a time: the counts are exactly 1..1000.
    assert sorted(g["clientsCount"] for g in greetings) == list(range(1, CLIENTS + 1))
    assert len({g["peerId"] for g in greetings}) == CLIENTS
    assert all(g["message"] == "Connected to signaling server" for g in greetings)

    sender, sender_id = clients[0], greetings[0]["peerId"]
    await sender.send(json.dumps({"type": "offer", "sdp": "fan-out"}))
    got = await asyncio.wait_for(asyncio.gather(*(recv_json(ws, 20) for ws in clients[1:])), 30)
    assert len(got) == CLIENTS - 1
    assert all(m == {"type": "offer", "sdp": "fan-out", "from": sender_id} for m in got)

    # The sender itself got nothing: its next message is a reply from the last client.
    last_id = greetings[-1]["peerId"]
    await clients[-1].send(json.dumps({"type": "answer"}))
    assert await recv_json(sender, 20) == {"type": "answer", "from": last_id}
    await asyncio.wait_for(close_all(clients), 60)
