#!/usr/bin/env python3
"""Before/after benchmark of the relay path: two versions of rtcsignal, alternating, medians.

Each side is a git commit checked out as a worktree under build/bench-worktrees/<sha7> with its
own venv (`python -m venv`, `pip install -e .`; both reused when present), or an existing source
tree given as a path (it must have its own .venv with rtcsignal installed). The load comes from
the shared measuring stick (../shared/bench, see its README.md), run against the server under
test only, no anchors:

- fan-out: ``run.py --server-cmd ... --scenario fanout`` (one run.py call per run; without
  ``--server``, run.py runs only the given command);
- pairs: ``pairs.one_run`` from pairs.py, called for the server under test alone (pairs.py's
  ``main`` always alternates with PeerJS, which this comparison does not need).

For every configuration the two sides alternate inside each repetition, the order flipping from
one repetition to the next. Results: one JSON line per run in build/bench-compare.jsonl, and a
Markdown table (medians, new/old, per-run values) printed and written to build/bench-compare.md.

    .venv/bin/python bench/compare.py --old 4701425 --new HEAD --reps 5
    .venv/bin/python bench/compare.py --new . --extra-new-flags "--rate-limit-bytes 10000000000 --rate-burst-bytes 10000000000"
    .venv/bin/python bench/compare.py --quick            # smoke: 1 rep, small sizes, ~20 s
    .venv/bin/python bench/compare.py --plan             # the run list and a time estimate only

The harness needs psutil (run.py imports it): run this with the project's .venv python (it has
psutil), or give ``--harness-python``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUILD = os.path.join(REPO, "build")
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared", "bench"))
DEFAULT_OLD = "4701425"
SERVE = "{rtcsignal} serve --port {{port}} --path {{path}}"
COMMON_FLAGS = "--log-level warning --rate-limit 10000000 --rate-burst 10000000"
WINDOW_BYTES = 256 * 1024  # fan-out: payload in flight per receiver, as bench/run.py does
# seconds a run costs beyond warm-up + measurement (server start, connects, stop), from quick runs
OVERHEAD_S = {"fanout": 0.7, "pairs": 1.1}
OVERHEAD_PER_CLIENT_S = 0.0002

# Runs pairs.one_run for one server, no PeerJS; argv: shared dir, JSON of its namespace.
PAIRS_DRIVER = """
import json, sys, types
sys.dont_write_bytecode = True
sys.path.insert(0, sys.argv[1])
import pairs
a = types.SimpleNamespace(**json.loads(sys.argv[2]))
print(json.dumps(pairs.one_run("test", a.P, a.W, a)), flush=True)
"""


@dataclass
class Side:
    label: str  # "old" / "new"
    spec: str  # what was asked for: a rev or a path
    tree: str  # source tree the server runs from
    rtcsignal: str  # console script
    desc: str  # commit (and dirty state) for the report
    flags: str  # extra server flags for this side

    def server_cmd(self, common: str) -> str:
        return " ".join(x for x in (SERVE.format(rtcsignal=self.rtcsignal), common, self.flags) if x)


@dataclass
class Config:
    scenario: str
    params: dict
    key: str  # for the table
    est_s: float = 0.0


@dataclass
class Result:
    config: Config
    side: str
    rep: int
    rec: dict = field(default_factory=dict)


# ---------------------------------------------------------------- setup

def sh(cmd: list[str], cwd: str | None = None, check: bool = True) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if check and r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {shlex.join(cmd)}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r.stdout.strip()


def git(*args: str, cwd: str = REPO, check: bool = True) -> str:
    return sh(["git", *args], cwd=cwd, check=check)


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def installed_from(python: str) -> str:
    """Directory rtcsignal is imported from by this interpreter (cwd / and -P: not the cwd)."""
    return sh([python, "-P", "-c", "import os, rtcsignal; print(os.path.dirname(os.path.dirname("
               "os.path.abspath(rtcsignal.__file__))))"], cwd="/")


def prepare_side(label: str, spec: str, flags: str, a: argparse.Namespace) -> Side:
    if os.path.isdir(spec):  # an existing source tree with its own venv, used as is
        tree = os.path.abspath(spec)
        rtc = os.path.join(tree, ".venv", "bin", "rtcsignal")
        if not os.access(rtc, os.X_OK):
            raise SystemExit(f"{label}: {rtc} missing (make .venv/.installed in {tree})")
        desc = git("describe", "--always", "--dirty", "--abbrev=7", cwd=tree, check=False) or "?"
        desc = f"{desc} (source tree {tree})"
        if desc.split()[0].endswith("-dirty"):
            desc += "; uncommitted edits count, as they are at each server start"
    else:
        sha = git("rev-parse", "--verify", f"{spec}^{{commit}}")
        tree = os.path.join(BUILD, "bench-worktrees", sha[:7])
        if os.path.isdir(tree):
            have = git("rev-parse", "HEAD", cwd=tree, check=False)
            if have != sha:
                raise SystemExit(f"{tree} is at {have or 'no commit'}, not {sha}: remove it "
                                 f"(git worktree remove --force {tree})")
        else:
            log(f"{label}: git worktree add {tree} {sha[:7]}")
            git("worktree", "add", "--detach", tree, sha)
        venv = os.path.join(tree, ".venv")
        stamp = os.path.join(venv, ".bench-compare-installed")
        if not os.path.exists(stamp):
            t0 = time.time()
            if not os.path.exists(os.path.join(venv, "bin", "python")):
                log(f"{label}: {a.python} -m venv {venv}")
                sh([a.python, "-m", "venv", venv])
            log(f"{label}: pip install -e {tree}")
            sh([os.path.join(venv, "bin", "pip"), "install", "-q", "-e", tree])
            with open(stamp, "w") as f:
                f.write(sha + "\n")
            log(f"{label}: venv ready in {time.time() - t0:.0f} s")
        rtc = os.path.join(venv, "bin", "rtcsignal")
        subject = git("log", "-1", "--format=%s", sha)
        desc = f"{sha[:7]} {subject}"
    got = installed_from(os.path.join(os.path.dirname(rtc), "python"))
    if os.path.realpath(got) != os.path.realpath(tree):
        raise SystemExit(f"{label}: {rtc} imports rtcsignal from {got}, not {tree}")
    return Side(label, spec, tree, rtc, desc, flags)


def ensure_bins(a: argparse.Namespace) -> None:
    need = ["wsload"] * ("fanout" in a.scenarios) + ["wsload-pairs"] * ("pairs" in a.scenarios)
    if all(os.access(os.path.join(a.bench_bin, b), os.X_OK) for b in need):
        return
    log(f"building the shared load generators: BENCH_BIN={a.bench_bin} {a.shared}/build.sh")
    subprocess.run(["sh", os.path.join(a.shared, "build.sh")], check=True,
                   env={**os.environ, "BENCH_BIN": a.bench_bin}, stdout=subprocess.DEVNULL)


def pick_harness_python(choice: str | None) -> str:
    cands = [choice] if choice else [sys.executable, os.path.join(REPO, ".venv", "bin", "python")]
    for py in cands:
        if py and subprocess.run([py, "-c", "import psutil"], capture_output=True).returncode == 0:
            return py
    raise SystemExit(f"no python with psutil among {cands} (the shared run.py needs it): "
                     "pip install psutil, or pass --harness-python")


# ---------------------------------------------------------------- plan

def csv(s: str, typ=str) -> list:
    return [typ(x) for x in s.split(",") if x.strip()]


def payload_bytes(a: argparse.Namespace, name: str) -> int:
    return os.path.getsize(os.path.join(a.shared, "payloads", f"{name}.json"))


def plan(a: argparse.Namespace) -> list[Config]:
    out = []
    if "fanout" in a.scenarios:
        for pl in csv(a.payload):
            for n in csv(a.fanout_n, int):
                if a.fanout_window == "auto":
                    w = max(1, WINDOW_BYTES // payload_bytes(a, pl))
                else:
                    w = int(a.fanout_window)  # 0: run.py's own default, max(32, 50000/N)
                p = {"n": n, "payload": pl, "window": w}
                est = a.warmup + a.duration + OVERHEAD_S["fanout"] + n * OVERHEAD_PER_CLIENT_S
                out.append(Config("fanout", p, f"N={n} {pl} window={w or 'run.py'}", est))
    if "pairs" in a.scenarios:
        for P in csv(a.pairs, int):
            for W in csv(a.window, int):
                est = a.pairs_warmup + a.pairs_duration + OVERHEAD_S["pairs"] + 2 * P * OVERHEAD_PER_CLIENT_S
                out.append(Config("pairs", {"pairs": P, "window": W}, f"P={P} W={W}", est))
    return out


# ---------------------------------------------------------------- runs

def harness_env(a: argparse.Namespace) -> dict:
    return {**os.environ, "BENCH_BIN": a.bench_bin, "PYTHONDONTWRITEBYTECODE": "1",
            "TMPDIR": a.log_dir}  # run.py writes server logs to $TMPDIR/bench-<name>-<port>.log


def run_fanout(side: Side, c: Config, a: argparse.Namespace) -> dict:
    p = c.params
    cmd = [a.harness_python, os.path.join(a.shared, "run.py"), "--server-cmd", side.server_cmd(a.common_flags),
           "--name", side.label, "--scenario", "fanout", "--n", str(p["n"]), "--payload", p["payload"],
           "--reps", "1", "--duration", str(a.duration), "--warmup", str(a.warmup),
           "--window", str(p["window"]), "--server-cpu", a.server_cpu, "--lg-cpu", a.lg_cpu,
           "--out", os.devnull]
    return harness(cmd, side, a.warmup + a.duration + 240, a)


def run_pairs(side: Side, c: Config, a: argparse.Namespace) -> dict:
    ns = {"server_cmd": side.server_cmd(a.common_flags), "name": side.label, "path": "/signaling",
          "duration": a.pairs_duration, "warmup": a.pairs_warmup, "peerjs_dir": "",
          "P": c.params["pairs"], "W": c.params["window"]}
    cmd = [a.harness_python, "-c", PAIRS_DRIVER, a.shared, json.dumps(ns)]
    return harness(cmd, side, a.pairs_warmup + a.pairs_duration + 300, a)


def harness(cmd: list[str], side: Side, timeout: float, a: argparse.Namespace) -> dict:
    p = subprocess.Popen(cmd, cwd=side.tree, env=harness_env(a), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    sampler = Cpu0Sampler(p.pid, side.rtcsignal, a.server_cpu)
    sampler.start()
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()  # the harness's own finally-blocks stop the server; a SIGKILL skips them
        stdout, stderr = p.communicate()
        stderr = f"harness timed out after {timeout:.0f} s (server may be left running)\n{stderr}"
    finally:
        sampler.stop()
    rec = None
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
            break
    if rec is None:
        last = (stderr.strip().splitlines() or [""])[-1][:300]
        rec = {"error": f"harness rc={p.returncode}: {last}", "stderr": stderr[-800:], "stdout": stdout[-400:]}
    rec["cpu0_other_pct"] = sampler.other_pct()
    return rec


def proc_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        try:
            for t in os.listdir(f"/proc/{q}/task"):
                with open(f"/proc/{q}/task/{t}/children") as f:
                    todo += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def cpu_jiffies(cpu: str) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU from /proc/stat. Busy = user + nice + system + steal:
    irq/softirq time is left out, it is mostly the benchmark's own loopback traffic."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:9]]
                return v[0] + v[1] + v[2] + v[7], sum(v)
    return 0, 0


class Cpu0Sampler(threading.Thread):
    """How much of the server's CPU other processes took while the server under test ran:
    (busy jiffies of that CPU - the server's own jiffies) / all jiffies of that CPU, sampled
    together every 0.25 s between the first and the last sample that saw the server."""

    def __init__(self, root: int, marker: str, cpu: str):
        super().__init__(daemon=True)
        self.root, self.marker, self.cpu = root, marker, cpu
        self.first: tuple[int, int, int] | None = None
        self.last: tuple[int, int, int] | None = None
        self.done = threading.Event()

    def server_jiffies(self) -> int | None:
        total, seen = 0, False
        for q in proc_tree(self.root):
            try:
                with open(f"/proc/{q}/cmdline", "rb") as f:
                    if self.marker.encode() not in f.read():
                        continue
                with open(f"/proc/{q}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
                seen = True
            except (OSError, IndexError, ValueError):
                pass
        return total if seen else None

    def run(self) -> None:
        while not self.done.wait(0.25):
            srv = self.server_jiffies()
            if srv is None:
                continue
            busy, total = cpu_jiffies(self.cpu)
            self.last = (busy, total, srv)
            if self.first is None:
                self.first = self.last

    def stop(self) -> None:
        self.done.set()
        self.join(2)

    def other_pct(self) -> float | None:
        if not self.first or not self.last or self.last[1] <= self.first[1]:
            return None
        (b0, t0, s0), (b1, t1, s1) = self.first, self.last
        return round(max(0.0, 100 * ((b1 - b0) - (s1 - s0)) / (t1 - t0)), 1)


def problem(rec: dict) -> str | None:
    """Why a run does not count (None: it counts)."""
    if rec.get("error"):
        return str(rec["error"])
    if rec.get("server_died") or rec.get("server_alive_at_end") is False:
        return "server exited"
    if rec.get("stalled"):
        return "stalled"
    if rec.get("n_failed") or rec.get("n_closed"):
        return f"{rec.get('n_failed', 0)} failed / {rec.get('n_closed', 0)} closed connections"
    return None


# ---------------------------------------------------------------- report

METRICS = {  # scenario -> [(record key, label, higher is better)]; the first is the headline
    "fanout": [("deliveries_per_s", "deliveries/s", True),
               ("compare_per_core", "deliveries per server core-s", True)],
    "pairs": [("round_trips_per_s", "round trips/s", True),
              ("compare_per_core", "round trips per server core-s", True),
              ("lat_ms.p99", "p99 one-way ms", False)],
}
CPU_KEY = {"fanout": "srv_cpu_pct_whole_run", "pairs": "server_cpu_pct"}


def derive(rec: dict, scenario: str) -> None:
    """Per server core-second: the headline figure over the server's CPU share (noise-tolerant
    when other work takes part of the server's CPU)."""
    fig, cpu = get(rec, METRICS[scenario][0][0]), rec.get(CPU_KEY[scenario])
    if fig is not None and cpu:
        rec["compare_per_core"] = round(fig / (cpu / 100), 1)


def get(rec: dict, key: str):
    for k in key.split("."):
        rec = rec.get(k) if isinstance(rec, dict) else None
    return rec


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    for div, suf in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suf}" if abs(v) / div < 100 else f"{v / div:.0f}{suf}"
    return f"{v:.3g}"


