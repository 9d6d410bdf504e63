"""RFC 6455 session engine: the pure ``Session`` state machine and the frame codec.

Client frames are built here independently of the module under test (``client_frame``),
server frames are decoded independently (``decode_server_frame``), and UTF-8 prefixes are
judged by an independent table (``first_invalid``, Unicode Table 3-7).
"""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtcsignal.protocol import frames
from rtcsignal.protocol.frames import ProtocolError
from rtcsignal.protocol.session import CLOSED, CLOSING, FRAGMENT, OPEN, Session

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA

Events = list[tuple[int, bytes]]


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


def close_body(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def queued_close_code(session: Session) -> int:
    """The code of the one close frame the session queued (and nothing else queued)."""
    fin, op, body, _ = decode_server_frame(session.data_to_send())
    assert (fin, op) == (True, CLOSE)
    assert len(body) >= 2 and len(body) <= 125
    body[2:].decode()  # the reason is UTF-8
    return struct.unpack("!H", body[:2])[0]


def feed_bytewise(session: Session, data: bytes) -> Events:
    out: Events = []
    for i in range(len(data)):
        out += session.receive_data(data[i : i + 1])
    return out


def fails(code: int, session: Session, data: bytes) -> Events:
    """Feed ``data``; the session must fail with ``code``: failure set, a close frame with
    that code queued, the transport to be closed, and nothing read afterwards."""
    assert session.failure is None
    events = session.receive_data(data)
    assert session.failure is not None, events
    assert isinstance(session.failure, ProtocolError)
    assert session.failure.code == code, session.failure.reason
    assert session.close_transport
    assert session.state is CLOSED
    assert queued_close_code(session) == code
    assert session.receive_data(client_frame(TEXT, b"after")) == []
    assert session.data_to_send() == b""
    return events


def ok(session: Session) -> None:
    assert session.failure is None
    assert not session.close_transport
    assert session.state is OPEN
    assert session.data_to_send() == b""


# --- masking -----------------------------------------------------------------------------


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_unmask_matches_xor_and_roundtrips(payload: bytes, mask: bytes) -> None:
    assert frames.unmask(payload, mask) == xor(payload, mask)
    assert frames.unmask(frames.unmask(payload, mask), mask) == payload
    assert frames.unmask(bytearray(payload), bytearray(mask)) == xor(payload, mask)


@pytest.mark.parametrize("mask", [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x02\x03\x04"])
def test_session_unmasks_with_the_frame_mask(mask: bytes) -> None:
    payload = bytes(range(256)) * 3
    s = Session(1000)
    assert s.receive_data(client_frame(BINARY, payload, mask=mask)) == [(BINARY, payload)]
    # Fed byte by byte, a partial text frame is unmasked at every offset modulo 4.
    text = "añ€𝄞b".encode() * 20
    assert feed_bytewise(s, client_frame(TEXT, text, mask=mask)) == [(TEXT, text)]
    ok(s)


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
def test_session_lengths(n: int) -> None:
    payload = os.urandom(n)
    s = Session(max_size=1 << 20)
    assert s.receive_data(client_frame(BINARY, payload)) == [(BINARY, payload)]
    assert s.buffered() == 0
    text = b"t" * n
    assert s.receive_data(client_frame(TEXT, text)) == [(TEXT, text)]
    ok(s)


def test_max_size_is_inclusive() -> None:
    s = Session(max_size=1000)
    payload = os.urandom(1000)
    assert s.receive_data(client_frame(BINARY, payload)) == [(BINARY, payload)]
    assert s.receive_data(client_frame(TEXT, b"x" * 1000)) == [(TEXT, b"x" * 1000)]
    fails(1009, s, client_frame(TEXT, b"x" * 1001))


# --- fragmentation and control frames ----------------------------------------------------


def test_fragments_are_reassembled_with_first_opcode() -> None:
    s = Session(max_size=1000)
    parts = [b"hel", b"", b"lo ", "wörld".encode()]
    stream = client_frame(TEXT, parts[0], fin=False)
    for p in parts[1:-1]:
        stream += client_frame(CONT, p, fin=False)
    stream += client_frame(CONT, parts[-1])
    assert s.receive_data(stream) == [(FRAGMENT, b"")] * 3 + [(TEXT, b"".join(parts))]
    # Binary works the same, and the session is ready for the next message.
    stream = client_frame(BINARY, b"\x00\x01", fin=False) + client_frame(CONT, b"\x02")
    assert s.receive_data(stream) == [(FRAGMENT, b""), (BINARY, b"\x00\x01\x02")]
    assert s.buffered() == 0
    ok(s)


def test_each_non_final_frame_is_one_fragment_event() -> None:
    s = Session(max_size=1000)
    assert s.receive_data(client_frame(BINARY, b"a", fin=False)) == [(FRAGMENT, b"")]
    assert s.receive_data(client_frame(CONT, b"", fin=False)) == [(FRAGMENT, b"")]
    assert s.receive_data(client_frame(CONT, b"b", fin=False)) == [(FRAGMENT, b"")]
    assert s.receive_data(client_frame(CONT, b"c")) == [(BINARY, b"abc")]
    # A single-frame message yields no FRAGMENT.
    assert s.receive_data(client_frame(TEXT, b"d")) == [(TEXT, b"d")]


def test_control_frames_interleaved_in_fragments() -> None:
    s = Session(max_size=1000)
    stream = (
        client_frame(TEXT, b"ab", fin=False)
        + client_frame(PING, b"p1")
        + client_frame(CONT, b"cd", fin=False)
        + client_frame(PONG, b"")
        + client_frame(CONT, b"ef")
        + client_frame(TEXT, b"next")
    )
    assert s.receive_data(stream) == [(FRAGMENT, b""), (PING, b"p1"), (FRAGMENT, b""),
                                      (PONG, b""), (TEXT, b"abcdef"), (TEXT, b"next")]
    ok(s)


def test_close_inside_fragmented_message_comes_out() -> None:
    s = Session(max_size=1000)
    body = close_body(1000, b"bye")
    out = s.receive_data(client_frame(TEXT, b"x", fin=False) + client_frame(CLOSE, body))
    assert out == [(FRAGMENT, b""), (CLOSE, body)]
    assert s.buffered() == 0
    assert queued_close_code(s) == 1000


def test_fragmented_total_over_max_is_1009_from_the_header() -> None:
    s = Session(max_size=100)
    assert s.receive_data(client_frame(TEXT, b"a" * 60, fin=False)) == [(FRAGMENT, b"")]
    # Only the header of a continuation that would make 120 bytes: refused before its payload.
    header = client_frame(CONT, b"", length=60)[:2]
    assert fails(1009, s, header) == []
    assert s.buffered() == 0


def test_size_over_max_is_1009_from_the_header_alone() -> None:
    for n in (101, 65536, 1 << 40):
        s = Session(max_size=100)
        header = client_frame(TEXT, b"", length=n)  # header + mask, no payload at all
        assert fails(1009, s, header[:-4]) == []
        assert s.buffered() < 16
    # Fed byte by byte, the refusal comes as soon as the length is known.
    s = Session(max_size=100)
    header = client_frame(BINARY, b"", length=1 << 40)[:10]
    for b in header[:-1]:
        assert s.receive_data(bytes([b])) == []
        assert s.failure is None
    fails(1009, s, header[-1:])


# --- protocol errors ---------------------------------------------------------------------


def test_unmasked_client_frame_is_1002() -> None:
    fails(1002, Session(1000), client_frame(TEXT, b"hi", masked=False))


@pytest.mark.parametrize("rsv", [1, 2, 4, 7])
def test_rsv_bits_are_1002(rsv: int) -> None:
    fails(1002, Session(1000), client_frame(TEXT, b"hi", rsv=rsv))


@pytest.mark.parametrize("op", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_are_1002(op: int) -> None:
    fails(1002, Session(1000), client_frame(op, b""))


@pytest.mark.parametrize("op", [PING, PONG, CLOSE])
def test_control_frames_over_125_or_fragmented_are_1002(op: int) -> None:
    payload = close_body(1000, b"x" * 124) if op == CLOSE else b"x" * 126
    fails(1002, Session(1000), client_frame(op, payload))
    fails(1002, Session(1000), client_frame(op, b"", fin=False))
    good = close_body(1000, b"x" * 123) if op == CLOSE else b"x" * 125
    assert Session(1000).receive_data(client_frame(op, good)) == [(op, good)]


def test_continuation_without_start_is_1002() -> None:
    fails(1002, Session(1000), client_frame(CONT, b"x"))
    fails(1002, Session(1000), client_frame(CONT, b"x", fin=False))
    # ... also right after a complete fragmented message.
    s = Session(1000)
    s.receive_data(client_frame(TEXT, b"a", fin=False) + client_frame(CONT, b"b"))
    fails(1002, s, client_frame(CONT, b"c"))


@pytest.mark.parametrize("op", [TEXT, BINARY])
def test_new_message_inside_fragmented_one_is_1002(op: int) -> None:
    s = Session(1000)
    s.receive_data(client_frame(TEXT, b"a", fin=False))
    fails(1002, s, client_frame(op, b"b"))


# --- frames before an error are delivered -----------------------------------------------

BAD_FRAMES = {
    "rsv1": (1002, client_frame(TEXT, b"x", rsv=4)),
    "rsv3": (1002, client_frame(BINARY, b"x", rsv=1)),
    "opcode-3": (1002, client_frame(3, b"x")),
    "opcode-0xB": (1002, client_frame(0xB, b"")),
    "stray-continuation": (1002, client_frame(CONT, b"x")),
    "unmasked": (1002, client_frame(TEXT, b"x", masked=False)),
    "fragmented-ping": (1002, client_frame(PING, b"", fin=False)),
    "bad-utf8": (1007, client_frame(TEXT, b"\xff")),
    "too-big": (1009, client_frame(BINARY, b"", length=2000)),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_frames_before_an_error_are_delivered(name: str) -> None:
    code, bad = BAD_FRAMES[name]
    s = Session(1000)
    stream = (client_frame(TEXT, b"hello") + client_frame(PING, b"p")
              + bad + client_frame(TEXT, b"after the error"))
    assert fails(code, s, stream) == [(TEXT, b"hello"), (PING, b"p")]
    assert s.buffered() == 0


# --- incremental feeding -----------------------------------------------------------------


def sample_stream() -> tuple[bytes, Events]:
    big = os.urandom(70000)
    stream = (
        client_frame(TEXT, b'{"type":"a"}')
        + client_frame(BINARY, big[:300], fin=False)
        + client_frame(PING, b"ping!")
        + client_frame(CONT, big[300:])
        + client_frame(TEXT, b"")
        + client_frame(PONG, b"")
        + client_frame(TEXT, "ünï€".encode()[:5], fin=False)  # splits the "€"
        + client_frame(CONT, "ünï€".encode()[5:] + b"!")
        + client_frame(CLOSE, close_body(1001))
    )
    expected = [(TEXT, b'{"type":"a"}'), (FRAGMENT, b""), (PING, b"ping!"), (BINARY, big),
                (TEXT, b""), (PONG, b""), (FRAGMENT, b""), (TEXT, "ünï€!".encode()),
                (CLOSE, close_body(1001))]
    return stream, expected


def test_byte_by_byte_equals_all_at_once() -> None:
    stream, expected = sample_stream()
    s = Session(1 << 20)
    assert s.receive_data(stream) == expected
    assert queued_close_code(s) == 1001
    s = Session(1 << 20)
    assert feed_bytewise(s, stream) == expected
    assert s.buffered() == 0
    assert s.failure is None and s.close_transport
    assert queued_close_code(s) == 1001


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5000), max_size=40))
def test_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    stream, expected = sample_stream()
    s = Session(1 << 20)
    out: Events = []
    pos = 0
    for c in cuts:
        out += s.receive_data(stream[pos : pos + c])
        pos += c
    out += s.receive_data(stream[pos:])
    assert out == expected
    assert s.failure is None


def test_memory_while_partial_is_bounded_by_what_arrived() -> None:
    s = Session(max_size=1000)
    frame = client_frame(TEXT, b"x" * 900)
    assert s.receive_data(frame[:500]) == []
    assert s.buffered() == 500
    assert s.receive_data(frame[500:]) == [(TEXT, b"x" * 900)]
    assert s.buffered() == 0


# --- memory of fragmentation -------------------------------------------------------------


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_zero_length_continuation_flood_keeps_memory_bounded() -> None:
    first = b"first fragment"
    n = 100_000
    mask = b"\x11\x22\x33\x44"
    empty = client_frame(CONT, b"", fin=False, mask=mask)
    stream = (client_frame(TEXT, first, fin=False, mask=mask) + empty * n
              + client_frame(CONT, b"!", mask=mask))
    s = Session(max_size=1000)
    chunk, fragments, out = 4096, 0, []
    for piece in chunks(stream, chunk):
        events = s.receive_data(piece)
        fragments += sum(1 for op, _ in events if op == FRAGMENT)
        out += [e for e in events if e[0] != FRAGMENT]
        assert s.buffered() <= len(first) + chunk
        assert s.failure is None
    assert fragments == n + 1  # the first frame and each empty continuation
    assert out == [(TEXT, first + b"!")]
    assert s.buffered() == 0


@pytest.mark.parametrize("op", [TEXT, BINARY])
def test_one_byte_fragments_of_a_64k_message(op: int) -> None:
    max_size = 65536
    # Text: two-byte characters, so every character is split across two fragments.
    message = "é".encode() * (max_size // 2) if op == TEXT else os.urandom(max_size)
    mask = os.urandom(4)
    parts = [client_frame(op, message[:1], fin=False, mask=mask)]
    parts += [client_frame(CONT, message[i : i + 1], fin=False, mask=mask)
              for i in range(1, max_size - 1)]
    parts.append(client_frame(CONT, message[-1:], mask=mask))
    stream = b"".join(parts)
    s = Session(max_size=max_size)
    chunk, fragments, out = 4096, 0, []
    for piece in chunks(stream, chunk):
        events = s.receive_data(piece)
        fragments += sum(1 for e in events if e == (FRAGMENT, b""))
        out += [e for e in events if e[0] != FRAGMENT]
        assert s.buffered() <= max_size + chunk
    assert s.failure is None
    assert fragments == max_size - 1  # one per non-final frame
    assert out == [(op, message)]
    assert s.buffered() == 0
    # One byte more than max_size in one-byte fragments is refused with 1009.
    s = Session(max_size=max_size)
    s.receive_data(stream[: -len(parts[-1])])
    extra = client_frame(CONT, message[-1:], fin=False)  # completes the message's size
    fails(1009, s, extra + parts[-1])


def test_partial_control_frame_inside_a_full_message_is_bounded() -> None:
    """What a session can hold: a message at max_size plus one control frame in progress
    (header + <= 125 bytes), however small the chunks are."""
    s = Session(max_size=1000)
    s.receive_data(client_frame(BINARY, b"b" * 1000, fin=False))
    ping = client_frame(PING, b"p" * 125)
    for b in ping[:-1]:
        assert s.receive_data(bytes([b])) == []
        assert s.buffered() <= 1000 + 14 + 125
    assert s.receive_data(ping[-1:]) == [(PING, b"p" * 125)]
    assert s.buffered() == 1000


# --- UTF-8 -------------------------------------------------------------------------------

INVALID_TEXT = [b"\xff", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                b"\xf8\x88\x80\x80\x80", b"abc\x80", b"\xce\xba\xe1\xbd", b"\xe2\x82(",
                "κόσμε".encode() + b"\xed\xa0\x80edited"]


@pytest.mark.parametrize("payload", INVALID_TEXT)
def test_single_frame_invalid_text_is_1007(payload: bytes) -> None:
    s = Session(1000)
    fails(1007, s, client_frame(TEXT, payload))
    # The same bytes fed byte by byte fail too.
    s = Session(1000)
    out: Events = []
    for b in client_frame(TEXT, payload):
        if s.failure is None:
            out += s.receive_data(bytes([b]))
    assert out == [] and s.failure is not None and s.failure.code == 1007
    assert queued_close_code(s) == 1007


def test_fragmented_text_fails_at_the_invalid_fragment() -> None:
    s = Session(1000)
    assert s.receive_data(client_frame(TEXT, "héllo ".encode(), fin=False)) == [(FRAGMENT, b"")]
    ok(s)
    # The second fragment carries an invalid byte: fails now, before the final one is fed.
    assert fails(1007, s, client_frame(CONT, b"ok \xff ok", fin=False)) == []
    assert s.buffered() == 0


def test_fragmented_text_fails_at_the_continuation_that_breaks_a_character() -> None:
    s = Session(1000)
    # A valid lead byte ends fragment one; fragment two does not continue it.
    assert s.receive_data(client_frame(TEXT, b"ab\xe2\x82", fin=False)) == [(FRAGMENT, b"")]
    fails(1007, s, client_frame(CONT, b"x", fin=False))


@pytest.mark.parametrize("op", [TEXT, CONT])
def test_partial_text_frame_fails_as_soon_as_the_bad_chunk_arrives(op: int) -> None:
    s = Session(1 << 20)
    if op == CONT:
        s.receive_data(client_frame(TEXT, b"start ", fin=False))
    payload = b"a" * 1000 + b"\xf4\x90" + b"b" * 50000  # F4 90: above U+10FFFF
    frame = client_frame(op, payload, fin=True)
    bad_at = len(frame) - len(payload) + 1001  # offset of the \x90
    assert s.receive_data(frame[:500]) == []
    assert s.receive_data(frame[500:bad_at]) == []
    ok(s)
    assert s.buffered() > 0
    fails(1007, s, frame[bad_at : bad_at + 10])  # the frame is far from complete
    assert s.buffered() == 0


def test_valid_multibyte_characters_split_across_fragments_and_chunks() -> None:
    text = "a€𝄞é中\U0010ffff\U00010000\u0800\u07ff\ud7ff\ue000z"
    data = text.encode()
    # Every byte in its own fragment, the whole stream fed byte by byte.
    stream = client_frame(TEXT, data[:1], fin=False)
    stream += b"".join(client_frame(CONT, data[i : i + 1], fin=False)
                       for i in range(1, len(data) - 1))
    stream += client_frame(CONT, data[-1:])
    s = Session(1000)
    out = feed_bytewise(s, stream)
    assert out == [(FRAGMENT, b"")] * (len(data) - 1) + [(TEXT, data)]
    # One frame, fed byte by byte (partial-frame validation across chunks).
    assert feed_bytewise(s, client_frame(TEXT, data)) == [(TEXT, data)]
    # Fragments cut inside characters, each fed in two-byte chunks.
    stream = (client_frame(TEXT, data[:2], fin=False) + client_frame(CONT, data[2:9], fin=False)
              + client_frame(CONT, data[9:]))
    out = []
    for piece in chunks(stream, 2):
        out += s.receive_data(piece)
    assert out == [(FRAGMENT, b""), (FRAGMENT, b""), (TEXT, data)]
    ok(s)


def test_invalid_utf8_in_binary_is_fine() -> None:
    s = Session(1000)
    payload = b"\xff\xfe\xed\xa0\x80\xc0"
    assert s.receive_data(client_frame(BINARY, payload)) == [(BINARY, payload)]
    stream = client_frame(BINARY, b"\xe2", fin=False) + client_frame(CONT, b"\xff")
    assert feed_bytewise(s, stream) == [(FRAGMENT, b""), (BINARY, b"\xe2\xff")]
    ok(s)


def test_truncated_character_at_the_end_of_the_message_is_1007() -> None:
    s = Session(1000)
    s.receive_data(client_frame(TEXT, b"ab\xe2", fin=False))
    s.receive_data(client_frame(CONT, b"\x82", fin=False))
    ok(s)
    fails(1007, s, client_frame(CONT, b""))  # the final fragment leaves "\xe2\x82" open


def first_invalid(data: bytes) -> int | None:
    """Index of the byte at which ``data`` stops being a prefix of well-formed UTF-8
    (Unicode Table 3-7), or None if every prefix can still be completed."""
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b < 0x80:
            i += 1
            continue
        tail = (0x80, 0xBF)
        if 0xC2 <= b <= 0xDF:
            ranges = [tail]
        elif b == 0xE0:
            ranges = [(0xA0, 0xBF), tail]
        elif b == 0xED:
            ranges = [(0x80, 0x9F), tail]
        elif 0xE1 <= b <= 0xEF:
            ranges = [tail, tail]
        elif b == 0xF0:
            ranges = [(0x90, 0xBF), tail, tail]
        elif 0xF1 <= b <= 0xF3:
            ranges = [tail, tail, tail]
        elif b == 0xF4:
            ranges = [(0x80, 0x8F), tail, tail]
        else:
            return i
        for k, (lo, hi) in enumerate(ranges, 1):
            if i + k >= n:
                return None
            if not lo <= data[i + k] <= hi:
                return i + k
        i += len(ranges) + 1
    return None


PIECES = [b"a", b"{", "é".encode(), "€".encode(), "𝄞".encode(), "\U0010ffff".encode(),
          b"\xed\x9f\xbf", b"\xee\x80\x80", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80",
          b"\xe0\x80\xaf", b"\xf0\x80\x80\x80", b"\xc0\xaf", b"\xc1", b"\xf5", b"\xff", b"\x80",
          b"\xbf", b"\xe2\x82", b"\xf0\x9f", b"\xf0\x9f\x98", b"\xc3"]
utf8ish = (st.lists(st.sampled_from(PIECES), max_size=30).map(b"".join)
           | st.text(max_size=30).map(str.encode)
           | st.binary(max_size=40))


@settings(max_examples=400, deadline=None)
@given(utf8ish, st.data())
def test_text_accepted_iff_utf8_and_fails_at_the_first_bad_byte(payload: bytes,
                                                                  data: st.DataObject) -> None:
    """Random bytes, cut into fragments and the stream into chunks: the message arrives iff
    ``payload.decode()`` succeeds, else 1007 in the chunk where the received bytes stop
    being a prefix of valid UTF-8 (or, for a character left open, the last chunk)."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=5), label="frags"))
    bounds = [0, *cuts, len(payload)]
    frags = [payload[a:b] for a, b in itertools.pairwise(bounds)]
    stream, offsets = b"", []  # offsets[i]: where payload byte i sits in the stream
    for k, frag in enumerate(frags):
        frame = client_frame(TEXT if k == 0 else CONT, frag, fin=k == len(frags) - 1)
        start = len(stream) + len(frame) - len(frag)
        offsets += range(start, start + len(frag))
        stream += frame
    sizes = data.draw(st.lists(st.integers(1, 12), max_size=60), label="chunks")
    ends, pos = [], 0
    for size in sizes:
        if pos + size >= len(stream):
            break
        pos += size
        ends.append(pos)
    ends.append(len(stream))

    s = Session(1000)
    out: Events = []
    failed_at = None
    start = 0
    for k, end in enumerate(ends):
        out += s.receive_data(stream[start:end])
        start = end
        if s.failure is not None and failed_at is None:
            failed_at = k

    try:
        payload.decode()
    except UnicodeDecodeError:
        valid = False
    else:
        valid = True
    if valid:
        assert failed_at is None, s.failure
        assert out == [(FRAGMENT, b"")] * (len(frags) - 1) + [(TEXT, payload)]
        return
    assert s.failure is not None and s.failure.code == 1007
    assert queued_close_code(s) == 1007

    def chunk_holding(i: int) -> int:
        return next(k for k, end in enumerate(ends) if end > offsets[i])

    bad = first_invalid(payload)
    expected = {len(ends) - 1} if bad is None else {chunk_holding(bad)}
    assert failed_at in expected, (failed_at, expected, bad)


@pytest.mark.parametrize("how", ["fragment", "partial-frame"])
@pytest.mark.parametrize("second", [0xA0, 0xBF])
def test_surrogate_prefix_fails_at_the_piece_that_carries_it(how: str, second: int) -> None:
    s = Session(1000)
    bad = b"ok\xed" + bytes([second])
    if how == "fragment":
        s.receive_data(client_frame(TEXT, bad, fin=False))
    else:
        frame = client_frame(TEXT, bad + b"\x80 and more")
        s.receive_data(frame[: len(frame) - len(b"\x80 and more")])
    assert s.failure is not None and s.failure.code == 1007


# --- close frames ------------------------------------------------------------------------

INVALID_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
VALID_CLOSE_CODES = [1000, 1001, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                     3000, 4000, 4999]


@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
def test_session_close_with_invalid_code_is_1002(code: int) -> None:
    s = Session(1000)
    assert fails(1002, s, client_frame(CLOSE, close_body(code, b"why"))) == []
    assert s.peer_close_code is None


@pytest.mark.parametrize(("body", "code"), [
    (b"\x03", 1002),  # 1-byte body
    (close_body(1000, b"\xc3"), 1007),  # reason not UTF-8
    (close_body(1000, b"\xed\xa0\x80"), 1007),
    (close_body(1000, b"x" * 124), 1002),  # body of 126 bytes
], ids=["one-byte", "reason-truncated", "reason-surrogate", "over-125"])
def test_session_malformed_close_body(body: bytes, code: int) -> None:
    s = Session(1000)
    assert fails(code, s, client_frame(TEXT, b"t") + client_frame(CLOSE, body)) == [(TEXT, b"t")]
    assert s.peer_close_code is None


@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
def test_session_valid_close_is_echoed(code: int) -> None:
    s = Session(1000)
    body = close_body(code, "bye ✓".encode())
    stream = (client_frame(TEXT, b"before") + client_frame(CLOSE, body)
              + client_frame(TEXT, b"after") + client_frame(TEXT, b"x", rsv=7) + b"\xff" * 10)
    assert s.receive_data(stream) == [(TEXT, b"before"), (CLOSE, body)]
    assert s.peer_close_code == code
    assert s.failure is None
    assert s.close_transport
    assert s.state is CLOSED
    assert queued_close_code(s) == code
    assert s.data_to_send() == b""  # one reply only
    assert s.buffered() == 0
    assert s.receive_data(client_frame(TEXT, b"later")) == []
    assert s.receive_data(client_frame(CLOSE, b"")) == []
    assert s.data_to_send() == b""
    assert s.close(1000) == b""  # the handshake is over: no close frame of ours


def test_session_close_with_empty_body_is_answered_1000() -> None:
    s = Session(1000)
    assert s.receive_data(client_frame(CLOSE, b"")) == [(CLOSE, b"")]
    assert s.peer_close_code == 1005
    assert s.failure is None and s.close_transport
    assert queued_close_code(s) == 1000


def test_session_close_fed_byte_by_byte() -> None:
    s = Session(1000)
    body = close_body(4001, b"done")
    assert feed_bytewise(s, client_frame(CLOSE, body) + client_frame(TEXT, b"x")) == [
        (CLOSE, body)]
    assert queued_close_code(s) == 4001


@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
def test_parse_close_valid_codes(code: int) -> None:
    reason = "fine ✓"
    assert frames.parse_close(close_body(code, reason.encode())) == (code, reason)
    assert frames.parse_close(close_body(code)) == (code, "")


def test_parse_close_empty_body_is_no_status() -> None:
    assert frames.parse_close(b"") == (1005, "")


@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
def test_parse_close_invalid_codes_are_1002(code: int) -> None:
    with pytest.raises(ProtocolError) as info:
        frames.parse_close(close_body(code))
    assert info.value.code == 1002


def test_parse_close_one_byte_and_bad_utf8() -> None:
    with pytest.raises(ProtocolError) as info:
        frames.parse_close(b"\x03")
    assert info.value.code == 1002
    with pytest.raises(ProtocolError) as info:
        frames.parse_close(close_body(1000, b"\xc3"))
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


# --- ping / pong -------------------------------------------------------------------------


def test_ping_sets_pending_and_pong_clears_it() -> None:
    s = Session(1000)
    assert not s.ping_pending
    fin, op, body, _ = decode_server_frame(s.ping())
    assert (fin, op) == (True, PING) and len(body) <= 125
    assert s.ping_pending
    # Other frames, and a pong still in transit, leave it pending.
    pong = client_frame(PONG, b"answer")
    assert s.receive_data(client_frame(TEXT, b"t") + client_frame(PING, b"q") + pong[:-1]) == [
        (TEXT, b"t"), (PING, b"q")]
    assert s.ping_pending
    assert s.receive_data(pong[-1:]) == [(PONG, b"answer")]
    assert not s.ping_pending
    s.ping()
    assert s.ping_pending
    assert s.receive_data(client_frame(PONG, b"")) == [(PONG, b"")]
    assert not s.ping_pending
    ok(s)


def test_ping_event_carries_its_payload_and_is_not_answered_by_the_session() -> None:
    s = Session(1000)
    payload = os.urandom(125)
    assert s.receive_data(client_frame(PING, payload)) == [(PING, payload)]
    assert s.receive_data(client_frame(PING, b"")) == [(PING, b"")]
    assert not s.ping_pending  # the peer's ping is not an answer to ours
    ok(s)  # the application decides whether to answer: nothing queued


# --- after close() -------------------------------------------------------------------------


def test_close_returns_one_close_frame_and_moves_to_closing() -> None:
    s = Session(1000)
    fin, op, body, _ = decode_server_frame(s.close(1001, "going away"))
    assert (fin, op) == (True, CLOSE)
    assert frames.parse_close(body) == (1001, "going away")
    assert s.state is CLOSING
    assert not s.close_transport
    assert s.close(1000) == b""  # once
    assert s.data_to_send() == b""


def test_after_close_data_is_ignored_and_the_peer_close_ends_it() -> None:
    s = Session(1000)
    s.close(1001)
    stream = (client_frame(TEXT, b"late text") + client_frame(BINARY, b"late binary")
              + client_frame(BINARY, b"a", fin=False) + client_frame(CONT, b"b"))
    out = s.receive_data(stream)
    assert [e for e in out if e[0] in (TEXT, BINARY, FRAGMENT)] == []
    assert s.failure is None and not s.close_transport
    out = s.receive_data(client_frame(TEXT, b"x") + client_frame(CLOSE, close_body(1000)))
    assert [e for e in out if e[0] in (TEXT, BINARY, FRAGMENT)] == []
    assert s.peer_close_code == 1000
    assert s.close_transport
    assert s.failure is None
    assert s.state is CLOSED
    assert s.data_to_send() == b""  # no second close frame
    assert s.receive_data(client_frame(TEXT, b"y")) == []


def test_after_close_a_partial_text_frame_completes_quietly() -> None:
    s = Session(1000)
    frame = client_frame(TEXT, "ünï".encode())
    s.receive_data(frame[:-2])
    s.close(1000)
    assert s.receive_data(frame[-2:] + client_frame(CLOSE, b"")) == []
    assert s.failure is None and s.close_transport and s.data_to_send() == b""


def test_after_close_the_peer_close_fed_byte_by_byte() -> None:
    s = Session(1000)
    s.close(1000)
    feed_bytewise(s, client_frame(PING, b"p") + client_frame(CLOSE, close_body(4000, b"ok")))
    assert s.peer_close_code == 4000 and s.close_transport and s.failure is None
    assert s.data_to_send() == b""


@pytest.mark.parametrize("split", [False, True], ids=["whole", "partial-continuation"])
def test_after_close_the_message_in_progress_may_continue(split: bool) -> None:
    s = Session(1000)
    s.receive_data(client_frame(TEXT, b"ab", fin=False))
    cont = client_frame(CONT, b"cd")
    if split:  # the continuation frame was already partly received when close() was called
        s.receive_data(cont[:3])
        cont = cont[3:]
    s.close(1001)
    out = s.receive_data(cont + client_frame(CLOSE, close_body(1000)))
    assert [e for e in out if e[0] in (TEXT, BINARY, FRAGMENT)] == []
    assert s.failure is None, s.failure.reason
    assert s.peer_close_code == 1000
    assert s.close_transport


@pytest.mark.parametrize("bad", [client_frame(TEXT, b"x", rsv=4), client_frame(TEXT, b"\xff"),
                                 client_frame(CLOSE, close_body(1005))],
                         ids=["rsv", "bad-utf8", "bad-close-code"])
def test_after_close_a_protocol_error_queues_no_second_close_frame(bad: bytes) -> None:
    s = Session(1000)
    assert s.close(1001) != b""
    assert s.receive_data(bad) == []
    assert s.failure is not None and s.close_transport and s.state is CLOSED
    assert s.data_to_send() == b""  # our close frame is already out
