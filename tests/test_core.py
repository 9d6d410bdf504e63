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
    # A raw text with a duplicated "from" key: whatever the parser sees, b must see a's id.
    await a.send('{"from":"x","type":"t","from":"y"}')
    assert json.loads(await recv_text(b))["from"] == ga["peerId"]
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


async def test_relay_keeps_original_text(server):
    (a, ga), (b, _) = [await open_client(server.url()) for _ in range(2)]
    text = '{"type":"raw",  "zeta": 1, "alpha" : [1.50, 2e3], "s":"\\u00e9"}'
    await a.send(text)
    got = await recv_text(b)
    stamp = f'"from":"{ga["peerId"]}"'
    assert stamp in got
    # Take the stamp (and its separating comma) out again: the client's bytes remain.
    rest = got.replace(stamp + ",", "", 1).replace("," + stamp, "", 1)
    assert rest == text
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
