"""JWT tokens (``rtcsignal token``, RS256/ES256/EdDSA public keys), TLS and TURN credentials,
end to end against a real ``rtcsignal serve`` subprocess (issue 5).

Keys and certificates are generated here with ``cryptography``; TURN credentials are checked
against an HMAC computed here with ``hmac``/``hashlib``, independently of the server code.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import ClientConnection, connect

from tests.rawws import RawWS

TIMEOUT = 5.0


async def open_ws(url: str, **kw: Any) -> tuple[ClientConnection, dict[str, Any], str]:
    """A websockets client; returns it, its greeting and the greeting's raw text."""
    kw.setdefault("ping_interval", None)
    kw.setdefault("compression", None)
    kw.setdefault("open_timeout", TIMEOUT)
    ws = await connect(url, **kw)
    raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert isinstance(raw, str)
    greeting = json.loads(raw)
    assert greeting.get("type") == "connected", greeting
    return ws, greeting, raw


async def recv(ws: ClientConnection, kind: str | None = None) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert isinstance(raw, str)
    msg = json.loads(raw)
    if kind is not None:
        assert msg.get("type") == kind, msg
    return msg


async def send(ws: ClientConnection, obj: dict[str, Any]) -> None:
    await asyncio.wait_for(ws.send(json.dumps(obj)), TIMEOUT)


