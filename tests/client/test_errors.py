"""Which gRPC failures the client reconnects for."""

from __future__ import annotations

import grpc

from client.errors import is_retryable, is_retryable_unary


def test_a_server_gone_mid_stream_is_retried_its_own_internal_errors_are_not() -> None:
    # gRPC core's transport failure, as the asyncio client saw a server shut down under it
    # (a full test run once saw the async stream give up on it instead of reconnecting).
    assert is_retryable(grpc.StatusCode.INTERNAL, "Internal error from Core")
    assert not is_retryable(grpc.StatusCode.INTERNAL, "internal error (error id 0123456789ab); see the server log")
    assert is_retryable(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    assert not is_retryable(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (9 vs. 8)")
    assert not is_retryable(grpc.StatusCode.INVALID_ARGUMENT, "bad frame")
    assert not is_retryable_unary(grpc.StatusCode.DEADLINE_EXCEEDED, "")
