"""``rtcsignal bench URL``: a realistic signaling load against a running deployment.

Clients join rooms of a few peers (``?room=bench-<k>``, ``--clients`` spread over
``--rooms``). In each room, negotiations follow one another between pairs of members, as
calls do: the caller sends an ``offer`` (an SDP of ~2.4 KB) and ``--candidates`` ICE candidates
(~250 B each), all addressed with ``to``; the callee answers the offer as it arrives, with an
``answer`` and as many candidates of its own. ``--rate`` is the total of messages per second
over all clients (negotiations start at rate / (2 + 2 x candidates) per second, spread over
the rooms); ``--rate 0`` runs as fast as the server answers: each room starts its next
negotiation when its previous one has been delivered.

Every message carries the sender's clock reading; its receiver (in the same process: a room's
members always are) records the latency, sender's write to receiver's read, in a histogram
with 2% wide buckets, so p50/p99 are exact to 2% and the max is exact. A live progress line
(stderr) shows connected clients, messages per second, p50/p99 so far and errors; at the end,
throughput, latency and errors (``--json``: one JSON object on stdout).

It is built to stay out of the way: its own WebSocket client (no library: a frame header and a
zero mask, which makes masking free for the client and still fully checked by the server),
one ``write`` per burst, orjson, uvloop; ``--processes`` splits the rooms over several
processes when one core is not enough (each reports its CPU time: a process near 100% of a
core is the bottleneck, and the summary says so).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import math
import os
import random
import resource
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Latency buckets are powers of BASE (2% wide): p50/p99 are exact to 2%.
BASE = 1.02
LOG_BASE = math.log(BASE)
REPORT_EVERY = 0.5  # seconds between a process's reports to the parent
CONNECT_IN_FLIGHT = 64  # handshakes in flight per process
DRAIN_TIMEOUT = 5.0  # seconds to wait at the end for messages still on their way
TICK = 0.005  # seconds between the rate scheduler's rounds

SDP_LINES = (
    "v=0", "o=- 4611731400430051336 2 IN IP4 127.0.0.1", "s=-", "t=0 0",
    "a=group:BUNDLE 0 1", "a=extmap-allow-mixed", "a=msid-semantic: WMS stream",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126", "c=IN IP4 0.0.0.0",
    "a=rtcp:9 IN IP4 0.0.0.0", "a=ice-ufrag:sXC4", "a=ice-pwd:7mQfJd8Kf2hRnPzYb1c+3L0a",
    "a=ice-options:trickle",
    "a=fingerprint:sha-256 6B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24"
    ":C2:43:F0:A1:58:D0:A1:2C:19:08",
    "a=setup:actpass", "a=mid:0", "a=sendrecv", "a=msid:stream audio0", "a=rtcp-mux",
    "a=rtpmap:111 opus/48000/2", "a=rtcp-fb:111 transport-cc", "a=fmtp:111 minptime=10;"
    "useinbandfec=1", "a=rtpmap:63 red/48000/2", "a=fmtp:63 111/111", "a=rtpmap:9 G722/8000",
    "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000", "a=rtpmap:13 CN/8000",
    "a=rtpmap:110 telephone-event/48000", "a=rtpmap:126 telephone-event/8000",
    "a=ssrc:1001 cname:4TOk42mSjXCkVIa6",
    "m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 104 105 106 107 108 109 127 125",
    "c=IN IP4 0.0.0.0", "a=rtcp:9 IN IP4 0.0.0.0", "a=ice-ufrag:sXC4",
    "a=ice-pwd:7mQfJd8Kf2hRnPzYb1c+3L0a", "a=ice-options:trickle", "a=setup:actpass",
    "a=mid:1", "a=sendrecv", "a=msid:stream video0", "a=rtcp-mux", "a=rtcp-rsize",
    "a=rtpmap:96 VP8/90000", "a=rtcp-fb:96 goog-remb", "a=rtcp-fb:96 transport-cc",
    "a=rtcp-fb:96 ccm fir", "a=rtcp-fb:96 nack", "a=rtcp-fb:96 nack pli",
    "a=rtpmap:97 rtx/90000", "a=fmtp:97 apt=96", "a=rtpmap:102 H264/90000",
    "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
    "a=rtpmap:103 rtx/90000", "a=fmtp:103 apt=102", "a=rtpmap:104 H264/90000",
    "a=fmtp:104 level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f",
    "a=rtpmap:105 rtx/90000", "a=fmtp:105 apt=104", "a=rtpmap:106 VP9/90000",
    "a=fmtp:106 profile-id=0", "a=rtpmap:107 rtx/90000", "a=fmtp:107 apt=106",
    "a=rtpmap:108 AV1/90000", "a=rtpmap:109 rtx/90000", "a=fmtp:109 apt=108",
    "a=ssrc-group:FID 2001 2002", "a=ssrc:2001 cname:4TOk42mSjXCkVIa6",
    "a=ssrc:2002 cname:4TOk42mSjXCkVIa6",
)
SDP = "\r\n".join(SDP_LINES) + "\r\n"
CANDIDATE = ("candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr "
             "10.0.0.12 rport 46154 generation 0 ufrag sXC4 network-id 1 network-cost 10")


# --- the client: a minimal RFC 6455 client on asyncio.Protocol ------------------------------


def text_frame(payload: bytes) -> bytes:
    """A masked text frame with a zero masking key: the payload is sent as is."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 65536:
        head = bytes((0x81, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0xFF)) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


