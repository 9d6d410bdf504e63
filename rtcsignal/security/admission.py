"""Who may connect: every check that runs before the WebSocket upgrade completes.

Order matters for cost: the checks that need no work (auth block, connect rate, origin,
connection counts) run before the one that does (JWT signature), so a flood of bad requests
is refused cheaply. Each refusal is an HttpError with a status and a short reason:

    429 auth-failure block / connect rate / connections per address
    403 origin not allowed
    503 server full
    401 missing, invalid or expired token
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

from rtcsignal.config import Config, ConfigError
from rtcsignal.protocol.http import HttpError, Request
from rtcsignal.security.limits import AddressTable, retry_after
from rtcsignal.security.origins import OriginPolicy
from rtcsignal.security.proxies import client_ip, is_loopback, limit_key, parse_ip
from rtcsignal.security.tokens import (
    Clock,
    TokenError,
    Verifier,
    hmac_secret,
    token_from_request,
)

FULL_RETRY = 5.0  # seconds suggested to a client refused because the server is full
PER_IP_RETRY = 10.0  # ... or because its address has too many open connections
SHORT_SECRET = 32  # bytes; shorter HMAC secrets can be brute-forced offline from one token


@dataclass(slots=True)
class Admitted:
    """What the checks learned about an accepted client."""

    client_ip: str
    user: str | None = None  # JWT sub, shown to others as meta.user
    rooms: tuple[str, ...] | None = None  # JWT rooms claim: names or prefix* patterns; None = any
    meta: dict[str, Any] | None = None  # JWT meta claim: overrides client-sent meta
    # Bookkeeping for release(): the per-address key counted (None = exempt) and whether this
    # connection is still counted, so a second release() is harmless.
    limit_key: str | None = field(default=None, repr=False)
    counted: bool = field(default=False, repr=False)


class Admission:
    """Admission state for one server: per-address table, open count, compiled policy.

    ``now`` arguments are monotonic seconds (``loop.time()``); token expiry uses ``wall``.
    """

    def __init__(self, config: Config, wall: Clock = time.time) -> None:
        self.config = config
        self.wall = wall
        self.open = 0
        self.pending = 0  # sockets that have not finished the HTTP request / upgrade
        self.pending_by_ip: dict[str, int] = {}
        self.origins = OriginPolicy(config.allowed_origins, config.require_origin)
        self.verifier = Verifier(config, wall) if config.auth == "jwt" else None
        self.table = AddressTable(
            config.max_connect_rate, config.max_connect_burst, config.auth_fail_limit
        )
        #: Failed attempts by what failed (for /metrics): a JWT, a resume token, the admin
        #: API's token. Each counts towards the address's block.
        self.failures = {"jwt": 0, "resume": 0, "admin": 0}
        self.admin_token = admin_token(config)

    def reconfigure(self, config: Config) -> None:
        """New settings (a reload): origins, keys and the admin token are read first, so a
        bad one raises ConfigError and changes nothing. Open connections are not
        re-checked; per-address buckets take the new rate at once."""
        origins = OriginPolicy(config.allowed_origins, config.require_origin)
        verifier = Verifier(config, self.wall) if config.auth == "jwt" else None
        token = admin_token(config)
        self.config = config
        self.origins = origins
        self.verifier = verifier
        self.admin_token = token
        table = self.table
        table.rate, table.burst = config.max_connect_rate, config.max_connect_burst
        table.fail_limit = config.auth_fail_limit
        for entry in table.entries.values():
            entry.rate, entry.burst = table.rate, table.burst

    def client_address(self, request: Request, peer_ip: str) -> str:
        """The client's IP: the peer, or X-Forwarded-For's nearest hop behind trusted proxies."""
        return client_ip(peer_ip, request.header("x-forwarded-for"), self.config.trusted_proxies)

    def _exempt(self, request: Request, client: str) -> bool:
        """A local client talking to us directly (tests, health checks) skips per-address limits."""
        return is_loopback(parse_ip(client)) and "x-forwarded-for" not in request.headers

    def admit(self, request: Request, peer_ip: str, now: float) -> Admitted:
        """Raise HttpError (401/403/429/503 with a short reason) or return Admitted."""
        cfg = self.config
        client = self.client_address(request, peer_ip)
        key = limit_key(client)
        self._check_blocked(key, now)
        exempt = self._exempt(request, client)
        entry = None if exempt else self.table.get(key, now)
        if entry is not None:
            wait = self.table.take(entry, now)
            if wait:
                raise HttpError(429, "too many new connections", retry_after(wait))
        if not self.origins.allows(request.headers.get("origin")):
            raise HttpError(403, "origin not allowed")
        if self.open >= cfg.max_connections:
            raise HttpError(503, "server full", retry_after(FULL_RETRY))
        if entry is not None and entry.open >= cfg.max_connections_per_ip:
            raise HttpError(429, "too many connections", retry_after(PER_IP_RETRY))
        admitted = self._token(request, client, key, now)
        self.open += 1
        if entry is not None:
            entry.open += 1
            admitted.limit_key = key
        admitted.counted = True
        return admitted

    def hold(self, peer_ip: str) -> HttpError | None:
        """Count a new socket before its request head arrives, or refuse it (503 when
        ``max_pending_connections`` are pending; 429 when one address holds
        ``max_connections_per_ip`` pending). Loopback and trusted proxies have no
        per-address cap here: their clients are told apart by X-Forwarded-For later.
        Pending sockets are capped apart from open sessions, so a full server still
        answers /healthz."""
        cfg = self.config
        if self.pending >= cfg.max_pending_connections:
            return HttpError(503, "too many pending connections", retry_after(FULL_RETRY))
        ip = parse_ip(peer_ip)
        if ip is not None and not is_loopback(ip) and not any(
            ip in net for net in cfg.trusted_proxies
        ):
            n = self.pending_by_ip.get(peer_ip, 0)
            if n >= cfg.max_connections_per_ip:
                return HttpError(429, "too many pending connections", retry_after(PER_IP_RETRY))
            self.pending_by_ip[peer_ip] = n + 1
        self.pending += 1
        return None

    def unhold(self, peer_ip: str) -> None:
        """The socket held by ``hold`` upgraded or closed."""
        self.pending -= 1
        n = self.pending_by_ip.get(peer_ip)
        if n is not None:
            if n > 1:
                self.pending_by_ip[peer_ip] = n - 1
            else:
                del self.pending_by_ip[peer_ip]

    def fail(self, admitted: Admitted, now: float) -> None:
        """A failed attempt after admission (an unknown resume token) counts towards the
        address's block, like a failed token: guessing tokens is throttled."""
        self.failures["resume"] += 1
        self.table.fail(self.table.get(limit_key(admitted.client_ip), now), now)

    def admin(self, request: Request, peer_ip: str, now: float) -> None:
        """The admin API's bearer token (``Authorization: Bearer ...``), compared in constant
        time (digests, so not even its length leaks). A missing or wrong one is a failed
        attempt like a bad JWT: 401, and past ``auth_fail_limit`` a minute, 429 for a minute.
        Raises HttpError 404 when no admin token is configured (no admin API)."""
        if self.admin_token is None:
            raise HttpError(404, "not found")
        key = limit_key(self.client_address(request, peer_ip))
        self._check_blocked(key, now)
        scheme, _, given = (request.header("authorization") or "").partition(" ")
        ok = hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(),
                                 self.admin_token)
        if not ok or scheme.lower() != "bearer":
            self.failures["admin"] += 1
            self.table.fail(self.table.get(key, now), now)
            raise HttpError(401, "admin token required", {"WWW-Authenticate": "Bearer"})

    def release(self, admitted: Admitted) -> None:
        """The admitted connection has closed (a second call for the same one does nothing)."""
        if not admitted.counted:
            return
        admitted.counted = False
        self.open -= 1
        if admitted.limit_key is not None:
            entry = self.table.peek(admitted.limit_key)
            if entry is not None and entry.open > 0:
                entry.open -= 1

    def authenticate(self, request: Request, peer_ip: str, now: float) -> Admitted:
        """Token check only (for GET /ice-servers); raises HttpError(401/429)."""
        client = self.client_address(request, peer_ip)
        if self.verifier is None:
            return Admitted(client_ip=client)
        key = limit_key(client)
        self._check_blocked(key, now)
        return self._token(request, client, key, now)

    def sweep(self, now: float) -> int:
        """Drop idle per-address entries; call from a periodic timer (e.g. every 60 s)."""
        return self.table.sweep(now)

    def warnings(self) -> list[str]:
        """Start-up warnings, e.g. a public listener with no origin allow-list."""
        cfg = self.config
        out = []
        if not cfg.allowed_origins and not _loopback_host(cfg.host):
            out.append(
                f"listening on {cfg.host or 'all interfaces'} with no --allowed-origins: "
                "any web page can open a signaling connection from its visitors' browsers"
            )
        if cfg.auth == "jwt":
            secret = hmac_secret(cfg)
            if secret is not None and len(secret) < SHORT_SECRET:
                out.append(
                    f"JWT secret is {len(secret)} bytes; use at least {SHORT_SECRET} random "
                    "bytes (e.g. openssl rand -base64 48) or tokens can be forged"
                )
        return out

    # --- internals

    def _check_blocked(self, key: str, now: float) -> None:
        wait = self.table.blocked(self.table.peek(key), now)
        if wait:
            raise HttpError(429, "too many failed logins", retry_after(wait))

    def _token(self, request: Request, client: str, key: str, now: float) -> Admitted:
        """Check the token when auth is on; a failure counts towards the address's block."""
        if self.verifier is None:
            return Admitted(client_ip=client)
        token = token_from_request(request)
        try:
            if token is None:
                raise TokenError("missing token")
            claims = self.verifier.verify(token)
        except TokenError as exc:
            self.failures["jwt"] += 1
            self.table.fail(self.table.get(key, now), now)
            raise HttpError(401, exc.reason, {"WWW-Authenticate": "Bearer"}) from None
        return Admitted(client_ip=client, user=claims.user, rooms=claims.rooms, meta=claims.meta)


def admin_token(config: Config) -> bytes | None:
    """The SHA-256 of the admin token (from --admin-token or --admin-token-file), or None
    when there is none; ConfigError if the file cannot be read or is empty."""
    token = config.admin_token
    if config.admin_token_file:
        try:
            with open(config.admin_token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise ConfigError(f"admin_token_file: cannot read {config.admin_token_file}: "
                              f"{reason}") from None
        if not token:
            raise ConfigError(f"admin_token_file: {config.admin_token_file} is empty")
    return hashlib.sha256(token.encode()).digest() if token else None


def _loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
