"""The deployment artefacts: the Dockerfile, docker-compose.yml and deploy/ (a TOML file and the
Kubernetes manifests). Each is linted or validated offline by its own tool (hadolint,
check-jsonschema with the Compose spec, kubernetes-validate), which the test extra installs; the
other tests say what the artefacts promise: who the container runs as, where secrets come
from, how Redis keeps its data."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from notifier.config import API_KEY_ALIAS, Settings, env_name, load_settings
from notifier.service import HEALTH_PROBE_TIMEOUT_S

from samples import API_KEY, NEW_SECRET, SLACK_URL

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
# The user's documentation: the README and the pages under docs/ (Docker is in deployment.md).
DOCUMENTATION = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
TOML = DEPLOY / "notifier.toml"
K8S = DEPLOY / "kubernetes"
# Not a Kubernetes object (kustomize reads it), so the schemas have nothing to say about it.
KUSTOMIZATION = K8S / "kustomization.yaml"
# The oldest Kubernetes the manifests support, and the newest the validator knows today.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


def tool(name: str) -> str:
    """A command-line tool of the test extra; a missing one fails the test (never skips it)."""
    found = shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)
    assert found, f"{name} is not installed: pip install '.[test]'"
    return found


def lint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, (KEYWORD, arguments), grouped by stage."""
    text = DOCKERFILE.read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    result: list[list[tuple[str, str]]] = []
    for line in "\n".join(lines).replace("\\\n", " ").splitlines():
        keyword, _, args = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            result.append([])
        if keyword:
            result[-1].append((keyword.upper(), " ".join(args.split())))
    return result


def final_stage(keyword: str) -> list[str]:
    return [args for kw, args in stages()[-1] if kw == keyword]


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def compose_service(name: str) -> dict[str, Any]:
    (compose,) = load_yaml(COMPOSE)
    return compose["services"][name]


def manifests() -> list[Path]:
    return sorted(path for path in K8S.glob("*.yaml") if path != KUSTOMIZATION)


def k8s(kind: str, name: str) -> dict[str, Any]:
    objects = [doc for path in manifests() for doc in load_yaml(path)]
    (found,) = (doc for doc in objects if (doc["kind"], doc["metadata"]["name"]) == (kind, name))
    return found


def notifier_container() -> dict[str, Any]:
    (container,) = k8s("Deployment", "chamelaion-notifier")["spec"]["template"]["spec"][
        "containers"
    ]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {entry["name"]: entry.get("value", entry.get("valueFrom")) for entry in container["env"]}


def nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in a parsed YAML document, the document itself included, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from nodes(value)


def k8s_nodes() -> Iterator[dict[str, Any]]:
    """Every mapping in every Kubernetes manifest."""
    for path in manifests():
        for document in load_yaml(path):
            yield from nodes(document)


def pod_specs() -> list[dict[str, Any]]:
    """The spec of every pod the manifests run (a Deployment's, a StatefulSet's template...)."""
    return [node for node in k8s_nodes() if "containers" in node]


