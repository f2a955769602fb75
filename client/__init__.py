"""Camera-node client library and the replay tools. No torch; protobuf stops at convert.py.

- ``config``: ClientConfig (targets, TLS / mTLS, bearer token, window, deadlines, backoff).
- ``detector_client.DetectorClient`` (sync) and ``aio_client.AsyncDetectorClient`` (asyncio):
  unary Detect, GetModelInfo, and StreamDetect sessions (``stream.StreamSession``) with a
  bounded send window, per-frame deadlines, reconnect with exponential backoff + jitter
  (given up after a time bound) and re-send of unanswered frames, also of those a draining
  server refused, round-robin over several servers (``channels``). Both sessions share one set
  of window / re-send / backoff / give-up rules: ``resend_window.ResendWindow``.
- ``client_status``: the client-side statuses (NOT_SENT, GIVEN_UP, REFUSED_DRAINING) of frames
  the server never answered, apart from the server's FrameStatus.
- ``sources``: video files, image folders, MCAP, ROS 1 / ROS 2 bags -> ``frames.SourceFrame``;
  ``sources.registry`` picks the reader for a path.
- ``pacing``: recorded time / speed factor / max rate, skip, loop, cameras kept in sync.
- ``replay`` + ``replay_cli``: ``perception replay``, one record per frame read; ``sinks``: JSONL, COCO results,
  annotated video; ``summary``: the statistics and table; ``evaluation``: KPI with ``--gt``.
- ``compare`` + ``compare_cli``: ``perception compare`` of two replays.
"""
