"""Property-based tests of the pure routing core (issue 3).

A hypothesis state machine drives a ``Hub`` with random connects, joins, leaves,
disconnects (closed/timeout) and sends (with or without ``to`` and ``room``), all as client
JSON through ``handle_text`` except disconnects. An independent model made of plain lists
and sets says, for every step, exactly which peer must receive which message (or which
error), and after every step:

- the hub's ``room_peers`` / ``rooms`` equal the model membership;
- every peer's view of each of its rooms, rebuilt only from the presence messages it
  received (``joined`` snapshot, ``peer-joined``, ``peer-left``, ``left``), equals the
  true membership.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from rtcsignal.core.hub import Hub, Peer
from rtcsignal.core.ratelimit import TokenBucket
from tests.unit.sinks import Recorder

ROOM_NAMES = ["a", "b", "c", "room.d", "e:f@g~h_-"]
BAD_ROOM_NAMES = ["", "with space", "x" * 129, "slash/", "ünï", 7, None, ["a"]]
META_LIMIT = 64


def meta_size(meta: dict[str, Any]) -> int:
    """Compact JSON size, computed independently of the hub (stdlib json)."""
    return len(json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode())


metas = st.one_of(
    st.none(),
    st.fixed_dictionaries({"name": st.text(alphabet="abé", max_size=60)}),
    st.fixed_dictionaries({"role": st.sampled_from(["presenter", "viewer"]),
                           "n": st.integers(-5, 5)}),
)
request_ids = st.one_of(st.none(), st.integers(0, 9), st.text(alphabet="xyz", max_size=3),
                        st.lists(st.integers(0, 3), max_size=2))


class HubMachine(RuleBasedStateMachine):
    DEFAULT_ROOM = True
    MAX_ROOMS = 3
    MAX_PEERS = 3  # 0 = unlimited

    peers = Bundle("peers")

    def __init__(self) -> None:
        super().__init__()
        self.hub = Hub(
            clock=lambda: 0.0,
            default_room=self.DEFAULT_ROOM,
            max_rooms_per_peer=self.MAX_ROOMS,
            max_peers_per_room=self.MAX_PEERS,
            max_meta_size=META_LIMIT,
        )
        self.sinks: dict[str, Recorder] = {}
        self.objs: dict[str, Peer] = {}
        # The model: connected peers (in connect order), room -> members in join order,
        # room -> peer -> meta; and each peer's presence-built view: room -> other members.
        self.connected: list[str] = []
        self.members: dict[str, list[str]] = {}
        self.metas: dict[str, dict[str, dict[str, Any]]] = {}
        self.views: dict[str, dict[str, list[str]]] = {}
        self.serial = 0
        self.closed_ids: list[str] = []

    # --- model helpers --------------------------------------------------------------------

    def rooms_of(self, pid: str) -> list[str]:
        return [r for r, ms in self.members.items() if pid in ms]

    def in_lobby(self, pid: str) -> bool:
        return self.DEFAULT_ROOM and pid in self.connected and not self.rooms_of(pid)

    def deliveries(self) -> dict[str, list[dict[str, Any]]]:
        """Drain every sink (including closed peers', which must stay empty)."""
        out = {pid: sink.drain() for pid, sink in self.sinks.items()}
        for pid in self.closed_ids:
            assert out[pid] == [], f"{pid} received after disconnect: {out[pid]}"
        return out

    def apply_presence(self, pid: str, msgs: list[dict[str, Any]]) -> None:
        """Update ``pid``'s view from the presence messages it received, only from them."""
        view = self.views[pid]
        for m in msgs:
            kind = m["type"]
            if kind == "joined":
                assert m["room"] not in view
                view[m["room"]] = [e["peerId"] for e in m["peers"]]
            elif kind == "peer-joined":
                assert m["peerId"] not in view[m["room"]]
                view[m["room"]].append(m["peerId"])
            elif kind == "peer-left":
                view[m["room"]].remove(m["peerId"])
            elif kind == "left":
                del view[m["room"]]

    def expect_only(self, got: dict[str, list[dict[str, Any]]],
                    expected: dict[str, list[dict[str, Any]]]) -> None:
        for pid, msgs in got.items():
            assert msgs == expected.get(pid, []), (
                f"{pid}: got {msgs}, expected {expected.get(pid, [])}")

    def check_error(self, got: dict[str, list[dict[str, Any]]], pid: str,
                    codes: set[str], ref: Any) -> None:
        """Exactly one error to ``pid`` with one of ``codes`` and ``ref``; nothing else."""
        mine = got[pid]
        assert len(mine) == 1 and mine[0]["type"] == "error", mine
        assert mine[0]["code"] in codes, (mine[0], codes)
        assert mine[0].get("ref") == ref
        assert ("ref" in mine[0]) == (ref is not None)
        self.expect_only({k: v for k, v in got.items() if k != pid}, {})

    def text(self, pid: str, obj: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        self.hub.handle_text(self.objs[pid], json.dumps(obj).encode())
        return self.deliveries()

    # --- rules ----------------------------------------------------------------------------

    @initialize(target=peers)
    def first_peer(self) -> str:
        return self.connect()

    @rule(target=peers)
    def connect(self) -> str:
        pid = f"p{len(self.sinks)}"
        sink = Recorder()
        peer = Peer(sink, TokenBucket(1e9, 1e9, 0), peer_id=pid)
        self.sinks[pid] = sink
        self.objs[pid] = peer
        self.hub.add(peer)
        self.connected.append(pid)
        self.views[pid] = {}
        # The default room sends no presence: connecting is silent for everyone.
        self.expect_only(self.deliveries(), {})
        return pid

    @rule(pid=peers, room=st.one_of(st.sampled_from(ROOM_NAMES), st.sampled_from(BAD_ROOM_NAMES)),
          meta=metas, req=request_ids)
    def join(self, pid: str, room: Any, meta: dict[str, Any] | None, req: Any) -> None:
        if pid not in self.connected:
            return
        msg: dict[str, Any] = {"type": "join", "room": room}
        if meta is not None:
            msg["meta"] = meta
        if req is not None:
            msg["id"] = req
        got = self.text(pid, msg)
        errors = set()
        if room not in ROOM_NAMES:
            errors.add("invalid-room")
        else:
            if pid in self.members.get(room, []):
                errors.add("already-in-room")
            if len(self.rooms_of(pid)) >= self.MAX_ROOMS:
                errors.add("too-many-rooms")
            if self.MAX_PEERS and len(self.members.get(room, [])) >= self.MAX_PEERS:
                errors.add("room-full")
        if meta is not None and meta_size(meta) > META_LIMIT:
            errors.add("meta-too-large")
        if errors:
            self.check_error(got, pid, errors, req)
            return
        existing = self.members.get(room, [])
        shown = meta or {}
        joined: dict[str, Any] = {
            "type": "joined", "room": room,
            "peers": [{"peerId": o, "meta": self.metas[room][o], "polite": True}
                      for o in existing],
        }
        if req is not None:
            joined["ref"] = req
        expected = {pid: [joined]}
        for o in existing:
            expected[o] = [{"type": "peer-joined", "room": room, "peerId": pid,
                            "meta": shown, "polite": False}]
        self.expect_only(got, expected)
        for p in self.connected:
            self.apply_presence(p, got[p])
        self.members.setdefault(room, []).append(pid)
        self.metas.setdefault(room, {})[pid] = shown

    @rule(pid=peers, room=st.sampled_from(ROOM_NAMES), req=request_ids)
    def leave(self, pid: str, room: str, req: Any) -> None:
        if pid not in self.connected:
            return
        msg: dict[str, Any] = {"type": "leave", "room": room}
        if req is not None:
            msg["id"] = req
        got = self.text(pid, msg)
        if pid not in self.members.get(room, []):
            self.check_error(got, pid, {"not-in-room"}, req)
            return
        left: dict[str, Any] = {"type": "left", "room": room}
        if req is not None:
            left["ref"] = req
        expected = {pid: [left]}
        for o in self.members[room]:
            if o != pid:
                expected[o] = [{"type": "peer-left", "room": room, "peerId": pid,
                                "reason": "left"}]
        self.expect_only(got, expected)
        for p in self.connected:
            self.apply_presence(p, got[p])
        self.model_leave(pid, room)

    def model_leave(self, pid: str, room: str) -> None:
        self.members[room].remove(pid)
        del self.metas[room][pid]
        if not self.members[room]:
            del self.members[room]
            del self.metas[room]

    @rule(pid=consumes(peers), reason=st.sampled_from(["closed", "timeout"]))
    def disconnect(self, pid: str, reason: str) -> None:
        self.hub.remove(self.objs[pid], reason)
        got = self.deliveries()
        expected: dict[str, list[dict[str, Any]]] = {}
        for room in self.rooms_of(pid):
            for o in self.members[room]:
                if o != pid:
                    expected.setdefault(o, []).append(
                        {"type": "peer-left", "room": room, "peerId": pid, "reason": reason})
        # Several rooms shared with the leaver: one peer-left per room, in any order.
        assert got[pid] == []
        for p in self.connected:
            if p != pid:
                key = lambda m: json.dumps(m, sort_keys=True)  # noqa: E731
                assert sorted(got[p], key=key) == sorted(expected.get(p, []), key=key), (
                    p, got[p], expected.get(p))
                self.apply_presence(p, got[p])
        for room in self.rooms_of(pid):
            self.model_leave(pid, room)
        self.connected.remove(pid)
        del self.views[pid]
        self.closed_ids.append(pid)
        # A second remove of the same peer is harmless and silent.
        self.hub.remove(self.objs[pid], "closed")
        self.expect_only(self.deliveries(), {})

    @rule(pid=peers, to=st.one_of(st.none(), peers, st.just("nobody")),
          room=st.one_of(st.none(), st.sampled_from(ROOM_NAMES)), req=request_ids,
          spoof=st.booleans())
    def send(self, pid: str, to: str | None, room: str | None, req: Any, spoof: bool) -> None:
        if pid not in self.connected or to == pid:
            return
        self.serial += 1
        msg: dict[str, Any] = {"type": "signal", "n": self.serial}
        if to is not None:
            msg["to"] = to
        if room is not None:
            msg["room"] = room
        if req is not None:
            msg["id"] = req
        if spoof:
            msg["from"] = "someone-else"
        got = self.text(pid, msg)

        mine = self.rooms_of(pid)
        error = None
        domain: set[str] | None = None  # peers of the room the message is addressed to
        if room is not None:
            if room not in mine:
                error = "not-in-room"
            else:
                domain = set(self.members[room])
        elif to is None:
            if len(mine) == 1:
                domain = set(self.members[mine[0]])
            elif len(mine) > 1:
                error = "room-required"
            elif self.DEFAULT_ROOM:
                domain = {p for p in self.connected if self.in_lobby(p)}
            else:
                error = "not-in-room"
        if error is None and to is not None:
            if domain is not None:
                shared = to in domain
            elif mine:
                shared = any(to in self.members[r] for r in mine)
            else:
                shared = self.in_lobby(pid) and self.in_lobby(to)
            if not shared or to not in self.connected:
                error = "unknown-peer"
            domain = {to}
        if error is not None:
            self.check_error(got, pid, {error}, req)
            return
        assert domain is not None
        relayed = {**msg, "from": pid}
        self.expect_only(got, {p: [relayed] for p in domain if p != pid})

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def membership_matches(self) -> None:
        assert set(self.hub.rooms) == set(self.members)
        for room in ROOM_NAMES:
            want = [{"peerId": p, "meta": self.metas[room][p]}
                    for p in self.members.get(room, [])]
            assert self.hub.room_peers(room) == want
        assert set(self.hub.peers) == set(self.connected)

    @invariant()
    def views_match(self) -> None:
        for pid in self.connected:
            want = {r: [p for p in ms if p != pid] for r, ms in self.members.items()
                    if pid in ms}
            assert self.views[pid] == want, (pid, self.views[pid], want)

    @invariant()
    def nobody_closed(self) -> None:
        for sink in self.sinks.values():
            assert sink.closed == []


class NoDefaultRoomMachine(HubMachine):
    DEFAULT_ROOM = False
    MAX_ROOMS = 2
    MAX_PEERS = 0

    # Without a default room, a peer in no room cannot send at all.
    @precondition(lambda self: len(self.connected) > 0)
    @rule()
    def roomless_send_refused(self) -> None:
        for pid in self.connected:
            if not self.rooms_of(pid):
                got = self.text(pid, {"type": "signal", "id": "r"})
                self.check_error(got, pid, {"not-in-room"}, "r")


_settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])

TestHubMachine = HubMachine.TestCase
TestHubMachine.settings = _settings
TestNoDefaultRoomMachine = NoDefaultRoomMachine.TestCase
TestNoDefaultRoomMachine.settings = _settings
