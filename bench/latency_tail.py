#!/usr/bin/env python3
"""The 1,000-client latency tail, side by side: rtcsignal vs the Node.js original vs the C floor.

The shared harness's latency scenario (``../shared/bench/run.py --scenario latency``: N clients
in one room, one sends 20 messages/s stamped with CLOCK_MONOTONIC, latency taken at every
receiver; its load generator reports p50, p90, p99, p99.9 and max), with rtcsignal's command
filled in and the built-in ``original-node`` and ``limit`` (the C floor: one encode per
message, coalesced writes) in the same alternation. The original's ``ws`` dependency is
installed once into ``build/original-node`` (the shared copy is read-only) and found through
NODE_PATH.

    .venv/bin/python bench/latency_tail.py [--n 1000] [--reps 5] [--duration 10]

Every run is a JSON line in ``build/latency-tail/<time>.jsonl``; the table (medians, ranges,
ratios to Node) is printed and written beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared", "bench"))
ORIGINAL = os.path.normpath(os.path.join(REPO, "..", "shared", "reference", "original-node"))
SERVER = ("{rtcsignal} serve --port {{port}} --path {{path}} --log-level warning "
          "--rate-limit 10000000 --rate-burst 10000000")
KEYS = ("p50", "p99", "p999", "max")


def node_modules() -> str:
    """node_modules with ``ws`` for the original server, installed under build/ once."""
    here = os.path.join(ORIGINAL, "node_modules")
    if os.path.isdir(os.path.join(here, "ws")):
        return here
    dst = os.path.join(REPO, "build", "original-node")
    if not os.path.isdir(os.path.join(dst, "node_modules", "ws")):
        os.makedirs(dst, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            if os.path.exists(os.path.join(ORIGINAL, name)):
                shutil.copy(os.path.join(ORIGINAL, name), dst)
        subprocess.run(["npm", "ci", "--silent"], cwd=dst, check=True)
    return os.path.join(dst, "node_modules")


def table(rows: list[dict]) -> str:
    out = ["| server | " + " | ".join(f"{k} ms" for k in KEYS) + " | ratio to Node (p99 / p99.9 / max) |",
           "| --- | " + " | ".join("---" for _ in KEYS) + " | --- |"]
    med: dict[str, dict[str, float]] = {}
    for s in ("original-node", "rtcsignal", "limit"):
        rs = [r for r in rows if r.get("server") == s and "lat_ms" in r]
        if not rs:
            continue
        med[s] = {k: statistics.median(r["lat_ms"][k] for r in rs) for k in KEYS}
        cells = []
        for k in KEYS:
            v = [r["lat_ms"][k] for r in rs]
            cells.append(f"**{med[s][k]:.2f}** ({min(v):.1f}-{max(v):.1f})")
        node = med.get("original-node")
        ratio = ("-" if node is None or s == "original-node" else
                 " / ".join(f"{med[s][k] / node[k]:.2f}" for k in ("p99", "p999", "max")))
        out.append(f"| {s} ({len(rs)} runs) | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtcsignal", default=os.path.join(REPO, ".venv", "bin", "rtcsignal"))
    ap.add_argument("--n", default="1000")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--servers", default="original-node,limit",
                    help="built-in servers of the shared harness beside rtcsignal")
    ap.add_argument("--bench-bin", default=os.environ.get("BENCH_BIN", os.path.join(REPO, "build", "shared-bench-bin")))
    ap.add_argument("--summarize", metavar="JSONL", help="only print the table of an earlier run")
    a = ap.parse_args()
    if a.summarize:
        with open(a.summarize) as f:
            print(table([json.loads(line) for line in f if line.strip()]), end="")
        return
    if not os.access(os.path.join(a.bench_bin, "limit"), os.X_OK):
        subprocess.run(["sh", os.path.join(SHARED, "build.sh")], check=True,
                       env={**os.environ, "BENCH_BIN": a.bench_bin}, stdout=subprocess.DEVNULL)
    outdir = os.path.join(REPO, "build", "latency-tail")
    os.makedirs(outdir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = os.path.join(outdir, f"{stamp}.jsonl")
    env = {**os.environ, "BENCH_BIN": a.bench_bin, "NODE_PATH": node_modules()}
    cmd = [sys.executable, os.path.join(SHARED, "run.py"), "--server", a.servers,
           "--server-cmd", SERVER.format(rtcsignal=os.path.abspath(a.rtcsignal)),
           "--name", "rtcsignal", "--scenario", "latency", "--n", a.n, "--reps", str(a.reps),
           "--lat-duration", str(a.duration), "--out", out]
    with open("/proc/loadavg") as f:
        print(f"[latency] load average {' '.join(f.read().split()[:3])} at start", file=sys.stderr)
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
    with open(out) as f:
        text = table([json.loads(line) for line in f if line.strip()])
    with open(os.path.join(outdir, f"{stamp}.md"), "w") as f:
        f.write(f"    {' '.join(sys.argv)}\n\n{text}")
    print(text, end="")


if __name__ == "__main__":
    main()
