"""docker-compose.yml, run without Docker: each service's own command and environment as
local processes, service host names mapped to 127.0.0.1 and container ports to free ones.

The image's ENTRYPOINT (from deploy/Dockerfile) is prepended to each worker's command,
redis-server reads deploy/redis/redis.conf (the file the compose volume mounts), the
healthchecks are the compose ones, and one Generate call goes through decode. The only
additions are the tiny test model (KVRELAY_MODEL) and a loopback bind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kvrelay.client import Prompt, build_request, generate, open_channel
from kvrelay.cluster import free_port, stop_process, wait_for_redis
from tests.deploy.test_manifests import REPO_ROOT

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def _entrypoint() -> list[str]:
    line = next(line for line in (REPO_ROOT / "deploy" / "Dockerfile").read_text().splitlines()
                if line.startswith("ENTRYPOINT"))
    return json.loads(line.removeprefix("ENTRYPOINT"))


def _local(value: str, ports: dict[str, int]) -> str:
    """A compose value with host names and container ports mapped to this machine."""
    value = re.sub(r"\b(redis|prefill|decode|127\.0\.0\.1):(\d+)",
                   lambda m: f"127.0.0.1:{ports[m.group(2)]}", value)
    value = value.replace("0.0.0.0", "127.0.0.1")
    return str(ports[value]) if value in ports else value


def _command(service: str, ports: dict[str, int]) -> list[str]:
    entry = _entrypoint()
    assert entry == ["kvrelay"]
    return [sys.executable, "-m", "kvrelay", *(_local(a, ports) for a in SERVICES[service]["command"])]


def _named_volumes(service: str, root: Path) -> dict[str, Path]:
    """The service's named-volume mounts (container path -> a folder under ``root``, one per
    volume, so that services mounting the same volume share the folder)."""
    mounts = {}
    for entry in SERVICES[service].get("volumes", []):
        source, target = entry.split(":")[:2]
        if source in COMPOSE.get("volumes", {}):
            mounts[target] = root / source
            mounts[target].mkdir(exist_ok=True)
    return mounts


def _environment(service: str, ports: dict[str, int], model: Path, root: Path) -> dict[str, str]:
    env = {k: _local(str(v), ports) for k, v in SERVICES[service]["environment"].items()}
    for target, folder in _named_volumes(service, root).items():
        env = {k: v.replace(target, str(folder)) for k, v in env.items()}
    return {**os.environ, **env, "KVRELAY_MODEL": str(model)}


def _healthy(service: str, ports: dict[str, int]) -> bool:
    test = SERVICES[service]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python"
    cmd = [sys.executable, *(_local(a, ports) for a in test[2:])]
    return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode == 0


def _wait_healthy(service: str, proc: subprocess.Popen[bytes], ports: dict[str, int]) -> None:
    for _ in range(120):
        if _healthy(service, ports):
            return
        assert proc.poll() is None, f"{service} exited with {proc.returncode}"
    raise AssertionError(f"{service} never became healthy")


@pytest.fixture
def compose_cluster(tiny_model_dir: Path, tmp_path: Path) -> Iterator[dict[str, int]]:
    ports = {p: free_port() for p in ("6379", "50051", "50052", "9400", "9401")}
    redis_args = [a.replace("/usr/local/etc/redis/", f"{REPO_ROOT}/deploy/redis/")
                  for a in SERVICES["redis"]["command"]]
    assert redis_args[1] == f"{REPO_ROOT}/deploy/redis/redis.conf"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(
            [*redis_args, "--port", str(ports["6379"]), "--bind", "127.0.0.1",
             "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_redis(ports["6379"], 10)
        for service in ("prefill", "decode"):
            log = open(tmp_path / f"{service}.log", "wb")  # noqa: SIM115
            procs.append(subprocess.Popen(_command(service, ports), stdout=log,
                                          stderr=subprocess.STDOUT,
                                          env=_environment(service, ports, tiny_model_dir,
                                                           tmp_path)))
            log.close()
            _wait_healthy(service, procs[-1], ports)
        yield ports
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def test_the_compose_services_serve_a_generate_call(compose_cluster: dict[str, int]) -> None:
    with open_channel(f"127.0.0.1:{compose_cluster['50051']}") as channel:
        prompt = Prompt(text="A request through the compose topology. " * 4, max_new_tokens=4)
        reply = generate(channel, build_request(prompt), timeout_s=60)
        again = generate(channel, build_request(prompt), timeout_s=60)
    assert reply.usage.completion_tokens == len(reply.token_ids) > 0
    assert reply.usage.prompt_tokens > 0
    assert again.usage.cached_prompt_tokens > 0  # prefill wrote and decode read as ACL users


def test_the_compose_workers_share_one_compute_gate(compose_cluster: dict[str, int],
                                                     tmp_path: Path) -> None:
    """prefill and decode share the host's cores: both name one gate file on a common named
    volume, and both opened it (the gate and its turnstile are there); the GPU worker does not."""
    gates = {s: SERVICES[s]["environment"].get("KVRELAY_COMPUTE_GATE") for s in SERVICES
             if "environment" in SERVICES[s]}
    assert gates["prefill"] == gates["decode"] and gates["prefill"]
    assert gates["decode-gpu"] == ""
    folder = _named_volumes("prefill", tmp_path)[str(Path(gates["prefill"]).parent)]
    assert folder == _named_volumes("decode", tmp_path)[str(Path(gates["decode"]).parent)]
    gate = folder / Path(gates["prefill"]).name
    assert gate.exists() and gate.with_name(gate.name + ".turnstile").exists()
    for port in ("9400", "9401"):
        with urllib.request.urlopen(f"http://127.0.0.1:{compose_cluster[port]}/metrics",
                                    timeout=10) as reply:
            text = reply.read().decode()
        assert "kvrelay_compute_gate_bypasses_total 0.0" in text
