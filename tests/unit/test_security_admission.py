"""Admission: the order and outcome of all pre-upgrade checks, and release bookkeeping."""

from __future__ import annotations

import ipaddress
from typing import Any

import jwt
import pytest

from rtcsignal.config import Config
from rtcsignal.core.hub import room_allowed
from rtcsignal.protocol.http import HttpError, Request
from rtcsignal.security.admission import Admission, Admitted

SECRET = "admission-test-secret-" + "x" * 42
WALL = 1_700_000_000.0
CLIENT = "198.51.100.7"


def req(query: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Request:
    return Request("GET", "/signaling", "/signaling", query or {}, headers or {})


def token(**claims: Any) -> str:
    return jwt.encode({"sub": "alice", "exp": int(WALL) + 600, **claims}, SECRET, "HS256")


def jwt_admission(**cfg: Any) -> Admission:
    return Admission(Config(auth="jwt", jwt_secret=SECRET, **cfg), wall=lambda: WALL)


def refused(fn: Any, *args: Any) -> HttpError:
    with pytest.raises(HttpError) as exc:
        fn(*args)
    return exc.value


# --- defaults


def test_default_config_admits_and_counts() -> None:
    a = Admission(Config())
    ad = a.admit(req(), CLIENT, 0.0)
    assert isinstance(ad, Admitted)
    assert (ad.client_ip, ad.user, ad.rooms, ad.meta) == (CLIENT, None, None, None)
    assert a.open == 1
    a.release(ad)
    assert a.open == 0
    a.release(ad)  # a second release is harmless
    assert a.open == 0


# --- origins


def test_origin_refused_with_403() -> None:
    a = Admission(Config(allowed_origins=("https://*.example.com",)))
    assert a.admit(req(headers={"origin": "https://app.example.com"}), CLIENT, 0.0)
    err = refused(a.admit, req(headers={"origin": "https://example.com.evil.com"}), CLIENT, 0.0)
    assert err.status == 403
    assert a.admit(req(), CLIENT, 0.0)  # no Origin: not a browser


def test_require_origin() -> None:
    a = Admission(Config(allowed_origins=("https://a.com",), require_origin=True))
    assert refused(a.admit, req(), CLIENT, 0.0).status == 403
    assert a.open == 0


# --- JWT


def test_jwt_claims_reach_admitted() -> None:
    a = jwt_admission()
    t = token(rooms=["demo*"], meta={"name": "Alice"})
    ad = a.admit(req({"token": t}), CLIENT, 0.0)
    assert (ad.user, ad.rooms, ad.meta) == ("alice", ("demo*",), {"name": "Alice"})
    ad2 = a.admit(req(headers={"authorization": f"Bearer {t}"}), CLIENT, 0.0)
    assert ad2.user == "alice"


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ({}, "missing token"),
        ({"token": "nope"}, "invalid token"),
        ({"token": jwt.encode({"exp": 1}, SECRET, "HS256")}, "token expired"),
        ({"token": jwt.encode({"exp": 2e9}, "wrong-key-" * 8, "HS256")}, "invalid token"),
    ],
)
def test_jwt_failures_are_401(query: dict[str, str], reason: str) -> None:
    a = jwt_admission()
    err = refused(a.admit, req(query), CLIENT, 0.0)
    assert (err.status, err.reason) == (401, reason)
    assert err.headers.get("WWW-Authenticate") == "Bearer"
    assert a.open == 0


def test_failed_auth_throttle() -> None:
    a = jwt_admission(auth_fail_limit=3, max_connect_rate=1000.0, max_connect_burst=1000.0)
    for _ in range(3):
        assert refused(a.admit, req({"token": "bad"}), CLIENT, 1.0).status == 401
    assert refused(a.admit, req({"token": "bad"}), CLIENT, 1.0).status == 401  # the 4th
    err = refused(a.admit, req({"token": token()}), CLIENT, 2.0)  # even a good token now
    assert err.status == 429 and err.headers["Retry-After"] == "59"
    assert refused(a.authenticate, req({"token": token()}), CLIENT, 2.0).status == 429
    # other addresses are unaffected
    assert a.admit(req({"token": token()}), "198.51.100.8", 2.0)
    # the block lasts 60 s
    assert a.admit(req({"token": token()}), CLIENT, 61.0).user == "alice"


