"""Fuzz target for the WebSocket session engine and the routing core (issue 5).

Run:  python -m tests.fuzz_core --seconds 300      (or: make fuzz, FUZZ_SECONDS=300)

Hypothesis generates the inputs; the run repeats batches of examples until the time is up
and stops at the first failure, printing the (shrunk) falsifying example. Targets:

- ``frames_random``: arbitrary bytes (biased towards plausible frame headers), fed in
  arbitrary chunks into ``Session.receive_data``, sometimes with our own ``close()`` in
  between. ``receive_data`` never raises; a failure carries 1002, 1007 or 1009 and queues a
  close frame with that code; every event has a valid opcode and size, text is UTF-8, no
  event follows the peer's close (nor any data event our close); memory held stays within
  max_size + one control frame + frame headers, however the input is chunked.
- ``frames_mutated``: well-formed streams with a few bytes flipped, inserted or deleted,
  checked like ``frames_random``.
- ``frames_valid``: well-formed client streams (fragmented messages with control frames
  interleaved, a valid close), fed in arbitrary chunks: the session returns exactly the
  events sent (one FRAGMENT per non-final frame) and never fails, except with 1009 at the
  frame that takes a message over max_size (nothing after it is returned).
- ``hub``: a Hub with several peers in rooms receives arbitrary bytes and arbitrary JSON
  messages (join/leave/ping/relay with odd ``to``/``room``/``id``/``meta``/``from``, deeply
  nested values), binary frames and disconnects. ``handle_text`` must never raise, every
  frame the hub sends must be a JSON object with a string ``type``, and the bookkeeping must
  stay consistent (room members <-> peer rooms, no empty rooms, default room = peers in no
  named room, limits respected).
"""

from __future__ import annotations

import argparse
import itertools
import json
import struct
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rtcsignal.core.hub import Hooks, Hub, Peer
from rtcsignal.core.ratelimit import TokenBucket
from rtcsignal.protocol.session import FRAGMENT, OPEN, Session
from tests.unit.sinks import Recorder

MAX_SIZE = 512
MAX_HEADER = 14  # 2 + 8 (64-bit length) + 4 (mask)
TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
EVENT_OPS = {TEXT, BINARY, CLOSE, PING, PONG, FRAGMENT}
VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                     3000, 4000, 4999]
ROOMS = ["a", "b", "c", "d.e", "", "bad name", "x" * 129]
TYPES = ["join", "leave", "ping", "offer", "answer", "ice-candidate", "connected", "error",
         "joined", "left", "peer-joined", "peer-left", "pong", "", "x" * 65]
KEYS = ["type", "to", "room", "id", "meta", "from", "sdp", "candidate"]


# --- session --------------------------------------------------------------------------------


def client_frame(op: int, payload: bytes, fin: bool, mask: bytes) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | op])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_close_code(data: bytes) -> int:
    """The code of the single unmasked close frame ``data`` must be (decoded here)."""
    assert len(data) >= 4 and data[0] == 0x80 | CLOSE and data[1] == len(data) - 2, data
    assert data[1] <= 125
    data[4:].decode()
    return struct.unpack("!H", data[2:4])[0]


class Checked:
    """A session fed chunk by chunk, every event and every state checked on the way."""

    def __init__(self) -> None:
        self.session = Session(MAX_SIZE)
        self.session.ping()  # outstanding until a pong arrives
        self.events: list[tuple[int, bytes]] = []
        self.peer_closed = False  # the peer's close event came out
        self.we_closed = False

    def close(self) -> None:
        s = self.session
        was_open = s.state is OPEN
        frame = s.close(1001, "bye")
        if not was_open:  # closing or closed already: no (second) close frame
            assert frame == b"", frame
        else:
            assert server_close_code(frame) == 1001
        self.we_closed = True

    def feed(self, chunk: bytes) -> None:
        s = self.session
        was_over = s.close_transport
        events = s.receive_data(chunk)
        if was_over:
            assert events == [], events
        for op, payload in events:
            assert not self.peer_closed, "event after the peer's close"
            assert op in EVENT_OPS, op
            if op == FRAGMENT:
                assert payload == b""
            elif op >= CLOSE:
                assert len(payload) <= 125, (op, len(payload))
            else:
                assert len(payload) <= MAX_SIZE, (op, len(payload))
            if op == TEXT:
                payload.decode("utf-8")
            elif op == PONG:
                assert not s.ping_pending
            if self.we_closed:
                assert op not in (TEXT, BINARY, FRAGMENT), "data delivered after close()"
            if op == CLOSE:
                self.peer_closed = True
                assert len(payload) != 1
                assert s.peer_close_code is not None
                assert s.close_transport and s.failure is None
        self.events += events
        sent = s.data_to_send()
        if s.failure is not None and not was_over:
            assert s.failure.code in (1002, 1007, 1009), s.failure.code
            assert s.close_transport
            if self.we_closed:
                assert sent == b""
            else:
                assert server_close_code(sent) == s.failure.code
        elif self.peer_closed and not was_over and not self.we_closed:
            code = s.peer_close_code
            assert server_close_code(sent) == (1000 if code == 1005 else code)
        else:
            assert sent == b"", sent
        # Memory: the partial message (<= max_size) plus the one frame in progress: its
        # header and, beyond max_size, at most a control frame's 125 bytes. Independent of
        # how the input is chunked.
        assert s.buffered() <= MAX_SIZE + MAX_HEADER + 125, s.buffered()