async def upgrade_status(server: Any, query: str = "",
                         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    ws = await RawWS.connect(server.host, server.port)
    try:
        answer = await ws.handshake(query, headers)
        return answer.status, answer.body
    finally:
        ws.close()


async def http_get(server: Any, path: str, headers: dict[str, str] | None = None,
                   ssl_ctx: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    kw: dict[str, Any] = {"ssl": ssl_ctx, "server_hostname": server.host} if ssl_ctx else {}
    ws = await RawWS.connect(server.host, server.port, **kw)
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        ws.send_raw(f"GET {path} HTTP/1.1\r\nHost: {server.host}\r\n{extra}"
                    "Connection: close\r\n\r\n".encode())
        answer = await ws.read_answer()
        return answer.status, answer.headers, answer.body
    finally:
        ws.close()


def cli_token(secret: str, sub: str, rooms: str, ttl: int) -> str:
    """``rtcsignal token`` run as a user would run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTCSIGNAL_")}
    out = subprocess.run(
        [sys.executable, "-m", "rtcsignal", "token", "--jwt-secret", secret, "--sub", sub,
         "--rooms", rooms, "--ttl", str(ttl)],
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# --- rtcsignal token ----------------------------------------------------------------------


async def test_cli_token_is_accepted_end_to_end(run_server):
    secret = base64.b64encode(os.urandom(48)).decode()
    t0 = time.time()
    alice = cli_token(secret, "alice", "demo*", 60)
    bob = cli_token(secret, "bob", "demo*", 60)
    t1 = time.time()
    claims = jwt.decode(alice, options={"verify_signature": False})
    assert claims["sub"] == "alice" and claims["rooms"] == ["demo*"], claims
    assert int(t0) + 60 <= claims["exp"] <= int(t1) + 61, claims

    server = run_server("--auth", "jwt", "--jwt-secret", secret)
    wb, gb, _ = await open_ws(server.url(f"token={bob}"))
    await send(wb, {"type": "join", "room": "demo1"})
    await recv(wb, "joined")
    wa, ga, _ = await open_ws(server.url(f"token={alice}"))
    await send(wa, {"type": "join", "room": "demo1", "id": "j1", "meta": {"user": "mallory"}})
    joined = await recv(wa, "joined")
    assert joined["ref"] == "j1" and joined["room"] == "demo1"
    assert [(p["peerId"], p["meta"].get("user")) for p in joined["peers"]] == [
        (gb["peerId"], "bob")]
    seen = await recv(wb, "peer-joined")
    assert seen["peerId"] == ga["peerId"]
    assert seen["meta"]["user"] == "alice", seen  # from sub, not the client-sent meta
    await send(wa, {"type": "offer", "sdp": "v=0", "to": gb["peerId"]})
    relayed = await recv(wb, "offer")
    assert relayed["from"] == ga["peerId"]
    # The rooms claim the CLI wrote is enforced.
    await send(wa, {"type": "join", "room": "other", "id": "j2"})
    err = await recv(wa, "error")
    assert err["code"] == "forbidden" and err["ref"] == "j2", err
    # A token minted by the same command with another secret is refused.
    foreign = cli_token(base64.b64encode(os.urandom(48)).decode(), "alice", "demo*", 60)
    status, body = await upgrade_status(server, f"token={foreign}")
    assert status == 401, (status, body)
    await wa.close()
    await wb.close()


# --- public-key tokens --------------------------------------------------------------------


def public_pem(private: Any) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_public_key_tokens_rs256_es256_eddsa(run_server, tmp_path: Path):
    rsa_old = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    files = []
    for name, key in (("rsa-old", rsa_old), ("rsa-new", rsa_new), ("ec", ec_key),
                      ("ed", ed_key)):
        path = tmp_path / f"{name}.pem"
        path.write_bytes(public_pem(key))
        files.append(str(path))
    server = run_server("--auth", "jwt", "--jwt-public-key-file", ",".join(files))

    def claims(sub: str) -> dict[str, Any]:
        return {"sub": sub, "exp": int(time.time()) + 300}

    good = {
        "RS256 (old key)": jwt.encode(claims("rs-old"), rsa_old, algorithm="RS256"),
        "RS256 (new key)": jwt.encode(claims("rs-new"), rsa_new, algorithm="RS256"),
        "ES256": jwt.encode(claims("es"), ec_key, algorithm="ES256"),
        "EdDSA": jwt.encode(claims("ed"), ed_key, algorithm="EdDSA"),
    }
    room = "keys-" + os.urandom(3).hex()
    host, _, _ = await open_ws(server.url(f"room={room}&token={good['ES256']}"))
    await recv(host, "joined")
    for name, tok in good.items():
        ws, greeting, _ = await open_ws(server.url(f"room={room}&token={tok}"))
        await recv(ws, "joined")
        seen = await recv(host, "peer-joined")
        expected_sub = jwt.decode(tok, options={"verify_signature": False})["sub"]
        assert seen["peerId"] == greeting["peerId"], name
        assert seen["meta"]["user"] == expected_sub, (name, seen)
        await ws.close()
        assert (await recv(host, "peer-left"))["peerId"] == greeting["peerId"]

    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims("confused")).encode())
    confused_sig = hmac.new(public_pem(rsa_old), f"{header}.{payload}".encode(),
                            hashlib.sha256).digest()
    rs_parts = jwt.encode(claims("x"), rsa_old, algorithm="RS256").split(".")
    bad = {
        "RS256 with an unknown key": jwt.encode(claims("x"), stranger, algorithm="RS256"),
        "ES256 header, RSA signature": ".".join(
            [b64url(b'{"alg":"ES256","typ":"JWT"}'), *rs_parts[1:]]),
        "HS256 keyed with the public PEM": f"{header}.{payload}.{b64url(confused_sig)}",
        "expired RS256": jwt.encode({"sub": "x", "exp": int(time.time()) - 5}, rsa_new,
                                    algorithm="RS256"),
    }
    for name, tok in bad.items():
        status, body = await upgrade_status(server, f"token={tok}")
        assert status == 401, (name, status, body)
    await host.close()


# --- TLS ----------------------------------------------------------------------------------


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rtcsignal test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


async def test_tls_serves_wss_and_https(run_server, tmp_path: Path):
    certfile, keyfile = self_signed(tmp_path)
    server = run_server("--certfile", str(certfile), "--keyfile", str(keyfile))
    url = server.url("room=tls")
    assert url.startswith("wss://"), url
    trusting = ssl.create_default_context(cafile=str(certfile))

    a, ga, _ = await open_ws(url, ssl=trusting)
    await recv(a, "joined")
    b, gb, _ = await open_ws(url, ssl=trusting)
    await recv(b, "joined")
    await recv(a, "peer-joined")
    await send(a, {"type": "offer", "sdp": "v=0", "to": gb["peerId"]})
    got = await recv(b, "offer")
    assert got["from"] == ga["peerId"]

    status, _, body = await http_get(server, "/healthz", ssl_ctx=trusting)
    assert status == 200 and json.loads(body) == {"status": "ok"}, (status, body)

    # It really is our certificate: a client trusting only the system CAs refuses it ...
    with pytest.raises(ssl.SSLCertVerificationError):
        await http_get(server, "/healthz", ssl_ctx=ssl.create_default_context())
    # ... and the port does not speak plain HTTP.
    plain = await RawWS.connect(server.host, server.port)
    plain.send_raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not (await plain.expect_eof()).startswith(b"HTTP/")
    plain.close()
    await send(b, {"type": "answer", "sdp": "v=0", "to": ga["peerId"]})
    assert (await recv(a, "answer"))["from"] == gb["peerId"]
    assert server.alive()
    await a.close()
    await b.close()


# --- TURN credentials ---------------------------------------------------------------------


def expected_credential(secret: str, username: str) -> str:
    return base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1)
                            .digest()).decode()


def check_ice_servers(servers: list[dict[str, Any]], secret: str, ttl: int, t0: float,
                      t1: float, turn_urls: list[str], stun_urls: list[str]) -> str:
    """Validate an iceServers list; returns the TURN username."""
    stun = [s for s in servers if "username" not in s]
    turn = [s for s in servers if "username" in s]
    assert stun == [{"urls": stun_urls}], servers
    assert len(turn) == 1 and turn[0]["urls"] == turn_urls, servers
    username, credential = turn[0]["username"], turn[0]["credential"]
    expiry, sep, who = username.partition(":")
    assert sep and who, username
    assert int(t0) + ttl <= int(expiry) <= int(t1) + ttl + 1, (username, t0, t1, ttl)
    assert credential == expected_credential(secret, username), turn[0]
    return username


TURN_URLS = ["turn:turn.example.com:3478", "turns:turn.example.com:5349?transport=tcp"]
STUN_URLS = ["stun:stun.example.com"]


async def test_turn_credentials_in_greeting(run_server):
    secret = "turn-" + os.urandom(16).hex()
    server = run_server("--turn-secret", secret, "--turn-urls", ",".join(TURN_URLS),
                        "--stun-urls", ",".join(STUN_URLS))
    t0 = time.time()
    a, ga, raw_a = await open_ws(server.url())
    b, gb, raw_b = await open_ws(server.url())
    t1 = time.time()
    users = []
    for greeting, raw in ((ga, raw_a), (gb, raw_b)):
        username = check_ice_servers(greeting["iceServers"], secret, 3600, t0, t1, TURN_URLS,
                                     STUN_URLS)  # 3600: the documented default --turn-ttl
        assert username.split(":", 1)[1] == greeting["peerId"], username
        assert secret not in raw
        users.append(username)
    assert users[0] != users[1]

    status, _, body = await http_get(server, "/ice-servers")
    assert status == 200, (status, body)
    t2 = time.time()
    check_ice_servers(json.loads(body)["iceServers"], secret, 3600, t0, t2, TURN_URLS,
                      STUN_URLS)
    assert secret.encode() not in body
    for path in ("/metrics", "/healthz", "/readyz"):
        _, _, other = await http_get(server, path)
        assert secret.encode() not in other, path
    await send(a, {"type": "ping", "id": "end"})
    await recv(a, "pong")
    await a.close()
    await b.close()
    assert server.stop() == 0
    assert server.raw, "no log output captured"
    assert not any(secret in line for line in server.raw), "TURN secret in the server log"


async def test_turn_credentials_with_jwt_and_ice_servers_endpoint(run_server):
    secret = "turn-" + os.urandom(16).hex()
    jwt_secret = base64.b64encode(os.urandom(48)).decode()
    server = run_server("--auth", "jwt", "--jwt-secret", jwt_secret, "--turn-secret", secret,
                        "--turn-urls", TURN_URLS[0], "--stun-urls", STUN_URLS[0],
                        "--turn-ttl", "600")
    tok = jwt.encode({"sub": "alice", "exp": int(time.time()) + 300}, jwt_secret,
                     algorithm="HS256")
    t0 = time.time()
    ws, greeting, raw = await open_ws(server.url(f"token={tok}"))
    t1 = time.time()
    username = check_ice_servers(greeting["iceServers"], secret, 600, t0, t1, TURN_URLS[:1],
                                 STUN_URLS[:1])
    assert username.split(":", 1)[1] == greeting["peerId"]
    assert secret not in raw

    status, _, body = await http_get(server, "/ice-servers")  # token-checked
    assert status == 401, (status, body)
    assert secret.encode() not in body
    for how in ({"Authorization": f"Bearer {tok}"}, None):
        path = "/ice-servers" if how else f"/ice-servers?token={tok}"
        status, _, body = await http_get(server, path, headers=how)
        assert status == 200, (how, status, body)
        check_ice_servers(json.loads(body)["iceServers"], secret, 600, t0, time.time(),
                          TURN_URLS[:1], STUN_URLS[:1])
        assert secret.encode() not in body
    await ws.close()
    assert server.stop() == 0
    assert not any(secret in line for line in server.raw), "TURN secret in the server log"
    assert not any(jwt_secret in line for line in server.raw), "JWT secret in the server log"
