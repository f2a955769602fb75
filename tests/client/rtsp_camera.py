"""An RTSP camera for the tests: GStreamer's RTSP server streaming an H.264 test pattern at
rtsp://127.0.0.1:PORT/cam. Runs under Debian's /usr/bin/python3 (python3-gi and the
GStreamer packages are Debian packages, not in the venv); prints the bound port on its first
line and serves until killed.

    /usr/bin/python3 tests/client/rtsp_camera.py [PORT]
"""

from __future__ import annotations

import sys

import gi  # type: ignore[import-not-found]  # Debian's python3-gi; this script never runs in the venv

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # type: ignore[import-not-found]  # as above  # noqa: E402

PIPELINE = (
    "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=96,height=64,framerate=25/1 "
    "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! rtph264pay name=pay0 pt=96 )"
)


def main() -> None:
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(sys.argv[1] if len(sys.argv) > 1 else "0")
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE)
    factory.set_shared(True)
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        sys.exit("cannot bind the RTSP port")
    print(server.get_bound_port(), flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
