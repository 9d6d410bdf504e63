"""Issue 12: ``rtcsignal bench`` runs against a local server for a few seconds, and what it
counts (connections, messages sent and received by type, errors) is exactly what the
server's own /metrics counted."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import get


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rtcsignal", "bench", *args],
                          capture_output=True, text=True, timeout=timeout)


async def server_counts(server: Any) -> dict[str, dict[str, float]]:
    """{metric: {label value or "": value}} from /metrics, parsed by prometheus-client."""
    status, _, body = await get(server, "/metrics")
    assert status == 200
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            key = next(iter(s.labels.values()), "") if len(s.labels) <= 1 else str(s.labels)
            out.setdefault(s.name, {})[key] = s.value
    return out


async def all_gone(server: Any, n: int) -> None:
    await asyncio.to_thread(server.wait_for, lambda e: len(
        [x for x in server.lines if x.get("event") == "disconnect"]) >= n)


def check_agreement(result: dict[str, Any], counts: dict[str, dict[str, float]]) -> None:
    clients = result["clients"]
    assert counts["rtcsignal_connections_total"][""] == clients
    assert counts["rtcsignal_close_codes_total"] == {"1000": clients}
    for kind, n in result["sent"].items():
        assert counts["rtcsignal_messages_received_total"].get(kind, 0) == n, kind
    for kind, n in result["received"].items():
        assert counts["rtcsignal_messages_relayed_total"].get(kind, 0) == n, kind
    assert counts["rtcsignal_deliveries_total"][""] == sum(result["received"].values())
    assert counts.get("rtcsignal_errors_total", {}) == {}
    assert counts["rtcsignal_rate_limited_total"][""] == 0


async def test_bench_counts_agree_with_the_servers_metrics(run_server):
    server = run_server("--log-level", "info")
    run = await asyncio.to_thread(bench, server.url(), "--clients", "12", "--rooms", "4",
                                  "--rate", "150", "--duration", "3", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout)
    assert result["connected"] == 12 and result["connect_failures"] == {}
    assert result["errors"] == {} and result["lost"] == 0 and result["dropped"] == 0
    sent = result["sent"]
    assert sent["offer"] == sent["answer"] > 0
    assert sent["ice-candidate"] == 4 * (sent["offer"] + sent["answer"])
    assert result["received"] == sent
    assert 0.8 * 150 * 3 <= sum(sent.values()) <= 1.2 * 150 * 3 + 10, sent  # the rate held
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"] * 1.02 < 1000, lat
    assert "connecting" in run.stderr  # the progress line
    await all_gone(server, 12)
    check_agreement(result, await server_counts(server))


async def test_bench_as_fast_as_delivered_over_two_processes(run_server):
    server = run_server("--log-level", "info", "--rate-limit", "100000",
                        "--rate-burst", "100000", "--rate-limit-bytes", "1024m",
                        "--rate-burst-bytes", "1024m")
    run = await asyncio.to_thread(bench, server.url(), "--clients", "20", "--rooms", "6",
                                  "--rate", "0", "--duration", "2", "--processes", "2",
                                  "--candidates", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    text = run.stdout
    assert "20 clients in 6 rooms, 2 candidates a side, 2 process(es)" in text
    assert "connected   20/20" in text and "(0 lost)" in text and "errors      0" in text
    for word in ("throughput", "p50", "p99", "max", "bench CPU"):
        assert word in text, word
    await all_gone(server, 20)
    counts = await server_counts(server)
    assert counts["rtcsignal_connections_total"][""] == 20
    received = counts["rtcsignal_messages_received_total"]
    assert received["offer"] == received["answer"] > 50  # as fast as delivered: many
    assert received["ice-candidate"] == 2 * (received["offer"] + received["answer"])
    assert counts["rtcsignal_deliveries_total"][""] == sum(received.values())


async def test_bench_reports_refused_connections(run_server):
    server = run_server("--allowed-origins", "https://app.example")
    run = await asyncio.to_thread(bench, server.url(), "--clients", "4", "--rooms", "2",
                                  "--duration", "1", "--origin", "https://evil.example",
                                  "--json", "--quiet")
    assert run.returncode == 1, run.stdout + run.stderr
    result = json.loads(run.stdout)
    assert result["connected"] == 0
    assert result["connect_failures"] == {"HTTP 403 Forbidden": 4}
    assert run.stderr == ""


def test_bench_refuses_bad_arguments():
    for args in (["ftp://x/signaling"], ["ws://127.0.0.1:1/s", "--clients", "1"],
                 ["ws://127.0.0.1:1/s", "--duration", "0"]):
        run = bench(*args)
        assert run.returncode == 2 and run.stdout == "", run
        assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith("rtcsignal: bench:")
