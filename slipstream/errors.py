"""Exception types: part of the public interface.

Every error a caller can provoke has its own type so that the CLI and the server can map
it to a message or a status code in one place.
"""

from __future__ import annotations


class SlipstreamError(Exception):
    """Base class of every error slipstream raises on purpose."""


class InputError(SlipstreamError, ValueError):
    """A request's input is invalid (empty, too long, token id out of range, bad option).

    ``param`` names the offending field where there is one, so the server can report it.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelLoadError(SlipstreamError):
    """A model folder or one of its files is missing or inconsistent."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture / model_type is not one slipstream implements."""


class ConfigError(SlipstreamError, ValueError):
    """An engine setting is invalid (unknown dtype, device, backend, ...)."""
