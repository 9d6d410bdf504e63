"""Shared fixtures: real servers on real sockets.

- ``run_server(*flags)`` starts ``python -m rtcsignal serve`` as a subprocess on a free
  port (parsed from its JSON "listening" log line) and stops it after the test.
- ``service`` / ``make_service`` run a SignalingService in the test's own event loop, for
  the server-side Python API.
- ``redis_server``, ``make_cluster`` / ``cluster`` and ``topology`` (single | cluster): a real
  redis-server per session and several instances sharing it (see the section at the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from rtcsignal import Config, SignalingService
from tests.cluster import Cluster, Front
from tests.redis_server import RedisNotInstalled, RedisServer, unique_prefix


def ws_url(where: Any, query: str = "", path: str = "/signaling") -> str:
    """The WebSocket URL of anything with ``scheme``, ``host`` and ``port``."""
    ws = "wss" if where.scheme == "wss" else "ws"
    return f"{ws}://{where.host}:{where.port}{path}" + (f"?{query}" if query else "")


class ServerProcess:
    """A ``rtcsignal serve`` child process; ``lines`` collects its JSON log lines."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "rtcsignal", "serve", "--port", "0", "--log-format", "json",
               "--log-level", "debug", *flags]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        listening = self.wait_for(lambda e: e.get("event") == "listening", timeout=15)
        url = listening["url"]
        self.scheme = url.split(":", 1)[0]
        self.port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        self.host = "127.0.0.1"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.raw.append(line)
                with contextlib.suppress(ValueError):
                    self.lines.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
        """Block until a log line matches ``pred``; fails the test on timeout or exit."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for entry in self.lines[seen:]:
                    if pred(entry):
                        return entry
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError("server exited: " + "".join(self.raw[-20:]))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("log line not seen; last lines: "
                                         + "".join(self.raw[-20:]))
                self._cond.wait(left)

    def url(self, query: str = "", path: str = "/signaling") -> str:
        return ws_url(self, query, path)

    def http(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@contextlib.contextmanager
def spawner() -> Iterator[Any]:
    """``start(*flags, env=None) -> ServerProcess``; every server started is stopped after."""
    servers: list[ServerProcess] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(*flags, env=env)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop(signal.SIGKILL if server.proc.poll() is None else signal.SIGTERM, 5)


@pytest.fixture
def run_server() -> Iterator[Any]:
    with spawner() as start:
        yield start


@pytest.fixture
def server(run_server: Any) -> ServerProcess:
    """A server with default settings."""
    return run_server()


@pytest.fixture
async def make_service() -> AsyncIterator[Any]:
    started: list[SignalingService] = []

    async def make(**settings: Any) -> SignalingService:
        svc = SignalingService(Config(port=0, **settings))
        await svc.start()
        started.append(svc)
        return svc

    yield make
    for svc in started:
        if not svc.draining:
            await asyncio.wait_for(svc.shutdown(), 15)


# --- Redis and several instances (issue 9) -------------------------------------------------
#
# redis_session   one real redis-server per test session (free port, no persistence)
# redis_server    that server, running again if an earlier test left it killed or frozen
# broker_prefix   a --broker-prefix no other test uses
# make_cluster    make_cluster(n=3, *flags) -> Cluster of n instances on redis_server
# cluster         make_cluster(3); indirect param: an int n, or {"n": n, "flags": [...]}
# topology        parametrized single|cluster: an object with the `server` fixture's
#                 interface (url, http, host, port, scheme); run_topology(*flags) is the
#                 run_server of the same parameter, topology_kind names it


@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisServer]:
    try:
        redis = RedisServer().start()
    except RedisNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    yield redis
    redis.cleanup()


@pytest.fixture
def redis_server(redis_session: RedisServer) -> RedisServer:
    """The session's redis-server, answering PING: a server an earlier test left killed,
    stopped or frozen is started again on the same port (keys are gone after a restart)."""
    return redis_session.ensure_running()


@pytest.fixture
def broker_prefix(request: pytest.FixtureRequest) -> str:
    """A fresh --broker-prefix (keys and channels) for this test: ``t-<test>-<hex>``."""
    return unique_prefix(request.node.name)


@pytest.fixture
def make_cluster(redis_server: RedisServer, broker_prefix: str) -> Iterator[Any]:
    """``make_cluster(n=3, *flags, prefix=None, env=None) -> Cluster``: n ``rtcsignal
    serve`` instances with ``--broker <redis_server.url> --broker-prefix <prefix>`` and
    ``flags``. The first cluster of a test uses ``broker_prefix``, later ones a prefix of
    their own (separate deployments); pass ``prefix=`` to choose (the same prefix makes
    them one cluster; ``Cluster.add()`` grows one). All are SIGKILLed after the test."""
    clusters: list[Cluster] = []

    def make(n: int = 3, *flags: str, prefix: str | None = None,
             env: dict[str, str] | None = None) -> Cluster:
        if prefix is None:
            prefix = broker_prefix if not clusters else f"{broker_prefix}-{len(clusters) + 1}"
        made = Cluster(redis_server, prefix, n, flags, env=env)
        clusters.append(made)
        return made

    yield make
    for made in clusters:
        with contextlib.suppress(Exception):
            made.stop(signal.SIGKILL, 5)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, make_cluster: Any) -> Cluster:
    """Three instances on one Redis. ``@pytest.mark.parametrize("cluster", [2],
    indirect=True)`` for two, or ``[{"n": 2, "flags": ["--presence-ttl", "2"]}]``."""
    param = getattr(request, "param", 3)
    if isinstance(param, int):
        return make_cluster(param)
    return make_cluster(param.get("n", 3), *param.get("flags", ()))


@pytest.fixture(params=["single", "cluster"])
def topology_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def run_topology(topology_kind: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``run_topology(*flags, env=None)``: for "single", one ``ServerProcess`` as
    ``run_server`` gives; for "cluster", three instances with those flags on one Redis,
    returned as ``Cluster.front`` (one URL whose connections round-robin over the
    instances; ``.cluster`` is the Cluster). Needs no other server fixture, so a test
    module may rebind ``server``/``run_server`` to ``topology``/``run_topology``."""
    if topology_kind == "cluster":
        make_cluster = request.getfixturevalue("make_cluster")

        def start_cluster(*flags: str, env: dict[str, str] | None = None) -> Front:
            return make_cluster(3, *flags, env=env).front

        yield start_cluster
        return
    with spawner() as start:
        yield start


@pytest.fixture
def topology(run_topology: Any) -> Any:
    """A server with default settings, once as one instance and once as a 3-instance
    cluster: a drop-in for the ``server`` fixture."""
    return run_topology()
