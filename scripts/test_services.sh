#!/usr/bin/env bash
# The system services some tests use, installed by `make test` itself where it can (root on a
# Debian/Ubuntu machine: CI, a fresh container): Prometheus + promtool for the scrape tests,
# libb64 for stock perf_analyzer's, and GStreamer's RTSP server (run by Debian's own Python,
# tests/client/rtsp_camera.py) for the RTSP camera test. Elsewhere it says what to install, and those tests skip with the same hint.
set -uo pipefail
can_install=0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then can_install=1; fi
updated=0
apt_install() {
  if [ "$updated" = 0 ]; then apt-get update -qq >/dev/null 2>&1 || true; updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1
}

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  if [ "$can_install" = 1 ]; then
    echo "installing prometheus + promtool (Debian package) for the scrape tests"
    apt_install prometheus || echo "warning: could not install prometheus; its tests will be skipped"
  else
    echo "note: the Prometheus scrape tests will be skipped: apt-get install prometheus (as root)"
  fi
fi

# libb64, which stock perf_analyzer (fetched from PyPI by the test that runs it) links.
if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
  if [ "$can_install" = 1 ]; then
    echo "installing libb64 (Debian package) for the perf_analyzer test"
    apt_install libb64-0d || echo "warning: could not install libb64-0d; the perf_analyzer test will be skipped"
  else
    echo "note: the perf_analyzer test will be skipped: apt-get install libb64-0d (as root)"
  fi
fi

rtsp_probe="import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0')
from gi.repository import Gst; Gst.init(None); assert Gst.ElementFactory.find('x264enc')"
rtsp_pkgs=(gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-base
           gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly)
if ! /usr/bin/python3 -c "$rtsp_probe" >/dev/null 2>&1; then
  if [ "$can_install" = 1 ]; then
    echo "installing the GStreamer RTSP server (Debian packages) for the RTSP camera test"
    apt_install "${rtsp_pkgs[@]}" \
      || echo "warning: could not install the GStreamer RTSP server; the RTSP camera test will be skipped"
  else
    echo "note: the RTSP camera test will be skipped: apt-get install ${rtsp_pkgs[*]} (as root)"
  fi
fi
exit 0
