"""Origin allow-list: exact origins, *, and subdomain wildcards."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtcsignal.config import ConfigError
from rtcsignal.security.origins import Origin, OriginPolicy, parse_origin


def test_parse_origin_normalises_case_and_default_port() -> None:
    assert parse_origin("HTTPS://App.Example.COM:443") == Origin("https", "app.example.com", "")
    assert parse_origin("http://example.com:80") == Origin("http", "example.com", "")
    assert parse_origin("http://example.com:8080") == Origin("http", "example.com", "8080")
    assert parse_origin("http://[::1]:3000") == Origin("http", "[::1]", "3000")


@pytest.mark.parametrize(
    "text",
    [
        "null",
        "",
        "example.com",
        "https://",
        "https://a.com/path",
        "https://u@a.com",
        "https://a.com:x",
        "https://a.com:99999",
        "https://[::1",
        "https://[::1]x",
        "1http://a.com",
    ],
)
def test_parse_origin_rejects_non_origins(text: str) -> None:
    assert parse_origin(text) is None


def test_empty_list_allows_everything() -> None:
    p = OriginPolicy(())
    assert p.allows("https://evil.example")
    assert p.allows("null")
    assert p.allows(None)


def test_star_allows_everything() -> None:
    p = OriginPolicy(("https://a.com", "*"))
    assert p.allows("https://whatever.org")


def test_exact_origin() -> None:
    p = OriginPolicy(("https://app.example.com",))
    assert p.allows("https://app.example.com")
    assert p.allows("https://APP.example.com:443")
    assert not p.allows("http://app.example.com")
    assert not p.allows("https://app.example.com:8443")
    assert not p.allows("https://app.example.com.evil.com")
    assert not p.allows("https://evil.com")
    assert not p.allows("null")
    assert not p.allows("garbage")


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        ("https://a.example.com", True),
        ("https://a.b.example.com", True),
        ("https://A.Example.Com", True),
        ("https://example.com", False),
        ("https://.example.com", False),
        ("https://example.com.evil.com", False),
        ("https://a.example.com.evil.com", False),
        ("https://evilexample.com", False),
        ("https://a.evilexample.com", False),
        ("http://a.example.com", False),
        ("https://a.example.com:8443", False),
        ("https://a.example.com:443", True),
    ],
)
def test_subdomain_wildcard(origin: str, ok: bool) -> None:
    p = OriginPolicy(("https://*.example.com",))
    assert p.allows(origin) is ok


def test_wildcard_with_port() -> None:
    p = OriginPolicy(("http://*.local.test:8080",))
    assert p.allows("http://x.local.test:8080")
    assert not p.allows("http://x.local.test")


def test_missing_origin_allowed_unless_required() -> None:
    assert OriginPolicy(("https://a.com",)).allows(None)
    assert OriginPolicy(("https://a.com",)).allows("")
    assert not OriginPolicy(("https://a.com",), require_origin=True).allows(None)
    assert not OriginPolicy((), require_origin=True).allows(None)
    assert OriginPolicy((), require_origin=True).allows("https://x.org")


@pytest.mark.parametrize("bad", ["example.com", "*.example.com", "https://a.com/x"])
def test_bad_pattern_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="allowed_origins"):
        OriginPolicy((bad,))


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@given(st.lists(_label, min_size=1, max_size=4))
def test_wildcard_matches_any_subdomain_depth(labels: list[str]) -> None:
    p = OriginPolicy(("https://*.example.com",))
    sub = ".".join(labels)
    assert p.allows(f"https://{sub}.example.com")
    assert not p.allows(f"https://example.com.{sub}")
    assert not p.allows(f"https://{sub}example.com")
    assert not p.allows(f"http://{sub}.example.com")
