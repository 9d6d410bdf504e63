"""One WebSocket session after the opening handshake, as a pure state machine (RFC 6455).

Bytes in (``receive_data``), events and bytes to write out; no sockets, no clock, no asyncio,
so every rule below is tested without a socket. The transport glue (``server/connection.py``)
feeds it, writes ``data_to_send()`` and closes the socket when ``close_transport`` is set.

What it owns: frame parsing and unmasking (server side: client frames must be masked, no
extension is negotiated so RSV bits are errors), reassembly of fragmented messages,
incremental UTF-8 validation of text (a bad byte fails the connection with 1007 at the
fragment, even the partial frame, that carries it), control frames, the closing handshake,
and the heartbeat's "ping outstanding" state.

Events are ``(op, payload)`` tuples, cheap to make on the hot path:

- ``(OP_TEXT, bytes)``: a complete text message, valid UTF-8; ``(OP_BINARY, bytes)``.
- ``(OP_PING, payload)``: the application decides whether to answer (rate limits).
- ``(OP_PONG, payload)``: the outstanding ping (if any) is answered.
- ``(FRAGMENT, b"")``: one frame of a fragmented message arrived that does not complete it
  (so fragments can be charged to a rate limit); the next data event completes that message.
- ``(OP_CLOSE, body)``: the peer's close frame, valid; ``peer_close_code`` holds its code.

A protocol error does not raise: the events parsed before the bad frame are returned, then the
session fails (``failure`` is set, a close frame with its code is queued, ``close_transport``
is set). Memory: while a message is partial, at most ``max_size`` payload bytes in one
buffer plus one partial frame (at most one read chunk, or one control frame), however it
is fragmented.
"""

from __future__ import annotations

import codecs

from rtcsignal.protocol.frames import (
    CLOSE_INVALID_DATA,
    CLOSE_NO_STATUS,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ProtocolError,
    encode_close,
    encode_frame,
    parse_close,
    scan_text,
    unmask,
)

#: Pseudo-opcode of the event for a fragment that does not complete its message.
FRAGMENT = 0x10

OPEN, CLOSING, CLOSED = 1, 2, 3

PING_FRAME = encode_frame(OP_PING, b"")

_FRAGMENT_EVENT = (FRAGMENT, b"")  # shared: a flood of fragments allocates no events

