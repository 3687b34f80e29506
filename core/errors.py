"""Typed errors that users see; `tokenmill.api` maps each to a status code and TGI's error body."""


class TokenmillError(Exception):
    """Base of every error tokenmill raises on purpose."""


class ValidationError(TokenmillError):
    """A request or setting is invalid; the message says what is allowed (HTTP 422)."""


class BackendUnavailableError(TokenmillError):
    """The requested backend cannot run here, or no backend can; the message says why."""


class GenerationError(TokenmillError):
    """The model step failed while this request was in flight (HTTP 424)."""
