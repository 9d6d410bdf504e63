#!/usr/bin/env python3
"""Medians over repetitions, ratios rtcsignal / node, a markdown table and a PNG chart.

    python bench/summarize.py bench/results/results.jsonl [more.jsonl ...] \\
        [--md out.md] [--chart docs/bench-fanout-latency.png]

Each figure is the median over the runs of that configuration; the range (min-max) is shown
beside it. "ratio" is rtcsignal's median divided by node's median; the target column says which
way is better and whether the ratio meets it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
SUBJECT, ANCHOR = "rtcsignal", "node"
X, DASH = "\u00d7", "\u2013"  # multiplication sign, en dash

# (label, scenario, n, payload, metric path, unit, target: (">=" or "<=", ratio) or None)
FIGURES = [
    ("fan-out, 100 receivers, ICE ~200 B", "fanout", 100, "ice", "deliveries_per_s",
     "deliveries/s", (">=", 20)),
    ("fan-out, 1000 receivers, ICE ~200 B", "fanout", 1000, "ice", "deliveries_per_s",
     "deliveries/s", (">=", 20)),
    ("fan-out, 100 receivers, SDP ~4 KB", "fanout", 100, "sdp", "deliveries_per_s",
     "deliveries/s", (">=", 4)),
    ("fan-out, 1000 receivers, SDP ~4 KB", "fanout", 1000, "sdp", "deliveries_per_s",
     "deliveries/s", (">=", 4)),
    ("latency p99, 2 clients", "latency", 2, "ice", "lat_ms.p99", "ms", ("<=", 1.0)),
    ("latency p99, 100 clients", "latency", 100, "ice", "lat_ms.p99", "ms", ("<=", 1.0)),
    ("latency p99, 1000 clients", "latency", 1000, "ice", "lat_ms.p99", "ms", ("<=", 0.75)),
    ("memory per idle connection, 10k clients", "memory", 10000, None, "kib_per_conn_10000",
     "KiB", ("<=", 1.0)),
    ("connection storm, 5000 conns, 64 in flight", "storm", 5000, None, "conns_per_s",
     "conns/s", (">=", 2.0)),
    ("idle CPU, 1000 clients", "idle", 1000, None, "idle_cpu_pct", "% of a core", ("<=", 1.0)),
    ("rooms of 2, 1000 peers: throughput", "rooms", 1000, "ice", "deliveries_per_s",
     "deliveries/s", None),
    ("rooms of 2, 1000 peers: per server core", "rooms", 1000, "ice", "deliveries_per_core_s",
     "deliveries/core-s", None),
    ("rooms of 2, 1000 peers: latency p99", "rooms", 1000, "ice", "lat_ms.p99", "ms", None),
    ("rooms of 2, 10000 peers: throughput", "rooms", 10000, "ice", "deliveries_per_s",
     "deliveries/s", None),
    ("rooms of 2, 10000 peers: per server core", "rooms", 10000, "ice", "deliveries_per_core_s",
     "deliveries/core-s", None),
    ("rooms of 2, 10000 peers: latency p99", "rooms", 10000, "ice", "lat_ms.p99", "ms", None),
]

# secondary figures: printed in a second table, no targets
EXTRA = [
    ("fan-out, 100 receivers, ICE: per server core", "fanout", 100, "ice",
     "deliveries_per_core_s", "deliveries/core-s"),
    ("fan-out, 1000 receivers, ICE: per server core", "fanout", 1000, "ice",
     "deliveries_per_core_s", "deliveries/core-s"),
    ("fan-out, 100 receivers, SDP: per server core", "fanout", 100, "sdp",
     "deliveries_per_core_s", "deliveries/core-s"),
    ("fan-out, 1000 receivers, SDP: per server core", "fanout", 1000, "sdp",
     "deliveries_per_core_s", "deliveries/core-s"),
    ("connection storm: per server core", "storm", 5000, None, "conns_per_core_s",
     "conns/core-s"),
    ("latency p50, 2 clients", "latency", 2, "ice", "lat_ms.p50", "ms"),
    ("latency p50, 100 clients", "latency", 100, "ice", "lat_ms.p50", "ms"),
    ("latency p50, 1000 clients", "latency", 1000, "ice", "lat_ms.p50", "ms"),
    ("latency max, 1000 clients", "latency", 1000, "ice", "lat_ms.max", "ms"),
    ("memory per idle connection, 1k clients", "memory", 10000, None, "kib_per_conn_1000", "KiB"),
    ("memory per idle connection, 5k clients", "memory", 10000, None, "kib_per_conn_5000", "KiB"),
    ("server RSS with 10k idle clients", "memory", 10000, None, "rss_10000_mib", "MiB"),
    ("server RSS with no clients", "memory", 10000, None, "rss0_mib", "MiB"),
]


def get(r: dict, path: str):
    for k in path.split("."):
        if not isinstance(r, dict) or k not in r:
            return None
        r = r[k]
    return r


def load(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        with open(p) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "server" in r]


def usable(r: dict) -> bool:
    return "error" not in r and not r.get("server_died") and not r.get("stalled")


def index(rows: list[dict]) -> dict:
    by = defaultdict(list)
    for r in rows:
        if usable(r):
            by[(r["server"], r["scenario"], r.get("n"), r.get("payload"))].append(r)
    return by


def values(by, server, sc, n, payload, metric) -> list[float]:
    return [v for r in by.get((server, sc, n, payload), []) if (v := get(r, metric)) is not None]


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    ax = abs(x)
    if ax >= 1e6:
        return f"{x / 1e6:.2f} M"
    if ax >= 1e4:
        return f"{x / 1e3:.0f} k"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if ax >= 0.1 else f"{x:.3f}"


def cell(v: list[float], unit: str) -> str:
    if not v:
        return "-"
    med = statistics.median(v)
    rng = f" ({fmt(min(v))}{DASH}{fmt(max(v))}, {len(v)} runs)" if len(v) > 1 else " (1 run)"
    return f"**{fmt(med)}** {unit}{rng}"


def figure_rows(by) -> list[dict]:
    out = []
    for label, sc, n, payload, metric, unit, target in FIGURES:
        a = values(by, ANCHOR, sc, n, payload, metric)
        s = values(by, SUBJECT, sc, n, payload, metric)
        ratio = statistics.median(s) / statistics.median(a) if a and s and statistics.median(a) else None
        met = None
        if target and ratio is not None:
            met = ratio >= target[1] if target[0] == ">=" else ratio <= target[1]
        out.append({"label": label, "unit": unit, "anchor": a, "subject": s, "ratio": ratio,
                    "target": target, "met": met, "scenario": sc, "n": n})
    return out


def markdown(rows: list[dict], by) -> str:
    figs = figure_rows(by)
    lines = [f"| figure | Node `ws` original | {SUBJECT} | ratio {SUBJECT}/node | target | met? |",
             "|---|---|---|---|---|---|"]
    for f in figs:
        ratio = f"**{f['ratio']:.2f}{X}**" if f["ratio"] is not None else "-"
        if f["target"]:
            better = "higher is better" if f["target"][0] == ">=" else "lower is better"
            tgt = f"{f['target'][0].replace('>=', '≥').replace('<=', '≤')} {f['target'][1]}{X} ({better})"
        else:
            tgt = "n/a (node has no rooms)" if f["scenario"] == "rooms" else "-"
        met = {True: "met", False: "**not met**", None: "-"}[f["met"]]
        anchor = "no rooms" if f["scenario"] == "rooms" and not f["anchor"] else cell(
            f["anchor"], f["unit"])
        lines.append(f"| {f['label']} | {anchor} | {cell(f['subject'], f['unit'])} | {ratio} | "
                     f"{tgt} | {met} |")
    lines += ["", "Secondary figures (no targets):", "",
              f"| figure | Node `ws` original | {SUBJECT} | ratio |", "|---|---|---|---|"]
    for label, sc, n, payload, metric, unit in EXTRA:
        a = values(by, ANCHOR, sc, n, payload, metric)
        s = values(by, SUBJECT, sc, n, payload, metric)
        ratio = f"{statistics.median(s) / statistics.median(a):.2f}{X}" if a and s and \
            statistics.median(a) else "-"
        lines.append(f"| {label} | {cell(a, unit)} | {cell(s, unit)} | {ratio} |")
    lines += ["", headroom(rows), "", failures(rows)]
    return "\n".join(lines).rstrip() + "\n"


def headroom(rows: list[dict]) -> str:
    """The load generator's own CPU per configuration: if it stays well below 100% of its core
    while the server is busy, the figure is the server's, not the generator's."""
    groups = defaultdict(list)
    for r in rows:
        if usable(r) and r["scenario"] in ("fanout", "latency", "rooms", "storm"):
            groups[(r["scenario"], r.get("n"), r.get("payload") or "", r["server"])].append(r)
    lines = ["Load generator vs server CPU (medians; load generator on CPU 1, server on CPU 0; "
             "\"other\" = CPU 0 time taken by processes other than the server):", "",
             "| scenario | n | payload | server | figure | server CPU % | load generator CPU % (max) "
             "| other work on CPU 0 % |", "|---|---|---|---|---|---|---|---|"]
    for (sc, n, pl, srv), rs in sorted(groups.items()):
        key = {"storm": "conns_per_s", "latency": "lat_ms.p99"}.get(sc, "deliveries_per_s")
        unit = {"storm": "conns/s", "latency": "ms p99"}.get(sc, "deliveries/s")
        fig = statistics.median(v for r in rs if (v := get(r, key)) is not None)
        cpu = statistics.median(r.get("srv_cpu_pct", r.get("srv_cpu_pct_run", 0)) for r in rs)
        lg = statistics.median(r.get("lg_cpu_pct", 0) for r in rs)
        lgmax = max(r.get("lg_cpu_pct", 0) for r in rs)
        other = [r["server_cpu_other_pct"] for r in rs if "server_cpu_other_pct" in r]
        oth = f"{statistics.median(other):.0f}" if other else "-"
        lines.append(f"| {sc} | {n} | {pl} | {srv} | {fmt(fig)} {unit} | {cpu:.0f} | "
                     f"{lg:.0f} ({lgmax:.0f}) | {oth} |")
    return "\n".join(lines)


def failures(rows: list[dict]) -> str:
    bad = [r for r in rows if not usable(r)]
    if not bad:
        return f"All {len(rows)} runs completed (no errors, stalls or server exits)."
    lines = [f"{len(bad)} of {len(rows)} runs were discarded:", ""]
    for r in bad:
        why = r.get("error") or ("server died" if r.get("server_died") else "stalled")
        lines.append(f"- {r['server']} {r['scenario']} n={r.get('n')} {r.get('payload', '')} "
                     f"rep {r.get('rep')}: {str(why)[:300]}")
    return "\n".join(lines)


def chart(by, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {SUBJECT: "tab:blue", ANCHOR: "tab:orange"}
    names = {SUBJECT: "rtcsignal", ANCHOR: "Node ws original"}
    for srv in (SUBJECT, ANCHOR):
        for payload, style in (("ice", "-o"), ("sdp", "--s")):
            ns = sorted({k[2] for k in by if k[0] == srv and k[1] == "fanout" and k[3] == payload})
            pts = [(n, values(by, srv, "fanout", n, payload, "deliveries_per_s")) for n in ns]
            pts = [(n, v) for n, v in pts if v]
            if not pts:
                continue
            xs = [n for n, _ in pts]
            med = [statistics.median(v) for _, v in pts]
            err = [[m - min(v) for m, (_, v) in zip(med, pts, strict=True)],
                   [max(v) - m for m, (_, v) in zip(med, pts, strict=True)]]
            ax1.errorbar(xs, med, yerr=err, fmt=style, color=colors[srv], capsize=3,
                         label=f"{names[srv]}, {payload.upper()}")
        ns = sorted({k[2] for k in by if k[0] == srv and k[1] == "latency"})
        pts = [(n, values(by, srv, "latency", n, "ice", "lat_ms.p99")) for n in ns]
        pts = [(n, v) for n, v in pts if v]
        if pts:
            xs = [n for n, _ in pts]
            med = [statistics.median(v) for _, v in pts]
            err = [[m - min(v) for m, (_, v) in zip(med, pts, strict=True)],
                   [max(v) - m for m, (_, v) in zip(med, pts, strict=True)]]
            ax2.errorbar(xs, med, yerr=err, fmt="-o", color=colors[srv], capsize=3,
                         label=names[srv])
    ax1.set(xscale="log", yscale="log", xlabel="receivers", ylabel=f"deliveries/s (median, min{DASH}max)",
            title="Fan-out at saturation (higher is better)")
    ax2.set(xscale="log", yscale="log", xlabel="clients in the room", ylabel=f"p99 latency, ms (median, min{DASH}max)",
            title="Relay latency p99 at 20 msg/s (lower is better)")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    lo, hi = ax2.get_ylim()
    ax2.set_yticks([t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
                    if lo <= t <= hi])
    ax2.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", default=[os.path.join(HERE, "results", "results.jsonl")])
    ap.add_argument("--md", help="write the markdown here instead of stdout")
    ap.add_argument("--chart", default=os.path.join(HERE, "..", "docs", "bench-fanout-latency.png"),
                    help="PNG path ('' to skip)")
    a = ap.parse_args()
    rows = load(a.files)
    by = index(rows)
    md = markdown(rows, by)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    else:
        print(md)
    if a.chart:
        chart(by, a.chart)


if __name__ == "__main__":
    main()
