"""Issue 12, logs: JWTs, resume tokens and TURN secrets never reach the log, even at debug
level; message bodies never do either (debug lines carry sizes and types only)."""

from __future__ import annotations

import os

import jwt

from tests.helpers import close_all, open_client, recv_json, send_json


async def test_tokens_secrets_and_bodies_never_logged(run_server):
    secret = os.urandom(32).hex()
    turn_secret = os.urandom(16).hex()
    srv = run_server("--log-level", "debug", "--jwt-secret", secret, "--turn-secret",
                     turn_secret, "--turn-urls", "turn:turn.example.org:3478")
    token = jwt.encode({"sub": "alice"}, secret, "HS256")
    a, ga = await open_client(srv.url(f"token={token}"))
    b, gb = await open_client(srv.url(f"token={token}"))
    body = "bodymarker" + os.urandom(8).hex()
    await send_json(b, {"type": "offer", "to": ga["peerId"], "sdp": body, "id": "x"})
    assert (await recv_json(a))["sdp"] == body
    a.transport.abort()  # dropped: it resumes with its token
    first = ga["resumeToken"]
    a2, g2 = await open_client(srv.url(f"token={token}&resume={first}"))
    assert g2["resumed"] is True
    bad, _ = await open_client(srv.url(f"token={token}&resume=not-a-token-{body}"))
    await send_json(a2, {"type": "ping", "id": "sync"})
    assert (await recv_json(a2))["type"] == "pong"
    await close_all([a2, b, bad])
    srv.stop()
    log = "".join(srv.raw)
    assert '"event":"resume"' in log and '"event":"relayed"' in log  # the lines exist
    for secret_text in (secret, turn_secret, token, first, g2["resumeToken"],
                        gb["resumeToken"], body):
        assert secret_text not in log
