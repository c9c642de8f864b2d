"""The deployment files (deploy/) agree with each other and with the code.

deploy/check.sh validates each file against its schema (Kubernetes, Compose, KEDA); this
module checks what no schema can: the ports the listeners use are published, the listeners
bind 0.0.0.0 inside containers, the inbox is enabled exactly where an inbox folder is
mounted, every deploy configuration loads with ecgbridge's own ``load_settings`` under the
environment its container gets, the probes and the image's health check hit
``/api/health`` on the console port (tried against a real console), no secret sits in a
ConfigMap, and KEDA watches the Redis list Celery fills (tried against a real Redis).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import yaml

from ecgbridge.core.queue import DELIVERY_QUEUE, QUEUE, QUEUES, Dispatcher, make_celery
from ecgbridge.core.settings import (
    ConsoleSettings,
    DicomListener,
    MllpListener,
    Settings,
    check_config,
    default_settings,
    load_settings,
)
from tests.support.console import running_console

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
CONFIG_PATH = "/etc/ecgbridge/ecgbridge.yaml"
HEALTH_PATH = "/api/health"
#: Manifests kept out of the kustomization on purpose: the Secret example (placeholders must
#: never be applied over the real values) and the CPU autoscaler that replaces keda.yaml.
NOT_APPLIED = {"secret.example.yaml", "worker-hpa-cpu.yaml"}
#: Environment variable names that hold secrets: they must come from a Secret.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|PRIVATE|CREDENTIAL", re.IGNORECASE)
OVERRIDES = ("ECGBRIDGE_CONFIG", "ECGBRIDGE_DATA_DIR", "ECGBRIDGE_DATABASE_URL", "ECGBRIDGE_BROKER_URL")


# ----- reading the files ------------------------------------------------------------------------
def _docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} and $$."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group("name"), m.group("op") or "", m.group("arg") or ""
        value = env.get(name)
        if op in (":-", "-"):
            return value if value is not None and (value or op == "-") else arg
        if op in (":?", "?"):
            assert value is not None and (value or op == "?"), f"compose would stop: {arg}"
            return value
        return value or ""

    text = re.sub(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}", one, text)
    return text.replace("$$", "$")


def _interpolated(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return _interpolate(node, env)
    if isinstance(node, list):
        return [_interpolated(n, env) for n in node]
    if isinstance(node, dict):
        return {k: _interpolated(v, env) for k, v in node.items()}
    return node


#: What deploy/.env must hold (compose stops without it); the value is a placeholder.
COMPOSE_DOTENV = {"POSTGRES_PASSWORD": "placeholder-from-dotenv"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _interpolated(_docs(DEPLOY / "compose.yaml")[0], COMPOSE_DOTENV)


def _compose_ports(service: dict[str, Any]) -> set[int]:
    """Container ports a compose service publishes (short and long syntax)."""
    ports: set[int] = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def _compose_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Mount target -> (source, read-only) of a compose service (short and long syntax)."""
    mounts: dict[str, tuple[str, bool]] = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            mounts[entry["target"]] = (entry.get("source", ""), bool(entry.get("read_only")))
        else:
            parts = entry.split(":")
            mounts[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
    return mounts


def _dockerfile_runtime() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's runtime stage, continuation lines joined."""
    lines: list[str] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stage = [i for i, line in enumerate(lines) if re.match(r"FROM\s+\S+\s+AS\s+runtime\b", line, re.IGNORECASE)]
    assert stage, "the Dockerfile has no stage named runtime"
    out = []
    for line in lines[stage[0] :]:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in _dockerfile_runtime():
        if instruction == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of the manifests kustomization.yaml applies, by (kind, name)."""
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for resource in kustomization["resources"]:
        for doc in _docs(K8S / resource):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} is defined twice"
            objects[key] = doc
    return objects


def _container(k8s: dict[tuple[str, str], dict[str, Any]], deployment: str) -> dict[str, Any]:
    containers = k8s[("Deployment", deployment)]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _pod(k8s: dict[tuple[str, str], dict[str, Any]], deployment: str) -> dict[str, Any]:
    return dict(k8s[("Deployment", deployment)]["spec"]["template"]["spec"])


def _k8s_env(k8s: dict[tuple[str, str], dict[str, Any]], deployment: str) -> dict[str, str]:
    """The environment the container gets; a Secret's value is a placeholder, an optional key absent."""
    container = _container(k8s, deployment)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"{deployment}: envFrom only from ConfigMaps here: {source}"
        env.update(k8s[("ConfigMap", source["configMapRef"]["name"])]["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"].get("secretKeyRef")
        assert ref is not None, f"{deployment}: {var['name']} comes from a Secret or is a plain value"
        if not ref.get("optional"):
            env[var["name"]] = f"placeholder-from-secret-{ref['name']}-{ref['key']}"
    return env


def _k8s_mounts(k8s: dict[tuple[str, str], dict[str, Any]], deployment: str) -> dict[str, dict[str, Any]]:
    """Mount path -> the volume mounted there."""
    volumes = {v["name"]: v for v in _pod(k8s, deployment)["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in _container(k8s, deployment)["volumeMounts"]}


def _named_port(k8s: dict[tuple[str, str], dict[str, Any]], deployment: str, port: int | str) -> int:
    if isinstance(port, int):
        return port
    ports = {p["name"]: p["containerPort"] for p in _container(k8s, deployment)["ports"]}
    assert port in ports, f"{deployment} has no container port named {port}"
    return int(ports[port])


def _k8s_config_text(k8s: dict[tuple[str, str], dict[str, Any]]) -> str:
    return str(k8s[("ConfigMap", "ecgbridge-config")]["data"]["ecgbridge.yaml"])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _load(path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """load_settings as the container runs it: with its environment (and a clean check)."""
    with monkeypatch.context() as m:
        for name, value in env.items():
            m.setenv(name, value)
        settings = load_settings(path)
        report = check_config(path)
    assert report.ok, report.problems
    return settings


@pytest.fixture
def k8s_config_file(tmp_path: Path, k8s: dict[tuple[str, str], dict[str, Any]]) -> Path:
    path = tmp_path / "ecgbridge.yaml"
    path.write_text(_k8s_config_text(k8s), encoding="utf-8")
    return path


def _listener_ports(settings: Settings) -> set[int]:
    ports = {settings.listeners.dicom.port} if settings.listeners.dicom.enabled else set()
    if settings.listeners.mllp.enabled:
        ports.add(settings.listeners.mllp.port)
    if settings.console.enabled:
        ports.add(settings.console.port)
    return ports


#: The ports the listeners use unless told otherwise: each deployment must publish them.
DEFAULT_PORTS = {
    "dicom": DicomListener().port,
    "mllp": MllpListener().port,
    "console (and /metrics)": ConsoleSettings().port,
}


def test_the_default_ports_are_the_documented_ones() -> None:
    assert DEFAULT_PORTS == {"dicom": 11112, "mllp": 2575, "console (and /metrics)": 8080}


def _all_bind_everywhere(settings: Settings, where: str) -> None:
    for name, listener in (("dicom", settings.listeners.dicom), ("mllp", settings.listeners.mllp)):
        if listener.enabled:
            assert listener.host == "0.0.0.0", f"{where}: listeners.{name}.host must be 0.0.0.0 in a container"
    if settings.console.enabled:
        assert settings.console.host == "0.0.0.0", f"{where}: console.host must be 0.0.0.0 in a container"


# ----- the schema checks --------------------------------------------------------------------------
def test_deploy_check_script_passes() -> None:
    """deploy/check.sh: Kubernetes schemas, the Compose specification, KEDA and kustomization schemas."""
    proc = subprocess.run(["bash", str(DEPLOY / "check.sh")], capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip(f"deploy/check.sh could not run: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----- the image -------------------------------------------------------------------------------------
def test_the_image_default_configuration_loads_and_its_ports_are_exposed(clean_env: pytest.MonkeyPatch) -> None:
    runtime = _dockerfile_runtime()
    copies = [args.split() for instruction, args in runtime if instruction == "COPY" and "--from" not in args]
    assert ["deploy/ecgbridge.standalone.yaml", CONFIG_PATH] in copies
    assert "!deploy/ecgbridge.standalone.yaml" in (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    env = _dockerfile_env()
    assert env["ECGBRIDGE_CONFIG"] == CONFIG_PATH
    cmd = json.loads(next(args for instruction, args in runtime if instruction == "CMD"))
    assert cmd == ["run", "--config", CONFIG_PATH]

    settings = _load(DEPLOY / "ecgbridge.standalone.yaml", {}, clean_env)
    _all_bind_everywhere(settings, "ecgbridge.standalone.yaml")
    exposed = {int(p.split("/")[0]) for i, args in runtime if i == "EXPOSE" for p in args.split()}
    assert set(DEFAULT_PORTS.values()) <= exposed
    assert _listener_ports(settings) <= exposed
    assert str(settings.data_dir) in next(args for i, args in runtime if i == "VOLUME")
    # no inbox folder is mounted into the standalone container
    assert not settings.listeners.inbox.enabled
    url = urlsplit(env["ECGBRIDGE_HEALTHCHECK_URL"])
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", settings.console.port, HEALTH_PATH)


def _healthcheck_command() -> list[str]:
    args = next(args for instruction, args in _dockerfile_runtime() if instruction == "HEALTHCHECK")
    command = json.loads(args.split(" CMD ", 1)[1])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def _run_healthcheck(url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ECGBRIDGE_HEALTHCHECK_URL": url}
    return subprocess.run(_healthcheck_command(), env=env, capture_output=True, text=True, timeout=60)


def test_the_image_healthcheck_passes_on_a_healthy_console(tmp_path: Path, redis_server: Any) -> None:
    with running_console(tmp_path, broker_url=redis_server.url) as console:
        assert httpx.get(console.url + HEALTH_PATH).status_code == 200
        proc = _run_healthcheck(console.url + HEALTH_PATH)
    assert proc.returncode == 0, proc.stderr


def test_the_image_healthcheck_fails_when_the_broker_is_down(tmp_path: Path) -> None:
    with running_console(tmp_path) as console:  # the broker is a closed port
        response = httpx.get(console.url + HEALTH_PATH)
        assert response.status_code == 503 and response.json()["checks"]["broker"].startswith("failed")
        proc = _run_healthcheck(console.url + HEALTH_PATH)
    assert proc.returncode != 0
    assert "503" in proc.stderr


# ----- Docker Compose ------------------------------------------------------------------------------
def _compose_settings(compose: dict[str, Any], service: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    svc = compose["services"][service]
    command = svc["command"]
    config = command[command.index("--config") + 1]
    source, read_only = _compose_mounts(svc)[config]
    assert read_only, f"{service}: mount the configuration read-only"
    env = {k: str(v) for k, v in svc["environment"].items()}
    return _load(DEPLOY / source, env, monkeypatch)


@pytest.mark.parametrize("service", ["gateway", "worker"])
def test_compose_configuration_loads_with_the_environment_compose_sets(
    compose: dict[str, Any], service: str, clean_env: pytest.MonkeyPatch
) -> None:
    env = compose["services"][service]["environment"]
    settings = _compose_settings(compose, service, clean_env)
    assert settings.database_url == env["ECGBRIDGE_DATABASE_URL"]
    assert settings.broker_url == env["ECGBRIDGE_BROKER_URL"] and not settings.embedded_broker
    assert urlsplit(settings.database_url).password is None, "the password comes from PGPASSWORD"
    assert env["PGPASSWORD"] == COMPOSE_DOTENV["POSTGRES_PASSWORD"]
    # every secret the configuration names is given to the container
    for name in re.findall(r"\w+_env:\s*(\w+)", (DEPLOY / "ecgbridge.compose.yaml").read_text(encoding="utf-8")):
        assert name in env, f"{service}: {name} is not in the environment"
    # the blobs: one volume, at data_dir, in the gateway and in every worker
    assert _compose_mounts(compose["services"][service])[str(settings.data_dir)][0] == "ecgbridge-data"


def test_compose_publishes_every_port_a_listener_uses(compose: dict[str, Any], clean_env: pytest.MonkeyPatch) -> None:
    settings = _compose_settings(compose, "gateway", clean_env)
    _all_bind_everywhere(settings, "ecgbridge.compose.yaml")
    published = _compose_ports(compose["services"]["gateway"])
    for name, port in DEFAULT_PORTS.items():
        assert port in published, f"compose does not publish the {name} port {port}"
    assert _listener_ports(settings) <= published
    assert not _compose_ports(compose["services"]["worker"]), "a worker listens on nothing"


def test_compose_console_is_published_on_the_host_loopback_unless_told(compose: dict[str, Any]) -> None:
    raw = _docs(DEPLOY / "compose.yaml")[0]["services"]["gateway"]["ports"]
    console = [p for p in raw if str(p).endswith(f":{ConsoleSettings().port}")]
    assert console == ["${ECGBRIDGE_CONSOLE_PUBLISH:-127.0.0.1}:8080:8080"]
    assert "127.0.0.1:8080:8080" in compose["services"]["gateway"]["ports"]


def test_compose_inbox_is_enabled_exactly_where_an_inbox_folder_is_mounted(
    compose: dict[str, Any], clean_env: pytest.MonkeyPatch
) -> None:
    settings = _compose_settings(compose, "gateway", clean_env)
    mounts = _compose_mounts(compose["services"]["gateway"])
    # a folder mounted writable besides data_dir is an inbox folder (read-only ones: configuration, certificates)
    others = {target for target, (_, ro) in mounts.items() if not ro} - {str(settings.data_dir)}
    inbox = settings.listeners.inbox
    if inbox.enabled:
        assert inbox.path is not None
        assert str(inbox.path) in mounts, f"the inbox {inbox.path} is not mounted"
        source, read_only = mounts[str(inbox.path)]
        assert not read_only, "the inbox moves files into done/ and failed/: it must be writable"
        assert others == {str(inbox.path)}, f"the inbox {inbox.path} is not what compose mounts: {others}"
        # a new named volume takes its owner from the image: the image must create the folder for uid 10001
        if source in (compose.get("volumes") or {}):
            assert re.search(
                rf"install -d -o ecgbridge -g ecgbridge -m \d+ {re.escape(str(inbox.path))}\b",
                (DEPLOY / "Dockerfile").read_text(encoding="utf-8"),
            )
    else:
        assert not others, f"compose mounts {others} but the inbox is disabled"
    worker_writable = {target for target, (_, ro) in _compose_mounts(compose["services"]["worker"]).items() if not ro}
    assert worker_writable == {str(settings.data_dir)}, "workers read no inbox"


# ----- Kubernetes ----------------------------------------------------------------------------------
def test_kustomization_applies_every_manifest_but_the_example_and_the_alternative() -> None:
    listed = set(_docs(K8S / "kustomization.yaml")[0]["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present - NOT_APPLIED
    assert NOT_APPLIED <= present
    autoscalers = listed & {"keda.yaml", "worker-hpa-cpu.yaml"}
    assert len(autoscalers) == 1, "one autoscaler for the workers: KEDA's ScaledObject or the CPU HPA"


def test_every_object_is_in_the_namespace(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    namespace = _docs(K8S / "kustomization.yaml")[0]["namespace"]
    assert ("Namespace", namespace) in k8s
    for (kind, name), doc in k8s.items():
        if kind != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{kind}/{name}"


@pytest.mark.parametrize("deployment", ["ecgbridge-gateway", "ecgbridge-worker", "ecgbridge-delivery"])
def test_k8s_configuration_loads_with_the_environment_of_each_pod(
    k8s: dict[tuple[str, str], dict[str, Any]], deployment: str, k8s_config_file: Path, clean_env: pytest.MonkeyPatch
) -> None:
    env = _k8s_env(k8s, deployment)
    settings = _load(k8s_config_file, env, clean_env)
    assert settings.database_url == env["ECGBRIDGE_DATABASE_URL"]
    assert settings.broker_url == env["ECGBRIDGE_BROKER_URL"] and not settings.embedded_broker
    # the configuration file, the blobs and /tmp are where the pod mounts them
    args = _container(k8s, deployment)["args"]
    config = Path(args[args.index("--config") + 1])
    mounts = _k8s_mounts(k8s, deployment)
    assert mounts[str(config.parent)]["configMap"]["name"] == "ecgbridge-config"
    assert config.name in k8s[("ConfigMap", "ecgbridge-config")]["data"]
    claim = mounts[str(settings.data_dir)]["persistentVolumeClaim"]["claimName"]
    assert k8s[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "emptyDir" in mounts["/tmp"]
    # every secret the configuration names reaches the pods that use it, from a Secret: the
    # workers deliver and read EHR context (tokens), the gateway signs people in (OIDC)
    if deployment in ("ecgbridge-worker", "ecgbridge-delivery"):
        auths = [d.auth for d in settings.destinations if hasattr(d, "auth")] + [e.auth for e in settings.ehr]
        wanted = {a.token_env for a in auths if a.token_env}
    else:
        wanted = {settings.console.oidc.client_secret_env} if settings.console.oidc else set()
        wanted.add("ECGBRIDGE_OIDC_CLIENT_SECRET")  # what secret.example.yaml and the README name
    from_secret = {
        v["name"] for v in _container(k8s, deployment).get("env", []) if "secretKeyRef" in v.get("valueFrom", {})
    }
    assert wanted <= from_secret, f"{deployment}: {wanted - from_secret} not given from a Secret"


def test_k8s_listeners_bind_all_interfaces_and_the_inbox_matches_the_mounts(
    k8s: dict[tuple[str, str], dict[str, Any]], k8s_config_file: Path, clean_env: pytest.MonkeyPatch
) -> None:
    settings = _load(k8s_config_file, _k8s_env(k8s, "ecgbridge-gateway"), clean_env)
    _all_bind_everywhere(settings, "configmap.yaml")
    writable = {m["mountPath"] for m in _container(k8s, "ecgbridge-gateway")["volumeMounts"] if not m.get("readOnly")}
    others = writable - {str(settings.data_dir), "/tmp"}
    inbox = settings.listeners.inbox
    if inbox.enabled:
        assert others == {str(inbox.path)}, f"the inbox {inbox.path} is not what the pod mounts writable: {others}"
    else:
        assert not others, f"the gateway mounts {others} but the inbox is disabled"


def test_k8s_publishes_every_port_a_listener_uses(
    k8s: dict[tuple[str, str], dict[str, Any]], k8s_config_file: Path, clean_env: pytest.MonkeyPatch
) -> None:
    settings = _load(k8s_config_file, _k8s_env(k8s, "ecgbridge-gateway"), clean_env)
    gateway = k8s[("Deployment", "ecgbridge-gateway")]["spec"]["selector"]["matchLabels"]
    served: dict[int, str] = {}
    for (kind, name), doc in k8s.items():
        if kind != "Service":
            continue
        assert doc["spec"]["selector"] == gateway, f"Service {name} selects the gateway"
        for port in doc["spec"]["ports"]:
            target = _named_port(k8s, "ecgbridge-gateway", port.get("targetPort", port["port"]))
            assert port["port"] == target, f"Service {name}: port {port['port']} -> {target}"
            served[target] = name
    for what, port in DEFAULT_PORTS.items():
        assert port in served, f"no Service publishes the {what} port {port}"
    assert _listener_ports(settings) <= set(served)
    assert served[settings.listeners.dicom.port] == "ecgbridge-dicom"
    assert served[settings.listeners.mllp.port] == "ecgbridge-mllp"
    console = k8s[("Service", served[settings.console.port])]
    assert console["spec"]["type"] == "ClusterIP", "the console is not for the hospital network at large"
    assert console["spec"]["publishNotReadyAddresses"] is True
    assert console["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert console["metadata"]["annotations"]["prometheus.io/port"] == str(settings.console.port)
    assert "ports" not in _container(k8s, "ecgbridge-worker")


def test_k8s_probes_use_the_health_endpoint_on_the_console_port(
    k8s: dict[tuple[str, str], dict[str, Any]], k8s_config_file: Path, clean_env: pytest.MonkeyPatch
) -> None:
    settings = _load(k8s_config_file, _k8s_env(k8s, "ecgbridge-gateway"), clean_env)
    container = _container(k8s, "ecgbridge-gateway")
    readiness = container["readinessProbe"]["httpGet"]
    assert readiness["path"] == HEALTH_PATH
    assert _named_port(k8s, "ecgbridge-gateway", readiness["port"]) == settings.console.port
    assert readiness.get("scheme", "HTTP") == ("HTTPS" if settings.console.tls else "HTTP")
    # liveness and start-up: the process serves the console port; never /api/health, whose
    # 503 during a Redis or PostgreSQL outage must not get the gateway restarted
    for probe in ("livenessProbe", "startupProbe"):
        port = container[probe]["tcpSocket"]["port"]
        assert _named_port(k8s, "ecgbridge-gateway", port) == settings.console.port, probe
    assert container["readinessProbe"]["timeoutSeconds"] >= 5, "the broker check may take seconds to fail"


def test_the_readiness_path_answers_as_the_probe_expects(tmp_path: Path, redis_server: Any) -> None:
    with running_console(tmp_path, broker_url=redis_server.url) as console:
        ok = httpx.get(console.url + HEALTH_PATH)
        assert ok.status_code == 200 and ok.json()["status"] == "ok"
        assert set(ok.json()["checks"]) >= {"store", "broker"}


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")
    else:
        yield path, node


def test_no_secret_in_a_configmap(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    for (kind, name), doc in k8s.items():
        if kind != "ConfigMap":
            continue
        for key, value in doc.get("data", {}).items():
            assert not SECRET_NAME.search(key), f"ConfigMap {name}: {key} looks like a secret"
            assert "-----BEGIN" not in value, f"ConfigMap {name}: {key} holds a PEM certificate or key"
            texts = [value] if key != "ecgbridge.yaml" else [str(v) for _, v in _walk(yaml.safe_load(value))]
            for text in texts:
                if "://" in text:
                    assert urlsplit(text).password is None, f"ConfigMap {name}: {key} has a URL with a password"
        if "ecgbridge.yaml" in doc.get("data", {}):
            for path, value in _walk(yaml.safe_load(doc["data"]["ecgbridge.yaml"])):
                leaf = path.rsplit(".", 1)[-1]
                if SECRET_NAME.search(leaf) and value is not None:
                    assert leaf.endswith(("_env", "_file")), f"{path}: a secret in the configuration file"


@pytest.mark.parametrize("deployment", ["ecgbridge-gateway", "ecgbridge-worker", "ecgbridge-delivery"])
def test_secrets_reach_the_pods_from_secrets_only(k8s: dict[tuple[str, str], dict[str, Any]], deployment: str) -> None:
    container = _container(k8s, deployment)
    for var in container.get("env", []):
        if SECRET_NAME.search(var["name"]):
            assert "secretKeyRef" in var.get("valueFrom", {}), f"{deployment}: {var['name']} must come from a Secret"
    for name in _k8s_env(k8s, deployment):  # nothing secret-named from a ConfigMap (envFrom)
        if SECRET_NAME.search(name):
            assert any(v["name"] == name for v in container.get("env", [])), f"{deployment}: {name} from a ConfigMap"
    # certificates and keys: files from the Secret ecgbridge-tls
    tls = _k8s_mounts(k8s, deployment)["/etc/ecgbridge-tls"]
    assert tls["secret"]["secretName"] == "ecgbridge-tls" and tls["secret"]["optional"] is True


def test_every_file_the_k8s_configuration_names_is_in_a_mounted_secret(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    text = _k8s_config_text(k8s)
    named = {str(v) for p, v in _walk(yaml.safe_load(text)) if p.endswith("_file") and v}
    named |= set(re.findall(r"/etc/ecgbridge-tls/[\w.-]+", text))  # the commented examples too
    assert named, "the configuration shows where certificates go"
    for deployment in ("ecgbridge-gateway", "ecgbridge-worker", "ecgbridge-delivery"):
        secret_dirs = [path for path, volume in _k8s_mounts(k8s, deployment).items() if "secret" in volume]
        for file in named:
            assert any(file.startswith(d.rstrip("/") + "/") for d in secret_dirs), f"{deployment}: {file}"


def test_the_secret_example_names_every_key_and_holds_no_value(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    example_text = (K8S / "secret.example.yaml").read_text(encoding="utf-8")
    example = _docs(K8S / "secret.example.yaml")[0]
    assert ("Secret", example["metadata"]["name"]) not in k8s, "the example is never applied"
    assert all(v.startswith("REPLACE-WITH-") for v in example["stringData"].values())
    for deployment in ("ecgbridge-gateway", "ecgbridge-worker", "ecgbridge-delivery"):
        for var in _container(k8s, deployment).get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            assert ref["name"] == example["metadata"]["name"]
            assert ref["key"] in example_text, f"secret.example.yaml does not mention {ref['key']}"
            if not ref.get("optional"):
                assert ref["key"] in example["stringData"], f"{deployment} needs {ref['key']}"


def test_the_worker_deployments_take_both_queues_between_them(
    k8s: dict[tuple[str, str], dict[str, Any]], compose: dict[str, Any]
) -> None:
    """Analyses on the analysis workers, deliveries on the delivery workers: no queue left unserved."""

    def queues(args: list[str]) -> tuple[str, ...]:
        return QUEUES[args[args.index("--queues") + 1] if "--queues" in args else "all"]

    served = [queues(_container(k8s, d)["args"]) for d in ("ecgbridge-worker", "ecgbridge-delivery")]
    assert served == [(QUEUE,), (DELIVERY_QUEUE,)]
    services = compose["services"]
    assert [queues(services[s]["command"]) for s in ("worker", "delivery")] == [(QUEUE,), (DELIVERY_QUEUE,)]


def test_workers_are_sized_by_the_autoscaler_only(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert "replicas" not in k8s[("Deployment", "ecgbridge-worker")]["spec"]
    assert k8s[("Deployment", "ecgbridge-gateway")]["spec"]["replicas"] == 1


def test_keda_watches_the_celery_queue_on_the_configured_redis(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    scaled = k8s[("ScaledObject", "ecgbridge-worker")]
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", "ecgbridge-worker")
    assert ("Deployment", target["name"]) in k8s
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis"
    assert all(isinstance(v, str) for v in meta.values()), "KEDA's trigger metadata values are strings"
    assert meta["listName"] == QUEUE
    broker = urlsplit(k8s[("ConfigMap", "ecgbridge-env")]["data"]["ECGBRIDGE_BROKER_URL"])
    assert meta["address"] == f"{broker.hostname}:{broker.port or 6379}"
    assert meta.get("databaseIndex", "0") == (broker.path.strip("/") or "0")
    assert meta.get("enableTLS", "false") == ("true" if broker.scheme == "rediss" else "false")


def test_the_list_keda_watches_is_the_one_celery_fills(
    k8s: dict[tuple[str, str], dict[str, Any]], redis_server: Any
) -> None:
    list_name = k8s[("ScaledObject", "ecgbridge-worker")]["spec"]["triggers"][0]["metadata"]["listName"]
    base = default_settings().model_dump(exclude={"source_file"})
    settings = Settings.model_validate({**base, "broker": {"url": redis_server.url}})
    client = redis.Redis.from_url(redis_server.url)
    assert client.llen(list_name) == 0
    Dispatcher(make_celery(settings)).analyse("00000000-0000-0000-0000-000000000001")
    assert client.llen(list_name) == 1
