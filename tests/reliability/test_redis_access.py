"""RELIABILITY.md section E, Redis credentials: the deployed ACL users (deploy/redis/users.acl,
with the passwords docker-compose.yml gives the workers) have least privilege, and workers
reach a TLS redis-server (rediss://) as those users."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis as redis_py
import yaml

from kvrelay.cluster import free_port, stop_process, wait_for_redis
from tests.reliability.conftest import Reference, generate, request, spawn
from tests.support.redis_server import make_tls_files, start_redis

REPO = Path(__file__).resolve().parents[2]
ACL_FILE = REPO / "deploy" / "redis" / "users.acl"
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]


def _credentials(service: str) -> tuple[str, str]:
    url = urlsplit(COMPOSE[service]["environment"]["KVRELAY_REDIS_URL"])
    assert url.username and url.password
    return url.username, url.password


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[int]:
    """A redis-server that loads the deployed ACL file as it is."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--aclfile", str(ACL_FILE)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_redis(port, 30)
        yield port
    finally:
        stop_process(proc, grace_s=5)


def _client(port: int, service: str | None) -> redis_py.Redis:
    user, password = _credentials(service) if service else (None, None)
    return redis_py.Redis(port=port, username=user, password=password, socket_timeout=15)


def test_prefill_may_write_only_kvrelay_keys(acl_redis: int) -> None:
    prefill = _client(acl_redis, "prefill")
    assert prefill.set("kvrelay:v1:x:1", b"block", nx=True, ex=60)
    assert prefill.get("kvrelay:v1:x:1") == b"block"
    for forbidden in (lambda: prefill.set("other:1", b"x"), prefill.flushall,
                      lambda: prefill.config_get("*"), lambda: prefill.delete("kvrelay:v1:x:1"),
                      lambda: prefill.keys("*")):
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            forbidden()


def test_decode_may_only_read_kvrelay_keys(acl_redis: int) -> None:
    _client(acl_redis, "prefill").set("kvrelay:v1:x:2", b"block")
    decode = _client(acl_redis, "decode")
    assert decode.get("kvrelay:v1:x:2") == b"block" and decode.exists("kvrelay:v1:x:2") == 1
    for forbidden in (lambda: decode.set("kvrelay:v1:x:3", b"x"), lambda: decode.get("other:1"),
                      decode.flushall):
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            forbidden()


def test_the_default_user_may_only_ping(acl_redis: int) -> None:
    anonymous = _client(acl_redis, None)
    assert anonymous.ping()
    with pytest.raises(redis_py.exceptions.NoPermissionError):
        anonymous.get("kvrelay:v1:x:2")


def test_workers_reach_a_tls_redis_as_their_acl_users(
        tiny_model_dir: Path, log_dir: Path, tmp_path: Path, reference: Reference) -> None:
    tls = make_tls_files(tmp_path / "tls")
    server = start_redis(tls=tls)
    workers = []
    try:
        admin = server.client()
        for line in ACL_FILE.read_text().splitlines():
            _, name, *rules = line.split()
            if name != "default":
                admin.execute_command("ACL", "SETUSER", name, *rules)
        trust = ("--redis-tls-ca-file", str(tls.ca_cert), "--store-timeout-s", "2")
        prefill = spawn("prefill", tiny_model_dir, server.url(*_credentials("prefill")), log_dir,
                        extra=trust)
        workers.append(prefill)
        decode = spawn("decode", tiny_model_dir, server.url(*_credentials("decode")), log_dir,
                       prefill_addr=prefill.addr, extra=(*trust, "--publish-local-blocks", "false"))
        workers.append(decode)
        assert server.url().startswith("rediss://")
        prompt = "Blocks cross an encrypted connection to the store as ACL users. " * 3
        replies = [generate(decode, request(prompt, "tls")) for _ in range(2)]
        expected = reference.greedy(reference.tokenizer.encode(prompt), 8)
        assert [list(r.token_ids) for r in replies] == [expected] * 2
        assert replies[1].usage.cached_prompt_tokens > 0
        assert prefill.metric("kvrelay_store_errors_total") == 0
        assert decode.metric("kvrelay_store_errors_total") == 0
    finally:
        for worker in reversed(workers):
            worker.stop()
        server.stop()


def test_kubernetes_gives_redis_and_the_workers_the_same_acl_users() -> None:
    objects = [o for o in yaml.safe_load_all((REPO / "deploy" / "k8s" / "redis.yaml").read_text())]
    secret = next(o for o in objects if o["kind"] == "Secret")["stringData"]
    assert secret["users.acl"] == ACL_FILE.read_text()
    for role in ("prefill", "decode"):
        assert urlsplit(secret[f"{role}-url"]).username == _credentials(role)[0]
