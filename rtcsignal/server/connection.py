"""One TCP connection: HTTP request head, then either an HTTP answer or a WebSocket session.

This is the only module that touches sockets for WebSocket traffic. It is an
``asyncio.Protocol`` (no task per connection) with ``__slots__``; outgoing frames are
queued per connection and written once per event-loop turn by the service (coalescing).
Costs per connection: the slots below, a FrameReader, a token bucket and the core Peer
(~1 KiB together), plus the event loop's transport and the kernel's socket buffers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from rtcsignal.core import messages
from rtcsignal.core.hub import ROOM_NAME, Peer
from rtcsignal.core.messages import ErrorCode, MessageError
from rtcsignal.core.ratelimit import TokenBucket
from rtcsignal.protocol import frames
from rtcsignal.protocol.frames import FrameReader, ProtocolError
from rtcsignal.protocol.http import (
    HttpError,
    Request,
    check_websocket_request,
    is_upgrade,
    parse_request,
    response,
    upgrade_response,
)
from rtcsignal.security.admission import Admitted
from rtcsignal.security.turn import ice_servers
from rtcsignal.server import endpoints

if TYPE_CHECKING:
    from rtcsignal.server.service import SignalingService

log = logging.getLogger("rtcsignal")

HTTP, OPEN, CLOSING, CLOSED = 0, 1, 2, 3

PING_FRAME = frames.encode_frame(frames.OP_PING, b"")


class Connection(asyncio.Protocol):
    __slots__ = (
        "address",
        "admitted",
        "close_code",
        "head",
        "opened",
        "out",
        "peer",
        "ping_pending",
        "reader",
        "service",
        "state",
        "timer",
        "transport",
    )

    def __init__(self, service: SignalingService) -> None:
        self.service = service
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.state = HTTP
        self.head = b""
        self.reader: FrameReader | None = None
        self.peer: Peer | None = None
        self.admitted: Admitted | None = None
        self.out: list[bytes] | None = None
        self.ping_pending = False
        self.close_code = frames.CLOSE_ABNORMAL
        self.opened = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.address = ""

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.address = peer[0] if peer else ""
        svc = self.service
        svc.live.add(self)
        self.timer = svc.loop.call_later(svc.config.handshake_timeout, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is OPEN:
            self.service.metrics.bytes_in += len(data)
            try:
                events = self.reader.feed(data)  # type: ignore[union-attr]
            except ProtocolError as exc:
                self._protocol_error(exc)
                return
            hub = self.service.hub
            peer = self.peer
            for op, payload in events:
                if op == frames.OP_TEXT:
                    hub.handle_text(peer, payload)  # type: ignore[arg-type]
                elif op == frames.OP_PONG:
                    self.ping_pending = False
                elif op == frames.OP_PING:
                    if hub.admit_rate(peer):  # type: ignore[arg-type]  # a ping flood is a flood
                        self.send(frames.encode_frame(frames.OP_PONG, payload))
                elif op == frames.OP_CLOSE:
                    self._close_frame_received(payload)
                    return
                else:
                    hub.handle_binary(peer)  # type: ignore[arg-type]
                if self.state is not OPEN:
                    return
        elif state is HTTP:
            self._read_head(data)
        elif state is CLOSING and self.reader is not None:
            # Waiting for the peer's close frame; everything else is discarded.
            try:
                events = self.reader.feed(data)
            except ProtocolError:
                self.transport.abort()
                return
            if any(op == frames.OP_CLOSE for op, _ in events):
                self.transport.close()

    def pause_writing(self) -> None:
        """The transport's buffer passed ``max_send_buffer``: a slow reader; drop it."""
        if self.state is OPEN:
            self.out = None
            self.close(frames.CLOSE_TRY_AGAIN, "send buffer full")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        svc = self.service
        svc.live.discard(self)
        if self.peer is not None:
            svc.sessions -= 1
            self._detach("closed")
        if self.peer is not None and log.isEnabledFor(logging.INFO):
            log.info(
                "disconnect",
                extra={"fields": {
                    "peer": self.peer.id, "addr": self.address, "code": self.close_code,
                    "duration_s": round(time.monotonic() - self.opened, 3),
                    "clients": len(svc.hub.peers),
                }},
            )
        if self.admitted is not None:
            svc.admission.release(self.admitted)
            self.admitted = None
        self.state = CLOSED
        self.out = None
        svc.connection_gone()

    # --- sending (the core's Sink) ----------------------------------------------------

    def send(self, frame: bytes) -> None:
        out = self.out
        if out is not None:
            out.append(frame)
            return
        if self.state is not OPEN:
            return
        self.out = [frame]
        self.service.mark_dirty(self)

    def flush(self) -> int:
        """Write the queued frames in one call; returns the bytes written."""
        out = self.out
        if out is None:
            return 0
        self.out = None
        data = out[0] if len(out) == 1 else b"".join(out)
        self.transport.write(data)
        return len(data)

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; the socket is dropped if the peer does not answer."""
        if self.state is not OPEN:
            return
        self.service.metrics.bytes_out += self.flush()
        self.state = CLOSING
        self.close_code = code
        self.transport.write(frames.encode_close(code, reason))
        self._detach("closed")
        self.timer = self.service.loop.call_later(
            self.service.config.close_timeout, self.transport.abort
        )

    def heartbeat(self) -> None:
        """Called once per heartbeat interval: drop if the last ping went unanswered."""
        if self.state is not OPEN:
            return
        if self.ping_pending:
            self.service.metrics.heartbeat_timeouts += 1
            self.close_code = frames.CLOSE_ABNORMAL
            self._detach("timeout")
            self.state = CLOSING
            self.out = None
            log.info("heartbeat timeout", extra={"fields": {"addr": self.address}})
            self.transport.abort()
            return
        self.ping_pending = True
        self.send(PING_FRAME)

    # --- internals ----------------------------------------------------------------------

    def _detach(self, reason: str) -> None:
        """Leave the hub (presence: peer-left with ``reason``); idempotent."""
        svc = self.service
        if self in svc.connections:
            svc.connections.discard(self)
            assert self.peer is not None
            svc.hub.remove(self.peer, reason)
            svc.metrics.count_disconnect(reason)

    def _close_frame_received(self, payload: bytes) -> None:
        try:
            code, _reason = frames.parse_close(payload)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self.service.metrics.bytes_out += self.flush()
        self.close_code = code
        self.state = CLOSING
        reply = frames.CLOSE_NORMAL if code == frames.CLOSE_NO_STATUS else code
        self.transport.write(frames.encode_close(reply))
        self._detach("closed")
        self.transport.close()

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.info("protocol error", extra={"fields": {
            "addr": self.address, "code": exc.code, "reason": exc.reason}})
        self.close(exc.code, exc.reason)

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.state is HTTP:
            self.service.metrics.count_rejected(408)
            self.transport.write(response(408, "request head not received in time\n"))
            self.transport.close()
            self.state = CLOSED

    def _read_head(self, data: bytes) -> None:
        head = self.head + data if self.head else data
        end = head.find(b"\r\n\r\n")
        limit = self.service.config.max_header_size
        if end < 0:
            if len(head) > limit:
                self._http_error(HttpError(431, "request head too large"))
            else:
                self.head = head
            return
        if end > limit:
            self._http_error(HttpError(431, "request head too large"))
            return
        self.head = b""
        try:
            request = parse_request(head[:end])
            if request.path == self.service.config.path:
                self._upgrade(request, head[end + 4 :])
            else:
                self._answer_http(request)
        except HttpError as exc:
            self._http_error(exc)

    def _answer_http(self, request: Request) -> None:
        svc = self.service
        status, body, ctype, headers = endpoints.handle(svc, request, self.address)
        self.transport.write(response(status, body, ctype, headers))
        self.transport.close()
        self.state = CLOSED

    def _http_error(self, exc: HttpError) -> None:
        self.service.metrics.count_rejected(exc.status)
        log.info("rejected", extra={"fields": {
            "addr": self.address, "status": exc.status, "reason": exc.reason}})
        self.transport.write(response(exc.status, exc.reason + "\n", headers=exc.headers))
        self.transport.close()
        self.state = CLOSED

    def _upgrade(self, request: Request, rest: bytes) -> None:
        svc = self.service
        cfg = svc.config
        if not is_upgrade(request):
            raise HttpError(426, "this endpoint speaks WebSocket", {"Upgrade": "websocket"})
        if svc.draining:
            raise HttpError(503, "server is shutting down", {"Retry-After": "5"})
        accept = check_websocket_request(request)
        room = request.query.get("room")
        if room is not None and not ROOM_NAME.fullmatch(room):
            raise HttpError(400, "room must be 1-128 of [A-Za-z0-9._~:@-]")
        now = svc.loop.time()
        self.admitted = admitted = svc.admission.admit(request, self.address, now)
        self.address = admitted.client_ip
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.state = OPEN
        self.out = [upgrade_response(accept)]  # goes out with the greeting: one write
        svc.mark_dirty(self)
        svc.sessions += 1
        self.opened = time.monotonic()
        self.reader = FrameReader(cfg.max_message_size)
        self.transport.set_write_buffer_limits(high=cfg.max_send_buffer)
        self.peer = peer = Peer(
            self,
            TokenBucket(cfg.rate_limit, cfg.rate_burst, svc.hub.clock()),
            address=admitted.client_ip,
            user=admitted.user,
            allowed_rooms=admitted.rooms,
            fixed_meta=admitted.meta,
        )
        if svc.on_connect is not None:
            refusal = svc.on_connect(peer, request)
            if refusal is not None:
                code, reason = refusal
                svc.connections.add(self)
                svc.hub.add(peer)
                self.close(code, reason)
                return
        svc.connections.add(self)
        svc.hub.add(peer)
        svc.metrics.connections_total += 1
        greeting: dict[str, Any] = {
            "type": "connected",
            "message": "Connected to signaling server",
            "clientsCount": len(svc.hub.peers),
            "peerId": peer.id,
        }
        if cfg.turn_urls or cfg.stun_urls:
            greeting["iceServers"] = ice_servers(cfg, peer.id, time.time())
        self.send(svc.hub.frame(messages.encode(greeting)))
        if log.isEnabledFor(logging.INFO):
            log.info("connect", extra={"fields": {
                "peer": peer.id, "addr": self.address, "clients": len(svc.hub.peers)}})
        if room is not None:
            try:
                svc.hub.join(peer, room)
            except MessageError as exc:
                svc.hub.send_error(peer, exc)
                self.close(frames.CLOSE_POLICY, exc.code)
                return
        elif svc.hub.lobby is None:
            svc.hub.send_error(peer, MessageError(
                ErrorCode.ROOM_REQUIRED, "this server needs ?room=NAME in the URL"))
            self.close(frames.CLOSE_POLICY, ErrorCode.ROOM_REQUIRED)
            return
        if rest:
            self.data_received(rest)
