#!/usr/bin/env python3
"""rtcsignal benchmark driver: the same load against rtcsignal and the original Node.js `ws` server.

Each measurement starts a fresh server pinned to one CPU (taskset, default CPU 0) and the C load
generator (bench/loadgen.c, compiled on first use into bench/bin/) pinned to the other (CPU 1).
Servers alternate inside every repetition (and the order flips each repetition); summarize.py
takes medians over repetitions and ratios rtcsignal / node.

    python bench/run.py --scenario fanout,latency,memory,storm,idle,rooms --reps 3 \\
        --servers rtcsignal,node --out bench/results/results.jsonl
    python bench/run.py --smoke          # a few seconds, rtcsignal only; non-zero exit on failure

Every result is one JSON line, appended to --out and printed on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.path.join(HERE, "bin")
PAYLOADS = {"ice": os.path.join(HERE, "payloads", "ice.json"),
            "sdp": os.path.join(HERE, "payloads", "sdp.json")}
SCENARIOS = ["fanout", "latency", "memory", "storm", "idle", "rooms"]
RTCSIGNAL_TEMPLATE = ("{repo}/.venv/bin/rtcsignal serve --port {port} --path /signaling "
                      "--log-level warning --rate-limit 10000000 --rate-burst 10000000 --rate-limit-bytes 1024m --rate-burst-bytes 1024m")
NODE_TEMPLATE = "env PORT={port} node {node_dir}/server.js"
RELAY_TEMPLATE = "{bin}/relay {port}"
# engine prototypes of the original design (bench/engines/), for the engine choice
ENGINE_TEMPLATES = {
    "websockets": "{repo}/.venv/bin/python {repo}/bench/engines/websockets_relay.py {port}",
    "picows": "{repo}/.venv/bin/python {repo}/bench/engines/picows_relay.py {port}",
}
# servers that implement rooms / addressed messages (the Node original has neither)
HAS_ROOMS = {"rtcsignal"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- build / processes

def build(force: bool = False) -> None:
    """Compile the load generator and the trivial C relay into bench/bin/ when stale."""
    os.makedirs(BIN, exist_ok=True)
    for name in ("loadgen", "relay"):
        src, out = os.path.join(HERE, f"{name}.c"), os.path.join(BIN, name)
        if force or not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
            subprocess.run(["gcc", "-O2", "-Wall", "-o", out, src], check=True)


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def cpu_busy(cpu: str) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU from /proc/stat: to see how much other work shared it."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]
                return sum(v[:8]) - idle, sum(v[:8])
    return 0, 0


def rss_bytes(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


class Server:
    """One fresh server process, pinned to a CPU, in its own process group."""

    def __init__(self, name: str, template: str, a: argparse.Namespace):
        self.name = name
        self.port = free_port()
        cmd = template.format(port=self.port, path=a.path, repo=REPO, node_dir=a.node_dir, bin=BIN)
        logdir = os.path.join(HERE, "results", "logs")
        os.makedirs(logdir, exist_ok=True)
        self.logpath = os.path.join(logdir, f"{name}-{self.port}.log")
        self.log = open(self.logpath, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(["taskset", "-c", a.server_cpu, *shlex.split(cmd)],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                     preexec_fn=raise_nofile, start_new_session=True)
        deadline = time.time() + 30
        while True:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"{name} exited rc={self.proc.returncode}: {self.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"{name} did not listen on {self.port}") from None
                time.sleep(0.05)
        time.sleep(0.3)

    def tail(self, n: int = 600) -> str:
        try:
            with open(self.logpath, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def stop(self) -> int | None:
        rc = self.proc.poll()
        if rc is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                rc = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                rc = "killed after 5 s"
        if not self.log.closed:
            self.log.close()
        return rc


# ---------------------------------------------------------------- load generator

def loadgen_cmd(srv: Server, a: argparse.Namespace, **kw) -> list[str]:
    cmd = ["taskset", "-c", a.lg_cpu, os.path.join(BIN, "loadgen"), "--port", str(srv.port),
           "--path", a.path, "--sources", str(a.sources)]
    for k, v in kw.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    return cmd


def run_loadgen(srv: Server, a: argparse.Namespace, limit: float, **kw) -> dict:
    """Run the load generator to completion; server CPU is sampled at its "measure"/"end" marks."""
    t0, c0 = time.time(), srv.cpu()
    p = subprocess.Popen(loadgen_cmd(srv, a, **kw), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=raise_nofile)
    marks, last = {}, None
    try:
        deadline = time.time() + limit
        for line in p.stdout:
            line = line.strip()
            if not line:
                continue
            obj = json.loads(line)
            if "event" in obj:
                marks[obj["event"]] = (time.time(), srv.cpu(), cpu_busy(a.server_cpu))
            else:
                last = obj
            if time.time() > deadline:
                break
        p.wait(max(1.0, deadline - time.time()))
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        p.kill()
        p.wait()
        return {"error": f"loadgen: {e!r}"}
    t1, c1 = time.time(), srv.cpu()
    out = last or {"error": "loadgen printed no result", "stderr": p.stderr.read()[-400:]}
    out["lg_rc"] = p.returncode
    out["srv_cpu_pct_run"] = round(100 * (c1 - c0) / max(t1 - t0, 1e-9), 1)
    if "measure" in marks and "end" in marks:
        (tm, cm, bm), (te, ce, be) = marks["measure"], marks["end"]
        out["srv_cpu_pct"] = round(100 * (ce - cm) / max(te - tm, 1e-9), 1)
        if be[1] > bm[1]:  # the server's CPU was also busy with this much other work
            busy = 100 * (be[0] - bm[0]) / (be[1] - bm[1])
            out["server_cpu_other_pct"] = round(max(0.0, busy - out["srv_cpu_pct"]), 1)
        if out["srv_cpu_pct"] > 0 and "deliveries_per_s" in out:
            out["deliveries_per_core_s"] = round(
                out["deliveries_per_s"] / (out["srv_cpu_pct"] / 100), 1)
    return out


def idle_clients(srv: Server, a: argparse.Namespace, levels: list[int], at_level) -> dict:
    """Hold idle connections at each level; call at_level(level, line) while they are held."""
    p = subprocess.Popen(loadgen_cmd(srv, a, mode="idle", levels=",".join(map(str, levels)),
                                     n=max(levels), conc=a.conc, timeout=300),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         preexec_fn=raise_nofile)
    out: dict = {}
    try:
        for lv in levels:
            line = json.loads(p.stdout.readline() or "{}")
            if not line.get("ok"):
                out["error"] = f"connecting {lv} idle clients: {line}"
                break
            out.update(at_level(lv, line))
            p.stdin.write("n\n" if lv != levels[-1] else "q\n")
            p.stdin.flush()
            held = json.loads(p.stdout.readline() or "{}")
            out["pings_answered"] = held.get("pings_answered")
            out["lg_cpu_pct"] = held.get("lg_cpu_pct")
            out["clients_closed_by_server"] = held.get("closed")
        p.stdin.close()
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return out


# ---------------------------------------------------------------- scenarios

def sc_fanout(srv, a, n, payload):
    return run_loadgen(srv, a, a.duration + 120, mode="fanout", n=n, payload=PAYLOADS[payload],
                       duration=a.duration, warmup=a.warmup, timeout=90, window=a.window)


def sc_latency(srv, a, n, payload):
    return run_loadgen(srv, a, a.lat_duration + 120, mode="latency", n=n, payload=PAYLOADS[payload],
                       duration=a.lat_duration, warmup=1, rate=a.rate, timeout=90)


def sc_rooms(srv, a, n, payload):
    r = run_loadgen(srv, a, a.duration + 180, mode="rooms", n=n, payload=PAYLOADS[payload],
                    duration=a.duration, warmup=a.warmup, window=a.rooms_window, timeout=150)
    return r


def sc_storm(srv, a, n, payload):
    r = run_loadgen(srv, a, 180, mode="storm", n=n, conc=a.conc, timeout=150)
    r["srv_rss_mib_after"] = round(srv.rss() / 2**20, 1)
    if r.get("srv_cpu_pct") and r.get("conns_per_s"):
        r["conns_per_core_s"] = round(r["conns_per_s"] / (r["srv_cpu_pct"] / 100), 1)
    return r


def sc_memory(srv, a, n, payload):
    time.sleep(1.0)
    rss0 = srv.rss()
    levels = [int(x) for x in a.mem_levels.split(",")]

    def at_level(lv, line):
        time.sleep(a.settle)
        r = srv.rss()
        return {f"rss_{lv}_mib": round(r / 2**20, 2), f"connect_s_{lv}": line.get("connect_s"),
                f"kib_per_conn_{lv}": round((r - rss0) / lv / 1024, 3)}

    out = {"rss0_mib": round(rss0 / 2**20, 2)}
    out.update(idle_clients(srv, a, levels, at_level))
    return out


def sc_idle(srv, a, n, payload):
    def at_level(lv, line):
        time.sleep(a.settle)
        t0, c0 = time.time(), srv.cpu()
        time.sleep(a.idle_s)
        t1, c1 = time.time(), srv.cpu()
        return {"idle_window_s": round(t1 - t0, 1), "idle_cpu_s": round(c1 - c0, 3),
                "idle_cpu_pct": round(100 * (c1 - c0) / (t1 - t0), 3),
                "rss_mib": round(srv.rss() / 2**20, 1)}

    return idle_clients(srv, a, [n], at_level)


RUNNERS = {"fanout": sc_fanout, "latency": sc_latency, "rooms": sc_rooms, "storm": sc_storm,
           "memory": sc_memory, "idle": sc_idle}


def configs(sc: str, a) -> list[tuple[int, str]]:
    """(n, payload) pairs measured by a scenario."""
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    if sc == "fanout":
        return [(n, p) for p in a.payloads.split(",") for n in ints(a.fanout_n)]
    if sc == "latency":
        return [(n, "ice") for n in ints(a.latency_n)]
    if sc == "rooms":
        return [(n, "ice") for n in ints(a.rooms_n)]
    if sc == "storm":
        return [(a.storm_n, "")]
    if sc == "memory":
        return [(max(ints(a.mem_levels)), "")]
    return [(a.idle_clients, "")]


def measure(name, template, sc, n, payload, rep, a) -> dict:
    res = {"server": name, "scenario": sc, "n": n, "rep": rep, "time": time.strftime("%H:%M:%S")}
    if payload:
        res["payload"] = payload
    try:
        srv = Server(name, template, a)
    except RuntimeError as e:
        res["error"] = str(e)
        return res
    try:
        res.update(RUNNERS[sc](srv, a, n, payload))
    except Exception as e:  # keep going: one broken run must not lose the others
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        died = not srv.alive()
        rc = srv.stop()
        if died:
            res["server_died"] = True
            res["server_rc"] = rc
            res["server_log_tail"] = srv.tail()
        elif rc not in (0, -signal.SIGTERM):
            res["server_stop_rc"] = rc
    return res


def meta(a: argparse.Namespace) -> dict:
    """Where and on what the run happened (a line without "server": summarize.py skips it)."""
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=REPO,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"meta": True, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
            "nproc": os.cpu_count(), "uname_r": os.uname().release,
            "python": sh(f"{REPO}/.venv/bin/python --version") or sys.version.split()[0],
            "node": sh("node --version"), "git_head": sh("git rev-parse --short HEAD"),
            "rtcsignal_dirty": sh("git status --porcelain -- rtcsignal") != ""}


def emit(res: dict, out: str) -> None:
    line = json.dumps(res)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def ok(res: dict) -> bool:
    """Did the run produce its figure?"""
    if "error" in res or res.get("server_died") or res.get("stalled"):
        return False
    sc = res["scenario"]
    if sc in ("fanout", "rooms"):
        return res.get("deliveries", 0) > 0
    if sc == "latency":
        return res.get("samples", 0) > 0
    if sc == "storm":
        return bool(res.get("ok"))
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="fanout,latency",
                    help="comma list of " + ",".join(SCENARIOS) + " or 'all'")
    ap.add_argument("--servers", default="rtcsignal,node",
                    help="comma list of rtcsignal, node, relay (trivial C relay: loadgen headroom),"
                    " websockets, picows (engine prototypes, bench/engines/)")
    ap.add_argument("--server-cmd", help="template for rtcsignal ({port}, {path}, {repo}); default: "
                    + RTCSIGNAL_TEMPLATE)
    ap.add_argument("--node-dir", default=os.path.normpath(
        os.path.join(REPO, "..", "shared", "reference", "original-node")))
    ap.add_argument("--path", default="/signaling")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "results.jsonl"))
    ap.add_argument("--server-cpu", default="0")
    ap.add_argument("--lg-cpu", default="1")
    ap.add_argument("--payloads", default="ice,sdp", help="fanout payloads")
    ap.add_argument("--fanout-n", default="100,1000")
    ap.add_argument("--latency-n", default="2,100,1000")
    ap.add_argument("--rooms-n", default="1000,10000")
    ap.add_argument("--window", type=int, default=0,
                    help="fanout: messages in flight (0 = auto, see loadgen.c)")
    ap.add_argument("--rooms-window", type=int, default=256, help="rooms: messages in flight")
    ap.add_argument("--storm-n", type=int, default=5000)
    ap.add_argument("--sources", type=int, default=100000,
                    help="client i connects from 127.100.0.1 + i %% SOURCES (default: one address"
                    " per client, like real peers; 0 = all from 127.0.0.1)")
    ap.add_argument("--conc", type=int, default=64, help="handshakes in flight while connecting")
    ap.add_argument("--mem-levels", default="1000,5000,10000")
    ap.add_argument("--idle-clients", type=int, default=1000)
    ap.add_argument("--idle-s", type=float, default=60.0, help="idle CPU measuring window")
    ap.add_argument("--settle", type=float, default=2.0, help="pause after connecting idle clients")
    ap.add_argument("--duration", type=float, default=5.0, help="fanout/rooms measured seconds")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--lat-duration", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=20.0, help="latency: messages/s from the sender")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long self-check (rtcsignal only unless --servers given)")
    a = ap.parse_args()

    if a.smoke:
        if not any(x == "--servers" or x.startswith("--servers=") for x in sys.argv):
            a.servers = "rtcsignal"
        if not any(x == "--scenario" or x.startswith("--scenario=") for x in sys.argv):
            a.scenario = "fanout,latency,storm"
        a.reps, a.fanout_n, a.latency_n, a.storm_n, a.payloads = 1, "10", "2", 200, "ice"
        a.rooms_n, a.mem_levels, a.idle_clients, a.idle_s, a.settle = "10", "100", 50, 1.0, 0.3
        a.duration, a.warmup, a.lat_duration = 1.0, 0.3, 1.0
        if not any(x == "--out" or x.startswith("--out=") for x in sys.argv):
            a.out = ""

    build()
    raise_nofile()
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    templates = {"rtcsignal": a.server_cmd or RTCSIGNAL_TEMPLATE, "node": NODE_TEMPLATE,
                 "relay": RELAY_TEMPLATE, **ENGINE_TEMPLATES}
    names = [s for s in a.servers.split(",") if s]
    for s in names:
        if s not in templates:
            ap.error(f"unknown server {s!r}")
    scen = SCENARIOS if a.scenario == "all" else [s for s in a.scenario.split(",") if s]
    for s in scen:
        if s not in RUNNERS:
            ap.error(f"unknown scenario {s!r}")

    emit(meta(a), a.out)
    results = []
    for rep in range(a.reps):
        order = names if rep % 2 == 0 else names[::-1]  # flip the order every repetition
        for sc in scen:
            for n, payload in configs(sc, a):
                for name in order:
                    if sc == "rooms" and name not in HAS_ROOMS:
                        continue
                    res = measure(name, templates[name], sc, n, payload, rep, a)
                    emit(res, a.out)
                    results.append(res)
    bad = [r for r in results if not ok(r)]
    summary = {"summary": True, "runs": len(results), "failed": len(bad),
               "ok": not bad and bool(results)}
    if a.smoke:
        for r in results:
            key = {"fanout": "deliveries_per_s", "latency": "lat_ms", "storm": "conns_per_s"}.get(
                r["scenario"])
            if key:
                summary[r["scenario"]] = r.get(key)
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
