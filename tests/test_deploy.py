"""The Kubernetes manifests (deploy/kubernetes), checked offline: there is no cluster, no kustomize binary
and no network here.

- Every overlay is rendered by `render` below: the subset of kustomize the manifests use (resources,
  namespace, labels, images, strategic-merge patches with the merge keys of the fields patched, and
  `$patch: delete`). A kustomization field outside that subset fails the test, so the renderer cannot
  silently drift from what kustomize would do. Where `kustomize` or `kubectl` is on PATH, its rendering
  is compared object by object as well.
- Every rendered object is validated with kubernetes-validate (strict: unknown fields fail) against
  the pinned Kubernetes versions below.
- Cross-references: selectors and pod labels, Service ports and container ports, probes and ports,
  volumes and mounts, the studio's --triton-url and the headless Service, the Triton command line
  against the real `python -m studio serve` parser, images against compose.yaml, no public exposure.
- The HorizontalPodAutoscaler and the Prometheus adapter rule are only schema-checked (the HPA with
  kubernetes-validate, the adapter's Helm values with a schema written here from the chart's documented
  rule format) and their names checked against each other and Triton's metric names: no autoscaling
  and no PromQL was ever executed here.
- docker/liveness.py against a fake tritonclient (success, errors, a stream without its final
  response, a hung model) and, marked slow, against a real embedded tritonserver on demo weights.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
GPU_OVERLAYS = [o for o in OVERLAYS if o.startswith("gpu-")]
#: Kubernetes versions the manifests must validate against: the oldest still common in managed
#: clusters, and the newest kubernetes-validate carries.
K8S_VERSIONS = ("1.30", "1.37")
#: Strategic-merge list merge keys (Kubernetes' patchMergeKey) for the list fields the overlays patch;
#: any other list is replaced, as in kustomize.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath"}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "patches", "images"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding", "StorageClass"}


# --- a small kustomize ------------------------------------------------------------------------------
def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def strategic_merge(base, patch, field: str | None = None):
    """Kubernetes' strategic merge for the cases used here: maps merge, `null` deletes a key, lists with
    a merge key merge item by item (`$patch: delete` removes one), other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        # kustomize's order: the patch's items (merged into their base item) first, in the patch's
        # order, then the base items the patch does not name
        key = MERGE_KEYS[field]
        by_key = {b.get(key): b for b in base}
        out = []
        for item in patch:
            if item.get("$patch") == "delete":
                assert item[key] in by_key, f"$patch: delete of {field} {item[key]!r}, which the base lacks"
            elif item[key] in by_key:
                out.append(strategic_merge(by_key[item[key]], item, None))
            else:
                out.append(copy.deepcopy(item))
        named = {item[key] for item in patch}
        return out + [copy.deepcopy(b) for b in base if b.get(key) not in named]
    return copy.deepcopy(patch)


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def render(folder: Path) -> list[dict]:
    """The objects `kustomize build folder` would print (for the fields this project uses)."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kust) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{folder}: kustomization fields {unknown} are not rendered by this test"
    docs: list[dict] = []
    for res in kust.get("resources", []):
        path = (folder / res).resolve()
        docs += render(path) if path.is_dir() else _load_docs(path)
    for entry in kust.get("patches", []):
        assert set(entry) == {"path"}, f"{folder}: only `patches: - path:` (strategic merge) is rendered"
        for patch in _load_docs(folder / entry["path"]):
            index = next((i for i, d in enumerate(docs) if _key(d) == _key(patch)), None)
            assert index is not None, f"{folder / entry['path']}: no {_key(patch)} to patch"
            if patch.get("$patch") == "delete":
                del docs[index]
            else:
                assert docs[index]["apiVersion"] == patch["apiVersion"]
                docs[index] = strategic_merge(docs[index], patch)
    for image in kust.get("images", []):
        for doc in docs:
            for c in _containers(doc):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    for entry in kust.get("labels", []):
        assert set(entry) <= {"pairs"}, "labels: only `pairs` (metadata labels, no selectors) is rendered"
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(entry["pairs"])
    if "namespace" in kust:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kust["namespace"]
    keys = [_key(d) for d in docs]
    assert len(keys) == len(set(keys)), f"{folder}: duplicate objects {keys}"
    return docs


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(DEPLOY / "overlays" / request.param)


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if _key(d) == (kind, name)]
    assert found, f"no {kind}/{name}"
    return found[0]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def container(doc: dict, name: str) -> dict:
    return next(c for c in _containers(doc) if c["name"] == name)


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command and args from the container's env."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def plain_env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def compose_image() -> str:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["studio"]["image"]


def adapter_rules() -> list[dict]:
    return yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]


# --- rendering and schemas ------------------------------------------------------------------------------
def test_there_are_the_documented_overlays():
    assert {"gpu-torch", "gpu-trtllm", "cpu-demo"} <= set(OVERLAYS)
    readme = (ROOT / "README.md").read_text()
    for name in OVERLAYS:
        assert f"deploy/kubernetes/overlays/{name}" in readme, f"README does not say how to apply {name}"


def test_strategic_merge_follows_kubernetes_rules():
    base = {"spec": {"a": 1, "b": {"c": 2}, "args": ["x", "y"],
                     "containers": [{"name": "t", "env": [{"name": "A", "value": "1"}], "ports": [1]}]}}
    patch = {"spec": {"a": None, "args": ["z"], "containers": [
        {"name": "t", "env": [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}], "ports": [2]},
        {"name": "u"}]}}
    out = strategic_merge(base, patch)
    assert "a" not in out["spec"] and out["spec"]["b"] == {"c": 2} and out["spec"]["args"] == ["z"]
    assert out["spec"]["containers"] == [{"name": "t", "env": [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}],
                                          "ports": [2]}, {"name": "u"}]
    gone = strategic_merge(out, {"spec": {"containers": [{"name": "u", "$patch": "delete"}]}})
    assert [c["name"] for c in gone["spec"]["containers"]] == ["t"]
    env = [{"name": n} for n in "ABC"]
    assert strategic_merge({"env": env}, {"env": [{"name": "D"}, {"name": "B", "value": "1"}]})["env"] == [
        {"name": "D"}, {"name": "B", "value": "1"}, {"name": "A"}, {"name": "C"}]  # kustomize 5.5's order


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_strictly(overlay, version):
    import kubernetes_validate

    name, docs = overlay
    assert docs, name
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {_key(doc)} against Kubernetes {version}: {exc.message} at "
                        f"{'/'.join(map(str, exc.path))}")


def test_optional_manifests_outside_the_overlays_validate():
    """The ServiceMonitor is a CRD (no schema here): its references are checked instead."""
    docs = render(DEPLOY / "overlays" / "gpu-torch")
    service = one(docs, "Service", "triton-headless")
    for monitor in _load_docs(DEPLOY / "monitoring" / "servicemonitor.yaml"):
        assert monitor["kind"] == "ServiceMonitor"
        assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
        labels = monitor["spec"]["selector"]["matchLabels"]
        assert labels.items() <= service["metadata"]["labels"].items()
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}


@pytest.mark.skipif(not (shutil.which("kustomize") or shutil.which("kubectl")), reason="no kustomize or kubectl")
def test_real_kustomize_renders_the_same_objects():
    for name in OVERLAYS:
        folder = str(DEPLOY / "overlays" / name)
        cmd = ["kustomize", "build", folder] if shutil.which("kustomize") else ["kubectl", "kustomize", folder]
        theirs = [d for d in yaml.safe_load_all(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                                                timeout=120).stdout) if d]
        ours = render(DEPLOY / "overlays" / name)
        assert sorted(map(_key, theirs)) == sorted(map(_key, ours)), name
        for doc in theirs:
            assert doc == one(ours, *_key(doc)), f"{name}: {_key(doc)} differs from kustomize's"


# --- cross-references -----------------------------------------------------------------------------------
def test_selectors_match_their_pods(overlay):
    name, docs = overlay
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in of_kind(docs, "Deployment")}
    for dep in of_kind(docs, "Deployment"):
        assert dep["spec"]["selector"]["matchLabels"].items() <= pods[dep["metadata"]["name"]].items()
    for svc in of_kind(docs, "Service"):
        matched = [n for n, labels in pods.items() if svc["spec"]["selector"].items() <= labels.items()]
        assert len(matched) == 1, f"{name}: Service {svc['metadata']['name']} selects {matched}"
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert any(pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() for labels in pods.values())
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", "triton") and ref["name"] in pods


def test_service_ports_and_probes_point_at_declared_container_ports(overlay):
    name, docs = overlay
    for svc in of_kind(docs, "Service"):
        dep = next(d for d in of_kind(docs, "Deployment")
                   if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items())
        declared = {p["name"]: p["containerPort"] for c in dep["spec"]["template"]["spec"]["containers"]
                    for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in declared, f"{name}: {svc['metadata']['name']} port {port['name']}"
            assert declared[port["targetPort"]] == port["port"]  # same number inside and out: fewer surprises
    for dep in of_kind(docs, "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            names = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                spec = c.get(probe)
                assert spec, f"{name}: {c['name']} has no {probe}"
                if "httpGet" in spec:
                    assert spec["httpGet"]["port"] in names


def test_triton_runs_the_serve_command_the_cli_accepts(overlay):
    from studio.cli import build_parser

    name, docs = overlay
    triton = container(one(docs, "Deployment", "triton"), "triton")
    argv = [expand(a, plain_env(triton)) for a in triton["command"] + triton["args"]]
    assert argv[:4] == ["python3", "-m", "studio", "serve"]
    parsed = build_parser().parse_args(argv[3:])
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert parsed.triton_bind == "0.0.0.0"
    assert (parsed.http_port, parsed.grpc_port) == (ports["http"], ports["grpc"])
    assert parsed.runtime == ("trtllm" if name == "gpu-trtllm" else "torch")
    if name.startswith("gpu-"):
        assert parsed.no_download and parsed.require_weights and not parsed.demo_weights
        assert str(parsed.checkpoints).startswith("/models/") and str(parsed.engines).startswith("/models/")
    else:
        assert parsed.demo_weights
    assert parsed.metrics_port == ports["metrics"]


def test_studio_talks_to_the_headless_service(overlay):
    name, docs = overlay
    svc = one(docs, "Service", "triton-headless")
    assert svc["spec"]["clusterIP"] == "None"
    grpc = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    studio = container(one(docs, "Deployment", "studio"), "studio")
    urls = [a.split("=", 1)[1] for a in studio["args"] if a.startswith("--triton-url=")]
    assert urls == [f"triton-headless.{svc['metadata']['namespace']}.svc.cluster.local:{grpc}"]
    assert studio["command"] == ["python3", "app.py"]
    app_src = (ROOT / "app.py").read_text()
    for flag in ("--host", "--port"):  # app.py's own flags (importing app builds the whole page)
        assert f'"{flag}"' in app_src
    assert "nvidia.com/gpu" not in str(studio.get("resources"))


def test_nothing_is_exposed_outside_the_cluster(overlay):
    name, docs = overlay
    assert not of_kind(docs, "Ingress") and not of_kind(docs, "Gateway") and not of_kind(docs, "HTTPRoute")
    for svc in of_kind(docs, "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{name}: {svc['metadata']['name']}"
        assert not svc["spec"].get("externalIPs")
    for dep in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
        spec = dep["spec"]["template"]["spec"]
        assert not spec.get("hostNetwork") and not spec.get("hostPID")
        assert all("hostPort" not in p for c in _containers(dep) for p in c.get("ports", []))


def test_only_the_studio_reaches_tritons_inference_ports(overlay):
    name, docs = overlay
    policy = one(docs, "NetworkPolicy", "triton")
    triton, studio = one(docs, "Deployment", "triton"), one(docs, "Deployment", "studio")
    pod_labels = triton["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"] for p in container(triton, "triton")["ports"]}
    opened: dict[str, list] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            assert port["port"] in ports
            opened[port["port"]] = rule.get("from")
    assert set(opened) == ports and opened["metrics"] is None  # Prometheus may live anywhere
    studio_labels = studio["spec"]["template"]["metadata"]["labels"]
    for port in ("grpc", "http"):
        assert [f["podSelector"]["matchLabels"] for f in opened[port]] == [{"app.kubernetes.io/name": "studio"}]
        assert opened[port][0]["podSelector"]["matchLabels"].items() <= studio_labels.items()


def test_pods_run_as_the_image_user_with_the_image_from_compose(overlay):
    name, docs = overlay
    uid = int(re.findall(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M)[-1])
    for doc in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == uid
        for c in _containers(doc):
            assert c["image"] == compose_image(), f"{name}: {c['name']}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["resources"]["requests"], f"{name}: {c['name']} requests nothing"
            assert "memory" in c["resources"]["limits"]


def test_shell_commands_parse(overlay):
    name, docs = overlay
    for doc in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
        for c in _containers(doc):
            if c.get("command") == ["sh", "-c"]:
                result = subprocess.run(["sh", "-n", "-c", c["args"][0]], capture_output=True, text=True)
                assert result.returncode == 0, f"{name}: {c['name']}: {result.stderr}"


def test_volumes_and_claims_resolve(overlay):
    name, docs = overlay
    claims = {d["metadata"]["name"] for d in of_kind(docs, "PersistentVolumeClaim")}
    for doc in of_kind(docs, "Deployment") + of_kind(docs, "Job"):
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"].get("volumes", [])}
        for c in _containers(doc):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}: {c['name']} mounts {mount['name']}"
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims


def test_triton_pod_has_a_gpu_shared_memory_and_the_liveness_script(overlay):
    name, docs = overlay
    dep = one(docs, "Deployment", "triton")
    pod = dep["spec"]["template"]["spec"]
    triton = container(dep, "triton")
    limits, requests = triton["resources"]["limits"], triton["resources"]["requests"]
    if name in GPU_OVERLAYS:
        assert limits["nvidia.com/gpu"] == 1 and requests["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        # the pods wait for the prepare Job's marker of their own runtime
        wait = container(dep, "wait-for-models")
        assert plain_env(wait)["STUDIO_RUNTIME"] == plain_env(triton)["STUDIO_RUNTIME"]
        job = container(one(docs, "Job", "prepare-models"), "prepare")
        assert plain_env(job)["STUDIO_RUNTIME"] == plain_env(triton)["STUDIO_RUNTIME"]
        assert '.prepared-${STUDIO_RUNTIME}' in job["args"][0] and ".prepared-${STUDIO_RUNTIME}" in wait["args"][0]
        assert ("build_engines all" in job["args"][0]) == (name == "gpu-trtllm")
        if name == "gpu-trtllm":
            assert job["resources"]["limits"]["nvidia.com/gpu"] == 1  # engines are built on the GPU kind
    else:
        assert "nvidia.com/gpu" not in str(dep) and "nodeSelector" not in pod
        assert not of_kind(docs, "Job") and not of_kind(docs, "HorizontalPodAutoscaler")
    assert "cpu" not in limits  # a throttled front stub is declared dead by tritonserver
    shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert len(shm) == 1 and shm[0]["emptyDir"]["sizeLimit"]
    assert {"name": shm[0]["name"], "mountPath": "/dev/shm"} in triton["volumeMounts"]
    probe = triton["livenessProbe"]["exec"]["command"]
    assert probe[:2] == ["python3", "/opt/studio/docker/liveness.py"]
    liveness = load_liveness()
    options = dict(a.split("=", 1) for a in probe[2:])
    grpc = next(p["containerPort"] for p in triton["ports"] if p["name"] == "grpc")
    assert options["--url"] == f"127.0.0.1:{grpc}"
    assert set(options["--models"].split(",")) == set(liveness.MODELS)
    # the script's own deadline ends before Kubernetes gives up on the probe
    assert float(options["--timeout"]) + 5 <= triton["livenessProbe"]["timeoutSeconds"]
    assert triton["startupProbe"]["periodSeconds"] * triton["startupProbe"]["failureThreshold"] >= 1200


# --- autoscaling: schema and names only ------------------------------------------------------------------
ADAPTER_RULE_SCHEMA = {  # the prometheus-adapter's rule format (its docs/config.md), the fields used here
    "type": "object",
    "required": ["seriesQuery", "resources", "name", "metricsQuery"],
    "additionalProperties": False,
    "properties": {
        "seriesQuery": {"type": "string"},
        "seriesFilters": {"type": "array"},
        "resources": {"type": "object", "additionalProperties": False, "properties": {
            "template": {"type": "string"},
            "overrides": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["resource"], "additionalProperties": False,
                "properties": {"resource": {"type": "string"}, "group": {"type": "string"}}}}}},
        "name": {"type": "object", "additionalProperties": False, "required": ["matches"],
                 "properties": {"matches": {"type": "string"}, "as": {"type": "string"}}},
        "metricsQuery": {"type": "string"},
    },
}


def test_prometheus_adapter_rule_is_well_formed_and_feeds_the_hpa():
    """Schema and names only: no Prometheus and no adapter run here."""
    import jsonschema

    from studio.client import TRITON_MODELS

    values = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    assert values["rules"]["default"] is False
    rules = adapter_rules()
    for rule in rules:
        jsonschema.validate(rule, ADAPTER_RULE_SCHEMA)
        re.compile(rule["name"]["matches"])
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        query = rule["metricsQuery"]
        assert "<<.LabelMatchers>>" in query and "<<.GroupBy>>" in query
        # Triton's metric names (its metrics docs): cumulative queue microseconds, successful requests
        assert "nv_inference_queue_duration_us" in rule["seriesQuery"]
        assert {"nv_inference_queue_duration_us", "nv_inference_request_success"} <= set(re.findall(r"nv_\w+", query))
        fronts = re.search(r'model=~"([^"]+)"', query).group(1).split("|")
        assert sorted(fronts) == sorted(m for pair in TRITON_MODELS.values() for m in pair)
        assert query.count("(") == query.count(")")
    hpa = one(render(DEPLOY / "overlays" / "gpu-torch"), "HorizontalPodAutoscaler", "triton")
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert metric["pods"]["metric"]["name"] in {r["name"]["as"] for r in rules}
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


# --- the liveness script ---------------------------------------------------------------------------------
def load_liveness():
    spec = importlib.util.spec_from_file_location("studio_liveness", ROOT / "docker" / "liveness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeError(Exception):
    pass


def fake_grpcclient(behaviour: dict[str, str], ready: tuple[str, ...] = ()):
    """A stand-in for tritonclient.grpc: each model answers as `behaviour` says ('ok', 'error',
    'hang', 'no-final', 'empty')."""
    calls: list[tuple[str, list[str]]] = []

    class Tensor:
        def __init__(self, name, shape, datatype):
            self.name, self.shape, self.datatype = name, shape, datatype

        def set_data_from_numpy(self, array):
            assert list(array.shape) == self.shape, (self.name, array.shape, self.shape)

    class Result:
        def __init__(self, final: bool, size: int = 4):
            self.final, self.size = final, size

        def as_numpy(self, name):
            import numpy as np

            return None if self.final else np.zeros(self.size, dtype=np.float32)

        def get_response(self):
            flag = types.SimpleNamespace(bool_param=self.final)
            return types.SimpleNamespace(parameters={"triton_final_response": flag})

    class Client:
        def __init__(self, url):
            self.url, self.callback = url, None

        def is_model_ready(self, name, client_timeout=None):
            return name in ready

        def _act(self, model, timeout):
            how = behaviour[model]
            if how == "error":
                raise FakeError(f"Stub process '{model}_0_0' is not\n healthy.")
            if how == "hang":
                time.sleep(timeout + 0.5)
                raise FakeError("Deadline Exceeded")
            return how

        def infer(self, model, inputs, client_timeout=None, outputs=None):
            calls.append((model, [i.name for i in inputs]))
            how = self._act(model, client_timeout)
            return Result(False, 0 if how == "empty" else 4)

        def start_stream(self, callback, stream_timeout=None):
            self.callback, self.timeout = callback, stream_timeout

        def async_stream_infer(self, model, inputs, enable_empty_final_response=False, outputs=None):
            calls.append((model, [i.name for i in inputs]))
            assert enable_empty_final_response

            def answer():
                try:
                    how = self._act(model, self.timeout)
                except FakeError as exc:
                    self.callback(None, exc)
                    return
                if how != "empty":
                    self.callback(Result(False), None)
                if how != "no-final":
                    self.callback(Result(True), None)
            threading.Thread(target=answer, daemon=True).start()

        def stop_stream(self, cancel_requests=False):
            pass

        def close(self):
            pass

    module = types.SimpleNamespace(InferInput=Tensor, InferRequestedOutput=lambda name: name,
                                   InferenceServerClient=Client)
    return module, calls


def test_liveness_passes_when_every_model_answers(capsys):
    liveness = load_liveness()
    fake, calls = fake_grpcclient({m: "ok" for m in liveness.MODELS})
    assert liveness.main(["--models", ",".join(liveness.MODELS), "--timeout", "2"], grpcclient=fake) == 0
    assert "live:" in capsys.readouterr().out
    sent = dict(calls)
    assert sorted(sent) == sorted(liveness.MODELS)
    assert sent["f5_tts"][:4] == ["reference_wav", "reference_wav_len", "reference_text", "target_text"]
    assert "nfe_steps" in sent["f5_tts_stream"] and "min_new_tokens" in sent["spark_tts"]
    assert sent["asr"] == ["audio", "audio_len", "fixed_tokens"] and sent["speaker_sim"] == ["audio", "audio_len"]


@pytest.mark.parametrize("model,how,says", [
    ("f5_tts", "error", "f5_tts: Stub process 'f5_tts_0_0' is not healthy."),
    ("spark_tts_stream", "error", "spark_tts_stream: Stub process"),
    ("f5_tts_stream", "no-final", "did not finish its stream"),
    ("spark_tts_stream", "empty", "ended its stream without audio"),
    ("spark_tts", "empty", "answered without waveform"),
    ("asr", "hang", "asr:"),
])
def test_liveness_fails_when_one_model_does(model, how, says, capsys):
    liveness = load_liveness()
    behaviour = {m: "ok" for m in liveness.MODELS} | {model: how}
    fake, _ = fake_grpcclient(behaviour)
    started = time.monotonic()
    assert liveness.main(["--models", ",".join(liveness.MODELS), "--timeout", "1"], grpcclient=fake) == 1
    assert time.monotonic() - started < 4  # the requests run at once under one deadline
    err = capsys.readouterr().err
    assert err.startswith("not live") and says in err
    assert err.count(":") >= 2 and sum(m + ":" in err for m in liveness.MODELS) == 1  # only the failing model


def test_liveness_without_models_asks_the_ready_ones():
    liveness = load_liveness()
    fake, calls = fake_grpcclient({"f5_tts": "ok", "spark_tts": "ok"}, ready=("f5_tts", "spark_tts"))
    assert liveness.probe("x:1", None, 1.0, grpcclient=fake) == []
    assert sorted(m for m, _ in calls) == ["f5_tts", "spark_tts"]
    fake, _ = fake_grpcclient({})
    assert liveness.probe("x:1", None, 1.0, grpcclient=fake) == ["no studio model is ready at x:1"]
    assert "unknown model" in liveness.probe("x:1", ["nope"], 1.0, grpcclient=fake)[0]


def test_liveness_imports_no_torch_and_fails_fast_on_no_server():
    code = ("import runpy, sys; sys.argv = ['liveness.py', '--url', '127.0.0.1:1', '--models', 'f5_tts', "
            "'--timeout', '3']\ntry:\n    runpy.run_path('docker/liveness.py', run_name='__main__')\n"
            "except SystemExit as exc:\n    print('rc', exc.code, 'torch' in sys.modules)")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["rc", "1", "False"], result.stdout + result.stderr
    assert "f5_tts:" in result.stderr and time.monotonic() - started < 30


@pytest.mark.slow
def test_liveness_against_a_real_server(triton_server):
    """The tiny requests are real ones the models accept (demo weights, CPU): every served model."""
    liveness = load_liveness()
    served = [m for m in liveness.MODELS if m in triton_server.models]
    assert {"f5_tts", "spark_tts_stream"} <= set(served)
    assert liveness.probe(triton_server.grpc_url, served, 60.0) == []
    assert liveness.probe(triton_server.grpc_url, None, 60.0) == []
