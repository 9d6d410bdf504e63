"""TURN REST credentials (coturn use-auth-secret). STUB."""

from __future__ import annotations

from typing import Any

from rtcsignal.config import Config


def ice_servers(config: Config, peer_id: str, now: float) -> list[dict[str, Any]]:
    return []
