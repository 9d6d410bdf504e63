"""In-process cost of the relay path, from bytes read to frames written: no sockets, no load
generator, so two commits can be compared with little noise on a busy 2-core machine.

A real ``SignalingService`` (not listening) gets two ``Connection`` objects over a fake
transport, upgraded by feeding them a real HTTP request; then A's ``data_received`` is fed
reads of K masked ICE-candidate messages addressed to B (``to``), and the service's flush
writes them. Prints microseconds per relayed message (median of repeats).

    .venv/bin/python bench/relay_path.py                       # this tree
    PYTHONPATH=build/bench-worktrees/4701425 build/bench-worktrees/4701425/.venv/bin/python \\
        bench/relay_path.py                                    # another commit's code
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import time

import rtcsignal
from rtcsignal import Config, SignalingService
from rtcsignal.server.connection import Connection

CANDIDATE = {
    "type": "ice-candidate",
    "candidate": {
        "candidate": "candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr "
                     "0.0.0.0 rport 0 generation 0 ufrag sXC4 network-cost 999",
        "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": "sXC4",
    },
}


SDP = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n" + "a=candidate:1 1 udp 2 1 9 typ host\r\n" * 100


class FakeTransport:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def set_write_buffer_limits(self, high: int) -> None: ...
    def get_write_buffer_size(self) -> int: return 0
    def can_write_eof(self) -> bool: return True
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def masked(payload: bytes) -> bytes:
    n = len(payload)
    assert n < 65536
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0xFE)) + n.to_bytes(2, "big")
    key = os.urandom(4)
    x = int.from_bytes(payload, "little") ^ int.from_bytes((key * (n // 4 + 1))[:n], "little")
    return head + key + x.to_bytes(n, "little")


def connect(svc: SignalingService) -> tuple[Connection, str]:
    conn = Connection(svc)
    t = FakeTransport()
    conn.connection_made(t)  # type: ignore[arg-type]
    key = base64.b64encode(os.urandom(16)).decode()
    conn.data_received((f"GET /signaling?room=r HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    ctx = getattr(conn, "context", None)
    # The Peer: the context (now), a (peer, admitted) context (6fc39f0), or conn.peer (older)
    peer = ctx[0] if isinstance(ctx, tuple) else ctx if ctx is not None else conn.peer
    return conn, peer.id


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8, help="messages per read")
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--receivers", type=int, default=0,
                    help="fan-out: broadcast to this many room members instead of `to` one")
    ap.add_argument("--payload", choices=("ice", "sdp"), default="ice")
    args = ap.parse_args()
    loop = asyncio.new_event_loop()
    svc = SignalingService(Config(rate_limit=1e12, rate_burst=1e12, log_level="warning"))
    svc.loop = loop
    for extra in ("rate_limit_bytes", "rate_burst_bytes"):
        if hasattr(svc.config, extra):
            svc.config = svc.config.replace(**{extra: 1 << 40})
    a, _ = connect(svc)
    _, b_id = connect(svc)
    for _ in range(max(0, args.receivers - 1)):
        connect(svc)
    svc._flush()
    message = dict(CANDIDATE) if args.payload == "ice" else {"type": "offer", "sdp": SDP}
    if not args.receivers:
        message["to"] = b_id
    read = b"".join(masked(json.dumps(message).encode()) for _ in range(args.batch))
    results = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.reads):
            a.data_received(read)
            svc._flush()
        results.append((time.perf_counter() - t0) / (args.reads * args.batch) * 1e6)
    print(json.dumps({"code": os.path.dirname(rtcsignal.__file__), "batch": args.batch,
                      "receivers": args.receivers, "payload": args.payload,
                      "us_per_message": round(statistics.median(results), 3),
                      "min": round(min(results), 3)}))


if __name__ == "__main__":
    main()