def feed_chunks(checked: Checked, stream: bytes, cuts: list[int],
                close_at: int | None = None) -> list[tuple[int, bytes]]:
    """Feed ``stream`` in chunks of the sizes in ``cuts`` (the rest in one last chunk);
    our ``close()`` before chunk number ``close_at``."""
    pos = 0
    for k, c in enumerate([*cuts, len(stream)]):
        if k == close_at:
            checked.close()
        chunk = stream[pos : pos + c]
        pos += len(chunk)
        checked.feed(chunk)
        if pos >= len(stream):
            break
    return checked.events


def _settings(batch: int, shrink: bool) -> settings:
    phases = [Phase.generate, Phase.target] + ([Phase.shrink] if shrink else [])
    return settings(max_examples=batch, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), phases=phases)


def close_bodies() -> st.SearchStrategy[bytes]:
    return st.just(b"") | st.builds(
        lambda code, reason: struct.pack("!H", code) + reason.encode()[:123]
        .decode(errors="ignore").encode(),
        st.sampled_from(VALID_CLOSE_CODES), st.text(max_size=40))


Built = tuple[bytes, list[tuple[int, bytes]], int | None]


def valid_streams() -> st.SearchStrategy[Built]:
    """(stream, expected events, expected failure code) of well-formed client frames. A
    message may exceed MAX_SIZE: the session then fails with 1009 at the header of the frame
    that crosses it, and the events expected stop there."""
    control = st.tuples(st.sampled_from([PING, PONG]), st.binary(max_size=125))
    over = MAX_SIZE + 64
    near_max = st.integers(MAX_SIZE - 16, over).flatmap(lambda n: st.binary(min_size=n,
                                                                             max_size=n))
    payloads = (st.binary(max_size=over) | st.text(max_size=over // 4).map(str.encode)
                | near_max)
    message = st.tuples(
        st.sampled_from([TEXT, BINARY]),
        payloads,
        st.lists(st.integers(0, over), max_size=5),  # fragment boundaries
        st.lists(st.lists(control, max_size=2), min_size=6, max_size=6),  # between them
    )
    close = st.tuples(st.just(CLOSE), close_bodies())

    def build(items: list[Any], mask: bytes) -> Built:
        stream, expected = b"", []
        done = False  # the peer's close or an oversized message: nothing more is expected
        code = None
        for item in items:
            if len(item) == 2:  # a lone control frame
                op, payload = item
                stream += client_frame(op, payload, True, mask)
                if not done:
                    expected.append((op, payload))
                done = done or op == CLOSE
                continue
            op, payload, cuts, between = item
            if op == TEXT:
                payload = payload.decode(errors="ignore").encode()
            bounds = [0, *sorted(c for c in cuts if c <= len(payload)), len(payload)]
            frags = [payload[a:b] for a, b in itertools.pairwise(bounds)]
            for i, frag in enumerate(frags):
                last = i == len(frags) - 1
                stream += client_frame(op if i == 0 else CONT, frag, last, mask)
                if not done and bounds[i + 1] > MAX_SIZE:
                    done, code = True, 1009
                if not last:
                    if not done:
                        expected.append((FRAGMENT, b""))
                    for cop, cpayload in between[i % 6]:
                        stream += client_frame(cop, cpayload, True, mask)
                        if not done:
                            expected.append((cop, cpayload))
            if not done:
                expected.append((op, payload))
        return stream, expected, code

    return st.builds(build, st.lists(message | control | close, max_size=8),
                     st.binary(min_size=4, max_size=4))


def make_frame_targets(batch: int, shrink: bool = True) -> list[Callable[[], None]]:
    cfg = _settings(batch, shrink)

    # Random bytes, with a bias towards plausible headers so the session gets past byte 2.
    header_byte = st.integers(0, 255)
    plausible = st.builds(
        lambda b0, ln, body: bytes([b0, 0x80 | ln]) + body,
        st.sampled_from([0x01, 0x02, 0x00, 0x81, 0x82, 0x80, 0x88, 0x89, 0x8A, 0x83, 0xC1,
                         0x09]) | header_byte,
        st.integers(0, 127),
        st.binary(max_size=140),
    )
    streams = st.lists(st.binary(max_size=200) | plausible, max_size=12).map(b"".join)
    close_at = st.none() | st.integers(0, 3)
    # Chunk sizes: mostly small, so frames (and text characters) are split everywhere.
    cuts = st.lists(st.integers(1, 7) | st.integers(1, 300), max_size=40)

    @cfg
    @given(streams, cuts, close_at)
    def frames_random(stream: bytes, cuts: list[int], close_at: int | None) -> None:
        feed_chunks(Checked(), stream, cuts, close_at)

    edit = st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 1 << 16),
                     st.integers(0, 255))

    @cfg
    @given(valid_streams(), st.lists(edit, min_size=1, max_size=4),
           cuts, close_at)
    def frames_mutated(built: Built, edits: list[tuple[str, int, int]],
                       cuts: list[int], close_at: int | None) -> None:
        data = bytearray(built[0])
        for kind, where, value in edits:
            i = where % (len(data) + 1)
            if kind == "insert":
                data[i:i] = bytes([value])
            elif i < len(data):
                if kind == "flip":
                    data[i] ^= value or 0x80
                else:
                    del data[i]
        feed_chunks(Checked(), bytes(data), cuts, close_at)

    @cfg
    @given(valid_streams(), cuts)
    def frames_valid(built: Built, cuts: list[int]) -> None:
        stream, expected, code = built
        checked = Checked()
        assert feed_chunks(checked, stream, cuts) == expected
        s = checked.session
        if code is None:
            assert s.failure is None, s.failure
        else:
            assert s.failure is not None and s.failure.code == code, s.failure
        assert s.buffered() == 0

    return [frames_random, frames_mutated, frames_valid]


