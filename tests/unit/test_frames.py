"""RFC 6455 framing: the pure FrameReader, encoders and close-frame parsing.

Client frames are built here independently of the module under test (``client_frame``),
and server frames are decoded independently (``decode_server_frame``).
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtcsignal.protocol import frames
from rtcsignal.protocol.frames import FrameReader, ProtocolError

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def xor(payload: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def client_frame(op: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
                 masked: bool = True, mask: bytes | None = None,
                 length: int | None = None) -> bytes:
    """A client frame as RFC 6455 section 5.2 lays it out (``length`` may lie)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | op])
    mbit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = mask if mask is not None else os.urandom(4)
    return head + mask + xor(payload, mask)


def decode_server_frame(data: bytes) -> tuple[bool, int, bytes, int]:
    """(fin, opcode, payload, header length) of one unmasked server frame."""
    b0, b1 = data[0], data[1]
    assert b1 & 0x80 == 0
    n, pos = b1 & 0x7F, 2
    if n == 126:
        n, pos = struct.unpack("!H", data[2:4])[0], 4
    elif n == 127:
        n, pos = struct.unpack("!Q", data[2:10])[0], 10
    assert len(data) == pos + n
    return bool(b0 & 0x80), b0 & 0x0F, data[pos:], pos


def raises(code: int, reader: FrameReader, data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        reader.feed(data)
    assert info.value.code == code, info.value.reason
    return info.value


# --- masking -----------------------------------------------------------------------------


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_unmask_matches_xor_and_roundtrips(payload: bytes, mask: bytes) -> None:
    assert frames.unmask(payload, mask) == xor(payload, mask)
    assert frames.unmask(frames.unmask(payload, mask), mask) == payload
    assert frames.unmask(bytearray(payload), bytearray(mask)) == xor(payload, mask)


# --- length encodings --------------------------------------------------------------------

LENGTHS = [0, 1, 125, 126, 127, 65535, 65536, 70000]


@pytest.mark.parametrize("n", LENGTHS)
def test_encode_frame_lengths(n: int) -> None:
    payload = os.urandom(n)
    data = frames.encode_frame(TEXT, payload)
    fin, op, body, head = decode_server_frame(data)
    assert (fin, op, body) == (True, TEXT, payload)
    assert head == (2 if n <= 125 else 4 if n <= 65535 else 10)


@pytest.mark.parametrize("n", LENGTHS)
def test_reader_lengths(n: int) -> None:
    payload = os.urandom(n)
    reader = FrameReader(max_size=1 << 20)
    assert reader.feed(client_frame(BINARY, payload)) == [(BINARY, payload)]
    assert reader.buffered() == 0


def test_max_size_is_inclusive() -> None:
    reader = FrameReader(max_size=1000)
    payload = os.urandom(1000)
    assert reader.feed(client_frame(TEXT, payload)) == [(TEXT, payload)]
    raises(1009, reader, client_frame(TEXT, os.urandom(1001)))


# --- fragmentation and control frames ----------------------------------------------------


def test_fragments_are_reassembled_with_first_opcode() -> None:
    reader = FrameReader(max_size=1000)
    parts = [b"hel", b"", b"lo ", "wörld".encode()]
    stream = client_frame(TEXT, parts[0], fin=False)
    for p in parts[1:-1]:
        stream += client_frame(CONT, p, fin=False)
    stream += client_frame(CONT, parts[-1])
    assert reader.feed(stream) == [(TEXT, b"".join(parts))]
    # Binary works the same, and the reader is ready for the next message.
    stream = client_frame(BINARY, b"\x00\x01", fin=False) + client_frame(CONT, b"\x02")
    assert reader.feed(stream) == [(BINARY, b"\x00\x01\x02")]
    assert reader.buffered() == 0


def test_control_frames_interleaved_in_fragments() -> None:
    reader = FrameReader(max_size=1000)
    stream = (
        client_frame(TEXT, b"ab", fin=False)
        + client_frame(PING, b"p1")
        + client_frame(CONT, b"cd", fin=False)
        + client_frame(PONG, b"")
        + client_frame(CONT, b"ef")
        + client_frame(TEXT, b"next")
    )
    assert reader.feed(stream) == [(PING, b"p1"), (PONG, b""), (TEXT, b"abcdef"),
                                   (TEXT, b"next")]


def test_close_inside_fragmented_message_comes_out() -> None:
    reader = FrameReader(max_size=1000)
    body = struct.pack("!H", 1000) + b"bye"
    out = reader.feed(client_frame(TEXT, b"x", fin=False) + client_frame(CLOSE, body))
    assert out == [(CLOSE, body)]


def test_fragmented_total_over_max_is_1009_from_the_header() -> None:
    reader = FrameReader(max_size=100)
    assert reader.feed(client_frame(TEXT, b"a" * 60, fin=False)) == []
    # Only the header of a continuation that would make 120 bytes: refused before its payload.
    header = client_frame(CONT, b"", length=60)[:2]
    raises(1009, reader, header)


def test_size_over_max_is_1009_from_the_header_alone() -> None:
    for n in (101, 65536, 1 << 40):
        reader = FrameReader(max_size=100)
        header = client_frame(TEXT, b"", length=n)  # header + mask, no payload at all
        raises(1009, reader, header[: -4])
        assert reader.buffered() < 16
    # Fed byte by byte, the refusal comes as soon as the length is known.
    reader = FrameReader(max_size=100)
    header = client_frame(BINARY, b"", length=1 << 40)[:10]
    for b in header[:-1]:
        assert reader.feed(bytes([b])) == []
    raises(1009, reader, header[-1:])


# --- protocol errors ---------------------------------------------------------------------


def test_unmasked_client_frame_is_1002() -> None:
    raises(1002, FrameReader(1000), client_frame(TEXT, b"hi", masked=False))


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
def test_rsv_bits_are_1002(rsv: int) -> None:
    raises(1002, FrameReader(1000), client_frame(TEXT, b"hi", rsv=rsv))


@pytest.mark.parametrize("op", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_are_1002(op: int) -> None:
    raises(1002, FrameReader(1000), client_frame(op, b""))


@pytest.mark.parametrize("op", [PING, PONG, CLOSE])
def test_control_frames_over_125_or_fragmented_are_1002(op: int) -> None:
    payload = struct.pack("!H", 1000) + b"x" * 124 if op == CLOSE else b"x" * 126
    raises(1002, FrameReader(1000), client_frame(op, payload))
    raises(1002, FrameReader(1000), client_frame(op, b"", fin=False))
    ok = struct.pack("!H", 1000) + b"x" * 123 if op == CLOSE else b"x" * 125
    assert FrameReader(1000).feed(client_frame(op, ok)) == [(op, ok)]


def test_continuation_without_start_is_1002() -> None:
    raises(1002, FrameReader(1000), client_frame(CONT, b"x"))
    raises(1002, FrameReader(1000), client_frame(CONT, b"x", fin=False))
    # ... also right after a complete fragmented message.
    reader = FrameReader(1000)
    reader.feed(client_frame(TEXT, b"a", fin=False) + client_frame(CONT, b"b"))
    raises(1002, reader, client_frame(CONT, b"c"))


@pytest.mark.parametrize("op", [TEXT, BINARY])
def test_new_message_inside_fragmented_one_is_1002(op: int) -> None:
    reader = FrameReader(1000)
    reader.feed(client_frame(TEXT, b"a", fin=False))
    raises(1002, reader, client_frame(op, b"b"))


# --- incremental feeding -----------------------------------------------------------------


def sample_stream() -> tuple[bytes, list[tuple[int, bytes]]]:
    big = os.urandom(70000)
    stream = (
        client_frame(TEXT, b'{"type":"a"}')
        + client_frame(BINARY, big[:300], fin=False)
        + client_frame(PING, b"ping!")
        + client_frame(CONT, big[300:])
        + client_frame(TEXT, b"")
        + client_frame(PONG, b"")
        + client_frame(TEXT, "ünï".encode(), fin=False)
        + client_frame(CONT, b"!")
        + client_frame(CLOSE, struct.pack("!H", 1001))
    )
    expected = [(TEXT, b'{"type":"a"}'), (PING, b"ping!"), (BINARY, big), (TEXT, b""),
                (PONG, b""), (TEXT, "ünï!".encode()), (CLOSE, struct.pack("!H", 1001))]
    return stream, expected


def test_byte_by_byte_equals_all_at_once() -> None:
    stream, expected = sample_stream()
    assert FrameReader(1 << 20).feed(stream) == expected
    reader = FrameReader(1 << 20)
    out = []
    for i in range(len(stream)):
        out += reader.feed(stream[i : i + 1])
    assert out == expected
    assert reader.buffered() == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5000), max_size=40))
