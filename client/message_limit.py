"""Whether a frame fits in one request the server will read.

gRPC refuses a message over the server's limit at its length prefix and ends the whole stream
(RESOURCE_EXHAUSTED), so a frame that is too large costs every frame in flight beside it, and
sending it again fails the same way. ``MessageLimit`` says, before a frame is sent, whether it
would be refused: against the client's own limit and, for a frame large enough that it might
matter, the server's (``GetModelInfo.max_message_bytes``, asked once and kept until ``forget``).
The question is one attempt of at most ``ASK_TIMEOUT_S``, asked by one thread while the others
go on with the client's own limit, and asked again ``RETRY_AFTER_S`` after a failure: a camera
must not stop sending while the server is away.

Used by the replay (the frame gets a NOT_SENT record) and the camera node (the frame is counted
``too_large`` and not sent).
"""

from __future__ import annotations

import logging
import threading
import time

from client.convert import RequestOptions, to_request
from client.detector_client import DetectorClient
from client.errors import TOO_LARGE_HINT
from client.frames import SourceFrame
from perception.errors import PerceptionError

log = logging.getLogger(__name__)

# A frame whose pixels or bytes pass this asks the server for its message limit (once): every
# usual encoded frame stays below it, and no server limit is lower unless set so on purpose.
CHECK_SERVER_LIMIT_FROM = 1024 * 1024
REQUEST_OVERHEAD = 4096  # ids, options and field headers around the frame's bytes, at most
ASK_TIMEOUT_S = 2.0  # a GetModelInfo answers in milliseconds; a server that does not is away
RETRY_AFTER_S = 10.0  # after a failed question; frames are checked against the client's limit meanwhile


class MessageLimit:
    """The largest request worth sending through ``client``; thread-safe."""

    def __init__(self, client: DetectorClient, options: RequestOptions | None = None) -> None:
        self._client = client
        self._options = options
        self._lock = threading.Lock()
        self._server: int | None = None  # the server's limit once known (0: not reported)
        self._asking = False
        self._retry_at = 0.0

    def refusal(self, frame: SourceFrame) -> str:
        """Why ``frame`` would be refused by the server or this client, or "" if it fits."""
        payload = len(frame.encoded) if frame.encoded is not None else len(frame.raw.data) if frame.raw else 0
        limit = self._client.config.max_message_bytes
        if payload > CHECK_SERVER_LIMIT_FROM:
            server = self._server_limit()
            limit = min(limit, server) if server else limit
        if payload + REQUEST_OVERHEAD <= limit:
            return ""
        size = to_request(frame, self._options).ByteSize()
        if size <= limit:
            return ""
        return f"the request is {size} bytes, over the message limit of {limit} bytes ({TOO_LARGE_HINT}); not sent"

    def forget(self) -> None:
        """Ask the server again at the next large frame (it may have restarted with another limit)."""
        with self._lock:
            self._server = None

    def _server_limit(self) -> int:
        """The server's limit, or 0 while it is not known (or not reported)."""
        with self._lock:
            if self._server is not None:
                return self._server
            if self._asking or time.monotonic() < self._retry_at:
                return 0
            self._asking = True
        server: int | None = None
        try:
            server = self._client.model_info(once=True, timeout=ASK_TIMEOUT_S).max_message_bytes
        except PerceptionError as exc:  # unknown for now: the stream finds out if it matters
            log.info("the server's message limit is unknown (%s); frames are checked against the client's "
                     "for %.0f s", exc, RETRY_AFTER_S)
        except Exception as exc:  # e.g. a channel closed at shutdown: asked again later, as above
            log.info("asking the server's message limit failed (%s: %s); asked again in %.0f s",
                     type(exc).__name__, exc, RETRY_AFTER_S)
        with self._lock:
            self._asking = False
            if server is None:
                self._retry_at = time.monotonic() + RETRY_AFTER_S
                return 0
            self._server = server
            return server
