"""Issue 2, points 3-6 over real sockets: greeting, relay, bad input, application ping."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from tests.helpers import close_all, open_client, recv_json, recv_text, send_json

URL_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{11,}$")  # >= 11 base64url chars = >= 64 bits

RESERVED = ["connected", "error", "joined", "left", "peer-joined", "peer-left", "pong"]


# --- 3. greeting --------------------------------------------------------------------------


async def test_greeting_fields_count_and_unique_ids(server):
    clients = []
    ids = []
    for n in range(1, 6):
        ws, greeting = await open_client(server.url())
        clients.append(ws)
        assert greeting["type"] == "connected"
        assert greeting["message"] == "Connected to signaling server"
        assert greeting["clientsCount"] == n
        assert type(greeting["clientsCount"]) is int
        assert isinstance(greeting["peerId"], str)
        assert URL_SAFE_ID.fullmatch(greeting["peerId"]), greeting["peerId"]
        ids.append(greeting["peerId"])
    assert len(set(ids)) == len(ids)

    # One leaves: the next greeting counts the four still connected plus itself.
    gone = ids[0]
    await asyncio.wait_for(clients.pop(0).close(), 5)
    server.wait_for(lambda e: e.get("event") == "disconnect" and e.get("peer") == gone)
    ws, greeting = await open_client(server.url())
    clients.append(ws)
    assert greeting["clientsCount"] == 5
    assert greeting["peerId"] not in ids
    await close_all(clients)


async def test_peer_ids_unique_over_many_connections(server):
    seen = set()
    for _ in range(4):
        batch = await asyncio.gather(*(open_client(server.url()) for _ in range(25)))
        for _ws, greeting in batch:
            assert URL_SAFE_ID.fullmatch(greeting["peerId"])
            seen.add(greeting["peerId"])
        await close_all([ws for ws, _ in batch])
    assert len(seen) == 100


# --- 4. relay -------------------------------------------------------------------------------


async def test_relay_to_all_others_with_fields_kept_and_from_stamped(server):
    (a, ga), (b, _gb), (c, gc) = [await open_client(server.url()) for _ in range(3)]
    sent = {
        "type": "offer",
        "sdp": "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n",
        "nested": {"list": [1, 2.5, None, True, {"deep": "x"}], "empty": {}},
        "unicode": "héllo ☃ \U0001f600 \"quoted\" \\ back",
        "to_be_kept": None,
    }
    await send_json(a, sent)
    for receiver in (b, c):
        got = await recv_json(receiver)
        assert got == {**sent, "from": ga["peerId"]}

    # The sender got nothing: its next message is the one c sends now.
    await send_json(c, {"type": "answer", "sdp": "v=0"})
    assert await recv_json(a) == {"type": "answer", "sdp": "v=0", "from": gc["peerId"]}
    assert (await recv_json(b))["from"] == gc["peerId"]
    await close_all([a, b, c])


async def test_client_written_from_is_overwritten(server):
    (a, ga), (b, _) = [await open_client(server.url()) for _ in range(2)]
    await send_json(a, {"type": "ice-candidate", "from": "someone-else", "candidate": "c"})
    got = await recv_json(b)
    assert got == {"type": "ice-candidate", "from": ga["peerId"], "candidate": "c"}
    # A raw text with a duplicated "from" key: whichever duplicate a parser keeps, b must see
    # a's id, once.
    await a.send('{"from":"x","type":"t","from":"y"}')
    text = await recv_text(b)
    assert text.count('"from"') == 1
    assert first_wins(text)["from"] == json.loads(text)["from"] == ga["peerId"]
    await close_all([a, b])


@pytest.mark.parametrize("kind", ["offer", "answer", "ice-candidate", "my-custom.type_1",
                                  "x" * 64, "join-request", "PONG", "pingpong"])
async def test_custom_types_are_relayed(server, kind):
    (a, ga), (b, _) = [await open_client(server.url()) for _ in range(2)]
    await send_json(a, {"type": kind, "payload": [kind]})
    assert await recv_json(b) == {"type": kind, "payload": [kind], "from": ga["peerId"]}
    await close_all([a, b])


async def test_relay_preserves_order_of_200_messages(server):
    (a, ga), (b, _), (c, _) = [await open_client(server.url()) for _ in range(3)]
    for i in range(200):
        await a.send(json.dumps({"type": "seq", "n": i}))
    for receiver in (b, c):
        got = [await recv_json(receiver) for _ in range(200)]
        assert [m["n"] for m in got] == list(range(200))
        assert all(m["from"] == ga["peerId"] and m["type"] == "seq" for m in got)
    await close_all([a, b, c])


async def test_relay_is_the_servers_reading_written_out_again(server):
    """What b receives is a's message as the server read it, re-serialised, with ``from``
    first: every field and value kept, the client's whitespace and escapes not."""
    (a, ga), (b, _) = [await open_client(server.url()) for _ in range(2)]
    text = '{"type":"raw",  "zeta": 1, "alpha" : [1.50, 2e3], "s":"\\u00e9", "n": null}'
    await a.send(text)
    got = await recv_text(b)
    assert got == ('{"from":"' + ga["peerId"]
                   + '","type":"raw","zeta":1,"alpha":[1.5,2000.0],"s":"é","n":null}')
    assert json.loads(got) == {**json.loads(text), "from": ga["peerId"]}
    await close_all([a, b])


