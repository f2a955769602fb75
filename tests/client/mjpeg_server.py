"""A live HTTP MJPEG camera for the tests: multipart/x-mixed-replace JPEG frames, like an IP
camera's ``/video.mjpg``, from a thread on a loopback port. ``stop()`` closes every open
stream (the camera "goes away"); a new ``MjpegCamera(port=old.port)`` brings it back."""

from __future__ import annotations

import http.server
import threading
import time
from typing import Any

from tests.client import recordings as R

BOUNDARY = "frame"


class MjpegCamera:
    def __init__(self, port: int = 0, fps: float = 25.0) -> None:
        self.running = threading.Event()
        self.running.set()
        self.frames_served = 0
        jpegs = [R.jpeg(R.scene(i)) for i in range(8)]
        period = 1.0 / fps
        camera = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                i = 0
                try:
                    while camera.running.is_set():
                        data = jpegs[i % len(jpegs)]
                        head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
                        self.wfile.write(head.encode() + data + b"\r\n")
                        self.wfile.flush()
                        camera.frames_served += 1
                        i += 1
                        time.sleep(period)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, name: str = "video.mjpg") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Close the listening socket and end every stream being served."""
        self.running.clear()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
