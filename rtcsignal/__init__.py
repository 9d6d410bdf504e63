"""rtcsignal: a fast, safe WebSocket signaling server for WebRTC.

The public names are imported lazily, so ``import rtcsignal.protocol.frames`` (or any other
pure module) does not pull in asyncio, ssl, PyJWT or cryptography.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rtcsignal.config import Config, ConfigError, load_config
    from rtcsignal.core.hub import Peer
    from rtcsignal.server.service import SignalingService, serve

__all__ = ["Config", "ConfigError", "Peer", "SignalingService", "load_config", "serve"]
__version__ = "0.1.0"

_HOMES = {
    "Config": "rtcsignal.config",
    "ConfigError": "rtcsignal.config",
    "load_config": "rtcsignal.config",
    "Peer": "rtcsignal.core.hub",
    "SignalingService": "rtcsignal.server.service",
    "serve": "rtcsignal.server.service",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'rtcsignal' has no attribute {name!r}")
    return getattr(import_module(home), name)
