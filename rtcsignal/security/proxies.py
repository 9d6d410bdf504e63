"""Which address a connection comes from, and which key per-address limits count it under.

``X-Forwarded-For`` is written by whoever sent the request, so it is only believed when the
socket peer is a configured trusted proxy, and then only up to the nearest hop that is not
itself trusted: everything left of that hop was written by the client and may be forged.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_HOPS = 32  # X-Forwarded-For entries examined; a longer chain is not a real proxy chain


@lru_cache(maxsize=4096)  # ipaddress parsing is slow pure Python; addresses repeat
def parse_ip(text: str) -> IPAddress | None:
    """Parse an address as proxies write it (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``, ``::1``).

    IPv4-mapped IPv6 (``::ffff:1.2.3.4``, seen on dual-stack sockets) becomes the IPv4 address,
    so one client is one key whichever socket family accepted it. Returns None if unparsable.
    """
    s = text.strip()
    if s.startswith("["):
        s = s[1 : s.find("]")] if "]" in s else ""
    elif s.count(":") == 1:  # IPv4 with a port; bare IPv6 has two or more colons
        s = s.partition(":")[0]
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id:
            ip = ipaddress.IPv6Address(s.partition("%")[0])
    return ip


def is_trusted(ip: IPAddress | None, trusted: Iterable[IPNetwork]) -> bool:
    return ip is not None and any(ip.version == n.version and ip in n for n in trusted)


def is_loopback(ip: IPAddress | None) -> bool:
    return ip is not None and ip.is_loopback


def client_ip(peer_ip: str, forwarded_for: str, trusted: Iterable[IPNetwork]) -> str:
    """The client's address: the peer, or the nearest untrusted X-Forwarded-For hop.

    Walks the header from the right (the hop our trusted proxy appended) past trusted
    proxies. If the chain is all trusted, the leftmost address is used. An unparsable entry
    ends the walk at the last good address: we never skip over garbage to reach entries
    further left, which are the ones a client can forge.
    """
    trusted = tuple(trusted)
    peer = parse_ip(peer_ip)
    if not forwarded_for or not is_trusted(peer, trusted):
        return str(peer) if peer is not None else peer_ip
    current: IPAddress = peer  # type: ignore[assignment]  # is_trusted implies not None
    hops = forwarded_for.split(",")[-MAX_HOPS:]
    for entry in reversed(hops):
        ip = parse_ip(entry)
        if ip is None:
            break
        current = ip
        if not is_trusted(ip, trusted):
            break
    return str(current)


def limit_key(client: str) -> str:
    """The key per-address limits count under: the address, or its /64 for IPv6.

    One IPv6 subscriber is usually handed a whole /64 (2^64 addresses), so counting single
    IPv6 addresses would let one host sidestep every per-address limit.
    """
    ip = parse_ip(client)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return client
