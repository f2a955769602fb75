"""deploy/k8s, validated offline: core kinds against the Kubernetes JSON schemas
(kubernetes-validate, strict), the ServiceMonitor against its CRD's structure, and the
cross-references between manifests, the image and the server (ports, labels, metric names,
settings). The replay Job's script runs for real against a live TLS server in
tests/deploy/test_secrets_k8s.py."""

from __future__ import annotations

import copy
import re
import shlex

import jsonschema
import pytest
import yaml

from tests.deploy.cli_check import REPO_ROOT, env_beaten_by_flags, parse_perception_argv, serve_settings
from tests.deploy.dockerfile import parse_dockerfile

K8S = REPO_ROOT / "deploy" / "k8s"
# Oldest release with every feature used (Job backoffLimitPerIndex 1.29)
# and the newest schemas kubernetes-validate ships.
VERSIONS = ("1.29.0", "latest")
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
APPLIED_SEPARATELY = {"prometheus-adapter-rules.yaml", "replay-job.yaml", "replay-volumes.yaml"}


def load_all() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


DOCS = load_all()


def find(kind: str, name: str | None = None) -> dict:
    matches = [d for _, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def _version(v: str) -> str:
    from kubernetes_validate.utils import latest_version

    return latest_version() if v == "latest" else v


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("doc", [d for _, d in DOCS if (d["apiVersion"], d["kind"]) not in CUSTOM_KINDS],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_core_kinds_validate_strictly(doc: dict, version: str) -> None:
    from kubernetes_validate.utils import validate

    validate(doc, _version(version), strict=True)


def test_strict_validation_rejects_a_typo() -> None:
    from kubernetes_validate.utils import ValidationError, validate

    bad = copy.deepcopy(find("Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["comand"] = ["perception"]
    with pytest.raises(ValidationError):
        validate(bad, _version("latest"), strict=True)


def test_every_kind_is_known() -> None:
    from kubernetes_validate.utils import SchemaNotFoundError, validate

    for _name, doc in DOCS:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            with pytest.raises(SchemaNotFoundError):  # so it must be checked by hand, below
                validate(doc, _version("latest"), strict=True)


def test_kustomization_lists_the_serving_stack() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert all((K8S / r).is_file() for r in listed)
    assert listed | APPLIED_SEPARATELY == files, "a manifest is neither in kustomization.yaml nor applied separately"


# --- ServiceMonitor: the CRD's structure for the fields used, plus what it must point at ---

DURATION_PATTERN = "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": DURATION_PATTERN},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION_PATTERN},
                            "honorLabels": {"type": "boolean"},
                        },
                        "anyOf": [{"required": ["port"]}, {"required": ["targetPort"]}],
                    },
                },
            },
        },
    },
}


def _seconds(duration: str) -> float:
    unit_s = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit_s[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", duration))


def test_service_monitor_structure_and_target() -> None:
    monitor = find("ServiceMonitor")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):  # the schema does reject a typo
        typo = copy.deepcopy(monitor)
        typo["spec"]["endpoints"][0]["intervall"] = "5s"
        jsonschema.validate(typo, SERVICE_MONITOR_SCHEMA)
    service = find("Service", "perception")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items(), "selects no Service"
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert _seconds(endpoint["scrapeTimeout"]) < _seconds(endpoint["interval"])
    # Without jobLabel the job is the Service's name: the one the shipped alerts expect.
    alerts = (REPO_ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    jobs = set(re.findall(r'job="([^"]+)"', alerts))
    assert "jobLabel" not in monitor["spec"] and jobs <= {service["metadata"]["name"]}


# --- the serving Deployment and what refers to it -------------------------------------------


def _pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]


