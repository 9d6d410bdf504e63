"""Settings: one table of fields, read from flags, environment, a TOML file and defaults.

Every setting is declared once in ``SETTINGS``; the CLI flags, the ``RTCSIGNAL_<NAME>``
environment variables, the TOML keys and the docs table are all derived from it, so there is
one way to set each thing. Precedence: flag > environment > file > default.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A setting has a value it cannot take; the message names the setting and what it allows."""


# --- value parsers: text (flag/env) or TOML value -> typed value, ValueError with allowed values


def _int(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int | str):  # a TOML 1.5 is not 1
            raise ValueError
        n = int(v, 0) if isinstance(v, str) else v
        if n < lo or (hi is not None and n > hi):
            raise ValueError
        return n

    parse.allowed = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")  # type: ignore[attr-defined]
    return parse


def _float(lo: float, strict: bool = False) -> Callable[[Any], float]:
    def parse(v: Any) -> float:
        if isinstance(v, bool):
            raise ValueError
        x = float(v)
        if x != x or x < lo or (strict and x == lo) or x == float("inf"):
            raise ValueError
        return x

    parse.allowed = f"a number {'>' if strict else '>='} {lo}"  # type: ignore[attr-defined]
    return parse


def _choice(*names: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        s = str(v).lower()
        if s not in names:
            raise ValueError
        return s

    parse.allowed = "one of " + ", ".join(names)  # type: ignore[attr-defined]
    return parse


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if not isinstance(v, str):  # a TOML 1 or [] is not a boolean
        raise ValueError
    s = v.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError


_bool.allowed = "true or false"  # type: ignore[attr-defined]


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError
    return v


_text.allowed = "a string"  # type: ignore[attr-defined]


def _path_setting(v: Any) -> str:
    s = _text(v)
    if not s.startswith("/") or any(c in s for c in " ?#"):
        raise ValueError
    return s


_path_setting.allowed = "a URL path starting with / (no spaces, ? or #)"  # type: ignore[attr-defined]


def _list(v: Any) -> tuple[str, ...]:
    if isinstance(v, list | tuple):
        if not all(isinstance(x, str) for x in v):  # a TOML [1] is not a list of names
            raise ValueError
        items = [x.strip() for x in v]
    elif isinstance(v, str):
        items = [x.strip() for x in v.split(",")]
    else:
        raise ValueError
    return tuple(x for x in items if x)


_list.allowed = "a comma-separated list"  # type: ignore[attr-defined]


def _networks(v: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(x, strict=False) for x in _list(v))


_networks.allowed = "a comma-separated list of CIDR networks, e.g. 127.0.0.1/32,10.0.0.0/8"  # type: ignore[attr-defined]


def _broker(v: Any) -> str:
    s = _text(v).strip()
    if s not in ("", "memory") and not s.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError
    return "" if s == "memory" else s


_broker.allowed = "memory, or a redis://, rediss:// or unix:// URL"  # type: ignore[attr-defined]


def _workers(v: Any) -> int:
    if isinstance(v, str) and v.strip().lower() == "auto":
        return os.cpu_count() or 1
    return _int(1)(v)


_workers.allowed = "an integer >= 1, or auto (one per core)"  # type: ignore[attr-defined]


def _size(v: Any) -> int:
    """Bytes, with optional KiB/MiB suffix (k, m)."""
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, int):
        n = v
    else:
        s = str(v).strip().lower().removesuffix("b").removesuffix("i")
        mult = 1
        if s.endswith("k"):
            mult, s = 1024, s[:-1]
        elif s.endswith("m"):
            mult, s = 1024 * 1024, s[:-1]
        n = int(s) * mult
    if n < 1:
        raise ValueError
    return n


_size.allowed = "a size in bytes >= 1 (suffix k or m for KiB/MiB)"  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[Any], Any]
    help: str
    group: str = "server"
    flag_only_true: bool = False  # a boolean flag without a value (--no-default-room)

    @property
    def default(self) -> Any:
        """Defaults live on ``Config`` only, so they are stated once."""
        f = Config.__dataclass_fields__[self.name]
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "RTCSIGNAL_" + self.name.upper()