def med(vals: list) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def table(results: list[Result], configs: list[Config]) -> str:
    rows = ["| scenario | parameters | metric | old median | new median | new/old | old runs | new runs |",
            "|---|---|---|---|---|---|---|---|"]
    for c in configs:
        mine = [r for r in results if r.config is c]
        for key, label, higher in METRICS[c.scenario]:
            runs, meds = {}, {}
            for s in ("old", "new"):
                rs = sorted((r for r in mine if r.side == s), key=lambda r: r.rep)
                runs[s] = ", ".join(fmt(get(r.rec, key)) if problem(r.rec) is None else "failed"
                                    for r in rs) or "-"
                meds[s] = med([get(r.rec, key) for r in rs if problem(r.rec) is None])
            ratio = (f"{meds['new'] / meds['old']:.3f}" if meds["old"] and meds["new"] is not None
                     else "-")
            better = "higher is better" if higher else "lower is better"
            rows.append(f"| {c.scenario} | {c.key} | {label} ({better}) | {fmt(meds['old'])} | "
                        f"{fmt(meds['new'])} | {ratio} | {runs['old']} | {runs['new']} |")
    return "\n".join(rows)


def conditions(results: list[Result], configs: list[Config]) -> str:
    rows = ["| scenario | parameters | server CPU % old / new (medians) | other work on CPU 0 %, "
            "old / new (median, max) | attempts | seconds per run |",
            "|---|---|---|---|---|---|"]
    for c in configs:
        mine = [r for r in results if r.config is c]
        cpu, other = [], []
        for s in ("old", "new"):
            rs = [r.rec for r in mine if r.side == s]
            v = med([r.get(CPU_KEY[c.scenario]) for r in rs])
            cpu.append("-" if v is None else f"{v:.0f}")
            o = [r["cpu0_other_pct"] for r in rs if r.get("cpu0_other_pct") is not None]
            other.append(f"{med(o):.0f}, {max(o):.0f}" if o else "-")
        attempts = sum(r.rec.get("compare_attempts", 1) for r in mine)
        wall = med([r.rec.get("compare_wall_s") for r in mine])
        rows.append(f"| {c.scenario} | {c.key} | {' / '.join(cpu)} | {' / '.join(other)} | "
                    f"{attempts} for {len(mine)} runs | {wall or 0:.1f} |")
    return "\n".join(rows)


