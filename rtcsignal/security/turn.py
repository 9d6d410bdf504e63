"""TURN REST credentials (coturn ``use-auth-secret``, draft-uberti-behave-turn-rest).

The server and coturn share a secret; we hand each peer a short-lived username
``<expiry>:<peerId>`` and its HMAC-SHA1 under that secret. coturn recomputes the HMAC, so it
needs no user database, and a leaked credential stops working at ``expiry``. The secret
itself never leaves this function.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

from rtcsignal.config import Config


def credential(secret: str, username: str) -> str:
    """base64(HMAC-SHA1(secret, username)), the password coturn expects for ``username``."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def ice_servers(config: Config, peer_id: str, now: float | None = None) -> list[dict[str, Any]]:
    """The RTCIceServer list for one peer.

    ``now`` is wall-clock seconds since the epoch (``time.time()``, default), not a monotonic
    reading: coturn compares the expiry with its own clock.
    """
    servers: list[dict[str, Any]] = []
    if config.stun_urls:
        servers.append({"urls": list(config.stun_urls)})
    if config.turn_secret and config.turn_urls:
        wall = time.time() if now is None else now
        username = f"{int(wall) + config.turn_ttl}:{peer_id}"
        servers.append(
            {
                "urls": list(config.turn_urls),
                "username": username,
                "credential": credential(config.turn_secret, username),
            }
        )
    return servers