# --- hub -----------------------------------------------------------------------------------


class Sink(Recorder):
    """The shared recording sink, also checking the types of what close is given."""

    def close(self, code: int, reason: str) -> None:
        assert isinstance(code, int) and isinstance(reason, str)
        super().close(code, reason)


def json_values(max_depth: int) -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
    nested = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4),
        max_leaves=12,
    )

    def deep(depth: int, kind: str, leaf: Any) -> Any:
        v = leaf
        for _ in range(depth):
            v = [v] if kind == "list" else {"k": v}
        return v

    deeply = st.builds(deep, st.integers(0, max_depth), st.sampled_from(["list", "dict"]),
                       scalars)
    return nested | deeply


def check_hub(hub: Hub, gone: set[str]) -> None:
    for name, room in hub.rooms.items():
        assert room.name == name
        assert room.members, f"empty room {name!r} kept"
        assert room.members.keys() == room.meta.keys()
        if hub.max_peers_per_room:
            assert len(room.members) <= hub.max_peers_per_room
        for pid, peer in room.members.items():
            assert hub.peers.get(pid) is peer, f"{pid} in {name} but not connected"
            assert peer.rooms.get(name) is room, f"{pid} in {name} but not vice versa"
    for pid, peer in hub.peers.items():
        assert peer.id == pid
        assert len(peer.rooms) <= hub.max_rooms_per_peer
        for name, room in peer.rooms.items():
            assert hub.rooms.get(name) is room, f"{pid} thinks it is in {name}"
            assert room.members.get(pid) is peer
        if hub.lobby is not None:
            assert (pid in hub.lobby.members) == (not peer.rooms), pid
    if hub.lobby is not None:
        assert hub.lobby.members.keys() <= hub.peers.keys()
    assert not (gone & hub.peers.keys())


def check_frames(sink: Sink) -> None:
    for frame in sink.frames:
        obj = json.loads(frame.decode("utf-8"))
        assert isinstance(obj, dict) and isinstance(obj.get("type"), str), frame
    sink.frames.clear()


