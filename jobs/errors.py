"""One error hierarchy for tuneloop, each error with a stable code.

The server maps codes to HTTP statuses in one place (server/errors.py); the
messages are written for the person who sent the request, and quote the value
at fault with what would have been accepted.
"""

from __future__ import annotations


class TuneloopError(Exception):
    """Base of every error tuneloop raises on purpose."""

    code = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "field": self.field}


class SpecInvalid(TuneloopError):
    """A job spec, or a part of one, is not acceptable."""

    code = "spec_invalid"


class DatasetInvalid(TuneloopError):
    """A dataset cannot be used: unreadable, empty, wrong columns, one class."""

    code = "dataset_invalid"


class PathRefused(TuneloopError):
    """A path points outside the data root, or does not exist there."""

    code = "path_refused"


class ModelUnavailable(TuneloopError):
    """A base model cannot be loaded: missing, unsafe, or only on an unreachable hub."""

    code = "model_unavailable"


class NotFound(TuneloopError):
    """A job, dataset, model or version does not exist."""

    code = "not_found"


class Conflict(TuneloopError):
    """The request clashes with the current state (a finished job cannot be cancelled)."""

    code = "conflict"


class TooLarge(TuneloopError):
    """A request body or upload is over its limit."""

    code = "too_large"


class Unauthorized(TuneloopError):
    """No valid token was presented."""

    code = "unauthorized"


class Forbidden(TuneloopError):
    """The token is valid but lacks the scope the route needs."""

    code = "forbidden"


class Overloaded(TuneloopError):
    """The service is at capacity; try again later."""

    code = "overloaded"


class MemoryLimitExceeded(TuneloopError):
    """A training worker's resident memory went over the job's ``limits.memory_mb``."""

    code = "memory_limit"


class UrlRefused(TuneloopError):
    """A URL to fetch from is refused: its scheme, or an address it resolves to."""

    code = "url_refused"
