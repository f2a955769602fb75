"""Config precedence (flag > env > file > default) and validation on construction."""

from __future__ import annotations

import pytest

from perception.errors import ConfigError
from server.config import ServerConfig, load_config


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