def first_wins(text: str) -> dict:
    """A JSON parser that keeps the first of duplicate keys (the server's keeps the last)."""
    return json.loads(text, object_pairs_hook=lambda pairs: dict(reversed(pairs)))


async def test_duplicate_keys_cannot_show_a_receiver_another_type_or_to(server):
    """Issue 8, item 10: with duplicate ``type``/``to`` keys, a receiver must read the same
    message the server routed, whichever duplicate its parser keeps."""
    (a, ga), (b, gb), (c, gc) = [await open_client(server.url()) for _ in range(3)]
    for template in ('{"type":"%s","type":"offer","to":"%s","to":"%s","sdp":"v=0"}',
                     '{"type":"%s","\\u0074ype":"offer","to":"%s","\\u0074o":"%s","sdp":"v=0"}'):
        for disguise in ("error", "peer-left", "connected"):
            # The server reads type "offer", to b (orjson keeps the last duplicate).
            await a.send(template % (disguise, gc["peerId"], gb["peerId"]))
            text = await recv_text(b)
            want = {"from": ga["peerId"], "type": "offer", "to": gb["peerId"], "sdp": "v=0"}
            assert first_wins(text) == json.loads(text) == want, text
    # Routed to b only: the next thing a and c see is b's marker.
    await send_json(b, {"type": "marker"})
    for ws in (a, c):
        assert await recv_json(ws) == {"type": "marker", "from": gb["peerId"]}
    # The other way round the server reads a reserved type and refuses; nothing is relayed.
    await a.send('{"type":"offer","type":"error","code":"x","message":"fake"}')
    assert (await recv_json(a))["code"] == "reserved-type"
    await send_json(c, {"type": "marker2"})
    assert await recv_json(b) == {"type": "marker2", "from": gc["peerId"]}
    await close_all([a, b, c])


BIG = "123456789012345678901234567890"


@pytest.mark.parametrize("text", [
    '{"type":"x","n":' + BIG + ',"id":"m1"}',
    '{"type":"x","from":"me","n":' + BIG + ',"id":"m1"}',
    '{"type":"x","list":[1,{"n":-' + BIG + '}],"id":"m1"}',
    '{"type":"x","from":"me","n":18446744073709551616,"id":"m1"}',
])
async def test_integer_beyond_64_bits_is_refused_never_turned_into_a_float(server, text):
    """Issue 8, item 10: a 30-digit integer must arrive unchanged or the sender gets
    invalid-message; never a float. rtcsignal refuses it (docs/protocol.md, Relaying)."""
    (a, _), (b, gb) = [await open_client(server.url()) for _ in range(2)]
    await a.send(text)
    err = await recv_json(a)
    assert (err["type"], err["code"], err["ref"]) == ("error", "invalid-message", "m1"), err
    assert "integer out of range" in err["message"]
    await send_json(b, {"type": "marker"})
    assert await recv_json(a) == {"type": "marker", "from": gb["peerId"]}
    # Nothing reached b: the next thing it gets is a's next message.
    await send_json(a, {"type": "after"})
    assert (await recv_json(b))["type"] == "after"
    await close_all([a, b])


async def test_numbers_and_digit_strings_arrive_unchanged(server):
    (a, ga), (b, _) = [await open_client(server.url()) for _ in range(2)]
    sdp = ("v=0\\r\\no=- 18345081934571234567 2 IN IP4 127.0.0.1\\r\\ns=-\\r\\n"
           "a=ice-pwd:abe+Qe+1\\r\\n")
    text = ('{"type":"offer","from":"me","sdp":"' + sdp + '","ts":"' + BIG + '",'
            '"max":18446744073709551615,"min":-9223372036854775808,"i":9007199254740993,'
            '"f":0.1,"e":1e20,"g":-2.5e-300}')
    await a.send(text)
    got = await recv_text(b)
    assert json.loads(got) == {**json.loads(text), "from": ga["peerId"]}
    for literal in ('"max":18446744073709551615', '"min":-9223372036854775808',
                    '"i":9007199254740993', '"ts":"' + BIG + '"'):
        assert literal in got, literal
    await close_all([a, b])


