"""A Python WebRTC peer of the rtcsignal demo page, with aiortc and rtcsignal.client.

Two modes, both in a room of the demo page (/test-signaling.html):

    # receive: answer the screen shares offered to this peer ("Share my screen" on the demo
    # page), decode them and save frames as PNG files
    python examples/aiortc_peer.py receive --url ws://127.0.0.1:8083/signaling \\
        --room demo --out frames --frames 5

    # send: offer a synthetic video track (moving bars) to everyone in the room; the demo
    # page shows it like a shared screen
    python examples/aiortc_peer.py send --url ws://127.0.0.1:8083/signaling --room demo

Needs ``pip install aiortc 'rtcsignal[client]'``. It speaks the demo's signaling, the wire
format of ``/rtcsignal.js``'s CallManager (docs/javascript-client.md, "On the wire"): an
addressed message ``{"type": "rtc", "call": ID, "description": {...}}``, ``{..., "candidate":
{...}}`` or ``{..., "bye": true}``. ICE servers come from the server's greeting (STUN/TURN
when it is configured with them); without any, only host candidates are used, never aiortc's
default public STUN server. Each step is printed as a JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp

from rtcsignal.client import SignalingClient

SIGNAL = "rtc"  # the message type of the demo's CallManager
CLOCK = 90_000  # the RTP clock of video


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout: what happened."""
    print(json.dumps({"event": event, **fields}), flush=True)


def configuration(client: SignalingClient) -> RTCConfiguration:
    """The greeting's ICE servers; an empty list (not None, which would make aiortc use a
    public STUN server) when the server names none."""
    servers = [RTCIceServer(urls=s["urls"], username=s.get("username"),
                            credential=s.get("credential")) for s in client.ice_servers]
    return RTCConfiguration(iceServers=servers)


def write_png(frame: av.VideoFrame, path: Path) -> None:
    """``frame`` as a PNG file, encoded by FFmpeg's PNG encoder (no imaging library)."""
    rgb = frame.reformat(format="rgb24")
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = rgb.width, rgb.height, "rgb24"
    packets = [*codec.encode(rgb), *codec.encode(None)]
    path.write_bytes(b"".join(bytes(p) for p in packets))


