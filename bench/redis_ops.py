"""Redis commands per relayed message, by kind of traffic, counted by Redis itself.

Starts a private redis-server and two rtcsignal instances on it, puts clients in rooms, then
for each kind of traffic sends N messages and reads ``INFO commandstats`` before and after:

- local: both members of the room on one instance (must cost nothing);
- room: a room with members on both instances (one PUBLISH per message);
- to: a message addressed to a peer of the other instance (one PUBLISH per message).

The instances' background work (lease, probe, counts) is measured over an idle interval of
the same length and subtracted.

    .venv/bin/python bench/redis_ops.py [--messages 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time

import redis
from websockets.asyncio.client import connect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def calls(r: redis.Redis) -> int:
    """Commands Redis has run, except the ones this script sends to read the stats."""
    stats = r.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info",))


async def recv(ws, kind: str) -> dict:
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg.get("type") == kind:
            return msg


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    args = ap.parse_args()
    n = args.messages
    rport = free_port()
    tmp = tempfile.mkdtemp()
    rs = subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly",
                           "no", "--dir", tmp], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{rport}/0"
    r = redis.Redis(port=rport)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    ports = [free_port(), free_port()]
    flags = ["--broker", url, "--log-level", "warning", "--rate-limit", "1000000",
             "--rate-burst", "1000000"]
    procs = [subprocess.Popen([sys.executable, "-m", "rtcsignal", "serve", "--port", str(p),
                               *flags]) for p in ports]
    try:
        for p in ports:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", p), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
        u0, u1 = (f"ws://127.0.0.1:{p}/signaling" for p in ports)
        a = await connect(f"{u0}?room=local")
        b = await connect(f"{u0}?room=local")
        c = await connect(f"{u0}?room=span")
        d = await connect(f"{u1}?room=span")
        for ws in (a, b, c, d):
            await recv(ws, "joined")
        await recv(c, "peer-joined")
        await d.send(json.dumps({"type": "hello"}))
        d_id = (await recv(c, "hello"))["from"]
        results = {}

        async def measure(name: str, send, receiver) -> None:
            before = calls(r)
            t0 = time.monotonic()
            for i in range(n):
                await send(i)
            for _ in range(n):
                await recv(receiver, "m")
            took = time.monotonic() - t0
            after = calls(r)
            idle0 = calls(r)
            await asyncio.sleep(took)  # the background's share over the same time
            idle = calls(r) - idle0 - 1
            results[name] = round((after - before - 1 - idle) / n, 3)

        await measure("local", lambda i: a.send(json.dumps({"type": "m", "i": i})), b)
        await measure("room", lambda i: c.send(json.dumps({"type": "m", "i": i})), d)
        await measure("to", lambda i: c.send(json.dumps({"type": "m", "i": i, "to": d_id})), d)
        print(json.dumps({"messages": n, "redis_commands_per_message": results}))
        for ws in (a, b, c, d):
            await ws.close()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(15)
        rs.terminate()
        rs.wait(5)


if __name__ == "__main__":
    asyncio.run(main())
