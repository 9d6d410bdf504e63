"""Several ``rtcsignal serve`` instances sharing one real Redis, for multi-instance tests.

    cluster = Cluster(redis_server, prefix, n=3)   # each: --broker URL --broker-prefix P
    cluster.url("room=x")     # round-robin over the live instances' own URLs
    cluster.front.url()       # ONE URL (a TCP balancer) whose connections round-robin
    cluster.kill(1)           # SIGKILL instance 1
    cluster.stop()

``front`` has the interface of the ``server`` fixture (``url``, ``http``, ``host``,
``port``, ``scheme``), so a test written as ``base = server.url()`` followed by many
``connect(base)`` spreads its clients over the instances without being rewritten: the
balancer sends each new TCP connection to the next live instance, like an nginx upstream
without sticky sessions. It relays bytes only (no headers added), in its own thread and
event loop, so it works with any test's loop and with raw-socket clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.conftest import ServerProcess
    from tests.redis_server import RedisServer


def _server_process(*flags: str, env: dict[str, str] | None = None) -> ServerProcess:
    from tests.conftest import ServerProcess  # conftest imports this module

    return ServerProcess(*flags, env=env)


def first_logged(servers: Sequence[ServerProcess], pred: Callable[[dict], bool],
                 timeout: float = 10.0) -> tuple[int, dict]:
    """The first of ``servers`` (index, log line) with a log line matching ``pred``; the
    lines arrive through each server's reader thread, so this waits for them (blocking:
    call it with ``asyncio.to_thread`` from a test's loop)."""
    deadline = time.monotonic() + timeout
    while True:
        for i, s in enumerate(servers):
            for e in list(s.lines):
                if pred(e):
                    return i, e
        if time.monotonic() > deadline:
            raise AssertionError("no server logged the line")
        time.sleep(0.01)


