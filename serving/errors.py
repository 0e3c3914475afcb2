"""The one place where failures are given an HTTP status and a user-facing message."""

from __future__ import annotations


class ServingError(Exception):
    """An error with an HTTP status and a message that tells the client what to do."""

    status_code = 500
    error_type = "InternalServerError"

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class ConfigError(ServingError):
    """Start-up configuration is invalid; the server refuses to start."""

    error_type = "ConfigError"


class BadRequest(ServingError):
    status_code = 400
    error_type = "BadRequestException"


class NotFound(ServingError):
    status_code = 404
    error_type = "ResourceNotFoundException"


class QueueFull(ServingError):
    """The bounded job queue is full: refuse at once rather than queue without limit."""

    status_code = 503
    error_type = "WlmCapacityException"


class WorkerDied(ServingError):
    """The model worker process died while holding this request."""

    status_code = 500
    error_type = "WorkerDiedException"


class PredictTimeout(ServingError):
    status_code = 504
    error_type = "PredictTimeoutException"


class ShuttingDown(ServingError):
    status_code = 503
    error_type = "WlmShutdownException"
