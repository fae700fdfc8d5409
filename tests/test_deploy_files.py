"""Static checks of deploy/: YAML parses and lints, Kubernetes manifests validate against the
schema (offline, kubernetes-validate), and names/ports agree with the project's settings.
Docker and a cluster are not available here; these checks keep the files honest."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from maskfleet.settings import Settings, variable
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
    "MASKFLEET_S3_ADDRESSING_STYLE", "MASKFLEET_CALLBACK_ALLOWLIST", "MASKFLEET_LEASE_SECONDS", "MASKFLEET_MAX_DELIVERIES",
    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
    "FLOWER_BASIC_AUTH", "FLOWER_TASK_RUNTIME_METRIC_BUCKETS", "MASKFLEET_API_KEYS_FILE", "MASKFLEET_MAX_QUEUE_DEPTH",
    "MASKFLEET_MONITOR_EVENTS",
}
SOURCE_DIRS = ["maskfleet", "tasks", "worker", "storage", "sampling", "gateway"]

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
    settings = {variable(field) for field in Settings.model_fields}  # every MASKFLEET_* the code reads
    missing = {n for n in KNOWN_ENV if n.startswith("MASKFLEET_") and n not in settings}
    assert not missing, f"KNOWN_ENV names no longer read by the code: {missing}"
    source = "\n".join(p.read_text() for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))
    assert all(n in source for n in KNOWN_ENV if n.startswith("AWS_"))  # boto3's, named in our docs
    import flower.options  # noqa: F401 (defines Flower's options, which FLOWER_<OPTION> sets)
    from tornado.options import options

    flower_env = [n[len("FLOWER_"):].lower().replace("_", "-") for n in KNOWN_ENV if n.startswith("FLOWER_")]
    assert flower_env and all(name in options._options for name in flower_env)  # tornado names options with dashes

    used = set(find("ConfigMap", "maskfleet-config")["data"]) | set(find("Secret", "maskfleet-secrets")["stringData"])
    services = compose()["services"]
    for svc in ("worker", "flower", "gateway"):
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


def test_flower_runtime_buckets_are_ours_and_it_asks_for_a_password():
    from maskfleet.tasks.metrics import DURATION_BUCKETS

    ours = [b for b in DURATION_BUCKETS if b != float("inf")]
    container = find("Deployment", "maskfleet-flower")["spec"]["template"]["spec"]["containers"][0]
    k8s_env = {e["name"]: e for e in container["env"]}
    compose_env = compose()["services"]["flower"]["environment"]
    for buckets in (k8s_env["FLOWER_TASK_RUNTIME_METRIC_BUCKETS"]["value"], compose_env["FLOWER_TASK_RUNTIME_METRIC_BUCKETS"]):
        assert [float(b) for b in buckets.split(",")] == ours
    assert k8s_env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"] == {"name": "maskfleet-secrets", "key": "FLOWER_BASIC_AUTH"}
    assert compose_env["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")  # compose refuses to start without it


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
    assert broker_url_sources(container) == ["maskfleet-config", "maskfleet-secrets"]


# --- security: who the containers run as, and where the secrets go ---

def broker_url_sources(container: dict) -> list[str]:
    """Where a container's MASKFLEET_BROKER_URL comes from, lowest precedence first: ConfigMap and/or Secret names."""
    sources = []
    for src in container.get("envFrom", []):  # env overrides envFrom; later envFrom entries override earlier
        if "configMapRef" in src and "MASKFLEET_BROKER_URL" in find("ConfigMap", src["configMapRef"]["name"])["data"]:
            sources.append(src["configMapRef"]["name"])
        if "secretRef" in src:
            sources.append(src["secretRef"]["name"])
    for env in container.get("env", []):
        if env["name"] == "MASKFLEET_BROKER_URL":
            ref = env["valueFrom"].get("secretKeyRef") or env["valueFrom"]["configMapKeyRef"]
            assert ref["key"] == "MASKFLEET_BROKER_URL"
            if "secretKeyRef" in env["valueFrom"]:
                assert ref.get("optional") is True  # a Secret without it leaves the ConfigMap's URL
            sources.append(ref["name"])
    return sources