def seconds(duration: str) -> float:
    """A Compose duration (`5s`, `1m30s`, `300ms`) in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert "".join(number + unit for number, unit in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def published_host_ip(port: str | int | dict[str, Any]) -> str | None:
    """The host address a Compose port mapping publishes on; None for every interface."""
    if isinstance(port, dict):  # the long syntax: {target, published, host_ip, protocol}
        return port.get("host_ip")
    # The short syntax: [[HOST_IP:]HOST_PORT:]CONTAINER_PORT[/PROTOCOL], an IPv6 host in [].
    parts = str(port).partition("/")[0].rsplit(":", 2)
    return parts[0].removeprefix("[").removesuffix("]") if len(parts) == 3 else None


# --- Dockerfile ---


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = lint(tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_every_stage_is_a_pinned_python_3_11_slim_image() -> None:
    for stage in stages():
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+( AS \w+)?", stage[0][1])


def test_a_builder_stage_builds_the_wheel_and_the_final_stage_copies_only_its_result() -> None:
    builder, _ = stages()
    assert builder[0][1].endswith(" AS builder")
    assert any(kw == "RUN" and "pip wheel" in args for kw, args in builder)
    assert final_stage("COPY") == ["--from=builder /opt/notifier /opt/notifier"]


def test_the_final_stage_runs_as_a_non_root_user() -> None:
    *_, user = final_stage("USER")
    assert user.partition(":")[0] not in {"root", "0"}


def test_the_image_runs_notifier_run() -> None:
    assert [json.loads(args) for args in final_stage("ENTRYPOINT")] == [["notifier"]]
    assert [json.loads(args) for args in final_stage("CMD")] == [["run"]]
    assert final_stage("STOPSIGNAL") == ["SIGTERM"]


def test_the_healthcheck_runs_notifier_healthcheck_which_probes_the_configured_port() -> None:
    # Not a port of its own: `notifier healthcheck` reads http_port as `notifier run` does,
    # from a flag, the environment or the TOML file of NOTIFIER_CONFIG.
    (healthcheck,) = final_stage("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert json.loads(command) == ["notifier", "healthcheck"]
    assert options.split() == [
        "--interval=30s",
        "--timeout=5s",
        "--start-period=20s",
        "--retries=3",
    ]


def test_the_healthcheck_gives_up_on_healthz_before_docker_gives_up_on_it() -> None:
    # Docker kills a probe at its timeout and reports no reason; the probe's own timeout,
    # shorter, ends it with a message naming the URL.
    (healthcheck,) = final_stage("HEALTHCHECK")
    (timeout,) = re.findall(r"--timeout=(\S+)", healthcheck)
    assert seconds(timeout) > HEALTH_PROBE_TIMEOUT_S


def test_the_documentation_names_the_dockerfiles_base_image() -> None:
    (base,) = {stage[0][1].partition(" ")[0] for stage in stages()}
    assert (ROOT / "docs" / "deployment.md") in DOCUMENTATION
    mentioned = [
        image
        for page in DOCUMENTATION
        for image in re.findall(r"\bpython:3[\d.]*-slim(?:-[a-z]+)?", page.read_text())
    ]
    assert mentioned, f"neither the README nor docs/ names the base image {base}"
    assert set(mentioned) == {base}


def test_no_secret_is_baked_into_the_image() -> None:
    for keyword, args in (step for stage in stages() for step in stage):
        if keyword in {"ENV", "ARG"}:
            assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD|SLACK|WEBHOOK", args, re.I)


def test_the_build_context_admits_only_what_the_builder_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*"
    admitted = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {
        source.removeprefix("./").rstrip("/")
        for keyword, args in stages()[0]
        if keyword == "COPY"
        for source in args.split()[:-1]
    }
    assert admitted == copied


# --- docker-compose.yml ---


def test_the_compose_file_follows_the_compose_specification() -> None:
    result = lint(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_redis_keeps_its_data_with_aof_on_a_named_volume_and_never_evicts() -> None:
    redis = compose_service("redis")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    volume, _, path = redis["volumes"][0].partition(":")
    assert path == "/data"
    assert volume in load_yaml(COMPOSE)[0]["volumes"]
    assert re.fullmatch(r"redis:7\.4\.\d+-alpine", redis["image"])


def test_compose_starts_the_notifier_once_redis_has_loaded_its_data() -> None:
    # While Redis loads its AOF it answers PING with LOADING: `redis-cli ping` exits 0 on
    # that error reply, `redis-cli -e ping` exits 1.
    assert compose_service("redis")["healthcheck"]["test"] == ["CMD", "redis-cli", "-e", "ping"]
    depends_on = compose_service("notifier")["depends_on"]
    assert depends_on == {"redis": {"condition": "service_healthy"}}


def test_compose_gives_redis_5_minutes_to_load_a_large_aof_before_calling_it_unhealthy() -> None:
    # Failures within start_period don't count; the first success ends it.
    healthcheck = compose_service("redis")["healthcheck"]
    start_period = seconds(healthcheck.get("start_period", "0s"))
    retrying = seconds(healthcheck["interval"]) * healthcheck.get("retries", 3)
    assert start_period + retrying >= 300


def test_compose_publishes_every_port_on_loopback_only() -> None:
    (compose,) = load_yaml(COMPOSE)
    published = {
        (name, str(port)): published_host_ip(port)
        for name, service in compose["services"].items()
        for port in service.get("ports", [])
    }
    assert ("notifier", "127.0.0.1:8080:8080") in published
    for (name, port), host_ip in published.items():
        assert host_ip is not None, f"{name} publishes {port} on every interface"
        assert ipaddress.ip_address(host_ip).is_loopback, f"{name} publishes {port}"
    for name, service in compose["services"].items():
        assert service.get("network_mode") != "host", f"{name} shares the host's network"


def test_compose_takes_the_api_key_from_the_environment_and_refuses_to_start_without_it() -> None:
    environment = compose_service("notifier")["environment"]
    assert re.fullmatch(r"\$\{NOTIFIER_API_KEY:\?.+\}", environment["NOTIFIER_API_KEY"])
    for optional in ("NOTIFIER_WEBHOOK_SECRET", "NOTIFIER_SLACK_WEBHOOK_URL"):
        assert environment[optional] == f"${{{optional}:-}}"
    assert environment["NOTIFIER_REDIS_URL"] == "redis://redis:6379/0"


def test_compose_mounts_deploy_notifier_toml_read_only_as_the_config() -> None:
    notifier = compose_service("notifier")
    path = notifier["environment"]["NOTIFIER_CONFIG"]
    assert f"./deploy/notifier.toml:{path}:ro" in notifier["volumes"]


def test_compose_waits_longer_than_the_shutdown_takes() -> None:
    notifier = compose_service("notifier")
    assert int(notifier["stop_grace_period"].removesuffix("s")) >= 10
    assert notifier["restart"] == "unless-stopped"


# --- deploy/notifier.toml ---


def test_the_deploy_toml_loads_and_the_environment_adds_the_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFIER_API_KEY", API_KEY)
    monkeypatch.setenv("NOTIFIER_WEBHOOK_SECRET", NEW_SECRET)
    monkeypatch.setenv("NOTIFIER_SLACK_WEBHOOK_URL", SLACK_URL)
    settings = load_settings({"config": TOML})
    routes = {route.name: route for route in settings.routes}
    assert sorted(routes) == ["slack", "webhook"]
    assert routes["webhook"].secret is not None
    assert routes["webhook"].reference_id


# --- Kubernetes ---


def test_the_kubernetes_manifests_follow_the_api_schemas() -> None:
    versions = [arg for version in KUBERNETES_VERSIONS for arg in ("-k", version)]
    result = lint(tool("kubernetes-validate"), *versions, "--strict", *map(str, manifests()))
    assert result.returncode == 0, result.stdout + result.stderr
    # An unknown kind or apiVersion is only a warning to the validator, with exit 0.
    assert "WARN" not in result.stdout


def test_the_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    (kustomization,) = load_yaml(KUSTOMIZATION)
    expected = {path.name for path in manifests()} - {"secret.yaml"}
    assert sorted(kustomization["resources"]) == sorted(expected)


def test_the_configmap_holds_deploy_notifier_toml_word_for_word() -> None:
    configmap = k8s("ConfigMap", "chamelaion-notifier")
    assert configmap["data"]["notifier.toml"] == TOML.read_text()


def test_the_deployment_mounts_the_configmap_as_notifier_config() -> None:
    container = notifier_container()
    (mount,) = container["volumeMounts"]
    assert env_of(container)["NOTIFIER_CONFIG"] == f"{mount['mountPath']}/notifier.toml"
    volumes = k8s("Deployment", "chamelaion-notifier")["spec"]["template"]["spec"]["volumes"]
    assert {"name": mount["name"], "configMap": {"name": "chamelaion-notifier"}} in volumes


def test_the_deployment_runs_two_replicas_with_probes_on_healthz_and_readyz() -> None:
    assert k8s("Deployment", "chamelaion-notifier")["spec"]["replicas"] == 2
    container = notifier_container()
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "http", "containerPort": 8080} in container["ports"]


def test_the_deployment_requests_and_limits_cpu_and_memory() -> None:
    resources = notifier_container()["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


def test_the_pod_runs_as_the_images_user_unprivileged_on_a_read_only_filesystem() -> None:
    pod = k8s("Deployment", "chamelaion-notifier")["spec"]["template"]["spec"]
    *_, user = final_stage("USER")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.partition(":")[0]
    assert notifier_container()["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_the_deployment_gives_the_shutdown_time_and_prometheus_the_port() -> None:
    template = k8s("Deployment", "chamelaion-notifier")["spec"]["template"]
    assert template["spec"]["terminationGracePeriodSeconds"] >= 10
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"


def test_the_service_exposes_the_http_port_of_the_deployments_pods() -> None:
    spec = k8s("Service", "chamelaion-notifier")["spec"]
    labels = k8s("Deployment", "chamelaion-notifier")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= labels.items()
    assert spec["ports"] == [{"name": "http", "port": 8080, "targetPort": "http"}]


def test_a_disruption_budget_keeps_one_of_the_two_replicas_through_a_drain() -> None:
    budget = k8s("PodDisruptionBudget", "chamelaion-notifier")["spec"]
    deployment = k8s("Deployment", "chamelaion-notifier")["spec"]
    labels = deployment["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["minAvailable"] == 1 < deployment["replicas"]


def test_the_deployment_reads_every_key_of_the_example_secret_and_no_other() -> None:
    secret = k8s("Secret", "chamelaion-notifier")["stringData"]
    refs = {
        name: source["secretKeyRef"]
        for name, source in env_of(notifier_container()).items()
        if isinstance(source, dict)
    }
    assert {ref["name"] for ref in refs.values()} == {"chamelaion-notifier"}
    assert {ref["key"] for ref in refs.values()} == set(secret)


def test_every_secret_but_the_api_key_is_optional_so_a_missing_one_never_blocks_the_pod() -> None:
    # A missing key of a non-optional secretKeyRef is CreateContainerConfigError: the pod
    # never starts. Only the API key is required by the notifier's settings.
    required = {env_name("api_key"), API_KEY_ALIAS}
    settings = {env_name(field) for field in Settings.model_fields} | required
    refs = [
        (entry["name"], entry["valueFrom"]["secretKeyRef"])
        for entry in k8s_nodes()
        if "secretKeyRef" in entry.get("valueFrom", {})
    ]
    # Secrets are read key by key (no envFrom), so every one is checked here.
    assert len(refs) == sum("secretKeyRef" in node for node in k8s_nodes())
    assert not any("secretRef" in node for node in k8s_nodes())
    assert env_name("api_key") in dict(refs)
    for name, ref in refs:
        assert name in settings, f"{name} is no setting of the notifier"
        if name in required:
            assert not ref.get("optional"), f"{name} is required: the pod must wait for it"
        else:
            assert ref.get("optional") is True, f"{name} is optional in the notifier's settings"


def test_the_deployment_uses_the_redis_service_and_logs_json() -> None:
    env = env_of(notifier_container())
    service = k8s("Service", "notifier-redis")
    (port,) = service["spec"]["ports"]
    assert env["NOTIFIER_REDIS_URL"] == f"redis://notifier-redis:{port['port']}/0"
    assert env["NOTIFIER_LOG_FORMAT"] == "json"


def test_kubernetes_redis_keeps_its_data_with_aof_on_a_persistent_volume_and_never_evicts() -> None:
    statefulset = k8s("StatefulSet", "notifier-redis")
    assert statefulset["spec"]["replicas"] == 1
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert "--appendonly yes" in args
    assert "--maxmemory-policy noeviction" in args
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]


def test_every_container_with_a_liveness_probe_has_at_least_5_minutes_to_start() -> None:
    # The liveness probe runs only once the startup probe has passed: a Redis loading a large
    # AOF, or a notifier waiting on a slow API at start-up, is not restarted meanwhile.
    probed = [
        container
        for pod in pod_specs()
        for container in pod["containers"]
        if "livenessProbe" in container
    ]
    assert {container["name"] for container in probed} == {"notifier", "redis"}
    for container in probed:
        startup = container.get("startupProbe")
        assert startup, f"{container['name']} has a liveness probe but no startup probe"
        # Kubernetes' defaults: failureThreshold 3, periodSeconds 10.
        window = startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10)
        assert window >= 300, f"{container['name']} gets {window} s to start"


def test_kubernetes_redis_is_started_and_ready_only_once_its_data_is_loaded() -> None:
    # `redis-cli ping` exits 0 on the LOADING reply of a Redis that is loading its AOF;
    # `redis-cli -e ping` exits 1.
    statefulset = k8s("StatefulSet", "notifier-redis")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == ["redis-cli", "-e", "ping"], probe


def test_nothing_in_kubernetes_is_reachable_from_outside_the_cluster() -> None:
    services = [node for node in k8s_nodes() if node.get("kind") == "Service"]
    assert services
    for service in services:
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]
    for pod in pod_specs():
        assert not pod.get("hostNetwork")
        for container in pod["containers"]:
            for port in container.get("ports", []):
                assert "hostPort" not in port, container["name"]


def test_only_the_notifiers_pods_may_connect_to_redis() -> None:
    # Redis has no password: any pod that reaches it could read or rewrite the state.
    policy = k8s("NetworkPolicy", "notifier-redis")["spec"]
    redis_pods = k8s("StatefulSet", "notifier-redis")["spec"]["template"]
    notifier_pods = k8s("Deployment", "chamelaion-notifier")["spec"]["template"]
    (redis,) = redis_pods["spec"]["containers"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_pods["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert source.keys() == {"podSelector"}
    assert (
        source["podSelector"]["matchLabels"].items() <= notifier_pods["metadata"]["labels"].items()
    )
    assert not source["podSelector"]["matchLabels"].items() <= (
        redis_pods["metadata"]["labels"].items()
    )
    (port,) = rule["ports"]
    assert port["port"] in {redis["ports"][0]["name"], redis["ports"][0]["containerPort"]}


# --- secrets ---

SECRET_LOOKING = [
    re.compile(r"whsec_(?!REPLACE_ME\b|\.\.\.)\S+"),
    re.compile(r"hooks\.slack\.com/services/(?!\.\.\.)\S+"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"),
    re.compile(r"rediss?://[^/\s]*:[^@/\s]+@"),  # a password in a Redis URL
    # A long value with a digit in it, given to something named like a secret.
    re.compile(r"(?i)(key|secret|token|password)[\"']?\s*[:=]\s*[\"']?(?=\S*\d)[\w+/=-]{16,}"),
]


@pytest.mark.parametrize(
    "path",
    [COMPOSE, *sorted(path for path in DEPLOY.rglob("*") if path.is_file())],
    ids=lambda path: path.relative_to(ROOT).as_posix(),
)
def test_no_deployment_file_holds_a_secret(path: Path) -> None:
    text = path.read_text()
    for pattern in SECRET_LOOKING:
        assert not pattern.search(text), f"{pattern.pattern} in {path.name}"


def test_the_example_secret_holds_only_placeholders() -> None:
    for value in k8s("Secret", "chamelaion-notifier")["stringData"].values():
        assert "REPLACE_ME" in value
