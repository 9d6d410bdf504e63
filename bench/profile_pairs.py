#!/usr/bin/env python3
"""Where the server's time goes on the pairs workload: kernel vs event loop vs our Python.

The shared pairs load (``wsload-pairs`` of ../shared/bench: P rooms of two, W messages in
flight per pair, ~220 B ``offer`` messages addressed with ``to``) against one server pinned to
CPU 0, the load generator on CPU 1. After a warm-up, three windows of ``--seconds`` each, one
after the other on the same running server:

1. **cost**: the server's CPU time (user and system, /proc) and the messages it relayed
   (``rtcsignal_deliveries_total`` from /metrics) -> microseconds of server CPU per relayed
   message; ``perf stat`` counts its system calls (read, write, epoll_wait, all) meanwhile.
2. **perf**: ``perf record -g`` of the server: kernel samples by the system call they are in
   (from the kernel call chain), user samples by shared object (libpython, uvloop, orjson,
   libc).
3. **py-spy**: ``py-spy record --native`` (mixed Python and C stacks): each user-space
   sample is "our Python" when the deepest frame that is ours or the event loop's is a
   ``rtcsignal/`` Python frame (what it calls -- orjson, libpython's objects -- counts with
   it), "event loop" when it is uvloop/libuv code (its read callback, its write path, handle
   scheduling); samples inside a system call wrapper are left to perf's kernel figure.

The breakdown: total per message from (1); the kernel's part from (2); the rest split
between the event loop and our Python with (3)'s proportions; our Python by function.

    .venv/bin/python bench/profile_pairs.py --pairs 500 --window 1,8 --seconds 5
    .venv/bin/python bench/profile_pairs.py --server-cmd "build/bench-worktrees/abc1234/.venv/bin/rtcsignal serve --port {port} --path {path} ..."

Needs ``perf`` (Debian: linux-perf) and py-spy (``.venv/bin/pip install py-spy``), run as root
(or with perf_event_paranoid <= 1 and ptrace allowed). Writes build/profile-pairs.md and
prints it; the raw profiles stay in build/profile-pairs/.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared", "bench"))
TCK = os.sysconf("SC_CLK_TCK")
SERVER = ("{repo}/.venv/bin/rtcsignal serve --port {port} --path {path} --log-level warning "
          "--rate-limit 10000000 --rate-burst 10000000")
SYSCALLS = ("read", "write", "epoll_wait", "epoll_ctl")
KERNEL_ENTRY = {"ksys_read": "read", "ksys_write": "write", "ksys_epoll_pwait": "epoll_wait",
                "ksys_epoll_wait": "epoll_wait", "ksys_epoll_ctl": "epoll_ctl",
                "exit_to_user_mode_loop": "return to user space (signals, scheduling)"}
# libc wrappers a py-spy sample sits in while the thread is in the kernel
SYSCALL_WRAPPERS = re.compile(r"^(read|write|writev|epoll_wait|epoll_pwait|epoll_ctl|__libc_\w+|"
                              r"send|recv|sendmsg|recvmsg|accept4|close|__GI___\w+) \(libc")


def log(msg: str) -> None:
    print(f"[profile {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def deliveries(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("rtcsignal_deliveries_total"):
                return int(float(line.split()[-1]))
    raise RuntimeError("no rtcsignal_deliveries_total in /metrics")


def nofile() -> None:
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_listening(p: subprocess.Popen, port: int) -> None:
    for _ in range(300):
        if p.poll() is not None:
            raise RuntimeError("server exited at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not listen")


# ---------------------------------------------------------------- the three windows

def window_cost(pid: int, port: int, seconds: float, out: str) -> dict:
    events = ",".join(["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{s}" for s in SYSCALLS])
    d0, (u0, s0), t0 = deliveries(port), cpu_ticks(pid), time.time()
    stat = subprocess.run(["perf", "stat", "-x,", "-e", events, "-p", str(pid), "-o", out, "--",
                           "sleep", str(seconds)], capture_output=True, text=True)
    d1, (u1, s1), t1 = deliveries(port), cpu_ticks(pid), time.time()
    counts = read_stat(out) if stat.returncode == 0 else {}
    msgs = d1 - d0
    return {"messages": msgs, "wall_s": t1 - t0, "user_s": (u1 - u0) / TCK, "sys_s": (s1 - s0) / TCK,
            "syscalls": counts, "msgs_per_s": msgs / (t1 - t0)}


def read_stat(path: str) -> dict:
    counts = {}
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) > 2 and parts[0].isdigit():
                name = parts[2].split(":")[-1].replace("sys_enter_", "")
                counts["all" if name == "sys_enter" else name] = int(parts[0])
    return counts


def window_perf(pid: int, seconds: float, data: str) -> dict:
    subprocess.run(["perf", "record", "-q", "-F", "1999", "-g", "-p", str(pid), "-o", data, "--",
                    "sleep", str(seconds)], capture_output=True, check=True)
    return parse_perf(data)


def parse_perf(data: str) -> dict:
    script = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,dso"],
                            capture_output=True, text=True).stdout
    kernel: collections.Counter = collections.Counter()
    user: collections.Counter = collections.Counter()
    total = 0
    for block in script.split("\n\n"):
        frames = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
        if not frames:
            continue
        total += 1
        leaf = frames[0]
        if "[kernel.kallsyms]" in leaf:
            # the frame called by do_syscall_64 names the system call (ksys_write, ...)
            call = "other (interrupts, softirq, scheduler)"
            for i, fr in enumerate(frames):
                if " do_syscall_64 " in f" {fr} " and i > 0:
                    name = frames[i - 1].split()[1] if len(frames[i - 1].split()) > 1 else "?"
                    call = KERNEL_ENTRY.get(name.replace("__x64_sys_", "ksys_"), "other system calls")
                    break
            kernel[call] += 1
        else:
            dso = leaf.rsplit("(", 1)[-1].rstrip(")")
            name = os.path.basename(dso)
            for key in ("libpython", "uvloop", "orjson", "libc", "vdso"):
                if key in name or (key == "uvloop" and "loop.cpython" in name):
                    name = key
                    break
            user[name] += 1
    return {"samples": total, "kernel": dict(kernel), "user": dict(user)}


LOOP_FRAME = re.compile(r"\((?:loop|core|linux|stream|loop-watcher|uv-common|timer|async|tcp|"
                        r"handle|idle|poll|signal|process|thread)\.c:\d+\)|\(uvloop/")


def classify_stack(frames: list[str]) -> str:
    """'syscall', 'loop', 'ours' or 'other' for one py-spy native stack (outermost frame
    first): the deepest frame that is a rtcsignal Python frame or uvloop/libuv code decides."""
    if frames and SYSCALL_WRAPPERS.match(frames[-1]):
        return "syscall"
    where = "other"
    for fr in frames:
        if "rtcsignal/" in fr and "cli.py" not in fr:
            where = "ours"
        elif LOOP_FRAME.search(fr):
            where = "loop"
    return where


def window_pyspy(pid: int, seconds: float, raw: str, py_spy: str) -> dict:
    subprocess.run([py_spy, "record", "--native", "--rate", "250", "--duration", str(int(seconds)),
                    "--format", "raw", "-o", raw, "-p", str(pid)], capture_output=True, check=True)
    kinds: collections.Counter = collections.Counter()
    ours: collections.Counter = collections.Counter()
    with open(raw) as f:
        lines = f.readlines()
    for line in lines:
        stack, _, n = line.rstrip().rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        kind = classify_stack(frames)
        kinds[kind] += int(n)
        if kind == "ours":  # by the deepest of our functions (with what it calls in C)
            mine = [f.split(" (")[0] for f in frames if "rtcsignal/" in f]
            ours[mine[-1]] += int(n)
    return {"kinds": dict(kinds), "ours": dict(ours.most_common(16))}


# ---------------------------------------------------------------- one configuration

def profile(a: argparse.Namespace, P: int, W: int, outdir: str) -> dict:
    port = free_port()
    cmd = a.server_cmd.format(repo=REPO, port=port, path="/signaling")
    log(f"P={P} W={W}: {cmd}")
    srv = subprocess.Popen(["taskset", "-c", a.server_cpu, *shlex.split(cmd)], preexec_fn=nofile,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lg = None
    try:
        wait_listening(srv, port)
        total = a.warmup + 3 * a.seconds + 6
        lg = loadgen(a, port, P, W, 0, total, stderr=subprocess.DEVNULL)
        time.sleep(a.warmup)
        base = f"{outdir}/p{P}-w{W}"
        cost = window_cost(srv.pid, port, a.seconds, base + ".stat")
        perf = window_perf(srv.pid, a.seconds, base + ".perf.data")
        spy = window_pyspy(srv.pid, a.seconds, base + ".pyspy.txt", a.py_spy)
        lg.wait(timeout=total + 60)
        lgout = json.loads(lg.stdout.read().strip().splitlines()[-1])
    finally:
        if lg is not None and lg.poll() is None:
            lg.kill()
            lg.wait()
        srv.terminate()
        try:
            srv.wait(5)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
    return {"server": "rtcsignal", "pairs": P, "window": W, "cost": cost, "perf": perf, "pyspy": spy,
            "round_trips_per_s": lgout.get("round_trips_per_s"), "lat_ms": lgout.get("lat_ms")}


def loadgen(a: argparse.Namespace, port: int, P: int, W: int, warmup: float, duration: float,
            **kw) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", a.lg_cpu, os.path.join(a.bench_bin, "wsload-pairs"),
                             "--mode", "pairs", "--dialect", "rtcsignal", "--port", str(port),
                             "--pairs", str(P), "--window", str(W), "--path", "/signaling",
                             "--duration", str(duration), "--warmup", str(warmup), "--conc", "64",
                             "--timeout", "120"], preexec_fn=nofile, stdout=subprocess.PIPE,
                            text=True, **kw)


def profile_floor(a: argparse.Namespace, P: int, W: int, outdir: str) -> dict:
    """The C floor (limit-pairs): it has no /metrics, so the cost window is one load generator
    run (its measured window, the server's CPU read at its marks) and the perf window a second."""
    port = free_port()
    srv = subprocess.Popen(["taskset", "-c", a.server_cpu, os.path.join(a.bench_bin, "limit-pairs"),
                            str(port), "/signaling"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, preexec_fn=nofile)
    base = f"{outdir}/floor-p{P}-w{W}"
    try:
        wait_listening(srv, port)
        lg = loadgen(a, port, P, W, a.warmup, a.seconds, stderr=subprocess.PIPE)
        marks = {}
        stat = None
        events = ",".join(["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{s}" for s in SYSCALLS])
        for line in lg.stderr:
            if line.startswith("#measure"):
                marks[line.split()[1]] = (time.time(), cpu_ticks(srv.pid))
                if line.split()[1] == "start":
                    stat = subprocess.Popen(["perf", "stat", "-x,", "-e", events, "-p", str(srv.pid),
                                             "-o", base + ".stat", "--", "sleep", str(a.seconds - 0.2)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = json.loads(lg.stdout.read().strip().splitlines()[-1])
        lg.wait()
        if stat is not None:
            stat.wait()
        (t0, (u0, s0)), (t1, (u1, s1)) = marks["start"], marks["end"]
        counts = read_stat(base + ".stat")
        scale = (t1 - t0) / max(a.seconds - 0.2, 0.1)  # perf stat ran slightly shorter
        cost = {"messages": out["deliveries"], "wall_s": t1 - t0, "user_s": (u1 - u0) / TCK,
                "sys_s": (s1 - s0) / TCK, "msgs_per_s": out["deliveries"] / (t1 - t0),
                "syscalls": {k: int(v * scale) for k, v in counts.items()}}
        lg = loadgen(a, port, P, W, 1, a.seconds + 2, stderr=subprocess.DEVNULL)
        time.sleep(2)
        perf = window_perf(srv.pid, a.seconds, base + ".perf.data")
        lg.wait(timeout=60)
        lg.stdout.read()
    finally:
        srv.terminate()
        srv.wait(5)
    return {"server": "limit-pairs (C floor)", "pairs": P, "window": W, "cost": cost, "perf": perf,
            "pyspy": None, "round_trips_per_s": out.get("round_trips_per_s"), "lat_ms": out.get("lat_ms")}


def report(r: dict) -> str:
    c, pf, ps = r["cost"], r["perf"], r["pyspy"]
    n = max(c["messages"], 1)
    cpu_us = (c["user_s"] + c["sys_s"]) / n * 1e6
    busy = (c["user_s"] + c["sys_s"]) / c["wall_s"]
    ks = sum(pf["kernel"].values())
    kshare = ks / max(pf["samples"], 1)
    k_us, u_us = cpu_us * kshare, cpu_us * (1 - kshare)
    kinds = ps["kinds"] if ps else {"ours": 1}
    loop_n, ours_n = kinds.get("loop", 0), kinds.get("ours", 0)
    other_n = kinds.get("other", 0)
    user_n = max(loop_n + ours_n + other_n, 1)
    lines = [f"### {r['server']}: {r['pairs']} pairs, {r['window']} in flight",
             "",
             f"{c['msgs_per_s'] / 1000:.1f}k messages/s relayed ({c['msgs_per_s'] / 2000:.1f}k round trips/s),"
             f" server at {100 * busy:.0f}% of its core: **{cpu_us:.2f} µs of server CPU per message**"
             f" (/proc: user {c['user_s'] / n * 1e6:.2f}, system {c['sys_s'] / n * 1e6:.2f});"
             f" {pf['samples']} perf samples" + (f", {sum(kinds.values())} py-spy samples." if ps else "."),
             ""]
    sc = c["syscalls"]
    if sc:
        lines.append("System calls per message: " + ", ".join(
            f"{k} {sc[k] / n:.2f}" for k in ("all", *SYSCALLS) if k in sc) + ".")
        lines.append("")
    lines += ["| share | µs per message | % of server CPU |", "| --- | --- | --- |"]
    lines.append(f"| **kernel** (perf) | **{k_us:.2f}** | **{100 * kshare:.0f}%** |")
    for call, cnt in sorted(pf["kernel"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| &nbsp;&nbsp;in {call} | {cpu_us * cnt / pf['samples']:.2f} | {100 * cnt / pf['samples']:.0f}% |")
    if ps is None:
        lines.append(f"| **user space** (perf) | **{u_us:.2f}** | **{100 * (1 - kshare):.0f}%** |")
    for label, cnt in () if ps is None else (("event loop (uvloop/libuv: callbacks, read buffers, write path, handles)", loop_n),
                       ("our Python (rtcsignal and what it calls: orjson, libpython)", ours_n),
                       ("other user space (interpreter start-up frames, unknown)", other_n)):
        us = u_us * cnt / user_n
        lines.append(f"| **{label}** (py-spy share of user time) | **{us:.2f}** | **{100 * us / cpu_us:.0f}%** |")
    user = sum(pf["user"].values())
    lines.append("")
    lines.append("User-space perf samples by shared object: " + ", ".join(
        f"{k} {100 * v / max(user, 1):.0f}%" for k, v in sorted(pf["user"].items(), key=lambda kv: -kv[1])) + ".")
    lines.append("")
    if ps is not None:
        lines.append("Our Python by function, self time with the C it calls (py-spy, % of our Python):")
        lines.append("")
        for step, cnt in ps["ours"].items():
            lines.append(f"- {step}: {100 * cnt / max(ours_n, 1):.0f}%")
        lines.append("")
    r["summary"] = {"us": cpu_us, "kernel": k_us, "loop": u_us * loop_n / user_n if ps else 0.0,
                    "ours": u_us * ours_n / user_n if ps else u_us, "busy": busy,
                    "msgs_per_s": c["msgs_per_s"]}
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    lines = ["| server, pairs, in flight | msgs/s | server CPU | µs per message | kernel | event loop "
             "| our Python (floor: its user space) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        s = r["summary"]
        lines.append(f"| {r['server']}, {r['pairs']}, {r['window']} | {s['msgs_per_s'] / 1000:.0f}k "
                     f"| {100 * s['busy']:.0f}% | {s['us']:.2f} | {s['kernel']:.2f} | {s['loop']:.2f} "
                     f"| {s['ours']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server-cmd", default=SERVER, help="{repo}, {port}, {path} are filled in")
    ap.add_argument("--pairs", default="500")
    ap.add_argument("--window", default="1,8")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--server-cpu", default="0")
    ap.add_argument("--lg-cpu", default="1")
    ap.add_argument("--bench-bin", default=os.environ.get("BENCH_BIN", os.path.join(REPO, "build", "shared-bench-bin")))
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or os.path.join(REPO, ".venv", "bin", "py-spy"))
    ap.add_argument("--floor", action="store_true",
                    help="also profile limit-pairs (../shared/bench/servers/limit_pairs.c), the C floor")
    ap.add_argument("--out", default=os.path.join(REPO, "build", "profile-pairs.md"))
    a = ap.parse_args()
    if not os.access(os.path.join(a.bench_bin, "wsload-pairs"), os.X_OK):
        subprocess.run(["sh", os.path.join(SHARED, "build.sh")], check=True,
                       env={**os.environ, "BENCH_BIN": a.bench_bin}, stdout=subprocess.DEVNULL)
    outdir = os.path.join(REPO, "build", "profile-pairs")
    os.makedirs(outdir, exist_ok=True)
    results = []
    for P in map(int, a.pairs.split(",")):
        for W in map(int, a.window.split(",")):
            results.append(profile(a, P, W, outdir))
            if a.floor:
                results.append(profile_floor(a, P, W, outdir))
    text = "\n".join(report(r) for r in results) + "\n" + summary(results)
    with open(a.out, "w") as f:
        f.write(text)
    with open(os.path.join(outdir, "results.jsonl"), "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    print(text)


if __name__ == "__main__":
    main()