def report(results, configs, sides, a, started, wall) -> str:
    old, new = sides
    bad = [(r, problem(r.rec)) for r in results if problem(r.rec)]
    lines = [
        f"# rtcsignal relay path: {old.spec} vs {new.spec}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, {os.cpu_count()} CPUs, "
        f"load average at start {a.load_start}, at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"{a.reps} repetition(s), old/new alternating (order flipped each repetition); "
        f"server on CPU {a.server_cpu}, load generator on CPU {a.lg_cpu}; {wall / 60:.1f} min.",
        "",
        f"- old: {old.desc}",
        f"- new: {new.desc}",
        f"- old server: `{old.server_cmd(a.common_flags)}`",
        f"- new server: `{new.server_cmd(a.common_flags)}`",
        f"- fan-out: shared `run.py --scenario fanout`, {a.warmup:g} s warm-up + {a.duration:g} s; "
        f"pairs: shared `pairs.py` (one_run, no PeerJS), {a.pairs_warmup:g} s + {a.pairs_duration:g} s",
        "",
        "Medians over the runs that completed cleanly; per-run values in repetition order. "
        "Per server core-s = the figure / the server's CPU share (fan-out: CPU over the whole "
        "load-generator run, connects and warm-up included; pairs: over the measured window). "
        "The machine is shared: ratios within about 5% of 1 are noise unless the per-run values "
        "separate; see the run conditions below.",
        "",
        table(results, configs),
        "",
        "Run conditions (other work on CPU 0: its busy time not spent by the server under test, "
        "over the server's life, as a share of CPU 0; runs above --retry-noisy were repeated):",
        "",
        conditions(results, configs),
        "",
    ]
    if bad:
        lines += ["Runs that did not count:", ""]
        lines += [f"- {r.config.scenario} {r.config.key} {r.side} rep {r.rep}: {why}" for r, why in bad]
        lines.append("")
    raw = os.path.abspath(a.out_jsonl)
    lines.append(f"Raw JSON lines: `{os.path.relpath(raw, REPO) if raw.startswith(REPO + os.sep) else raw}`; "
                 f"fan-out server logs in `{a.log_dir}`, pairs server logs in /tmp/pairs-<port>.log.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default=DEFAULT_OLD, help=f"git rev or source tree path (default {DEFAULT_OLD})")
    ap.add_argument("--new", default="HEAD", help="git rev or source tree path (default HEAD, resolved at start)")
    ap.add_argument("--reps", type=int, help="repetitions (default 5; --quick: 1)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 rep, fan-out N=100 ICE, pairs P=500 W=8, 1 s + 2 s runs")
    ap.add_argument("--plan", action="store_true", help="print the runs and a time estimate, run nothing")
    ap.add_argument("--scenarios", default="fanout,pairs", help="fanout, pairs or both")
    ap.add_argument("--common-flags", default=COMMON_FLAGS, help="server flags for both sides")
    ap.add_argument("--extra-old-flags", default="",
                    help="server flags for the old side only (one flag alone: --extra-old-flags=--flag)")
    ap.add_argument("--extra-new-flags", default="",
                    help="server flags for the new side only, e.g. \"--rate-limit-bytes N --rate-burst-bytes N\" "
                         "(one flag alone: --extra-new-flags=--flag)")
    g = ap.add_argument_group("fan-out (shared run.py)")
    g.add_argument("--fanout-n", help="receivers, comma list (default 100,1000)")
    g.add_argument("--payload", help="ice, sdp or ice,sdp (default ice,sdp)")
    g.add_argument("--fanout-window", default="auto",
                   help="messages in flight: auto = 256 KiB of payload per receiver (as bench/run.py; "
                        "ICE 1291, SDP 62), 0 = run.py's max(32, 50000/N), or a number")
    g.add_argument("--duration", type=float, help="measured seconds (default 5)")
    g.add_argument("--warmup", type=float, help="warm-up seconds (default 1)")
    g = ap.add_argument_group("pairs (shared pairs.py)")
    g.add_argument("--pairs", help="pairs, comma list (default 500,5000)")
    g.add_argument("--window", help="messages in flight per pair, comma list (default 1,8)")
    g.add_argument("--pairs-duration", type=float, help="measured seconds (default 8)")
    g.add_argument("--pairs-warmup", type=float, help="warm-up seconds (default 2)")
    g = ap.add_argument_group("environment")
    g.add_argument("--shared", default=SHARED, help="the shared bench directory (read only)")
    g.add_argument("--bench-bin", default=os.path.join(BUILD, "bench-bin"),
                   help="where the shared load generators are built (BENCH_BIN)")
    g.add_argument("--harness-python", help="interpreter for run.py/pairs.py (needs psutil)")
    g.add_argument("--python", default=sys.executable, help="interpreter for the worktree venvs")
    g.add_argument("--retry-noisy", type=float, default=10.0,
                   help="run again when other work took more than this %% of the server's CPU "
                        "(0 = never); the last attempt is kept")
    g.add_argument("--retries", type=int, default=2, help="at most this many repeats of a noisy run")
    g.add_argument("--server-cpu", default="0")
    g.add_argument("--lg-cpu", default="1")
    g.add_argument("--out-md", default=os.path.join(BUILD, "bench-compare.md"))
    g.add_argument("--out-jsonl", default=os.path.join(BUILD, "bench-compare.jsonl"))
    g.add_argument("--log-dir", default=os.path.join(BUILD, "bench-compare-logs"),
                   help="fan-out server logs (pairs.py writes its own to /tmp/pairs-<port>.log)")
    a = ap.parse_args(argv)
    quick = {"reps": 1, "fanout_n": "100", "payload": "ice", "duration": 2.0, "warmup": 1.0,
             "pairs": "500", "window": "8", "pairs_duration": 2.0, "pairs_warmup": 1.0}
    full = {"reps": 5, "fanout_n": "100,1000", "payload": "ice,sdp", "duration": 5.0, "warmup": 1.0,
            "pairs": "500,5000", "window": "1,8", "pairs_duration": 8.0, "pairs_warmup": 2.0}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.scenarios = csv(a.scenarios)
    if unknown := set(a.scenarios) - set(METRICS):
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    a.shared = os.path.abspath(a.shared)
    a.bench_bin = os.path.abspath(a.bench_bin)
    return a


def measure(side: Side, c: Config, rep: int, a: argparse.Namespace) -> dict:
    """One run (repeated while other work took too much of the server's CPU)."""
    run = {"fanout": run_fanout, "pairs": run_pairs}[c.scenario]
    where = f"rep {rep + 1}/{a.reps} {c.scenario} {c.key} {side.label}"
    for attempt in range(1, a.retries + 2):
        t0 = time.time()
        rec = run(side, c, a)
        other = rec.get("cpu0_other_pct")
        if (not a.retry_noisy or other is None or other <= a.retry_noisy
                or attempt > a.retries or problem(rec)):
            break
        log(f"{where}: other work took {other:.0f}% of CPU {a.server_cpu}, running it again")
    derive(rec, c.scenario)
    rec.update(compare_side=side.label, compare_rev=side.desc.split()[0], compare_rep=rep,
               compare_scenario=c.scenario, compare_params=c.params,
               compare_wall_s=round(time.time() - t0, 2), compare_attempts=attempt)
    why = problem(rec)
    log(f"{where}: {fmt(get(rec, METRICS[c.scenario][0][0]))} {METRICS[c.scenario][0][1]}"
        f"{' (' + why + ')' if why else ''}, other work on CPU {a.server_cpu} "
        f"{rec.get('cpu0_other_pct')}% [{time.time() - t0:.1f} s]")
    return rec


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    configs = plan(a)
    per_rep = sum(c.est_s for c in configs) * 2
    estimate = f"{len(configs) * 2 * a.reps} runs, about {per_rep * a.reps / 60:.1f} min"
    if a.plan:
        for c in configs:
            print(f"{c.scenario:7} {c.key:28} ~{c.est_s:.0f} s per run, x2 sides x{a.reps} reps")
        print(f"total: {estimate} (plus worktree/venv set-up on first use, ~10 s per side)")
        return 0
    a.load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    a.harness_python = pick_harness_python(a.harness_python)
    os.makedirs(a.log_dir, exist_ok=True)
    ensure_bins(a)
    sides = (prepare_side("old", a.old, a.extra_old_flags, a),
             prepare_side("new", a.new, a.extra_new_flags, a))
    log(f"old = {sides[0].desc}; new = {sides[1].desc}; {estimate}")
    results: list[Result] = []
    started = time.time()
    interrupted = False
    try:
        with open(a.out_jsonl, "w") as out:
            for rep in range(a.reps):
                for i, c in enumerate(configs):
                    for side in sides if (rep + i) % 2 == 0 else sides[::-1]:
                        rec = measure(side, c, rep, a)
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
                        results.append(Result(c, side.label, rep, rec))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: reporting the runs done so far")
    md = report(results, configs, sides, a, started, time.time() - started)
    with open(a.out_md, "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {a.out_md} and {a.out_jsonl}")
    return 1 if interrupted or any(problem(r.rec) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
