"""Several instances on one real Redis: what peers on different instances see, and the
failures a deployment meets (an instance SIGKILLed, Redis restarted, a subscriber killed,
twenty restarts, a burst of large messages). Every fault test counts what was sent,
delivered and refused, and asserts the sums: nothing is lost silently."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from websockets.asyncio.client import ClientConnection

from tests.helpers import http_request, open_client, recv_json, send_json

TIMEOUT = 5.0


async def member(url: str, room: str, **kw: Any) -> tuple[ClientConnection, str, list[Any]]:
    """A client joined to ``room`` through ``url``: (ws, its peer id, its joined snapshot)."""
    ws, greeting = await open_client(f"{url}?room={room}", **kw)
    joined = await recv_json(ws)
    assert joined["type"] == "joined", joined
    return ws, greeting["peerId"], joined["peers"]


async def expect(ws: ClientConnection, kind: str, timeout: float = TIMEOUT,
                 skip: tuple[str, ...] = ()) -> dict[str, Any]:
    while True:
        msg = await recv_json(ws, timeout)
        if msg.get("type") in skip:
            continue
        assert msg.get("type") == kind, (kind, msg)
        return msg


async def readyz(server: Any) -> tuple[int, bytes]:
    status, _, body = await http_request(server.host, server.port, "/readyz")
    return status, body


async def wait_ready(servers: list[Any], within: float) -> float:
    """Seconds until every instance's /readyz says 200; fails after ``within``."""
    start = time.monotonic()
    while True:
        codes = [(await readyz(s))[0] for s in servers]
        if all(c == 200 for c in codes):
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"not ready within {within} s: {codes}"
        await asyncio.sleep(0.05)  # polls an HTTP status: there is no event to await


async def test_peers_on_different_instances_behave_as_on_one(make_cluster, redis_server):
    cluster = make_cluster(3)
    a, a_id, snap = await member(cluster.urls[0], "r")
    assert snap == []
    b, b_id, snap = await member(cluster.urls[1], "r")
    assert snap == [{"peerId": a_id, "meta": {}, "polite": True}]
    seen = await expect(a, "peer-joined")
    assert seen["peerId"] == b_id and seen["polite"] is False
    c, c_id, snap = await member(cluster.urls[2], "r")
    assert [p["peerId"] for p in snap] == [a_id, b_id]  # join order across instances
    # Redis 7: the room's channel is a shard channel (SSUBSCRIBE), not a classic one.
    shard = redis_server.execute("PUBSUB", "SHARDCHANNELS", f"{cluster.prefix}:r:*")
    classic = redis_server.execute("PUBSUB", "CHANNELS", f"{cluster.prefix}:*")
    assert [c.decode() if isinstance(c, bytes) else c for c in shard] == [f"{cluster.prefix}:r:r"]
    assert list(classic) == [], classic
    for ws in (a, b):
        assert (await expect(ws, "peer-joined"))["peerId"] == c_id
    # Room broadcast reaches the members of both other instances, in order per sender.
    for n in range(20):
        await send_json(a, {"type": "offer", "n": n})
    for ws in (b, c):
        got = [await expect(ws, "offer") for _ in range(20)]
        assert [m["n"] for m in got] == list(range(20))
        assert all(m["from"] == a_id for m in got)
    # `to` a peer of another instance; `to` a stranger is unknown-peer, decided remotely.
    await send_json(b, {"type": "answer", "to": a_id, "id": 1})
    assert (await expect(a, "answer"))["from"] == b_id
    stranger, s_greeting = await open_client(cluster.urls[0] + "?room=elsewhere")
    await expect(stranger, "joined")
    await send_json(b, {"type": "answer", "to": s_greeting["peerId"], "id": "x"})
    err = await expect(b, "error")
    assert err["code"] == "unknown-peer" and err["ref"] == "x", err
    # A leave on one instance is seen on the others.
    await c.close()
    for ws in (a, b):
        left = await expect(ws, "peer-left")
        assert left["peerId"] == c_id and left["reason"] == "closed", left
    # clientsCount counts every instance (refreshed every second).
    deadline = time.monotonic() + 5
    while True:
        probe, greeting = await open_client(cluster.urls[2])
        await probe.close()
        if greeting["clientsCount"] == 4:  # a, b, the stranger and the probe itself
            break
        assert time.monotonic() < deadline, greeting
        await asyncio.sleep(0.2)  # the count is refreshed on a timer, not an event
    for ws in (a, b, stranger):
        await ws.close()


