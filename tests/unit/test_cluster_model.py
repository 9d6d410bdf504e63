"""Three hubs joined by an in-process broker behave as one hub (issue 9).

``Bus`` is a broker with the Redis broker's semantics and none of its I/O: a join or leave
is atomic and ordered by one counter, its event goes to every other node that has the room;
relays go once to each node with members; a message ``to`` a peer of another node is
checked there. Deliveries wait in a FIFO per node, like a subscriber connection, and join
results in a FIFO per node, like a command connection; the machine drains them between
steps, in an order hypothesis chooses (``pump``), before it compares.

A hypothesis state machine drives a three-node cluster and a single ``Hub`` (the model)
with the same clients and the same steps (connect, join, two joins in flight at once, a
message right behind a join, leave, disconnect, room and default-room messages, ``to`` any
peer, ``to`` a stranger), and checks after every step that every client received the same
messages (each once, in each sender's order), the same replies and errors, and events
that rebuild the same view of every room, and that every node's presence equals the
model's. Only the interleaving of different senders may differ (see ``summary``).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rtcsignal.core.broker import JoinDone, JoinFailed, Member
from rtcsignal.core.hub import Hub, Peer
from rtcsignal.core.messages import ErrorCode
from rtcsignal.core.ratelimit import TokenBucket
from tests.unit.sinks import Recorder

NODES = ("node-000", "node-001", "node-002")  # 8 characters, as the Redis broker's
ROOMS = ["a", "b", "c"]


class Bus:
    """What Redis holds and carries for the nodes: presence, the join counter, the FIFOs."""

    def __init__(self) -> None:
        self.hubs: dict[str, Hub] = {}
        self.presence: dict[str, dict[str, Member]] = {}
        self.version = 0
        self.inbox: dict[str, deque[Callable[[], None]]] = {n: deque() for n in NODES}
        self.results: dict[str, deque[Callable[[], None]]] = {n: deque() for n in NODES}

    def subscribed(self, node: str, room: str) -> bool:
        return room == "" or room in self.hubs[node].rooms

    def pending(self) -> bool:
        return any(self.inbox[n] or self.results[n] for n in NODES)


class BusBroker:
    shared = True

    def __init__(self, bus: Bus, node: str, max_peers: int) -> None:
        self.bus = bus
        self.node = node
        self.max_peers = max_peers

    def _others(self, room: str) -> list[str]:
        return [n for n in NODES if n != self.node and self.bus.subscribed(n, room)]

    def publish_room(self, room: str, data: bytes, sender: str, ref: Any, nodes: int) -> None:
        for n in self._others(room):
            hub = self.bus.hubs[n]
            self.bus.inbox[n].append(lambda hub=hub: hub.remote_relay(room, data))

    def publish_peer(self, node: str, target: str, data: bytes, sender: str,
                     rooms: list[str], ref: Any) -> None:
        hub = self.bus.hubs[node]
        self.bus.inbox[node].append(
            lambda: hub.remote_direct(target, data, sender, rooms, ref, self.node))

    def publish_error(self, node: str, peer: str, data: bytes) -> None:
        hub = self.bus.hubs[node]
        self.bus.inbox[node].append(lambda: hub.remote_error(peer, data))

    def join(self, room: str, peer: str, meta: dict[str, Any], done: JoinDone,
             failed: JoinFailed) -> None:
        members = self.bus.presence.setdefault(room, {})
        if 0 < self.max_peers <= len(members):
            self.bus.results[self.node].append(
                lambda: failed(ErrorCode.ROOM_FULL, f"room {room} is full"))
            return
        self.bus.version += 1
        v = self.bus.version
        member = Member(peer, meta, self.node, v)
        snapshot = [m for m in members.values()]
        members[peer] = member
        for n in self._others(room):
            hub = self.bus.hubs[n]
            self.bus.inbox[n].append(
                lambda hub=hub: hub.remote_presence(room, v, member, peer))
        self.bus.results[self.node].append(lambda: done(snapshot, v, v))

    def leave(self, room: str, peer: str, reason: str) -> None:
        members = self.bus.presence.get(room, {})
        if members.pop(peer, None) is None:
            return
        self.bus.version += 1
        v = self.bus.version
        for n in self._others(room):
            hub = self.bus.hubs[n]
            self.bus.inbox[n].append(
                lambda hub=hub: hub.remote_presence(room, v, None, peer, reason))

    def clients(self, local: int) -> int:
        return sum(len(h.peers) for h in self.bus.hubs.values())


def summary(frames: list[dict[str, Any]]) -> tuple[Any, ...]:
    """What a client can rely on: relayed messages per sender in order, errors and replies
    in order, and its final view of each room rebuilt from the presence events."""
    per_sender: dict[str, list[Any]] = {}
    replies: list[Any] = []
    views: dict[str, set[str]] = {}
    for m in frames:
        kind = m.get("type")
        if "from" in m:
            per_sender.setdefault(m["from"], []).append(m["n"])
        elif kind == "joined":
            views[m["room"]] = {p["peerId"] for p in m["peers"]}
            replies.append(("joined", m["room"], m.get("ref")))
        elif kind == "peer-joined":
            assert m["peerId"] not in views.setdefault(m["room"], set()), ("twice", m, frames)
            views[m["room"]].add(m["peerId"])
        elif kind == "peer-left":
            assert m["peerId"] in views.get(m["room"], set()), ("unknown left", m, frames)
            views[m["room"]].discard(m["peerId"])
        elif kind == "left":
            views.pop(m["room"], None)
            replies.append(("left", m["room"]))
        else:
            replies.append((kind, m.get("code"), m.get("ref")))
    return per_sender, replies, {r: sorted(v) for r, v in views.items()}


def make_hub(broker: Any, max_peers: int) -> Hub:
    return Hub(clock=lambda: 0.0, broker=broker, max_peers_per_room=max_peers,
               max_rooms_per_peer=2)


class ClusterMachine(RuleBasedStateMachine):
    MAX_PEERS = 3

    def __init__(self) -> None:
        super().__init__()
        self.bus = Bus()
        for n in NODES:
            self.bus.hubs[n] = make_hub(BusBroker(self.bus, n, self.MAX_PEERS), self.MAX_PEERS)
        self.model = make_hub(None, self.MAX_PEERS)
        self.clients: list[tuple[Peer, Peer, str]] = []  # (cluster peer, model peer, node)
        self.serial = 0

    # --- helpers ------------------------------------------------------------------------

    def settle(self, data: st.DataObject) -> None:
        """Deliver everything in flight, node by node in an order hypothesis picks."""
        while self.bus.pending():
            ready = [(kind, n) for n in NODES for kind, q in
                     (("inbox", self.bus.inbox[n]), ("results", self.bus.results[n])) if q]
            kind, n = data.draw(st.sampled_from(ready), label="deliver")
            getattr(self.bus, kind)[n].popleft()()

    def both(self, data: st.DataObject, i: int, obj: dict[str, Any],
             settle: bool = True) -> None:
        peer, twin, node = self.clients[i]
        text = json.dumps(obj).encode()
        self.bus.hubs[node].handle_text(peer, text)
        self.model.handle_text(twin, text)
        if settle:
            self.settle(data)

    def live(self) -> list[int]:
        return [i for i, (p, _, n) in enumerate(self.clients) if p.id in self.bus.hubs[n].peers]

    # --- steps --------------------------------------------------------------------------

    @precondition(lambda self: len(self.live()) < 5)
    @rule(data=st.data(), node=st.sampled_from(NODES))
    def connect(self, data: st.DataObject, node: str) -> None:
        hub = self.bus.hubs[node]
        peer = Peer(Recorder(), TokenBucket(1e9, 1e9, 0), peer_id=hub.new_peer_id())
        twin = Peer(Recorder(), TokenBucket(1e9, 1e9, 0), peer_id=peer.id)
        hub.add(peer)
        self.model.add(twin)
        self.clients.append((peer, twin, node))

    @precondition(lambda self: self.live())
    @rule(data=st.data(), room=st.sampled_from(ROOMS), meta=st.sampled_from([None, {"n": 1}]))
    def join(self, data: st.DataObject, room: str, meta: Any) -> None:
        i = data.draw(st.sampled_from(self.live()))
        self.both(data, i, {"type": "join", "room": room, "meta": meta, "id": "j"})

    @precondition(lambda self: len(self.live()) >= 2)
    @rule(data=st.data(), room=st.sampled_from(ROOMS))
    def joins_in_flight_together(self, data: st.DataObject, room: str) -> None:
        """Two clients (often on different nodes) join the same room before either join
        has completed: the cluster must agree on their order (snapshots, ``polite``)."""
        i, j = data.draw(st.lists(st.sampled_from(self.live()), min_size=2, max_size=2,
                                  unique=True))
        self.both(data, i, {"type": "join", "room": room, "id": "j1"}, settle=False)
        self.both(data, j, {"type": "join", "room": room, "id": "j2"})

    @precondition(lambda self: self.live())
    @rule(data=st.data(), room=st.sampled_from(ROOMS))
    def send_right_after_join(self, data: st.DataObject, room: str) -> None:
        """A client joins and sends to the room at once: the message waits for the join
        (per-sender order) and reaches the members it is then told about."""
        i = data.draw(st.sampled_from(self.live()))
        self.serial += 1
        self.both(data, i, {"type": "join", "room": room, "id": "j"}, settle=False)
        self.both(data, i, {"type": "msg", "n": self.serial, "room": room})

    @precondition(lambda self: self.live())
    @rule(data=st.data(), room=st.sampled_from(ROOMS))
    def leave(self, data: st.DataObject, room: str) -> None:
        i = data.draw(st.sampled_from(self.live()))
        self.both(data, i, {"type": "leave", "room": room})

    @precondition(lambda self: self.live())
    @rule(data=st.data(), room=st.sampled_from([None, *ROOMS]))
    def send(self, data: st.DataObject, room: str | None) -> None:
        i = data.draw(st.sampled_from(self.live()))
        self.serial += 1
        obj: dict[str, Any] = {"type": "msg", "n": self.serial}
        if room is not None:
            obj["room"] = room
        self.both(data, i, obj)

    @precondition(lambda self: len(self.live()) >= 1 and len(self.clients) >= 2)
    @rule(data=st.data(), room=st.sampled_from([None, *ROOMS]))
    def send_to(self, data: st.DataObject, room: str | None) -> None:
        i = data.draw(st.sampled_from(self.live()))
        j = data.draw(st.sampled_from(range(len(self.clients))))  # gone ones too
        self.serial += 1
        obj: dict[str, Any] = {"type": "msg", "n": self.serial, "to": self.clients[j][0].id,
                               "id": self.serial}
        if room is not None:
            obj["room"] = room
        self.both(data, i, obj)

    @precondition(lambda self: self.live())
    @rule(data=st.data(), reason=st.sampled_from(["closed", "timeout"]))
    def disconnect(self, data: st.DataObject, reason: str) -> None:
        i = data.draw(st.sampled_from(self.live()))
        peer, twin, node = self.clients[i]
        self.bus.hubs[node].remove(peer, reason)
        self.model.remove(twin, reason)
        self.settle(data)

    # --- what must hold -----------------------------------------------------------------

    @invariant()
    def every_client_received_the_same(self) -> None:
        """The same messages (each exactly once, in each sender's order), the same errors,
        and a presence view rebuilt from its own events equal to the model client's. Only
        the interleaving of different senders may differ: a join completes a round trip
        after it is issued, and what happens meanwhile is not ordered against it."""
        for peer, twin, node in self.clients:
            got = [json.loads(f) for f in peer.sink.frames]  # type: ignore[attr-defined]
            want = [json.loads(f) for f in twin.sink.frames]  # type: ignore[attr-defined]
            assert summary(got) == summary(want), (node, peer.id, got, want)

    @invariant()
    def every_node_sees_the_models_presence(self) -> None:
        for room in ROOMS:
            want = self.model.room_peers(room)
            for node, hub in self.bus.hubs.items():
                if room in hub.rooms:
                    assert hub.room_peers(room) == want, (node, room)
            assert sorted(self.bus.presence.get(room, {})) == sorted(p["peerId"] for p in want)


TestCluster = ClusterMachine.TestCase
TestCluster.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])
