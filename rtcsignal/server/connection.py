"""One TCP connection: HTTP request head, then either an HTTP answer or a WebSocket session.

Transport glue only: the WebSocket rules live in the pure ``protocol.session.Session``, what a
request or a message means lives with the ``Owner`` (the signaling service, or the
conformance suite's echo server). It is an ``asyncio.Protocol`` (no task per connection)
with ``__slots__``; outgoing frames are queued per connection and written once per
event-loop turn by the owner (coalescing).

Costs per connection: the slots below and a Session (~0.5 KiB together), plus what the owner
keeps per session (the signaling service: a Peer and two token buckets), the event loop's
transport and the kernel's socket buffers. Bounds: a request head holds at most
``max_header_size`` bytes; a partial message at most ``max_message_size`` plus one read;
the send queue is closed with 1013 when it stays over ``max_send_buffer`` for
``slow_reader_timeout`` or reaches ``SEND_BUFFER_HARD_FACTOR`` times it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rtcsignal.config import Config
from rtcsignal.core.hub import compiled_sink
from rtcsignal.core.metrics import READ_SAMPLE_MASK, Metrics
from rtcsignal.protocol import frames
from rtcsignal.protocol.frames import OP_TEXT, load_speedups, scan_text
from rtcsignal.protocol.http import (
    HttpError,
    Request,
    check_websocket_request,
    is_upgrade,
    parse_request,
    response,
    upgrade_response,
)
from rtcsignal.protocol.session import FRAGMENT, Session

log = logging.getLogger("rtcsignal")

HTTP, OPEN, CLOSING, CLOSED = 0, 1, 2, 3

#: A send queue this many times ``max_send_buffer`` closes the connection at once, whatever
#: ``slow_reader_timeout`` says: the hard bound on one connection's queued bytes.
SEND_BUFFER_HARD_FACTOR = 4

#: An HTTP answer: status, body, content type, extra headers.
Answer = tuple[int, bytes, str, dict[str, str]]
#: Answers being computed (``Owner.http`` returned an awaitable), kept from the collector.
_LATER: set[asyncio.Future[Any]] = set()


@dataclass(slots=True)
class Handlers:
    """What open sessions deliver to: one object per owner, shared by its connections (no
    per-connection closures). The first argument is the connection's ``context`` (the
    owner's per-connection state), or the connection itself for ``closed``.

    ``admit(context, nbytes)`` decides whether a ping, pong or fragment fits the sender's
    rate limit (a refused ping is not answered, a refused fragment's message is dropped);
    ``closed(conn, reason)`` runs once when the session ends (``closed`` or ``timeout``).
    """

    text: Callable[[Any, bytes], None]
    binary: Callable[[Any, bytes], None]
    admit: Callable[[Any, int], bool]
    closed: Callable[[Connection, str], None]


class Owner(Protocol):
    """What a Connection needs from whoever accepted it."""

    config: Config
    loop: asyncio.AbstractEventLoop
    metrics: Metrics

    def connection_made(self, conn: Connection) -> HttpError | None:
        """A new socket; an HttpError refuses it at once (limits on pending handshakes)."""

    def connection_lost(self, conn: Connection) -> None: ...

    def http(self, conn: Connection, request: Request) -> Answer | Awaitable[Answer]:
        """The answer, or an awaitable of it (raising HttpError to refuse): the connection
        reads nothing more meanwhile and writes the answer when it comes."""

    def sampled(self, started: float) -> None:
        """One read in ``READ_SAMPLE`` began at ``started`` (``time.perf_counter()``) and
        has been handled: time the write of what it produced (relay latency)."""

    def upgrade(self, conn: Connection, request: Request) -> Handlers:
        """Admit a WebSocket request (raise HttpError to refuse), call ``conn.accept()``,
        and return the session's handlers."""

    def mark_dirty(self, conn: Connection) -> None:
        """``conn`` has queued frames; call ``conn.flush()`` later in this loop turn."""


class Connection(asyncio.Protocol):
    __slots__ = (
        "accept_key",
        "address",
        "close_code",
        "context",
        "first",
        "handlers",
        "head",
        "opened",
        "out",
        "owner",
        "refusing",
        "session",
        "slow_timer",
        "state",
        "ticket",
        "timer",
        "transport",
    )

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.state = HTTP
        self.head = b""
        self.session: Session | None = None
        self.handlers: Handlers | None = None
        self.context: Any = None  # the owner's per-connection state (the signaling Peer)
        self.ticket: Any = None  # the owner's second one (the signaling admission record)
        self.first: bytes | None = None  # the first frame queued since the last flush
        self.out: list[bytes] | None = None  # all of them, from the second on
        self.close_code = frames.CLOSE_ABNORMAL
        self.opened = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.slow_timer: asyncio.TimerHandle | None = None
        self.address = ""
        self.accept_key = ""
        self.refusing = False  # a fragment of the message in progress was refused

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.address = peer[0] if peer else ""
        owner = self.owner
        refusal = owner.connection_made(self)
        if refusal is not None:
            self._http_error(refusal)
            return
        self.timer = owner.loop.call_later(owner.config.handshake_timeout, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is OPEN:
            metrics = self.owner.metrics
            metrics.bytes_in += len(data)
            metrics.reads += 1
            started = 0.0 if metrics.reads & READ_SAMPLE_MASK else time.perf_counter()
            session = self.session
            events = session.receive_data(data)  # type: ignore[union-attr]
            handlers = self.handlers
            on_text = handlers.text  # type: ignore[union-attr]
            ctx = self.context
            for op, payload in events:
                if op == OP_TEXT and not self.refusing:
                    on_text(ctx, payload)
                elif op == OP_TEXT:
                    self.refusing = False
                elif op == frames.OP_PONG:
                    handlers.admit(ctx, len(payload))  # type: ignore[union-attr]
                elif op == frames.OP_PING:
                    if handlers.admit(ctx, len(payload)):  # type: ignore[union-attr]
                        self.send(frames.encode_frame(frames.OP_PONG, payload))
                elif op == FRAGMENT:
                    if not handlers.admit(ctx, 0):  # type: ignore[union-attr]
                        self.refusing = True
                elif op == frames.OP_BINARY:
                    if self.refusing:
                        self.refusing = False
                    else:
                        handlers.binary(ctx, payload)  # type: ignore[union-attr]
                if self.state is not OPEN:
                    break
            if session.close_transport:  # type: ignore[union-attr]
                self._session_over()
            if started:
                self.owner.sampled(started)
        else:
            self._receive_other(data)

    def _receive_other(self, data: bytes) -> None:
        """A read before the upgrade or after our close frame."""
        state = self.state
        if state is HTTP:
            self._read_head(data)
        elif state is CLOSING:  # we sent a close frame; wait for the peer's
            events = self.session.receive_data(data)  # type: ignore[union-attr]
            handlers = self.handlers
            if handlers is not None:  # a lingering close: messages still count
                for op, payload in events:
                    if op == frames.OP_TEXT and not self.refusing:
                        handlers.text(self.context, payload)
            if self.session.close_transport:  # type: ignore[union-attr]
                self._session_over()

    def pause_writing(self) -> None:
        """The transport holds over ``max_send_buffer``: a slow reader, unless it catches up
        within ``slow_reader_timeout``."""
        if self.state is OPEN and self.slow_timer is None:
            owner = self.owner
            self.slow_timer = owner.loop.call_later(
                owner.config.slow_reader_timeout, self._slow_reader
            )

    def resume_writing(self) -> None:
        if self.slow_timer is not None:
            self.slow_timer.cancel()
            self.slow_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        for t in (self.timer, self.slow_timer):
            if t is not None:
                t.cancel()
        self.timer = self.slow_timer = None
        self._end("closed")
        self.state = CLOSED
        self.out = self.first = None
        self.owner.connection_lost(self)

    # --- sending (the core's Sink) ----------------------------------------------------

    def send(self, frame: bytes) -> None:
        out = self.out
        if out is not None:  # three frames or more this loop turn (a busy fan-out)
            out.append(frame)
            return
        first = self.first
        if first is None:
            if self.state is not OPEN:
                return
            # One frame per loop turn (most turns) is queued as is, no list: a fan-out to
            # thousands of receivers allocates nothing the garbage collector tracks.
            self.first = frame
            self.owner.mark_dirty(self)
        else:
            self.out = [first, frame]

    def queued(self) -> int:
        """Bytes of the frames queued for the next flush."""
        if self.out is not None:
            return sum(len(frame) for frame in self.out)
        return len(self.first) if self.first is not None else 0

    def flush(self) -> int:
        """Write the queued frames in one call; returns the bytes written."""
        first = self.first
        if first is None:
            return 0
        self.first = None
        out = self.out
        if out is None:
            data = first
        else:
            self.out = None
            data = b"".join(out)
        transport = self.transport
        transport.write(data)
        if (
            self.slow_timer is not None
            and self.state is OPEN
            and transport.get_write_buffer_size()
            > self.owner.config.max_send_buffer * SEND_BUFFER_HARD_FACTOR
        ):
            self._slow_reader()
        return len(data)

    def close(self, code: int, reason: str = "", linger: bool = False) -> None:
        """Start the closing handshake; the socket is dropped if the peer does not answer
        within ``close_timeout``. With ``linger`` the session goes on reading until the
        peer's close arrives: what the client sent before it read our close is still
        handled (a restart loses nothing a client sent)."""
        if self.state is not OPEN:
            return
        self.owner.metrics.bytes_out += self.flush()
        self.state = CLOSING
        self.close_code = code
        self.transport.write(self.session.close(code, reason, linger))  # type: ignore[union-attr]
        if not linger:
            self._end("closed")
        self._arm_abort()

    def heartbeat(self) -> None:
        """Called once per heartbeat interval: drop if the last ping went unanswered."""
        if self.state is not OPEN:
            return
        session = self.session
        if session.ping_pending:  # type: ignore[union-attr]
            self.owner.metrics.heartbeat_timeouts += 1
            self.close_code = frames.CLOSE_ABNORMAL
            self._end("timeout")
            self.state = CLOSING
            self.out = self.first = None
            log.info("heartbeat timeout", extra={"fields": {"addr": self.address}})
            self.transport.abort()
            return
        self.send(session.ping())  # type: ignore[union-attr]

    def accept(self) -> None:
        """Complete the upgrade: the 101 answer is queued to go out with the first frames."""
        cfg = self.owner.config
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.state = OPEN
        self.session = Session(cfg.max_message_size)
        self.first = upgrade_response(self.accept_key)  # one write with the greeting
        self.owner.mark_dirty(self)
        self.opened = time.monotonic()
        self.transport.set_write_buffer_limits(high=cfg.max_send_buffer)

    # --- internals ----------------------------------------------------------------------

    def _end(self, reason: str) -> None:
        """The session is over for the application (idempotent)."""
        handlers = self.handlers
        if handlers is not None:
            self.handlers = None
            handlers.closed(self, reason)

    def _session_over(self) -> None:
        """The session says the transport must close now (peer's close, protocol error)."""
        session = self.session
        assert session is not None
        exc = session.failure
        if exc is not None:
            log.info("protocol error", extra={"fields": {
                "addr": self.address, "code": exc.code, "reason": exc.reason}})
            if self.state is OPEN:
                self.close_code = exc.code
        elif self.state is OPEN:
            self.close_code = session.peer_close_code or frames.CLOSE_NO_STATUS
        if self.state is OPEN:
            self.owner.metrics.bytes_out += self.flush()
        self.state = CLOSING
        self.out = self.first = None
        tail = session.data_to_send()
        if tail:
            self.transport.write(tail)
        self._end("closed")
        self.transport.close()
        self._arm_abort()

    def _arm_abort(self) -> None:
        """Bound every closing path: a peer that stops reading cannot hold the socket."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.owner.loop.call_later(
            self.owner.config.close_timeout, self.transport.abort
        )

    def _slow_reader(self) -> None:
        self.slow_timer = None
        if self.state is OPEN:
            self.out = self.first = None
            self.close(frames.CLOSE_TRY_AGAIN, "send buffer full")

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.state is HTTP:
            self._http_error(HttpError(408, "request head not received in time"))

    def _read_head(self, data: bytes) -> None:
        head = self.head + data if self.head else data
        end = head.find(b"\r\n\r\n")
        limit = self.owner.config.max_header_size
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
        request: Request | None = None
        try:
            request = parse_request(head[:end])
            if request.path == self.owner.config.path:
                self._upgrade(request, head[end + 4 :])
            else:
                answer = self.owner.http(self, request)
                if isinstance(answer, tuple):
                    status, body, ctype, headers = answer
                    self._answer(response(
                        status, body, ctype, headers, head=request.method == "HEAD"))
                else:
                    self._answer_later(answer, request.method == "HEAD")
        except HttpError as exc:
            self._http_error(exc, head=request is not None and request.method == "HEAD")

    def _upgrade(self, request: Request, rest: bytes) -> None:
        if not is_upgrade(request):
            raise HttpError(426, "this endpoint speaks WebSocket", {"Upgrade": "websocket"})
        self.accept_key = check_websocket_request(request)
        self.handlers = self.owner.upgrade(self, request)
        if rest and self.state is OPEN:
            self.data_received(rest)

    def _answer_later(self, answer: Awaitable[Answer], head: bool) -> None:
        """An answer that needs a round trip elsewhere (other workers, other instances):
        nothing more is read from this connection; the answer goes out when it is ready."""
        self.state = CLOSED  # reads are ignored; connection_lost still cleans up
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        task = asyncio.ensure_future(answer)
        _LATER.add(task)
        task.add_done_callback(functools.partial(self._answered, head))

    def _answered(self, head: bool, task: asyncio.Future[Answer]) -> None:
        _LATER.discard(task)
        if task.cancelled():
            self.transport.abort()
            return
        if self.transport.is_closing():
            if not task.cancelled():
                task.exception()  # retrieved: the client is gone, nobody to tell
            return
        try:
            status, body, ctype, headers = task.result()
        except HttpError as exc:
            self._http_error(exc, head=head)
            return
        except Exception:
            log.exception("http answer failed", extra={"fields": {"addr": self.address}})
            self._http_error(HttpError(500, "internal error"), head=head)
            return
        self._answer(response(status, body, ctype, headers, head=head))

    def _answer(self, data: bytes) -> None:
        """Write an HTTP answer and end the connection without losing the answer: a
        half-close (FIN) lets the client read it while whatever it still sends (its request,
        when we refuse at connect) is read and dropped, not answered by a TCP reset. The
        client's own close ends it, or ``close_timeout``."""
        transport = self.transport
        transport.write(data)
        self.state = CLOSED
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()
        self._arm_abort()

    def _http_error(self, exc: HttpError, head: bool = False) -> None:
        self.owner.metrics.count_rejected(exc.status, exc.reason)
        log.info("rejected", extra={"fields": {
            "addr": self.address, "status": exc.status, "reason": exc.reason}})
        self._answer(response(exc.status, exc.reason + "\n", headers=exc.headers, head=head))


# --- the compiled glue (server/_speedups.pyx), when built ----------------------------------

_compiled = load_speedups("rtcsignal.server._speedups",
                          os.path.join(os.path.dirname(__file__), "_speedups.pyx"))
if _compiled is not None and scan_text is None:  # it relies on the compiled frame reader
    _compiled = None
#: The compiled glue module when ``data_received``, ``send`` and ``flush`` are the compiled
#: ones (the service installs its ``mark_dirty`` and ``_flush`` from it too), else None.
COMPILED_GLUE: Any = _compiled
if _compiled is not None:
    _compiled.install_connection(Connection, scan_text, OPEN, READ_SAMPLE_MASK,
                                 SEND_BUFFER_HARD_FACTOR)
    compiled_sink(Connection, _compiled.SINK_SEND)