async def test_large_message_within_limit_is_relayed(server):
    (a, ga), (b, _) = [await open_client(server.url()) for _ in range(2)]
    blob = "s" * 60_000
    await send_json(a, {"type": "offer", "sdp": blob})
    assert await recv_json(b) == {"type": "offer", "sdp": blob, "from": ga["peerId"]}
    await close_all([a, b])


# --- 5. bad input -------------------------------------------------------------------------


BAD_TEXT = [
    ("not json", "invalid-json"),
    ("{", "invalid-json"),
    ("", "invalid-json"),
    ('{"type":"x",}', "invalid-json"),
    ("[]", "invalid-message"),
    ('[{"type":"offer"}]', "invalid-message"),
    ("42", "invalid-message"),
    ('"offer"', "invalid-message"),
    ("null", "invalid-message"),
    ("true", "invalid-message"),
    ("{}", "invalid-message"),
    ('{"data":"no type"}', "invalid-message"),
    ('{"type":5}', "invalid-message"),
    ('{"type":null}', "invalid-message"),
    ('{"type":["offer"]}', "invalid-message"),
    ('{"type":{"a":1}}', "invalid-message"),
    ('{"type":""}', "invalid-message"),
    (json.dumps({"type": "x" * 65}), "invalid-message"),
    *[(json.dumps({"type": t, "data": 1}), "reserved-type") for t in RESERVED],
]


async def test_every_bad_text_gets_its_error_and_nothing_is_relayed(server):
    (a, _), (b, gb), (c, _) = [await open_client(server.url()) for _ in range(3)]
    for text, code in BAD_TEXT:
        await a.send(text)
        err = await recv_json(a)
        assert err["type"] == "error", (text, err)
        assert err["code"] == code, (text, err)
        assert isinstance(err["message"], str) and err["message"].strip(), err
    # Still open, and nothing was relayed: the next thing c sees is b's valid message.
    await send_json(b, {"type": "after", "n": 1})
    assert await recv_json(c) == {"type": "after", "n": 1, "from": gb["peerId"]}
    assert await recv_json(a) == {"type": "after", "n": 1, "from": gb["peerId"]}
    await send_json(a, {"type": "still-open"})
    assert (await recv_json(c))["type"] == "still-open"
    await close_all([a, b, c])


@pytest.mark.parametrize("reserved", RESERVED)
async def test_reserved_type_error_shape(server, reserved):
    (a, _), (b, gb) = [await open_client(server.url()) for _ in range(2)]
    await send_json(a, {"type": reserved})
    err = await recv_json(a)
    assert set(err) >= {"type", "code", "message"}
    assert (err["type"], err["code"]) == ("error", "reserved-type")
    await send_json(b, {"type": "marker"})
    assert await recv_json(a) == {"type": "marker", "from": gb["peerId"]}
    await close_all([a, b])


async def test_binary_frame_gets_error_and_is_not_relayed(server):
    (a, _), (b, gb) = [await open_client(server.url()) for _ in range(2)]
    await a.send(b'{"type":"offer"}')
    await a.send(b"\x00\x01\x02")
    for _ in range(2):
        err = await recv_json(a)
        assert (err["type"], err["code"]) == ("error", "binary-not-supported")
        assert err["message"]
    await send_json(b, {"type": "marker"})
    assert await recv_json(a) == {"type": "marker", "from": gb["peerId"]}
    await send_json(a, {"type": "back"})
    assert (await recv_json(b))["type"] == "back"
    await close_all([a, b])


async def test_server_survives_bad_input_from_many_clients(server):
    clients = [await open_client(server.url()) for _ in range(5)]
    for ws, _ in clients:
        await ws.send("}{")
        await ws.send(b"bin")
    for ws, _ in clients:
        assert (await recv_json(ws))["code"] == "invalid-json"
        assert (await recv_json(ws))["code"] == "binary-not-supported"
    assert server.alive()
    ws, greeting = await open_client(server.url())
    assert greeting["clientsCount"] == 6
    await close_all([ws] + [w for w, _ in clients])


# --- 6. application-level ping ------------------------------------------------------------


async def test_application_ping_gets_pong_and_is_not_relayed(server):
    (a, _), (b, gb), (c, _) = [await open_client(server.url()) for _ in range(3)]
    await send_json(a, {"type": "ping"})
    pong = await recv_json(a)
    assert pong == {"type": "pong"}
    await send_json(b, {"type": "marker"})
    # Nobody got a relayed ping: the next message a and c see is b's marker.
    for ws in (a, c):
        assert await recv_json(ws) == {"type": "marker", "from": gb["peerId"]}
    await close_all([a, b, c])
