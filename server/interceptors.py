"""Cross-cutting concerns of every call: token auth, and exceptions -> status codes + metrics.

Servicers raise project exceptions; ``ErrorInterceptor`` maps them (server.errors) and counts
them per method and code. ``TokenAuthInterceptor`` demands ``authorization: Bearer <token>``
on every method except the health service (probes carry no credentials), and refuses a call
without it before its request is parsed.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from server.errors import status_for
from server.metrics_protocol import NULL_METRICS, Metrics

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _wrap_handler(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Callable[..., Any]], Callable[..., Any]],
    streaming: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped (unary- or stream-response aware)."""
    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kw)
    assert handler.stream_stream is not None  # grpc sets exactly one of the four behaviours
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kw)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions escaping a handler to status codes; counts errors; logs slow calls."""

    def __init__(self, metrics: Metrics = NULL_METRICS, prefix: str = "/perception.") -> None:
        self._metrics = metrics
        self._prefix = prefix

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        method = details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        short = method.rsplit("/", 1)[-1]

        def fail(exc: BaseException, context: grpc.ServicerContext) -> None:
            code, message = status_for(exc, method)
            self._metrics.grpc_error(short, code.name)
            context.abort(code, message)

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                t0 = time.perf_counter()
                try:
                    return behavior(request, context)
                except Exception as exc:
                    fail(exc, context)
                finally:
                    log.debug("%s took %.2f ms", short, (time.perf_counter() - t0) * 1e3)

            return run

        def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Iterable[Any]:
                try:
                    yield from behavior(request, context)
                except Exception as exc:
                    fail(exc, context)

            return run

        return _wrap_handler(handler, unary, streaming)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a valid bearer token with UNAUTHENTICATED (health is exempt)."""

    def __init__(self, tokens: Iterable[str], metrics: Metrics = NULL_METRICS) -> None:
        self._tokens = tuple(t.encode() for t in tokens)
        self._metrics = metrics

    def _authorized(self, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else str(value)
                scheme, _, token = text.partition(" ")
                if scheme.lower() != "bearer":
                    return False
                given = token.strip().encode()
                # Constant-time compare against every token: no timing oracle.
                return any([hmac.compare_digest(given, t) for t in self._tokens])
        return False

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith(HEALTH_PREFIX) or self._authorized(details.invocation_metadata):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        short = details.method.rsplit("/", 1)[-1]
        metrics = self._metrics

        def refuse(_requests: Any, context: grpc.ServicerContext) -> Any:
            metrics.grpc_error(short, grpc.StatusCode.UNAUTHENTICATED.name)
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid token: send metadata 'authorization: Bearer <token>'",
            )

        # A streaming handler whatever the method: gRPC runs it at once, without waiting for a
        # request message. Refused as a unary handler, a call that sent its headers and never a
        # message held a handler thread until the connection aged out (48 such calls without a
        # token made health checks time out; 10,000 grew the server by 185 MB). Nothing is read,
        # so nothing is parsed either (for a flooded request, the costliest thing before a handler).
        return grpc.stream_stream_rpc_method_handler(refuse)
