"""JWT verification: algorithm pinning per key type, claims, rotation, minting."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from rtcsignal.config import Config, ConfigError
from rtcsignal.protocol.http import Request
from rtcsignal.security.tokens import TokenError, Verifier, mint, token_from_request

SECRET = "s3cret-for-tests-" + "0123456789abcdef" * 3  # 64 bytes: no short-key warnings
NOW = 1_700_000_000.0


def clock() -> float:
    return NOW


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token built without PyJWT, so tests can sign things PyJWT itself refuses to."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(NOW) + 60, **extra}


def write_public(tmp_path: Path, name: str, private: Any) -> tuple[str, bytes]:
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / name
    path.write_bytes(pem)
    return str(path), pem


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def hs_verifier(**cfg: Any) -> Verifier:
    return Verifier(Config(auth="jwt", jwt_secret=SECRET, **cfg), clock)


# --- HMAC


def test_valid_hs256_token() -> None:
    token = jwt.encode(claims(rooms=["demo*", "lobby"], meta={"name": "A"}), SECRET, "HS256")
    c = hs_verifier().verify(token)
    assert c.user == "alice"
    assert c.rooms == ("demo*", "lobby")
    assert c.meta == {"name": "A"}


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms(alg: str) -> None:
    assert hs_verifier().verify(jwt.encode(claims(), SECRET, alg)).user == "alice"


def test_absent_rooms_and_meta_mean_any_and_none() -> None:
    c = hs_verifier().verify(jwt.encode({"exp": int(NOW) + 5}, SECRET, "HS256"))
    assert c.user is None and c.rooms is None and c.meta is None


def test_alg_none_refused() -> None:
    token = hand_made({"alg": "none", "typ": "JWT"}, claims(), None)
    with pytest.raises(TokenError, match="invalid token"):
        hs_verifier().verify(token)
    token = jwt.encode(claims(), None, algorithm="none")
    with pytest.raises(TokenError, match="invalid token"):
        hs_verifier().verify(token)


def test_wrong_secret_refused() -> None:
    token = jwt.encode(claims(), "another-secret-of-sufficient-length-xx", "HS256")
    with pytest.raises(TokenError, match="invalid token"):
        hs_verifier().verify(token)


def test_tampered_payload_refused() -> None:
    token = jwt.encode(claims(), SECRET, "HS256")
    head, _, sig = token.split(".")
    forged = f"{head}.{b64url(json.dumps(claims(sub='admin')).encode())}.{sig}"
    with pytest.raises(TokenError, match="invalid token"):
        hs_verifier().verify(forged)


def test_expired() -> None:
    token = jwt.encode(claims(exp=int(NOW) - 1), SECRET, "HS256")
    with pytest.raises(TokenError, match="token expired"):
        hs_verifier().verify(token)
    token = jwt.encode(claims(exp=int(NOW)), SECRET, "HS256")  # exp is exclusive
    with pytest.raises(TokenError, match="token expired"):
        hs_verifier().verify(token)


def test_expiry_uses_injected_clock() -> None:
    token = jwt.encode({"exp": 100}, SECRET, "HS256")  # expired in 1970
    assert Verifier(Config(auth="jwt", jwt_secret=SECRET), lambda: 99.0).verify(token)


def test_exp_required_and_numeric() -> None:
    with pytest.raises(TokenError, match="no exp"):
        hs_verifier().verify(jwt.encode({"sub": "alice"}, SECRET, "HS256"))
    with pytest.raises(TokenError):
        hs_verifier().verify(jwt.encode({"exp": "soon"}, SECRET, "HS256"))
    with pytest.raises(TokenError):
        hs_verifier().verify(jwt.encode({"exp": True}, SECRET, "HS256"))


def test_nbf_in_future_refused() -> None:
    with pytest.raises(TokenError, match="not yet valid"):
        hs_verifier().verify(jwt.encode(claims(nbf=int(NOW) + 30), SECRET, "HS256"))


def test_audience_and_issuer() -> None:
    v = hs_verifier(jwt_audience="rtc", jwt_issuer="https://auth.example.com")
    good = claims(aud="rtc", iss="https://auth.example.com")
    assert v.verify(jwt.encode(good, SECRET, "HS256")).user == "alice"
    assert v.verify(jwt.encode({**good, "aud": ["x", "rtc"]}, SECRET, "HS256"))
    with pytest.raises(TokenError, match="audience"):
        v.verify(jwt.encode({**good, "aud": "other"}, SECRET, "HS256"))
    with pytest.raises(TokenError):
        v.verify(jwt.encode({k: x for k, x in good.items() if k != "aud"}, SECRET, "HS256"))
    with pytest.raises(TokenError, match="issuer"):
        v.verify(jwt.encode({**good, "iss": "https://evil.example.com"}, SECRET, "HS256"))
    with pytest.raises(TokenError):
        v.verify(jwt.encode({k: x for k, x in good.items() if k != "iss"}, SECRET, "HS256"))


def test_aud_not_checked_when_not_configured() -> None:
    assert hs_verifier().verify(jwt.encode(claims(aud="anything"), SECRET, "HS256"))


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"rooms": "demo"}, "rooms"),
        ({"rooms": ["ok", 3]}, "rooms"),
        ({"rooms": [""]}, "rooms"),
        ({"rooms": {"a": 1}}, "rooms"),
        ({"meta": ["x"]}, "meta"),
        ({"meta": "x"}, "meta"),
        ({"meta": {"blob": "x" * 2000}}, "meta"),
        ({"sub": 42}, "invalid"),
    ],
)
def test_malformed_claims_refused(extra: dict[str, Any], reason: str) -> None:
    with pytest.raises(TokenError, match=reason):
        hs_verifier().verify(jwt.encode(claims(**extra), SECRET, "HS256"))


def test_empty_rooms_list_means_no_room() -> None:
    assert hs_verifier().verify(jwt.encode(claims(rooms=[]), SECRET, "HS256")).rooms == ()


@pytest.mark.parametrize("junk", ["", "abc", "a.b.c", "....", "x" * 10_000, "eyJhbGciOiJIUzI1NiJ9"])
def test_garbage_refused(junk: str) -> None:
    with pytest.raises(TokenError, match="invalid token"):
        hs_verifier().verify(junk)


def test_secret_file_strips_trailing_newline(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text(SECRET + "\n")
    v = Verifier(Config(auth="jwt", jwt_secret_file=str(f)), clock)
    assert v.verify(jwt.encode(claims(), SECRET, "HS256")).user == "alice"


def test_secret_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Verifier(Config(auth="jwt", jwt_secret_file=str(tmp_path / "nope")), clock)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        Verifier(Config(auth="jwt", jwt_secret_file=str(tmp_path / "empty")), clock)


# --- public keys


def test_rs256(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path, _ = write_public(tmp_path, "k.pem", rsa_key)
    v = Verifier(Config(auth="jwt", jwt_public_key_file=(path,)), clock)
    assert v.verify(jwt.encode(claims(), rsa_key, "RS256")).user == "alice"
    assert v.verify(jwt.encode(claims(), rsa_key, "PS256")).user == "alice"


def test_es256_and_eddsa(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    p1, _ = write_public(tmp_path, "ec.pem", ec_key)
    p2, _ = write_public(tmp_path, "ed.pem", ed_key)
    v = Verifier(Config(auth="jwt", jwt_public_key_file=(p1, p2)), clock)
    assert v.verify(jwt.encode(claims(sub="ec"), ec_key, "ES256")).user == "ec"
    assert v.verify(jwt.encode(claims(sub="ed"), ed_key, "EdDSA")).user == "ed"


def test_algorithm_confusion_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """HS256 signed with the public key PEM as the HMAC secret must never verify."""
    path, pem = write_public(tmp_path, "k.pem", rsa_key)
    v = Verifier(Config(auth="jwt", jwt_public_key_file=(path,)), clock)
    for alg in ("HS256", "HS384", "HS512"):
        forged = hand_made({"alg": alg, "typ": "JWT"}, claims(sub="admin"), pem)
        with pytest.raises(TokenError, match="invalid token"):
            v.verify(forged)
    # also with an HMAC secret configured beside the public key
    v2 = Verifier(Config(auth="jwt", jwt_secret=SECRET, jwt_public_key_file=(path,)), clock)
    with pytest.raises(TokenError, match="invalid token"):
        v2.verify(hand_made({"alg": "HS256"}, claims(sub="admin"), pem))


def test_none_alg_refused_with_public_keys(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path, _ = write_public(tmp_path, "k.pem", rsa_key)
    v = Verifier(Config(auth="jwt", jwt_public_key_file=(path,)), clock)
    for alg in ("none", "None", "NONE", ""):
        with pytest.raises(TokenError, match="invalid token"):
            v.verify(hand_made({"alg": alg}, claims(), None))


def test_hs_token_refused_when_only_public_keys(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path, _ = write_public(tmp_path, "k.pem", rsa_key)
    v = Verifier(Config(auth="jwt", jwt_public_key_file=(path,)), clock)
    with pytest.raises(TokenError, match="invalid token"):
        v.verify(jwt.encode(claims(), SECRET, "HS256"))


def test_rs_token_refused_when_only_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(TokenError, match="invalid token"):
        hs_verifier().verify(jwt.encode(claims(), rsa_key, "RS256"))


def test_ec_key_refuses_rs_alg(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path, _ = write_public(tmp_path, "ec.pem", ec.generate_private_key(ec.SECP256R1()))
    v = Verifier(Config(auth="jwt", jwt_public_key_file=(path,)), clock)
    with pytest.raises(TokenError, match="invalid token"):
        v.verify(jwt.encode(claims(), rsa_key, "RS256"))


def test_key_rotation_two_keys(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    old, _ = write_public(tmp_path, "old.pem", rsa_key)
    new, _ = write_public(tmp_path, "new.pem", rsa_key2)
    v = Verifier(Config(auth="jwt", jwt_public_key_file=(old, new)), clock)
    assert v.verify(jwt.encode(claims(sub="o"), rsa_key, "RS256")).user == "o"
    assert v.verify(jwt.encode(claims(sub="n"), rsa_key2, "RS256")).user == "n"
    # after rotation the old key is gone
    v2 = Verifier(Config(auth="jwt", jwt_public_key_file=(new,)), clock)
    with pytest.raises(TokenError, match="invalid token"):
        v2.verify(jwt.encode(claims(), rsa_key, "RS256"))


def test_expired_with_second_key(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    old, _ = write_public(tmp_path, "old.pem", rsa_key)
    new, _ = write_public(tmp_path, "new.pem", rsa_key2)
    v = Verifier(Config(auth="jwt", jwt_public_key_file=(old, new)), clock)
    with pytest.raises(TokenError, match="expired"):
        v.verify(jwt.encode(claims(exp=1), rsa_key2, "RS256"))


def test_bad_public_key_files(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        Verifier(Config(auth="jwt", jwt_public_key_file=(str(tmp_path / "junk.pem"),)), clock)
    with pytest.raises(ConfigError, match="cannot read"):
        Verifier(Config(auth="jwt", jwt_public_key_file=(str(tmp_path / "none.pem"),)), clock)


# --- request parsing


def req(query: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Request:
    return Request("GET", "/signaling", "/signaling", query or {}, headers or {})


def test_token_from_query_or_bearer_header() -> None:
    assert token_from_request(req({"token": "q"})) == "q"
    assert token_from_request(req(headers={"authorization": "Bearer h"})) == "h"
    assert token_from_request(req(headers={"authorization": "bearer   h "})) == "h"
    assert token_from_request(req({"token": "q"}, {"authorization": "Bearer h"})) == "q"
    assert token_from_request(req()) is None
    assert token_from_request(req({"token": ""})) is None
    assert token_from_request(req(headers={"authorization": "Basic dXNlcjpwYXNz"})) is None
    assert token_from_request(req(headers={"authorization": "Bearer"})) is None


# --- minting


def test_mint_round_trip() -> None:
    cfg = Config(auth="jwt", jwt_secret=SECRET, jwt_audience="rtc", jwt_issuer="me")
    token = mint(cfg, "alice", ["demo*"], 3600, {"color": "red"}, clock=clock)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    raw = jwt.decode(
        token, SECRET, algorithms=["HS256"], audience="rtc", options={"verify_exp": False}
    )
    assert raw["exp"] == int(NOW) + 3600 and raw["iss"] == "me"
    c = Verifier(cfg, clock).verify(token)
    assert (c.user, c.rooms, c.meta) == ("alice", ("demo*",), {"color": "red"})


def test_mint_any_room_omits_claim() -> None:
    cfg = Config(jwt_secret=SECRET)
    raw = jwt.decode(mint(cfg, "bob", None, 60), SECRET, algorithms=["HS256"])
    assert "rooms" not in raw and "meta" not in raw


def test_mint_expires() -> None:
    cfg = Config(auth="jwt", jwt_secret=SECRET)
    token = mint(cfg, "alice", None, 10, clock=clock)
    assert Verifier(cfg, lambda: NOW + 9).verify(token)
    with pytest.raises(TokenError, match="expired"):
        Verifier(cfg, lambda: NOW + 10).verify(token)


def test_mint_needs_a_secret(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ConfigError, match="jwt-secret"):
        mint(Config(), "alice", None, 60)
    path, _ = write_public(tmp_path, "k.pem", rsa_key)
    with pytest.raises(ConfigError):
        mint(Config(auth="jwt", jwt_public_key_file=(path,)), "alice", None, 60)
    with pytest.raises(ConfigError, match="ttl"):
        mint(Config(jwt_secret=SECRET), "alice", None, 0)
