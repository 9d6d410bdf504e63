"""The benchmark harness still works end to end (a few seconds; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_runs_against_rtcsignal() -> None:
    rtcsignal = f"{sys.executable} -m rtcsignal"
    cmd = [
        sys.executable, str(ROOT / "bench" / "run.py"), "--smoke",
        "--server-cmd",
        f"{rtcsignal} serve --port {{port}} --path {{path}} --log-level warning"
        " --rate-limit 10000000 --rate-burst 10000000"
        " --rate-limit-bytes 1024m --rate-burst-bytes 1024m",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["summary"] is True and summary["ok"] is True
    assert summary["failed"] == 0
    # Every scenario produced a figure: deliveries happened, latencies were sampled,
    # the storm's connections were all greeted.
    assert summary["fanout"] > 0
    assert summary["latency"]["p50"] > 0
    assert summary["storm"] > 0
