"""SignalingService: the running server and its Python API for embedding applications."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from rtcsignal.config import Config
from rtcsignal.core import messages
from rtcsignal.core.hub import ROOM_NAME, Hooks, Hub, Peer
from rtcsignal.core.messages import ErrorCode, MessageError
from rtcsignal.core.metrics import Metrics
from rtcsignal.core.ratelimit import MessageBudget
from rtcsignal.core.resume import Holding, Mailbox, token_key
from rtcsignal.protocol import frames
from rtcsignal.protocol.http import HttpError, Request
from rtcsignal.security.admission import Admission
from rtcsignal.security.turn import ice_servers
from rtcsignal.server import endpoints, scrape
from rtcsignal.server.admin import Admin
from rtcsignal.server.connection import COMPILED_GLUE, Answer, Connection, Handlers

log = logging.getLogger("rtcsignal")

#: A heartbeat tick pings connections in slices of this many, spread over the first
#: HEARTBEAT_SPREAD of the interval, so a tick over 10,000 connections never holds the loop
#: for more than one slice (well under a millisecond) and relaying goes on in between.
HEARTBEAT_SLICE = 128
HEARTBEAT_SPREAD = 0.5

#: A connection that ended with one of these may be resumed (``?resume=``): a drop (1006,
#: a missed ping), our restart (1012), a slow reader (1013), or a client's own code in
#: 3000-4999 (e.g. switching networks). 1000/1001/1005 from the client are clean ends;
#: policy and protocol violations end the session.
RESUMABLE_CLOSES = frozenset({frames.CLOSE_ABNORMAL, frames.CLOSE_SERVICE_RESTART,
                              frames.CLOSE_TRY_AGAIN})
#: The close a connection gets when its session is resumed on another connection.
CLOSE_SESSION_TAKEN = 4409
#: ``reconnect.after_ms`` in a restart: each client waits up to this much more (jitter).
RECONNECT_JITTER_MS = 250


text_frame = frames.encode_text


class SignalingService:
    """Owns the hub, the listener, the heartbeat and the write coalescing; the ``Owner`` of
    every ``Connection`` (what an HTTP request or a WebSocket upgrade means here).

    Hooks: ``service.on_connect(peer, request) -> None | (close_code, reason)`` runs right
    after the upgrade and before the greeting; ``service.hooks.on_join``, ``on_message`` and
    ``on_disconnect`` are described in ``rtcsignal.core.hub.Hooks``.
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config = config or Config()
        self.metrics = Metrics(config.metrics_max_types)
        self.hooks = Hooks()
        self.broker: Any = None
        if config.broker:
            from rtcsignal.redis.broker import RedisBroker  # redis-py only when used

            self.broker = RedisBroker(config.broker, config.broker_prefix, config.presence_ttl,
                                      config.max_peers_per_room)
        self.hub = Hub(
            broker=self.broker,
            frame=text_frame,
            unframe=frames.payload_of,
            clock=time.monotonic,
            metrics=self.metrics,
            default_room=not config.no_default_room,
            max_rooms_per_peer=config.max_rooms_per_peer,
            max_peers_per_room=config.max_peers_per_room,
            max_meta_size=config.max_meta_size,
            hooks=self.hooks,
        )
        if self.broker is not None:
            self.broker.attach(self.hub)
            self.broker.resume_window = config.resume_window
            self.broker.on_release = self._unpark
        self.handlers = Handlers(text=self.hub.handle_text, binary=self.hub.handle_binary,
                                 admit=self.hub.admit_rate, closed=self._session_closed)
        self.admission = Admission(config)
        self.on_connect: Callable[[Peer, Request], tuple[int, str] | None] | None = None
        self.connections: set[Connection] = set()  # open WebSocket sessions in the hub
        self.live: set[Connection] = set()  # every socket, until connection_lost
        self.pending: set[Connection] = set()  # sockets counted by admission.hold()
        self.counted: set[Connection] = set()  # sessions the broker counted in clientsCount
        self.sessions = 0  # upgraded sockets not yet lost (drain waits for 0)
        self.parked: dict[str, asyncio.TimerHandle] = {}  # peer id -> its window's end
        self.draining = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.port = 0
        self._server: asyncio.Server | None = None
        self._dirty: list[Connection] = []
        self._flush_scheduled = False
        self._heartbeat: asyncio.TimerHandle | None = None
        self._closed: asyncio.Event | None = None
        self._all_gone: asyncio.Event | None = None
        self.metrics.gauge("rtcsignal_connections_open", "Open WebSocket connections",
                           self.hub.connected)
        self.metrics.gauge("rtcsignal_sessions_parked",
                           "Sessions kept for a resume after their connection dropped",
                           lambda: self.hub.away)
        self.metrics.gauge("rtcsignal_rooms_open", "Named rooms with members",
                           lambda: len(self.hub.rooms))
        if self.broker is not None:
            self._broker_metrics(self.broker)
        scrape.install(self)  # scrape-time figures; and with --workers, one page for all
        self.scrape = scrape.Scrape(self)
        self.admin = Admin(self)  # /admin/, with --admin-token

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving; ``self.port`` is the bound port afterwards."""
        self.loop = asyncio.get_running_loop()
        self.hub.debug = log.isEnabledFor(logging.DEBUG)
        self._closed = asyncio.Event()  # from here on shutdown() may be called (signals)
        cfg = self.config
        if self.broker is not None:
            await self.broker.start()
        ctx = None
        if cfg.certfile:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(cfg.certfile, cfg.keyfile)
        self._server = await self.loop.create_server(
            lambda: Connection(self), cfg.host, cfg.port, ssl=ctx, backlog=4096,
            reuse_address=True, reuse_port=cfg.workers > 1,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        await self.scrape.start()
        self.admin.start()
        if self.draining:  # shutdown() was requested while we were binding
            self._server.close()
            return
        self._heartbeat = self.loop.call_later(cfg.heartbeat_interval, self._heartbeat_tick)
        for line in self.admission.warnings():
            log.warning(line)
        scheme = "wss" if ctx else "ws"
        log.info("listening", extra={"fields": {
            "url": f"{scheme}://{cfg.host}:{self.port}{cfg.path}"}})

    async def shutdown(self) -> None:
        """Graceful stop: refuse new sessions, close every client, wait up to
        ``drain_timeout`` for them to go, then drop what is left and close the listener.

        Alone, clients get 1001. With a ready broker (and resume on) this is a restart: over
        ``drain_spread`` (at most half the drain timeout; jittered) each client gets
        ``reconnect`` and 1012, its session is parked, and the drain waits for those
        sessions to resume on other instances."""
        assert self._closed is not None, "service was not started"
        if self.draining:
            await self._closed.wait()
            return
        self.draining = True
        log.info("shutting down", extra={"fields": {"clients": len(self.connections)}})
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        # A restart only when other instances can take the sessions over.
        restart = (self.broker is not None and self.broker.ready
                   and self.config.resume_window > 0)
        conns = list(self.connections)
        if restart:
            random.shuffle(conns)
            # Every client is told before the drain can end.
            spread = min(self.config.drain_spread, self.config.drain_timeout / 2)
            for i, conn in enumerate(conns):
                delay = spread * (i + random.random()) / len(conns)
                self.loop.call_later(delay, self._restart_client, conn)
        else:
            # Every close frame goes out before any session ends, so nobody is sent the
            # others' peer-left on its way out (which ones would get it would depend on the
            # order); messages still arriving during the handshakes are handled.
            for conn in conns:
                conn.close(frames.CLOSE_GOING_AWAY, "server shutting down", linger=True)
            self._expire_parked()
        self._all_gone = asyncio.Event()
        self.connection_gone()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_gone.wait(), self.config.drain_timeout)
        for conn in list(self.live):
            conn.transport.abort()
        self._expire_parked()  # not back in time: announced left now
        if self._server is not None:
            self._server.close()
        self.scrape.stop()
        self.admin.stop()
        self._flush()
        if self.broker is not None:
            await self.broker.stop()
        log.info("stopped")
        self._closed.set()

    async def wait_closed(self) -> None:
        assert self._closed is not None, "service was not started"
        await self._closed.wait()

    def connection_gone(self) -> None:
        """A socket closed or a parked session went; during drain, wake shutdown once no
        WebSocket and no parked session is left."""
        if self._all_gone is not None and self.sessions == 0 and not self.parked:
            self._all_gone.set()

    def _restart_client(self, conn: Connection) -> None:
        """Tell one client to reconnect (1012); its session is parked at once, so what it
        is sent meanwhile waits for its resume, and what it still sends is relayed."""
        peer = conn.context
        if conn not in self.connections or self.hub.peers.get(peer.id) is not peer:
            return
        after = random.randrange(RECONNECT_JITTER_MS)
        conn.send(self.hub.frame(messages.encode({"type": "reconnect", "after_ms": after})))
        self._park(peer)
        conn.close(frames.CLOSE_SERVICE_RESTART, "service restart", linger=True)

    def _park(self, peer: Peer) -> None:
        cfg = self.config
        self.hub.park(peer, cfg.resume_queue_messages, cfg.resume_queue_bytes)
        self.parked[peer.id] = self.loop.call_later(cfg.resume_window, self._expire, peer)

    def _expire(self, peer: Peer) -> None:
        """The resume window of a parked peer ended."""
        self.parked.pop(peer.id, None)
        if self.hub.peers.get(peer.id) is peer and type(peer.sink) is Mailbox:
            self.hub.expire(peer)
        self.connection_gone()

    def _expire_parked(self) -> None:
        for peer_id in list(self.parked):
            self.parked.pop(peer_id).cancel()
            peer = self.hub.peers.get(peer_id)
            if peer is not None and type(peer.sink) is Mailbox:
                self.hub.expire(peer)

    def _unpark(self, peer_id: str) -> None:
        timer = self.parked.pop(peer_id, None)
        if timer is not None:
            timer.cancel()
            self.connection_gone()

    def _broker_metrics(self, broker: Any) -> None:
        m = self.metrics
        m.gauge("rtcsignal_broker_ready", "1 when the broker's probe comes back in time",
                lambda: 1 if broker.ready else 0)
        m.gauge("rtcsignal_broker_probe_rtt_seconds", "Round trip of the last readiness probe",
                lambda: broker.probe_rtt)
        m.gauge("rtcsignal_broker_subscriptions", "Channels this instance subscribes to",
                lambda: len(broker.subscribed))
        m.gauge("rtcsignal_broker_lease_held", "1 while this instance's lease is renewed",
                lambda: 1 if broker.lease_held else 0)
        for key, help_text in (
            ("publishes", "Commands sent to Redis (publishes, joins, leaves)"),
            ("received", "Publications received from Redis"),
            ("publish_errors", "Messages refused with broker-unavailable"),
            ("reconnects", "Times the subscriber connection was rebuilt"),
            ("reaped", "Peers of lost instances announced left"),
        ):
            m.counter(f"rtcsignal_broker_{key}_total", help_text,
                      lambda key=key: broker.stats[key])

    # --- the Connection owner -----------------------------------------------------------

    def connection_made(self, conn: Connection) -> HttpError | None:
        self.live.add(conn)
        refusal = self.admission.hold(conn.address)
        if refusal is None:
            self.pending.add(conn)
        return refusal

    def _unhold(self, conn: Connection) -> None:
        if conn in self.pending:
            self.pending.discard(conn)
            self.admission.unhold(conn.address)

    def connection_lost(self, conn: Connection) -> None:
        self.live.discard(conn)
        self._unhold(conn)
        if conn.context is not None:
            peer, admitted = conn.context, conn.ticket
            self.sessions -= 1
            if log.isEnabledFor(logging.INFO):
                log.info("disconnect", extra={"fields": {
                    "peer": peer.id, "addr": conn.address, "code": conn.close_code,
                    "parked": type(peer.sink) is Mailbox,
                    "duration_s": round(time.monotonic() - conn.opened, 3),
                    "clients": len(self.hub.peers),
                }})
            self.admission.release(admitted)
        self.connection_gone()

    def http(self, conn: Connection, request: Request) -> Answer | Awaitable[Answer]:
        self._unhold(conn)
        later = self.scrape.answer(request) or self.admin.answer(request, conn.address)
        if later is not None:  # every worker's metrics; the admin API
            return later
        return endpoints.handle(
            request, conn.address, config=self.config, metrics=self.metrics,
            admission=self.admission, unready=self.unready(), now=self.loop.time(),
        )

    def unready(self) -> str | None:
        """Why ``/readyz`` says 503, or None: draining, or the broker cannot reach the
        other instances (its probe, subscriptions or connection failed)."""
        if self.draining:
            return "draining"
        if self.broker is not None and not self.broker.ready:
            return f"broker: {self.broker.problem}"
        return None

    def upgrade(self, conn: Connection, request: Request) -> Handlers:
        """Admission, then the session: Peer, greeting, ``?room=`` join."""
        cfg = self.config
        self._unhold(conn)
        if self.draining:
            raise HttpError(503, "server is shutting down", {"Retry-After": "5"})
        room = request.query.get("room")
        if room is not None and not ROOM_NAME.fullmatch(room):
            raise HttpError(400, "room must be 1-128 of [A-Za-z0-9._~:@-]")
        admitted = self.admission.admit(request, conn.address, self.loop.time())
        conn.address = admitted.client_ip
        conn.accept()
        self.sessions += 1
        hub = self.hub
        now = hub.clock()
        peer = Peer(
            conn,
            MessageBudget(
                cfg.rate_limit, cfg.rate_burst, cfg.rate_limit_bytes, cfg.rate_burst_bytes, now
            ),
            peer_id=hub.new_peer_id(),
            address=admitted.client_ip,
            user=admitted.user,
            allowed_rooms=admitted.rooms,
            fixed_meta=admitted.meta,
        )
        conn.context = peer
        conn.ticket = admitted
        conn.handlers = handlers = self.handlers  # a close in the steps below detaches the peer
        if self.on_connect is not None:
            refusal = self.on_connect(peer, request)
            if refusal is not None:
                self.connections.add(conn)
                hub.add(peer)
                conn.close(*refusal)
                return handlers
        self.connections.add(conn)
        self.metrics.connections_total += 1
        token = request.query.get("resume") if cfg.resume_window > 0 else None
        if token and self.broker is not None:  # the session may live on any instance
            hub.hold(peer, "")
            self.broker.resume(token_key(token), admitted.user, peer,
                               functools.partial(self._resumed_elsewhere, conn, peer, room))
            return handlers
        if token:
            old = hub.tokens.get(token_key(token))
            if old is not None and old.user == admitted.user:
                self._resume_here(conn, old, peer, hub.clients_count())
                return handlers
            self._fresh(conn)
        self._connect(conn, peer, room)
        return handlers

    def _connect(self, conn: Connection, peer: Peer, room: str | None) -> None:
        """A new session: into the hub, then the greeting."""
        self.hub.add(peer)
        if self.broker is not None:  # clientsCount over every instance: one round trip
            self.counted.add(conn)
            self.hub.hold(peer, "")
            self.broker.connected(functools.partial(self._greet, conn, peer, room))
        else:
            self._greet(conn, peer, room, self.hub.clients_count())

    def _fresh(self, conn: Connection) -> None:
        """A resume token that opens no session: a fresh one (and a failed attempt)."""
        self.metrics.resumes["fresh"] = self.metrics.resumes.get("fresh", 0) + 1
        self.admission.fail(conn.ticket, self.loop.time())

    def _resumed_elsewhere(self, conn: Connection, peer: Peer, room: str | None,
                           outcome: Any) -> None:
        """The broker's answer to a resume: None (a fresh session), the local peer that
        owns the token, or ``(frames, missed)``: ``peer`` was adopted here under its old id
        and these are what its old node kept for it."""
        if conn not in self.connections and (outcome is None or isinstance(outcome, Peer)):
            return  # the new connection went away before anything was taken
        if outcome is None:
            self.hub.unblock(peer, "")
            self._fresh(conn)
            self._connect(conn, peer, room)
        elif isinstance(outcome, Peer):
            self.hub.unblock(peer, "")
            self._resume_here(conn, outcome, peer, None)
        elif conn not in self.connections:  # adopted, but gone again: park it here
            self._greet_resumed(conn, peer, outcome[0], outcome[1], 0)
        else:  # adopted here; its sink holds what came after the claim
            sent, missed = outcome
            self.counted.add(conn)
            self.broker.connected(functools.partial(
                self._greet_resumed, conn, peer, sent, missed))

    def _resume_here(self, conn: Connection, old: Peer, new: Peer, count: int | None) -> None:
        """``conn`` takes over the session of local peer ``old`` (parked, or still on a
        connection that gets 4409); ``new`` was its placeholder, whose early messages
        follow."""
        old_sink, kept, missed = self.hub.resume_local(old, Holding())
        self._unpark(old.id)
        if isinstance(old_sink, Connection) and old_sink is not conn:
            self.connections.discard(old_sink)  # its close must not end the session
            if old_sink in self.counted:
                self.counted.discard(old_sink)
                self.broker.disconnected()
            old_sink.close(CLOSE_SESSION_TAKEN, "session taken")
        conn.context = old
        old.address = new.address
        if new.backlog:  # what the new connection sent already, after the old one's
            old.backlog = (old.backlog or []) + new.backlog
            new.backlog = None
        if self.broker is not None:
            self.counted.add(conn)
            self.broker.connected(functools.partial(self._greet_resumed, conn, old, kept,
                                                    missed))
        else:
            assert count is not None
            self._greet_resumed(conn, old, kept, missed, count)

    def _greet_resumed(self, conn: Connection, peer: Peer, kept: list[bytes], missed: int,
                       count: int) -> None:
        """The resumed greeting, then what was kept, in order, then what came meanwhile
        (held until now: nothing may reach the client before its greeting)."""
        hub = self.hub
        self.metrics.resumes["resumed"] = self.metrics.resumes.get("resumed", 0) + 1
        held = peer.sink.frames if type(peer.sink) is Holding else []
        if conn not in self.connections:  # gone again: all of it waits for the next resume
            self._park(peer)
            for frame in kept + held:
                peer.sink.send(frame)
            return
        peer.sink = conn
        conn.send(hub.frame(messages.encode(self._greeting(peer, count, missed))))
        for frame in kept:
            conn.send(frame)
        for frame in held:
            conn.send(frame)
        if log.isEnabledFor(logging.INFO):
            log.info("resume", extra={"fields": {
                "peer": peer.id, "addr": conn.address, "kept": len(kept), "missed": missed}})
        hub.unblock(peer, "")
        hub.replay(peer)

    def _greeting(self, peer: Peer, count: int, missed: int | None = None) -> dict[str, Any]:
        cfg = self.config
        greeting: dict[str, Any] = {
            "type": "connected",
            "message": "Connected to signaling server",
            "clientsCount": count,
            "peerId": peer.id,
        }
        if cfg.turn_urls or cfg.stun_urls:
            greeting["iceServers"] = ice_servers(cfg, peer.id, time.time())
        if cfg.resume_window > 0:
            greeting["resumeToken"] = self.hub.new_token(peer)
            greeting["resumed"] = missed is not None
            if missed is not None:
                greeting["missed"] = missed
            if self.broker is not None:
                self.broker.session(peer)
        return greeting

    def _greet(self, conn: Connection, peer: Peer, room: str | None, count: int) -> None:
        """The greeting, then the ``?room=`` join; messages the client sent meanwhile are
        handled after them."""
        hub = self.hub
        if self.broker is not None:
            hub.unblock(peer, "")
            if hub.peers.get(peer.id) is not peer:
                return
        conn.send(hub.frame(messages.encode(self._greeting(peer, count))))
        if log.isEnabledFor(logging.INFO):
            log.info("connect", extra={"fields": {
                "peer": peer.id, "addr": conn.address, "clients": len(hub.peers)}})
        if room is not None:
            try:
                hub.join(peer, room)
            except MessageError as exc:
                hub.send_error(peer, exc)
                conn.close(frames.CLOSE_POLICY, exc.code)
        elif hub.lobby is None:
            hub.send_error(peer, MessageError(
                ErrorCode.ROOM_REQUIRED, "this server needs ?room=NAME in the URL"))
            conn.close(frames.CLOSE_POLICY, ErrorCode.ROOM_REQUIRED)
        hub.replay(peer)

    def _session_closed(self, conn: Connection, reason: str) -> None:
        """The connection ended: a resumable end parks the session for the resume window,
        any other leaves the hub (presence: peer-left with ``reason``)."""
        if conn in self.connections:
            self.connections.discard(conn)
            peer = conn.context
            code = conn.close_code
            if peer.sink is conn:
                if self.config.resume_window > 0 and (
                    not self.draining or self.broker is not None
                ) and self.hub.away < self.config.max_connections and (
                    code in RESUMABLE_CLOSES
                    or (3000 <= code <= 4999 and code == conn.session.peer_close_code)
                ) and self.hub.peers.get(peer.id) is peer:
                    self._park(peer)
                else:
                    self.hub.remove(peer, reason)
            self.metrics.count_disconnect(reason)
            self.metrics.count_close(code)
            if conn in self.counted:
                self.counted.discard(conn)
                self.broker.disconnected()

    # --- write coalescing ---------------------------------------------------------------

    def mark_dirty(self, conn: Connection) -> None:
        self._dirty.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty = self._dirty
        self._dirty = []
        total = 0
        for conn in dirty:
            total += conn.flush()
        metrics = self.metrics
        metrics.bytes_out += total
        if metrics.stamp:  # a sampled read's frames were among these: read -> written
            metrics.relay_latency.observe(time.perf_counter() - metrics.stamp)
            metrics.stamp = 0.0

    def sampled(self, started: float) -> None:
        """A sampled read was handled: if it queued frames (a flush is due), the flush
        observes the latency; a read that wrote nothing is not timed."""
        if self._flush_scheduled and not self.metrics.stamp:
            self.metrics.stamp = started

    # --- heartbeat ----------------------------------------------------------------------

    def _heartbeat_tick(self) -> None:
        self._heartbeat = self.loop.call_later(self.config.heartbeat_interval, self._heartbeat_tick)
        self.admission.sweep(self.loop.time())
        conns = list(self.connections)
        slices = -(-len(conns) // HEARTBEAT_SLICE)
        gap = self.config.heartbeat_interval * HEARTBEAT_SPREAD / max(slices, 1)
        self._heartbeat_slice(conns, 0, gap)

    def _heartbeat_slice(self, conns: list[Connection], start: int, gap: float) -> None:
        end = start + HEARTBEAT_SLICE
        for conn in conns[start:end]:
            conn.heartbeat()
        if end < len(conns):
            self.loop.call_later(gap, self._heartbeat_slice, conns, end, gap)

    # --- the server-side API ------------------------------------------------------------

    def clients_count(self) -> int:
        """Connected WebSocket clients on every node (the greeting's ``clientsCount``)."""
        return self.hub.clients_count()

    def broadcast_to_all(self, message: dict[str, Any]) -> int:
        """Send ``message`` to every connected client; returns how many."""
        return self.hub.broadcast(message)

    def send_to_peer(self, peer_id: str, message: dict[str, Any]) -> bool:
        """Send ``message`` to one peer; False if no such peer is connected."""
        return self.hub.send_to_peer(peer_id, message)

    def send_to_room(self, room: str, message: dict[str, Any]) -> int:
        """Send ``message`` to every member of ``room``; returns how many."""
        return self.hub.send_to_room(room, message)

    def room_peers(self, room: str) -> list[dict[str, Any]]:
        """``[{"peerId", "meta"}, ...]`` of a named room, in join order."""
        return self.hub.room_peers(room)

    def rooms(self) -> list[str]:
        """Names of the rooms that have members."""
        return list(self.hub.rooms)


if COMPILED_GLUE is not None:  # mark_dirty and _flush compiled (server/_speedups.pyx)
    COMPILED_GLUE.install_service(SignalingService)


async def serve(config: Config | None = None, service: SignalingService | None = None) -> None:
    """Run a server inside the current event loop until ``service.shutdown()`` completes."""
    service = service or SignalingService(config)
    await service.start()
    try:
        await service.wait_closed()
    finally:  # cancelling serve() stops the server gracefully
        if not service.draining:
            await service.shutdown()
