"""What the server's components record, as a Protocol, and the null recorder.

Components take a ``Metrics`` and call it unconditionally; a server started without a
Prometheus registry gets ``NULL_METRICS``, so no component checks ``is None``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from perception.manifest import Manifest


class Metrics(Protocol):
    def observe_stage(self, stage: str, seconds: float) -> None: ...
    def frame_received(self, camera_id: str) -> None: ...
    def frame_answered(self, camera_id: str) -> None: ...
    def frame_dropped(self, camera_id: str, reason: str) -> None: ...
    def detections_emitted(self, class_name: str, count: int) -> None: ...
    def grpc_error(self, method: str, code_name: str) -> None: ...
    def stream_opened(self) -> None: ...
    def stream_closed(self) -> None: ...
    def set_queue_depth(self, n: int) -> None: ...
    def observe_batch(self, size: int) -> None: ...
    def set_model_info(self, manifest: Manifest, variant_name: str, backend_name: str,
                       loaded_at: float | None = None) -> None: ...
    def lifecycle_event(self, event: str) -> None: ...
    def observe_priority(self, priority: int, seconds: float) -> None: ...
    def set_degraded(self, degraded: bool) -> None: ...


class NullMetrics:
    """Records nothing."""

    def observe_stage(self, stage: str, seconds: float) -> None:
        pass

    def frame_received(self, camera_id: str) -> None:
        pass

    def frame_answered(self, camera_id: str) -> None:
        pass

    def frame_dropped(self, camera_id: str, reason: str) -> None:
        pass

    def detections_emitted(self, class_name: str, count: int) -> None:
        pass

    def grpc_error(self, method: str, code_name: str) -> None:
        pass

    def stream_opened(self) -> None:
        pass

    def stream_closed(self) -> None:
        pass

    def set_queue_depth(self, n: int) -> None:
        pass

    def observe_batch(self, size: int) -> None:
        pass

    def set_model_info(self, manifest: Manifest, variant_name: str, backend_name: str,
                       loaded_at: float | None = None) -> None:
        pass

    def lifecycle_event(self, event: str) -> None:
        pass

    def observe_priority(self, priority: int, seconds: float) -> None:
        pass

    def set_degraded(self, degraded: bool) -> None:
        pass


NULL_METRICS: Metrics = NullMetrics()
