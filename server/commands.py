"""The server's sub-commands of ``perception`` (registered through the ``perception.commands``
entry point; each module is imported only when its command runs)."""

from perception.cli import Command

COMMANDS = (
    Command("serve", "server.cli", "serve a manifest's engine over gRPC", 20),
    Command(
        "verify-engine", "server.verify_cli", "check an engine's detections against its ONNX model on this device", 21
    ),
    Command("health", "server.health_cli", "ask a server's gRPC health service whether it is SERVING", 22),
)
