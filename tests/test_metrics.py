"""Issue 12: /metrics. Every metric docs/operations.md lists is on the page after a short
scripted session on two instances sharing Redis, the whole page parses with
prometheus-client's parser, the recommended alert rules and the Grafana dashboard name only
documented metrics (and chart every one), and with ``--workers`` one scrape shows every
worker."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import close_all, get, http_request, open_client, recv_json, send_json

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
SUFFIXES = ("_bucket", "_sum", "_count")


def documented() -> set[str]:
    """The metrics in the table of docs/operations.md's Metrics section."""
    section = OPERATIONS.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `rtcsignal_")]
    names = {n for row in rows for n in re.findall(r"`(rtcsignal_\w+)`", row.split("|")[1])}
    assert len(names) >= 30, names
    return names


def base_name(sample: str) -> str:
    for suffix in SUFFIXES:
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


def alert_rules() -> list[dict[str, Any]]:
    block = OPERATIONS.split("### Recommended alerts", 1)[1].split("```yaml\n", 1)[1]
    rules = yaml.safe_load(block.split("```", 1)[0])
    return [r for group in rules["groups"] for r in group["rules"]]


def names_in(expr: str) -> set[str]:
    return {base_name(n) for n in re.findall(r"\brtcsignal_\w+", expr)}


async def scrape(where: Any) -> tuple[dict[str, list[Any]], str]:
    """{sample name: [samples]} of ``where``'s /metrics, parsed by prometheus-client."""
    status, headers, body = await get(where, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):  # raises on anything malformed
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples, text


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, ()) if labels.items() <= s.labels.items()]
    assert found, (name, labels, samples.get(name))
    return sum(found)


