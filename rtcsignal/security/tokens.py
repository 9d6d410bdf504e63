"""JWT access tokens: verifying them at the handshake and minting them for ``rtcsignal token``.

Each configured key carries the algorithms that suit its type and only those: an HMAC secret
accepts HS256/384/512, an RSA key RS*/PS*, an EC key the ES* of its curve, an Ed25519/Ed448
key EdDSA. ``alg: none`` is never on any list, and a token signed with HS256 using a public
key's PEM as the secret (algorithm confusion) is refused because no HMAC secret is that PEM
and no public key accepts HS*. Several public keys may be configured for rotation; a token
is tried against each key whose algorithms include the token's ``alg``.

``exp`` is required and checked against an injectable wall clock (tests and ``mint`` share
it); ``aud`` and ``iss`` are checked only when configured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from rtcsignal.config import Config, ConfigError
from rtcsignal.protocol.http import Request

HMAC_ALGS = ("HS256", "HS384", "HS512")
RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGS = {
    "secp256r1": ("ES256",),
    "secp384r1": ("ES384",),
    "secp521r1": ("ES512",),
    "secp256k1": ("ES256K",),
}
EDDSA_ALGS = ("EdDSA",)
MAX_TOKEN = 4096  # bytes; a signaling token is a few hundred
LEEWAY = 0.0  # seconds of clock skew tolerated on exp/nbf

Clock = Callable[[], float]


class TokenError(Exception):
    """A refused token; ``reason`` is the short text sent back with the 401."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Claims:
    """What a valid token grants."""

    user: str | None
    rooms: tuple[str, ...] | None
    meta: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class VerifyKey:
    key: Any  # HMAC secret bytes or a cryptography public key object
    algorithms: tuple[str, ...]
    source: str  # for error messages: "jwt_secret" or the PEM file name


def hmac_secret(config: Config) -> bytes | None:
    """The HMAC secret from ``jwt_secret`` or ``jwt_secret_file`` (trailing newline dropped)."""
    if config.jwt_secret:
        return config.jwt_secret.encode()
    if config.jwt_secret_file:
        try:
            with open(config.jwt_secret_file, "rb") as fh:
                data = fh.read().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(
                f"jwt_secret_file: cannot read {config.jwt_secret_file}: {exc.strerror}"
            ) from None
        if not data:
            raise ConfigError(f"jwt_secret_file: {config.jwt_secret_file} is empty")
        return data
    return None


def public_key(path: str) -> VerifyKey:
    """Load one PEM public key and the algorithms its type allows."""
    try:
        with open(path, "rb") as fh:
            key = load_pem_public_key(fh.read())
    except OSError as exc:
        raise ConfigError(f"jwt_public_key_file: cannot read {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"jwt_public_key_file: {path} is not a PEM public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        algs: tuple[str, ...] = RSA_ALGS
    elif isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in EC_ALGS:
        algs = EC_ALGS[key.curve.name]
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        algs = EDDSA_ALGS
    else:
        raise ConfigError(f"jwt_public_key_file: {path}: unsupported key type for JWT")
    return VerifyKey(key, algs, path)


def verify_keys(config: Config) -> tuple[VerifyKey, ...]:
    """Every key tokens may be signed with; loaded once at start-up (restart to rotate)."""
    keys = []
    secret = hmac_secret(config)
    if secret is not None:
        keys.append(VerifyKey(secret, HMAC_ALGS, "jwt_secret"))
    keys.extend(public_key(p) for p in config.jwt_public_key_file)
    return tuple(keys)


def token_from_request(request: Request) -> str | None:
    """``?token=`` (browsers cannot set headers on a WebSocket) or ``Authorization: Bearer``."""
    token = request.query.get("token")
    if token:
        return token
    scheme, _, value = request.header("authorization").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


class Verifier:
    """Checks tokens against the configured keys, audience and issuer."""

    def __init__(self, config: Config, clock: Clock = time.time) -> None:
        self.keys = verify_keys(config)
        self.audience = config.jwt_audience or None
        self.issuer = config.jwt_issuer or None
        self.max_meta = config.max_meta_size
        self.clock = clock

    def verify(self, token: str) -> Claims:
        """Return the token's claims or raise TokenError with a short reason."""
        if len(token) > MAX_TOKEN:
            raise TokenError("invalid token")
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise TokenError("invalid token") from None
        candidates = [k for k in self.keys if alg in k.algorithms]
        for k in candidates:
            try:
                payload = jwt.decode(
                    token,
                    k.key,
                    algorithms=list(k.algorithms),
                    audience=self.audience,
                    issuer=self.issuer,
                    options={
                        "require": ["exp"],
                        "verify_exp": False,  # checked below against self.clock
                        "verify_nbf": False,
                        "verify_iat": False,
                        "verify_aud": self.audience is not None,
                        "verify_iss": self.issuer is not None,
                    },
                )
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError, jwt.InvalidAlgorithmError):
                continue  # another key may have signed it (rotation)
            except jwt.MissingRequiredClaimError:
                raise TokenError("token has no exp") from None
            except jwt.InvalidAudienceError:
                raise TokenError("wrong token audience") from None
            except jwt.InvalidIssuerError:
                raise TokenError("wrong token issuer") from None
            except jwt.PyJWTError:
                raise TokenError("invalid token") from None
            return self._claims(payload)
        raise TokenError("invalid token")

    def _claims(self, payload: dict[str, Any]) -> Claims:
        now = self.clock()
        exp, nbf = payload.get("exp"), payload.get("nbf", 0)
        if not _number(exp) or not _number(nbf):
            raise TokenError("invalid token")
        if exp <= now - LEEWAY:
            raise TokenError("token expired")
        if nbf > now + LEEWAY:
            raise TokenError("token not yet valid")
        sub, rooms, meta = payload.get("sub"), payload.get("rooms"), payload.get("meta")
        if sub is not None and not isinstance(sub, str):
            raise TokenError("invalid sub claim")
        if rooms is not None and not (
            isinstance(rooms, list) and all(isinstance(r, str) and r for r in rooms)
        ):
            raise TokenError("invalid rooms claim")
        if meta is not None:
            if not isinstance(meta, dict):
                raise TokenError("invalid meta claim")
            if len(orjson.dumps(meta)) > self.max_meta:
                raise TokenError("meta claim too large")
        return Claims(sub, tuple(rooms) if rooms is not None else None, meta)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def mint(
    config: Config,
    sub: str,
    rooms: Sequence[str] | None = None,
    ttl: int = 3600,
    meta: dict[str, Any] | None = None,
    clock: Clock = time.time,
) -> str:
    """An HS256 token for ``rtcsignal token``, signed with the configured HMAC secret.

    ``rooms`` are names or ``prefix*`` patterns (None = any room). ``aud``/``iss`` are set
    when configured, so the token passes this server's own checks. Raises ConfigError when
    no HMAC secret is configured (public-key deployments mint tokens with their private key).
    """
    secret = hmac_secret(config)
    if secret is None:
        raise ConfigError("token: needs --jwt-secret or --jwt-secret-file to sign with")
    if ttl < 1:
        raise ConfigError("token: ttl must be at least 1 second")
    now = int(clock())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl}
    if rooms is not None:
        payload["rooms"] = list(rooms)
    if meta is not None:
        payload["meta"] = meta
    if config.jwt_audience:
        payload["aud"] = config.jwt_audience
    if config.jwt_issuer:
        payload["iss"] = config.jwt_issuer
    return jwt.encode(payload, secret, algorithm="HS256")
