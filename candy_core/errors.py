"""The one error family of the core: catch :class:`CandyError` to catch them all.

- :class:`ProtocolError` (and its kinds :class:`FrameError`, :class:`StunError`): input from
  the network is malformed or unexpected. It is dropped or closes only the offending
  connection; it never takes a process down.
- :class:`ConfigError`: a configuration value is invalid; the message says which and why.

Each is also a :class:`ValueError`, as they were before the family existed.
"""

from __future__ import annotations

#: RFC 6455 close code for a protocol violation.
CLOSE_PROTOCOL_ERROR = 1002


class CandyError(Exception):
    """Base class of every error the Candy core raises on purpose."""


class ProtocolError(CandyError, ValueError):
    """A message or frame from the network is malformed; the text says what is wrong."""


class FrameError(ProtocolError):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, message: str, code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class StunError(ProtocolError):
    """A STUN message is malformed, truncated, unexpected or lacks an IPv4 address."""


class ConfigError(CandyError, ValueError):
    """A configuration value is invalid; the message says which and why."""
