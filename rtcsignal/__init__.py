"""rtcsignal: a fast, safe WebSocket signaling server for WebRTC."""

from rtcsignal.config import Config, ConfigError, load_config
from rtcsignal.core.hub import Peer
from rtcsignal.server.service import SignalingService, serve

__all__ = ["Config", "ConfigError", "Peer", "SignalingService", "load_config", "serve"]
__version__ = "0.1.0"
