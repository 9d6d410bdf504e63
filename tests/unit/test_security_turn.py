"""TURN REST credentials checked against an independent HMAC computation."""

from __future__ import annotations

import base64
import hashlib
import hmac

from rtcsignal.config import Config
from rtcsignal.security.turn import ice_servers

SECRET = "north-sea-herring-7"


def test_nothing_configured() -> None:
    assert ice_servers(Config(), "p1", 1000.0) == []


def test_stun_only() -> None:
    cfg = Config(stun_urls=("stun:stun.example.com:3478",))
    assert ice_servers(cfg, "p1", 1000.0) == [{"urls": ["stun:stun.example.com:3478"]}]


def test_turn_secret_without_urls_gives_no_turn_entry() -> None:
    cfg = Config(turn_secret=SECRET, stun_urls=("stun:s",))
    assert ice_servers(cfg, "p1", 1000.0) == [{"urls": ["stun:s"]}]


def test_turn_credentials() -> None:
    cfg = Config(
        stun_urls=("stun:turn.example.com:3478",),
        turn_secret=SECRET,
        turn_urls=("turn:turn.example.com:3478?transport=udp", "turns:turn.example.com:5349"),
        turn_ttl=600,
    )
    stun, turn = ice_servers(cfg, "peer-42", 1_700_000_000.9)
    assert stun == {"urls": ["stun:turn.example.com:3478"]}
    assert turn["urls"] == list(cfg.turn_urls)
    assert turn["username"] == "1700000600:peer-42"
    mac = hmac.new(SECRET.encode(), b"1700000600:peer-42", hashlib.sha1).digest()
    assert turn["credential"] == base64.b64encode(mac).decode()
    assert SECRET not in repr(turn) and SECRET not in repr(stun)


def test_turn_without_stun() -> None:
    cfg = Config(turn_secret=SECRET, turn_urls=("turn:t",))
    (turn,) = ice_servers(cfg, "x", 100.0)
    assert turn["username"] == "3700:x"


def test_default_now_is_wall_clock() -> None:
    import time

    cfg = Config(turn_secret=SECRET, turn_urls=("turn:t",), turn_ttl=60)
    before = int(time.time())
    (turn,) = ice_servers(cfg, "x")
    expiry = int(turn["username"].split(":")[0])
    assert before + 60 <= expiry <= int(time.time()) + 60