class Bars(MediaStreamTrack):
    """A synthetic video track: vertical grey bars sliding right and a white bar sweeping
    down, ``width`` x ``height`` at ``fps`` frames per second."""

    kind = "video"

    def __init__(self, width: int, height: int, fps: float) -> None:
        super().__init__()
        self.width, self.height, self.fps = width, height, fps
        self.count = 0
        self.start: float | None = None
        bar = max(1, width // 8)
        levels = b"".join(bytes([40 + 25 * i]) * bar for i in range(8))
        self.row = (levels * 2)[: 2 * width]  # shifted by slicing, one period = width

    async def recv(self) -> av.VideoFrame:
        if self.start is None:
            self.start = time.monotonic()
        wait = self.start + self.count / self.fps - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = av.VideoFrame(self.width, self.height, "yuv420p")
        y, u, v = frame.planes
        shift = (self.count * 4) % self.width
        row = self.row[shift: shift + self.width]
        sweep = (self.count * 3) % self.height
        lines = [b"\xeb" * self.width if abs(i - sweep) < 4 else row
                 for i in range(self.height)]
        y.update(b"".join(line.ljust(y.line_size, b"\0") for line in lines))
        for plane, value in ((u, 90), (v, 160)):  # a warm (orange) tint
            plane.update(bytes([value]) * (plane.line_size * (self.height // 2)))
        frame.pts = int(self.count * CLOCK / self.fps)
        frame.time_base = fractions.Fraction(1, CLOCK)
        self.count += 1
        return frame


class Call:
    """One RTCPeerConnection with one remote peer, in the CallManager wire format."""

    def __init__(self, client: SignalingClient, peer: str) -> None:
        self.client = client
        self.peer = peer
        self.id = secrets.token_urlsafe(9)  # this side's connection, sent with each signal
        self.remote: str | None = None  # the other side's, from its first signal
        self.pc = RTCPeerConnection(configuration(client))
        self.closed = False

        @self.pc.on("connectionstatechange")
        def state() -> None:
            emit("state", peer=peer, state=self.pc.connectionState)

    def signal(self, **payload: Any) -> None:
        if self.client.state != "closed":
            self.client.send(self.peer, {"type": SIGNAL, "call": self.id, **payload})

    def describe(self) -> None:
        d = self.pc.localDescription  # candidates included: aiortc does not trickle
        self.signal(description={"type": d.type, "sdp": d.sdp})

    async def offer(self) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.describe()

    async def handle(self, msg: dict[str, Any]) -> None:
        """A signal from the peer: a description (answered if an offer) or a candidate."""
        self.remote = self.remote or msg.get("call")
        description, candidate = msg.get("description"), msg.get("candidate")
        if isinstance(description, dict):
            if description.get("type") == "offer" and self.pc.signalingState != "stable":
                # Offers crossed. aiortc cannot roll its own offer back, so this side keeps
                # it (the impolite side); the browser's CallManager, polite toward the
                # earlier joiner, rolls back and answers ours.
                emit("ignored-offer", peer=self.peer)
                return
            await self.pc.setRemoteDescription(
                RTCSessionDescription(sdp=description["sdp"], type=description["type"]))
            if description["type"] == "offer":
                await self.pc.setLocalDescription(await self.pc.createAnswer())
                self.describe()
        elif isinstance(candidate, dict) and candidate.get("candidate"):
            ice = candidate_from_sdp(candidate["candidate"].removeprefix("candidate:"))
            ice.sdpMid = candidate.get("sdpMid")
            ice.sdpMLineIndex = candidate.get("sdpMLineIndex")
            await self.pc.addIceCandidate(ice)

    async def close(self, bye: bool = True) -> None:
        if not self.closed:
            self.closed = True
            if bye:
                self.signal(bye=True)
            await self.pc.close()


class Peer:
    """The calls of this program, one per remote peer, driven by the room's events."""

    def __init__(self, client: SignalingClient, args: argparse.Namespace,
                 done: asyncio.Event) -> None:
        self.client, self.args, self.done = client, args, done
        self.calls: dict[str, Call] = {}
        self.saved = 0
        self.savers: set[asyncio.Task[None]] = set()

    def call(self, peer: str) -> Call:
        call = self.calls.get(peer)
        if call is None or call.closed:
            call = self.calls[peer] = Call(self.client, peer)
            if self.args.mode == "send":
                call.pc.addTrack(Bars(*self.args.size, self.args.fps))
            else:
                call.pc.on("track", lambda track: self.receive(peer, track))
        return call

    async def hangup(self, peer: str, bye: bool = True) -> None:
        call = self.calls.pop(peer, None)
        if call is not None:
            await call.close(bye)
            emit("hangup", peer=peer)

    async def on_message(self, msg: dict[str, Any]) -> None:
        if msg.get("type") != SIGNAL:
            return
        peer = msg["from"]
        call = self.calls.get(peer)
        if call is not None and call.remote and msg.get("call") not in (None, call.remote):
            await self.hangup(peer, bye=False)  # the peer started over with a new connection
            call = None
        if msg.get("bye"):
            await self.hangup(peer, bye=False)
            return
        if call is None:
            description = msg.get("description") or {}
            if description.get("type") != "offer":
                return  # a candidate or answer of a call that is gone
            call = self.call(peer)
        await call.handle(msg)

    async def offer_to(self, peer: str) -> None:
        if self.args.mode == "send" and peer not in self.calls:
            self.client.send(peer, {"type": "sharing", "on": True})  # the demo's badge
            await self.call(peer).offer()
            emit("offered", peer=peer)

    def receive(self, peer: str, track: MediaStreamTrack) -> None:
        emit("track", peer=peer, kind=track.kind)
        if track.kind == "video":
            task = asyncio.ensure_future(self.save(peer, track))
            self.savers.add(task)
            task.add_done_callback(self.savers.discard)

    async def save(self, peer: str, track: MediaStreamTrack) -> None:
        """Decoded frames of ``track``, every ``--every``-th one written as PNG, until
        ``--frames`` are written (0: until the track ends)."""
        out: Path = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        seen = 0
        while True:
            try:
                frame = await track.recv()
            except Exception:  # the track ended (MediaStreamError): the call is over
                return
            seen += 1
            if seen % self.args.every:
                continue
            self.saved += 1
            path = out / f"{peer[:8]}-{self.saved:04d}.png"
            await asyncio.to_thread(write_png, frame, path)
            emit("frame", peer=peer, n=self.saved, width=frame.width, height=frame.height,
                 path=str(path))
            if self.args.frames and self.saved >= self.args.frames:
                self.done.set()
                return

    async def run(self) -> None:
        client = self.client
        async for kind, event in client.events("joined", "peer-joined", "peer-left",
                                               "message"):
            if kind == "joined":  # first, or again after a session that was lost
                emit("joined", room=event["room"], peerId=client.peer_id,
                     peers=[p["peerId"] for p in event["peers"]])
                for p in event["peers"]:
                    await self.offer_to(p["peerId"])
            elif kind == "peer-joined" and event["room"] == self.args.room:
                emit("peer-joined", peer=event["peerId"], meta=event.get("meta"))
                await self.offer_to(event["peerId"])
            elif kind == "peer-left" and event["room"] == self.args.room:
                await self.hangup(event["peerId"], bye=False)
            elif kind == "message":
                try:
                    await self.on_message(event)
                except Exception as exc:  # one bad signal must not end the program
                    emit("error", peer=event.get("from"), error=repr(exc))


async def main(args: argparse.Namespace) -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    async with SignalingClient(args.url) as client:
        client.on("open", lambda ev: emit("connected", peerId=ev["peerId"],
                                          resumed=ev["resumed"]))
        emit("connected", peerId=client.peer_id, resumed=False)
        peer = Peer(client, args, done)
        running = asyncio.create_task(peer.run())
        await asyncio.sleep(0)  # it listens before the join's answer can come
        await client.join(args.room, {"name": args.name})
        if args.seconds:
            loop.call_later(args.seconds, done.set)
        await asyncio.wait([running, asyncio.create_task(done.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        for remote in list(peer.calls):
            await peer.hangup(remote)
        running.cancel()
    emit("done", frames=peer.saved)


def size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    w, h = int(width), int(height)
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError("WIDTHxHEIGHT, even numbers of at least 16")
    return w, h


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["receive", "send"])
    parser.add_argument("--url", default="ws://127.0.0.1:8083/signaling")
    parser.add_argument("--room", default="demo")
    parser.add_argument("--name", default=None, help="shown in the demo (default: the mode)")
    parser.add_argument("--out", type=Path, default=Path("frames"), help="receive: PNG folder")
    parser.add_argument("--frames", type=int, default=0,
                        help="receive: stop after this many PNG files (0: never)")
    parser.add_argument("--every", type=int, default=1, help="receive: save every n-th frame")
    parser.add_argument("--size", type=size, default=(640, 360), help="send: WIDTHxHEIGHT")
    parser.add_argument("--fps", type=float, default=15, help="send: frames per second")
    parser.add_argument("--seconds", type=float, default=0, help="stop after (0: never)")
    args = parser.parse_args(argv)
    args.name = args.name or {"receive": "aiortc receiver", "send": "aiortc sender"}[args.mode]
    args.every = max(1, args.every)
    return args


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