def _container(deployment: dict) -> dict:
    containers = _pod(deployment)["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def server_command(container: dict) -> tuple[list[str], dict[str, str]]:
    """The server's command line (the GPU image's ENTRYPOINT + the container's args) and the
    environment the pod gives it (ConfigMaps, then the container's own env, over the image's ENV)."""
    stage = parse_dockerfile(REPO_ROOT / "Dockerfile").stage("runtime-gpu")
    entry = stage.of("ENTRYPOINT")[-1].exec_form()
    assert entry is not None
    env = stage.env()
    for source in container.get("envFrom", []):
        env.update(find("ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return [*entry, *container.get("args", [])], env


def test_deployment_gpu_probes_and_ports_match_the_image() -> None:
    deployment = find("Deployment", "perception")
    pod, container = _pod(deployment), _container(deployment)
    assert pod["spec"]["nodeSelector"], "GPU pods need a node selector"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    stage = parse_dockerfile(REPO_ROOT / "Dockerfile").stage("runtime-gpu")
    args = serve_settings(*server_command(container))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    # The kubelet's `grpc:` probe speaks plaintext only; the server serves TLS, so each probe runs
    # `perception health --tls-ca` (tests/deploy/test_secrets_k8s.py runs them for real).
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        health = parse_perception_argv(container[probe]["exec"]["command"])
        assert health.server.rpartition(":")[2] == str(args.port), f"{probe} does not ask gRPC health"
        assert health.tls_ca, f"{probe} does not speak TLS"
    user = stage.of("USER")[-1].args.split(":")[0]
    assert str(pod["spec"]["securityContext"]["runAsUser"]) == user
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    config = find("ConfigMap", container["envFrom"][0]["configMapRef"]["name"])
    assert config["data"]["PERCEPTION_ENGINE_CACHE_DIR"] in mounts, "the engine cache must be a mounted volume"


def test_configmap_is_a_valid_server_config() -> None:
    from server.config import ENV_PREFIX, ServerConfig, load_config

    deployment = find("Deployment", "perception")
    data = find("ConfigMap", _container(deployment)["envFrom"][0]["configMapRef"]["name"])["data"]
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in ServerConfig.__dataclass_fields__}
    assert set(data) <= fields, f"unknown settings: {set(data) - fields}"
    config = load_config(env=data)
    assert _pod(deployment)["spec"]["terminationGracePeriodSeconds"] > config.grace_s


def test_every_configmap_setting_reaches_the_server() -> None:
    """No flag of the server's command line (the image's ENTRYPOINT, the container's args) gives
    a setting the ConfigMap sets: a flag beats the environment, so that setting would do nothing
    (the ENTRYPOINT's --model made the ConfigMap's PERCEPTION_MODEL dead)."""
    container = _container(find("Deployment", "perception"))
    argv, env = server_command(container)
    data = find("ConfigMap", container["envFrom"][0]["configMapRef"]["name"])["data"]
    assert not env_beaten_by_flags(argv, data), "the server's flags override these ConfigMap settings"
    assert serve_settings(argv, env).model == data["PERCEPTION_MODEL"]


def test_headless_service_pdb_and_hpa_point_at_the_pods() -> None:
    deployment = find("Deployment", "perception")
    pod_labels = _pod(deployment)["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = find("Service", "perception")
    assert service["spec"]["clusterIP"] == "None", "client-side balancing needs a headless Service"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in _container(deployment)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    pdb = find("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = find("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "perception")
    assert hpa["spec"]["minReplicas"] >= 2, "with minReplicas 1 the PDB would block every drain"


def _adapter_rules() -> list[dict]:
    return yaml.safe_load(find("ConfigMap", "perception-adapter-rules")["data"]["config.yaml"])["rules"]


def test_hpa_metrics_are_served_by_the_adapter_from_real_server_metrics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from server.metrics import ServerMetrics

    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    metrics.observe_stage("end_to_end", 0.01)
    metrics.set_queue_depth(3)
    exported = {line.split("{")[0].split(" ")[0] for line in generate_latest(registry).decode().splitlines()
                if line and not line.startswith("#")}
    served = {}
    for rule in _adapter_rules():
        series = rule["seriesQuery"].split("{")[0].strip("'\" ")
        assert series in exported, f"adapter rule reads {series}, which the server does not export"
        assert re.fullmatch(rule["name"]["matches"], series)
        served[rule["name"]["as"]] = rule
    hpa = find("HorizontalPodAutoscaler")
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] in served, f"no adapter rule serves {metric['pods']['metric']['name']}"


# --- the replay Job ---------------------------------------------------------------------------


def _job() -> dict:
    return find("Job", "perception-replay")


def test_job_replays_every_listed_drive_against_the_headless_service() -> None:
    job = _job()
    drives = find("ConfigMap", "perception-drives")["data"]["drives.txt"].split()
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == len(drives)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith(":cpu"), "replay needs neither a GPU nor torch"
    env = {e["name"]: e["value"] for e in container["env"]}
    service = find("Service", "perception")
    host, _, port = env["PERCEPTION_SERVER"].rpartition(":")
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert int(port) == next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    script = container["args"][0]
    line = " ".join(script[script.index("exec perception replay") :].replace("\\\n", " ").split())
    argv = shlex.split(line.split("exec ", 1)[1].replace('"${gt[@]}"', ""))
    parse_perception_argv([a.replace("$PERCEPTION_SERVER", env["PERCEPTION_SERVER"]) for a in argv])


def test_job_volumes_are_claims_shipped_beside_it() -> None:
    """Each claim the Job mounts is defined here (its pods stayed Pending on claims nothing made),
    shareable by its parallel pods."""
    claims = [v["persistentVolumeClaim"]["claimName"] for v in _job()["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v]
    assert sorted(claims) == ["recorded-drives", "replay-results"]
    for name in claims:
        pvc = find("PersistentVolumeClaim", name)
        assert pvc["metadata"]["namespace"] == _job()["metadata"]["namespace"]
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
