"""What became of a frame the server never answered: the client-side statuses.

The server's statuses (perception.types.FrameStatus) describe an answer. These describe its
absence, decided by the client, so they are a vocabulary of their own; a replay JSONL writes
both in the same ``status`` field, a client status always with a ``reason``:

    {"camera_id": "front", "sequence": 41, "status": "GIVEN_UP", "reason": "server ...", ...}

Also here: how the client tells a *refusal* by a draining server (an OVERLOADED answer that
says the server is shutting down) from a real answer; such a frame is re-sent, not recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from client.frames import FrameResult, FrameStatus, SourceFrame

# The words a draining server answers a refused frame with: "server is shutting down; ..."
# (server/stream.py) or "the server is not accepting frames (starting or shutting down)"
# (server/scheduler.py). The wire has no status of its own for it, so the text is the signal.
DRAINING_MARK = "shutting down"


class ClientStatus(str, Enum):
    """Why a frame read from the source has no answer from the server. The value is the name
    written to the JSONL ``status`` field; none collides with a FrameStatus name."""

    # read, never sent: the replay stopped before it (server gone, Ctrl-C, ...), or it is over the
    # message limit (the server would refuse it unread and end the stream)
    NOT_SENT = "NOT_SENT"
    GIVEN_UP = "GIVEN_UP"  # sent, never answered: the client stopped reconnecting, or the replay stopped
    REFUSED_DRAINING = "REFUSED_DRAINING"  # refused by a draining server; not re-sent before the client gave up

    def __str__(self) -> str:
        return self.value


CLIENT_STATUS_NAMES = frozenset(s.value for s in ClientStatus)


def is_drain_refusal(result: FrameResult) -> bool:
    """Whether an answer is a draining server refusing the frame unprocessed (re-send it
    elsewhere or later), rather than a verdict on the frame."""
    return result.status is FrameStatus.OVERLOADED and DRAINING_MARK in result.message.lower()


@dataclass(frozen=True)
class Unanswered:
    """A frame without a server answer, and why. ``reason`` is one line for people."""

    camera_id: str
    sequence: int
    capture_timestamp_ns: int
    status: ClientStatus
    reason: str
    file_name: str = ""

    @classmethod
    def of(cls, frame: SourceFrame, status: ClientStatus, reason: str) -> Unanswered:
        return cls(frame.camera_id, frame.sequence, frame.timestamp_ns, status, reason, frame.file_name)

    def to_json_dict(self) -> dict[str, object]:
        """The JSONL record: the keys an answer's record starts with, ``status`` a client
        status, a ``reason`` and no detections."""
        d: dict[str, object] = {
            "camera_id": self.camera_id,
            "sequence": self.sequence,
            "capture_timestamp_ns": self.capture_timestamp_ns,
            "status": self.status.value,
            "reason": self.reason,
            "detections": [],
        }
        if self.file_name:
            d["file_name"] = self.file_name
        return d