def dockerfile_user() -> tuple[int, int]:
    """The image's numeric USER uid:gid, checked to be created in the Dockerfile with those ids."""
    text = (DEPLOY / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER (\S+)", text, re.M)
    match = re.fullmatch(r"(\d+):(\d+)", user)
    assert match, f"USER {user}: numeric uid:gid, so runAsNonRoot can verify it from the image"
    uid, gid = int(match[1]), int(match[2])
    assert re.search(rf"groupadd --gid {gid} ", text) and re.search(rf"useradd .*--uid {uid} --gid {gid} ", text)
    return uid, gid


def test_image_runs_as_a_non_root_user():
    uid, gid = dockerfile_user()
    assert uid != 0 and gid != 0
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.rindex("USER ") > text.rindex("RUN ")  # nothing after it runs as root
    home = re.search(r"useradd --create-home .* (\w+)$", text, re.M)[1]
    for path in re.findall(r"(?:MASKFLEET_MODEL_CACHE|HF_HOME)=(\S+)", text):
        assert path.startswith(f"/home/{home}/")  # caches are written under the user's home


def test_dockerfile_user_check_catches_root(monkeypatch, tmp_path):
    text = (DEPLOY / "Dockerfile").read_text()
    (tmp_path / "Dockerfile").write_text(re.sub(r"^USER \S+", "USER maskfleet", text, flags=re.M))
    monkeypatch.setattr(sys.modules[__name__], "DEPLOY", tmp_path)
    with pytest.raises(AssertionError, match="numeric uid:gid"):
        dockerfile_user()


@pytest.mark.parametrize("name", ["maskfleet-worker", "maskfleet-flower", "maskfleet-queue-depth", "maskfleet-gateway"])
def test_pods_run_unprivileged(name):
    """Non-root as the image's uid, no privilege escalation, no capabilities, read-only root filesystem."""
    uid, gid = dockerfile_user()
    pod = find("Deployment", name)["spec"]["template"]["spec"]
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == uid and ctx["runAsGroup"] == gid
    assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
        assert "privileged" not in sc and sc.get("runAsUser", uid) == uid
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts
        for mount in mounts.values():  # the writable places are emptyDirs; a Secret is mounted read-only
            volume = volumes[mount["name"]]
            assert "emptyDir" in volume or ("secret" in volume and mount.get("readOnly") is True), mount


def test_worker_writes_only_to_mounted_volumes():
    """With a read-only root filesystem, the model caches must lie on a mounted volume."""
    text = (DEPLOY / "Dockerfile").read_text()
    (container,) = find("Deployment", "maskfleet-worker")["spec"]["template"]["spec"]["containers"]
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    caches = re.findall(r"(?:MASKFLEET_MODEL_CACHE|HF_HOME)=(\S+)", text)
    assert len(caches) == 2
    for path in caches:
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), (path, mounts)


def test_broker_url_can_come_from_the_secret():
    """A broker URL with a password goes in the Secret (secret.yaml); every pod using the broker reads it from there."""
    for d in k8s_docs():
        if d["kind"] != "Deployment":
            continue
        for container in d["spec"]["template"]["spec"]["containers"]:
            sources = broker_url_sources(container)
            assert sources and sources[-1] == "maskfleet-secrets", (d["metadata"]["name"], sources)


def test_only_the_worker_gets_the_storage_and_webhook_secrets():
    for d in k8s_docs():
        if d["kind"] != "Deployment":
            continue
        for container in d["spec"]["template"]["spec"]["containers"]:
            whole_secret = any("secretRef" in src for src in container.get("envFrom", []))
            assert whole_secret == (d["metadata"]["name"] == "maskfleet-worker"), d["metadata"]["name"]


def test_compose_services_drop_privileges():
    services = compose()["services"]
    for name in ("worker", "flower"):
        svc = services[name]
        assert svc["image"] == "maskfleet-worker:latest"  # the non-root image
        assert "user" not in svc and not svc.get("privileged", False)
        assert "no-new-privileges:true" in svc["security_opt"] and svc["cap_drop"] == ["ALL"]


# --- the HTTP gateway ---

def gateway_container() -> dict:
    (container,) = find("Deployment", "maskfleet-gateway")["spec"]["template"]["spec"]["containers"]
    return container


def test_gateway_image_is_small_and_runs_as_the_workers_user():
    text = (DEPLOY / "Dockerfile.gateway").read_text()
    assert re.search(r"^FROM python:\S+-slim$", text, re.M) and not re.search(r"^RUN .*torch", text, re.M)
    assert 'pip install "/src[gateway]"' in text
    assert re.search(r"^USER (\S+)", text, re.M)[1] == "%d:%d" % dockerfile_user()
    assert not re.search(r"(SECRET|PASSWORD|ACCESS_KEY)\S*=", text)
    ignored = (DEPLOY / "Dockerfile.gateway.dockerignore").read_text().split()
    assert "deploy/gateway-keys.jsonl" in ignored and ".git" in ignored


def test_gateway_port_probes_and_keys_agree():
    from maskfleet.gateway.app import create_app
    from maskfleet.settings import Settings

    routes = {getattr(r, "path", None) for r in create_app(Settings(), insecure_no_auth=True).routes}
    container = gateway_container()
    port = int(container["args"][container["args"].index("--port") + 1])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert [p["targetPort"] for p in find("Service", "maskfleet-gateway")["spec"]["ports"]] == [port]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port and container[probe]["httpGet"]["path"] in routes
    assert {"/readyz", "/healthz", "/metrics"} <= routes
    dockerfile = (DEPLOY / "Dockerfile.gateway").read_text()
    assert f'"--port", "{port}"' in dockerfile and f"EXPOSE {port}" in dockerfile
    assert compose()["services"]["gateway"]["ports"] == [f"{port}:{port}"]
    # The key file the gateway reads is the Secret's file, mounted read-only.
    env = {e["name"]: e for e in container["env"]}
    keys_path = Path(env["MASKFLEET_API_KEYS_FILE"]["value"])
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "api-keys"]
    assert keys_path.parent == Path(mount["mountPath"]) and mount["readOnly"] is True
    volumes = {v["name"]: v for v in find("Deployment", "maskfleet-gateway")["spec"]["template"]["spec"]["volumes"]}
    secret = find("Secret", volumes["api-keys"]["secret"]["secretName"])
    assert keys_path.name in secret["stringData"]


def test_gateway_autoscales_its_deployment():
    hpa = find("HorizontalPodAutoscaler", "maskfleet-gateway")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "maskfleet-gateway"}
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert [m["type"] for m in hpa["metrics"]] == ["Pods", "Resource"]
