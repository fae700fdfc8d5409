"""Static checks of deploy/: YAML parses and lints, Kubernetes manifests validate against the
schema (offline, kubernetes-validate), and names/ports agree with the project's settings.
Docker and a cluster are not available here; these checks keep the files honest."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from maskfleet.tasks.settings import load_settings, model_queue

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.32.0"
CRD_KINDS = {"ScaledObject", "Kustomization"}

# Environment variables our code (or boto3, for AWS_*) reads; each is checked to occur in the source.
KNOWN_ENV = {
    "MASKFLEET_BROKER_URL", "MASKFLEET_RESULT_BACKEND", "MASKFLEET_MAX_JOB_SECONDS", "MASKFLEET_RESULT_EXPIRES",
    "MASKFLEET_MODELS", "MASKFLEET_MODEL_CACHE", "MASKFLEET_DEVICE", "MASKFLEET_DTYPE", "MASKFLEET_WEBHOOK_SECRET",
    "MASKFLEET_S3_ADDRESSING_STYLE", "MASKFLEET_CALLBACK_ALLOWLIST",
    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
}
SOURCE_DIRS = ["maskfleet", "tasks", "worker", "storage", "sampling"]

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in docs(p)]


def find(kind: str, name: str) -> dict:
    matches = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name)
    return matches[0]


def compose() -> dict:
    return docs(DEPLOY / "docker-compose.yml")[0]


def test_yaml_files_exist():
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    assert {"docker-compose.yml", "k8s/kustomization.yaml", "k8s/scaledobject.yaml"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses_and_lints(path):
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    assert docs(path), f"{path} is empty"
    conf = YamlLintConfig("extends: relaxed\nrules:\n  line-length: {max: 140}\n")
    problems = [p for p in linter.run(path.read_text(), conf, str(path)) if p.level == "error"]
    assert not problems, [f"{p.line}:{p.column} {p.message}" for p in problems]


def test_yamllint_catches_errors():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig("extends: relaxed")
    assert any(p.level == "error" for p in linter.run("a: 1\na: 2\n", conf))


def test_kustomization_lists_every_manifest():
    listed = set(docs(K8S / "kustomization.yaml")[0]["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_k8s_manifests_validate():
    import kubernetes_validate

    checked = 0
    for d in k8s_docs():
        if d["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 6


def test_validator_rejects_bad_manifest():
    import kubernetes_validate

    bad = find("Deployment", "maskfleet-worker")
    bad = {**bad, "spec": {**bad["spec"], "replicaz": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def served_model(args: list[str]) -> str:
    assert "--models-served" in args
    return args[args.index("--models-served") + 1]


def test_keda_trigger_uses_the_model_queue():
    so = find("ScaledObject", "maskfleet-worker-sd15")
    assert so["spec"]["scaleTargetRef"]["name"] == "maskfleet-worker"
    assert so["spec"]["minReplicaCount"] == 0
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"  # on our queue-depth metric: see the file's comment
    assert trigger["metadata"]["threshold"] == "1"
    container = find("Deployment", "maskfleet-worker")["spec"]["template"]["spec"]["containers"][0]
    model = served_model(container["args"])
    query = trigger["metadata"]["query"]
    assert query == f'sum(maskfleet_queue_depth{{queue="{model_queue(model)}"}})'
    assert "python -m maskfleet.tasks.queue_depth" in (DEPLOY / "k8s" / "scaledobject.yaml").read_text()
    assert f"--queues {model_queue(model)}" in (DEPLOY / "k8s" / "scaledobject.yaml").read_text()
    assert served_model(compose()["services"]["worker"]["command"]) == model


def test_env_names_are_read_by_our_code():
    source = "\n".join(p.read_text() for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))
    missing = {n for n in KNOWN_ENV if n.startswith("MASKFLEET_") and n not in source}
    assert not missing, f"KNOWN_ENV names no longer read by the code: {missing}"

    used = set(find("ConfigMap", "maskfleet-config")["data"]) | set(find("Secret", "maskfleet-secrets")["stringData"])
    services = compose()["services"]
    for svc in ("worker", "flower"):
        used |= set(services[svc]["environment"])
    example = (DEPLOY / "worker.env.example").read_text()
    used |= set(re.findall(r"^([A-Z0-9_]+)=", example, re.M))
    for d in k8s_docs():
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                used |= {e["name"] for e in c.get("env", [])}
    assert "MASKFLEET_WEBHOOK_SECRET" in used and "MASKFLEET_BROKER_URL" in used
    assert used <= KNOWN_ENV, f"unknown environment variables: {used - KNOWN_ENV}"


def test_compose_wiring():
    env = compose()["services"]["worker"]["environment"]
    assert env["MASKFLEET_BROKER_URL"] == "redis://redis:6379/0"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["MASKFLEET_S3_ADDRESSING_STYLE"] == "path"
    assert env["MASKFLEET_MODELS"].startswith("s3://maskfleet/")
    (dev,) = compose()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and dev["count"] == 1
    assert "mb --ignore-existing local/maskfleet" in " ".join(compose()["services"]["minio-init"]["entrypoint"])


def test_flower_port_consistent():
    port_re = re.compile(r"--port=(\d+)")
    (cport,) = [int(m) for a in compose()["services"]["flower"]["command"] for m in port_re.findall(a)]
    assert compose()["services"]["flower"]["ports"] == [f"{cport}:{cport}"]
    container = find("Deployment", "maskfleet-flower")["spec"]["template"]["spec"]["containers"][0]
    (kport,) = [int(m) for a in container["args"] for m in port_re.findall(a)]
    assert [p["containerPort"] for p in container["ports"]] == [kport]
    svc = find("Service", "maskfleet-flower")
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == [kport]
    assert cport == kport


def test_grace_period_exceeds_longest_job():
    cm = find("ConfigMap", "maskfleet-config")["data"]
    max_job = load_settings(cm).max_job_seconds
    pod = find("Deployment", "maskfleet-worker")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > max_job
    grace = compose()["services"]["worker"]["stop_grace_period"]
    assert int(grace.rstrip("s")) > max_job
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("readinessProbe", "livenessProbe"):
        assert "inspect ping" in " ".join(pod["containers"][0][probe]["exec"]["command"])


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=nvidia/cuda:\S+runtime", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download.pytorch.org/whl/cu\d+", text, re.M)
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert "HEALTHCHECK" in text and "inspect ping" in text
    assert 'CMD ["maskfleet", "worker"]' in text
    assert not re.search(r"(SECRET|PASSWORD|ACCESS_KEY)\S*=", text)


def test_queue_depth_exporter_matches_the_scaled_object():
    """The exporter the KEDA query reads runs in the cluster, on the ScaledObject's queue, and is scraped."""
    deploy = find("Deployment", "maskfleet-queue-depth")
    pod = deploy["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert args[:3] == ["python", "-m", "maskfleet.tasks.queue_depth"]
    port = int(args[args.index("--port") + 1])
    queues = args[args.index("--queues") + 1].split(",")
    query = find("ScaledObject", "maskfleet-worker-sd15")["spec"]["triggers"][0]["metadata"]["query"]
    (so_queue,) = re.findall(r'queue="([^"]+)"', query)
    assert queues == [so_queue]
    assert port == 9809
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert [p["targetPort"] for p in find("Service", "maskfleet-queue-depth")["spec"]["ports"]] == [port]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    (env,) = container["env"]
    assert env["name"] == "MASKFLEET_BROKER_URL"
    ref = env["valueFrom"]["configMapKeyRef"]
    assert ref["name"] == "maskfleet-config" and ref["key"] in find("ConfigMap", "maskfleet-config")["data"]