async def expect(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        msg = await recv_json(ws)
        if msg["type"] == kind:
            return msg


async def test_every_documented_metric_is_on_the_page_after_a_session(make_cluster):
    cluster = make_cluster(2, "--admin-token", "sesame-" + "x" * 20)
    one, two = cluster.instance(0), cluster.instance(1)
    a, ga = await open_client(one.url("room=m"))
    await expect(a, "joined")
    b, gb = await open_client(one.url("room=m"))
    await expect(b, "joined")
    c, gc = await open_client(two.url("room=m"))
    await expect(c, "joined")
    for ws in (a, b):
        await expect(ws, "peer-joined")
    await expect(a, "peer-joined")

    # Offer/answer/candidates, here and across instances; 70 reads in a row with a local
    # write each, so at least two are timed (one read in 32).
    for i in range(70):
        await send_json(a, {"type": "ice-candidate", "to": gb["peerId"], "i": i})
        await expect(b, "ice-candidate")
    for i in range(20):
        await send_json(a, {"type": "offer", "to": gc["peerId"], "i": i})
        await expect(c, "offer")
    await send_json(c, {"type": "answer", "to": ga["peerId"]})
    await expect(a, "answer")
    await send_json(b, {"type": "chat"})  # the room: a here, c on the other instance
    await expect(a, "chat")
    await expect(c, "chat")
    await a.send("not json")
    assert (await expect(a, "error"))["code"] == "invalid-json"
    await b.send("".join(f'{{"type":"ping","id":{i}}}' for i in range(1)))
    for i in range(230):  # over --rate-burst (200) at once
        await b.send(f'{{"type":"ping","id":{i}}}')
    codes = [(await recv_json(b)).get("code") for _ in range(231)]
    assert "rate-limited" in codes
    # Refused before the upgrade: 426 (no upgrade), 404.
    status, _, _ = await get(one, "/signaling")
    assert status == 426
    assert (await get(one, "/nowhere"))[0] == 404
    # A drop (1006), a resume, a resume with a token nobody has, a clean close (1000).
    d, gd = await open_client(one.url())
    d.transport.abort()
    await asyncio.to_thread(one.wait_for, lambda e: e.get("event") == "disconnect"
                            and e.get("peer") == gd["peerId"] and e.get("parked"))
    d, again = await open_client(one.url(f"resume={gd['resumeToken']}"))
    assert again["resumed"] and again["peerId"] == gd["peerId"]
    e, fresh = await open_client(one.url("resume=nobody-has-this-token"))
    assert not fresh["resumed"]
    await close_all([d, e])
    # A wrong admin token (the admin API's own failures count too).
    assert (await http_request(one.host, one.port, "/admin/stats",
                               headers={"Authorization": "Bearer wrong"}))[0] == 401

    samples, _ = await scrape(one)
    on_page = {base_name(n) for n in samples}
    missing = sorted(documented() - {"rtcsignal_worker_up"} - on_page)
    assert not missing, missing
    undocumented = sorted(on_page - documented())
    assert not undocumented, undocumented

    # The session's figures, as counted by instance one.
    assert value(samples, "rtcsignal_connections_open") == 2
    assert value(samples, "rtcsignal_connections_total") == 5
    assert value(samples, "rtcsignal_messages_relayed_total", type="ice-candidate") == 70
    assert value(samples, "rtcsignal_messages_relayed_total", type="offer") == 20
    assert value(samples, "rtcsignal_errors_total", code="invalid-json") == 1
    assert value(samples, "rtcsignal_rate_limited_total") >= 1
    assert value(samples, "rtcsignal_rejected_total", status="426",
                 reason="this endpoint speaks WebSocket") == 1
    assert value(samples, "rtcsignal_rejected_total", status="404") == 1
    assert value(samples, "rtcsignal_close_codes_total", code="1006") == 1
    assert value(samples, "rtcsignal_close_codes_total", code="1000") == 2
    assert value(samples, "rtcsignal_resumes_total", outcome="resumed") == 1
    assert value(samples, "rtcsignal_resumes_total", outcome="fresh") == 1
    assert value(samples, "rtcsignal_auth_failures_total", kind="resume") == 1
    assert value(samples, "rtcsignal_auth_failures_total", kind="admin") == 1
    assert value(samples, "rtcsignal_rooms_open") == 1
    assert value(samples, "rtcsignal_room_peers_bucket", le="1.0") == 0
    assert value(samples, "rtcsignal_room_peers_bucket", le="2.0") == 1
    assert value(samples, "rtcsignal_room_peers_count") == 1
    assert value(samples, "rtcsignal_relay_latency_seconds_count") >= 2
    assert value(samples, "rtcsignal_relay_latency_seconds_bucket", le="+Inf") == value(
        samples, "rtcsignal_relay_latency_seconds_count")
    assert value(samples, "rtcsignal_broker_ready") == 1
    assert value(samples, "rtcsignal_broker_latency_seconds_count") >= 1
    assert value(samples, "rtcsignal_connections_max") == 20000
    other, _ = await scrape(two)
    assert value(other, "rtcsignal_broker_received_total") >= 20  # the offers to c
    await close_all([a, b, c])


def test_alert_rules_and_dashboard_name_only_documented_metrics():
    docs = documented()
    rules = alert_rules()
    assert len(rules) >= 8
    for rule in rules:
        assert rule["alert"].startswith("Rtcsignal") and rule["expr"]
        assert names_in(rule["expr"]) <= docs, (rule["alert"], names_in(rule["expr"]) - docs)
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    charted: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            found = names_in(target["expr"])
            assert found <= docs, (panel["title"], found - docs)
            charted |= found
    assert docs - charted == set(), sorted(docs - charted)


async def test_one_scrape_shows_every_worker(run_server):
    server = run_server("--workers", "2", "--broker", "redis://127.0.0.1:1/0")
    await asyncio.to_thread(server.wait_for, lambda e: e.get("event") == "listening"
                            and "workers" in e, 15)
    clients = [await open_client(server.url()) for _ in range(12)]
    pids = set()
    for _, greeting in clients:
        line = await asyncio.to_thread(server.wait_for, lambda e, p=greeting["peerId"]:
                                       e.get("event") == "connect" and e.get("peer") == p)
        pids.add(line["worker"])
    assert pids == {0, 1}  # both workers have clients
    for _ in range(6):  # whichever worker gets the scrape, it shows both
        samples, _ = await scrape(server)
        up = {s.labels["worker"]: s.value for s in samples["rtcsignal_worker_up"]}
        assert up == {"0": 1, "1": 1}, up
        opened = {s.labels["worker"]: s.value for s in samples["rtcsignal_connections_open"]}
        assert set(opened) == {"0", "1"} and sum(opened.values()) == 12, opened
        assert all(min(v) > 0 for v in [list(opened.values())])
        totals = samples["rtcsignal_connections_total"]
        assert sum(s.value for s in totals) == 12
        assert all("worker" in s.labels for ss in samples.values() for s in ss)
    await close_all([ws for ws, _ in clients])


def test_the_server_does_not_import_prometheus_client():
    """prometheus-client is a test dependency only: the page is rendered by our own code."""
    import subprocess
    import sys

    code = ("import sys, rtcsignal.cli, rtcsignal.server.service, rtcsignal.server.scrape; "
            "print('prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