_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class Session:
    """Server side of one WebSocket connection; see the module docstring for the events."""

    __slots__ = (
        "_buf",
        "_checked",
        "_msg",
        "_msg_op",
        "_out",
        "_utf8",
        "close_transport",
        "failure",
        "max_size",
        "peer_close_code",
        "ping_pending",
        "reading",
        "state",
    )

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.state = OPEN
        self.reading = True  # data messages are emitted (while open, or lingering)
        self.ping_pending = False
        self.close_transport = False  # the transport should close now (after writing out)
        self.failure: ProtocolError | None = None
        self.peer_close_code: int | None = None
        self._buf: bytearray | None = None  # bytes of a partial frame
        self._msg: bytearray | None = None  # payload of a partial fragmented message
        self._msg_op = 0
        self._utf8: codecs.IncrementalDecoder | None = None  # text validation across pieces
        self._checked = 0  # payload bytes of the partial frame in _buf already validated
        self._out: list[bytes] | None = None  # made on demand: most sessions never need it

    # --- output ---------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes the session itself must write (close frames); empties the queue."""
        out = self._out
        if not out:
            return b""
        self._out = None
        return b"".join(out)

    def ping(self) -> bytes:
        """A heartbeat ping to write; the next ``ping`` call finds ``ping_pending`` set if
        the peer has not answered in between."""
        self.ping_pending = True
        return PING_FRAME

    def close(self, code: int, reason: str = "", linger: bool = False) -> bytes:
        """Start the closing handshake: returns the close frame to write (once), then waits
        for the peer's close (the caller bounds the wait with its close timeout). Data
        messages that arrive meanwhile are dropped, or with ``linger`` still emitted (the
        peer sent them before it read our close)."""
        if self.state is not OPEN:
            return b""
        self.state = CLOSING
        self.reading = linger
        return encode_close(code, reason)

    def buffered(self) -> int:
        """Bytes held for partial frames and messages (for accounting and tests)."""
        return (len(self._buf) if self._buf else 0) + (len(self._msg) if self._msg else 0)

    # --- input ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[tuple[int, bytes]]:
        """Parse ``data``; returns the events found (see the module docstring)."""
        if self.state is CLOSED or self.close_transport:
            return []
        if self._buf is not None:
            self._buf += data
            return self.receive_rest(self._buf, [], 0)
        if (scan_text is not None and self._msg is None and self.reading
                and not self._checked and self.state is OPEN):
            # Compiled: the complete text frames this loop would emit as they are; it goes
            # on from where they end (anything else: other frames, errors, a partial frame).
            out, pos = scan_text(data, self.max_size)
            if pos == len(data):
                return out
            return self.receive_rest(data, out, pos)
        return self.receive_rest(data, [], 0)

    def receive_rest(self, buf: bytes | bytearray, out: list[tuple[int, bytes]],
                     pos: int) -> list[tuple[int, bytes]]:
        """``receive_data``'s frame loop from ``pos`` of ``buf`` (``data``, or ``_buf`` with
        ``data`` appended), appending to ``out`` (events already found before ``pos``). The
        compiled connection glue calls it after its own ``scan_text`` stopped short."""
        try:  # the frame loop is inline: one call per read on the hot path
            n = len(buf)
            max_size = self.max_size
            while n - pos >= 2:
                b0 = buf[pos]
                b1 = buf[pos + 1]
                if b0 & 0x70:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
                if not b1 & 0x80:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "client frame not masked")
                op = b0 & 0x0F
                fin = b0 & 0x80
                length = b1 & 0x7F
                head = pos + 2
                if length == 126:
                    if n - pos < 4:
                        break
                    length = (buf[head] << 8) | buf[head + 1]
                    head += 2
                elif length == 127:
                    if n - pos < 10:
                        break
                    length = int.from_bytes(buf[head : head + 8], "big")
                    head += 8
                if op in (OP_TEXT, OP_BINARY):  # the common case first
                    if self._msg is not None:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                    if length > max_size:
                        raise ProtocolError(CLOSE_TOO_BIG, "message too big")
                elif op >= 8:
                    if op > OP_PONG:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {op}")
                    if not fin or length > 125:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "invalid control frame")
                elif op == OP_CONT:
                    if self._msg is None:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation without a message")
                    if len(self._msg) + length > max_size:
                        raise ProtocolError(CLOSE_TOO_BIG, "message too big")
                else:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {op}")
                end = head + 4 + length
                if end > n:
                    if op == OP_TEXT or (op == OP_CONT and self._msg_op == OP_TEXT):
                        self._check_partial(buf, head, n)  # fail fast inside a partial frame
                    break
                payload = unmask(buf[head + 4 : end], buf[head : head + 4])
                pos = end
                if op == OP_TEXT and fin and not self._checked:
                    if not payload.isascii():  # ASCII is valid UTF-8; skip the decoder
                        try:
                            payload.decode()
                        except UnicodeDecodeError:
                            raise ProtocolError(CLOSE_INVALID_DATA, "text is not UTF-8") from None
                    if self.reading:
                        out.append((OP_TEXT, payload))
                elif op >= 8:
                    self._control(op, payload, out)
                    if self.state is CLOSED:
                        pos = n  # nothing after a close frame is read
                        break
                else:
                    self._fragment(op, fin, payload, out)
        except ProtocolError as exc:
            self._fail(exc)
            self._buf = None
            return out
        if pos >= n:
            self._buf = None
        elif self._buf is not None:
            del self._buf[:pos]
        else:
            self._buf = bytearray(buf[pos:])
        return out

    def _fragment(self, op: int, fin: int, payload: bytes, out: list[tuple[int, bytes]]) -> None:
        """A data frame other than a complete single-frame text message."""
        if op != OP_CONT:
            self._msg_op = op
        if self._msg_op == OP_TEXT:
            self._validate(payload[self._checked :], bool(fin))
        self._checked = 0
        if op != OP_CONT:  # the first frame of a message
            if fin:  # a single-frame binary message, or text validated piece by piece
                if self.reading:
                    out.append((op, payload))
                return
            self._msg = bytearray(payload)
        else:
            assert self._msg is not None
            self._msg += payload
        if not fin:
            if self.reading:
                out.append(_FRAGMENT_EVENT)
            return
        message = bytes(self._msg)
        self._drop_message()
        if self.reading:
            out.append((self._msg_op, message))

    def _validate(self, piece: bytes | bytearray, final: bool) -> None:
        if self._utf8 is None:
            self._utf8 = _utf8_decoder()
        try:
            self._utf8.decode(piece, final)
        except UnicodeDecodeError:
            raise ProtocolError(CLOSE_INVALID_DATA, "text is not UTF-8") from None
        if final:
            self._utf8 = None
            return
        # CPython's decoder holds ED A0..BF (a UTF-16 surrogate, never valid) until a third
        # byte arrives; refuse it at the piece that carries it.
        pending = self._utf8.getstate()[0]
        if len(pending) >= 2 and pending[0] == 0xED and pending[1] >= 0xA0:
            raise ProtocolError(CLOSE_INVALID_DATA, "text is not UTF-8")

    def _check_partial(self, buf: bytes | bytearray, head: int, n: int) -> None:
        """Validate the text bytes of a frame that has not fully arrived yet."""
        start = head + 4 + self._checked
        if start >= n:
            return
        mask = bytes(buf[head : head + 4])
        k = self._checked % 4
        self._validate(unmask(buf[start:n], mask[k:] + mask[:k]), False)
        self._checked = n - head - 4

    def _control(self, op: int, payload: bytes, out: list[tuple[int, bytes]]) -> None:
        if op == OP_PING:
            if self.state is OPEN:
                out.append((OP_PING, payload))
        elif op == OP_PONG:
            self.ping_pending = False
            if self.state is OPEN:
                out.append((OP_PONG, payload))
        else:
            code, _reason = parse_close(payload)  # ProtocolError for a malformed body
            self.peer_close_code = code
            if self.state is OPEN:  # the peer starts the closing handshake: answer it
                self._emit(encode_close(CLOSE_NORMAL if code == CLOSE_NO_STATUS else code))
                out.append((OP_CLOSE, payload))
            self.state = CLOSED
            self.close_transport = True  # the server closes TCP first (RFC 6455 7.1.1)
            self._drop_message()

    def _fail(self, exc: ProtocolError) -> None:
        """_Fail the WebSocket Connection_: send a close frame (unless one was sent) and
        close the transport without waiting for the peer."""
        self.failure = exc
        self.reading = False
        if self.state is OPEN:
            self._emit(encode_close(exc.code, exc.reason))
        self.state = CLOSED
        self.close_transport = True
        self._drop_message()

    def _emit(self, data: bytes) -> None:
        if self._out is None:
            self._out = []
        self._out.append(data)

    def _drop_message(self) -> None:
        self._msg = None
        self._utf8 = None
        self._checked = 0
