"""Config precedence (flag > env > file > default) and validation on construction."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest

from perception.errors import ConfigError
from perception.v1 import detector_pb2 as pb
from server.config import MAX_DURATION_S, MAX_MESSAGE_BYTES, ServerConfig, load_config


def test_precedence_flag_env_file(tmp_path):
    f = tmp_path / "server.yaml"
    f.write_text("server:\n  model: from-file.json\n  max_batch: 2\n  port: 1000\n  cameras: [front, rear]\n")
    env = {"PERCEPTION_MAX_BATCH": "4", "PERCEPTION_PORT": "2000", "PERCEPTION_BUILD_ENGINE_ON_START": "yes"}
    cfg = load_config({"port": 3000, "max_wait_ms": None}, env=env, file=f)
    assert cfg.model == "from-file.json"  # file only
    assert cfg.max_batch == 4  # env beats file
    assert cfg.port == 3000  # flag beats env
    assert cfg.max_wait_ms == ServerConfig.__dataclass_fields__["max_wait_ms"].default  # None flag ignored
    assert cfg.cameras == ("front", "rear") and cfg.build_engine_on_start is True
    cfg2 = load_config({"model": "m.json", "backends": "onnxruntime-cpu"}, env={})
    assert cfg2.backends == ("onnxruntime-cpu",)


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"model": ""}, "no model"),
        ({"max_batch": 0}, "max_batch"),
        ({"port": 70000}, "port"),
        ({"backends": ("gpu-magic",)}, "backends"),
        ({"tls_cert": "/nonexistent.crt", "tls_key": "/nonexistent.key"}, "no such file"),
        ({"tls_cert": "x"}, "both"),
        ({"max_message_bytes": 1024}, "max_image_pixels"),
        ({"auth_tokens": ("has space",)}, "whitespace"),
        ({"log_format": "xml"}, "log_format"),
    ],
)
def test_invalid_values_are_refused_with_a_message(kw, needle):
    args = {"model": "m.json", **kw}
    with pytest.raises(ConfigError, match=needle):
        ServerConfig(**args)


def test_bad_file_and_env(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("max_bach: 3\n")
    with pytest.raises(ConfigError, match="unknown settings"):
        load_config({"model": "m"}, env={}, file=f)
    with pytest.raises(ConfigError, match="int expected"):
        load_config({"model": "m"}, env={"PERCEPTION_MAX_BATCH": "many"})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config({"model": "m"}, env={}, file=tmp_path / "missing.yaml")


def test_max_camera_labels_default_and_validation():
    assert ServerConfig(model="m.json").max_camera_labels == 32
    with pytest.raises(ConfigError, match="max_camera_labels"):
        ServerConfig(model="m.json", max_camera_labels=-1)


def test_every_serve_flag_is_a_setting_and_the_documented_ones_exist():
    """Each `perception serve` flag sets the setting of its name; the flags the docs name for
    the unary handler threads and the probation error rate exist (they were documented while
    only the config file and PERCEPTION_* could set them)."""
    from server.cli import _flags, build_parser

    args = build_parser().parse_args(["--model", "m.json", "--max-workers", "3", "--probation-max-error-rate", "0.5"])
    cfg = load_config(_flags(args), env={})
    assert cfg.max_workers == 3 and cfg.probation_max_error_rate == 0.5
    fields = set(ServerConfig.__dataclass_fields__)
    # --admin-token-file is read into the admin_tokens setting
    dests = {a.dest for a in build_parser()._actions if a.dest not in ("help", "config", "admin_token_file")}
    assert dests <= fields, sorted(dests - fields)


# --- bearer tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [("",), (" ",), ("a b",), (None,)])
@pytest.mark.parametrize("name", ["auth_tokens", "admin_tokens"])
def test_tokens_are_non_empty_text_without_whitespace(name, tokens):
    """The admin tokens get the client tokens' checks: `admin_tokens: [""]` used to open the
    admin service (LoadModel, Rollback) to `authorization: Bearer ` with nothing after it."""
    with pytest.raises(ConfigError, match=f"{name}: every token must be a non-empty string without whitespace"):
        ServerConfig(model="m.json", insecure_token=True, **{name: tokens})


@pytest.mark.parametrize("text", ["admin_tokens: ['']\n", "admin_tokens: [~]\n", "admin_tokens: [0123]\n"])
def test_yaml_admin_tokens_that_are_not_text_are_refused(tmp_path, text):
    """`admin_tokens: [~]` used to become the guessable token "None", and [0123] the token "83"."""
    f = tmp_path / "server.yaml"
    f.write_text("model: m.json\nadmin_port: 0\n" + text)
    with pytest.raises(ConfigError, match="admin_tokens"):
        load_config({}, env={}, file=f)


def test_a_token_that_is_not_text_is_not_quoted_in_the_error(tmp_path):
    """The error goes to stderr and the journal: "list items must be text, got 84736251" showed
    the secret."""
    f = tmp_path / "server.yaml"
    f.write_text("model: m.json\nadmin_port: 0\nadmin_tokens: [84736251]\nauth_tokens: 84736252\n")
    with pytest.raises(ConfigError, match="admin_tokens") as err:
        load_config({}, env={}, file=f)
    assert "84736251" not in str(err.value) and "not shown" in str(err.value)
    f.write_text("model: m.json\nauth_tokens: 84736252\n")
    with pytest.raises(ConfigError, match="auth_tokens") as err:
        load_config({}, env={}, file=f)
    assert "84736252" not in str(err.value) and "not shown" in str(err.value)


def test_a_thermal_signal_needs_its_limit_and_degrade_auto(tmp_path):
    """Without a limit every reading counted as hot (degraded to the fastest variant within two
    windows, for good); without degrade auto the signal was read by nothing, silently."""
    zone = tmp_path / "temp"
    zone.write_text("45000\n")
    with pytest.raises(ConfigError, match="thermal_path needs thermal_limit"):
        ServerConfig(model="m.json", degrade="auto", thermal_path=str(zone))
    with pytest.raises(ConfigError, match="only with degrade auto"):
        ServerConfig(model="m.json", thermal_path=str(zone), thermal_limit=85000.0)
    ServerConfig(model="m.json", degrade="auto", thermal_path=str(zone), thermal_limit=85000.0)


def test_admin_tokens_must_not_be_client_tokens(tmp_path):
    """docs/lifecycle.md: the admin service has its own tokens. One file for both made every
    camera an admin; the overlap is refused however the client tokens are given."""
    tokens = tmp_path / "tokens"
    tokens.write_text("camera-token\nshared-token\n")
    for client in ({"auth_tokens": ("shared-token",)}, {"auth_token_file": str(tokens)}):
        with pytest.raises(ConfigError, match="admin_tokens must differ from auth_tokens"):
            ServerConfig(model="m.json", insecure_token=True, admin_port=0, admin_tokens=("shared-token",), **client)
    assert ServerConfig(model="m.json", insecure_token=True, admin_port=0, admin_tokens=("admin-token",),
                        auth_token_file=str(tokens)).auth_tokens == ("camera-token", "shared-token")


def test_admin_port_must_not_be_the_grpc_port():
    """With reuse_port both servers bound it and the kernel spread connections across them: a
    quarter of Detector calls were answered UNIMPLEMENTED by the admin service."""
    with pytest.raises(ConfigError, match="admin_port must differ from port"):
        ServerConfig(model="m.json", port=50051, admin_port=50051, admin_tokens=("adm1n",), reuse_port=True)


# --- numbers that pass a range check but not gRPC ------------------------------------------------

FLOAT_SETTINGS = [f.name for f in dataclasses.fields(ServerConfig) if isinstance(f.default, float)]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_every_float_setting_is_finite(name, value):
    """NaN passed every range check (grace_s=nan: shutdown returned at once without draining;
    probation_s=nan turned automatic rollback off; keepalive_time_s=nan crashed start-up) and
    inf made grace_s wait for ever or gRPC overflow."""
    with pytest.raises(ConfigError, match=f"^{name} must be a finite number"):
        ServerConfig(model="m.json", **{name: value})


@pytest.mark.parametrize("name", [n for n in FLOAT_SETTINGS if n.endswith("_s")])
def test_durations_are_bounded_by_what_grpc_takes_in_milliseconds(name):
    """max_connection_age_s=2592000 (30 days) passed validation and crashed grpc.server() with
    OverflowError: gRPC takes it in milliseconds as a 32-bit int."""
    longest: dict[str, Any] = {name: float(MAX_DURATION_S)}
    assert getattr(ServerConfig(model="m.json", **longest), name) == MAX_DURATION_S
    thirty_days: dict[str, Any] = {name: 2592000.0}
    with pytest.raises(ConfigError, match=f"{name} must be at most 2147483 s"):
        ServerConfig(model="m.json", **thirty_days)


def test_max_message_bytes_fits_grpcs_int():
    assert ServerConfig(model="m.json", max_message_bytes=2**31 - 1).message_limit() == 2**31 - 1
    with pytest.raises(ConfigError, match=r"max_message_bytes must be in 65536\.\.2147483647"):
        ServerConfig(model="m.json", max_message_bytes=2**31)


def test_the_largest_accepted_values_start_a_server(serve):
    """The bounds are gRPC's: a server starts with every millisecond setting and the message limit
    at the largest value the config accepts (one more crashed grpc.server())."""
    grpc_ms = ("keepalive_time_s", "keepalive_timeout_s", "min_client_ping_interval_s", "max_connection_age_s",
               "max_connection_age_grace_s")
    run = serve(max_message_bytes=MAX_MESSAGE_BYTES, **{name: float(MAX_DURATION_S) for name in grpc_ms})
    assert run.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).version


# --- YAML values are not converted behind the user's back ----------------------------------------


@pytest.mark.parametrize("text, needle", [
    ("cameras: [front, 007]\n", "config cameras: list items must be text, got 7; quote it"),
    ("metric_cameras: [front, on]\n", "config metric_cameras: list items must be text, got True; quote it"),
    ("variant: ~\n", "config variant: expected text, got None; quote it"),
    ("degrade: on\n", "config degrade: expected text, got True; quote it"),
    ("max_batch: 8.9\n", "config max_batch: cannot use 8.9"),
    ("max_batch: yes\n", "config max_batch: cannot use True"),
    ("grace_s: no\n", "config grace_s: cannot use False"),
    ("insecure_token: 2\n", "config insecure_token: cannot use 2"),
])
def test_yaml_values_of_the_wrong_kind_are_refused(tmp_path, text, needle):
    """YAML reads unquoted 007 as 7 and on as true: `cameras: [front, 007]` used to allow camera
    "7", and a fraction was cut to an integer."""
    f = tmp_path / "server.yaml"
    f.write_text("model: m.json\n" + text)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config({}, env={}, file=f)


def test_yaml_values_of_the_right_kind_are_taken_as_written(tmp_path):
    f = tmp_path / "server.yaml"
    f.write_text("model: m.json\ncameras: [front, '007']\ndegrade: off\nmax_batch: 4.0\nreuse_port: 1\n"
                 "grace_s: 5\n")
    cfg = load_config({}, env={}, file=f)
    assert cfg.cameras == ("front", "007")
    assert cfg.degrade == "off"  # YAML's false: what an unquoted off means for degrade (off or auto)
    assert (cfg.max_batch, cfg.reuse_port, cfg.grace_s) == (4, True, 5.0)
    # text (environment, flags) is parsed as before
    env = {"PERCEPTION_CAMERAS": "front, 007", "PERCEPTION_DEGRADE": "off", "PERCEPTION_REUSE_PORT": "on"}
    cfg = load_config({"model": "m.json"}, env=env)
    assert (cfg.cameras, cfg.degrade, cfg.reuse_port) == (("front", "007"), "off", True)
