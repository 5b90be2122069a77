"""Errors whose message is meant for the user (CLI one-liners, UI and API messages)."""


class SparseVLMError(ValueError):
    """Base class: the message is shown to the user as is."""


class ConfigError(SparseVLMError):
    """A configuration the engine cannot run."""


class InputError(SparseVLMError):
    """A bad image or question."""


class ModelLoadError(SparseVLMError):
    """A model that cannot be loaded (missing folder, offline hub id, unsupported architecture)."""