PONG = bytes((0x8A, 0x80)) + b"\x00\x00\x00\x00"
CLOSE_NORMAL = bytes((0x88, 0x82)) + b"\x00\x00\x00\x00" + (1000).to_bytes(2, "big")


@dataclass
class Target:
    scheme: str
    host: str
    port: int
    path: str  # with the query, if any
    origin: str | None
    insecure: bool

    @classmethod
    def parse(cls, url: str, origin: str | None = None, insecure: bool = False) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url}")
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, parts.hostname, port, path, origin, insecure)

    def request(self, room: str, key: str) -> bytes:
        sep = "&" if "?" in self.path else "?"
        host = self.host if ":" not in self.host else f"[{self.host}]"
        lines = [f"GET {self.path}{sep}room={room} HTTP/1.1", f"Host: {host}:{self.port}",
                 "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13", "User-Agent: rtcsignal-bench"]
        if self.origin:
            lines.append(f"Origin: {self.origin}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.scheme != "wss":
            return None
        ctx = ssl.create_default_context()
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


class Client(asyncio.Protocol):
    """One signaling client: handshake, greeting, ``joined``, then messages to ``Load``."""

    def __init__(self, load: Load, room: Room, target: Target) -> None:
        self.load = load
        self.room = room
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.key = base64.b64encode(os.urandom(16)).decode()
        self.head = b""
        self.buf = b""
        self.upgraded = False
        self.peer_id = ""
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.target.request(self.room.name, self.key))  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(str(exc) if exc else "closed"))
        if not self.closed:
            self.closed = True
            self.load.lost_connection()

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            head = self.head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self.head = head
                return
            status_line = head[: head.find(b"\r\n")].decode("latin-1")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or parts[1] != "101":
                reason = " ".join(parts[1:]) if len(parts) > 1 else status_line
                self.ready.set_exception(ConnectionError(f"HTTP {reason}"))
                assert self.transport is not None
                self.transport.close()
                return
            accept = base64.b64encode(hashlib.sha1(self.key.encode() + GUID).digest())
            headers = {}
            for raw in head[:end].split(b"\r\n")[1:]:
                name, _, value = raw.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if headers.get(b"sec-websocket-accept") != accept:
                self.ready.set_exception(ConnectionError("bad Sec-WebSocket-Accept"))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            self.head = b""
            data = head[end + 4:]
            if not data:
                return
        buf = self.buf + data if self.buf else data
        pos, n = 0, len(buf)
        while n - pos >= 2:
            length = buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[start:start + 2], "big")
                start += 2
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[start:start + 8], "big")
                start += 8
            end = start + length
            if end > n:
                break
            op = buf[pos] & 0x0F
            pos = end
            if op == 1:
                self.on_text(buf[start:end])
            elif op == 9:
                assert self.transport is not None
                self.transport.write(PONG)
            elif op == 8:
                self.closed = True
                self.load.lost_connection()
                assert self.transport is not None
                self.transport.close()
                return
        self.buf = buf[pos:] if pos < n else b""

    def on_text(self, payload: bytes) -> None:
        msg = orjson.loads(payload)
        kind = msg.get("type")
        if self.ready.done():
            self.load.on_message(self, msg, kind)
        elif kind == "connected":
            self.peer_id = msg["peerId"]
        elif kind == "joined":
            self.ready.set_result(None)
        elif kind == "error":
            self.ready.set_exception(ConnectionError(f"error {msg.get('code')}"))

    def send(self, frames: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(frames)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.write(CLOSE_NORMAL)
            self.transport.close()


@dataclass
class Room:
    name: str
    members: list[Client] = field(default_factory=list)
    turn: int = 0  # the next caller
    pending: dict[int, int] = field(default_factory=dict)  # burst -> messages not yet delivered


# --- one process's load ----------------------------------------------------------------------


class Load:
    """The clients and rooms of one process, its counters, its schedule."""

    def __init__(self, target: Target, rooms: list[str], sizes: list[int], rate: float,
                 candidates: int) -> None:
        self.target = target
        self.rooms = [Room(name) for name in rooms]
        self.sizes = sizes
        self.rate = rate  # messages per second for this process (0: as fast as delivered)
        self.candidates = candidates
        self.sent: dict[str, int] = {"offer": 0, "answer": 0, "ice-candidate": 0}
        self.received: dict[str, int] = {"offer": 0, "answer": 0, "ice-candidate": 0}
        self.errors: dict[str, int] = {}
        self.connect_failures: dict[str, int] = {}
        self.connected = 0
        self.dropped = 0  # connections lost during the run
        self.hist: dict[int, int] = {}
        self.lat_max = 0.0
        self.lat_sum = 0.0
        self.lat_n = 0
        self.bursts = 0
        self.sending = False
        self.done: asyncio.Future[None] | None = None
        self.clock = time.perf_counter

    # --- counters

    def lost_connection(self) -> None:
        if self.sending:
            self.dropped += 1

    def record(self, latency: float) -> None:
        bucket = int(math.log(latency) / LOG_BASE) if latency > 1e-7 else -1000
        self.hist[bucket] = self.hist.get(bucket, 0) + 1
        self.lat_sum += latency
        self.lat_n += 1
        if latency > self.lat_max:
            self.lat_max = latency

    def report(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"connected": self.connected, "connect_failures": self.connect_failures,
                "sent": self.sent, "received": self.received, "errors": self.errors,
                "dropped": self.dropped, "hist": self.hist, "max": self.lat_max,
                "sum": self.lat_sum, "n": self.lat_n, "cpu": usage.ru_utime + usage.ru_stime}

    # --- setup

    async def connect(self) -> None:
        """Every client connected and joined (failures counted, their rooms smaller)."""
        loop = asyncio.get_running_loop()
        ctx = self.target.ssl_context()
        gate = asyncio.Semaphore(CONNECT_IN_FLIGHT)

        async def one(room: Room) -> None:
            async with gate:
                client = Client(self, room, self.target)
                try:
                    await asyncio.wait_for(loop.create_connection(
                        lambda: client, self.target.host, self.target.port, ssl=ctx,
                        server_hostname=self.target.host if ctx else None), 10)
                    await asyncio.wait_for(client.ready, 10)
                except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
                    reason = str(exc) or type(exc).__name__
                    self.connect_failures[reason] = self.connect_failures.get(reason, 0) + 1
                    if client.transport is not None:
                        client.transport.abort()
                    return
                room.members.append(client)
                self.connected += 1

        await asyncio.gather(*(one(room) for room, size in zip(self.rooms, self.sizes,
                                                                strict=True)
                               for _ in range(size)))
        self.rooms = [r for r in self.rooms if len(r.members) >= 2]

    # --- traffic

    def start(self, duration: float) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        self.sending = True
        self.started = self.clock()
        self.ends = self.started + duration
        if not self.rooms:
            self.done.set_result(None)
            return self.done
        if self.rate > 0:
            self.per_burst = 2 + 2 * self.candidates
            self._tick()
        else:
            for room in self.rooms:
                self._burst(room)
        loop.call_at(loop.time() + duration, self._stop)
        return self.done

    def _stop(self) -> None:
        self.sending = False
        self._check_done()

    def _tick(self) -> None:
        if not self.sending:
            return
        now = self.clock()
        due = int((now - self.started) * self.rate / self.per_burst) + 1 - self.bursts
        rooms = self.rooms
        for _ in range(min(due, 10 * len(rooms) + 10)):
            room = rooms[self.bursts % len(rooms)]
            self._burst(room)
        asyncio.get_running_loop().call_later(TICK, self._tick)

    def _burst(self, room: Room) -> None:
        """A negotiation: the next member calls the one after it."""
        members = room.members
        caller = members[room.turn % len(members)]
        callee = members[(room.turn + 1) % len(members)]
        room.turn += 1
        burst = self.bursts
        self.bursts += 1
        room.pending[burst] = 2 + 2 * self.candidates
        self._send_negotiation(caller, callee.peer_id, burst, "offer")

    def _send_negotiation(self, sender: Client, to: str, burst: int, kind: str) -> None:
        t = self.clock()
        frames = [text_frame(orjson.dumps({"type": kind, "to": to, "b": burst, "t": t,
                                           "sdp": {"type": kind, "sdp": SDP}}))]
        for i in range(self.candidates):
            frames.append(text_frame(orjson.dumps({
                "type": "ice-candidate", "to": to, "b": burst, "t": t,
                "candidate": {"candidate": CANDIDATE, "sdpMid": str(i % 2),
                              "sdpMLineIndex": i % 2, "usernameFragment": "sXC4"}})))
        sender.send(b"".join(frames))
        self.sent[kind] += 1
        self.sent["ice-candidate"] += self.candidates

    def on_message(self, client: Client, msg: dict[str, Any], kind: str) -> None:
        t = msg.get("t")
        if kind == "error":
            code = str(msg.get("code"))
            self.errors[code] = self.errors.get(code, 0) + 1
            return
        if t is None or kind not in self.received:
            return  # presence and anything else the server sends
        self.record(self.clock() - t)
        self.received[kind] += 1
        burst = msg["b"]
        if kind == "offer":
            self._send_negotiation(client, msg["from"], burst, "answer")
        room = client.room
        left = room.pending.get(burst, 0) - 1
        if left > 0:
            room.pending[burst] = left
        else:
            room.pending.pop(burst, None)
            if self.rate == 0 and self.sending:
                self._burst(room)
            elif not self.sending:
                self._check_done()

    def _check_done(self) -> None:
        if self.done is not None and not self.done.done() and not any(
                r.pending for r in self.rooms):
            self.done.set_result(None)

    def close(self) -> None:
        for room in self.rooms:
            for client in room.members:
                client.close()


# --- a process: connect, wait for go, run, report ---------------------------------------------


def _child(target: Target, rooms: list[str], sizes: list[int], rate: float, candidates: int,
           duration: float, conn: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(_run_child(target, rooms, sizes, rate, candidates, duration, conn))
    else:
        uvloop.run(_run_child(target, rooms, sizes, rate, candidates, duration, conn))


async def _run_child(target: Target, rooms: list[str], sizes: list[int], rate: float,
                     candidates: int, duration: float, conn: Any) -> None:
    loop = asyncio.get_running_loop()
    load = Load(target, rooms, sizes, rate, candidates)
    go = loop.create_future()

    def on_parent() -> None:
        try:
            msg = conn.recv()
        except EOFError:
            msg = "stop"
        if not go.done():
            go.set_result(msg)

    loop.add_reader(conn.fileno(), on_parent)

    async def reporter() -> None:
        while True:
            conn.send(("progress", load.report()))
            await asyncio.sleep(REPORT_EVERY)

    ticker = asyncio.ensure_future(reporter())
    await load.connect()
    conn.send(("ready", load.report()))
    if await go == "go":
        done = load.start(duration)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), duration + DRAIN_TIMEOUT)
        load.sending = False
    ticker.cancel()
    load.close()
    await asyncio.sleep(0)  # let the close frames go out
    conn.send(("done", load.report()))
    loop.remove_reader(conn.fileno())