def make_hub_target(batch: int, max_depth: int, shrink: bool = True) -> Callable[[], None]:
    cfg = _settings(batch, shrink)
    values = json_values(max_depth)

    @cfg
    @given(st.data(), st.booleans(), st.integers(0, 4), st.sampled_from(["none", "pass",
                                                                         "rewrite", "drop"]))
    def hub(data: st.DataObject, default_room: bool, max_peers: int, hook: str) -> None:
        now = [0.0]
        hooks = Hooks()
        if hook == "pass":
            hooks.on_message = lambda p, m: m
        elif hook == "rewrite":
            hooks.on_message = lambda p, m: {"type": "rewritten", "orig": m}
        elif hook == "drop":
            hooks.on_message = lambda p, m: None
        hooks.on_join = lambda p, room, meta: room != "d.e"
        hub = Hub(clock=lambda: now[0], default_room=default_room, max_rooms_per_peer=3,
                  max_peers_per_room=max_peers, max_meta_size=256, hooks=hooks)
        peers: list[Peer] = []
        gone: set[str] = set()
        serial = [0]

        def connect() -> None:
            serial[0] += 1
            small = data.draw(st.booleans(), label="rate-limited peer")
            bucket = TokenBucket(1.0, 3.0, now[0]) if small else TokenBucket(1e9, 1e9, 0)
            p = Peer(Sink(), bucket, peer_id=f"p{serial[0]}",
                     user=data.draw(st.none() | st.just("u"), label="user"))
            hub.add(p)
            peers.append(p)

        for _ in range(data.draw(st.integers(1, 5), label="initial peers")):
            connect()
        for _ in range(data.draw(st.integers(0, 4), label="initial joins")):
            p = data.draw(st.sampled_from(peers))
            hub.handle_text(p, json.dumps({"type": "join", "room": data.draw(
                st.sampled_from(ROOMS[:4]))}).encode())

        def field(key: str) -> Any:
            if key == "to":
                ids = [p.id for p in peers] + sorted(gone)
                return data.draw(st.sampled_from(ids) | values if ids else values, label="to")
            if key == "room":
                return data.draw(st.sampled_from(ROOMS) | values, label="room")
            if key == "type":
                return data.draw(st.sampled_from(TYPES) | values, label="type")
            return data.draw(values, label=key)

        steps = data.draw(st.integers(1, 25), label="steps")
        for _ in range(steps):
            if not peers:
                connect()
            action = data.draw(st.sampled_from(
                ["json", "json", "json", "json", "bytes", "binary", "remove", "connect",
                 "tick"]), label="action")
            p = data.draw(st.sampled_from(peers), label="peer")
            if action == "json":
                keys = data.draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=6),
                                 label="keys")
                obj = {k: field(k) for k in keys}
                if data.draw(st.booleans(), label="non-object"):
                    obj = field("x")  # any JSON value, usually not an object
                text = json.dumps(obj)
                if data.draw(st.booleans(), label="pad"):
                    text = " \n" + text + "\t "
                hub.handle_text(p, text.encode())
            elif action == "bytes":
                hub.handle_text(p, data.draw(st.binary(max_size=64), label="raw"))
            elif action == "binary":
                hub.handle_binary(p)
            elif action == "connect":
                connect()
            elif action == "tick":
                now[0] += data.draw(st.sampled_from([0.1, 1.0, 6.0]), label="dt")
            else:
                hub.remove(p, data.draw(st.sampled_from(["closed", "timeout"])))
                peers.remove(p)
                gone.add(p.id)
            # A sink closed by the hub (rate limit) is detached by the adapter.
            for q in list(peers):
                assert isinstance(q.sink, Sink)
                check_frames(q.sink)
                if q.sink.closed:
                    hub.remove(q, "closed")
                    peers.remove(q)
                    gone.add(q.id)
            check_hub(hub, gone)

    return hub


# --- driver --------------------------------------------------------------------------------


def run(seconds: float, batch: int = 200, max_depth: int = 600, verbose: bool = True,
        shrink: bool = True) -> int:
    """Run every target in turn until ``seconds`` have passed. 0 = nothing found."""
    targets = [*make_frame_targets(batch, shrink), make_hub_target(batch, max_depth, shrink)]
    start = time.monotonic()
    rounds = 0
    while True:
        for target in targets:
            try:
                target()
            except Exception:
                if verbose:
                    traceback.print_exc()
                    print(f"FOUND a failure in {target.__name__} after "
                          f"{time.monotonic() - start:.1f} s", file=sys.stderr)
                return 1
        rounds += 1
        if time.monotonic() - start >= seconds:
            break
    if verbose:
        n = rounds * batch
        print(f"fuzz_core: {rounds} rounds, ~{n} examples per target ({len(targets)} targets) "
              f"in {time.monotonic() - start:.1f} s: nothing found")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--batch", type=int, default=200, help="examples per target per round")
    parser.add_argument("--max-depth", type=int, default=600,
                        help="deepest JSON nesting generated (orjson parses up to 1024)")
    args = parser.parse_args(argv)
    return run(args.seconds, args.batch, args.max_depth)


if __name__ == "__main__":
    sys.exit(main())
