"""``GET /metrics``: what is read at scrape time, and one page for all the workers.

Scrape-time figures (the hot path keeps plain integers, ``core/metrics.py``): the bytes
waiting in the send buffers, a histogram of peers per room, the broker's round trips.

With ``--workers N`` a scrape lands on whichever worker the kernel picks, so each worker
serves its own metric families on a unix socket in a directory private to the supervisor
(``RTCSIGNAL_WORKER_DIR``, mode 0700, removed when it stops), and the worker that got the
scrape asks the others (all at once, ``GATHER_TIMEOUT`` at most) and answers with every
worker's samples, each labelled ``worker="<index>"``, plus ``rtcsignal_worker_up{worker}``
(0 for a worker that did not answer in time: restarting, say). Keeping each worker's series
apart, rather than adding them up, is what keeps counters right across a worker restart: its
series start again from 0, which Prometheus reads as a reset of that one series, while a
sum would drop by the dead worker's whole count. ``sum without (worker) (rate(...))`` is the
machine's figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable
from typing import Any

import orjson

from rtcsignal.core.metrics import ROOM_BUCKETS, Family, Histogram, render
from rtcsignal.protocol.http import Request
from rtcsignal.server import workers

log = logging.getLogger("rtcsignal")

#: Seconds the worker that got a scrape waits for the others' pages.
GATHER_TIMEOUT = 1.0
CONTENT_TYPE = "text/plain; version=0.0.4"


def install(service: Any) -> None:
    """Register the scrape-time figures of ``service`` with its Metrics."""
    m = service.metrics
    m.auth_failures = service.admission.failures

    def send_buffers() -> list[int]:
        out = []
        for conn in service.connections:
            queued = conn.transport.get_write_buffer_size() if conn.transport else 0
            queued += conn.queued()
            out.append(queued)
        return out

    m.gauge("rtcsignal_connections_max", "--max-connections: open connections refused beyond",
            lambda: service.config.max_connections)
    m.gauge("rtcsignal_send_buffer_bytes",
            "Bytes queued for clients and not yet taken by the kernel, all connections",
            lambda: sum(send_buffers()))
    m.gauge("rtcsignal_send_buffer_max_bytes",
            "The largest send queue of one connection (bytes); --max-send-buffer bounds it",
            lambda: max(send_buffers(), default=0))
    m.histogram("rtcsignal_room_peers",
                "Named rooms by their number of members on this instance, now",
                lambda: Histogram.of((len(r.members) for r in service.hub.rooms.values()
                                      if r.members), ROOM_BUCKETS))
    broker = service.broker
    if broker is not None:
        m.histogram("rtcsignal_broker_latency_seconds",
                    "Round trips of the command pipelines sent to Redis",
                    lambda: broker.latency)


class Scrape:
    """The ``/metrics`` answer: this process's page, or with ``--workers`` every worker's
    (see the module docstring)."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.index = workers.worker_index()
        self.directory = os.environ.get(workers.DIR_ENV) if self.index is not None else None
        self.count = service.config.workers
        self._server: asyncio.AbstractServer | None = None

    def _path(self, index: int) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, f"metrics-{index}.sock")

    async def start(self) -> None:
        """Serve this worker's families on its socket (a worker only)."""
        if self.directory is None or self.index is None:
            return
        path = self._path(self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous process
        self._server = await asyncio.start_unix_server(self._serve, path)

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                os.unlink(self._path(self.index))  # type: ignore[arg-type]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(orjson.dumps(self.service.metrics.families()))
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def answer(self, request: Request) -> Awaitable[Any] | None:
        """The merged page for ``GET /metrics`` in a worker; None: the plain one will do."""
        if self._server is None or request.path != "/metrics" or request.method not in (
                "GET", "HEAD"):
            return None
        return self._page()

    async def _fetch(self, index: int) -> list[Any] | None:
        try:
            reader, writer = await asyncio.open_unix_connection(self._path(index))
        except OSError:
            return None
        try:
            return orjson.loads(await reader.read())
        except (OSError, orjson.JSONDecodeError):
            return None
        finally:
            writer.close()

    async def _page(self) -> tuple[int, bytes, str, dict[str, str]]:
        own = self.service.metrics.families()
        others = [i for i in range(self.count) if i != self.index]
        fetches = [asyncio.ensure_future(self._fetch(i)) for i in others]
        if fetches:
            await asyncio.wait(fetches, timeout=GATHER_TIMEOUT)
        pages: dict[int, list[Any] | None] = {self.index: own}  # type: ignore[dict-item]
        for i, fetch in zip(others, fetches, strict=True):
            if fetch.done():
                pages[i] = fetch.result()
            else:
                fetch.cancel()
                pages[i] = None
        return 200, render(merge(pages)).encode(), CONTENT_TYPE, {}


def merge(pages: dict[int, list[Any] | None]) -> list[Family]:
    """One page from each worker's families (None: it did not answer): every sample gets
    ``worker``; families in the order they first appear; ``rtcsignal_worker_up`` first."""
    up: Family = ("rtcsignal_worker_up", "gauge",
                  "1 when the worker answered this scrape in time, else 0",
                  [("rtcsignal_worker_up", (("worker", str(i)),), 0 if page is None else 1)
                   for i, page in sorted(pages.items())])
    merged: dict[str, Family] = {}
    for i, page in sorted(pages.items()):
        for name, kind, help_text, samples in page or ():
            family = merged.get(name)
            if family is None:
                family = merged[name] = (name, kind, help_text, [])
            worker = ("worker", str(i))
            family[3].extend((sample, (*(tuple(x) for x in labels), worker), value)
                             for sample, labels, value in samples)
    return [up, *merged.values()]
