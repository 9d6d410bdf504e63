"""Client address from the socket peer and X-Forwarded-For behind trusted proxies."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtcsignal.security.proxies import client_ip, is_loopback, limit_key, parse_ip

LOCAL = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
PROXIES = (*LOCAL, ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4 ", "1.2.3.4"),
        ("1.2.3.4:5678", "1.2.3.4"),
        ("::1", "::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80::1"),
    ],
)
def test_parse_ip(text: str, want: str) -> None:
    assert str(parse_ip(text)) == want


@pytest.mark.parametrize("text", ["", "unknown", "1.2.3", "[::1", "999.1.1.1", "a:b", "_hidden"])
def test_parse_ip_rejects(text: str) -> None:
    assert parse_ip(text) is None


def test_untrusted_peer_xff_is_ignored() -> None:
    assert client_ip("203.0.113.9", "1.1.1.1", LOCAL) == "203.0.113.9"


def test_no_trusted_proxies_means_peer() -> None:
    assert client_ip("127.0.0.1", "1.1.1.1", ()) == "127.0.0.1"


def test_trusted_peer_uses_nearest_untrusted_hop() -> None:
    # client forged "6.6.6.6"; our proxy appended the real address it saw
    assert client_ip("127.0.0.1", "6.6.6.6, 198.51.100.4", LOCAL) == "198.51.100.4"


def test_chain_of_trusted_proxies_is_skipped() -> None:
    xff = "6.6.6.6, 198.51.100.4, 10.1.2.3, 10.9.9.9"
    assert client_ip("127.0.0.1", xff, PROXIES) == "198.51.100.4"


def test_all_trusted_uses_leftmost() -> None:
    assert client_ip("127.0.0.1", "10.0.0.5, 10.0.0.6", PROXIES) == "10.0.0.5"


def test_unparsable_entry_stops_the_walk() -> None:
    # garbage right of the real hop: fall back to the last good (trusted) address, never
    # reach past it to the forgeable part of the header
    assert client_ip("127.0.0.1", "6.6.6.6, bogus", LOCAL) == "127.0.0.1"
    assert client_ip("127.0.0.1", "6.6.6.6, bogus, 10.0.0.1", PROXIES) == "10.0.0.1"
    assert client_ip("127.0.0.1", "unknown", LOCAL) == "127.0.0.1"
    assert client_ip("127.0.0.1", ",,,", LOCAL) == "127.0.0.1"


def test_xff_with_ports_and_ipv6() -> None:
    assert client_ip("::1", "[2001:db8::7]:5000", LOCAL) == "2001:db8::7"
    assert client_ip("127.0.0.1", "198.51.100.4:1234", LOCAL) == "198.51.100.4"


def test_mapped_peer_is_trusted_as_ipv4() -> None:
    assert client_ip("::ffff:127.0.0.1", "198.51.100.4", LOCAL) == "198.51.100.4"


def test_unparsable_peer_is_returned_verbatim() -> None:
    assert client_ip("", "1.2.3.4", LOCAL) == ""


def test_very_long_chain_is_cut() -> None:
    xff = ", ".join(["6.6.6.6"] + ["10.0.0.1"] * 100)
    assert client_ip("127.0.0.1", xff, PROXIES) == "10.0.0.1"


def test_is_loopback() -> None:
    assert is_loopback(parse_ip("127.0.0.2"))
    assert is_loopback(parse_ip("::1"))
    assert not is_loopback(parse_ip("10.0.0.1"))
    assert not is_loopback(None)


def test_limit_key_groups_ipv6_by_64() -> None:
    assert limit_key("2001:db8:1:2:aaaa::1") == limit_key("2001:db8:1:2:bbbb::9")
    assert limit_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert limit_key("2001:db8:1:3::1") != limit_key("2001:db8:1:2::1")
    assert limit_key("192.0.2.1") == "192.0.2.1"
    assert limit_key("") == ""


# --- properties

_trusted_ips = st.sampled_from(["10.0.0.1", "10.2.3.4", "127.0.0.1"])
_public_ips = st.ip_addresses(v=4).map(str).filter(lambda s: not s.startswith(("10.", "127.")))


@given(st.lists(st.one_of(_trusted_ips, _public_ips), min_size=1, max_size=12))
def test_result_is_rightmost_untrusted_hop(chain: list[str]) -> None:
    got = client_ip("127.0.0.1", ", ".join(chain), PROXIES)
    untrusted = [ip for ip in chain if not ip.startswith(("10.", "127."))]
    if untrusted:
        # the rightmost untrusted entry: nothing left of it can be chosen
        assert got == untrusted[-1]
    else:
        assert got == chain[0]


@given(st.lists(_public_ips, min_size=1, max_size=5), _public_ips)
def test_untrusted_peer_never_believes_xff(chain: list[str], peer: str) -> None:
    assert client_ip(peer, ", ".join(chain), PROXIES) == peer
