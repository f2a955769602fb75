"""systemd notify + watchdog for ``perception serve``, driven by the server's own signals.

    python sd_supervise.py [--health-timeout S] [--tls-ca CA] [--auth-token-file F] \
        -- perception serve --model ... --port ...

systemd runs this as the service's main process (``Type=notify``). It starts the server as a
child, passes its stderr through to the journal line by line, and speaks the sd_notify
protocol (a datagram to ``$NOTIFY_SOCKET``; no libsystemd needed):

* ``READY=1`` once the server logs its ready line (``ready grpc=HOST:PORT metrics=...``),
  i.e. after the model is loaded and warmed up and gRPC health says SERVING;
* ``WATCHDOG=1`` every ``$WATCHDOG_USEC / 2`` but only while a gRPC health check of that
  address answers SERVING within the timeout, so a wedged server (handler threads stuck,
  health NOT_SERVING) stops the pings and systemd restarts it after ``WatchdogSec``. With
  ``--tls-ca`` the check speaks TLS and verifies the server against that CA (health needs no
  bearer token: the server exempts it);
* ``STOPPING=1`` on SIGTERM, which is forwarded to the server (it answers in-flight frames
  and exits 0 within its grace period); the supervisor exits with the server's exit code.

* SIGHUP is passed on to the server, which reloads its model (``systemctl reload``,
  ``ExecReload=``); the supervisor's default action would have ended it, and the service.

``--auth-token-file F`` is appended to the server command as ``--auth-token-file F``. The unit
no longer uses it: its server command names every credential path itself
(``--auth-token-file ${CREDENTIALS_DIRECTORY}/tokens``); the option stays for units written
with it.

Without ``$NOTIFY_SOCKET`` (run by hand, in a container) it simply execs the command.
Dependencies: the standard library, and grpcio + grpcio-health-checking for the check
(both in the runtime's ``server`` extra).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

logger = logging.getLogger("perception.sd_supervise")

READY_RE = re.compile(r"ready grpc=(?P<host>\[[^\]]+\]|[^\s:]+):(?P<port>\d+) metrics=")


def notify(message: str, socket_path: str | None = None) -> bool:
    """Send one sd_notify datagram; returns False when there is no socket to send to."""
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # '@' = abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)
    return True


def health_serving(address: str, timeout_s: float, tls_ca: bytes | None = None, server_name: str = "") -> bool:
    """True iff the gRPC health service at ``address`` answers SERVING within ``timeout_s``.

    ``tls_ca`` (PEM): speak TLS and verify the server's certificate against it, for the name
    ``server_name`` (default: the host of ``address``).
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls_ca is None:
        channel = grpc.insecure_channel(address)
    else:
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca), options=options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _local_address(host: str, port: str) -> str:
    """The ready line names the bind address; check it from this host over loopback."""
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """Half of systemd's WatchdogSec (from ``$WATCHDOG_USEC``), or None when it is off or not ours."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd_supervise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--health-timeout", type=float, default=3.0, help="seconds per health check")
    parser.add_argument("--tls-ca", help="CA certificate (PEM): health checks speak TLS and verify the server")
    parser.add_argument("--tls-server-name", default="", help="name the server certificate is checked for")
    parser.add_argument("--auth-token-file", help="appended to the server command as --auth-token-file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the server command line")
    return parser


def supervise(
    command: Sequence[str], health_timeout_s: float, tls_ca: bytes | None = None, server_name: str = ""
) -> int:
    """Run ``command`` under the sd_notify protocol; returns its exit code."""
    # The supervisor is systemd's main PID and speaks for the server (NotifyAccess=main).
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    child = subprocess.Popen(list(command), stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
    address: list[str] = []  # set once by the reader thread
    ready = threading.Event()
    stopping = threading.Event()

    def pump_stderr() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            match = READY_RE.search(line)
            if match and not ready.is_set():
                address.append(_local_address(match["host"], match["port"]))
                notify(f"READY=1\nSTATUS=serving {address[0]}")
                ready.set()

    def forward(signum: int, _frame: object) -> None:
        stopping.set()
        notify("STOPPING=1")
        child.send_signal(signum)

    def reload(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, reload)
    reader = threading.Thread(target=pump_stderr, name="stderr-pump", daemon=True)
    reader.start()

    interval = watchdog_interval_s()
    while child.poll() is None:
        try:
            child.wait(timeout=interval if interval else 1.0)
        except subprocess.TimeoutExpired:
            pass
        if interval and ready.is_set() and not stopping.is_set() and child.poll() is None:
            if health_serving(address[0], health_timeout_s, tls_ca, server_name):
                notify("WATCHDOG=1")
            else:
                logger.warning("health check of %s failed: watchdog not fed", address[0])
    reader.join(timeout=5.0)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("sd_supervise: no command given (usage: sd_supervise.py -- perception serve ...)", file=sys.stderr)
        return 2
    if args.auth_token_file:
        command = [*command, "--auth-token-file", args.auth_token_file]
    tls_ca = None
    if args.tls_ca:
        try:
            with open(args.tls_ca, "rb") as f:
                tls_ca = f.read()
        except OSError as exc:
            print(f"sd_supervise: cannot read --tls-ca: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not os.environ.get("NOTIFY_SOCKET"):
        os.execvp(command[0], command)  # nothing to speak to: be the server
    return supervise(command, args.health_timeout, tls_ca, args.tls_server_name)


if __name__ == "__main__":
    sys.exit(main())
