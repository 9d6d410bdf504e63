"""Run the Autobahn TestSuite (``wstest -m fuzzingclient``) against the echo harness.

    python -m tests.conformance.run                 # cases 1.* .. 10.*
    python -m tests.conformance.run --cases '6.4.*' # a subset
    python -m tests.conformance.run --markdown      # the summary table as Markdown

Needs ``build/autobahn-venv/bin/wstest`` (``sh scripts/install-autobahn.sh``). Starts
``python -m tests.conformance.echo_server --port 0``, writes ``build/autobahn/spec.json``, runs
wstest (full log in ``build/autobahn/wstest.log``, reports in ``build/autobahn/reports/``),
prints a per-group table and every case that is not OK/INFORMATIONAL, and stops the harness.
Exit status 0 only if every case run is OK or INFORMATIONAL, for both its behaviour and its
closing behaviour; 1 otherwise; 2 if the run itself could not be done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "autobahn"
REPORTS = BUILD / "reports"
WSTEST = ROOT / "build" / "autobahn-venv" / "bin" / "wstest"
AGENT = "rtcsignal"
ALL_CASES = [f"{n}.*" for n in range(1, 11)]
PASSING = ("OK", "INFORMATIONAL")
COLUMNS = ("OK", "NON-STRICT", "INFORMATIONAL", "FAILED", "UNIMPLEMENTED")
BAD_CLOSE = "close not OK"
PASS = "pass"
CASE_LINE = re.compile(r"Running test case ID (\S+) for agent")


class RunError(Exception):
    """The suite could not be run (exit status 2)."""


def progress(msg: str, t0: float) -> None:
    print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in case_id.split(".") if p.isdigit())


# --- the harness ------------------------------------------------------------------------


def start_harness(python: str, timeout: float = 20.0) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [python, "-m", "tests.conformance.echo_server", "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    line = first[0].strip() if first else ""
    m = re.fullmatch(r"listening (\d+)", line)
    if m is None:
        stop_harness(proc)
        raise RunError(f"echo harness did not report its port (got {line!r}, "
                       f"exit status {proc.returncode})")
    # Keep draining stdout so a chatty harness can never block on a full pipe.
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
    return proc, int(m.group(1))


def stop_harness(proc: subprocess.Popen[str]) -> None:
    """SIGTERM (graceful drain), then SIGKILL if it has not gone after 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- wstest -----------------------------------------------------------------------------


def write_spec(port: int, cases: list[str]) -> Path:
    spec = {
        "outdir": str(REPORTS),
        "servers": [{"agent": AGENT, "url": f"ws://127.0.0.1:{port}/signaling"}],
        "cases": cases,
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }
    BUILD.mkdir(parents=True, exist_ok=True)
    path = BUILD / "spec.json"
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path


def run_wstest(wstest: Path, spec: Path, timeout: float, t0: float) -> None:
    log_path = BUILD / "wstest.log"
    cmd = [str(wstest), "-m", "fuzzingclient", "-s", str(spec)]
    progress(f"running {' '.join(cmd[1:])} (log: {log_path.relative_to(ROOT)})", t0)
    killed = threading.Event()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=BUILD, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        timer = threading.Timer(timeout, lambda: (killed.set(), proc.kill()))
        timer.start()
        try:
            assert proc.stdout is not None
            group, done = "", 0
            for line in proc.stdout:
                log.write(line)
                m = CASE_LINE.search(line)
                if m is None:
                    continue
                done += 1
                head = m.group(1).split(".")[0]
                if head != group:
                    group = head
                    progress(f"group {group}: from case {m.group(1)} ({done - 1} cases done)", t0)
            status = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if killed.is_set():
        raise RunError(f"wstest did not finish within {timeout:.0f} s; see {log_path}")
    progress(f"wstest finished ({done} cases, exit status {status})", t0)
    if status != 0:
        tail = log_path.read_text().splitlines()[-20:]
        raise RunError("wstest failed:\n  " + "\n  ".join(tail))


# --- the report -------------------------------------------------------------------------


def load_results() -> dict[str, dict[str, Any]]:
    index = REPORTS / "index.json"
    if not index.exists():
        raise RunError(f"no {index.relative_to(ROOT)}: wstest wrote no report")
    results = json.loads(index.read_text()).get(AGENT, {})
    if not results:
        raise RunError(f"{index.relative_to(ROOT)} has no results for agent {AGENT!r}")
    return dict(sorted(results.items(), key=lambda kv: case_key(kv[0])))