LOOPBACK = "127.0.0.0/8,::1/128"

SETTINGS: tuple[Setting, ...] = (
    # server
    Setting("host", _text, "address to listen on"),
    Setting("port", _int(0, 65535), "TCP port (0 picks a free one)"),
    Setting("path", _path_setting, "WebSocket endpoint path"),
    Setting(
        "heartbeat_interval",
        _float(0, strict=True),
        "seconds between WebSocket pings; a peer that missed the previous ping is dropped",
    ),
    Setting(
        "drain_timeout",
        _float(0),
        "seconds graceful shutdown waits for clients to close before exiting",
    ),
    Setting(
        "handshake_timeout",
        _float(0, strict=True),
        "seconds a connection may take to complete its HTTP request / upgrade",
    ),
    Setting(
        "close_timeout",
        _float(0, strict=True),
        "seconds to wait for a peer to answer our close frame before dropping the socket",
    ),
    Setting(
        "workers",
        _workers,
        "server processes sharing the port (SO_REUSEPORT); more than 1 needs --broker",
    ),
    Setting("log_level", _choice("debug", "info", "warning", "error"), "log level"),
    Setting(
        "log_format",
        _choice("auto", "json", "text"),
        "log line format; auto = text on a terminal, JSON otherwise",
    ),
    Setting(
        "log_file",
        _text,
        "append log lines to this file instead of stderr (JSON with --log-format auto); "
        "reopened on SIGHUP, so logrotate can move it",
    ),
    Setting(
        "certfile", _text, "TLS certificate (PEM) to serve wss:// and https:// directly", "tls"
    ),
    Setting("keyfile", _text, "TLS private key (PEM) for --certfile", "tls"),
    # cluster
    Setting(
        "broker",
        _broker,
        "where instances share rooms and presence: memory (one process) or a Redis URL",
        "cluster",
    ),
    Setting("broker_prefix", _text, "prefix of every Redis key and channel", "cluster"),
    Setting(
        "presence_ttl",
        _float(0, strict=True),
        "seconds after which a silent instance's peers are announced left (reason timeout)",
        "cluster",
    ),
    # resume
    Setting(
        "resume_window",
        _float(0),
        "seconds a dropped client may reconnect with ?resume=TOKEN and keep its session "
        "(0 = no resume)",
        "resume",
    ),
    Setting(
        "resume_queue_messages",
        _int(0),
        "messages kept for a dropped client during the resume window",
        "resume",
    ),
    Setting(
        "resume_queue_bytes",
        _size,
        "bytes kept for a dropped client during the resume window",
        "resume",
    ),
    Setting(
        "drain_spread",
        _float(0),
        "seconds over which a draining instance with a broker tells its clients to reconnect "
        "(close 1012), jittered",
        "resume",
    ),
    # rooms
    Setting(
        "no_default_room",
        _bool,
        "require every connection to join a named room (no broadcast-to-all room)",
        "rooms",
        True,
    ),
    Setting("max_rooms_per_peer", _int(1), "rooms one connection may be in at once", "rooms"),
    Setting("max_peers_per_room", _int(0), "peers per named room; 0 = unlimited", "rooms"),
    Setting("max_meta_size", _size, "bytes of JSON a peer's meta object may take", "rooms"),
    # limits
    Setting(
        "max_message_size",
        _size,
        "largest WebSocket message accepted; larger closes with 1009",
        "limits",
    ),
    Setting(
        "max_send_buffer",
        _size,
        "unsent bytes queued for one connection; over it for --slow-reader-timeout, or over "
        "4 times it at all, closes with 1013",
        "limits",
    ),
    Setting("max_header_size", _size, "largest HTTP request head accepted", "limits"),
    Setting(
        "rate_limit",
        _float(0, strict=True),
        "messages per second one connection may send (token bucket rate)",
        "limits",
    ),
    Setting("rate_burst", _float(1), "token bucket size for --rate-limit", "limits"),
    Setting(
        "rate_limit_bytes",
        _size,
        "bytes per second one connection may send (message payloads, pings, pongs)",
        "limits",
    ),
    Setting(
        "rate_burst_bytes",
        _size,
        "byte bucket size for --rate-limit-bytes; at least --max-message-size",
        "limits",
    ),
    Setting(
        "slow_reader_timeout",
        _float(0, strict=True),
        "seconds a connection's send queue may stay over --max-send-buffer before 1013",
        "limits",
    ),
    Setting("max_connections", _int(1), "open connections in total (503 beyond)", "limits"),
    Setting(
        "max_pending_connections",
        _int(1),
        "sockets still sending their HTTP request / upgrade (503 beyond); each holds at most "
        "--max-header-size bytes",
        "limits",
    ),
    Setting(
        "max_connections_per_ip",
        _int(1),
        "open connections per client address (429 beyond); also caps its pending sockets",
        "limits",
    ),
    Setting(
        "max_connect_rate",
        _float(0, strict=True),
        "new connections per second per client address",
        "limits",
    ),
    Setting("max_connect_burst", _float(1), "burst for --max-connect-rate", "limits"),
    Setting(
        "metrics_max_types",
        _int(0),
        "distinct message types labelled in /metrics (the rest count as _other)",
        "limits",
    ),
    # security
    Setting(
        "allowed_origins",
        _list,
        "browser Origins allowed to connect (patterns: *, https://*.example.com); empty = all",
        "security",
    ),
    Setting("require_origin", _bool, "refuse requests without an Origin header", "security", True),
    Setting(
        "trusted_proxies",
        _networks,
        "proxies whose X-Forwarded-For is believed (CIDR list)",
        "security",
    ),
    Setting("auth", _choice("none", "jwt"), "client authentication", "security"),
    Setting("jwt_secret", _text, "HMAC secret for HS256/384/512 tokens", "security"),
    Setting("jwt_secret_file", _text, "file holding the HMAC secret", "security"),
    Setting(
        "jwt_public_key_file",
        _list,
        "PEM public key files for RS256/ES256/EdDSA tokens (several for rotation)",
        "security",
    ),
    Setting("jwt_audience", _text, "required aud claim (checked when set)", "security"),
    Setting("jwt_issuer", _text, "required iss claim (checked when set)", "security"),
    Setting(
        "auth_fail_limit",
        _int(1),
        "failed token checks per address per minute before 429 for a minute",
        "security",
    ),
    Setting(
        "admin_token",
        _text,
        "bearer token of the /admin/ HTTP API; empty = no admin API (404)",
        "security",
    ),
    Setting("admin_token_file", _text, "file holding the admin API's bearer token", "security"),
    # TURN
    Setting("turn_secret", _text, "coturn use-auth-secret shared secret", "turn"),
    Setting("turn_urls", _list, "TURN server URLs handed to clients", "turn"),
    Setting("turn_ttl", _int(60), "seconds TURN credentials stay valid", "turn"),
    Setting("stun_urls", _list, "STUN server URLs handed to clients", "turn"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    """Resolved settings. Build with ``Config()`` for defaults or ``load_config`` from sources."""

    host: str = "127.0.0.1"
    port: int = 8083
    path: str = "/signaling"
    heartbeat_interval: float = 30.0
    drain_timeout: float = 10.0
    handshake_timeout: float = 10.0
    close_timeout: float = 3.0
    workers: int = 1
    broker: str = ""
    broker_prefix: str = "rtcsignal"
    presence_ttl: float = 15.0
    resume_window: float = 30.0
    resume_queue_messages: int = 100
    resume_queue_bytes: int = 256 * 1024
    drain_spread: float = 5.0
    log_level: str = "info"
    log_format: str = "auto"
    log_file: str = ""
    certfile: str = ""
    keyfile: str = ""
    no_default_room: bool = False
    max_rooms_per_peer: int = 8
    max_peers_per_room: int = 0
    max_meta_size: int = 1024
    max_message_size: int = 64 * 1024
    max_send_buffer: int = 1024 * 1024
    max_header_size: int = 8 * 1024
    rate_limit: float = 50.0
    rate_burst: float = 200.0
    rate_limit_bytes: int = 128 * 1024
    rate_burst_bytes: int = 512 * 1024
    slow_reader_timeout: float = 5.0
    max_connections: int = 20000
    max_pending_connections: int = 1024
    max_connections_per_ip: int = 64
    max_connect_rate: float = 20.0
    max_connect_burst: float = 40.0
    metrics_max_types: int = 64
    allowed_origins: tuple[str, ...] = ()
    require_origin: bool = False
    trusted_proxies: tuple[Any, ...] = field(default_factory=lambda: _networks(LOOPBACK))
    auth: str = "none"
    jwt_secret: str = ""
    jwt_secret_file: str = ""
    jwt_public_key_file: tuple[str, ...] = ()
    jwt_audience: str = ""
    jwt_issuer: str = ""
    auth_fail_limit: int = 10
    admin_token: str = ""
    admin_token_file: str = ""
    turn_secret: str = ""
    turn_urls: tuple[str, ...] = ()
    turn_ttl: int = 3600
    stun_urls: tuple[str, ...] = ()

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        if self.auth == "jwt" and not (
            self.jwt_secret or self.jwt_secret_file or self.jwt_public_key_file
        ):
            raise ConfigError(
                "auth: 'jwt' needs --jwt-secret, --jwt-secret-file or --jwt-public-key-file"
            )
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("certfile/keyfile: give both or neither")
        if self.rate_burst_bytes < self.max_message_size:
            raise ConfigError(
                "rate_burst_bytes: must be at least max_message_size "
                f"({self.max_message_size}), or the largest messages could never pass"
            )
        if self.workers > 1 and not self.broker:
            raise ConfigError(
                "workers: more than 1 worker needs --broker redis://... to share rooms"
            )
        if self.turn_urls and not self.turn_secret:
            raise ConfigError("turn_urls: needs --turn-secret")
        if self.admin_token and self.admin_token_file:
            raise ConfigError("admin_token: give --admin-token or --admin-token-file, not both")


def _parse_one(s: Setting, raw: Any, source: str) -> Any:
    try:
        return s.parse(raw)
    except (ValueError, TypeError):
        allowed = getattr(s.parse, "allowed", "a valid value")
        raise ConfigError(
            f"{s.name} ({source}): invalid value {raw!r}; expected {allowed}"
        ) from None


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file: str | None = None,
) -> Config:
    """Merge the sources (flag > env > file > default) into a validated ``Config``."""
    env = os.environ if env is None else env
    flags = flags or {}
    values: dict[str, Any] = {}
    file = file or env.get("RTCSIGNAL_CONFIG") or None
    if file:
        try:
            with open(file, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config: cannot read {file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {file} is not valid TOML: {exc}") from None
        if isinstance(data.get("rtcsignal"), dict):  # all under [rtcsignal], or none
            stray = next((k for k in data if k != "rtcsignal"), None)
            if stray is not None:
                raise ConfigError(f"config: unknown setting {stray!r} in {file}: with a "
                                  "[rtcsignal] table, every setting goes in it")
            data = data["rtcsignal"]
        for key, raw in data.items():
            s = BY_NAME.get(key.replace("-", "_"))
            if s is None:
                close = difflib.get_close_matches(key.replace("-", "_"), BY_NAME, 1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"config: unknown setting {key!r} in {file}{hint}")
            values[s.name] = _parse_one(s, raw, f"file {file}")
    for s in SETTINGS:
        if s.env in env:
            values[s.name] = _parse_one(s, env[s.env], f"env {s.env}")
    for name, raw in flags.items():
        if raw is None:
            continue
        s = BY_NAME[name]
        values[name] = _parse_one(s, raw, f"flag {s.flag}")
    return Config(**values)
