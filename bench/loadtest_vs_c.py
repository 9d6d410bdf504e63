#!/usr/bin/env python3
"""Is ``rtcsignal bench`` the bottleneck? It against the C load generator of ../shared/bench.

The same server (``rtcsignal serve``, rate limits raised, pinned to CPU 0), driven in turn by
the C pairs load generator (``wsload-pairs``: rooms of 2, each message answered by the
partner, ``--window`` in flight per pair) and by ``rtcsignal bench --rate 0`` (rooms of 2, one
negotiation of 2 + 2 x candidates messages in flight per room), each pinned to CPU 1, fresh
server each run, alternating, order flipped each repetition. Both are measured the same way,
from the server's side: this driver samples the server's CPU time (/proc) and its
``rtcsignal_deliveries_total`` (/metrics) every 0.25 s, and takes the steady middle of the
run (active samples, first and last 20% dropped): deliveries per second, per server
core-second, and each load generator's own CPU. The C generator's messages are padded to the
bench's mean message size (``--msg-bytes``, measured by a first bench run) so both move the
same bytes.

    ../shared/bench/build.sh (or BENCH_BIN=build/shared-bench-bin sh ../shared/bench/build.sh)
    .venv/bin/python bench/loadtest_vs_c.py --reps 3 [--pairs 500] [--duration 8]

Prints one JSON line per run and a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TCK = os.sysconf("SC_CLK_TCK")
SERVER_FLAGS = ["--log-level", "warning", "--rate-limit", "10000000", "--rate-burst",
                "10000000", "--rate-limit-bytes", "1024m", "--rate-burst-bytes", "1024m"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TCK


def deliveries(port: int) -> tuple[float, float, float]:
    """(deliveries, bytes received, messages received) from the server's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    d = b = m = 0.0
    for line in text.splitlines():
        if line.startswith("rtcsignal_deliveries_total "):
            d = float(line.split()[1])
        elif line.startswith("rtcsignal_bytes_received_total "):
            b = float(line.split()[1])
        elif line.startswith("rtcsignal_messages_received_total{"):
            m += float(line.split()[1])
    return d, b, m


class Sampler(threading.Thread):
    def __init__(self, pid: int, port: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.port = pid, port
        self.samples: list[tuple[float, float, float, float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            try:
                t, c = time.monotonic(), cpu_s(self.pid)
                self.samples.append((t, c, *deliveries(self.port)))
            except (OSError, ValueError):
                pass

    def steady(self) -> dict[str, float]:
        s = self.samples
        active = [i for i in range(1, len(s)) if s[i][2] > s[i - 1][2]]
        if len(active) < 5:
            return {}
        lo, hi = active[0], active[-1]
        cut = (hi - lo) // 5
        a, b = s[lo + cut], s[hi - cut]
        wall = b[0] - a[0]
        return {"deliveries_per_s": (b[2] - a[2]) / wall,
                "server_cpu_pct": 100 * (b[1] - a[1]) / wall,
                "per_core_s": (b[2] - a[2]) / max(b[1] - a[1], 1e-9),
                "mean_msg_bytes": (b[3] - a[3]) / max(b[4] - a[4], 1)}


def start_server(port: int) -> subprocess.Popen[bytes]:
    rtcsignal = os.path.join(REPO, ".venv", "bin", "rtcsignal")
    proc = subprocess.Popen(["taskset", "-c", "0", rtcsignal, "serve", "--port", str(port),
                             *SERVER_FLAGS], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            deliveries(port)
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


def one_run(kind: str, a: argparse.Namespace, msg_bytes: int) -> dict:
    port = free_port()
    server = start_server(port)
    sampler = Sampler(server.pid, port)
    sampler.start()
    rec: dict = {"generator": kind, "pairs": a.pairs}
    try:
        if kind == "c":
            cmd = ["taskset", "-c", "1", os.path.join(a.bin, "wsload-pairs"), "--mode", "pairs",
                   "--dialect", "rtcsignal", "--port", str(port), "--path", "/signaling",
                   "--pairs", str(a.pairs), "--window", str(a.window), "--msg-bytes",
                   str(msg_bytes), "--duration", str(a.duration), "--warmup", "1", "--conc",
                   "64", "--timeout", "120"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.duration + 200)
            own = json.loads(out.stdout.strip().splitlines()[-1])
            rec.update(window=a.window, msg_bytes=msg_bytes, lg_cpu_pct=own.get("lg_cpu_pct"),
                       lg_p99_ms=own.get("lat_ms", {}).get("p99"))
        else:
            cmd = ["taskset", "-c", "1", os.path.join(REPO, ".venv", "bin", "rtcsignal"),
                   "bench", f"ws://127.0.0.1:{port}/signaling", "--clients",
                   str(2 * a.pairs), "--rooms", str(a.pairs), "--rate", "0", "--duration",
                   str(a.duration), "--candidates", str(a.candidates), "--json", "--quiet"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.duration + 200)
            own = json.loads(out.stdout)
            rec.update(candidates=a.candidates, lg_cpu_pct=own["bench_cpu_pct"][0],
                       lg_p99_ms=own["latency_ms"]["p99"], lost=own["lost"],
                       errors=own["errors"])
    finally:
        sampler.stop.set()
        sampler.join(2)
        server.terminate()
        server.wait(20)
    rec.update({k: round(v, 1) for k, v in sampler.steady().items()})
    if rec.get("lg_cpu_pct") and "deliveries_per_s" in rec:  # the generator's own efficiency
        rec["per_lg_core_s"] = round(rec["deliveries_per_s"] / (rec["lg_cpu_pct"] / 100))
    print(json.dumps(rec), flush=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--window", type=int, default=8, help="C generator: messages in flight "
                    "per pair (the bench has 2 + 2 x candidates per room)")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--bin", default=os.environ.get("BENCH_BIN", os.path.join(
        REPO, "build", "shared-bench-bin")), help="where build.sh put wsload-pairs")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.bin, "wsload-pairs")):
        print(f"no {a.bin}/wsload-pairs: BENCH_BIN={a.bin} sh ../shared/bench/build.sh",
              file=sys.stderr)
        return 2
    first = one_run("bench", a, 0)  # also measures the bench's mean message size
    msg_bytes = int(first.get("mean_msg_bytes", 800))
    runs = []
    for rep in range(a.reps):
        order = ("c", "bench") if rep % 2 == 0 else ("bench", "c")
        runs += [one_run(kind, a, msg_bytes) for kind in order]
    print(f"\n| load generator (pairs {a.pairs}, {a.reps} runs, medians) | deliveries/s | "
          "server CPU % | deliveries per server core-s | load generator CPU % | "
          "deliveries per load generator core-s | p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, label in (("c", f"C wsload-pairs, window {a.window}, {msg_bytes} B messages"),
                        ("bench", f"rtcsignal bench --rate 0, {a.candidates} candidates")):
        rs = [r for r in runs if r["generator"] == kind and "deliveries_per_s" in r]
        if not rs:
            continue

        def med(key: str, rs: list = rs) -> float:
            return statistics.median(r[key] for r in rs if r.get(key) is not None)

        print(f"| {label} | {med('deliveries_per_s'):,.0f} | {med('server_cpu_pct'):.0f} | "
              f"{med('per_core_s'):,.0f} | {med('lg_cpu_pct'):.0f} | "
              f"{med('per_lg_core_s'):,.0f} | {med('lg_p99_ms'):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
