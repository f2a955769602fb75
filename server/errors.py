"""Exceptions -> gRPC status codes, in one place.

InvalidInputError -> INVALID_ARGUMENT, NotReadyError -> UNAVAILABLE, OverloadedError ->
RESOURCE_EXHAUSTED, AuthError -> UNAUTHENTICATED; anything else -> INTERNAL, with the
traceback logged (the client gets a one-line message, never the traceback). Two refinements
the KServe front door answers as Triton does: NotFoundError (an unknown model) -> NOT_FOUND,
DeadlineError (a frame past its deadline) -> DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import logging
import uuid

import grpc

from perception.errors import AuthError, InvalidInputError, NotReadyError, OverloadedError, RefusedError

log = logging.getLogger(__name__)


class NotFoundError(InvalidInputError):
    """What a request names (a model, a version) is not served: NOT_FOUND."""


class DeadlineError(OverloadedError):
    """The answer could not come before the request's deadline: DEADLINE_EXCEEDED."""


_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (DeadlineError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (RefusedError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(exc: BaseException, method: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised while serving ``method``."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc) or cls.__name__
    # Internal details stay in the log; the client gets an id to quote that finds them there.
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error in %s (error id %s)", method or "a call", error_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (error id {error_id}); see the server log"
