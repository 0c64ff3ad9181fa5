"""deploy/: the Kubernetes native-sidecar example and the compose example, parsed and checked for
what operators rely on (probes, security context, grace periods, credentials from a Secret), and
their pgsidecar settings loaded by the real config loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pgsidecar.config.conninfo import parse_conninfo
from pgsidecar.config.load import CONFIG_KEYS, env_name, load_config, parse_duration
from pgsidecar.observe.health import ENDPOINTS

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes" / "sidecar.yaml"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
KNOWN_ENV = {env_name(key) for key in CONFIG_KEYS} | {"PGSIDECAR_CONFIG"}


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(K8S.read_text()) if doc}


@pytest.fixture(scope="module")
def pod(k8s) -> dict:
    return k8s["Deployment"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def sidecar(pod) -> dict:
    (found,) = [c for c in pod["initContainers"] if c["name"] == "pgsidecar"]
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _k8s_config(k8s, sidecar, tmp_path):
    """The sidecar's effective Config: its env plus the ConfigMap file, through the real loader."""
    env = {k: v for k, v in _env(sidecar).items() if isinstance(v, str)}
    config_file = tmp_path / "pgsidecar.yaml"
    config_file.write_text(k8s["ConfigMap"]["data"]["pgsidecar.yaml"])
    env["PGSIDECAR_CONFIG"] = str(config_file)
    return load_config(path=None, env=env, overrides={})


def test_native_sidecar(pod, sidecar):
    assert sidecar["restartPolicy"] == "Always", "a native sidecar is an initContainer that stays up"
    assert "pgsidecar" not in [c["name"] for c in pod["containers"]]


def test_probes_hit_the_health_endpoints(sidecar):
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    metrics_port = int(_env(sidecar)["PGSIDECAR_METRICS_LISTEN"].rpartition(":")[2])
    for probe, path in (("startupProbe", "/startupz"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path and path in ENDPOINTS
        assert ports.get(get["port"], get["port"]) == metrics_port
    # The kubelet probes the pod IP, so the health listener cannot be loopback-only.
    assert _env(sidecar)["PGSIDECAR_METRICS_LISTEN"].startswith("0.0.0.0:")


def test_resources_and_security_context(pod, sidecar):
    assert sidecar["resources"]["requests"]["memory"] and sidecar["resources"]["limits"]["memory"]
    sc = sidecar["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # A read-only root needs a writable /tmp for the generated local certificate.
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_app_uses_localhost_and_a_secret(k8s, pod):
    (app,) = pod["containers"]
    env = _env(app)
    assert "@localhost:6432/" in env["DATABASE_URL"]
    secret_name = k8s["Secret"]["metadata"]["name"]
    refs = [v["secretKeyRef"] for v in env.values() if isinstance(v, dict) and "secretKeyRef" in v]
    assert {r["key"] for r in refs if r["name"] == secret_name} == {"username", "password"}
    assert "$(DB_PASSWORD)" in env["DATABASE_URL"], "the password is not written into the manifest"


def test_grace_periods_fit_the_drain(k8s, pod, sidecar, tmp_path):
    config = _k8s_config(k8s, sidecar, tmp_path)
    (app,) = pod["containers"]
    pre_stop = app["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + config.shutdown.grace_s + 5


def test_k8s_settings_load(k8s, sidecar, tmp_path):
    assert set(_env(sidecar)) <= KNOWN_ENV
    config = _k8s_config(k8s, sidecar, tmp_path)
    assert config.listen.host == "127.0.0.1" and config.listen.port == 6432
    assert config.upstream.target.sslmode.value == "verify-full"
    assert config.upstream.target.sslrootcert.startswith("/etc/pgsidecar/ca/")
    mounts = [m["mountPath"] for m in sidecar["volumeMounts"]]
    assert "/etc/pgsidecar/ca" in mounts and "/etc/pgsidecar/conf" in mounts


def test_compose_services(compose):
    services = compose["services"]
    assert {"app", "pgsidecar", "postgres"} <= set(services)
    pg_command = " ".join(services["postgres"]["command"])
    assert "ssl=on" in pg_command and "ssl_cert_file=" in pg_command and "ssl_key_file=" in pg_command
    side = services["pgsidecar"]
    assert side["build"]["context"] == ".." and side["build"]["dockerfile"] == "Dockerfile"
    assert side["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["app"]["depends_on"]["pgsidecar"]["condition"] == "service_healthy"
    assert side["read_only"] is True and "/tmp" in side["tmpfs"]
    assert not side["user"].startswith("0")


def test_compose_settings_load_and_grace_fits(compose):
    side = compose["services"]["pgsidecar"]
    env = {k: str(v) for k, v in side["environment"].items()}
    assert set(env) <= KNOWN_ENV
    config = load_config(path=None, env=env, overrides={})
    target = config.upstream.target
    assert (target.host, target.sslmode.value) == ("postgres", "verify-full")
    assert config.listen.host == "0.0.0.0"
    assert parse_duration(side["stop_grace_period"]) > config.shutdown.grace_s


def test_compose_app_goes_through_the_sidecar_with_tls(compose):
    url = compose["services"]["app"]["environment"]["DATABASE_URL"]
    target = parse_conninfo(url.replace("${APP_DB_PASSWORD:-change-me}", "x"), env={})
    assert (target.host, target.port, target.sslmode.value) == ("pgsidecar", 6432, "require")


K8S_UNIX = ROOT / "deploy" / "kubernetes" / "sidecar-unix-socket.yaml"


def test_the_unix_socket_fast_lane_manifest(tmp_path):
    """deploy/kubernetes/sidecar-unix-socket.yaml: one emptyDir in both containers; the sidecar's
    socket file is where the app's libpq DSN looks; the rest is sidecar.yaml's."""
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(K8S_UNIX.read_text()) if doc}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "pgsidecar"]
    (app,) = pod["containers"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "pgsidecar-socket"]
    assert "emptyDir" in volume
    config = _k8s_config(docs, sidecar, tmp_path)
    socket_dir = config.listen.unix_socket_dir
    for container in (sidecar, app):
        assert {"name": "pgsidecar-socket", "mountPath": socket_dir} in container["volumeMounts"]
    url = str(_env(app)["DATABASE_URL"]).replace("$(DB_USER)", "app").replace("$(DB_PASSWORD)", "pw")
    target = parse_conninfo(url, {})
    assert target.is_unix_socket and target.host == socket_dir and target.port == config.listen.port
    tcp = yaml.safe_load_all(K8S.read_text())
    same = {doc["kind"]: doc for doc in tcp if doc}
    assert same["ConfigMap"] == docs["ConfigMap"] and same["Secret"] == docs["Secret"]
