"""Issue 8, item 10: what ``stamp_from`` relays.

The relayed text is the server's reading of the message written out again, so a receiver reads
what the server read whichever duplicate key its JSON parser keeps, and numbers keep their
values (an integer orjson could only read as a float is refused instead).
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtcsignal.core import messages
from rtcsignal.core.messages import MessageError

PEER = "kq3Zr0f1X2c9bW4s"


def first_wins(text: bytes | str) -> Any:
    """A parser that keeps the first of duplicate keys (the opposite of orjson)."""
    return json.loads(text, object_pairs_hook=lambda pairs: dict(reversed(pairs)))


def last_wins(text: bytes | str) -> Any:
    return json.loads(text)


def relay(text: bytes | str, peer: str = PEER) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return messages.stamp_from(raw, messages.parse(raw), peer)


def refused(text: bytes | str) -> MessageError:
    with pytest.raises(MessageError) as info:
        relay(text)
    return info.value


# --- duplicate keys --------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    '{"type":"error","type":"offer","to":"b"}',
    '{"type":"peer-left","to":"b","type":"offer"}',
    '{"type":"connected","\\u0074ype":"offer","to":"b"}',  # the same key, escaped
    '{"to":"c","type":"offer","to":"b"}',
    '{"type":"offer","to":"c","\\u0074o":"b"}',
    '{"room":"other","type":"offer","room":"r","to":"x","to":"b"}',
])
def test_duplicate_top_level_keys_read_alike_by_every_parser(text: str) -> None:
    server = messages.parse(text.encode())  # what the hub routes on: orjson, last key wins
    out = relay(text)
    assert first_wins(out) == last_wins(out) == {**server, "from": PEER}
    assert first_wins(out)["type"] == "offer" and first_wins(out)["to"] == "b"
    assert out.count(b'"type"') == 1 and out.count(b'"to"') == 1


def test_nested_duplicates_are_resolved_too() -> None:
    text = b'{"type":"ice-candidate","candidate":{"sdpMid":"1","sdpMid":"0","a":[{"k":1,"k":2}]}}'
    out = relay(text)
    assert first_wins(out) == last_wins(out) == {
        "from": PEER, "type": "ice-candidate", "candidate": {"sdpMid": "0", "a": [{"k": 2}]}}


def test_from_is_the_first_field_and_only_the_servers() -> None:
    assert relay('{"type":"x","n":1}') == b'{"from":"kq3Zr0f1X2c9bW4s","type":"x","n":1}'
    for text in ('{"type":"x","from":"mallory"}', '{"from":"a","type":"x","from":"b"}',
                 '{"\\u0066rom":"a","type":"x"}', '{"type":"x","from":{"nested":[1]}}'):
        out = relay(text)
        assert out.startswith(b'{"from":"kq3Zr0f1X2c9bW4s",') and out.count(b'"from"') == 1
        assert first_wins(out)["from"] == last_wins(out)["from"] == PEER


def test_stamp_from_leaves_the_callers_object_alone() -> None:
    obj = messages.parse(b'{"type":"x","from":"m"}')
    messages.stamp_from(b'{"type":"x","from":"m"}', obj, PEER)
    assert obj == {"type": "x", "from": "m"}


def test_peer_id_is_written_as_json() -> None:
    out = messages.stamp_from(b'{"type":"x"}', {"type": "x"}, 'odd"id\\')
    assert json.loads(out) == {"from": 'odd"id\\', "type": "x"}


def test_whitespace_and_escapes_are_normalised_values_kept() -> None:
    text = ' {  "type" : "offer",\n "sdp":"v=0\\r\\n", "n": 1.50, "e": 2E3, "s":"\\u00e9\\/" }'
    out = relay(text)
    assert out == '{"from":"kq3Zr0f1X2c9bW4s","type":"offer","sdp":"v=0\\r\\n","n":1.5,"e":2000.0,"s":"é/"}'.encode()
    assert json.loads(out) == {**json.loads(text), "from": PEER}


# --- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("number", [
    "123456789012345678901234567890", "-123456789012345678901234567890",
    "18446744073709551616", "-9223372036854775809", "99999999999999999999",
    "-10000000000000000000", "1" + "0" * 300,
])
@pytest.mark.parametrize("template", [
    '{{"type":"x","n":{}}}',
    '{{"type":"x","from":"me","n":{}}}',  # the old code re-serialised this one: a float
    '{{"type":"x","list":[1,{{"deep":[{}]}}],"id":"m1"}}',
    '{{"type":"x","s":"1e+20","n":{}}}',
])
def test_integer_out_of_range_is_refused_never_made_a_float(number: str, template: str) -> None:
    text = template.format(number)
    err = refused(text)
    assert err.code == "invalid-message"
    assert "integer out of range" in err.message
    assert err.ref == json.loads(text).get("id")


@pytest.mark.parametrize("number", [
    str(2**64 - 1), str(-(2**63)), str(2**63), str(-(2**63) + 1), "9999999999999999999",
    "-999999999999999999", "0", "1", "-1", str(2**53 + 1),
])
def test_integers_in_range_arrive_exactly(number: str) -> None:
    text = '{"type":"x","from":"me","n":' + number + ',"a":[' + number + "]}"
    got = json.loads(relay(text))
    assert type(got["n"]) is int and got["n"] == int(number) and got["a"] == [int(number)]
    assert f'"n":{number},'.encode() in relay(text)


@given(st.integers(min_value=-(2**80), max_value=2**80))
def test_any_integer_arrives_exactly_or_is_refused(n: int) -> None:
    text = json.dumps({"type": "x", "from": "me", "n": n, "l": [n, {"m": n}]})
    if -(2**63) <= n < 2**64:
        got = json.loads(relay(text))
        assert got == {"from": PEER, "type": "x", "n": n, "l": [n, {"m": n}]}
        assert type(got["n"]) is int
    else:
        assert refused(text).code == "invalid-message"


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_keep_their_value(x: float) -> None:
    for written in (json.dumps(x), repr(x).upper(), f"{x:.25e}"):
        text = '{"type":"x","v":' + written + "}"
        want = json.loads(text)["v"]
        got = json.loads(relay(text))["v"]
        assert got == want and math.copysign(1, got) == math.copysign(1, want)


def test_digits_in_strings_are_not_numbers() -> None:
    """SDP session ids (19-20 digits), 30-digit strings, "e+" in strings: relayed as is."""
    sdp = "v=0\r\no=- 18345081934571234567 2 IN IP4 127.0.0.1\r\na=ice-pwd:abe+Qe+1\r\n"
    msg = {"type": "offer", "sdp": {"type": "offer", "sdp": sdp},
           "ts": "0000000000000000000", "big": "123456789012345678901234567890", "f": "1e+400"}
    assert json.loads(relay(json.dumps(msg))) == {**msg, "from": PEER}


def test_large_floats_written_by_the_client_are_relayed() -> None:
    text = '{"type":"x","a":1e20,"b":-1.5e300,"c":18446744073709551616.0,"d":1E+17}'
    assert json.loads(relay(text)) == {**json.loads(text), "from": PEER}


def test_minus_zero_integer_arrives_as_zero() -> None:
    """Documented: orjson reads the integer -0 as 0 (JavaScript's JSON.stringify writes -0 as
    0 too); the float -0.0 keeps its sign."""
    got = json.loads(relay('{"type":"x","i":-0,"f":-0.0}'))
    assert got["i"] == 0 and type(got["i"]) is int
    assert got["f"] == 0.0 and math.copysign(1, got["f"]) == -1


@pytest.mark.parametrize("x", [
    1e16, 2.0**63, 2.0**64, 9.223372036854776e18, 1.8446744073709552e19, 1e20, 1.2345e29,
    1.7976931348623157e308,
])
def test_orjson_writes_floats_from_1e16_up_with_e_plus(x: float) -> None:
    """stamp_from's filter relies on this: an integer orjson could not read as one is a float
    of magnitude >= 2**63, written with "e+", so "e+" absent means no such integer."""
    for v in (x, -x):
        assert b"e+" in orjson.dumps(v)
    assert type(orjson.loads(str(2**64))) is float and type(orjson.loads(str(-(2**63) - 1))) is float


@given(st.floats(min_value=2.0**63, max_value=1.7976931348623157e308))
def test_orjson_e_plus_for_every_float_an_integer_can_become(x: float) -> None:
    assert b"e+" in orjson.dumps(x) and b"e+" in orjson.dumps(-x)


def test_deep_nesting_is_refused_not_raised() -> None:
    deep = "[" * 300 + "]" * 300
    assert refused('{"type":"x","d":' + deep + "}").message == "message is nested too deeply"
    deeper = "[" * 1010 + "]" * 1010  # orjson reads it; only the integer check would recurse
    err = refused('{"type":"x","n":1e20,"from":' + deeper + "}")
    assert err.code == "invalid-message"


# --- property: any message, duplicates and numbers anywhere ---------------------------------

KEYS = st.sampled_from(["type", "to", "from", "room", "id", "a", "\\u0074ype"])
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))


def _object(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pair = st.tuples(KEYS, children).map(lambda kv: '"' + kv[0] + '":' + kv[1])
    return st.lists(pair, max_size=5).map(lambda pairs: "{" + ",".join(pairs) + "}")


VALUES = st.recursive(
    SCALARS.map(json.dumps),
    lambda inner: _object(inner) | st.lists(inner, max_size=3).map(lambda v: "[" + ",".join(v) + "]"),
    max_leaves=10,
)


def _has_out_of_range_int(value: Any) -> bool:
    if type(value) is int:
        return not -(2**63) <= value < 2**64
    if isinstance(value, dict):
        return any(_has_out_of_range_int(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_out_of_range_int(v) for v in value)
    return False


@given(st.lists(st.tuples(KEYS, VALUES), max_size=6), st.sampled_from(["offer", "x"]))
def test_any_message_reads_alike_everywhere_or_is_refused(pairs: list[tuple[str, str]],
                                                          kind: str) -> None:
    text = "{" + ",".join(['"' + k + '":' + v for k, v in pairs] + ['"type":"' + kind + '"']) + "}"
    everything = json.loads(text, object_pairs_hook=list)  # every duplicate kept
    try:
        out = relay(text)
    except MessageError as exc:
        assert exc.code == "invalid-message"
        assert _has_out_of_range_int(everything) or "nested" in exc.message
        return
    # Relayed: nothing out of range in what is relayed (a duplicate the server dropped, or the
    # client's own `from`, may hold one: it is not relayed).
    exact = {k: v for k, v in json.loads(text).items() if k != "from"}
    assert not _has_out_of_range_int(exact)
    server = {k: v for k, v in orjson.loads(text).items() if k != "from"}
    assert first_wins(out) == last_wins(out) == {"from": PEER, **server}
    assert list(last_wins(out)) == ["from", *server]
    # Integers are the ones the client wrote (Python's json reads them exactly).
    assert json.loads(out) == {"from": PEER, **exact}