async def test_default_room_spans_instances(make_cluster):
    cluster = make_cluster(2)
    a, ga = await open_client(cluster.urls[0])
    b, gb = await open_client(cluster.urls[1])
    await send_json(a, {"type": "hello", "n": 1})
    got = await expect(b, "hello")
    assert got["from"] == ga["peerId"]
    await send_json(b, {"type": "direct", "to": ga["peerId"]})
    assert (await expect(a, "direct"))["from"] == gb["peerId"]
    await a.close()
    await b.close()


async def test_sigkill_of_one_instance_announces_each_lost_peer_once(make_cluster):
    """Two members on each of three instances; instance 2 is SIGKILLed. Within
    --presence-ttl every surviving member gets exactly one peer-left (timeout) per lost
    peer, and a later joiner's snapshot holds no ghost. (Resume off: with it, the
    peer-left waits for the resume window too; tests/test_resume.py.)"""
    ttl = 2.0
    cluster = make_cluster(3, "--presence-ttl", str(ttl), "--resume-window", "0")
    members: list[tuple[ClientConnection, str, int]] = []
    for i in (0, 1, 2, 0, 1, 2):
        ws, pid, _ = await member(cluster.urls[i], "crash")
        members.append((ws, pid, i))
        for other, _, _ in members[:-1]:
            await expect(other, "peer-joined")
    lost = {pid for _, pid, i in members if i == 2}
    survivors = [(ws, pid) for ws, pid, i in members if i != 2]
    start = time.monotonic()
    cluster.kill(2)
    for ws, _ in survivors:
        left = []
        while len(left) < len(lost):
            msg = await expect(ws, "peer-left", timeout=ttl * 3)
            left.append(msg)
        assert sorted(m["peerId"] for m in left) == sorted(lost), left
        assert all(m["reason"] == "timeout" for m in left), left
    assert time.monotonic() - start < ttl * 3
    # A marker through the room: nothing else (no duplicate peer-left) came before it.
    sender, sender_id = survivors[0]
    await send_json(sender, {"type": "marker"})
    for ws, _ in survivors[1:]:
        msg = await recv_json(ws)
        assert msg == {"from": sender_id, "type": "marker"}, msg
    late, _, snap = await member(cluster.urls[0], "crash")
    assert {p["peerId"] for p in snap} == {pid for _, pid in survivors}
    for ws, _ in (*survivors, (late, "")):
        await ws.close()


async def test_redis_restart_refuses_then_recovers(make_cluster, redis_server):
    """While Redis is down every message that needs the other instance is refused with
    broker-unavailable (its ref), none is lost silently, /readyz is 503 with a reason;
    after the restart delivery and readiness are back within 5 s."""
    cluster = make_cluster(2)
    a, a_id, _ = await member(cluster.urls[0], "outage")
    b, b_id, _ = await member(cluster.urls[1], "outage")
    await expect(a, "peer-joined")
    redis_server.stop()
    sent, refused = 0, set()
    for n in range(5):
        await send_json(a, {"type": "offer", "id": n})
        sent += 1
    delivered = set()
    while len(refused) + len(delivered) < sent:
        msg = await recv_json(a)
        assert msg["type"] == "error" and msg["code"] == "broker-unavailable", msg
        refused.add(msg["ref"])
    status, body = await readyz(cluster.instance(0))
    assert status == 503 and b"broker" in body, body
    redis_server.start()
    took = await wait_ready([cluster.instance(0), cluster.instance(1)], within=5.0)
    await send_json(a, {"type": "offer", "id": "after"})
    got = await expect(b, "offer")
    assert got["id"] == "after" and got["from"] == a_id
    await send_json(b, {"type": "answer", "to": a_id})
    assert (await expect(a, "answer"))["from"] == b_id
    assert refused == set(range(sent)), (refused, delivered)  # sent = refused + delivered
    assert took < 5.0
    # One log line for the outage, whatever else failed meanwhile, and one when it ended.
    inst = cluster.instance(0)
    down = await asyncio.to_thread(inst.wait_for, lambda e: e.get("event") == "broker unready")
    after = inst.lines.index(down)
    back = await asyncio.to_thread(inst.wait_for, lambda e: e.get("event") == "broker ready"
                                   and inst.lines.index(e) > after)
    lines = inst.lines[after: inst.lines.index(back)]
    assert sum(e.get("event") == "broker unready" for e in lines) == 1, lines
    await a.close()
    await b.close()