def test_any_chunking_gives_the_same_messages(cuts: list[int]) -> None:
    stream, expected = sample_stream()
    reader = FrameReader(1 << 20)
    out, pos = [], 0
    for c in cuts:
        out += reader.feed(stream[pos : pos + c])
        pos += c
    out += reader.feed(stream[pos:])
    assert out == expected


def test_memory_while_partial_is_bounded_by_what_arrived() -> None:
    reader = FrameReader(max_size=1000)
    frame = client_frame(TEXT, b"x" * 900)
    reader.feed(frame[:500])
    assert reader.buffered() == 500
    assert reader.feed(frame[500:]) == [(TEXT, b"x" * 900)]
    assert reader.buffered() == 0


# --- close frames ------------------------------------------------------------------------


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011,
                                  3000, 4000, 4999])
def test_parse_close_valid_codes(code: int) -> None:
    reason = "fine ✓"
    assert frames.parse_close(struct.pack("!H", code) + reason.encode()) == (code, reason)
    assert frames.parse_close(struct.pack("!H", code)) == (code, "")


def test_parse_close_empty_body_is_no_status() -> None:
    assert frames.parse_close(b"") == (1005, "")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_parse_close_invalid_codes_are_1002(code: int) -> None:
    with pytest.raises(ProtocolError) as info:
        frames.parse_close(struct.pack("!H", code))
    assert info.value.code == 1002


def test_parse_close_one_byte_and_bad_utf8() -> None:
    with pytest.raises(ProtocolError) as info:
        frames.parse_close(b"\x03")
    assert info.value.code == 1002
    with pytest.raises(ProtocolError) as info:
        frames.parse_close(struct.pack("!H", 1000) + b"\xc3")
    assert info.value.code == 1007


@pytest.mark.parametrize("reason", ["", "room-full", "x" * 200, "é" * 100, "€" * 50],
                         ids=["empty", "code", "long-ascii", "long-2-byte", "long-3-byte"])
def test_encode_close_is_a_valid_control_frame(reason: str) -> None:
    """Our own close frames: payload <= 125 bytes, and the reason still valid UTF-8
    (RFC 6455 5.5.1), i.e. the peer's parse_close accepts them."""
    fin, op, body, _ = decode_server_frame(frames.encode_close(4001, reason))
    assert (fin, op) == (True, CLOSE)
    assert len(body) <= 125
    code, text = frames.parse_close(body)
    assert code == 4001
    assert reason.startswith(text)
