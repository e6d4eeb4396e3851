"""The deployment files, validated offline: compose.yaml against the Compose Specification, every Kubernetes
manifest (base and CPU overlay, as kustomize renders them) against the Kubernetes and CRD schemas, and the
Grafana dashboard against the metrics the code defines."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared import keys, metrics
from shared.settings import DEFAULT_MODEL
from tests.kustomize_render import render

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = Path(__file__).with_name("schemas")
KUBERNETES_VERSION = "1.31.0"
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-v1.json",
}
KUSTOMIZATIONS = {"base": ROOT / "k8s/base", "cpu": ROOT / "k8s/overlays/cpu"}
DASHBOARD = ROOT / "deploy/grafana/dashboards/llmfleet.json"
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGES = [pattern.rstrip("*") for pattern in SETUPTOOLS["packages"]["find"]["include"]]


def schema_errors(instance, schema: dict) -> list[str]:
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


def by_kind(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(KUSTOMIZATIONS[request.param])


# -- compose ---------------------------------------------------------------------------------------------------
def test_compose_file_follows_the_compose_specification():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    assert schema_errors(compose, schema) == []


def test_compose_runs_redis_with_aof_gateway_replicas_gpu_and_cpu_workers_jobs_and_monitoring():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "gateway", "worker", "worker-cpu", "jobs", "prometheus", "grafana"} <= set(services)
    assert "--appendonly" in services["redis"]["command"] and services["redis"]["healthcheck"]
    assert services["gateway"]["deploy"]["replicas"] >= 2
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and services["worker"]["profiles"] == ["gpu"]
    assert services["worker-cpu"]["profiles"] == ["cpu"] and "deploy" not in services["worker-cpu"]
    assert services["worker-cpu"]["environment"]["LLMFLEET_DEVICE"] == "cpu"
    assert services["jobs"]["command"] == ["python", "-m", "jobs"]
    # Both tokenize: the job layer must see the models the workers prepared into the volume, as the gateway does.
    assert services["jobs"]["volumes"] == services["gateway"]["volumes"]
    for service in services.values():  # every file compose mounts from the repository exists
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source


def test_dockerfile_is_multi_stage_non_root_with_a_model_volume():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert re.search(r"^VOLUME /models", text, re.M) and "LLMFLEET_MODELS_DIR=/models" in text


def test_the_image_installs_every_package_the_project_ships():
    """`pip install .` in the image sees only what was copied before it: a package left out installs nothing and
    its importers fail only when a container starts (the image lacked `jobs`, which the gateway imports)."""
    text = (ROOT / "Dockerfile").read_text()
    build = text[: text.index("RUN pip install .")]
    copied = set(re.findall(r"^COPY (\S+) ", build, re.M))
    assert set(PACKAGES) <= copied


def test_every_file_a_package_reads_is_installed_with_it():
    """Package data not declared in pyproject stays out of the wheel, and so out of the image (`loadtest long` and
    the fidelity check read loadtest/data, which was missing)."""
    declared = SETUPTOOLS["package-data"]
    for package in PACKAGES:
        tracked = subprocess.run(["git", "ls-files", package], cwd=ROOT, capture_output=True, text=True, check=True)
        for path in tracked.stdout.split():
            relative = path.removeprefix(f"{package}/")
            if not relative.endswith((".py", ".md")):
                assert any(_glob_matches(relative, glob) for glob in declared.get(package, [])), path


def _glob_matches(path: str, glob: str) -> bool:
    """As setuptools' package-data globs: `*` stays within one directory."""
    parts, patterns = path.split("/"), glob.split("/")
    return len(parts) == len(patterns) and all(map(fnmatch.fnmatchcase, parts, patterns))


# -- Kubernetes ------------------------------------------------------------------------------------------------
def test_every_kubernetes_manifest_is_valid_against_its_schema(rendered):
    _, docs = rendered
    assert docs
    for doc in docs:
        crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd:
            assert schema_errors(doc, json.loads((SCHEMAS / crd).read_text())) == [], doc["kind"]
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on PATH")
def test_the_render_equals_kubectl_kustomize(rendered):
    name, docs = rendered
    out = subprocess.run(["kubectl", "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(out.stdout), key=key) == sorted(docs, key=key)


def test_workers_scale_on_the_consumer_groups_pending_and_lag_from_zero(rendered):
    _, docs = rendered
    scaled = by_kind(docs, "ScaledObject", "worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "worker" and scaled["spec"]["minReplicaCount"] == 0
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis-streams"}
    for trigger in triggers:
        assert trigger["metadata"]["stream"] == keys.requests(DEFAULT_MODEL)
        assert trigger["metadata"]["consumerGroup"] == keys.WORKER_GROUP
    assert {"pendingEntriesCount", "lagCount"} <= {k for t in triggers for k in t["metadata"]}
    config = by_kind(docs, "ConfigMap", "llmfleet-config")["data"]
    assert config["LLMFLEET_REQUIRE_LIVE_WORKER"] == "false", "from zero workers, requests must still be queued"


def test_worker_is_ready_on_model_loaded_and_its_grace_period_covers_the_drain(rendered):
    name, docs = rendered
    pod = by_kind(docs, "Deployment", "worker")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["lifecycle"]["preStop"]["exec"]["command"]
    timeout = float(by_kind(docs, "ConfigMap", "llmfleet-config")["data"]["LLMFLEET_REQUEST_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= timeout
    gpu = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpu == (1 if name == "base" else None)


def test_kubernetes_runs_the_job_layer_on_the_gateways_configuration(rendered):
    """Without `python -m jobs` batches stay queued and no cron trims the streams (compose ran it, k8s did not)."""
    _, docs = rendered
    container = lambda name: by_kind(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]  # noqa: E731
    assert container("jobs")["command"] == ["python", "-m", "jobs"]
    assert container("jobs")["envFrom"] == container("gateway")["envFrom"]


def test_redis_keeps_an_aof_on_a_volume_and_the_gateway_autoscales(rendered):
    _, docs = rendered
    redis = by_kind(docs, "StatefulSet", "redis")["spec"]
    assert "--appendonly" in redis["template"]["spec"]["containers"][0]["args"]
    assert redis["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert by_kind(docs, "HorizontalPodAutoscaler", "gateway")["spec"]["scaleTargetRef"]["name"] == "gateway"
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"} == {"gateway", "worker"}
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceMonitor"} == {"gateway", "worker"}


# -- Grafana ---------------------------------------------------------------------------------------------------
def dashboard_metric_names() -> set[str]:
    """Every series name the dashboard's queries read (llmfleet:..._bucket, ..._total, gauges)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return {name for expr in exprs for name in re.findall(r"llmfleet:[A-Za-z0-9_:]+", expr)}


def defined_series_names() -> set[str]:
    names = set()
    for registry in (metrics.GATEWAY, metrics.WORKER):
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            names |= {family.name + suffix for suffix in suffixes}
    return names


def test_dashboard_panels_cover_throughput_latency_queue_workers_errors_and_cache():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("throughput", "first token", "inter-token", "end-to-end", "queue", "workers", "errors", "cache"):
        assert topic in titles
    assert dashboard_metric_names() <= defined_series_names()