async def test_killed_subscriber_is_noticed_and_rebuilt(make_cluster, redis_server):
    """CLIENT KILL TYPE pubsub: the instances' probes notice within seconds, rebuild their
    subscriptions, and delivery flows again within 10 s; every message sent meanwhile was
    delivered or refused (broker-unavailable), none lost."""
    cluster = make_cluster(2)
    a, _, _ = await member(cluster.urls[0], "deaf")
    b, _, _ = await member(cluster.urls[1], "deaf")
    await expect(a, "peer-joined")
    killed = redis_server.client_kill_pubsub()
    assert killed >= 2
    start = time.monotonic()
    sent: list[int] = []
    refused: set[int] = set()
    delivered: set[int] = set()

    async def read_b() -> None:
        while True:
            msg = await recv_json(b, 15)
            if msg["type"] == "offer":
                delivered.add(msg["n"])

    async def read_a() -> None:
        while True:
            msg = await recv_json(a, 15)
            if msg.get("code") == "broker-unavailable":
                refused.add(msg["ref"])

    readers = [asyncio.ensure_future(read_b()), asyncio.ensure_future(read_a())]
    try:
        n = 0
        while not delivered or time.monotonic() - start < 1:
            assert time.monotonic() - start < 10, "delivery not back within 10 s"
            await send_json(a, {"type": "offer", "n": n, "id": n})
            sent.append(n)
            n += 1
            await asyncio.sleep(0.1)  # paces the probe messages
        recovered = time.monotonic() - start
        deadline = time.monotonic() + 5
        while len(delivered | refused) < len(sent):  # every message answered one way
            assert time.monotonic() < deadline, (len(sent), len(delivered), len(refused))
            await asyncio.sleep(0.05)
    finally:
        for r in readers:
            r.cancel()
    assert delivered | refused == set(sent)
    assert recovered < 10
    await a.close()
    await b.close()


async def test_twenty_redis_restarts_leak_no_connections(make_cluster, redis_server):
    cluster = make_cluster(2)
    a, _, _ = await member(cluster.urls[0], "leak")
    b, _, _ = await member(cluster.urls[1], "leak")
    await expect(a, "peer-joined")
    await wait_ready([cluster.instance(0), cluster.instance(1)], within=5.0)

    def ours() -> dict[str, int]:
        return {k: v for k, v in redis_server.client_counts("name").items()
                if k.startswith(f"rtcsignal:{cluster.prefix}:")}

    before = ours()
    assert len(before) == 2, before
    for _ in range(20):
        redis_server.restart()
        await wait_ready([cluster.instance(0), cluster.instance(1)], within=5.0)
    after = ours()
    assert after == before, (before, after)
    await send_json(a, {"type": "offer", "n": "last"})
    assert (await expect(b, "offer"))["n"] == "last"
    await a.close()
    await b.close()


async def test_burst_of_maximum_size_messages_across_instances(make_cluster, redis_server):
    """100 messages of 60 KB from one instance's member to another's: all arrive in order,
    no subscriber is dropped (the instances stay ready throughout)."""
    flags = ("--rate-limit", "1000000", "--rate-burst", "1000000",
             "--rate-limit-bytes", "1024m", "--rate-burst-bytes", "1024m")
    cluster = make_cluster(2, *flags)
    a, _, _ = await member(cluster.urls[0], "burst")
    b, _, _ = await member(cluster.urls[1], "burst")
    await expect(a, "peer-joined")
    pad = "p" * 60_000
    for n in range(100):
        await send_json(a, {"type": "bulk", "n": n, "pad": pad})
    got = [await expect(b, "bulk", timeout=15) for _ in range(100)]
    assert [m["n"] for m in got] == list(range(100))
    for s in (cluster.instance(0), cluster.instance(1)):
        status, body = await readyz(s)
        assert status == 200, body
    with contextlib.suppress(Exception):
        await a.close()
        await b.close()


async def test_worker_sigkilled_under_workers_2_is_restarted_and_its_peers_announced(
        run_server, redis_server, broker_prefix):
    """--workers 2 on Redis: members of one room on both workers; SIGKILL one worker. The
    supervisor restarts it; every member on the other worker gets exactly one peer-left
    (timeout) per lost peer within the presence TTL, and keeps relaying."""
    import os
    import signal

    ttl = 2.0
    server = run_server("--workers", "2", "--broker", redis_server.url, "--broker-prefix",
                        broker_prefix, "--presence-ttl", str(ttl), "--resume-window", "0")
    await asyncio.to_thread(server.wait_for, lambda e: e.get("event") == "listening"
                            and "workers" in e, 15)
    clients: list[tuple[ClientConnection, str, int]] = []
    pids: set[int] = set()
    while len(pids) < 2 or len(clients) < 4:  # until both workers hold members
        ws, pid, _ = await member(server.url(), "w")
        line = await asyncio.to_thread(server.wait_for, lambda e, p=pid: e.get(
            "event") == "connect" and e.get("peer") == p, 5)
        for other, _, _ in clients:
            await expect(other, "peer-joined")
        clients.append((ws, pid, line["pid"]))
        pids.add(line["pid"])
        assert len(clients) < 40, "the kernel never spread connections over both workers"
    victim = clients[0][2]
    lost = {pid for _, pid, w in clients if w == victim}
    survivors = [(ws, pid) for ws, pid, w in clients if w != victim]
    os.kill(victim, signal.SIGKILL)
    restarted = await asyncio.to_thread(server.wait_for, lambda e: e.get(
        "event") == "worker started" and e.get("pid") not in pids, 15)
    assert restarted["pid"] != victim
    for ws, _ in survivors:
        left = [await expect(ws, "peer-left", timeout=ttl * 4) for _ in lost]
        assert sorted(m["peerId"] for m in left) == sorted(lost), left
        assert all(m["reason"] == "timeout" for m in left), left
    sender, sender_id = survivors[0]
    await send_json(sender, {"type": "marker"})
    for ws, _ in survivors[1:]:
        assert await recv_json(ws) == {"from": sender_id, "type": "marker"}
    for ws, _ in survivors:
        await ws.close()


