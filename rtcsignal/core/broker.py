"""The seam between one node's hub and the other nodes of a deployment.

After centrifuge's ``Broker`` and ``PresenceManager``, reduced to what signaling needs. The
hub routes each message to a *channel* (a room, the default room, one peer) and delivers to
its local members itself; the broker carries what other nodes must see: relayed messages,
messages addressed to a peer on another node, and presence (joins and leaves, with the
cluster-wide join order that ``polite`` needs).

Every method is synchronous and never blocks: an implementation over the network queues its
work and reports back through the hub's ``remote_*`` and ``complete_join`` methods, on the
event loop. The ``MemoryBroker`` is the one-process default: there is no other node, so
presence never reports a remote member, a relay never reaches ``publish_*``, and a join
completes at once, inside the call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)
class Member:
    """A room member as the cluster sees it; ``seq`` orders joins across nodes."""

    peer_id: str
    meta: dict[str, Any]
    node: str
    seq: int


#: ``done(remote_members, seq, version)``: the join happened; ``remote_members`` are the
#: room's members on other nodes at that moment, ``seq`` the joiner's place in join order.
#: ``version`` orders presence events: events up to it are already in the snapshot.
JoinDone = Callable[[list[Member], int, int], None]
#: ``failed(code, message)``: the join could not be made cluster-wide.
JoinFailed = Callable[[str, str], None]


class Broker(Protocol):
    #: This node's id; peer ids minted here start with it, so a message ``to`` a peer of
    #: another node finds that node without a lookup.
    node: str
    #: True when other nodes may exist (the hub then publishes default-room messages too).
    shared: bool

    def publish_room(self, room: str, data: bytes, sender: str, ref: Any, nodes: int) -> None:
        """A relayed message (unframed JSON) for the members of ``room`` on ``nodes`` other
        nodes (0: unknown, the default room "" has no presence)."""

    def publish_peer(
        self, node: str, target: str, data: bytes, sender: str, rooms: list[str], ref: Any
    ) -> None:
        """A message for peer ``target`` on ``node``; that node checks that ``target``
        shares one of ``rooms`` (the sender's) and answers ``unknown-peer`` if not."""

    def publish_error(self, node: str, peer: str, data: bytes) -> None:
        """An error message for ``peer`` on ``node`` (a refused ``to``)."""

    def join(
        self, room: str, peer: str, meta: dict[str, Any], done: JoinDone, failed: JoinFailed
    ) -> None: ...

    def leave(self, room: str, peer: str, reason: str) -> None: ...

    def forget(self, room: str) -> None:
        """One local member of ``room`` fewer, without a leave: it moved to another node."""

    def ended(self, peer: str) -> None:
        """``peer``'s session is over (its resume token no longer works anywhere)."""

    def clients(self, local: int) -> int:
        """Connected clients on every node (the greeting's ``clientsCount``)."""


class MemoryBroker:
    """One process, no other node: joins complete inside the call, nothing is published."""

    shared = False

    def __init__(self, node: str = "") -> None:
        self.node = node
        self._seq = 0

    def publish_room(self, room: str, data: bytes, sender: str, ref: Any, nodes: int) -> None:
        pass  # no remote member is ever reported, so the hub does not call this

    def publish_peer(
        self, node: str, target: str, data: bytes, sender: str, rooms: list[str], ref: Any
    ) -> None:
        pass

    def publish_error(self, node: str, peer: str, data: bytes) -> None:
        pass

    def join(
        self, room: str, peer: str, meta: dict[str, Any], done: JoinDone, failed: JoinFailed
    ) -> None:
        self._seq += 1
        done([], self._seq, self._seq)

    def leave(self, room: str, peer: str, reason: str) -> None:
        pass

    def forget(self, room: str) -> None:
        pass

    def ended(self, peer: str) -> None:
        pass

    def clients(self, local: int) -> int:
        return local