class Balancer:
    """A round-robin TCP proxy on 127.0.0.1 in front of ``targets()``.

    ``targets()`` returns ``[(index, host, port), ...]`` for the instances to use; each
    accepted connection goes to the next index after the previous connection's, skipping
    instances that refuse. ``routes`` records the index each connection went to. When
    either side closes, the other side is half-closed, then closed; when an instance dies,
    its clients see their connection end.
    """

    def __init__(self, targets: Callable[[], list[tuple[int, str, int]]]) -> None:
        self._targets = targets
        self._last = -1
        self.routes: list[int] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True,
                                        name="cluster-balancer")
        self._thread.start()
        if not started.wait(10) or self._server is None:
            raise AssertionError("balancer did not start")
        self.host = "127.0.0.1"
        self.port: int = self._server.sockets[0].getsockname()[1]

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def listen() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0,
                                                      backlog=1024)

        try:
            self._loop.run_until_complete(listen())
        finally:
            started.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            # Pick the order before any await, so simultaneous accepts take turns too.
            targets = sorted(self._targets())
            start = next((k for k, t in enumerate(targets) if t[0] > self._last), 0)
            order = targets[start:] + targets[:start]
            if order:
                self._last = order[0][0]
            for index, host, port in order:
                try:
                    up_reader, upstream = await asyncio.wait_for(
                        asyncio.open_connection(host, port), 5)
                except OSError:  # refused or unreachable (TimeoutError is an OSError)
                    continue
                self.routes.append(index)
                break
            if upstream is None:
                return
            self._writers.add(upstream)
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
            self._tasks.discard(task)

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=2)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close ``dst``; on a reset, reset ``dst`` too."""
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (OSError, asyncio.IncompleteReadError):
        dst.transport.abort()
        return
    if dst.can_write_eof() and not dst.is_closing():
        with contextlib.suppress(OSError):
            dst.write_eof()


class Front:
    """The cluster seen through the balancer: the ``server`` fixture's interface."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.kind = "cluster"
        self.scheme = cluster.instance(0).scheme
        self.host = cluster.balancer.host
        self.port = cluster.balancer.port

    def url(self, query: str = "", path: str = "/signaling") -> str:
        from tests.conftest import ws_url

        return ws_url(self, query, path)

    def http(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def alive(self) -> bool:
        return any(s.alive() for s in self.cluster.instances)

    def __repr__(self) -> str:
        return f"<Front :{self.port} over {self.cluster!r}>"


class Cluster:
    """``n`` ``rtcsignal serve`` instances on one Redis (``--broker URL --broker-prefix
    PREFIX``, then ``flags``), started in parallel. With ``redis=None`` the instances get
    no broker flags (independent servers; used to test this harness itself)."""

    def __init__(self, redis: RedisServer | str | None, prefix: str, n: int = 3,
                 flags: Sequence[str] = (), env: dict[str, str] | None = None,
                 spawn: Callable[..., ServerProcess] = _server_process) -> None:
        self.redis_url = redis if isinstance(redis, str) or redis is None else redis.url
        self.prefix = prefix
        self.flags = tuple(flags)
        self.env = env
        self._spawn = spawn
        self.instances: list[ServerProcess] = []
        self._rr = itertools.count()
        self._balancer: Balancer | None = None
        self._front: Front | None = None
        try:
            self.add(n)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    @property
    def instance_flags(self) -> tuple[str, ...]:
        broker = () if self.redis_url is None else (
            "--broker", self.redis_url, "--broker-prefix", self.prefix)
        return (*broker, *self.flags)

    def add(self, n: int = 1, *flags: str) -> list[ServerProcess]:
        """Start ``n`` more instances (same broker, prefix and flags, plus ``flags``);
        they take the next indexes. Returns them."""
        args = (*self.instance_flags, *flags)
        with ThreadPoolExecutor(max(n, 1)) as pool:
            futures = [pool.submit(self._spawn, *args, env=self.env) for _ in range(n)]
            started, errors = [], []
            for f in futures:
                try:
                    started.append(f.result())
                except Exception as exc:
                    errors.append(exc)
        self.instances.extend(started)
        if errors:
            raise errors[0]
        return started

    def __len__(self) -> int:
        return len(self.instances)

    def __repr__(self) -> str:
        ports = ",".join(str(s.port) if s.alive() else f"({s.port})" for s in self.instances)
        return f"<Cluster {self.prefix} [{ports}] on {self.redis_url}>"

    # --- addressing -----------------------------------------------------------------------

    def instance(self, i: int) -> ServerProcess:
        return self.instances[i]

    def live(self) -> list[int]:
        """Indexes of the instances still running."""
        return [i for i, s in enumerate(self.instances) if s.alive()]

    @property
    def urls(self) -> list[str]:
        """Each instance's own base URL (``ws://127.0.0.1:PORT/signaling``), by index."""
        return [s.url() for s in self.instances]

    def url(self, query: str = "", path: str = "/signaling") -> str:
        """The next live instance's URL (round-robin): consecutive calls name different
        instances, so consecutive clients land on different instances."""
        live = self.live()
        assert live, "no instance is running"
        return self.instances[live[next(self._rr) % len(live)]].url(query, path)

    def http(self, path: str, i: int = 0) -> str:
        return self.instances[i].http(path)

    @property
    def balancer(self) -> Balancer:
        if self._balancer is None:
            self._balancer = Balancer(
                lambda: [(i, s.host, s.port) for i, s in enumerate(self.instances)
                         if s.alive()])
        return self._balancer

    @property
    def front(self) -> Front:
        """One URL for the whole cluster (see the module doc)."""
        if self._front is None:
            self._front = Front(self)
        return self._front

    def instance_of(self, peer_id: str, timeout: float = 5.0) -> int:
        """The index of the instance that accepted ``peer_id`` (from its ``connect`` log
        line)."""
        return self.logged(lambda e: e.get("event") == "connect" and e.get("peer") == peer_id,
                           timeout)[0]

    def logged(self, pred: Callable[[dict], bool], timeout: float = 10.0) -> tuple[int, dict]:
        """The first instance (index, log line) with a line matching ``pred``."""
        return first_logged(self.instances, pred, timeout)

    # --- faults and teardown ------------------------------------------------------------

    def kill(self, i: int) -> int:
        """SIGKILL instance ``i`` (no drain, no cleanup: its Redis state is left behind).
        Returns its exit status (-9)."""
        return self.instances[i].stop(signal.SIGKILL, 10)

    def terminate(self, i: int, timeout: float = 20.0) -> int:
        """SIGTERM instance ``i`` and wait for its graceful drain."""
        return self.instances[i].stop(signal.SIGTERM, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> list[int | None]:
        """Stop every instance (signals all first, then waits) and the balancer.
        Returns the exit statuses by index."""
        for s in self.instances:
            if s.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    s.proc.send_signal(sig)
        codes: list[int | None] = []
        deadline = time.monotonic() + timeout
        for s in self.instances:
            try:
                codes.append(s.proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                codes.append(s.proc.wait(5))
        if self._balancer is not None:
            self._balancer.close()
        return codes

