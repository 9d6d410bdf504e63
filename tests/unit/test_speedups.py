"""The compiled hot path (``protocol/_speedups.pyx``, ``core/_speedups.pyx``) against the
pure-Python code it stands in for, in one process: same inputs, same outputs, same state.

The whole unit suite also runs twice (``make test``): with the compiled path and with
``RTCSIGNAL_PURE=1``. These tests skip when the compiled modules are not in use, except the
first, which fails when ``RTCSIGNAL_REQUIRE_COMPILED=1`` says they must be (a silently
failed build would otherwise run the pure code twice).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtcsignal.core import hub as hub_module
from rtcsignal.core.hub import Hub, Peer
from rtcsignal.core.ratelimit import MessageBudget, TokenBucket
from rtcsignal.protocol import frames, session
from rtcsignal.protocol.session import Session
from tests.unit.sinks import Recorder
from tests.unit.test_session import client_frame

PURE = os.environ.get("RTCSIGNAL_PURE", "") not in ("", "0")
compiled = pytest.mark.skipif(not frames.COMPILED or hub_module.RELAY is None,
                              reason="compiled hot path not built or RTCSIGNAL_PURE set")


def test_compiled_path_in_use_when_required() -> None:
    if os.environ.get("RTCSIGNAL_REQUIRE_COMPILED", "") in ("", "0"):
        pytest.skip("RTCSIGNAL_REQUIRE_COMPILED not set")
    assert frames.COMPILED is not PURE
    assert (hub_module.RELAY is None) is PURE
    assert (session.scan_text is None) is PURE
    from rtcsignal.server import connection  # the transport glue (server/_speedups.pyx)
    assert (connection.COMPILED_GLUE is None) is PURE


# --- frames ----------------------------------------------------------------------------------


@compiled
@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4), st.booleans())
def test_unmask_matches(payload: bytes, mask: bytes, as_bytearray: bool) -> None:
    p = bytearray(payload) if as_bytearray else payload
    m = bytearray(mask) if as_bytearray else mask
    assert frames.unmask(p, m) == frames._unmask_py(payload, mask)


@compiled
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 125, 126, 127, 65535, 65536, 70000])
def test_unmask_and_encode_text_at_length_edges(n: int) -> None:
    payload, mask = os.urandom(n), os.urandom(4)
    assert frames.unmask(payload, mask) == frames._unmask_py(payload, mask)
    assert frames.encode_text(payload) == frames._encode_text_py(payload)
    assert frames.encode_text(payload) == frames.encode_frame(frames.OP_TEXT, payload)
    assert frames.unmask(memoryview(payload), mask) == frames._unmask_py(payload, mask)


# --- the frame reader --------------------------------------------------------------------------


#: Client frames with a fixed mask (the session tests' helper): examples replay exactly.
frame = functools.partial(client_frame, mask=b"\x37\xfa\x21\x3d")


texts = st.one_of(
    st.text(max_size=40).map(str.encode),
    st.binary(max_size=40),  # often not UTF-8: 1007 at that frame
    st.sampled_from([b'{"type":"offer"}', "é€😀".encode(), b"\xed\xa0\x80", b"x" * 130]),
)
frames_st = st.one_of(
    texts.map(lambda t: frame(1, t)),
    texts.map(lambda t: frame(1, t, mask=b"\0\0\0\0")),
    texts.map(lambda t: frame(1, t, fin=False)),  # a fragment
    texts.map(lambda t: frame(0, t)),  # a continuation
    st.binary(max_size=20).map(lambda b: frame(2, b)),
    st.binary(max_size=20).map(lambda b: frame(9, b)),
    st.binary(max_size=20).map(lambda b: frame(10, b)),
    st.just(frame(8, b"\x03\xe8")),
    texts.map(lambda t: frame(1, t, rsv=1)),
    texts.map(lambda t: frame(1, t, masked=False)),
    st.just(frame(1, b"x" * 200)),  # over the session's max size below
    st.just(frame(1, b"y" * 70, length=2**63)),
    st.just(frame(3, b"")),  # reserved opcode
)


def run(stream: bytes, cuts: list[int], scan: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(session, "scan_text", scan)
    s = Session(150)
    events = []
    pos = 0
    for cut in [*sorted(cuts), len(stream)]:
        events.append(s.receive_data(stream[pos:cut]))
        pos = max(pos, cut)
    failure = (s.failure.code, s.failure.reason) if s.failure else None
    return (events, failure, s.close_transport, s.state, s.buffered(), s.data_to_send(),
            s.peer_close_code, s.ping_pending)


@compiled
@settings(max_examples=400)
@given(st.lists(frames_st, max_size=8), st.lists(st.integers(0, 2000), max_size=4),
       st.booleans())
def test_session_reads_the_same(parts: list[bytes], cuts: list[int], closing: bool) -> None:
    stream = b"".join(parts)
    cuts = [c for c in cuts if c <= len(stream)]
    with pytest.MonkeyPatch.context() as mp:
        compiled_run = run(stream, cuts, session.scan_text, mp)
        pure_run = run(stream, cuts, None, mp)
    assert compiled_run == pure_run


@compiled
def test_scan_stops_where_the_python_loop_must_go_on() -> None:
    good = frame(1, b'{"type":"offer"}')
    data = good * 3 + frame(9, b"p") + good
    events, pos = session.scan_text(data, 1000)
    assert events == [(1, b'{"type":"offer"}')] * 3 and pos == 3 * len(good)
    assert session.scan_text(good[:-1], 1000) == ([], 0)  # partial
    assert session.scan_text(bytearray(good), 1000) == ([], 0)  # only bytes are scanned


# --- the relay ---------------------------------------------------------------------------------


#: A peer id JSON must escape (the compiled stamp splices plain ids only).
ODD_ID = 'f"\u00fc\u2028\\'


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_hub(fast: bool, rate: float = 1e9, burst: float = 1e9,
             clock: Clock | None = None) -> tuple[Hub, dict[str, Peer]]:
    hub = Hub(clock=clock or Clock())
    hub.use_compiled(fast)
    assert (hub.fast is not None) is fast
    peers = {}
    for key, rooms in (("a", ["r1"]), ("b", ["r1", "r2"]), ("c", ["r1", "r2"]), ("d", []),
                       ("e", ["r3"]), ("f", ["r1"])):
        bucket = (MessageBudget(rate, burst, 1e9, 1e9, 0) if key in "bdf"
                  else TokenBucket(rate, burst, 0))
        p = Peer(Recorder(), bucket, peer_id=ODD_ID if key == "f" else key)
        hub.add(p)
        for r in rooms:
            hub.join(p, r)
        peers[key] = p
    for kind in ("offer", "answer", "ice-candidate"):  # counted: the compiled path may relay
        hub.handle_text(peers["a"], json.dumps({"type": kind, "to": "b"}).encode())
    for p in peers.values():
        p.sink.frames.clear()  # type: ignore[attr-defined]
    return hub, peers


def snapshot(hub: Hub, peers: dict[str, Peer]) -> Any:
    m = hub.metrics
    sinks = {pid: (list(p.sink.frames), list(p.sink.closed))  # type: ignore[attr-defined]
             for pid, p in peers.items()}
    return sinks, dict(m.received), dict(m.relayed), m.deliveries, dict(m.errors)


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=6,
)
messages = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["offer", "answer", "ice-candidate", "custom", "", "x" * 65,
                                 "ping", "join", "pong", "error"]) | values,
        "to": st.sampled_from(["a", "b", "c", "d", "e", ODD_ID, "zz"]) | values,
        "room": st.sampled_from(["r1", "r2", "r9"]) | values,
        "from": st.sampled_from(["b", "mallory"]),
        "id": values,
        "sdp": values,
        "n": st.sampled_from([10**17, 2**64, -(2**63) - 1, 1e20, "e+5"]),
    },
)
relayable = st.fixed_dictionaries(  # mostly what the compiled path relays
    {"type": st.sampled_from(["offer", "answer", "ice-candidate", "custom"]),
     "to": st.sampled_from(["a", "b", "c", "d", "e", ODD_ID])},
    optional={"sdp": values, "id": values, "candidate": values, "room": st.none(),
              "n": st.sampled_from([10**17, 2**64, 1e20, "x+1", "1e+5"])},
)
raw = st.sampled_from([b"not json", b"[1]", b'"s"', b'{"type":"offer","to":"b","to":"c"}',
                       b'{"type":"offer","to":"b","big":123456789012345678901234}',
                       b'{"type":"offer","to":"b","f":1e+400}'])


@compiled
@settings(max_examples=400)
@given(st.lists(st.tuples(st.sampled_from("aabbccdeff"),
                          (messages | relayable).map(lambda m: json.dumps(m).encode()) | raw),
                max_size=12))
def test_hub_relays_the_same(sends: list[tuple[str, bytes]]) -> None:
    (fast, fp), (slow, sp) = make_hub(True), make_hub(False)
    for sender, text in sends:
        fast.handle_text(fp[sender], text)
        slow.handle_text(sp[sender], text)
        assert snapshot(fast, fp) == snapshot(slow, sp)


@compiled
@settings(max_examples=150)
@given(st.lists(st.tuples(st.sampled_from("aabbcd"),
                          st.sampled_from(["offer", "answer", "ping", "join"]),
                          st.sampled_from(["b", "c", "zz"]),
                          st.sampled_from(["send", "send", "send", "tick", "hold", "release",
                                           "debug"])),
                max_size=30))
def test_hub_admits_and_holds_the_same(steps: list[tuple[str, str, str, str]]) -> None:
    """Rate limits (refusals, the 1008 close of a long flood), the backlog of a join in
    flight and debug logging, through the compiled handle_text and the method."""
    clocks = Clock(), Clock()
    (fast, fp), (slow, sp) = (make_hub(True, 2.0, 3.0, clocks[0]),
                              make_hub(False, 2.0, 3.0, clocks[1]))
    for sender, kind, to, op in steps:
        for hub, peers, clock in ((fast, fp, clocks[0]), (slow, sp, clocks[1])):
            if op == "tick":
                clock.now += 1.7
            elif op == "hold":
                hub.hold(peers[sender], "x")
            elif op == "release":
                hub.unblock(peers[sender], "x")
                hub.replay(peers[sender])
            elif op == "debug":
                hub.debug = not hub.debug
            else:
                hub.handle_text(peers[sender], json.dumps({"type": kind, "to": to}).encode())
        assert snapshot(fast, fp) == snapshot(slow, sp)
        assert [p.backlog for p in fp.values()] == [p.backlog for p in sp.values()]
        assert [p.limited_since for p in fp.values()] == [p.limited_since for p in sp.values()]


@compiled
def test_hub_fast_path_relays_and_counts() -> None:
    hub, peers = make_hub(True)  # offer, answer and ice-candidate counted once each
    # a type not counted yet is left to the Python path (count_received labels it)
    new = b'{"type":"new","to":"b"}'
    assert hub_module.RELAY(hub, peers["a"], new) == json.loads(new)
    text = b'{"type":"offer","to":"b","sdp":"v=0"}'
    assert hub_module.RELAY(hub, peers["a"], text) is True
    assert json.loads(peers["b"].sink.frames[-1]) == {  # type: ignore[attr-defined]
        "from": "a", "type": "offer", "to": "b", "sdp": "v=0"}
    assert hub.metrics.deliveries == 4 and hub.metrics.relayed["offer"] == 2
    # what it does not relay comes back parsed, nothing counted or sent
    for text, back in ((b'{"type":"offer","room":"r1"}', dict), (b'{"type":"join"}', dict),
                       (b'{"type":"offer","to":"e"}', dict), (b'{"type":"offer"}', dict),
                       (b'{"type":"offer","to":"b","from":"x"}', dict),
                       (b'{"type":"offer","to":"b","x":1e20}', dict), (b"nope", type(None))):
        assert type(hub_module.RELAY(hub, peers["a"], text)) is back
    assert hub.metrics.deliveries == 4 and hub.metrics.received["offer"] == 2


@compiled
def test_a_build_from_another_source_is_not_used(tmp_path: Any) -> None:
    source = tmp_path / "_speedups.pyx"
    source.write_text("# another version\n")
    with pytest.warns(RuntimeWarning, match="another version"):
        assert frames.load_speedups("rtcsignal.protocol._speedups", str(source)) is None
    here = os.path.join(os.path.dirname(frames.__file__), "_speedups.pyx")
    assert frames.load_speedups("rtcsignal.protocol._speedups", here) is not None
    # an installed wheel without the .pyx: the build is trusted
    assert frames.load_speedups("rtcsignal.protocol._speedups", str(tmp_path / "no")) is not None


@compiled
def test_slot_offsets_are_taken_only_from_slots() -> None:
    """The compiled code reads ``__slots__`` at their offsets: a class whose attribute is not
    a slot (a property, a class attribute) is refused at install, not read as memory."""
    class NotSlots:
        id = property(lambda self: "x")

    class NoSuchSlot:
        __slots__ = ("sink",)

    speedups = hub_module._compiled
    for cls in (NotSlots, NoSuchSlot):
        with pytest.raises((TypeError, KeyError)):
            speedups.install(cls)
    speedups.install(Peer)  # what hub.py installed: still works
    hub, peers = Hub(clock=lambda: 0.0), {}
    for name in ("a", "b"):
        peers[name] = Peer(Recorder(), TokenBucket(100, 100, 0.0), peer_id=name)
        hub.add(peers[name])
        hub.join(peers[name], "r")
    hub.handle_text(peers["a"], b'{"type":"offer","to":"b"}')  # labels the type
    assert hub_module.RELAY(hub, peers["a"], b'{"type":"offer","to":"b"}') is True
    assert peers["b"].sink.frames[-1] == peers["b"].sink.frames[-2]
    assert peers["b"].sink.frames[-1].startswith(b'{"from":"a"')
