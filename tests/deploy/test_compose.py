"""deploy/compose/compose.yaml, checked without a Docker engine: every mounted path exists,
and the compose file agrees with the Prometheus and Grafana configs it mounts (the scrape
target is the server's real metrics port, the rule files and dashboards are mounted where
those configs look for them, the datasource reaches Prometheus)."""

from __future__ import annotations

import copy
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.cli_check import REPO_ROOT, env_beaten_by_flags, serve_settings
from tests.deploy.dockerfile import Stage, parse_dockerfile

COMPOSE = REPO_ROOT / "deploy" / "compose" / "compose.yaml"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")


@pytest.fixture(scope="module")
def compose() -> dict:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def bind_mounts(service: dict) -> list[tuple[Path, PurePosixPath]]:
    """(host path, container path) of a service's bind mounts (named volumes left out)."""
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2] if isinstance(volume, str) else (volume["source"], volume["target"])
        if source.startswith((".", "/")):
            out.append(((COMPOSE.parent / source).resolve(), PurePosixPath(target)))
    return out


def host_path(service: dict, container_path: str) -> Path:
    """The repository file a container path of ``service`` is bind-mounted from."""
    path = PurePosixPath(container_path)
    best: tuple[Path, PurePosixPath] | None = None
    for source, target in bind_mounts(service):
        mounted = path == target or target in path.parents
        if mounted and (best is None or len(target.parts) > len(best[1].parts)):
            best = (source, target)
    assert best is not None, f"{container_path} is not bind-mounted into the container"
    return best[0] / path.relative_to(best[1])


def netns_owner(compose: dict, name: str) -> str:
    """The service whose network namespace ``name`` runs in (itself unless network_mode: service:X)."""
    mode = compose["services"][name].get("network_mode", "")
    return mode.split(":", 1)[1] if mode.startswith("service:") else name


def resolves_to(compose: dict, hostname: str) -> str | None:
    """The service whose network namespace a compose DNS name (service name or alias) reaches."""
    for name, svc in compose["services"].items():
        if svc.get("network_mode"):
            continue
        aliases = {name}
        for net in (svc.get("networks") or {}).values() if isinstance(svc.get("networks"), dict) else []:
            aliases.update((net or {}).get("aliases", []))
        if hostname in aliases:
            return name
    return None


def published(service: dict) -> set[int]:
    return {int(str(p).split(":")[-2 if str(p).count(":") else -1].split("/")[0]) for p in service.get("ports", [])}


def _server_stage(compose: dict) -> Stage:
    build = compose["services"]["perception"]["build"]
    return parse_dockerfile(REPO_ROOT / build.get("dockerfile", "Dockerfile")).stage(build["target"])


def server_argv(compose: dict) -> list[str]:
    """The server container's full command: the image's ENTRYPOINT + the compose command."""
    entry = _server_stage(compose).of("ENTRYPOINT")[-1].exec_form()
    assert entry is not None
    return [*entry, *compose["services"]["perception"].get("command", [])]


def server_env(compose: dict) -> dict[str, str]:
    """The server container's environment: the compose environment over the image's ENV."""
    given = compose["services"]["perception"].get("environment", {})
    return {**_server_stage(compose).env(), **{k: str(v) for k, v in given.items()}}


def test_services_and_build(compose: dict) -> None:
    assert {"perception", "prometheus", "grafana"} <= set(compose["services"])
    build = compose["services"]["perception"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == REPO_ROOT
    dockerfile = parse_dockerfile(context / build.get("dockerfile", "Dockerfile"))
    assert build["target"] in [s.name for s in dockerfile.stages]


def test_every_mounted_path_exists(compose: dict) -> None:
    mounts = [(name, src) for name, svc in compose["services"].items() for src, _ in bind_mounts(svc)]
    assert mounts
    for name, source in mounts:
        assert source.exists(), f"{name} mounts {source}, which is not in the repository"
        assert REPO_ROOT in source.parents, f"{name} mounts {source} from outside the repository"
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} uses undeclared named volume {source}"


def test_server_command_and_settings(compose: dict) -> None:
    from server.config import load_config

    given = {k: str(v) for k, v in compose["services"]["perception"].get("environment", {}).items()}
    assert not env_beaten_by_flags(server_argv(compose), given), "the server's flags override these settings"
    load_config(env=server_env(compose))


