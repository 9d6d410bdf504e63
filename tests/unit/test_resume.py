"""Resume in the pure core: the mailbox, parking, expiry, moving a peer between hubs."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from rtcsignal.core.hub import Hub, Peer
from rtcsignal.core.resume import Mailbox, sender_and_ref, token_key
from rtcsignal.protocol.frames import OP_TEXT, encode_frame, payload_of, split_frames
from tests.unit.sinks import Recorder
from tests.unit.test_hub import drain_all, make_peer, send, sink


def room_of_two(hub: Hub) -> tuple[Peer, Peer]:
    a, b = make_peer(hub, "a"), make_peer(hub, "b")
    send(hub, a, {"type": "join", "room": "r"})
    send(hub, b, {"type": "join", "room": "r"})
    drain_all(a, b)
    return a, b


def test_a_parked_peer_keeps_its_rooms_and_gets_the_gap_in_order() -> None:
    hub = Hub(clock=lambda: 0.0)
    a, b = room_of_two(hub)
    hub.park(a, 10, 1 << 20)
    send(hub, b, {"type": "offer", "to": "a", "id": 1})
    send(hub, b, {"type": "note"})
    assert sink(b).drain() == []  # no peer-left, nothing refused
    assert hub.connected() == 1 and len(hub.peers) == 2
    new = Recorder()
    _, kept, missed = hub.resume_local(a, new)
    assert missed == 0
    assert [json.loads(f) for f in kept] == [
        {"type": "offer", "to": "a", "id": 1, "from": "b"}, {"type": "note", "from": "b"}]
    send(hub, b, {"type": "after", "to": "a"})
    assert new.drain() == [{"type": "after", "to": "a", "from": "b"}]
    assert hub.connected() == 2


def test_overflow_and_expiry_tell_each_sender_with_an_id_once() -> None:
    hub = Hub(clock=lambda: 0.0)
    a, b = room_of_two(hub)
    hub.park(a, 2, 1 << 20)
    for n in range(4):
        send(hub, b, {"type": "offer", "to": "a", "id": n})
    send(hub, b, {"type": "offer", "to": "a"})  # no id: nobody to tell
    assert sink(b).drain() == [{"type": "expired", "ref": 2, "to": "a"},
                               {"type": "expired", "ref": 3, "to": "a"}]
    hub.expire(a)
    assert sink(b).drain() == [
        {"type": "expired", "ref": 0, "to": "a"}, {"type": "expired", "ref": 1, "to": "a"},
        {"type": "peer-left", "room": "r", "peerId": "a", "reason": "timeout"}]
    assert "a" not in hub.peers and hub.connected() == 1


def test_a_token_works_once_and_ends_with_the_peer() -> None:
    hub = Hub(clock=lambda: 0.0)
    a = make_peer(hub, "a")
    first = hub.new_token(a)
    assert hub.tokens[token_key(first)] is a
    second = hub.new_token(a)
    assert token_key(first) not in hub.tokens and hub.tokens[token_key(second)] is a
    hub.remove(a, "closed")
    assert hub.tokens == {}


def test_release_and_adopt_move_a_peer_without_presence_events() -> None:
    old, new = Hub(clock=lambda: 0.0), Hub(clock=lambda: 0.0)
    a, b = room_of_two(old)
    old.park(a, 10, 1 << 20)
    send(old, b, {"type": "offer", "to": "a", "id": 1})
    released = old.release("a", "n2")
    assert released is not None
    _, kept, missed = released
    assert [json.loads(f)["id"] for f in kept] == [1] and missed == 0
    assert "a" not in old.peers and old.rooms["r"].remote["a"].node == "n2"
    assert sink(b).drain() == []  # no peer-left
    moved = Peer(Recorder(), a.bucket, peer_id="a")
    member = old.rooms["r"].remote["a"]
    old_b = old.rooms["r"].meta["b"]
    from rtcsignal.core.broker import Member
    new.adopt(moved, [("r", member, [Member("b", old_b, "n1", 2)], 7)])
    assert new.rooms["r"].members == {"a": moved} and list(new.rooms["r"].remote) == ["b"]
    assert new.room_peers("r") == [{"peerId": "a", "meta": {}}, {"peerId": "b", "meta": {}}]


def test_mailbox_bounds_messages_and_bytes() -> None:
    dropped: list[bytes] = []
    box = Mailbox(3, 10, dropped.append)
    for f in (b"12345", b"12345", b"1", b"1"):
        box.send(f)
    assert box.frames == [b"12345", b"12345"] and dropped == [b"1", b"1"] and box.missed == 2


def test_sender_and_ref_only_for_relays_with_an_id() -> None:
    assert sender_and_ref(b'{"type":"x","from":"p","id":0}') == ("p", 0)
    assert sender_and_ref(b'{"type":"peer-left","peerId":"p"}') is None
    assert sender_and_ref(b'{"type":"x","from":"p"}') is None
    assert sender_and_ref(b"[1]") is None


@given(st.lists(st.binary(max_size=70_000), max_size=5))
def test_frames_split_back_and_payloads_read_back(payloads: list[bytes]) -> None:
    framed = [encode_frame(OP_TEXT, p) for p in payloads]
    assert split_frames(b"".join(framed)) == framed
    assert [payload_of(f) for f in framed] == payloads