def passed(entry: dict[str, Any]) -> bool:
    return entry.get("behavior") in PASSING and entry.get("behaviorClose") in PASSING


def table(results: dict[str, dict[str, Any]], markdown: bool) -> str:
    """Per group: cases by ``behavior``, then how many have a closing behaviour that is not
    OK/INFORMATIONAL, and how many pass the rule (both OK or INFORMATIONAL)."""
    groups: dict[str, Counter[str]] = {}
    for case_id, entry in results.items():
        c = groups.setdefault(case_id.split(".")[0], Counter())
        c[entry.get("behavior", "?")] += 1
        c[BAD_CLOSE] += entry.get("behaviorClose") not in PASSING
        c[PASS] += passed(entry)
    groups["all"] = sum(groups.values(), Counter())
    extra = sorted({b for c in groups.values() for b in c} - {*COLUMNS, BAD_CLOSE, PASS})
    behaviors = (*COLUMNS, *extra)
    header = ["group", *behaviors, "total", BAD_CLOSE, PASS]
    rows = [[g, *(str(c[k]) for k in behaviors), str(sum(c[k] for k in behaviors)),
             str(c[BAD_CLOSE]), str(c[PASS])]
            for g, c in sorted(groups.items(), key=lambda kv: case_key(kv[0]) or (99,))]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True))
                     for r in [header, *rows])


def case_note(entry: dict[str, Any]) -> str:
    """The case report's own explanation: ``result`` and, if the close failed, ``resultClose``."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        report = json.loads((REPORTS / entry["reportfile"]).read_text())
        text = str(report.get("result", ""))
        if entry.get("behaviorClose") not in PASSING:
            text += f" / close: {report.get('resultClose', '')}"
        text = " ".join(text.split())
        return text if len(text) <= 140 else text[:137] + "..."
    return ""


def failures(results: dict[str, dict[str, Any]], markdown: bool) -> str:
    bad = {k: v for k, v in results.items() if not passed(v)}
    if not bad:
        return ""
    if markdown:
        lines = ["| case | behavior | behaviorClose | close code | result |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v.get('behavior')} | {v.get('behaviorClose')} | "
                  f"{v.get('remoteCloseCode')} | {case_note(v).replace('|', '/')} |"
                  for k, v in bad.items()]
    else:
        lines = [f"{len(bad)} case(s) not OK/INFORMATIONAL (case behavior/behaviorClose "
                 "remote-close-code: result):"]
        lines += [f"  {k:<9} {v.get('behavior')}/{v.get('behaviorClose')} "
                  f"{v.get('remoteCloseCode')}: {case_note(v)}" for k, v in bad.items()]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.conformance.run",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cases", action="append", metavar="PATTERN",
                        help="case pattern(s) such as '6.4.*' (repeatable, or comma-separated); "
                             "default: 1.* to 10.*")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds wstest may take before it is killed (default 900)")
    parser.add_argument("--wstest", type=Path, default=WSTEST, help="wstest executable")
    args = parser.parse_args(argv)
    cases = [c.strip() for arg in args.cases or [] for c in arg.split(",") if c.strip()]
    cases = cases or ALL_CASES

    t0 = time.monotonic()
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop wstest and the harness.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not os.access(args.wstest, os.X_OK):
        print(f"conformance: {args.wstest} not found; run: sh scripts/install-autobahn.sh",
              file=sys.stderr)
        return 2
    shutil.rmtree(REPORTS, ignore_errors=True)
    try:
        harness, port = start_harness(sys.executable)
    except RunError as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 2
    progress(f"echo harness listening on 127.0.0.1:{port} (pid {harness.pid}); "
             f"cases {', '.join(cases)}", t0)
    try:
        run_wstest(args.wstest, write_spec(port, cases), args.timeout, t0)
        if harness.poll() is not None:
            raise RunError(f"echo harness died during the run (status {harness.returncode})")
        results = load_results()
    except RunError as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_harness(harness)
        progress("echo harness stopped", t0)

    print()
    print(table(results, args.markdown))
    print()
    bad = failures(results, args.markdown)
    if bad:
        print(bad)
        print()
    print(f"reports: {(REPORTS / 'index.html').relative_to(ROOT)}")
    n_bad = sum(not passed(v) for v in results.values())
    print("conformance " + ("PASS" if n_bad == 0 else "FAIL") + ": every case run must be OK or "
          "INFORMATIONAL in both behavior and behaviorClose")
    print(f"conformance: {len(results) - n_bad} passed, {n_bad} failed")
    return 0 if n_bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