def test_prometheus_scrapes_the_server_and_loads_every_rule_file(compose: dict) -> None:
    prom = compose["services"]["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prom["command"] if "=" in arg)
    config_path = flags["--config.file"]
    config_file = host_path(prom, config_path)
    assert config_file == REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_file.read_text())
    rule_files = config.get("rule_files", [])
    assert rule_files, "prometheus.yml loads no alert rules"
    for rule in rule_files:
        container = PurePosixPath(config_path).parent / rule  # may be a glob, as Prometheus allows
        folder = host_path(prom, str(container.parent))
        assert [p for p in folder.glob(container.name) if p.is_file()], (
            f"rule file {rule} is not mounted beside the config"
        )

    metrics_port = serve_settings(server_argv(compose), server_env(compose)).metrics_port
    owner = netns_owner(compose, "prometheus")
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert targets
    for target in targets:
        host, _, port = target.rpartition(":")
        if host in LOCAL_HOSTS:
            assert owner == "perception", f"prometheus scrapes {target} but does not share the server's network"
            assert int(port) == metrics_port, f"prometheus scrapes port {port}; the server exports on {metrics_port}"
        else:
            assert host == "perception" and int(port) == metrics_port, f"scrape target {target} is not the server"
    assert metrics_port in published(compose["services"][owner])


def test_grafana_gets_datasource_and_dashboards(compose: dict) -> None:
    graf = compose["services"]["grafana"]
    provisioning = host_path(graf, "/etc/grafana/provisioning")
    datasources = [d for f in sorted((provisioning / "datasources").glob("*.y*ml"))
                   for d in yaml.safe_load(f.read_text())["datasources"]]
    prom_ds = [d for d in datasources if d["type"] == "prometheus"]
    assert prom_ds
    prom_flags = dict(a.split("=", 1) for a in compose["services"]["prometheus"]["command"] if "=" in a)
    prom_port = int(prom_flags.get("--web.listen-address", ":9090").rsplit(":", 1)[1])
    for ds in prom_ds:
        url = urlsplit(ds["url"])
        if url.hostname in ("localhost", "127.0.0.1"):
            assert netns_owner(compose, "grafana") == netns_owner(compose, "prometheus"), (
                "grafana cannot reach localhost prometheus"
            )
        else:
            target = resolves_to(compose, str(url.hostname))
            assert target == netns_owner(compose, "prometheus"), f"datasource host {url.hostname} is not Prometheus"
        assert url.port == prom_port
    providers = [p for f in sorted((provisioning / "dashboards").glob("*.y*ml"))
                 for p in yaml.safe_load(f.read_text())["providers"]]
    assert providers
    for provider in providers:
        folder = host_path(graf, provider["options"]["path"])
        assert sorted(folder.glob("*.json")), f"dashboard folder {provider['options']['path']} holds no dashboard"
    assert 3000 in published(compose["services"][netns_owner(compose, "grafana")])
    server = compose["services"][netns_owner(compose, "perception")]
    assert prom_port in published(compose["services"][netns_owner(compose, "prometheus")])
    assert serve_settings(server_argv(compose), server_env(compose)).port in published(server)


def test_the_checks_catch_drift(compose: dict) -> None:
    """Each consistency check fails on the drift it exists for."""
    wrong_port = copy.deepcopy(compose)
    wrong_port["services"]["perception"]["command"] = ["--metrics-port", "9999"]
    with pytest.raises(AssertionError, match="exports on 9999"):
        test_prometheus_scrapes_the_server_and_loads_every_rule_file(wrong_port)
    # the environment moves it too: the image's defaults are variables, not ENTRYPOINT flags
    wrong_env = copy.deepcopy(compose)
    wrong_env["services"]["perception"].setdefault("environment", {})["PERCEPTION_METRICS_PORT"] = "9999"
    with pytest.raises(AssertionError, match="exports on 9999"):
        test_prometheus_scrapes_the_server_and_loads_every_rule_file(wrong_env)
    missing = copy.deepcopy(compose)
    missing["services"]["grafana"]["volumes"][0] = "../grafana/no-such-dir:/etc/grafana/provisioning:ro"
    with pytest.raises(AssertionError, match="not in the repository"):
        test_every_mounted_path_exists(missing)
    no_alias = copy.deepcopy(compose)
    no_alias["services"]["perception"].pop("networks", None)
    no_alias["services"]["prometheus"].pop("network_mode", None)
    no_alias["services"]["prometheus"]["image"] = "prom/prometheus"
    with pytest.raises(AssertionError):
        test_prometheus_scrapes_the_server_and_loads_every_rule_file(no_alias)
