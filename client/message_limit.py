"""Whether a frame fits in one request the server will read.

gRPC refuses a message over the server's limit at its length prefix and ends the whole stream
(RESOURCE_EXHAUSTED), so a frame that is too large costs every frame in flight beside it, and
sending it again fails the same way. ``MessageLimit`` says, before a frame is sent, whether it
would be refused: against the client's own limit and, for a frame large enough that it might
matter, the server's (``GetModelInfo.max_message_bytes``, asked once and kept until ``forget``).

Used by the replay (the frame gets a NOT_SENT record) and the camera node (the frame is counted
``too_large`` and not sent).
"""

from __future__ import annotations

import logging
import threading

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


class MessageLimit:
    """The largest request worth sending through ``client``; thread-safe."""

    def __init__(self, client: DetectorClient, options: RequestOptions | None = None) -> None:
        self._client = client
        self._options = options
        self._lock = threading.Lock()
        self._server: int | None = None  # the server's limit once asked (0: not reported)

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
        with self._lock:
            if self._server is None:
                try:
                    self._server = self._client.model_info().max_message_bytes
                except PerceptionError as exc:  # unknown: the stream finds out if it matters
                    log.info("the server's message limit is unknown (%s); frames are checked against the client's",
                             exc)
                    self._server = 0
            return self._server
