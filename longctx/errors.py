"""Errors a user can act on.

Every exception derived from `LongctxError` carries a one-line message that names what was wrong;
the CLI and the server print that line (no traceback) and exit or answer with an error status.
"""


class LongctxError(Exception):
    """Base class: an error caused by input, configuration or resources, not by a bug."""


class ConfigError(LongctxError, ValueError):
    """A configuration value (model config, engine option, DCA settings) is invalid."""


class ModelLoadError(LongctxError):
    """A checkpoint path is missing, unreadable, corrupt or of an unsupported architecture."""


class PromptTooLongError(LongctxError, ValueError):
    """A prompt (plus the tokens to generate) does not fit the configured context length."""


class OutOfKVMemoryError(LongctxError):
    """A request needs more KV-cache blocks than the cache will ever have."""


class SamplingParamsError(LongctxError, ValueError):
    """A sampling parameter is out of its valid range."""


class SavedKVError(LongctxError):
    """Saved KV on disk is missing, truncated, corrupt, or was made with another model or other
    settings than the engine loading it."""
