"""The multi-instance test harness is real: the session's redis-server, its fault helpers
(kill, restart, freeze, CLIENT KILL TYPE pubsub, CLIENT LIST counts) and the Cluster /
topology fixtures that the broker tests build on (issue 9).

Nothing sleeps for a fixed time: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry
from websockets.exceptions import ConnectionClosed

from tests.cluster import Cluster
from tests.helpers import open_client
from tests.redis_server import ADMIN_NAME, RedisServer

TIMEOUT = 5.0
NO_RETRY = Retry(NoBackoff(), 0)


def wait_until(pred: Callable[[], Any], timeout: float = TIMEOUT, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what or pred}")
        time.sleep(0.01)


def connect(server: RedisServer, name: str | None = None) -> redis.Redis:
    """A client without retries, so a dropped connection shows as an error."""
    return redis.Redis(host=server.host, port=server.port, client_name=name,
                       decode_responses=True, socket_timeout=TIMEOUT, retry=NO_RETRY)


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


# --- the redis-server ---------------------------------------------------------------------


def test_a_real_redis_server_without_persistence(redis_server: RedisServer,
                                                  broker_prefix: str) -> None:
    r = connect(redis_server)
    try:
        assert r.ping() is True
        info = r.info("server")
        assert info["tcp_port"] == redis_server.port
        assert info["process_id"] == redis_server.pid
        assert int(str(info["redis_version"]).split(".")[0]) >= 7  # sharded pub/sub: 7.0
        assert r.config_get("save") == {"save": ""}
        assert r.config_get("appendonly") == {"appendonly": "no"}
        assert r.config_get("bind")["bind"] == "127.0.0.1"
        key = f"{broker_prefix}:round-trip"
        assert r.set(key, "v1", ex=60) is True
        assert r.get(key) == "v1"
        assert r.delete(key) == 1
        assert r.get(key) is None
    finally:
        r.close()
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert broker_prefix.startswith("t-test-a-real-redis")


def test_restart_keeps_the_port_drops_clients_and_forgets_keys(
        redis_server: RedisServer, broker_prefix: str) -> None:
    port, pid, starts = redis_server.port, redis_server.pid, redis_server.starts
    key = f"{broker_prefix}:k"
    redis_server.execute("SET", key, "before")
    raw = socket.create_connection(("127.0.0.1", port), TIMEOUT)
    try:
        raw.sendall(b"PING\r\n")
        assert raw.recv(64) == b"+PONG\r\n"
        redis_server.restart()
        assert (redis_server.port, redis_server.starts) == (port, starts + 1)
        assert redis_server.pid != pid
        assert redis_server.ping()
        # The connection made before the restart was closed by the old server.
        assert raw.recv(64) == b""
    finally:
        raw.close()
    # A new one works, on the same port, and finds nothing (no persistence).
    r = connect(redis_server)
    try:
        assert r.get(key) is None
        assert r.info("server")["process_id"] == redis_server.pid
    finally:
        r.close()


def test_kill_then_restart(redis_server: RedisServer) -> None:
    port = redis_server.port
    assert redis_server.kill() == -9
    assert not redis_server.running()
    assert not redis_server.ping()
    assert refused(port)
    redis_server.restart()  # already down: just starts again, on the same port
    assert redis_server.port == port
    assert redis_server.running() and redis_server.ping()
    redis_server.restart(kill=True, down_for=0.2)
    assert redis_server.port == port and redis_server.ping()


def test_freeze_keeps_connections_but_answers_nothing(redis_server: RedisServer) -> None:
    r = redis.Redis(host=redis_server.host, port=redis_server.port, socket_timeout=0.3,
                    retry=NO_RETRY)
    try:
        assert r.ping()
        redis_server.freeze()
        try:
            assert not refused(redis_server.port)  # the kernel still accepts
            with pytest.raises(redis.TimeoutError):
                r.ping()
        finally:
            redis_server.thaw()
        assert redis_server.ping()
    finally:
        r.close()


def test_ensure_running_brings_back_a_frozen_or_dead_server(redis_server: RedisServer) -> None:
    # What the function-scoped redis_server fixture does before each test.
    port, pid = redis_server.port, redis_server.pid
    redis_server.freeze()
    assert redis_server.ensure_running() is redis_server
    assert redis_server.ping() and redis_server.pid == pid
    redis_server.kill()
    redis_server.ensure_running()
    assert redis_server.ping() and redis_server.port == port and redis_server.pid != pid


async def test_client_kill_pubsub_disconnects_subscribers(redis_server: RedisServer,
                                                          broker_prefix: str) -> None:
    chan, shard = f"{broker_prefix}:chan", f"{broker_prefix}:{{shard}}"
    # redis.asyncio, as the broker uses it, without retries: the drop surfaces as an error.
    # (With redis-py's default retry policy, PubSub reconnects and resubscribes silently:
    # the only traces are fresh subscribe confirmations, and publishes in between are lost.)
    sub = aioredis.Redis(host=redis_server.host, port=redis_server.port,
                         client_name="sub", retry=NO_RETRY)
    plain = aioredis.Redis(host=redis_server.host, port=redis_server.port,
                           client_name="plain", retry=NO_RETRY)
    pubsub = sub.pubsub()
    try:
        assert await plain.ping()
        await pubsub.subscribe(chan)
        await pubsub.ssubscribe(shard)
        confirmations = [await pubsub.get_message(timeout=TIMEOUT) for _ in range(2)]
        assert [m and m["type"] for m in confirmations] == ["subscribe", "ssubscribe"]

        pubsubs = redis_server.client_list("pubsub")
        assert [(c["name"], c["sub"], c["ssub"]) for c in pubsubs] == [("sub", "1", "1")]
        assert redis_server.client_counts() == {"sub": 1, "plain": 1}
        assert redis_server.execute("PUBLISH", chan, "one") == 1
        assert redis_server.execute("SPUBLISH", shard, "two") == 1
        got = [await pubsub.get_message(timeout=TIMEOUT) for _ in range(2)]
        assert [(m and m["type"], m and m["data"]) for m in got] == [
            ("message", b"one"), ("smessage", b"two")]

        assert redis_server.client_kill_pubsub() == 1
        # Redis now counts no subscriber: a publish reaches no one ...
        assert redis_server.execute("PUBLISH", chan, "lost") == 0
        assert redis_server.execute("SPUBLISH", shard, "lost") == 0
        assert redis_server.client_list("pubsub") == []
        # ... the subscriber sees its connection closed ...
        with pytest.raises(redis.ConnectionError):
            while await pubsub.get_message(timeout=TIMEOUT) is None:
                pass
        # ... and a plain (non-pubsub) connection was left alone.
        assert await plain.ping()
        assert redis_server.client_counts() == {"plain": 1}
        assert redis_server.client_kill_pubsub() == 0
    finally:
        await pubsub.aclose()
        await sub.aclose()
        await plain.aclose()


def test_client_list_counts_connections_per_name(redis_server: RedisServer) -> None:
    before = redis_server.client_counts()
    assert ADMIN_NAME not in before
    clients = [connect(redis_server, n) for n in ("node-a", "node-a", "node-b")]
    clients.append(connect(redis_server))  # unnamed
    pubsub = connect(redis_server, "node-b").pubsub()
    try:
        for c in clients:
            assert c.ping()
        pubsub.subscribe("ch")
        wait_until(lambda: redis_server.client_counts().get("node-b") == 2, what="subscribe")
        counts = redis_server.client_counts()
        assert {k: v for k, v in counts.items() if k in ("node-a", "node-b", "")} == {
            "node-a": 2, "node-b": 2, "": 1}
        assert redis_server.client_counts(type="pubsub") == {"node-b": 1}
        assert redis_server.client_counts(type="normal").get("node-b") == 1
        groups = redis_server.clients_by("name")
        assert len({c["addr"] for c in groups["node-a"]}) == 2
        assert {c["laddr"] for cs in groups.values() for c in cs} == {
            f"127.0.0.1:{redis_server.port}"}
        # Including the asking connection is possible, and it is the only admin one.
        everyone = redis_server.client_list(include_admin=True)
        assert [c["name"] for c in everyone].count(ADMIN_NAME) == 1
    finally:
        pubsub.close()
        for c in clients:
            c.close()
    wait_until(lambda: redis_server.client_counts() == before, what="connections closed")


# --- several instances --------------------------------------------------------------------


async def test_cluster_round_robin_balancer_and_kill() -> None:
    """The harness itself, on independent instances (no broker), so that what it shows
    does not depend on the broker: each instance counts only its own clients."""
    c = Cluster(None, "unused", 3)
    clients = []
    try:
        assert len(c) == 3 and c.live() == [0, 1, 2]
        ports = [s.port for s in c.instances]
        assert len(set(ports)) == 3
        assert c.urls == [f"ws://127.0.0.1:{p}/signaling" for p in ports]
        # url(): consecutive calls name consecutive instances.
        assert [c.url("room=r") for _ in range(4)] == [
            *(f"ws://127.0.0.1:{p}/signaling?room=r" for p in ports),
            f"ws://127.0.0.1:{ports[0]}/signaling?room=r"]
        # front: one URL; consecutive connections land on consecutive instances.
        front = c.front
        assert front.url() == f"ws://127.0.0.1:{front.port}/signaling"
        assert front.http("/healthz") == f"http://127.0.0.1:{front.port}/healthz"
        base = front.url()
        for _ in range(6):
            clients.append(await open_client(base))
        assert [g["clientsCount"] for _, g in clients] == [1, 1, 1, 2, 2, 2]
        assert [c.instance_of(g["peerId"]) for _, g in clients] == [0, 1, 2, 0, 1, 2]
        assert c.balancer.routes == [0, 1, 2, 0, 1, 2]

        # SIGKILL instance 1: its clients (through the balancer) see the connection end;
        # the others are served; new connections skip it.
        assert c.kill(1) == -9
        assert c.live() == [0, 2]
        for k in (1, 4):
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(clients[k][0].recv(), TIMEOUT)
        for k in (0, 3):
            await clients[k][0].send('{"type":"ping","id":1}')
            assert '"pong"' in await asyncio.wait_for(clients[k][0].recv(), TIMEOUT)
        more = [await open_client(base) for _ in range(4)]
        clients.extend(more)
        assert c.balancer.routes[6:] == [0, 2, 0, 2]  # after 2 comes 0; 1 is skipped
        assert {c.url() for _ in range(4)} == {c.urls[0], c.urls[2]}
        # add() grows the cluster; the balancer and url() use the new instance.
        (added,) = c.add()
        assert c.live() == [0, 2, 3] and added is c.instance(3)
    finally:
        for ws, _ in clients:
            await ws.close()
        codes = c.stop()
    assert codes[1] == -9 and [codes[i] for i in (0, 2, 3)] == [0, 0, 0]


def test_make_cluster_passes_broker_flags(make_cluster: Any, redis_server: RedisServer,
                                          broker_prefix: str) -> None:
    first = make_cluster(2, "--presence-ttl", "3")
    second = make_cluster(1)
    assert len(first) == 2 and first.prefix == broker_prefix
    assert second.prefix != broker_prefix and second.prefix.startswith(broker_prefix)
    for cl in (first, second):
        for s in cl.instances:
            assert s.alive()
            args = s.proc.args
            i = args.index("--broker")
            assert args[i:i + 4] == ["--broker", redis_server.url, "--broker-prefix",
                                     cl.prefix]
    assert first.instance(0).proc.args[-2:] == ["--presence-ttl", "3"]


@pytest.mark.parametrize("cluster", [2], indirect=True)
def test_cluster_fixture_takes_a_size(cluster: Cluster) -> None:
    assert len(cluster) == 2 and cluster.live() == [0, 1]


def test_topology_has_the_server_fixture_interface(topology: Any, topology_kind: str,
                                                   run_topology: Any) -> None:
    for attr in ("url", "http", "host", "port", "scheme"):
        assert hasattr(topology, attr), attr
    assert topology.url() == f"ws://127.0.0.1:{topology.port}/signaling"
    assert topology.url("room=a") == f"ws://127.0.0.1:{topology.port}/signaling?room=a"
    if topology_kind == "cluster":
        assert len(topology.cluster) == 3
        other = run_topology("--max-peers-per-room", "2")
        assert other.cluster.flags == ("--max-peers-per-room", "2")
        assert other.cluster.prefix != topology.cluster.prefix
