"""A real ``redis-server`` for tests, with the faults the broker must survive.

Each test session starts its own server on a free port (``--save '' --appendonly no``: no
persistence, nothing written to disk), so tests may kill it, restart it on the same port,
freeze it, and drop its pub/sub clients with ``CLIENT KILL TYPE pubsub``.

    server = RedisServer().start()
    server.url                      # redis://127.0.0.1:PORT/0
    server.client_counts()          # {"client name": connections, ...} from CLIENT LIST
    server.restart()                # same port, answers PING when it returns
    server.stop()

Every admin call opens its own short connection, named ``ADMIN_NAME`` and left out of
``client_list()``, so counting connections never counts the counter.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

ADMIN_NAME = "rtcsignal-test-admin"
INSTALL_HINT = (
    "redis-server is not installed; the Redis tests run a real one. Install it with "
    "`make system-deps` (sh scripts/install-system-deps.sh, as root) or "
    "`apt-get install redis-server`."
)


class RedisNotInstalled(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on, chosen below the kernel's ephemeral range: the server
    restarts on the same port, and a port in that range could meanwhile be the source
    port of some outgoing connection, which would make the restart fail to bind."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(50):
        port = random.randrange(10000, max(low, 10001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """One ``redis-server`` child process on ``host:port`` (a free port unless given)."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 args: tuple[str, ...] = (), executable: str | None = None) -> None:
        exe = executable or shutil.which("redis-server")
        if exe is None:
            raise RedisNotInstalled(INSTALL_HINT)
        self.executable = exe
        self.host = host
        self.port = port or 0
        self._fixed_port = port is not None
        self.args = tuple(args)
        self.dir = Path(tempfile.mkdtemp(prefix="rtcsignal-redis-"))
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0  # how many times a process was started (restarts included)

    # --- lifecycle --------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING. Picks a new free port when
        the first one turns out to be taken (only if no port was given)."""
        if self.running():
            return self
        if self._fixed_port or self.starts:
            self._spawn(timeout)
            return self
        for _ in range(5):
            self.port = free_port(self.host)
            try:
                self._spawn(timeout)
                return self
            except _PortTaken:
                continue
        raise AssertionError(f"redis-server could not bind a port; log:\n{self.log_tail()}")

    def _spawn(self, timeout: float) -> None:
        cmd = [
            self.executable, "--port", str(self.port), "--bind", self.host,
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", str(self.dir), "--logfile", "", "--protected-mode", "no",
            *self.args,
        ]
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts + 1} on port {self.port}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.dir)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                if "Address already in use" in tail.rsplit("--- start", 1)[-1]:
                    raise _PortTaken
                raise AssertionError(f"redis-server exited with {self.proc.returncode}; "
                                     f"log:\n{tail}")
            if self._answers_as(self.proc.pid):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"redis-server did not answer PING within {timeout} s; "
                                     f"log:\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Graceful stop (SIGTERM; nothing is saved). Returns the exit status."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """SIGKILL: the server vanishes, every client sees its connection drop."""
        return self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: int, timeout: float) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def restart(self, kill: bool = False, down_for: float = 0.0,
                timeout: float = 10.0) -> RedisServer:
        """Stop (SIGTERM, or SIGKILL with ``kill=True``), stay down ``down_for`` seconds,
        start again on the same port and wait until it answers. Nothing survives: no
        persistence, so every key is gone and every client must reconnect."""
        if kill:
            self.kill()
        else:
            self.stop()
        if down_for:
            time.sleep(down_for)
        self._fixed_port = True
        self._spawn(timeout)
        return self

    def ensure_running(self, timeout: float = 10.0) -> RedisServer:
        """Answering PING afterwards: a frozen server is thawed; a dead or hung one is
        (killed and) started again on the same port."""
        if self.running():
            self.thaw()
            if self.ping(2.0):
                return self
            self.kill()
        return self.start(timeout)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (a hung server)."""
        assert self.proc is not None and self.proc.poll() is None, "redis-server not running"
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "redis-server not running"
        self.proc.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # --- admin --------------------------------------------------------------------------

    @contextlib.contextmanager
    def admin(self, timeout: float = 5.0) -> Iterator[redis.Redis]:
        """A fresh synchronous client (one connection, named ADMIN_NAME), closed after."""
        r = redis.Redis(host=self.host, port=self.port, socket_timeout=timeout,
                        socket_connect_timeout=timeout, client_name=ADMIN_NAME,
                        decode_responses=True, retry=Retry(NoBackoff(), 0))
        try:
            yield r
        finally:
            r.close()

    def ping(self, timeout: float = 0.5) -> bool:
        try:
            with self.admin(timeout) as r:
                return bool(r.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False

    def _answers_as(self, pid: int) -> bool:
        """The server on our port answers, and it is process ``pid`` (not some other
        redis-server that took the port first)."""
        try:
            with self.admin(0.5) as r:
                return int(r.info("server")["process_id"]) == pid
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False

    def execute(self, *args: Any) -> Any:
        """Run one command on an admin connection (``execute("CONFIG", "SET", ...)``)."""
        with self.admin() as r:
            return r.execute_command(*args)

    def client_list(self, type: str | None = None,
                    include_admin: bool = False) -> list[dict[str, str]]:
        """``CLIENT LIST`` (optionally ``TYPE normal|pubsub|replica``), one dict per
        connection with the server's fields (id, addr, laddr, name, flags, cmd, sub,
        ssub, psub, ...). The admin connection asking is left out."""
        with self.admin() as r:
            rows: list[dict[str, str]] = r.client_list(_type=type) if type else r.client_list()
        return [c for c in rows if include_admin or c.get("name") != ADMIN_NAME]

    def clients_by(self, field: str = "name", type: str | None = None,
                   ) -> dict[str, list[dict[str, str]]]:
        """``client_list()`` grouped by one field (``name`` by default; unnamed
        connections group under ``""``)."""
        groups: dict[str, list[dict[str, str]]] = {}
        for c in self.client_list(type):
            groups.setdefault(c.get(field, ""), []).append(c)
        return groups

    def client_counts(self, field: str = "name", type: str | None = None,
                      ) -> dict[str, int]:
        """How many connections per value of ``field``: ``{"name": count}``."""
        return dict(Counter(c.get(field, "") for c in self.client_list(type)))

    def client_kill_pubsub(self) -> int:
        """``CLIENT KILL TYPE pubsub``: drops every subscriber connection (channels,
        patterns and shard channels). Returns how many were killed."""
        return int(self.execute("CLIENT", "KILL", "TYPE", "pubsub"))

    def client_kill(self, *filters: str) -> int:
        """``CLIENT KILL <filter> <value> ...`` (e.g. ``"ID", "12"`` or ``"ADDR", a``)."""
        return int(self.execute("CLIENT", "KILL", *filters))


class _PortTaken(Exception):
    pass


def unique_prefix(label: str = "t") -> str:
    """A broker key/channel prefix no other test uses: ``t-<label>-<8 hex>``."""
    safe = "".join(ch if ch.isalnum() else "-" for ch in label)[:24].strip("-") or "t"
    return f"t-{safe}-{os.urandom(4).hex()}"
