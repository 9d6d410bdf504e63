"""rtcsignal.client: an asyncio client for the rtcsignal signaling server.

The Python counterpart of the browser's ``/rtcsignal.js``, on the ``websockets`` library
(``pip install 'rtcsignal[client]'``), for bots, media servers, tests and devices::

    from rtcsignal.client import SignalingClient

    async with SignalingClient("wss://signal.example.com/signaling") as client:
        room = await client.join("demo", {"name": "bot"})       # {"room", "peers": [...]}
        client.on("peer-joined", lambda ev: print("hello", ev["peerId"]))
        client.broadcast("demo", {"type": "chat", "text": "hi all"})
        async for message in client:                            # relayed messages
            if message["type"] == "get-status":
                client.reply(message, {"type": "status", "ok": True})

It keeps the session across network drops and server restarts with the same rules as the
JavaScript client: exponential backoff with jitter, the server's ``reconnect.after_ms`` and
close codes 1012/1013, the single-use ``resumeToken`` of each greeting sent back as
``?resume=``, and when a session could not be resumed, its rooms joined again as a new peer.
The guide is docs/python-client.md; the wire protocol docs/protocol.md.

This module is an outer layer: nothing of the server imports it, and it imports nothing of
the server (only the standard library and ``websockets``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import logging
import random
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

__all__ = ["Backoff", "SignalingClient", "SignalingError", "backoff_delay"]

log = logging.getLogger("rtcsignal.client")

#: What this client sends when it gives up on a socket (not a clean end: the server parks the
#: session, so the next connection resumes it).
LOCAL_DROP = 4000
#: The longest ``reconnect.after_ms`` followed (a bigger one is taken as this).
MAX_AFTER_MS = 300_000
#: Recent message ids kept to say which message an ``expired`` is about.
SENT_MEMORY = 256
#: HTTP refusals that a retry cannot cure (a 401 can, when ``token`` is a callable that may
#: return a fresh token).
FINAL_STATUS = frozenset({400, 403, 404, 405, 426, 431, 505})

Message = dict[str, Any]
Listener = Callable[[Any], Any]


def final_close(code: int) -> bool:
    """Close codes that end the session for good: the server refused by policy (1008) or the
    application said so (4000-4999, e.g. 4409 when the session was taken over). Everything
    else (1001 going away, 1006 dropped, 1011, 1012 restart, 1013 try again later) is
    retried."""
    return code == 1008 or 4000 <= code <= 4999


@dataclass(frozen=True)
class Backoff:
    """Delay before reconnect attempt *n*: ``min(max, initial * factor**n)`` seconds, minus
    up to ``jitter`` of it at random."""

    initial: float = 0.5
    max: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5


def backoff_delay(attempt: int, backoff: Backoff = Backoff()) -> float:
    """The delay in seconds before reconnect attempt ``attempt`` (0-based), jitter included."""
    base = min(backoff.max, backoff.initial * backoff.factor ** max(0, attempt))
    return base * (1 - min(1.0, max(0.0, backoff.jitter)) * random.random())


class SignalingError(Exception):
    """An error the server reported (``code`` as in docs/protocol.md: ``unknown-peer``,
    ``room-full``, ...; ``ref`` the id of the message it is about) or one of this client:
    ``timeout``, ``closed``, ``session-lost``, ``expired``, ``http-<status>``."""

    def __init__(self, code: str, message: str | None = None, ref: Any = None,
                 detail: Any = None) -> None:
        super().__init__(message or code)
        self.code = code
        self.ref = ref
        self.detail = detail

    def __repr__(self) -> str:
        return f"SignalingError({self.code!r}, {str(self)!r}, ref={self.ref!r})"


def _random_id(nbytes: int = 9) -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(nbytes)).decode().rstrip("=")


def _with_query(url: str, params: dict[str, str]) -> str:
    """``url`` (ws, wss, http or https) as a ws(s) URL with ``params`` set in its query."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise SignalingError("invalid-url", f"not a ws://, wss://, http:// or https:// URL: {url}")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urlunsplit((scheme, parts.netloc, parts.path or "/signaling", urlencode(query),
                       parts.fragment))


@dataclass
class _Room:
    name: str
    meta: Any
    done: asyncio.Future[Message]
    peers: dict[str, Message]
    joined: bool = False
    cmd: str | None = None


@dataclass
class _Pending:
    kind: str  # request | ping
    future: asyncio.Future[Any]
    to: str | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Ended:
    """How one connection (or attempt) ended."""

    code: int
    reason: str
    local: bool = False  # given up on here (no reply, keepalive, reconnect())
    final: bool = False  # no retry, whatever the code
    delay: float | None = None  # at least this long before the next attempt
    error: SignalingError | None = None


