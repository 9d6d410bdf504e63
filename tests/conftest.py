"""Shared fixtures: real servers on real sockets.

- ``run_server(*flags)`` starts ``python -m rtcsignal serve`` as a subprocess on a free
  port (parsed from its JSON "listening" log line) and stops it after the test.
- ``service`` / ``make_service`` run a SignalingService in the test's own event loop, for
  the server-side Python API.
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
        ws = "wss" if self.scheme == "wss" else "ws"
        return f"{ws}://{self.host}:{self.port}{path}" + (f"?{query}" if query else "")

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


@pytest.fixture
def run_server() -> Iterator[Any]:
    servers: list[ServerProcess] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(*flags, env=env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(signal.SIGKILL if server.proc.poll() is None else signal.SIGTERM, 5)


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