def test_authenticate_failures_count_too() -> None:
    a = jwt_admission(auth_fail_limit=2)
    for _ in range(3):
        assert refused(a.authenticate, req(), CLIENT, 0.0).status == 401
    assert refused(a.admit, req({"token": token()}), CLIENT, 0.0).status == 429


def test_authenticate_does_not_count_connections() -> None:
    a = jwt_admission(max_connections=1)
    ad = a.authenticate(req({"token": token(rooms=["r"])}), CLIENT, 0.0)
    assert (ad.user, ad.rooms) == ("alice", ("r",))
    assert a.open == 0
    assert a.admit(req({"token": token()}), CLIENT, 0.0)


def test_authenticate_without_auth_skips_checks() -> None:
    a = Admission(Config(allowed_origins=("https://a.com",), max_connections=1))
    a.admit(req(), CLIENT, 0.0)
    ad = a.authenticate(req(headers={"origin": "https://evil.com"}), CLIENT, 0.0)
    assert ad == Admitted(client_ip=CLIENT)


# --- connection limits


def test_total_limit_is_503() -> None:
    a = Admission(Config(max_connections=2))
    first = a.admit(req(), "192.0.2.1", 0.0)
    a.admit(req(), "192.0.2.2", 0.0)
    err = refused(a.admit, req(), "192.0.2.3", 0.0)
    assert err.status == 503 and "Retry-After" in err.headers
    a.release(first)
    assert a.admit(req(), "192.0.2.3", 0.0)


def test_total_limit_applies_to_loopback() -> None:
    a = Admission(Config(max_connections=1))
    a.admit(req(), "127.0.0.1", 0.0)
    assert refused(a.admit, req(), "127.0.0.1", 0.0).status == 503


def test_per_address_limit_is_429() -> None:
    a = Admission(Config(max_connections_per_ip=2))
    held = [a.admit(req(), CLIENT, 0.0) for _ in range(2)]
    err = refused(a.admit, req(), CLIENT, 0.0)
    assert err.status == 429 and err.reason == "too many connections"
    assert int(err.headers["Retry-After"]) >= 1
    assert a.admit(req(), "192.0.2.1", 0.0)  # another address is fine
    a.release(held[0])
    assert a.admit(req(), CLIENT, 0.0)


def test_ipv6_addresses_in_one_64_share_a_limit() -> None:
    a = Admission(Config(max_connections_per_ip=1))
    a.admit(req(), "2001:db8:1:2::1", 0.0)
    assert refused(a.admit, req(), "2001:db8:1:2::beef", 0.0).status == 429
    assert a.admit(req(), "2001:db8:1:3::1", 0.0)


def test_connect_rate_bucket_and_refill() -> None:
    a = Admission(Config(max_connect_rate=2.0, max_connect_burst=3.0))
    for _ in range(3):
        a.release(a.admit(req(), CLIENT, 10.0))
    err = refused(a.admit, req(), CLIENT, 10.0)
    assert err.status == 429 and err.reason == "too many new connections"
    assert err.headers["Retry-After"] == "1"
    assert refused(a.admit, req(), CLIENT, 10.25).status == 429
    assert a.admit(req(), CLIENT, 10.5)  # one token refilled at 2/s


def test_refused_attempts_consume_rate_tokens() -> None:
    a = Admission(
        Config(allowed_origins=("https://a.com",), max_connect_rate=1.0, max_connect_burst=2.0)
    )
    bad = req(headers={"origin": "https://evil.com"})
    assert refused(a.admit, bad, CLIENT, 0.0).status == 403
    assert refused(a.admit, bad, CLIENT, 0.0).status == 403
    assert refused(a.admit, bad, CLIENT, 0.0).status == 429


def test_loopback_without_xff_is_exempt_from_per_address_limits() -> None:
    a = Admission(Config(max_connections_per_ip=1, max_connect_rate=1.0, max_connect_burst=1.0))
    held = [a.admit(req(), "127.0.0.1", 0.0) for _ in range(20)]
    held += [a.admit(req(), "::1", 0.0) for _ in range(5)]
    assert a.open == 25
    assert len(a.table) == 0
    for ad in held:
        a.release(ad)
    assert a.open == 0


