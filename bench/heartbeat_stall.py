#!/usr/bin/env python3
"""How long a heartbeat tick holds the event loop with many idle connections.

Runs rtcsignal in this process on uvloop (pinned to CPU 0) with a short heartbeat interval,
holds N idle clients with the C load generator (CPU 1; it answers pings), and samples the
loop's lateness with a 1 ms probe timer. A message arriving during a stall waits as long as
the stall, so the probe's worst lateness is the delivery delay a heartbeat can add.

    .venv/bin/python bench/heartbeat_stall.py --clients 10000 --interval 1 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from rtcsignal import Config, SignalingService  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(args: argparse.Namespace) -> dict:
    svc = SignalingService(Config(port=0, heartbeat_interval=args.interval, log_level="warning"))
    await svc.start()
    loop = asyncio.get_running_loop()
    loadgen = await asyncio.create_subprocess_exec(
        "taskset", "-c", "1", os.path.join(HERE, "bin", "loadgen"), "--port", str(svc.port),
        "--path", "/signaling", "--sources", "200", "--mode", "idle",
        "--levels", str(args.clients), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    assert loadgen.stdout is not None and loadgen.stdin is not None
    line = json.loads(await loadgen.stdout.readline())
    if svc.clients_count() < args.clients:
        raise SystemExit(f"only {svc.clients_count()} clients connected: {line}")

    lateness: list[float] = []
    done = loop.create_future()
    end = loop.time() + args.seconds
    period = 0.001

    def probe(scheduled: float) -> None:
        now = time.perf_counter()
        lateness.append((now - scheduled - period) * 1000)
        if loop.time() >= end:
            done.set_result(None)
            return
        loop.call_later(period, probe, time.perf_counter())

    loop.call_later(period, probe, time.perf_counter())
    await done
    ticks = int(args.seconds / args.interval)
    still = svc.clients_count()
    loadgen.stdin.write(b"q\n")
    await loadgen.stdin.drain()
    await loadgen.wait()
    await svc.shutdown()
    return {
        "clients": args.clients, "interval_s": args.interval, "seconds": args.seconds,
        "heartbeat_ticks": ticks, "clients_still_connected": still,
        "probe_samples": len(lateness),
        "lateness_ms": {"p50": round(percentile(lateness, 0.5), 3),
                        "p99": round(percentile(lateness, 0.99), 3),
                        "max": round(max(lateness), 3)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.sched_setaffinity(0, {0})
    import uvloop

    print(json.dumps(uvloop.run(measure(args))))


if __name__ == "__main__":
    main()
