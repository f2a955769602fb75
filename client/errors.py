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


# What gRPC says (on either side) of a message over the receiver's or sender's limit.
TOO_LARGE_MARK = "message larger than max"
TOO_LARGE_HINT = ("a frame this size needs a higher message limit on the server (--max-message-bytes) and in the "
                  "client, or shared memory")


def is_too_large(code: grpc.StatusCode | None, details: str | None) -> bool:
    """A message over a limit: sending the same frame again would fail the same way."""
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and TOO_LARGE_MARK in (details or "").lower()


# INTERNAL with this text is gRPC's own transport failing (a server gone mid-stream, seen by the
# asyncio client when a server shut down under it), not an answer of the server: the server
# answers its own internal errors "internal error (error id ...)".
CORE_TRANSPORT_MARK = "internal error from core"


def is_retryable(code: grpc.StatusCode | None, details: str | None = "") -> bool:
    """Whether a stream that failed with ``code`` (and ``details``) is worth reconnecting."""
    if code == grpc.StatusCode.INTERNAL:
        return CORE_TRANSPORT_MARK in (details or "").lower()
    return code in RETRYABLE and not is_too_large(code, details)


def is_retryable_unary(code: grpc.StatusCode | None, details: str | None = "") -> bool:
    """Whether a unary call that failed with ``code`` is worth repeating on the next server.

    A frame's own deadline passing is an answer, not a reason to retry.
    """
    return is_retryable(code, details) and code != grpc.StatusCode.DEADLINE_EXCEEDED


def translate(exc: grpc.RpcError, address: str) -> PerceptionError:
    """A one-line project error for a failed call to ``address``."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    details = details.splitlines()[0] if details else ""
    name = code.name if code is not None else "UNKNOWN"
    text = f"server {address}: {name}" + (f": {details}" if details else "")
    if code == grpc.StatusCode.UNAVAILABLE or code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return NotReadyError(text)
    if is_too_large(code, details):
        return InvalidInputError(f"{text} ({TOO_LARGE_HINT})")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OverloadedError(text)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthError(text)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInputError(text)
    return PerceptionError(text)