def test_loopback_proxy_forwarding_is_limited_per_client() -> None:
    a = Admission(Config(max_connections_per_ip=1))
    fwd = req(headers={"x-forwarded-for": CLIENT})
    ad = a.admit(fwd, "127.0.0.1", 0.0)
    assert ad.client_ip == CLIENT
    assert refused(a.admit, fwd, "127.0.0.1", 0.0).status == 429
    other = req(headers={"x-forwarded-for": "192.0.2.99"})
    assert a.admit(other, "127.0.0.1", 0.0).client_ip == "192.0.2.99"


def test_xff_from_untrusted_peer_is_ignored() -> None:
    a = Admission(Config(max_connections_per_ip=1))
    spoof = req(headers={"x-forwarded-for": "127.0.0.1"})
    ad = a.admit(spoof, CLIENT, 0.0)
    assert ad.client_ip == CLIENT
    # claiming to be loopback or someone else does not escape the limit
    assert refused(a.admit, spoof, CLIENT, 0.0).status == 429
    spoof2 = req(headers={"x-forwarded-for": "192.0.2.50"})
    assert refused(a.admit, spoof2, CLIENT, 0.0).status == 429


def test_forged_left_part_of_xff_is_ignored() -> None:
    a = Admission(Config(max_connections_per_ip=1))
    a.admit(req(headers={"x-forwarded-for": f"1.1.1.1, {CLIENT}"}), "127.0.0.1", 0.0)
    again = req(headers={"x-forwarded-for": f"2.2.2.2, {CLIENT}"})
    assert refused(a.admit, again, "127.0.0.1", 0.0).status == 429


def test_custom_trusted_proxies() -> None:
    cfg = Config(trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    a = Admission(cfg)
    assert a.client_address(req(headers={"x-forwarded-for": CLIENT}), "10.1.1.1") == CLIENT
    # loopback is no longer trusted here
    assert a.client_address(req(headers={"x-forwarded-for": CLIENT}), "127.0.0.1") == "127.0.0.1"


def test_release_after_table_sweep_keeps_counts_right() -> None:
    a = Admission(Config(max_connections_per_ip=1))
    ad = a.admit(req(), CLIENT, 0.0)
    assert a.sweep(1000.0) == 0  # an entry with an open connection is kept
    a.release(ad)
    assert a.sweep(1000.0) == 1
    assert len(a.table) == 0
    assert a.admit(req(), CLIENT, 1000.0)


def test_table_stays_bounded_under_many_addresses() -> None:
    a = Admission(Config(max_connect_rate=100.0, max_connect_burst=1.0))
    for i in range(5000):
        now = i * 0.02  # each bucket refills 1 token in 10 ms
        a.release(a.admit(req(), f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", now))
    assert len(a.table) < 20
    assert a.open == 0


# --- warnings


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost", "LOCALHOST"])
def test_no_warning_on_loopback(host: str) -> None:
    assert Admission(Config(host=host)).warnings() == []


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.1", "example.com"])
def test_warning_on_public_host_without_origins(host: str) -> None:
    (w,) = Admission(Config(host=host)).warnings()
    assert "allowed-origins" in w
    assert Admission(Config(host=host, allowed_origins=("https://a.com",))).warnings() == []


def test_warning_on_short_secret() -> None:
    (w,) = Admission(Config(auth="jwt", jwt_secret="tiny-secret")).warnings()
    assert "11 bytes" in w and "tiny-secret" not in w  # never prints the secret
    assert jwt_admission().warnings() == []


# --- room_allowed


def test_room_allowed() -> None:
    assert room_allowed(None, "anything")
    assert room_allowed(("demo*",), "demo")
    assert room_allowed(("demo*",), "demo-1")
    assert not room_allowed(("demo*",), "dem")
    assert room_allowed(("lobby", "x*"), "lobby")
    assert not room_allowed(("lobby",), "lobby2")
    assert not room_allowed((), "lobby")
    assert room_allowed(("*",), "z")
