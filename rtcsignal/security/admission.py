"""Who may connect: every check that runs before the WebSocket upgrade completes.

STUB — to be replaced by the full implementation (origins, JWT, per-address limits,
failed-auth throttling, trusted proxies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rtcsignal.config import Config
from rtcsignal.protocol.http import HttpError, Request


@dataclass(slots=True)
class Admitted:
    """What the checks learned about an accepted client."""

    client_ip: str
    user: str | None = None  # JWT sub, shown to others as meta.user
    rooms: tuple[str, ...] | None = None  # JWT rooms claim: names or prefix* patterns; None = any
    meta: dict[str, Any] | None = None  # JWT meta claim: overrides client-sent meta


class Admission:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.open = 0

    def client_address(self, request: Request, peer_ip: str) -> str:
        return peer_ip

    def admit(self, request: Request, peer_ip: str, now: float) -> Admitted:
        """Raise HttpError (401/403/429/503 with a short reason) or return Admitted."""
        if self.open >= self.config.max_connections:
            raise HttpError(503, "server full", {"Retry-After": "5"})
        self.open += 1
        return Admitted(client_ip=peer_ip)

    def release(self, admitted: Admitted) -> None:
        """The admitted connection has closed."""
        self.open -= 1

    def authenticate(self, request: Request, peer_ip: str, now: float) -> Admitted:
        """Token check only (for GET /ice-servers); raises HttpError(401/429)."""
        return Admitted(client_ip=peer_ip)

    def warnings(self) -> list[str]:
        """Start-up warnings, e.g. a public listener with no origin allow-list."""
        return []


def room_allowed(patterns: tuple[str, ...] | None, room: str) -> bool:
    """A token's rooms claim: exact names or 'prefix*' patterns; None allows every room."""
    if patterns is None:
        return True
    return any(room.startswith(p[:-1]) if p.endswith("*") else room == p for p in patterns)
