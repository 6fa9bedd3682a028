"""Fixtures of the reliability tests (docs/reliability.md maps each RELIABILITY.md row to one).

Workers are real ``kvrelay prefill|decode`` processes on free 127.0.0.1 ports, each test
module starting the redis-server and workers its faults need (a fault that poisons a
process gets its own). ``Reference`` is the monolithic engine's greedy output.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrelay.cluster import die_with_parent, free_port, wait_until_serving, worker_command
from kvrelay.serving.tls import channel_credentials
from protos.kvrelay.v1 import generation_pb2 as pb
from protos.kvrelay.v1 import generation_pb2_grpc as pb_grpc
from tests.services.conftest import BLOCK_SIZE, READY_TIMEOUT_S, Reference, Worker
from tests.support.redis_server import RedisServer, start_redis

__all__ = ["BLOCK_SIZE", "Reference", "Worker"]


@dataclass
class Spawned(Worker):
    """A worker that can be started again with the same command, port and environment."""

    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    tls_ca_file: str = ""
    client_cert: tuple[str, str] | None = None  # (cert, key) the health probe presents (mTLS)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(die_with_parent(self.cmd), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=os.environ | self.env)
        try:
            if self.client_cert:
                wait_for(self._serving_over_mtls, READY_TIMEOUT_S)
            else:
                wait_until_serving(self.role, self.process, self.addr, READY_TIMEOUT_S,
                                   lambda _: None, self.log_path, self.tls_ca_file)
        except BaseException:
            self.stop()
            raise

    def _serving_over_mtls(self) -> bool:
        assert self.process.poll() is None, self.log()[-2000:]
        assert self.client_cert is not None
        creds = channel_credentials(self.tls_ca_file, *self.client_cert)
        with grpc.secure_channel(self.addr, creds) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def spawn(role: str, model: Path, redis_url: str, log_dir: Path, *, prefill_addr: str | None = None,
          extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
          tls_ca_file: str = "", client_cert: tuple[str, str] | None = None,
          store_timeout_s: float = 2.0) -> Spawned:
    """Start ``kvrelay <role>`` (tiny model, 16-token blocks) and wait until it is SERVING.

    ``store_timeout_s`` is generous by default, so that a test counting cache hits does not
    lose them to a stalled machine; the tests of store faults pass a short one. A decode
    worker keeps no finished prompts' blocks (``--local-prefix-cache false``): the tests
    count what comes from the store."""
    port, metrics_port = free_port(), free_port()
    cmd = worker_command(role, model=str(model), port=port, metrics_port=metrics_port,
                         redis_url=redis_url, block_size=BLOCK_SIZE, prefill_addr=prefill_addr)
    local = ["--local-prefix-cache", "false"] if role == "decode" else []  # count store hits
    cmd += ["--num-blocks", "256", "--store-timeout-s", str(store_timeout_s),
            "--drain-grace-s", "5", *local, *extra]
    worker = Spawned(role, None, f"127.0.0.1:{port}",  # type: ignore[arg-type]
                     f"http://127.0.0.1:{metrics_port}/metrics",
                     log_dir / f"{role}-{port}.log", cmd, env or {}, tls_ca_file, client_cert)
    worker.start()
    return worker


def request(prompt: str, salt: str = "", max_new_tokens: int = 8) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, cache_salt=salt,
                              sampling=pb.SamplingParams(max_new_tokens=max_new_tokens))


def generate(worker: Worker, req: pb.GenerateRequest, *, timeout_s: float = 30.0,
             metadata: tuple[tuple[str, str], ...] | None = None) -> pb.GenerateResponse:
    with worker.channel() as channel:
        return pb_grpc.GenerationStub(channel).Generate(req, timeout=timeout_s, metadata=metadata)


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path) -> Reference:
    return Reference(tiny_model_dir)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    """This module's own redis-server (an LRU cache, as deployed)."""
    server = start_redis(["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="package")
def shared_redis() -> Iterator[RedisServer]:
    server = start_redis(["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="package")
def shared_pair(shared_redis: RedisServer, tiny_model_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Spawned, Spawned]]:
    """A prefill and a decode worker shared by the modules whose faults leave them serving
    (a test that kills or stops one starts it again or resumes it)."""
    log_dir = tmp_path_factory.mktemp("shared-logs")
    prefill = spawn("prefill", tiny_model_dir, shared_redis.url(), log_dir)
    try:
        decode = spawn("decode", tiny_model_dir, shared_redis.url(), log_dir,
                       prefill_addr=prefill.addr)
    except BaseException:
        prefill.stop()
        raise
    yield prefill, decode
    decode.stop()
    prefill.stop()
