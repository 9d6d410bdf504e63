"""RFC 6455 framing as a pure state machine: bytes in, messages out; no sockets, no asyncio.

Server side only: client frames must be masked, server frames are not. Extensions are not
negotiated, so any RSV bit is a protocol error. Sizes are checked from the frame header,
before the payload is buffered, so a peer cannot make us hold more than ``max_size`` bytes
of one message (plus one read chunk).
"""

from __future__ import annotations

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

# Close codes used by this server (RFC 6455 section 7.4.1 and the IANA registry).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013

_VALID_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)


class ProtocolError(Exception):
    """The peer broke the protocol; close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def unmask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask``, using big-int arithmetic (C speed)."""
    n = len(payload)
    if n == 0:
        return b""
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little"
    )


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame. Callers frame a relayed message once and reuse the bytes."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def encode_close(code: int, reason: str = "") -> bytes:
    raw = reason.encode()[:123].decode(errors="ignore").encode()  # never split a character
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + raw)


def parse_close(payload: bytes) -> tuple[int, str]:
    """Close frame body -> (code, reason); raises ProtocolError for malformed bodies."""
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "close frame with 1-byte body")
    code = int.from_bytes(payload[:2], "big")
    if code not in _VALID_CLOSE_CODES and not 3000 <= code <= 4999:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


class FrameReader:
    """Incremental reader of client frames.

    ``feed(data)`` returns the complete messages and control frames found so far as
    ``(opcode, payload)`` pairs; fragmented messages come out reassembled with the opcode
    of their first frame. Memory per connection: a few slots while idle; while a message
    is partial, at most ``max_size`` bytes plus one read chunk.
    """

    __slots__ = ("_buf", "_frag", "_frag_op", "_frag_size", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf: bytearray | None = None
        self._frag: list[bytes] | None = None
        self._frag_op = 0
        self._frag_size = 0

    def buffered(self) -> int:
        """Bytes held for partial frames and messages (for accounting and tests)."""
        return (len(self._buf) if self._buf else 0) + self._frag_size

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        if self._buf is not None:
            self._buf += data
            buf: bytes | bytearray = self._buf
        else:
            buf = data
        out: list[tuple[int, bytes]] = []
        pos = 0
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
                length = int.from_bytes(buf[head : head + 2], "big")
                head += 2
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[head : head + 8], "big")
                head += 8
            if op >= 8:
                if op not in (OP_CLOSE, OP_PING, OP_PONG):
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {op}")
                if not fin or length > 125:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "invalid control frame")
            elif op == OP_CONT:
                if self._frag is None:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation without a message")
                if self._frag_size + length > max_size:
                    raise ProtocolError(CLOSE_TOO_BIG, "message too big")
            elif op in (OP_TEXT, OP_BINARY):
                if self._frag is not None:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                if length > max_size:
                    raise ProtocolError(CLOSE_TOO_BIG, "message too big")
            else:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {op}")
            end = head + 4 + length
            if end > n:
                break
            payload = unmask(buf[head + 4 : end], buf[head : head + 4])
            pos = end
            if op >= 8 or (fin and op != OP_CONT):
                out.append((op, payload))
            elif op != OP_CONT:  # first fragment
                self._frag = [payload]
                self._frag_op = op
                self._frag_size = length
            else:
                assert self._frag is not None
                self._frag.append(payload)
                self._frag_size += length
                if fin:
                    out.append((self._frag_op, b"".join(self._frag)))
                    self._frag = None
                    self._frag_size = 0
        if pos >= n:
            self._buf = None
        elif self._buf is not None:
            del self._buf[:pos]
        else:
            self._buf = bytearray(buf[pos:])
        return out
