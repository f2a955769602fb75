"""gRPC status -> project exception, in one place for the client side."""

from __future__ import annotations

import grpc

from perception.errors import AuthError, InvalidInputError, NotReadyError, OverloadedError, PerceptionError

# Worth reconnecting for: the server is restarting, draining, unreachable or hung.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNKNOWN,
    }
)


def is_retryable(code: grpc.StatusCode | None) -> bool:
    """Whether a stream that failed with ``code`` is worth reconnecting."""
    return code in RETRYABLE


def is_retryable_unary(code: grpc.StatusCode | None) -> bool:
    """Whether a unary call that failed with ``code`` is worth repeating on the next server.

    A frame's own deadline passing is an answer, not a reason to retry.
    """
    return is_retryable(code) and code != grpc.StatusCode.DEADLINE_EXCEEDED


def translate(exc: grpc.RpcError, address: str) -> PerceptionError:
    """A one-line project error for a failed call to ``address``."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    details = details.splitlines()[0] if details else ""
    name = code.name if code is not None else "UNKNOWN"
    text = f"server {address}: {name}" + (f": {details}" if details else "")
    if code == grpc.StatusCode.UNAVAILABLE or code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return NotReadyError(text)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OverloadedError(text)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthError(text)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInputError(text)
    return PerceptionError(text)
