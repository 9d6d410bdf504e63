"""RFC 6455 frame codec: opcodes, close codes, masking, encoding; pure functions.

Parsing incoming frames is stateful and lives in ``protocol/session.py``; this module holds
what both the session and the server's writers need. Server frames are never masked.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from typing import Any

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
CLOSE_SERVICE_RESTART = 1012
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


def _unmask_py(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
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


#: Heads of unmasked final text frames with a 7-bit length, by length.
_TEXT_HEADS = [bytes((0x80 | OP_TEXT, n)) for n in range(126)]


def _encode_text_py(payload: bytes) -> bytes:
    """``encode_frame(OP_TEXT, payload)`` in one call and one concatenation (the relay path
    frames every message it relays)."""
    n = len(payload)
    if n < 126:
        return _TEXT_HEADS[n] + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def payload_of(frame: bytes) -> bytes:
    """The payload of a frame made by ``encode_frame`` (unmasked, final)."""
    n = frame[1] & 0x7F
    return frame[2 + (n == 126) * 2 + (n == 127) * 8:]


def split_frames(data: bytes) -> list[bytes]:
    """Frames made by ``encode_frame``, written back to back, one by one."""
    out = []
    pos = 0
    while pos < len(data):
        n = data[pos + 1] & 0x7F
        head = 2
        if n == 126:
            n, head = int.from_bytes(data[pos + 2:pos + 4], "big"), 4
        elif n == 127:
            n, head = int.from_bytes(data[pos + 2:pos + 10], "big"), 10
        out.append(data[pos:pos + head + n])
        pos += head + n
    return out


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


# --- the compiled hot path (protocol/_speedups.pyx), when built -----------------------------


def source_hash(source: str) -> str:
    """setup.py's SOURCE_HASH of a .pyx: sha256 of it and of the package's ``_slots.pxd``."""
    digest = hashlib.sha256()
    slots = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "_slots.pxd")
    for path in (source, slots):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def load_speedups(module: str, source: str) -> Any:
    """The compiled module ``module`` built from ``source`` (a .pyx beside this package), or
    None: not built, ``RTCSIGNAL_PURE=1`` in the environment, or built from another version
    of ``source`` (a stale build would run old code: a warning says to rebuild)."""
    if os.environ.get("RTCSIGNAL_PURE", "") not in ("", "0"):
        return None
    try:
        mod = __import__(module, fromlist=["_"])
    except ImportError:
        return None
    try:
        want = source_hash(source)
    except OSError:  # an installed wheel need not carry the .pyx
        return mod
    if getattr(mod, "SOURCE_HASH", None) != want:
        warnings.warn(f"{mod.__file__} was built from another version of {source}: using "
                      "the pure-Python code (rebuild: pip install -e .)", RuntimeWarning,
                      stacklevel=2)
        return None
    return mod


_compiled = load_speedups("rtcsignal.protocol._speedups",
                          os.path.join(os.path.dirname(__file__), "_speedups.pyx"))
#: True when the compiled frame reader is in use.
COMPILED = _compiled is not None
unmask: Callable[[bytes | bytearray, bytes | bytearray], bytes] = (
    _compiled.unmask if _compiled else _unmask_py)
encode_text: Callable[[bytes], bytes] = _compiled.encode_text if _compiled else _encode_text_py
#: ``scan_text(data, max_size) -> (events, offset)``, compiled only (see _speedups.pyx).
scan_text: Callable[[bytes, int], tuple[list[tuple[int, bytes]], int]] | None = (
    _compiled.scan_text if _compiled else None)
