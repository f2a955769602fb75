"""The client's sub-commands of ``perception`` (registered through the ``perception.commands``
entry point; each module is imported only when its command runs)."""

from perception.cli import Command

COMMANDS = (
    Command("replay", "client.replay_cli", "replay a recorded drive against a server", 30),
    Command(
        "compare", "client.compare_cli", "diff two replays of the same drive, frame by frame, with KPI side by side", 31
    ),
    Command(
        "camera", "client.camera_cli", "stream live cameras (V4L2, RTSP, HTTP) to a server, newest frame first", 32
    ),
)
