#!/usr/bin/env python3
"""The pairs comparison in one command: rtcsignal vs PeerJS server vs the C floor.

Wraps the shared measuring stick, ``../shared/bench/pairs.py`` (README there, "Pairs"): rooms
of two trading ``to``-addressed offers, W in flight per pair, every server fresh on CPU 0 and
the load generator on CPU 1, PeerJS (npm ``peer``), rtcsignal and ``limit-pairs`` (the C floor,
``--floor``) alternating inside every repetition. This script supplies the rtcsignal command
(rate limits raised so the load is not throttled; nothing else changed), builds the shared
load generator and floor into ``build/shared-bench-bin`` when missing, installs PeerJS beside
them once (``build/bench-peerjs``), and prints the table of docs/benchmarks.md: medians per
(pairs, window), round trips per server core-second, ratios to PeerJS and to the floor, p99.

    .venv/bin/python bench/pairs.py                          # 500,5000 pairs x 1,8 in flight, 3 reps
    .venv/bin/python bench/pairs.py --pairs 500 --window 8 --reps 1 --duration 4
    .venv/bin/python bench/pairs.py --rtcsignal build/bench-worktrees/abc1234/.venv/bin/rtcsignal
    .venv/bin/python bench/pairs.py --pure                   # rtcsignal without its compiled path

Every run is one JSON line in ``build/bench-pairs/<time>.jsonl``; the table also goes to
``build/bench-pairs/<time>.md``. About 13 s per run: the default plan is 36 runs, ~8 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared", "bench"))
SERVER = ("{rtcsignal} serve --port {{port}} --path {{path}} --log-level warning "
          "--rate-limit 10000000 --rate-burst 10000000")


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def row(med: dict[str, dict], name: str, P: int, W: int) -> str:
    def cell(s: str) -> str:
        m = med.get(s)
        return f"{m['rt'] / 1000:.1f}k ({m['lo'] / 1000:.1f}-{m['hi'] / 1000:.1f})" if m else "-"

    def ratio(a: str, b: str, key: str = "rt") -> str:
        return f"{med[a][key] / med[b][key]:.2f}x" if a in med and b in med else "-"

    def three(key: str, fmt: str) -> str:
        return " / ".join(fmt.format(med[s][key]) if s in med else "-"
                          for s in ("peerjs", name, "limit-pairs"))

    return (f"| {P:,}, {W} | {cell('peerjs')} | {cell(name)} | {cell('limit-pairs')} "
            f"| {ratio(name, 'peerjs')} | {ratio(name, 'limit-pairs')} "
            f"| {ratio(name, 'peerjs', 'core')} / {ratio(name, 'limit-pairs', 'core')} "
            f"| {three('cpu', '{:.0f}%')} | {three('p99', '{:.1f}')} ms |")


def table(rows: list[dict], name: str) -> str:
    out = ["| pairs, in flight | PeerJS rt/s | rtcsignal rt/s | C floor rt/s | rtcsignal / PeerJS "
           "| rtcsignal / floor | per server core-s: rtcsignal / PeerJS, / floor | server CPU PeerJS / ours / floor "
           "| p99 one-way PeerJS / ours / floor |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["pairs"], r["window"]) for r in rows})
    for P, W in keys:
        med: dict[str, dict] = {}
        for s in ("peerjs", name, "limit-pairs"):
            rs = [r for r in rows if r["server"] == s and r["pairs"] == P and r["window"] == W
                  and r.get("round_trips_per_s")]
            if rs:
                rt = [r["round_trips_per_s"] for r in rs]
                cpu = [r.get("server_cpu_pct") or 0 for r in rs]
                med[s] = {"rt": statistics.median(rt), "lo": min(rt), "hi": max(rt),
                          "cpu": statistics.median(cpu),
                          "core": statistics.median(r["round_trips_per_s"] / max(r.get("server_cpu_pct") or 100, 1) * 100
                                                    for r in rs),
                          "p99": statistics.median(r["lat_ms"]["p99"] for r in rs)}

        out.append(row(med, name, P, W))
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtcsignal", default=os.path.join(REPO, ".venv", "bin", "rtcsignal"),
                    help="the rtcsignal console script to run (another tree's, for a comparison)")
    ap.add_argument("--pure", action="store_true",
                    help="run rtcsignal with RTCSIGNAL_PURE=1 (the pure-Python relay path)")
    ap.add_argument("--extra-flags", default="", help="more rtcsignal serve flags")
    ap.add_argument("--pairs", default="500,5000")
    ap.add_argument("--window", default="1,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--no-floor", action="store_true", help="PeerJS and rtcsignal only")
    ap.add_argument("--summarize", metavar="JSONL", help="only print the table of an earlier run")
    ap.add_argument("--bench-bin", default=os.environ.get("BENCH_BIN", os.path.join(REPO, "build", "shared-bench-bin")))
    a = ap.parse_args()
    name = "rtcsignal"
    if a.summarize:
        with open(a.summarize) as f:
            print(table([json.loads(line) for line in f if line.strip()], name), end="")
        return
    if not os.access(os.path.join(a.bench_bin, "limit-pairs"), os.X_OK):
        subprocess.run(["sh", os.path.join(SHARED, "build.sh")], check=True,
                       env={**os.environ, "BENCH_BIN": a.bench_bin}, stdout=subprocess.DEVNULL)
    outdir = os.path.join(REPO, "build", "bench-pairs")
    os.makedirs(outdir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = os.path.join(outdir, f"{stamp}.jsonl")
    cmd = SERVER.format(rtcsignal=os.path.abspath(a.rtcsignal))
    if a.extra_flags:
        cmd += " " + a.extra_flags
    if a.pure:
        cmd = "env RTCSIGNAL_PURE=1 " + cmd
    argv = [sys.executable, os.path.join(SHARED, "pairs.py"), "--server-cmd", cmd, "--name", name,
            "--pairs", a.pairs, "--window", a.window, "--reps", str(a.reps),
            "--duration", str(a.duration), "--warmup", str(a.warmup), "--out", out]
    if not a.no_floor:
        argv.append("--floor")
    # pairs.py installs PeerJS under $TMPDIR when its own copy is read-only: keep it in build/
    env = {**os.environ, "BENCH_BIN": a.bench_bin, "TMPDIR": os.path.join(REPO, "build")}
    print(f"[pairs] load average {loadavg()} at start; {cmd}", file=sys.stderr, flush=True)
    rc = subprocess.run(argv, env=env).returncode
    print(f"[pairs] load average {loadavg()} at end", file=sys.stderr, flush=True)
    with open(out) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    text = table(rows, name)
    with open(os.path.join(outdir, f"{stamp}.md"), "w") as f:
        f.write(f"    {' '.join(sys.argv)}\n\n{text}")
    print(text, end="")
    sys.exit(rc)


if __name__ == "__main__":
    main()