async def test_unix_socket_broker_and_broker_metrics(broker_prefix):
    """--broker unix://PATH works like redis://; /metrics shows the broker's work."""
    import shutil
    import tempfile

    from tests.cluster import Cluster
    from tests.helpers import metrics
    from tests.redis_server import RedisServer

    where = tempfile.mkdtemp(prefix="rtcsignal-sock-")
    sock = f"{where}/redis.sock"
    redis = RedisServer(args=("--unixsocket", sock, "--unixsocketperm", "700")).start()
    cluster = Cluster(f"unix://{sock}", broker_prefix, n=2)
    try:
        a, a_id, _ = await member(cluster.urls[0], "unix")
        b, _, _ = await member(cluster.urls[1], "unix")
        await expect(a, "peer-joined")
        await send_json(a, {"type": "offer", "n": 1})
        assert (await expect(b, "offer"))["from"] == a_id
        seen = await metrics(cluster.instance(0))
        assert seen["rtcsignal_broker_ready"] == 1, seen
        assert seen["rtcsignal_broker_publishes_total"] >= 2, seen  # a join and a relay
        assert seen["rtcsignal_broker_subscriptions"] >= 2, seen  # its node and the room
        assert seen["rtcsignal_broker_lease_held"] in (0, 1)
        got = await metrics(cluster.instance(1))
        assert got["rtcsignal_broker_received_total"] >= 1, got
        await a.close()
        await b.close()
    finally:
        cluster.stop()
        redis.cleanup()
        shutil.rmtree(where, ignore_errors=True)


async def test_tls_broker_rediss(broker_prefix, tmp_path):
    """--broker rediss://… talks TLS to Redis, verifying its certificate."""
    import subprocess

    from tests.cluster import Cluster
    from tests.redis_server import RedisServer, free_port

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    tls_port = free_port()
    redis = RedisServer(args=("--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                              "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                              "--tls-auth-clients", "no")).start()
    cluster = Cluster(f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}", broker_prefix,
                      n=2)
    try:
        a, a_id, _ = await member(cluster.urls[0], "tls")
        b, _, _ = await member(cluster.urls[1], "tls")
        await expect(a, "peer-joined")
        await send_json(b, {"type": "answer", "to": a_id})
        assert (await expect(a, "answer"))["to"] == a_id
        await a.close()
        await b.close()
    finally:
        cluster.stop()
        redis.cleanup()


async def test_workers_exit_when_their_supervisor_dies_while_draining(
        run_server, redis_server, broker_prefix):
    """SIGTERM to the supervisor starts the workers' drain; a SIGKILL of the supervisor
    during it (what a benchmark harness or a service manager does after a stop timeout)
    must not leave a worker behind: each ends its drain, or exits after a bound."""
    import os
    import signal

    import psutil

    server = run_server("--workers", "2", "--broker", redis_server.url, "--broker-prefix",
                        broker_prefix, "--drain-timeout", "2", "--close-timeout", "1")
    await asyncio.to_thread(server.wait_for, lambda e: e.get("event") == "listening"
                            and "workers" in e, 15)
    workers = [psutil.Process(e["pid"]) for e in server.lines
               if e.get("event") == "worker started"]
    assert len(workers) == 2
    clients = [await member(server.url(), "orphans") for _ in range(6)]
    server.proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(server.wait_for, lambda e: e.get("event") == "shutting down", 5)
    os.kill(server.proc.pid, signal.SIGKILL)
    _, alive = await asyncio.to_thread(psutil.wait_procs, workers, 40)
    assert not alive, [p.pid for p in alive]
    for ws, _, _ in clients:
        with contextlib.suppress(Exception):
            await ws.close()
