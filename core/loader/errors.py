"""Why a model could not be loaded; each message names what was tried and what is accepted."""

from tokenmill.errors import TokenmillError


class ModelNotFoundError(TokenmillError):
    """No local folder, file or cached hub snapshot matches the model id."""


class UnsupportedCheckpointError(TokenmillError):
    """The checkpoint exists but tokenmill cannot read it (format, architecture, tensor names)."""
