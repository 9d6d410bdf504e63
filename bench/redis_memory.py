"""Redis memory per connected client (each joined to a room of 4), resume on or off.

    .venv/bin/python bench/redis_memory.py 30     # --resume-window 30 (the default)
    .venv/bin/python bench/redis_memory.py 0      # resume off

Starts its own redis-server and one instance on free ports, connects 2,000 clients and
prints Redis's ``used_memory`` growth per client.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

import redis
from websockets.asyncio.client import connect

CLIENTS = 2000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main(window: str) -> None:
    rport, sport = free_port(), free_port()
    rds = subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly",
                            "no"], stdout=subprocess.DEVNULL)
    srv = subprocess.Popen([
        ".venv/bin/rtcsignal", "serve", "--port", str(sport), "--log-level", "warning",
        "--broker", f"redis://127.0.0.1:{rport}/0", "--resume-window", window,
        "--max-connections-per-ip", "100000", "--max-connect-rate", "100000",
        "--max-connect-burst", "100000"], stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)  # a benchmark, not a test: let both start
        rc = redis.Redis(port=rport)
        base = rc.info("memory")["used_memory"]
        clients = []
        for i in range(CLIENTS):
            ws = await connect(f"ws://127.0.0.1:{sport}/signaling", ping_interval=None)
            await ws.recv()
            await ws.send(json.dumps({"type": "join", "room": f"room{i // 4}"}))
            await ws.recv()
            clients.append(ws)
        await asyncio.sleep(1)  # the last scripts run
        used = rc.info("memory")["used_memory"]
        print(json.dumps({"resume_window": window,
                          "redis_bytes_per_client": round((used - base) / CLIENTS)}))
    finally:
        srv.kill()
        rds.kill()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "30"))