# --- the parent: split, start, watch, summarize ------------------------------------------------


def percentile(hist: dict[int, int], q: float) -> float:
    total = sum(hist.values())
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return BASE ** (bucket + 0.5)  # the bucket's middle: within 1% of the value
    return 0.0


def merge(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"connected": 0, "connect_failures": {}, "sent": {}, "received": {},
                           "errors": {}, "dropped": 0, "hist": {}, "max": 0.0, "sum": 0.0,
                           "n": 0, "cpu": []}
    for r in reports:
        for key in ("connected", "dropped", "sum", "n"):
            out[key] += r[key]
        out["max"] = max(out["max"], r["max"])
        out["cpu"].append(r["cpu"])
        for key in ("connect_failures", "sent", "received", "errors", "hist"):
            for k, v in r[key].items():
                out[key][k] = out[key].get(k, 0) + v
    return out


def plan(clients: int, rooms: int, processes: int) -> list[tuple[list[str], list[int]]]:
    """Rooms and their sizes for each process; a room's members are all in one process."""
    sizes = [clients // rooms + (1 if i < clients % rooms else 0) for i in range(rooms)]
    names = [f"bench-{os.getpid()}-{i}" for i in range(rooms)]
    out: list[tuple[list[str], list[int]]] = [([], []) for _ in range(processes)]
    for i, (name, size) in enumerate(zip(names, sizes, strict=True)):
        out[i % processes][0].append(name)
        out[i % processes][1].append(size)
    return [p for p in out if p[0]]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


class Progress:
    """One line on stderr, rewritten in place on a terminal, else printed every 5 s."""

    def __init__(self, quiet: bool) -> None:
        self.tty = sys.stderr.isatty()
        self.quiet = quiet
        self.last = 0.0

    def show(self, text: str, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r\x1b[K" + text)
            sys.stderr.flush()
        elif force or now - self.last >= 5:
            self.last = now
            print(text, file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.tty and not self.quiet:
            sys.stderr.write("\n")


def run(args: argparse.Namespace) -> int:
    import multiprocessing
    from multiprocessing.connection import wait

    target = Target.parse(args.url, args.origin, args.insecure)
    rooms = max(1, min(args.rooms, args.clients // 2))
    per_process = plan(args.clients, rooms, max(1, args.processes))
    ctx = multiprocessing.get_context("fork")
    children = []
    for names, sizes in per_process:
        share = args.rate * sum(sizes) / args.clients
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(target, names, sizes, share, args.candidates,
                                                args.duration, child_end), daemon=True)
        proc.start()
        child_end.close()
        children.append((proc, parent_end))
    progress = Progress(args.quiet)
    latest: list[dict[str, Any]] = [merge([]) for _ in children]
    states = ["connecting"] * len(children)

    def poll(timeout: float) -> None:
        for conn in wait([c for _, c in children], timeout):
            i = next(k for k, (_, c) in enumerate(children) if c is conn)
            try:
                kind, report = conn.recv()
            except EOFError:
                states[i] = "gone"
                continue
            latest[i] = report
            if kind in ("ready", "done"):
                states[i] = kind

    def line(phase: str, rate: float) -> str:
        m = merge(latest)
        errors = sum(m["errors"].values()) + sum(m["connect_failures"].values()) + m["dropped"]
        return (f"{phase}  connected {m['connected']}/{args.clients}  {rate:,.0f} msg/s  "
                f"p50 {ms(percentile(m['hist'], 0.5))}  p99 {ms(percentile(m['hist'], 0.99))}"
                f"  errors {errors}")

    t0 = time.monotonic()
    try:
        while any(s == "connecting" for s in states):
            poll(0.25)
            progress.show(line("connecting", 0.0))
            if all(s == "gone" for s in states):
                break
        connect_s = time.monotonic() - t0
        for _, conn in children:
            with contextlib.suppress(OSError):
                conn.send("go")
        started = time.monotonic()
        before = merge(latest)
        cpu_before = list(before["cpu"])
        last_t, last_n = started, 0
        rate = 0.0
        while any(s not in ("done", "gone") for s in states):
            poll(0.25)
            now = time.monotonic()
            n = sum(merge(latest)["received"].values())
            if now - last_t >= 1.0:
                rate = (n - last_n) / (now - last_t)
                last_t, last_n = now, n
            left = max(0.0, args.duration - (now - started))
            progress.show(line(f"[{left:4.0f} s]", rate))
            if now - started > args.duration + DRAIN_TIMEOUT + 10:
                break
        elapsed = min(time.monotonic() - started, args.duration)
    finally:
        progress.end()
        for proc, _ in children:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    total = merge(latest)
    sent = sum(total["sent"].values())
    received = sum(total["received"].values())
    cpu = [max(0.0, c - b) / max(args.duration, 1e-9) * 100
           for c, b in zip(total["cpu"], cpu_before + [0.0] * len(total["cpu"]), strict=False)]
    result = {
        "url": args.url, "clients": args.clients, "rooms": rooms, "processes": len(children),
        "candidates": args.candidates, "rate": args.rate, "duration_s": round(elapsed, 3),
        "connected": total["connected"], "connect_s": round(connect_s, 3),
        "connect_failures": total["connect_failures"], "dropped": total["dropped"],
        "sent": total["sent"], "received": total["received"], "lost": sent - received,
        "throughput": round(received / args.duration, 1) if args.duration else 0.0,
        "latency_ms": {
            "p50": round(percentile(total["hist"], 0.5) * 1000, 3),
            "p99": round(percentile(total["hist"], 0.99) * 1000, 3),
            "max": round(total["max"] * 1000, 3),
            "mean": round(total["sum"] / total["n"] * 1000, 3) if total["n"] else 0.0,
        },
        "errors": total["errors"],
        "bench_cpu_pct": [round(c, 1) for c in cpu],
    }
    failed = bool(total["connect_failures"] or total["errors"] or total["dropped"]
                  or result["lost"] or not total["connected"])
    if args.json:
        print(orjson.dumps(result).decode())
    else:
        print(summary(result))
    return 1 if failed else 0


def summary(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    sent = sum(r["sent"].values())
    by_type = ", ".join(f"{k} {v:,}" for k, v in r["sent"].items())
    lines = [
        f"rtcsignal bench {r['url']}: {r['clients']} clients in {r['rooms']} rooms, "
        f"{r['candidates']} candidates a side, {r['processes']} process(es)",
        f"  connected   {r['connected']}/{r['clients']} in {r['connect_s']:.2f} s"
        + (f"; failed: {r['connect_failures']}" if r["connect_failures"] else ""),
        f"  sent        {sent:,} messages ({by_type}) in {r['duration_s']:.1f} s",
        f"  received    {sum(r['received'].values()):,} ({r['lost']:,} lost)",
        f"  throughput  {r['throughput']:,.0f} messages/s",
        f"  latency     p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms  max "
        f"{lat['max']:.2f} ms  (sender's write to receiver's read)",
        f"  errors      {sum(r['errors'].values())}"
        + (f" {r['errors']}" if r["errors"] else "")
        + (f"; {r['dropped']} connections dropped" if r["dropped"] else ""),
        f"  bench CPU   {', '.join(f'{c:.0f}%' for c in r['bench_cpu_pct'])} of a core per "
        "process",
    ]
    if any(c > 90 for c in r["bench_cpu_pct"]):
        lines.append("  warning: a bench process was near 100% of a core: it may be the "
                     "bottleneck; add --processes (on another machine, or other cores)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="ws:// or wss:// URL of the signaling "
                        "endpoint, e.g. ws://127.0.0.1:8083/signaling (a ?token=... is kept)")
    parser.add_argument("--clients", type=int, default=100, metavar="N",
                        help="WebSocket clients. Default: 100")
    parser.add_argument("--rooms", type=int, default=25, metavar="R",
                        help="rooms the clients are spread over (at least 2 per room). "
                        "Default: 25")
    parser.add_argument("--rate", type=float, default=1000.0, metavar="M",
                        help="messages per second over all clients; 0 = as fast as the "
                        "server delivers (one negotiation in flight per room). Default: 1000")
    parser.add_argument("--duration", type=float, default=10.0, metavar="S",
                        help="seconds of traffic, after every client has joined. Default: 10")
    parser.add_argument("--candidates", type=int, default=4, metavar="K",
                        help="ICE candidates each side sends per negotiation. Default: 4")
    parser.add_argument("--processes", type=int, default=1, metavar="P",
                        help="processes to spread the rooms over. Default: 1")
    parser.add_argument("--origin", metavar="ORIGIN", help="Origin header to send")
    parser.add_argument("--insecure", action="store_true",
                        help="wss:// without checking the server's certificate")
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON object on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def main(args: argparse.Namespace) -> int:
    if args.clients < 2 or args.rooms < 1 or args.duration <= 0 or args.rate < 0:
        print("rtcsignal: bench: needs --clients >= 2, --rooms >= 1, --duration > 0, "
              "--rate >= 0", file=sys.stderr)
        return 2
    if args.candidates < 0 or args.processes < 1:
        print("rtcsignal: bench: --candidates >= 0, --processes >= 1", file=sys.stderr)
        return 2
    try:
        Target.parse(args.url)
    except ValueError as exc:
        print(f"rtcsignal: bench: {exc}", file=sys.stderr)
        return 2
    per_client = args.rate / args.clients
    if per_client > 40 and not args.quiet:
        print(f"rtcsignal: bench: {per_client:.0f} messages/s per client is near the server's "
              "default --rate-limit (50/s): expect rate-limited errors unless it was raised",
              file=sys.stderr)
    random.seed()
    return run(args)
