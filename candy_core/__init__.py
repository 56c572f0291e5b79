"""Candy protocol core: pure, sans-IO (bytes, time and randomness in; bytes and events out)."""

from candy_core.config import ClientConfig, ConfigError, ServerConfig
from candy_core.messages import ProtocolError
from candy_core.server import RelayServer

__all__ = ["ClientConfig", "ConfigError", "ProtocolError", "RelayServer", "ServerConfig"]