class SignalingClient:
    """One connection to the signaling server, kept up across drops and restarts.

    Events (``client.on(type, fn)``; ``fn`` may be a coroutine function):

    - ``open`` ``{peerId, resumed, missed, previousPeerId, greeting}``: each greeting;
    - ``close`` ``{code, reason, willReconnect, delay}`` (``delay`` in seconds or None);
    - ``state`` ``{state}``; ``joined`` ``{room, peers}``; ``left`` ``{room, peers}``;
    - ``peer-joined`` / ``peer-left``: the server's messages (and ``peer-left`` with reason
      ``session-lost`` for everyone known when the session could not be resumed);
    - ``message``: every relayed message (it has ``from``) and server messages of types this
      client does not know; the same messages ``async for message in client`` yields;
    - ``error``: a :class:`SignalingError` no awaiting call took;
    - ``expired`` ``{ref, to, message, reason}``: a message the server could not deliver;
    - ``raw`` ``{direction, message}``: every message in and out.
    """

    def __init__(
        self,
        url: str = "ws://127.0.0.1:8083/signaling",
        *,
        token: str | Callable[[], str | Awaitable[str]] | None = None,
        room: str | None = None,
        reconnect: bool = True,
        backoff: Backoff = Backoff(),
        connect_timeout: float = 10.0,
        keepalive: float = 25.0,
        keepalive_timeout: float = 10.0,
        request_timeout: float = 15.0,
        max_queue: int = 500,
        max_inbox: int = 10_000,
        ssl: Any = None,
        origin: str | None = None,
        headers: dict[str, str] | None = None,
        max_size: int = 2**20,
    ) -> None:
        _with_query(url, {})  # a bad URL fails here, not in the background
        self.url = url
        self.token = token
        self.room = room
        self.auto_reconnect = reconnect
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        self.max_queue = max_queue
        self.max_inbox = max_inbox
        self.ssl = ssl
        self.origin = origin
        self.headers = dict(headers or {})
        self.max_size = max_size

        self._state = "idle"  # idle | connecting | open | reconnecting | closed
        self._ws: ClientConnection | None = None
        self._greeted = False
        self._ever_opened = False
        self._closing = False
        self._close_code = 1000
        self._close_reason = ""
        self._ready: asyncio.Future[Message] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._peer_id: str | None = None
        self._greeting: Message | None = None
        self._resume_token: str | None = None
        self._attempt = 0
        self._reconnect_after: float | None = None
        self._drop_reason: str | None = None
        self._seq = 0
        self._prefix = _random_id(3)
        self._pending: dict[Any, _Pending] = {}
        self._rooms: dict[str, _Room] = {}
        self._joins: dict[str, str] = {}  # join command id -> room
        self._leaving: dict[str, tuple[str, asyncio.Future[None]]] = {}
        self._outbox: deque[Message] = deque()
        self._sendq: deque[tuple[str, Message]] = deque()  # (kind, message) for the writer
        self._send_ready: asyncio.Event | None = None
        self._sent: OrderedDict[Any, Message] = OrderedDict()
        self._inbox: deque[Message] = deque()
        self._inbox_ready: asyncio.Event | None = None
        self._handlers: dict[str, list[Listener]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Relayed messages dropped because nobody read them (``max_inbox``).
        self.dropped = 0

    # --- state ------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``idle``, ``connecting``, ``open``, ``reconnecting`` or ``closed``."""
        return self._state

    @property
    def peer_id(self) -> str | None:
        """This session's peer id (kept across a resume); None before the first greeting."""
        return self._peer_id

    @property
    def greeting(self) -> Message | None:
        """The last greeting, as the server sent it."""
        return self._greeting

    @property
    def ice_servers(self) -> list[Message]:
        """``iceServers`` from the greeting (STUN/TURN with fresh credentials), or []."""
        return list((self._greeting or {}).get("iceServers") or [])

    @property
    def socket(self) -> ClientConnection | None:
        """The current ``websockets`` connection (None between connections). For
        diagnostics; do not send on it."""
        return self._ws

    @property
    def rooms(self) -> list[str]:
        """The rooms this client is in or joining."""
        return list(self._rooms)

    def peers(self, room: str) -> list[Message]:
        """The other members of ``room`` in join order: ``[{peerId, meta, polite}]``."""
        r = self._rooms.get(room)
        return [dict(p) for p in r.peers.values()] if r else []

    def polite(self, peer_id: str, room: str | None = None) -> bool:
        """Whether this side yields to ``peer_id`` in perfect negotiation: the server's
        ``polite`` flag (from ``room``, or from every shared room when they agree); else a
        rule both sides compute alike (the smaller peer id is polite)."""
        flags = {p.get("polite") for name, r in self._rooms.items()
                 if room is None or name == room
                 for p in [r.peers.get(peer_id)] if p and isinstance(p.get("polite"), bool)}
        if len(flags) == 1:
            return bool(flags.pop())
        return str(self._peer_id) < str(peer_id)

    def knows(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is in one of this client's rooms (per the presence seen)."""
        return any(peer_id in r.peers for r in self._rooms.values())

    # --- events -----------------------------------------------------------------------

    def on(self, kind: str, fn: Listener) -> Callable[[], None]:
        """Call ``fn(detail)`` on every ``kind`` event; returns a function that unsubscribes.
        A coroutine function runs as a task; an exception in a listener is logged and does
        not reach the client."""
        if not callable(fn):
            raise TypeError("listener must be callable")
        self._handlers.setdefault(kind, []).append(fn)
        return lambda: self.off(kind, fn)

    def off(self, kind: str, fn: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._handlers.get(kind, []).remove(fn)

    def wait_for(self, kind: str, predicate: Callable[[Any], bool] | None = None,
                 timeout: float | None = None) -> asyncio.Future[Any]:
        """A future of the next ``kind`` event (that ``predicate`` accepts), subscribed at
        the call: ``opened = client.wait_for("open")`` before an action catches the event
        the action causes. It fails with TimeoutError after ``timeout`` seconds."""
        future, off = self._once(kind, predicate)
        future.add_done_callback(lambda _: off())
        if timeout is not None:
            timer = asyncio.get_running_loop().call_later(
                timeout, lambda: future.done() or future.set_exception(
                    TimeoutError(f"no {kind!r} event in {timeout} s")))
            future.add_done_callback(lambda _: timer.cancel())
        return future

    def _once(self, kind: str, predicate: Callable[[Any], bool] | None = None,
              ) -> tuple[asyncio.Future[Any], Callable[[], None]]:
        """A future of the next ``kind`` event (subscribed at once) and its unsubscriber."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def take(detail: Any) -> None:
            if not future.done() and (predicate is None or predicate(detail)):
                future.set_result(detail)

        return future, self.on(kind, take)

    async def events(self, *kinds: str) -> AsyncIterator[tuple[str, Any]]:
        """``(kind, detail)`` for every event of ``kinds`` (all the kinds in the class doc
        when none are named), in order, until the client is closed for good::

            async for kind, event in client.events("peer-joined", "peer-left", "message"):
                ...
        """
        queue: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue()
        wanted = kinds or ("open", "close", "state", "joined", "left", "peer-joined",
                           "peer-left", "message", "error", "expired")
        offs = [self.on(k, lambda d, k=k: queue.put_nowait((k, d))) for k in wanted]

        def end(detail: Message) -> None:
            if not detail.get("willReconnect"):
                queue.put_nowait(None)

        offs.append(self.on("close", end))
        try:
            if self._state == "closed":
                return
            while (item := await queue.get()) is not None:
                yield item
            while not queue.empty():  # what came with the final close
                item = queue.get_nowait()
                if item is not None:
                    yield item
        finally:
            for off in offs:
                off()

    def _emit(self, kind: str, detail: Any) -> None:
        for fn in list(self._handlers.get(kind, ())):
            try:
                result = fn(detail)
            except Exception:
                log.exception("a %r listener failed", kind)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._listener_done)

    def _listener_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a listener task failed", exc_info=task.exception())

    # --- messages in: async for -------------------------------------------------------

    def __aiter__(self) -> SignalingClient:
        return self

    async def __anext__(self) -> Message:
        """The next relayed message (or unknown server message); ends when the client is
        closed for good and every message received before has been read."""
        while True:
            if self._inbox:
                return self._inbox.popleft()
            if self._state in ("closed", "idle"):
                raise StopAsyncIteration
            assert self._inbox_ready is not None
            self._inbox_ready.clear()
            await self._inbox_ready.wait()

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message ``async for`` would give; SignalingError ``closed`` if there is
        none and the client is closed; TimeoutError after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except StopAsyncIteration:
            raise SignalingError("closed", "the client is closed") from None

    def _deliver(self, message: Message) -> None:
        self._inbox.append(message)
        if len(self._inbox) > self.max_inbox:
            self._inbox.popleft()
            self.dropped += 1
        if self._inbox_ready is not None:
            self._inbox_ready.set()
        self._emit("message", message)

    # --- connecting -------------------------------------------------------------------

    async def connect(self, timeout: float | None = None) -> Message:
        """Connect (and keep reconnecting until :meth:`close`). Returns the first greeting.
        Raises SignalingError if the server ends the session for good (close 1008 or
        4000-4999, an HTTP refusal such as 401/403) before that; TimeoutError after
        ``timeout`` seconds (the client is then closed)."""
        if self._state in ("idle", "closed"):
            self._closing = False
            self._ready = _quiet_future()
            self._wake = asyncio.Event()
            self._inbox_ready = asyncio.Event()
            self._send_ready = asyncio.Event()
            if self.room and self.room not in self._rooms:
                self._rooms[self.room] = self._new_room(self.room, None)
            self._task = asyncio.create_task(self._run(), name="rtcsignal-client")
        assert self._ready is not None
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            await self.close()
            raise

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """End the session: close 1000 (the server forgets it and tells the others at once),
        no reconnect. Waits until the socket is closed."""
        if self._state in ("idle", "closed") and self._task is None:
            return
        self._closing = True
        self._close_code, self._close_reason = code, reason
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code, reason), 5)
        if self._wake is not None:
            self._wake.set()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            if self._ws is None:  # connecting or waiting to: nothing to close cleanly
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._finish(code, reason)

    async def reconnect(self, timeout: float | None = None) -> Message:
        """Drop the current socket and connect again at once, resuming the session (for a
        known network change). Returns the ``open`` event of the new connection."""
        if self._state in ("idle", "closed"):
            greeting = await self.connect(timeout)
            return {"peerId": self._peer_id, "resumed": False, "missed": 0,
                    "previousPeerId": None, "greeting": greeting}
        opened, off = self._once("open")
        try:
            if self._ws is not None:
                self._reconnect_after = 0.0  # the delay after this drop: none
                self._drop(self._ws, "reconnect requested")
            elif self._wake is not None:
                self._wake.set()  # cut the wait short
            return await asyncio.wait_for(opened, timeout)
        finally:
            off()

    async def __aenter__(self) -> SignalingClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _drop(self, ws: ClientConnection, reason: str) -> None:
        """Give up on ``ws`` (not a clean end: the session stays resumable)."""
        if self._ws is ws and self._drop_reason is None:
            self._drop_reason = reason
            self._spawn(ws.close(LOCAL_DROP, reason[:120]))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        try:
            while not self._closing:
                ended = await self._connection()
                if self._closing:
                    return
                if ended.final or not self.auto_reconnect or (
                        not ended.local and final_close(ended.code)):
                    error = ended.error or SignalingError(
                        "closed", f"closed by the server: {ended.code} {ended.reason}".strip())
                    self._finish(ended.code, ended.reason, error)
                    return
                delay = self._next_delay(ended)
                assert self._wake is not None
                self._wake.clear()  # before the events: a listener may call reconnect()
                self._set_state("reconnecting")
                self._emit("close", {"code": ended.code, "reason": ended.reason,
                                     "willReconnect": True, "delay": delay})
                log.debug("reconnecting in %.3f s after %s %s", delay, ended.code, ended.reason)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
        except Exception as exc:  # a bug here must not leave connect() waiting forever
            log.exception("the connection loop failed")
            self._finish(1011, "client error", SignalingError("closed", f"client error: {exc}"))

    def _next_delay(self, ended: _Ended) -> float:
        if self._reconnect_after is not None:
            delay = self._reconnect_after
        else:
            step = max(self._attempt, 3) if ended.code == 1013 else self._attempt
            delay = backoff_delay(step, self.backoff)
        if ended.delay is not None:
            delay = max(delay, ended.delay)
        self._reconnect_after = None
        self._attempt += 1
        return delay

    async def _headers(self) -> dict[str, str] | _Ended:
        headers = dict(self.headers)
        token = self.token
        if callable(token):
            try:
                token = token()
                if inspect.isawaitable(token):
                    token = await token
            except Exception as exc:
                self._emit("error", SignalingError("token", f"token callback failed: {exc}",
                                                   detail=exc))
                return _Ended(1006, "token callback failed")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def _open_socket(self) -> ClientConnection | _Ended:
        self._set_state("reconnecting" if self._ever_opened else "connecting")
        headers = await self._headers()
        if isinstance(headers, _Ended):
            return headers
        params = {}
        if self.room:
            params["room"] = self.room
        if self._resume_token:
            params["resume"] = self._resume_token
        url = _with_query(self.url, params)
        options: dict[str, Any] = {
            "open_timeout": self.connect_timeout,
            "ping_interval": self.keepalive or None,
            "ping_timeout": self.keepalive_timeout or None,
            "close_timeout": 5,
            "compression": None,
            "max_size": self.max_size,
            "additional_headers": headers or None,
            "origin": self.origin,
        }
        if url.startswith("wss:") and self.ssl is not None:
            options["ssl"] = self.ssl
        if "proxy" in inspect.signature(ws_connect).parameters:
            options["proxy"] = None  # straight to the server, whatever the environment says
        try:
            return await ws_connect(url, **options)
        except InvalidStatus as exc:
            response = exc.response
            status = response.status_code
            text = (response.body or b"").decode("utf-8", "replace").strip()[:200]
            error = SignalingError(f"http-{status}", f"HTTP {status}: {text}".strip(),
                                   detail=response)
            final = status in FINAL_STATUS or (status == 401 and not callable(self.token))
            retry_after = response.headers.get("Retry-After", "")
            delay = float(retry_after) if retry_after.isdigit() else None
            return _Ended(1006, f"HTTP {status}", final=final, delay=delay, error=error)
        except InvalidURI as exc:
            return _Ended(1006, str(exc), final=True,
                          error=SignalingError("invalid-url", str(exc)))
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return _Ended(1006, f"{type(exc).__name__}: {exc}")

    async def _connection(self) -> _Ended:
        """One attempt: connect, read until the socket ends, and say how it ended."""
        ws = await self._open_socket()
        if isinstance(ws, _Ended):
            return ws
        if self._closing:
            await ws.close(self._close_code, self._close_reason)
            return _Ended(self._close_code, self._close_reason)
        self._ws = ws
        self._greeted = False
        self._drop_reason = None
        loop = asyncio.get_running_loop()
        no_greeting = loop.call_later(self.connect_timeout, lambda: self._greeted
                                      or self._drop(ws, "no greeting in time"))
        writer = asyncio.create_task(self._writer(ws), name="rtcsignal-client-writer")
        try:
            async for data in ws:
                if isinstance(data, str):
                    self._on_text(data)
        except ConnectionClosed:
            pass
        finally:
            no_greeting.cancel()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            self._ws = None
            self._stop_socket()
        rcvd = ws.protocol.close_rcvd
        code, reason = (rcvd.code, rcvd.reason) if rcvd is not None else (1006, "")
        local = self._drop_reason is not None
        if local:
            code, reason = LOCAL_DROP, self._drop_reason or ""
        log.debug("socket closed: %s %s", code, reason)
        return _Ended(code, reason, local=local)

    def _stop_socket(self) -> None:
        """The socket is gone: what the writer had not sent goes back to the outbox (relayed
        messages) or is dropped (commands: joins and leaves are sent again on the next
        greeting; pings time out)."""
        unsent = [m for kind, m in self._sendq if kind == "post"]
        self._sendq.clear()
        self._outbox.extendleft(reversed(unsent))

    def _finish(self, code: int, reason: str, error: SignalingError | None = None) -> None:
        if self._state == "closed":
            return
        closed = error or SignalingError("closed", "the client was closed")
        for ref in list(self._pending):
            self._settle(ref, closed)
        for _, (_, done) in list(self._leaving.items()):
            if not done.done():
                done.set_result(None)
        self._leaving.clear()
        for r in self._rooms.values():
            if not r.done.done():
                r.done.set_exception(closed)
        self._rooms.clear()
        self._joins.clear()
        self._outbox.clear()
        self._sendq.clear()
        self._resume_token = None
        self._reconnect_after = None
        self._ever_opened = False
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(closed)
        self._set_state("closed")
        if self._inbox_ready is not None:
            self._inbox_ready.set()  # iterators end once they have read what is there
        self._emit("close", {"code": code, "reason": reason, "willReconnect": False,
                             "delay": None})

    def _set_state(self, state: str) -> None:
        if self._state != state:
            self._state = state
            self._emit("state", {"state": state})

    # --- sending ----------------------------------------------------------------------

    def send(self, to: str, message: Message) -> str:
        """Send ``message`` (a dict with a string ``type``) to the peer ``to``. Returns its
        id. While reconnecting, it waits (up to ``max_queue``) and goes out after the
        resume."""
        return self._post({**message, "to": to})

    def broadcast(self, room: str, message: Message) -> str:
        """Send ``message`` to the other members of ``room``. Returns its id."""
        return self._post({**message, "room": room})

    def send_raw(self, message: Message) -> str:
        """Send ``message`` as is: without ``to`` or ``room`` it goes to the sender's only
        room (the original server's broadcast). Returns its id."""
        return self._post(dict(message))

    def reply(self, request: Message, message: Message) -> str:
        """Answer ``request`` (a received message with an ``id``) with ``message``."""
        if not isinstance(request, dict) or not isinstance(request.get("from"), str):
            raise TypeError("reply() needs a received message")
        return self._post({**message, "to": request["from"], "ref": request.get("id")})

    async def request(self, to: str, message: Message, *, timeout: float | None = None,
                      ) -> Message:
        """Send ``message`` to ``to`` and return that peer's reply (its message whose
        ``ref`` is this message's ``id``, see :meth:`reply`). Raises SignalingError with the
        server's error about it (``unknown-peer``, ...), ``expired``, ``session-lost`` or
        ``timeout`` (after ``timeout``, default ``request_timeout``, seconds)."""
        ref = message.get("id") or self._next_id()
        future = asyncio.get_running_loop().create_future()
        self._track(ref, _Pending("request", future, to=to),
                    self.request_timeout if timeout is None else timeout)
        try:
            self._post({**message, "to": to, "id": ref})
            return await future
        finally:
            self._untrack(ref, future)

    async def ping(self, timeout: float | None = None) -> float:
        """Application-level ping through the server: the round trip in seconds."""
        ref = self._next_id()
        future = asyncio.get_running_loop().create_future()
        self._track(ref, _Pending("ping", future),
                    self.keepalive_timeout if timeout is None else timeout)
        sent = time.perf_counter()
        try:
            if not self._write("cmd", {"type": "ping", "id": ref}):
                raise SignalingError("closed", "not connected")
            await future
            return time.perf_counter() - sent
        finally:
            self._untrack(ref, future)

    def _next_id(self) -> str:
        self._seq += 1
        return f"{self._prefix}{self._seq}"

    def _post(self, message: Message) -> str:
        """A message for other peers: gets an id, is remembered for ``expired``, and waits
        in the outbox while the client is between connections."""
        if not isinstance(message.get("type"), str):
            raise TypeError("a message needs a string type")
        if self._state == "closed":
            raise SignalingError("closed", "the client is closed")
        if message.get("id") is None:
            message["id"] = self._next_id()
        ref = message["id"]
        self._sent[ref] = message
        self._sent.move_to_end(ref)
        while len(self._sent) > SENT_MEMORY:
            self._sent.popitem(last=False)
        if not self._write("post", message):
            self._outbox.append(message)
            while len(self._outbox) > self.max_queue:
                self._expire(self._outbox.popleft(), "queue-full")
        return ref

    def _write(self, kind: str, message: Message) -> bool:
        """Queue ``message`` for the current socket's writer; False between connections."""
        if self._ws is None or not self._greeted or self._drop_reason is not None:
            return False
        self._sendq.append((kind, message))
        assert self._send_ready is not None
        self._send_ready.set()
        self._emit("raw", {"direction": "out", "message": message})
        return True

    async def _writer(self, ws: ClientConnection) -> None:
        assert self._send_ready is not None
        while True:
            while self._sendq:
                message = self._sendq[0][1]
                text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
                try:
                    await ws.send(text)
                except ConnectionClosed:
                    return  # the reader sees the end too; what is left goes back
                if self._sendq and self._sendq[0][1] is message:
                    self._sendq.popleft()
            self._send_ready.clear()
            await self._send_ready.wait()

    def _expire(self, message: Message, reason: str) -> None:
        ref = message.get("id")
        self._settle(ref, SignalingError("expired", f"not delivered ({reason})", ref))
        self._emit("expired", {"ref": ref, "to": message.get("to"), "message": message,
                               "reason": reason})

    def _track(self, ref: Any, entry: _Pending, timeout: float | None) -> None:
        if timeout is not None and timeout > 0:
            entry.timer = asyncio.get_running_loop().call_later(
                timeout, self._settle, ref, SignalingError("timeout", "no answer in time", ref))
        self._pending[ref] = entry

    def _untrack(self, ref: Any, future: asyncio.Future[Any]) -> None:
        entry = self._pending.get(ref)
        if entry is not None and entry.future is future:
            del self._pending[ref]
            if entry.timer is not None:
                entry.timer.cancel()

    def _settle(self, ref: Any, value: Any) -> bool:
        """Resolve (``value``) or fail (a SignalingError) the pending call ``ref``."""
        if ref is None:
            return False
        try:
            entry = self._pending.pop(ref)
        except (KeyError, TypeError):
            return False
        if entry.timer is not None:
            entry.timer.cancel()
        if not entry.future.done():
            if isinstance(value, BaseException):
                entry.future.set_exception(value)
            else:
                entry.future.set_result(value)
        return True

    # --- rooms ------------------------------------------------------------------------

    def _new_room(self, name: str, meta: Any) -> _Room:
        return _Room(name, meta, _quiet_future(), {})

    async def join(self, room: str, meta: Message | None = None) -> Message:
        """Join ``room`` with ``meta`` (shown to the others in presence). Returns the
        snapshot ``{"room", "peers": [{peerId, meta, polite}]}`` (the others, in join
        order); raises SignalingError with the server's code (``room-full``,
        ``forbidden``, ``too-many-rooms``, ``invalid-room``, ...). Joining a room already
        joined (or being joined) returns the same snapshot."""
        r = self._rooms.get(room)
        if r is None:
            r = self._new_room(room, meta)
            self._rooms[room] = r
            if self._state == "open":
                self._send_join(r)
        return await asyncio.shield(r.done)

    async def leave(self, room: str) -> None:
        """Leave ``room``; returns once the server confirmed (or there was nothing to
        leave)."""
        r = self._rooms.pop(room, None)
        if r is None:
            return
        if not r.done.done():
            r.done.set_exception(SignalingError("left", f"left {room}"))
        self._emit("left", {"room": room, "peers": [dict(p) for p in r.peers.values()]})
        if self._state != "open" and not r.joined and not r.cmd:
            return
        ref = self._next_id()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._leaving[ref] = (room, done)
        if self._state == "open":
            self._write("cmd", {"type": "leave", "room": room, "id": ref})
        await done

    def _send_join(self, r: _Room) -> None:
        r.cmd = self._next_id()
        self._joins[r.cmd] = r.name
        message: Message = {"type": "join", "room": r.name, "id": r.cmd}
        if r.meta is not None:
            message["meta"] = r.meta
        self._write("cmd", message)

    # --- receiving --------------------------------------------------------------------

    def _on_text(self, data: str) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            self._emit("error", SignalingError("invalid-json",
                                               "the server sent text that is not JSON"))
            return
        if not isinstance(msg, dict):
            return
        self._emit("raw", {"direction": "in", "message": msg})
        if isinstance(msg.get("from"), str):
            # A relayed message: the answer to a request() is taken by it; the rest is a
            # message, whatever its type (a peer cannot fake a server event).
            entry = self._pending.get(msg.get("ref")) if _hashable(msg.get("ref")) else None
            if entry is not None and entry.kind == "request" and entry.to == msg["from"]:
                self._settle(msg["ref"], msg)
            else:
                self._deliver(msg)
            return
        kind = msg.get("type")
        handler = {
            "connected": self._on_greeting,
            "joined": self._on_joined,
            "peer-joined": self._on_peer_joined,
            "peer-left": self._on_peer_left,
            "left": self._on_left,
            "pong": self._on_pong,
            "error": self._on_error,
            "expired": self._on_expired,
            "reconnect": self._on_reconnect,
        }.get(kind if isinstance(kind, str) else "")
        if handler is None:
            self._deliver(msg)
        else:
            handler(msg)

    def _on_greeting(self, msg: Message) -> None:
        previous = self._peer_id
        lost = self._ever_opened and msg.get("resumed") is not True
        resumed = self._ever_opened and not lost
        self._greeted = True
        self._ever_opened = True
        self._attempt = 0
        self._greeting = msg
        self._peer_id = msg.get("peerId")
        token = msg.get("resumeToken")
        self._resume_token = token if isinstance(token, str) else None
        self._set_state("open")
        if lost:
            self._drop_session()
        for r in list(self._rooms.values()):
            if resumed and r.joined:
                continue
            # The server joins the ?room= one itself; the others are joined here (a join
            # sent before a drop may not have reached the server: sent again, see _on_error).
            if not (r.name == self.room and not resumed):
                self._send_join(r)
        for ref, (room, _) in self._leaving.items():
            self._write("cmd", {"type": "leave", "room": room, "id": ref})
        outbox, self._outbox = self._outbox, deque()
        for message in outbox:
            if not self._write("post", message):
                self._outbox.append(message)
        missed = msg.get("missed")
        self._emit("open", {"peerId": self._peer_id, "resumed": resumed,
                            "missed": missed if isinstance(missed, int) else 0,
                            "previousPeerId": previous, "greeting": msg})
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(msg)

    def _drop_session(self) -> None:
        """A new session replaced the lost one: this client is a new peer to everyone.
        Presence is emptied (with ``peer-left`` events), requests and queued messages of
        the old session fail, and rooms are joined again."""
        lost = SignalingError("session-lost", "the session could not be resumed")
        for ref, entry in list(self._pending.items()):
            if entry.kind != "ping":
                self._settle(ref, lost)
        for _, (_, done) in list(self._leaving.items()):
            if not done.done():
                done.set_result(None)
        self._leaving.clear()
        outbox, self._outbox = self._outbox, deque()
        for message in outbox:
            self._expire(message, "session-lost")
        self._joins.clear()
        for r in self._rooms.values():
            peers = list(r.peers.values())
            r.peers = {}
            r.joined = False
            r.cmd = None
            for p in peers:
                self._emit("peer-left", {"type": "peer-left", "room": r.name,
                                         "peerId": p["peerId"], "reason": "session-lost"})

    def _on_joined(self, msg: Message) -> None:
        if _hashable(msg.get("ref")):
            self._joins.pop(msg.get("ref"), None)
        r = self._rooms.get(msg.get("room"))  # type: ignore[arg-type]
        if r is None:
            return  # joined, then left before the answer came
        r.joined = True
        r.cmd = None
        r.peers = {}
        for p in msg.get("peers") or []:
            if isinstance(p, dict) and isinstance(p.get("peerId"), str):
                r.peers[p["peerId"]] = {"peerId": p["peerId"], "meta": p.get("meta") or {},
                                        "polite": p.get("polite")}
        snapshot = {"room": r.name, "peers": self.peers(r.name)}
        self._emit("joined", snapshot)
        if not r.done.done():
            r.done.set_result(snapshot)
        else:  # joined again (a new session): later join() calls get the new snapshot
            r.done = _quiet_future()
            r.done.set_result(snapshot)

    def _on_peer_joined(self, msg: Message) -> None:
        r = self._rooms.get(msg.get("room"))  # type: ignore[arg-type]
        peer = msg.get("peerId")
        if r is not None and isinstance(peer, str):
            r.peers[peer] = {"peerId": peer, "meta": msg.get("meta") or {},
                             "polite": msg.get("polite")}
        self._emit("peer-joined", msg)

    def _on_peer_left(self, msg: Message) -> None:
        r = self._rooms.get(msg.get("room"))  # type: ignore[arg-type]
        if r is not None and r.peers.pop(msg.get("peerId"), None) is None:  # type: ignore[arg-type]
            return  # already reported
        self._emit("peer-left", msg)

    def _on_left(self, msg: Message) -> None:
        ref = msg.get("ref")
        if _hashable(ref) and ref in self._leaving:
            _, done = self._leaving.pop(ref)
            if not done.done():
                done.set_result(None)

    def _on_pong(self, msg: Message) -> None:
        if _hashable(msg.get("ref")):
            self._settle(msg.get("ref"), msg)

    def _on_error(self, msg: Message) -> None:
        code = str(msg.get("code") or "error")
        ref = msg.get("ref") if _hashable(msg.get("ref")) else None
        err = SignalingError(code, str(msg.get("message") or code), ref, msg)
        if ref is not None and ref in self._joins:
            r = self._rooms.get(self._joins.pop(ref))
            if r is None or r.joined:
                return  # left meanwhile, or a join sent twice around a drop
            if r.cmd == ref:
                r.cmd = None
            if code == "already-in-room":
                # A join sent before a drop reached the server but its answer was lost:
                # leave and join again to get the snapshot.
                self._write("cmd", {"type": "leave", "room": r.name, "id": self._next_id()})
                self._send_join(r)
                return
            del self._rooms[r.name]
            if not r.done.done():
                r.done.set_exception(err)
            return
        if ref is not None:
            if ref in self._leaving:
                _, done = self._leaving.pop(ref)
                if not done.done():
                    done.set_result(None)
                return
            if self._settle(ref, err):
                return
        self._emit("error", err)

    def _on_expired(self, msg: Message) -> None:
        ref = msg.get("ref") if _hashable(msg.get("ref")) else None
        message = self._sent.get(ref) if ref is not None else None
        self._settle(ref, SignalingError("expired", "not delivered", ref, msg))
        self._emit("expired", {"ref": ref, "to": msg.get("to"), "message": message,
                               "reason": "expired"})

    def _on_reconnect(self, msg: Message) -> None:
        after = msg.get("after_ms")
        if isinstance(after, int | float) and not isinstance(after, bool):
            self._reconnect_after = min(MAX_AFTER_MS, max(0, after)) / 1000
        else:
            self._reconnect_after = None


def _quiet_future() -> asyncio.Future[Any]:
    """A future whose exception nobody has to retrieve (no "never retrieved" warning)."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


def _hashable(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) or value is None

