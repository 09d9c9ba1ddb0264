"""Request errors the pipeline raises; the server turns each into its gRPC status (server.py)."""

from __future__ import annotations


class RequestError(Exception):
    """Base: `code` is the gRPC status name the client sees."""

    code = "INTERNAL"


class InvalidArgument(RequestError):
    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field


class Unauthenticated(RequestError):
    code = "UNAUTHENTICATED"


class PermissionDenied(RequestError):
    code = "PERMISSION_DENIED"


class NotFound(RequestError):
    """A name the request gives (a model, a task) does not exist; the message lists what does."""

    code = "NOT_FOUND"


class Unavailable(RequestError):
    code = "UNAVAILABLE"


class FailedPrecondition(RequestError):
    code = "FAILED_PRECONDITION"


class AlreadyExists(RequestError):
    code = "ALREADY_EXISTS"


class Aborted(RequestError):
    code = "ABORTED"


class Overloaded(RequestError):
    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
